"""The streaming model's KV caches: what a block of latent frames remembers of the stream.

Each transformer block keeps the keys and values of the last `local_attn_size` latent
frames for its self-attention (all tokens of a frame), and, where it owns an action
module, for its mouse attention (per spatial location) and keyboard attention (per
sample); plus the cross-attention keys/values of the image context. Buffers are
allocated once for the whole stream: a stream of any length uses the same memory.

All rolling buffers follow one rule (STREAMING_SPEC 5.2, `plan_cache_write`): a call for
the next block appends, evicting the oldest entries except the first `sink` ones when the
buffer is full; a call with the same start as the previous one (a later denoising step,
or the clean-context pass) overwrites that block's entries in place. Attention then reads
the buffer's valid entries. Entries are stored detached; within a call the block's own
fresh keys/values keep their autograd graph, so a backward through one call reaches the
parameters (Self-Forcing training), but no gradient crosses calls.

The counters are kept in latent frames, once for the whole model (every buffer moves in
step); a frame is `tokens_per_frame` self-attention entries and one action entry. They are
host-side integers: where a call's entries go is planned on the host, and from the third
block on every call gets the same plan, so a compiled call sees the same graph. The call's
absolute position is the one number that changes; it is also kept on the device
(`position`), where the stream's RoPE and action tables (made once per stream) read it.
"""

import weakref
from typing import NamedTuple

import torch
import torch.nn.functional as F

from wan.action import StreamActionTables
from wan.config import WanConfig
from wan.rope import StreamRope


class CacheWrite(NamedTuple):
    """Where one call's entries go, in the units of the cache (tokens or frames)."""

    evict: int  # oldest non-sink entries dropped to make room
    keep: int  # entries moved from [sink + evict, sink + evict + keep) to [sink, sink + keep)
    write_start: int  # the call's entries go to [write_start, local_end)
    local_end: int  # end of the valid entries after the call
    window_start: int  # attention reads [window_start, local_end)
    global_end: int  # absolute end of the stream's data after the call


def plan_cache_write(capacity: int, sink: int, window: int, global_end: int, local_end: int,
                     start: int, count: int) -> CacheWrite:
    """STREAMING_SPEC 5.2 for `count` new entries at absolute positions [start, start + count),
    given the counters after the previous call (global_end, local_end)."""
    end = start + count
    evict = keep = 0
    if end > global_end and local_end + count > capacity:
        evict = local_end + count - capacity
        keep = local_end - evict - sink
    new_local_end = local_end + (end - global_end) - evict
    return CacheWrite(evict, keep, new_local_end - count, new_local_end,
                      max(0, new_local_end - window), end)


class RollingKV:
    """One rolling buffer pair k, v [batch, heads, capacity * entries_per_frame, head_dim]
    (the layout scaled_dot_product_attention takes), sink_frames protected frames."""

    def __init__(self, batch: int, heads: int, capacity: int, entries_per_frame: int, head_dim: int,
                 sink_frames: int, device, dtype):
        shape = (batch, heads, capacity * entries_per_frame, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.entries_per_frame = entries_per_frame
        self.sink = sink_frames

    def copy(self) -> "RollingKV":
        copied = object.__new__(RollingKV)
        copied.__dict__.update(self.__dict__)
        copied.k, copied.v = self.k.clone(), self.v.clone()
        return copied

    @torch.no_grad()
    def evict(self, plan: CacheWrite) -> None:
        """Move the kept frames down over the evicted ones (plan in frames, for this sink)."""
        if plan.evict == 0 or plan.keep == 0:
            return
        e = self.entries_per_frame
        source = slice((self.sink + plan.evict) * e, (self.sink + plan.evict + plan.keep) * e)
        target = slice(self.sink * e, (self.sink + plan.keep) * e)
        for buffer in (self.k, self.v):
            buffer[:, :, target] = buffer[:, :, source].clone()  # the ranges may overlap

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: CacheWrite) -> torch.Tensor:
        """Store the call's k, v [batch, heads, n, d] and attend q over the window."""
        e = self.entries_per_frame
        write = slice(plan.write_start * e, plan.local_end * e)
        with torch.no_grad():
            self.k[:, :, write] = k.detach()
            self.v[:, :, write] = v.detach()
        past = slice(plan.window_start * e, plan.write_start * e)
        if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
            # the cached past (detached) joined to this call's own k, v with their graph; a
            # copy, so that autograd never saves a view of the buffer that later calls rewrite
            keys = torch.cat([self.k[:, :, past], k.to(self.k.dtype)], dim=2)
            values = torch.cat([self.v[:, :, past], v.to(self.v.dtype)], dim=2)
        else:
            window = slice(plan.window_start * e, plan.local_end * e)
            keys, values = self.k[:, :, window], self.v[:, :, window]
        return F.scaled_dot_product_attention(q.to(keys.dtype), keys, values)


class LayerCache:
    """The caches of one transformer block; its methods are the block's `attention` rules
    in cache mode (see wan/model.py WanBlock)."""

    def __init__(self, stream: "StreamCache", self_kv: RollingKV, mouse: RollingKV | None,
                 keyboard: RollingKV | None):
        # a proxy, not a reference: a StreamCache and its layers in a cycle would outlive their
        # stream until Python's cyclic collector ran, holding every buffer (a GB per stream at
        # 352x640) - a training rollout makes a fresh stream each time
        self.stream = weakref.proxy(stream)
        self.self_kv, self.mouse_kv, self.keyboard_kv = self_kv, mouse, keyboard
        self.context = None  # cross-attention (k, v) of the image context, made at the first call

    def rolling(self) -> list[RollingKV]:
        return [c for c in (self.self_kv, self.mouse_kv, self.keyboard_kv) if c is not None]

    def self_attention(self, q, k, v):
        return self.self_kv.attend(q, k, v, self.stream.self_plan)

    def mouse(self, q, k, v):
        return self.mouse_kv.attend(q, k, v, self.stream.action_plan)

    def keyboard(self, q, k, v):
        return self.keyboard_kv.attend(q, k, v, self.stream.action_plan)

    def context_kv(self, compute):
        """The context is constant during a stream, so its k, v are made once - except when
        gradients are on: a training rollout recomputes them (257 tokens) so that the
        cross-attention k/v weights get their gradient from every call."""
        if torch.is_grad_enabled():
            return compute()
        if self.context is None:
            self.context = tuple(t.detach() for t in compute())
        return self.context


class StreamCache:
    """Every block's caches for one stream of `batch` samples at one latent size.

    Make it with CausalWanModel.new_cache; the model's forward_cached(..., cache, start_frame)
    updates it. Calls must go in stream order: each call either continues right after the
    previous one (the next block) or repeats its start (the same block again). A call that
    fails half-way leaves the stream unusable: reset() it.
    """

    def __init__(self, config: WanConfig, batch: int, tokens_per_frame: int, device, dtype,
                 token_grid: tuple[int, int] | None = None):
        """token_grid: the (rows, columns) of a latent frame's tokens, for the stream's RoPE
        tables (None: a cache without them, which forward_cached does not take)."""
        if not config.windowed:
            raise ValueError(f"a KV cache needs a streaming window: local_attn_size is "
                             f"{config.local_attn_size} (no window) in this config")
        self.config = config
        self.batch, self.tokens_per_frame = batch, tokens_per_frame
        self.capacity = config.local_attn_size  # latent frames; the attention window equals it
        self.sink = config.sink_size
        action = config.action_config
        def rolling(rows, heads, entries, head_dim, sink=0):
            return RollingKV(rows, heads, self.capacity, entries, head_dim, sink, device, dtype)

        self.layers = []
        for index in range(config.num_layers):
            self_kv = rolling(batch, config.num_heads, tokens_per_frame, config.head_dim, self.sink)
            owns_action = index in action.blocks
            # The action caches never keep sink frames (the reference hard-codes 0 there).
            mouse = rolling(batch * tokens_per_frame, action.heads_num, 1, action.head_dim) \
                if owns_action and action.enable_mouse else None
            keyboard = rolling(batch, action.heads_num, 1, action.head_dim) \
                if owns_action and action.enable_keyboard else None
            self.layers.append(LayerCache(self, self_kv, mouse, keyboard))
        self.position = torch.zeros((), dtype=torch.long, device=device)  # the call's first latent frame
        self.video_rope = None if token_grid is None else StreamRope(*token_grid, config.head_dim, device)
        self.action_tables = StreamActionTables(action, device)
        self.reset()

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor a call reads or writes besides its inputs: each stays at its address
        for the stream's life (torch.compile's CUDA graphs take them as static inputs)."""
        kept = [self.position, *self.action_tables.tensors()]
        kept += self.video_rope.tensors() if self.video_rope is not None else []
        for layer in self.layers:
            kept += [t for rolling in layer.rolling() for t in (rolling.k, rolling.v)]
            kept += list(layer.context or ())
        return kept

    def reset(self) -> None:
        """Start a new stream in the same buffers (their old contents are never read again)."""
        self.global_end = None  # frames; None until the first call fixes the stream's start
        self.local_end = 0
        self.self_plan = self.action_plan = None
        for layer in self.layers:
            layer.context = None

    @torch.no_grad()
    def copy(self) -> "StreamCache":
        """An independent copy of the stream as it stands (buffers, counters, the context's
        keys and values): a checkpointed rollout that continues a stream replays its blocks
        from this in the backward (training/rollout.py)."""
        copied = object.__new__(StreamCache)
        copied.__dict__.update(self.__dict__)
        copied.position = self.position.clone()  # each stream's own: a replay must not move the original's
        copied.layers = []
        for layer in self.layers:
            buffers = [None if kv is None else kv.copy() for kv in (layer.self_kv, layer.mouse_kv, layer.keyboard_kv)]
            twin = LayerCache(copied, *buffers)
            twin.context = layer.context  # detached and never written in place: shared
            copied.layers.append(twin)
        return copied

    @property
    def next_frame(self) -> int | None:
        """The absolute latent frame a call for the next block starts at (None: empty)."""
        return self.global_end

    def begin_call(self, start_frame: int, num_frames: int, batch: int, tokens_per_frame: int) -> None:
        """Check one model call against the stream, evict, and plan where its entries go."""
        if (batch, tokens_per_frame) != (self.batch, self.tokens_per_frame):
            raise ValueError(f"this cache was made for batch {self.batch} at {self.tokens_per_frame} "
                             f"tokens per latent frame; the call has batch {batch} at {tokens_per_frame}")
        if not 1 <= num_frames <= self.capacity - self.sink:
            raise ValueError(f"a call must carry 1..{self.capacity - self.sink} latent frames "
                             f"(local_attn_size {self.capacity} minus sink_size {self.sink}), got {num_frames}")
        previous = self.global_end
        if previous is not None and start_frame not in (previous, previous - num_frames):
            raise ValueError(f"the stream's last call ended at latent frame {previous}: the next call "
                             f"starts there (next block) or at {previous - num_frames} (the same block "
                             f"again), not at {start_frame}; reset() starts a new stream")
        global_end = start_frame if previous is None else previous
        plans = [plan_cache_write(self.capacity, sink, self.capacity, global_end, self.local_end,
                                  start_frame, num_frames) for sink in (self.sink, 0)]
        self.self_plan, self.action_plan = plans
        for layer in self.layers:
            for rolling in layer.rolling():
                rolling.evict(self.self_plan if rolling is layer.self_kv else self.action_plan)
        self.global_end, self.local_end = self.self_plan.global_end, self.self_plan.local_end
        self.position.fill_(start_frame)  # a kernel with the number as its argument: no copy, no sync
