"""The Matrix-Game 2.0 streaming model: the base model's blocks, run causally, block by block.

`CausalWanModel` has exactly the base model's parameters (a subclass of WanModel, so the
base checkpoint, a fine-tuned one and the distilled students all load into it) and
differs only in what attention sees (STREAMING_SPEC 2-5):

- one timestep per latent frame (t [B, F]), so each frame has its own modulation;
- latent frames are grouped into blocks of P (FRAMES_PER_BLOCK); a block sees itself
  completely and the frames before it up to a window of `local_attn_size` frames counted
  back from the block's end, of which the stream's first `sink_size` frames are always
  kept; self-attention, mouse attention and keyboard attention all follow this rule
  (the action attentions without sink frames, as in the reference);
- RoPE positions are absolute frame indices in the stream.

Two ways to run it, same numbers: `forward` on a whole sequence (training, every block
at once) and `forward_cached` on one block per call with a StreamCache (inference and
Self-Forcing rollouts). With sink frames our block-causal forward keeps them too, so the
two agree for any config (the reference's masks drop the sink, so its two paths differ).
"""

import torch
import torch.nn.functional as F

from wan.action import trim_block_actions
from wan.config import FRAMES_PER_BLOCK, WanConfig
from wan.kv_cache import StreamCache
from wan.model import WanModel
from wan.shapes import PATCH_SIZE, tokens_per_latent_frame


def visible_frames(block_end: int, local_attn_size: int, sink_size: int) -> list[tuple[int, int]]:
    """Latent frame ranges [a, b) a block ending (exclusive) at block_end may attend to.

    No window (-1): everything before the end. Otherwise the last local_attn_size frames,
    of which the stream's first sink_size frames are always part (the KV cache evicts the
    oldest frames after the sink).
    """
    if local_attn_size < 0:
        return [(0, block_end)]
    recent = block_end - (local_attn_size - sink_size)
    if recent <= sink_size:
        return [(0, block_end)]
    return ([(0, sink_size)] if sink_size else []) + [(recent, block_end)]


class BlockCausalAttention:
    """The attention rules of the whole-sequence forward: F frames in blocks of P.

    Self-attention runs block by block, each block's queries over the keys of its visible
    frames (contiguous ranges), with plain scaled_dot_product_attention and no mask: on a
    GPU the flash kernel runs (no score matrix in memory, in the forward or the backward),
    and everywhere the work is exactly the visible part. At 15 frames x 880 = 13,200 tokens
    a dense [L, L] mask would take 174 MB as booleans and push SDPA off the flash kernel,
    to the memory-efficient one or, on the CPU, to materialised float32 scores of 8.4 GB
    per sample and layer (12 heads); here the CPU holds one block's scores at a time
    (2,640 x 5,280 per head at L = 6). flex_attention would express the same masks but is
    only fast when compiled (eager it is unfused on the CPU). The action attentions run
    over frames (F is a few dozen at most), where a small boolean mask costs nothing.
    """

    def __init__(self, num_frames: int, frames_per_block: int, local_attn_size: int, sink_size: int,
                 tokens_per_frame: int, device):
        self.tokens_per_frame = tokens_per_frame
        self.blocks = []  # (first frame, end frame, visible frame ranges) per block
        allowed = torch.zeros(num_frames, num_frames, dtype=torch.bool)  # action frames, no sink
        for start in range(0, num_frames, frames_per_block):
            end = start + frames_per_block
            self.blocks.append((start, end, visible_frames(end, local_attn_size, sink_size)))
            for first, last in visible_frames(end, local_attn_size, 0):
                allowed[start:end, first:last] = True
        self.frame_mask = allowed.to(device)  # [query frame, key frame]
        self.token_mask = self.frame_mask.repeat_interleave(tokens_per_frame, dim=0)  # [query token, key frame]

    def self_attention(self, q, k, v):
        """q, k, v [B, n, F*S, d]."""
        S = self.tokens_per_frame
        out = []
        for start, end, ranges in self.blocks:
            tokens = [slice(a * S, b * S) for a, b in ranges]
            keys = k[:, :, tokens[0]] if len(tokens) == 1 else torch.cat([k[:, :, t] for t in tokens], 2)
            values = v[:, :, tokens[0]] if len(tokens) == 1 else torch.cat([v[:, :, t] for t in tokens], 2)
            out.append(F.scaled_dot_product_attention(q[:, :, start * S:end * S], keys, values))
        return torch.cat(out, dim=2)

    def mouse(self, q, k, v):
        """q, k, v [B*S, heads, F, d]: each location over its own frames."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.frame_mask)

    def keyboard(self, q, k, v):
        """q [B, heads, F*S, d] (frame-major), k, v [B, heads, F, d]."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.token_mask)

    def context_kv(self, compute):
        return compute()


class CausalWanModel(WanModel):
    """The streaming student (see the module docstring): `forward` for whole sequences,
    `new_cache` + `forward_cached` for one block at a time."""

    def __init__(self, config: WanConfig, frames_per_block: int = FRAMES_PER_BLOCK):
        super().__init__(config)
        if frames_per_block < 1:
            raise ValueError(f"frames_per_block must be >= 1, got {frames_per_block}")
        if config.windowed and frames_per_block > config.local_attn_size - config.sink_size:
            raise ValueError(
                f"a block of {frames_per_block} latent frames does not fit the window: local_attn_size "
                f"{config.local_attn_size} minus sink_size {config.sink_size} must be >= {frames_per_block}")
        self.frames_per_block = frames_per_block

    def forward(self, x, t, visual_context, cond_concat, keyboard_cond=None, mouse_cond=None):
        """Whole-sequence block-causal forward (training): flow velocity, float32 [B, 16, F, H, W].

        As WanModel.forward, but t is [B, F] (one timestep per latent frame) and F must be a
        multiple of frames_per_block. Supports gradient checkpointing.
        """
        self.check_inputs(x, t, visual_context, cond_concat, keyboard_cond, mouse_cond, per_frame_t=True)
        frames = x.shape[2]
        if frames % self.frames_per_block:
            raise ValueError(f"x has {frames} latent frames; the block-causal forward needs a multiple "
                             f"of frames_per_block = {self.frames_per_block}")
        attention = BlockCausalAttention(frames, self.frames_per_block, self.config.local_attn_size,
                                         self.config.sink_size, tokens_per_latent_frame(*x.shape[3:]), x.device)
        return self._run(x, t, visual_context, cond_concat, keyboard_cond, mouse_cond,
                         attention=[attention] * len(self.blocks))

    def new_cache(self, batch: int, latent_height: int, latent_width: int, device=None,
                  dtype: torch.dtype | None = None) -> StreamCache:
        """Empty caches for a stream of `batch` samples at this latent size, allocated once,
        with the stream's RoPE and action tables. dtype: that of the keys/values (default:
        the parameters'); bf16 on a GPU."""
        weight = self.patch_embedding.weight
        return StreamCache(self.config, batch, tokens_per_latent_frame(latent_height, latent_width),
                           device or weight.device, dtype or weight.dtype,
                           token_grid=(latent_height // PATCH_SIZE[1], latent_width // PATCH_SIZE[2]))

    def forward_cached(self, x, t, visual_context, cond_concat, cache: StreamCache, start_frame: int,
                       keyboard_cond=None, mouse_cond=None, checkpointing: bool = False):
        """One block of a stream through the KV cache: flow velocity, float32 [B, 16, n, H, W].

        x [B, 16, n, H, W]: latents of absolute latent frames start_frame .. start_frame+n-1;
        t [B, n] or [B] (shared by the n frames); cond_concat: the same frames' slice
        [B, 20, n, H, W]; visual_context [B, 257, clip_dim] (the whole context, constant
        during a stream); keyboard_cond [B, N, K], mouse_cond [B, N, 2]: raw action rows
        ending at the block's last raw frame 4*(start_frame+n-1), either the whole prefix
        from raw frame 0 or a tail of at least 4n+9 rows (all that the block reads).

        The call writes the block's keys/values into `cache`: the next call either goes on
        at start_frame + n or repeats start_frame (a later denoising step or the clean
        context pass, which overwrite this block's entries). With gradients on, the
        backward of this call reaches the parameters; cached entries are detached, so no
        gradient crosses calls. checkpointing: each transformer block recomputes its
        activations in the backward (with the model's gradient checkpointing on) - only for
        a call whose backward runs before any other call changes the cache, since the
        recomputation reads the cache again (training/rollout.py's Replay does so).

        It is prepare_cached (checks and bookkeeping, on the host) then cached_step (the
        tensor work, which torch.compile can take whole: generation/streaming.py).
        """
        return self.cached_step(**self.prepare_cached(x, t, visual_context, cond_concat, cache, start_frame,
                                                      keyboard_cond, mouse_cond), checkpointing=checkpointing)

    def prepare_cached(self, x, t, visual_context, cond_concat, cache: StreamCache, start_frame: int,
                       keyboard_cond=None, mouse_cond=None) -> dict:
        """forward_cached's host side: check the call (shapes and numbers only, never a
        tensor's values), plan and evict the cache, and make the context's keys/values at a
        stream's first call. Returns cached_step's arguments."""
        if not isinstance(start_frame, int) or start_frame < 0:
            raise ValueError(f"start_frame must be a latent frame index >= 0, got {start_frame!r}")
        if cache.video_rope is None:
            raise ValueError("this cache has no RoPE tables: make it with CausalWanModel.new_cache")
        if torch.is_tensor(t) and t.dim() == 1 and x.dim() == 5:
            t = t[:, None].expand(-1, x.shape[2])
        self.check_inputs(x, t, visual_context, cond_concat, keyboard_cond, mouse_cond,
                          per_frame_t=True, check_actions=False)
        batch, frames = x.shape[0], x.shape[2]
        mouse_cond, keyboard_cond, first_row = trim_block_actions(
            self.config.action_config, batch, start_frame, frames, mouse_cond, keyboard_cond)
        window_index = cache.action_tables.window_index(frames, start_frame, first_row)
        cache.begin_call(start_frame, frames, batch, tokens_per_latent_frame(*x.shape[3:]))
        # The context's keys/values made here, before the compiled step, through each block's
        # context_kv (FSDP gathers and OFFLOAD_FROZEN brings the block's weights for it).
        if not torch.is_grad_enabled() and any(layer.context is None for layer in cache.layers):
            context = self.img_emb(visual_context.to(self.patch_embedding.weight.dtype))
            for block, layer in zip(self.blocks, cache.layers):
                layer.context_kv(lambda: block.context_kv(context))
        return dict(x=x, t=t, visual_context=visual_context, cond_concat=cond_concat, cache=cache,
                    keyboard_cond=keyboard_cond, mouse_cond=mouse_cond, window_index=window_index)

    def cached_step(self, x, t, visual_context, cond_concat, cache: StreamCache, keyboard_cond, mouse_cond,
                    window_index, checkpointing: bool = False):
        """forward_cached's tensor work, on prepare_cached's arguments: no host copy, no sync,
        no branch on a tensor's values. Its tables are computed from the cache's position on
        the device, so from the third block on every call runs the same graph."""
        rope = cache.video_rope.at(cache.position, x.shape[2])
        tables = cache.action_tables.at(cache.position, window_index)
        return self._run(x, t, visual_context, cond_concat, keyboard_cond, mouse_cond, attention=cache.layers,
                         tables=tables, checkpointing=checkpointing, rope=rope)


def causal_from(model: WanModel, local_attn_size: int, sink_size: int = 0,
                frames_per_block: int = FRAMES_PER_BLOCK) -> CausalWanModel:
    """A bidirectional model's weights (shared, not copied) in the streaming architecture
    with the given window: the starting point of a distilled student, or a base or
    fine-tuned model played as it is (few-step streaming output is then poor: it was never
    trained to denoise in blocks from a few steps)."""
    with torch.device("meta"):
        causal = CausalWanModel(model.config.with_window(local_attn_size, sink_size), frames_per_block)
    causal.load_state_dict(model.state_dict(), strict=True, assign=True)  # detached views: same storage
    for (_, theirs), (_, ours) in zip(model.named_parameters(), causal.named_parameters()):
        ours.requires_grad_(theirs.requires_grad)
    return causal.train(model.training)
