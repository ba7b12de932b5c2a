"""The training step the planner runs: the trainer's own calls, gathered where they can be extended.

The planner never re-derives what a step holds: it runs these calls on fake tensors and
counts. TrainingRecipe's defaults are what finetune_base_model.train() does on one GPU.
How a change plugs in:

- a new TRAINING_STRATEGY (e.g. LoRA) that prepare_trainable knows: nothing to do here;
- another optimizer (8-bit AdamW, ...): override make_optimizer;
- a fused backward optimizer step (optimizer.step per parameter in a post-accumulate-grad
  hook): override micro_batch and optimizer_step;
- CPU offload: keep host-side tensors on the `host` device make_optimizer and make_ema are
  given (the planner passes the meta device, so that they are not counted as GPU memory),
  and override what moves them.

Pass the recipe to plan_training(settings, recipe=...). The trainer should build its step
through the same recipe, so that the plan and the run cannot drift apart.
"""

import torch


# The scripts' code the planner runs. Imported late: the scripts import this package for
# --plan. (These move into packages - training/ for prepare_trainable, flow_matching_step
# and EMA - and these three functions are then the only places to repoint.)

def trainer():
    import finetune_base_model

    return finetune_base_model


def cache_builder():
    import latent_cache

    return latent_cache


def previewer():
    import generate_preview

    return generate_preview


class TrainingRecipe:
    """One rank's training step as calls: prepare, make_optimizer, make_ema, micro_batch,
    optimizer_step (see the module docstring for how to extend it)."""

    def prepare(self, model, settings: dict) -> dict:
        """Freeze by strategy; float32 masters of the trained tensors. Returns {name: parameter}."""
        return trainer().prepare_trainable(model, settings["TRAINING_STRATEGY"], settings["LAST_LAYERS"])

    def make_optimizer(self, trainable: dict, settings: dict, device: torch.device, host: torch.device,
                       imitating_cuda: bool = False):
        # fused on CUDA as in train(); the imitation runs the same fused kernel on the CPU
        return torch.optim.AdamW(list(trainable.values()), lr=settings["LEARNING_RATE"],
                                 weight_decay=settings["WEIGHT_DECAY"], betas=(0.9, 0.999),
                                 fused=imitating_cuda or device.type == "cuda")

    def make_ema(self, trainable: dict, settings: dict, host: torch.device):
        return trainer().EMA(trainable, settings["EMA_DECAY"]) if settings["EMA_DECAY"] > 0 else None

    def micro_batch(self, model, inputs: dict, sigma, noise, autocast, loss_scale: float) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the per-sample losses."""
        losses = trainer().flow_matching_step(model, inputs, sigma, noise, autocast)
        (losses.sum() * loss_scale).backward()
        return losses

    def optimizer_step(self, trainable: dict, optimizer, ema, settings: dict) -> None:
        grad_norm = torch.nn.utils.clip_grad_norm_(list(trainable.values()), settings["MAX_GRAD_NORM"])
        grad_norm.item()  # the trainer reads it (a synchronisation on a GPU)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(trainable)

    def optimizer_tensors(self, optimizer, ema) -> list:
        """The tensors the optimizer (and EMA) keep between steps."""
        state = [t for per_param in optimizer.state.values() for t in per_param.values() if torch.is_tensor(t)]
        return state + (list(ema.shadow.values()) if ema is not None else [])
