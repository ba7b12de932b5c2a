import pytest
import torch

from wan import flow


def test_shift_by_hand():
    # shift 5: 5 * 0.5 / (1 + 4 * 0.5) = 2.5 / 3
    assert flow.shift_sigma(0.5, 5.0) == pytest.approx(2.5 / 3)
    assert flow.shift_sigma(1.0, 5.0) == pytest.approx(1.0)
    assert flow.shift_sigma(0.0, 5.0) == 0.0
    assert flow.shift_sigma(0.3, 1.0) == pytest.approx(0.3)


def test_training_grid_matches_hand_computation():
    grid = flow.sigma_grid(1000, shift=5.0)
    assert grid.shape == (1000,)
    assert grid[0].item() == pytest.approx(1.0)
    # last grid point: s = 0.001 -> 0.005 / 1.004
    assert grid[-1].item() == pytest.approx(0.005 / 1.004)
    # s = 0.5 sits at index 500
    assert grid[500].item() == pytest.approx(2.5 / 3)
    assert torch.all(grid[1:] < grid[:-1])
    assert flow.sigma_to_timestep(grid)[500].item() == pytest.approx(1000 * 2.5 / 3)


def test_noising_and_target_by_hand():
    x0 = torch.tensor([[1.0, -2.0]])
    noise = torch.tensor([[0.5, 4.0]])
    sigma = torch.tensor([0.25])
    assert torch.allclose(flow.add_noise(x0, noise, sigma), torch.tensor([[0.875, -0.5]]))
    assert torch.allclose(flow.velocity_target(x0, noise), torch.tensor([[-0.5, 6.0]]))
    prediction = torch.tensor([[0.5, 6.0]])  # errors 1 and 0
    assert flow.flow_matching_loss(prediction, x0, noise).item() == pytest.approx(0.5)


def test_noising_is_per_sample():
    x0 = torch.zeros(2, 3, 4)
    noise = torch.ones(2, 3, 4)
    out = flow.add_noise(x0, noise, torch.tensor([0.0, 1.0]))
    assert torch.all(out[0] == 0) and torch.all(out[1] == 1)


def test_uniform_sampling_covers_the_grid_and_respects_bounds():
    g = torch.Generator().manual_seed(0)
    sigmas = flow.sample_sigmas(20000, "uniform", 5.0, generator=g)
    grid = flow.sigma_grid(1000, 5.0).float()
    assert torch.isin(sigmas, grid).all()
    # uniform over the index: about half the draws land above grid[500]
    assert (sigmas >= grid[500]).float().mean().item() == pytest.approx(0.5, abs=0.02)
    bounded = flow.sample_sigmas(2000, "uniform", 5.0, min_sigma=0.2, max_sigma=0.6, generator=g)
    assert bounded.min() >= 0.2 and bounded.max() <= 0.6


def test_logit_normal_sampling_bounds_and_median():
    g = torch.Generator().manual_seed(0)
    sigmas = flow.sample_sigmas(20000, "logit_normal", 1.0, min_sigma=0.1, max_sigma=0.9, generator=g)
    assert sigmas.min() >= 0.1 and sigmas.max() <= 0.9
    assert sigmas.median().item() == pytest.approx(0.5, abs=0.02)


def test_sampling_errors_are_clear():
    with pytest.raises(ValueError, match="unknown timestep sampling 'bogus'"):
        flow.sample_sigmas(1, "bogus")
    with pytest.raises(ValueError, match="MIN_SIGMA < MAX_SIGMA"):
        flow.sample_sigmas(1, "uniform", min_sigma=0.7, max_sigma=0.2)


def test_validation_sigmas_are_fixed_quantiles():
    a = flow.validation_sigmas(4, "uniform", 5.0)
    assert torch.equal(a, flow.validation_sigmas(4, "uniform", 5.0))
    grid = flow.sigma_grid(1000, 5.0).flip(0).float()
    assert torch.equal(a, grid[[125, 375, 625, 875]])
    b = flow.validation_sigmas(3, "logit_normal", 1.0)
    assert b[1].item() == pytest.approx(0.5)
    assert torch.all(b[1:] > b[:-1])


def test_euler_sampler_recovers_x0_from_exact_velocity():
    torch.manual_seed(0)
    x0 = torch.randn(2, 16, 3, 4, 6)

    def exact_velocity(x, timestep):
        # On the straight path x = (1 - s) x0 + s eps, the velocity eps - x0 = (x - x0) / s.
        sigma = (timestep / flow.NUM_TRAIN_TIMESTEPS).view(-1, 1, 1, 1, 1)
        return (x - x0) / sigma

    noise = torch.randn_like(x0)
    out = flow.euler_sample(exact_velocity, noise, num_steps=7, shift=5.0)
    assert torch.allclose(out, x0, atol=1e-5)
    # a wrong velocity does not (the test can fail)
    out_wrong = flow.euler_sample(lambda x, t: torch.zeros_like(x), noise, num_steps=7)
    assert not torch.allclose(out_wrong, x0, atol=1e-2)
