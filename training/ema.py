"""An exponential moving average of the trained weights: what gets validated, saved and previewed.

With warm-up (the default) the k-th update uses the decay min(decay, (1 + k) / (10 + k)):
early averages follow the training quickly instead of holding on to the starting
weights. Without it, 200 steps at 0.999 would still be 82% the base model's weights.
"""

from contextlib import contextmanager

import torch


def ema_decay(decay: float, updates_done: int, warmup: bool = True) -> float:
    """The decay of the update that follows `updates_done` earlier ones."""
    return min(decay, (1 + updates_done) / (10 + updates_done)) if warmup else decay


class EMA:
    """Exponential moving average of the trainable weights, in float32. It is updated once
    per optimizer step, so the number of updates done is the optimizer step (no extra state)."""

    def __init__(self, named_params: dict, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.shadow = {n: p.detach().float().clone() for n, p in named_params.items()}

    @torch.no_grad()
    def update(self, named_params: dict, updates_done: int) -> None:
        weight = 1 - ema_decay(self.decay, updates_done, self.warmup)
        for name, p in named_params.items():
            self.shadow[name].lerp_(p.detach().float(), weight)

    @torch.no_grad()
    def swap_into(self, named_params: dict) -> None:
        """Exchange the model's weights and the averages (call twice to undo)."""
        for name, p in named_params.items():
            current = p.detach().clone()
            p.copy_(self.shadow[name])
            self.shadow[name] = current.float()

    @contextmanager
    def weights_in(self, named_params: dict):
        """The averages in the model for the duration (validation, previews), then back."""
        self.swap_into(named_params)
        try:
            yield
        finally:
            self.swap_into(named_params)
