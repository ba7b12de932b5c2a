import math

import pytest
import torch
import torch.nn.functional as F

from model_helpers import perturb_
from wan.action import (ActionModule, action_tables, action_window_index, action_window_rows,
                        check_action_inputs)
from wan.config import tiny_config


def test_window_rows_hand_computed():
    # r = 4, w_s = 3: latent frame f sees the 12 raw frames before raw frame 4f,
    # with the sequence front-padded by 12 copies of row 0.
    assert action_window_rows(0, 4, 3) == [0] * 12
    assert action_window_rows(1, 4, 3) == [0] * 9 + [1, 2, 3]
    assert action_window_rows(2, 4, 3) == [0] * 5 + [1, 2, 3, 4, 5, 6, 7]
    assert action_window_rows(3, 4, 3) == list(range(12))
    assert action_window_rows(14, 4, 3) == list(range(44, 56))  # raw frame 56 is never seen


def test_window_index_is_padding_then_slicing():
    r, w_s, frames = 4, 3, 6
    rows = torch.arange(r * (frames - 1) + 1)
    pad = r * w_s
    padded = torch.cat([rows[:1].repeat(pad), rows])
    index = action_window_index(frames, r, w_s)
    for f in range(frames):
        assert index[f].tolist() == padded[r * f: r * f + pad].tolist()
        assert index[f].tolist() == action_window_rows(f, r, w_s)


def test_bad_action_frame_counts_are_clear_errors():
    config = tiny_config().action_config
    with pytest.raises(ValueError, match="mouse_cond has 8 frames.*9 raw action frames"):
        check_action_inputs(config, 1, 3, torch.zeros(1, 8, 2), None)
    with pytest.raises(ValueError, match="keyboard_cond must be"):
        check_action_inputs(config, 1, 3, None, torch.zeros(1, 9, 6))
    with pytest.raises(ValueError, match="keyboard_cond must be"):
        check_action_inputs(config, 2, 3, None, torch.zeros(1, 9, 4))


def _rms(x):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)


def _rotate(x, f, rope_dim_list, theta):
    """Action RoPE of one head vector at latent frame f, as complex numbers."""
    out = x.clone()
    turning_pairs = rope_dim_list[0] // 2
    for k in range(turning_pairs):
        angle = f * theta ** (-2 * k / rope_dim_list[0])
        a, b = x[2 * k], x[2 * k + 1]
        out[2 * k] = a * math.cos(angle) - b * math.sin(angle)
        out[2 * k + 1] = a * math.sin(angle) + b * math.cos(angle)
    return out


def _attend(qs, ks, vs):
    """One head: lists of vectors -> list of outputs, softmax(q.k / sqrt(d)) v."""
    d = qs[0].shape[0]
    out = []
    for q in qs:
        scores = torch.stack([q @ k for k in ks]) / math.sqrt(d)
        weights = torch.softmax(scores, 0)
        out.append(sum(wt * v for wt, v in zip(weights, vs)))
    return out


def naive_action_module(module, x, num_frames, mouse, keyboard):
    """The spec's action module written as loops over samples, locations, frames, heads,
    in float64, with explicit padding and window slicing."""
    c = module.config
    p = {n: t.double() for n, t in module.state_dict().items()}
    lin = lambda v, name, bias=True: v @ p[name + ".weight"].T + (p[name + ".bias"] if bias else 0)  # noqa: E731
    gelu_tanh = lambda v: F.gelu(v, approximate="tanh")  # noqa: E731
    x = x.double()
    B, L, C = x.shape
    S = L // num_frames
    r, P, heads, d = c.vae_time_compression_ratio, c.window_frames, c.heads_num, c.head_dim
    rope = lambda v, f: _rotate(v, f, c.rope_dim_list, c.rope_theta)  # noqa: E731

    def windows(cond):
        padded = torch.cat([cond[:, :1].repeat(1, P, 1), cond], dim=1)
        return [padded[:, r * f: r * f + P] for f in range(num_frames)]  # each [B, P, width]

    out = x.clone()
    mouse_windows = windows(mouse.double())
    for b in range(B):
        for s in range(S):
            rows = []
            for f in range(num_frames):
                token = x[b, f * S + s]
                h = lin(torch.cat([token, mouse_windows[f][b].reshape(-1)]), "mouse_mlp.0")
                h = lin(gelu_tanh(h), "mouse_mlp.2")
                h = F.layer_norm(h, (h.shape[-1],), p["mouse_mlp.3.weight"], p["mouse_mlp.3.bias"])
                rows.append(lin(h, "t_qkv", bias=False))
            merged = [[] for _ in range(num_frames)]
            for head in range(heads):
                part = lambda row, which: row[(which * heads + head) * d:(which * heads + head + 1) * d]  # noqa: E731
                qs = [rope(_rms(part(row, 0)), f) for f, row in enumerate(rows)]
                ks = [rope(_rms(part(row, 1)), f) for f, row in enumerate(rows)]
                vs = [part(row, 2) for row in rows]
                for f, o in enumerate(_attend(qs, ks, vs)):
                    merged[f].append(o)
            for f in range(num_frames):
                out[b, f * S + s] += lin(torch.cat(merged[f]), "proj_mouse", bias=False)

    x = out.clone()
    kb = keyboard.double()
    embedded = lin(F.silu(lin(kb, "keyboard_embed.0")), "keyboard_embed.2")
    kb_windows = windows(embedded)
    for b in range(B):
        kv = [lin(kb_windows[f][b].reshape(-1), "keyboard_attn_kv", bias=False) for f in range(num_frames)]
        for s in range(S):
            q_rows = [lin(x[b, f * S + s], "mouse_attn_q", bias=False) for f in range(num_frames)]
            merged = [[] for _ in range(num_frames)]
            for head in range(heads):
                sl = slice(head * d, (head + 1) * d)
                qs = [rope(_rms(q_rows[f][sl]), f) for f in range(num_frames)]
                ks = [rope(_rms(kv[f][:heads * d][sl]), f) for f in range(num_frames)]
                vs = [kv[f][heads * d:][sl] for f in range(num_frames)]
                for f, o in enumerate(_attend(qs, ks, vs)):
                    merged[f].append(o)
            for f in range(num_frames):
                out[b, f * S + s] += lin(torch.cat(merged[f]), "proj_keyboard", bias=False)
    return out


def test_action_module_matches_naive_spec_loops():
    config = tiny_config(keyboard_dim=5).action_config
    torch.manual_seed(0)
    module = ActionModule(config)
    perturb_(module, seed=1, scale=0.2)
    with torch.no_grad():  # the checkpoint's norm weights must change nothing
        for name, p in module.named_parameters():
            if "attn_q_norm" in name or "attn_k_norm" in name:
                p.uniform_(0.5, 2.0)
    B, frames, S = 2, 3, 6
    raw = 4 * (frames - 1) + 1
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, frames * S, config.img_hidden_size, generator=g)
    mouse = torch.randn(B, raw, 2, generator=g)
    keyboard = (torch.rand(B, raw, 5, generator=g) < 0.5).float()
    ours = module(x, action_tables(config, frames, "cpu"), mouse, keyboard)
    expected = naive_action_module(module, x, frames, mouse, keyboard)
    assert (ours.double() - expected).abs().max() < 1e-5
    assert (expected - x.double()).abs().max() > 1e-2  # both branches really did something


def test_fresh_action_module_is_the_identity():
    config = tiny_config().action_config
    module = ActionModule(config)
    for proj in (module.proj_mouse, module.proj_keyboard):
        torch.nn.init.zeros_(proj.weight)
    x = torch.randn(2, 3 * 4, config.img_hidden_size)
    out = module(x, action_tables(config, 3, "cpu"), torch.randn(2, 9, 2), torch.ones(2, 9, 4))
    assert torch.equal(out, x)


def test_batch_of_two_equals_each_sample_alone():
    # The reference's expand() only works for one sample; each sample must use its own keys.
    config = tiny_config().action_config
    module = perturb_(ActionModule(config), seed=3, scale=0.2)
    x = torch.randn(2, 3 * 4, config.img_hidden_size)
    mouse, keyboard = torch.randn(2, 9, 2), (torch.rand(2, 9, 4) < 0.5).float()
    tables = action_tables(config, 3, "cpu")
    together = module(x, tables, mouse, keyboard)
    for b in range(2):
        alone = module(x[b:b + 1], tables, mouse[b:b + 1], keyboard[b:b + 1])
        assert torch.allclose(together[b:b + 1], alone, atol=1e-6)
