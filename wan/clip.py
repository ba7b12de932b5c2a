"""The image tower of Wan2.1's CLIP (open-clip XLM-RoBERTa-large ViT-H/14).

Matrix-Game conditions the transformer on the CLIP tokens of the first frame
(`visual_context`, [257, 1280]): the residual stream after the first 31 of the 32
blocks, CLS token first, with no final norm, head or pooling. Only the `visual.*`
tensors of the official file are read; the text tower is never built.

Precision follows the reference's bf16 run where it matters: LayerNorm always runs in
float32 and is cast back. Attention runs in the input dtype, so a float32 tower attends
in exact float32 (the reference's CUDA helper would attend in bf16, spec B.5).
"""

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from wan.files import load_torch_checkpoint, torch_save_atomic

CLIP_FILE_NAME = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"
DEFAULT_CLIP_PATH = Path("models") / CLIP_FILE_NAME
CLIP_DOWNLOAD_HINT = (
    f"Download {CLIP_FILE_NAME} from the Hugging Face repo Skywork/Matrix-Game-2.0 (the same "
    f"file is in Wan-AI/Wan2.1-I2V-14B-480P), e.g. `huggingface-cli download "
    f"Skywork/Matrix-Game-2.0 {CLIP_FILE_NAME} --local-dir models`; models/ is where it is "
    f"looked for by default."
)
STATE_DICT_PREFIX = "visual."

# Wan's ViT-H/14 uses 80-dimensional heads (1280 = 16 x 80). The head count is not
# stored in a checkpoint, so configs read from a file assume this head size.
HEAD_DIM = 80

# B.4: the OpenAI CLIP pixel statistics, applied to pixels in [0, 1].
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPVisionConfig:
    image_size: int = 224
    patch_size: int = 14
    width: int = 1280
    layers: int = 32
    heads: int = 16
    mlp_ratio: int = 4
    embed_dim: int = 1024  # width of the unused projection `head`
    eps: float = 1e-5

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.layers < 2:
            raise ValueError(f"layers must be >= 2 (the output is taken before the last block), got {self.layers}")

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_tokens(self) -> int:
        return 1 + self.grid_size**2

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_dim(self) -> int:
        return self.width * self.mlp_ratio

    @property
    def num_output_blocks(self) -> int:
        """Wan uses the residual stream after all but the last block."""
        return self.layers - 1

    @classmethod
    def tiny(cls) -> "CLIPVisionConfig":
        """For CPU tests and the demo: 17 tokens of width 160 (two 80-wide heads)."""
        return cls(image_size=56, patch_size=14, width=2 * HEAD_DIM, layers=3, heads=2, embed_dim=32)

    @classmethod
    def from_state_dict(cls, state_dict: dict) -> "CLIPVisionConfig":
        """Infer the architecture from tower tensors (with or without the `visual.` prefix).

        heads = width // 80 (Wan's head size); image_size comes from the number of
        position embeddings. The depth is the published ViT-H/14's (32 blocks) whenever the
        shapes are that tower's, so a file missing its last blocks is refused with them
        listed rather than read as a shallower tower (whose output would be another
        block's features). Only towers of other widths (our tiny test ones) take their
        depth from the highest block index in the file.
        """
        sd = _strip_prefix(state_dict)

        def shape_of(key: str, ndim: int) -> tuple[int, ...]:
            if key not in sd:
                raise ValueError(f"cannot infer the CLIP config: tensor '{STATE_DICT_PREFIX}{key}' is missing")
            shape = tuple(sd[key].shape)
            if len(shape) != ndim:
                raise ValueError(f"'{STATE_DICT_PREFIX}{key}' has shape {list(shape)}, expected {ndim} dimensions")
            return shape

        width, in_channels, patch_size, patch_w = shape_of("patch_embedding.weight", 4)
        if in_channels != 3 or patch_size != patch_w:
            raise ValueError(f"'{STATE_DICT_PREFIX}patch_embedding.weight' has shape "
                             f"[{width}, {in_channels}, {patch_size}, {patch_w}], expected [width, 3, p, p]")
        num_tokens = shape_of("pos_embedding", 3)[1]
        grid = math.isqrt(num_tokens - 1)
        if grid * grid != num_tokens - 1:
            raise ValueError(f"'{STATE_DICT_PREFIX}pos_embedding' has {num_tokens} positions; "
                             f"expected 1 + a square number (CLS + patch grid)")
        block_ids = {int(k.split(".")[1]) for k in sd if k.startswith("transformer.") and k.split(".")[1].isdigit()}
        if not block_ids:
            raise ValueError(f"no '{STATE_DICT_PREFIX}transformer.<i>.*' tensors found")
        mlp_dim = shape_of("transformer.0.mlp.0.weight", 2)[0]
        if width % HEAD_DIM or mlp_dim % width:
            raise ValueError(f"width {width} / MLP width {mlp_dim} do not fit Wan's CLIP "
                             f"(width a multiple of the head size {HEAD_DIM}, MLP width a multiple of width)")
        inferred = cls(image_size=grid * patch_size, patch_size=patch_size, width=width,
                       layers=max(max(block_ids) + 1, 2), heads=width // HEAD_DIM, mlp_ratio=mlp_dim // width,
                       embed_dim=shape_of("head", 2)[1])
        published = cls()
        if dataclasses.replace(inferred, layers=published.layers) == published:
            return published
        return inferred


def _strip_prefix(state_dict: dict) -> dict:
    if any(k.startswith(STATE_DICT_PREFIX) for k in state_dict):
        return {k[len(STATE_DICT_PREFIX):]: v for k, v in state_dict.items() if k.startswith(STATE_DICT_PREFIX)}
    return dict(state_dict)


class LayerNorm(nn.LayerNorm):
    """LayerNorm in float32, cast back to the input dtype (as the reference does in bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).type_as(x)


class SelfAttention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, width = x.shape
        # qkv features are [q | k | v], each split into heads of consecutive features.
        q, k, v = self.to_qkv(x).view(n, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(n, length, width))


class Block(nn.Module):
    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.norm1 = LayerNorm(config.width, eps=config.eps)
        self.attn = SelfAttention(config.width, config.heads)
        self.norm2 = LayerNorm(config.width, eps=config.eps)
        self.mlp = nn.Sequential(nn.Linear(config.width, config.mlp_dim), nn.GELU(),
                                 nn.Linear(config.mlp_dim, config.width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CLIPVisionTower(nn.Module):
    """ViT with a CLS token and pre-norm blocks; returns the tokens after block layers-2.

    The last block, `post_norm` and `head` exist only so that every `visual.*` tensor of
    the official file loads strictly (a wrong or truncated file is then caught); forward
    never uses them.
    """

    def __init__(self, config: CLIPVisionConfig):
        super().__init__()
        self.config = config
        width, scale = config.width, config.width**-0.5
        # Registration order reproduces the official state-dict order.
        self.cls_embedding = nn.Parameter(scale * torch.randn(1, 1, width))
        self.pos_embedding = nn.Parameter(scale * torch.randn(1, config.num_tokens, width))
        self.head = nn.Parameter(scale * torch.randn(width, config.embed_dim))
        # No bias: the reference disables it because pre_norm follows.
        self.patch_embedding = nn.Conv2d(3, width, config.patch_size, stride=config.patch_size, bias=False)
        self.pre_norm = LayerNorm(width, eps=config.eps)
        self.transformer = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.post_norm = LayerNorm(width, eps=config.eps)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """pixels [N, 3, S, S], already preprocessed (see preprocess_frames) -> [N, 1 + (S/p)^2, width]."""
        size = self.config.image_size
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, size, size):
            raise ValueError(f"CLIP expects preprocessed pixels [N, 3, {size}, {size}], got {list(pixels.shape)}")
        weight = self.patch_embedding.weight
        x = self.patch_embedding(pixels.to(device=weight.device, dtype=weight.dtype))
        x = x.flatten(2).transpose(1, 2)  # patches in row-major order
        cls = self.cls_embedding.to(x.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embedding.to(x.dtype)
        x = self.pre_norm(x)
        for block in self.transformer[: self.config.num_output_blocks]:
            x = block(x)
        return x

    @torch.no_grad()
    def encode_frames(self, frames: torch.Tensor) -> torch.Tensor:
        """RGB frames [N, 3, H, W] in [-1, 1] -> CLIP tokens [N, tokens, width]."""
        pixels = preprocess_frames(frames.to(self.pos_embedding.device), self.config.image_size)
        return self(pixels)


def preprocess_frames(frames: torch.Tensor, image_size: int) -> torch.Tensor:
    """B.4: squash to image_size^2 with bicubic (no antialias, no crop), [-1,1] -> [0,1], normalise.

    Computed in float32, or float64 for float64 input (the reference runs it in its model
    dtype, bf16; more precision only removes rounding). Returns [N, 3, image_size, image_size].
    """
    if frames.ndim != 4 or frames.shape[1] != 3 or not frames.is_floating_point():
        raise ValueError(f"expected float RGB frames [N, 3, H, W] in [-1, 1], got "
                         f"{frames.dtype} {list(frames.shape)}")
    low, high = frames.aminmax()
    if low < -1.01 or high > 1.01:
        raise ValueError(f"frames must be in [-1, 1], got values in [{low.item():.3g}, {high.item():.3g}]")
    x = frames.to(torch.promote_types(frames.dtype, torch.float32))
    x = F.interpolate(x, size=(image_size, image_size), mode="bicubic", align_corners=False, antialias=False)
    x = x * 0.5 + 0.5
    mean = torch.tensor(CLIP_MEAN, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def visual_state_dict(tower: CLIPVisionTower) -> dict[str, torch.Tensor]:
    """The tower's tensors under the names the official checkpoint uses."""
    return {STATE_DICT_PREFIX + k: v for k, v in tower.state_dict().items()}


def save_clip(tower: CLIPVisionTower, path) -> Path:
    """Write the tower in the official file's format (a `visual.`-prefixed state dict)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in visual_state_dict(tower).items()}
    return torch_save_atomic(tensors, path)


def read_clip_file(path, config: CLIPVisionConfig | None = None) -> tuple[dict, CLIPVisionConfig]:
    """The image tower's tensors of the file (memory-mapped, not read yet, `visual.` prefix
    removed) and the config they fit, every key and shape checked. Cheap: run it before
    hours of work that will need the encoder."""
    path = Path(path)
    checkpoint = load_torch_checkpoint(path, "CLIP image encoder", CLIP_DOWNLOAD_HINT)
    found = {k[len(STATE_DICT_PREFIX):]: v for k, v in checkpoint.items()
             if isinstance(k, str) and k.startswith(STATE_DICT_PREFIX)}
    if not found:
        sample = ", ".join(list(map(str, checkpoint))[:5])
        raise ValueError(f"{path} has no '{STATE_DICT_PREFIX}*' tensors (first keys: {sample}); "
                         f"is it the CLIP checkpoint {CLIP_FILE_NAME}?")
    try:
        config = config or CLIPVisionConfig.from_state_dict(found)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from error
    with torch.device("meta"):
        expected = CLIPVisionTower(config).state_dict()
    problems = [f"missing {STATE_DICT_PREFIX}{k} (expected {list(v.shape)})"
                for k, v in expected.items() if k not in found]
    problems += [f"wrong shape {STATE_DICT_PREFIX}{k}: expected {list(v.shape)}, found {list(found[k].shape)}"
                 for k, v in expected.items() if k in found and found[k].shape != v.shape]
    problems += [f"unexpected {STATE_DICT_PREFIX}{k} {list(v.shape)}" for k, v in found.items() if k not in expected]
    if problems:
        raise ValueError(f"{path} does not match the CLIP image tower {config}:\n  " + "\n  ".join(problems))
    return found, config


def load_clip(path, device="cpu", dtype: torch.dtype = torch.float32, *,
              config: CLIPVisionConfig | None = None) -> CLIPVisionTower:
    """Load the image tower from the official CLIP file (or one written by save_clip).

    Reads only the `visual.*` tensors (the text tower and `log_scale` are ignored) and
    loads them strictly. The architecture is inferred from the file unless `config` is
    given. Returns the tower in eval mode without gradients, on device in dtype.
    """
    found, config = read_clip_file(path, config)
    with torch.device("meta"):
        tower = CLIPVisionTower(config)
    tower.load_state_dict(found, strict=True, assign=True)
    return tower.to(device=device, dtype=dtype).eval().requires_grad_(False)
