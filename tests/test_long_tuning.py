"""Stage C, streaming long tuning, on tiny models: the stream's bookkeeping, the anchor, the
loss mask, the windows' conditions, and a stream continued across iterations equal to one
rollout of the same length."""

from contextlib import nullcontext

import pytest
import torch

import test_distillation
from model_helpers import perturb_, tiny_model
from test_distillation import H, W, conditions
from training.dmd import DistillationModels, RolloutSettings, critic_loss, generator_loss
from training.long_tuning import StreamPlan, advance, new_stream
from training.rollout import FewStepSchedule, SampleNoise, rollout
from wan.causal import causal_from
from wan.shapes import video_frame_count
from wan.vae import VAEConfig, WanVAE

SCHEDULE = FewStepSchedule.of((1000, 666, 333), 5.0)
SMALL = StreamPlan(chunk=6, overlap=3, max_latents=12)  # 6 new, then 3 and 3: three iterations
one_thread = test_distillation.one_thread  # autouse: tiny models on one torch thread


def tiny_vae() -> WanVAE:
    torch.manual_seed(0)
    return WanVAE(VAEConfig.tiny()).eval()


def test_the_public_recipes_stream_goes_9_then_6_up_to_39():
    plan = StreamPlan(chunk=9, overlap=3, max_latents=39)
    assert plan.problems(3) == [] and plan.iterations_per_sequence == 6
    assert [plan.new_latents(i) for i in range(6)] == [9, 6, 6, 6, 6, 6]
    assert [plan.length_before(i) + plan.new_latents(i) for i in range(6)] == [9, 15, 21, 27, 33, 39]
    # the sequence resets at 39: step 6 is the next sequence's first iteration
    assert [plan.position(step) for step in (0, 5, 6, 13)] == [(0, 0), (0, 5), (1, 0), (2, 1)]
    assert plan.loss_mask(0, 2).sum(1).tolist() == [9, 9]
    assert plan.loss_mask(3, 1).tolist() == [[0, 0, 0, 1, 1, 1, 1, 1, 1]]
    assert "both whole blocks of 3" in StreamPlan(9, 2, 39).problems(3)[0]
    assert StreamPlan(9, 9, 39).problems(3) and StreamPlan(9, 0, 39).problems(3)
    assert "e.g. 9, 15, 21" in StreamPlan(9, 3, 40).problems(3)[0]


def test_a_windows_conditions_are_its_action_rows_and_the_streams_first_frame():
    c = conditions(frames=12)
    window = c.window(6, 12)
    assert window["keyboard_cond"].shape[1] == video_frame_count(6)  # 1 + 4 (6 - 1) rows
    assert torch.equal(window["keyboard_cond"], c.keyboard[:, 24:45])
    assert torch.equal(window["mouse_cond"], c.mouse[:, 24:45])
    assert torch.equal(window["cond_concat"], c.cond_concat[:, :, :6])  # the clip's first image, as the recipe
    assert window["cond_concat"][:, :4, 0].eq(1).all()


def test_the_anchor_is_the_decoded_stream_re_encoded_as_one_image_latent():
    vae = tiny_vae()
    c = conditions(frames=12)
    stream = new_stream(causal_from(tiny_model(0), 6, 0), c, vae)
    stream.latents = torch.randn(1, 16, 12, H, W, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for frame in (3, 6):  # the decoder runs on through the stream between anchors
            anchor = stream.anchor(frame)
            last = vae.decode(stream.latents[:, :, :frame + 1])[:, :, -1:]
            assert anchor.shape == (1, 16, 1, H, W)
            assert torch.allclose(anchor, vae.encode(last), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="behind the decoded stream"):
        stream.anchor(3)


def test_a_stream_continued_across_iterations_is_one_rollout_of_the_same_length():
    """No weights change between the iterations and the exit step is shared: then the
    stream that goes on from its cache makes what one rollout makes from the same noise,
    and every later window is its last frames with the first one anchored."""
    student, vae = causal_from(tiny_model(0), 6, 0).eval(), tiny_vae()
    c = conditions(batch=2, frames=12)
    stream, noise = new_stream(student, c, vae), SampleNoise(3, "stream", [0, 1], "cpu")
    windows = []
    with torch.no_grad():
        for iteration in range(SMALL.iterations_per_sequence):
            windows.append(advance(student, stream, SMALL, iteration, noise, SCHEDULE, 1, nullcontext(), False))
        whole = rollout(student, c, SampleNoise(3, "stream", [0, 1], "cpu"), SCHEDULE, 1, 12)
    assert stream.length == 12 and torch.allclose(stream.latents, whole, rtol=1e-5, atol=1e-5)
    assert [(w.start, w.end) for w in windows] == [(0, 6), (3, 9), (6, 12)]
    assert torch.equal(windows[0].latents, stream.latents[:, :, :6])
    for w in windows[1:]:
        assert torch.equal(w.latents[:, :, 1:], stream.latents[:, :, w.start + 1:w.end])
        with torch.no_grad():
            anchor = vae.encode(vae.decode(stream.latents[:, :, :w.start + 1])[:, :, -1:])
        assert torch.allclose(w.latents[:, :, :1], anchor, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="starts at latent frame 0"):
        advance(student, stream, SMALL, 0, noise, SCHEDULE, 1, nullcontext(), False)


def test_overlap_frames_get_no_loss_and_the_student_learns_from_the_new_ones():
    student, vae = causal_from(tiny_model(0), 6, 0), tiny_vae()
    teacher, critic = tiny_model(0).requires_grad_(False), perturb_(tiny_model(0), seed=3, scale=0.02)
    models = DistillationModels(student, teacher, critic)
    settings = RolloutSettings(SCHEDULE, 5.0, 20, 980)
    c = conditions(frames=12)
    stream, noise = new_stream(student, c, vae), SampleNoise(0, "stream", [0], "cpu")
    with torch.no_grad():
        advance(student, stream, SMALL, 0, noise, SCHEDULE, 2, nullcontext(), False)
    window = advance(student, stream, SMALL, 1, noise, SCHEDULE, 2, nullcontext(), True)
    assert window.mask.tolist() == [[0, 0, 0, 1, 1, 1]]
    window.latents.retain_grad()
    made = generator_loss(models, window.latents, window.conditions(stream), noise, settings, nullcontext(), 1.0,
                          window.mask)
    assert made["losses"].gt(0).all()
    grad = window.latents.grad
    assert grad[:, :, :3].abs().max() == 0 and grad[:, :, 3:].abs().min() > 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in critic.parameters())
    # the critic learns the same window; its loss ignores the overlap frames' errors
    judged = critic_loss(models, window.latents, window.conditions(stream), noise, settings, nullcontext(), 1.0,
                         window.mask)
    assert judged["losses"].gt(0).all() and any(p.grad is not None for p in critic.parameters())
