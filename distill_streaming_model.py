"""Distil your fine-tuned model into a real-time streaming student you can play.

    python distill_streaming_model.py --STAGE=causal_init                  # A: the causal student
    python distill_streaming_model.py --STAGE=dmd --STUDENT_DIR=distill/causal_init/student \\
        --CHECKPOINT_DIR=distill/dmd                                       # B: few-step DMD
    python distill_streaming_model.py --STAGE=long_tune --STUDENT_DIR=distill/dmd/student \
        --CHECKPOINT_DIR=distill/long_tune                                 # C: long streams
    python play_world.py --MODEL_DIR=distill/long_tune/student             # play it
    python distill_streaming_model.py --demo      # A, B, C on the tiny demo models, CPU (demo_run/distill/)
    python distill_streaming_model.py --plan      # each stage's GPU memory on 1-8 GPUs, what fits, hours
    python distill_streaming_model.py --plan --GPUS=8 --GPU_MEMORY_GB=48     # ... the peak on each of 8 L40S first
    python distill_streaming_model.py --plan --PLAN_STAGES=dmd --OFFLOAD_OPTIMIZER=true  # stage B alone, a saver on
    python distill_streaming_model.py --help      # every setting, its value and meaning
    torchrun --nproc_per_node=8 distill_streaming_model.py --STAGE=dmd ...  # several GPUs (FSDP)

The fine-tuned model (BASE_MODEL_DIR + CHECKPOINT, what finetune_base_model.py wrote)
makes 57 frames in 50 bidirectional steps. The streaming student makes 3 latent frames
(12 video frames) at a time in DENOISING_STEPS steps, one block after another with a KV
cache, each block under the player's latest keys and mouse. It is made in stages
(DISTILL_SPEC; the public recipe ran them on 8 GPUs):

  A  causal_init  the fine-tuned weights in the block-causal architecture, trained by
                  diffusion forcing on your latent cache: one noise level per block.
  B  dmd          Self-Forcing distribution matching: the student streams videos from
                  your clips' first frames under their recorded actions, exactly as it
                  will when played; the frozen fine-tuned model (the teacher) and a trained
                  copy of it (the critic) pull those videos towards the teacher's.
  C  long_tune    streaming long tuning: stage B's method on streams as long as play -
                  each stream lives across iterations and grows from its KV cache by
                  STREAM_CHUNK_LATENTS - STREAM_OVERLAP_LATENTS latent frames per
                  iteration up to STREAM_MAX_LATENTS (39 = 153 frames), so the student
                  learns from its own long-horizon states (rolled window, drift); teacher
                  and critic judge the stream's last STREAM_CHUNK_LATENTS frames, anchored
                  on the decoded stream, the new frames only (training/long_tuning.py).
                  Its runs save where a stream ends (every few iterations), not mid-stream.

Each stage writes CHECKPOINT_DIR/student/, a streaming model folder that play_world.py
(and the next stage's STUDENT_DIR) loads like the official students. Read
training_info.txt there first: every VAL_EVERY_STEPS the student streams fixed clips and
its distance to the teacher's 50-step video, its action-following score and its frames
per second are recorded, with a preview video.

train() below reads as its phases; the method lives in training/ (diffusion_forcing.py,
rollout.py, dmd.py, long_tuning.py, streaming_validation.py), the run folder in runs/.
"""

import datetime
import math
import platform
import shlex
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

import convert_unreal_data as data
from cli.settings import ScriptSettings, SettingsError, ShowHelp, check_choices, check_ranges
from demo_world.distill_demo import (DEMO_STAGES, DISTILL_DEMO_SETTINGS, clear_demo_runs, demo_stage_settings,
                                     missing_demo_inputs)
from generation.errors import GenerationError
from generation.finetuned import load_model
from generation.streaming import COMPILE_MODES
from latents.cache import CACHE_DTYPES, CacheError
from planning.distill import STEPS_SETTING, plan_distillation
from runs.errors import TrainingError
from runs.curves import DISTILLATION_CURVES
from runs.folder import RunFolder
from runs.saved_state import (MAX_SAVED_STEPS, absent_or_none, check_saved_state, list_of, nullable, of_type,
                              optimizer_state_for, schedule_state, step_within_schedule, tensors_like, whole_number)
from runs.info import device_name, format_count, git_commit, settings_and_data_lines, speed_lines
from runs.logbook import tensorboard_installed
from runs.progress import ProgressBar
from training import diffusion_forcing as df
from training.data import prepare_data
from training.dmd import (DistillationModels, RolloutSettings, critic_loss, critic_micro_batch, generator_loss,
                          generator_micro_batch, is_generator_step)
from training.ema import EMA
from training.epochs import actions_digest, stream_item
from training.flow_matching import model_inputs
from training.precision import MIXED_PRECISIONS, choose_precision
from training.ranks import (Ranks, end_with_error, full_tensors, gradient_sync, init_ranks, load_full_tensors,
                            wrap_for_ranks)
from training.recipe import TrainingRecipe
from training.roles import (allow_saved_optimizer_state, describe_savers, learning_rate, offload_frozen, prepare_role,
                            role_optimizer, savers_problems, student_ema, student_lora)
from training.long_tuning import StreamPlan, advance, new_stream
from training.rollout import FewStepSchedule, SampleNoise, conditions_from_batch, exit_step_for
from training.schedule import LRSchedule, apply_learning_rate, warmup_warning
from training.streaming_validation import prepare_validation, validate_student
from wan.causal import CausalWanModel, causal_from
from wan.clip import read_clip_file
from wan.config import FRAMES_PER_BLOCK, WanConfig
from wan.device import pick_device, run_dtype
from wan.files import check_output_folder
from wan.loading import (STREAMING_HINT, CheckpointError, find_config_file, inspect_base_model, load_streaming_model,
                         save_streaming_model)
from wan.lora import LoRAConfig, add_lora, merge_lora
from wan.shapes import latent_frame_count, video_frame_count
from wan.vae import load_vae, read_vae_file

# -----------------------------------------------------------------------------
# Settings: edit them here, or override any of them with --NAME=value.
# what to distil
STAGE = "causal_init"                    # "causal_init" (A), "dmd" (B) or "long_tune" (C); see the top of this file
BASE_MODEL_DIR = "models/base_model"     # the base model folder the fine-tuning started from
CHECKPOINT = "checkpoints/base_finetuned_final.safetensors"  # your fine-tuned file over it ("": the base alone): the teacher
IGNORE_BASE_FINGERPRINT = False          # True: apply CHECKPOINT over BASE_MODEL_DIR even if it is not the base it was trained on (e.g. a copy in another dtype)
KEYBOARD_KEYS = data.KEYBOARD_KEYS       # the keyboard columns the fine-tuning used
STUDENT_DIR = ""                         # the student's start, a streaming model folder (the previous stage's student/) or a bidirectional one (run with this window); "": the fine-tuned model itself
VAE_PATH = data.VAE_PATH                 # the Wan2.1 VAE (validation decodes; the cache encodes)
CLIP_PATH = data.CLIP_PATH               # the CLIP image encoder (the cache)
CHECKPOINT_DIR = "distill/causal_init"   # where this run writes everything (one run per folder)
# data: the latent cache of your recordings (stage A trains on the latents; B and C read only first frames and actions)
DATA_DIR = data.DATA_DIR                 # one recording or a folder of recordings
CACHE_DIR = data.CACHE_DIR               # shared with the fine-tuning: clips of the same settings are not encoded again
CACHE_DTYPE = data.CACHE_DTYPE           # "bf16" or "fp32"
VIDEO_HEIGHT = data.VIDEO_HEIGHT         # frame height, as in fine-tuning
VIDEO_WIDTH = data.VIDEO_WIDTH           # frame width, as in fine-tuning
SEQUENCE_LENGTH = data.SEQUENCE_LENGTH   # frames per clip of stages A and B = the window the teacher judges; its latent frames must be whole blocks of 3 (57 = 15 latent frames); stage C's clips: STREAM_MAX_LATENTS
CLIP_STRIDE = data.CLIP_STRIDE           # None: SEQUENCE_LENGTH // 2
MOUSE_SCALE = data.MOUSE_SCALE           # as in fine-tuning
SKIP_BAD_FRAMES = data.SKIP_BAD_FRAMES   # as in fine-tuning
VAL_FRACTION = data.VAL_FRACTION         # share of clips held out (validation streams the most active of them)
# the student
LOCAL_ATTN_SIZE = 6                      # latent frames a block attends to, its own 3 included (the official students: 6)
SINK_SIZE = 0                            # of those, the stream's first frames always kept (official: 0; FastVideo's Zelda: 1)
DENOISING_STEPS = (1000, 666, 333)       # the student's steps before warping (official: 1000,666,333; FastVideo: 1000,750,500,250)
TIMESTEP_SHIFT = 5.0                     # the schedule's shift (5: the model's own, and what play_world.py uses)
# optimisation (every stage)
BATCH_SIZE = 1                           # clips per micro-batch (per GPU)
GRAD_ACCUM_STEPS = 1                     # micro-batches per optimizer step (effective batch = BATCH_SIZE x this x GPUs)
ADAM_BETAS = (0.9, 0.95)                 # AdamW betas of student and critic
WEIGHT_DECAY = 0.0                       # AdamW weight decay of student and critic
WARMUP_STEPS = 0                         # steps of linear learning-rate warm-up
MIN_LR_RATIO = 1.0                       # 1: constant learning rate after the warm-up (the recipe); below 1: cosine down to it
MAX_GRAD_NORM = 1.0                      # each model's gradients are clipped to this norm
EMA_DECAY = 0.99                         # 0: off; the student's weights are averaged from EMA_START_STEP on (validated and exported)
EMA_START_STEP = 200                     # the average starts from the weights at this step, updated at every student update after
# stage A: diffusion forcing
DF_STEPS = 3000                          # optimizer steps (the public recipe allows up to 60k)
DF_LEARNING_RATE = 2e-5                  # AdamW learning rate
DF_SHIFT = 5.0                           # shift of the blocks' noise levels (5: as inference and stage B; FastVideo's trainer used 3)
DF_WEIGHTING = "index"                   # loss weight bell over the levels: "index" (FastVideo), "timestep" (Self-Forcing) or "none"
DF_MIN_SIGMA = 0.0                       # the blocks' noise levels are kept in [DF_MIN_SIGMA, DF_MAX_SIGMA] ...
DF_MAX_SIGMA = 1.0                       # ... (1: pure noise, which every streamed block starts from)
# stage B: distribution matching
DMD_STEPS = 1000                         # stage B iterations (one critic update each)
GENERATOR_EVERY = 5                      # the student is updated every N-th iteration, the critic every iteration
GENERATOR_LR = 3e-6                      # the student's AdamW learning rate
CRITIC_LR = 3e-7                         # the critic's AdamW learning rate
SCORE_MIN_TIMESTEP = 20.0                # teacher and critic judge the student's videos at timesteps in [MIN, MAX] ...
SCORE_MAX_TIMESTEP = 980.0               # ... (the reference and FastVideo's stage C: 20, 980; FastVideo's stage B: 0, 1000)
# stage C: streaming long tuning (stage B's student, optimizers, scores and GENERATOR_EVERY, on long streams)
LONG_TUNE_STEPS = 3000                   # stage C iterations (one critic update each); whole sequences (see STREAM_MAX_LATENTS)
STREAM_CHUNK_LATENTS = 9                 # latent frames teacher and critic judge per iteration, the stream's last ones (the recipe: 9)
STREAM_OVERLAP_LATENTS = 3               # of those, the ones the previous iteration judged: no loss (so 9 - 3 = 6 new ones per iteration)
STREAM_MAX_LATENTS = 39                  # a stream's length before a new clip starts (39 = 153 video frames: clips of that length)
# validation: fixed clips streamed through the real streaming loop
VAL_EVERY_STEPS = 100                    # and before the first step and after the last
VAL_CLIPS = 4                            # the most active validation clips
VAL_SAMPLES = 4                          # noises per clip, student and teacher: the distribution distance compares them all (1: off)
TEACHER_STEPS = 50                       # Euler steps of the teacher's reference videos
VAL_PREVIEW = True                       # write previews/step<N>.mp4: student, teacher, ground truth with the action overlay
VAL_COMPILE = "off"                      # the streams' student calls: "off", "default" (torch.compile) or "reduce-overhead" (+ CUDA graphs), as play_world.py's COMPILE
# speed and memory
GRADIENT_CHECKPOINTING = True            # recompute in the backward instead of keeping activations: the whole-sequence forwards (stage A, the critic) block by block; the student's rollouts (B, C) replayed block by block
MIXED_PRECISION = "bf16"                 # "bf16" (CUDA: bf16 autocast, float32 masters; the teacher in bf16) or "fp32"
NUM_WORKERS = 2                          # DataLoader workers of the cache build
DEVICE = "auto"                          # "auto", "cuda", "cuda:1", "cpu"
# memory savers for the trained student and critic (fine-tuning's, by the same names; --plan prices each; one GPU)
OPTIMIZER = "adamw"                      # "adamw", or "adamw_8bit": torchao's, both moments in 8 bits (1/4 the state)
OFFLOAD_OPTIMIZER = False                # student's and critic's optimizer state and the student's EMA in CPU memory, stepped there
OFFLOAD_FROZEN = False                   # frozen block weights in CPU memory, brought in block by block: the teacher's, and a LoRA role's base
LORA_ROLES = ()                          # "student" and/or "critic": train low-rank adapters and the action modules instead of every weight
LORA_RANK = 64                           # the adapters' rank r (as fine-tuning's LORA_*; no dropout here)
LORA_ALPHA = 64.0                        # an adapter's update is scaled by LORA_ALPHA / LORA_RANK
LORA_TARGETS = ("self_attn", "cross_attn", "ffn")  # groups, or layers like self_attn.q, ffn.0 (wan/lora.py)
GPU_MEMORY_GB = 80                       # --plan: the card to fit (its memory in GB)
GPUS = 1                                 # --plan: the GPUs (FSDP) each stage's first figure is for, 1-64 (a run's are torchrun's)
PLAN_STAGES = ("causal_init", "dmd", "long_tune")  # --plan: the stages it plans (e.g. dmd: stage B alone, without waiting for A and C)
# saving
SAVE_EVERY_STEPS = 100                   # training_state.pt every N steps (0: only at the end)
EXPORT_EVERY_STEPS = 0                   # 0: the student only at the end; else also student_step<N>/ every N steps
LOG_EVERY_STEPS = 10                     # metrics.csv (and TensorBoard's events) are written this often
TENSORBOARD = tensorboard_installed()    # TensorBoard event files in CHECKPOINT_DIR/tensorboard/ (on where the package is installed)
RESUME = False                           # continue the run in CHECKPOINT_DIR/training_state.pt
SEED = 42                                # data order and every noise draw
# -----------------------------------------------------------------------------

SETTINGS = ScriptSettings.of(globals())
SETTING_NAMES = SETTINGS.names
STAGES = ("causal_init", "dmd", "long_tune")
FLAGS = {"--demo": "stages A, B and C on the tiny models of `python finetune_base_model.py --demo`, on CPU "
                   "(writes demo_run/distill/; play the result with `python play_world.py --demo`)",
         "--plan": "predict each stage's GPU memory per GPU on GPUS (and 1, 2, 4, 8) GPUs, what fits GPU_MEMORY_GB, "
                   "the time floor per iteration and the recipe's GPU-hours on common cards (no GPU needed; minutes "
                   "for the real model)"}
INFO_FILE = "training_info.txt"
STUDENT_FOLDER = "student"
PREVIEW_DIR = "previews"
METRICS_COLUMNS = ("step", "loss", "critic_loss", "lr", "grad_norm", "critic_grad_norm", "sigma", "exit_step",
                   "seconds_per_step")
RECIPE = TrainingRecipe()                # gradient clipping and the optimizers' saved state, as in fine-tuning
HOST = torch.device("cpu")               # where OFFLOAD_OPTIMIZER and OFFLOAD_FROZEN keep their tensors
# A run continues only with the settings that shaped its state and its data order.
RESUME_MUST_MATCH = ("STAGE", "BASE_MODEL_DIR", "CHECKPOINT", "STUDENT_DIR", "KEYBOARD_KEYS", "DATA_DIR",
                     "CACHE_DTYPE", "VIDEO_HEIGHT", "VIDEO_WIDTH", "SEQUENCE_LENGTH", "CLIP_STRIDE", "MOUSE_SCALE",
                     "VAL_FRACTION", "LOCAL_ATTN_SIZE", "SINK_SIZE", "DENOISING_STEPS", "TIMESTEP_SHIFT",
                     "EFFECTIVE_BATCH", "ADAM_BETAS", "WEIGHT_DECAY", "WARMUP_STEPS", "MIN_LR_RATIO", "MAX_GRAD_NORM",
                     "EMA_DECAY", "EMA_START_STEP", "DF_LEARNING_RATE", "DF_SHIFT", "DF_WEIGHTING", "DF_MIN_SIGMA",
                     "DF_MAX_SIGMA", "GENERATOR_EVERY", "GENERATOR_LR", "CRITIC_LR", "SCORE_MIN_TIMESTEP",
                     "SCORE_MAX_TIMESTEP", "VAL_CLIPS", "VAL_SAMPLES",
                     "TEACHER_STEPS", "MIXED_PRECISION", "SEED", "FRAME_NAME", "OPTIMIZER", "LORA_ROLES", "LORA_RANK",
                     "LORA_ALPHA", "LORA_TARGETS")
STREAM_MUST_MATCH = ("STREAM_CHUNK_LATENTS", "STREAM_OVERLAP_LATENTS", "STREAM_MAX_LATENTS")  # stage C's too
NEXT_STAGE = {"causal_init": "dmd", "dmd": "long_tune"}


# -----------------------------------------------------------------------------
# Settings

def parse_settings(argv) -> tuple[dict, bool]:
    """Defaults, then --demo's settings, then --NAME=value overrides. Returns (settings, demo)."""
    return SETTINGS.parse_checked(argv, FLAGS, {"--demo": DISTILL_DEMO_SETTINGS}, check_settings)


def check_settings(s: dict) -> None:
    """Every range (cli/settings.py's rules), every choice, and the folders, before any work."""
    problems = check_ranges(s)
    problems += check_choices(s, {"STAGE": STAGES, "MIXED_PRECISION": MIXED_PRECISIONS,
                                  "CACHE_DTYPE": tuple(CACHE_DTYPES), "DF_WEIGHTING": df.WEIGHTINGS,
                                  "VAL_COMPILE": COMPILE_MODES})
    if not problems:
        latent_frames = latent_frame_count(s["SEQUENCE_LENGTH"])
        if latent_frames % FRAMES_PER_BLOCK:
            fitting = [n for n in range(s["SEQUENCE_LENGTH"] - 24, s["SEQUENCE_LENGTH"] + 25, 4)
                       if n > 1 and latent_frame_count(n) % FRAMES_PER_BLOCK == 0]
            problems.append(f"SEQUENCE_LENGTH={s['SEQUENCE_LENGTH']} gives {latent_frames} latent frames; the student "
                            f"makes blocks of {FRAMES_PER_BLOCK}, so it must give a multiple of {FRAMES_PER_BLOCK} "
                            f"(e.g. {', '.join(map(str, fitting))})")
        if not 0 <= s["SINK_SIZE"] <= s["LOCAL_ATTN_SIZE"] - FRAMES_PER_BLOCK:
            problems.append(f"LOCAL_ATTN_SIZE={s['LOCAL_ATTN_SIZE']}, SINK_SIZE={s['SINK_SIZE']}: the window must hold "
                            f"a block of {FRAMES_PER_BLOCK} besides the sink frames (SINK_SIZE <= LOCAL_ATTN_SIZE - "
                            f"{FRAMES_PER_BLOCK})")
        steps = s["DENOISING_STEPS"]
        if not steps or steps[0] != 1000 or any(a <= b for a, b in zip(steps, steps[1:])) or steps[-1] < 1:
            problems.append(f"DENOISING_STEPS={','.join(map(str, steps))}: whole numbers from 1000 down, each below "
                            "the one before, above 0")
        if not 0 <= s["SCORE_MIN_TIMESTEP"] < s["SCORE_MAX_TIMESTEP"] <= 1000:
            problems.append(f"SCORE_MIN_TIMESTEP={s['SCORE_MIN_TIMESTEP']}, SCORE_MAX_TIMESTEP={s['SCORE_MAX_TIMESTEP']}:"
                            " need 0 <= MIN < MAX <= 1000")
        try:
            df.index_bounds(s["DF_MIN_SIGMA"], s["DF_MAX_SIGMA"], s["DF_SHIFT"])
        except ValueError as error:
            problems.append(f"DF_MIN_SIGMA/DF_MAX_SIGMA: {error}")
        if not s["PLAN_STAGES"] or any(stage not in STAGES for stage in s["PLAN_STAGES"]):
            problems.append(f"PLAN_STAGES={','.join(s['PLAN_STAGES'])}: one or more of {', '.join(STAGES)}")
        if s["STAGE"] == "long_tune":
            problems += long_tune_problems(s)
        problems += savers_problems(s)
    if s["STAGE"] != "causal_init" and not s["STUDENT_DIR"]:
        problems.append(f"STAGE={s['STAGE']} starts from a streaming student: set STUDENT_DIR to the previous stage's "
                        f"{STUDENT_FOLDER}/ folder (or an official student's folder)")
    for name in ("CHECKPOINT_DIR", "CACHE_DIR"):
        try:
            check_output_folder(s[name], name)
        except FileExistsError as error:
            problems.append(str(error))
    try:
        pick_device(s["DEVICE"])
    except ValueError as error:
        problems.append(str(error))
    if problems:
        raise SettingsError("bad settings:\n  " + "\n  ".join(problems))


def long_tune_problems(s: dict) -> list[str]:
    plan = StreamPlan.of(s)
    problems = plan.problems(FRAMES_PER_BLOCK)
    n = plan.iterations_per_sequence
    if not problems and s["LONG_TUNE_STEPS"] % n:
        problems.append(f"LONG_TUNE_STEPS={s['LONG_TUNE_STEPS']}: whole sequences of {n} iterations (a stream's KV "
                        f"cache is not saved, so a run saves and ends where a sequence ends), e.g. "
                        f"{s['LONG_TUNE_STEPS'] // n * n or n} or {(s['LONG_TUNE_STEPS'] // n + 1) * n}")
    return problems


def clip_settings(s: dict) -> dict:
    """The settings the clips are cut with: stage C streams clips of STREAM_MAX_LATENTS
    latent frames (first frame and actions), the other stages SEQUENCE_LENGTH frames."""
    if s["STAGE"] == "long_tune":
        return dict(s, SEQUENCE_LENGTH=video_frame_count(s["STREAM_MAX_LATENTS"]))
    return s


def check_model_files(s: dict) -> None:
    """Every input file there and readable, from its header, before any long work."""
    inspect_base_model(s["BASE_MODEL_DIR"], keyboard_dim=len(s["KEYBOARD_KEYS"]))
    if s["CHECKPOINT"] and not Path(s["CHECKPOINT"]).is_file():
        raise CheckpointError(f"CHECKPOINT={s['CHECKPOINT']}: no such file (finetune_base_model.py writes "
                              "CHECKPOINT_DIR/base_finetuned_final.safetensors)")
    if s["STUDENT_DIR"] and not Path(s["STUDENT_DIR"]).is_dir():
        raise CheckpointError(f"STUDENT_DIR={s['STUDENT_DIR']}: no such folder (each stage writes its student into "
                              f"CHECKPOINT_DIR/{STUDENT_FOLDER}/)")
    read_vae_file(s["VAE_PATH"])
    read_clip_file(s["CLIP_PATH"])


# -----------------------------------------------------------------------------
# The models

@dataclass
class Roles:
    student: CausalWanModel
    teacher: torch.nn.Module
    critic: torch.nn.Module | None       # stages B and C
    student_trainable: dict
    critic_trainable: dict
    keys: tuple                          # the keyboard columns
    notes: list                          # what was loaded, for the log and the info file


def prepare_roles(s: dict, ranks: Ranks, device: torch.device, precision) -> Roles:
    """The frozen teacher (the fine-tuned model), the student (its weights in the causal
    architecture, or STUDENT_DIR) and, for B and C, the critic (a trainable copy of the
    teacher); every trained tensor a float32 master; wrapped for the ranks (FSDP)."""
    teacher = load_model(s["BASE_MODEL_DIR"], s["CHECKPOINT"], s["KEYBOARD_KEYS"], device, precision.model_dtype,
                         s["IGNORE_BASE_FINGERPRINT"])
    notes = [f"teacher: {teacher.description}"]
    # a LoRA student's frozen base stays in the run's dtype (bf16 on a GPU); trained tensors become float32
    student_dtype = precision.model_dtype if "student" in s["LORA_ROLES"] else torch.float32
    if s["STUDENT_DIR"]:
        config = WanConfig.from_json(find_config_file(Path(s["STUDENT_DIR"]), STREAMING_HINT))
        bidirectional = not config.windowed
        if bidirectional:
            # A bidirectional model (a base or merged fine-tuned folder) starts a student as stage A's
            # does: its weights in the block-causal architecture with the settings' window
            # (DISTILL_SPEC 1 and 7.2: its config's -1 / 0 window must not override them).
            config = config.with_window(s["LOCAL_ATTN_SIZE"], s["SINK_SIZE"])
        student = load_streaming_model(s["STUDENT_DIR"], config, device=device, dtype=student_dtype)
        config, width = student.config, teacher.model.config.action_config.keyboard_dim_in
        if not bidirectional and (config.local_attn_size, config.sink_size) != (s["LOCAL_ATTN_SIZE"], s["SINK_SIZE"]):
            raise TrainingError(f"STUDENT_DIR={s['STUDENT_DIR']} has a window of {config.local_attn_size} latent frames "
                                f"with {config.sink_size} sink frames; set LOCAL_ATTN_SIZE={config.local_attn_size} "
                                f"SINK_SIZE={config.sink_size} (or start from another student)")
        if config.action_config.keyboard_dim_in != width:
            raise TrainingError(f"STUDENT_DIR={s['STUDENT_DIR']} has a keyboard of "
                                f"{config.action_config.keyboard_dim_in} columns, the teacher {width}: distil a "
                                "student of the teacher's keys")
        notes.append(f"student: {s['STUDENT_DIR']} (action modules in {len(config.action_config.blocks)} blocks)"
                     + (f"; a bidirectional model, run block-causally with LOCAL_ATTN_SIZE={s['LOCAL_ATTN_SIZE']} "
                        f"SINK_SIZE={s['SINK_SIZE']}" if bidirectional else "")
                     + (" (LoRA)" if "student" in s["LORA_ROLES"] else ""))
        if bidirectional and s["STAGE"] != "causal_init" and ranks.main:
            print(f"warning: STUDENT_DIR={s['STUDENT_DIR']} holds a bidirectional model, never trained to make blocks "
                  f"causally; stage {s['STAGE']} usually starts from stage A's student (STAGE=causal_init first)",
                  file=sys.stderr)
    else:
        start = load_model(s["BASE_MODEL_DIR"], s["CHECKPOINT"], s["KEYBOARD_KEYS"], device, student_dtype,
                           s["IGNORE_BASE_FINGERPRINT"]).model
        student = causal_from(start, s["LOCAL_ATTN_SIZE"], s["SINK_SIZE"])
        notes.append("student: the teacher's weights in the block-causal architecture"
                     + (" (LoRA)" if "student" in s["LORA_ROLES"] else ""))
    student_trainable = prepare_role(student, s, "student")
    student.train()
    critic, critic_trainable = None, {}
    if s["STAGE"] != "causal_init":
        critic = load_model(s["BASE_MODEL_DIR"], s["CHECKPOINT"], s["KEYBOARD_KEYS"], device,
                            precision.model_dtype, s["IGNORE_BASE_FINGERPRINT"]).model
        critic_trainable = prepare_role(critic, s, "critic")
        critic.set_gradient_checkpointing(s["GRADIENT_CHECKPOINTING"])
        critic.train()
        notes.append("critic: a trainable copy of the teacher" + (" (LoRA)" if "critic" in s["LORA_ROLES"] else ""))
    student.set_gradient_checkpointing(s["GRADIENT_CHECKPOINTING"])
    for model in (student, teacher.model, critic):
        if model is not None:
            wrap_for_ranks(model, "full", ranks, device, precision.use_bf16)
    for model in (teacher.model, student, critic):
        if model is not None:
            offload_frozen(model, s, HOST)
    # FSDP replaced the parameters: take them again by name
    student_trainable = {n: p for n, p in student.named_parameters() if n in student_trainable}
    if critic is not None:
        critic_trainable = {n: p for n, p in critic.named_parameters() if n in critic_trainable}
    return Roles(student, teacher.model, critic, student_trainable, critic_trainable, teacher.keyboard_keys, notes)


def export_student(roles: Roles, tensors: dict, folder: Path, metadata: dict, main: bool,
                   lora: LoRAConfig | None = None) -> None:
    """Write the student as a streaming model folder (official layout, float32), from whole
    tensors; a LoRA student's adapters merged into its weights (a plain model plays)."""
    if not main:
        return
    with torch.device("meta"):
        model = CausalWanModel(roles.student.config, roles.student.frames_per_block)
    if lora is not None:
        add_lora(model, lora)
    model.load_state_dict({n: t.float() for n, t in tensors.items()}, strict=True, assign=True)
    if lora is not None:
        merge_lora(model)
    save_streaming_model(model, folder, metadata={k: str(v) for k, v in metadata.items()})


# -----------------------------------------------------------------------------
# Resuming

def saved_state_fields(roles: Roles) -> dict:
    """What this stage's saved state must hold to be continued (runs/saved_state.py)."""
    critic = roles.critic is not None
    return {
        "train_clips": list_of(str, "the training clips' ids"),
        "train_actions": of_type(str, "a digest of the training clips' actions"),
        "student": tensors_like(roles.student_trainable, "the student's trained tensors"),
        "student_optimizer": optimizer_state_for(roles.student_trainable, "the student's optimizer state"),
        "critic": tensors_like(roles.critic_trainable, "the critic's tensors") if critic
        else absent_or_none("stage A has no critic"),
        "critic_optimizer": optimizer_state_for(roles.critic_trainable, "the critic's optimizer state") if critic
        else absent_or_none("stage A has no critic"),
        "ema": nullable(tensors_like(roles.student_trainable, "the student's EMA weights")),
        "ema_updates": whole_number(0, MAX_SAVED_STEPS),
        "schedule": schedule_state(LRSchedule),
    }


def ema_within_steps(state: dict) -> str | None:
    if state["ema_updates"] > state["global_step"]:
        return f"ema_updates: {state['ema_updates']:,}, more than the {state['global_step']:,} steps done (global_step)"
    return None


def restore(run: RunFolder, s: dict, split, roles: Roles, student_optimizer, critic_optimizer,
            total_steps: int) -> tuple[int, list, EMA | None, int, LRSchedule]:
    """Load the saved run into this one, after checking the state (its fields, shapes and
    finiteness) and that it is the same run (clips and actions); the schedule re-planned
    to total_steps. Returns (step, history, ema, ema updates, schedule)."""
    saved = run.resumed
    check_saved_state(saved, run.state_path, saved_state_fields(roles), (step_within_schedule, ema_within_steps))
    if saved["train_clips"] != [c.clip_id for c in split.train] or saved["train_actions"] != actions_digest(split.train):
        raise TrainingError(f"cannot resume {run.state_path}: the training clips or their actions differ from "
                            "the saved run's (did the data, KEY_MAP or INVERT_MOUSE_Y change?)")
    load_full_tensors(roles.student_trainable, saved["student"])
    RECIPE.load_optimizer_state(roles.student, student_optimizer, saved["student_optimizer"])
    if roles.critic is not None:
        load_full_tensors(roles.critic_trainable, saved["critic"])
        RECIPE.load_optimizer_state(roles.critic, critic_optimizer, saved["critic_optimizer"])
    ema = None
    if saved["ema"] is not None:
        ema = student_ema(roles.student_trainable, s, HOST)
        load_full_tensors(ema.shadow, saved["ema"])
    step = saved["global_step"]
    schedule = LRSchedule(**saved["schedule"]).extended_to(total_steps, step)
    return step, saved["history"], ema, saved["ema_updates"], schedule


# -----------------------------------------------------------------------------
# One optimizer step of each stage

def micro_batches(step: int, accum: int, batch: int, ranks: Ranks) -> list[list[int]]:
    """The sample positions this rank trains on in each micro-batch of an optimizer step:
    an optimizer step takes the next BATCH_SIZE x GRAD_ACCUM_STEPS x ranks positions of the
    endless seeded stream of clips, micro-batch by micro-batch, rank by rank (so a run
    gives the same steps on any number of ranks with the same effective batch)."""
    per_micro = batch * ranks.world
    first = step * accum * per_micro
    return [[first + m * per_micro + ranks.rank * batch + b for b in range(batch)] for m in range(accum)]


def load_batch(dataset, positions: list[int], seed: int) -> dict:
    """The clips at these stream positions, stacked (tensors only)."""
    items = [dataset[stream_item(p, len(dataset), seed)[1]] for p in positions]
    return {name: torch.stack([item[name] for item in items]) for name in ("latents", "cond_concat",
                                                                           "visual_context", "keyboard", "mouse")}


@dataclass
class StepResult:
    loss: float | None                 # the student's loss (None: no student update this step)
    critic_loss: float | None
    sigma: float                       # the mean noise level of the step's losses
    exit_step: int | None


def diffusion_forcing_step(s: dict, roles: Roles, dataset, step: int, ranks: Ranks, device, autocast,
                           weights: torch.Tensor, bounds: tuple[int, int]) -> StepResult:
    """Stage A: every micro-batch's block-causal forward and backward."""
    P, accum = roles.student.frames_per_block, s["GRAD_ACCUM_STEPS"]
    scale = ranks.world / (s["BATCH_SIZE"] * accum * ranks.world)
    loss_sum, sigma_sum = 0.0, 0.0
    for micro, positions in enumerate(micro_batches(step, accum, s["BATCH_SIZE"], ranks)):
        inputs = model_inputs(load_batch(dataset, positions, s["SEED"]), device)
        drawn = [df.sample_draws(s["SEED"], p, inputs["latents"].shape[1:], P, *bounds) for p in positions]
        levels = torch.stack([d[0] for d in drawn])
        noise = torch.stack([d[1] for d in drawn])
        with gradient_sync(roles.student, roles.student, enabled=micro == accum - 1):
            losses = df.micro_batch(roles.student, inputs, levels, noise, s["DF_SHIFT"], weights, autocast, scale)
        loss_sum += losses.sum().item()
        sigma_sum += df.mean_sigma(levels, s["DF_SHIFT"]) * len(positions)
    total, sigma_total = ranks.sum([loss_sum, sigma_sum])
    samples = s["BATCH_SIZE"] * accum * ranks.world
    return StepResult(total / samples, None, sigma_total / samples, None)


def matching_result(s: dict, ranks: Ranks, sums: list, generator_step: bool, exit_step: int | None) -> StepResult:
    """Stages B and C: this rank's sums of (student loss, critic loss, critic sigma) over its
    samples, as means over every rank's."""
    total = ranks.sum(sums)
    samples = s["BATCH_SIZE"] * s["GRAD_ACCUM_STEPS"] * ranks.world
    return StepResult(total[0] / samples if generator_step else None, total[1] / samples, total[2] / samples,
                      exit_step)


def distribution_matching_step(s: dict, roles: Roles, dataset, step: int, ranks: Ranks, device, autocast,
                               rollout_settings: RolloutSettings) -> StepResult:
    """Stage B: in every micro-batch, on a generator step, a rollout with gradients and the
    DMD loss into the student; always, a fresh rollout and the critic's loss into the critic."""
    accum, steps = s["GRAD_ACCUM_STEPS"], len(rollout_settings.schedule)
    generator_step = is_generator_step(step, s["GENERATOR_EVERY"])
    models = DistillationModels(roles.student, roles.teacher, roles.critic)
    action = roles.student.config.action_config
    scale = ranks.world / (s["BATCH_SIZE"] * accum * ranks.world)
    sums = [0.0, 0.0, 0.0]  # student loss, critic loss, critic sigma
    exit_step = None
    for micro, positions in enumerate(micro_batches(step, accum, s["BATCH_SIZE"], ranks)):
        conditions = conditions_from_batch(load_batch(dataset, positions, s["SEED"]), device,
                                           action.enable_keyboard, action.enable_mouse)
        last = micro == accum - 1
        if generator_step:
            exit_step = exit_step_for(s["SEED"], "generator", step, micro, steps)
            with gradient_sync(roles.student, roles.student, enabled=last):
                made = generator_micro_batch(models, conditions, SampleNoise(s["SEED"], "generator", positions, device),
                                             exit_step, rollout_settings, autocast, scale)
            sums[0] += made["losses"].sum().item()
        with gradient_sync(roles.critic, roles.critic, enabled=last):
            judged = critic_micro_batch(models, conditions, SampleNoise(s["SEED"], "critic", positions, device),
                                        exit_step_for(s["SEED"], "critic", step, micro, steps), rollout_settings,
                                        autocast, scale)
        sums[1] += judged["losses"].sum().item()
        sums[2] += judged["sigma"].sum().item()
    return matching_result(s, ranks, sums, generator_step, exit_step)


def long_tuning_step(s: dict, roles: Roles, dataset, step: int, ranks: Ranks, device, autocast,
                     rollout_settings: RolloutSettings, streams: list, vae) -> StepResult:
    """Stage C: every micro-batch's stream advances by its next new latent frames (with
    gradients on a generator step, then the masked DMD loss of its window into the
    student); the critic always learns the same (detached) window. A sequence's first
    iteration starts the streams of its clips."""
    accum, steps = s["GRAD_ACCUM_STEPS"], len(rollout_settings.schedule)
    generator_step = is_generator_step(step, s["GENERATOR_EVERY"])
    models = DistillationModels(roles.student, roles.teacher, roles.critic)
    action = roles.student.config.action_config
    plan = StreamPlan.of(s)
    sequence, iteration = plan.position(step)
    scale = ranks.world / (s["BATCH_SIZE"] * accum * ranks.world)
    sums = [0.0, 0.0, 0.0]  # student loss, critic loss, critic sigma
    exit_step = exit_step_for(s["SEED"], "long_tune", step, 0, steps)  # one per step: every stream and rank
    for micro, positions in enumerate(micro_batches(sequence, accum, s["BATCH_SIZE"], ranks)):
        if iteration == 0:
            streams[micro] = None  # the finished stream's cache goes before the next one's is made
            conditions = conditions_from_batch(load_batch(dataset, positions, s["SEED"]), device,
                                               action.enable_keyboard, action.enable_mouse)
            streams[micro] = new_stream(roles.student, conditions, vae, rollout_settings.cache_dtype)
        stream, last = streams[micro], micro == accum - 1
        noise = SampleNoise(s["SEED"], f"long_tune:{step}", positions, device)
        with gradient_sync(roles.student, roles.student, enabled=last):
            window = advance(roles.student, stream, plan, iteration, noise, rollout_settings.schedule, exit_step,
                             autocast, with_grad=generator_step)
            judging = window.conditions(stream)
            if generator_step:
                made = generator_loss(models, window.latents, judging, noise, rollout_settings, autocast, scale,
                                      window.mask)
                sums[0] += made["losses"].sum().item()
        with gradient_sync(roles.critic, roles.critic, enabled=last):
            judged = critic_loss(models, window.latents, judging, noise, rollout_settings, autocast, scale,
                                 window.mask)
        sums[1] += judged["losses"].sum().item()
        sums[2] += judged["sigma"].sum().item()
    return matching_result(s, ranks, sums, generator_step, exit_step)


# -----------------------------------------------------------------------------
# What the run says about itself

def run_header(s: dict, ranks: Ranks, device, precision, roles: Roles, prepared, total_steps: int,
               effective_batch: int) -> list[str]:
    student_params = sum(p.numel() for p in roles.student.parameters())
    clip_frames = clip_settings(s)["SEQUENCE_LENGTH"]
    config = roles.student.config
    lines = [
        f"Matrix-Game 2.0 streaming distillation, stage {s['STAGE']} - "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}",
        f"code commit: {git_commit()}",
        f"device: {device_name(device)}" + (f" x {ranks.world} ranks (FSDP)" if ranks.world > 1 else "")
        + f"; precision: {precision.note}; torch {torch.__version__}; python {platform.python_version()}",
        *roles.notes,
        f"student: {format_count(student_params)} parameters, blocks of {roles.student.frames_per_block} latent frames, "
        f"window {config.local_attn_size} (sink {config.sink_size}), {len(s['DENOISING_STEPS'])} steps "
        f"{', '.join(map(str, s['DENOISING_STEPS']))} (warped), keyboard {', '.join(roles.keys)}",
        f"data: {len(prepared.split.train)} training clips, {len(prepared.split.val)} validation clips of "
        f"{clip_frames} frames ({latent_frame_count(clip_frames)} latent frames) at "
        f"{prepared.width}x{prepared.height}",
        f"optimisation: {total_steps} steps, effective batch {effective_batch} (BATCH_SIZE {s['BATCH_SIZE']} x "
        f"GRAD_ACCUM_STEPS {s['GRAD_ACCUM_STEPS']} x {ranks.world} rank(s))",
        f"memory savers: {describe_savers(s)}",
    ]
    if s["STAGE"] == "causal_init":
        lines.append(f"objective: diffusion forcing, one noise level per block (shift {s['DF_SHIFT']}, weighting "
                     f"{s['DF_WEIGHTING']}), learning rate {s['DF_LEARNING_RATE']:g}")
    else:
        if s["STAGE"] == "long_tune":
            plan = StreamPlan.of(s)
            lines.append(f"streams: {plan.max_latents} latent frames per clip, {plan.chunk} in the first iteration "
                         f"then {plan.new_per_iteration} per iteration ({plan.iterations_per_sequence} iterations per "
                         f"sequence); teacher and critic judge the last {plan.chunk} ({plan.overlap} overlap frames "
                         "without loss, the first re-encoded as an anchor)")
        lines.append(f"objective: Self-Forcing DMD; student every {s['GENERATOR_EVERY']} steps at {s['GENERATOR_LR']:g}, "
                     f"critic every step at {s['CRITIC_LR']:g}; scores at timesteps "
                     f"[{s['SCORE_MIN_TIMESTEP']:g}, {s['SCORE_MAX_TIMESTEP']:g}]")
    warning = warmup_warning(s["WARMUP_STEPS"], total_steps,
                             s["DF_LEARNING_RATE"] if s["STAGE"] == "causal_init" else s["GENERATOR_LR"])
    return lines + ([warning] if warning else [])


def play_command(student: Path) -> str:
    return f"python play_world.py --MODEL_DIR={shlex.quote(str(student))}"


def what_next(stage: str, checkpoint_dir: str, student: str) -> list[str]:
    """The commands that play a stage's student and start the next stage from it, with its paths."""
    lines = [f"play it: {play_command(Path(student))}"]
    if stage in NEXT_STAGE:
        following = NEXT_STAGE[stage]
        lines.append(f"next stage (with your other settings as in this run): python distill_streaming_model.py "
                     f"--STAGE={following} --STUDENT_DIR={shlex.quote(student)} "
                     f"--CHECKPOINT_DIR={shlex.quote(str(Path(checkpoint_dir).parent / following))}")
    return lines


def shown(entry: dict, name: str, fmt: str = ".4f") -> str:
    """A validation entry's value as printed: fmt, or n/a where it was not measured."""
    value = entry.get(name)
    return "n/a" if value is None else format(value, fmt)


def format_validation(entry: dict) -> str:
    return (f"  step {entry['step']}: teacher distance {shown(entry, 'teacher_distance')}, distribution distance "
            f"{shown(entry, 'distribution_distance')} (spread: student {shown(entry, 'student_spread')}, teacher "
            f"{shown(entry, 'teacher_spread')}), action score {shown(entry, 'action_score', '.2f')} (teacher "
            f"{shown(entry, 'teacher_action_score', '.2f')}), {shown(entry, 'fps', '.1f')} frames/s "
            f"({entry['weights']} weights)" + (f"; preview {entry['preview']}" if entry.get("preview") else ""))


def info_text(header: list, status: str, history: list, metrics: list, device, ranks: Ranks, exports: list,
              folder: Path, outputs: str, settings_text: str, report, cache_report) -> str:
    lines = header + [f"status: {status}", "",
                      "Validation (the student streams the validation clips through the real streaming loop; teacher "
                      "distance: RMS latent difference to the teacher's many-step video of the same window, lower is "
                      "closer; distribution distance: energy distance between the student's and the teacher's videos "
                      "from VAL_SAMPLES noises each, 0 when they are alike in distribution - what distillation "
                      "lowers, while the teacher distance also rewards a student that makes the average video; "
                      "spread: mean RMS difference of two videos from different noises; action score: "
                      "video/action_score.py, 1 = every frame pair moves as commanded):"]
    lines += [format_validation(h) for h in history] or ["  none yet"]
    lines += ["", *speed_lines(metrics, device, ranks.world),
              "students: " + (", ".join(exports) or "none yet")
              + (f" (play the latest: {play_command(folder / exports[-1])})" if exports else ""),
              outputs, *settings_and_data_lines(settings_text, report, cache_report)]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# The run

def train(s: dict, ranks: Ranks | None = None, device: torch.device | None = None) -> dict:
    """One stage's whole run. Returns its summary (also in training_info.txt)."""
    started = time.time()
    if ranks is None:
        ranks, device = init_ranks(s["DEVICE"])
    log = print if ranks.main else (lambda *a, **k: None)

    # --- the run folder (locked while this run lives): a new run, or the state of the run it continues
    allow_saved_optimizer_state(s)
    with RunFolder(s["CHECKPOINT_DIR"], s["RESUME"], ranks.main, log, METRICS_COLUMNS, tensorboard=s["TENSORBOARD"],
                   curves=DISTILLATION_CURVES, title=f"distillation, stage {s['STAGE']}: {s['CHECKPOINT_DIR']}") as run:
        effective_batch = s["BATCH_SIZE"] * s["GRAD_ACCUM_STEPS"] * ranks.world
        stage = s["STAGE"]
        # FRAME_NAME: which files are frames (None for frame_<number>.png, as in runs from before it)
        identity = dict(s, EFFECTIVE_BATCH=effective_batch, FRAME_NAME=data.data_settings(s).frames_identity)
        run.check_same_run(identity, RESUME_MUST_MATCH + (STREAM_MUST_MATCH if stage == "long_tune" else ()))
        problems = savers_problems(s, ranks.world)
        if problems:
            raise SettingsError("bad settings:\n  " + "\n  ".join(problems))
        check_model_files(s)
        torch.manual_seed(s["SEED"])
        precision = choose_precision(s["MIXED_PRECISION"], device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

        # --- data and models
        prepared = prepare_data(s, data.data_settings(clip_settings(s)), ranks, device, log)
        train_set, val_set = prepared.train_set, prepared.val_set
        roles = prepare_roles(s, ranks, device, precision)
        total_steps = s[STEPS_SETTING[stage]]
        schedule = LRSchedule(s["WARMUP_STEPS"], total_steps, s["MIN_LR_RATIO"])
        student_lr = learning_rate(s, "student")
        student_optimizer = role_optimizer(roles.student_trainable, s, "student", device, HOST)
        critic_optimizer = role_optimizer(roles.critic_trainable, s, "critic", device, HOST) \
            if roles.critic is not None else None
        cache_dtype = torch.bfloat16 if precision.use_bf16 else None
        rollout_settings = RolloutSettings(FewStepSchedule.of(s["DENOISING_STEPS"], s["TIMESTEP_SHIFT"]),
                                           s["TIMESTEP_SHIFT"], s["SCORE_MIN_TIMESTEP"], s["SCORE_MAX_TIMESTEP"],
                                           cache_dtype)
        df_weights = df.bell_weights(s["DF_SHIFT"], s["DF_WEIGHTING"])
        df_bounds = df.index_bounds(s["DF_MIN_SIGMA"], s["DF_MAX_SIGMA"], s["DF_SHIFT"])
        # stage C: the VAE makes the windows' anchors; one persistent stream per micro-batch
        vae = load_vae(s["VAE_PATH"], device, run_dtype(device)) if stage == "long_tune" else None
        streams = [None] * s["GRAD_ACCUM_STEPS"]
        save_due = False

        # --- resume: the saved tensors, optimizers, EMA and place in the stream
        step, history, ema, ema_updates = 0, [], None, 0
        if run.resumed is not None:
            step, history, ema, ema_updates, schedule = restore(run, s, prepared.split, roles, student_optimizer,
                                                                critic_optimizer, total_steps)
            log(f"resumed {run.state_path}: step {step}, on {ranks.world} rank(s)")
        metrics = run.saved_metrics(step)
        exports = run.existing(f"{STUDENT_FOLDER}*")

        # --- what this run is, printed now and kept in training_info.txt
        header = run_header(s, ranks, device, precision, roles, prepared, total_steps, effective_batch)
        log("\n".join(header))
        settings_text = "\n".join(f"  {n} = {s[n]!r}" for n in SETTING_NAMES)

        def write_info(status: str) -> None:
            run.write_text(INFO_FILE, info_text(header, status, history, metrics, device, ranks, exports, run.path,
                                                run.logbook.describe(),
                                                settings_text, prepared.report, prepared.cache_report))

        def start_ema() -> None:
            nonlocal ema
            if s["EMA_DECAY"] > 0 and ema is None and step >= s["EMA_START_STEP"]:
                ema = student_ema(roles.student_trainable, s, HOST)

        def save_state() -> None:
            """Whole tensors gathered on every rank, written by the main rank (resumable on any
            number of ranks); tensors and plain data only, for torch.load(weights_only=True)."""
            state = {
                "settings": {**{n: s[n] for n in SETTING_NAMES}, "EFFECTIVE_BATCH": effective_batch,
                             "FRAME_NAME": identity["FRAME_NAME"]},
                "train_clips": [c.clip_id for c in prepared.split.train],
                "train_actions": actions_digest(prepared.split.train),
                "student": full_tensors(roles.student_trainable, ranks.main),
                "student_optimizer": RECIPE.optimizer_state(roles.student, student_optimizer),
                "critic": full_tensors(roles.critic_trainable, ranks.main) if roles.critic is not None else None,
                "critic_optimizer": RECIPE.optimizer_state(roles.critic, critic_optimizer)
                if roles.critic is not None else None,
                "ema": full_tensors(ema.shadow, ranks.main) if ema is not None else None,
                "ema_updates": ema_updates, "schedule": schedule.state_dict(), "global_step": step,
                "history": history,
            }
            run.save_state(state, metrics)
            ranks.barrier()

        def export(name: str) -> None:
            weights = ema.shadow if ema is not None else roles.student_trainable
            tensors = full_tensors(dict(roles.student.state_dict()), ranks.main)
            tensors.update(full_tensors(weights, ranks.main))
            export_student(roles, tensors, run.path / name, {
                "stage": stage, "step": step, "weights": "ema" if ema is not None else "trained",
                "keyboard_keys": ",".join(roles.keys), "denoising_steps": ",".join(map(str, s["DENOISING_STEPS"])),
                "teacher": f"{s['BASE_MODEL_DIR']} + {s['CHECKPOINT'] or 'no checkpoint'}"}, ranks.main,
                student_lora(s))
            if name not in exports:
                exports.append(name)

        # --- validation: fixed clips, the teacher's reference videos made once
        val_source = val_set if len(val_set) else train_set
        val_clips = prepare_validation(roles.teacher, val_source, s["VAL_CLIPS"], s["TEACHER_STEPS"],
                                       s["TIMESTEP_SHIFT"], s["SEED"], device, precision.autocast, s["VAL_SAMPLES"])

        def validate() -> None:
            with ema.weights_in(roles.student_trainable) if ema is not None else nullcontext():
                entry = validate_student(
                    roles.student, val_clips, s["DENOISING_STEPS"], s["TIMESTEP_SHIFT"], s["SEED"], s["VAE_PATH"],
                    roles.keys, precision.autocast, cache_dtype,
                    preview_path=run.path / PREVIEW_DIR / f"step{step}.mp4" if s["VAL_PREVIEW"] and ranks.main
                    else None, preview_info={"stage": stage, "step": step}, height=prepared.height,
                    width=prepared.width, compile_mode=s["VAL_COMPILE"])
            history.append({"step": step, "weights": "ema" if ema is not None else "trained", **entry})
            bar.write(format_validation(history[-1]))
            run.logbook.record(metrics, history,
                               run.path / PREVIEW_DIR / f"step{step}" if entry.get("preview") else None)

        start_ema()
        write_info("training")
        bar = ProgressBar(total=total_steps, initial=step, desc=f"stage {stage}", enabled=ranks.main)
        if not history:
            validate()
        train_start = time.time()
        while step < total_steps:
            step_started = time.time()
            if stage == "causal_init":
                result = diffusion_forcing_step(s, roles, train_set, step, ranks, device, precision.autocast,
                                                df_weights, df_bounds)
            elif stage == "dmd":
                result = distribution_matching_step(s, roles, train_set, step, ranks, device, precision.autocast,
                                                    rollout_settings)
            else:
                result = long_tuning_step(s, roles, train_set, step, ranks, device, precision.autocast,
                                          rollout_settings, streams, vae)
            values = [v for v in (result.loss, result.critic_loss) if v is not None]
            if not all(math.isfinite(v) for v in values):
                raise TrainingError(f"the loss became {values} at step {step + 1}; training stopped before applying "
                                    f"it. {run.on_disk()}. Try lower learning rates or MIXED_PRECISION=fp32.")
            lr = apply_learning_rate(student_optimizer, student_lr, schedule, step)
            grad_norm = critic_norm = None
            if result.loss is not None:
                grad_norm = RECIPE.clip_gradients(student_optimizer, roles.student_trainable, s)
            if roles.critic is not None:
                apply_learning_rate(critic_optimizer, s["CRITIC_LR"], schedule, step)
                critic_norm = RECIPE.clip_gradients(critic_optimizer, roles.critic_trainable, s)
            norms = [n for n in (grad_norm, critic_norm) if n is not None]
            if not all(math.isfinite(n) for n in norms):
                raise TrainingError(f"a gradient norm became {norms} at step {step + 1}; training stopped before "
                                    f"applying it. {run.on_disk()}. Try lower learning rates or MIXED_PRECISION=fp32.")
            if result.loss is not None:
                student_optimizer.step()
                if ema is not None:
                    ema.update(roles.student_trainable, ema_updates)
                    ema_updates += 1
            student_optimizer.zero_grad(set_to_none=True)
            if critic_optimizer is not None:
                critic_optimizer.step()
                critic_optimizer.zero_grad(set_to_none=True)
            step += 1
            start_ema()
            metrics.append({"step": step, "loss": result.loss, "critic_loss": result.critic_loss, "lr": lr,
                            "grad_norm": grad_norm, "critic_grad_norm": critic_norm, "sigma": result.sigma,
                            "exit_step": result.exit_step, "seconds_per_step": time.time() - step_started})
            bar.update(1, **{name: f"{value:.4f}" for name, value in (("loss", result.loss), ("critic", result.critic_loss))
                             if value is not None})
            if step % s["LOG_EVERY_STEPS"] == 0:
                run.write_metrics(metrics)
            if step % s["VAL_EVERY_STEPS"] == 0 or step == total_steps:
                validate()
            if s["EXPORT_EVERY_STEPS"] and step % s["EXPORT_EVERY_STEPS"] == 0 and step < total_steps:
                export(f"{STUDENT_FOLDER}_step{step}")
            save_due |= bool(s["SAVE_EVERY_STEPS"] and step % s["SAVE_EVERY_STEPS"] == 0) or step == total_steps
            # stage C saves where its sequences end: a stream's KV cache holds keys and values that
            # the student's weights of earlier steps computed, which a resumed run cannot remake
            # (and at 480x832 it is ~1.7 GB per GPU); LONG_TUNE_STEPS is whole sequences
            if save_due and (stage != "long_tune" or StreamPlan.of(s).position(step)[1] == 0):
                save_due = False
                save_state()
                write_info("training" if step < total_steps else "finishing")

        # --- the student, a streaming model folder play_world.py loads
        bar.close()
        export(STUDENT_FOLDER)
        run.write_metrics(metrics)
        summary = {"history": history, "steps": step, "train_seconds": time.time() - train_start,
                   "seconds": time.time() - started, "checkpoint_dir": str(run.path),
                   "student": str(run.path / STUDENT_FOLDER), "stage": stage}
        write_info(f"finished in {summary['seconds']:.0f} s")
        ranks.barrier()
    return summary


# -----------------------------------------------------------------------------
# --demo and --plan

def run_demo(s: dict, ranks: Ranks, device) -> dict:
    """Stage A, then B from its student, then C from B's, on the fine-tuning demo's outputs."""
    missing = missing_demo_inputs(s)
    if missing:
        raise SettingsError(f"--demo distils the outputs of `python finetune_base_model.py --demo`, run from this "
                            f"folder; these are missing: {', '.join(missing)}. Run the training demo first.")
    # Tiny models gain nothing from more threads, and lose much when the cores are shared.
    torch.set_num_threads(1)
    if ranks.main:
        clear_demo_runs()
    ranks.barrier()
    summaries = {}
    for stage in DEMO_STAGES:
        stage_settings = {**s, **demo_stage_settings(stage)}
        check_settings(stage_settings)
        if ranks.main:
            print(f"\n=== demo: stage {stage} into {stage_settings['CHECKPOINT_DIR']} ===")
        summaries[stage] = train(stage_settings, ranks, device)
    before, after_b = summaries["dmd"]["history"][0], summaries["dmd"]["history"][-1]
    after_c = summaries["long_tune"]["history"][-1]
    if ranks.main:  # the distribution distance is the one DMD lowers (training/streaming_validation.py says why)
        print(f"\ndemo: the stage-A student's 3-step streams are {shown(before, 'distribution_distance')} from the "
              f"teacher's 50-step videos in distribution (energy distance over {s['VAL_SAMPLES']} noises per clip); "
              f"after stage B, {shown(after_b, 'distribution_distance')}; after stage C (its own longer streams), "
              f"{shown(after_c, 'distribution_distance')}. The RMS difference of one stream to one teacher video: "
              f"{shown(before, 'teacher_distance')}, then {shown(after_b, 'teacher_distance')} after B (two of the "
              f"teacher's own videos: {shown(after_b, 'teacher_spread')}). Play it: python play_world.py --demo")
    return summaries["long_tune"]


def plan(s: dict) -> str:
    """--plan: each stage's GPU memory and cost, predicted on the CPU (planning/distill.py),
    for GPUS GPUs (whose run would refuse the one-GPU savers, so the plan does too)."""
    problems = savers_problems(s, s["GPUS"])
    if problems:
        raise SettingsError(f"bad settings for a plan on GPUS={s['GPUS']} GPUs:\n  " + "\n  ".join(problems))
    return plan_distillation(s, stages=tuple(stage for stage in STAGES if stage in s["PLAN_STAGES"])).format()


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ranks = Ranks()
    try:
        settings, demo = parse_settings(argv)
        if "--plan" in argv:
            print(plan(settings))
            return 0
        ranks, device = init_ranks(settings["DEVICE"])
        summary = run_demo(settings, ranks, device) if demo else train(settings, ranks, device)
    except ShowHelp as text:
        print(text)
        return 0
    except BaseException as error:
        return end_with_error(error, ranks, (ValueError, OSError, TrainingError, CheckpointError, CacheError,
                                             GenerationError))
    if ranks.world > 1:
        dist.destroy_process_group()
    if ranks.main:
        print(f"done: {summary['steps']} steps in {summary['seconds']:.0f} s; the student is in {summary['student']} "
              f"(read {Path(summary['checkpoint_dir']) / INFO_FILE})")
        print("\n".join(what_next(summary["stage"], summary["checkpoint_dir"], summary["student"])))
    return 0


if __name__ == "__main__":
    sys.exit(main())
