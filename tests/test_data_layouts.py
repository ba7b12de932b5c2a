"""Recordings as other recorders write them: dropped frames, frame numbering and naming
(FRAME_NAME, CSV_FRAME_OFFSET), the report's account of it, the settings' rules, playing
across a gap, and the resume check of a run whose frames are named otherwise."""

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import convert_unreal_data as data
import distill_streaming_model as ds
import finetune_base_model as fb
import play_world
from cli.settings import SETTING_RULES, check_ranges
from conftest import data_settings
from generation.errors import GenerationError
from recordings.errors import DataError
from recordings.recording import Segment, load_recording
from recordings.report import check_data
from runs.errors import TrainingError
from runs.folder import RunFolder

KEYS = ("W", "S", "A", "D")


def write_recording(folder: Path, files, rows, name="frame_{:04d}.png", mouse=False) -> Path:
    """files: the frame numbers written as images (their red channel is the number); rows: the
    CSV's frame numbers, whose key is KEYS[frame % 4] (so a misaligned row shows)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in files:
        Image.new("RGB", (64, 32), (n % 256, 0, 0)).save(folder / name.format(n))
    header = "key,time,frame" + (",mouse_x,mouse_y" if mouse else "")
    (folder / "input.csv").write_text(header + "\n" + "".join(
        f"{KEYS[f % 4]},{i / 25:.2f},{f}" + (f",{f / 10},0" if mouse else "") + "\n" for i, f in enumerate(rows)))
    return folder


def held(recording, frame) -> str:
    return "".join(k for k, on in zip(KEYS, recording.keyboard[recording.rows([frame])[0]]) if on)


# ----------------------------------------------------------------------------- dropped frames

def test_dropped_frames_with_their_rows_left_in_place_are_gaps(tmp_path):
    files = [f for f in range(1, 61) if not 30 <= f <= 35]
    write_recording(tmp_path / "take", files, rows=range(1, 61), mouse=True)
    report = check_data(tmp_path, data_settings(sequence_length=9, clip_stride=4, val_fraction=0))
    assert not report.problems
    (recording,) = report.recordings
    assert recording.segments == [Segment(1, 29), Segment(36, 60)]
    assert recording.dropped_frames == {f: f + 1 for f in range(30, 36)}  # frame -> its CSV line
    assert recording.missing_ranges() == [(30, 35)] and recording.frames_without_row == 0
    assert all(clip.last_frame < 30 or clip.first_frame > 35 for clip in report.clips)
    assert [held(recording, f) for f in (29, 36, 37)] == [KEYS[29 % 4], KEYS[36 % 4], KEYS[37 % 4]]
    assert recording.mouse_raw[recording.rows([36])[0], 0] == np.float32(3.6)
    text = report.format()
    assert "Gaps: 1 (6 frame numbers missing or unreadable; clips never span one)\n  take: frames 30-35" in text
    assert "Dropped frames (input.csv rows without a frame file; gaps): 6 in 1 range(s)\n" \
           "  take: frames 30-35 (input.csv lines 31-36)" in text
    # the rows of a recorder that drops frames at the start and the end are gaps too
    write_recording(tmp_path / "ends", range(3, 9), rows=range(1, 11))
    ends = load_recording(tmp_path / "ends", tmp_path, data_settings())
    assert ends.segments == [Segment(3, 8)] and ends.dropped_ranges() == [(1, 2), (9, 10)]


def test_a_csv_whose_rows_match_no_frame_file_is_refused_with_the_fix(tmp_path):
    write_recording(tmp_path / "r", range(1, 11), rows=range(1001, 1011))
    with pytest.raises(DataError) as error:
        load_recording(tmp_path / "r", tmp_path, data_settings())
    (message,) = error.value.problems
    assert message == (f"{tmp_path / 'r' / 'input.csv'}: none of its 10 rows (frames 1001..1010) has a frame file; "
                       "the files are frame_*.png 1..10 (10) - if the CSV counts frames differently, set "
                       "CSV_FRAME_OFFSET=-1000; if these are not the frames, check FRAME_NAME")
    recording = load_recording(tmp_path / "r", tmp_path, data_settings(csv_frame_offset=-1000))
    assert held(recording, 1) == KEYS[1001 % 4] and not recording.dropped_frames


# ----------------------------------------------------------------------------- numbering and naming

def test_frames_numbered_from_0(tmp_path):
    write_recording(tmp_path / "r", range(0, 20), rows=range(0, 20))
    report = check_data(tmp_path, data_settings(sequence_length=5, clip_stride=5, val_fraction=0))
    assert not report.problems
    (recording,) = report.recordings
    assert recording.segments == [Segment(0, 19)] and not recording.missing_ranges()
    assert [c.first_frame for c in report.clips] == [0, 5, 10, 15]
    assert held(recording, 0) == KEYS[0] and report.clips[0].frame_paths[0].endswith("frame_0000.png")
    assert "frame files: frame_*.png numbered from 0, 4 digits - 1 recording(s): r" in report.format()


def test_a_csv_counting_from_0_beside_files_from_1_is_pointed_out_and_csv_frame_offset_aligns_it(tmp_path):
    write_recording(tmp_path / "r", range(1, 21), rows=range(0, 20))
    report = check_data(tmp_path, data_settings(sequence_length=5, clip_stride=5, val_fraction=0))
    assert "Check: 1\n  r: input.csv counts frames 0..19, the files 1..20: the same count, shifted by 1. If its " \
           "first row is the first file, set CSV_FRAME_OFFSET=1" in report.format()
    shifted = load_recording(tmp_path / "r", tmp_path, data_settings(csv_frame_offset=1))
    assert [held(shifted, f) for f in (1, 2)] == [KEYS[0], KEYS[1]]  # file 1 has the CSV's row 0
    assert not shifted.dropped_frames and not shifted.notes and shifted.frames_without_row == 0


@pytest.mark.parametrize("pattern,name,found", [
    ("shot.%05d.png", "shot.{:05d}.png", "shot.*.png numbered from 1, 5 digits"),
    ("Take3_####.PNG", "take3_{:03d}.png", "Take3_*.PNG numbered from 1, 3 digits"),
    ("%d.png", "{}.png", "*.png numbered from 1, no padding"),
])
def test_frame_name_reads_other_file_names(tmp_path, pattern, name, found):
    write_recording(tmp_path / "r", range(1, 13), rows=range(1, 13), name=name)
    Image.new("RGB", (64, 32)).save(tmp_path / "r" / "thumbnail.png")
    with pytest.raises(DataError, match=r"r: input.csv but no frame files named frame_\*.png \(FRAME_NAME="
                                        r"'frame_%04d.png'\); image files here: .* - if these are the frames, set "
                                        r"FRAME_NAME="):
        check_data(tmp_path, data_settings(sequence_length=5)).raise_for_problems()
    report = check_data(tmp_path, data_settings(sequence_length=5, frame_name=pattern, val_fraction=0))
    assert not report.problems
    (recording,) = report.recordings
    assert recording.segments == [Segment(1, 12)] and held(recording, 5) == KEYS[1]
    text = report.format()
    assert f"frame files: {found} - 1 recording(s): r" in text
    assert "Ignored image files (not named like FRAME_NAME): 1\n  r/thumbnail.png" in text


def test_the_missing_frame_name_suggests_the_pattern_of_the_files_found(tmp_path):
    write_recording(tmp_path / "r", range(1, 5), rows=range(1, 5), name="shot.{:05d}.png")
    report = check_data(tmp_path, data_settings(sequence_length=1, clip_stride=1))
    assert report.problems[0].endswith("image files here: shot.00001.png, shot.00002.png, shot.00003.png ... - if "
                                       "these are the frames, set FRAME_NAME='shot.%05d.png'")


@pytest.mark.parametrize("pattern", ["../frame_%04d.png", "/tmp/frame_%04d.png", "frames/f_%d.png", "..\\f_%d.png",
                                     "~f%d.png"])
def test_a_frame_name_that_is_a_path_is_refused_by_name(tmp_path, pattern):
    write_recording(tmp_path / "r", range(1, 5), rows=range(1, 5))
    expected = f"FRAME_NAME={pattern!r}: must be a file name inside the recording's folder, not a path"
    with pytest.raises(DataError, match=re.escape(expected)):
        check_data(tmp_path, data_settings(frame_name=pattern))
    assert check_ranges({"FRAME_NAME": pattern})[0].startswith(f"FRAME_NAME={pattern!r}: must be a file name inside")


@pytest.mark.parametrize("name,value,expected", [
    ("FRAME_NAME", "frame.png", "must hold exactly one frame-number placeholder (%d, %04d or ####), found 0"),
    ("FRAME_NAME", "f%d_%d.png", "found 2"),
    ("FRAME_NAME", "x" * 300 + "%d", "at most 255 characters"),
    ("CSV_COLUMNS", {"keys": "Keys"}, "names 'keys', which is not one of our columns"),
    ("CSV_COLUMNS", {"key": 0}, "maps 'key' to column 0: column numbers run from 1 to 256"),
    ("CSV_COLUMNS", {"key": "A", "frame": "a"}, "maps two of our columns to the same CSV column"),
    ("CSV_COLUMNS", ["key"], "must be a dict from our column names"),
    ("CSV_SEPARATOR", ":", "must be one of 'auto' (detected), ',', ';', 'tab' or '|'"),
    ("CSV_ENCODING", "klingon", "must be 'auto' (UTF-8 with or without a BOM, UTF-16 with a BOM) or a Python text"),
    ("CSV_ENCODING", "base64", "or a Python text encoding"),
    ("CSV_FRAME_OFFSET", 10**10, "must be a whole number from -1,000,000,000 to 1,000,000,000"),
    ("CSV_FRAME_OFFSET", 1.5, "must be a whole number"),
])
def test_every_layout_setting_has_a_rule(name, value, expected):
    (problem,) = check_ranges({name: value})
    assert problem.startswith(f"{name}={value!r}: ") and expected in problem
    with pytest.raises(DataError, match=name):
        data_settings(**{name.lower(): value}).check_layout()


def test_the_defaults_pass_the_rules_and_every_layout_setting_is_in_the_rules():
    assert not check_ranges(data.SETTINGS.defaults)
    for name in ("FRAME_NAME", "CSV_COLUMNS", "CSV_SEPARATOR", "CSV_ENCODING", "CSV_FRAME_OFFSET"):
        assert name in SETTING_RULES and name in data.SETTINGS.names and data.SETTINGS.descriptions[name]
    assert not check_ranges({"CSV_SEPARATOR": "tab", "CSV_ENCODING": "cp1252", "CSV_FRAME_OFFSET": -1,
                             "FRAME_NAME": "shot.####.exr", "CSV_COLUMNS": {"key": "Keys", "frame": 3}})


# ----------------------------------------------------------------------------- playing across a gap

def play_settings(recording: Path, **changes) -> dict:
    s = dict(play_world.SETTINGS.defaults, RECORDING=str(recording), VIDEO_HEIGHT=32, VIDEO_WIDTH=64,
             KEYBOARD_KEYS=KEYS)
    s.update(changes)
    return s


def played_keyboard(actions) -> torch.Tensor:
    """The keyboard rows a headless run's blocks take, one after another."""
    return torch.cat([keyboard for keyboard, _ in actions.blocks(True)])


def test_headless_play_takes_the_rows_of_its_frames_across_dropped_frames(tmp_path):
    folder = write_recording(tmp_path / "take", [f for f in range(1, 61) if not 30 <= f <= 35], rows=range(1, 61))
    recording = load_recording(folder, None, data_settings())
    # one block of 3 latent frames shows 9 frames: from 40 they are frames 40-48, not rows 40-48 of the file list
    actions = play_world.headless_actions(play_settings(folder, START_FRAME=40, NUM_BLOCKS=1), KEYS)
    expected, _ = recording.actions(40, 9)
    keyboard = played_keyboard(actions)
    assert keyboard.numpy().tolist() == expected.tolist()
    assert keyboard[0].tolist() == [float(k == KEYS[40 % 4]) for k in KEYS]
    assert actions.truth(0, 1)[0, 0, 0, 0] == 40  # the frame shown beside it is frame 40's picture
    # up to the gap: the blocks that fit before it
    before = play_world.headless_actions(play_settings(folder, START_FRAME=20), KEYS)
    assert before.num_blocks == 1 and "frames 20-28" in before.description
    with pytest.raises(GenerationError, match=r"START_FRAME=32 needs frame 32, but its runs of consecutive frames are "
                                              r"1-29, 36-60 \(frame 32 was dropped by the recorder \(input.csv line 33 "
                                              r"has its row, but there is no frame file\)\)"):
        play_world.headless_actions(play_settings(folder, START_FRAME=32), KEYS)


def test_headless_play_starts_at_frame_0(tmp_path):
    folder = write_recording(tmp_path / "take", range(0, 12), rows=range(0, 12))
    actions = play_world.headless_actions(play_settings(folder, START_FRAME=0, NUM_BLOCKS=1), KEYS)
    assert played_keyboard(actions)[0].tolist() == [1.0, 0.0, 0.0, 0.0] and "frames 0-8" in actions.description
    assert play_world.check_settings(play_settings(folder, START_FRAME=0)) is None


# ----------------------------------------------------------------------------- resuming

def resumed_folder(tmp_path, saved_settings: dict) -> RunFolder:
    """A run folder as a resumed run sees it, with these saved settings (nothing else is read)."""
    folder = RunFolder.__new__(RunFolder)
    folder.resumed, folder.state_path = {"settings": saved_settings}, tmp_path / "training_state.pt"
    return folder


def test_frame_name_is_part_of_what_a_resumed_run_must_match(tmp_path, monkeypatch):
    assert "FRAME_NAME" in fb.RESUME_MUST_MATCH and "FRAME_NAME" in ds.RESUME_MUST_MATCH
    settings = fb.SETTINGS.defaults
    identity = fb.run_identity(settings, 4)
    assert identity["FRAME_NAME"] is None  # frame_<number>.png, as every run from before FRAME_NAME
    older = {name: value for name, value in identity.items() if name != "FRAME_NAME"}
    resumed_folder(tmp_path, older).check_same_run(identity, fb.RESUME_MUST_MATCH)
    monkeypatch.setattr(data, "FRAME_NAME", "frame_%06d.png")  # another padding: the same files
    assert fb.run_identity(settings, 4)["FRAME_NAME"] is None
    monkeypatch.setattr(data, "FRAME_NAME", "shot.%05d.png")  # other files: other pictures under the same clip ids
    other = fb.run_identity(settings, 4)
    assert other["FRAME_NAME"] == "shot.*.png"
    with pytest.raises(TrainingError, match=r"FRAME_NAME: None -> 'shot.\*.png'"):
        resumed_folder(tmp_path, older).check_same_run(other, fb.RESUME_MUST_MATCH)
