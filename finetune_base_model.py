"""Fine-tune the Matrix-Game 2.0 base model on your own Unreal recordings.

    python finetune_base_model.py                          # with the settings below
    python finetune_base_model.py --NUM_EPOCHS=3 --RESUME=true
    python finetune_base_model.py --demo                   # the whole pipeline, tiny model, CPU
    python finetune_base_model.py --help                   # every setting, its value and meaning
    torchrun --nproc_per_node=4 finetune_base_model.py     # several GPUs (DDP; FSDP for "full")

It loads BASE_MODEL_DIR (re-initialising the keyboard embeddings when your key set has
another width than the checkpoint), freezes what TRAINING_STRATEGY does not train, makes
sure every clip of DATA_DIR is in the latent cache (encoding it with the VAE and CLIP if
not), and trains with the model's own flow-matching objective. Everything it writes goes
to CHECKPOINT_DIR; read training_info.txt there first.

train() below reads as its phases; the pieces live in the `runs` (run folder) and
`training` (ranks, precision, epochs, flow matching, EMA, schedule) packages.
"""

import datetime
import math
import platform
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

import convert_unreal_data as data
from cli.settings import MAX_EPOCHS, ScriptSettings, ShowHelp, check_choices, check_ranges, raise_for_problems
from demo_world.setup import DEMO_CONTROLS_NOTES, TRAINING_DEMO_SETTINGS, prepare_demo
from generation.finetuned import (BASE_MODEL_KEY, FINAL_FILE, FULL_CONTENTS, LORA_CONTENTS, MERGED_FILE,
                                  TRAINED_CONTENTS, merge_lora_file, recorded_base_model)
from generation.previews import epoch_preview
from latents.cache import CACHE_DTYPES, CacheError
from planning.plan import plan_training
from recordings.errors import DataError
from recordings.report import check_data
from runs.errors import TrainingError
from runs.curves import FINE_TUNING_CURVES
from runs.folder import STATE_FILE, RunFolder, load_state, same_setting
from runs.saved_state import (MAX_SAVED_STEPS, absent_or_none, check_saved_state, list_of, number_in, of_type,
                              optimizer_state_for, optional, schedule_state, sequence, step_within_schedule,
                              tensors_like, whole_number)
from runs.info import device_name, format_count, git_commit, settings_and_data_lines, speed_lines
from runs.logbook import tensorboard_installed
from runs.progress import ProgressBar
from training.controls import controls_learned, describe_controls
from training.data import prepare_data
from training.epochs import (EpochBatches, NoisedClips, actions_digest, epoch_order, plan_epoch,
                             seed_global_generators)
from training.flow_matching import noised_inputs, validate
from training.precision import MIXED_PRECISIONS, choose_precision
from training.ranks import (Ranks, end_with_error, full_tensors, gradient_sync, init_ranks, load_full_tensors,
                            sharded, wrap_for_ranks)
from training.recipe import Savers, TrainingRecipe, lora_config
from training.schedule import LRSchedule, apply_learning_rate, warmup_warning
from training.step_log import StepLog
from wan import flow
from wan.files import check_output_folder
from wan.fingerprint import FINGERPRINT_KEY, model_fingerprint
from wan.clip import read_clip_file
from wan.loading import CheckpointError, inspect_base_model, load_base_model
from wan.vae import read_vae_file
from wan.model import STRATEGIES, WanModel

# -----------------------------------------------------------------------------
# Settings: edit them here, or override any of them with --NAME=value.
# where things are
BASE_MODEL_DIR = "models/base_model"     # config JSON + diffusion_pytorch_model.safetensors
VAE_PATH = data.VAE_PATH                 # models/Wan2.1_VAE.pth
CLIP_PATH = data.CLIP_PATH               # models/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth
DATA_DIR = data.DATA_DIR                 # one recording or a folder of recordings
CACHE_DIR = data.CACHE_DIR               # encoded clips; shared by runs, keyed by content
CACHE_DTYPE = data.CACHE_DTYPE           # "bf16" (half the disk) or "fp32"
VIDEO_HEIGHT = data.VIDEO_HEIGHT         # frames are centre-cropped to this aspect and resized:
VIDEO_WIDTH = data.VIDEO_WIDTH           # 352x640, the base model's size (sides multiples of 16)
CHECKPOINT_DIR = "checkpoints"           # where this run writes everything (one run per folder)
IGNORE_BASE_FINGERPRINT = False          # --merge: merge even into a BASE_MODEL_DIR that is not the base the run trained over (e.g. a copy in another dtype)
# data (defaults live in convert_unreal_data.py; KEY_MAP and SPLIT_SEED are edited there)
SEQUENCE_LENGTH = data.SEQUENCE_LENGTH   # frames per clip, 4k+1
CLIP_STRIDE = data.CLIP_STRIDE           # None: SEQUENCE_LENGTH // 2
KEYBOARD_KEYS = data.KEYBOARD_KEYS       # column order of the keyboard tensor
MOUSE_SCALE = data.MOUSE_SCALE           # CSV mouse (degrees per frame) -> the model's units
SKIP_BAD_FRAMES = data.SKIP_BAD_FRAMES   # True: an unreadable frame becomes a gap instead of an error
VAL_FRACTION = data.VAL_FRACTION         # share of clips held out for validation
# optimisation
TRAINING_STRATEGY = "action_only"        # "action_only", "last_layers", "lora" or "full"
LAST_LAYERS = 3                          # blocks trained by "last_layers" (with actions + head)
# LoRA (TRAINING_STRATEGY="lora"): low-rank adapters on the blocks' linear layers, action modules trained fully
LORA_RANK = 64                           # the adapters' rank r
LORA_ALPHA = 64.0                        # an adapter's update is scaled by LORA_ALPHA / LORA_RANK
LORA_TARGETS = ("self_attn", "cross_attn", "ffn")  # groups, or layers like self_attn.q, ffn.0 (wan/lora.py)
LORA_DROPOUT = 0.0                       # dropout on the adapters' input (training only)
LORA_HEAD = False                        # also train the output head fully
BATCH_SIZE = 1                           # clips per micro-batch (per GPU)
GRAD_ACCUM_STEPS = 4                     # effective batch = BATCH_SIZE x GRAD_ACCUM_STEPS
NUM_EPOCHS = 10                          # passes over the training clips
LEARNING_RATE = 1e-5                     # the peak learning rate (AdamW)
MIN_LR_RATIO = 0.1                       # the cosine decays to LEARNING_RATE x this
WEIGHT_DECAY = 0.01                      # AdamW's decoupled weight decay
WARMUP_STEPS = 50                        # optimizer steps of linear warm-up
MAX_GRAD_NORM = 1.0                      # gradients are clipped to this norm
EMA_DECAY = 0.0                          # 0: off; e.g. 0.999: validate and save EMA weights
EMA_WARMUP = True                        # the k-th EMA update uses min(EMA_DECAY, (1+k)/(10+k))
# flow matching (the base model's own objective)
TIMESTEP_SHIFT = 5.0                     # pushes training noise levels towards pure noise
TIMESTEP_SAMPLING = "uniform"            # "uniform" over the shifted grid, or "logit_normal"
MIN_SIGMA = 0.0                          # training noise levels are kept in [MIN_SIGMA, MAX_SIGMA]
MAX_SIGMA = 1.0                          # (1: pure noise; lower it to skip the noisiest levels)
VAL_SIGMAS = 4                           # fixed noise levels per validation clip
VAL_EVERY_EPOCHS = 1                     # validate every N epochs and after the last (raise it where validating costs more than an epoch)
# speed and memory
GRADIENT_CHECKPOINTING = True            # recompute each block in backward: far less memory, ~1/3 slower
MIXED_PRECISION = "bf16"                 # "bf16" (CUDA) or "fp32"
COMPILE = False                          # torch.compile each block (CUDA; slow first steps)
NUM_WORKERS = 2                          # DataLoader workers
DEVICE = "auto"                          # "auto", "cuda", "cuda:1", "cpu"
GPU_MEMORY_GB = 24                       # --plan: the card to fit (its memory in GB)
NUM_CLIPS = None                         # --plan: training clips per epoch for its epoch times (None: counted in DATA_DIR, else 1000)
# memory savers (--plan shows what each saves; FINETUNING_GUIDE.md says which card needs which)
OPTIMIZER = "adamw"                      # "adamw", or "adamw_8bit": torchao's, both moments in 8 bits (1/4 the state)
OPTIMIZER_IN_BACKWARD = False            # step each tensor as its gradient is ready: no whole gradient (one GPU, GRAD_ACCUM_STEPS=1)
OFFLOAD_OPTIMIZER = False                # optimizer state (and EMA) in CPU memory, stepped there
OFFLOAD_FROZEN = False                   # frozen weights of the blocks in CPU memory, brought in block by block
SHARD_MODEL = False                      # several GPUs: FSDP for every strategy, not only "full"
# saving
SAVE_EVERY_EPOCHS = 2                    # weights file every N epochs (0: only the final file)
SAVE_EVERY_STEPS = 0                     # 0: only at epoch ends; else also every N optimizer steps
LOG_EVERY_STEPS = 10                     # metrics.csv (and TensorBoard's events) are written this often
TENSORBOARD = tensorboard_installed()    # TensorBoard event files in CHECKPOINT_DIR/tensorboard/ (on where the package is installed)
RESUME = False                           # continue the run in CHECKPOINT_DIR/training_state.pt
SEED = 42                                # data order, noise and any re-initialised weights
# previews (generate_preview.py): the most active validation clip, generated from its first frame and actions
PREVIEW_EVERY_EPOCHS = 0                 # 0: off; else every N epochs and after the last, into previews/
PREVIEW_STEPS = 50                       # sampling steps per preview
# -----------------------------------------------------------------------------

SETTINGS = ScriptSettings.of(globals())
SETTING_NAMES = SETTINGS.names
FLAGS = {"--demo": "the whole pipeline on a generated recording with tiny random weights, on CPU "
                   "(writes demo_run/)",
         "--plan": "predict this run's GPU memory and time on a GPU_MEMORY_GB card and the common ones, and what "
                   "fits (no GPU needed; about a minute for the real model)",
         "--merge": f"write a lora run's final file merged into the base model: CHECKPOINT_DIR/{MERGED_FILE}, a "
                    "full state dict"}
INFO_FILE = "training_info.txt"
PREVIEW_DIR = "previews"
# A run can continue only with the settings that shaped its state and its data order
# (EFFECTIVE_BATCH = BATCH_SIZE x GRAD_ACCUM_STEPS x ranks, so a run may resume on another
# number of GPUs with the same effective batch; LORA and UPDATE_RULE are None unless a run
# uses LoRA or another update than AdamW, and FRAME_NAME unless it names other files than
# frame_<number>.png, so runs from before they existed still resume. The other layout
# settings of convert_unreal_data.py change only the actions, which the resume compares).
RECIPE = TrainingRecipe()                # the step's calls, shared with the planner (training/recipe.py)
HOST = torch.device("cpu")               # where OFFLOAD_OPTIMIZER and OFFLOAD_FROZEN keep their tensors
RESUME_MUST_MATCH = ("BASE_MODEL_DIR", "DATA_DIR", "SEQUENCE_LENGTH", "CLIP_STRIDE", "KEYBOARD_KEYS",
                     "MOUSE_SCALE", "VAL_FRACTION", "VIDEO_HEIGHT", "VIDEO_WIDTH", "CACHE_DTYPE",
                     "TRAINING_STRATEGY", "LAST_LAYERS", "EFFECTIVE_BATCH", "LEARNING_RATE", "MIN_LR_RATIO",
                     "WEIGHT_DECAY", "WARMUP_STEPS", "MAX_GRAD_NORM", "EMA_DECAY", "EMA_WARMUP", "TIMESTEP_SHIFT", "TIMESTEP_SAMPLING",
                     "MIN_SIGMA", "MAX_SIGMA", "MIXED_PRECISION", "SEED", "LORA", "UPDATE_RULE", "FRAME_NAME")


# -----------------------------------------------------------------------------
# Settings

def parse_settings(argv) -> tuple[dict, bool]:
    """Defaults, then --demo's settings, then --NAME=value overrides. Returns (settings, demo)."""
    return SETTINGS.parse_checked(argv, FLAGS, {"--demo": TRAINING_DEMO_SETTINGS}, check_settings)


def check_settings(s: dict) -> None:
    """Every range (cli/settings.py's rules), every choice, and the folders, before any work."""
    problems = check_ranges(s)
    problems += check_choices(s, {"TRAINING_STRATEGY": STRATEGIES, "MIXED_PRECISION": MIXED_PRECISIONS,
                                  "TIMESTEP_SAMPLING": flow.SAMPLING_MODES, "CACHE_DTYPE": tuple(CACHE_DTYPES)})
    if s["TRAINING_STRATEGY"] == "lora" and not problems:
        try:
            lora_config(s).check()
        except ValueError as error:
            problems.append(f"LORA_TARGETS / LORA_RANK: {error}")
    problems += Savers.of(s).problems(s)
    if not problems:
        try:
            flow.bounded_training_grid(s["TIMESTEP_SHIFT"], s["MIN_SIGMA"], s["MAX_SIGMA"])
        except ValueError as error:
            problems.append(str(error))
    for name in ("CHECKPOINT_DIR", "CACHE_DIR"):
        try:
            check_output_folder(s[name], name)
        except FileExistsError as error:
            problems.append(str(error))
    raise_for_problems(problems)


# -----------------------------------------------------------------------------
# The phases of a run

@dataclass
class PreparedModel:
    model: WanModel
    wrapped: torch.nn.Module     # what the training forward goes through (DDP, FSDP or the model)
    trainable: dict              # name -> parameter the strategy trains
    reinitialised: list          # keyboard tensors re-initialised for another keyboard width


def prepare_model(s: dict, ranks: Ranks, device: torch.device, precision) -> PreparedModel:
    """Load the model, re-initialise the keyboard if its width differs, freeze by strategy,
    and wrap it for the ranks."""
    model, reinitialised = load_base_model(s["BASE_MODEL_DIR"], keyboard_dim=len(s["KEYBOARD_KEYS"]),
                                           device=device, dtype=precision.model_dtype, seed=s["SEED"])
    trainable = RECIPE.prepare(model, s)
    model.set_gradient_checkpointing(s["GRADIENT_CHECKPOINTING"])
    if s["COMPILE"]:
        for block in model.blocks:
            block.compile()
    wrapped = wrap_for_ranks(model, sharded(s["TRAINING_STRATEGY"], s["SHARD_MODEL"], ranks.world), ranks, device,
                             precision.use_bf16)
    trainable = {n: p for n, p in model.named_parameters() if n in trainable}  # FSDP replaced them
    RECIPE.offload(model, s, HOST)
    model.train()
    return PreparedModel(model, wrapped, trainable, reinitialised)


def check_model_files(s: dict) -> None:
    """The base model, VAE and CLIP files: there, readable, the shapes they should have. File
    headers only - seconds - so a wrong path fails before an hour of encoding."""
    inspect_base_model(s["BASE_MODEL_DIR"], keyboard_dim=len(s["KEYBOARD_KEYS"]))
    read_vae_file(s["VAE_PATH"])
    read_clip_file(s["CLIP_PATH"])


class Progress(NamedTuple):
    """Where a run stands: what the loop continues from."""

    epoch: int
    position: int                # clips of this epoch's order already trained on
    global_step: int             # optimizer steps done
    history: list                # one entry per finished epoch
    epoch_loss: list             # this epoch's loss sum and sample count so far

    @classmethod
    def start(cls) -> "Progress":
        return cls(0, 0, 0, [], [0.0, 0])


def saved_state_fields(split, trainable: dict, ema) -> dict:
    """What this run's saved state must hold to be continued (runs/saved_state.py)."""
    return {
        "trainable_names": list_of(str, "the names of the trained tensors"),
        "train_clips": list_of(str, "the training clips' ids"),
        "train_actions": optional(of_type(str, "a digest of the training clips' actions")),
        "val_actions": optional(of_type(str, "a digest of the validation clips' actions")),
        "trainable": tensors_like(trainable, "the trained tensors"),
        "optimizer": optimizer_state_for(trainable, "the optimizer's state"),
        "ema": tensors_like(ema.shadow, "the EMA weights") if ema is not None else absent_or_none("no EMA"),
        "schedule": optional(schedule_state(LRSchedule)),
        "epoch": whole_number(0, MAX_EPOCHS),
        "position": whole_number(0, len(split.train)),
        "epoch_loss": sequence("this epoch's [loss sum, samples]", number_in(0, math.inf),
                               whole_number(0, MAX_SAVED_STEPS)),
    }


def check_saved_state_fits(run: RunFolder, split, trainable: dict, ema) -> None:
    """The saved state's structure, types, ranges, shapes and finiteness, before any of it is loaded."""
    check_saved_state(run.resumed, run.state_path, saved_state_fields(split, trainable, ema), (step_within_schedule,))


def restore(run: RunFolder, split, model, trainable: dict, optimizer, ema, schedule: LRSchedule,
            log) -> tuple[Progress, LRSchedule]:
    """Load the saved run into this one, after checking that it is the same run (same
    tensors, clips and actions), and re-plan the schedule if NUM_EPOCHS changed."""
    check_saved_state_fits(run, split, trainable, ema)
    saved = run.resumed
    if saved["trainable_names"] != list(trainable) or saved["train_clips"] != [c.clip_id for c in split.train]:
        raise TrainingError(f"cannot resume {run.state_path}: its trainable tensors or training clips differ from "
                            "this run's (did the data change?)")
    for name, clips in (("train_actions", split.train), ("val_actions", split.val)):
        if name in saved and saved[name] != actions_digest(clips):
            kind = "training" if name == "train_actions" else "validation"
            raise TrainingError(f"cannot resume {run.state_path}: the {kind} clips' keyboard or mouse rows differ "
                                "from the saved run's (did input.csv, KEY_MAP or INVERT_MOUSE_Y change?)")
    load_full_tensors(trainable, saved["trainable"])
    RECIPE.load_optimizer_state(model, optimizer, saved["optimizer"])
    if ema is not None:
        load_full_tensors(ema.shadow, saved["ema"])
    progress = Progress(saved["epoch"], saved["position"], saved["global_step"], saved["history"],
                        saved["epoch_loss"])
    old = LRSchedule(**saved["schedule"]) if "schedule" in saved else schedule
    new = old.extended_to(schedule.total, progress.global_step)
    change = new.describe_change(old, progress.global_step)
    if change:
        log(f"NUM_EPOCHS changed: {change}")
    return progress, new


def run_header(s: dict, ranks: Ranks, device, precision, model, trainable: dict, reinitialised: list, split,
               steps_per_epoch: int, total_steps: int, effective_batch: int, dropped_per_epoch: int,
               val_sigmas, height: int, width: int) -> list[str]:
    """What this run is: printed at the start and kept at the top of training_info.txt."""
    total_params = sum(p.numel() for p in model.parameters())
    trainable_count = sum(p.numel() for p in trainable.values())
    return [
        f"Matrix-Game 2.0 base-model fine-tuning - {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"code commit: {git_commit()}",
        f"device: {device_name(device)}" + (f" x {ranks.world} ranks" if ranks.world > 1 else "")
        + f"; precision: {precision.note}; torch {torch.__version__}; python {platform.python_version()}",
        f"model: {s['BASE_MODEL_DIR']}; dim {model.config.dim}, {model.config.num_layers} blocks, "
        f"{model.config.num_heads} heads, keyboard width {model.config.action_config.keyboard_dim_in} "
        f"({', '.join(s['KEYBOARD_KEYS'])})",
        f"parameters: total {format_count(total_params)}, trainable {format_count(trainable_count)}, "
        f"frozen {format_count(total_params - trainable_count)} (strategy {s['TRAINING_STRATEGY']}"
        + (f", last {s['LAST_LAYERS']} blocks" if s["TRAINING_STRATEGY"] == "last_layers" else "")
        + (f"; {lora_config(s).rank}-rank LoRA on {', '.join(lora_config(s).layers())}"
           + (" and the head" if s["LORA_HEAD"] else "") if s["TRAINING_STRATEGY"] == "lora" else "")
        + (f"; {'FSDP' if sharded(s['TRAINING_STRATEGY'], s['SHARD_MODEL'], ranks.world) else 'DDP'} over "
           f"{ranks.world} ranks" if ranks.world > 1 else "") + ")",
        f"memory savers: {describe_savers(s, device)}",
        (f"re-initialised {len(reinitialised)} keyboard tensors because the checkpoint's keyboard width differs "
         f"from KEYBOARD_KEYS ({len(s['KEYBOARD_KEYS'])}): " + ", ".join(reinitialised)) if reinitialised
        else "keyboard embeddings: loaded from the checkpoint (its width matches KEYBOARD_KEYS)",
        f"data: {len(split.train)} training clips, {len(split.val)} validation clips"
        + (f", {len(split.dropped)} dropped (they overlapped validation frames)" if split.dropped else "")
        + (f" - {split.note}" if split.note else "") + f"; {s['SEQUENCE_LENGTH']} frames at {width}x{height}",
        f"optimisation: {steps_per_epoch} optimizer steps per epoch, {total_steps} in all; effective batch "
        f"{effective_batch} (BATCH_SIZE {s['BATCH_SIZE']} x GRAD_ACCUM_STEPS {s['GRAD_ACCUM_STEPS']} x "
        f"{ranks.world} rank(s))"
        + (f"; {dropped_per_epoch} clip(s) per epoch left out so that every rank gets one" if dropped_per_epoch
           else "") + f"; validation sigmas {', '.join(f'{x:.3f}' for x in val_sigmas.tolist())}",
    ] + [line for line in [warmup_warning(s["WARMUP_STEPS"], total_steps, s["LEARNING_RATE"])] if line]


def due_after_epoch(epoch: int, every: int, num_epochs: int) -> bool:
    """Whether a periodic job (validation, previews) runs after epoch `epoch` (from 1): every
    `every` epochs and after the last; never when `every` is 0."""
    return bool(every) and (epoch % every == 0 or epoch == num_epochs)


def info_text(header: list, status: str, controls: str, history: list, metrics: list, ema, device, ranks: Ranks,
              checkpoints: list, outputs: str, settings_text: str, report, cache_report) -> str:
    """training_info.txt: the header, the status and the controls line, one line per epoch,
    speed, files, settings, data."""
    lines = header + [f"status: {status}", controls, "", "Per epoch:"]
    lines += [f"  epoch {h['epoch']}: train loss {h['train_loss']:.5f}"
              + ("" if h.get("val_loss") is None else  # not validated (VAL_EVERY_EPOCHS, or no clips)
                 f", val loss {h['val_loss']:.5f}, action gain "
                 + (f"{h['action_gain']:.4f}" if h.get("action_gain") is not None else "n/a (needs 2+ validation clips)")
                 + (" (EMA weights)" if ema is not None else ""))
              + f", {h['seconds']:.0f} s" + (f"; preview {h['preview']}" if h.get("preview") else "")
              for h in history]
    lines += ["", *speed_lines(metrics, device, ranks.world), "checkpoints: " + (", ".join(checkpoints) or "none yet"),
              outputs, *settings_and_data_lines(settings_text, report, cache_report)]
    return "\n".join(lines)


def next_due(done: int, every: int, num_epochs: int) -> int | None:
    """The first epoch after `done` after which a periodic job runs (None: none is left)."""
    return next((e for e in range(done + 1, num_epochs + 1) if due_after_epoch(e, every, num_epochs)), None)


def checkpoint_metadata(s: dict, epoch: int, step: int, ema, contents: str, base_fingerprint: str) -> dict:
    """What a weights file says about itself, with the fingerprint of the base model it was
    trained over (checked when the file is applied over a base model: wan/fingerprint.py)."""
    lora = lora_config(s)
    return {"strategy": s["TRAINING_STRATEGY"], "epoch": epoch, "step": step, BASE_MODEL_KEY: s["BASE_MODEL_DIR"],
            "keyboard_keys": ",".join(s["KEYBOARD_KEYS"]), "weights": "ema" if ema else "trained",
            "contents": contents, FINGERPRINT_KEY: base_fingerprint, **(lora.metadata() if lora is not None else {})}


def describe_savers(s: dict, device: torch.device) -> str:
    savers = Savers.of(s)
    used = ([f"OPTIMIZER {savers.optimizer}"] if savers.optimizer != "adamw" else []) + [
        name for name, on in (("OPTIMIZER_IN_BACKWARD (two backward passes: global clipping)", savers.in_backward),
                              ("OFFLOAD_OPTIMIZER", savers.offload_optimizer),
                              ("OFFLOAD_FROZEN", savers.offload_frozen)) if on]
    where = "the GPU" if device.type == "cuda" else f"the {device.type.upper()}"
    return ", ".join(used) or f"none (float32 AdamW on {where})"


def run_identity(s: dict, effective_batch: int) -> dict:
    """The settings that make a run this run (RESUME_MUST_MATCH), with the derived ones."""
    lora = lora_config(s)
    savers = Savers.of(s)
    update = None if (savers.optimizer, savers.in_backward) == ("adamw", False) else \
        f"{savers.optimizer}{', in backward' if savers.in_backward else ''}"
    return {**{n: s[n] for n in SETTING_NAMES}, "EFFECTIVE_BATCH": effective_batch, "UPDATE_RULE": update,
            "FRAME_NAME": data.data_settings(s).frames_identity,
            "LORA": None if lora is None else {**lora.metadata(), "dropout": lora.dropout, "head": s["LORA_HEAD"]}}


def final_weights(s: dict, model, weights: dict, main: bool) -> tuple[dict, str]:
    """The final file's tensors and contents: the full state dict, loadable with
    WanModel.load_state_dict(strict=True) - or for "lora" the small file of the adapters and
    the fully trained tensors, like the epoch files (--merge makes the full one). Every rank
    must call (FSDP gathers)."""
    if s["TRAINING_STRATEGY"] == "lora":
        return weights, LORA_CONTENTS
    final = full_tensors(dict(model.state_dict()), main)
    final.update(weights)
    return final, FULL_CONTENTS


def merge(s: dict, base_given: bool = False) -> str:
    """--merge: CHECKPOINT_DIR's final LoRA file merged into the base model the run trained
    over - the one its final file (or, for older runs, its training state) records - unless
    BASE_MODEL_DIR is given on the command line (base_given)."""
    folder = Path(s["CHECKPOINT_DIR"])
    recorded = recorded_base_model(folder / FINAL_FILE)
    if recorded is None and (folder / STATE_FILE).is_file():
        recorded = load_state(folder / STATE_FILE)["settings"].get("BASE_MODEL_DIR")
    base, note = s["BASE_MODEL_DIR"], ""
    if recorded and not same_setting("BASE_MODEL_DIR", recorded, base):
        if base_given:
            note = f" (the run recorded {recorded}; --BASE_MODEL_DIR chose another)"
        else:
            base, note = recorded, " (the base model the run recorded; --BASE_MODEL_DIR=... chooses another)"
    written = merge_lora_file(base, folder / FINAL_FILE, folder / MERGED_FILE, s["IGNORE_BASE_FINGERPRINT"])
    return (f"wrote {written}: {folder / FINAL_FILE} merged into {base}'s model{note}, a full state dict "
            "(float32) that loads like the official checkpoint")


# -----------------------------------------------------------------------------
# Training

def train(s: dict, ranks: Ranks | None = None, device: torch.device | None = None) -> dict:
    """The whole run. Returns the final summary (also in training_info.txt)."""
    started = time.time()
    if ranks is None:
        ranks, device = init_ranks(s["DEVICE"])
    log = print if ranks.main else (lambda *a, **k: None)
    problems = Savers.of(s).problems(s, ranks.world, sharded(s["TRAINING_STRATEGY"], s["SHARD_MODEL"], ranks.world))
    if problems:
        raise TrainingError("these memory savers do not fit this run:\n  " + "\n  ".join(problems))

    # --- the run folder (locked while this run lives): a new run, or the state of the run it continues
    with RunFolder(s["CHECKPOINT_DIR"], s["RESUME"], ranks.main, log, tensorboard=s["TENSORBOARD"],
                   curves=FINE_TUNING_CURVES, title=f"fine-tuning {s['CHECKPOINT_DIR']}") as run:
        effective_batch = s["BATCH_SIZE"] * s["GRAD_ACCUM_STEPS"] * ranks.world
        run.check_same_run(run_identity(s, effective_batch), RESUME_MUST_MATCH)
        check_model_files(s)
        base_fingerprint = model_fingerprint(s["BASE_MODEL_DIR"])  # recorded in every weights file
        torch.manual_seed(s["SEED"])
        precision = choose_precision(s["MIXED_PRECISION"], device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        # --- data, model, optimizer, schedule
        prepared = prepare_data(s, data.data_settings(s), ranks, device, log)
        split, train_set, val_set = prepared.split, prepared.train_set, prepared.val_set
        loaded = prepare_model(s, ranks, device, precision)
        model, wrapped, trainable = loaded.model, loaded.wrapped, loaded.trainable
        optimizer = RECIPE.make_optimizer(trainable, s, device, host=HOST)
        full_epoch, dropped_per_epoch = plan_epoch(0, len(train_set), s["BATCH_SIZE"], s["GRAD_ACCUM_STEPS"],
                                                   ranks.world)
        steps_per_epoch = len(full_epoch)
        if steps_per_epoch == 0:
            raise TrainingError(f"{len(train_set)} training clip(s) cannot give each of {ranks.world} ranks one "
                                "clip: no optimizer step would run. Use fewer GPUs or more data.")
        total_steps = steps_per_epoch * s["NUM_EPOCHS"]
        schedule = LRSchedule(s["WARMUP_STEPS"], total_steps, s["MIN_LR_RATIO"])
        ema = RECIPE.make_ema(trainable, s, host=HOST)
        sampling = dict(mode=s["TIMESTEP_SAMPLING"], shift=s["TIMESTEP_SHIFT"], min_sigma=s["MIN_SIGMA"],
                        max_sigma=s["MAX_SIGMA"])
        val_sigmas = flow.validation_sigmas(s["VAL_SIGMAS"], **sampling)

        # --- resume: the saved tensors, optimizer, schedule and place in the data
        progress = Progress.start()
        if run.resumed is not None:
            progress, schedule = restore(run, split, model, trainable, optimizer, ema, schedule, log)
            log(f"resumed {run.state_path}: epoch {progress.epoch + 1}, optimizer step {progress.global_step}, on "
                f"{ranks.world} rank(s)")
        epoch, position, global_step, history, epoch_loss = progress
        metrics = run.saved_metrics(global_step)
        checkpoints = run.existing("base_finetuned_*.safetensors")

        # --- what this run is, printed now and kept in training_info.txt
        header = run_header(s, ranks, device, precision, model, trainable, loaded.reinitialised, split,
                            steps_per_epoch, schedule.total, effective_batch, dropped_per_epoch, val_sigmas,
                            prepared.height, prepared.width)
        log("\n".join(header))
        settings_text = "\n".join(f"  {n} = {s[n]!r}" for n in SETTING_NAMES)

        def write_info(status: str) -> None:
            controls = describe_controls(history, len(val_set), next_due(len(history), s["VAL_EVERY_EPOCHS"],
                                                                         s["NUM_EPOCHS"]))
            run.write_text(INFO_FILE, info_text(header, status, controls, history, metrics, ema, device, ranks,
                                                checkpoints, run.logbook.describe(),
                                                settings_text, prepared.report, prepared.cache_report))

        def save_state() -> None:
            """Gathered on every rank, written by the main rank: whole tensors, so that the run can
            resume on any number of ranks. Only tensors and plain data: it loads with weights_only."""
            state = {
                "settings": run_identity(s, effective_batch),
                "trainable_names": list(trainable), "train_clips": [c.clip_id for c in split.train],
                "train_actions": actions_digest(split.train), "val_actions": actions_digest(split.val),
                "trainable": full_tensors(trainable, ranks.main),
                "ema": full_tensors(ema.shadow, ranks.main) if ema is not None else None,
                "optimizer": RECIPE.optimizer_state(model, optimizer),
                "schedule": schedule.state_dict(),
                "epoch": epoch, "position": position, "global_step": global_step,
                "history": history, "epoch_loss": epoch_loss,
            }
            run.save_state(state, metrics)
            ranks.barrier()

        def weights_to_save() -> dict:
            return full_tensors(ema.shadow if ema is not None else trainable, ranks.main)

        write_info("training")
        # One DataLoader for the run: its workers live as long as it, draw each sample's noise
        # (NoisedClips) and hand the batches over in pinned memory; the figures of the steps are
        # read every LOG_EVERY_STEPS steps, before every save and at the epoch's end (StepLog).
        batches = EpochBatches()
        loader = DataLoader(NoisedClips(train_set, s["SEED"], sampling), batch_sampler=batches,
                            num_workers=s["NUM_WORKERS"], persistent_workers=s["NUM_WORKERS"] > 0,
                            pin_memory=device.type == "cuda")
        step_log = StepLog(ranks)
        bar = None

        def take_figures() -> None:
            """The pending steps' figures (a sync on a GPU): metrics rows, the epoch's loss; the
            first non-finite loss or gradient norm stops the run, before anything of it is saved."""
            for row in step_log.flush(run.on_disk()):
                epoch_loss[0] += row.pop("loss_sum")
                epoch_loss[1] += row.pop("samples")
                metrics.append(row)
                if bar is not None:
                    bar.update(0, loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                               s_step=f"{row['seconds_per_step']:.2f}")

        train_start = time.time()
        while epoch < s["NUM_EPOCHS"]:
            epoch_started = time.time()
            order = epoch_order(len(train_set), s["SEED"], epoch)
            steps, _ = plan_epoch(position, len(train_set), s["BATCH_SIZE"], s["GRAD_ACCUM_STEPS"], ranks.world)
            batches.set_epoch(epoch, order, [micro[ranks.rank] for step in steps for micro in step])
            micro_batches = iter(loader)
            bar = ProgressBar(total=steps_per_epoch, initial=steps_per_epoch - len(steps), unit="step",
                              desc=f"epoch {epoch + 1}/{s['NUM_EPOCHS']}", enabled=ranks.main)
            step_log.start_clock()
            for step in steps:
                # Each sample's loss is weighted 1/(samples in the step), summed over ranks by
                # the gradient all-reduce (which averages: hence x world), so the step's gradient
                # is the mean over all its samples, whatever the ranks and micro-batches.
                step_samples = sum(len(per_rank) for micro in step for per_rank in micro)
                lr = apply_learning_rate(optimizer, s["LEARNING_RATE"], schedule, global_step)
                seed_global_generators(s["SEED"], "step", global_step, ranks.rank)  # LoRA's dropout, exactly on resume
                for micro_index, micro in enumerate(step):
                    batch = next(micro_batches)
                    inputs, sigma, noise = noised_inputs(batch, device)
                    with gradient_sync(wrapped, model, enabled=micro_index == len(step) - 1):
                        losses = RECIPE.micro_batch(wrapped, optimizer, inputs, sigma, noise, precision.autocast,
                                                    ranks.world / step_samples)
                    step_log.micro_batch(losses, batch["sigma"], batch["recording"], batch["first_frame"])

                grad_norm = RECIPE.clip_gradients_on_device(optimizer, trainable, s)
                RECIPE.optimizer_step(optimizer, ema, trainable, global_step)
                global_step += 1
                position = step[-1][-1][-1] + 1
                step_log.step_done(global_step, epoch + 1, lr, grad_norm, step_samples)
                bar.update(1)
                if global_step % s["LOG_EVERY_STEPS"] == 0:
                    take_figures()
                    run.write_metrics(metrics)
                if s["SAVE_EVERY_STEPS"] and global_step % s["SAVE_EVERY_STEPS"] == 0 and step is not steps[-1]:
                    take_figures()
                    save_state()
            take_figures()
            bar.close()

            # --- end of epoch: validate, save, report
            entry = {"epoch": epoch + 1, "train_loss": epoch_loss[0] / max(1, epoch_loss[1]),
                     "seconds": time.time() - epoch_started, "step": global_step}
            if len(val_set) and due_after_epoch(epoch + 1, s["VAL_EVERY_EPOCHS"], s["NUM_EPOCHS"]):
                with ema.weights_in(trainable) if ema is not None else nullcontext():
                    entry.update(validate(model, val_set, val_sigmas, s["SEED"], device, precision.autocast,
                                          ranks.rank, ranks.world))
            history.append(entry)
            gain = entry.get("action_gain")
            log(f"epoch {epoch + 1}: train loss {entry['train_loss']:.5f}"
                + (f", val loss {entry['val_loss']:.5f}" if "val_loss" in entry
                   else "" if len(val_set) else ", no validation clips")
                + (f", action gain {gain:.4f}" if gain is not None else ""))
            epoch, position, epoch_loss = epoch + 1, 0, [0.0, 0]
            if s["SAVE_EVERY_EPOCHS"] and epoch % s["SAVE_EVERY_EPOCHS"] == 0:
                name = f"base_finetuned_epoch{epoch}.safetensors"
                run.save_weights(weights_to_save(), name, checkpoint_metadata(
                    s, epoch, global_step, ema, LORA_CONTENTS if s["TRAINING_STRATEGY"] == "lora" else TRAINED_CONTENTS,
                    base_fingerprint))
                checkpoints.append(name)
            fsdp = sharded(s["TRAINING_STRATEGY"], s["SHARD_MODEL"], ranks.world)  # FSDP: every rank takes part
            if due_after_epoch(epoch, s["PREVIEW_EVERY_EPOCHS"], s["NUM_EPOCHS"]) and (ranks.main or fsdp):
                with ema.weights_in(trainable) if ema is not None else nullcontext():
                    entry.update(epoch_preview(
                        model, val_set if len(val_set) else train_set, s["VAE_PATH"], prepared.height,
                        prepared.width, run.path / PREVIEW_DIR, epoch, s["KEYBOARD_KEYS"], s["PREVIEW_STEPS"],
                        s["TIMESTEP_SHIFT"], s["SEED"], precision.autocast, write=ranks.main))
                log(f"epoch {epoch} preview: {entry.get('preview')}")
            if "val_loss" in entry or "preview" in entry:  # TensorBoard's validation events, training_curves.png
                run.logbook.record(metrics, history, run.path / PREVIEW_DIR / f"epoch{epoch}" if "preview" in entry
                                   else None)
            save_state()
            write_info("training" if epoch < s["NUM_EPOCHS"] else "finished")

        # --- the final file: the full state dict (for "lora" the adapters and trained tensors)
        final, contents = final_weights(s, model, weights_to_save(), ranks.main)
        run.save_weights(final, FINAL_FILE, checkpoint_metadata(s, epoch, global_step, ema, contents, base_fingerprint))
        run.write_metrics(metrics)
        run.logbook.record(metrics, history)
        if FINAL_FILE not in checkpoints:
            checkpoints.append(FINAL_FILE)
        summary = {"history": history, "steps": global_step, "train_seconds": time.time() - train_start,
                   "seconds": time.time() - started, "checkpoint_dir": str(run.path), "validation_clips": len(val_set)}
        write_info(f"finished in {summary['seconds']:.0f} s")
        ranks.barrier()
    return summary


def plan(s: dict) -> str:
    """--plan: the GPU memory and time this run needs, predicted on the CPU (planning/). Epoch
    times use NUM_CLIPS, else the clip count of DATA_DIR's recordings (file headers only)."""
    settings = dict(s)
    if s["NUM_CLIPS"] is None and Path(s["DATA_DIR"]).is_dir():
        try:
            settings["NUM_CLIPS"] = len(check_data(s["DATA_DIR"], data.data_settings(s)).split.train) or 1
        except DataError:
            pass
    return plan_training(settings, recipe=RECIPE).format()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ranks = Ranks()
    try:
        settings, demo = parse_settings(argv)
        if "--plan" in argv:
            print(plan(settings))
            return 0
        if "--merge" in argv:
            print(merge(settings, any(a.startswith("--BASE_MODEL_DIR=") for a in argv)))
            return 0
        ranks, device = init_ranks(settings["DEVICE"])
        if demo and ranks.main:
            prepare_demo(settings)
        ranks.barrier()
        summary = train(settings, ranks, device)
    except ShowHelp as text:
        print(text)
        return 0
    except BaseException as error:
        return end_with_error(error, ranks, (ValueError, OSError, TrainingError, CheckpointError, CacheError))
    if ranks.world > 1:
        dist.destroy_process_group()
    history = summary["history"]
    first, last = history[0], history[-1]
    if ranks.main:
        print(f"done: {summary['steps']} optimizer steps in {summary['seconds']:.0f} s; train loss "
              f"{first['train_loss']:.4f} (epoch 1) -> {last['train_loss']:.4f} (epoch {last['epoch']}); "
              f"outputs in {summary['checkpoint_dir']} (read {INFO_FILE})")
        print(describe_controls(history, summary["validation_clips"]))
        if demo:
            print(DEMO_CONTROLS_NOTES[controls_learned(history)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
