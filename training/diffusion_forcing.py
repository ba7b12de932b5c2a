"""Stage A of distillation: diffusion forcing, which teaches the causal student to denoise
block by block (DISTILL_SPEC 1.2).

The student starts with the fine-tuned base model's weights in the block-causal
architecture. Each training clip gets one noise level per block of P latent frames,
drawn independently, so the student learns to denoise a block whatever the noise of the
blocks before it - from clean context (what a stream gives it) to pure noise. The loss
is the flow-matching velocity error per latent frame, weighted by a bell over the noise
levels and averaged.

Noise levels are indices j into the 1000-entry shifted training grid (index 0: sigma 1,
pure noise; index 999: sigma ~0.005), as the reference scheduler tables them.
"""

import torch

from generation.streaming import training_grid
from training.epochs import seeded_generator
from wan import flow
from wan.flow import NUM_TRAIN_TIMESTEPS

WEIGHTINGS = ("index", "timestep", "none")


def bell_weights(shift: float, by: str = "index") -> torch.Tensor:
    """The loss weight of each of the 1000 grid indices, float32 [1000], mean 1.

    A Gaussian bell exp(-2 ((x - 500) / 1000)^2), its minimum subtracted and rescaled to
    average 1. by="index" puts it on the grid index (FastVideo's trainer: peak 1.58 at
    index 500, 0 at index 0), by="timestep" on the shifted timestep 1000 sigma (the
    Self-Forcing scheduler: peak at t = 500, ~0 at pure noise); "none": all ones.
    """
    if by not in WEIGHTINGS:
        raise ValueError(f"unknown weighting {by!r}; choose one of {', '.join(WEIGHTINGS)}")
    if by == "none":
        return torch.ones(NUM_TRAIN_TIMESTEPS)
    if by == "index":
        x = torch.arange(NUM_TRAIN_TIMESTEPS, dtype=torch.float64)
    else:
        x = training_grid(shift)[1].double()
    y = torch.exp(-2 * ((x - NUM_TRAIN_TIMESTEPS / 2) / NUM_TRAIN_TIMESTEPS) ** 2)
    y = y - y.min()
    return (y * NUM_TRAIN_TIMESTEPS / y.sum()).float()


def index_bounds(min_sigma: float, max_sigma: float, shift: float) -> tuple[int, int]:
    """[lo, hi) of the grid indices whose sigma lies in [min_sigma, max_sigma] (the grid
    runs from sigma 1 down), checked to be non-empty."""
    sigmas = training_grid(shift)[0]
    inside = ((sigmas >= min_sigma) & (sigmas <= max_sigma)).nonzero().flatten()
    if inside.numel() == 0:
        raise ValueError(f"no training sigma lies in [{min_sigma}, {max_sigma}] with shift {shift}")
    return int(inside[0]), int(inside[-1]) + 1


def sample_block_levels(generator: torch.Generator, num_frames: int, frames_per_block: int, lo: int = 0,
                        hi: int = NUM_TRAIN_TIMESTEPS) -> torch.Tensor:
    """One grid index per block, uniform on [lo, hi), repeated over the block's frames: [F] int64."""
    if num_frames % frames_per_block:
        raise ValueError(f"{num_frames} latent frames are not whole blocks of {frames_per_block}")
    per_block = torch.randint(lo, hi, (num_frames // frames_per_block,), generator=generator)
    return per_block.repeat_interleave(frames_per_block)


def frame_losses(model, inputs: dict, levels: torch.Tensor, noise: torch.Tensor, shift: float,
                 autocast) -> torch.Tensor:
    """Per-frame velocity MSE [B, F] of the block-causal forward at per-frame grid indices
    levels [B, F] (inputs as training.flow_matching.model_inputs gives them)."""
    x0 = inputs["latents"]
    sigmas = training_grid(shift)[0].to(x0.device)[levels.to(x0.device)]  # [B, F]
    s = sigmas[:, None, :, None, None]
    noise = noise.to(x0.device)
    with autocast:
        prediction = model(((1 - s) * x0 + s * noise), flow.sigma_to_timestep(sigmas), inputs["visual_context"],
                           inputs["cond_concat"], keyboard_cond=inputs["keyboard"], mouse_cond=inputs["mouse"])
    error = (prediction.float() - flow.velocity_target(x0, noise).float()) ** 2  # [B, C, F, H, W]
    return error.mean(dim=(1, 3, 4))


def weighted_losses(losses: torch.Tensor, levels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Per-sample loss [B]: the frames' losses [B, F] weighted by their level's weight, averaged."""
    return (losses * weights.to(losses.device)[levels.to(losses.device)]).mean(dim=1)


def sample_draws(seed: int, position: int, latent_shape, frames_per_block: int, lo: int,
                 hi: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block levels [F] and noise [16, F, h, w] of the position-th training sample, from
    its own seeded generator (the same on any number of ranks and after a resume)."""
    g = seeded_generator(seed, "diffusion forcing", position)
    levels = sample_block_levels(g, latent_shape[1], frames_per_block, lo, hi)
    return levels, torch.randn(tuple(latent_shape), generator=g)


def mean_sigma(levels: torch.Tensor, shift: float) -> float:
    """The average sigma of a batch's levels (for metrics.csv)."""
    return training_grid(shift)[0][levels.cpu()].mean().item()


def micro_batch(model, inputs: dict, levels: torch.Tensor, noise: torch.Tensor, shift: float,
                weights: torch.Tensor, autocast, loss_scale: float) -> torch.Tensor:
    """Forward and backward of one micro-batch (the loss x loss_scale); returns the
    per-sample weighted losses [B]."""
    losses = weighted_losses(frame_losses(model, inputs, levels, noise, shift, autocast), levels, weights)
    (losses.sum() * loss_scale).backward()
    return losses.detach()
