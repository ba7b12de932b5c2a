"""Fine-tuning with the base model's own objective: flow matching on cached latents, the
trainable tensors of a strategy, and validation with the action gain."""

import math

import torch
import torch.distributed as dist

from generation.previews import other_clip_index
from runs.errors import TrainingError
from wan import flow
from wan.lora import LoRAConfig, add_lora
from wan.model import WanModel, apply_training_strategy


def prepare_trainable(model: WanModel, strategy: str, last_layers: int, lora: LoRAConfig | None = None,
                      lora_head: bool = False, seed: int = 0) -> dict:
    """Freeze what the strategy does not train; keep float32 master copies of what it does
    (the frozen weights stay in the loaded dtype; autocast runs the matmuls in bf16).
    "lora" first puts the adapters `lora` describes on the model (float32 already, drawn from seed)."""
    if strategy == "lora":
        if lora is None:
            raise ValueError("strategy 'lora' needs its LoRAConfig (rank, alpha, targets)")
        add_lora(model, lora, seed)
    names = apply_training_strategy(model, strategy, last_layers, lora_head)
    params = dict(model.named_parameters())
    for name in names:
        params[name].data = params[name].data.float()
    return {name: params[name] for name in names}


def batch_from_random_inputs(made: dict) -> dict:
    """wan.model.random_inputs()'s keyword inputs of the model, named as a training batch
    (the cache's Dataset names, which model_inputs reads): for tests, benchmarks and the planner."""
    return {"latents": made["x"], "cond_concat": made["cond_concat"], "visual_context": made["visual_context"],
            "keyboard": made["keyboard_cond"], "mouse": made["mouse_cond"]}


def model_inputs(batch: dict, device: torch.device) -> dict:
    return {name: batch[name].to(device, non_blocking=True)
            for name in ("latents", "cond_concat", "visual_context", "keyboard", "mouse")}


def noised_inputs(batch: dict, device: torch.device) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(model inputs, sigma, noise) of a training batch whose items carry their noise
    (training.epochs.NoisedClips), on the device; copied without waiting (the DataLoader
    pins them on a GPU run)."""
    return (model_inputs(batch, device), batch["sigma"].to(device, non_blocking=True),
            batch["noise"].to(device, non_blocking=True))


def flow_matching_step(model, inputs: dict, sigma: torch.Tensor, noise: torch.Tensor, autocast,
                       keyboard=None, mouse=None) -> torch.Tensor:
    """Per-sample flow-matching loss [B] of one forward pass (actions may be swapped in)."""
    x0 = inputs["latents"]
    noise, sigma = noise.to(x0.device), sigma.to(x0.device)
    with autocast:
        prediction = model(flow.add_noise(x0, noise, sigma), flow.sigma_to_timestep(sigma),
                           inputs["visual_context"], inputs["cond_concat"],
                           keyboard_cond=inputs["keyboard"] if keyboard is None else keyboard,
                           mouse_cond=inputs["mouse"] if mouse is None else mouse)
    return flow.flow_matching_losses(prediction, x0, noise)


@torch.no_grad()
def validate(model, val_set, sigmas: torch.Tensor, seed: int, device, autocast, rank: int = 0,
             world: int = 1) -> dict:
    """Validation loss with the true actions and with actions shuffled across clips.

    Every clip is scored at the same fixed sigmas with the same noise every time (seeded by
    its index), so numbers are comparable across epochs and numbers of ranks. The action
    gain is shuffled / true: above 1 means the model's predictions depend on the actions.
    With several ranks each scores every world-th clip; ranks with one clip fewer run a
    weightless pass so that all make the same calls (FSDP needs every rank in every forward).
    """
    model.eval()
    n = len(val_set)
    other = [other_clip_index(i, n) for i in range(n)]  # half the set away (see there why)
    sums = torch.zeros(3, len(sigmas), dtype=torch.float64)  # true, shuffled, count
    for k in range(math.ceil(n / world)):
        index = k * world + rank
        weight = 1.0 if index < n else 0.0
        item = val_set[min(index, n - 1)]
        inputs = model_inputs({name: value[None] if torch.is_tensor(value) else value
                               for name, value in item.items()}, device)
        swap = val_set.clips[other[min(index, n - 1)]]
        for j, sigma in enumerate(sigmas):
            g = torch.Generator().manual_seed(seed * 1000003 + min(index, n - 1) * 101 + j)
            noise = torch.randn(inputs["latents"].shape, generator=g)
            sums[0, j] += weight * flow_matching_step(model, inputs, sigma[None], noise, autocast).item()
            sums[2, j] += weight
            if n > 1:
                sums[1, j] += weight * flow_matching_step(
                    model, inputs, sigma[None], noise, autocast, keyboard=swap.keyboard[None].to(device),
                    mouse=swap.mouse[None].to(device)).item()
    if world > 1:
        dist.all_reduce(sums)
    model.train()
    loss = (sums[0].sum() / sums[2].sum()).item()
    if not math.isfinite(loss):
        raise TrainingError(f"the validation loss became {loss}: the weights have diverged. Training stopped; "
                            "the files from the last save remain valid. Try a lower LEARNING_RATE.")
    result = {"val_loss": loss, "val_loss_per_sigma": (sums[0] / sums[2]).tolist()}
    if n > 1:
        shuffled_loss = (sums[1].sum() / sums[2].sum()).item()
        result.update(val_loss_shuffled=shuffled_loss, action_gain=shuffled_loss / loss)
    return result
