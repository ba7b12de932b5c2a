"""The distillation method on tiny models: diffusion forcing (stage A), Self-Forcing rollouts,
the DMD gradient and the critic's loss (stage B), and validation's distances."""

from contextlib import nullcontext

import pytest
import torch

from generation.streaming import StreamingGenerator, grid_sigma, training_grid, warped_timesteps
from model_helpers import perturb_, tiny_model
from training import diffusion_forcing as df
from training.dmd import (DistillationModels, RolloutSettings, critic_losses, critic_micro_batch, denoise,
                          dmd_direction, dmd_losses, generator_micro_batch, per_sample_mean, score_sigmas)
from training.epochs import seeded_generator, stream_item, epoch_order
from training.rollout import Conditions, FewStepSchedule, SampleNoise, exit_step_for, rollout
from training.streaming_validation import energy_distance, latent_distance, sample_seed, spread
from wan.causal import causal_from
from wan.conditioning import cond_concat_from_latent
from wan.shapes import video_frame_count

H, W = 4, 6  # latent size of the tiny tests (6 tokens per latent frame)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from a second thread and lose much when the cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def conditions(batch=1, frames=6, seed=0, clip_dim=32) -> Conditions:
    g = torch.Generator().manual_seed(seed)
    rows = video_frame_count(frames)
    return Conditions(cond_concat_from_latent(torch.randn(batch, 16, frames, H, W, generator=g)),
                      torch.randn(batch, 5, clip_dim, generator=g),
                      (torch.rand(batch, rows, 4, generator=g) > 0.5).float(),
                      torch.randn(batch, rows, 2, generator=g) * 0.1)


def tiny_student(seed=0, window=6):
    return causal_from(tiny_model(seed), window, 0)


# ----------------------------------------------------------------------------- seeded streams

def test_seeded_generators_are_independent_per_key_and_repeatable():
    a = torch.randn(5, generator=seeded_generator(1, "critic", 7))
    assert torch.equal(a, torch.randn(5, generator=seeded_generator(1, "critic", 7)))
    assert not torch.equal(a, torch.randn(5, generator=seeded_generator(1, "generator", 7)))
    assert not torch.equal(a, torch.randn(5, generator=seeded_generator(1, "critic", 8)))


def test_stream_positions_walk_through_seeded_epochs():
    items = [stream_item(p, 4, seed=3) for p in range(12)]
    assert [e for e, _ in items] == [0] * 4 + [1] * 4 + [2] * 4
    assert [i for _, i in items[4:8]] == epoch_order(4, 3, 1)
    assert sorted(i for _, i in items[:4]) == [0, 1, 2, 3]


# ----------------------------------------------------------------------------- stage A: diffusion forcing

def test_bell_weights_match_the_spec():
    w = df.bell_weights(5.0, "index")
    assert w.mean().item() == pytest.approx(1.0, abs=1e-5)
    # DISTILL_SPEC 1.2's values of FastVideo's index-based bell
    assert w[0].item() == 0 and w[500].item() == pytest.approx(1.580, abs=2e-3)
    assert w[250].item() == pytest.approx(1.108, abs=2e-3) and w[750].item() == pytest.approx(1.108, abs=2e-3)
    assert w[100].item() == pytest.approx(0.48, abs=0.01) and w[999].item() == pytest.approx(0.005, abs=2e-3)
    by_t = df.bell_weights(5.0, "timestep")
    t = training_grid(5.0)[1]
    peak = int(by_t.argmax())
    assert by_t.mean().item() == pytest.approx(1.0, abs=1e-5)
    assert abs(t[peak].item() - 500) < 5 and by_t[peak].item() == pytest.approx(2.08, abs=0.02)
    assert by_t[0].item() == pytest.approx(0.0, abs=1e-6)  # pure noise, t = 1000
    assert torch.equal(df.bell_weights(5.0, "none"), torch.ones(1000))
    with pytest.raises(ValueError, match="unknown weighting"):
        df.bell_weights(5.0, "cosine")


def test_block_levels_are_shared_within_a_block_and_bounded():
    lo, hi = df.index_bounds(0.2, 0.9, 5.0)
    sigmas = training_grid(5.0)[0]
    assert sigmas[lo] <= 0.9 and sigmas[lo - 1] > 0.9 and sigmas[hi - 1] >= 0.2 and sigmas[hi] < 0.2
    levels = df.sample_block_levels(torch.Generator().manual_seed(0), 9, 3, lo, hi)
    assert levels.shape == (9,) and ((levels >= lo) & (levels < hi)).all()
    assert all(len(set(levels[b:b + 3].tolist())) == 1 for b in (0, 3, 6))
    with pytest.raises(ValueError, match="whole blocks"):
        df.sample_block_levels(torch.Generator(), 5, 3)
    with pytest.raises(ValueError, match="no training sigma"):
        df.index_bounds(0.5, 0.5001, 5.0)


def test_frame_losses_are_the_per_frame_velocity_error_at_each_blocks_level():
    student = tiny_student()
    c = conditions(batch=2)
    x0 = torch.randn(2, 16, 6, H, W)
    noise = torch.randn(2, 16, 6, H, W)
    levels = torch.tensor([[10] * 3 + [700] * 3, [500] * 3 + [0] * 3])
    inputs = {"latents": x0, "cond_concat": c.cond_concat, "visual_context": c.visual_context,
              "keyboard": c.keyboard, "mouse": c.mouse}
    losses = df.frame_losses(student, inputs, levels, noise, 5.0, nullcontext())
    sigma = training_grid(5.0)[0][levels]
    s = sigma[:, None, :, None, None]
    prediction = student((1 - s) * x0 + s * noise, sigma * 1000, c.visual_context, c.cond_concat, c.keyboard, c.mouse)
    expected = ((prediction - (noise - x0)) ** 2).mean(dim=(1, 3, 4))
    assert torch.allclose(losses, expected, rtol=1e-5, atol=1e-6)
    weights = df.bell_weights(5.0)
    assert torch.allclose(df.weighted_losses(losses, levels, weights), (losses * weights[levels]).mean(1))
    # block-causal: the first block's losses ignore the second block's level
    other = levels.clone()
    other[:, 3:] = 300
    again = df.frame_losses(student, inputs, other, noise, 5.0, nullcontext())
    assert torch.allclose(again[:, :3], losses[:, :3], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(again[:, 3:], losses[:, 3:])


def test_a_few_diffusion_forcing_steps_lower_the_loss_on_a_fixed_batch():
    torch.manual_seed(0)
    student = tiny_student()
    c = conditions(batch=2)
    inputs = {"latents": torch.randn(2, 16, 6, H, W), "cond_concat": c.cond_concat,
              "visual_context": c.visual_context, "keyboard": c.keyboard, "mouse": c.mouse}
    levels, noise = torch.full((2, 6), 400), torch.randn(2, 16, 6, H, W)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    weights = df.bell_weights(5.0)
    first = df.micro_batch(student, inputs, levels, noise, 5.0, weights, nullcontext(), 1.0).mean()
    for _ in range(5):
        optimizer.step()
        optimizer.zero_grad()
        last = df.micro_batch(student, inputs, levels, noise, 5.0, weights, nullcontext(), 1.0).mean()
    assert last < first


# ----------------------------------------------------------------------------- rollouts

def test_a_rollout_exiting_at_the_last_step_is_the_streaming_loop():
    """The training rollout and StreamingGenerator (what play_world.py runs) make the same
    video from the same noise."""
    student = tiny_student().eval()
    c = conditions(frames=9)
    steps = (1000, 666, 333)
    schedule = FewStepSchedule.of(steps, 5.0)
    with torch.no_grad():
        made = rollout(student, c, SampleNoise(4, "generator", [11], "cpu"), schedule, len(schedule) - 1, 9)
    generator = StreamingGenerator(student, c.cond_concat, c.visual_context, denoising_steps=steps)
    generator.noise = seeded_generator(4, "generator", 11)  # the rollout's draws, in the same order
    streamed = []
    for block in range(3):
        rows = slice(0, 9) if block == 0 else slice(9 + 12 * (block - 1), 9 + 12 * block)
        streamed.append(generator.step(c.keyboard[:, rows], c.mouse[:, rows]).latents)
    assert torch.allclose(made, torch.cat(streamed, 2), rtol=1e-5, atol=1e-5)
    assert schedule.timesteps == tuple(warped_timesteps(steps).tolist())
    assert schedule.sigmas == tuple(grid_sigma(warped_timesteps(steps)).tolist())


def test_no_gradient_crosses_blocks():
    """The gradient of a later block's output equals the one from replaying only that
    block's exit step on the recorded (detached) history."""
    student = tiny_student()
    c = conditions(frames=6)
    schedule = FewStepSchedule.of((1000, 666, 333), 5.0)
    made = rollout(student, c, SampleNoise(0, "g", [0], "cpu"), schedule, 1, 6, with_grad=True)
    assert made.requires_grad
    (made[:, :, 3:] ** 2).sum().backward()
    whole = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad()
    noise = SampleNoise(0, "g", [0], "cpu")  # the same draws, block by block
    cache = student.new_cache(1, H, W)
    with torch.no_grad():
        first = rollout(student, c, noise, schedule, 1, 3, cache=cache)
    second = rollout(student, c, noise, schedule, 1, 3, with_grad=True, cache=cache, start_frame=3)
    assert torch.allclose(torch.cat([first, second.detach()], 2), made.detach(), rtol=1e-5, atol=1e-6)
    (second ** 2).sum().backward()
    replayed = {n: p.grad for n, p in student.named_parameters() if p.grad is not None}
    assert whole.keys() == replayed.keys() and len(whole) > 0
    assert all(torch.allclose(whole[n], replayed[n], rtol=1e-4, atol=1e-7) for n in whole)


def test_rollout_without_gradients_keeps_no_graph_and_checks_its_arguments():
    student = tiny_student()
    c = conditions(frames=6)
    schedule = FewStepSchedule.of((1000, 750, 500, 250), 5.0)
    made = rollout(student, c, SampleNoise(0, "g", [0], "cpu"), schedule, 3, 6)
    assert not made.requires_grad
    with pytest.raises(ValueError, match="whole blocks"):
        rollout(student, c, SampleNoise(0, "g", [0], "cpu"), schedule, 0, 4)
    with pytest.raises(ValueError, match="exit step 4"):
        rollout(student, c, SampleNoise(0, "g", [0], "cpu"), schedule, 4, 6)


def test_exit_steps_are_seeded_per_step_and_uniform():
    drawn = [exit_step_for(1, "generator", step, 0, 4) for step in range(400)]
    assert drawn == [exit_step_for(1, "generator", step, 0, 4) for step in range(400)]
    assert set(drawn) == {0, 1, 2, 3} and all(60 < drawn.count(k) < 140 for k in range(4))
    assert exit_step_for(1, "generator", 3, 0, 4, last_step_only=True) == 3


def test_per_sample_noise_does_not_depend_on_the_batch():
    together = SampleNoise(0, "critic", [5, 6], "cpu").randn(3, 2)
    alone = SampleNoise(0, "critic", [6], "cpu").randn(3, 2)
    assert torch.equal(together[1:], alone)


# ----------------------------------------------------------------------------- DMD and the critic

class GaussianDenoiser(torch.nn.Module):
    """The exact flow model of data N(mean, I): E[x0 | x_t] in closed form, as a velocity."""

    def __init__(self, mean: torch.Tensor):
        super().__init__()
        self.mean = mean

    def forward(self, x_t, t, **conditions):
        sigma = (t / 1000).view(-1, 1, 1, 1, 1)
        a = 1 - sigma
        x0 = self.mean + a / (a**2 + sigma**2) * (x_t - a * self.mean)
        return (x_t - x0) / sigma


def test_dmd_direction_is_the_gradient_of_the_divergence():
    """For Gaussian teacher and student distributions, the mean DMD direction points along
    the numerical gradient of KL(student || teacher) with respect to the student's mean,
    averaged over the score levels: the student moves towards the teacher."""
    torch.manual_seed(0)
    shape = (1, 16, 3, 2, 2)
    real_mean, fake_mean = torch.randn(shape) * 0.5, torch.randn(shape) * 0.5
    teacher, critic = GaussianDenoiser(real_mean), GaussianDenoiser(fake_mean)
    noise = SampleNoise(0, "dmd", list(range(256)), "cpu")
    sigma = score_sigmas(noise, 5.0, 20, 980)
    x_gen = fake_mean + noise.randn(*shape[1:])
    x_t = (1 - sigma.view(-1, 1, 1, 1, 1)) * x_gen + sigma.view(-1, 1, 1, 1, 1) * noise.randn(*shape[1:])
    direction = dmd_direction(x_gen, denoise(teacher, x_t, sigma, {}, nullcontext()),
                              denoise(critic, x_t, sigma, {}, nullcontext())).mean(0)

    def divergence(mean):  # E over the same levels of KL(N(a mean, v) || N(a real, v)), v = a^2 + s^2
        a = 1 - sigma
        return ((a**2 / (a**2 + sigma**2)).mean() * ((mean - real_mean) ** 2).sum() / 2).item()

    h = 1e-3
    numerical = torch.zeros(shape)
    for i in range(numerical.numel()):
        step = torch.zeros(numerical.numel())
        step[i] = h
        step = step.view(shape)
        numerical.view(-1)[i] = (divergence(fake_mean + step) - divergence(fake_mean - step)) / (2 * h)
    cosine = torch.nn.functional.cosine_similarity(direction.flatten(), numerical.flatten(), dim=0)
    assert cosine > 0.99


def test_the_dmd_loss_gradient_is_the_direction_over_the_element_count():
    x_gen = torch.randn(2, 16, 3, H, W, requires_grad=True)
    direction = torch.randn(2, 16, 3, H, W)
    losses = dmd_losses(x_gen, direction)
    (grad,) = torch.autograd.grad(losses.mean(), x_gen)
    assert torch.allclose(grad, direction / x_gen.numel(), rtol=1e-5, atol=1e-9)  # x - (x - g): float32 rounding
    assert torch.allclose(losses, 0.5 * (direction**2).flatten(1).mean(1))
    # with a frame mask only the kept frames pull, each sample averaged over its kept frames
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    (grad,) = torch.autograd.grad(dmd_losses(x_gen, direction, mask).sum(), x_gen)
    kept = mask[:, None, :, None, None].expand_as(direction)
    counts = kept.flatten(1).sum(1).view(-1, 1, 1, 1, 1)
    assert torch.allclose(grad, direction * kept / counts, rtol=1e-5, atol=1e-8)


def test_the_normaliser_is_the_mean_distance_to_the_teacher_per_sample():
    x_gen = torch.zeros(2, 1, 1, 1, 2)
    teacher = torch.tensor([1.0, 3.0, 2.0, 2.0]).view(2, 1, 1, 1, 2)
    critic = teacher + 1
    direction = dmd_direction(x_gen, teacher, critic)
    assert torch.allclose(direction.flatten(1), torch.tensor([[0.5, 0.5], [0.5, 0.5]]))
    same = dmd_direction(teacher, teacher, critic)  # D floored, not a division by zero
    assert torch.isfinite(same).all()
    assert per_sample_mean(torch.ones(2, 1, 3, 1, 1), torch.tensor([[1, 0, 0], [1, 1, 1]])).tolist() == [1, 1]


def test_score_levels_follow_the_shifted_clamped_distribution():
    sigma = score_sigmas(SampleNoise(0, "s", list(range(4000)), "cpu"), 5.0, 20, 980)
    t = sigma * 1000
    assert t.min() >= 20 and t.max() <= 980
    quartiles = torch.quantile(t, torch.tensor([0.25, 0.5, 0.75]))
    # DISTILL_SPEC 2.2's quantiles of 1000 shift5(u), u uniform
    assert quartiles.tolist() == pytest.approx([625, 833, 937], abs=15)


def test_critic_loss_is_flow_matching_on_the_detached_video():
    critic = tiny_model(1)
    c = conditions(frames=3)
    x_gen = torch.randn(1, 16, 3, H, W, requires_grad=True)
    sigma, eps = torch.tensor([0.6]), torch.randn(1, 16, 3, H, W)
    losses = critic_losses(critic, x_gen, c.whole(), sigma, eps, nullcontext())
    x_t = 0.4 * x_gen.detach() + 0.6 * eps
    prediction = critic(x_t, torch.tensor([600.0]), c.visual_context, c.cond_concat, c.keyboard, c.mouse)
    assert torch.allclose(losses, ((prediction - (eps - x_gen.detach())) ** 2).mean().view(1), rtol=1e-5)
    losses.sum().backward()
    assert x_gen.grad is None and all(p.grad is not None for p in critic.blocks[0].ffn.parameters())


def test_generator_and_critic_halves_train_only_their_model_and_repeat_exactly():
    def run():
        student, teacher, critic = tiny_student(), tiny_model(0).requires_grad_(False), tiny_model(0)
        perturb_(critic, seed=3, scale=0.02)  # a critic that differs from the teacher: a DMD gradient
        models = DistillationModels(student, teacher, critic)
        settings = RolloutSettings(FewStepSchedule.of((1000, 666, 333), 5.0), 5.0, 20, 980)
        c = conditions(batch=2, frames=6)
        made = generator_micro_batch(models, c, SampleNoise(0, "generator", [0, 1], "cpu"), 2, settings,
                                     nullcontext(), 0.5)
        assert all(p.grad is None for p in critic.parameters())
        student_grads = [p.grad.clone() for p in student.parameters() if p.grad is not None]
        judged = critic_micro_batch(models, c, SampleNoise(0, "critic", [0, 1], "cpu"), 1, settings,
                                    nullcontext(), 0.5)
        assert all(torch.equal(a, p.grad) for a, p in zip(student_grads, [p for p in student.parameters()
                                                                         if p.grad is not None]))
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in critic.parameters())
        return made, judged, student_grads

    first, second = run(), run()
    assert first[0]["losses"].gt(0).all() and len(first[2]) > 0
    assert torch.equal(first[0]["losses"], second[0]["losses"]) and torch.equal(first[1]["losses"], second[1]["losses"])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2]))


def test_a_critic_equal_to_the_teacher_gives_no_dmd_gradient():
    student, teacher = tiny_student(), tiny_model(0).requires_grad_(False)
    models = DistillationModels(student, teacher, tiny_model(0))
    settings = RolloutSettings(FewStepSchedule.of((1000, 666, 333), 5.0), 5.0, 20, 980)
    made = generator_micro_batch(models, conditions(frames=3), SampleNoise(0, "generator", [0], "cpu"), 0, settings,
                                 nullcontext(), 1.0)
    assert made["losses"].abs().max() < 1e-10  # separately allocated equal models: equal to rounding
    assert all(p.grad is None or p.grad.abs().max() < 1e-8 for p in student.parameters())


# ----------------------------------------------------------------------------- validation's distances

def test_the_energy_distance_charges_a_student_that_makes_the_mean_video():
    """Teacher videos: a mean plus unit noise. A student that always makes the mean video is
    closer to one teacher video in RMS than a student sampling the teacher's own
    distribution - the trap of one-sample RMS - but farther in energy distance, which is
    about 0 for the matching student and grows with a wrong mean."""
    g = torch.Generator().manual_seed(0)
    shape = (1, 16, 3, H, W)
    mean = torch.randn(shape, generator=g)

    def draws(count, offset=0.0):
        return [mean + offset + torch.randn(shape, generator=g) for _ in range(count)]

    teachers, matching, blurred = draws(24), draws(24), [mean.clone() for _ in range(24)]
    assert latent_distance(blurred[0], teachers[0]) < latent_distance(matching[0], teachers[0])
    assert spread(teachers) == pytest.approx(2 ** 0.5, rel=0.05) and spread(blurred) == 0
    assert abs(energy_distance(matching, teachers)) < 0.05
    # 2 E|mean - T| - 0 - E|T - T'| = 2 - sqrt(2) for unit noise
    assert energy_distance(blurred, teachers) == pytest.approx(2 - 2 ** 0.5, abs=0.05)
    shifted, further = energy_distance(draws(24, 0.5), teachers), energy_distance(draws(24, 1.0), teachers)
    assert 0.05 < shifted < further
    assert energy_distance(matching[:1], teachers) is None and spread(teachers[:1]) is None


def test_validation_noise_seeds():
    """The first noise of each clip keeps its seed + clip index; every other is its own stream."""
    assert [sample_seed(42, n, 0) for n in range(3)] == [42, 43, 44]
    others = {sample_seed(42, n, k) for n in range(3) for k in range(1, 4)}
    assert len(others) == 9 and not others & {42, 43, 44}
    assert sample_seed(42, 1, 2) == sample_seed(42, 1, 2) != sample_seed(7, 1, 2)
