"""The Matrix-Game 2.0 base model: a Wan2.1 image-to-video DiT with action modules.

Latents and their conditioning are patched into frame-major tokens, a sinusoidal time
embedding modulates every block (adaLN: shift, scale, gate), CLIP tokens of the first
frame are the cross-attention context, and each block's action module mixes in the
keyboard/mouse inputs. Parameter names match the official checkpoint.

The streaming (causal) variant, wan/causal.py, runs these same blocks with one timestep
per latent frame (per-frame modulation), an absolute frame offset for the RoPE, action
modules only in the blocks its config lists, and an `attention` object that restricts or
caches what each attention sees; with none of these the blocks compute the base model.

Precision, as Wan2.1 runs it: the time embedding, the adaLN modulation, the residual
stream and the output head are float32 whatever the parameters' dtype (bf16 weights are
upcast for those few matmuls), while the attention and MLP matmuls run in bf16 under
autocast. Only a model with bf16 parameters and autocast off runs everything in bf16.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from wan.action import (ActionModule, RMSNormIgnoringWeight, action_tables, check_action_inputs,
                        rms_normalize)
from wan.clip import CLIPVisionConfig
from wan.conditioning import cond_concat_from_latent
from wan.config import WanConfig
from wan.lora import is_adapter_name
from wan.rope import apply_rope, video_rope_table
from wan.shapes import (COND_CHANNELS, LATENT_CHANNELS, PATCH_SIZE,
                        video_frame_count)

STRATEGIES = ("action_only", "last_layers", "lora", "full")
CONTEXT_TOKENS = CLIPVisionConfig().num_tokens  # 257: the CLIP tokens of the first frame


def sinusoidal_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """[B] timesteps -> [B, dim] float64: [cos(t * w_k), sin(t * w_k)], w_k = 10000^(-k/half)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    angles = t.to(torch.float64)[:, None] * freqs
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


def linear_float32(layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """The layer in float32 even when its weights are bf16 (call with autocast off)."""
    bias = None if layer.bias is None else layer.bias.float()
    return F.linear(x.float(), layer.weight.float(), bias)


def init_linear_weight_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """The spec's rule for Linear weights (also used to re-initialise single tensors)."""
    return nn.init.xavier_uniform_(weight, generator=generator)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_normalize(x, self.eps).type_as(x) * self.weight


class LayerNormFloat32(nn.LayerNorm):
    """LayerNorm computed in float32 with the weights upcast (they may be bf16 while the
    residual stream is float32), returned in the input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).type_as(x)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [B, L, C] * (1 + scale) + shift, with shift/scale [B, G, 1, C] for G equal groups of
    consecutive tokens: G = 1 (one timestep per sample) or G = F (one per latent frame)."""
    return (x.unflatten(1, (shift.shape[1], -1)) * (1 + scale) + shift).flatten(1, 2)


def gated(y: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """y [B, L, C] * gate, gate [B, G, 1, C] as in modulate."""
    return (y.unflatten(1, (gate.shape[1], -1)) * gate).flatten(1, 2)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, eps: float):
        super().__init__()
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.o = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(dim, eps)
        self.norm_k = RMSNorm(dim, eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.num_heads, -1))  # [B, L, n, d]

    def _attend(self, q, k, v, attend=None) -> torch.Tensor:
        """[B, L, n, d] each -> o([B, L, n*d]); q, k cast to v's dtype for the fused kernels.
        attend(q, k, v) on [B, n, L, d] replaces full attention (causal masks, KV cache)."""
        q, k, v = q.to(v.dtype).transpose(1, 2), k.to(v.dtype).transpose(1, 2), v.transpose(1, 2)
        out = F.scaled_dot_product_attention(q, k, v) if attend is None else attend(q, k, v)
        return self.o(out.transpose(1, 2).flatten(2))

    def forward(self, x, rope_cos, rope_sin, attention=None):
        q = apply_rope(self._heads(self.norm_q(self.q(x))), rope_cos, rope_sin)
        k = apply_rope(self._heads(self.norm_k(self.k(x))), rope_cos, rope_sin)
        attend = None if attention is None else attention.self_attention
        return self._attend(q, k, self._heads(self.v(x)), attend)


class CrossAttention(SelfAttention):
    """Tokens attend to the projected CLIP tokens: no RoPE, no mask."""

    def context_kv(self, context):
        return self._heads(self.norm_k(self.k(context))), self._heads(self.v(context))

    def forward(self, x, context, attention=None):
        """attention.context_kv(compute) may serve k, v from a stream's cache."""
        q = self._heads(self.norm_q(self.q(x)))
        if attention is None:
            k, v = self.context_kv(context)
        else:
            k, v = attention.context_kv(lambda: self.context_kv(context))
        return self._attend(q, k, v)


class WanBlock(nn.Module):
    def __init__(self, config: WanConfig, index: int):
        super().__init__()
        dim, eps = config.dim, config.eps
        self.modulation = nn.Parameter(torch.empty(1, 6, dim))
        has_action = index in config.action_config.blocks
        self.action_model = ActionModule(config.action_config) if has_action else None
        self.norm1 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.self_attn = SelfAttention(dim, config.num_heads, eps)
        self.norm3 = LayerNormFloat32(dim, eps=eps)
        self.cross_attn = CrossAttention(dim, config.num_heads, eps)
        self.norm2 = nn.LayerNorm(dim, eps=eps, elementwise_affine=False)
        self.ffn = nn.Sequential(
            nn.Linear(dim, config.ffn_dim), nn.GELU(approximate="tanh"),
            nn.Linear(config.ffn_dim, dim))

    def forward(self, x, e0, context, rope_cos, rope_sin, tables, mouse_cond=None,
                keyboard_cond=None, attention=None):
        """x [B, L, C]; e0 time projection, [B, 6, C] (one timestep per sample) or
        [B, F, 6, C] (one per latent frame); context [B, Lc, C]; attention: None (full
        attention, the base model) or the causal rules of wan/causal.py."""
        if e0.dim() == 3:
            e0 = e0[:, None]
        with torch.autocast(x.device.type, enabled=False):
            mod = (self.modulation.to(e0.dtype)[:, None] + e0).unsqueeze(3)  # [B, G, 6, 1, C]
        shift1, scale1, gate1, shift2, scale2, gate2 = mod.unbind(2)
        y = self.self_attn(modulate(self.norm1(x), shift1, scale1), rope_cos, rope_sin, attention)
        x = x + gated(y, gate1)
        x = x + self.cross_attn(self.norm3(x), context, attention)
        if self.action_model is not None:
            x = self.action_model(x, tables, mouse_cond, keyboard_cond, attention)
        y = self.ffn(modulate(self.norm2(x), shift2, scale2))
        return x + gated(y, gate2)

    def context_kv(self, context):
        """The cross-attention's keys/values of the context, called through the block (a
        stream's context pass, wan/causal.py) so that what brings the block's weights for its
        calls - FSDP's gather (training/ranks.py), OFFLOAD_FROZEN's copy (training/offload.py) -
        brings them for this one too."""
        return self.cross_attn.context_kv(context)


class Head(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        dim = config.dim
        self.modulation = nn.Parameter(torch.empty(1, 2, dim))
        self.norm = nn.LayerNorm(dim, eps=config.eps, elementwise_affine=False)
        self.head = nn.Linear(dim, math.prod(PATCH_SIZE) * config.out_dim)

    def forward(self, x, e):
        """e: [B, C] (one timestep per sample) or [B, F, C] (one per latent frame)."""
        if e.dim() == 2:
            e = e[:, None]
        with torch.autocast(x.device.type, enabled=False):
            mod = (self.modulation.float()[:, None] + e[:, :, None].float()).unsqueeze(3)  # [B, G, 2, 1, C]
            shift, scale = mod.unbind(2)
            return linear_float32(self.head, modulate(self.norm(x.float()), shift, scale))


class MLPProj(nn.Module):
    """CLIP tokens -> context tokens of the model's width."""

    def __init__(self, clip_dim: int, dim: int):
        super().__init__()
        self.proj = nn.Sequential(
            nn.LayerNorm(clip_dim), nn.Linear(clip_dim, clip_dim), nn.GELU(),
            nn.Linear(clip_dim, dim), nn.LayerNorm(dim))

    def forward(self, tokens):
        return self.proj(tokens)


class WanModel(nn.Module):
    def __init__(self, config: WanConfig):
        super().__init__()
        self.config = config
        dim = config.dim
        self.patch_embedding = nn.Conv3d(config.in_dim, dim, kernel_size=PATCH_SIZE,
                                         stride=PATCH_SIZE)
        self.time_embedding = nn.Sequential(
            nn.Linear(config.freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))
        self.blocks = nn.ModuleList(WanBlock(config, i) for i in range(config.num_layers))
        self.head = Head(config)
        self.img_emb = MLPProj(config.clip_dim, dim)
        self.gradient_checkpointing = False
        self.init_weights()

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each block's activations in backward (non-reentrant) to save memory."""
        self.gradient_checkpointing = bool(enabled)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The reference initialisation; sets every parameter (so meta -> to_empty works)."""
        dim = self.config.dim
        for m in self.modules():
            if isinstance(m, nn.Linear):
                init_linear_weight_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, (RMSNorm, RMSNormIgnoringWeight)):
                nn.init.ones_(m.weight)
        init_linear_weight_(self.patch_embedding.weight.view(dim, -1))
        nn.init.zeros_(self.patch_embedding.bias)
        for m in self.time_embedding:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        for block in self.blocks:
            nn.init.normal_(block.modulation, std=dim**-0.5)
            action = block.action_model  # None in blocks without one: getattr finds nothing
            for proj in (getattr(action, "proj_mouse", None), getattr(action, "proj_keyboard", None)):
                if proj is not None:
                    nn.init.zeros_(proj.weight)
                    if proj.bias is not None:
                        nn.init.zeros_(proj.bias)
        nn.init.normal_(self.head.modulation, std=dim**-0.5)

    def check_inputs(self, x, t, visual_context, cond_concat, keyboard_cond, mouse_cond,
                     per_frame_t: bool = False, check_actions: bool = True) -> None:
        """Raise a clear error unless the inputs fit the config and each other. per_frame_t:
        t is [B, F] (the streaming model) instead of [B]."""
        if x.dim() != 5 or x.shape[1] != LATENT_CHANNELS:
            raise ValueError(f"x must be [B, {LATENT_CHANNELS}, F, H, W], got {list(x.shape)}")
        B, _, frames, height, width = x.shape
        if height % PATCH_SIZE[1] or width % PATCH_SIZE[2]:
            raise ValueError(f"latent height and width must be even (patch {PATCH_SIZE}), "
                             f"got {height}x{width}")
        if tuple(cond_concat.shape) != (B, COND_CHANNELS, frames, height, width):
            raise ValueError(f"cond_concat must be {[B, COND_CHANNELS, frames, height, width]},"
                             f" got {list(cond_concat.shape)}")
        if per_frame_t and tuple(t.shape) != (B, frames):
            raise ValueError(f"t must be [B={B}, F={frames}] timesteps (one per latent frame), "
                             f"got {list(t.shape)}")
        if not per_frame_t and tuple(t.shape) != (B,):
            raise ValueError(f"t must be [B={B}] timesteps, got {list(t.shape)}")
        clip_dim = self.config.clip_dim
        if visual_context.dim() != 3 or visual_context.shape[0] != B or visual_context.shape[2] != clip_dim:
            raise ValueError(f"visual_context must be [B={B}, tokens, {clip_dim}], "
                             f"got {list(visual_context.shape)}")
        if check_actions:
            check_action_inputs(self.config.action_config, B, frames, mouse_cond, keyboard_cond)

    def forward(self, x, t, visual_context, cond_concat, keyboard_cond=None, mouse_cond=None):
        """Predicted flow velocity, float32 [B, 16, F, H, W].

        x, cond_concat: [B, 16, F, H, W], [B, 20, F, H, W] latents; t: [B] in [0, 1000];
        visual_context: [B, 257, clip_dim]; keyboard_cond [B, N, K], mouse_cond [B, N, 2],
        N = 4(F-1)+1 raw frames. A condition left as None skips its branch (as in the
        reference); one given for a branch the config disables is an error.
        """
        self.check_inputs(x, t, visual_context, cond_concat, keyboard_cond, mouse_cond)
        return self._run(x, t, visual_context, cond_concat, keyboard_cond, mouse_cond)

    def _run(self, x, t, visual_context, cond_concat, keyboard_cond, mouse_cond, attention=None,
             first_frame: int = 0, tables=None, checkpointing: bool = True, rope=None):
        """The forward pass on checked inputs. t: [B] or [B, F]; attention: one object per
        block (wan/causal.py) or None; first_frame: the RoPE position of x's first frame;
        tables: action tables for the given action rows (default: N = 4(F-1)+1 from frame 0);
        rope: the self-attention (cos, sin), instead of the table at first_frame."""
        dtype = self.patch_embedding.weight.dtype
        # float32 unless the whole model is bf16 and runs without autocast (see the docstring)
        stream = torch.float32 if torch.is_autocast_enabled(x.device.type) else dtype
        tokens = self.patch_embedding(torch.cat([x, cond_concat], dim=1).to(dtype))
        B, C, f, h, w = tokens.shape
        tokens = tokens.flatten(2).transpose(1, 2).to(stream)  # [B, L, C], frame-major

        with torch.autocast(x.device.type, enabled=False):
            sinusoid = sinusoidal_embedding(t.flatten(), self.config.freq_dim)
            e = linear_float32(self.time_embedding[2], F.silu(linear_float32(self.time_embedding[0], sinusoid)))
            e0 = linear_float32(self.time_projection[1], F.silu(e)).unflatten(1, (6, C)).to(stream)
            e, e0 = e.unflatten(0, t.shape), e0.unflatten(0, t.shape)  # per sample or per frame
        context = self.img_emb(visual_context.to(dtype))
        rope_cos, rope_sin = rope if rope is not None else video_rope_table(f, h, w, self.config.head_dim, x.device,
                                                                             first_frame)
        if tables is None:
            tables = action_tables(self.config.action_config, f, x.device)

        for i, block in enumerate(self.blocks):
            args = (tokens, e0, context, rope_cos, rope_sin, tables, mouse_cond, keyboard_cond,
                    None if attention is None else attention[i])
            if checkpointing and self.gradient_checkpointing and torch.is_grad_enabled():
                tokens = checkpoint(block, *args, use_reentrant=False)
            else:
                tokens = block(*args)

        out = self.head(tokens, e)  # [B, L, 1*2*2*16]
        return unpatchify(out, f, h, w, self.config.out_dim).float()


def unpatchify(tokens: torch.Tensor, f: int, h: int, w: int, channels: int) -> torch.Tensor:
    """[B, f*h*w, pt*ph*pw*c] -> [B, c, f*pt, h*ph, w*pw]."""
    pt, ph, pw = PATCH_SIZE
    x = tokens.view(tokens.shape[0], f, h, w, pt, ph, pw, channels)
    x = x.permute(0, 7, 1, 4, 2, 5, 3, 6)
    return x.reshape(tokens.shape[0], channels, f * pt, h * ph, w * pw)


def action_parameter_names(model: WanModel) -> list[str]:
    return [n for n, _ in model.named_parameters() if ".action_model." in n]


def trainable_parameter_names(model: WanModel, strategy: str, last_layers: int = 0,
                              lora_head: bool = False) -> list[str]:
    """Names of the parameters a training strategy updates, in model order.

    action_only: every block's action module; last_layers: those + the last N blocks +
    the head; lora: the adapters wan/lora.py's add_lora put on the model + the action
    modules (+ the head with lora_head); full: everything.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown training strategy {strategy!r}; choose one of {STRATEGIES}")
    names = [n for n, _ in model.named_parameters()]
    if strategy == "full":
        return names
    if strategy == "action_only":
        return action_parameter_names(model)
    if strategy == "lora":
        if not any(is_adapter_name(n) for n in names):
            raise ValueError("strategy 'lora' trains adapters, but the model has none (wan/lora.py's add_lora "
                             "puts them on)")
        return [n for n in names if is_adapter_name(n) or ".action_model." in n
                or (lora_head and n.startswith("head."))]
    num_layers = len(model.blocks)
    valid = isinstance(last_layers, int) and not isinstance(last_layers, bool)
    if not valid or not 1 <= last_layers <= num_layers:
        raise ValueError(f"strategy 'last_layers' needs 1 <= N <= {num_layers} (the model's "
                         f"blocks), got N = {last_layers!r}")
    last = tuple(f"blocks.{i}." for i in range(num_layers - last_layers, num_layers))
    return [n for n in names
            if ".action_model." in n or n.startswith(last) or n.startswith("head.")]


def apply_training_strategy(model: WanModel, strategy: str, last_layers: int = 0,
                            lora_head: bool = False) -> list[str]:
    """Set requires_grad for the strategy's parameters only; return their names."""
    trainable = set(trainable_parameter_names(model, strategy, last_layers, lora_head))
    for name, p in model.named_parameters():
        p.requires_grad_(name in trainable)
    return [n for n, _ in model.named_parameters() if n in trainable]


def random_inputs(config: WanConfig, batch: int, latent_frames: int, latent_height: int,
                  latent_width: int, device="cpu", seed: int = 0) -> dict:
    """Keyword inputs of the right shapes (for tests and benchmarks): noisy latents,
    timesteps, CLIP-width context, cond_concat with the first-frame mask, actions."""
    g = torch.Generator().manual_seed(seed)
    shape = (batch, LATENT_CHANNELS, latent_frames, latent_height, latent_width)
    raw_frames = video_frame_count(latent_frames)
    action = config.action_config
    keyboard = (torch.rand(batch, raw_frames, action.keyboard_dim_in, generator=g) < 0.3).float()
    inputs = dict(
        x=torch.randn(shape, generator=g),
        t=torch.rand(batch, generator=g) * 1000,
        visual_context=torch.randn(batch, CONTEXT_TOKENS, config.clip_dim, generator=g),
        cond_concat=cond_concat_from_latent(torch.randn(shape, generator=g)),
        keyboard_cond=keyboard if action.enable_keyboard else None,
        mouse_cond=torch.randn(batch, raw_frames, action.mouse_dim_in, generator=g) * 0.1
        if action.enable_mouse else None,
    )
    return {k: v.to(device) if v is not None else None for k, v in inputs.items()}
