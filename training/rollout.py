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

Checkpointed rollouts (the student's gradient checkpointing on, GRADIENT_CHECKPOINTING):
the graphs of the exit steps would be the largest thing distillation holds - every
block's activations, its keys and values and the autocast copies of the weights, kept
from the rollout until the DMD loss's backward, growing with the rollout's length. A
checkpointed rollout streams without gradients, keeping each block's exit input and
output, and its backward (backward_with_replays, after the loss's) streams the blocks again
from the rollout's starting cache, one block's forward and backward at a time (Replay).
"""

import itertools
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
    [B, 16, num_frames, h, w] float32, differentiable with respect to the student's weights
    through the exit steps when with_grad.

    With gradient checkpointing on the student (set_gradient_checkpointing), such a rollout
    keeps no graph: it streams without gradients and its backward replays it (Replay).
    Either way the same draws, the same output and the same gradients.

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
        fresh = True
    else:
        fresh = False
    starts = range(start_frame, start_frame + num_frames, P)
    if with_grad and torch.is_grad_enabled() and getattr(student, "gradient_checkpointing", False):
        replay = Replay(student, conditions, schedule, exit_step, starts, autocast,
                        None if fresh else cache.copy(), (B, h, w, cache_dtype))
        return ReplayedRollout.apply(replay, noise, cache, torch.zeros((), requires_grad=True))
    outputs = [x0 for _, x0 in stream_blocks(student, conditions, noise, schedule, exit_step, starts, cache, autocast,
                                             with_grad)]
    return torch.cat(outputs, dim=2)


def denoising_call(student, z: torch.Tensor, schedule: FewStepSchedule, step: int, call: dict, autocast,
                   checkpointing: bool = False) -> torch.Tensor:
    """One denoising step of a block: its x0 prediction from z at the step's level."""
    t = torch.full((z.shape[0], student.frames_per_block), schedule.timesteps[step], device=z.device)
    with autocast:
        velocity = student.forward_cached(z, t, **call, checkpointing=checkpointing)
    return x0_from_velocity(z, velocity, schedule.sigmas[step])


def context_call(student, x0: torch.Tensor, call: dict) -> None:
    """The pass at t = 0 over a block's output that writes it into the caches as the clean
    context of the blocks after it."""
    student.forward_cached(x0.detach(), torch.zeros(x0.shape[0], student.frames_per_block, device=x0.device), **call)


def stream_blocks(student, conditions: Conditions, noise: SampleNoise, schedule: FewStepSchedule, exit_step: int,
                  starts, cache, autocast, with_grad: bool):
    """The rollout, block by block: yields (the exit step's input z, the block's x0) and then
    runs the block's context pass."""
    P, (h, w) = student.frames_per_block, conditions.latent_size
    for start in starts:
        call = dict(conditions.block(start, start + P), cache=cache, start_frame=start)
        z = noise.randn(LATENT_CHANNELS, P, h, w)
        for step in range(exit_step + 1):
            exiting = step == exit_step
            with torch.set_grad_enabled(with_grad and exiting):
                x0 = denoising_call(student, z, schedule, step, call, autocast)
            if not exiting:
                z = renoise(x0, noise.randn(LATENT_CHANNELS, P, h, w), schedule.sigmas[step + 1])
        yield z, x0
        with torch.no_grad(), autocast:
            context_call(student, x0, call)


REPLAYS_MADE = itertools.count()  # orders the replays behind one loss as their rollouts ran


class Replay:
    """What a checkpointed rollout keeps for its backward: each block's exit-step input and
    output (a few MB) and, for a continued stream, a copy of the cache as the rollout found
    it - not the exit steps' graphs, nor the cached keys and values each exit step read.

    Its backward streams the blocks again from that cache: block by block, the exit step's
    forward with gradients (each transformer block checkpointed), at once its backward (the
    gradient of that block's output), then the context pass that writes the block into the
    cache for the next. So one block's graph exists at a time and the cache holds
    `local_attn_size` frames, whatever the rollout's length; the price is, per block, the
    exit step twice more and the context pass once more. The replayed forwards compute what
    the rollout computed (same inputs, same cache contents), so the gradients are those of
    the graph they replace.
    """

    def __init__(self, student, conditions: Conditions, schedule: FewStepSchedule, exit_step: int, starts, autocast,
                 cache_copy, fresh_cache: tuple):
        self.student, self.conditions, self.schedule, self.exit_step = student, conditions, schedule, exit_step
        self.starts, self.autocast = starts, autocast
        self.cache_copy, self.fresh_cache = cache_copy, fresh_cache
        self.inputs, self.outputs = [], []
        self.order = next(REPLAYS_MADE)
        self.grad = None          # the gradient of the rollout's output, once the loss's backward reached it
        self.expected = False     # set by backward_with_replays, which runs the replay after that backward

    def forward(self, noise: SampleNoise, cache) -> torch.Tensor:
        """The rollout without gradients, recording each block's exit input and output."""
        for z, x0 in stream_blocks(self.student, self.conditions, noise, self.schedule, self.exit_step, self.starts,
                                   cache, self.autocast, with_grad=False):
            self.inputs.append(z)
            self.outputs.append(x0)
        return torch.cat(self.outputs, dim=2)

    def backward(self) -> None:
        """Accumulate the student's gradients for self.grad, block by block (each its own
        backward call, from the top level)."""
        student, P, grad = self.student, self.student.frames_per_block, self.grad
        if self.cache_copy is None:
            B, h, w, dtype = self.fresh_cache
            cache = student.new_cache(B, h, w, dtype=dtype)
        else:
            cache = self.cache_copy
        for index, (start, z, x0) in enumerate(zip(self.starts, self.inputs, self.outputs)):
            call = dict(self.conditions.block(start, start + P), cache=cache, start_frame=start)
            with torch.enable_grad():
                replayed = denoising_call(student, z, self.schedule, self.exit_step, call, self.autocast,
                                          checkpointing=True)
            replayed.backward(grad[:, :, index * P:(index + 1) * P])
            del replayed
            with torch.no_grad(), self.autocast:
                context_call(student, x0, call)
        self.inputs = self.outputs = self.cache_copy = self.grad = None


class ReplayedRollout(torch.autograd.Function):
    """A checkpointed rollout as one autograd node: its backward only keeps the gradient of
    the rollout's output for the replay that backward_with_replays runs when the loss's
    backward is over. (A replay inside this backward - a backward within a backward, as a
    reentrant checkpoint does - loses the student's gradients under FSDP, whose end-of-
    backward step does not run for the inner one.) `anchor` is a scalar that requires grad,
    so that the node is recorded."""

    @staticmethod
    def forward(ctx, replay: Replay, noise: SampleNoise, cache, anchor: torch.Tensor) -> torch.Tensor:
        ctx.replay = replay
        return replay.forward(noise, cache)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.replay.expected:
            raise RuntimeError("the backward reached a checkpointed rollout: run it with "
                               "training.rollout.backward_with_replays(loss), which replays the rollout after it")
        ctx.replay.grad = grad if ctx.replay.grad is None else ctx.replay.grad + grad
        return None, None, None, None


def replays_behind(tensor: torch.Tensor) -> list[Replay]:
    """The checkpointed rollouts a tensor was computed from, in the order they were made."""
    found, seen, stack = [], set(), [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if isinstance(node, ReplayedRollout._backward_cls) and node.replay is not None:
            found.append(node.replay)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return sorted(found, key=lambda replay: replay.order)


def backward_with_replays(loss: torch.Tensor) -> None:
    """loss.backward(), then the replay of every checkpointed rollout behind the loss (its
    blocks' backward), so that the student's gradients are complete when this returns."""
    replays = replays_behind(loss)
    for replay in replays:
        replay.expected = True
    loss.backward()
    for replay in replays:
        if replay.grad is not None:
            replay.backward()
