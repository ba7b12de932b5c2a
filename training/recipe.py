"""One fine-tuning step as a handful of calls: what the training loop runs, and what the
planner (planning/) runs on fake tensors to predict its GPU memory - so the plan and the
run cannot drift apart.

How a change plugs in:
- a new TRAINING_STRATEGY that prepare_trainable knows: nothing to do here;
- another optimizer (8-bit AdamW, ...): override make_optimizer;
- the optimizer step fused into the backward (a step per parameter as its gradient is
  ready): override micro_batch, clip_gradients and optimizer_step;
- CPU offload: keep host-side tensors on the `host` device make_optimizer and make_ema are
  given (the planner passes the meta device, so that they are not counted as GPU memory).
"""

import torch
from torch.distributed.tensor import DTensor

from training.ema import EMA
from training.flow_matching import flow_matching_step, prepare_trainable
from training.optim import build_adamw


class TrainingRecipe:
    """One rank's training step: prepare, make_optimizer, make_ema, micro_batch,
    clip_gradients, optimizer_step."""

    def prepare(self, model, settings: dict) -> dict:
        """Freeze by strategy; float32 masters of the trained tensors. Returns {name: parameter}."""
        return prepare_trainable(model, settings["TRAINING_STRATEGY"], settings["LAST_LAYERS"])

    def make_optimizer(self, trainable: dict, settings: dict, device: torch.device, host: torch.device,
                       imitating_cuda: bool = False):
        """AdamW in its two weight-decay groups; fused on CUDA (the planner's imitation of a
        GPU asks for the same fused kernel on the CPU)."""
        return build_adamw(trainable, settings["LEARNING_RATE"], settings["WEIGHT_DECAY"],
                           torch.device("cuda") if imitating_cuda else device)

    def make_ema(self, trainable: dict, settings: dict, host: torch.device):
        return EMA(trainable, settings["EMA_DECAY"], settings["EMA_WARMUP"]) if settings["EMA_DECAY"] > 0 else None

    def micro_batch(self, model, inputs: dict, sigma, noise, autocast, loss_scale: float) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the per-sample losses [B]."""
        losses = flow_matching_step(model, inputs, sigma, noise, autocast)
        (losses.sum() * loss_scale).backward()
        return losses

    def clip_gradients(self, trainable: dict, settings: dict) -> float:
        """Clip the step's gradients to MAX_GRAD_NORM; returns their norm before clipping
        (a synchronisation on a GPU: the loop checks it is finite before stepping)."""
        norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), settings["MAX_GRAD_NORM"])
        return (norm.full_tensor() if isinstance(norm, DTensor) else norm).item()

    def optimizer_step(self, optimizer, ema, trainable: dict, updates_done: int) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(trainable, updates_done)

    def optimizer_tensors(self, optimizer, ema) -> list:
        """The tensors the optimizer (and EMA) keep between steps."""
        state = [t for per_param in optimizer.state.values() for t in per_param.values() if torch.is_tensor(t)]
        return state + (list(ema.shadow.values()) if ema is not None else [])
