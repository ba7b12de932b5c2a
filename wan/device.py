"""Where the model runs and in which precision: one rule for training, the cache and previews."""

from contextlib import nullcontext

import torch


def pick_device(name: str) -> torch.device:
    """"auto": the GPU when there is one, else the CPU; or a torch device name ("cuda:1")."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError):
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise ValueError(f"DEVICE={name!r} is not a device: use auto, cpu, cuda or cuda:N (N = the GPU's index)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"DEVICE={name!r} but no CUDA GPU is available; use DEVICE=cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ValueError(f"DEVICE={name!r} but this machine has {torch.cuda.device_count()} GPU(s) "
                         f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})")
    return device


def run_dtype(device: torch.device) -> torch.dtype:
    """bf16 weights on a GPU, as the reference runs them; float32 on the CPU."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def autocast_for(device: torch.device, enabled: bool = True):
    """bf16 autocast on a GPU; nothing on the CPU (or when not enabled)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if enabled and device.type == "cuda" else nullcontext()
