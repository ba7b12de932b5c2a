"""Real-time streaming generation with a distilled Matrix-Game 2.0 student (STREAMING_SPEC 6, 8).

A stream makes one block of P latent frames at a time. The block starts as Gaussian noise;
the student denoises it in a few steps (each step predicts the clean latent x0, which is
re-noised to the next, lower noise level with fresh noise); one more pass over the final
x0 at t = 0 stores it in the KV caches as the clean context of the blocks that follow; the
streaming VAE decoder turns it into pixel frames. Every block reads the player's action
for its own frames, so a player can steer block by block. Memory is constant however long
the stream runs: the caches, the decoder's slots and the action history are bounded.

    generator = StreamingGenerator(model, cond_concat, visual_context, StreamingDecoder(vae))
    for keyboard, mouse in player_actions():      # one action [B, K], [B, 2] per block
        frames = generator.step(keyboard, mouse).video   # [B, 3, 9 or 12, H, W]

The schedule helpers (warped_timesteps, grid_sigma, x0_from_velocity, renoise) are the
few-step sampler's arithmetic, shared with the distillation trainer's rollouts.
"""

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from wan.causal import CausalWanModel
from wan.conditioning import STREAM_COND_LATENT_FRAMES, build_cond_concat, build_visual_context
from wan.flow import DEFAULT_SHIFT, NUM_TRAIN_TIMESTEPS, add_noise, shift_sigma
from wan.shapes import LATENT_CHANNELS, VAE_TIME_STRIDE, video_frame_count
from wan.vae import StreamingDecoder

# The students' denoising steps (their inference yamls), before warping.
DENOISING_STEPS = {
    "universal": (1000, 666, 333),
    "gta_drive": (1000, 666, 333),
    "templerun": (1000, 750, 500, 250),
}
# Their keyboard columns in order (STREAMING_SPEC 6.6): universal forward, back, left, right;
# gta_drive forward, back (it steers with the mouse's yaw); templerun no-move, jump, slide,
# turn left, turn right, left side, right side (and no mouse).
STUDENT_KEYBOARD_KEYS = {
    "universal": ("W", "S", "A", "D"),
    "gta_drive": ("W", "S"),
    "templerun": ("Q", "W", "S", "Z", "C", "A", "D"),
}


# ----------------------------------------------------------------------------- schedule

def training_grid(shift: float = DEFAULT_SHIFT) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigmas, timesteps) [1000] of the shifted training grid, in float32 as the reference
    scheduler computes them (STREAMING_SPEC 6.1): sigma_0 = 1 down to sigma_999 = 0.00498."""
    u = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1, dtype=torch.float32)[:-1]
    sigmas = shift_sigma(u, shift)
    return sigmas, sigmas * NUM_TRAIN_TIMESTEPS


def warped_timesteps(steps: Iterable[int], shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """The timesteps a student really runs at, float32 [J]: each listed k becomes the grid
    timestep at index 1000 - k (6.2); [1000, 666, 333] -> [1000.0, 908.84, 713.98]."""
    steps = list(steps)
    if not steps or not all(isinstance(k, int) and 0 <= k <= NUM_TRAIN_TIMESTEPS for k in steps):
        raise ValueError(f"denoising steps must be integers in 0..{NUM_TRAIN_TIMESTEPS}, got {steps}")
    grid = torch.cat([training_grid(shift)[1], torch.zeros(1)])  # index 1000 stands for t = 0
    return grid[[NUM_TRAIN_TIMESTEPS - k for k in steps]]


def grid_sigma(timestep: torch.Tensor, shift: float = DEFAULT_SHIFT) -> torch.Tensor:
    """The float32 sigma of the grid point nearest to each timestep (ties: the lower index),
    the sigma the reference converts and re-noises with (not t / 1000)."""
    sigmas, timesteps = training_grid(shift)
    t = torch.as_tensor(timestep, dtype=torch.float32).cpu()
    index = (timesteps[None] - t.reshape(-1, 1)).abs().argmin(dim=1)
    return sigmas[index].view(t.shape)


def _frames_view(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """sigma: a number, [B] (per sample) or [B, F] (per latent frame) -> broadcast over [B, C, F, H, W]."""
    sigma = sigma.to(like.device)
    if sigma.dim() == 1:
        return sigma.view(-1, 1, 1, 1, 1)
    if sigma.dim() == 2:
        return sigma[:, None, :, None, None]
    return sigma


def x0_from_velocity(x_t: torch.Tensor, velocity: torch.Tensor, sigma) -> torch.Tensor:
    """The clean latent the flow prediction points at: x_t - sigma * v, computed in float64
    and returned in the velocity's dtype (6.3). sigma: number, [B] or [B, F]."""
    sigma = _frames_view(torch.as_tensor(sigma, dtype=torch.float64), velocity)
    return (x_t.double() - sigma * velocity.double()).to(velocity.dtype)


def renoise(x0: torch.Tensor, eps: torch.Tensor, sigma) -> torch.Tensor:
    """x0 moved to noise level sigma with noise eps: (1 - sigma) x0 + sigma eps, sigma in
    float32, returned in eps's dtype (6.3). sigma: number or [B]."""
    sigma = torch.as_tensor(sigma, dtype=torch.float32).expand(x0.shape[0])
    return add_noise(x0, eps, sigma).to(eps.dtype)


# ----------------------------------------------------------------------------- conditions and actions

@torch.no_grad()
def first_frame_conditions(vae, clip, first_frame: torch.Tensor,
                           num_latent_frames: int = STREAM_COND_LATENT_FRAMES) -> tuple[torch.Tensor, torch.Tensor]:
    """(cond_concat [B, 20, num_latent_frames, h, w], visual_context [B, 257, 1280]) from the
    stream's first image [B, 3, H, W] in [-1, 1]. The default length serves a stream of any
    length (see wan.conditioning.STREAM_COND_LATENT_FRAMES)."""
    return (build_cond_concat(vae, first_frame, video_frame_count(num_latent_frames)),
            build_visual_context(clip, first_frame))


def block_rows(block_index: int, frames_per_block: int) -> int:
    """Raw frames (and action rows) a block adds to the video: 1 + 4(P-1) for block 0, 4P later."""
    return video_frame_count(frames_per_block) if block_index == 0 else VAE_TIME_STRIDE * frames_per_block


def block_action_chunks(keyboard_cond: torch.Tensor | None, mouse_cond: torch.Tensor | None,
                        frames_per_block: int) -> Iterator[tuple[torch.Tensor | None, torch.Tensor | None]]:
    """Split whole raw action sequences [B, N, width], N = 1 + 4(F-1) with F a multiple of P,
    into each block's rows: rows [0, 9) for block 0, then 12 rows per block (6.5)."""
    given = [c for c in (keyboard_cond, mouse_cond) if c is not None]
    if not given:
        raise ValueError("no action sequence given")
    rows = given[0].shape[1]
    latent_frames = (rows - 1) // VAE_TIME_STRIDE + 1
    if any(c.shape[1] != rows for c in given) or (rows - 1) % VAE_TIME_STRIDE or latent_frames % frames_per_block:
        raise ValueError(f"action sequences must have the same 1 + 4(F-1) rows with F a multiple of "
                         f"{frames_per_block} latent frames, got {[list(c.shape) for c in given]}")
    start = 0
    for index in range(latent_frames // frames_per_block):
        end = start + block_rows(index, frames_per_block)
        yield tuple(None if c is None else c[:, start:end] for c in (keyboard_cond, mouse_cond))
        start = end


# ----------------------------------------------------------------------------- the stream

@dataclass
class StreamBlock:
    index: int  # the block's number in the stream
    start_frame: int  # its first latent frame
    latents: torch.Tensor  # [B, 16, P, h, w] float32, the denoised x0
    video: torch.Tensor | None  # [B, 3, T, H, W] in [-1, 1], T = block_rows(index, P); None without a decoder


class StreamingGenerator:
    """A stream of any length from one first frame, one block per `step`.

    model: the streaming student (CausalWanModel, eval mode; its dtype and device are the
    stream's). cond_concat [B, 20, Fc, h, w] and visual_context [B, 257, clip_dim]: the
    first-frame conditions (first_frame_conditions); latent frames past Fc reuse frame
    Fc - 1, which is exact once Fc >= STREAM_COND_LATENT_FRAMES. decoder: a StreamingDecoder
    for pixel frames, or None for latents only. denoising_steps: the student's list before
    warping (DENOISING_STEPS). context_noise: timestep of the clean-context pass (0 in the
    released settings; above 0 the block is re-noised to it first).

    Noise comes from one torch.Generator on the model's device seeded with `seed`, drawn
    block by block (the block's starting noise, then one draw per re-noising step): the
    same seed gives the same stream here. It does not reproduce the reference's random
    numbers (which draws all starting noise before the loop and each step's noise in the
    model output's memory layout, STREAMING_SPEC 6.4c), only their distribution.
    """

    def __init__(self, model: CausalWanModel, cond_concat: torch.Tensor, visual_context: torch.Tensor,
                 decoder: StreamingDecoder | None = None, *, denoising_steps=DENOISING_STEPS["universal"],
                 shift: float = DEFAULT_SHIFT, context_noise: float = 0.0, seed: int = 0,
                 cache_dtype: torch.dtype | None = None):
        weight = model.patch_embedding.weight
        self.model, self.decoder, self.device = model, decoder, weight.device
        self.frames_per_block = model.frames_per_block
        if cond_concat.dim() != 5 or visual_context.dim() != 3 or cond_concat.shape[0] != visual_context.shape[0]:
            raise ValueError(f"cond_concat must be [B, 20, F, h, w] and visual_context [B, tokens, width] for the "
                             f"same B, got {list(cond_concat.shape)} and {list(visual_context.shape)}")
        self.batch = cond_concat.shape[0]
        self.latent_size = tuple(cond_concat.shape[3:])
        self.cond_concat = cond_concat.to(self.device)
        self.visual_context = visual_context.to(self.device)
        self.timesteps = warped_timesteps(denoising_steps, shift)
        self.sigmas = grid_sigma(self.timesteps, shift)
        self.context_timestep = float(context_noise)
        self.context_sigma = grid_sigma(torch.tensor(self.context_timestep), shift).item()
        action = model.config.action_config
        self.action_widths = {"keyboard": action.keyboard_dim_in if action.enable_keyboard else None,
                              "mouse": action.mouse_dim_in if action.enable_mouse else None}
        # rows a later block reads (its windows' first row to its last raw frame): all we keep
        self.history_rows = action.window_frames + VAE_TIME_STRIDE * (self.frames_per_block - 1) + 1
        self.seed = seed
        self.cache = model.new_cache(self.batch, *self.latent_size, self.device, cache_dtype)
        self.reset()

    def reset(self, seed: int | None = None) -> None:
        """Start the stream over from its first frame (same buffers; seed: a new one)."""
        self.seed = self.seed if seed is None else seed
        self.noise = torch.Generator(self.device).manual_seed(self.seed)
        self.cache.reset()
        if self.decoder is not None:
            self.decoder.reset()
        self.block_index, self.next_frame = 0, 0
        self.history = {"keyboard": None, "mouse": None}

    @property
    def rows_for_next_block(self) -> int:
        """Raw frames the next block shows, = action rows a sequence gives it (9, then 12)."""
        return block_rows(self.block_index, self.frames_per_block)

    def stream(self, actions: Iterable[tuple[torch.Tensor | None, torch.Tensor | None]]) -> Iterator[StreamBlock]:
        """One block per (keyboard, mouse) pair, for as long as `actions` goes on."""
        for keyboard, mouse in actions:
            yield self.step(keyboard, mouse)

    @torch.no_grad()
    def step(self, keyboard: torch.Tensor | None = None, mouse: torch.Tensor | None = None) -> StreamBlock:
        """Generate the next block under the player's actions.

        keyboard [B, K] and mouse [B, 2]: one action for the whole block, written to every raw
        frame it shows (an interactive player, STREAMING_SPEC 6.5); or [B, R, K] and [B, R, 2]
        with R = rows_for_next_block, one row per frame (a scripted sequence, 6.4). A model
        without a mouse branch takes mouse=None.
        """
        start, P = self.next_frame, self.frames_per_block
        rows = {name: self._block_rows(name, cond) for name, cond in (("keyboard", keyboard), ("mouse", mouse))}
        cond_concat = self._cond_block(start)  # checked before the stream's state changes
        for name, new in rows.items():  # the history ends at the block's last raw frame
            if new is not None:
                old = self.history[name]
                self.history[name] = (new if old is None else torch.cat([old, new], dim=1))[:, -self.history_rows:]
        call = dict(visual_context=self.visual_context, cond_concat=cond_concat, cache=self.cache,
                    start_frame=start, keyboard_cond=self.history["keyboard"], mouse_cond=self.history["mouse"])

        x = self._randn()
        for j, (t, sigma) in enumerate(zip(self.timesteps.tolist(), self.sigmas.tolist())):
            velocity = self.model.forward_cached(x, self._t(t), **call)
            x0 = x0_from_velocity(x, velocity, sigma)
            if j + 1 < len(self.timesteps):
                x = renoise(x0, self._randn(), self.sigmas[j + 1].item())
        context = x0 if self.context_timestep == 0 else renoise(x0, self._randn(), self.context_sigma)
        self.model.forward_cached(context, self._t(self.context_timestep), **call)  # rewrites the block's cache

        video = None if self.decoder is None else self.decoder.decode(x0)
        block = StreamBlock(self.block_index, start, x0, video)
        self.block_index, self.next_frame = self.block_index + 1, start + P
        return block

    def _randn(self) -> torch.Tensor:
        shape = (self.batch, LATENT_CHANNELS, self.frames_per_block, *self.latent_size)
        return torch.randn(shape, generator=self.noise, device=self.device, dtype=torch.float32)

    def _t(self, value: float) -> torch.Tensor:
        return torch.full((self.batch, self.frames_per_block), value, device=self.device, dtype=torch.float32)

    def _cond_block(self, start: int) -> torch.Tensor:
        available = self.cond_concat.shape[2]
        end = start + self.frames_per_block
        if end <= available:
            return self.cond_concat[:, :, start:end]
        if available < STREAM_COND_LATENT_FRAMES:
            raise ValueError(f"cond_concat has {available} latent frames and the stream has reached frame {end - 1}; "
                             f"streaming on needs at least {STREAM_COND_LATENT_FRAMES} (from then on they no longer "
                             f"change, see wan.conditioning.STREAM_COND_LATENT_FRAMES)")
        index = torch.arange(start, end, device=self.device).clamp(max=available - 1)
        return self.cond_concat[:, :, index]

    def _block_rows(self, name: str, cond: torch.Tensor | None) -> torch.Tensor | None:
        """The block's action rows [B, R, width] from one action or R rows."""
        width, rows = self.action_widths[name], self.rows_for_next_block
        if width is None:
            if cond is not None:
                raise ValueError(f"this model has no {name} branch; pass {name}=None")
            return None
        if cond is None:
            raise ValueError(f"this model needs a {name} action for every block ([B, {width}] or [B, {rows}, {width}])")
        cond = torch.as_tensor(cond, dtype=torch.float32, device=self.device)
        if cond.dim() == 2:
            cond = cond[:, None].expand(-1, rows, -1)
        if tuple(cond.shape) != (self.batch, rows, width):
            raise ValueError(f"{name} action must be [B={self.batch}, {width}] (one for the block) or "
                             f"[B={self.batch}, {rows}, {width}] (one per frame of block {self.block_index}), "
                             f"got {list(cond.shape)}")
        if not torch.isfinite(cond).all():
            raise ValueError(f"{name} action has non-finite values")
        return cond
