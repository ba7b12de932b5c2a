"""Where the model runs and in which precision: one rule for training, the cache and previews."""

from contextlib import nullcontext

import torch

# The GPU's autocast (the planner imitates it with these same settings).
AUTOCAST_SETTINGS = dict(dtype=torch.bfloat16)


def pick_device(name: str) -> torch.device:
    """"auto": the GPU when there is one, else the CPU; or a torch device name ("cuda:1")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"DEVICE={name!r} but no CUDA GPU is available; use DEVICE=cpu or auto")
    return device


def run_dtype(device: torch.device) -> torch.dtype:
    """bf16 weights on a GPU, as the reference runs them; float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast on a GPU; nothing on the CPU (or when not enabled)."""
    return torch.autocast("cuda", **AUTOCAST_SETTINGS) if enabled and device.type == "cuda" else nullcontext()
