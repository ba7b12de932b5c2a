"""The end-to-end proof's scoring and its reuse of trained folders (bench/bench_play_proof.py),
on tiny synthetic frames: no training, no timing."""

import sys

import torch
import torch.nn.functional as F

from conftest import REPO_ROOT

sys.path.insert(0, str(REPO_ROOT / "bench"))
import bench_play_proof as proof  # noqa: E402

KEYS = ("W", "S", "A", "D")


def panning(frames: int, step: int) -> torch.Tensor:
    """A smooth random picture [T, 3, 64, 112] whose content moves `step` pixels per frame
    along x (negative: to the left, as a camera turning right sees it)."""
    generator = torch.Generator().manual_seed(0)
    texture = F.interpolate(torch.rand(1, 3, 16, 28, generator=generator), size=(64, 112), mode="bicubic",
                            align_corners=False)[0] * 2 - 1
    return torch.stack([torch.roll(texture, step * t, dims=-1) for t in range(frames)])


def turning(frames: int, yaw: float) -> tuple[torch.Tensor, torch.Tensor]:
    mouse = torch.zeros(frames, 2)
    mouse[:, 1] = yaw
    return torch.zeros(frames, len(KEYS)), mouse


def test_a_stream_that_turns_as_told_scores_high_with_its_own_actions_and_low_with_the_mirrored_ones():
    frames = panning(9, -2)  # content to the left: the camera turns right (yaw > 0)
    scores = proof.follow_scores(frames, turning(9, 0.6), turning(9, -0.6), KEYS)
    assert scores["true"] > 0.9 and scores["other"] < 0.1
    assert scores["true4"] > 0.9 and scores["other4"] < 0.1  # every 4th frame: 8 px per pair, same sign
    assert 1.5 < scores["px"] < 2.5


def test_a_still_stream_follows_neither():
    frames = panning(9, 0)
    scores = proof.follow_scores(frames, turning(9, 0.6), turning(9, -0.6), KEYS)
    assert scores["true"] == 0 and scores["other"] == 0 and scores["px"] < 0.2


def test_a_trained_folder_is_reused_only_with_the_settings_that_made_it(tmp_path):
    settings = {"epochs": 150, "model": {"dim": 128}, "deck": ("turn",)}
    assert not proof.reusable(tmp_path, settings)
    proof.mark(tmp_path, settings, 12.5)
    assert proof.reusable(tmp_path, settings)
    assert not proof.reusable(tmp_path, {**settings, "epochs": 200})
    assert proof.settings_key(settings) != proof.settings_key({**settings, "epochs": 200})
