"""Typed, validated configs of the Matrix-Game 2.0 models, read from their public JSON.

The JSON a user downloads (`models/base_model/*config*.json`,
reference/matrix_game2_base_config.json, reference/matrix_game2_distilled_*_config.json)
is the source of truth for field names. The base model and the streaming students share
one format: `local_attn_size` and `sink_size` describe the streaming attention window
(-1: none, the bidirectional base), and a streaming config may own action modules in a
subset of the blocks. A few fields of the format change nothing and are only kept for
round-tripping. Any other unknown field, or a missing one, is an error - a config we
cannot account for should never be half-used.
"""

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wan.shapes import COND_CHANNELS, LATENT_CHANNELS, PATCH_SIZE, VAE_TIME_STRIDE

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG_PATH = REPO_ROOT / "reference" / "matrix_game2_base_config.json"
DISTILLED_CONFIG_PATHS = {
    mode: REPO_ROOT / "reference" / f"matrix_game2_distilled_{mode}_config.json"
    for mode in ("universal", "gta_drive", "templerun")
}

# Fields of the public JSON that change nothing here: accepted and preserved.
IGNORED_FIELDS = (
    "_class_name",
    "_diffusers_version",
    "text_len",
    "inject_sample_info",
)
DEFAULT_CLIP_DIM = 1280  # width of the CLIP ViT-H/14 tokens that img_emb takes
# Latent frames the streaming model generates per call (P). Not in the config JSON: the
# official inference yaml sets `num_frame_per_block: 3` for all three students, and their
# attention windows (local_attn_size 6 and 4) were trained against blocks of 3.
FRAMES_PER_BLOCK = 3
NO_LOCAL_WINDOW = -1  # local_attn_size of the bidirectional base: attention is not windowed


class ConfigError(ValueError):
    pass


def read_config_json(path) -> Any:
    """A config file's JSON; a missing or malformed file is a ConfigError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"config file {path} is not valid JSON: {e}") from None


def _check_type(where: str, value: Any, kind) -> None:
    """Types as JSON gives them: int is not bool, lists of ints stay lists of ints."""
    if kind in OPTIONAL_KINDS:  # an optional field, when present, holds the plain type
        kind = OPTIONAL_KINDS[kind]
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind is str:
        ok = isinstance(value, str)
    elif kind == tuple[int, ...]:
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, int) and not isinstance(v, bool) for v in value
        )
    else:
        raise TypeError(f"no type check for {kind}")
    if not ok:
        raise ConfigError(f"{where} must be {_type_name(kind)}, got {value!r}")


OPTIONAL_KINDS = {int | None: int, tuple[int, ...] | None: tuple[int, ...]}


def _type_name(kind) -> str:
    return "a list of integers" if kind == tuple[int, ...] else f"a JSON {kind.__name__}"


def _fields_from_dict(cls, d: dict, where: str, skip: tuple[str, ...] = ()) -> dict:
    """Check d has exactly cls's required fields (plus optional ones), typed; return kwargs."""
    if not isinstance(d, dict):
        raise ConfigError(f"{where} must be a JSON object, got {type(d).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name not in skip}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(
            f"{where}: unknown field(s) {unknown}; known fields are {sorted(fields)}"
        )
    required = [n for n, f in fields.items() if f.default is dataclasses.MISSING
                and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in d]
    if missing:
        raise ConfigError(f"{where}: missing required field(s) {missing}")
    kwargs = {}
    for name, value in d.items():
        kind = fields[name].type
        _check_type(f"{where}.{name}", value, kind)
        kwargs[name] = tuple(value) if isinstance(value, list) else value
    return kwargs


def _to_json_value(value):
    return list(value) if isinstance(value, tuple) else value


@dataclass(frozen=True)
class ActionConfig:
    """`action_config` of the public JSON: the keyboard/mouse modules and the blocks that own one."""

    blocks: tuple[int, ...]
    enable_keyboard: bool
    enable_mouse: bool
    heads_num: int
    hidden_size: int  # width of each embedded keyboard row
    img_hidden_size: int  # = the transformer's dim
    keyboard_dim_in: int
    keyboard_hidden_dim: int
    patch_size: tuple[int, ...]
    qk_norm: bool
    qkv_bias: bool
    rope_dim_list: tuple[int, ...]
    rope_theta: float
    vae_time_compression_ratio: int
    windows_size: int
    # The mouse branch's fields: a keyboard-only model (templerun) has none of them.
    mouse_dim_in: int | None = None
    mouse_hidden_dim: int | None = None
    mouse_qk_dim_list: tuple[int, ...] | None = None

    @property
    def window_frames(self) -> int:
        """Raw action frames each latent frame sees: P = r * w_s (12)."""
        return self.vae_time_compression_ratio * self.windows_size

    @property
    def head_dim(self) -> int:
        return self.keyboard_hidden_dim // self.heads_num

    def to_dict(self) -> dict:
        return {f.name: _to_json_value(getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    def validate(self, dim: int, num_layers: int, windowed: bool, where: str = "action_config") -> None:
        """windowed: the model has a streaming window (local_attn_size set), and only such
        a model may own action modules in some blocks only."""
        def fail(msg):
            raise ConfigError(f"{where}: {msg}")

        mouse_fields = ("mouse_dim_in", "mouse_hidden_dim", "mouse_qk_dim_list")
        if self.enable_mouse:
            missing = [name for name in mouse_fields if getattr(self, name) is None]
            if missing:
                fail(f"enable_mouse is true but {missing} missing")
        for name in ("heads_num", "hidden_size", "keyboard_dim_in", "keyboard_hidden_dim",
                     "mouse_dim_in", "mouse_hidden_dim", "windows_size"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                fail(f"{name} must be positive, got {getattr(self, name)}")
        if self.rope_theta <= 0:
            fail(f"rope_theta must be positive, got {self.rope_theta}")
        if not windowed and self.blocks != tuple(range(num_layers)):
            fail(f"blocks must list every block 0..{num_layers - 1} (the reference's base model "
                 f"builds an action module in each block; only a streaming config, with "
                 f"local_attn_size set, may list a subset), got {list(self.blocks)}")
        if list(self.blocks) != sorted(set(self.blocks)) or not all(0 <= b < num_layers for b in self.blocks):
            fail(f"blocks must be increasing block indices in 0..{num_layers - 1}, got {list(self.blocks)}")
        if self.img_hidden_size != dim:
            fail(f"img_hidden_size ({self.img_hidden_size}) must equal dim ({dim})")
        if self.patch_size != PATCH_SIZE:
            fail(f"patch_size must be {list(PATCH_SIZE)}, got {list(self.patch_size)}")
        if self.vae_time_compression_ratio != VAE_TIME_STRIDE:
            fail(f"vae_time_compression_ratio must be the Wan VAE's time stride "
                 f"{VAE_TIME_STRIDE}, got {self.vae_time_compression_ratio}")
        if not self.qk_norm:
            fail("qk_norm false is not supported (the base model normalises q and k)")
        for name in ("mouse_hidden_dim", "keyboard_hidden_dim"):
            if getattr(self, name) is not None and getattr(self, name) % self.heads_num:
                fail(f"{name} ({getattr(self, name)}) must be divisible by heads_num "
                     f"({self.heads_num})")
        if self.mouse_hidden_dim is not None and self.mouse_hidden_dim != self.keyboard_hidden_dim:
            fail(f"mouse_hidden_dim ({self.mouse_hidden_dim}) and keyboard_hidden_dim "
                 f"({self.keyboard_hidden_dim}) must be equal: both branches share one "
                 f"action RoPE table")
        rope = self.rope_dim_list
        if len(rope) != 3 or any(d <= 0 or d % 2 for d in rope):
            fail(f"rope_dim_list must be three positive even numbers, got {list(rope)}")
        if sum(rope) != self.head_dim:
            fail(f"rope_dim_list {list(rope)} sums to {sum(rope)}, but the action head dim "
                 f"is {self.head_dim} (= hidden dim / heads_num)")
        if self.mouse_qk_dim_list is not None and self.mouse_qk_dim_list != rope:
            fail(f"mouse_qk_dim_list {list(self.mouse_qk_dim_list)} must equal rope_dim_list "
                 f"{list(rope)} (the reference builds its table from one, documents the other)")


@dataclass(frozen=True)
class WanConfig:
    """The base model's top-level config (public JSON fields) plus clip_dim."""

    action_config: ActionConfig
    dim: int
    eps: float
    ffn_dim: int
    freq_dim: int
    in_dim: int
    model_type: str
    num_heads: int
    num_layers: int
    out_dim: int
    clip_dim: int = DEFAULT_CLIP_DIM  # not in the public JSON; only tiny models change it
    # The streaming window, in latent frames: how many frames a block's attention reaches
    # (its own included), and how many of the stream's first frames it always keeps.
    local_attn_size: int = NO_LOCAL_WINDOW
    sink_size: int = 0
    # IGNORED_FIELDS as read, so to_dict() gives back what the user had.
    ignored_fields: tuple[tuple[str, Any], ...] = field(default=(), compare=False)

    def __post_init__(self):
        self.validate()

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def windowed(self) -> bool:
        """A streaming config: attention reaches local_attn_size latent frames back."""
        return self.local_attn_size != NO_LOCAL_WINDOW

    @classmethod
    def from_dict(cls, d: dict, source: str = "config") -> "WanConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"{source} must be a JSON object, got {type(d).__name__}")
        ignored = tuple((k, d[k]) for k in IGNORED_FIELDS if k in d)
        rest = {k: v for k, v in d.items() if k not in IGNORED_FIELDS}
        if "action_config" not in rest:
            raise ConfigError(f"{source}: missing required field(s) ['action_config']")
        action = ActionConfig(**_fields_from_dict(
            ActionConfig, rest["action_config"], f"{source}: action_config"))
        kwargs = _fields_from_dict(
            cls, {k: v for k, v in rest.items() if k != "action_config"}, source,
            skip=("action_config", "ignored_fields"))
        try:
            return cls(action_config=action, ignored_fields=ignored, **kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None

    @classmethod
    def from_json(cls, path) -> "WanConfig":
        return cls.from_dict(read_config_json(path), source=str(path))

    def to_dict(self) -> dict:
        """The public JSON format (ignored fields as read; clip_dim only if not 1280)."""
        d = dict(self.ignored_fields)
        d["action_config"] = self.action_config.to_dict()
        for f in dataclasses.fields(self):
            if f.name not in ("action_config", "ignored_fields", "clip_dim"):
                d[f.name] = getattr(self, f.name)
        if self.clip_dim != DEFAULT_CLIP_DIM:
            d["clip_dim"] = self.clip_dim
        return d

    def with_keyboard_dim(self, keyboard_dim: int) -> "WanConfig":
        action = dataclasses.replace(self.action_config, keyboard_dim_in=keyboard_dim)
        return dataclasses.replace(self, action_config=action)

    def with_window(self, local_attn_size: int, sink_size: int = 0) -> "WanConfig":
        """The same model with another streaming window (e.g. a causal student made from
        the base model, which keeps its action modules in every block)."""
        return dataclasses.replace(self, local_attn_size=local_attn_size, sink_size=sink_size)

    def validate(self) -> None:
        for name in ("dim", "ffn_dim", "freq_dim", "num_heads", "num_layers", "clip_dim"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.model_type != "i2v":
            raise ConfigError(f"model_type must be 'i2v', got {self.model_type!r}")
        if self.in_dim != LATENT_CHANNELS + COND_CHANNELS:
            raise ConfigError(f"in_dim must be {LATENT_CHANNELS + COND_CHANNELS} (noisy latent "
                              f"+ cond_concat channels), got {self.in_dim}")
        if self.out_dim != LATENT_CHANNELS:
            raise ConfigError(f"out_dim must be {LATENT_CHANNELS} (latent channels), "
                              f"got {self.out_dim}")
        if not self.eps > 0:
            raise ConfigError(f"eps must be positive, got {self.eps}")
        if self.freq_dim % 2:
            raise ConfigError(f"freq_dim must be even (cos and sin halves), got {self.freq_dim}")
        if self.dim % self.num_heads:
            raise ConfigError(f"dim ({self.dim}) must be divisible by num_heads "
                              f"({self.num_heads})")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ConfigError(f"head dim dim/num_heads = {self.head_dim} must be even and at "
                              f"least 6: the 3-D RoPE splits its pairs over frame, row, column")
        if self.local_attn_size != NO_LOCAL_WINDOW and self.local_attn_size < 1:
            raise ConfigError(f"local_attn_size must be a number of latent frames >= 1, or "
                              f"{NO_LOCAL_WINDOW} for no window, got {self.local_attn_size}")
        if self.sink_size < 0 or (self.windowed and self.sink_size >= self.local_attn_size):
            raise ConfigError(f"sink_size must be >= 0 and below local_attn_size "
                              f"({self.local_attn_size}): the window counts the sink frames, "
                              f"got {self.sink_size}")
        if not self.windowed and self.sink_size:
            raise ConfigError(f"sink_size ({self.sink_size}) needs a streaming window "
                              f"(local_attn_size), but local_attn_size is {NO_LOCAL_WINDOW}")
        self.action_config.validate(self.dim, self.num_layers, self.windowed)


def base_config() -> WanConfig:
    """The public Matrix-Game 2.0 base-model config (1.8B parameters)."""
    return WanConfig.from_json(BASE_CONFIG_PATH)


def distilled_config(mode: str) -> WanConfig:
    """The config of an official streaming student: "universal", "gta_drive" or "templerun"."""
    if mode not in DISTILLED_CONFIG_PATHS:
        raise ConfigError(f"unknown streaming model {mode!r}; choose one of {sorted(DISTILLED_CONFIG_PATHS)}")
    return WanConfig.from_json(DISTILLED_CONFIG_PATHS[mode])


def tiny_config(
    keyboard_dim: int = 4,
    num_layers: int = 2,
    dim: int = 32,
    num_heads: int = 2,
    ffn_dim: int = 64,
    freq_dim: int = 32,
    action_heads: int = 2,
    action_head_dim: int = 16,
    keyboard_hidden_size: int = 16,
    clip_dim: int = 32,
    local_attn_size: int = NO_LOCAL_WINDOW,
    sink_size: int = 0,
    action_blocks: tuple[int, ...] | None = None,
    enable_mouse: bool = True,
) -> WanConfig:
    """The base model's structure at toy widths, for CPU tests and the --demo run.

    Same windows (r = 4, w_s = 3), action modules in every block (or in action_blocks, for a
    streaming config), and the action RoPE keeps its 8 frame-rotating dims (so frame
    rotations equal the real model's); the remaining action head dims split evenly over the
    two non-rotating axes. enable_mouse=False drops the mouse fields, like templerun.
    """
    base = base_config()
    rest = action_head_dim - base.action_config.rope_dim_list[0]
    rope = (base.action_config.rope_dim_list[0], rest // 2, rest - rest // 2)
    hidden = action_heads * action_head_dim
    action = dataclasses.replace(
        base.action_config,
        blocks=tuple(range(num_layers)) if action_blocks is None else tuple(action_blocks),
        enable_mouse=enable_mouse,
        heads_num=action_heads,
        hidden_size=keyboard_hidden_size,
        img_hidden_size=dim,
        keyboard_dim_in=keyboard_dim,
        keyboard_hidden_dim=hidden,
        mouse_dim_in=base.action_config.mouse_dim_in if enable_mouse else None,
        mouse_hidden_dim=hidden if enable_mouse else None,
        mouse_qk_dim_list=rope if enable_mouse else None,
        rope_dim_list=rope,
    )
    return dataclasses.replace(
        base, action_config=action, dim=dim, ffn_dim=ffn_dim, freq_dim=freq_dim,
        num_heads=num_heads, num_layers=num_layers, clip_dim=clip_dim,
        local_attn_size=local_attn_size, sink_size=sink_size)
