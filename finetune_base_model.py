"""Fine-tune the Matrix-Game 2.0 base model on your own Unreal recordings.

    python finetune_base_model.py                          # with the settings below
    python finetune_base_model.py --NUM_EPOCHS=3 --RESUME=true
    python finetune_base_model.py --demo                   # the whole pipeline, tiny model, CPU
    torchrun --nproc_per_node=4 finetune_base_model.py     # several GPUs (DDP; FSDP for "full")

It loads BASE_MODEL_DIR (re-initialising the keyboard embeddings when your key set has
another width than the checkpoint), freezes what TRAINING_STRATEGY does not train, makes
sure every clip of DATA_DIR is in the latent cache (encoding it with the VAE and CLIP if
not), and trains with the model's own flow-matching objective. Everything it writes goes
to CHECKPOINT_DIR; read training_info.txt there first.
"""

import datetime
import hashlib
import math
import os
import platform
import shutil
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader
from tqdm import tqdm

import convert_unreal_data as data
import generate_preview
import latent_cache
from wan import flow
from wan.device import autocast_for, pick_device, run_dtype
from wan.files import save_safetensors_atomic, torch_save_atomic, write_text_atomic
from wan.loading import CONFIG_NAME, CheckpointError, load_base_model
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
# previews (generate_preview.py): the most active validation clip, generated from its first frame and actions
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
# A run can continue only with the settings that shaped its state and its data order
# (EFFECTIVE_BATCH = BATCH_SIZE x GRAD_ACCUM_STEPS x ranks, so a run may resume on another
# number of GPUs with the same effective batch).
RESUME_MUST_MATCH = ("BASE_MODEL_DIR", "DATA_DIR", "SEQUENCE_LENGTH", "CLIP_STRIDE", "KEYBOARD_KEYS",
                     "MOUSE_SCALE", "VAL_FRACTION", "VIDEO_HEIGHT", "VIDEO_WIDTH", "CACHE_DTYPE",
                     "TRAINING_STRATEGY", "LAST_LAYERS", "EFFECTIVE_BATCH", "LEARNING_RATE", "MIN_LR_RATIO",
                     "WEIGHT_DECAY", "WARMUP_STEPS", "MAX_GRAD_NORM", "EMA_DECAY", "TIMESTEP_SHIFT", "TIMESTEP_SAMPLING",
                     "MIN_SIGMA", "MAX_SIGMA", "MIXED_PRECISION", "SEED")

# The --demo run: the real pipeline on a generated recording with tiny random weights, on CPU.
DEMO_DIR = "demo_run"
DEMO_SETTINGS = dict(
    BASE_MODEL_DIR=f"{DEMO_DIR}/models/base_model", VAE_PATH=f"{DEMO_DIR}/models/tiny_vae.pth",
    CLIP_PATH=f"{DEMO_DIR}/models/tiny_clip.pth", DATA_DIR=f"{DEMO_DIR}/data",
    CACHE_DIR=f"{DEMO_DIR}/latent_cache", CHECKPOINT_DIR=f"{DEMO_DIR}/checkpoints", CACHE_DTYPE="fp32",
    VIDEO_HEIGHT=64, VIDEO_WIDTH=112, SEQUENCE_LENGTH=17, CLIP_STRIDE=8, VAL_FRACTION=0.15,
    TRAINING_STRATEGY="full",
    BATCH_SIZE=2, GRAD_ACCUM_STEPS=1, NUM_EPOCHS=15, LEARNING_RATE=2e-3, WARMUP_STEPS=10,
    GRADIENT_CHECKPOINTING=False, MIXED_PRECISION="fp32", NUM_WORKERS=0, DEVICE="cpu",
    SAVE_EVERY_EPOCHS=5, LOG_EVERY_STEPS=5, PREVIEW_EVERY_EPOCHS=15,
)
DEMO_FRAMES = 900                        # 36 s of play: enough variety that validation means something
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

def lr_factor(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Linear warm-up over warmup_steps, then cosine from 1 down to min_ratio at total_steps."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_order(num_items: int, seed: int, epoch: int) -> list[int]:
    """The clips of an epoch in a fresh seeded order; the same for every rank and on resume."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).tolist()


def plan_epoch(start: int, total: int, batch_size: int, accum: int, world: int) -> tuple[list, int]:
    """Cut positions [start, total) of the epoch order into optimizer steps.

    Returns (steps, dropped): steps[k][m][r] lists the positions rank r trains on in
    micro-batch m of step k. A micro-batch takes the next batch_size x world positions,
    rank by rank; the last one may be smaller (split as evenly as possible) and the last
    step may have fewer micro-batches. Positions that cannot give every rank one clip are
    dropped (only possible with several ranks). Steps consume consecutive positions, so a
    run resumed at any step boundary - on any number of ranks - continues the same order.
    """
    micro, position = [], start
    while total - position >= world:
        size = min(batch_size * world, total - position)
        base, extra = divmod(size, world)
        per_rank = []
        for r in range(world):
            n = base + (r < extra)
            per_rank.append(list(range(position, position + n)))
            position += n
        micro.append(per_rank)
    steps = [micro[i:i + accum] for i in range(0, len(micro), accum)]
    return steps, total - position


def sample_noise(seed: int, epoch: int, position: int, shape, sampling: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The sigma and noise of one training sample, drawn from its own seeded generator:
    the same whatever the batch size, the number of ranks or an interruption."""
    key = hashlib.sha256(f"{seed}:{epoch}:{position}".encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(key[:8], "little") & (2**63 - 1))
    sigma = flow.sample_sigmas(1, generator=g, **sampling)
    return sigma, torch.randn(shape, generator=g)


def actions_digest(clips) -> str:
    """A fingerprint of the clips' keyboard and mouse rows (what KEY_MAP and the CSVs decide)."""
    digest = hashlib.sha256()
    for clip in clips:
        digest.update(clip.keyboard.numpy().tobytes())
        digest.update(clip.mouse.numpy().tobytes())
    return digest.hexdigest()


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
    return flow.flow_matching_losses(prediction, x0, noise)


@torch.no_grad()
def validate(model, val_set, sigmas: torch.Tensor, seed: int, device, autocast, rank: int = 0,
             world: int = 1) -> dict:
    """Validation loss with the true actions and with actions shuffled across clips.

    Every clip is scored at the same fixed sigmas with the same noise every time (seeded by
    its index), so numbers are comparable across epochs and numbers of ranks. The action
    gain is shuffled / true: above 1 means the model's predictions depend on the actions.
    With several ranks each scores every world-th clip; ranks with one clip fewer run a
    weightless pass so that all make the same calls (FSDP needs every rank in every forward).
    """
    model.eval()
    n = len(val_set)
    # Every clip gets the actions of the clip half the set away: neighbouring validation clips
    # overlap in time and share most of their actions, so a shift by one would change little.
    other = [(i + max(1, n // 2)) % n for i in range(n)]
    sums = torch.zeros(3, len(sigmas), dtype=torch.float64)  # true, shuffled, count
    for k in range(math.ceil(n / world)):
        index = k * world + rank
        weight = 1.0 if index < n else 0.0
        item = val_set[min(index, n - 1)]
        inputs = model_inputs({name: value[None] if torch.is_tensor(value) else value
                               for name, value in item.items()}, device)
        swap = val_set.clips[other[min(index, n - 1)]]
        for j, sigma in enumerate(sigmas):
            g = torch.Generator().manual_seed(seed * 1000003 + min(index, n - 1) * 101 + j)
            noise = torch.randn(inputs["latents"].shape, generator=g)
            sums[0, j] += weight * flow_matching_step(model, inputs, sigma[None], noise, autocast).item()
            sums[2, j] += weight
            if n > 1:
                sums[1, j] += weight * flow_matching_step(
                    model, inputs, sigma[None], noise, autocast, keyboard=swap.keyboard[None].to(device),
                    mouse=swap.mouse[None].to(device)).item()
    if world > 1:
        dist.all_reduce(sums)
    model.train()
    loss = (sums[0].sum() / sums[2].sum()).item()
    if not math.isfinite(loss):
        raise TrainingError(f"the validation loss became {loss}: the weights have diverged. Training stopped; "
                            "the files from the last save remain valid. Try a lower LEARNING_RATE.")
    result = {"val_loss": loss, "val_loss_per_sigma": (sums[0] / sums[2]).tolist()}
    if n > 1:
        shuffled_loss = (sums[1].sum() / sums[2].sum()).item()
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
    later demo runs reuse them and their latent cache), and clear demo_run/checkpoints (a
    CHECKPOINT_DIR given on the command line is never cleared)."""
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
    if not (model_dir / CONFIG_NAME).is_file():  # written last: its absence means an unfinished set-up
        config = tiny_config(keyboard_dim=len(settings["KEYBOARD_KEYS"]), clip_dim=clip_config.width, **DEMO_MODEL)
        model = WanModel(config)
        with torch.no_grad():  # like a pretrained model, no zero output layers (any strategy can learn)
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.02)
        save_base_model(model, model_dir)
    if not settings["RESUME"] and settings["CHECKPOINT_DIR"] == DEMO_SETTINGS["CHECKPOINT_DIR"]:
        shutil.rmtree(settings["CHECKPOINT_DIR"], ignore_errors=True)  # only the demo's own folder


# -----------------------------------------------------------------------------
# Several GPUs (torchrun): DDP for partial strategies, FSDP for "full"

class Ranks:
    """This process's place among the training processes (one of one without torchrun)."""

    def __init__(self, rank: int = 0, world: int = 1, local_rank: int = 0):
        self.rank, self.world, self.local_rank = rank, world, local_rank
        self.main = rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()


def init_ranks(device_setting: str) -> tuple[Ranks, torch.device]:
    """torchrun sets WORLD_SIZE, RANK and LOCAL_RANK: join the process group (NCCL on CUDA,
    gloo on CPU) and take this rank's GPU. Without them: one process on pick_device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), pick_device(device_setting)
    local_rank = int(os.environ["LOCAL_RANK"])
    use_cuda = torch.cuda.is_available() and device_setting != "cpu"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    return Ranks(dist.get_rank(), world, local_rank), device


def wrap_for_ranks(model: WanModel, strategy: str, ranks: Ranks, device: torch.device, use_bf16: bool):
    """The module the training forward goes through. Partial strategies: DDP (frozen tensors
    are left out of its gradient buckets; find_unused_parameters because the action module's
    four norm weights are never used, as in the reference). "full": FSDP shards parameters,
    gradients and optimizer state, computing in bf16 and reducing gradients in float32."""
    if ranks.world == 1:
        return model
    if strategy == "full":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if use_bf16 else None, reduce_dtype=torch.float32)
        for block in model.blocks:
            fully_shard(block, mp_policy=policy)
        # The root reshards after forward too: a no-grad forward (validation, previews) must not
        # leave unsharded parameters in place of the ones the optimizer holds.
        fully_shard(model, mp_policy=policy, reshard_after_forward=True)
        return model
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def gradient_sync(wrapped, model: WanModel, enabled: bool):
    """Let the last micro-batch of a step all-reduce the gradients, not the others."""
    if isinstance(wrapped, DistributedDataParallel):
        return nullcontext() if enabled else wrapped.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # FSDP
        model.set_requires_gradient_sync(enabled)
    return nullcontext()


def full_tensors(named: dict, main: bool) -> dict:
    """Whole CPU tensors on the main rank (FSDP shards are gathered; every rank must call)."""
    out = {}
    for name, t in named.items():
        t = t.detach()
        if isinstance(t, DTensor):
            t = t.full_tensor()
        if main:
            out[name] = t.cpu().clone()
    return out


@torch.no_grad()
def load_full_tensors(targets: dict, tensors: dict) -> None:
    """Copy whole tensors into parameters or EMA shadows, sharding them like the target."""
    for name, target in targets.items():
        full = tensors[name].to(target.device if not isinstance(target, DTensor) else target.to_local().device)
        if isinstance(target, DTensor):
            full = distribute_tensor(full, target.device_mesh, target.placements)
        target.copy_(full)


# -----------------------------------------------------------------------------
# Training

def train(s: dict, ranks: Ranks | None = None, device: torch.device | None = None) -> dict:
    """The whole run. Returns the final summary (also in training_info.txt)."""
    started = time.time()
    if ranks is None:
        ranks, device = init_ranks(s["DEVICE"])
    log = print if ranks.main else (lambda *a, **k: None)
    out_dir = Path(s["CHECKPOINT_DIR"])
    state_path = out_dir / STATE_FILE
    if state_path.exists() and not s["RESUME"]:
        raise TrainingError(f"{out_dir} already holds a run ({STATE_FILE}); set --RESUME=true to continue it, "
                            "or choose another CHECKPOINT_DIR (nothing was overwritten)")
    resume = None
    if s["RESUME"] and state_path.exists():
        resume = torch.load(state_path, map_location="cpu", weights_only=False, mmap=True)
    if s["RESUME"] and resume is None:
        log(f"RESUME is on but {state_path} does not exist: starting a new run")
    effective_batch = s["BATCH_SIZE"] * s["GRAD_ACCUM_STEPS"] * ranks.world
    if resume is not None:
        current = dict(s, EFFECTIVE_BATCH=effective_batch)
        changed = [f"{n}: {resume['settings'].get(n)!r} -> {current[n]!r}" for n in RESUME_MUST_MATCH
                   if resume["settings"].get(n) != current[n]]
        if changed:
            raise TrainingError(f"cannot resume {state_path}: these settings differ from the saved run:\n  "
                                + "\n  ".join(changed))
    if ranks.main:
        out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(s["SEED"])

    use_bf16 = s["MIXED_PRECISION"] == "bf16" and device.type == "cuda"
    precision_note = "bf16 autocast, float32 master weights" if use_bf16 else "float32"
    if s["MIXED_PRECISION"] == "bf16" and device.type != "cuda":
        precision_note += " (bf16 mixed precision needs CUDA)"
    autocast = autocast_for(device, enabled=use_bf16)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.cuda.reset_peak_memory_stats(device)

    # --- data: check the recordings, split them, make sure the latent cache holds every clip
    report = data.check_data_with(s, decode_frames=s["SKIP_BAD_FRAMES"], progress=ranks.main)
    log(report.format())
    report.raise_for_problems()
    split = report.split
    if not split.train:
        raise TrainingError(f"no training clips in {s['DATA_DIR']}")
    height, width = report.settings["VIDEO_HEIGHT"], report.settings["VIDEO_WIDTH"]
    # every rank encodes its share of what is missing; the main rank then merges the manifest
    cache = latent_cache.LatentCache(s["CACHE_DIR"])
    cache_report = latent_cache.build_latent_cache(
        split.used, s["CACHE_DIR"], s["VAE_PATH"], s["CLIP_PATH"], height, width,
        dtype=s["CACHE_DTYPE"], device=device, num_workers=s["NUM_WORKERS"],
        rank=ranks.rank, world_size=ranks.world, progress=ranks.main, cache=cache)
    ranks.barrier()
    if ranks.world > 1:
        cache.rescan()  # the shards the other ranks wrote (verified shards stay verified)
        if ranks.main:
            cache.write_manifest()
    log(cache_report.format())
    train_set = latent_cache.CachedClipDataset(split.train, s["CACHE_DIR"], cache_report.settings, cache)
    val_set = latent_cache.CachedClipDataset(split.val, s["CACHE_DIR"], cache_report.settings, cache)

    # --- model: load, re-initialise the keyboard if its width differs, freeze by strategy
    model_dtype = run_dtype(device) if use_bf16 else torch.float32
    model, reinitialised = load_base_model(s["BASE_MODEL_DIR"], keyboard_dim=len(s["KEYBOARD_KEYS"]),
                                           device=device, dtype=model_dtype)
    trainable = prepare_trainable(model, s["TRAINING_STRATEGY"], s["LAST_LAYERS"])
    trainable_names = list(trainable)
    total_params = sum(p.numel() for p in model.parameters())
    trainable_count = sum(p.numel() for p in trainable.values())
    model.set_gradient_checkpointing(s["GRADIENT_CHECKPOINTING"])
    if s["COMPILE"]:
        for block in model.blocks:
            block.compile()
    wrapped = wrap_for_ranks(model, s["TRAINING_STRATEGY"], ranks, device, use_bf16)
    trainable = {n: p for n, p in model.named_parameters() if n in trainable}  # FSDP replaced them
    model.train()

    optimizer = torch.optim.AdamW(list(trainable.values()), lr=s["LEARNING_RATE"], weight_decay=s["WEIGHT_DECAY"],
                                  betas=(0.9, 0.999), fused=device.type == "cuda")
    full_epoch, dropped_per_epoch = plan_epoch(0, len(train_set), s["BATCH_SIZE"], s["GRAD_ACCUM_STEPS"], ranks.world)
    steps_per_epoch = len(full_epoch)
    if steps_per_epoch == 0:
        raise TrainingError(f"{len(train_set)} training clip(s) cannot give each of {ranks.world} ranks one clip: "
                            "no optimizer step would run. Use fewer GPUs or more data.")
    total_steps = steps_per_epoch * s["NUM_EPOCHS"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(
        step, s["WARMUP_STEPS"], total_steps, s["MIN_LR_RATIO"]))
    ema = EMA(trainable, s["EMA_DECAY"]) if s["EMA_DECAY"] > 0 else None
    sampling = dict(mode=s["TIMESTEP_SAMPLING"], shift=s["TIMESTEP_SHIFT"], min_sigma=s["MIN_SIGMA"],
                    max_sigma=s["MAX_SIGMA"])
    val_sigmas = flow.validation_sigmas(s["VAL_SIGMAS"], **sampling)
    state_options = StateDictOptions(full_state_dict=True, cpu_offload=True)

    epoch, position, global_step, history, epoch_loss = 0, 0, 0, [], [0.0, 0]
    if resume is not None:
        if resume["trainable_names"] != trainable_names or resume["train_clips"] != [c.clip_id for c in split.train]:
            raise TrainingError(f"cannot resume {state_path}: its trainable tensors or training clips differ from "
                                "this run's (did the data change?)")
        if resume["train_actions"] != actions_digest(split.train):
            raise TrainingError(f"cannot resume {state_path}: the training clips' keyboard or mouse rows differ "
                                "from the saved run's (did input.csv, KEY_MAP or INVERT_MOUSE_Y change?)")
        load_full_tensors(trainable, resume["trainable"])
        # strict=False: the action modules' norm weights are never used, so never get a state
        set_optimizer_state_dict(model, optimizer, resume["optimizer"],
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        scheduler.load_state_dict(resume["scheduler"])
        if ema is not None:
            load_full_tensors(ema.shadow, resume["ema"])
        epoch, position, global_step = resume["epoch"], resume["position"], resume["global_step"]
        history, epoch_loss = resume["history"], resume["epoch_loss"]
        log(f"resumed {state_path}: epoch {epoch + 1}, optimizer step {global_step}, on {ranks.world} rank(s)")
    metrics = read_metrics_csv(out_dir / METRICS_FILE, global_step) if resume is not None else []
    checkpoints = [p.name for p in sorted(out_dir.glob("base_finetuned_*.safetensors"))] if resume is not None else []

    # --- what this run is, printed now and kept in training_info.txt
    header = [
        f"Matrix-Game 2.0 base-model fine-tuning - {datetime.datetime.now().isoformat(timespec='seconds')}",
        f"code commit: {git_commit()}",
        f"device: {device_name(device)}" + (f" x {ranks.world} ranks" if ranks.world > 1 else "")
        + f"; precision: {precision_note}; torch {torch.__version__}; python {platform.python_version()}",
        f"model: {s['BASE_MODEL_DIR']}; dim {model.config.dim}, {model.config.num_layers} blocks, "
        f"{model.config.num_heads} heads, keyboard width {model.config.action_config.keyboard_dim_in} "
        f"({', '.join(s['KEYBOARD_KEYS'])})",
        f"parameters: total {format_count(total_params)}, trainable {format_count(trainable_count)}, "
        f"frozen {format_count(total_params - trainable_count)} (strategy {s['TRAINING_STRATEGY']}"
        + (f", last {s['LAST_LAYERS']} blocks" if s["TRAINING_STRATEGY"] == "last_layers" else "")
        + (f"; {'FSDP' if s['TRAINING_STRATEGY'] == 'full' else 'DDP'} over {ranks.world} ranks" if ranks.world > 1
           else "") + ")",
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
    ]
    log("\n".join(header))
    settings_text = "\n".join(f"  {n} = {s[n]!r}" for n in SETTING_NAMES)

    def write_info(status: str) -> None:
        if not ranks.main:
            return
        seconds = [m["seconds_per_step"] for m in metrics[-100:]]
        lines = header + [f"status: {status}", "", "Per epoch:"]
        lines += [f"  epoch {h['epoch']}: train loss {h['train_loss']:.5f}, val loss "
                  + (f"{h['val_loss']:.5f}" if h.get("val_loss") is not None else "n/a")
                  + ", action gain " + (f"{h['action_gain']:.4f}" if h.get("action_gain") is not None
                                        else "n/a (needs 2+ validation clips)")
                  + (" (EMA weights)" if ema is not None else "")
                  + f", {h['seconds']:.0f} s" + (f"; preview {h['preview']}" if h.get("preview") else "")
                  for h in history]
        lines += ["", f"speed: {sum(seconds) / len(seconds):.3f} s per optimizer step (last {len(seconds)})"
                  if seconds else "speed: no steps yet"]
        if device.type == "cuda":
            lines.append(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
                         + (" (rank 0)" if ranks.world > 1 else ""))
        lines += ["checkpoints: " + (", ".join(checkpoints) or "none yet"), "", "Settings:", settings_text,
                  "", "Data report:", report.format(), "", cache_report.format(), ""]
        write_text_atomic(out_dir / INFO_FILE, "\n".join(lines))

    def save_state() -> None:
        """Gathered on every rank, written by the main rank: whole tensors, so that the run can
        resume on any number of ranks."""
        state = {
            "settings": {**{n: s[n] for n in SETTING_NAMES}, "EFFECTIVE_BATCH": effective_batch},
            "trainable_names": trainable_names, "train_clips": [c.clip_id for c in split.train],
            "train_actions": actions_digest(split.train),
            "trainable": full_tensors(trainable, ranks.main),
            "ema": full_tensors(ema.shadow, ranks.main) if ema is not None else None,
            "optimizer": get_optimizer_state_dict(model, optimizer, options=state_options),
            "scheduler": scheduler.state_dict(),
            "epoch": epoch, "position": position, "global_step": global_step,
            "history": history, "epoch_loss": epoch_loss,
        }
        if ranks.main:  # metrics first: a kill between the two must not lose the saved steps' rows
            write_text_atomic(out_dir / METRICS_FILE, format_metrics_csv(metrics))
            torch_save_atomic(state, state_path)
        ranks.barrier()

    def weights_to_save() -> dict:
        return full_tensors(ema.shadow if ema is not None else trainable, ranks.main)

    def metadata(contents: str) -> dict:
        return {"strategy": s["TRAINING_STRATEGY"], "epoch": epoch, "step": global_step,
                "keyboard_keys": ",".join(s["KEYBOARD_KEYS"]), "weights": "ema" if ema else "trained",
                "contents": contents}

    write_info("training")
    train_start = time.time()
    while epoch < s["NUM_EPOCHS"]:
        epoch_started = time.time()
        order = epoch_order(len(train_set), s["SEED"], epoch)
        steps, _ = plan_epoch(position, len(train_set), s["BATCH_SIZE"], s["GRAD_ACCUM_STEPS"], ranks.world)
        my_batches = [[order[p] for p in micro[ranks.rank]] for step in steps for micro in step]
        loader = iter(DataLoader(train_set, batch_sampler=my_batches, num_workers=s["NUM_WORKERS"],
                                 pin_memory=device.type == "cuda"))
        bar = tqdm(total=steps_per_epoch, initial=steps_per_epoch - len(steps), unit="step",
                   desc=f"epoch {epoch + 1}/{s['NUM_EPOCHS']}", disable=not ranks.main)
        step_started = time.time()
        for step in steps:
            # Each sample's loss is weighted 1/(samples in the step), summed over ranks by
            # the gradient all-reduce (which averages: hence x world), so the step's gradient
            # is the mean over all its samples, whatever the ranks and micro-batches.
            step_samples = sum(len(per_rank) for micro in step for per_rank in micro)
            step_loss, step_sigma = 0.0, 0.0
            for m, micro in enumerate(step):
                batch = next(loader)
                inputs = model_inputs(batch, device)
                drawn = [sample_noise(s["SEED"], epoch, p, inputs["latents"].shape[1:], sampling)
                         for p in micro[ranks.rank]]
                sigma = torch.cat([d[0] for d in drawn])
                noise = torch.stack([d[1] for d in drawn])
                with gradient_sync(wrapped, model, enabled=m == len(step) - 1):
                    losses = flow_matching_step(wrapped, inputs, sigma, noise, autocast)
                    (losses.sum() * ranks.world / step_samples).backward()
                finite, loss_sum, sigma_sum = ranks.sum([float(torch.isfinite(losses).all()), losses.sum().item(),
                                                         sigma.sum().item()])
                if finite < ranks.world:
                    raise TrainingError(
                        f"the loss became {loss_sum} at optimizer step {global_step + 1} (epoch {epoch + 1}; clips "
                        f"{', '.join(f'{r}:{f}' for r, f in zip(batch['recording'], batch['first_frame'].tolist()))}"
                        f"{f' on rank {ranks.rank}' if ranks.world > 1 else ''}); training stopped before applying "
                        f"it. The files in {out_dir} are from the last save and remain valid. Try a lower "
                        "LEARNING_RATE or MAX_GRAD_NORM, or MIXED_PRECISION=fp32.")
                step_loss += loss_sum
                step_sigma += sigma_sum

            grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), s["MAX_GRAD_NORM"])
            grad_norm = (grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm).item()
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
            position = step[-1][-1][-1] + 1
            loss = step_loss / step_samples
            epoch_loss = [epoch_loss[0] + step_loss, epoch_loss[1] + step_samples]
            seconds = time.time() - step_started
            step_started = time.time()
            metrics.append({"step": global_step, "epoch": epoch + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                            "sigma": step_sigma / step_samples, "seconds_per_step": seconds})
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", s_step=f"{seconds:.2f}")
            if ranks.main and global_step % s["LOG_EVERY_STEPS"] == 0:
                write_text_atomic(out_dir / METRICS_FILE, format_metrics_csv(metrics))
            if s["SAVE_EVERY_STEPS"] and global_step % s["SAVE_EVERY_STEPS"] == 0 and step is not steps[-1]:
                save_state()
        bar.close()

        # --- end of epoch: validate, save, report
        entry = {"epoch": epoch + 1, "train_loss": epoch_loss[0] / max(1, epoch_loss[1]),
                 "seconds": time.time() - epoch_started, "step": global_step}
        if len(val_set):
            if ema is not None:
                ema.swap_into(trainable)
            entry.update(validate(model, val_set, val_sigmas, s["SEED"], device, autocast, ranks.rank, ranks.world))
            if ema is not None:
                ema.swap_into(trainable)
        history.append(entry)
        gain = entry.get("action_gain")
        log(f"epoch {epoch + 1}: train loss {entry['train_loss']:.5f}"
            + (f", val loss {entry['val_loss']:.5f}" if "val_loss" in entry else ", no validation clips")
            + (f", action gain {gain:.4f}" if gain is not None else ""))
        epoch, position, epoch_loss = epoch + 1, 0, [0.0, 0]
        if s["SAVE_EVERY_EPOCHS"] and epoch % s["SAVE_EVERY_EPOCHS"] == 0:
            name = f"base_finetuned_epoch{epoch}.safetensors"
            tensors = weights_to_save()
            if ranks.main:
                save_safetensors_atomic(tensors, out_dir / name, metadata("trainable tensors only; load over "
                                                                          "the base model"))
            checkpoints.append(name)
        sharded = ranks.world > 1 and s["TRAINING_STRATEGY"] == "full"  # FSDP: every rank takes part
        if s["PREVIEW_EVERY_EPOCHS"] and (epoch % s["PREVIEW_EVERY_EPOCHS"] == 0 or epoch == s["NUM_EPOCHS"]) \
                and (ranks.main or sharded):
            if ema is not None:
                ema.swap_into(trainable)
            entry.update(generate_preview.epoch_preview(
                model, val_set if len(val_set) else train_set, s["VAE_PATH"], height, width, out_dir / PREVIEW_DIR,
                epoch, s["KEYBOARD_KEYS"], s["PREVIEW_STEPS"], s["TIMESTEP_SHIFT"], s["SEED"], autocast,
                write=ranks.main))
            if ema is not None:
                ema.swap_into(trainable)
            log(f"epoch {epoch} preview: {entry.get('preview')}")
        save_state()
        write_info("training" if epoch < s["NUM_EPOCHS"] else "finished")

    # --- the final full state dict, loadable with WanModel.load_state_dict(strict=True)
    final = full_tensors(dict(model.state_dict()), ranks.main)
    final.update(weights_to_save())
    if ranks.main:
        save_safetensors_atomic(final, out_dir / FINAL_FILE, metadata(generate_preview.FULL_CONTENTS))
        write_text_atomic(out_dir / METRICS_FILE, format_metrics_csv(metrics))
    if FINAL_FILE not in checkpoints:
        checkpoints.append(FINAL_FILE)
    summary = {"history": history, "steps": global_step, "train_seconds": time.time() - train_start,
               "seconds": time.time() - started, "checkpoint_dir": str(out_dir)}
    write_info(f"finished in {summary['seconds']:.0f} s")
    ranks.barrier()
    return summary


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def plan_main(argv) -> int:
    """--plan: the GPU memory and time this run needs (planning/), without a GPU. Temporary
    hook: --GPU_MEMORY_GB and --NUM_CLIPS are the planner's own settings."""
    from planning.plan import plan_training

    planner = {"--GPU_MEMORY_GB=": float, "--NUM_CLIPS=": int}
    try:
        extra = {}
        for prefix, kind in planner.items():
            for a in argv:
                if a.startswith(prefix):
                    try:
                        extra[prefix[2:-1]] = kind(a[len(prefix):])
                    except ValueError:
                        raise ValueError(f"{a}: expected {'a number' if kind is float else 'a whole number'}") from None
        settings, _ = parse_settings([a for a in argv if not a.startswith(tuple(planner))])
        print(plan_training({**settings, **extra}).format())
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--plan" in argv:
        return plan_main([a for a in argv if a != "--plan"])
    ranks = Ranks()
    try:
        settings, demo = parse_settings(argv)
        ranks, device = init_ranks(settings["DEVICE"])
        if demo and ranks.main:
            prepare_demo(settings)
        ranks.barrier()
        summary = train(settings, ranks, device)
    except BaseException as error:
        expected = isinstance(error, (ValueError, FileNotFoundError, TrainingError, CheckpointError,
                                      latent_cache.CacheError))
        if ranks.world == 1 and not expected:
            raise
        where = f" (rank {ranks.rank} of {ranks.world})" if ranks.world > 1 else ""
        if expected:
            print(f"error{where}: {error}", file=sys.stderr, flush=True)
        else:
            traceback.print_exc()
            print(f"error{where}: {type(error).__name__}: {error}", file=sys.stderr, flush=True)
        if ranks.world > 1:
            # The other ranks may be waiting in a collective for this one: leave at once and
            # let torchrun stop them, rather than hang in a clean shutdown.
            os._exit(1)
        return 1
    if ranks.world > 1:
        dist.destroy_process_group()
    history = summary["history"]
    first, last = history[0], history[-1]
    if ranks.main:
        print(f"done: {summary['steps']} optimizer steps in {summary['seconds']:.0f} s; train loss "
              f"{first['train_loss']:.4f} (epoch 1) -> {last['train_loss']:.4f} (epoch {last['epoch']}); "
              f"outputs in {summary['checkpoint_dir']} (read {INFO_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
