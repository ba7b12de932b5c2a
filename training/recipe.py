"""One fine-tuning step as a handful of calls: what the training loop runs, and what the
planner (planning/) runs on fake tensors to predict its GPU memory - so the plan and the
run cannot drift apart.

How a change plugs in:
- a new TRAINING_STRATEGY that prepare_trainable knows: nothing to do here;
- another optimizer: override make_optimizer (and optimizer_state / load_optimizer_state
  if its state is not a torch optimizer's);
- the optimizer step fused into the backward (a step per parameter as its gradient is
  ready): make_optimizer registers the hooks, micro_batch runs the backward through them
  (twice: the first pass measures the whole gradient's norm, for global clipping),
  clip_gradients and optimizer_step only report and average (Savers.in_backward below);
- CPU offload: keep host-side tensors on the `host` device prepare, make_optimizer and
  make_ema are given (the planner passes the meta device, so that they are not counted as
  GPU memory).
"""

import importlib.util
from dataclasses import dataclass

import torch
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_optimizer_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

from training.ema import EMA
from training.flow_matching import flow_matching_step, prepare_trainable
from training.offload import FrozenBlocksOffload
from training.optim import (BETAS, OPTIMIZERS, OffloadedOptimizer, StepInBackward, build_optimizer,
                            load_named_state, parameter_groups)
from wan.lora import LoRAConfig


@dataclass(frozen=True)
class Savers:
    """The memory savers a run uses (settings OPTIMIZER, OPTIMIZER_IN_BACKWARD,
    OFFLOAD_OPTIMIZER, OFFLOAD_FROZEN; a trainer without them gets plain AdamW)."""

    optimizer: str = "adamw"
    in_backward: bool = False
    offload_optimizer: bool = False
    offload_frozen: bool = False

    @classmethod
    def of(cls, settings: dict) -> "Savers":
        return cls(settings.get("OPTIMIZER", "adamw"), settings.get("OPTIMIZER_IN_BACKWARD", False),
                   settings.get("OFFLOAD_OPTIMIZER", False), settings.get("OFFLOAD_FROZEN", False))

    def problems(self, settings: dict, world: int = 1, sharded: bool = False) -> list[str]:
        """What these savers cannot be combined with, each named with its way out."""
        found = []
        if self.optimizer not in OPTIMIZERS:
            found.append(f"OPTIMIZER={self.optimizer!r}: choose one of {', '.join(OPTIMIZERS)}")
        elif self.optimizer == "adamw_8bit" and not installed("torchao"):
            found.append("OPTIMIZER=adamw_8bit is torchao's 8-bit AdamW, and torchao is not installed: pip install "
                         "torchao (or OPTIMIZER=adamw)")
        if self.in_backward and settings["GRAD_ACCUM_STEPS"] != 1:
            found.append(f"OPTIMIZER_IN_BACKWARD steps each tensor as its gradient is ready, so there is no "
                         f"gradient to accumulate: set GRAD_ACCUM_STEPS=1 (now {settings['GRAD_ACCUM_STEPS']}) and "
                         "make the batch with BATCH_SIZE")
        if self.in_backward and self.offload_optimizer:
            found.append("OPTIMIZER_IN_BACKWARD and OFFLOAD_OPTIMIZER: choose one (the offloaded step copies "
                         "every gradient to the host at once)")
        if self.in_backward and world > 1:
            found.append(f"OPTIMIZER_IN_BACKWARD runs on one GPU only ({world} ranks here): the step would run "
                         "before the gradients are averaged over the GPUs. Several GPUs shard the optimizer "
                         "with FSDP instead")
        if sharded and (self.offload_optimizer or self.offload_frozen or self.optimizer != "adamw"):
            found.append("FSDP (several GPUs with TRAINING_STRATEGY=full or SHARD_MODEL) shards the weights and "
                         "the optimizer state already: use OPTIMIZER=adamw without OFFLOAD_OPTIMIZER or "
                         "OFFLOAD_FROZEN there")
        if self.offload_frozen and not settings["GRADIENT_CHECKPOINTING"]:
            found.append("OFFLOAD_FROZEN needs GRADIENT_CHECKPOINTING=true: without it the backward keeps every "
                         "block's weights on the GPU")
        if self.offload_frozen and settings["TRAINING_STRATEGY"] == "full":
            found.append("OFFLOAD_FROZEN with TRAINING_STRATEGY=full: nothing is frozen")
        return found


def installed(package: str) -> bool:
    """Whether `import package` would find it (without importing it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):  # a parent that is no package; a module without a spec
        return False


def lora_config(settings: dict) -> LoRAConfig | None:
    """The adapters of a "lora" run (None for the other strategies)."""
    if settings["TRAINING_STRATEGY"] != "lora":
        return None
    return LoRAConfig(settings["LORA_RANK"], float(settings["LORA_ALPHA"]), tuple(settings["LORA_TARGETS"]),
                      settings["LORA_DROPOUT"])


class TrainingRecipe:
    """One rank's training step: prepare, offload, make_optimizer, make_ema, micro_batch,
    clip_gradients, optimizer_step; and the optimizer's state for saving and resuming."""

    def prepare(self, model, settings: dict) -> dict:
        """Freeze by strategy (with LoRA adapters for "lora"); float32 masters of the trained
        tensors. Returns {name: parameter}."""
        return prepare_trainable(model, settings["TRAINING_STRATEGY"], settings["LAST_LAYERS"],
                                 lora_config(settings), settings.get("LORA_HEAD", False), settings.get("SEED", 0))

    def offload(self, model, settings: dict, host: torch.device) -> FrozenBlocksOffload | None:
        """OFFLOAD_FROZEN: the blocks' frozen weights to the host (after any DDP wrapping)."""
        return FrozenBlocksOffload(model, host) if Savers.of(settings).offload_frozen else None

    def make_optimizer(self, trainable: dict, settings: dict, device: torch.device, host: torch.device,
                       imitating_cuda: bool = False):
        """AdamW (or 8-bit AdamW) in its two weight-decay groups; fused on CUDA (the planner's
        imitation of a GPU asks for the same fused kernel on the CPU). OFFLOAD_OPTIMIZER:
        stepped on the host; OPTIMIZER_IN_BACKWARD: stepped by hooks in the backward (the
        optimizer's `in_backward` holds them)."""
        savers = Savers.of(settings)
        kernel_device = torch.device("cuda") if imitating_cuda else device  # fused AdamW, also on the host
        lr, groups = settings["LEARNING_RATE"], parameter_groups(trainable, settings["WEIGHT_DECAY"])
        betas = settings.get("ADAM_BETAS", BETAS)  # distillation sets its own
        if savers.offload_optimizer:
            # the host's fused AdamW when training on CUDA (not on the planner's meta host)
            host_kernel = host if host.type == "meta" else kernel_device
            return OffloadedOptimizer(groups, lambda on_host: build_optimizer(on_host, savers.optimizer, lr,
                                                                             host_kernel, betas),
                                      host, pin=device.type == "cuda")
        optimizer = build_optimizer(groups, savers.optimizer, lr, kernel_device, betas)
        if savers.in_backward:
            optimizer.in_backward = StepInBackward(optimizer, trainable, settings["MAX_GRAD_NORM"])
        return optimizer

    def make_ema(self, trainable: dict, settings: dict, host: torch.device):
        """EMA_DECAY > 0: the average, on the host with OFFLOAD_OPTIMIZER (it is optimizer-like state)."""
        if settings["EMA_DECAY"] <= 0:
            return None
        return EMA(trainable, settings["EMA_DECAY"], settings["EMA_WARMUP"],
                   device=host if Savers.of(settings).offload_optimizer else None)

    def micro_batch(self, model, optimizer, inputs: dict, sigma, noise, autocast, loss_scale: float) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the per-sample losses [B]. With
        OPTIMIZER_IN_BACKWARD the backward steps the optimizer (so it needs the optimizer)."""
        losses = flow_matching_step(model, inputs, sigma, noise, autocast)
        loss = losses.sum() * loss_scale
        if hasattr(optimizer, "in_backward"):
            optimizer.in_backward.backward(loss)
        else:
            loss.backward()
        return losses

    def clip_gradients(self, optimizer, trainable: dict, settings: dict) -> float:
        """Clip the step's gradients to MAX_GRAD_NORM; returns their norm before clipping
        (a synchronisation on a GPU: the loop checks it is finite before stepping). In the
        backward: every tensor was clipped and stepped already; returns the whole gradient's
        norm (a non-finite one has been applied in memory, and the run stops before saving it)."""
        return self.clip_gradients_on_device(optimizer, trainable, settings).item()

    def clip_gradients_on_device(self, optimizer, trainable: dict, settings: dict) -> torch.Tensor:
        """clip_gradients, the norm left on the device (0-d, no synchronisation): for a loop
        that reads it later (training/step_log.py)."""
        if hasattr(optimizer, "in_backward"):
            return optimizer.in_backward.take_norm_tensor()
        norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), settings["MAX_GRAD_NORM"])
        return (norm.full_tensor() if isinstance(norm, DTensor) else norm).detach()

    def optimizer_step(self, optimizer, ema, trainable: dict, updates_done: int) -> None:
        if not hasattr(optimizer, "in_backward"):  # else every tensor has stepped in the backward
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(trainable, updates_done)

    def optimizer_tensors(self, optimizer, ema) -> list:
        """The tensors the optimizer (and EMA) keep between steps."""
        state = [t for per_param in optimizer.state.values() for t in per_param.values() if torch.is_tensor(t)]
        return state + (list(ema.shadow.values()) if ema is not None else [])

    def optimizer_state(self, model, optimizer) -> dict:
        """Whole tensors named by parameter (FSDP shards gathered; every rank must call)."""
        return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True,
                                                                                   cpu_offload=True))

    def load_optimizer_state(self, model, optimizer, state: dict) -> None:
        """A state from optimizer_state() into this run's optimizer, never stepping it: load the
        trained tensors first (the offloaded optimizer takes its host copies from them). FSDP's
        sharded tensors go through torch.distributed.checkpoint (plain AdamW only there: its
        state-creating step runs at learning rate 0 and changes nothing)."""
        if any(isinstance(p, DTensor) for p in model.parameters()):
            # strict=False: the action modules' norm weights are never used, so never get a state
            set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True,
                                                                                       strict=False))
        else:
            load_named_state(optimizer, {p: name for name, p in model.named_parameters()}, state)
