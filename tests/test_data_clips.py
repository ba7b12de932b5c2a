"""Frames, gaps, clips, the leak-free split, the Dataset (with workers), the report and the CLI."""

import pickle
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

import convert_unreal_data as data
from cli.settings import parse_overrides
from conftest import data_settings
from recordings.clips import ClipRef, RecordingClipDataset, index_clips, split_train_val
from recordings.errors import DataError
from recordings.frames import crop_box, load_frame, preprocess_image, to_model_range
from recordings.recording import Recording, Segment
from recordings.report import check_data

H, W = 32, 64  # tiny frames: multiples of 16


def frame_image(n: int, size=(W, H)) -> Image.Image:
    """A frame whose pixels encode its number, so a loaded clip can be checked frame by frame."""
    pixels = np.zeros((size[1], size[0], 3), np.uint8)
    pixels[..., 0] = n % 256
    pixels[..., 1] = np.arange(size[0], dtype=np.uint8)[None, :] * 3
    pixels[..., 2] = 200
    return Image.fromarray(pixels)


def write_recording(folder: Path, frames, rows=None, size=(W, H), padding=4) -> Path:
    """frames: frame numbers to write; rows: {frame: keys} for input.csv (default: W on every frame)."""
    folder.mkdir(parents=True, exist_ok=True)
    for n in frames:
        frame_image(n, size).save(folder / f"frame_{n:0{padding}d}.png")
    rows = {n: "W" for n in frames} if rows is None else rows
    text = "key,time,frame\n" + "".join(f"{k},{(f - 1) / 25:.2f},{f}\n" for f, k in sorted(rows.items()))
    (folder / "input.csv").write_text(text)
    return folder


def fake_recording(name: str, segments, keys: int = 4) -> Recording:
    """A Recording built in memory (paths need not exist until a clip is loaded)."""
    files = {f: Path(f"/nowhere/{name}/frame_{f:04d}.png") for s in segments for f in range(s.first, s.last + 1)}
    numbers = np.array(sorted(files), dtype=np.int64)
    keyboard = np.zeros((len(numbers), keys), np.float32)
    keyboard[np.arange(len(numbers)), (numbers - 1) % keys] = 1  # frame f holds key (f - 1) % keys
    return Recording(name=name, path=Path(name), frame_files=files, bad_frames={}, segments=list(segments),
                     frame_numbers=numbers, keyboard=keyboard, mouse=np.zeros((len(numbers), 2), np.float32),
                     mouse_raw=None,
                     frame_sizes=Counter(), frames_without_row=0, duplicate_rows=0, unmapped_keys=Counter(),
                     unmapped_examples={}, ignored_files=[])


# --- clip counts -------------------------------------------------------------

def test_1403_frames_give_49_clips():
    clips = index_clips([fake_recording("r", [Segment(1, 1403)])], 57, None)
    assert len(clips) == 49
    assert [c.first_frame for c in clips[:3]] == [1, 29, 57]
    assert clips[-1].last_frame == 48 * 28 + 57 == 1401  # the 2-frame tail is dropped
    assert all(c.num_frames == 57 and c.keyboard.shape == (57, 4) and c.mouse.shape == (57, 2) for c in clips)


@pytest.mark.parametrize("length, stride, frames, expected", [
    (57, None, 56, 0), (57, None, 57, 1), (57, None, 84, 1), (57, None, 85, 2),
    (33, None, 100, 5), (5, 5, 20, 4), (9, 20, 50, 3),
])
def test_clip_counts(length, stride, frames, expected):
    assert len(index_clips([fake_recording("r", [Segment(1, frames)])], length, stride)) == expected


def test_sequence_length_must_be_4k_plus_1(tmp_path):
    write_recording(tmp_path / "r", range(1, 10))
    with pytest.raises(DataError, match="4k\\+1"):
        check_data(tmp_path, data_settings(sequence_length=56))


def test_clip_tensors_are_the_recordings_rows():
    recording = fake_recording("r", [Segment(1, 30)])
    clip = index_clips([recording], 9, 4)[2]
    assert clip.first_frame == 9 and clip.clip_id == "r:9-17"
    np.testing.assert_array_equal(clip.keyboard.numpy(), recording.keyboard[8:17])
    assert clip.frame_paths[0].endswith("frame_0009.png") and clip.frame_paths[-1].endswith("frame_0017.png")


# --- gaps and bad frames -------------------------------------------------------

def test_gaps_split_segments_and_clips_never_span_them(tmp_path):
    frames = [*range(1, 21), *range(23, 41), *range(45, 50)]
    folder = write_recording(tmp_path / "rec", frames, padding=6)
    report = check_data(tmp_path, data_settings(sequence_length=5, clip_stride=2, val_fraction=0))
    assert not report.problems
    (recording,) = report.recordings
    assert recording.segments == [Segment(1, 20), Segment(23, 40), Segment(45, 49)]
    assert recording.missing_ranges() == [(21, 22), (41, 44)]
    assert len(report.clips) == 8 + 7 + 1
    for clip in report.clips:
        segment = recording.segments[clip.segment]
        assert segment.first <= clip.first_frame and clip.last_frame <= segment.last
    text = report.format()
    assert "Gaps: 2 (6 frame numbers missing" in text and "rec: frames 21-22" in text
    assert f"{folder.name}: 43 frames in 3 segment(s)" in text


def test_frames_without_rows_have_no_keys(tmp_path):
    write_recording(tmp_path / "r", range(1, 11), rows={1: "W", 2: "WA", 5: "D"})
    report = check_data(tmp_path, data_settings(sequence_length=9, clip_stride=1, val_fraction=0))
    np.testing.assert_array_equal(report.clips[0].keyboard[:5].numpy(),
                                  [[1, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    assert "Frames without a CSV row (no keys pressed): 7" in report.format()


def truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])


def test_truncated_frame_is_an_error_naming_the_file(tmp_path):
    folder = write_recording(tmp_path / "r", range(1, 13))
    truncate(folder / "frame_0007.png")
    report = check_data(tmp_path, data_settings(sequence_length=5), decode_frames=True)
    assert any(str(folder / "frame_0007.png") in p and "unreadable" in p for p in report.problems)
    with pytest.raises(DataError, match="frame_0007.png"):
        report.raise_for_problems()
    with pytest.raises(DataError, match="frame_0007.png"):
        load_frame(folder / "frame_0007.png")
    # Without the full decode the check passes, but loading the clip still fails loudly.
    quick = check_data(tmp_path, data_settings(sequence_length=5, clip_stride=5, val_fraction=0))
    assert not quick.problems
    with pytest.raises(DataError, match="frame_0007.png"):
        RecordingClipDataset(quick.clips, H, W)[1]


def test_report_of_a_mouse_recording_without_usable_frames(tmp_path):
    folder = write_recording(tmp_path / "r", range(1, 4))
    (folder / "input.csv").write_text("key,time,frame,mouse_x,mouse_y\n" + "".join(
        f"W,{(f - 1) / 25:.2f},{f},1.0,0\n" for f in range(1, 4)))
    for n in range(1, 4):
        (folder / f"frame_{n:04d}.png").write_bytes(b"not a png")
    report = check_data(tmp_path, data_settings(sequence_length=5, skip_bad_frames=True), decode_frames=True)
    text = report.format()
    assert "Mouse: no usable frames in the recordings with mouse columns" in text
    assert "no clip fits" in text


def test_skip_bad_frames_turns_them_into_counted_gaps(tmp_path):
    folder = write_recording(tmp_path / "r", range(1, 13))
    truncate(folder / "frame_0007.png")
    (folder / "frame_0010.png").write_bytes(b"not a png")
    report = check_data(tmp_path, data_settings(sequence_length=5, clip_stride=1, skip_bad_frames=True, val_fraction=0), decode_frames=True)
    assert not report.problems
    (recording,) = report.recordings
    assert sorted(recording.bad_frames) == [7, 10]
    assert recording.segments == [Segment(1, 6), Segment(8, 9), Segment(11, 12)]
    assert [c.first_frame for c in report.clips] == [1, 2]
    text = report.format()
    assert "Unreadable frames skipped (SKIP_BAD_FRAMES): 2" in text and "frame_0010.png" in text


def test_recordings_at_any_depth_and_clips_never_cross_them(tmp_path):
    write_recording(tmp_path / "day1" / "take1", range(1, 8))
    write_recording(tmp_path / "day1" / "take2", range(1, 8))
    write_recording(tmp_path / "day2" / "a" / "b", range(1, 4))
    report = check_data(tmp_path, data_settings(sequence_length=5, clip_stride=1, val_fraction=0))
    assert [r.name for r in report.recordings] == ["day1/take1", "day1/take2", "day2/a/b"]
    assert Counter(c.recording for c in report.clips) == {"day1/take1": 3, "day1/take2": 3}
    single = check_data(tmp_path / "day1" / "take2", data_settings(sequence_length=5, clip_stride=1))
    assert [r.name for r in single.recordings] == ["."]
    # Linked recordings are found; a link loop does not make the search go round forever.
    (tmp_path / "day2" / "linked").symlink_to(tmp_path / "day1" / "take1")
    (tmp_path / "day2" / "a" / "loop").symlink_to(tmp_path / "day2")
    linked = check_data(tmp_path / "day2", data_settings(sequence_length=5, clip_stride=1, val_fraction=0))
    assert [r.name for r in linked.recordings] == ["a/b", "linked"] and len(linked.clips) == 3


def test_folder_problems_are_reported(tmp_path):
    write_recording(tmp_path / "good", range(1, 6))
    (tmp_path / "no_csv").mkdir()
    frame_image(1).save(tmp_path / "no_csv" / "frame_0001.png")
    write_recording(tmp_path / "dup", [1, 2])
    frame_image(1).save(tmp_path / "dup" / "frame_1.png")
    report = check_data(tmp_path, data_settings(sequence_length=5))
    assert [r.name for r in report.recordings] == ["good"]
    assert any("no_csv: has frame_*.png files but no input.csv" in p for p in report.problems)
    assert any("frame_1.png: frame 1 again" in p for p in report.problems)
    with pytest.raises(DataError, match="no such folder"):
        check_data(tmp_path / "missing", data_settings())


def test_no_clip_fits_is_a_problem(tmp_path):
    write_recording(tmp_path / "r", range(1, 6))
    report = check_data(tmp_path, data_settings(sequence_length=9))
    assert any("no clip fits" in p and "5 frames" in p for p in report.problems)


# --- frame preprocessing (VAE_CLIP_SPEC A.7 steps 1-2) ---------------------------

def test_crop_box_keeps_the_model_aspect():
    assert crop_box(1280, 720) == (0.0, 8.0, 1280.0, 712.0)    # 16:9 is taller than 640:352: keep width, 704 rows
    assert crop_box(640, 480) == (0.0, 64.0, 640.0, 416.0)     # 4:3
    assert crop_box(1000, 500) == (45.5, 0.0, 954.5, 500.0)    # wider: keep height, int(909.09) = 909 columns
    assert crop_box(640, 361) == (0.0, 4.5, 640.0, 356.5)      # PIL rounds 4.5 -> 4, 356.5 -> 356
    assert crop_box(320, 176, 176, 320) == (0.0, 0.0, 320.0, 176.0)


def test_non_16_9_frame_is_centre_cropped_then_resized():
    # 4:3 source: 60 rows of red at the top and bottom must be cropped away exactly.
    source = np.zeros((480, 640, 3), np.uint8)
    source[:64] = (255, 0, 0)
    source[416:] = (255, 0, 0)
    source[64:416, :320] = (0, 255, 0)
    source[64:416, 320:] = (0, 0, 255)
    frame = preprocess_image(Image.fromarray(source), 176, 320)
    assert frame.shape == (3, 176, 320) and frame.dtype == torch.float32
    assert frame[0].max() == -1.0  # no red survived the crop
    assert torch.all(frame[1, :, :150] == 1.0) and torch.all(frame[2, :, 170:] == 1.0)
    # Exactly the reference steps: crop (PIL rounding) then PIL bilinear resize, then (x/255-0.5)/0.5.
    rng = np.random.default_rng(0)
    noisy = Image.fromarray(rng.integers(0, 256, (361, 640, 3), dtype=np.uint8))
    expected = np.asarray(noisy.crop((0, 4, 640, 356)).resize((160, 88), Image.Resampling.BILINEAR))
    expected = (torch.from_numpy(expected.copy()).permute(2, 0, 1).float() / 255 - 0.5) / 0.5
    assert torch.equal(preprocess_image(noisy, 88, 160), expected)


def test_load_frame_values_and_modes(tmp_path):
    Image.new("RGBA", (64, 32), (0, 128, 255, 7)).save(tmp_path / "rgba.png")
    frame = load_frame(tmp_path / "rgba.png", 32, 64)
    assert frame.shape == (3, 32, 64)
    np.testing.assert_allclose(frame[:, 0, 0].numpy(), [-1.0, (128 / 255 - 0.5) / 0.5, 1.0], atol=1e-6)
    Image.new("L", (64, 32), 51).save(tmp_path / "grey.png")
    assert torch.allclose(load_frame(tmp_path / "grey.png", 32, 64), torch.tensor((51 / 255 - 0.5) / 0.5))
    # EXIF orientation 6 (rotate 90 clockwise) is applied before cropping, as the reference does.
    stored = frame_image(7, size=(40, 72))
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(tmp_path / "rotated.png", exif=exif)
    upright = stored.transpose(Image.Transpose.ROTATE_270)
    assert upright.size == (72, 40)
    assert torch.equal(load_frame(tmp_path / "rotated.png", 32, 64), preprocess_image(upright, 32, 64))


# --- split ---------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(6))
def test_split_never_shares_a_frame(seed):
    recordings = [fake_recording("a", [Segment(1, 700), Segment(710, 1000)]), fake_recording("b", [Segment(1, 1403)])]
    clips = index_clips(recordings, 57, None)
    split = split_train_val(clips, 0.1, seed, 8)
    assert len(split.val) == round(0.1 * len(clips)) and split.train
    assert len(split.train) + len(split.val) + len(split.dropped) == len(clips)
    val_frames = {(c.recording, f) for c in split.val for f in range(c.first_frame, c.last_frame + 1)}
    train_frames = {(c.recording, f) for c in split.train for f in range(c.first_frame, c.last_frame + 1)}
    assert not val_frames & train_frames
    # Only clips that really overlap validation were dropped.
    assert all(any((c.recording, f) in val_frames for f in range(c.first_frame, c.last_frame + 1))
               for c in split.dropped)


def test_split_is_seeded_and_handles_small_data():
    clips = index_clips([fake_recording("r", [Segment(1, 1403)])], 57, None)
    first, again, other = (split_train_val(clips, 0.1, s, 8) for s in (0, 0, 1))
    assert [c.first_frame for c in first.val] == [c.first_frame for c in again.val]
    assert [c.first_frame for c in first.val] != [c.first_frame for c in other.val]
    assert split_train_val(clips, 0.0, 0, 8).val == []
    two = index_clips([fake_recording("r", [Segment(1, 85)])], 57, None)
    tiny = split_train_val(two, 0.1, 0, 8)
    assert len(tiny.train) == 2 and not tiny.val and "too few clips" in tiny.note
    with pytest.raises(DataError, match="VAL_FRACTION"):
        split_train_val(clips, 1.0, 0, 8)


# --- dataset -------------------------------------------------------------------

def test_dataset_item_and_worker_loading(tmp_path):
    folder = write_recording(tmp_path / "take", range(1, 31), rows={f: "WD" if f % 2 else "" for f in range(1, 31)},
                             size=(96, 40))
    report = check_data(tmp_path, data_settings(sequence_length=5, clip_stride=5, val_fraction=0, video_height=H, video_width=W))
    dataset = RecordingClipDataset(report.clips, H, W)
    item = dataset[2]
    assert item["video"].shape == (3, 5, H, W) and item["video"].dtype == torch.float32
    assert item["keyboard"].shape == (5, 4) and item["mouse"].shape == (5, 2)
    assert item["recording"] == "take" and item["first_frame"] == 11
    # Frame t of the clip is frame 11 + t: its red channel encodes the number.
    red = ((item["video"][0, :, 0, 0] * 0.5 + 0.5) * 255).round()
    assert red.tolist() == [11, 12, 13, 14, 15]
    assert item["keyboard"].tolist() == [[1, 0, 0, 1], [0] * 4, [1, 0, 0, 1], [0] * 4, [1, 0, 0, 1]]
    assert torch.equal(item["video"][:, 0], load_frame(folder / "frame_0011.png", H, W))

    restored = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(restored[2]["video"], item["video"])
    loader = DataLoader(dataset, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)
    assert [b["first_frame"].tolist() for b in batches] == [[1, 6], [11, 16], [21, 26]]
    assert torch.equal(batches[1]["video"][0], item["video"])
    assert batches[0]["recording"] == ["take", "take"]


def test_dataset_rejects_sizes_the_model_cannot_use():
    with pytest.raises(ValueError, match="multiples of 16"):
        RecordingClipDataset([], 30, 64)


def test_clipref_is_self_contained():
    clip = index_clips([fake_recording("r", [Segment(1, 9)])], 9, None)[0]
    assert isinstance(clip, ClipRef) and isinstance(clip.frame_paths[0], str)
    copy = pickle.loads(pickle.dumps(clip))
    assert copy.clip_id == clip.clip_id and torch.equal(copy.keyboard, clip.keyboard)


# --- report and CLI ------------------------------------------------------------

def test_report_lists_everything(tmp_path):
    folder = write_recording(tmp_path / "r", range(1, 41), rows={**{f: "W" for f in range(1, 30)}, 30: "WSpace"})
    (folder / "input.csv").write_text("key,time,frame,mouse_x,mouse_y\n" + "".join(
        f"{'WSpace' if f == 30 else 'W'},{(f - 1) / 25:.2f},{f},{2.0 if f % 4 == 0 else 0},0\n" for f in range(1, 41)))
    frame_image(1).save(folder / "thumbnail.png")
    text = check_data(tmp_path, data_settings(sequence_length=9, clip_stride=4)).format()
    for expected in ["1 recording(s) usable", "r: 40 frames in 1 segment(s), 64x32, mouse columns, 8 clips",
                     "resolution(s) 64x32 (40)", "Unmapped keys", "SPACE: 1 rows, e.g. r: 'WSpace' (input.csv line 31)",
                     "Keys held (frames): W 40 (100.0%), S 0 (0.0%)", "Key combinations: W 40",
                     "mouse_x: moving in 25.0% of frames, range 0..2 -> yaw |value| p99 0.1",
                     "Clips: 8 of 9 frames, one every 4 frames; 3 usable frames in no clip",
                     "Split: ", "Ignored image files (not named like FRAME_NAME): 1", "Problems: none"]:
        assert expected in text, expected


def test_cli_check_exit_codes(tmp_path, capsys):
    write_recording(tmp_path / "good" / "r", range(1, 12))
    assert data.main([str(tmp_path / "good"), "--SEQUENCE_LENGTH=5"]) == 0
    out = capsys.readouterr().out
    assert "Problems: none" in out and "SEQUENCE_LENGTH=5" in out

    bad = write_recording(tmp_path / "bad" / "r", range(1, 12))
    (bad / "input.csv").write_text("W,0,1\nW,-1,2\n")
    assert data.main([str(tmp_path / "bad"), "--SEQUENCE_LENGTH=5"]) == 1
    out = capsys.readouterr().out
    assert f"{bad / 'input.csv'}:2: negative time" in out and "Traceback" not in out

    assert data.main([str(tmp_path / "good"), "--SEQUENCE_LENGTH=56"]) == 1
    assert "4k+1" in capsys.readouterr().err
    assert data.main(["--SEQUENCE_LENGHT=33"]) == 2
    assert "valid names: CACHE_DIR, CACHE_DTYPE, CLIP_PATH, CLIP_STRIDE, CSV_ENCODING, CSV_FRAME_OFFSET, " \
           "CSV_SEPARATOR, DATA_DIR, FRAME_NAME" in capsys.readouterr().err
    assert data.main([str(tmp_path / "nowhere")]) == 1
    assert "no such folder" in capsys.readouterr().err


def test_parse_overrides_coerces_to_the_constants_types():
    namespace = {"SEQUENCE_LENGTH": 57, "MOUSE_SCALE": 0.05, "SKIP_BAD_FRAMES": False, "DATA_DIR": "data",
                 "CLIP_STRIDE": None, "KEYBOARD_KEYS": ("W", "S", "A", "D"), "KEY_MAP": {}, "lower": 1}
    overrides, rest = parse_overrides(
        ["data/x", "--SEQUENCE_LENGTH=33", "--MOUSE_SCALE=1e-2", "--SKIP_BAD_FRAMES=true", "--DATA_DIR=/d",
         "--CLIP_STRIDE=10", "--KEYBOARD_KEYS=W, S,A,D,SPACE", "--demo", "out"], namespace)
    assert overrides == {"SEQUENCE_LENGTH": 33, "MOUSE_SCALE": 0.01, "SKIP_BAD_FRAMES": True, "DATA_DIR": "/d",
                         "CLIP_STRIDE": 10, "KEYBOARD_KEYS": ("W", "S", "A", "D", "SPACE")}
    assert rest == ["data/x", "--demo", "out"]
    assert namespace["SEQUENCE_LENGTH"] == 57  # not changed in place
    assert parse_overrides(["--CLIP_STRIDE=None", "--SKIP_BAD_FRAMES=0"], namespace)[0] == \
        {"CLIP_STRIDE": None, "SKIP_BAD_FRAMES": False}
    for argv, message in [(["--SEQUENCE_LENGTH=5.5"], "SEQUENCE_LENGTH is an int"),
                          (["--SKIP_BAD_FRAMES=maybe"], "a bool"), (["--MOUSE_SCALE=big"], "a float"),
                          (["--FOO=1"], "unknown setting --FOO; valid names: CLIP_STRIDE, DATA_DIR, KEYBOARD_KEYS"),
                          (["--KEY_MAP=x"], "cannot be set from the command line"),
                          (["--SEQUENCE_LENGTH"], "needs a value")]:
        with pytest.raises(ValueError, match=message):
            parse_overrides(argv, namespace)


def test_pixel_conversion_is_bit_exact_for_every_value():
    pixels = torch.arange(256, dtype=torch.uint8)
    reference = (pixels.float() / 255 - 0.5) / 0.5  # VAE_CLIP_SPEC A.7 step 2
    assert torch.equal(to_model_range(pixels), reference)
