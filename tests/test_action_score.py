import math

import pytest
import torch
import torch.nn.functional as F

from video.action_score import action_following_score, estimate_motion, mean_shift, phase_correlation

KEYS = ("W", "S", "A", "D")


def make_texture(height=512, width=768, seed=0) -> torch.Tensor:
    """A smooth multi-scale RGB texture in [-1, 1], [1, 3, H, W]."""
    generator = torch.Generator().manual_seed(seed)
    texture = sum(weight * F.interpolate(torch.randn(1, 3, height // scale, width // scale, generator=generator),
                                         size=(height, width), mode="bicubic", align_corners=False)
                  for weight, scale in [(1.0, 32), (0.6, 8), (0.3, 4)])
    return (texture / texture.abs().max()).clamp(-1, 1)


TEXTURE = make_texture()


def render(x: float, y: float, zoom: float, height=88, width=160) -> torch.Tensor:
    """The camera view centred on texture point (x, y), magnified by zoom: [3, height, width]."""
    tex_h, tex_w = TEXTURE.shape[-2:]
    u = (torch.arange(width, dtype=torch.float64) - (width - 1) / 2) / zoom + x
    v = (torch.arange(height, dtype=torch.float64) - (height - 1) / 2) / zoom + y
    grid_y, grid_x = torch.meshgrid((2 * v + 1) / tex_h - 1, (2 * u + 1) / tex_w - 1, indexing="ij")
    grid = torch.stack([grid_x, grid_y], -1).float()[None]
    return F.grid_sample(TEXTURE, grid, mode="bicubic", align_corners=False)[0].clamp(-1, 1)


def moved(dx: float, dy: float, zoom: float = 1.0, **size) -> torch.Tensor:
    """Two frames: the second has its content moved right by dx, down by dy, magnified by zoom."""
    x, y = 384.0, 256.0
    return torch.stack([render(x, y, 1.0, **size), render(x - dx, y - dy, zoom, **size)])


@pytest.mark.parametrize("dx,dy", [(3, -2), (-5.5, 4.25), (0.5, 0), (12, -7)])
def test_shift_estimate_and_sign(dx, dy):
    motion = estimate_motion(moved(dx, dy))
    assert motion["dx"].item() == pytest.approx(dx, abs=0.15)
    assert motion["dy"].item() == pytest.approx(dy, abs=0.15)
    assert motion["zoom"].item() == pytest.approx(1.0, abs=1e-3)


def test_shift_is_reported_in_input_pixels_after_downscaling():
    motion = estimate_motion(moved(-14, 6, height=352, width=640))  # analysed at 88x160
    assert motion["dx"].item() == pytest.approx(-14, abs=0.5)
    assert motion["dy"].item() == pytest.approx(6, abs=0.5)


@pytest.mark.parametrize("zoom", [1.03, 0.97, 1.01, 1.06])
def test_zoom_estimate_and_sign(zoom):
    motion = estimate_motion(moved(0, 0, zoom))
    assert motion["zoom"].item() == pytest.approx(zoom, abs=2e-3)
    assert abs(motion["dx"].item()) < 0.3 and abs(motion["dy"].item()) < 0.3


def test_zoom_and_shift_together():
    motion = estimate_motion(moved(4, -3, 1.02))
    assert motion["zoom"].item() == pytest.approx(1.02, abs=2e-3)
    assert motion["dx"].item() == pytest.approx(4, abs=0.3)
    assert motion["dy"].item() == pytest.approx(-3, abs=0.3)


def test_zoom_sign_survives_parallax():
    # Walking forward: the near ground (lower half) expands, the far scene (upper half) not.
    still, expanded = render(384.0, 256.0, 1.0), render(384.0, 256.0, 1.04)
    walked = still.clone()
    walked[:, 44:] = expanded[:, 44:]
    motion = estimate_motion(torch.stack([still, walked]))
    assert 1.005 < motion["zoom"].item() < 1.04
    assert abs(motion["dx"].item()) < 0.2


def test_phase_correlation_is_exact_for_circular_subpixel_shifts():
    image = TEXTURE[0, 0, :64, :96].double()
    fy = torch.fft.fftfreq(64, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(96, dtype=torch.float64)[None]
    shifted = torch.fft.ifft2(torch.fft.fft2(image) * torch.exp(-2j * math.pi * (fx * 1.3 + fy * -0.6))).real
    dx, dy, peak = phase_correlation(image, shifted)
    assert dx.item() == pytest.approx(1.3, abs=0.05) and dy.item() == pytest.approx(-0.6, abs=0.05)
    assert 0.3 < peak.item() <= 1.0


# --- the score ---------------------------------------------------------------------------

# Per frame, as the synthetic camera responds to them (matching the module's conventions).
STRAFE_PIXELS = 3.0
ZOOM_STEP = 1.03
MOUSE_PIXELS = 40.0  # pixels per unit of mouse yaw / pitch


def action_sequence() -> tuple[torch.Tensor, torch.Tensor]:
    segments = [("W", 0, 0, 8), ("A", 0, 0, 6), (None, 0, 0.1, 6), ("S", 0, 0, 6), ("D", 0, 0, 6),
                (None, 0, -0.05, 6), ("W", 0, 0.08, 5), (None, 0.1, 0, 5), (None, -0.1, 0, 5), (None, 0, 0, 4)]
    keyboard, mouse = [], []
    for key, pitch, yaw, frames in segments:
        for _ in range(frames):
            keyboard.append([float(key == k) for k in KEYS])
            mouse.append([pitch, yaw])
    return torch.tensor(keyboard), torch.tensor(mouse)


def play(keyboard: torch.Tensor, mouse: torch.Tensor) -> torch.Tensor:
    """Frames of a camera that obeys the actions; row t's action moves frame t-1 to frame t."""
    x, y, zoom, frames = 384.0, 256.0, 1.0, []
    for (w, s, a, d), (pitch, yaw) in zip(keyboard.tolist(), mouse.tolist()):
        if frames:
            zoom *= ZOOM_STEP ** (w - s)
            x += (STRAFE_PIXELS * (d - a) + MOUSE_PIXELS * yaw) / zoom
            y -= MOUSE_PIXELS * pitch / zoom
        frames.append(render(x, y, zoom))
    return torch.stack(frames) * 0.9


@pytest.fixture(scope="module")
def recording():
    keyboard, mouse = action_sequence()
    return play(keyboard, mouse), keyboard, mouse


def test_video_that_follows_its_actions_scores_high(recording):
    frames, keyboard, mouse = recording
    score = action_following_score(frames, keyboard, mouse, KEYS)
    for kind in ("forward_back", "strafe", "yaw", "pitch"):
        assert score[kind]["pairs"] >= 8, kind
        # Pairs where an action starts count it though the camera only moves from the next one.
        assert score[kind]["agree"] >= 0.85, (kind, score[kind])
        assert score[kind]["oppose"] == 0.0, (kind, score[kind])
    # The camera applies row t+1 while the score uses the mean of rows t and t+1 (robust to
    # a one-row offset), which halves the command at the segment boundaries.
    assert score["yaw"]["correlation"] > 0.85 and score["pitch"]["correlation"] > 0.85
    assert score["overall"] >= 0.9
    assert len(score["motion"]["dx"]) == frames.shape[0] - 1


def shuffled_rows(count: int, seed: int) -> torch.Tensor:
    return torch.randperm(count, generator=torch.Generator().manual_seed(seed))


def shuffled_blocks(count: int, seed: int, size: int = 4) -> torch.Tensor:
    blocks = torch.arange(count).split(size)
    return torch.cat([blocks[i] for i in torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))])


@pytest.mark.parametrize("shuffle", [shuffled_rows, shuffled_blocks])
def test_shuffled_actions_score_low(recording, shuffle):
    frames, keyboard, mouse = recording
    truth = action_following_score(frames, keyboard, mouse, KEYS)["overall"]
    for seed in range(3):
        order = shuffle(keyboard.shape[0], seed)
        score = action_following_score(frames, keyboard[order], mouse[order], KEYS)
        assert score["overall"] < 0.45 and score["overall"] < truth - 0.45, (seed, score["overall"])
        assert abs(score["yaw"]["correlation"]) < 0.6


def test_opposite_actions_score_opposed(recording):
    frames, keyboard, mouse = recording
    swapped = keyboard[:, [1, 0, 3, 2]]  # W<->S, A<->D
    score = action_following_score(frames, swapped, -mouse, KEYS)
    assert score["overall"] < 0.1
    for kind in ("forward_back", "strafe", "yaw", "pitch"):
        assert score[kind]["oppose"] >= 0.85, (kind, score[kind])
    assert score["yaw"]["correlation"] < -0.85 and score["pitch"]["correlation"] < -0.85


def test_static_video_scores_zero(recording):
    _, keyboard, mouse = recording
    frames = render(384.0, 256.0, 1.0).expand(keyboard.shape[0], -1, -1, -1)
    score = action_following_score(frames, keyboard, mouse, KEYS)
    assert score["overall"] == 0.0
    assert score["yaw"]["correlation"] is None  # no measured motion to correlate


def test_mean_shift_is_the_mean_distance_moved_per_pair():
    frames = torch.stack([render(384.0 - 3 * t, 256.0 - 4 * t, 1.0) for t in range(4)])  # 5 px per frame
    assert mean_shift(estimate_motion(frames)) == pytest.approx(5.0, abs=0.2)
    still = render(384.0, 256.0, 1.0).expand(4, -1, -1, -1)
    assert mean_shift(estimate_motion(still)) < 0.05
    assert mean_shift({"dx": [3.0, 0.0], "dy": [4.0, -1.0]}) == pytest.approx(3.0)  # a score's lists


def test_keys_are_found_by_name_and_absent_kinds_are_skipped():
    keyboard = torch.zeros(9, 6)
    keyboard[:, 4] = 1  # "D" in a six-key layout
    mouse = torch.zeros(9, 2)
    frames = play(torch.tensor([[0.0, 0, 0, 1]] * 9), mouse)
    score = action_following_score(frames, keyboard, mouse, ("W", "S", "A", "space", "D", "shift"))
    assert score["strafe"] == {"pairs": 8, "weight": 8.0, "agree": 1.0, "oppose": 0.0}
    assert score["forward_back"]["pairs"] == 0 and score["forward_back"]["agree"] is None
    assert score["overall"] == 1.0


def test_bad_inputs_are_rejected():
    frames = torch.zeros(5, 3, 64, 64)
    with pytest.raises(ValueError, match=r"keyboard must be \[T=5, K=4\]"):
        action_following_score(frames, torch.zeros(4, 4), torch.zeros(5, 2))
    with pytest.raises(ValueError, match=r"mouse must be \[T=5, 2\]"):
        action_following_score(frames, torch.zeros(5, 4), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="T >= 2"):
        estimate_motion(torch.zeros(1, 3, 64, 64))
    with pytest.raises(ValueError, match="too small"):
        estimate_motion(torch.zeros(2, 3, 8, 64))
