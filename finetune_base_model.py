"""Fine-tune the Matrix-Game 2.0 base model on your own Unreal recordings.

    python finetune_base_model.py                          # with the settings below
    python finetune_base_model.py --NUM_EPOCHS=3 --RESUME=true
    python finetune_base_model.py --demo                   # the whole pipeline, tiny model, CPU

It loads BASE_MODEL_DIR (re-initialising the keyboard embeddings when your key set has
another width than the checkpoint), freezes what TRAINING_STRATEGY does not train, makes
sure every clip of DATA_DIR is in the latent cache (encoding it with the VAE and CLIP if
not), and trains with the model's own flow-matching objective. Everything it writes goes
to CHECKPOINT_DIR; read training_info.txt there first.
"""

import datetime
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import convert_unreal_data as data
import generate_preview
import latent_cache
from wan import flow
from wan.files import save_safetensors_atomic, torch_save_atomic, write_text_atomic
from wan.loading import CheckpointError, load_base_model
from wan.model import STRATEGIES, WanModel, apply_training_strategy

# -----------------------------------------------------------------------------
# Settings: edit them here, or override any of them with --NAME=value.
_names_before_settings = set(globals())
# where things are
BASE_MODEL_DIR = "models/base_model"     # config JSON + diffusion_pytorch_model.safetensors
VAE_PATH = data.VAE_PATH                 # models/Wan2.1_VAE.pth
CLIP_PATH = data.CLIP_PATH               # models/models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth
DATA_DIR = data.DATA_DIR                 # one recording or a folder of recordings
CACHE_DIR = data.CACHE_DIR               # encoded clips; shared by runs, keyed by content
CACHE_DTYPE = data.CACHE_DTYPE           # "bf16" (half the disk) or "fp32"
VIDEO_HEIGHT = data.VIDEO_HEIGHT         # frames are centre-cropped to this aspect and resized:
VIDEO_WIDTH = data.VIDEO_WIDTH           # 352x640, the base model's size (sides multiples of 16)
CHECKPOINT_DIR = "checkpoints"
# data (defaults live in convert_unreal_data.py; KEY_MAP and SPLIT_SEED are edited there)
SEQUENCE_LENGTH = data.SEQUENCE_LENGTH   # frames per clip, 4k+1
CLIP_STRIDE = data.CLIP_STRIDE           # None: SEQUENCE_LENGTH // 2
KEYBOARD_KEYS = data.KEYBOARD_KEYS       # column order of the keyboard tensor
MOUSE_SCALE = data.MOUSE_SCALE
SKIP_BAD_FRAMES = data.SKIP_BAD_FRAMES
VAL_FRACTION = data.VAL_FRACTION
# optimisation
TRAINING_STRATEGY = "action_only"        # "action_only", "last_layers" or "full"
LAST_LAYERS = 3                          # blocks trained by "last_layers" (with actions + head)
BATCH_SIZE = 1
GRAD_ACCUM_STEPS = 4                     # effective batch = BATCH_SIZE x GRAD_ACCUM_STEPS
NUM_EPOCHS = 10
LEARNING_RATE = 1e-5
MIN_LR_RATIO = 0.1                       # the cosine decays to LEARNING_RATE x this
WEIGHT_DECAY = 0.01
WARMUP_STEPS = 50                        # optimizer steps of linear warm-up
MAX_GRAD_NORM = 1.0
EMA_DECAY = 0.0                          # 0: off; e.g. 0.999: validate and save EMA weights
# flow matching (the base model's own objective)
TIMESTEP_SHIFT = 5.0
TIMESTEP_SAMPLING = "uniform"            # "uniform" over the shifted grid, or "logit_normal"
MIN_SIGMA = 0.0
MAX_SIGMA = 1.0
VAL_SIGMAS = 4                           # fixed noise levels per validation clip
# speed and memory
GRADIENT_CHECKPOINTING = True
MIXED_PRECISION = "bf16"                 # "bf16" (CUDA) or "fp32"
COMPILE = False                          # torch.compile each block (CUDA; slow first steps)
NUM_WORKERS = 2                          # DataLoader workers
DEVICE = "auto"                          # "auto", "cuda", "cuda:1", "cpu"
# saving
SAVE_EVERY_EPOCHS = 2
SAVE_EVERY_STEPS = 0                     # 0: only at epoch ends; else also every N optimizer steps
LOG_EVERY_STEPS = 10                     # metrics.csv is rewritten this often
RESUME = False                           # continue the run in CHECKPOINT_DIR/training_state.pt
SEED = 42
# previews (generate_preview.py): the first validation clip generated from its first frame and actions
PREVIEW_EVERY_EPOCHS = 0                 # 0: off; else every N epochs and after the last, into previews/
PREVIEW_STEPS = 50                       # sampling steps per preview
# -----------------------------------------------------------------------------

SETTING_NAMES = [name for name in list(globals()) if name.isupper() and name not in _names_before_settings]
STATE_FILE = "training_state.pt"
METRICS_FILE = "metrics.csv"
INFO_FILE = "training_info.txt"
FINAL_FILE = "base_finetuned_final.safetensors"
PREVIEW_DIR = "previews"
METRICS_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "sigma", "seconds_per_step")
# A run can continue only with the settings that shaped its state and its data order.
RESUME_MUST_MATCH = ("BASE_MODEL_DIR", "DATA_DIR", "SEQUENCE_LENGTH", "CLIP_STRIDE", "KEYBOARD_KEYS",
                     "MOUSE_SCALE", "VAL_FRACTION", "VIDEO_HEIGHT", "VIDEO_WIDTH", "CACHE_DTYPE", "TRAINING_STRATEGY", "LAST_LAYERS", "BATCH_SIZE",
                     "GRAD_ACCUM_STEPS", "LEARNING_RATE", "MIN_LR_RATIO", "WEIGHT_DECAY", "WARMUP_STEPS",
                     "EMA_DECAY", "TIMESTEP_SHIFT", "TIMESTEP_SAMPLING", "MIN_SIGMA", "MAX_SIGMA",
                     "MIXED_PRECISION", "SEED")

# The --demo run: the real pipeline on a generated recording with tiny random weights, on CPU.
DEMO_DIR = "demo_run"
DEMO_SETTINGS = dict(
    BASE_MODEL_DIR=f"{DEMO_DIR}/models/base_model", VAE_PATH=f"{DEMO_DIR}/models/tiny_vae.pth",
    CLIP_PATH=f"{DEMO_DIR}/models/tiny_clip.pth", DATA_DIR=f"{DEMO_DIR}/data",
    CACHE_DIR=f"{DEMO_DIR}/latent_cache", CHECKPOINT_DIR=f"{DEMO_DIR}/checkpoints", CACHE_DTYPE="fp32",
    VIDEO_HEIGHT=64, VIDEO_WIDTH=112, SEQUENCE_LENGTH=17, CLIP_STRIDE=8, VAL_FRACTION=0.15, TRAINING_STRATEGY="full",
    BATCH_SIZE=2, GRAD_ACCUM_STEPS=1, NUM_EPOCHS=40, LEARNING_RATE=2e-3, WARMUP_STEPS=10,
    GRADIENT_CHECKPOINTING=False, MIXED_PRECISION="fp32", NUM_WORKERS=0, DEVICE="cpu",
    SAVE_EVERY_EPOCHS=2, LOG_EVERY_STEPS=5, PREVIEW_EVERY_EPOCHS=20,
)
DEMO_FRAMES = 300
DEMO_MODEL = dict(dim=64, num_layers=3, num_heads=4, ffn_dim=128)  # tiny_config() arguments


class TrainingError(RuntimeError):
    """Training cannot go on; the message says why and what is still valid on disk."""


# -----------------------------------------------------------------------------
# Settings

def parse_settings(argv) -> tuple[dict, bool]:
    """Defaults, then --demo's settings, then --NAME=value overrides. Returns (settings, demo)."""
    argv = list(argv)
    demo = "--demo" in argv
    argv = [a for a in argv if a != "--demo"]
    defaults = {name: globals()[name] for name in SETTING_NAMES}
    overrides, rest = data.parse_overrides(argv, defaults)
    if rest:
        raise ValueError(f"unexpected argument(s) {' '.join(rest)}; use --NAME=value with one of: "
                         f"{', '.join(SETTING_NAMES)} (or --demo)")
    settings = {**defaults, **(DEMO_SETTINGS if demo else {}), **overrides}
    check_settings(settings)
    return settings, demo


def check_settings(s: dict) -> None:
    problems = []
    if s["TRAINING_STRATEGY"] not in STRATEGIES:
        problems.append(f"TRAINING_STRATEGY={s['TRAINING_STRATEGY']!r}: choose one of {', '.join(STRATEGIES)}")
    if s["MIXED_PRECISION"] not in ("bf16", "fp32"):
        problems.append(f"MIXED_PRECISION={s['MIXED_PRECISION']!r}: choose 'bf16' or 'fp32'")
    if s["TIMESTEP_SAMPLING"] not in flow.SAMPLING_MODES:
        problems.append(f"TIMESTEP_SAMPLING={s['TIMESTEP_SAMPLING']!r}: choose one of {', '.join(flow.SAMPLING_MODES)}")
    for name in ("BATCH_SIZE", "GRAD_ACCUM_STEPS", "NUM_EPOCHS", "VAL_SIGMAS", "PREVIEW_STEPS"):
        if s[name] < 1:
            problems.append(f"{name}={s[name]}: must be at least 1")
    for name in ("WARMUP_STEPS", "SAVE_EVERY_EPOCHS", "SAVE_EVERY_STEPS", "NUM_WORKERS", "LAST_LAYERS",
                 "PREVIEW_EVERY_EPOCHS"):
        if s[name] < 0:
            problems.append(f"{name}={s[name]}: must not be negative")
    if s["LOG_EVERY_STEPS"] < 1:
        problems.append(f"LOG_EVERY_STEPS={s['LOG_EVERY_STEPS']}: must be at least 1")
    if not s["LEARNING_RATE"] > 0:
        problems.append(f"LEARNING_RATE={s['LEARNING_RATE']}: must be positive")
    if not 0 <= s["MIN_LR_RATIO"] <= 1:
        problems.append(f"MIN_LR_RATIO={s['MIN_LR_RATIO']}: must be in [0, 1]")
    if not 0 <= s["EMA_DECAY"] < 1:
        problems.append(f"EMA_DECAY={s['EMA_DECAY']}: must be in [0, 1) (0 turns EMA off)")
    if not s["MAX_GRAD_NORM"] > 0:
        problems.append(f"MAX_GRAD_NORM={s['MAX_GRAD_NORM']}: must be positive")
    if s["CACHE_DTYPE"] not in latent_cache.CACHE_DTYPES:
        problems.append(f"CACHE_DTYPE={s['CACHE_DTYPE']!r}: choose one of {', '.join(latent_cache.CACHE_DTYPES)}")
    try:
        flow.bounded_training_grid(s["TIMESTEP_SHIFT"], s["MIN_SIGMA"], s["MAX_SIGMA"])
    except ValueError as error:
        problems.append(str(error))
    if problems:
        raise ValueError("bad settings:\n  " + "\n  ".join(problems))


# -----------------------------------------------------------------------------
# Small pieces of the loop

def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"DEVICE={name!r} but no CUDA GPU is available; use DEVICE=cpu or auto")
    return device


def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up over warmup_steps, then cosine from 1 down to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def micro_batches_per_epoch(num_clips: int, batch_size: int) -> int:
    return math.ceil(num_clips / batch_size)


def optimizer_steps_per_epoch(num_clips: int, batch_size: int, accum: int) -> int:
    return math.ceil(micro_batches_per_epoch(num_clips, batch_size) / accum)


class EpochSampler(Sampler):
    """A fresh seeded permutation every epoch, started at `start` (a resumed epoch skips
    what it already trained on), so a resumed run sees exactly the same order."""

    def __init__(self, num_items: int, seed: int, epoch: int, start: int = 0):
        self.order = torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
        self.start = start

    def __iter__(self):
        return iter(self.order[self.start:].tolist())

    def __len__(self) -> int:
        return len(self.order) - self.start


def prepare_trainable(model: WanModel, strategy: str, last_layers: int) -> dict:
    """Freeze what the strategy does not train; keep float32 master copies of what it does
    (the frozen weights stay in the loaded dtype; autocast runs the matmuls in bf16)."""
    names = apply_training_strategy(model, strategy, last_layers)
    params = dict(model.named_parameters())
    for name in names:
        params[name].data = params[name].data.float()
    return {name: params[name] for name in names}


def model_inputs(batch: dict, device: torch.device) -> dict:
    return {name: batch[name].to(device, non_blocking=True)
            for name in ("latents", "cond_concat", "visual_context", "keyboard", "mouse")}


def flow_matching_step(model, inputs: dict, sigma: torch.Tensor, noise: torch.Tensor, autocast,
                       keyboard=None, mouse=None) -> torch.Tensor:
    """Per-sample flow-matching loss [B] of one forward pass (actions may be swapped in)."""
    x0 = inputs["latents"]
    noise, sigma = noise.to(x0.device), sigma.to(x0.device)
    with autocast:
        prediction = model(flow.add_noise(x0, noise, sigma), flow.sigma_to_timestep(sigma),
                           inputs["visual_context"], inputs["cond_concat"],
                           keyboard_cond=inputs["keyboard"] if keyboard is None else keyboard,
                           mouse_cond=inputs["mouse"] if mouse is None else mouse)
    error = (prediction.float() - flow.velocity_target(x0, noise).float()) ** 2
    return error.flatten(1).mean(dim=1)


@torch.no_grad()
def validate(model, loader, sigmas: torch.Tensor, seed: int, device, autocast) -> dict:
    """Validation loss with the true actions and with actions shuffled across clips.

    Every clip is scored at the same fixed sigmas with the same noise every time (seeded by
    its index), so numbers are comparable across epochs. The action gain is shuffled / true:
    above 1 means the model's predictions depend on the actions it is given.
    """
    model.eval()
    batches = [model_inputs(b, device) for b in loader]
    keyboard = torch.cat([b["keyboard"] for b in batches])
    mouse = torch.cat([b["mouse"] for b in batches])
    # Every clip gets the actions of the clip half the set away: neighbouring validation clips
    # overlap in time and share most of their actions, so a shift by one would change little.
    shuffled = torch.roll(torch.arange(len(keyboard)), max(1, len(keyboard) // 2))
    true_losses, shuffled_losses, per_sigma = [], [], torch.zeros(len(sigmas), dtype=torch.float64)
    index = 0
    for inputs in batches:
        n = inputs["latents"].shape[0]
        clip_ids = range(index, index + n)
        for j, sigma in enumerate(sigmas):
            noise = torch.stack([torch.randn(inputs["latents"].shape[1:], generator=torch.Generator().manual_seed(
                seed * 1000003 + i * 101 + j)) for i in clip_ids])
            sigma_batch = sigma.repeat(n)
            true = flow_matching_step(model, inputs, sigma_batch, noise, autocast)
            true_losses.append(true)
            per_sigma[j] += true.sum().item()
            if len(keyboard) > 1:
                swap = shuffled[index:index + n]
                shuffled_losses.append(flow_matching_step(
                    model, inputs, sigma_batch, noise, autocast,
                    keyboard=keyboard[swap], mouse=mouse[swap]))
        index += n
    model.train()
    loss = torch.cat(true_losses).mean().item()
    if not math.isfinite(loss):
        raise TrainingError(f"the validation loss became {loss}: the weights have diverged. Training stopped; "
                            "the files from the last save remain valid. Try a lower LEARNING_RATE.")
    result = {"val_loss": loss, "val_loss_per_sigma": (per_sigma / index).tolist()}
    if shuffled_losses:
        shuffled_loss = torch.cat(shuffled_losses).mean().item()
        result.update(val_loss_shuffled=shuffled_loss, action_gain=shuffled_loss / loss)
    return result


class EMA:
    """Exponential moving average of the trainable weights, in float32."""

    def __init__(self, named_params: dict, decay: float):
        self.decay = decay
        self.shadow = {n: p.detach().float().clone() for n, p in named_params.items()}

    @torch.no_grad()
    def update(self, named_params: dict) -> None:
        for name, p in named_params.items():
            self.shadow[name].lerp_(p.detach().float(), 1 - self.decay)

    @torch.no_grad()
    def swap_into(self, named_params: dict) -> None:
        """Exchange the model's weights and the averages (call twice to undo)."""
        for name, p in named_params.items():
            current = p.detach().clone()
            p.copy_(self.shadow[name])
            self.shadow[name] = current.float()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def format_metrics_csv(rows: list) -> str:
    lines = [",".join(METRICS_COLUMNS)]
    lines += [",".join(_csv_value(row[c]) for c in METRICS_COLUMNS) for row in rows]
    return "\n".join(lines) + "\n"


def _csv_value(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def read_metrics_csv(path: Path, up_to_step: int) -> list:
    """The rows of an earlier run up to its last saved step (later ones will be re-run)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines()[1:]:
        values = line.split(",")
        row = {c: (float(v) if c not in ("step", "epoch") else int(v)) for c, v in zip(METRICS_COLUMNS, values)}
        if row["step"] <= up_to_step:
            rows.append(row)
    return rows


def format_count(n: int) -> str:
    return f"{n:,} ({n / 1e6:.1f}M)"


# -----------------------------------------------------------------------------
# The demo

def prepare_demo(settings: dict, num_frames: int = DEMO_FRAMES) -> None:
    """Write the demo recording and tiny random weights in the real file formats (once;
    later demo runs reuse them and their latent cache), and clear the demo's checkpoints."""
    from wan.clip import CLIPVisionConfig, CLIPVisionTower, save_clip
    from wan.config import tiny_config
    from wan.loading import save_base_model
    from wan.vae import VAEConfig, WanVAE, save_vae

    data_dir = Path(settings["DATA_DIR"])
    if not (data_dir / data.CSV_NAME).is_file():
        print(f"demo: rendering {num_frames} frames of the synthetic recording into {data_dir}")
        data.write_demo_recording(data_dir, num_frames, settings["VIDEO_HEIGHT"], settings["VIDEO_WIDTH"])
    torch.manual_seed(0)
    if not Path(settings["VAE_PATH"]).is_file():
        save_vae(WanVAE(VAEConfig.tiny()), settings["VAE_PATH"])
    clip_config = CLIPVisionConfig.tiny()
    if not Path(settings["CLIP_PATH"]).is_file():
        save_clip(CLIPVisionTower(clip_config), settings["CLIP_PATH"])
    model_dir = Path(settings["BASE_MODEL_DIR"])
    if not model_dir.is_dir():
        config = tiny_config(keyboard_dim=len(settings["KEYBOARD_KEYS"]), clip_dim=clip_config.width, **DEMO_MODEL)
        model = WanModel(config)
        with torch.no_grad():  # like a pretrained model, no zero output layers (any strategy can learn)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        save_base_model(model, model_dir)
    if not settings["RESUME"]:
        shutil.rmtree(settings["CHECKPOINT_DIR"], ignore_errors=True)


# -----------------------------------------------------------------------------
# Training

def train(s: dict) -> dict:
    """The whole run. Returns the final summary (also in training_info.txt)."""
    started = time.time()
    out_dir = Path(s["CHECKPOINT_DIR"])
    state_path = out_dir / STATE_FILE
    if state_path.exists() and not s["RESUME"]:
        raise TrainingError(f"{out_dir} already holds a run ({STATE_FILE}); set --RESUME=true to continue it, "
                            "or choose another CHECKPOINT_DIR (nothing was overwritten)")
    resume = torch.load(state_path, map_location="cpu", weights_only=False) if s["RESUME"] and state_path.exists() else None
    if s["RESUME"] and resume is None:
        print(f"RESUME is on but {state_path} does not exist: starting a new run")
    if resume is not None:
        changed = [f"{n}: {resume['settings'].get(n)!r} -> {s[n]!r}" for n in RESUME_MUST_MATCH
                   if resume["settings"].get(n) != s[n]]
        if changed:
            raise TrainingError(f"cannot resume {state_path}: these settings differ from the saved run:\n  "
                                + "\n  ".join(changed))
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s["SEED"])

    device = pick_device(s["DEVICE"])
    use_bf16 = s["MIXED_PRECISION"] == "bf16" and device.type == "cuda"
    precision_note = "bf16 autocast, float32 master weights" if use_bf16 else "float32"
    if s["MIXED_PRECISION"] == "bf16" and device.type != "cuda":
        precision_note += " (bf16 mixed precision needs CUDA)"
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if use_bf16 else nullcontext()
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)

    # --- data: check the recordings, split them, make sure the latent cache holds every clip
    report = data.check_data(
        s["DATA_DIR"], sequence_length=s["SEQUENCE_LENGTH"], clip_stride=s["CLIP_STRIDE"],
        keyboard_keys=s["KEYBOARD_KEYS"], mouse_scale=s["MOUSE_SCALE"], skip_bad_frames=s["SKIP_BAD_FRAMES"],
        val_fraction=s["VAL_FRACTION"], height=s["VIDEO_HEIGHT"], width=s["VIDEO_WIDTH"],
        decode_frames=s["SKIP_BAD_FRAMES"], progress=True)
    print(report.format())
    report.raise_for_problems()
    split = report.split
    if not split.train:
        raise TrainingError(f"no training clips in {s['DATA_DIR']}")
    height, width = report.settings["VIDEO_HEIGHT"], report.settings["VIDEO_WIDTH"]
    cache = latent_cache.LatentCache(s["CACHE_DIR"])
    cache_report = latent_cache.build_latent_cache(
        split.train + split.val, s["CACHE_DIR"], s["VAE_PATH"], s["CLIP_PATH"], height, width,
        dtype=s["CACHE_DTYPE"], num_workers=s["NUM_WORKERS"], cache=cache)
    print(cache_report.format())
    train_set = latent_cache.CachedClipDataset(split.train, s["CACHE_DIR"], cache_report.settings, cache)
    val_set = latent_cache.CachedClipDataset(split.val, s["CACHE_DIR"], cache_report.settings, cache)
    loader_options = dict(batch_size=s["BATCH_SIZE"], num_workers=s["NUM_WORKERS"],
                          pin_memory=device.type == "cuda", persistent_workers=False)
    val_loader = DataLoader(val_set, shuffle=False, **loader_options)

    # --- model: load, re-initialise the keyboard if its width differs, freeze by strategy
    model_dtype = torch.bfloat16 if use_bf16 else torch.float32
    model, reinitialised = load_base_model(s["BASE_MODEL_DIR"], keyboard_dim=len(s["KEYBOARD_KEYS"]),
                                           device=device, dtype=model_dtype)
    trainable = prepare_trainable(model, s["TRAINING_STRATEGY"], s["LAST_LAYERS"])
    trainable_names = list(trainable)
    params = dict(model.named_parameters())
    model.set_gradient_checkpointing(s["GRADIENT_CHECKPOINTING"])
    if s["COMPILE"]:
        for block in model.blocks:
            block.compile()
    model.train()
    total_params = sum(p.numel() for p in params.values())
    trainable_count = sum(p.numel() for p in trainable.values())

    optimizer = torch.optim.AdamW(list(trainable.values()), lr=s["LEARNING_RATE"], weight_decay=s["WEIGHT_DECAY"],
                                  betas=(0.9, 0.999), fused=device.type == "cuda")
    steps_per_epoch = optimizer_steps_per_epoch(len(train_set), s["BATCH_SIZE"], s["GRAD_ACCUM_STEPS"])
    total_steps = steps_per_epoch * s["NUM_EPOCHS"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, s["WARMUP_STEPS"], total_steps, s["MIN_LR_RATIO"]))
    ema = EMA(trainable, s["EMA_DECAY"]) if s["EMA_DECAY"] > 0 else None
    noise_generator = torch.Generator().manual_seed(s["SEED"])
    val_sigmas = flow.validation_sigmas(s["VAL_SIGMAS"], s["TIMESTEP_SAMPLING"], s["TIMESTEP_SHIFT"],
                                        s["MIN_SIGMA"], s["MAX_SIGMA"])

    epoch, micro_done, global_step, history, epoch_loss = 0, 0, 0, [], [0.0, 0]
    if resume is not None:
        if resume["trainable_names"] != trainable_names or resume["train_clips"] != [c.clip_id for c in split.train]:
            raise TrainingError(f"cannot resume {state_path}: its trainable tensors or training clips differ from "
                                "this run's (did the data change?)")
        with torch.no_grad():
            for name, tensor in resume["trainable"].items():
                trainable[name].copy_(tensor)
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        noise_generator.set_state(resume["noise_rng"])
        torch.set_rng_state(resume["torch_rng"])
        if ema is not None:
            ema.shadow = {n: t.clone() for n, t in resume["ema"].items()}
        epoch, micro_done, global_step = resume["epoch"], resume["micro_done"], resume["global_step"]
        history, epoch_loss = resume["history"], resume["epoch_loss"]
        print(f"resumed {state_path}: epoch {epoch + 1}, optimizer step {global_step}")
    metrics = read_metrics_csv(out_dir / METRICS_FILE, global_step) if resume is not None else []
    checkpoints = [p.name for p in sorted(out_dir.glob("base_finetuned_*.safetensors"))] if resume is not None else []

    # --- what this run is, printed now and kept in training_info.txt
    header = [
        f"Matrix-Game 2.0 base-model fine-tuning - {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"code commit: {git_commit()}",
        f"device: {device_name(device)}; precision: {precision_note}; torch {torch.__version__}; "
        f"python {platform.python_version()}",
        f"model: {s['BASE_MODEL_DIR']}; dim {model.config.dim}, {model.config.num_layers} blocks, "
        f"{model.config.num_heads} heads, keyboard width {model.config.action_config.keyboard_dim_in} "
        f"({', '.join(s['KEYBOARD_KEYS'])})",
        f"parameters: total {format_count(total_params)}, trainable {format_count(trainable_count)}, "
        f"frozen {format_count(total_params - trainable_count)} (strategy {s['TRAINING_STRATEGY']}"
        + (f", last {s['LAST_LAYERS']} blocks" if s["TRAINING_STRATEGY"] == "last_layers" else "") + ")",
        (f"re-initialised {len(reinitialised)} keyboard tensors because the checkpoint's keyboard width differs "
         f"from KEYBOARD_KEYS ({len(s['KEYBOARD_KEYS'])}): " + ", ".join(reinitialised)) if reinitialised
        else "keyboard embeddings: loaded from the checkpoint (its width matches KEYBOARD_KEYS)",
        f"data: {len(split.train)} training clips, {len(split.val)} validation clips"
        + (f", {len(split.dropped)} dropped (they overlapped validation frames)" if split.dropped else "")
        + (f" - {split.note}" if split.note else "") + f"; {s['SEQUENCE_LENGTH']} frames at {width}x{height}",
        f"optimisation: {steps_per_epoch} optimizer steps per epoch, {total_steps} in all; effective batch "
        f"{s['BATCH_SIZE'] * s['GRAD_ACCUM_STEPS']} (BATCH_SIZE {s['BATCH_SIZE']} x GRAD_ACCUM_STEPS "
        f"{s['GRAD_ACCUM_STEPS']}); validation sigmas {', '.join(f'{x:.3f}' for x in val_sigmas.tolist())}",
    ]
    print("\n".join(header))
    settings_text = "\n".join(f"  {n} = {s[n]!r}" for n in SETTING_NAMES)

    def write_info(status: str) -> None:
        seconds = [m["seconds_per_step"] for m in metrics[-100:]]
        lines = header + [f"status: {status}", "", "Per epoch:"]
        lines += [f"  epoch {h['epoch']}: train loss {h['train_loss']:.5f}, val loss "
                  + (f"{h['val_loss']:.5f}" if h.get("val_loss") is not None else "n/a")
                  + ", action gain " + (f"{h['action_gain']:.4f}" if h.get("action_gain") is not None
                                        else "n/a (needs 2+ validation clips)")
                  + (f" (EMA weights)" if ema is not None else "")
                  + f", {h['seconds']:.0f} s" + (f"; preview {h['preview']}" if h.get("preview") else "")
                  for h in history]
        lines += ["", f"speed: {sum(seconds) / len(seconds):.3f} s per optimizer step (last {len(seconds)})"
                  if seconds else "speed: no steps yet"]
        if device.type == "cuda":
            lines.append(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB")
        lines += ["checkpoints: " + (", ".join(checkpoints) or "none yet"), "", "Settings:", settings_text,
                  "", "Data report:", report.format(), "", cache_report.format(), ""]
        write_text_atomic(out_dir / INFO_FILE, "\n".join(lines))

    def save_state() -> None:
        torch_save_atomic({
            "settings": {n: s[n] for n in SETTING_NAMES}, "trainable_names": trainable_names,
            "train_clips": [c.clip_id for c in split.train],
            "trainable": {n: p.detach().cpu().clone() for n, p in trainable.items()},
            "ema": ema.shadow if ema is not None else None,
            "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
            "noise_rng": noise_generator.get_state(), "torch_rng": torch.get_rng_state(),
            "epoch": epoch, "micro_done": micro_done, "global_step": global_step,
            "history": history, "epoch_loss": epoch_loss,
        }, state_path)
        write_text_atomic(out_dir / METRICS_FILE, format_metrics_csv(metrics))

    def weights_to_save() -> dict:
        weights = ema.shadow if ema is not None else trainable
        return {n: t.detach().cpu() for n, t in weights.items()}

    write_info("training")
    train_start = time.time()
    while epoch < s["NUM_EPOCHS"]:
        epoch_started = time.time()
        sampler = EpochSampler(len(train_set), s["SEED"], epoch, start=micro_done * s["BATCH_SIZE"])
        loader = DataLoader(train_set, sampler=sampler, **loader_options)
        micro_total = micro_batches_per_epoch(len(train_set), s["BATCH_SIZE"])
        bar = tqdm(total=micro_total, initial=micro_done, desc=f"epoch {epoch + 1}/{s['NUM_EPOCHS']}", unit="batch")
        step_started = time.time()
        for batch in loader:
            # gradient accumulation: the last group of an epoch may be shorter
            group_start = (micro_done // s["GRAD_ACCUM_STEPS"]) * s["GRAD_ACCUM_STEPS"]
            group_size = min(s["GRAD_ACCUM_STEPS"], micro_total - group_start)
            inputs = model_inputs(batch, device)
            batch_size = inputs["latents"].shape[0]
            sigma = flow.sample_sigmas(batch_size, s["TIMESTEP_SAMPLING"], s["TIMESTEP_SHIFT"], s["MIN_SIGMA"],
                                       s["MAX_SIGMA"], generator=noise_generator)
            noise = torch.randn(inputs["latents"].shape, generator=noise_generator)
            loss = flow_matching_step(model, inputs, sigma, noise, autocast).mean()
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"the loss became {loss.item()} at optimizer step {global_step + 1} (epoch {epoch + 1}; clips "
                    f"{', '.join(f'{r}:{f}' for r, f in zip(batch['recording'], batch['first_frame'].tolist()))}); "
                    f"training stopped before applying it. The files in {out_dir} are from the last save and "
                    "remain valid. Try a lower LEARNING_RATE or MAX_GRAD_NORM, or MIXED_PRECISION=fp32.")
            (loss / group_size).backward()
            epoch_loss[0] += loss.item() * batch_size
            epoch_loss[1] += batch_size
            micro_done += 1
            bar.update(1)
            if micro_done - group_start < group_size:
                continue

            grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), s["MAX_GRAD_NORM"]).item()
            if not math.isfinite(grad_norm):
                raise TrainingError(f"the gradient norm became {grad_norm} at optimizer step {global_step + 1}; "
                                    f"training stopped before applying it. The files in {out_dir} are from the "
                                    "last save and remain valid. Try a lower LEARNING_RATE or MIXED_PRECISION=fp32.")
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.update(trainable)
            global_step += 1
            seconds = time.time() - step_started
            step_started = time.time()
            metrics.append({"step": global_step, "epoch": epoch + 1, "loss": loss.item(), "lr": lr,
                            "grad_norm": grad_norm, "sigma": sigma.mean().item(), "seconds_per_step": seconds})
            bar.set_postfix(loss=f"{loss.item():.4f}", lr=f"{lr:.2e}", s_step=f"{seconds:.2f}")
            if global_step % s["LOG_EVERY_STEPS"] == 0:
                write_text_atomic(out_dir / METRICS_FILE, format_metrics_csv(metrics))
            if s["SAVE_EVERY_STEPS"] and global_step % s["SAVE_EVERY_STEPS"] == 0 and micro_done < micro_total:
                save_state()
        bar.close()

        # --- end of epoch: validate, save, report
        entry = {"epoch": epoch + 1, "train_loss": epoch_loss[0] / max(1, epoch_loss[1]),
                 "seconds": time.time() - epoch_started, "step": global_step}
        if len(val_set):
            if ema is not None:
                ema.swap_into(trainable)
            entry.update(validate(model, val_loader, val_sigmas, s["SEED"], device, autocast))
            if ema is not None:
                ema.swap_into(trainable)
        history.append(entry)
        gain = entry.get("action_gain")
        print(f"epoch {epoch + 1}: train loss {entry['train_loss']:.5f}"
              + (f", val loss {entry['val_loss']:.5f}" if "val_loss" in entry else ", no validation clips")
              + (f", action gain {gain:.4f}" if gain is not None else ""))
        epoch, micro_done, epoch_loss = epoch + 1, 0, [0.0, 0]
        if s["SAVE_EVERY_EPOCHS"] and epoch % s["SAVE_EVERY_EPOCHS"] == 0:
            name = f"base_finetuned_epoch{epoch}.safetensors"
            save_safetensors_atomic(weights_to_save(), out_dir / name, {
                "strategy": s["TRAINING_STRATEGY"], "epoch": epoch, "step": global_step,
                "keyboard_keys": ",".join(s["KEYBOARD_KEYS"]), "weights": "ema" if ema else "trained",
                "contents": "trainable tensors only; load over the base model"})
            checkpoints.append(name)
        if s["PREVIEW_EVERY_EPOCHS"] and (epoch % s["PREVIEW_EVERY_EPOCHS"] == 0 or epoch == s["NUM_EPOCHS"]):
            if ema is not None:
                ema.swap_into(trainable)
            entry.update(generate_preview.epoch_preview(
                model, val_set if len(val_set) else train_set, s["VAE_PATH"], height, width, out_dir / PREVIEW_DIR,
                epoch, s["KEYBOARD_KEYS"], s["PREVIEW_STEPS"], s["TIMESTEP_SHIFT"], s["SEED"], autocast))
            if ema is not None:
                ema.swap_into(trainable)
            print(f"epoch {epoch} preview: {entry['preview']}")
        save_state()
        write_info("training" if epoch < s["NUM_EPOCHS"] else "finished")

    # --- the final full state dict, loadable with WanModel.load_state_dict(strict=True)
    final = {n: p.detach().cpu() for n, p in model.state_dict().items()}
    final.update(weights_to_save())
    save_safetensors_atomic(final, out_dir / FINAL_FILE, {
        "strategy": s["TRAINING_STRATEGY"], "epoch": epoch, "step": global_step,
        "keyboard_keys": ",".join(s["KEYBOARD_KEYS"]), "weights": "ema" if ema else "trained",
        "contents": "full state dict"})
    if FINAL_FILE not in checkpoints:
        checkpoints.append(FINAL_FILE)
    write_text_atomic(out_dir / METRICS_FILE, format_metrics_csv(metrics))
    summary = {"history": history, "steps": global_step, "train_seconds": time.time() - train_start,
               "seconds": time.time() - started, "checkpoint_dir": str(out_dir)}
    write_info(f"finished in {summary['seconds']:.0f} s")
    return summary


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings, demo = parse_settings(argv)
        if demo:
            prepare_demo(settings)
        summary = train(settings)
    except (ValueError, FileNotFoundError, TrainingError, CheckpointError, latent_cache.CacheError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    history = summary["history"]
    first, last = history[0], history[-1]
    print(f"done: {summary['steps']} optimizer steps in {summary['seconds']:.0f} s; train loss "
          f"{first['train_loss']:.4f} (epoch 1) -> {last['train_loss']:.4f} (epoch {last['epoch']}); "
          f"outputs in {summary['checkpoint_dir']} (read {INFO_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
