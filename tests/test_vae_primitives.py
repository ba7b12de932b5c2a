"""The VAE's building blocks checked against VAE_CLIP_SPEC A.2 / A.4 / A.5, written out by hand."""

import math

import torch
import torch.nn.functional as F

from wan.vae import (LATENT_MEAN, LATENT_STD, AttentionBlock, CausalConv3d, CausalState, RMSNorm, Resample,
                     VAEConfig, WanVAE, interleave_time)

torch.manual_seed(0)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def randomize(module):
    for p in module.parameters():
        p.data.normal_(0, 0.3)
    return module


def test_rms_norm_is_l2_normalise_times_sqrt_c_times_gamma():
    c = 6
    norm = randomize(RMSNorm(c))
    assert norm.gamma.shape == (c, 1, 1, 1)
    x = torch.randn(2, c, 3, 4, 5)
    gamma = norm.gamma.view(1, c, 1, 1, 1)
    expected = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12) * math.sqrt(c) * gamma
    torch.testing.assert_close(norm(x), expected)
    # same as dividing by the root mean square over channels (up to the eps)
    torch.testing.assert_close(norm(x), x / x.pow(2).mean(1, keepdim=True).sqrt() * gamma)
    # the eps clamps the norm: an all-zero position stays zero, no NaN
    x[:, :, 0] = 0
    assert torch.equal(norm(x)[:, :, 0], torch.zeros_like(x[:, :, 0]))


def test_rms_norm_image_gamma_shape():
    norm = randomize(RMSNorm(4, gamma_dims=2))
    assert norm.gamma.shape == (4, 1, 1)
    x = torch.randn(1, 4, 2, 3, 3)
    torch.testing.assert_close(norm(x), F.normalize(x, dim=1) * 2.0 * norm.gamma.view(1, 4, 1, 1, 1))


def test_causal_conv_pads_two_zero_frames_in_front_and_one_pixel_around():
    conv = randomize(CausalConv3d(3, 5))
    x = torch.randn(2, 3, 4, 6, 7)
    padded = torch.zeros(2, 3, 4 + 2, 6 + 2, 7 + 2)
    padded[:, :, 2:, 1:-1, 1:-1] = x
    expected = F.conv3d(padded, conv.weight, conv.bias)
    out = conv(x)
    assert out.shape == (2, 5, 4, 6, 7)
    torch.testing.assert_close(out, expected)
    # frame t never sees frame t+1
    later = x.clone()
    later[:, :, 2:] += 1
    assert torch.equal(conv(later)[:, :, :2], out[:, :, :2])


def test_causal_conv_cache_equals_one_pass_over_all_frames():
    """Rule R: chunk sizes 1, 4, 1, 2 with the cache give the full-sequence causal conv."""
    conv = randomize(CausalConv3d(3, 4))
    x = torch.randn(1, 3, 8, 5, 5)
    state = CausalState()
    parts = []
    for chunk in x.split([1, 4, 1, 2], dim=2):
        state.next_chunk()
        parts.append(conv(chunk, state.next_slot()))
    torch.testing.assert_close(torch.cat(parts, 2), conv(x), rtol=1e-5, atol=1e-6)


def test_downsample_pads_right_and_bottom_only():
    down = randomize(Resample(4, "downsample2d"))
    x = torch.randn(2, 4, 3, 8, 10)
    out = down(x)
    assert out.shape == (2, 4, 3, 4, 5)
    conv = down.resample[1]
    for t in range(3):
        frame = F.pad(x[:, :, t], (0, 1, 0, 1))  # left 0, right 1, top 0, bottom 1
        torch.testing.assert_close(out[:, :, t], F.conv2d(frame, conv.weight, conv.bias, stride=2))


def test_downsample3d_full_sequence_view():
    """Rule D: output 0 = y0; output j >= 1 = time_conv(y_{2j-2}, y_{2j-1}, y_{2j})."""
    down = randomize(Resample(3, "downsample3d"))
    x = torch.randn(1, 3, 9, 4, 4)
    y = down.resample(x)
    w, b = down.time_conv.weight[:, :, :, 0, 0], down.time_conv.bias  # [C_out, C_in, 3]
    expected = [y[:, :, 0]] + [torch.einsum("oik,bikhw->bohw", w, y[:, :, 2 * j - 2:2 * j + 1]) + b.view(1, -1, 1, 1)
                               for j in range(1, 5)]
    single = down(x)
    torch.testing.assert_close(single, torch.stack(expected, 2), rtol=1e-5, atol=1e-5)
    state = CausalState()
    chunks = []
    for chunk in (x[:, :, :1], x[:, :, 1:5], x[:, :, 5:9]):
        state.next_chunk()
        chunks.append(down(chunk, state))
    torch.testing.assert_close(torch.cat(chunks, 2), single, rtol=1e-5, atol=1e-6)


def test_interleave_puts_first_channel_half_on_even_frames():
    c = 3
    x = torch.randn(2, 2 * c, 4, 2, 3)
    out = interleave_time(x)
    assert out.shape == (2, c, 8, 2, 3)
    for t in range(4):
        assert torch.equal(out[:, :, 2 * t], x[:, :c, t])
        assert torch.equal(out[:, :, 2 * t + 1], x[:, c:, t])


def test_upsample3d_full_sequence_view_and_rule_u():
    """Frame 0 -> 1 frame, untouched by time_conv; frames 1.. -> 2 each, from a causal conv
    that sees zeros, not frame 0, before frame 1."""
    up = randomize(Resample(4, "upsample3d"))
    x = torch.randn(1, 4, 4, 3, 3)
    out = up(x)
    assert out.shape == (1, 2, 1 + 2 * 3, 6, 6)
    spatial = up.resample
    torch.testing.assert_close(out[:, :, :1], spatial(x[:, :, :1]))
    rest = torch.cat([torch.zeros(1, 4, 2, 3, 3), x[:, :, 1:]], 2)  # zeros stand in for frame 0
    doubled = F.conv3d(rest, up.time_conv.weight, up.time_conv.bias)  # [1, 8, 3, 3, 3]
    for t in range(3):
        torch.testing.assert_close(out[:, :, 1 + 2 * t], spatial(doubled[:, :4, t:t + 1])[:, :, 0])
        torch.testing.assert_close(out[:, :, 2 + 2 * t], spatial(doubled[:, 4:, t:t + 1])[:, :, 0])
    changed = x.clone()
    changed[:, :, 0] += 5  # frame 0 never enters a later time window
    torch.testing.assert_close(up(changed)[:, :, 1:], out[:, :, 1:])
    state = CausalState()
    frames = []
    for i in range(4):
        state.next_chunk()
        frames.append(up(x[:, :, i:i + 1], state))
    torch.testing.assert_close(torch.cat(frames, 2), out, rtol=1e-5, atol=1e-6)


def test_upsample_is_nearest_then_conv_halving_channels():
    up = randomize(Resample(4, "upsample2d"))
    x = torch.randn(1, 4, 2, 3, 5)
    conv = up.resample[1]
    for t in range(2):
        big = x[:, :, t].repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
        torch.testing.assert_close(up(x)[:, :, t], F.conv2d(big, conv.weight, conv.bias, padding=1))


def test_attention_is_single_head_per_frame():
    c = 8
    attn = randomize(AttentionBlock(c))
    x = torch.randn(2, c, 3, 4, 5)
    out = attn(x)
    for b in range(2):
        for t in range(3):
            frame = x[b, :, t]  # [C, H, W]
            n = F.normalize(frame, dim=0) * math.sqrt(c) * attn.norm.gamma
            qkv = torch.einsum("oc,chw->ohw", attn.to_qkv.weight[:, :, 0, 0], n) + attn.to_qkv.bias.view(-1, 1, 1)
            q, k, v = qkv.flatten(1).t().split(c, dim=1)  # [L, C] each, tokens row-major
            o = torch.softmax(q @ k.t() / math.sqrt(c), dim=-1) @ v
            o = o.t().view(c, 4, 5)
            o = torch.einsum("oc,chw->ohw", attn.proj.weight[:, :, 0, 0], o) + attn.proj.bias.view(-1, 1, 1)
            torch.testing.assert_close(out[b, :, t], frame + o, rtol=1e-5, atol=1e-5)


def test_latent_normalisation_constants_and_formula():
    # A.5, copied from the spec text
    assert LATENT_MEAN == (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                           0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
    assert LATENT_STD == (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                          3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
    vae = WanVAE(VAEConfig.tiny())
    mu = torch.randn(2, 16, 3, 2, 2) * 3
    mean, std = torch.tensor(LATENT_MEAN).view(1, 16, 1, 1, 1), torch.tensor(LATENT_STD).view(1, 16, 1, 1, 1)
    z = vae.normalize(mu)
    torch.testing.assert_close(z, (mu - mean) / std)
    torch.testing.assert_close(vae.denormalize(z), mu)
    assert "latent_mean" not in str(list(vae.state_dict()))


def test_cache_slot_counts_match_the_reference():
    """A.4: 24 temporal convs hold state in the encoder, 32 in the decoder."""
    vae = WanVAE(VAEConfig.tiny())
    encoder_state, decoder_state = CausalState(), CausalState()
    for frames in (1, 4):
        encoder_state.next_chunk()
        vae.encoder(torch.randn(1, 3, frames, 16, 16), encoder_state)
        decoder_state.next_chunk()
        vae.decoder(torch.randn(1, 16, 1, 2, 2), decoder_state)
    assert len(encoder_state.slots) == 24
    assert len(decoder_state.slots) == 32
    assert all(slot.frames is not None for slot in encoder_state.slots + decoder_state.slots)
