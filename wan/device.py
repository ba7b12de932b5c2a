"""Where the model runs and in which precision: one rule for training, the cache and previews."""

from contextlib import nullcontext

import torch

# The GPU's autocast (the planner imitates it with these same settings). No weight cache:
# it keeps a bf16 copy of every float32 trained weight until the forward ends - 3.5 GB for
# "full" - which with gradient checkpointing nothing else needs (the recomputation casts
# again), and without it the copies are saved for the backward anyway. Each weight is
# cast once per forward either way, so turning it off costs no time.
AUTOCAST_SETTINGS = dict(dtype=torch.bfloat16, cache_enabled=False)


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
    return torch.autocast("cuda", **AUTOCAST_SETTINGS) if enabled and device.type == "cuda" else nullcontext()


def to_device_without_waiting(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on device, copied without making the host wait: from pinned memory on a
    GPU (a copy from pageable memory first waits for the GPU's queue to drain, which stalls
    a stream that keeps the GPU ahead of the host)."""
    device = torch.device(device)
    if device.type == "cuda" and tensor.device.type == "cpu" and torch.cuda.is_available():
        tensor = tensor.contiguous().pin_memory()
    return tensor.to(device, non_blocking=True)
