"""An exponential moving average of the trained weights: what gets validated, saved and previewed."""

import torch


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
