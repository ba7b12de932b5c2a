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
  per trained number instead of 8), the second moment on a map without zero (see
  adamw_8bit_class);
- OffloadedOptimizer: the optimizer state, and the float32 copy of the trained tensors it
  steps, in host memory; each step copies the gradients out and the new weights back;
- StepInBackward: each tensor's optimizer step as soon as its gradient is complete, so the
  whole model's gradients never exist at once.

Resuming: load_named_state puts a saved state (by parameter name) into any of them without
stepping the optimizer, so a resumed run continues exactly where the saved one stopped.
"""

from contextlib import nullcontext

import torch
from torch.utils._python_dispatch import _disable_current_modes

from runs.errors import TrainingError

BETAS = (0.9, 0.999)
OPTIMIZERS = ("adamw", "adamw_8bit")
# Numbers per scale of the 8-bit moments (torchao's default is 256). Smaller blocks round less:
# after 50 steps on the savers test's model the largest distance to float32 AdamW was 0.118
# of the way travelled at 256, 0.082 at 128 and at 64. A block's float32 scale costs 1/32
# byte per number per moment at 128.
EIGHT_BIT_BLOCK = 128


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


def zero_free_map(qmap: tuple) -> tuple:
    """An unsigned 8-bit quantisation map whose lowest code stands for half its next value
    instead of zero.

    AdamW divides by the square root of the second moment. With block-wise scaling, a
    second moment under half the map's smallest step (3.3e-7 of its block's largest, i.e. a
    gradient 4e-4 times the block's largest) is stored as zero; the next step then divides
    by the root of one step's share of g^2 alone, and the weight moves many times the
    learning rate in one step - the "zero-point problem" of quantised second moments (Li,
    Chen and Zhu, "Memory Efficient Optimizers with 4-bit States", NeurIPS 2023, who exclude
    zero from the second moment's map). Without zero a tiny second moment is over-estimated,
    which only shortens that weight's step (tests/test_savers.py and bench/bench_savers.py
    --eight-bit measure both maps). The map is a tuple of floats, so that the planner's fake
    tensors can take it without reading tensor data.
    """
    if not (qmap[0] == 0 and qmap[1] > 0):
        raise ValueError("expects torchao's unsigned dynamic map (0 first, ascending)")
    return (qmap[1] / 2, *qmap[1:])


def adamw_8bit_class():
    """torchao's AdamW8bit, made to take the schedule's float learning rates, to run eagerly
    off CUDA, and to keep its second moments on zero_free_map (imported on first use:
    torchao is only needed for OPTIMIZER="adamw_8bit")."""
    from torchao.optim import AdamW8bit as TorchaoAdamW8bit
    from torchao.optim.subclass_8bit import OptimState8bit, get_qmap_signed, get_qmap_unsigned

    # torchao computes its maps with torch ops on first use and keeps them: compute them for
    # real here, also when the planner builds the optimizer on fake tensors (whose data reads
    # are made-up zeros, which would otherwise be kept as the maps for the rest of the process).
    with _disable_current_modes():
        get_qmap_signed()
        second_moment_map = zero_free_map(get_qmap_unsigned())

    class AdamW8bit(TorchaoAdamW8bit):
        """Its update is torch.compile'd on CUDA (as torchao runs it) and eager elsewhere:
        compiling needs a C++ toolchain on a CPU, and the planner's fake tensors run eagerly."""

        @staticmethod
        def _subclass_zeros(p: torch.Tensor, signed: bool, block_size: int):
            state = OptimState8bit.zeros(p.shape, signed, block_size, p.device, dtype=p.dtype)
            if not signed:  # the second moment (the first is signed: zero there only shortens a step)
                state.qmap = torch.tensor(second_moment_map, dtype=torch.float32, device=p.device)
            return state

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
        return adamw_8bit_class()(groups, lr=lr, betas=tuple(betas), block_size=EIGHT_BIT_BLOCK)
    raise ValueError(f"OPTIMIZER={kind!r}: choose one of {', '.join(OPTIMIZERS)}")


class OffloadedOptimizer(torch.optim.Optimizer):
    """An optimizer whose state - and a float32 copy of the trained tensors, which it steps -
    lives on `host`. step() copies the gradients there, steps, and copies the new weights
    back into the model's tensors.

    Its param_groups hold the model's own tensors (the learning rate is set on them), and
    state_dict() is the inner optimizer's, in the same order: torch.distributed.checkpoint
    names it by the model's parameters, so a saved state is the same whether or not the
    optimizer was offloaded.

    The host copies are the weights the next step starts from: load_state_dict() takes them
    afresh from the model's tensors, so load those first (restore() does). Never load it
    through torch.distributed.checkpoint's set_optimizer_state_dict: that steps an optimizer
    without state once to create it, which here would copy the host copies over the model
    (load_named_state does not step).
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
        with_grad = [p for p in self.copies if p.grad is not None]
        if not with_grad:  # nothing to step (torch's AdamW does nothing too); foreach ops refuse empty lists
            return None
        # every gradient to the host in one batch of copies that do not wait, then one wait
        # for all of them (the host steps on them next): one sync per step, not one per tensor
        torch._foreach_copy_([self.host_grads[p] for p in with_grad], [p.grad for p in with_grad], non_blocking=True)
        devices = {p.grad.device for p in with_grad if p.grad.device.type == "cuda"}
        for device in devices:
            torch.cuda.current_stream(device).synchronize()
        for p, copy in self.copies.items():
            copy.grad = self.host_grads[p] if p.grad is not None else None
        self.inner.step()
        for p, copy in self.copies.items():
            if copy.grad is not None:
                p.copy_(copy, non_blocking=True)  # from pinned memory: ordered before the next use of p
                copy.grad = None

    def state_dict(self):
        return self.inner.state_dict()

    @torch.no_grad()
    def load_state_dict(self, state_dict):
        self.inner.load_state_dict(state_dict)
        self.state = self.inner.state
        for p, copy in self.copies.items():
            copy.copy_(p.detach())


def load_named_state(optimizer, names: dict, saved: dict) -> None:
    """Load an optimizer state saved by parameter name (torch.distributed.checkpoint's full
    state dict: {"state": {name: {...}}, "param_groups": [{..., "params": [name, ...]}]})
    into an unsharded optimizer, without stepping it. names: parameter -> its name.

    Saved groups must list the same tensors in the same order as the optimizer's (a resumed
    run checks its trained tensors first); a tensor that never had a gradient has no state
    and is left without one.
    """
    saved_groups = saved["param_groups"]
    if len(saved_groups) != len(optimizer.param_groups):
        raise TrainingError(f"the saved optimizer state has {len(saved_groups)} parameter group(s), this run's "
                            f"optimizer {len(optimizer.param_groups)}: it is not this run's state")
    state, groups, position = {}, [], 0
    for number, (group, saved_group) in enumerate(zip(optimizer.param_groups, saved_groups)):
        ours = [names[p] for p in group["params"]]
        if ours != list(saved_group["params"]):
            raise TrainingError(f"the saved optimizer state's group {number} holds other tensors than this run's "
                                f"({len(saved_group['params'])} saved, {len(ours)} here): it is not this run's state")
        for name in ours:
            if name in saved["state"]:
                state[position] = saved["state"][name]
            position += 1
        groups.append({**saved_group, "params": list(range(position - len(ours), position))})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


@torch.no_grad()
def step_tensor(optimizer, p: torch.Tensor, group_index: int) -> None:
    """optimizer.step() for p alone, in the time of one tensor's step: torch's and torchao's
    optimizers walk every tensor of their groups, so the groups are narrowed to p for the call."""
    kept = [group["params"] for group in optimizer.param_groups]
    for index, group in enumerate(optimizer.param_groups):
        group["params"] = [p] if index == group_index else []
    try:
        optimizer.step()
    finally:
        for group, params in zip(optimizer.param_groups, kept):
            group["params"] = params


class StepInBackward:
    """Each trained tensor's optimizer step as soon as its gradient is complete (a hook after
    gradient accumulation), then the gradient is dropped: the model's whole gradient never
    exists at once. One optimizer step per backward, so no gradient accumulation.

    Clipping is global, as clip_grad_norm_ does it, which needs the whole gradient's norm
    before the first tensor steps. So backward() runs the backward twice over the same graph:
    the first pass only sums each tensor's squared norm as its gradient arrives and drops the
    gradient; the second clips every gradient by the coefficient of the whole norm and steps
    its tensor. No gradient is kept longer than its hook, so the memory stays that of one
    backward; the cost is a second backward (bench/bench_savers.py --time measures it).

    A tensor's hook runs once its last use in the backward is done (every weight of this
    model is used once per forward), so stepping it cannot change what the rest of the
    backward computes; a gradient that arrives twice in one pass is an error.
    """

    def __init__(self, optimizer, trainable: dict, max_norm: float):
        self.optimizer, self.max_norm = optimizer, max_norm
        self.names = {p: name for name, p in trainable.items()}
        self.group_of = {p: index for index, group in enumerate(optimizer.param_groups) for p in group["params"]}
        self.pass_kind, self.coefficient, self.norm = None, None, None
        self.norms, self.seen = [], set()
        self.handles = [p.register_post_accumulate_grad_hook(self._on_gradient) for p in trainable.values()]

    def backward(self, loss: torch.Tensor) -> None:
        """The micro-batch's backward: the measuring pass, then the stepping pass."""
        self._begin("measure")
        loss.backward(retain_graph=True)
        self.norm = (torch.linalg.vector_norm(torch.stack(self.norms)) if self.norms
                     else torch.zeros((), device=loss.device))
        self.coefficient = torch.clamp(self.max_norm / (self.norm + 1e-6), max=1.0)  # as clip_grad_norm_
        self._begin("step")
        try:
            loss.backward()
        finally:
            self.pass_kind = None

    def _begin(self, kind: str) -> None:
        self.pass_kind, self.seen = kind, set()
        if kind == "measure":
            self.norms = []

    @torch.no_grad()
    def _on_gradient(self, p: torch.Tensor) -> None:
        if self.pass_kind is None:
            raise RuntimeError(f"{self.names[p]} got a gradient outside StepInBackward.backward(): with "
                               "OPTIMIZER_IN_BACKWARD the backward must run through the recipe's micro_batch")
        if p in self.seen:
            raise RuntimeError(f"{self.names[p]} got a second gradient in one backward: it is used twice, so its "
                               "optimizer step cannot run inside the backward (set OPTIMIZER_IN_BACKWARD=false)")
        self.seen.add(p)
        if self.pass_kind == "measure":
            self.norms.append(torch.linalg.vector_norm(p.grad, dtype=torch.float32))
        else:
            p.grad.mul_(self.coefficient.to(p.grad.device, p.grad.dtype))
            step_tensor(self.optimizer, p, self.group_of[p])
        p.grad = None

    def take_norm(self) -> float:
        """The norm of the step's whole gradient before clipping (a sync on a GPU); resets it."""
        return self.take_norm_tensor().item()

    def take_norm_tensor(self) -> torch.Tensor:
        """take_norm, left on the device (no sync)."""
        norm = torch.zeros(()) if self.norm is None else self.norm.detach()
        self.norm = None
        return norm

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
