"""input.csv: every variant real exporters write, key names, and every error naming file:line."""

import numpy as np
import pytest
from PIL import Image

import convert_unreal_data as data
from conftest import data_settings
from recordings.errors import DataError
from recordings.input_csv import KeyParser, parse_input_csv
from recordings.recording import load_recording


def write_recording(folder, csv_bytes: bytes, frames=range(1, 5), size=(32, 16)):
    folder.mkdir(parents=True, exist_ok=True)
    for n in frames:
        Image.new("RGB", size, (n * 10 % 256, 0, 0)).save(folder / f"frame_{n:04d}.png")
    (folder / "input.csv").write_bytes(csv_bytes)
    return folder


def keys_of(recording, frame):
    return "".join(k for k, on in zip(data.KEYBOARD_KEYS, recording.keyboard[recording.rows([frame])[0]]) if on)


PLAIN = "W,0.00,1\nWA,0.04,2\n=,0.08,3\nD,0.12,4\n"
VARIANTS = {
    "headerless": PLAIN.encode(),
    "header": ("key,time,frame\n" + PLAIN).encode(),
    "upper-case header, lower-case keys": "KEY,TIME,FRAME\nw,0.00,1\naw,0.04,2\n,0.08,3\nd,0.12,4\n".encode(),
    "spaces": " W , 0.00 , 1\n W A ,0.04, 2\n = , 0.08 ,3\nD, 0.12,4 \n".encode(),
    "CRLF": PLAIN.replace("\n", "\r\n").encode(),
    "BOM": b"\xef\xbb\xbf" + ("key,time,frame\n" + PLAIN).encode(),
    "BOM headerless CRLF": b"\xef\xbb\xbf" + PLAIN.replace("\n", "\r\n").encode(),
    "blank lines, quotes": b'W,0.00,1\n\n"WA",0.04,2\n"",0.08,3\n\nD,0.12,4\n\n',
    "frame as 2.0, padded": b"W,0,0001\nWA,0.04,2.0\n=,0.08,3\nD,0.12,4\n",
    "reordered columns": b"frame,key,time\n1,W,0\n2,WA,0.04\n3,,0.08\n4,D,0.12\n",
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_csv_variants_parse_to_the_same_actions(tmp_path, variant):
    recording = load_recording(write_recording(tmp_path / "rec", VARIANTS[variant]), tmp_path, data_settings())
    assert [keys_of(recording, f) for f in (1, 2, 3, 4)] == ["W", "WA", "", "D"]
    assert recording.mouse_raw is None and not recording.mouse.any()
    assert recording.frames_without_row == 0 and not recording.unmapped_keys


def test_mouse_columns_become_scaled_pitch_and_yaw(tmp_path):
    text = b"key,time,frame,mouse_x,mouse_y\r\nW,0,1,2.0,-1.0\r\n=,0.04,2,0,0.5\r\n"
    recording = load_recording(write_recording(tmp_path / "r", text, frames=(1, 2)), tmp_path, data_settings(mouse_scale=0.05))
    np.testing.assert_array_equal(recording.mouse_raw, [[2.0, -1.0], [0.0, 0.5]])
    # Column 0 is pitch (mouse_y, positive looks up), column 1 yaw (mouse_x, positive turns right).
    np.testing.assert_allclose(recording.mouse, [[-0.05, 0.1], [0.025, 0.0]], rtol=1e-6)
    inverted = load_recording(tmp_path / "r", tmp_path, data_settings(mouse_scale=0.05, invert_mouse_y=True))
    np.testing.assert_allclose(inverted.mouse[:, 0], [0.05, -0.025], rtol=1e-6)


def test_key_order_follows_keyboard_keys(tmp_path):
    folder = write_recording(tmp_path / "r", b"SD,0,1\nWA,0.04,2\n", frames=(1, 2))
    recording = load_recording(folder, tmp_path, data_settings())
    np.testing.assert_array_equal(recording.keyboard, [[0, 1, 0, 1], [1, 0, 1, 0]])  # W, S, A, D
    six = load_recording(folder, tmp_path, data_settings(keyboard_keys=("W", "S", "A", "D", "SPACE", "SHIFT")))
    assert six.keyboard.shape == (2, 6)


def test_arrow_keys_map_case_insensitively():
    parser = KeyParser(data.KEYBOARD_KEYS, data.KEY_MAP)
    assert parser.parse("Up")[0] == {"W"}
    assert parser.parse("up+LEFT")[0] == {"W", "A"}
    assert parser.parse("DownRight")[0] == {"S", "D"}
    assert parser.parse("Down") == (frozenset({"S"}), ())  # not D, O, W, N


def test_multi_letter_key_names_are_single_keys():
    parser = KeyParser(data.KEYBOARD_KEYS, data.KEY_MAP)
    # 'Space' must not be read as S, P, A, C, E: two of those letters are our keys.
    assert parser.parse("WSpace") == (frozenset({"W"}), ("SPACE",))
    assert parser.parse("SpaceBarD") == (frozenset({"D"}), ("SPACEBAR",))
    assert parser.parse("leftshiftw") == (frozenset({"W"}), ("LEFTSHIFT",))
    assert parser.parse("WE") == (frozenset({"W"}), ("E",))
    assert parser.parse("=") == (frozenset(), ())
    sprint = KeyParser(data.KEYBOARD_KEYS, {**data.KEY_MAP, "Sprint": None})
    assert sprint.parse("SprintW") == (frozenset({"W"}), ("SPRINT",))


def test_key_map_must_target_keyboard_keys():
    with pytest.raises(DataError, match="KEY_MAP maps 'UP' to 'X'"):
        KeyParser(data.KEYBOARD_KEYS, {"UP": "X"})


def test_unmapped_keys_and_frames_without_rows_are_counted(tmp_path):
    text = b"key,time,frame\nW,0,1\nWSpace,0.04,2\nE,0.08,3\nWE,0.12,4\n"
    recording = load_recording(write_recording(tmp_path / "r", text, frames=range(1, 7)), tmp_path, data_settings())
    assert recording.unmapped_keys == {"SPACE": 1, "E": 2}
    assert "'WSpace' (input.csv line 3)" in recording.unmapped_examples["SPACE"]
    assert [keys_of(recording, f) for f in range(1, 7)] == ["W", "W", "", "W", "", ""]
    assert recording.frames_without_row == 2


def test_identical_duplicate_rows_are_counted_not_errors(tmp_path):
    text = b"W,0,1\nWA,0.04,2\nAW,0.04,2\n"
    recording = load_recording(write_recording(tmp_path / "r", text, frames=(1, 2)), tmp_path, data_settings())
    assert recording.duplicate_rows == 1 and keys_of(recording, 2) == "WA"


ERRORS = {
    "non-numeric frame": (b"key,time,frame\nW,0,1\nW,0.04,two\n", 3, "frame number 'two' is not a positive integer"),
    "fractional frame": (b"W,0,1\nW,0.04,2.5\n", 2, "not a positive integer"),
    "frame zero": (b"W,0,0\n", 1, "not a positive integer"),
    "negative time": (b"W,0,1\nW,-0.04,2\n", 2, "negative time"),
    "non-numeric time": (b"W,0,1\nW,soon,2\n", 2, "time 'soon' is not a number"),
    "time backwards": (b"W,0.00,1\nW,0.08,2\nW,0.04,3\n", 3, "time goes backwards"),
    "disagreeing rows": (b"W,0,1\nW,0.04,2\nS,0.04,2\n", 3, "frame 2 already has a row at line 2"),
    "disagreeing mouse": (b"key,time,frame,mouse_x,mouse_y\nW,0,1,0,0\nW,0,1,1,0\n", 3, "already has a row at line 2"),
    "too few fields": (b"W,0,1\nW,0.04\n", 2, "2 fields, expected 3"),
    "mouse without header": (b"W,0,1,0.5,0.5\n", 1, "mouse columns need a header line"),
    "bad mouse value": (b"key,time,frame,mouse_x,mouse_y\nW,0,1,left,0\n", 2, "are not numbers"),
    "unknown column": (b"key,time,frame,jump\nW,0,1,0\n", 1, "header"),
    "one mouse column": (b"key,time,frame,mouse_x\nW,0,1,0\n", 1, "header"),
    "no rows": (b"key,time,frame\r\n\r\n", 1, "no rows"),
    "row for a missing frame": (b"W,0,1\nW,0.04,2\nW,0.08,9\n", 3, "row for frame 9, but there is no frame_0009.png"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_every_csv_error_names_file_and_line(tmp_path, case):
    text, line, message = ERRORS[case]
    folder = write_recording(tmp_path / "rec", text, frames=(1, 2, 3))
    with pytest.raises(DataError) as error:
        load_recording(folder, tmp_path, data_settings())
    assert f"{folder / 'input.csv'}:{line}:" in str(error.value)
    assert message in str(error.value)


def test_all_problems_of_a_file_are_reported_together(tmp_path):
    text = b"W,0,1\nW,-1,2\nW,0.1,x\n"
    with pytest.raises(DataError) as error:
        parse_input_csv(write_recording(tmp_path / "r", text) / "input.csv", KeyParser(data.KEYBOARD_KEYS, data.KEY_MAP))
    assert len(error.value.problems) == 2
    assert ":2:" in error.value.problems[0] and ":3:" in error.value.problems[1]
