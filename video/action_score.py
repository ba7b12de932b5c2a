"""Action-following score: does the image motion of a video agree with its keys and mouse?

For every pair of consecutive frames we estimate the global motion - a shift (dx, dy) in
pixels and a zoom factor - and compare it with the actions commanded over that pair.

Conventions (image x to the right, y down; frame t -> frame t+1):
  * dx > 0 means the content moves right: frame[t+1](x, y) ~ frame[t](x - dx, y - dy).
  * zoom > 1 means the content expands about the centre.
A first-person camera therefore gives:
  * W (forward) -> zoom > 1; S (back) -> zoom < 1;
  * A (strafe left) -> dx > 0; D (strafe right) -> dx < 0: the scene slides the other way;
  * mouse yaw > 0 (turn right) -> dx < 0; mouse pitch > 0 (look up) -> dy > 0.
The mouse columns follow Matrix-Game: mouse[:, 0] is pitch (up positive), mouse[:, 1]
is yaw (right positive). The pair t -> t+1 is commanded by the mean of rows t and t+1,
so a one-row offset between inputs and frames only matters where an action starts or
stops.

Method, on grayscale frames downscaled (area average) to at most ANALYSIS_WIDTH pixels:
1. Phase correlation of the whole Hann-windowed frames gives a first shift. The whitened
   cross-power spectrum is weighted by a Gaussian low-pass: its highest frequencies carry
   aliasing and interpolation error, not motion. Peaks are located on a 0.1 px grid
   around the integer peak by evaluating the inverse DFT there (as in Guizar-Sicairos et
   al. 2008), then by a parabola on that grid. (A parabola through the integer samples
   is biased by 0.1-0.2 px; Foroosh's closed form jumps by +-0.1 px where the peak is broad.)
2. Twice: the second frame is warped back by the current estimate, overlapping blocks are
   matched by phase correlation, and a similarity motion u = tx + s*x - r*y,
   v = ty + s*y + r*x (x, y from the centre) is fitted to the residual block shifts by
   least squares weighted by the peak heights, then refitted without outlier blocks.
   shift = (tx, ty); zoom = 1 + s. Warping back makes the residual small, where the
   shared window's pull of block peaks towards zero vanishes.
Why the divergence of a flow field for zoom: walking forward in a 3-D scene is not a
uniform zoom: near things expand faster than far ones and the sky not at all.
Log-polar (Fourier-Mellin) correlation assumes one scale for the whole image and loses
the small per-frame scale changes (~1%) in its log-radius sampling; the flow divergence
averages whatever expansion there is, so its sign stays right under parallax.
"""

import math

import torch
import torch.nn.functional as F

ANALYSIS_WIDTH = 160
MAX_BLOCK = 32
UPSAMPLE = 10
# Gaussian weight (sigma in cycles per pixel) on the whitened cross-power spectrum: the
# highest frequencies carry aliasing and interpolation error, not motion.
LOW_PASS_SIGMA = 0.15
MOUSE_PITCH, MOUSE_YAW = 0, 1


def grayscale_small(frames: torch.Tensor, max_width: int = ANALYSIS_WIDTH) -> tuple[torch.Tensor, int]:
    """RGB [T, 3, H, W] -> float32 luma [T, H/f, W/f] and the integer downscale factor f."""
    factor = max(1, math.ceil(frames.shape[-1] / max_width))
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32, device=frames.device)
    gray = (frames.float() * luma.view(1, 3, 1, 1)).sum(1, keepdim=True)
    return F.avg_pool2d(gray, factor).squeeze(1), factor


def phase_correlation(a: torch.Tensor, b: torch.Tensor, upsample: int = UPSAMPLE
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shift of b relative to a over the last two dims, b(x) ~ a(x - d): (dx, dy, peak height).

    Batched over leading dims. The integer peak is refined on a grid 1/upsample pixel fine
    around it, evaluating the inverse DFT there (band-limited interpolation of the
    correlation surface), then by a parabola through the finest samples. The peak height
    (<= 1) measures how well a shifted copy explains the pair.
    """
    height, width = a.shape[-2:]
    window = torch.outer(torch.hann_window(height, periodic=False, dtype=a.dtype, device=a.device),
                         torch.hann_window(width, periodic=False, dtype=a.dtype, device=a.device))
    a = (a - a.mean((-2, -1), keepdim=True)) * window
    b = (b - b.mean((-2, -1), keepdim=True)) * window
    cross = torch.fft.fft2(b) * torch.fft.fft2(a).conj()
    weight = _low_pass(height, width, a)
    cross = cross / (cross.abs() + 1e-12) * (weight / weight.mean())  # a perfect match peaks at 1
    flat = torch.fft.ifft2(cross).real.flatten(-2).argmax(-1)
    coarse_y = _signed(flat // width, height).to(a.dtype)
    coarse_x = _signed(flat % width, width).to(a.dtype)

    steps = torch.arange(-upsample, upsample + 1, dtype=a.dtype, device=a.device) / upsample

    def inverse_dft_rows(centre, size):
        """[..., 2U+1, size]: exp(2 pi i k p / size) at positions p = centre + steps."""
        frequencies = torch.fft.fftfreq(size, dtype=a.dtype, device=a.device) * size
        positions = centre[..., None] + steps
        return torch.exp(2j * math.pi * positions[..., None] * frequencies / size)

    rows, cols = inverse_dft_rows(coarse_y, height), inverse_dft_rows(coarse_x, width)
    fine = (rows @ cross @ cols.transpose(-1, -2)).real / (height * width)  # [..., 2U+1, 2U+1]
    side = 2 * upsample + 1
    best = fine.flatten(-2).argmax(-1)
    iy, ix = (best // side).clamp(1, side - 2), (best % side).clamp(1, side - 2)

    def sample(dy, dx):
        return fine.flatten(-2).gather(-1, ((iy + dy) * side + ix + dx).unsqueeze(-1)).squeeze(-1)

    peak = sample(0, 0)

    def vertex(before, after):
        curvature = (before - 2 * peak + after).clamp(max=-1e-12)
        return ((before - after) / (2 * curvature)).clamp(-0.5, 0.5)

    dy = coarse_y + (iy - upsample + vertex(sample(-1, 0), sample(1, 0))) / upsample
    dx = coarse_x + (ix - upsample + vertex(sample(0, -1), sample(0, 1))) / upsample
    return dx, dy, peak


def _low_pass(height: int, width: int, like: torch.Tensor) -> torch.Tensor:
    fy = torch.fft.fftfreq(height, dtype=like.dtype, device=like.device)[:, None]
    fx = torch.fft.fftfreq(width, dtype=like.dtype, device=like.device)[None]
    return torch.exp(-(fx**2 + fy**2) / (2 * LOW_PASS_SIGMA**2))


def _signed(index: torch.Tensor, size: int) -> torch.Tensor:
    """FFT index -> signed shift in (-size/2, size/2]."""
    return torch.where(index > size // 2, index - size, index)


def _blocks(gray: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """[P, H, W] -> [P, rows, cols, size, size] overlapping blocks."""
    return gray.unfold(-2, size, stride).unfold(-2, size, stride)


def _centred_grid(height: int, width: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ys = torch.arange(height, dtype=like.dtype, device=like.device) - (height - 1) / 2
    xs = torch.arange(width, dtype=like.dtype, device=like.device) - (width - 1) / 2
    return torch.meshgrid(ys, xs, indexing="ij")


def _warp_back(b: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Sample b [P, H, W] at p + motion(p), so a frame that moved by `params` is moved back."""
    height, width = b.shape[-2:]
    y, x = _centred_grid(height, width, b)
    tx, ty, s, r = (params[:, i, None, None] for i in range(4))
    source_x = x + tx + s * x - r * y
    source_y = y + ty + s * y + r * x
    grid = torch.stack([source_x * 2 / width, source_y * 2 / height], -1)  # centred pixels -> [-1, 1]
    return F.grid_sample(b.unsqueeze(1), grid, mode="bicubic", padding_mode="border",
                         align_corners=False).squeeze(1)


def fit_block_motion(a: torch.Tensor, b: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Refine a similarity motion [P, 4] = (tx, ty, s, r) of pairs a -> b [P, H, W].

    b is warped back by the current estimate, overlapping blocks are matched by phase
    correlation, and the residual motion is fitted, weighted by the peak heights, then
    refitted without outlier blocks. Returns the refined [P, 4].
    """
    height, width = a.shape[-2:]
    size = min(MAX_BLOCK, 2 ** int(math.log2(min(height, width) / 2)))
    stride = size // 2
    dx, dy, peak = phase_correlation(_blocks(a, size, stride), _blocks(_warp_back(b, params), size, stride))
    y, x = (_blocks(t, size, stride).mean((-2, -1)).reshape(-1) for t in _centred_grid(height, width, a))
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    design = torch.cat([torch.stack([one, zero, x, -y], 1), torch.stack([zero, one, y, x], 1)])  # [2B, 4]
    flow = torch.cat([dx.flatten(1), dy.flatten(1)], 1)  # [P, 2B]
    weight = peak.flatten(1).clamp(min=0).repeat(1, 2)

    def fit(weight):
        root = weight.sqrt()
        delta = torch.linalg.lstsq(design * root.unsqueeze(-1), (flow * root).unsqueeze(-1)).solution[..., 0]
        residual = flow - delta @ design.T
        return delta, residual[:, : x.numel()].hypot(residual[:, x.numel():])

    delta, residual = fit(weight)
    limit = (3 * residual.median(1, keepdim=True).values).clamp(min=0.5)
    delta, _ = fit(weight * (residual <= limit).repeat(1, 2).to(weight.dtype))
    return params + delta


def estimate_motion(frames: torch.Tensor, refinements: int = 2) -> dict[str, torch.Tensor]:
    """Frames [T, 3, H, W] -> per pair t -> t+1: dx, dy (pixels of the input) and zoom, each [T-1]."""
    if frames.ndim != 4 or frames.shape[1] != 3 or frames.shape[0] < 2:
        raise ValueError(f"expected RGB frames [T >= 2, 3, H, W], got {list(frames.shape)}")
    gray, factor = grayscale_small(frames)
    if min(gray.shape[-2:]) < 16:
        raise ValueError(f"frames of {frames.shape[-2]}x{frames.shape[-1]} are too small for motion "
                         f"analysis (need at least 16 pixels per side after downscaling by {factor})")
    a, b = gray[:-1], gray[1:]
    dx, dy, _ = phase_correlation(a, b)
    params = torch.stack([dx, dy, torch.zeros_like(dx), torch.zeros_like(dx)], 1)
    for _ in range(refinements):
        params = fit_block_motion(a, b, params)
    return {"dx": params[:, 0] * factor, "dy": params[:, 1] * factor, "zoom": 1 + params[:, 2]}


def mean_shift(motion: dict) -> float:
    """Mean length of the per-pair shift (dx, dy) in pixels of estimate_motion's output (or a
    score's "motion"): how far a video's content moves per frame pair, whichever way. Only as
    good as those estimates: between frames whose pictures differ in shape, not just in place
    (a morphing blur's, four frames apart), they can read a large shift where nothing moved."""
    return float(torch.as_tensor(motion["dx"], dtype=torch.float64).hypot(
        torch.as_tensor(motion["dy"], dtype=torch.float64)).mean())


def _agreement(measured: torch.Tensor, command: torch.Tensor, deadzone: float) -> dict:
    """Shares of the commanded pairs (weighted by |command|) moving the commanded way and the other way."""
    weight = command.abs()
    total = float(weight.sum())
    if total == 0:
        return {"pairs": 0, "weight": 0.0, "agree": None, "oppose": None}
    along = measured * command.sign()
    return {"pairs": int((weight > 0).sum()), "weight": total,
            "agree": float((weight * (along > deadzone)).sum()) / total,
            "oppose": float((weight * (along < -deadzone)).sum()) / total}


def _correlation(x: torch.Tensor, y: torch.Tensor) -> float | None:
    if x.numel() < 3 or x.std() < 1e-9 or y.std() < 1e-9:
        return None
    return float(torch.corrcoef(torch.stack([x, y]))[0, 1])


def format_share(value: float | None) -> str:
    """A score or share as printed in previews and run summaries: two decimals, or n/a."""
    return "n/a" if value is None else f"{value:.2f}"


def action_following_score(frames: torch.Tensor, keyboard: torch.Tensor, mouse: torch.Tensor,
                           keyboard_keys=("W", "S", "A", "D"), *, min_shift: float = 0.5,
                           min_zoom: float = 0.002, min_mouse: float = 0.01) -> dict:
    """How well the motion of frames [T, 3, H, W] follows keyboard [T, K] and mouse [T, 2].

    The command of the pair t -> t+1 is the mean of rows t and t+1 (a key held in one of
    them counts half). Per action kind, over the pairs where it is commanded, weighted by
    the command's strength: `agree` = share whose motion has the commanded sign by more
    than the deadzone (min_shift pixels, min_zoom, mouse beyond min_mouse), `oppose` =
    share with the opposite sign; `pairs` counts them and `weight` sums the strengths.
    A static video scores 0, motion unrelated to the actions about half its moving share.
    Kinds: forward_back (W - S -> zoom), strafe (A - D -> dx, pairs without mouse yaw),
    yaw (-yaw -> dx, pairs without A or D) and pitch (pitch -> dy). yaw and pitch also give
    the correlation of the mean mouse value with the measured shift over the pairs
    without A or D. `overall` pools the kinds: their agree rates weighted by `weight`
    (None when nothing is commanded). `motion` holds the per-pair measurements.
    """
    frames, keyboard, mouse = frames.detach().cpu(), keyboard.detach().cpu(), mouse.detach().cpu()
    t = frames.shape[0]
    if keyboard.ndim != 2 or keyboard.shape != (t, len(keyboard_keys)):
        raise ValueError(f"keyboard must be [T={t}, K={len(keyboard_keys)}] for keys {tuple(keyboard_keys)}, "
                         f"got {list(keyboard.shape)}")
    if mouse.shape != (t, 2):
        raise ValueError(f"mouse must be [T={t}, 2] (pitch, yaw), got {list(mouse.shape)}")
    motion = estimate_motion(frames)
    dx, dy, log_zoom = motion["dx"].double(), motion["dy"].double(), motion["zoom"].double().log()

    pressed = (keyboard.double() > 0.5).double()
    pair_keys = (pressed[:-1] + pressed[1:]) / 2
    pair_mouse = (mouse[:-1].double() + mouse[1:].double()) / 2
    pitch, yaw = pair_mouse[:, MOUSE_PITCH], pair_mouse[:, MOUSE_YAW]

    def key(name: str) -> torch.Tensor:
        if name not in keyboard_keys:
            return torch.zeros(t - 1, dtype=torch.float64)
        return pair_keys[:, list(keyboard_keys).index(name)]

    def mouse_command(value: torch.Tensor) -> torch.Tensor:
        return torch.where(value.abs() > min_mouse, value.sign(), torch.zeros_like(value))

    strafe = key("A") - key("D")
    no_strafe_key = (key("A") == 0) & (key("D") == 0)
    no_yaw = yaw.abs() <= min_mouse
    kinds = {
        "forward_back": _agreement(log_zoom, key("W") - key("S"), math.log1p(min_zoom)),
        "strafe": _agreement(dx, strafe * no_yaw, min_shift),
        "yaw": _agreement(dx, -mouse_command(yaw) * no_strafe_key, min_shift),
        "pitch": _agreement(dy, mouse_command(pitch), min_shift),
    }
    kinds["yaw"]["correlation"] = _correlation(-yaw[no_strafe_key], dx[no_strafe_key])
    kinds["pitch"]["correlation"] = _correlation(pitch[no_strafe_key], dy[no_strafe_key])
    total = sum(kind["weight"] for kind in kinds.values())
    overall = sum(kind["weight"] * kind["agree"] for kind in kinds.values() if kind["pairs"]) / total if total else None
    return {
        **kinds,
        "overall": overall,
        "motion": {name: [round(float(v), 4) for v in values] for name, values in motion.items()},
    }
