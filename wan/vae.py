"""The Wan2.1 causal 3-D video VAE (VAE_CLIP_SPEC Part A), encoder and decoder.

Video [B, 3, 1+4k, H, W] in [-1, 1] <-> normalised latents [B, 16, 1+k, H/8, W/8].
Time is causal everywhere: every temporal conv pads only at the front, so a latent
frame depends on its own and earlier frames only. `encode` runs the encoder on frame 0
alone and then on chunks of 4 frames, and `decode` runs the decoder one latent frame at
a time; a `CausalState` carries the last frames each temporal conv saw from one chunk to
the next. `encode_single_pass` / `decode_single_pass` compute the same thing in one pass
over the whole sequence (A.4's "single-pass equivalent"); they hold every frame's
activations at once and exist to check the chunked path.
"""

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan.device import to_device_without_waiting
from wan.files import load_torch_checkpoint, torch_save_atomic
from wan.shapes import LATENT_CHANNELS, VAE_SPACE_STRIDE, VAE_TIME_STRIDE, check_frame_count

DEFAULT_VAE_PATH = Path("models") / "Wan2.1_VAE.pth"
VAE_DOWNLOAD_HINT = (
    "the official file is Wan2.1_VAE.pth from the Hugging Face repo Skywork/Matrix-Game-2.0 "
    f"(also in Wan-AI/Wan2.1-I2V-14B-480P); put it at {DEFAULT_VAE_PATH} or pass its path"
)

# Per-channel statistics of the raw latent (mu): encode returns (mu - mean) / std.
LATENT_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
               0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENT_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
              3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

SILU_SECOND_MOMENT = 0.3557  # E[silu(z)^2] for z ~ N(0, 1)
CACHE_FRAMES = 2  # a 3-tap temporal conv needs the 2 frames before its chunk


@dataclass(frozen=True)
class VAEConfig:
    dim: int = 96
    z_dim: int = LATENT_CHANNELS
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2  # per encoder stage; the decoder has one more
    temporal_downsample: tuple[bool, ...] = (False, True, True)

    def __post_init__(self):
        if self.z_dim != len(LATENT_MEAN):
            raise ValueError(f"z_dim must be {len(LATENT_MEAN)} (one latent mean/std per channel), got {self.z_dim}")
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError("temporal_downsample needs one flag per downsampling stage (len(dim_mult) - 1)")
        if 2 ** (len(self.dim_mult) - 1) != VAE_SPACE_STRIDE or 2 ** sum(self.temporal_downsample) != VAE_TIME_STRIDE:
            raise ValueError(f"the VAE must downsample space by {VAE_SPACE_STRIDE} and time by {VAE_TIME_STRIDE} "
                             f"(wan/shapes.py); dim_mult={self.dim_mult}, temporal_downsample={self.temporal_downsample}")

    @classmethod
    def tiny(cls) -> "VAEConfig":
        """Same structure at 1/12 of the width: for CPU tests and the demo."""
        return cls(dim=8)

    @classmethod
    def from_state_dict(cls, state_dict: dict, source: str = "the state dict") -> "VAEConfig":
        """Read dim and z_dim off the tensor shapes, then check every key and shape."""
        for key in ("encoder.conv1.weight", "conv2.weight"):
            if key not in state_dict:
                raise ValueError(f"{source} is not a Wan2.1 VAE state dict: it has no '{key}' "
                                 f"({len(state_dict)} keys, e.g. {sorted(state_dict)[:3]})")
        config = cls(dim=state_dict["encoder.conv1.weight"].shape[0], z_dim=state_dict["conv2.weight"].shape[0])
        check_state_dict(state_dict, expected_state_shapes(config), f"{source} (read as {config})")
        return config


def expected_state_shapes(config: VAEConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        return {key: tuple(t.shape) for key, t in WanVAE(config).state_dict().items()}


def check_state_dict(state_dict: dict, expected: dict[str, tuple[int, ...]], source: str) -> None:
    """Raise one ValueError listing every missing, unexpected and mis-shaped key."""
    found = {key: tuple(t.shape) for key, t in state_dict.items()}
    missing = [f"{k} (expected {list(s)})" for k, s in expected.items() if k not in found]
    unexpected = [f"{k} {list(s)}" for k, s in found.items() if k not in expected]
    misshaped = [f"{k}: expected {list(expected[k])}, found {list(s)}"
                 for k, s in found.items() if k in expected and expected[k] != s]
    problems = [f"{title} ({len(items)}):\n    " + "\n    ".join(items)
                for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                                     ("wrong shapes", misshaped)) if items]
    if problems:
        raise ValueError(f"{source} does not match the Wan2.1 VAE layout:\n  " + "\n  ".join(problems))


# ----------------------------------------------------------------------------- causal state

@dataclass
class Slot:
    frames: torch.Tensor | None = None  # last input frames seen, or None before the first chunk


@dataclass
class CausalState:
    """What each temporal conv remembers between chunks, one slot per conv in execution order.

    Start a fresh state per encode/decode call and call `next_chunk` before each chunk.
    (24 slots fill up in the encoder, 32 in the decoder.)
    """
    slots: list[Slot] = field(default_factory=list)
    position: int = 0

    def next_chunk(self) -> None:
        self.position = 0

    def next_slot(self) -> Slot:
        if self.position == len(self.slots):
            self.slots.append(Slot())
        self.position += 1
        return self.slots[self.position - 1]


def next_slot(state: CausalState | None) -> Slot | None:
    return None if state is None else state.next_slot()


def with_history(x: torch.Tensor, slot: Slot | None) -> torch.Tensor:
    """Put the CACHE_FRAMES frames that precede x in front of it and remember x's tail.

    Before the first chunk (and in a single pass) the preceding frames are zeros, so running
    chunk after chunk equals one causal conv over the whole sequence.
    """
    if slot is None or slot.frames is None:
        history = x.new_zeros(*x.shape[:2], CACHE_FRAMES, *x.shape[3:])
    else:
        history = slot.frames
    padded = torch.cat([history, x], dim=2)
    if slot is not None:
        slot.frames = padded[:, :, -CACHE_FRAMES:].clone()
    return padded


# ----------------------------------------------------------------------------- primitives

class CausalConv3d(nn.Conv3d):
    """Conv with a 3-frame kernel padded by 2 frames at the front only (A.2); spatial padding as usual."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size=(3, 3, 3), padding=(1, 1, 1)):
        kt, _, _ = kernel_size
        assert kt == CACHE_FRAMES + 1 and padding[0] == 1, "only 3-frame causal kernels occur in this VAE"
        super().__init__(in_dim, out_dim, kernel_size, padding=(0, *padding[1:]))

    def forward(self, x: torch.Tensor, slot: Slot | None = None) -> torch.Tensor:
        return super().forward(with_history(x, slot))

    def reset_parameters(self) -> None:
        """Random init as a per-frame conv: a Conv2d's default init on the current-frame tap,
        zero on the two past taps, so that a random VAE keeps each frame's content local in time."""
        current = torch.empty_like(self.weight[:, :, -1])
        nn.init.kaiming_uniform_(current, a=math.sqrt(5))  # nn.Conv2d's default
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, :, -1] = current
            self.bias.zero_()


class FrameConv2d(nn.Conv2d):
    """A 2-D conv applied to every frame of [B, C, T, H, W]; the weight keeps its 4-D checkpoint shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv3d(x, self.weight.unsqueeze(2), self.bias, (1, *self.stride), (0, *self.padding))


class PadRightBottom(nn.Module):
    """The downsampling conv sees one extra zero row/column at the bottom/right, none at the top/left."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, 1, 0, 1))


class Upsample2x(nn.Module):
    """Nearest-neighbour x2 in H and W, frame by frame."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x, scale_factor=(1, 2, 2), mode="nearest")


class RMSNorm(nn.Module):
    """L2-normalise over channels at every position, times sqrt(C) and a per-channel gamma (no bias)."""

    def __init__(self, dim: int, gamma_dims: int = 3):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(dim, *(1,) * gamma_dims))  # checkpoint shape [C,1,1,1] or [C,1,1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # = F.normalize(x, dim=1) * scale * gamma, in two full-size passes and one allocation
        inv_norm = torch.linalg.vector_norm(x, dim=1, keepdim=True).clamp_min(1e-12).reciprocal()
        return (x * inv_norm).mul_(self.scale * self.gamma.view(-1, *(1,) * (x.ndim - 2)))


class ResidualBlock(nn.Module):
    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        # Indices follow the checkpoint keys; 5 is the reference's p=0 dropout.
        self.residual = nn.ModuleList([
            RMSNorm(in_dim), nn.SiLU(inplace=True), CausalConv3d(in_dim, out_dim),
            RMSNorm(out_dim), nn.SiLU(inplace=True), nn.Identity(), CausalConv3d(out_dim, out_dim)])
        self.shortcut = nn.Conv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, state: CausalState | None = None) -> torch.Tensor:
        r = self.residual
        h = r[2](r[1](r[0](x)), next_slot(state))
        h = r[6](r[5](r[4](r[3](h))), next_slot(state))
        return h.add_(self.shortcut(x))


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H*W positions of each frame; no mixing across time."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, gamma_dims=2)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, state: CausalState | None = None) -> torch.Tensor:
        """state is unused (attention never looks across frames); it keeps the block signature."""
        b, c, t, h, w = x.shape
        tokens = self.norm(x).permute(0, 2, 3, 4, 1).reshape(b * t, 1, h * w, c)
        q, k, v = F.linear(tokens, self.to_qkv.weight.flatten(1), self.to_qkv.bias).chunk(3, dim=-1)
        out = F.linear(F.scaled_dot_product_attention(q, k, v), self.proj.weight.flatten(1), self.proj.bias)
        return x + out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)


class Resample(nn.Module):
    """x2 spatial down/upsampling per frame, optionally with x2 temporal down/upsampling (A.2, A.4)."""

    def __init__(self, dim: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode in ("downsample2d", "downsample3d"):
            self.resample = nn.Sequential(PadRightBottom(), FrameConv2d(dim, dim, 3, stride=2))
        elif mode in ("upsample2d", "upsample3d"):
            self.resample = nn.Sequential(Upsample2x(), FrameConv2d(dim, dim // 2, 3, padding=1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "downsample3d":
            self.time_conv = nn.Conv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        elif mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, state: CausalState | None = None) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._double_frames(x, next_slot(state))
        x = self.resample(x)
        if self.mode == "downsample3d":
            x = self._halve_frames(x, next_slot(state))
        return x

    def _halve_frames(self, x: torch.Tensor, slot: Slot | None) -> torch.Tensor:
        """Frame 0 passes through; output j >= 1 is time_conv over input frames 2j-2, 2j-1, 2j."""
        if slot is None:  # whole sequence at once
            return x if x.shape[2] == 1 else torch.cat([x[:, :, :1], self.time_conv(x)], dim=2)
        previous = slot.frames
        slot.frames = x[:, :, -1:].clone()
        return x if previous is None else self.time_conv(torch.cat([previous, x], dim=2))

    def _double_frames(self, x: torch.Tensor, slot: Slot | None) -> torch.Tensor:
        """Latent frame 0 passes through as one frame and never enters a later time window;
        every later frame becomes two, from a causal conv that sees zeros in place of frame 0."""
        if slot is None:  # whole sequence at once
            if x.shape[2] == 1:
                return x
            return torch.cat([x[:, :, :1], interleave_time(self.time_conv(x[:, :, 1:]))], dim=2)
        if slot.frames is None:
            slot.frames = x.new_zeros(*x.shape[:2], CACHE_FRAMES, *x.shape[3:])
            return x
        return interleave_time(self.time_conv(x, slot))


def interleave_time(x: torch.Tensor) -> torch.Tensor:
    """[B, 2C, T, H, W] -> [B, C, 2T, H, W]: frame 2t from channels [0, C), frame 2t+1 from [C, 2C)."""
    b, c2, t, h, w = x.shape
    return x.view(b, 2, c2 // 2, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c2 // 2, 2 * t, h, w)


# ----------------------------------------------------------------------------- encoder / decoder

def _run(layers: nn.ModuleList, x: torch.Tensor, state: CausalState | None) -> torch.Tensor:
    for layer in layers:
        x = layer(x, state)
    return x


class Encoder3d(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        dims = [config.dim * m for m in (1, *config.dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0])
        layers = []
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(config.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage < len(config.temporal_downsample):
                layers.append(Resample(out_dim, "downsample3d" if config.temporal_downsample[stage] else "downsample2d"))
        self.downsamples = nn.ModuleList(layers)
        self.middle = nn.ModuleList([ResidualBlock(dims[-1], dims[-1]), AttentionBlock(dims[-1]),
                                     ResidualBlock(dims[-1], dims[-1])])
        self.head = nn.ModuleList([RMSNorm(dims[-1]), nn.SiLU(inplace=True), CausalConv3d(dims[-1], config.z_dim * 2)])

    def forward(self, x: torch.Tensor, state: CausalState | None = None) -> torch.Tensor:
        x = self.conv1(x, next_slot(state))
        x = _run(self.middle, _run(self.downsamples, x, state), state)
        return self.head[2](self.head[1](self.head[0](x)), next_slot(state))


class Decoder3d(nn.Module):
    def __init__(self, config: VAEConfig):
        super().__init__()
        mult = config.dim_mult
        dims = [config.dim * m for m in (mult[-1], *reversed(mult))]
        temporal_upsample = tuple(reversed(config.temporal_downsample))
        self.conv1 = CausalConv3d(config.z_dim, dims[0])
        self.middle = nn.ModuleList([ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                     ResidualBlock(dims[0], dims[0])])
        layers = []
        for stage, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if stage > 0:
                in_dim //= 2  # the previous stage's upsampling conv halved the channels
            for _ in range(config.num_res_blocks + 1):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if stage < len(temporal_upsample):
                layers.append(Resample(out_dim, "upsample3d" if temporal_upsample[stage] else "upsample2d"))
        self.upsamples = nn.ModuleList(layers)
        self.head = nn.ModuleList([RMSNorm(dims[-1]), nn.SiLU(inplace=True), CausalConv3d(dims[-1], 3)])

    def forward(self, x: torch.Tensor, state: CausalState | None = None) -> torch.Tensor:
        x = self.conv1(x, next_slot(state))
        x = _run(self.upsamples, _run(self.middle, x, state), state)
        return self.head[2](self.head[1](self.head[0](x)), next_slot(state))


# ----------------------------------------------------------------------------- tiling (A.6)

TileSize = int | Sequence[int]


def tile_starts(length: int, size: int, stride: int) -> list[int]:
    """0, stride, 2*stride, ... until a tile reaches the end of the axis."""
    starts = [0]
    while starts[-1] + size < length:
        starts.append(starts[-1] + stride)
    return starts


def blend_ramp(length: int, width: int, ramp_start: bool, ramp_end: bool) -> torch.Tensor:
    """1-D tile weight: rising (1/w, 2/w, ..., 1) over `width` positions at each inner edge, else 1."""
    weight = torch.ones(length)
    if width > 0:
        rise = torch.arange(1, width + 1, dtype=torch.float32)[:length] / width
        if ramp_start:
            weight[:len(rise)] = torch.minimum(weight[:len(rise)], rise)
        if ramp_end:
            weight[-len(rise):] = torch.minimum(weight[-len(rise):], rise.flip(0))
    return weight


def _pair(value: TileSize, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and v > 0 for v in pair):
        raise ValueError(f"{name} must be a positive int or (height, width) of positive ints, got {value!r}")
    return pair


def run_tiled(fn, x: torch.Tensor, tile: TileSize, stride: TileSize, in_scale: int, out_scale: int) -> torch.Tensor:
    """Run fn on overlapping H/W tiles of x and blend the outputs with linear ramps (A.6).

    tile and stride are in latent units; in_scale / out_scale are the pixels per latent unit of
    x and of fn's output (8 for video, 1 for latents). Time is never split.
    """
    tile, stride = _pair(tile, "tile_latent_size"), _pair(stride, "tile_latent_stride")
    if stride[0] > tile[0] or stride[1] > tile[1]:
        raise ValueError(f"tile_latent_stride {stride} must not exceed tile_latent_size {tile}: tiles would leave gaps")
    height, width = x.shape[-2:]
    size_h, size_w = tile[0] * in_scale, tile[1] * in_scale
    step_h, step_w = stride[0] * in_scale, stride[1] * in_scale
    ramp_h, ramp_w = (tile[0] - stride[0]) * out_scale, (tile[1] - stride[1]) * out_scale
    out = total = None
    for top in tile_starts(height, size_h, step_h):
        for left in tile_starts(width, size_w, step_w):
            y = fn(x[..., top:top + size_h, left:left + size_w])
            h, w = y.shape[-2:]
            mask = torch.minimum(
                blend_ramp(h, ramp_h, top > 0, top + size_h < height)[:, None],
                blend_ramp(w, ramp_w, left > 0, left + size_w < width)[None, :]).to(y.device)
            if out is None:
                shape = (*y.shape[:-2], height * out_scale // in_scale, width * out_scale // in_scale)
                out = torch.zeros(shape, device=y.device, dtype=torch.float32)
                total = torch.zeros(shape[-2:], device=y.device, dtype=torch.float32)
            oy, ox = top * out_scale // in_scale, left * out_scale // in_scale
            out[..., oy:oy + h, ox:ox + w] += y.float() * mask
            total[oy:oy + h, ox:ox + w] += mask
    return (out / total).to(y.dtype)


# ----------------------------------------------------------------------------- the VAE

class WanVAE(nn.Module):
    """Keys and shapes match Wan2.1_VAE.pth (reference/wan21_vae_keys.tsv)."""

    def __init__(self, config: VAEConfig = VAEConfig()):
        super().__init__()
        self._stats = {}  # (dtype, device) -> the latent mean and std there (see _latent_stats)
        self.config = config
        self.encoder = Encoder3d(config)
        self.conv1 = nn.Conv3d(config.z_dim * 2, config.z_dim * 2, 1)  # -> (mu, log_var); log_var unused
        self.conv2 = nn.Conv3d(config.z_dim, config.z_dim, 1)
        self.decoder = Decoder3d(config)
        self.reset_parameters()

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Random init for a VAE without a checkpoint (tests, the demo): latents of about unit
        scale that follow the input frame by frame.

        Biases are 0 and gammas 1, so every block sees unit-RMS features and a mid-grey video
        encodes to 0. Causal convs start as per-frame convs (see CausalConv3d.reset_parameters):
        with all temporal taps random, frame 0 dominated every later latent and a latent frame
        barely depended on its own 4 frames. The encoder head is scaled for unit-variance output,
        and the 1x1 convs around the latent map it onto the published mean/std and back, so
        normalised latents keep that scale and the decoder sees them unchanged.
        """
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Conv3d)):
                module.reset_parameters()
                nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                module.gamma.fill_(1.0)
        current_tap = self.encoder.head[2].weight[:, :, -1]
        nn.init.normal_(current_tap, std=(current_tap[0].numel() * SILU_SECOND_MOMENT) ** -0.5)
        mean, std = self._latent_stats(torch.float32)
        z = self.config.z_dim
        nn.init.zeros_(self.conv1.weight)
        nn.init.zeros_(self.conv1.bias)
        self.conv1.weight[:z, :z, 0, 0, 0] = torch.diag(std.flatten())
        self.conv1.bias[:z] = mean.flatten()
        self.conv2.weight.copy_(torch.diag(1 / std.flatten()).view(z, z, 1, 1, 1))
        self.conv2.bias.copy_(-(mean / std).flatten())

    def _latent_stats(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The latent mean and std [1, 16, 1, 1, 1], made once per dtype and device: a
        (streaming) decode then copies nothing from the host, which on a GPU would wait
        for it. Made outside inference mode, so that they serve any later call."""
        key = (dtype, self.device)
        if key not in self._stats:
            shape = (1, -1, 1, 1, 1)
            with torch.inference_mode(False), torch.no_grad():
                self._stats[key] = tuple(to_device_without_waiting(torch.tensor(values, dtype=dtype), self.device)
                                         .view(shape) for values in (LATENT_MEAN, LATENT_STD))
        return self._stats[key]

    def normalize(self, mu: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_stats(torch.float32)
        return ((mu.float() - mean) * (1.0 / std)).to(mu.dtype)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        mean, std = self._latent_stats(torch.float32)
        return (latents.float() / (1.0 / std) + mean).to(self.dtype)

    # --- encode

    def _check_video(self, video: torch.Tensor) -> torch.Tensor:
        if video.ndim != 5 or video.shape[1] != 3:
            raise ValueError(f"video must be [B, 3, T, H, W] (RGB in [-1, 1]), got {list(video.shape)}")
        check_frame_count(video.shape[2], "the video to encode")
        height, width = video.shape[-2:]
        if height % VAE_SPACE_STRIDE or width % VAE_SPACE_STRIDE:
            raise ValueError(f"video frames are {height}x{width} (HxW); the VAE needs both sides to be "
                             f"multiples of {VAE_SPACE_STRIDE}")
        return video.to(device=self.device, dtype=self.dtype)

    def _mu(self, features: torch.Tensor) -> torch.Tensor:
        z = self.config.z_dim
        return F.conv3d(features, self.conv1.weight[:z], self.conv1.bias[:z])

    def _encode_chunked(self, video: torch.Tensor) -> torch.Tensor:
        state = CausalState()
        chunks = [video[:, :, :1], *video[:, :, 1:].split(VAE_TIME_STRIDE, dim=2)] if video.shape[2] > 1 else [video]
        features = []
        for chunk in chunks:
            state.next_chunk()
            features.append(self.encoder(chunk, state))
        return self.normalize(self._mu(torch.cat(features, dim=2)))

    @torch.no_grad()
    def encode(self, video: torch.Tensor, tile_latent_size: TileSize | None = None,
               tile_latent_stride: TileSize | None = None) -> torch.Tensor:
        """[B, 3, 1+4k, H, W] in [-1, 1] -> normalised latents [B, 16, 1+k, H/8, W/8].

        Frame 0 is encoded alone, then chunks of 4 frames, so memory does not grow with T.
        With tile_latent_size (and tile_latent_stride), in latent units as (height, width) or
        one int, H and W are also split into overlapping tiles that are blended (A.6).
        The result has the VAE's dtype and device.
        """
        video = self._check_video(video)
        if tile_latent_size is None and tile_latent_stride is None:
            return self._encode_chunked(video)
        if tile_latent_size is None or tile_latent_stride is None:
            raise ValueError("tiled encoding needs both tile_latent_size and tile_latent_stride")
        return run_tiled(self._encode_chunked, video, tile_latent_size, tile_latent_stride, VAE_SPACE_STRIDE, 1)

    @torch.no_grad()
    def encode_single_pass(self, video: torch.Tensor) -> torch.Tensor:
        """encode, computed over all frames at once (A.4 single-pass equivalent); for checks."""
        return self.encode_with_grad(self._check_video(video))

    def encode_with_grad(self, video: torch.Tensor) -> torch.Tensor:
        """The single-pass encode with gradients and without input checks: for training a VAE
        (demo_world/vae_training.py). video [B, 3, 1+4k, H, W] on the VAE's device and dtype."""
        return self.normalize(self._mu(self.encoder(video)))

    # --- decode

    def _check_latents(self, latents: torch.Tensor) -> torch.Tensor:
        if latents.ndim != 5 or latents.shape[1] != self.config.z_dim:
            raise ValueError(f"latents must be [B, {self.config.z_dim}, F, h, w], got {list(latents.shape)}")
        return latents.to(device=self.device)

    def _decode_chunked(self, latents: torch.Tensor, state: CausalState | None = None) -> torch.Tensor:
        """state: the slots of the frames decoded before these (a stream), or None (a new video)."""
        x = self.conv2(self.denormalize(latents))
        state = CausalState() if state is None else state
        frames = []
        for i in range(x.shape[2]):
            state.next_chunk()
            frames.append(self.decoder(x[:, :, i:i + 1], state))
        return torch.cat(frames, dim=2)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, tile_latent_size: TileSize | None = None,
               tile_latent_stride: TileSize | None = None) -> torch.Tensor:
        """Normalised latents [B, 16, F, h, w] -> video [B, 3, 1+4(F-1), 8h, 8w] clamped to [-1, 1].

        Decodes one latent frame at a time; tiles as in `encode` (sizes in latent units).
        """
        latents = self._check_latents(latents)
        if tile_latent_size is None and tile_latent_stride is None:
            video = self._decode_chunked(latents)
        elif tile_latent_size is None or tile_latent_stride is None:
            raise ValueError("tiled decoding needs both tile_latent_size and tile_latent_stride")
        else:
            video = run_tiled(self._decode_chunked, latents, tile_latent_size, tile_latent_stride, 1, VAE_SPACE_STRIDE)
        return video.clamp_(-1, 1)

    @torch.no_grad()
    def decode_single_pass(self, latents: torch.Tensor) -> torch.Tensor:
        """decode, computed over all latent frames at once (A.4 single-pass equivalent); for checks."""
        return self.decode_with_grad(self._check_latents(latents)).clamp_(-1, 1)

    def decode_with_grad(self, latents: torch.Tensor) -> torch.Tensor:
        """The single-pass decode with gradients, unclamped: for training a VAE (see encode_with_grad)."""
        return self.decoder(self.conv2(self.denormalize(latents)))


class StreamingDecoder:
    """Decodes a stream of latent blocks as they come (STREAMING_SPEC 8).

    The decoder's temporal-cache slots (32 for the Wan2.1 decoder) are kept from one call to
    the next, so decoding blocks one after another gives exactly the whole-sequence
    `decode` of their concatenation: 1 + 4(n-1) frames for the stream's first block of n
    latent frames, 4n for every later one, in constant memory however long the stream.
    """

    def __init__(self, vae: WanVAE):
        self.vae = vae
        self.reset()

    def reset(self) -> None:
        """Start a new video: the next block's first latent frame is the video's frame 0."""
        self.state = CausalState()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, 16, n, h, w] of the next n latent frames -> video
        [B, 3, T, 8h, 8w] clamped to [-1, 1], in the VAE's dtype."""
        return self.vae._decode_chunked(self.vae._check_latents(latents), self.state).clamp_(-1, 1)


# ----------------------------------------------------------------------------- files

def read_vae_file(path) -> tuple[dict, VAEConfig]:
    """The file's tensors (memory-mapped, not read yet) and the config they fit, every key
    and shape checked. Cheap: run it before hours of work that will need the VAE."""
    path = Path(path)
    state_dict = load_torch_checkpoint(path, "VAE", VAE_DOWNLOAD_HINT)
    if not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise ValueError(f"{path} is not a plain state dict of tensors (got {type(state_dict).__name__}); "
                         f"{VAE_DOWNLOAD_HINT}")
    return state_dict, VAEConfig.from_state_dict(state_dict, source=str(path))


def load_vae(path, device="cpu", dtype: torch.dtype = torch.float32) -> WanVAE:
    """Load Wan2.1_VAE.pth (or a file written by save_vae) strictly; the size is read off the shapes."""
    state_dict, config = read_vae_file(path)
    with torch.device("meta"):
        vae = WanVAE(config)
    vae.load_state_dict(state_dict, strict=True, assign=True)
    return vae.to(device=device, dtype=dtype).eval()


def save_vae(vae: WanVAE, path) -> Path:
    """Write the state dict in the official file's format (a plain dict, no prefix), atomically."""
    return torch_save_atomic({k: v.detach().cpu().contiguous() for k, v in vae.state_dict().items()}, path)
