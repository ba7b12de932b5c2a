import math

import pytest
import torch

from wan.rope import action_rope_angles, apply_rope, cos_sin, video_rope_pairs, video_rope_table

F_, H_, W_, D = 15, 22, 40, 128  # the real token grid and head dim


def test_pair_split_of_the_real_head():
    assert video_rope_pairs(128) == (22, 21, 21)
    assert video_rope_pairs(16) == (4, 2, 2)


def test_rotation_preserves_norms():
    cos, sin = video_rope_table(3, 4, 5, D, "cpu")
    x = torch.randn(2, 60, 12, D)
    y = apply_rope(x, cos, sin)
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    pairs = lambda v: v.unflatten(-1, (-1, 2)).norm(dim=-1)  # noqa: E731
    assert torch.allclose(pairs(y), pairs(x), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(y, x)


def _token(t, i, j, h, w):
    return t * h * w + i * w + j


def test_scores_depend_only_on_relative_offsets():
    f, h, w = 6, 5, 7
    cos, sin = video_rope_table(f, h, w, D, "cpu")
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(D, generator=g, dtype=torch.float64), torch.randn(D, generator=g, dtype=torch.float64)

    def score(qpos, kpos):
        qi, ki = _token(*qpos, h, w), _token(*kpos, h, w)
        rq = apply_rope(q, cos[qi, 0].double(), sin[qi, 0].double())
        rk = apply_rope(k, cos[ki, 0].double(), sin[ki, 0].double())
        return float(rq @ rk)

    base = score((1, 2, 3), (3, 0, 5))
    assert score((2, 2, 3), (4, 0, 5)) == pytest.approx(base, abs=1e-5)  # both frames +1
    assert score((1, 4, 3), (3, 2, 5)) == pytest.approx(base, abs=1e-5)  # both rows +2
    assert score((1, 2, 0), (3, 0, 2)) == pytest.approx(base, abs=1e-5)  # both columns -3
    assert score((0, 4, 1), (2, 2, 3)) == pytest.approx(base, abs=1e-5)  # all at once
    assert abs(score((2, 2, 3), (3, 0, 5)) - base) > 1e-3  # another frame offset differs


def _rope_float64(x, f, h, w):
    """The spec, directly: pairs 0..21 turn with frame t, 22..42 with row i, 43..63 with
    column j, pair k of an axis with n pairs by p * 10000^(-2k / (2n)); complex float64."""
    n_t, n_h, n_w = 22, 21, 21
    angles = torch.zeros(f * h * w, D // 2, dtype=torch.float64)
    for token in range(f * h * w):
        t, i, j = token // (h * w), (token // w) % h, token % w
        for k in range(D // 2):
            if k < n_t:
                p, kk, n = t, k, n_t
            elif k < n_t + n_h:
                p, kk, n = i, k - n_t, n_h
            else:
                p, kk, n = j, k - n_t - n_h, n_w
            angles[token, k] = p * 10000.0 ** (-2 * kk / (2 * n))
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)


def test_float32_rope_matches_float64_spec_computation():
    f, h, w = 4, 22, 40  # real rows/columns; frames beyond 4 only repeat the pattern
    x = torch.randn(1, f * h * w, 2, D)
    cos, sin = video_rope_table(f, h, w, D, "cpu")
    ours = apply_rope(x, cos, sin)
    assert ours.dtype == torch.float32
    assert (ours.double() - _rope_float64(x, f, h, w)).abs().max() < 1e-5


def test_float32_rope_at_the_real_grid_matches_float64():
    x = torch.randn(1, F_ * H_ * W_, 1, D)
    cos, sin = video_rope_table(F_, H_, W_, D, "cpu")
    n_t, n_h, n_w = video_rope_pairs(D)
    t = torch.arange(F_ * H_ * W_) // (H_ * W_)
    i = torch.arange(F_ * H_ * W_) // W_ % H_
    j = torch.arange(F_ * H_ * W_) % W_
    inv = lambda n: 10000.0 ** (-torch.arange(n, dtype=torch.float64) / n)  # noqa: E731
    angles = torch.cat([t[:, None] * inv(n_t), i[:, None] * inv(n_h), j[:, None] * inv(n_w)], 1)
    z = torch.view_as_complex(x.double().unflatten(-1, (-1, 2)).contiguous())
    expected = torch.view_as_real(z * torch.polar(torch.ones_like(angles), angles)[:, None]).flatten(-2)
    assert (apply_rope(x, cos, sin).double() - expected).abs().max() < 1e-5


def test_tables_are_cached_per_shape_and_device():
    a = video_rope_table(2, 3, 4, D, "cpu")
    b = video_rope_table(2, 3, 4, D, "cpu")
    assert a[0].data_ptr() == b[0].data_ptr()
    assert video_rope_table(2, 3, 5, D, "cpu")[0].shape == (30, 1, D // 2)


def test_tables_built_in_inference_mode_serve_training():
    with torch.inference_mode():
        cos, sin = video_rope_table(7, 1, 3, 16, "cpu")  # a shape no other test builds
    x = torch.randn(1, 21, 1, 16, requires_grad=True)
    apply_rope(x, cos, sin).sum().backward()
    assert x.grad is not None


def test_action_rope_turns_only_the_frame_dims():
    rope_dim_list, theta = (8, 28, 28), 256.0
    cos, sin = cos_sin(action_rope_angles(5, rope_dim_list, theta), "cpu")
    assert cos.shape == (5, 32)
    x = torch.randn(5, 64, dtype=torch.float32)
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[:, 8:], x[:, 8:])  # 56 dims at position 0
    for f in range(5):
        for k in range(4):  # pair k of the 8 frame dims turns by f * 256^(-2k/8)
            angle = f * theta ** (-2 * k / 8)
            a, b = x[f, 2 * k].item(), x[f, 2 * k + 1].item()
            expected = (a * math.cos(angle) - b * math.sin(angle), a * math.sin(angle) + b * math.cos(angle))
            assert y[f, 2 * k: 2 * k + 2].tolist() == pytest.approx(expected, abs=1e-5)
