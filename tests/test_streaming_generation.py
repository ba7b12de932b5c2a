"""generation/streaming.py: the warped few-step schedule, the conversions, and the streaming
loop end to end on a tiny student and a tiny VAE."""

import pytest
import torch

from model_helpers import tiny_causal_model
from test_vae import fully_random
from generation.streaming import (DENOISING_STEPS, StreamingGenerator, block_action_chunks, block_rows,
                                  grid_sigma, renoise, training_grid, warped_timesteps, x0_from_velocity)
from wan.conditioning import STREAM_COND_LATENT_FRAMES, first_frame_video
from wan.model import random_inputs
from wan.vae import StreamingDecoder, VAEConfig, WanVAE

LATENT = (2, 4)
P = 3


# ----------------------------------------------------------------------------- schedule

def test_warped_timesteps_and_sigmas_are_the_spec_table():
    # STREAMING_SPEC 6.2: float32 values, the sigmas those of the grid points
    universal = warped_timesteps(DENOISING_STEPS["universal"])
    assert universal.dtype == torch.float32
    assert universal.tolist() == [1000.0, 908.8427124023438, 713.9794311523438]
    assert grid_sigma(universal).tolist() == [1.0, 0.9088427424430847, 0.7139794230461121]
    templerun = warped_timesteps(DENOISING_STEPS["templerun"])
    assert templerun.tolist() == [1000.0, 937.5, 833.3333129882812, 625.0]
    assert grid_sigma(templerun).tolist() == [1.0, 0.9375, 0.8333333134651184, 0.625]
    assert DENOISING_STEPS["gta_drive"] == DENOISING_STEPS["universal"]


def test_the_grid_and_its_nearest_point_lookup():
    sigmas, timesteps = training_grid()
    assert sigmas[0].item() == 1.0 and sigmas.shape == (1000,)
    assert sigmas[-1].item() == pytest.approx(0.004980080, abs=1e-9) and (sigmas > 0).all()
    _, t = training_grid()
    index = {float(v): i for i, v in enumerate(t.tolist())}
    for k, i in ((1000, 0), (666, 334), (333, 667)):
        assert index[warped_timesteps([k]).item()] == i
    assert grid_sigma(torch.tensor(0.0)).item() == sigmas[-1].item()  # t = 0 -> the last grid point
    halfway = (timesteps[10] + timesteps[11]) / 2  # a tie goes to the lower index
    assert grid_sigma(halfway).item() == sigmas[10].item()
    assert warped_timesteps([0]).item() == 0.0
    with pytest.raises(ValueError, match="integers in 0..1000"):
        warped_timesteps([1000, 666.5])


def test_x0_and_renoise_invert_each_other():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 3, 2, 4, generator=g), torch.randn(2, 16, 3, 2, 4, generator=g)
    sigma = 0.7139794230461121
    x_t = renoise(x0, eps, sigma)
    assert torch.allclose(x_t, (1 - sigma) * x0 + sigma * eps, atol=1e-6)
    assert torch.allclose(x0_from_velocity(x_t, eps - x0, sigma), x0, atol=1e-5)
    per_frame = torch.tensor([[0.2, 0.5, 0.9], [1.0, 0.0, 0.3]])  # [B, F]
    v = torch.randn_like(x0)
    expected = x_t - per_frame[:, None, :, None, None] * v
    assert torch.allclose(x0_from_velocity(x_t, v, per_frame), expected, atol=1e-6)
    assert x0_from_velocity(x_t.bfloat16(), v.bfloat16(), sigma).dtype == torch.bfloat16


# ----------------------------------------------------------------------------- the loop

@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return fully_random(WanVAE(VAEConfig.tiny())).eval()


def _student(seed=1, **overrides):
    return tiny_causal_model(seed=seed, **{"local_attn_size": 6, **overrides}).eval()


def _conditions(model, frames, seed=2):
    """Random conditions and whole action sequences for `frames` latent frames."""
    return random_inputs(model.config, 1, frames, *LATENT, seed=seed)


def test_loop_yields_the_right_frames_and_repeats_for_a_seed(vae):
    model = _student()
    inputs = _conditions(model, 12)
    actions = list(block_action_chunks(inputs["keyboard_cond"], inputs["mouse_cond"], P))

    def run(seed):
        generator = StreamingGenerator(model, inputs["cond_concat"], inputs["visual_context"],
                                       StreamingDecoder(vae), seed=seed)
        return list(generator.stream(actions))

    blocks = run(seed=5)
    assert [b.video.shape[2] for b in blocks] == [9, 12, 12, 12]
    assert sum(b.video.shape[2] for b in blocks) == 1 + 4 * (12 - 1)
    assert [b.start_frame for b in blocks] == [0, 3, 6, 9]
    assert all(b.latents.shape == (1, 16, 3, *LATENT) for b in blocks)
    again = run(seed=5)
    for a, b in zip(blocks, again):
        assert torch.equal(a.latents, b.latents) and torch.equal(a.video, b.video)
    other = run(seed=6)
    assert not torch.allclose(other[0].latents, blocks[0].latents)


def test_loop_follows_the_spec_step_by_step():
    # STREAMING_SPEC 6.4 written out with the whole action prefixes and condition slices,
    # and the same noise draws, against the generator (bounded history, held conditions).
    model = _student(local_attn_size=4, keyboard_dim=2)
    inputs = _conditions(model, 9, seed=3)
    generator = StreamingGenerator(model, inputs["cond_concat"], inputs["visual_context"], seed=7)
    streamed = [b.latents for b in generator.stream(block_action_chunks(inputs["keyboard_cond"], inputs["mouse_cond"], P))]

    noise = torch.Generator().manual_seed(7)
    timesteps = warped_timesteps(DENOISING_STEPS["universal"])
    sigmas, grid_t = training_grid()
    cache = model.new_cache(1, *LATENT)
    with torch.no_grad():
        for k in range(3):
            f0 = P * k
            rows = 1 + 4 * (f0 + P - 1)
            conditions = dict(visual_context=inputs["visual_context"], cond_concat=inputs["cond_concat"][:, :, f0:f0 + P],
                              cache=cache, start_frame=f0, keyboard_cond=inputs["keyboard_cond"][:, :rows],
                              mouse_cond=inputs["mouse_cond"][:, :rows])
            x = torch.randn(1, 16, P, *LATENT, generator=noise)
            for j, t in enumerate(timesteps):
                v = model.forward_cached(x, torch.full((1, P), t.item()), **conditions)
                sigma = sigmas[(grid_t - t).abs().argmin()].double()
                x0 = (x.double() - sigma * v.double()).float()
                if j < len(timesteps) - 1:
                    next_sigma = sigmas[(grid_t - timesteps[j + 1]).abs().argmin()]
                    x = (1 - next_sigma) * x0 + next_sigma * torch.randn(1, 16, P, *LATENT, generator=noise)
            model.forward_cached(x0, torch.zeros(1, P), **conditions)
            assert torch.allclose(streamed[k], x0, atol=1e-5), k


def test_one_action_per_block_fills_the_blocks_rows():
    model = _student()
    inputs = _conditions(model, 6)
    generator = StreamingGenerator(model, inputs["cond_concat"], inputs["visual_context"])
    assert generator.rows_for_next_block == 9
    keys = [torch.tensor([[1.0, 0, 0, 0]]), torch.tensor([[0, 0, 1.0, 0]])]
    mice = [torch.tensor([[0.1, 0.0]]), torch.tensor([[0.0, -0.1]])]
    generator.step(keys[0], mice[0])
    assert generator.rows_for_next_block == 12
    generator.step(keys[1], mice[1])
    # STREAMING_SPEC 6.5: block 0's action on raw rows 0..8, block 1's on rows 9..20
    expected = torch.cat([keys[0].expand(9, -1), keys[1].expand(12, -1)])
    assert torch.equal(generator.history["keyboard"][0], expected)
    assert torch.equal(generator.history["mouse"][0], torch.cat([mice[0].expand(9, -1), mice[1].expand(12, -1)]))


def test_memory_stays_bounded_and_conditions_hold_their_last_frame(vae):
    model = _student(local_attn_size=4, enable_mouse=False, keyboard_dim=7)
    inputs = _conditions(model, STREAM_COND_LATENT_FRAMES)
    generator = StreamingGenerator(model, inputs["cond_concat"], inputs["visual_context"], StreamingDecoder(vae),
                                   denoising_steps=DENOISING_STEPS["templerun"])
    buffers = [c.k.data_ptr() for layer in generator.cache.layers for c in layer.rolling()]
    key = torch.zeros(1, 7)
    key[0, 1] = 1
    for _ in range(12):  # past the 30 latent frames of conditions
        block = generator.step(key)
    assert block.start_frame == 33 and block.video.shape[2] == 12
    assert generator.history["keyboard"].shape[1] == 21 and generator.history["mouse"] is None
    assert [c.k.data_ptr() for layer in generator.cache.layers for c in layer.rolling()] == buffers
    assert len(generator.decoder.state.slots) == 32
    held = generator._cond_block(33)
    assert torch.equal(held, inputs["cond_concat"][:, :, [29, 29, 29]])

    short = StreamingGenerator(model, inputs["cond_concat"][:, :, :6], inputs["visual_context"])
    short.step(key)
    short.step(key)
    with pytest.raises(ValueError, match="cond_concat has 6 latent frames.*at least 30"):
        short.step(key)


def test_first_frame_conditions_stop_changing_where_the_stream_holds_them(vae):
    # The VAE encoder's causal reach is a fact of its layer structure: with every weight
    # random, latent frame 29 on of "image, then zero frames" is the same for any image.
    g = torch.Generator().manual_seed(8)
    images = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    frames = 1 + 4 * STREAM_COND_LATENT_FRAMES  # latent frames 0..30
    with torch.no_grad():
        latents = vae.encode(first_frame_video(images, frames))
    last = STREAM_COND_LATENT_FRAMES - 1
    assert torch.allclose(latents[0, :, last:], latents[1, :, last:], atol=1e-6)
    assert torch.allclose(latents[:, :, last], latents[:, :, last + 1], atol=1e-6)
    assert not torch.allclose(latents[0, :, last - 2], latents[1, :, last - 2], atol=1e-6)


def test_bad_actions_are_clear_errors():
    model = _student(enable_mouse=False, keyboard_dim=7)
    inputs = _conditions(model, 3)
    generator = StreamingGenerator(model, inputs["cond_concat"], inputs["visual_context"])
    with pytest.raises(ValueError, match="no mouse branch"):
        generator.step(torch.zeros(1, 7), torch.zeros(1, 2))
    with pytest.raises(ValueError, match="needs a keyboard action"):
        generator.step()
    with pytest.raises(ValueError, match=r"\[B=1, 9, 7\] \(one per frame of block 0\), got \[1, 12, 7\]"):
        generator.step(torch.zeros(1, 12, 7))
    with pytest.raises(ValueError, match="non-finite"):
        generator.step(torch.full((1, 7), float("nan")))
    with pytest.raises(ValueError, match="multiple of 3"):
        list(block_action_chunks(torch.zeros(1, 13, 7), None, 3))
    assert [block_rows(i, 3) for i in range(3)] == [9, 12, 12]
