import math

import pytest
import torch

from wan.clip import (
    CLIP_FILE_NAME,
    CLIPVisionConfig,
    CLIPVisionTower,
    LayerNorm,
    load_clip,
    preprocess_frames,
    save_clip,
    visual_state_dict,
)

TINY = CLIPVisionConfig.tiny()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.double(), expected.double()
    return ((actual - expected).norm() / expected.norm()).item()


@pytest.fixture
def tower():
    torch.manual_seed(0)
    tower = CLIPVisionTower(TINY).eval()
    # Non-trivial norms so the test sees their weights and biases being used.
    with torch.no_grad():
        for module in tower.modules():
            if isinstance(module, LayerNorm):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(std=0.1)
    return tower


def frames(n=2, height=37, width=61, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, height, width, generator=generator) * 2 - 1


# --- architecture vs the official manifest --------------------------------------------

def test_meta_build_matches_official_keys_and_shapes(reference_dir):
    rows = (reference_dir / "clip_vit_h14_visual_keys.tsv").read_text().splitlines()
    manifest = [tuple(row.split("\t")) for row in rows]
    with torch.device("meta"):
        tower = CLIPVisionTower(CLIPVisionConfig())
    ours = [(k, str(list(v.shape))) for k, v in visual_state_dict(tower).items()]
    assert len(ours) == 392
    assert ours == manifest


def test_config_inferred_from_official_shapes_is_the_real_config():
    with torch.device("meta"):
        tower = CLIPVisionTower(CLIPVisionConfig())
    config = CLIPVisionConfig.from_state_dict(visual_state_dict(tower))
    assert config == CLIPVisionConfig()
    assert (config.heads, config.head_dim, config.num_tokens, config.num_output_blocks) == (16, 80, 257, 31)
    assert CLIPVisionConfig.from_state_dict(CLIPVisionTower(TINY).state_dict()) == TINY


# --- loader ----------------------------------------------------------------------------

def test_save_load_round_trip_gives_identical_outputs(tower, tmp_path):
    path = save_clip(tower, tmp_path / "clip.pth")
    loaded = load_clip(path)
    assert loaded.config == TINY and not loaded.training
    assert all(not p.requires_grad for p in loaded.parameters())
    x = frames()
    assert torch.equal(loaded.encode_frames(x), tower.encode_frames(x))


def test_loader_ignores_text_tower_and_log_scale(tower, tmp_path):
    checkpoint = visual_state_dict(tower)
    checkpoint["textual.token_embedding.weight"] = torch.randn(10, 8)
    checkpoint["textual.head.0.weight"] = torch.randn(4, 8)
    checkpoint["log_scale"] = torch.tensor(4.6)
    torch.save(checkpoint, tmp_path / CLIP_FILE_NAME)
    loaded = load_clip(tmp_path / CLIP_FILE_NAME, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.equal(loaded.head, tower.head.bfloat16())


def test_loader_names_every_missing_visual_key(tower, tmp_path):
    checkpoint = visual_state_dict(tower)
    del checkpoint["visual.transformer.1.attn.proj.weight"]
    del checkpoint["visual.post_norm.bias"]
    torch.save(checkpoint, tmp_path / "clip.pth")
    with pytest.raises(ValueError) as error:
        load_clip(tmp_path / "clip.pth")
    message = str(error.value)
    assert "clip.pth" in message
    assert "missing visual.transformer.1.attn.proj.weight (expected [160, 160])" in message
    assert "missing visual.post_norm.bias (expected [160])" in message


def test_loader_reports_wrong_shapes_with_both_shapes(tower, tmp_path):
    checkpoint = visual_state_dict(tower)
    checkpoint["visual.transformer.0.mlp.2.bias"] = torch.zeros(7)
    checkpoint["visual.transformer.9.norm1.weight"] = torch.zeros(160)
    torch.save(checkpoint, tmp_path / "clip.pth")
    with pytest.raises(ValueError) as error:
        load_clip(tmp_path / "clip.pth", config=TINY)
    message = str(error.value)
    assert "wrong shape visual.transformer.0.mlp.2.bias: expected [160], found [7]" in message
    assert "unexpected visual.transformer.9.norm1.weight" in message


def test_loader_rejects_a_file_without_visual_tensors(tmp_path):
    torch.save({"encoder.conv1.weight": torch.zeros(1)}, tmp_path / "vae.pth")
    with pytest.raises(ValueError, match="no 'visual.\\*' tensors"):
        load_clip(tmp_path / "vae.pth")


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_clip(tmp_path / "models" / CLIP_FILE_NAME)
    message = str(error.value)
    assert CLIP_FILE_NAME in message and "Skywork/Matrix-Game-2.0" in message and "models/" in message


# --- preprocessing (B.4) ---------------------------------------------------------------

def keys_cubic(d: float, a: float = -0.75) -> float:
    d = abs(d)
    if d <= 1:
        return (a + 2) * d**3 - (a + 3) * d**2 + 1
    if d < 2:
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return 0.0


def bicubic_matrix(size_in: int, size_out: int) -> torch.Tensor:
    """B.4 step 2 for one axis, as a [size_out, size_in] float64 matrix."""
    matrix = torch.zeros(size_out, size_in, dtype=torch.float64)
    for dst in range(size_out):
        src = (dst + 0.5) * size_in / size_out - 0.5  # not clamped
        first = math.floor(src)
        t = src - first
        for tap, distance in zip((first - 1, first, first + 1, first + 2), (1 + t, t, 1 - t, 2 - t)):
            matrix[dst, min(max(tap, 0), size_in - 1)] += keys_cubic(distance)
    return matrix


def spec_preprocess(x: torch.Tensor, size: int) -> torch.Tensor:
    x = x.double()
    rows, cols = bicubic_matrix(x.shape[-2], size), bicubic_matrix(x.shape[-1], size)
    x = rows @ x @ cols.T
    x = x * 0.5 + 0.5
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711], dtype=torch.float64).view(1, 3, 1, 1)
    return (x - mean) / std


@pytest.mark.parametrize("height,width", [(37, 61), (88, 160), (56, 56), (20, 30)])
def test_preprocessing_matches_the_spec_formula(height, width):
    x = frames(2, height, width)
    expected = spec_preprocess(x, 56)
    exact = preprocess_frames(x.double(), 56)
    assert exact.dtype == torch.float64 and (exact - expected).abs().max() < 1e-12
    ours = preprocess_frames(x, 56)
    assert ours.dtype == torch.float32 and ours.shape == (2, 3, 56, 56)
    # float32 rounds the source coordinate (ulp 1.5e-5 at 160 pixels), which moves the
    # cubic weights by about that much; normalisation then divides by std ~0.27.
    assert relative_error(ours, expected) < 1e-5
    assert (ours.double() - expected).abs().max() < 1e-4


def test_normalisation_is_per_channel():
    colour = torch.tensor([-0.6, 0.1, 0.9])
    x = colour.view(1, 3, 1, 1).expand(1, 3, 30, 50)
    ours = preprocess_frames(x, 56)
    expected = ((colour * 0.5 + 0.5) - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711])
    assert torch.allclose(ours, expected.view(1, 3, 1, 1).expand_as(ours), atol=1e-6)


def test_preprocessing_rejects_bad_frames():
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        preprocess_frames(frames() * 127.5 + 127.5, 56)
    with pytest.raises(ValueError, match="RGB frames"):
        preprocess_frames(torch.zeros(3, 40, 40), 56)


# --- forward (B.3) ----------------------------------------------------------------------

def naive_forward(params: dict, config: CLIPVisionConfig, pixels: torch.Tensor) -> torch.Tensor:
    """B.3 written out in float64: explicit patches, per-head softmax, erf GELU, pre-norm."""
    p = {k: v.double() for k, v in params.items()}
    n, width, patch, grid = pixels.shape[0], config.width, config.patch_size, config.grid_size

    def layer_norm(x, name):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        return (x - mean) / torch.sqrt(var + config.eps) * p[name + ".weight"] + p[name + ".bias"]

    def linear(x, name):
        return x @ p[name + ".weight"].T + p[name + ".bias"]

    patches = pixels.double().reshape(n, 3, grid, patch, grid, patch).permute(0, 2, 4, 1, 3, 5)
    x = patches.reshape(n, grid * grid, 3 * patch * patch) @ p["patch_embedding.weight"].reshape(width, -1).T
    x = torch.cat([p["cls_embedding"].expand(n, 1, width), x], dim=1) + p["pos_embedding"]
    x = layer_norm(x, "pre_norm")
    for i in range(config.layers - 1):
        block = f"transformer.{i}."
        qkv = linear(layer_norm(x, block + "norm1"), block + "attn.to_qkv")
        heads = []
        for h in range(config.heads):
            part = slice(80 * h, 80 * h + 80)
            q, k, v = qkv[..., :width][..., part], qkv[..., width:2 * width][..., part], qkv[..., 2 * width:][..., part]
            heads.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(80), dim=-1) @ v)
        x = x + linear(torch.cat(heads, dim=-1), block + "attn.proj")
        hidden = linear(layer_norm(x, block + "norm2"), block + "mlp.0")
        hidden = 0.5 * hidden * (1 + torch.erf(hidden / math.sqrt(2)))
        x = x + linear(hidden, block + "mlp.2")
    return x


def test_forward_matches_naive_reimplementation(tower):
    assert TINY.head_dim == 80
    pixels = preprocess_frames(frames(3), TINY.image_size)
    ours = tower(pixels)
    assert ours.shape == (3, TINY.num_tokens, TINY.width) and ours.dtype == torch.float32
    assert relative_error(ours, naive_forward(tower.state_dict(), TINY, pixels)) < 1e-5


def test_last_block_post_norm_and_head_are_unused(tower):
    x = frames()
    before = tower.encode_frames(x)
    with torch.no_grad():
        for tensor in [tower.head, *tower.post_norm.parameters(), *tower.transformer[-1].parameters()]:
            tensor.normal_(std=10.0)
    assert torch.equal(tower.encode_frames(x), before)
    with torch.no_grad():
        tower.transformer[-2].mlp[2].bias.add_(1.0)
    assert not torch.equal(tower.encode_frames(x), before)


def test_token_zero_is_cls_and_patches_follow_in_row_major_order(tower):
    # Without position embeddings attention is permutation-equivariant, so reordering
    # the image's patches reorders output tokens 1.. the same way and leaves CLS alone.
    with torch.no_grad():
        tower.pos_embedding.zero_()
    grid, patch = TINY.grid_size, TINY.patch_size
    pixels = preprocess_frames(frames(1), TINY.image_size)
    blocks = pixels.reshape(1, 3, grid, patch, grid, patch)
    swapped = blocks.transpose(2, 4).reshape_as(pixels)  # patch (i, j) -> (j, i)
    out, out_swapped = tower(pixels), tower(swapped)
    assert torch.allclose(out_swapped[:, 0], out[:, 0], atol=1e-5)
    order = torch.arange(grid * grid).view(grid, grid).T.reshape(-1)
    assert torch.allclose(out_swapped[:, 1:], out[:, 1:][:, order], atol=1e-5)
    assert not torch.allclose(out[:, 1], out[:, 2], atol=1e-3)


def test_forward_rejects_wrong_image_size(tower):
    with pytest.raises(ValueError, match=r"\[N, 3, 56, 56\]"):
        tower(torch.zeros(1, 3, 224, 224))


# --- precision --------------------------------------------------------------------------

def test_layer_norm_runs_in_float32_and_casts_back():
    norm = LayerNorm(160).bfloat16()
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(4, 160) * 30 + 100).bfloat16()
    expected = torch.nn.functional.layer_norm(x.float(), (160,), norm.weight.float(), norm.bias.float())
    out = norm(x)
    assert out.dtype == torch.bfloat16 and torch.equal(out, expected.bfloat16())


# bf16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2%); through the tiny tower's
# two blocks the measured error is ~0.55% for both forms, so allow 1.5%.
BF16_TOLERANCE = 1.5e-2


def test_bf16_weights_stay_close_to_float32(tower):
    x = frames(2)
    reference = tower.encode_frames(x)
    out = tower.bfloat16().encode_frames(x)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, reference) < BF16_TOLERANCE


def test_bf16_autocast_stays_close_to_float32(tower):
    x = frames(2)
    reference = tower.encode_frames(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = tower.encode_frames(x)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, reference) < BF16_TOLERANCE
