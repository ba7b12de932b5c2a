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

from generation.errors import GenerationError
from wan.causal import CausalWanModel
from wan.conditioning import STREAM_COND_LATENT_FRAMES, build_cond_concat, build_visual_context
from wan.device import to_device_without_waiting
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
    if not all(torch.isfinite(c).all() for c in given):  # checked once here, not per block (a sync on a GPU)
        raise ValueError("action sequences have non-finite values")
    start = 0
    for index in range(latent_frames // frames_per_block):
        end = start + block_rows(index, frames_per_block)
        yield tuple(None if c is None else c[:, start:end] for c in (keyboard_cond, mouse_cond))
        start = end


# ----------------------------------------------------------------------------- compiling a block's calls

COMPILE_MODES = ("off", "default", "reduce-overhead")
COMPILE_HELP = ('"off" (eager), "default" (torch.compile: fused kernels; the first blocks wait for the '
                'compiler) or "reduce-overhead" (the same, replayed as CUDA graphs on a GPU)')


def compiled_step(model: CausalWanModel, mode: str, backend: str = "inductor"):
    """model.cached_step as a stream runs it: itself ("off"), or compiled whole by
    torch.compile with fullgraph=True (a graph break is an error, not a slow path) and
    static shapes. Its first calls compile (a stream's first two blocks have their own
    shapes and cache plans); from the third block on every call runs one graph.
    "reduce-overhead" also captures it as a CUDA graph on a GPU (on a CPU it is "default").
    backend: torch.compile's ("inductor" needs a C++ compiler on a CPU; tests use "eager"
    or "aot_eager", which check the graph without generating code)."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"COMPILE={mode!r}: choose one of {', '.join(COMPILE_MODES)}")
    if mode == "off":
        return model.cached_step
    options = dict(mode=None if mode == "default" else mode) if backend == "inductor" else {}
    return torch.compile(model.cached_step, fullgraph=True, dynamic=False, backend=backend, **options)


def _compile_errors() -> tuple:
    """What torch.compile raises when it cannot compile (dynamo's errors; inductor's own where
    this torch has them)."""
    import torch._dynamo.exc
    errors = [torch._dynamo.exc.TorchDynamoException]
    try:
        from torch._inductor.exc import InductorError
        errors.append(InductorError)
    except ImportError:
        pass
    return tuple(errors)


def _compile_failed(error: Exception, mode: str) -> GenerationError:
    first_line = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return GenerationError(f"COMPILE={mode}: torch.compile could not compile the streaming step "
                           f"({type(error).__name__}: {first_line[:300]}); set COMPILE=off to run it eagerly")


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
    released settings; above 0 the block is re-noised to it first). compile_mode: one of
    COMPILE_MODES, for the student's calls (compiled_step; compile_backend: its backend).

    Noise comes from one torch.Generator on the model's device seeded with `seed`, drawn
    block by block (the block's starting noise, then one draw per re-noising step): the
    same seed gives the same stream here. It does not reproduce the reference's random
    numbers (which draws all starting noise before the loop and each step's noise in the
    model output's memory layout, STREAMING_SPEC 6.4c), only their distribution.

    A block waits for nothing on the host: the schedule's timesteps and sigmas, the
    conditions and the action history live on the device in buffers made once per stream,
    the student's tables are computed there from its cache's position, and nothing is read
    back. What enters from the host is the block's actions, checked on the host (a CPU
    tensor, as a player gives it) and copied without waiting; actions already on the device
    were checked where they entered (block_action_chunks checks whole sequences).
    """

    def __init__(self, model: CausalWanModel, cond_concat: torch.Tensor, visual_context: torch.Tensor,
                 decoder: StreamingDecoder | None = None, *, denoising_steps=DENOISING_STEPS["universal"],
                 shift: float = DEFAULT_SHIFT, context_noise: float = 0.0, seed: int = 0,
                 cache_dtype: torch.dtype | None = None, compile_mode: str = "off", compile_backend: str = "inductor"):
        weight = model.patch_embedding.weight
        self.model, self.decoder, self.device = model, decoder, weight.device
        self.frames_per_block = P = model.frames_per_block
        if cond_concat.dim() != 5 or visual_context.dim() != 3 or cond_concat.shape[0] != visual_context.shape[0]:
            raise ValueError(f"cond_concat must be [B, 20, F, h, w] and visual_context [B, tokens, width] for the "
                             f"same B, got {list(cond_concat.shape)} and {list(visual_context.shape)}")
        self.batch = B = cond_concat.shape[0]
        self.latent_size = tuple(cond_concat.shape[3:])
        self.cond_concat = cond_concat.to(self.device)
        self.visual_context = visual_context.to(self.device)
        self.timesteps = warped_timesteps(denoising_steps, shift)
        self.sigmas = grid_sigma(self.timesteps, shift)
        self.context_timestep = float(context_noise)
        self.context_sigma = grid_sigma(torch.tensor(self.context_timestep), shift)
        # the schedule on the device, once: a block's steps read it without a host copy
        self.step_timesteps = [torch.full((B, P), t, device=self.device) for t in self.timesteps.tolist()]
        self.step_sigmas = self.sigmas.to(self.device).unbind()
        self.context_t = torch.full((B, P), self.context_timestep, device=self.device)
        self.context_sigma_on_device = self.context_sigma.to(self.device)
        action = model.config.action_config
        self.action_widths = {"keyboard": action.keyboard_dim_in if action.enable_keyboard else None,
                              "mouse": action.mouse_dim_in if action.enable_mouse else None}
        # rows a later block reads (its windows' first row to its last raw frame): all we keep
        self.history_rows = action.window_frames + VAE_TIME_STRIDE * (self.frames_per_block - 1) + 1
        self.history_buffers = {name: None if width is None else
                                torch.zeros(B, self.history_rows, width, device=self.device)
                                for name, width in self.action_widths.items()}
        self.cond_buffer = torch.empty(B, *self.cond_concat.shape[1:2], P, *self.latent_size,
                                       dtype=self.cond_concat.dtype, device=self.device)
        self.compile_mode = compile_mode
        self.cached_step = compiled_step(model, compile_mode, compile_backend)
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
        self.history_filled = 0

    @property
    def history(self) -> dict:
        """The action rows kept, [B, R, width] per branch (None: none or no such branch),
        ending at the last block's last raw frame: at most history_rows."""
        return {name: None if buffer is None or not self.history_filled else buffer[:, -self.history_filled:]
                for name, buffer in self.history_buffers.items()}

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
        start = self.next_frame
        rows = {name: self._block_rows(name, cond) for name, cond in (("keyboard", keyboard), ("mouse", mouse))}
        cond_concat = self._cond_block(start)  # checked before the stream's state changes
        for name, new in rows.items():  # the history ends at the block's last raw frame
            if new is not None:
                buffer = self.history_buffers[name]
                buffer.copy_(torch.cat([buffer[:, new.shape[1]:], new], dim=1))
        self.history_filled = min(self.history_rows, self.history_filled + self.rows_for_next_block)
        call = dict(visual_context=self.visual_context, cond_concat=cond_concat, cache=self.cache,
                    start_frame=start, keyboard_cond=self.history["keyboard"], mouse_cond=self.history["mouse"])

        x = self._randn()
        last = len(self.step_timesteps) - 1
        for j, t in enumerate(self.step_timesteps):
            x0 = x0_from_velocity(x, self._student(x, t, call), self.step_sigmas[j])
            if j < last:
                x = renoise(x0, self._randn(), self.step_sigmas[j + 1])
        context = x0 if self.context_timestep == 0 else renoise(x0, self._randn(), self.context_sigma_on_device)
        self._student(context, self.context_t, call)  # rewrites the block's cache

        video = None if self.decoder is None else self.decoder.decode(x0)
        block = StreamBlock(self.block_index, start, x0, video)
        self.block_index, self.next_frame = self.block_index + 1, start + self.frames_per_block
        return block

    def _student(self, x: torch.Tensor, t: torch.Tensor, call: dict) -> torch.Tensor:
        """One call of the student: the host-side preparation, then the (compiled) tensor work.
        Uncompiled, through forward_cached: a student sharded by FSDP (distillation's validation
        on several GPUs) gathers its weights for that method (training/ranks.py)."""
        if self.compile_mode == "off":
            return self.model.forward_cached(x, t, **call)
        prepared = self.model.prepare_cached(x, t, **call)
        if self.compile_mode == "reduce-overhead":
            if self.block_index < 2:  # the buffers the stream keeps (the first blocks make the last of them)
                for tensor in (*self.cache.tensors(), *self.history_buffers.values(), self.cond_buffer,
                               self.visual_context):
                    if tensor is not None:
                        torch._dynamo.mark_static_address(tensor)
            torch.compiler.cudagraph_mark_step_begin()  # the last call's output is no longer read
        try:
            return self.cached_step(**prepared)
        except _compile_errors() as error:
            raise _compile_failed(error, self.compile_mode) from error

    def _randn(self) -> torch.Tensor:
        shape = (self.batch, LATENT_CHANNELS, self.frames_per_block, *self.latent_size)
        return torch.randn(shape, generator=self.noise, device=self.device, dtype=torch.float32)

    def _cond_block(self, start: int) -> torch.Tensor:
        """The block's conditions in the stream's buffer: frames start.. of cond_concat, those
        past its end held at its last frame."""
        available = self.cond_concat.shape[2]
        end = start + self.frames_per_block
        if end > available and available < STREAM_COND_LATENT_FRAMES:
            raise ValueError(f"cond_concat has {available} latent frames and the stream has reached frame {end - 1}; "
                             f"streaming on needs at least {STREAM_COND_LATENT_FRAMES} (from then on they no longer "
                             f"change, see wan.conditioning.STREAM_COND_LATENT_FRAMES)")
        inside = max(0, min(end, available) - start)
        if inside:
            self.cond_buffer[:, :, :inside].copy_(self.cond_concat[:, :, start:start + inside])
        if inside < self.frames_per_block:
            self.cond_buffer[:, :, inside:].copy_(self.cond_concat[:, :, available - 1:available])
        return self.cond_buffer

    def _block_rows(self, name: str, cond: torch.Tensor | None) -> torch.Tensor | None:
        """The block's action rows [B, R, width] on the device from one action or R rows,
        checked on the host (values too, when they come from there)."""
        width, rows = self.action_widths[name], self.rows_for_next_block
        if width is None:
            if cond is not None:
                raise ValueError(f"this model has no {name} branch; pass {name}=None")
            return None
        if cond is None:
            raise ValueError(f"this model needs a {name} action for every block ([B, {width}] or [B, {rows}, {width}])")
        cond = torch.as_tensor(cond, dtype=torch.float32)
        if cond.dim() == 2:
            cond = cond[:, None].expand(-1, rows, -1)
        if tuple(cond.shape) != (self.batch, rows, width):
            raise ValueError(f"{name} action must be [B={self.batch}, {width}] (one for the block) or "
                             f"[B={self.batch}, {rows}, {width}] (one per frame of block {self.block_index}), "
                             f"got {list(cond.shape)}")
        if cond.device.type == "cpu" and not torch.isfinite(cond).all():
            raise ValueError(f"{name} action has non-finite values")
        return to_device_without_waiting(cond, self.device)
