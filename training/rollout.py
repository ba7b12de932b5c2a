"""Self-Forcing rollouts: the student streams a video from noise block by block, exactly as
it will when played (generation/streaming.py), so that distillation trains it on its own
outputs (DISTILL_SPEC 2.3).

Per block of P latent frames: the few-step loop (predict x0, re-noise to the next level
with fresh noise) runs until a random exit step, whose x0 is the block's output; then a
pass at t = 0 over that output writes it into the KV caches as the clean context of the
blocks that follow. Only the exit step runs with gradients (stochastic gradient
truncation): every earlier step and every context pass runs without, and the caches hold
detached keys and values, so no gradient crosses blocks. One exit step is drawn per
rollout and shared by all blocks, all samples and all ranks (FSDP needs every rank to
make the same calls).

All noise comes from per-sample seeded generators (SampleNoise): a sample's rollout is
the same whichever rank and batch it is in, and after a resume.
"""

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from generation.streaming import grid_sigma, renoise, warped_timesteps, x0_from_velocity
from training.epochs import seeded_generator
from wan.shapes import LATENT_CHANNELS, video_frame_count


class SampleNoise:
    """Standard Gaussian draws for a batch, each sample's from its own generator, made on
    the CPU (the same numbers on any device) and moved to `device`."""

    def __init__(self, seed: int, purpose: str, positions: list[int], device):
        self.generators = [seeded_generator(seed, purpose, p) for p in positions]
        self.device = device

    @property
    def batch(self) -> int:
        return len(self.generators)

    def randn(self, *shape: int) -> torch.Tensor:
        return torch.stack([torch.randn(shape, generator=g) for g in self.generators]).to(self.device)

    def randint(self, low: int, high: int) -> torch.Tensor:
        """One integer per sample in [low, high), [B] int64 on the CPU."""
        return torch.cat([torch.randint(low, high, (1,), generator=g) for g in self.generators])


@dataclass(frozen=True)
class FewStepSchedule:
    """The student's denoising steps after warping, and their grid sigmas."""

    timesteps: tuple[float, ...]
    sigmas: tuple[float, ...]

    @classmethod
    def of(cls, denoising_steps, shift: float) -> "FewStepSchedule":
        timesteps = warped_timesteps(denoising_steps, shift)
        return cls(tuple(timesteps.tolist()), tuple(grid_sigma(timesteps, shift).tolist()))

    def __len__(self) -> int:
        return len(self.timesteps)


def draw_exit_step(generator: torch.Generator, num_steps: int, last_step_only: bool = False) -> int:
    """The denoising step whose prediction is a rollout's output (uniform over the steps)."""
    if last_step_only:
        return num_steps - 1
    return int(torch.randint(0, num_steps, (1,), generator=generator))


def exit_step_for(seed: int, purpose: str, step: int, micro_batch: int, num_steps: int,
                  last_step_only: bool = False) -> int:
    """The exit step of one rollout of an optimizer step, the same on every rank."""
    return draw_exit_step(seeded_generator(seed, purpose, "exit", step, micro_batch), num_steps, last_step_only)


@dataclass
class Conditions:
    """What a stream is conditioned on, from latent frame 0: cond_concat [B, 20, F, h, w],
    visual_context [B, tokens, width], raw action rows keyboard [B, N, K] and mouse [B, N, 2]
    (N = 1 + 4(F-1); None for a branch the model lacks)."""

    cond_concat: torch.Tensor
    visual_context: torch.Tensor
    keyboard: torch.Tensor | None
    mouse: torch.Tensor | None

    @property
    def batch(self) -> int:
        return self.cond_concat.shape[0]

    @property
    def latent_frames(self) -> int:
        return self.cond_concat.shape[2]

    @property
    def latent_size(self) -> tuple[int, int]:
        return tuple(self.cond_concat.shape[3:])

    def block(self, start: int, end: int) -> dict:
        """The keyword conditions of a forward_cached call for latent frames [start, end):
        their cond_concat slice and the action prefix up to their last raw frame."""
        rows = video_frame_count(end)
        return dict(visual_context=self.visual_context, cond_concat=self.cond_concat[:, :, start:end],
                    keyboard_cond=None if self.keyboard is None else self.keyboard[:, :rows],
                    mouse_cond=None if self.mouse is None else self.mouse[:, :rows])

    def whole(self, start: int = 0, end: int | None = None) -> dict:
        """The keyword conditions of a bidirectional forward over latent frames [start, end)."""
        end = self.latent_frames if end is None else end
        first, last = 4 * start, video_frame_count(end)
        return dict(visual_context=self.visual_context, cond_concat=self.cond_concat[:, :, start:end],
                    keyboard_cond=None if self.keyboard is None else self.keyboard[:, first:last],
                    mouse_cond=None if self.mouse is None else self.mouse[:, first:last])

    def window(self, start: int, end: int) -> dict:
        """The keyword conditions of a bidirectional forward over a window [start, end) cut
        from the middle of a long stream (stage C, DISTILL_SPEC 3.6): the window's action
        rows, but the stream's own first-frame cond_concat of the window's length (the
        public recipe's teacher and critic are told the clip's first image, not the
        window's anchor)."""
        return dict(self.whole(start, end), cond_concat=self.cond_concat[:, :, :end - start])


def conditions_from_batch(batch: dict, device, keyboard: bool = True, mouse: bool = True) -> Conditions:
    """A DataLoader batch of the latent cache (latents.dataset.CachedClipDataset) as Conditions."""
    return Conditions(batch["cond_concat"].to(device), batch["visual_context"].to(device),
                      batch["keyboard"].float().to(device) if keyboard else None,
                      batch["mouse"].float().to(device) if mouse else None)


def rollout(student, conditions: Conditions, noise: SampleNoise, schedule: FewStepSchedule, exit_step: int,
            num_frames: int, autocast=nullcontext(), with_grad: bool = False, cache=None, start_frame: int = 0,
            cache_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Stream num_frames latent frames (whole blocks) from start_frame on; returns their x0
    [B, 16, num_frames, h, w] float32, with the exit steps' graphs when with_grad.

    cache: the stream's StreamCache to continue (stage C); None starts a fresh stream at
    start_frame 0. Draws from `noise`, in order: each block's starting noise, then one
    draw per re-noising step before the exit.
    """
    P = student.frames_per_block
    if num_frames % P:
        raise ValueError(f"a rollout makes whole blocks of {P} latent frames, not {num_frames}")
    if not 0 <= exit_step < len(schedule):
        raise ValueError(f"exit step {exit_step} is not one of the {len(schedule)} denoising steps")
    B, (h, w) = conditions.batch, conditions.latent_size
    if cache is None:
        if start_frame:
            raise ValueError("a rollout from a fresh cache starts at latent frame 0")
        cache = student.new_cache(B, h, w, dtype=cache_dtype)
    outputs = []
    for start in range(start_frame, start_frame + num_frames, P):
        call = dict(conditions.block(start, start + P), cache=cache, start_frame=start)
        z = noise.randn(LATENT_CHANNELS, P, h, w)
        for step in range(exit_step + 1):
            exiting = step == exit_step
            t = torch.full((B, P), schedule.timesteps[step], device=z.device)
            with torch.set_grad_enabled(with_grad and exiting), autocast:
                velocity = student.forward_cached(z, t, **call)
            x0 = x0_from_velocity(z, velocity, schedule.sigmas[step])
            if not exiting:
                z = renoise(x0, noise.randn(LATENT_CHANNELS, P, h, w), schedule.sigmas[step + 1])
        with torch.no_grad(), autocast:  # the block's clean context for the blocks after it
            student.forward_cached(x0.detach(), torch.zeros(B, P, device=z.device), **call)
        outputs.append(x0)
    return torch.cat(outputs, dim=2)
