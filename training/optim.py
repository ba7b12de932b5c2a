"""The optimizer: AdamW over the trained tensors, in two groups.

Weight decay pulls a weight matrix towards zero, which regularises it; on a norm's gain,
a bias or the adaLN modulation (the per-channel shift/scale/gate offsets added to the
time embedding) it would only drag learned offsets back to zero. So, as is standard,
tensors with fewer than two dimensions and the modulation tensors get no decay. (This
model has no embedding table; its patch, time and keyboard embeddings are ordinary
projections and are decayed like the other weight matrices.)
"""

import torch

BETAS = (0.9, 0.999)


def decays(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() >= 2 and not name.endswith("modulation")


def parameter_groups(trainable: dict, weight_decay: float) -> list[dict]:
    """[decayed, not decayed] groups (a group with no tensors is left out)."""
    groups = [{"params": [p for n, p in trainable.items() if decays(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in trainable.items() if not decays(n, p)], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(trainable: dict, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(parameter_groups(trainable, weight_decay), lr=lr, betas=BETAS,
                             fused=device.type == "cuda")
