"""Low-rank adapters (LoRA) on the DiT's linear layers.

A target layer y = W x + b becomes y = W x + b + (alpha / rank) * B A dropout(x), with W and b
frozen and A [rank, in], B [out, rank] trained. B starts at zero, so until the first
optimizer step the model computes exactly what the base model computes; A starts like an
nn.Linear weight (Kaiming-uniform), so B's first gradients are not zero.

The adapters live inside the layer they adapt: `blocks.3.self_attn.q.lora_down.weight` (A)
and `blocks.3.self_attn.q.lora_up.weight` (B), while the layer's own `weight` and `bias`
keep their official names. So a model with adapters still loads the base checkpoint, and
merging (W + (alpha / rank) B A) gives back a plain model with the official names.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

# The linear layers of a block that can carry adapters, by group (a target is a group or one layer).
TARGET_GROUPS = {
    "self_attn": ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o"),
    "cross_attn": ("cross_attn.q", "cross_attn.k", "cross_attn.v", "cross_attn.o"),
    "ffn": ("ffn.0", "ffn.2"),
}
TARGET_LAYERS = tuple(layer for group in TARGET_GROUPS.values() for layer in group)
ADAPTER_MARKERS = (".lora_down.", ".lora_up.")


def is_adapter_name(name: str) -> bool:
    return any(marker in name for marker in ADAPTER_MARKERS)


@dataclass(frozen=True)
class LoRAConfig:
    rank: int
    alpha: float
    targets: tuple               # groups of TARGET_GROUPS and/or layers of TARGET_LAYERS
    dropout: float = 0.0

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def layers(self) -> tuple:
        """The targeted layer names within a block (e.g. "self_attn.q"), in block order."""
        wanted = set()
        for target in self.targets:
            wanted.update(TARGET_GROUPS.get(target, (target,)))
        return tuple(layer for layer in TARGET_LAYERS if layer in wanted)

    def check(self) -> None:
        unknown = [t for t in self.targets if t not in TARGET_GROUPS and t not in TARGET_LAYERS]
        if unknown or not self.targets:
            raise ValueError(f"LoRA targets {list(self.targets)}: choose from the groups {', '.join(TARGET_GROUPS)} "
                             f"or the layers {', '.join(TARGET_LAYERS)}")
        if not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoRA rank {self.rank!r}: must be a whole number >= 1")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) \
                or self.alpha <= 0:
            raise ValueError(f"LoRA alpha {self.alpha!r}: must be a finite positive number (the adapters' update "
                             "is scaled by alpha / rank)")

    def metadata(self) -> dict:
        """What a weights file records so that its adapters can be rebuilt (strings, for safetensors)."""
        return {"lora_rank": str(self.rank), "lora_alpha": repr(float(self.alpha)),
                "lora_targets": ",".join(self.layers())}

    @classmethod
    def from_metadata(cls, metadata: dict, where: str) -> "LoRAConfig":
        try:
            config = cls(int(metadata["lora_rank"]), float(metadata["lora_alpha"]),
                         tuple(t for t in metadata["lora_targets"].split(",") if t))
            config.check()
        except (KeyError, ValueError) as error:
            raise ValueError(f"{where}: its LoRA metadata (lora_rank, lora_alpha, lora_targets) is missing or "
                             f"broken ({error})") from None
        return config


class LoRALinear(nn.Linear):
    """nn.Linear plus a trained low-rank update beside its frozen weight."""

    def __init__(self, in_features: int, out_features: int, bias: bool, config: LoRAConfig, device=None,
                 dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self.scale = config.scale
        self.lora_down = nn.Linear(in_features, config.rank, bias=False, device=device, dtype=dtype)
        self.lora_up = nn.Linear(config.rank, out_features, bias=False, device=device, dtype=dtype)
        self.lora_dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()

    @torch.no_grad()
    def reset_adapter(self, generator: torch.Generator | None = None) -> None:
        """A as nn.Linear initialises its weight, B zero: the layer computes W x + b. A is drawn
        on the CPU from generator (so that a run's adapters depend on its seed alone, not on
        whatever used the global random state before), then moved to A's device."""
        down = torch.empty(self.lora_down.weight.shape)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        self.lora_down.weight.copy_(down)
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = self.lora_up(self.lora_down(self.lora_dropout(x)))
        return F.linear(x, self.weight, self.bias) + update * self.scale

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + scale B A, in float32 (a bf16 sum would round away much of a small update)."""
        delta = self.lora_up.weight.float() @ self.lora_down.weight.float()
        return self.weight.float() + delta * self.scale


def _adapted_layers(model: nn.Module, config: LoRAConfig) -> list[tuple[str, nn.Module, str]]:
    """(full name, parent module, attribute) of every targeted nn.Linear in model.blocks."""
    found = []
    for index, block in enumerate(model.blocks):
        for layer in config.layers():
            path = layer.split(".")
            parent = block.get_submodule(".".join(path[:-1]))
            found.append((f"blocks.{index}.{layer}", parent, path[-1]))
    return found


def add_lora(model: nn.Module, config: LoRAConfig, seed: int = 0) -> list[str]:
    """Put adapters on the targeted layers of every block (in place; the layers' weights are
    shared, not copied). Adapters are float32 on the layer's device, initialised from seed so
    that the model's output is unchanged. Returns the adapters' parameter names."""
    config.check()
    generator = torch.Generator().manual_seed(seed)
    names = []
    for name, parent, attribute in _adapted_layers(model, config):
        layer = getattr(parent, attribute)
        if isinstance(layer, LoRALinear):
            raise ValueError(f"{name} already has an adapter")
        with torch.device("meta"):
            adapted = LoRALinear(layer.in_features, layer.out_features, layer.bias is not None, config)
        adapted.weight, adapted.bias = layer.weight, layer.bias
        device = layer.weight.device
        adapted.lora_down.weight = nn.Parameter(torch.empty(config.rank, layer.in_features, device=device))
        adapted.lora_up.weight = nn.Parameter(torch.empty(layer.out_features, config.rank, device=device))
        adapted.reset_adapter(generator)
        adapted.train(layer.training)
        setattr(parent, attribute, adapted)
        names += [f"{name}.lora_down.weight", f"{name}.lora_up.weight"]
    return names


@torch.no_grad()
def merge_lora(model: nn.Module, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Fold every adapter into its layer (in place): plain nn.Linear layers with the official
    names again, each merged weight in dtype (the bias keeps its own). Returns the model. A
    merged weight that is not finite raises ValueError naming its layer."""
    for name, module in list(model.named_modules()):
        if not isinstance(module, LoRALinear):
            continue
        parent_name, _, attribute = name.rpartition(".")
        merged = module.merged_weight()
        if not torch.isfinite(merged).all():
            raise ValueError(f"merging the adapter of {name} gives {int((~torch.isfinite(merged)).sum()):,} "
                             "non-finite values (NaN or inf)")
        with torch.device("meta"):
            plain = nn.Linear(module.in_features, module.out_features, module.bias is not None)
        plain.weight = nn.Parameter(merged.to(dtype), requires_grad=False)
        plain.bias = module.bias
        plain.train(module.training)
        setattr(model.get_submodule(parent_name), attribute, plain)
    return model
