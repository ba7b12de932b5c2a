"""The keyboard/mouse action module that Matrix-Game adds to every Wan block.

Each latent frame f sees a window of P = r * w_s raw action frames: the P frames just
before raw frame r*f, where the sequence is front-padded with P copies of its first row
(so frame 0 sees P copies of row 0). The mouse branch mixes each token with its frame's
mouse window and attends over the F frames of its own spatial location; the keyboard
branch lets every token attend to the F embedded keyboard windows of its own sample.
Both add their result to the residual stream through output projections initialised to
zero, so a fresh module is the identity.

The streaming model runs the same module on one block of latent frames at a time, at an
absolute frame offset, with the action rows the block reads; its attention goes through
the `attention` argument (block-causal masks or the KV cache, wan/causal.py).
"""

from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from wan.config import ActionConfig
from wan.device import to_device_without_waiting
from wan.rope import action_rope_angles, apply_rope, axis_frequencies, cached_table, cos_sin
from wan.shapes import VAE_TIME_STRIDE, video_frame_count

RMS_EPS = 1e-6


def rms_normalize(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / sqrt(mean(x^2) + eps) over the last dim, computed in float32, returned float32."""
    x = x.float()
    return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps)


def action_window_rows(f: int, ratio: int, window_size: int) -> list[int]:
    """Raw action rows latent frame f sees, oldest first (front padding repeats row 0)."""
    window = ratio * window_size
    return [max(ratio * f - window + j, 0) for j in range(window)]


def action_window_lists(num_latent_frames: int, ratio: int, window_size: int, first_frame: int = 0,
                        first_row: int = 0) -> tuple[tuple[int, ...], ...]:
    """Row f = action_window_rows(first_frame + f) counted from raw row first_row (the first
    row the caller passes)."""
    return tuple(tuple(row - first_row for row in action_window_rows(f, ratio, window_size))
                 for f in range(first_frame, first_frame + num_latent_frames))


def action_window_index(num_latent_frames: int, ratio: int, window_size: int,
                        first_frame: int = 0, first_row: int = 0) -> torch.Tensor:
    """[F, P] row indices (action_window_lists): one gather for all frames."""
    return torch.tensor(action_window_lists(num_latent_frames, ratio, window_size, first_frame, first_row),
                        dtype=torch.long)


class ActionTables(NamedTuple):
    """What every block's action module needs for F latent frames (shared, cached)."""

    window_index: torch.Tensor  # [F, P] rows of the given action tensors per latent frame
    rope_cos: torch.Tensor  # [F, head_dim/2] float32
    rope_sin: torch.Tensor


@cached_table
def action_tables(config: ActionConfig, num_latent_frames: int, device, first_frame: int = 0,
                  first_row: int = 0) -> ActionTables:
    """Tables for latent frames first_frame.. (absolute, for the RoPE) given action tensors
    whose row 0 is raw row first_row."""
    index = action_window_index(num_latent_frames, config.vae_time_compression_ratio,
                                config.windows_size, first_frame, first_row)
    angles = action_rope_angles(num_latent_frames, config.rope_dim_list, config.rope_theta, first_frame)
    return ActionTables(index.to(device), *cos_sin(angles, device))


class StreamActionTables:
    """The action tables of a stream's blocks, on its device, made once per stream: the
    RoPE's frequencies, and each window index the stream needs (the block's rows relative to
    the first row it is given, which are the same for every block after the first ones).
    `at` turns them into a block's ActionTables from a latent frame index held on the
    device: no table from the host and no host copy per block. The numbers are those of
    action_tables."""

    def __init__(self, config: ActionConfig, device):
        self.config, self.device = config, device
        self.frequencies = axis_frequencies(config.rope_dim_list[0] // 2, config.rope_theta).to(device)
        self.still_pairs = sum(config.rope_dim_list[1:]) // 2
        self.indices = {}  # window rows -> the index on the device

    def tensors(self) -> list[torch.Tensor]:
        return [self.frequencies, *self.indices.values()]

    def window_index(self, num_latent_frames: int, first_frame: int, first_row: int) -> torch.Tensor:
        """[F, P] rows on the device (copied there the first time these rows occur)."""
        rows = action_window_lists(num_latent_frames, self.config.vae_time_compression_ratio,
                                   self.config.windows_size, first_frame, first_row)
        if rows not in self.indices:
            self.indices[rows] = to_device_without_waiting(torch.tensor(rows, dtype=torch.long), self.device)
        return self.indices[rows]

    def at(self, position: torch.Tensor, window_index: torch.Tensor) -> ActionTables:
        """The tables of window_index's frames from latent frame `position` (0-d integer tensor)."""
        frames = position + torch.arange(window_index.shape[0], device=position.device)
        turning = frames.to(torch.float64)[:, None] * self.frequencies
        still = turning.new_zeros(turning.shape[0], self.still_pairs)
        angles = torch.cat([turning, still], dim=-1)
        return ActionTables(window_index, angles.cos().float(), angles.sin().float())


def _branch_inputs(config: ActionConfig, mouse_cond, keyboard_cond):
    """(name, tensor, enabled, width) of the two branches, mouse first (the order they run)."""
    return (("mouse_cond", mouse_cond, config.enable_mouse, config.mouse_dim_in),
            ("keyboard_cond", keyboard_cond, config.enable_keyboard, config.keyboard_dim_in))


def _check_branch_input(name: str, cond: torch.Tensor, enabled: bool, width: int | None, batch: int) -> None:
    if not enabled:
        raise ValueError(f"{name} was given but the action config disables that branch")
    if cond.dim() != 3 or cond.shape[0] != batch or cond.shape[2] != width:
        raise ValueError(f"{name} must be [batch={batch}, frames, {width}], got {list(cond.shape)}")


def check_action_inputs(config: ActionConfig, batch: int, num_latent_frames: int,
                        mouse_cond: torch.Tensor | None, keyboard_cond: torch.Tensor | None) -> None:
    """Raise a clear error unless the conditions fit the config and the latent frames."""
    expected_rows = video_frame_count(num_latent_frames)  # r = the VAE's stride (validated)
    for name, cond, enabled, width in _branch_inputs(config, mouse_cond, keyboard_cond):
        if cond is None:
            continue
        _check_branch_input(name, cond, enabled, width, batch)
        if cond.shape[1] != expected_rows:
            raise ValueError(
                f"{name} has {cond.shape[1]} frames, but {num_latent_frames} latent frames "
                f"need {VAE_TIME_STRIDE}*({num_latent_frames}-1)+1 = {expected_rows} raw action frames")


def block_action_rows(config: ActionConfig, first_frame: int, num_frames: int) -> tuple[int, int]:
    """Raw rows [first, end) that latent frames first_frame..first_frame+num_frames-1 need,
    end = their last raw frame + 1 (a row the windows never read, but every action tensor
    of a call ends there: the reference passes the whole prefix up to it)."""
    ratio = config.vae_time_compression_ratio
    return max(0, ratio * first_frame - config.window_frames), ratio * (first_frame + num_frames - 1) + 1


def trim_block_actions(config: ActionConfig, batch: int, first_frame: int, num_frames: int,
                       mouse_cond: torch.Tensor | None, keyboard_cond: torch.Tensor | None):
    """Check the action tensors of one streaming call and cut them to the rows it reads.

    Each tensor [B, N, width] ends at the block's last raw frame; it is either the whole
    prefix from raw frame 0 or any tail that reaches back to the first row a window reads
    (so a stream of any length needs only a bounded action history).
    Returns (mouse, keyboard, first_row): the trimmed tensors and the raw row of their row 0.
    """
    first, end = block_action_rows(config, first_frame, num_frames)
    trimmed = []
    for name, cond, enabled, width in _branch_inputs(config, mouse_cond, keyboard_cond):
        if cond is not None:
            _check_branch_input(name, cond, enabled, width, batch)
            if not end - first <= cond.shape[1] <= end:
                raise ValueError(
                    f"{name} has {cond.shape[1]} rows; latent frames {first_frame}..{first_frame + num_frames - 1} "
                    f"need the raw rows up to raw frame {end - 1}: the whole prefix ({end} rows) or a tail "
                    f"of at least {end - first} rows ending there")
            cond = cond[:, cond.shape[1] - (end - first):]
        trimmed.append(cond)
    return trimmed[0], trimmed[1], first


class RMSNormIgnoringWeight(nn.Module):
    """The reference's q/k norm here: it owns a weight (the checkpoint has it) but its
    forward never multiplies by it. We reproduce that, so loaded weights change nothing."""

    def __init__(self, dim: int, eps: float = RMS_EPS):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps)


class ActionModule(nn.Module):
    def __init__(self, config: ActionConfig):
        super().__init__()
        c = config
        self.config = c
        dim = c.img_hidden_size
        head_dim = c.head_dim
        if c.enable_keyboard:
            self.keyboard_embed = nn.Sequential(
                nn.Linear(c.keyboard_dim_in, c.hidden_size), nn.SiLU(),
                nn.Linear(c.hidden_size, c.hidden_size))
        if c.enable_mouse:
            hidden = c.mouse_hidden_dim
            self.mouse_mlp = nn.Sequential(
                nn.Linear(dim + c.mouse_dim_in * c.window_frames, hidden),
                nn.GELU(approximate="tanh"),
                nn.Linear(hidden, hidden),
                nn.LayerNorm(hidden))
            self.t_qkv = nn.Linear(hidden, 3 * hidden, bias=c.qkv_bias)
            self.img_attn_q_norm = RMSNormIgnoringWeight(head_dim)
            self.img_attn_k_norm = RMSNormIgnoringWeight(head_dim)
            self.proj_mouse = nn.Linear(hidden, dim, bias=c.qkv_bias)
        if c.enable_keyboard:
            hidden = c.keyboard_hidden_dim
            self.key_attn_q_norm = RMSNormIgnoringWeight(head_dim)
            self.key_attn_k_norm = RMSNormIgnoringWeight(head_dim)
            self.mouse_attn_q = nn.Linear(dim, hidden, bias=c.qkv_bias)
            self.keyboard_attn_kv = nn.Linear(c.hidden_size * c.window_frames, 2 * hidden,
                                              bias=c.qkv_bias)
            self.proj_keyboard = nn.Linear(hidden, dim, bias=c.qkv_bias)

    def forward(self, x: torch.Tensor, tables: ActionTables, mouse_cond: torch.Tensor | None = None,
                keyboard_cond: torch.Tensor | None = None, attention=None) -> torch.Tensor:
        """x [B, F*S, C] frame-major tokens; tables = action_tables(config, F, device);
        conditions [B, N, width] with N = r*(F-1)+1 (see check_action_inputs), or the rows
        `tables` index (streaming). attention: None for full attention over the F frames,
        else an object whose mouse(q, k, v) / keyboard(q, k, v) attend causally."""
        c = self.config
        num_frames = tables.window_index.shape[0]
        window_index, cos, sin = tables
        if c.enable_mouse and mouse_cond is not None:
            x = x + self._mouse(x, num_frames, mouse_cond, window_index, cos, sin, attention)
        if c.enable_keyboard and keyboard_cond is not None:
            x = x + self._keyboard(x, num_frames, keyboard_cond, window_index, cos, sin, attention)
        return x

    def _mouse(self, x, num_frames, mouse_cond, window_index, cos, sin, attention):
        B, L, C = x.shape
        S = L // num_frames
        heads, head_dim = self.config.heads_num, self.config.head_dim
        # [B, F, P*2], time-major: (m0x, m0y, m1x, ...)
        windows = mouse_cond.to(x.dtype)[:, window_index].flatten(2)
        # Linear(cat(token, window)) = W_token @ token + W_window @ window; the window
        # term is the same for the S tokens of a frame, so it is projected once per frame.
        first, act, second, norm = self.mouse_mlp
        w_token, w_window = first.weight.split([C, windows.shape[-1]], dim=1)
        h = F.linear(x, w_token, first.bias).view(B, num_frames, S, -1)
        h = h + F.linear(windows, w_window)[:, :, None, :]
        h = norm(second(act(h)))
        qkv = self.t_qkv(h).view(B, num_frames, S, 3, heads, head_dim)
        # per spatial location, attention runs over its F frames: [3, B*S, heads, F, d]
        q, k, v = qkv.permute(3, 0, 2, 4, 1, 5).reshape(3, B * S, heads, num_frames, head_dim)
        q = apply_rope(self.img_attn_q_norm(q), cos, sin).to(v.dtype)
        k = apply_rope(self.img_attn_k_norm(k), cos, sin).to(v.dtype)
        out = F.scaled_dot_product_attention(q, k, v) if attention is None else attention.mouse(q, k, v)
        out = out.view(B, S, heads, num_frames, head_dim).permute(0, 3, 1, 2, 4)
        return self.proj_mouse(out.reshape(B, L, heads * head_dim))

    def _keyboard(self, x, num_frames, keyboard_cond, window_index, cos, sin, attention):
        B, L, _ = x.shape
        S = L // num_frames
        heads, head_dim = self.config.heads_num, self.config.head_dim
        # Embedding is per row, so embedding the padded copies of row 0 = gathering row 0.
        embedded = self.keyboard_embed(keyboard_cond.to(x.dtype))
        windows = embedded[:, window_index].flatten(2)  # [B, F, P*hidden_size]
        k, v = self.keyboard_attn_kv(windows).view(
            B, num_frames, 2, heads, head_dim).permute(2, 0, 3, 1, 4)  # [B, heads, F, d]
        k = apply_rope(self.key_attn_k_norm(k), cos, sin).to(v.dtype)
        q = self.mouse_attn_q(x).view(B, num_frames, S, heads, head_dim)
        q = apply_rope(self.key_attn_q_norm(q), cos[:, None, None], sin[:, None, None])
        # Every location of a sample attends to the same F keys of that sample, so all
        # its F*S queries share one attention call (the reference repeats k, v S times).
        q = q.to(v.dtype).permute(0, 3, 1, 2, 4).reshape(B, heads, L, head_dim)
        out = F.scaled_dot_product_attention(q, k, v) if attention is None else attention.keyboard(q, k, v)
        return self.proj_keyboard(out.transpose(1, 2).reshape(B, L, heads * head_dim))
