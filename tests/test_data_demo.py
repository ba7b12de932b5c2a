"""The demo recording: Unreal format, parses to exactly its actions, and the actions drive the motion; and the demo's random base model."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import convert_unreal_data as data
import finetune_base_model as fb
from conftest import data_settings, demo_settings
from demo_world.recording import DEMO_MAX_PITCH, demo_actions, is_current_demo_recording, write_demo_recording
from demo_world.setup import prepare_demo, write_demo_base_model
from demo_world.world import DemoCamera, render_demo_frame
from recordings.errors import DataError
from recordings.input_csv import CSV_NAME
from recordings.report import check_data
from wan.loading import load_base_model

H, W = 96, 176


def grey(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float32).mean(-1)


def shift(before: np.ndarray, after: np.ndarray, rows: slice, cols: slice, reach: int = 16) -> tuple[int, int]:
    """The integer (dy, dx) that best explains after[rows, cols] as before moved by (dy, dx)."""
    a, b = grey(before), grey(after)
    target = b[rows, cols]
    errors = {}
    for dy in range(-reach, reach + 1):
        for dx in range(-reach, reach + 1):
            source = a[rows.start - dy:rows.stop - dy, cols.start - dx:cols.stop - dx]
            errors[dy, dx] = np.abs(target - source).mean()
    return min(errors, key=errors.get)


def after_steps(camera: DemoCamera, action: tuple, steps: int = 4) -> DemoCamera:
    for _ in range(steps):
        camera = camera.step(*action)
    return camera


START = DemoCamera(x=1.0, z=-3.0, yaw=20.0)
LOWER_LEFT, LOWER_RIGHT = (slice(62, 80), slice(20, 70)), (slice(62, 80), slice(106, 156))
UPPER = (slice(20, 45), slice(30, 146))


def test_walking_forward_expands_the_view_and_back_contracts_it():
    before = render_demo_frame(START, H, W)
    forward = render_demo_frame(after_steps(START, ("W", 0, 0)), H, W)
    back = render_demo_frame(after_steps(START, ("S", 0, 0)), H, W)
    (dy_l, dx_l), (dy_r, dx_r) = shift(before, forward, *LOWER_LEFT), shift(before, forward, *LOWER_RIGHT)
    assert dx_l < 0 < dx_r and dy_l > 0 and dy_r > 0  # away from the centre, ground slides down
    (dy_l, dx_l), (dy_r, dx_r) = shift(before, back, *LOWER_LEFT), shift(before, back, *LOWER_RIGHT)
    assert dx_l > 0 > dx_r and dy_l < 0 and dy_r < 0


def test_strafing_shifts_the_view_sideways():
    before = render_demo_frame(START, H, W)
    right = shift(before, render_demo_frame(after_steps(START, ("D", 0, 0)), H, W), *LOWER_LEFT)
    left = shift(before, render_demo_frame(after_steps(START, ("A", 0, 0)), H, W), *LOWER_LEFT)
    assert right[1] < 0 < left[1] and abs(right[0]) <= 1 and abs(left[0]) <= 1


def test_mouse_turns_and_pitches_the_camera():
    before = render_demo_frame(START, H, W)
    turn_right = shift(before, render_demo_frame(after_steps(START, ("", 2.0, 0)), H, W), *UPPER)
    turn_left = shift(before, render_demo_frame(after_steps(START, ("", -2.0, 0)), H, W), *UPPER)
    look_up = shift(before, render_demo_frame(after_steps(START, ("", 0, 1.0)), H, W), *UPPER)
    # 8 degrees of yaw is about 8/57.3 * focal (83 px) = 11.6 px; 4 degrees of pitch about 5.8 px.
    assert turn_right[1] in range(-13, -9) and turn_left[1] in range(10, 14)
    assert look_up[0] in range(4, 8) and abs(look_up[1]) <= 1


def test_idle_frames_do_not_move():
    assert np.array_equal(render_demo_frame(START, H, W), render_demo_frame(after_steps(START, ("", 0, 0)), H, W))


def test_script_mixes_actions_and_is_seeded():
    actions = demo_actions(300, seed=0)
    assert actions == demo_actions(300, seed=0) and actions != demo_actions(300, seed=1)
    keys = {k for k, _, _ in actions}
    assert {"W", "S", "A", "D", ""} <= keys and any(len(k) == 2 for k in keys)
    assert any(x != 0 for _, x, _ in actions) and any(y != 0 for _, _, y in actions)
    assert all(abs(x) <= 3 and abs(y) <= 1 for _, x, y in actions)
    camera = DemoCamera()
    for action in actions:
        camera = camera.step(*action)
        assert abs(camera.pitch) <= DEMO_MAX_PITCH + 1e-9


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("demo") / "recording"
    actions = write_demo_recording(folder, num_frames=100, height=H, width=W, seed=0)
    return folder, actions


def test_demo_recording_is_an_ordinary_folder(tmp_path):
    mask = os.umask(0o022)
    try:
        folder = tmp_path / "demo"
        write_demo_recording(folder, num_frames=2, height=H, width=W)
    finally:
        os.umask(mask)
    assert folder.stat().st_mode & 0o777 == 0o755


def test_demo_is_in_the_unreal_format(demo_dir):
    folder, actions = demo_dir
    lines = (folder / "input.csv").read_text().splitlines()
    assert lines[0] == "key,time,frame,mouse_x,mouse_y" and len(lines) == 101
    assert lines[1] == f"{actions[0][0] or '='},0.00,1,{actions[0][1]:.2f},{actions[0][2]:.2f}"
    assert lines[26].split(",")[1:3] == ["1.00", "26"]  # 25 fps
    assert sorted(p.name for p in folder.iterdir())[:2] == ["frame_0001.png", "frame_0002.png"]
    assert Image.open(folder / "frame_0100.png").size == (W, H)


def test_demo_parses_to_exactly_its_actions(demo_dir):
    folder, actions = demo_dir
    report = check_data(folder, data_settings(sequence_length=17), decode_frames=True)
    assert not report.problems and not report.recordings[0].unmapped_keys
    (recording,) = report.recordings
    expected_keys = np.array([[k in keys for k in data.KEYBOARD_KEYS] for keys, _, _ in actions], np.float32)
    np.testing.assert_array_equal(recording.keyboard, expected_keys)
    np.testing.assert_array_equal(recording.mouse_raw, np.array([[x, y] for _, x, y in actions], np.float32))
    scaled = np.array([[y * data.MOUSE_SCALE, x * data.MOUSE_SCALE] for _, x, y in actions], np.float32)
    np.testing.assert_allclose(recording.mouse, scaled, rtol=1e-6)
    assert np.abs(recording.mouse).max() <= 0.15  # the base model's turns are about 0.1 per frame
    assert report.recordings[0].frames_without_row == 0 and len(report.clips) == 11


def frame_before_run(actions, wanted, steps: int = 4) -> int:
    """The frame f after which rows f+1 .. f+steps all hold an action for which wanted(action)."""
    for f in range(1, len(actions) - steps + 1):
        run = actions[f:f + steps]
        if len(set(run)) == 1 and wanted(run[0]):
            return f
    raise AssertionError("the demo script has no such run")


def test_demo_frames_follow_the_recorded_actions(demo_dir):
    folder, actions = demo_dir

    def frame(f):
        return np.asarray(Image.open(folder / f"frame_{f:04d}.png"))

    f = frame_before_run(actions, lambda a: a == ("W", 0.0, 0.0))
    (_, dx_l), (_, dx_r) = shift(frame(f), frame(f + 4), *LOWER_LEFT), shift(frame(f), frame(f + 4), *LOWER_RIGHT)
    assert dx_l < 0 < dx_r  # walking forward: the view expands
    f = frame_before_run(actions, lambda a: a[0] == "" and a[1] == 0 and a[2] != 0)
    dy, _ = shift(frame(f), frame(f + 4), *UPPER)
    assert np.sign(dy) == np.sign(actions[f][2]) and dy != 0  # looking up moves the view down


def test_demo_refuses_a_folder_in_use(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    with pytest.raises(DataError, match="not an empty folder"):
        write_demo_recording(tmp_path / "taken", num_frames=2, height=16, width=32)
    with pytest.raises(DataError, match="multiples of 16"):
        write_demo_recording(tmp_path / "new", num_frames=2, height=20, width=32)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine" and not (tmp_path / "new").exists()


def test_demo_cli(tmp_path, capsys):
    assert data.main(["--demo", str(tmp_path / "d"), "--frames", "12", "--height", "32", "--width", "64",
                      "--seed", "3"]) == 0
    assert "wrote 12 frames of 64x32" in capsys.readouterr().out
    assert data.main([str(tmp_path / "d"), "--SEQUENCE_LENGTH=9"]) == 0
    assert "Problems: none" in capsys.readouterr().out


def test_demo_base_model_has_the_asked_size_and_random_weights(tmp_path):
    """write_demo_base_model: a loadable model of the requested widths, seeded by torch's generator."""
    size = dict(dim=32, num_layers=1, num_heads=2, ffn_dim=64)
    for name in ("a", "b"):
        torch.manual_seed(7)
        write_demo_base_model(tmp_path / name, 4, size)
    torch.manual_seed(8)
    write_demo_base_model(tmp_path / "c", 4, size)
    a, b, c = (load_base_model(tmp_path / name)[0] for name in ("a", "b", "c"))
    assert (a.config.dim, a.config.num_layers, a.config.num_heads, a.config.ffn_dim) == (32, 1, 2, 64)
    assert a.config.action_config.keyboard_dim_in == 4
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert not torch.equal(a.state_dict()["head.head.weight"], c.state_dict()["head.head.weight"])
    assert a.state_dict()["head.head.weight"].abs().min() > 0  # no zero output layer: any strategy can learn


def test_demo_recognises_its_own_recording(demo_dir):
    folder, _ = demo_dir
    assert is_current_demo_recording(folder, 100)
    assert not is_current_demo_recording(folder, 99)  # another length is another script's output
    assert not is_current_demo_recording(folder.parent / "nothing_here", 100)


def stale_demo_recording(data_dir, num_frames: int) -> None:
    """A recording in data_dir whose input.csv is not the current script's (one mouse value changed)."""
    write_demo_recording(data_dir, num_frames, height=32, width=64)
    csv = data_dir / CSV_NAME
    lines = csv.read_text(encoding="utf-8").splitlines(keepends=True)
    lines[1] = lines[1].rsplit(",", 1)[0] + ",0.77\n"
    csv.write_text("".join(lines), encoding="utf-8")


def test_demo_refuses_an_older_recording_outside_its_own_folder(tmp_path):
    settings = demo_settings(tmp_path / "run", "--VIDEO_HEIGHT=32", "--VIDEO_WIDTH=64")
    stale_demo_recording(Path(settings["DATA_DIR"]), 12)
    before = (Path(settings["DATA_DIR"]) / CSV_NAME).read_text(encoding="utf-8")
    with pytest.raises(DataError, match=f"{CSV_NAME}: not the demo recording this version writes"):
        prepare_demo(settings, num_frames=12)
    assert (Path(settings["DATA_DIR"]) / CSV_NAME).read_text(encoding="utf-8") == before  # untouched


def test_demo_renders_an_older_recording_in_its_own_folder_again(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # the demo's own relative folders, under tmp_path
    settings, _ = fb.parse_settings(["--demo", "--VIDEO_HEIGHT=32", "--VIDEO_WIDTH=64"])
    data_dir = Path(settings["DATA_DIR"])
    stale_demo_recording(data_dir, 12)
    prepare_demo(settings, num_frames=12)
    assert "older demo script; rendering it again" in capsys.readouterr().out
    assert is_current_demo_recording(data_dir, 12) and len(list(data_dir.glob("frame_*.png"))) == 12


def test_a_deck_of_turns_only_turns_where_it_stands():
    actions = demo_actions(300, seed=0, runs=("turn",))
    assert all(keys == "" and y == 0 and 1 <= abs(x) <= 3 for keys, x, y in actions)
    assert {x > 0 for _, x, _ in actions} == {True, False}  # both ways
    assert actions != demo_actions(300, seed=0)


def test_a_recording_of_another_deck_is_not_the_demo_recording(tmp_path):
    folder = tmp_path / "turns"
    write_demo_recording(folder, 20, height=32, width=64, runs=("turn",))
    assert is_current_demo_recording(folder, 20, runs=("turn",))
    assert not is_current_demo_recording(folder, 20)
