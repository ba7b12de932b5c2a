"""The optimizer: AdamW over the trained tensors, in two groups, and the ways to make its
memory smaller.

Weight decay pulls a weight matrix towards zero, which regularises it; on a norm's gain,
a bias or the adaLN modulation (the per-channel shift/scale/gate offsets added to the
time embedding) it would only drag learned offsets back to zero. So, as is standard,
tensors with fewer than two dimensions and the modulation tensors get no decay. (This
model has no embedding table; its patch, time and keyboard embeddings are ordinary
projections and are decayed like the other weight matrices.)

Memory savers (see training/recipe.py's Savers for the settings):
- "adamw_8bit": torchao's AdamW8bit, both moments quantised block-wise to 8 bits (2 bytes
  per trained number instead of 8);
- OffloadedOptimizer: the optimizer state, and the float32 copy of the trained tensors it
  steps, in host memory; each step copies the gradients out and the new weights back;
- StepInBackward: each tensor's optimizer step as soon as its gradient is complete, so the
  whole model's gradients never exist at once.
"""

import math
from contextlib import nullcontext

import torch

BETAS = (0.9, 0.999)
OPTIMIZERS = ("adamw", "adamw_8bit")


def decays(name: str, tensor: torch.Tensor) -> bool:
    return tensor.dim() >= 2 and not name.endswith("modulation")


def parameter_groups(trainable: dict, weight_decay: float) -> list[dict]:
    """[decayed, not decayed] groups (a group with no tensors is left out)."""
    groups = [{"params": [p for n, p in trainable.items() if decays(n, p)], "weight_decay": weight_decay},
              {"params": [p for n, p in trainable.items() if not decays(n, p)], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_adamw(trainable: dict, lr: float, weight_decay: float, device: torch.device,
                betas: tuple[float, float] = BETAS) -> torch.optim.AdamW:
    return build_optimizer(parameter_groups(trainable, weight_decay), "adamw", lr, device, betas)


def adamw_8bit_class():
    """torchao's AdamW8bit, made to take the schedule's float learning rates and to run eagerly
    off CUDA (imported on first use: torchao is only needed for OPTIMIZER="adamw_8bit")."""
    from torchao.optim import AdamW8bit as TorchaoAdamW8bit

    class AdamW8bit(TorchaoAdamW8bit):
        """Its update is torch.compile'd on CUDA (as torchao runs it) and eager elsewhere:
        compiling needs a C++ toolchain on a CPU, and the planner's fake tensors run eagerly."""

        @torch.no_grad()
        def step(self, closure=None):
            for group in self.param_groups:
                if not torch.is_tensor(group["lr"]):  # the schedule sets a float every step
                    group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32)
            on_cuda = any(p.is_cuda for group in self.param_groups for p in group["params"])
            with nullcontext() if on_cuda else torch.compiler.set_stance("force_eager"):
                return super().step(closure)

    return AdamW8bit


def build_optimizer(groups: list[dict], kind: str, lr: float, device: torch.device,
                    betas: tuple[float, float] = BETAS):
    """AdamW ("adamw", its fused kernel when device is CUDA) or torchao's 8-bit AdamW
    ("adamw_8bit") over parameter groups (each with its weight_decay)."""
    if kind == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=device.type == "cuda")
    if kind == "adamw_8bit":
        return adamw_8bit_class()(groups, lr=lr, betas=tuple(betas))
    raise ValueError(f"OPTIMIZER={kind!r}: choose one of {', '.join(OPTIMIZERS)}")


class OffloadedOptimizer(torch.optim.Optimizer):
    """An optimizer whose state - and a float32 copy of the trained tensors, which it steps -
    lives on `host`. step() copies the gradients there, steps, and copies the new weights
    back into the model's tensors.

    Its param_groups hold the model's own tensors (the learning rate is set on them), and
    state_dict() is the inner optimizer's, in the same order: torch.distributed.checkpoint
    names it by the model's parameters, so a saved state is the same whether or not the
    optimizer was offloaded.
    """

    def __init__(self, groups: list[dict], make_inner, host: torch.device, pin: bool = False):
        super().__init__(groups, {})
        params = [p for group in self.param_groups for p in group["params"]]
        self.copies = {p: self._host_tensor(p, host, pin).copy_(p.detach()) for p in params}
        self.host_grads = {p: self._host_tensor(p, host, pin) for p in params}
        self.inner = make_inner([{**group, "params": [self.copies[p] for p in group["params"]]}
                                 for group in self.param_groups])
        self.state = self.inner.state  # the tensors it keeps (on the host)

    @staticmethod
    def _host_tensor(p: torch.Tensor, host: torch.device, pin: bool) -> torch.Tensor:
        return torch.empty(p.shape, dtype=torch.float32, device=host, pin_memory=pin)

    @torch.no_grad()
    def step(self, closure=None):
        for outer, inner in zip(self.param_groups, self.inner.param_groups):
            inner.update({key: value for key, value in outer.items() if key != "params"})
        for p, copy in self.copies.items():
            copy.grad = None if p.grad is None else self.host_grads[p].copy_(p.grad)
        self.inner.step()
        for p, copy in self.copies.items():
            if copy.grad is not None:
                p.copy_(copy, non_blocking=True)  # from pinned memory: ordered before the next use of p
                copy.grad = None

    def state_dict(self):
        return self.inner.state_dict()

    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict)
        self.state = self.inner.state


class StepInBackward:
    """The optimizer's step for each trained tensor as soon as its gradient is complete (a hook
    after gradient accumulation), then the gradient is dropped: the model's whole gradient
    never exists at once. One optimizer step per backward, so no gradient accumulation.

    Clipping is per tensor: each tensor's gradient is clipped to max_norm on its own (the
    global norm is only known when the backward ends, after every step). Whenever the whole
    gradient's norm is within max_norm nothing is clipped, as with global clipping, since no
    tensor's norm exceeds the whole's. The whole gradient's norm before clipping is still
    summed up for the metrics and the finite check (after the fact: a non-finite step has
    been applied in memory, and the run stops before saving anything of it).

    A tensor's hook runs once its last use in the backward is done (every weight of this
    model is used once per forward), so stepping it cannot change what the rest of the
    backward computes; a gradient that arrives twice in one backward is an error.
    """

    def __init__(self, optimizer, trainable: dict, max_norm: float):
        self.optimizer, self.max_norm = optimizer, max_norm
        self.names = {p: name for name, p in trainable.items()}
        self.squares, self.stepped = None, set()
        self.handles = [p.register_post_accumulate_grad_hook(self._step) for p in trainable.values()]

    @torch.no_grad()
    def _step(self, p: torch.Tensor) -> None:
        if p in self.stepped:
            raise RuntimeError(f"{self.names[p]} got a second gradient in one backward: it is used twice, so its "
                               "optimizer step cannot run inside the backward (set OPTIMIZER_IN_BACKWARD=false)")
        self.stepped.add(p)
        norm = torch.linalg.vector_norm(p.grad, dtype=torch.float32)
        self.squares = norm.square() if self.squares is None else self.squares + norm.square()
        p.grad.mul_(torch.clamp(self.max_norm / (norm + 1e-6), max=1.0).to(p.grad.dtype))  # as clip_grad_norm_
        self.optimizer.step()  # steps p alone: every other tensor's gradient is None now
        p.grad = None

    def take_norm(self) -> float:
        """The norm of the step's whole gradient before clipping (a sync on a GPU); resets it."""
        norm = 0.0 if self.squares is None else math.sqrt(self.squares.item())
        self.squares, self.stepped = None, set()
        return norm

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
