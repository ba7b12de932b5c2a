"""Recordings: find them under DATA_DIR, read and check one (frames + input.csv), and cut
it into segments of consecutive readable frames with their keyboard and mouse rows."""

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from recordings.errors import DataError
from recordings.frames import FRAME_FILE, MAX_FRAME_NUMBER, inspect_frame
from recordings.input_csv import CSV_NAME, KeyParser, parse_input_csv
from recordings.settings import DataSettings


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
    ignored_files: list          # .png files in the folder that are not frame_<number>.png

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
        """Inclusive ranges of frame numbers between 1 and the last frame that are not usable."""
        ranges, expected = [], 1
        for segment in self.segments:
            if segment.first > expected:
                ranges.append((expected, segment.first - 1))
            expected = segment.last + 1
        return ranges


def find_recordings(data_dir) -> tuple[list[Path], list[str]]:
    """Folders holding an input.csv under data_dir (itself included), and the folders with
    frame files but no input.csv (problems). Hidden folders are not searched; symbolic
    links to folders are followed, each real folder once."""
    data_dir = Path(data_dir)
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
        elif any(FRAME_FILE.fullmatch(name) for name in files):
            problems.append(f"{folder}: has frame_*.png files but no {CSV_NAME}")
    if not found and not problems:
        raise DataError(f"{data_dir}: no recordings found (a recording is a folder with "
                        f"frame_0001.png, ... and {CSV_NAME})")
    return found, problems


def load_recording(folder, data_dir, settings: DataSettings, decode_frames: bool = False,
                   progress: bool = False) -> Recording:
    """Parse and validate one recording. decode_frames fully decodes every frame (slow, finds
    every bad file); otherwise only headers are read and a bad frame surfaces when loaded.
    Raises DataError with every problem found."""
    folder = Path(folder)
    s = settings
    name = folder.relative_to(data_dir).as_posix() if data_dir is not None else folder.name
    frame_files, ignored, problems = _frame_files(folder)

    sizes, bad = Counter(), {}
    numbers = sorted(frame_files)
    for number, (size, problem) in zip(numbers, _inspect_frames(
            [frame_files[n] for n in numbers], decode_frames, s.video_height, s.video_width, progress, name)):
        if problem is None:
            sizes[size] += 1
        elif s.skip_bad_frames:
            bad[number] = problem
        else:
            problems.append(problem)

    try:
        actions = parse_input_csv(folder / CSV_NAME, KeyParser(s.keyboard_keys, s.key_map))
    except DataError as error:
        problems.extend(error.problems)
        actions = None
    if actions is not None:
        for frame, row in actions.rows.items():
            if frame not in frame_files:
                problems.append(f"{actions.path}:{row.line}: row for frame {frame}, but there is no "
                                f"frame_{frame:04d}.png (frames: {_describe_numbers(numbers)})")
    if problems:
        raise DataError(problems)

    usable = [n for n in numbers if n not in bad]
    keyboard, mouse, mouse_raw = _action_arrays(numbers, actions, s)
    return Recording(
        name=name, path=folder, frame_files=frame_files, bad_frames=bad, segments=_segments(usable),
        frame_numbers=np.array(numbers, dtype=np.int64), keyboard=keyboard, mouse=mouse, mouse_raw=mouse_raw,
        frame_sizes=sizes, frames_without_row=sum(1 for n in usable if n not in actions.rows),
        duplicate_rows=actions.duplicate_rows, unmapped_keys=actions.unmapped_keys,
        unmapped_examples=actions.unmapped_examples, ignored_files=ignored,
    )


def _frame_files(folder: Path) -> tuple[dict, list, list]:
    """(frame number -> path, ignored .png names, problems) of a recording's folder."""
    frame_files, ignored, problems = {}, [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        match = FRAME_FILE.fullmatch(entry.name)
        if match is None:
            if entry.name.lower().endswith(".png"):
                ignored.append(entry.name)
            continue
        digits = match.group(1)
        number = int(digits) if len(digits) <= len(str(MAX_FRAME_NUMBER)) else MAX_FRAME_NUMBER + 1
        if number < 1:
            problems.append(f"{entry.path}: frame numbers start at 1")
        elif number > MAX_FRAME_NUMBER:
            problems.append(f"{entry.path}: frame number {digits[:20]}{'...' if len(digits) > 20 else ''} is "
                            f"implausibly large (over {MAX_FRAME_NUMBER:,}, more than a year at 25 fps): a renamed "
                            "or damaged file? Rename or remove it")
        elif number in frame_files:
            problems.append(f"{entry.path}: frame {number} again (also {frame_files[number].name})")
        else:
            frame_files[number] = Path(entry.path)
    if not frame_files and not problems:
        problems.append(f"{folder}: {CSV_NAME} but no frame_<number>.png files")
    return frame_files, ignored, problems


def _segments(usable: list[int]) -> list[Segment]:
    """Runs of consecutive frame numbers."""
    segments = []
    for number in usable:
        if segments and segments[-1].last == number - 1:
            segments[-1] = Segment(segments[-1].first, number)
        else:
            segments.append(Segment(number, number))
    return segments


def _action_arrays(numbers: list[int], actions, s: DataSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """keyboard, mouse and raw mouse rows of every frame file, in frame order: one row per
    file, however far apart the frame numbers are (a gap costs nothing)."""
    keys = tuple(str(k).upper() for k in s.keyboard_keys)
    row_of = {n: i for i, n in enumerate(numbers)}
    keyboard = np.zeros((len(numbers), len(keys)), np.float32)
    mouse_raw = np.zeros((len(numbers), 2), np.float32) if actions.has_mouse else None
    for frame, row in actions.rows.items():
        keyboard[row_of[frame], [keys.index(k) for k in row.keys]] = 1.0
        if mouse_raw is not None:
            mouse_raw[row_of[frame]] = row.mouse
    mouse = np.zeros((len(numbers), 2), np.float32)
    if mouse_raw is not None:
        mouse[:, 0] = mouse_raw[:, 1] * (-s.mouse_scale if s.invert_mouse_y else s.mouse_scale)
        mouse[:, 1] = mouse_raw[:, 0] * s.mouse_scale
    return keyboard, mouse, mouse_raw


def _inspect_frames(paths, decode: bool, height: int, width: int, progress: bool, name: str):
    """_inspect_frame over many files; PIL decodes with the GIL released, so threads help."""
    if not decode:
        return [inspect_frame(p, False, height, width) for p in paths]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(lambda p: inspect_frame(p, True, height, width), paths)
        if progress:
            results = tqdm(results, total=len(paths), desc=f"decoding {name}", unit="frame")
        return list(results)


def _describe_numbers(numbers) -> str:
    return "none" if not numbers else f"{numbers[0]}..{numbers[-1]}"
