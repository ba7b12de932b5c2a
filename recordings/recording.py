"""Recordings: find them under DATA_DIR, read and check one (frames + input.csv), and cut
it into segments of consecutive readable frames with their keyboard and mouse rows."""

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from recordings.errors import DataError
from recordings.frames import inspect_frame
from recordings.input_csv import CSV_NAME, KeyParser, parse_input_csv
from recordings.layout import DEFAULT_FRAME_NAME, MAX_FRAME_NUMBER, FrameName, suggest_frame_name
from recordings.settings import DataSettings
from runs.progress import progress_over


@dataclass(frozen=True)
class Segment:
    """A run of consecutive, existing, readable frames (numbers inclusive)."""

    first: int
    last: int

    @property
    def length(self) -> int:
        return self.last - self.first + 1


@dataclass
class Recording:
    name: str                    # folder relative to DATA_DIR ("." when DATA_DIR is the recording)
    path: Path
    frame_files: dict            # frame number -> Path, every frame file found
    bad_frames: dict             # frame number -> problem, unreadable frames made gaps (SKIP_BAD_FRAMES)
    segments: list               # [Segment], in order
    frame_numbers: np.ndarray    # [N] int64, sorted: every frame with a file; row i below is frame_numbers[i]
    keyboard: np.ndarray         # [N, K] float32 multi-hot
    mouse: np.ndarray            # [N, 2] float32 (pitch, yaw) = scaled (mouse_y, mouse_x)
    mouse_raw: np.ndarray | None  # [N, 2] (mouse_x, mouse_y) as written; None: no columns
    frame_sizes: Counter         # (width, height) -> frames
    frames_without_row: int      # usable frames with no CSV row (no keys pressed)
    duplicate_rows: int
    unmapped_keys: Counter
    unmapped_examples: dict
    ignored_files: list          # image files in the folder whose names are not FRAME_NAME's
    dropped_frames: dict = field(default_factory=dict)  # frame -> CSV line: a row, but no frame file (a gap)
    duplicate_lines: list = field(default_factory=list)    # CSV lines repeating their frame's row (merged)
    out_of_order_lines: list = field(default_factory=list)  # CSV lines before an earlier frame's (sorted)
    csv_layout: str = ""         # how input.csv was read (CsvLayout.describe)
    numbering: str = ""          # how the frame files are named and numbered
    notes: list = field(default_factory=list)  # things to check that are not errors

    @property
    def usable_frames(self) -> list[int]:
        return [f for s in self.segments for f in range(s.first, s.last + 1)]

    def rows(self, frames) -> np.ndarray:
        """Row indices of the keyboard/mouse arrays for frame numbers that have a file."""
        frames = np.asarray(frames, dtype=np.int64)
        index = np.searchsorted(self.frame_numbers, frames)
        if frames.size and (index.max() >= len(self.frame_numbers) or (self.frame_numbers[index] != frames).any()):
            raise KeyError(f"{self.name}: no frame file for some of frames {frames.min()}-{frames.max()}")
        return index

    def actions(self, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """(keyboard [count, K], mouse [count, 2]) of frames first .. first + count - 1."""
        index = self.rows(np.arange(first, first + count))
        return self.keyboard[index].copy(), self.mouse[index].copy()

    def missing_ranges(self) -> list[tuple[int, int]]:
        """Inclusive ranges of frame numbers that are not usable, from the recording's first frame
        (file or CSV row) to its last."""
        known = [*self.frame_numbers[:1].tolist(), *self.frame_numbers[-1:].tolist(), *self.dropped_frames]
        if not known:
            return []
        ranges, expected = [], min(known)
        for segment in self.segments:
            if segment.first > expected:
                ranges.append((expected, segment.first - 1))
            expected = segment.last + 1
        if max(known) >= expected:
            ranges.append((expected, max(known)))
        return ranges

    def dropped_ranges(self) -> list[tuple[int, int]]:
        """Inclusive ranges of the dropped frames (CSV rows without a frame file)."""
        return _runs(sorted(self.dropped_frames))

    def describe_gap(self, frame: int) -> str:
        """Why a frame is not usable, for messages."""
        if frame in self.dropped_frames:
            return (f"frame {frame} was dropped by the recorder ({CSV_NAME} line {self.dropped_frames[frame]} has "
                    "its row, but there is no frame file)")
        if frame in self.bad_frames:
            return f"frame {frame} is unreadable and skipped (SKIP_BAD_FRAMES)"
        return f"there is no frame {frame}"


def find_recordings(data_dir, frame_name: str = DEFAULT_FRAME_NAME) -> tuple[list[Path], list[str]]:
    """Folders holding an input.csv under data_dir (itself included), and the folders with
    frame files (FRAME_NAME) but no input.csv (problems). Hidden folders are not searched;
    symbolic links to folders are followed, each real folder once."""
    data_dir = Path(data_dir)
    frames = FrameName(frame_name)
    if not data_dir.is_dir():
        raise DataError(f"{data_dir}: no such folder (DATA_DIR must be a recording or a folder of recordings)")
    found, problems, seen = [], [], set()
    for folder, subfolders, files in os.walk(data_dir, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:
            subfolders[:] = []
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        if CSV_NAME in files:
            found.append(Path(folder))
        elif any(frames.digits(name) is not None for name in files):
            problems.append(f"{folder}: has {frames.generic} files but no {CSV_NAME}")
    if not found and not problems:
        raise DataError(f"{data_dir}: no recordings found (a recording is a folder with "
                        f"{frames.name(1)}, ... and {CSV_NAME})")
    return found, problems


def load_recording(folder, data_dir, settings: DataSettings, decode_frames: bool = False,
                   progress: bool = False) -> Recording:
    """Parse and validate one recording. decode_frames fully decodes every frame (slow, finds
    every bad file); otherwise only headers are read and a bad frame surfaces when loaded.
    A CSV row whose frame file is missing is a dropped frame: a gap, not an error.
    Raises DataError with every problem found."""
    folder = Path(folder)
    s = settings
    s.check_layout()
    name = folder.relative_to(data_dir).as_posix() if data_dir is not None else folder.name
    frame_name = FrameName(s.frame_name)
    frame_files, ignored, problems, numbering = _frame_files(folder, frame_name)

    sizes, bad, unreadable = Counter(), {}, {}
    numbers = sorted(frame_files)
    for number, (size, problem) in zip(numbers, _inspect_frames(
            [frame_files[n] for n in numbers], decode_frames, s.video_height, s.video_width, progress, name)):
        if problem is None:
            sizes[size] += 1
        elif s.skip_bad_frames:
            bad[number] = problem
        else:
            unreadable[number] = problem
    if unreadable:
        first = next(iter(unreadable.values()))
        names = [frame_files[n].name for n in list(unreadable)[:5]] + (["..."] if len(unreadable) > 5 else [])
        more = f" ({len(unreadable):,} frames like this: {', '.join(names)})" if len(unreadable) > 1 else ""
        problems.append(f"{first}{more} - re-export it, or set SKIP_BAD_FRAMES=true to make unreadable frames gaps")

    try:
        actions = parse_input_csv(folder / CSV_NAME, KeyParser(s.keyboard_keys, s.key_map), s.csv_columns,
                                  s.csv_separator, s.csv_encoding, s.csv_frame_offset)
    except DataError as error:
        problems.extend(error.problems)
        actions = None
    dropped, notes = {}, []
    if actions is not None and numbers:
        has_file = np.isin(actions.frames, numbers)
        dropped = dict(zip(actions.frames[~has_file].tolist(), actions.lines[~has_file].tolist()))
        if len(actions.frames) and not has_file.any():
            problems.append(_no_row_has_a_file(actions, numbers, frame_name, s.csv_frame_offset))
        else:
            notes = _numbering_notes(actions, numbers, frame_name, s.csv_frame_offset)
    if problems:
        raise DataError(problems)

    usable = [n for n in numbers if n not in bad]
    keyboard, mouse, mouse_raw = _action_arrays(numbers, actions, s)
    return Recording(
        name=name, path=folder, frame_files=frame_files, bad_frames=bad, segments=_segments(usable),
        frame_numbers=np.array(numbers, dtype=np.int64), keyboard=keyboard, mouse=mouse, mouse_raw=mouse_raw,
        frame_sizes=sizes, frames_without_row=len(set(usable).difference(actions.frames.tolist())),
        duplicate_rows=actions.duplicate_rows, unmapped_keys=actions.unmapped_keys,
        unmapped_examples=actions.unmapped_examples, ignored_files=ignored, dropped_frames=dropped,
        duplicate_lines=actions.duplicate_lines, out_of_order_lines=actions.out_of_order_lines,
        csv_layout=actions.layout.describe(), numbering=numbering, notes=notes,
    )


def _frame_files(folder: Path, frame_name: FrameName) -> tuple[dict, list, list, str]:
    """(frame number -> path, ignored image names, problems, how the files are numbered) of a
    recording's folder. Only names in the folder itself are considered."""
    frame_files, ignored, problems, widths = {}, [], [], {}  # widths: number -> digits in its name
    image_suffixes = {".png", os.path.splitext("frame" + frame_name.suffix)[1].lower()} - {""}
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        digits = frame_name.digits(entry.name)
        if digits is None:
            if Path(entry.name).suffix.lower() in image_suffixes and entry.name != CSV_NAME:
                ignored.append(entry.name)
            continue
        number = int(digits) if len(digits) <= len(str(MAX_FRAME_NUMBER)) else MAX_FRAME_NUMBER + 1
        if number > MAX_FRAME_NUMBER:
            problems.append(f"{entry.path}: frame number {digits[:20]}{'...' if len(digits) > 20 else ''} is "
                            f"implausibly large (over {MAX_FRAME_NUMBER:,}, more than a year at 25 fps): a renamed "
                            "or damaged file? Rename or remove it")
        elif number in frame_files:
            problems.append(f"{entry.path}: frame {number} again (also {frame_files[number].name}) - remove one")
        else:
            frame_files[number] = Path(entry.path)
            widths[number] = len(digits)
    if not frame_files and not problems:
        suggestion = suggest_frame_name(ignored[0]) if ignored else None
        others = f"; image files here: {', '.join(ignored[:3])}{' ...' if len(ignored) > 3 else ''}" if ignored else ""
        others += f" - if these are the frames, set FRAME_NAME={suggestion!r}" if suggestion else ""
        problems.append(f"{folder}: {CSV_NAME} but no frame files named {frame_name.generic} (FRAME_NAME="
                        f"{frame_name.pattern!r}){others}")
    numbering = ""
    if frame_files:
        unpadded = all(width == len(str(n)) for n, width in widths.items())
        padding = f"{next(iter(set(widths.values())))} digits" if len(set(widths.values())) == 1 else \
            "no padding" if unpadded else "mixed padding"
        numbering = f"{frame_name.generic} numbered from {min(frame_files)}, {padding}"
    return frame_files, ignored, problems, numbering


def _no_row_has_a_file(actions, numbers: list, frame_name: FrameName, offset: int) -> str:
    """The refusal when no CSV row matches a frame file: the numbering is off, not the recording."""
    rows = f"{len(actions.frames):,} rows (frames {actions.frames[0]}..{actions.frames[-1]}" \
           + (f" after CSV_FRAME_OFFSET={offset}" if offset else "") + ")"
    hint = f"set CSV_FRAME_OFFSET={offset + numbers[0] - int(actions.frames[0])}" \
        if len(actions.frames) == len(numbers) else "check CSV_FRAME_OFFSET"
    return (f"{actions.path}: none of its {rows} has a frame file; the files are {frame_name.generic} "
            f"{numbers[0]}..{numbers[-1]} ({len(numbers):,}) - if the CSV counts frames differently, {hint}; if "
            "these are not the frames, check FRAME_NAME")


def _numbering_notes(actions, numbers: list, frame_name: FrameName, offset: int) -> list[str]:
    """A CSV numbered like the files but shifted (0.. against 1..) trains every key one frame
    off without an error: say so, and how to set it right."""
    frames = actions.frames
    shift = numbers[0] - int(frames[0])
    if not len(frames) or shift == 0 or len(frames) != len(numbers) or numbers[-1] - int(frames[-1]) != shift:
        return []
    return [f"{actions.path.name} counts frames {frames[0]}..{frames[-1]}, the files {numbers[0]}..{numbers[-1]}: "
            f"the same count, shifted by {shift}. If its first row is the first file, set CSV_FRAME_OFFSET="
            f"{offset + shift}"]


def _segments(usable: list[int]) -> list[Segment]:
    """Runs of consecutive frame numbers."""
    return [Segment(first, last) for first, last in _runs(usable)]


def _action_arrays(numbers: list[int], actions, s: DataSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """keyboard, mouse and raw mouse rows of every frame file, in frame order: one row per
    file, however far apart the frame numbers are (a gap costs nothing). A frame without a
    CSV row has no keys and no mouse movement."""
    numbers = np.asarray(numbers, dtype=np.int64)
    index = np.searchsorted(numbers, actions.frames)
    has_file = index < len(numbers)
    has_file[has_file] = numbers[index[has_file]] == actions.frames[has_file]
    rows, index = np.flatnonzero(has_file), index[has_file]
    keyboard = np.zeros((len(numbers), actions.keyboard.shape[1]), np.float32)
    keyboard[index] = actions.keyboard[rows]
    mouse_raw = None
    if actions.has_mouse:
        mouse_raw = np.zeros((len(numbers), 2), np.float32)
        mouse_raw[index] = actions.mouse[rows]
    mouse = np.zeros((len(numbers), 2), np.float32)
    if mouse_raw is not None:
        with np.errstate(over="ignore"):
            mouse[:, 0] = mouse_raw[:, 1] * (-s.mouse_scale if s.invert_mouse_y else s.mouse_scale)
            mouse[:, 1] = mouse_raw[:, 0] * s.mouse_scale
        overflow = np.flatnonzero(~np.isfinite(mouse).all(axis=1))
        if len(overflow):
            frames = numbers[overflow]
            lines = [actions.line_of(int(f)) for f in frames[:5]]
            raise DataError(f"{actions.path}:{lines[0]}: frame {frames[0]}: mouse {mouse_raw[overflow[0], 0]:g},"
                            f"{mouse_raw[overflow[0], 1]:g} times MOUSE_SCALE={s.mouse_scale:g} overflows float32 "
                            + (f"({len(frames):,} rows like this: lines {', '.join(map(str, lines))}) " if len(frames) > 1
                               else "") + "- lower MOUSE_SCALE, or fix the rows")
    return keyboard, mouse, mouse_raw


def _inspect_frames(paths, decode: bool, height: int, width: int, progress: bool, name: str):
    """_inspect_frame over many files; PIL decodes with the GIL released, so threads help."""
    if not decode:
        return [inspect_frame(p, False, height, width) for p in paths]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(lambda p: inspect_frame(p, True, height, width), paths)
        if progress:
            results = progress_over(results, f"decoding {name}", "frame", total=len(paths))
        return list(results)


def _runs(numbers: list[int]) -> list[tuple[int, int]]:
    """Sorted numbers -> inclusive ranges of consecutive ones."""
    runs = []
    for number in numbers:
        if runs and runs[-1][1] == number - 1:
            runs[-1] = (runs[-1][0], number)
        else:
            runs.append((number, number))
    return runs
