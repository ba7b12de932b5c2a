"""Stage B of distillation: distribution matching (DMD) with Self-Forcing rollouts
(DISTILL_SPEC 2.2-2.6).

Three models: the student streams videos (training/rollout.py); the teacher - the frozen
fine-tuned base model - says where such a video should go to look like the game; the
critic - a trainable copy of the base model - learns, by plain flow matching on the
student's own videos, what the student currently makes. Both denoise the student's video
at a random noise level; the difference of their clean estimates, x0_critic - x0_teacher,
is the gradient of the divergence between the student's and the teacher's distributions
(DMD), normalised per sample by the mean distance between the video and the teacher's
estimate. The student steps against it every few iterations; the critic steps every
iteration, so that it keeps up with the student.

Matrix-Game has no unconditional branch (no text, no negative prompt): the teacher's
"guided" estimate equals its conditional one for any guidance scale, so no guidance
pass is run.
"""

from dataclasses import dataclass

import torch

from generation.streaming import x0_from_velocity
from training.rollout import Conditions, FewStepSchedule, SampleNoise, backward_with_replays, rollout
from wan import flow
from wan.flow import NUM_TRAIN_TIMESTEPS
from wan.shapes import LATENT_CHANNELS

NORMALISER_FLOOR = 1e-6  # the per-sample mean distance is never below this (a video equal to the teacher's estimate)


def score_sigmas(noise: SampleNoise, shift: float, min_timestep: float, max_timestep: float) -> torch.Tensor:
    """The noise level at which teacher and critic judge each sample, [B] float32 on the CPU:
    u uniform on {0, ..., 999}, t = 1000 shift(u / 1000), clamped to [min_timestep,
    max_timestep] (DISTILL_SPEC 2.2); sigma = t / 1000. The timestep the models are told is
    exactly 1000 sigma (not the nearest grid point the reference rounds to)."""
    u = noise.randint(0, NUM_TRAIN_TIMESTEPS).double() / NUM_TRAIN_TIMESTEPS
    t = (flow.shift_sigma(u, shift) * NUM_TRAIN_TIMESTEPS).clamp(min_timestep, max_timestep)
    return (t / NUM_TRAIN_TIMESTEPS).float()


def denoise(model, x_t: torch.Tensor, sigma: torch.Tensor, conditions: dict, autocast) -> torch.Tensor:
    """A bidirectional model's clean estimate of x_t at noise level sigma [B], float32."""
    with autocast:
        velocity = model(x_t, flow.sigma_to_timestep(sigma.to(x_t.device)), **conditions)
    return x0_from_velocity(x_t, velocity.float(), sigma.to(x_t.device))


def per_sample_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[B, C, F, H, W] -> [B]: the mean over every element, or over the frames mask [B, F] keeps."""
    if mask is None:
        return values.flatten(1).mean(dim=1)
    weights = mask.to(values)[:, None, :, None, None].expand_as(values)
    return (values * weights).flatten(1).sum(dim=1) / weights.flatten(1).sum(dim=1).clamp(min=1)


def dmd_direction(x_gen: torch.Tensor, x0_teacher: torch.Tensor, x0_critic: torch.Tensor,
                  mask: torch.Tensor | None = None) -> torch.Tensor:
    """The DMD gradient (x0_critic - x0_teacher) / D per element, D = each sample's mean
    |x_gen - x0_teacher| (over the masked frames), floored; NaN/inf become 0."""
    distance = per_sample_mean((x_gen.detach() - x0_teacher).abs(), mask).clamp(min=NORMALISER_FLOOR)
    return torch.nan_to_num((x0_critic - x0_teacher) / distance.view(-1, 1, 1, 1, 1))


def dmd_losses(x_gen: torch.Tensor, direction: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample surrogate loss [B] whose gradient with respect to x_gen is direction / n
    (n: the elements averaged over): half the squared distance to the detached target
    x_gen - direction."""
    target = (x_gen - direction).detach()
    return 0.5 * per_sample_mean((x_gen.float() - target.float()) ** 2, mask)


def critic_losses(critic, x_gen: torch.Tensor, conditions: dict, sigma: torch.Tensor, noise: torch.Tensor,
                  autocast, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Flow matching on the student's (detached) videos, per sample [B]: the critic learns
    to denoise what the student makes (DISTILL_SPEC 2.5)."""
    x0 = x_gen.detach()
    x_t = flow.add_noise(x0, noise, sigma.to(x0.device))
    with autocast:
        prediction = critic(x_t, flow.sigma_to_timestep(sigma.to(x0.device)), **conditions)
    return per_sample_mean((prediction.float() - flow.velocity_target(x0, noise).float()) ** 2, mask)


def is_generator_step(step: int, generator_every: int) -> bool:
    """Whether optimizer step `step` (from 0) updates the student: every generator_every-th
    (the critic learns at every step)."""
    return (step + 1) % generator_every == 0


@dataclass
class DistillationModels:
    """The three roles. Each is what its forward goes through (with FSDP, the sharded model)."""

    student: torch.nn.Module     # CausalWanModel, trained
    teacher: torch.nn.Module     # WanModel, frozen
    critic: torch.nn.Module      # WanModel, trained


@dataclass
class RolloutSettings:
    """How rollouts and scores are drawn (the script's settings)."""

    schedule: FewStepSchedule
    shift: float                 # of the score levels
    min_timestep: float          # score levels are clamped to [min_timestep, max_timestep]
    max_timestep: float
    cache_dtype: torch.dtype | None = None


def generator_loss(models: DistillationModels, x_gen: torch.Tensor, conditions: dict, noise: SampleNoise,
                   rollout_settings: RolloutSettings, autocast, loss_scale: float,
                   mask: torch.Tensor | None = None) -> dict:
    """Score the student's video x_gen (with its graph) with teacher and critic under the
    bidirectional conditions, and back-propagate the DMD loss (x loss_scale) into the
    student. mask [B, F]: the frames whose loss counts (stage C's windows; the normaliser
    takes every frame, as the reference). Returns per-sample losses [B] and sigmas [B]."""
    r = rollout_settings
    sigma = score_sigmas(noise, r.shift, r.min_timestep, r.max_timestep)
    eps = noise.randn(LATENT_CHANNELS, *x_gen.shape[2:])
    with torch.no_grad():
        x_t = flow.add_noise(x_gen.detach(), eps, sigma.to(x_gen.device))
        direction = dmd_direction(x_gen, denoise(models.teacher, x_t, sigma, conditions, autocast),
                                  denoise(models.critic, x_t, sigma, conditions, autocast))
    losses = dmd_losses(x_gen, direction, mask)
    backward_with_replays(losses.sum() * loss_scale)  # a checkpointed rollout's blocks after the loss's backward
    return {"losses": losses.detach(), "sigma": sigma}


def critic_loss(models: DistillationModels, x_gen: torch.Tensor, conditions: dict, noise: SampleNoise,
                rollout_settings: RolloutSettings, autocast, loss_scale: float,
                mask: torch.Tensor | None = None) -> dict:
    """The critic's flow-matching loss on the student's (detached) video at a fresh score
    level, back-propagated (x loss_scale) into the critic; mask as in generator_loss.
    Returns per-sample losses [B] and sigmas [B]."""
    r = rollout_settings
    sigma = score_sigmas(noise, r.shift, r.min_timestep, r.max_timestep)
    eps = noise.randn(LATENT_CHANNELS, *x_gen.shape[2:])
    losses = critic_losses(models.critic, x_gen, conditions, sigma, eps, autocast, mask)
    (losses.sum() * loss_scale).backward()
    return {"losses": losses.detach(), "sigma": sigma}


def generator_micro_batch(models: DistillationModels, conditions: Conditions, noise: SampleNoise, exit_step: int,
                          rollout_settings: RolloutSettings, autocast, loss_scale: float) -> dict:
    """Stage B's student half: roll out with gradients at the exit step, then generator_loss
    on the whole video. Returns per-sample losses [B] and score sigmas [B]."""
    r = rollout_settings
    x_gen = rollout(models.student, conditions, noise, r.schedule, exit_step, conditions.latent_frames, autocast,
                    with_grad=True, cache_dtype=r.cache_dtype)
    return generator_loss(models, x_gen, conditions.whole(), noise, r, autocast, loss_scale)


def critic_micro_batch(models: DistillationModels, conditions: Conditions, noise: SampleNoise, exit_step: int,
                       rollout_settings: RolloutSettings, autocast, loss_scale: float) -> dict:
    """Stage B's critic half: a fresh rollout without gradients, then critic_loss on it.
    Returns per-sample losses and sigmas."""
    r = rollout_settings
    with torch.no_grad():
        x_gen = rollout(models.student, conditions, noise, r.schedule, exit_step, conditions.latent_frames,
                        autocast, cache_dtype=r.cache_dtype)
    return critic_loss(models, x_gen, conditions.whole(), noise, r, autocast, loss_scale)
