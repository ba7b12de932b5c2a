"""Rotary position embeddings: the 3-D RoPE of self-attention and the 1-D action RoPE.

Both rotate consecutive element pairs (2k, 2k+1) of a head as complex numbers
(a + ib) * (cos + i sin). A table holds, per position, one angle per pair; an axis with
n pairs turns pair k at position p by p * theta^(-k/n). Tables are built in float64 and
stored as float32 cos/sin, once per (shape, start frame, device): every block reuses them.
A stream (StreamRope) keeps the parts that do not move on its device and turns the frame
axis by a position held there, so its blocks need no table from the host.

A streaming model rotates its frames by their absolute position in the stream
(`first_frame`). The reference's tables end at frame 1024 (self-attention) and 7500
(action); we compute the angles of any position in float64 instead (exact to ~1e-16
relative, so a frame a million positions in still gets its angle to ~1e-10 rad). Since
attention only sees the difference of two rotations, a stream of any length then
behaves as one that starts at frame 0.
"""

import functools

import torch

VIDEO_ROPE_THETA = 10000.0
VIDEO_ROPE_MAX_POSITIONS = 1024  # the reference's table: each grid side of one call stays below it


def axis_frequencies(num_pairs: int, theta: float) -> torch.Tensor:
    """[num_pairs] float64 turns per position of an axis's pairs: theta^(-k/num_pairs)."""
    k = torch.arange(num_pairs, dtype=torch.float64)
    return theta ** (-k / num_pairs)


def axis_angles(positions: torch.Tensor, num_pairs: int, theta: float) -> torch.Tensor:
    """[P] positions -> [P, num_pairs] angles p * theta^(-k/num_pairs), float64."""
    return positions.to(torch.float64)[:, None] * axis_frequencies(num_pairs, theta).to(positions.device)


def video_rope_pairs(head_dim: int) -> tuple[int, int, int]:
    """Pairs per axis (frame, row, column) of a self-attention head: 128 -> (22, 21, 21)."""
    pairs = head_dim // 2
    return pairs - 2 * (pairs // 3), pairs // 3, pairs // 3


def check_token_grid(f: int, h: int, w: int) -> None:
    for name, size in (("frames", f), ("rows", h), ("columns", w)):
        if size > VIDEO_ROPE_MAX_POSITIONS:
            raise ValueError(f"token grid has {size} {name}; the model's RoPE covers "
                             f"{VIDEO_ROPE_MAX_POSITIONS} positions per axis")


def video_rope_angles(f: int, h: int, w: int, head_dim: int, first_frame: int = 0) -> torch.Tensor:
    """[f*h*w, head_dim/2] float64 angles for frame-major tokens t*h*w + i*w + j, frame t at
    position first_frame + t."""
    check_token_grid(f, h, w)
    n_t, n_h, n_w = video_rope_pairs(head_dim)
    per_axis = [
        axis_angles(torch.arange(size) + start, n, VIDEO_ROPE_THETA)
        for size, n, start in ((f, n_t, first_frame), (h, n_h, 0), (w, n_w, 0))
    ]
    grid = torch.cat([
        per_axis[0][:, None, None, :].expand(f, h, w, n_t),
        per_axis[1][None, :, None, :].expand(f, h, w, n_h),
        per_axis[2][None, None, :, :].expand(f, h, w, n_w),
    ], dim=-1)
    return grid.reshape(f * h * w, head_dim // 2)


def action_rope_angles(num_frames: int, rope_dim_list, theta: float, first_frame: int = 0) -> torch.Tensor:
    """[F, head_dim/2] float64 angles of the action RoPE, frame f at position first_frame + f.

    The reference builds a (frames, 1, 1) position grid, so only the first rope_dim_list[0]
    dims turn (with the latent-frame index); the other two axes sit at position 0.
    """
    turning = axis_angles(torch.arange(num_frames) + first_frame, rope_dim_list[0] // 2, theta)
    still = torch.zeros(num_frames, sum(rope_dim_list[1:]) // 2, dtype=torch.float64)
    return torch.cat([turning, still], dim=-1)


def cached_table(build):
    """Memoise a table builder on its (hashable) arguments, shape and device included.

    Tables are built outside inference mode: one first made during a preview must still
    serve a later training step.
    """
    @functools.lru_cache(maxsize=32)
    @functools.wraps(build)
    def cached(*args):
        with torch.inference_mode(False), torch.no_grad():
            return build(*args)

    return cached


def cos_sin(angles: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 angles -> float32 (cos, sin) on device."""
    return angles.cos().to(device, torch.float32), angles.sin().to(device, torch.float32)


@cached_table
def video_rope_table(f: int, h: int, w: int, head_dim: int, device,
                     first_frame: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 (cos, sin), each [f*h*w, 1, head_dim/2] (broadcast over heads)."""
    cos, sin = cos_sin(video_rope_angles(f, h, w, head_dim, first_frame), device)
    return cos[:, None], sin[:, None]


class StreamRope:
    """The self-attention RoPE of a stream's blocks, made once per stream on its device.

    The rows' and columns' angles are the same for every block, so their cos/sin are kept;
    the frame axis turns with the block's absolute position, which `at` reads from a latent
    frame index held on the device. A block then needs no table from the host and no host
    copy, and a compiled block sees the same graph at every position. The numbers are those
    of video_rope_table: the same float64 angles, cos/sin rounded to float32.
    """

    def __init__(self, h: int, w: int, head_dim: int, device):
        check_token_grid(1, h, w)
        self.h, self.w, self.half = h, w, head_dim // 2
        n_t, n_h, n_w = video_rope_pairs(head_dim)
        rows = axis_angles(torch.arange(h), n_h, VIDEO_ROPE_THETA)[:, None, :].expand(h, w, n_h)
        columns = axis_angles(torch.arange(w), n_w, VIDEO_ROPE_THETA)[None, :, :].expand(h, w, n_w)
        self.grid_cos, self.grid_sin = cos_sin(torch.cat([rows, columns], dim=-1).reshape(h * w, n_h + n_w), device)
        self.frame_frequencies = axis_frequencies(n_t, VIDEO_ROPE_THETA).to(device)

    def tensors(self) -> list[torch.Tensor]:
        return [self.grid_cos, self.grid_sin, self.frame_frequencies]

    def at(self, position: torch.Tensor, f: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [f*h*w, 1, head_dim/2] float32 of f frames from latent frame `position`
        (a 0-d integer tensor on the device)."""
        check_token_grid(f, self.h, self.w)
        frames = position + torch.arange(f, device=position.device)
        angles = frames.to(torch.float64)[:, None] * self.frame_frequencies
        hw, n_t = self.h * self.w, self.frame_frequencies.shape[0]
        tables = []
        for frame_part, grid in ((angles.cos().float(), self.grid_cos), (angles.sin().float(), self.grid_sin)):
            table = torch.cat([frame_part[:, None, :].expand(f, hw, n_t), grid[None].expand(f, hw, self.half - n_t)],
                              dim=-1)
            tables.append(table.reshape(f * hw, 1, self.half))
        return tables[0], tables[1]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (2k, 2k+1) of x's last dim by the table's angles, in float32.

    cos/sin broadcast against x's shape with the last dim halved.
    """
    a, b = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((a * cos - b * sin, a * sin + b * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)
