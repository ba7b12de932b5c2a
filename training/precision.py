"""Which precision a training run computes in, decided once from MIXED_PRECISION and the device."""

from dataclasses import dataclass

import torch

from wan.device import autocast_for, run_dtype


@dataclass
class Precision:
    use_bf16: bool               # bf16 autocast with float32 master weights (CUDA only)
    model_dtype: torch.dtype     # the dtype the model is loaded in (frozen weights stay in it)
    autocast: object             # the context every forward runs under
    note: str                    # for the log and training_info.txt


MIXED_PRECISIONS = ("bf16", "fp32")  # the MIXED_PRECISION setting of every trainer


def choose_precision(mixed_precision: str, device: torch.device) -> Precision:
    """bf16 autocast (and TF32 matmuls) on CUDA when asked for; float32 everywhere else."""
    use_bf16 = mixed_precision == "bf16" and device.type == "cuda"
    note = "bf16 autocast, float32 master weights" if use_bf16 else "float32"
    if mixed_precision == "bf16" and device.type != "cuda":
        note += " (bf16 mixed precision needs CUDA)"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Precision(use_bf16, run_dtype(device) if use_bf16 else torch.float32,
                     autocast_for(device, enabled=use_bf16), note)
