"""The flow-matching objective and sampler the Wan2.1 / Matrix-Game models were trained with.

A clean latent x0 and Gaussian noise eps are joined on a straight line,
x_sigma = (1 - sigma) * x0 + sigma * eps, and the model predicts the velocity
v = eps - x0 at timestep t = 1000 * sigma. Sigmas come from a uniform grid on (0, 1]
pushed towards 1 by the timestep shift (shift 5 spends most steps at high noise, which is
what video models need). Sampling integrates dx/dsigma = v from sigma = 1 down to 0.
"""

import math

import torch

NUM_TRAIN_TIMESTEPS = 1000
DEFAULT_SHIFT = 5.0
SAMPLING_MODES = ("uniform", "logit_normal")


def shift_sigma(sigma, shift: float):
    """sigma -> shift*sigma / (1 + (shift - 1)*sigma); keeps 0 and 1 fixed."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def sigma_grid(num_steps: int, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """num_steps shifted sigmas from 1 down to (not including) 0, float64.

    linspace(1, 0, n + 1)[:-1] then shifted: with n = 1000 this is the training grid,
    with n = 50 the default sampling grid.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_sigma(torch.linspace(1.0, 0.0, num_steps + 1, dtype=torch.float64)[:-1], shift)


def sigma_to_timestep(sigma: torch.Tensor) -> torch.Tensor:
    return sigma * NUM_TRAIN_TIMESTEPS


def _check_bounds(min_sigma: float, max_sigma: float) -> None:
    if not 0.0 <= min_sigma < max_sigma <= 1.0:
        raise ValueError(f"need 0 <= MIN_SIGMA < MAX_SIGMA <= 1, got {min_sigma} and {max_sigma}")


def bounded_training_grid(shift: float, min_sigma: float = 0.0, max_sigma: float = 1.0) -> torch.Tensor:
    """The 1000-step training grid, restricted to [min_sigma, max_sigma]."""
    _check_bounds(min_sigma, max_sigma)
    grid = sigma_grid(NUM_TRAIN_TIMESTEPS, shift)
    grid = grid[(grid >= min_sigma) & (grid <= max_sigma)]
    if grid.numel() == 0:
        raise ValueError(f"no training sigma lies in [{min_sigma}, {max_sigma}] with shift {shift}")
    return grid


def sample_sigmas(
    batch_size: int,
    mode: str = "uniform",
    shift: float = DEFAULT_SHIFT,
    min_sigma: float = 0.0,
    max_sigma: float = 1.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One training sigma per sample, float32 on the CPU.

    uniform: uniform over the shifted 1000-step grid (how the base model was trained).
    logit_normal: sigmoid of a standard normal, shifted, then mapped linearly into
    [min_sigma, max_sigma] (rescaled rather than clamped, so no mass piles up at the bounds).
    """
    if mode == "uniform":
        grid = bounded_training_grid(shift, min_sigma, max_sigma)
        index = torch.randint(0, grid.numel(), (batch_size,), generator=generator)
        return grid[index].float()
    if mode == "logit_normal":
        normal = torch.randn(batch_size, generator=generator, dtype=torch.float64)
        return _logit_normal_sigma(normal, shift, min_sigma, max_sigma)
    raise ValueError(f"unknown timestep sampling {mode!r}; choose one of {SAMPLING_MODES}")


def _logit_normal_sigma(normal: torch.Tensor, shift: float, min_sigma: float, max_sigma: float) -> torch.Tensor:
    _check_bounds(min_sigma, max_sigma)
    return (min_sigma + (max_sigma - min_sigma) * shift_sigma(torch.sigmoid(normal), shift)).float()


def validation_sigmas(
    count: int,
    mode: str = "uniform",
    shift: float = DEFAULT_SHIFT,
    min_sigma: float = 0.0,
    max_sigma: float = 1.0,
) -> torch.Tensor:
    """count fixed sigmas at the quantiles (k + 0.5) / count of the training distribution,
    so that validation losses are comparable across epochs and runs."""
    quantiles = (torch.arange(count, dtype=torch.float64) + 0.5) / count
    if mode == "uniform":
        grid = bounded_training_grid(shift, min_sigma, max_sigma).flip(0)  # ascending
        index = (quantiles * grid.numel()).floor().long().clamp(max=grid.numel() - 1)
        return grid[index].float()
    if mode == "logit_normal":
        normal_quantiles = math.sqrt(2.0) * torch.erfinv(2 * quantiles - 1)
        return _logit_normal_sigma(normal_quantiles, shift, min_sigma, max_sigma)
    raise ValueError(f"unknown timestep sampling {mode!r}; choose one of {SAMPLING_MODES}")


def _per_sample(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sigma [B] shaped to broadcast over like, never rounded below float32."""
    dtype = torch.promote_types(like.dtype, torch.float32)
    return sigma.to(device=like.device, dtype=dtype).view(-1, *([1] * (like.dim() - 1)))


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_sigma = (1 - sigma) * x0 + sigma * noise, sigma per sample."""
    s = _per_sample(sigma, x0)
    return (1 - s) * x0 + s * noise


def velocity_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """d x_sigma / d sigma = noise - x0: what the model predicts."""
    return noise - x0


def flow_matching_losses(prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Per-sample mean squared error between predicted and true velocity, float32 [B]."""
    return ((prediction.float() - velocity_target(x0, noise).float()) ** 2).flatten(1).mean(dim=1)


def flow_matching_loss(prediction: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The training loss: the mean over all elements (samples have the same size)."""
    return flow_matching_losses(prediction, x0, noise).mean()


@torch.no_grad()
def euler_sample(velocity_fn, noise: torch.Tensor, num_steps: int = 50, shift: float = DEFAULT_SHIFT,
                 progress=None) -> torch.Tensor:
    """Integrate dx/dsigma = velocity_fn(x, timestep) from sigma = 1 to 0 with Euler steps
    on the shifted grid. velocity_fn gets x and the timestep tensor [B] (= 1000 * sigma)."""
    sigmas = torch.cat([sigma_grid(num_steps, shift), torch.zeros(1, dtype=torch.float64)])
    x = noise.float()
    steps = range(num_steps)
    for i in progress(steps) if progress is not None else steps:
        sigma, sigma_next = sigmas[i].item(), sigmas[i + 1].item()
        timestep = torch.full((x.shape[0],), sigma * NUM_TRAIN_TIMESTEPS, device=x.device, dtype=torch.float32)
        x = x + (sigma_next - sigma) * velocity_fn(x, timestep).float()
    return x
