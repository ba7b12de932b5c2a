import math

import pytest
import torch
import torch.nn.functional as F

from model_helpers import tiny_model
from test_model_action import naive_action_module
from wan.config import tiny_config
from wan.model import (STRATEGIES, WanModel, apply_training_strategy, random_inputs,
                       sinusoidal_embedding, trainable_parameter_names)
from wan.action import action_tables
from wan.rope import video_rope_pairs, video_rope_table


def naive_forward(model, x, t, visual_context, cond_concat, keyboard_cond, mouse_cond):
    """The spec's forward pass in float64 with explicit indexing (patches, RoPE angles,
    unpatchify), sharing nothing with wan/model.py but the parameters."""
    cfg = model.config
    p = {n: v.double() for n, v in model.state_dict().items()}
    lin = lambda v, name: v @ p[name + ".weight"].T + p[name + ".bias"]  # noqa: E731

    def layer_norm(v, name=None, eps=cfg.eps):
        mean = v.mean(-1, keepdim=True)
        var = ((v - mean) ** 2).mean(-1, keepdim=True)
        out = (v - mean) / torch.sqrt(var + eps)
        return out * p[name + ".weight"] + p[name + ".bias"] if name else out

    def rms(v, name):
        return v / torch.sqrt((v * v).mean(-1, keepdim=True) + cfg.eps) * p[name + ".weight"]

    def attention(q, k, v):  # [L, C] each, heads split here
        heads, d = cfg.num_heads, cfg.head_dim
        out = []
        for n in range(heads):
            sl = slice(n * d, (n + 1) * d)
            w = torch.softmax(q[:, sl] @ k[:, sl].T / math.sqrt(d), dim=-1)
            out.append(w @ v[:, sl])
        return torch.cat(out, -1)

    B, _, frames, H, W = x.shape
    h, w = H // 2, W // 2
    L = frames * h * w
    x_in = torch.cat([x, cond_concat], 1).double()
    kernel = p["patch_embedding.weight"][:, :, 0]  # [C, 36, 2, 2]
    tokens = torch.zeros(B, L, cfg.dim, dtype=torch.float64)
    for tt in range(frames):
        for i in range(h):
            for j in range(w):
                patch = x_in[:, :, tt, 2 * i:2 * i + 2, 2 * j:2 * j + 2]
                tokens[:, tt * h * w + i * w + j] = torch.einsum("bcpq,ocpq->bo", patch, kernel) + p["patch_embedding.bias"]

    half = cfg.freq_dim // 2
    angles = t.double()[:, None] * torch.tensor([10000.0 ** (-k / half) for k in range(half)], dtype=torch.float64)
    sinus = torch.cat([torch.cos(angles), torch.sin(angles)], 1)
    e = lin(F.silu(lin(sinus, "time_embedding.0")), "time_embedding.2")
    e0 = lin(F.silu(e), "time_projection.1").view(B, 6, cfg.dim)

    ctx = visual_context.double()
    ctx = layer_norm(ctx, "img_emb.proj.0", eps=1e-5)
    ctx = lin(F.gelu(lin(ctx, "img_emb.proj.1")), "img_emb.proj.3")
    ctx = layer_norm(ctx, "img_emb.proj.4", eps=1e-5)

    n_t, n_h, _ = video_rope_pairs(cfg.head_dim)

    def rope(v):  # [L, C]: every head rotated by its token's (t, i, j)
        out = v.clone()
        for token in range(L):
            tt, i, j = token // (h * w), (token // w) % h, token % w
            for k in range(cfg.head_dim // 2):
                if k < n_t:
                    angle = tt * 10000.0 ** (-k / n_t)
                elif k < n_t + n_h:
                    angle = i * 10000.0 ** (-(k - n_t) / n_h)
                else:
                    angle = j * 10000.0 ** (-(k - n_t - n_h) / n_h)
                a = v[token, 2 * k::cfg.head_dim]
                b = v[token, 2 * k + 1::cfg.head_dim]
                out[token, 2 * k::cfg.head_dim] = a * math.cos(angle) - b * math.sin(angle)
                out[token, 2 * k + 1::cfg.head_dim] = a * math.sin(angle) + b * math.cos(angle)
        return out

    hidden = tokens
    for n in range(cfg.num_layers):
        pre = f"blocks.{n}."
        mod = p[pre + "modulation"] + e0  # [B, 6, C]
        shift1, scale1, gate1, shift2, scale2, gate2 = [mod[:, m, None] for m in range(6)]
        y = layer_norm(hidden) * (1 + scale1) + shift1
        attn_out = []
        for b in range(B):
            sa = pre + "self_attn."
            q = rope(rms(lin(y[b], sa + "q"), sa + "norm_q"))
            k = rope(rms(lin(y[b], sa + "k"), sa + "norm_k"))
            attn_out.append(lin(attention(q, k, lin(y[b], sa + "v")), sa + "o"))
        hidden = hidden + gate1 * torch.stack(attn_out)
        y = layer_norm(hidden, pre + "norm3")
        cross = []
        for b in range(B):
            ca = pre + "cross_attn."
            q = rms(lin(y[b], ca + "q"), ca + "norm_q")
            k = rms(lin(ctx[b], ca + "k"), ca + "norm_k")
            cross.append(lin(attention(q, k, lin(ctx[b], ca + "v")), ca + "o"))
        hidden = hidden + torch.stack(cross)
        hidden = naive_action_module(model.blocks[n].action_model, hidden, frames, mouse_cond, keyboard_cond)
        y = layer_norm(hidden) * (1 + scale2) + shift2
        y = lin(F.gelu(lin(y, pre + "ffn.0"), approximate="tanh"), pre + "ffn.2")
        hidden = hidden + gate2 * y

    m = p["head.modulation"] + e[:, None]
    out = lin(layer_norm(hidden) * (1 + m[:, 1:2]) + m[:, 0:1], "head.head")  # [B, L, 64]
    video = torch.zeros(B, cfg.out_dim, frames, H, W, dtype=torch.float64)
    for tt in range(frames):
        for i in range(h):
            for j in range(w):
                patch = out[:, tt * h * w + i * w + j].view(B, 2, 2, cfg.out_dim)  # (ph, pw, c)
                video[:, :, tt, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = patch.permute(0, 3, 1, 2)
    return video


def test_forward_matches_naive_spec_computation():
    model = tiny_model(seed=0)
    inputs = random_inputs(model.config, 2, 2, 4, 6, seed=1)
    with torch.no_grad():
        ours = model(**inputs)
        expected = naive_forward(model, **inputs)
    assert ours.dtype == torch.float32 and ours.shape == (2, 16, 2, 4, 6)
    assert (ours.double() - expected).abs().max() < 2e-5 * expected.abs().max()
    assert expected.abs().max() > 0.1


def test_time_embedding_formula():
    t = torch.tensor([0.0, 1.0, 999.0])
    emb = sinusoidal_embedding(t, 256)
    assert emb.dtype == torch.float64 and emb.shape == (3, 256)
    for row, tv in enumerate(t.tolist()):
        for k in (0, 1, 63, 127):
            angle = tv * 10000 ** (-k / 128)
            assert emb[row, k].item() == pytest.approx(math.cos(angle), abs=1e-12)
            assert emb[row, 128 + k].item() == pytest.approx(math.sin(angle), abs=1e-12)


@pytest.mark.parametrize("latent_size", [(4, 6), (6, 10), (2, 2)])
def test_any_even_latent_size_and_frame_count(latent_size):
    model = tiny_model(seed=1)
    inputs = random_inputs(model.config, 1, 3, *latent_size)
    with torch.no_grad():
        out = model(**inputs)
    assert out.shape == (1, 16, 3, *latent_size) and torch.isfinite(out).all()


def test_sample_does_not_depend_on_the_rest_of_its_batch():
    model = tiny_model(seed=2)
    inputs = random_inputs(model.config, 3, 3, 4, 6, seed=3)
    with torch.no_grad():
        together = model(**inputs)
        for b in range(3):
            alone = model(**{k: v[b:b + 1] for k, v in inputs.items()})
            assert torch.allclose(together[b:b + 1], alone, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(together[0], together[1])


def test_fresh_action_modules_are_identities_until_perturbed():
    torch.manual_seed(0)
    model = WanModel(tiny_config())
    for block in model.blocks:
        assert not block.action_model.proj_mouse.weight.any()
        assert not block.action_model.proj_keyboard.weight.any()
    torch.nn.init.normal_(model.head.head.weight, std=0.1)  # the head is zero too
    inputs = random_inputs(model.config, 2, 3, 4, 6, seed=4)
    other = dict(inputs, mouse_cond=torch.randn_like(inputs["mouse_cond"]),
                 keyboard_cond=1 - inputs["keyboard_cond"])
    with torch.no_grad():
        base = model(**inputs)
        assert base.abs().max() > 0
        assert torch.equal(model(**other), base)
        for block in model.blocks:
            torch.nn.init.normal_(block.action_model.proj_mouse.weight, std=0.1)
        changed_mouse = model(**dict(inputs, mouse_cond=other["mouse_cond"]))
        assert (changed_mouse - model(**inputs)).abs().max() > 1e-4
        for block in model.blocks:
            torch.nn.init.normal_(block.action_model.proj_keyboard.weight, std=0.1)
        changed_keys = model(**dict(inputs, keyboard_cond=other["keyboard_cond"]))
        assert (changed_keys - model(**inputs)).abs().max() > 1e-4


def test_meta_build_materialises_with_to_empty_and_init():
    config = tiny_config()
    with torch.device("meta"):
        meta = WanModel(config)
    meta.to_empty(device="cpu")
    torch.manual_seed(5)
    meta.init_weights()
    reference = WanModel(config)
    torch.manual_seed(5)
    reference.init_weights()
    for (name, a), (_, b) in zip(meta.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name  # every tensor set by init_weights, none left empty
    params = dict(meta.named_parameters())
    assert torch.equal(params["blocks.0.norm3.weight"], torch.ones(config.dim))
    assert torch.equal(params["blocks.1.action_model.img_attn_q_norm.weight"], torch.ones(16))
    assert not params["head.head.weight"].any() and not params["patch_embedding.bias"].any()
    assert params["time_embedding.0.weight"].std().item() == pytest.approx(0.02, rel=0.2)
    bound = math.sqrt(6 / (config.dim + config.ffn_dim))  # xavier-uniform of ffn.0
    assert params["blocks.0.ffn.0.weight"].abs().max() <= bound
    assert params["blocks.0.ffn.0.weight"].abs().max() > 0.9 * bound


def _gradients(model, inputs):
    model.zero_grad(set_to_none=True)
    model(**inputs).square().mean().backward()
    return {n: p.grad for n, p in model.named_parameters()}


IGNORED_WEIGHTS = ("attn_q_norm.weight", "attn_k_norm.weight")  # the forward never reads them


@pytest.mark.parametrize("strategy, last_layers", [("action_only", 0), ("last_layers", 1), ("full", 0)])
def test_gradients_reach_exactly_the_strategy_parameters(strategy, last_layers):
    model = tiny_model(seed=6)
    names = apply_training_strategy(model, strategy, last_layers)
    assert names == trainable_parameter_names(model, strategy, last_layers)
    grads = _gradients(model, random_inputs(model.config, 1, 2, 4, 4, seed=7))
    reached = {n for n, g in grads.items() if g is not None and g.abs().max() > 0}
    assert reached == {n for n in names if not n.endswith(IGNORED_WEIGHTS)}
    assert {n for n, g in grads.items() if g is not None} == reached


def test_strategy_groups():
    model = tiny_model(seed=0, num_layers=3)
    all_names = [n for n, _ in model.named_parameters()]
    action = [n for n in all_names if ".action_model." in n]
    assert trainable_parameter_names(model, "full") == all_names
    assert trainable_parameter_names(model, "action_only") == action
    last = trainable_parameter_names(model, "last_layers", 2)
    assert set(last) == set(action) | {n for n in all_names if n.startswith(("blocks.1.", "blocks.2.", "head."))}
    assert not any(n.startswith(("blocks.0.self_attn", "patch_embedding", "img_emb")) for n in last)
    with pytest.raises(ValueError, match="unknown training strategy 'adapters'"):
        trainable_parameter_names(model, "adapters")
    with pytest.raises(ValueError, match="strategy 'lora' trains adapters, but the model has none"):
        trainable_parameter_names(model, "lora")
    for bad in (0, 4, -1):
        with pytest.raises(ValueError, match="1 <= N <= 3"):
            apply_training_strategy(model, "last_layers", bad)
    assert STRATEGIES == ("action_only", "last_layers", "lora", "full")


def test_gradient_checkpointing_gives_the_same_output_and_gradients():
    model = tiny_model(seed=8)
    inputs = random_inputs(model.config, 2, 2, 4, 4, seed=9)
    plain = _gradients(model, inputs)
    model.set_gradient_checkpointing(True)
    checkpointed = _gradients(model, inputs)
    for name, g in plain.items():
        if g is not None:
            assert torch.allclose(g, checkpointed[name], atol=1e-6, rtol=1e-5), name


BF16_TOLERANCE = 0.03  # relative L2 error of the output under CPU bf16 autocast


def test_bf16_autocast_stays_close_to_float32():
    model = tiny_model(seed=10)
    inputs = random_inputs(model.config, 2, 3, 4, 6, seed=11)
    with torch.no_grad():
        reference = model(**inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(**inputs)
    assert low.dtype == torch.float32
    error = (low - reference).norm() / reference.norm()
    assert 0 < error < BF16_TOLERANCE


def test_time_embedding_modulation_and_residual_stream_stay_float32_with_bf16_weights():
    # Wan2.1 computes these in float32 even when the weights are bf16; only the attention
    # and MLP matmuls drop to bf16 under autocast.
    model = tiny_model(seed=14).to(torch.bfloat16)
    inputs = random_inputs(model.config, 2, 3, 4, 6, seed=15)
    seen = []
    model.blocks[1].register_forward_hook(lambda m, args, out: seen.append((args[0].dtype, args[1].dtype, out.dtype)))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(**inputs)
    assert seen == [(torch.float32, torch.float32, torch.float32)] and out.dtype == torch.float32
    # the time embedding equals a float32 computation with the (bf16-valued) weights upcast
    t = inputs["t"]
    reference = model.float().time_embedding(sinusoidal_embedding(t, model.config.freq_dim).float())
    with torch.no_grad():
        model.to(torch.bfloat16)
        got = []
        model.blocks[0].register_forward_hook(lambda m, args, out: got.append(args[1]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(**inputs)
    expected = model.float().time_projection(reference).unflatten(1, (6, model.config.dim))
    assert torch.allclose(got[0], expected, atol=1e-5)


def test_bf16_parameters_run_without_autocast():
    model = tiny_model(seed=12)
    inputs = random_inputs(model.config, 1, 2, 4, 4, seed=13)
    with torch.no_grad():
        reference = model(**inputs)
        low = model.to(torch.bfloat16)(**inputs)
    assert low.dtype == torch.float32
    assert (low - reference).norm() / reference.norm() < 2 * BF16_TOLERANCE


def test_bad_inputs_are_clear_errors():
    model = tiny_model(seed=0, perturbed=False)
    inputs = random_inputs(model.config, 1, 3, 4, 6)
    with pytest.raises(ValueError, match="latent height and width must be even"):
        model(**dict(inputs, x=inputs["x"][..., :5], cond_concat=inputs["cond_concat"][..., :5]))
    with pytest.raises(ValueError, match="cond_concat must be"):
        model(**dict(inputs, cond_concat=inputs["cond_concat"][:, :16]))
    with pytest.raises(ValueError, match="visual_context must be"):
        model(**dict(inputs, visual_context=torch.zeros(1, 257, 1280)))
    with pytest.raises(ValueError, match="keyboard_cond has 5 frames"):
        model(**dict(inputs, keyboard_cond=inputs["keyboard_cond"][:, :5]))


def test_compiled_block_matches_eager():
    # fullgraph=True makes any graph break (data-dependent Python branching) an error.
    # aot_eager traces forward and backward without code generation, which keeps this
    # test fast; the inductor backend (minutes on 2 CPU cores) runs in bench_model.py.
    model = tiny_model(seed=14)
    inputs = random_inputs(model.config, 2, 3, 4, 6, seed=15)
    config, (f, h, w) = model.config, (3, 2, 3)
    args = (torch.randn(2, f * h * w, config.dim, requires_grad=True), torch.randn(2, 6, config.dim),
            torch.randn(2, 257, config.dim), *video_rope_table(f, h, w, config.head_dim, "cpu"),
            action_tables(config.action_config, f, "cpu"), inputs["mouse_cond"], inputs["keyboard_cond"])
    block = model.blocks[0]
    eager = block(*args)
    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")(*args)
    assert torch.allclose(compiled, eager, atol=1e-5)
    (grad_eager,) = torch.autograd.grad(eager.sum(), args[0])
    (grad_compiled,) = torch.autograd.grad(compiled.sum(), args[0])
    assert torch.allclose(grad_compiled, grad_eager, atol=1e-5)
