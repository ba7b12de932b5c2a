"""The streaming model (wan/causal.py, wan/kv_cache.py) on tiny configs: windows, the KV-cache
path against the block-causal whole-sequence forward, batches, sinks, RoPE past the
reference's tables, and a backward through one cached call."""

import pytest
import torch

from model_helpers import perturb_, tiny_causal_model
from wan.action import block_action_rows
from wan.causal import BlockCausalAttention, CausalWanModel, visible_frames
from wan.config import tiny_config
from wan.kv_cache import plan_cache_write
from wan.model import WanModel, random_inputs

P = 3  # frames per block, as the released students
LATENT = (4, 6)  # 2x3 = 6 tokens per latent frame


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def block_timesteps(batch, blocks, seed, clean_past=False):
    """[B, F]: one random timestep per block (all past blocks at 0 when clean_past)."""
    g = torch.Generator().manual_seed(seed)
    t = (torch.rand(batch, blocks, generator=g) * 1000).repeat_interleave(P, dim=1)
    if clean_past:
        t[:, :-P] = 0
    return t


def block_actions(inputs, start, frames=P, tail=False):
    """The action rows a cached call takes: the prefix up to the block's last raw frame, or
    only the rows its windows read (the shortest tail)."""
    config_rows = block_action_rows(ACTION, start, frames)
    picked = {}
    for name in ("keyboard_cond", "mouse_cond"):
        cond = inputs[name]
        if cond is not None:
            picked[name] = cond[:, config_rows[0] if tail else 0:config_rows[1]]
        else:
            picked[name] = None
    return picked


ACTION = tiny_config().action_config  # windows and ratio are the same in every tiny config


def call_block(model, inputs, cache, start, t, x=None, tail=False):
    """One cached call for the block of frames start..start+P-1 at timesteps t [B, P] (its
    own latents from inputs unless x is given)."""
    part = slice(start, start + P)
    x = inputs["x"][:, :, part] if x is None else x
    return model.forward_cached(x, t, inputs["visual_context"], inputs["cond_concat"][:, :, part], cache, start,
                                **block_actions(inputs, start, tail=tail))


def run_stream(model, inputs, t, cache=None, tail_every_other=True):
    """Feed the blocks of a sequence one call each through a fresh cache; [B, 16, F, h, w]."""
    frames = inputs["x"].shape[2]
    cache = cache or model.new_cache(inputs["x"].shape[0], *inputs["x"].shape[3:])
    return torch.cat([call_block(model, inputs, cache, start, t[:, start:start + P],
                                 tail=tail_every_other and start // P % 2 == 1)
                      for start in range(0, frames, P)], dim=2)


# ----------------------------------------------------------------------------- windows

def test_visible_frames_match_the_spec_examples():
    assert visible_frames(9, 6, 0) == [(3, 9)]  # L = 6: exactly the previous block
    assert visible_frames(6, 4, 0) == [(2, 6)]  # L = 4: the last frame of the previous block
    assert visible_frames(3, 6, 0) == [(0, 3)]
    assert visible_frames(9, -1, 0) == [(0, 9)]  # no window: everything before the block end
    assert visible_frames(9, 6, 1) == [(0, 1), (4, 9)]  # sink frame 0 + the newest 5
    assert visible_frames(6, 6, 1) == [(0, 6)]


@pytest.mark.parametrize("local", [6, 4, -1])
def test_action_frame_mask_is_the_reference_rule(local):
    frames = 12
    masks = BlockCausalAttention(frames, P, local, 0, 6, "cpu")
    for f in range(frames):
        end = (f // P + 1) * P  # E(f), the end of f's block
        for g in range(frames):
            allowed = g < end and (local == -1 or g >= end - local)  # STREAMING_SPEC 4.4
            assert masks.frame_mask[f, g].item() == allowed, (f, g)


def test_eviction_arithmetic_of_the_spec_examples():
    S = 880
    # universal, L = 6: blocks 0 and 1 fill the buffer; block 2 evicts block 0
    plan = plan_cache_write(6 * S, 0, 6 * S, 0, 0, 0, 3 * S)
    assert (plan.evict, plan.write_start, plan.local_end) == (0, 0, 2640)
    plan = plan_cache_write(6 * S, 0, 6 * S, 2640, 2640, 2640, 3 * S)
    assert (plan.evict, plan.write_start, plan.local_end, plan.window_start) == (0, 2640, 5280, 0)
    plan = plan_cache_write(6 * S, 0, 6 * S, 5280, 5280, 5280, 3 * S)
    assert (plan.evict, plan.keep, plan.write_start, plan.local_end, plan.global_end) == (2640, 2640, 2640, 5280, 7920)
    # gta_drive, L = 4: block 1 evicts frames 0-1, frame 2 moves to slot 0
    plan = plan_cache_write(4 * S, 0, 4 * S, 2640, 2640, 2640, 3 * S)
    assert (plan.evict, plan.keep, plan.write_start, plan.local_end) == (1760, 880, 880, 3520)
    # a call with the previous start rewrites the block in place
    plan = plan_cache_write(4 * S, 0, 4 * S, 5280, 3520, 2640, 3 * S)
    assert (plan.evict, plan.write_start, plan.local_end, plan.global_end) == (0, 880, 3520, 5280)
    # a sink entry is never moved: with sink 1 frame, block 2 of L = 6 keeps 2 frames after it
    plan = plan_cache_write(6, 1, 6, 6, 6, 6, 3)
    assert (plan.evict, plan.keep, plan.write_start, plan.local_end) == (3, 2, 3, 6)


# ----------------------------------------------------------------------------- cache path == whole sequence

CONFIGS = {
    "universal": dict(local_attn_size=6),
    "gta_drive": dict(local_attn_size=4, keyboard_dim=2),
    "templerun": dict(local_attn_size=6, keyboard_dim=7, enable_mouse=False),
    "sink": dict(local_attn_size=6, sink_size=1),
}


@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("clean_past", [True, False])
def test_cache_path_equals_the_block_causal_forward(name, clean_past):
    # 4 blocks of 3 frames: the 6- and 4-frame windows evict twice and three times.
    model = tiny_causal_model(seed=1, **CONFIGS[name])
    inputs = random_inputs(model.config, 2, 12, *LATENT, seed=2)
    t = block_timesteps(2, 4, seed=3, clean_past=clean_past)
    with torch.no_grad():
        whole = model(**dict(inputs, t=t))
        streamed = run_stream(model, inputs, t)
    assert rel(streamed, whole) < 1e-5
    # the windows matter: the same weights with a window over all 12 frames differ
    unwindowed = CausalWanModel(model.config.with_window(12))
    unwindowed.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert rel(unwindowed(**dict(inputs, t=t)), whole) > 1e-3


def test_one_block_with_one_timestep_is_the_base_model():
    torch.manual_seed(4)
    base = perturb_(WanModel(tiny_config()), seed=4)
    causal = CausalWanModel(tiny_config(), frames_per_block=3)
    causal.load_state_dict(base.state_dict())
    inputs = random_inputs(base.config, 2, 3, *LATENT, seed=5)
    with torch.no_grad():
        expected = base(**inputs)
        got = causal(**dict(inputs, t=inputs["t"][:, None].expand(-1, 3)))
    assert rel(got, expected) < 1e-6


def test_each_frame_takes_its_own_timestep():
    # One block, no window: a frame's timestep changes the whole block through attention,
    # but the modulation itself is per frame: frame 0 at t0 and frame 1 at t1 is not the
    # same as all frames at either.
    model = tiny_causal_model(seed=6, local_attn_size=-1, action_blocks=(0, 1))
    inputs = random_inputs(model.config, 1, 3, *LATENT, seed=7)
    with torch.no_grad():
        mixed = model(**dict(inputs, t=torch.tensor([[900.0, 100.0, 100.0]])))
        low = model(**dict(inputs, t=torch.full((1, 3), 100.0)))
        high = model(**dict(inputs, t=torch.full((1, 3), 900.0)))
    assert rel(mixed, low) > 1e-3 and rel(mixed, high) > 1e-3


def _block_output_changes(model, inputs, t, frame, block, cached):
    changed = dict(inputs, x=inputs["x"].clone())
    changed["x"][:, :, frame] += 1.0
    with torch.no_grad():
        run = (lambda i: run_stream(model, i, t)) if cached else (lambda i: model(**dict(i, t=t)))
        before, after = run(inputs), run(changed)
    part = slice(block * P, block * P + P)
    return (after[:, :, part] - before[:, :, part]).abs().max().item() > 1e-6


@pytest.mark.parametrize("cached", [False, True])
def test_a_block_sees_exactly_its_window(cached):
    # One layer and no mouse branch (whose keys come from tokens that have already
    # attended), so latents reach a block only through its self-attention window.
    # L = 4: block 2 (frames 6-8) attends to frames 5-8; frame 4 is out of reach, frame 5
    # is in, later frames are the future.
    model = tiny_causal_model(seed=8, local_attn_size=4, num_layers=1, enable_mouse=False)
    inputs = random_inputs(model.config, 1, 12, *LATENT, seed=9)
    t = block_timesteps(1, 4, seed=10)
    assert not _block_output_changes(model, inputs, t, frame=4, block=2, cached=cached)
    assert _block_output_changes(model, inputs, t, frame=5, block=2, cached=cached)
    assert not _block_output_changes(model, inputs, t, frame=9, block=2, cached=cached)


@pytest.mark.parametrize("cached", [False, True])
def test_sink_frame_stays_visible(cached):
    # L = 4 with one sink frame: block 2 self-attends to frame 0 and frames 6-8 only
    # (one layer, keyboard only, as above).
    model = tiny_causal_model(seed=11, local_attn_size=4, sink_size=1, num_layers=1, enable_mouse=False)
    inputs = random_inputs(model.config, 1, 12, *LATENT, seed=12)
    t = block_timesteps(1, 4, seed=13)
    assert _block_output_changes(model, inputs, t, frame=0, block=2, cached=cached)
    assert not _block_output_changes(model, inputs, t, frame=4, block=2, cached=cached)
    assert not _block_output_changes(model, inputs, t, frame=5, block=2, cached=cached)
    assert _block_output_changes(model, inputs, t, frame=0, block=3, cached=cached)


def test_only_self_attention_keeps_sink_frames():
    model = tiny_causal_model(seed=14, local_attn_size=4, sink_size=1)
    inputs = random_inputs(model.config, 1, 9, *LATENT, seed=15)
    cache = model.new_cache(1, *LATENT)
    layer = cache.layers[0]
    S = cache.tokens_per_frame
    with torch.no_grad():
        run_stream(model, dict(inputs, x=inputs["x"][:, :, :3], cond_concat=inputs["cond_concat"][:, :, :3]),
                   torch.zeros(1, 3), cache)
        sink_keys, first_mouse_keys = layer.self_kv.k[:, :, :S].clone(), layer.mouse_kv.k[:, :, :1].clone()
        run_stream(model, inputs, torch.zeros(1, 9), cache.reset() or cache)
    assert torch.equal(layer.self_kv.k[:, :, :S], sink_keys)  # frame 0 never left
    assert not torch.allclose(layer.mouse_kv.k[:, :, :1], first_mouse_keys)  # evicted


def test_repeating_a_start_overwrites_that_block():
    # Several calls for the same block leave only the last one in the cache (the denoising
    # steps, then the clean-context pass).
    model = tiny_causal_model(seed=14, local_attn_size=4)
    inputs = random_inputs(model.config, 1, 6, *LATENT, seed=15)
    t = block_timesteps(1, 2, seed=16)
    with torch.no_grad():
        clean = run_stream(model, inputs, t)
        cache = model.new_cache(1, *LATENT)
        noise = torch.randn_like(inputs["x"][:, :, :P])
        for x in (noise, noise * 2, inputs["x"][:, :, :P]):
            call_block(model, inputs, cache, 0, torch.full((1, P), 500.0), x=x)
        call_block(model, inputs, cache, 0, t[:, :P])
        out = call_block(model, inputs, cache, P, t[:, P:])
    assert rel(out, clean[:, :, P:]) < 1e-5


def test_batch_of_two_equals_each_sample_alone():
    model = tiny_causal_model(seed=17, local_attn_size=4)
    inputs = random_inputs(model.config, 2, 9, *LATENT, seed=18)
    t = block_timesteps(2, 3, seed=19)
    with torch.no_grad():
        together = run_stream(model, inputs, t)
        for b in range(2):
            alone = run_stream(model, {k: v[b:b + 1] for k, v in inputs.items()}, t[b:b + 1])
            assert rel(together[b:b + 1], alone) < 1e-5
    assert rel(together[0], together[1]) > 0.1


def test_stream_far_past_the_reference_rope_tables_matches_a_stream_from_zero():
    # RoPE only makes attention depend on position differences: a stream whose first block
    # sits at latent frame 1200 (past the 1024-frame table) and is given the same action
    # rows (row-0 padding included) computes what a stream starting at 0 computes.
    model = tiny_causal_model(seed=20, local_attn_size=4)
    inputs = random_inputs(model.config, 1, 9, *LATENT, seed=21)
    t = block_timesteps(1, 3, seed=22)
    with torch.no_grad():
        from_zero = run_stream(model, inputs, t, tail_every_other=False)
        cache, far, offset = model.new_cache(1, *LATENT), [], 1200
        window = ACTION.window_frames
        padded = {name: torch.cat([inputs[name][:, :1].expand(-1, window, -1), inputs[name]], dim=1)
                  for name in ("keyboard_cond", "mouse_cond")}
        for start in range(0, 9, P):
            part = slice(start, start + P)
            first, end = block_action_rows(ACTION, start + offset, P)
            # the far stream's rows from raw frame 4*(start+offset) - 12 on are the padded rows from 4*start on
            rows = slice(4 * start, 4 * start + end - first)
            far.append(model.forward_cached(
                inputs["x"][:, :, part], t[:, part], inputs["visual_context"], inputs["cond_concat"][:, :, part],
                cache, start + offset, **{name: padded[name][:, rows] for name in padded}))
        far = torch.cat(far, dim=2)
    assert rel(far, from_zero) < 1e-5


# ----------------------------------------------------------------------------- training uses

def test_backward_through_one_cached_call_reaches_the_parameters():
    model = tiny_causal_model(seed=23, local_attn_size=4)
    inputs = random_inputs(model.config, 2, 9, *LATENT, seed=24)
    t = block_timesteps(2, 3, seed=25)
    cache = model.new_cache(2, *LATENT)
    with torch.no_grad():  # the earlier blocks of a Self-Forcing rollout: no graph
        for start in (0, P):
            call_block(model, inputs, cache, start, t[:, start:start + P])
    out = call_block(model, inputs, cache, 2 * P, t[:, 2 * P:])
    # the cache holds detached copies: the next no-grad call (the context pass) rewrites
    # the same entries in place without disturbing this call's graph
    with torch.no_grad():
        again = call_block(model, inputs, cache, 2 * P, t[:, 2 * P:])
    assert all(not c.k.requires_grad for layer in cache.layers for c in layer.rolling())
    out.square().mean().backward()
    ignored = ("attn_q_norm.weight", "attn_k_norm.weight")  # stored but never read
    missing = [n for n, p in model.named_parameters()
               if not n.endswith(ignored) and (p.grad is None or not p.grad.abs().max() > 0)]
    assert missing == []
    assert torch.allclose(out.detach(), again, atol=1e-5)


def test_gradient_checkpointing_of_the_whole_sequence_forward():
    model = tiny_causal_model(seed=26, local_attn_size=4)
    inputs = random_inputs(model.config, 1, 6, *LATENT, seed=27)
    inputs["t"] = block_timesteps(1, 2, seed=28)

    def gradients():
        model.zero_grad(set_to_none=True)
        model(**inputs).square().mean().backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    plain = gradients()
    model.set_gradient_checkpointing(True)
    checkpointed = gradients()
    assert plain.keys() == checkpointed.keys()
    for name, g in plain.items():
        assert torch.allclose(g, checkpointed[name], atol=1e-6, rtol=1e-5), name


def test_static_buffers_do_not_grow_over_a_long_stream():
    model = tiny_causal_model(seed=29, local_attn_size=4)
    inputs = random_inputs(model.config, 1, 3, *LATENT, seed=30)
    cache = model.new_cache(1, *LATENT)
    buffers = [(c.k.data_ptr(), c.k.shape) for layer in cache.layers for c in layer.rolling()]
    with torch.no_grad():
        for block in range(12):
            start = block * P
            first, end = block_action_rows(ACTION, start, P)
            actions = {name: inputs[name][:, :1].expand(-1, end - first, -1) for name in ("keyboard_cond", "mouse_cond")}
            model.forward_cached(inputs["x"], torch.zeros(1, P), inputs["visual_context"], inputs["cond_concat"],
                                 cache, start, **actions)
    assert buffers == [(c.k.data_ptr(), c.k.shape) for layer in cache.layers for c in layer.rolling()]
    assert (cache.next_frame, cache.local_end) == (36, 4)


def test_analytic_flops_of_a_cached_call_equal_counted_flops():
    # bench/bench_streaming.py's FLOPs per block rest on this count of one steady-state call
    # (window full, context k/v cached); torch's counter sees every matmul the call makes.
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from bench.bench_model import forward_flops

    model = tiny_causal_model(seed=33, local_attn_size=6, keyboard_dim=5, action_blocks=(1,))
    inputs = random_inputs(model.config, 1, 9, *LATENT, seed=34)
    t = block_timesteps(1, 3, seed=35)
    cache = model.new_cache(1, *LATENT)
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        run_stream(model, dict(inputs, x=inputs["x"][:, :, :6], cond_concat=inputs["cond_concat"][:, :, :6]),
                   t[:, :6], cache)
        with counter:
            call_block(model, inputs, cache, 6, t[:, 6:], tail=True)
    first, end = block_action_rows(ACTION, 6, P)
    expected = forward_flops(model.config, 1, P, *LATENT, key_frames=6, action_rows=end - first,
                             context_kv=False, per_frame_t=True)
    assert expected == counter.get_total_flops()


# ----------------------------------------------------------------------------- errors

def test_bad_streaming_calls_are_clear_errors():
    model = tiny_causal_model(seed=31, local_attn_size=4)
    inputs = random_inputs(model.config, 1, 6, *LATENT, seed=32)
    first = slice(0, P)
    cache = model.new_cache(1, *LATENT)
    call = lambda start, part=first, **kw: model.forward_cached(  # noqa: E731
        inputs["x"][:, :, part], torch.zeros(1, 3), inputs["visual_context"], inputs["cond_concat"][:, :, part],
        cache, start, **{**block_actions(inputs, start), **kw})
    with torch.no_grad():
        with pytest.raises(ValueError, match=r"keyboard_cond has 8 rows.*whole prefix \(9 rows\)"):
            call(0, keyboard_cond=inputs["keyboard_cond"][:, :8])
        call(0)
        with pytest.raises(ValueError, match="starts there .* or at 0 .* not at 6"):
            call(6)
        with pytest.raises(ValueError, match="this cache was made for batch 1"):
            model.forward_cached(*(v.expand(2, *v.shape[1:]) for v in (
                inputs["x"][:, :, first], torch.zeros(1, 3), inputs["visual_context"], inputs["cond_concat"][:, :, first])),
                cache, 3)
        with pytest.raises(ValueError, match="1..4 latent frames"):
            model.forward_cached(inputs["x"][:, :, :5], torch.zeros(1, 5), inputs["visual_context"],
                                 inputs["cond_concat"][:, :, :5], cache, 3)
    with pytest.raises(ValueError, match="multiple of frames_per_block = 3"):
        model(**dict(random_inputs(model.config, 1, 4, *LATENT), t=torch.zeros(1, 4)))
    with pytest.raises(ValueError, match=r"t must be \[B=1, F=6\]"):
        model(**inputs)
    with pytest.raises(ValueError, match="needs a streaming window"):
        tiny_causal_model(local_attn_size=-1, action_blocks=(0, 1)).new_cache(1, *LATENT)
    with pytest.raises(ValueError, match="does not fit the window"):
        tiny_causal_model(local_attn_size=4, sink_size=2)
