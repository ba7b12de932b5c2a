"""WanVAE end to end on a tiny random-weight config (CPU), plus meta-device checks of the real one."""

import math

import pytest
import torch

from wan.shapes import LATENT_CHANNELS, VIDEO_HEIGHT, VIDEO_WIDTH, latent_frame_count, latent_size
from wan.vae import (CausalConv3d, FrameConv2d, VAEConfig, WanVAE, blend_ramp, load_vae, save_vae,
                     tile_starts)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def fully_random(model: WanVAE) -> WanVAE:
    """Every tap, bias and gamma random: the default init zeroes the past taps of the causal
    convs and all biases, which would let caching bugs hide."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
            elif p.ndim == 1:
                p.uniform_(-0.1, 0.1)
            else:
                torch.nn.init.kaiming_uniform_(p, a=math.sqrt(5))
    return model


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return fully_random(WanVAE(VAEConfig.tiny())).eval()


def video(batch=1, frames=9, height=32, width=48, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, frames, height, width, generator=generator) * 2 - 1


# ----------------------------------------------------------------------------- structure and shapes

def test_meta_build_matches_the_checkpoint_manifest(reference_dir):
    expected = {}
    for line in (reference_dir / "wan21_vae_keys.tsv").read_text().splitlines():
        key, shape = line.split("\t")
        expected[key] = tuple(int(n) for n in shape.strip("[]").split(","))
    with torch.device("meta"):
        model = WanVAE(VAEConfig())
    found = {key: tuple(t.shape) for key, t in model.state_dict().items()}
    assert len(expected) == 194
    assert found == expected


def test_real_config_shapes_for_a_full_clip_on_meta():
    with torch.device("meta"):
        model = WanVAE(VAEConfig())
    clip = torch.empty(1, 3, 57, VIDEO_HEIGHT, VIDEO_WIDTH, device="meta")
    latents = model.encode(clip)
    assert latents.shape == (1, LATENT_CHANNELS, latent_frame_count(57), *latent_size(VIDEO_HEIGHT, VIDEO_WIDTH))
    assert latents.shape[1:] == (16, 15, 44, 80)
    # Matrix-Game's tile (44, 80) / stride (23, 38) is one tile covering the whole 352x640 frame
    assert model.encode(clip, (44, 80), (23, 38)).shape == latents.shape
    assert model.decode(latents).shape == clip.shape


def test_small_encode_decode_shapes_and_range(vae):
    x = video(batch=2, frames=9, height=32, width=48)
    latents = vae.encode(x)
    assert latents.shape == (2, 16, 3, 4, 6)
    assert latents.dtype == torch.float32
    out = vae.decode(latents)
    assert out.shape == x.shape
    assert out.min() >= -1 and out.max() <= 1
    assert out.std() > 0.05  # not collapsed to a constant


def test_one_frame_gives_one_latent_frame(vae):
    latents = vae.encode(video(frames=1))
    assert latents.shape == (1, 16, 1, 4, 6)
    assert vae.decode(latents).shape == (1, 3, 1, 32, 48)


@pytest.mark.parametrize("frames", [2, 4, 8, 10])
def test_frame_count_that_is_not_4k_plus_1_is_an_error(vae, frames):
    with pytest.raises(ValueError, match=r"4k\+1"):
        vae.encode(video(frames=frames))


def test_bad_video_shapes_are_errors(vae):
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.encode(video(height=36))
    with pytest.raises(ValueError, match=r"\[B, 3, T, H, W\]"):
        vae.encode(torch.zeros(1, 4, 5, 32, 32))
    with pytest.raises(ValueError, match=r"\[B, 16, F, h, w\]"):
        vae.decode(torch.zeros(1, 8, 2, 4, 4))


# ----------------------------------------------------------------------------- causality and chunking

def test_encode_is_causal_exactly(vae):
    """Chunk i's computation only reads frames < 1+4i and the caches of earlier chunks, with the
    same ops on the same shapes, so earlier latents are bit-identical, not merely close."""
    x = video(frames=13)
    latents = vae.encode(x)
    for j in (0, 1, 2):
        changed = x.clone()
        changed[:, :, 1 + 4 * j:] = video(frames=13, seed=7)[:, :, 1 + 4 * j:]
        other = vae.encode(changed)
        assert torch.equal(other[:, :, :j + 1], latents[:, :, :j + 1])
        assert rel(other[:, :, j + 1:], latents[:, :, j + 1:]) > 1e-3  # the change does reach later latents
        assert torch.equal(vae.encode(x[:, :, :1 + 4 * j]), latents[:, :, :j + 1])


def test_decode_is_causal_exactly(vae):
    latents = torch.randn(1, 16, 4, 3, 4)
    out = vae.decode(latents)
    for j in range(4):
        assert torch.equal(vae.decode(latents[:, :, :j + 1]), out[:, :, :1 + 4 * j])


def test_chunked_encode_equals_single_pass(vae):
    x = video(batch=2, frames=13)
    torch.testing.assert_close(vae.encode(x), vae.encode_single_pass(x), rtol=1e-5, atol=1e-5)
    assert rel(vae.encode(x), vae.encode_single_pass(x)) < 1e-5


def test_chunked_decode_equals_single_pass(vae):
    latents = torch.randn(2, 16, 4, 3, 4)
    assert rel(vae.decode(latents), vae.decode_single_pass(latents)) < 1e-5


def test_batch_items_are_independent(vae):
    x = video(batch=2, frames=5)
    both = vae.encode(x)
    assert rel(both[1:], vae.encode(x[1:])) < 1e-5


# ----------------------------------------------------------------------------- tiling (A.6)

def test_tile_starts_and_ramps_follow_the_spec():
    assert tile_starts(10, 4, 3) == [0, 3, 6]  # 6 + 4 reaches the end
    assert tile_starts(9, 4, 3) == [0, 3, 6]
    assert tile_starts(7, 4, 3) == [0, 3]
    assert tile_starts(4, 8, 2) == [0]
    assert blend_ramp(6, 3, True, True).tolist() == pytest.approx([1 / 3, 2 / 3, 1, 1, 2 / 3, 1 / 3])
    assert blend_ramp(5, 2, False, True).tolist() == pytest.approx([1, 1, 1, 1, 0.5])
    assert blend_ramp(4, 2, False, False).tolist() == [1, 1, 1, 1]


def test_a_tile_covering_the_whole_frame_is_identical_to_untiled(vae):
    x = video(batch=2, frames=5)
    assert torch.equal(vae.encode(x, (4, 6), (2, 3)), vae.encode(x))
    assert torch.equal(vae.encode(x, 8, 8), vae.encode(x))
    latents = torch.randn(1, 16, 2, 4, 6)
    assert torch.equal(vae.decode(latents, (4, 6), (3, 3)), vae.decode(latents))


def reference_blend(run, x, tile, stride, in_scale, out_scale):
    """A.6 written out: tiles at 0, D, 2D, ...; ramps (j+1)/b at inner edges; sum(tile*mask)/sum(mask)."""
    (sh, sw), (dh, dw) = tile, stride
    height, width = x.shape[-2:]

    def starts(n, s, d):
        p = [0]
        while p[-1] + s < n:
            p.append(p[-1] + d)
        return p

    def ramp(n, b, inner_start, inner_end):
        m = torch.ones(n)
        for j in range(b):
            if inner_start:
                m[j] = min(m[j], (j + 1) / b)
            if inner_end:
                m[n - 1 - j] = min(m[n - 1 - j], (j + 1) / b)
        return m

    out, weight = 0, torch.zeros(height * out_scale // in_scale, width * out_scale // in_scale)
    for top in starts(height, sh * in_scale, dh * in_scale):
        for left in starts(width, sw * in_scale, dw * in_scale):
            y = run(x[..., top:top + sh * in_scale, left:left + sw * in_scale])
            mh = ramp(y.shape[-2], (sh - dh) * out_scale, top > 0, top + sh * in_scale < height)
            mw = ramp(y.shape[-1], (sw - dw) * out_scale, left > 0, left + sw * in_scale < width)
            mask = torch.minimum(mh[:, None], mw[None, :])
            canvas = torch.zeros(*y.shape[:-2], *weight.shape)
            oy, ox = top * out_scale // in_scale, left * out_scale // in_scale
            canvas[..., oy:oy + y.shape[-2], ox:ox + y.shape[-1]] = y * mask
            out = out + canvas
            weight[oy:oy + y.shape[-2], ox:ox + y.shape[-1]] += mask
    return out / weight


def test_tiled_encode_and_decode_blend_tiles_as_the_spec_says(vae):
    # 6x8 latent frame, tiles 4x4 at stride 2x3: rows {0, 2}, columns {0, 3, 6} (the last one cut to 2)
    x = video(batch=2, frames=5, height=48, width=64)
    tiled = vae.encode(x, (4, 4), (2, 3))
    expected = reference_blend(vae.encode, x, (4, 4), (2, 3), 8, 1)
    assert tiled.shape == (2, 16, 2, 6, 8)
    assert rel(tiled, expected) < 1e-6
    latents = torch.randn(1, 16, 2, 6, 8)
    tiled = vae.decode(latents, (4, 4), (2, 3))
    # tiles are blended before the clamp (A.6), so blend the unclamped decoder output
    expected = reference_blend(vae._decode_chunked, latents, (4, 4), (2, 3), 1, 8).clamp(-1, 1)
    assert tiled.shape == (1, 3, 5, 48, 64)
    assert rel(tiled, expected) < 1e-6


def test_tiled_batch_equals_tiling_each_item(vae):
    """The reference rescales the tile size inside its batch loop (A.6 quirk); ours does not."""
    x = video(batch=2, frames=5, height=48, width=64)
    both = vae.encode(x, (4, 4), (2, 3))
    for b in range(2):
        assert rel(both[b:b + 1], vae.encode(x[b:b + 1], (4, 4), (2, 3))) < 1e-5


def spatially_pointwise(model: WanVAE) -> WanVAE:
    """Keep only the centre tap of every spatial kernel and switch attention off: each latent
    pixel then depends on one pixel per 8x8 block, so tile borders cannot change anything."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (CausalConv3d, FrameConv2d)) and module.weight.shape[-1] == 3:
                centre = module.weight[..., 1:2, 1:2].clone()
                module.weight.zero_()
                module.weight[..., 1:2, 1:2] = centre
        for attention in (model.encoder.middle[1], model.decoder.middle[1]):
            attention.proj.weight.zero_()
    return model


def test_tiled_equals_untiled_when_nothing_crosses_tile_borders():
    """Tolerance 1e-5 relative: for a spatially pointwise VAE, tiles placed and weighted correctly
    reproduce the untiled result up to float rounding. With a full VAE tiling is not exact: the
    receptive field (about 100 pixels) and the per-tile attention cross tile borders, so the
    difference depends on the weights and shrinks as tiles grow (A.6 accepts this)."""
    torch.manual_seed(3)
    model = spatially_pointwise(fully_random(WanVAE(VAEConfig.tiny())))
    x = video(frames=5, height=48, width=64)
    assert rel(model.encode(x, (4, 4), (2, 3)), model.encode(x)) < 1e-5
    latents = model.encode(x)
    assert rel(model.decode(latents, (3, 5), (2, 3)), model.decode(latents)) < 1e-5


def test_bad_tile_arguments_are_errors(vae):
    x = video(frames=1)
    with pytest.raises(ValueError, match="both tile_latent_size and tile_latent_stride"):
        vae.encode(x, tile_latent_size=(2, 2))
    with pytest.raises(ValueError, match="must not exceed"):
        vae.encode(x, (2, 2), (3, 2))
    with pytest.raises(ValueError, match="positive"):
        vae.decode(torch.zeros(1, 16, 1, 4, 4), (0, 2), (1, 1))


# ----------------------------------------------------------------------------- random init

def test_random_init_gives_unit_scale_informative_latents():
    torch.manual_seed(0)
    model = WanVAE(VAEConfig.tiny())
    x, y = video(frames=9, seed=1), video(frames=9, seed=2)
    latents = model.encode(x)
    assert 0.3 < latents.std() < 3
    assert latents.mean().abs() < 0.5
    assert latents.std(dim=(0, 2, 3, 4)).min() > 0.1  # every channel carries signal
    assert rel(model.encode(y), latents) > 0.3  # different videos -> clearly different latents
    for f in range(latents.shape[2] - 1):
        assert rel(latents[:, :, f + 1], latents[:, :, f]) > 0.3  # different frames too
    # a latent frame follows its own 4 frames, not frame 0 (the failure of a naive random init)
    own, first = x.clone(), x.clone()
    own[:, :, 5:] = y[:, :, 5:]
    first[:, :, 0] = y[:, :, 0]
    assert rel(model.encode(own)[:, :, 2], latents[:, :, 2]) > 0.3
    assert rel(model.encode(first)[:, :, 2], latents[:, :, 2]) < 1e-5


def test_bfloat16_runs_close_to_float32(vae):
    x = video(frames=5)
    reference = vae.encode(x)
    half = WanVAE(VAEConfig.tiny())
    half.load_state_dict(vae.state_dict())
    half = half.to(torch.bfloat16)
    latents = half.encode(x)  # float32 input is cast to the VAE's dtype
    assert latents.dtype == torch.bfloat16
    assert rel(latents.float(), reference) < 0.05
    assert half.decode(latents).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- files

def test_save_load_round_trip(vae, tmp_path):
    path = save_vae(vae, tmp_path / "tiny_vae.pth")
    loaded = load_vae(path)
    assert loaded.config == VAEConfig.tiny()
    assert not loaded.training
    for key, value in vae.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    x = video(frames=5)
    torch.testing.assert_close(loaded.encode(x), vae.encode(x), rtol=1e-5, atol=1e-6)  # separately allocated
    assert load_vae(path, dtype=torch.bfloat16).dtype == torch.bfloat16
    # the file is a plain state dict, as Wan2.1_VAE.pth is
    raw = torch.load(path, weights_only=True)
    assert isinstance(raw, dict) and len(raw) == 194 and "encoder.conv1.weight" in raw


def test_load_names_every_missing_unexpected_and_misshaped_key(vae, tmp_path):
    state = dict(vae.state_dict())
    del state["decoder.head.2.bias"]
    state["encoder.extra.weight"] = torch.zeros(2)
    state["conv1.weight"] = torch.zeros(32, 32, 1, 1, 2)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as error:
        load_vae(path)
    message = str(error.value)
    assert str(path) in message
    assert "decoder.head.2.bias (expected [3])" in message
    assert "encoder.extra.weight [2]" in message
    assert "conv1.weight: expected [32, 32, 1, 1, 1], found [32, 32, 1, 1, 2]" in message


def test_load_rejects_a_file_that_is_not_a_vae(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"visual.patch_embedding.weight": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not a Wan2.1 VAE state dict"):
        load_vae(path)


def test_missing_file_says_where_the_official_one_comes_from(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_vae(tmp_path / "nowhere" / "Wan2.1_VAE.pth")
    message = str(error.value)
    assert "Wan2.1_VAE.pth" in message and "Skywork/Matrix-Game-2.0" in message
    assert "models/Wan2.1_VAE.pth" in message


def test_config_is_read_from_the_shapes(vae):
    wide = WanVAE(VAEConfig(dim=16))
    assert VAEConfig.from_state_dict(wide.state_dict()) == VAEConfig(dim=16)
    assert VAEConfig.from_state_dict(vae.state_dict()) == VAEConfig.tiny()


def test_config_rejects_structures_the_shape_rules_do_not_allow():
    with pytest.raises(ValueError, match="z_dim must be 16"):
        VAEConfig(z_dim=8)
    with pytest.raises(ValueError, match="downsample space by 8 and time by 4"):
        VAEConfig(temporal_downsample=(False, False, True))


def test_truncated_vae_file_is_an_error_naming_it(tmp_path):
    path = tmp_path / "Wan2.1_VAE.pth"
    save_vae(WanVAE(VAEConfig.tiny()), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="could not read the VAE checkpoint .*Wan2.1_VAE.pth"):
        load_vae(path)
