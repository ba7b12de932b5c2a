"""Shared helpers of the tests/test_model_*.py files."""

import torch

from wan.config import tiny_config
from wan.model import WanModel


def perturb_(model: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add noise to every parameter, so zero-initialised projections (head, action
    outputs) stop hiding what the rest of the model computes."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g).to(p) * scale)
    return model


def tiny_model(seed: int = 0, perturbed: bool = True, **config_overrides) -> WanModel:
    torch.manual_seed(seed)
    model = WanModel(tiny_config(**config_overrides))
    return perturb_(model, seed) if perturbed else model


def tiny_causal_model(seed: int = 0, local_attn_size: int = 6, sink_size: int = 0,
                      action_blocks=(0,), **config_overrides):
    """A perturbed tiny streaming model: windowed attention, action modules in some blocks."""
    from wan.causal import CausalWanModel

    torch.manual_seed(seed)
    config = tiny_config(local_attn_size=local_attn_size, sink_size=sink_size,
                         action_blocks=action_blocks, **config_overrides)
    return perturb_(CausalWanModel(config), seed)
