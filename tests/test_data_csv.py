"""input.csv: every variant real exporters write, key names, and every error naming file:line."""

import warnings

import numpy as np
import pytest
from PIL import Image

import convert_unreal_data as data
from conftest import data_settings
from recordings.errors import DataError
from recordings.input_csv import KeyParser, parse_input_csv
from recordings.recording import load_recording
from recordings.report import check_data


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
    # what other recorders write (issue 29): each read without a setting
    "semicolons": b"key;time;frame\nW;0.00;1\nWA;0.04;2\n=;0.08;3\nD;0.12;4\n",
    "semicolons, decimal commas, quotes": b'key;time;frame\n"W";0,00;1\n"W;A";0,04;2\n"";0,08;3\nD;0,12;4\n',
    "tabs": PLAIN.replace(",", "\t").encode(),
    "pipes, CR line ends": ("key|time|frame\r" + PLAIN.replace(",", "|").replace("\n", "\r")).encode(),
    "quoted separators": b'key,time,frame\n"W",0.00,1\n"W,A",0.04,2\n"=",0.08,3\n"D",0.12,4\n',
    "UTF-16 with BOM": ("key,time,frame\r\n" + PLAIN.replace("\n", "\r\n")).encode("utf-16"),
    "other header names": ("Keys,Timestamp,FrameNumber\n" + PLAIN).encode(),
    "spaced header names": b"Frame Number , Pressed Keys\n1,W\n2,WA\n3,\n4,D\n",
    "extra columns": b"key,time,frame,jump,sprint\nW,0,1,0,1\nWA,0.04,2,1,0\n=,0.08,3,0,0\nD,0.12,4,,\n",
    "no time column": b"frame,key\n1,W\n2,WA\n3,=\n4,D\n",
    "rows out of order": b"key,time,frame\nWA,0.04,2\nW,0.00,1\nD,0.12,4\n=,0.08,3\n",
    "trailing separators": b"key,time,frame,\nW,0.00,1,\nWA,0.04,2,\n=,0.08,3,\nD,0.12,4,\n",
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
    "non-numeric frame": (b"key,time,frame\nW,0,1\nW,0.04,two\n", 3, "frame number 'two' is not a whole number"),
    "fractional frame": (b"W,0,1\nW,0.04,2.5\n", 2, "not a whole number from 0 to 1,000,000,000"),
    "negative frame": (b"W,0,-1\n", 1, "not a whole number"),
    "negative time": (b"W,0,1\nW,-0.04,2\n", 2, "negative time"),
    "non-numeric time": (b"W,0,1\nW,soon,2\n", 2, "time 'soon' is not a number"),
    "time backwards": (b"W,0.00,1\nW,0.08,2\nW,0.04,3\n", 3, "time goes backwards"),
    "disagreeing rows": (b"W,0,1\nW,0.04,2\nS,0.04,2\n", 3, "frame 2 already has a row at line 2"),
    "disagreeing mouse": (b"key,time,frame,mouse_x,mouse_y\nW,0,1,0,0\nW,0,1,1,0\n", 3, "already has a row at line 2"),
    "too few fields": (b"W,0,1\nW,0.04\n", 2, "2 fields, expected 3"),
    "mouse without header": (b"W,0,1,0.5,0.5\n", 1, "5 fields, expected 3 (key,time,frame) - if the last two are the "
                                                   "mouse, add the header line key,time,frame,mouse_x,mouse_y"),
    "bad mouse value": (b"key,time,frame,mouse_x,mouse_y\nW,0,1,left,0\n", 2, "frame 1: mouse_x,mouse_y 'left','0' "
                                                                            "are not finite numbers"),
    "one mouse column": (b"key,time,frame,mouse_x\nW,0,1,0\n", 1, "header 'key,time,frame,mouse_x' has a mouse_x "
                                                                  "column but no mouse_y"),
    "no rows": (b"key,time,frame\r\n\r\n", 1, "no rows"),
    "no key column": (b"Buttons,time,frame\nW,0,1\n", 1, "has no key column: name yours in CSV_COLUMNS"),
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


# --- layouts other recorders write: what the report says, and the settings that adapt them ---

def test_the_layout_read_is_described(tmp_path):
    def layout(text, frames=range(1, 5), **changes):
        folder = write_recording(tmp_path / f"r{len(list(tmp_path.iterdir()))}", text, frames=frames)
        return load_recording(folder, tmp_path, data_settings(**changes)).csv_layout

    assert layout(VARIANTS["header"]) == "header key,time,frame; ',' separated; UTF-8"
    assert layout(VARIANTS["BOM headerless CRLF"]) == "no header, key,time,frame; ',' separated; UTF-8 with BOM"
    assert layout(VARIANTS["other header names"]) == ("header Keys,Timestamp,FrameNumber read as key=Keys, "
                                                      "time=Timestamp, frame=FrameNumber (recognised by name); "
                                                      "',' separated; UTF-8")
    assert layout(VARIANTS["extra columns"]) == ("header key,time,frame,jump,sprint; ignored columns: jump, sprint; "
                                                 "',' separated; UTF-8")
    assert layout(VARIANTS["semicolons, decimal commas, quotes"]) == \
        "header key,time,frame; ';' separated; decimal commas; UTF-8"
    assert "UTF-16 with BOM" in layout(VARIANTS["UTF-16 with BOM"])


def test_other_header_names_need_csv_columns_only_when_they_are_not_the_usual_ones(tmp_path):
    text = b"Buttons,T,Idx,Yaw,Pitch\nW,0,1,2.0,-1.0\nWA,0.04,2,0,0.5\n"
    folder = write_recording(tmp_path / "r", text, frames=(1, 2))
    with pytest.raises(DataError) as error:
        load_recording(folder, tmp_path, data_settings())
    (message,) = error.value.problems
    assert message.startswith(f"{folder / 'input.csv'}:1: the header 'Buttons,T,Idx,Yaw,Pitch' has no key or frame "
                              "column: name yours in CSV_COLUMNS")
    mapping = {"key": "buttons", "time": "T", "frame": "IDX", "mouse_x": "Yaw", "mouse_y": "Pitch"}
    recording = load_recording(folder, tmp_path, data_settings(csv_columns=mapping))
    assert [keys_of(recording, f) for f in (1, 2)] == ["W", "WA"]
    np.testing.assert_array_equal(recording.mouse_raw, [[2.0, -1.0], [0.0, 0.5]])
    assert "read as key=Buttons, time=T, frame=Idx, mouse_x=Yaw, mouse_y=Pitch (CSV_COLUMNS)" in recording.csv_layout
    # a name the header lacks, or one it has twice, is named with the header
    with pytest.raises(DataError, match=r":1: CSV_COLUMNS maps frame to 'framenumber', but the header has no such "
                                        r"column: Buttons,T,Idx,Yaw,Pitch"):
        load_recording(folder, tmp_path, data_settings(csv_columns={**mapping, "frame": "FrameNumber"}))
    twice = write_recording(tmp_path / "twice", b"Keys,Time,Frame,Timestamp\nW,0,1,0\n", frames=(1,))
    with pytest.raises(DataError, match=r"the header's columns 'Time', 'Timestamp' could each be time: say which in "
                                        r"CSV_COLUMNS, e.g. CSV_COLUMNS = \{'time': 'Time'\}"):
        load_recording(twice, tmp_path, data_settings())
    assert keys_of(load_recording(twice, tmp_path, data_settings(csv_columns={"time": "Timestamp"})), 1) == "W"


def test_a_headerless_file_maps_by_column_number(tmp_path):
    folder = write_recording(tmp_path / "r", b"1,W,0,2.0,-1.0\n2,WA,0.04,0,0.5\n", frames=(1, 2))
    mapping = {"frame": 1, "key": 2, "time": 3, "mouse_x": 4, "mouse_y": 5}
    recording = load_recording(folder, tmp_path, data_settings(csv_columns=mapping))
    assert [keys_of(recording, f) for f in (1, 2)] == ["W", "WA"]
    np.testing.assert_array_equal(recording.mouse_raw, [[2.0, -1.0], [0.0, 0.5]])
    assert recording.csv_layout.startswith("no header, frame=column 1, key=column 2, time=column 3, mouse_x=column 4")
    with pytest.raises(DataError, match="CSV_COLUMNS names header columns \\('keys'\\), but this file has no header "
                                        "line \\(line 1 is data\\): map our columns to column numbers"):
        load_recording(folder, tmp_path, data_settings(csv_columns={"key": "Keys"}))


def test_frames_logged_twice_and_rows_out_of_order(tmp_path):
    text = b"key,time,frame\nW,0,1\nD,0.12,4\nWA,0.04,2\nAW,0.04,2\n=,0.08,3\nD,0.12,4\n"
    recording = load_recording(write_recording(tmp_path / "r", text), tmp_path, data_settings())
    assert [keys_of(recording, f) for f in (1, 2, 3, 4)] == ["W", "WA", "", "D"]
    assert recording.duplicate_lines == [5, 7] and recording.duplicate_rows == 2
    assert recording.out_of_order_lines == [4]  # each row whose frame comes before the row above it
    text = check_data(tmp_path, data_settings(sequence_length=1, clip_stride=1, val_fraction=0)).format()
    assert "Repeated identical CSV rows (used once): 2\n  r: input.csv lines 5, 7" in text
    assert "CSV rows out of frame order (sorted): 1\n  r: input.csv line 4" in text


def test_a_frame_logged_twice_with_different_values_names_both_lines(tmp_path):
    text = b"key,time,frame,mouse_x,mouse_y\nW,0,1,0,0\nW,0.04,2,0,0\nW,0.04,2,0.5,0\nS,0,1,0,0\n"
    with pytest.raises(DataError) as error:
        load_recording(write_recording(tmp_path / "r", text), tmp_path, data_settings())
    assert error.value.problems == [
        f"{tmp_path / 'r' / 'input.csv'}:4: frame 2 already has a row at line 3 that disagrees (keys W, mouse 0,0 "
        "there, keys W, mouse 0.5,0 here) (2 rows like this: lines 4, 5) - remove the wrong one of the two rows"]


# --- messages: one per kind of problem, with the count, the first lines and the fix ---

def test_a_problem_on_many_rows_is_one_message_with_its_count_first_lines_and_fix(tmp_path):
    rows = "".join(f"W,{f / 25:.2f},{f},0.1,0.2\n" for f in range(1, 21))  # mouse columns without a header
    folder = write_recording(tmp_path / "r", (rows + "W,0.84,21,x\nW,soon,22\n").encode(), frames=range(1, 23))
    with pytest.raises(DataError) as error:
        load_recording(folder, tmp_path, data_settings())
    path = folder / "input.csv"
    assert error.value.problems == [
        f"{path}:1: 5 fields, expected 3 (key,time,frame) (20 rows like this: lines 1, 2, 3, 4, 5, ...) - if the last "
        "two are the mouse, add the header line key,time,frame,mouse_x,mouse_y (or map mouse_x and mouse_y to "
        "columns 4 and 5 in CSV_COLUMNS)",
        f"{path}:21: 4 fields, expected 3 (key,time,frame) - fix the row, or check CSV_SEPARATOR (read as ',' "
        "separated)",
        f"{path}:22: time 'soon' is not a number - fix the row (time is in seconds), or name the time column in "
        "CSV_COLUMNS"]


def test_line_numbers_count_blank_lines_and_line_breaks_inside_quotes(tmp_path):
    text = b'key,time,frame\r\n\r\nW,0,1\r\n"W\r\nA",0.04,2\r\n\r\nW,0.08,x\r\n'
    with pytest.raises(DataError, match=r"input.csv:7: frame number 'x' is not a whole number"):
        load_recording(write_recording(tmp_path / "r", text, frames=(1, 2, 3)), tmp_path, data_settings())


def test_encodings_other_than_utf8_are_named_with_the_setting_that_reads_them(tmp_path):
    latin = write_recording(tmp_path / "latin", "key,time,frame\nW,0,1\nWÉ,0.04,2\n".encode("cp1252"), frames=(1, 2))
    with pytest.raises(DataError, match=r"input.csv:3: not UTF-8 text \(byte 0xc9 at offset 22\) - save the file as "
                                        r"UTF-8, or set CSV_ENCODING to its encoding \(e.g. 'cp1252'"):
        load_recording(latin, tmp_path, data_settings())
    recording = load_recording(latin, tmp_path, data_settings(csv_encoding="cp1252"))
    assert recording.unmapped_keys == {"É": 1} and recording.csv_layout.endswith("; cp1252")
    utf16 = write_recording(tmp_path / "utf16", "key,time,frame\nW,0,1\n".encode("utf-16-le"), frames=(1,))
    with pytest.raises(DataError, match=r"set CSV_ENCODING to its encoding \('utf-16-le' or 'utf-16-be' for UTF-16 "
                                        r"without a BOM\)"):
        load_recording(utf16, tmp_path, data_settings())
    assert keys_of(load_recording(utf16, tmp_path, data_settings(csv_encoding="utf-16-le")), 1) == "W"


def test_csv_separator_names_the_separator_when_detection_would_guess_wrong(tmp_path):
    # one column of keys written 'W,A' without quotes in a ';' file: ',' splits it too
    text = b"W,A;0;1\nW;0.04;2\n"
    folder = write_recording(tmp_path / "r", text, frames=(1, 2))
    assert [keys_of(load_recording(folder, tmp_path, data_settings(csv_separator=";")), f) for f in (1, 2)] == \
        ["WA", "W"]


# --- issue 27 (12): mouse values that are not finite in the model's float32 ---

@pytest.mark.parametrize("value,message", [
    ("1e300", "frame 3: mouse_x,mouse_y 1e300,0 overflow float32 (beyond 3.4e+38), the model's number type"),
    ("-1e39", "frame 3: mouse_x,mouse_y -1e39,0 overflow float32"),
    ("nan", "frame 3: mouse_x,mouse_y 'nan','0' are not finite numbers"),
    ("inf", "frame 3: mouse_x,mouse_y 'inf','0' are not finite numbers"),
    ("", "frame 3: mouse_x,mouse_y '','0' are not finite numbers"),
])
def test_a_mouse_value_that_is_not_a_finite_float32_is_named_with_file_line_and_frame(tmp_path, value, message):
    text = f"key,time,frame,mouse_x,mouse_y\nW,0,1,0,0\nW,0.04,2,0,0\nW,0.08,3,{value},0\n".encode()
    folder = write_recording(tmp_path / "r", text, frames=(1, 2, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no numpy overflow warning on the way
        report = check_data(tmp_path, data_settings(sequence_length=1, clip_stride=1))
    (problem,) = report.problems
    assert problem.startswith(f"{folder / 'input.csv'}:4: {message}")
    assert "Problems: 1" in report.format() and not report.recordings


def test_a_mouse_value_that_overflows_once_scaled_names_mouse_scale(tmp_path):
    text = b"key,time,frame,mouse_x,mouse_y\nW,0,1,0,0\nW,0.04,2,3e38,0\n"
    folder = write_recording(tmp_path / "r", text, frames=(1, 2))
    with pytest.raises(DataError, match=r"input.csv:3: frame 2: mouse 3e\+38,0 times MOUSE_SCALE=10 overflows float32 "
                                        r"- lower MOUSE_SCALE, or fix the rows"):
        load_recording(folder, tmp_path, data_settings(mouse_scale=10.0))
