"""Unreal recordings -> validated training clips with aligned keyboard and mouse tensors.

A recording is a folder of frame_0001.png, frame_0002.png, ... and an input.csv with one
row per frame: the keys held, the time in seconds, the frame number, and optionally the
mouse deltas. DATA_DIR is one recording or a folder of recordings at any depth.

    python convert_unreal_data.py [DATA_DIR] [--NAME=value ...]   # check the data, print the report
    python convert_unreal_data.py [DATA_DIR] --cache              # ... then build the latent cache
    python convert_unreal_data.py --demo DIR                      # write the synthetic demo recording

The training script imports this module: check_data() -> DataReport (recordings, clips,
train/validation split, printable report), RecordingClipDataset for raw-frame loading,
load_frame()/preprocess_image() for the one frame preprocessing everything shares. The
latent cache itself lives in latent_cache.py.
"""

import argparse
import csv
import math
import os
import random
import re
import shutil
import sys
import tempfile
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps
from torch.utils.data import Dataset
from tqdm import tqdm

from wan import shapes
from wan.clip import DEFAULT_CLIP_PATH
from wan.shapes import FPS, check_frame_count, check_image_size
from wan.vae import DEFAULT_VAE_PATH

# -----------------------------------------------------------------------------
# Settings: edit them here, or override any of them with --NAME=value.
DATA_DIR = "data"
SEQUENCE_LENGTH = 57        # frames per clip; must be 4k+1 (the VAE's time compression)
CLIP_STRIDE = None          # frames between clip starts; None: SEQUENCE_LENGTH // 2
KEYBOARD_KEYS = ("W", "S", "A", "D")  # forward, back, left, right: the base model's columns
# Your bindings -> our keys. Matching is case-insensitive; a name may be several letters
# (Unreal calls the arrow keys Up, Down, Left, Right). Map a key to None to name it as a
# key of yours that is not one of ours (it is then counted as unmapped, never read as letters).
KEY_MAP = {"UP": "W", "DOWN": "S", "LEFT": "A", "RIGHT": "D"}
# The CSV's mouse columns are taken as camera rotation per frame in degrees (mouse_x: yaw,
# positive turns right; mouse_y: pitch, positive looks up). 0.05 maps a 2 deg/frame turn to
# 0.1, the size of the base model's own camera turns.
MOUSE_SCALE = 0.05
INVERT_MOUSE_Y = False      # True if your exporter's mouse_y is positive for looking down
SKIP_BAD_FRAMES = False     # True: an unreadable frame becomes a gap (counted) instead of an error
VAL_FRACTION = 0.1          # share of clips held out for validation
VAL_BLOCK_CLIPS = 8         # validation holds out runs of up to this many consecutive clips
SPLIT_SEED = 0              # which runs are held out
VIDEO_HEIGHT = shapes.VIDEO_HEIGHT  # frames are centre-cropped to this aspect and resized
VIDEO_WIDTH = shapes.VIDEO_WIDTH    # (352x640: the base model's size; sides multiples of 16)
# The latent cache (--cache): every clip encoded once by the VAE and CLIP
CACHE_DIR = "latent_cache"  # keyed by content: several datasets and settings can share it
CACHE_DTYPE = "bf16"        # "bf16" (half the disk) or "fp32"
VAE_PATH = str(DEFAULT_VAE_PATH)
CLIP_PATH = str(DEFAULT_CLIP_PATH)
# -----------------------------------------------------------------------------

SETTING_NAMES = (
    "DATA_DIR", "SEQUENCE_LENGTH", "CLIP_STRIDE", "KEYBOARD_KEYS", "KEY_MAP", "MOUSE_SCALE",
    "INVERT_MOUSE_Y", "SKIP_BAD_FRAMES", "VAL_FRACTION", "VAL_BLOCK_CLIPS", "SPLIT_SEED",
    "VIDEO_HEIGHT", "VIDEO_WIDTH", "CACHE_DIR", "CACHE_DTYPE", "VAE_PATH", "CLIP_PATH",
)
CSV_NAME = "input.csv"
FRAME_FILE = re.compile(r"frame_(\d+)\.png", re.IGNORECASE)
MAX_PROBLEMS_PER_FILE = 20  # a CSV's check stops after this many problems


class DataError(ValueError):
    """Bad input data or settings. Holds every problem found, each naming its file (and line)."""

    def __init__(self, problems):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


# -----------------------------------------------------------------------------
# --NAME=value overrides (shared with the training script)

def parse_overrides(argv, namespace_dict) -> tuple[dict, list[str]]:
    """Split `--NAME=value` overrides of upper-case constants from the other arguments.

    Each value is coerced to the type of the constant's current value in namespace_dict:
    int, float, bool (true/false/1/0/yes/no), str, tuple (comma-separated), or None-able
    (a None default takes None/none, else an int, a float or a string). Returns
    (overrides, other_args); namespace_dict is not changed. Raises ValueError for an
    unknown name (listing the valid ones) or a value of the wrong type.
    """
    valid = sorted(n for n, v in namespace_dict.items() if n.isupper() and _overridable(v))
    overrides, rest = {}, []
    for arg in argv:
        match = re.fullmatch(r"--([A-Z][A-Z0-9_]*)(=(.*))?", arg, re.DOTALL)
        if not match:
            rest.append(arg)
            continue
        name, value = match.group(1), match.group(3)
        if name not in valid:
            known = "" if name not in namespace_dict else f" ({name} cannot be set from the command line)"
            raise ValueError(f"unknown setting --{name}{known}; valid names: {', '.join(valid)}")
        if value is None:
            raise ValueError(f"--{name} needs a value: --{name}=VALUE")
        overrides[name] = _coerce(name, value, namespace_dict[name])
    return overrides, rest


def _overridable(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, tuple))


def _coerce(name: str, text: str, default):
    def bad(kind: str):
        return ValueError(f"--{name}={text}: {name} is {kind} (now {default!r})")

    text = text.strip()
    if isinstance(default, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes", "on"):
            return True
        if lowered in ("false", "0", "no", "off"):
            return False
        raise bad("a bool: true/false, 1/0, yes/no")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise bad("an int") from None
    if isinstance(default, float):
        try:
            return float(text)
        except ValueError:
            raise bad("a float") from None
    if isinstance(default, str):
        return text
    if isinstance(default, tuple):
        items = tuple(item.strip() for item in text.split(",") if item.strip())
        element = type(default[0]) if default else str
        if element in (int, float):
            try:
                return tuple(element(item) for item in items)
            except ValueError:
                raise bad(f"a comma-separated list of {element.__name__}s") from None
        return items
    if text.lower() in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


# -----------------------------------------------------------------------------
# Frames: the one preprocessing shared by training, the latent cache and previews
# (VAE_CLIP_SPEC A.7 steps 1-2).

def crop_box(src_width: int, src_height: int, height: int = VIDEO_HEIGHT,
             width: int = VIDEO_WIDTH) -> tuple[float, float, float, float]:
    """The centred crop with the aspect height:width, as float (left, top, right, bottom).

    The kept side is truncated to an int; PIL's crop then rounds each coordinate
    half-to-even, so the crop may be a pixel off the truncated size, as in the reference.
    """
    if src_height / src_width > height / width:
        new_width, new_height = src_width, int(src_width * height / width)
    else:
        new_width, new_height = int(src_height * width / height), src_height
    if new_width < 1 or new_height < 1:
        raise ValueError(f"a {src_width}x{src_height} image has no {width}:{height} area to crop")
    return ((src_width - new_width) / 2, (src_height - new_height) / 2,
            (src_width + new_width) / 2, (src_height + new_height) / 2)


def _resize_rgb(image: Image.Image, height: int, width: int) -> np.ndarray:
    """EXIF-transpose, RGB, centre-crop to height:width, bilinear (antialiased) resize -> uint8 [H,W,3].

    Steps that would not change a pixel (no EXIF rotation, already RGB, nothing to crop,
    already the size) are skipped: they only cost copies.
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    box = crop_box(image.width, image.height, height, width)
    if box != (0, 0, image.width, image.height):
        image = image.crop(box)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants


def _to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1]. The reference computes (x / 255 - 0.5) / 0.5; in float32
    x / 127.5 - 1 gives the same bits for every uint8 value (a test checks all 256), in two
    passes over the clip instead of three."""
    return pixels.float().div_(127.5).sub_(1)


def preprocess_image(image: Image.Image, height: int = VIDEO_HEIGHT,
                     width: int = VIDEO_WIDTH) -> torch.Tensor:
    """A PIL image -> float32 [3, height, width] in [-1, 1], exactly as training sees frames."""
    pixels = torch.from_numpy(_resize_rgb(image, height, width))
    return _to_model_range(pixels.permute(2, 0, 1).contiguous())


def open_frame(path) -> Image.Image:
    """Open and fully decode an image; any unreadable or truncated file raises DataError naming it."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated frames would be "
                           "silently completed; set it back to False")
    image = None
    try:
        image = Image.open(path)
        image.load()  # PIL decodes lazily: force the whole file now
    except (OSError, ValueError, SyntaxError) as error:
        if image is not None:
            image.close()
        raise DataError(f"{path}: unreadable image ({error})") from None
    return image


def _load_frame_pixels(path, height: int, width: int) -> np.ndarray:
    """An image file -> uint8 [height, width, 3], preprocessed; problems name the file."""
    with open_frame(path) as image:
        try:
            return _resize_rgb(image, height, width)
        except ValueError as error:
            raise DataError(f"{path}: {error}") from None


def load_frame(path, height: int = VIDEO_HEIGHT, width: int = VIDEO_WIDTH) -> torch.Tensor:
    """An image file -> float32 [3, height, width] in [-1, 1], exactly as training sees frames."""
    pixels = torch.from_numpy(_load_frame_pixels(path, height, width))
    return _to_model_range(pixels.permute(2, 0, 1).contiguous())


def _inspect_frame(path, decode: bool, height: int, width: int) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) of a frame file, or the problem with it. Header only unless decode."""
    try:
        if decode:
            with open_frame(path) as image:
                size = image.size
        else:
            with Image.open(path) as image:
                size = image.size
        crop_box(*size, height, width)
    except DataError as error:
        return None, str(error)
    except (OSError, ValueError, SyntaxError) as error:
        return None, f"{path}: unreadable image ({error})"
    return size, None


# -----------------------------------------------------------------------------
# input.csv

# Unreal's names for keys that are not one character, so that 'Space' is one key and not
# S, P, A, C, E (two of which are ours). Matched case-insensitively, longest name first.
UNREAL_KEY_NAMES = (
    "SpaceBar", "Space", "LeftShift", "RightShift", "Shift", "LeftControl", "RightControl",
    "Control", "LeftCtrl", "RightCtrl", "Ctrl", "LeftAlt", "RightAlt", "Alt", "LeftCommand",
    "RightCommand", "Tab", "Enter", "Return", "Escape", "Esc", "BackSpace", "CapsLock",
    "Delete", "Insert", "Home", "End", "PageUp", "PageDown", "Up", "Down", "Left", "Right",
    "LeftMouseButton", "RightMouseButton", "MiddleMouseButton", "ThumbMouseButton",
    "ThumbMouseButton2", "MouseScrollUp", "MouseScrollDown", "MouseWheelUp", "MouseWheelDown",
    "Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine",
    *(f"F{n}" for n in range(1, 13)),
)
NO_KEYS = ("", "=")
KEY_SEPARATORS = re.compile(r"[\s+|;,/]+")


class KeyParser:
    """Turns a CSV key string ('WA', 'aw', 'W+Up', 'WSpaceBar', '=') into key names."""

    def __init__(self, keyboard_keys=KEYBOARD_KEYS, key_map=KEY_MAP):
        self.keyboard_keys = tuple(str(key).upper() for key in keyboard_keys)
        if not self.keyboard_keys or len(set(self.keyboard_keys)) != len(self.keyboard_keys):
            raise DataError(f"KEYBOARD_KEYS must be distinct key names, got {tuple(keyboard_keys)}")
        self.mapping = {}
        for name, target in key_map.items():
            if target is not None and str(target).upper() not in self.keyboard_keys:
                raise DataError(f"KEY_MAP maps {name!r} to {target!r}, which is not one of "
                                f"KEYBOARD_KEYS {self.keyboard_keys} (or None)")
            self.mapping[str(name).upper()] = None if target is None else str(target).upper()
        names = {*self.keyboard_keys, *self.mapping, *(n.upper() for n in UNREAL_KEY_NAMES)}
        self.names = sorted((n for n in names if len(n) > 1), key=len, reverse=True)
        self._cache = {}

    def tokens(self, text: str) -> tuple[str, ...]:
        """The key names in a key string, in upper case, before KEY_MAP."""
        text = text.strip()
        if text in NO_KEYS:
            return ()
        found = []
        for part in KEY_SEPARATORS.split(text.upper()):
            i = 0
            while i < len(part):
                name = next((n for n in self.names if part.startswith(n, i)), part[i])
                found.append(name)
                i += len(name)
        return tuple(found)

    def parse(self, text: str) -> tuple[frozenset, tuple[str, ...]]:
        """(our keys held, unmapped key names) for a key string."""
        if text not in self._cache:
            held, unmapped = set(), []
            for token in self.tokens(text):
                key = self.mapping.get(token, token)
                if key in self.keyboard_keys:
                    held.add(key)
                else:
                    unmapped.append(token)
            self._cache[text] = (frozenset(held), tuple(unmapped))
        return self._cache[text]


@dataclass
class CsvRow:
    line: int
    time: float
    keys: frozenset          # our keys (after KEY_MAP)
    unmapped: tuple          # other key names on this row
    mouse: tuple | None      # (mouse_x, mouse_y) as written, None without mouse columns


@dataclass
class InputCsv:
    path: Path
    rows: dict               # frame number -> CsvRow
    has_mouse: bool
    duplicate_rows: int      # rows repeating an earlier row of the same frame exactly
    unmapped_keys: Counter   # key name -> rows holding it
    unmapped_examples: dict  # key name -> "'WSpace' (line 40)"


def parse_input_csv(path, key_parser: KeyParser | None = None) -> InputCsv:
    """Read an input.csv in any of its variants; every problem raises DataError naming file:line."""
    path = Path(path)
    key_parser = key_parser or KeyParser()
    records, end = [], 0  # (file line where the record starts, stripped cells)
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.reader(f, skipinitialspace=True)
            for row in reader:
                start, end = end + 1, reader.line_num
                cells = [cell.strip() for cell in row]
                if any(cells):
                    records.append((start, cells))
    except (OSError, UnicodeDecodeError, csv.Error) as error:
        raise DataError(f"{path}:{end + 1}: cannot read ({error})") from None

    problems = []
    columns = ["key", "time", "frame"]
    if records and any(c.lower() in ("key", "frame") for c in records[0][1]):
        line, header = records.pop(0)
        header = [c.lower() for c in header]
        allowed = ("key", "time", "frame", "mouse_x", "mouse_y")
        unknown = [c for c in header if c not in allowed]
        missing = [c for c in ("key", "time", "frame") if c not in header]
        if unknown or missing or len(set(header)) != len(header) or (
                ("mouse_x" in header) != ("mouse_y" in header)):
            raise DataError(f"{path}:{line}: header {','.join(header)!r} is not usable: expected "
                            "the columns key,time,frame and optionally mouse_x,mouse_y")
        columns = header
    if not records:
        raise DataError(f"{path}:1: no rows (expected one row per frame: key,time,frame)")
    has_mouse = "mouse_x" in columns

    rows, unmapped_keys, examples, duplicates = {}, Counter(), {}, 0
    previous_time = None
    for line, cells in records:
        if len(problems) >= MAX_PROBLEMS_PER_FILE:
            problems.append(f"{path}:{line}: stopped checking after {MAX_PROBLEMS_PER_FILE} problems")
            break
        where = f"{path}:{line}"
        if len(cells) != len(columns):
            hint = "" if has_mouse or len(cells) != 5 else " (mouse columns need a header line)"
            problems.append(f"{where}: {len(cells)} fields, expected {len(columns)} "
                            f"({','.join(columns)}){hint}")
            continue
        value = dict(zip(columns, cells))
        frame = _parse_frame_number(value["frame"])
        if frame is None:
            problems.append(f"{where}: frame number {value['frame']!r} is not a positive integer")
            continue
        try:
            time = float(value["time"])
        except ValueError:
            time = math.nan
        if not math.isfinite(time):
            problems.append(f"{where}: time {value['time']!r} is not a number")
            continue
        if time < 0:
            problems.append(f"{where}: negative time {time}")
            continue
        if previous_time is not None and time < previous_time:
            problems.append(f"{where}: time goes backwards ({time} after {previous_time})")
        previous_time = time
        mouse = None
        if has_mouse:
            try:
                mouse = (float(value["mouse_x"]), float(value["mouse_y"]))
            except ValueError:
                mouse = (math.nan, math.nan)
            if not all(math.isfinite(m) for m in mouse):
                problems.append(f"{where}: mouse_x,mouse_y {value['mouse_x']!r},{value['mouse_y']!r} "
                                "are not numbers")
                continue
        keys, unmapped = key_parser.parse(value["key"])
        row = CsvRow(line, time, keys, unmapped, mouse)
        earlier = rows.get(frame)
        if earlier is not None:
            if (earlier.keys, sorted(earlier.unmapped), earlier.mouse) != (keys, sorted(unmapped), mouse):
                problems.append(f"{where}: frame {frame} already has a row at line {earlier.line} "
                                f"that disagrees ({_describe(earlier)} there, {_describe(row)} here)")
            else:
                duplicates += 1
            continue
        rows[frame] = row
        for name in unmapped:
            unmapped_keys[name] += 1
            examples.setdefault(name, f"{value['key']!r} ({CSV_NAME} line {line})")
    if problems:
        raise DataError(problems)
    return InputCsv(path, rows, has_mouse, duplicates, unmapped_keys, examples)


def _parse_frame_number(text: str) -> int | None:
    try:
        number = float(text)
    except ValueError:
        return None
    if not number.is_integer() or number < 1:
        return None
    return int(number)


def _describe(row: CsvRow) -> str:
    keys = "".join(sorted(row.keys)) + "".join(f"+{k}" for k in sorted(row.unmapped))
    text = f"keys {keys or 'none'}"
    return text if row.mouse is None else f"{text}, mouse {row.mouse[0]:g},{row.mouse[1]:g}"


# -----------------------------------------------------------------------------
# Recordings

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
    keyboard: np.ndarray         # [last frame, K] float32 multi-hot; row f - 1 is frame f
    mouse: np.ndarray            # [last frame, 2] float32 (pitch, yaw) = scaled (mouse_y, mouse_x)
    mouse_raw: np.ndarray | None  # [last frame, 2] (mouse_x, mouse_y) as written; None: no columns
    frame_sizes: Counter         # (width, height) -> frames
    frames_without_row: int      # usable frames with no CSV row (no keys pressed)
    duplicate_rows: int
    unmapped_keys: Counter
    unmapped_examples: dict
    ignored_files: list          # .png files in the folder that are not frame_<number>.png

    @property
    def usable_frames(self) -> list[int]:
        return [f for s in self.segments for f in range(s.first, s.last + 1)]

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


def load_recording(folder, data_dir=None, *, keyboard_keys=KEYBOARD_KEYS, key_map=KEY_MAP,
                   mouse_scale: float = MOUSE_SCALE, invert_mouse_y: bool = INVERT_MOUSE_Y,
                   skip_bad_frames: bool = SKIP_BAD_FRAMES, height: int = VIDEO_HEIGHT,
                   width: int = VIDEO_WIDTH, decode_frames: bool = False,
                   progress: bool = False) -> Recording:
    """Parse and validate one recording. decode_frames fully decodes every frame (slow, finds
    every bad file); otherwise only headers are read and a bad frame surfaces when loaded.
    Raises DataError with every problem found."""
    folder = Path(folder)
    name = folder.relative_to(data_dir).as_posix() if data_dir is not None else folder.name
    frame_files, ignored, problems = {}, [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        match = FRAME_FILE.fullmatch(entry.name)
        if match is None:
            if entry.name.lower().endswith(".png"):
                ignored.append(entry.name)
            continue
        number = int(match.group(1))
        if number < 1:
            problems.append(f"{entry.path}: frame numbers start at 1")
        elif number in frame_files:
            problems.append(f"{entry.path}: frame {number} again (also {frame_files[number].name})")
        else:
            frame_files[number] = Path(entry.path)
    if not frame_files and not problems:
        problems.append(f"{folder}: {CSV_NAME} but no frame_<number>.png files")

    sizes, bad = Counter(), {}
    numbers = sorted(frame_files)
    for number, (size, problem) in zip(numbers, _inspect_frames(
            [frame_files[n] for n in numbers], decode_frames, height, width, progress, name)):
        if problem is None:
            sizes[size] += 1
        elif skip_bad_frames:
            bad[number] = problem
        else:
            problems.append(problem)

    try:
        actions = parse_input_csv(folder / CSV_NAME, KeyParser(keyboard_keys, key_map))
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
    segments = []
    for number in usable:
        if segments and segments[-1].last == number - 1:
            segments[-1] = Segment(segments[-1].first, number)
        else:
            segments.append(Segment(number, number))

    keys = tuple(str(k).upper() for k in keyboard_keys)
    span = numbers[-1]
    keyboard = np.zeros((span, len(keys)), np.float32)
    mouse_raw = np.zeros((span, 2), np.float32) if actions.has_mouse else None
    for frame, row in actions.rows.items():
        keyboard[frame - 1, [keys.index(k) for k in row.keys]] = 1.0
        if mouse_raw is not None:
            mouse_raw[frame - 1] = row.mouse
    mouse = np.zeros((span, 2), np.float32)
    if mouse_raw is not None:
        mouse[:, 0] = mouse_raw[:, 1] * (-mouse_scale if invert_mouse_y else mouse_scale)
        mouse[:, 1] = mouse_raw[:, 0] * mouse_scale
    return Recording(
        name=name, path=folder, frame_files=frame_files, bad_frames=bad, segments=segments,
        keyboard=keyboard, mouse=mouse, mouse_raw=mouse_raw, frame_sizes=sizes,
        frames_without_row=sum(1 for n in usable if n not in actions.rows),
        duplicate_rows=actions.duplicate_rows, unmapped_keys=actions.unmapped_keys,
        unmapped_examples=actions.unmapped_examples, ignored_files=ignored,
    )


def _inspect_frames(paths, decode: bool, height: int, width: int, progress: bool, name: str):
    """_inspect_frame over many files; PIL decodes with the GIL released, so threads help."""
    if not decode:
        return [_inspect_frame(p, False, height, width) for p in paths]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        results = pool.map(lambda p: _inspect_frame(p, True, height, width), paths)
        if progress:
            results = tqdm(results, total=len(paths), desc=f"decoding {name}", unit="frame")
        return list(results)


def _describe_numbers(numbers) -> str:
    return "none" if not numbers else f"{numbers[0]}..{numbers[-1]}"


# -----------------------------------------------------------------------------
# Clips

@dataclass(frozen=True, eq=False)
class ClipRef:
    """One training clip: everything needed to load it, nothing loaded yet."""

    recording: str               # Recording.name
    segment: int                 # index into the recording's segments
    first_frame: int             # 1-based frame number of the clip's first frame
    frame_paths: tuple           # str paths, one per frame
    keyboard: torch.Tensor       # [T, K] float32 multi-hot
    mouse: torch.Tensor          # [T, 2] float32 (pitch, yaw), scaled

    @property
    def num_frames(self) -> int:
        return len(self.frame_paths)

    @property
    def last_frame(self) -> int:
        return self.first_frame + self.num_frames - 1

    @property
    def clip_id(self) -> str:
        return f"{self.recording}:{self.first_frame}-{self.last_frame}"


def resolve_clip_stride(sequence_length: int = SEQUENCE_LENGTH, clip_stride: int | None = CLIP_STRIDE) -> int:
    stride = sequence_length // 2 if clip_stride is None else clip_stride
    if not isinstance(stride, int) or stride < 1:
        raise DataError(f"CLIP_STRIDE must be a positive number of frames or None, got {clip_stride!r}")
    return stride


def clip_starts(segment: Segment, sequence_length: int, stride: int) -> range:
    """First frames of the clips that fit in a segment; a tail shorter than a clip gets none."""
    return range(segment.first, segment.last - sequence_length + 2, stride)


def index_clips(recordings, sequence_length: int = SEQUENCE_LENGTH,
                clip_stride: int | None = CLIP_STRIDE) -> list[ClipRef]:
    """Every clip of every segment, in recording and frame order; never across a gap or recording."""
    check_frame_count(sequence_length, "SEQUENCE_LENGTH")
    stride = resolve_clip_stride(sequence_length, clip_stride)
    clips = []
    for recording in recordings:
        for index, segment in enumerate(recording.segments):
            for first in clip_starts(segment, sequence_length, stride):
                rows = slice(first - 1, first - 1 + sequence_length)
                clips.append(ClipRef(
                    recording=recording.name, segment=index, first_frame=first,
                    frame_paths=tuple(str(recording.frame_files[f]) for f in range(first, first + sequence_length)),
                    keyboard=torch.from_numpy(recording.keyboard[rows].copy()),
                    mouse=torch.from_numpy(recording.mouse[rows].copy()),
                ))
    return clips


@dataclass
class Split:
    train: list
    val: list
    dropped: list                # training clips sharing a frame with a validation clip
    note: str = ""               # why there is no validation set, if there is none

    @property
    def used(self) -> list:
        """The clips training reads (and the latent cache must hold): train, then validation."""
        return self.train + self.val


def split_train_val(clips, val_fraction: float = VAL_FRACTION, seed: int = SPLIT_SEED,
                    block_clips: int = VAL_BLOCK_CLIPS) -> Split:
    """Hold out runs of consecutive clips (time ranges) for validation; drop the training
    clips that would share a frame with them, so nothing leaks.

    Each segment's clips are cut into blocks of block_clips; a seeded shuffle picks blocks
    until round(val_fraction * clips) (at least 1) are held out, the last block only in part.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"VAL_FRACTION must be in [0, 1), got {val_fraction}")
    if block_clips < 1:
        raise DataError(f"VAL_BLOCK_CLIPS must be at least 1, got {block_clips}")
    if val_fraction == 0:
        return Split(list(clips), [], [], "VAL_FRACTION is 0")
    target = max(1, round(val_fraction * len(clips)))
    blocks, run = [], []
    for clip in clips:
        if run and (run[-1].recording, run[-1].segment) != (clip.recording, clip.segment):
            blocks.append(run)
            run = []
        run.append(clip)
        if len(run) == block_clips:
            blocks.append(run)
            run = []
    if run:
        blocks.append(run)
    random.Random(seed).shuffle(blocks)
    held_out = set()
    for block in blocks:
        held_out.update(id(c) for c in block[:target - len(held_out)])
        if len(held_out) == target:
            break

    val = [c for c in clips if id(c) in held_out]
    val_frames = {}
    for clip in val:
        val_frames.setdefault(clip.recording, set()).update(range(clip.first_frame, clip.last_frame + 1))
    train, dropped = [], []
    for clip in clips:
        if id(clip) in held_out:
            continue
        frames = val_frames.get(clip.recording, set())
        overlaps = not frames.isdisjoint(range(clip.first_frame, clip.last_frame + 1))
        (dropped if overlaps else train).append(clip)
    if not train:
        return Split(list(clips), [], [], f"too few clips ({len(clips)}) for a validation split "
                                          "that leaves training clips")
    return Split(train, val, dropped)


# -----------------------------------------------------------------------------
# Raw-frame dataset

class RecordingClipDataset(Dataset):
    """Clips decoded from their PNG frames on every access.

    Item: video [3, T, H, W] float32 in [-1, 1], keyboard [T, K], mouse [T, 2] (float32),
    recording (str, relative to DATA_DIR), first_frame (int, 1-based). A frame that fails
    to decode raises DataError naming the file.
    """

    def __init__(self, clips, height: int = VIDEO_HEIGHT, width: int = VIDEO_WIDTH):
        check_image_size(height, width)
        self.clips = list(clips)
        self.height, self.width = height, width

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        clip = self.clips[index]
        frames = np.empty((clip.num_frames, self.height, self.width, 3), np.uint8)
        for t, path in enumerate(clip.frame_paths):
            frames[t] = _load_frame_pixels(path, self.height, self.width)
        # One transpose of the uint8 clip, then the float passes over contiguous memory: far
        # faster than converting frame by frame into a strided [3, T, H, W] output.
        video = _to_model_range(torch.from_numpy(frames).permute(3, 0, 1, 2).contiguous())
        return {
            "video": video,
            "keyboard": clip.keyboard.clone(),
            "mouse": clip.mouse.clone(),
            "recording": clip.recording,
            "first_frame": clip.first_frame,
        }


# -----------------------------------------------------------------------------
# The check and its report

LISTED = 10  # items listed per report section before "... and N more"


@dataclass
class DataReport:
    """What check_data found: the usable recordings, their clips and split, every problem."""

    data_dir: str
    settings: dict               # NAME -> value the check ran with
    recordings: list             # [Recording] that loaded without problems
    clips: list                  # [ClipRef] of those recordings
    split: Split
    problems: list               # every problem, each naming its file (and line)
    decoded: bool                # every frame fully decoded (else headers only)

    def raise_for_problems(self) -> None:
        if self.problems:
            raise DataError(self.problems)

    def format(self) -> str:
        recordings = self.recordings
        lines = [f"Data check of {self.data_dir}: {len(recordings)} recording(s) usable"
                 f"{f', {len(self.problems)} problem(s)' if self.problems else ''}; frames "
                 f"{'fully decoded' if self.decoded else 'checked by header only'}",
                 "  settings: " + " ".join(f"{k}={_show(v)}" for k, v in self.settings.items())]

        clips_per_recording = Counter(c.recording for c in self.clips)
        lines.append("Recordings:")
        for r in recordings[:50]:
            sizes = ", ".join(f"{w}x{h}" for (w, h) in r.frame_sizes)
            lines.append(f"  {r.name}: {len(r.usable_frames):,} frames in {len(r.segments)} segment(s), "
                         f"{sizes or 'no readable frames'}, {'mouse' if r.mouse_raw is not None else 'no mouse'}"
                         f" columns, {clips_per_recording[r.name]:,} clips")
        if len(recordings) > 50:
            lines.append(f"  ... and {len(recordings) - 50} more")

        sizes = sum((r.frame_sizes for r in recordings), Counter())
        usable = sum(len(r.usable_frames) for r in recordings)
        height, width = self.settings["VIDEO_HEIGHT"], self.settings["VIDEO_WIDTH"]
        resolutions = ", ".join(f"{w}x{h} ({n:,})" for (w, h), n in sizes.most_common()) or "none"
        lines.append(f"Frames: {usable:,} usable of {sum(len(r.frame_files) for r in recordings):,} files; "
                     f"resolution(s) {resolutions}"
                     + (" - already" if set(sizes) == {(width, height)} else " -> centre-cropped to")
                     + f" {width}:{height} and resized to {width}x{height} (W x H)")

        gaps = [(r.name, a, b) for r in recordings for a, b in r.missing_ranges()]
        lines.append(f"Gaps: {len(gaps)} ({sum(b - a + 1 for _, a, b in gaps):,} frame numbers missing or "
                     "unreadable; clips never span one)")
        lines += _listed(f"  {name}: frame{'s' if b > a else ''} {a}{f'-{b}' if b > a else ''}"
                         for name, a, b in gaps)
        bad = [problem for r in recordings for problem in r.bad_frames.values()]
        if bad or self.settings.get("SKIP_BAD_FRAMES"):
            lines.append(f"Unreadable frames skipped (SKIP_BAD_FRAMES): {len(bad)}")
            lines += _listed(f"  {problem}" for problem in bad)
        lines.append(f"Frames without a CSV row (no keys pressed): "
                     f"{sum(r.frames_without_row for r in recordings):,}")
        duplicates = sum(r.duplicate_rows for r in recordings)
        if duplicates:
            lines.append(f"Repeated identical CSV rows (used once): {duplicates:,}")
        ignored = [f"{r.name}/{f}" for r in recordings for f in r.ignored_files]
        if ignored:
            lines.append(f"Ignored .png files (not frame_<number>.png): {len(ignored)}")
            lines += _listed(f"  {f}" for f in ignored)

        unmapped = sum((r.unmapped_keys for r in recordings), Counter())
        examples = {k: f"{r.name}: {e}" for r in reversed(recordings) for k, e in r.unmapped_examples.items()}
        lines.append(f"Unmapped keys (not in KEYBOARD_KEYS or KEY_MAP; ignored): {len(unmapped) or 'none'}")
        lines += _listed(f"  {key}: {n:,} rows, e.g. {examples[key]}" for key, n in unmapped.most_common())

        keys = [str(k).upper() for k in self.settings.get("KEYBOARD_KEYS", KEYBOARD_KEYS)]
        held = np.concatenate([r.keyboard[np.array(r.usable_frames, dtype=np.int64) - 1] for r in recordings]) \
            if recordings else np.zeros((0, len(keys)), np.float32)
        total = max(len(held), 1)
        lines.append("Keys held (frames): " + ", ".join(
            f"{k} {int(n):,} ({100 * n / total:.1f}%)" for k, n in zip(keys, held.sum(0))))
        codes, counts = np.unique(held.astype(np.int64) @ (1 << np.arange(len(keys))), return_counts=True)
        combos = sorted(zip(counts, codes), reverse=True)
        lines.append("Key combinations: " + (", ".join(
            f"{''.join(k for i, k in enumerate(keys) if code >> i & 1) or 'none'} {n:,}" for n, code in combos)
            or "none"))
        lines += self._mouse_lines()

        stride = self.settings.get("CLIP_STRIDE")
        length = self.settings.get("SEQUENCE_LENGTH")
        covered = sum(b - a + 1 for _, a, b in _frame_ranges(self.clips))
        lines.append(f"Clips: {len(self.clips):,} of {length} frames, one every {stride} frames; "
                     f"{usable - covered:,} usable frames in no clip (segments or tails shorter than a clip)")
        split = self.split
        lines.append(f"Split: {len(split.train):,} train, {len(split.val):,} validation, {len(split.dropped):,} "
                     "dropped (they would share frames with validation clips)"
                     + (f"; no validation: {split.note}" if split.note else ""))
        lines += _listed(f"  validation: {r} frames {a}-{b}" for r, a, b in _frame_ranges(split.val))

        lines.append(f"Problems: {len(self.problems) or 'none'}")
        lines += [f"  {p}" for p in self.problems]
        return "\n".join(lines)

    def _mouse_lines(self) -> list[str]:
        with_mouse = [r for r in self.recordings if r.mouse_raw is not None]
        without = [r.name for r in self.recordings if r.mouse_raw is None]
        lines = []
        if without:
            lines.append(f"Mouse: zero for {len(without)} recording(s) without mouse_x,mouse_y columns: "
                         + ", ".join(without[:LISTED]) + (" ..." if len(without) > LISTED else ""))
        if not with_mouse:
            return lines or ["Mouse: no recordings"]
        if not any(r.usable_frames for r in with_mouse):
            return lines + ["Mouse: no usable frames in the recordings with mouse columns"]
        raw = np.concatenate([r.mouse_raw[np.array(r.usable_frames, dtype=np.int64) - 1] for r in with_mouse])
        scaled = np.concatenate([r.mouse[np.array(r.usable_frames, dtype=np.int64) - 1] for r in with_mouse])
        lines.append(f"Mouse ({len(with_mouse)} recording(s) with columns; scaled by MOUSE_SCALE into the "
                     "model's (pitch, yaw)):")
        for column, (name, model_name, model_column) in enumerate(
                [("mouse_x", "yaw", 1), ("mouse_y", "pitch", 0)]):
            values, model = raw[:, column], np.abs(scaled[:, model_column])
            moving = values != 0
            lines.append(f"  {name}: moving in {100 * moving.mean():.1f}% of frames, range "
                         f"{values.min():g}..{values.max():g} -> {model_name} |value| p99 "
                         f"{np.percentile(model, 99):.3g}, max {model.max():.3g}")
        peak = np.abs(scaled).max()
        if peak > 1 or (peak > 0 and np.percentile(np.abs(scaled[scaled != 0]), 99) < 0.01):
            lines.append("  check MOUSE_SCALE: the base model's own camera turns are about 0.1 per frame")
        return lines


def _show(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _listed(items) -> list[str]:
    items = list(items)
    more = [f"  ... and {len(items) - LISTED} more"] if len(items) > LISTED else []
    return items[:LISTED] + more


def _frame_ranges(clips) -> list[tuple[str, int, int]]:
    """Merge the frame ranges of clips into (recording, first, last) runs."""
    ranges = []
    for clip in sorted(clips, key=lambda c: (c.recording, c.first_frame)):
        if ranges and ranges[-1][0] == clip.recording and clip.first_frame <= ranges[-1][2] + 1:
            ranges[-1] = (clip.recording, ranges[-1][1], max(ranges[-1][2], clip.last_frame))
        else:
            ranges.append((clip.recording, clip.first_frame, clip.last_frame))
    return ranges


def check_data(data_dir=DATA_DIR, *, sequence_length: int = SEQUENCE_LENGTH,
               clip_stride: int | None = CLIP_STRIDE, keyboard_keys=KEYBOARD_KEYS, key_map=KEY_MAP,
               mouse_scale: float = MOUSE_SCALE, invert_mouse_y: bool = INVERT_MOUSE_Y,
               skip_bad_frames: bool = SKIP_BAD_FRAMES, val_fraction: float = VAL_FRACTION,
               val_block_clips: int = VAL_BLOCK_CLIPS, split_seed: int = SPLIT_SEED,
               height: int = VIDEO_HEIGHT, width: int = VIDEO_WIDTH, decode_frames: bool = False,
               progress: bool = False) -> DataReport:
    """Find, parse and validate every recording, index the clips and split them.

    height x width is the size frames are cropped and resized to. Bad settings or a missing
    DATA_DIR raise DataError; problems in the data are collected in
    the report (call raise_for_problems() before training on it).
    """
    try:
        check_frame_count(sequence_length, "SEQUENCE_LENGTH")
    except ValueError as error:
        raise DataError(str(error)) from None
    stride = resolve_clip_stride(sequence_length, clip_stride)
    try:
        check_image_size(height, width)
    except ValueError as error:
        raise DataError(str(error)) from None
    KeyParser(keyboard_keys, key_map)
    if not isinstance(mouse_scale, (int, float)) or not math.isfinite(mouse_scale):
        raise DataError(f"MOUSE_SCALE must be a finite number, got {mouse_scale!r}")

    folders, problems = find_recordings(data_dir)
    recordings = []
    for folder in folders:
        try:
            recordings.append(load_recording(
                folder, data_dir, keyboard_keys=keyboard_keys, key_map=key_map, mouse_scale=mouse_scale,
                invert_mouse_y=invert_mouse_y, skip_bad_frames=skip_bad_frames,
                height=height, width=width, decode_frames=decode_frames, progress=progress))
        except DataError as error:
            problems.extend(error.problems)
    clips = index_clips(recordings, sequence_length, stride)
    if recordings and not clips:
        longest = max((s.length for r in recordings for s in r.segments), default=0)
        problems.append(f"{data_dir}: no clip fits: the longest run of consecutive frames has {longest} "
                        f"frames, SEQUENCE_LENGTH is {sequence_length}")
    split = split_train_val(clips, val_fraction, split_seed, val_block_clips)
    settings = {
        "SEQUENCE_LENGTH": sequence_length, "CLIP_STRIDE": stride,
        "KEYBOARD_KEYS": tuple(keyboard_keys), "KEY_MAP": dict(key_map), "MOUSE_SCALE": mouse_scale,
        "INVERT_MOUSE_Y": invert_mouse_y, "SKIP_BAD_FRAMES": skip_bad_frames, "VAL_FRACTION": val_fraction,
        "VAL_BLOCK_CLIPS": val_block_clips, "SPLIT_SEED": split_seed, "VIDEO_HEIGHT": height,
        "VIDEO_WIDTH": width,
    }
    return DataReport(str(data_dir), settings, recordings, clips, split, problems, decode_frames)


def check_data_with(settings: dict, data_dir=None, *, decode_frames: bool = False, progress: bool = False) -> DataReport:
    """check_data with the settings by name, as the scripts hold them (a name missing from
    settings takes this module's value), so the check, the cache and training agree."""
    def get(name):
        return settings.get(name, globals()[name])

    return check_data(
        data_dir or get("DATA_DIR"), sequence_length=get("SEQUENCE_LENGTH"), clip_stride=get("CLIP_STRIDE"),
        keyboard_keys=get("KEYBOARD_KEYS"), key_map=get("KEY_MAP"), mouse_scale=get("MOUSE_SCALE"),
        invert_mouse_y=get("INVERT_MOUSE_Y"), skip_bad_frames=get("SKIP_BAD_FRAMES"),
        val_fraction=get("VAL_FRACTION"), val_block_clips=get("VAL_BLOCK_CLIPS"), split_seed=get("SPLIT_SEED"),
        height=get("VIDEO_HEIGHT"), width=get("VIDEO_WIDTH"), decode_frames=decode_frames, progress=progress)


# -----------------------------------------------------------------------------
# The demo recording: a first-person walk through a small procedural world, rendered with
# numpy and written in exactly the Unreal format, so that the whole pipeline can run (and
# be tested) without a studio's data. The actions alone determine the camera's motion.

DEMO_FRAMES = 300
DEMO_HEIGHT, DEMO_WIDTH = 176, 320   # half of 352x640: the model's aspect, sides multiples of 16
DEMO_SEED = 0
DEMO_WALK = 0.25                     # metres per frame with W or S (6 m/s at 25 fps)
DEMO_STRAFE = 0.2                    # metres per frame with A or D
DEMO_EYE = 1.7                       # camera height, metres
DEMO_FOV = 60.0                      # vertical field of view, degrees
DEMO_MAX_PITCH = 10.0                # the script keeps the camera within +-this many degrees
DEMO_ARENA = 22.0                    # the script turns back towards the pillars beyond this radius


@dataclass(frozen=True)
class DemoCamera:
    x: float = 0.0                   # metres; x is right and z forward at yaw 0
    z: float = 0.0
    yaw: float = 0.0                 # degrees, positive turned right
    pitch: float = 0.0               # degrees, positive looking up

    def step(self, keys: str, mouse_x: float, mouse_y: float) -> "DemoCamera":
        """The camera after one frame of input: the mouse turns (mouse_x yaw, mouse_y pitch,
        in degrees), then W/S walk along and A/D strafe across the new heading."""
        yaw, pitch = self.yaw + mouse_x, self.pitch + mouse_y
        forward = DEMO_WALK * (("W" in keys) - ("S" in keys))
        right = DEMO_STRAFE * (("D" in keys) - ("A" in keys))
        sin, cos = math.sin(math.radians(yaw)), math.cos(math.radians(yaw))
        return DemoCamera(self.x + forward * sin + right * cos, self.z + forward * cos - right * sin, yaw, pitch)


DEMO_RUNS = ("W", "S", "A", "D", "WA", "WD", "SA", "SD", "idle", "turn", "turn", "W+turn", "look")


def demo_actions(num_frames: int = DEMO_FRAMES, seed: int = DEMO_SEED) -> list[tuple[str, float, float]]:
    """A seeded script of (keys, mouse_x, mouse_y) per frame: runs of 6-24 frames drawn from a
    shuffled deck of DEMO_RUNS, so every kind (walking, strafing, combinations, idling,
    turning, turning while walking, looking up or down) recurs about every 200 frames."""
    rng = random.Random(seed)
    actions, camera, deck = [], DemoCamera(), []
    while len(actions) < num_frames:
        if not deck:
            deck = list(DEMO_RUNS)
            rng.shuffle(deck)
        kind, length = deck.pop(), rng.randint(6, 24)
        keys, mouse_x, mouse_y = "", 0.0, 0.0
        if math.hypot(camera.x, camera.z) > DEMO_ARENA:
            # Turn towards the middle while walking instead of leaving the pillars behind.
            deck.append(kind)
            bearing = (math.degrees(math.atan2(-camera.x, -camera.z)) - camera.yaw + 180) % 360 - 180
            keys, mouse_x = "W", math.copysign(2.5, bearing)
            length = max(6, min(24, int(abs(bearing) / 2.5)))
        elif kind in ("turn", "W+turn"):
            keys = "W" if kind == "W+turn" else ""
            mouse_x = round(rng.choice((-1, 1)) * rng.uniform(1.0, 3.0), 2)
        elif kind == "look":
            mouse_y = round(rng.uniform(0.4, 1.0), 2)
            if camera.pitch > 0:
                mouse_y = -mouse_y  # head back towards level, never past DEMO_MAX_PITCH
            room = DEMO_MAX_PITCH - math.copysign(1, mouse_y) * camera.pitch
            length = min(length, int(room / abs(mouse_y)))
        elif kind != "idle":
            keys = kind
        for _ in range(min(length, num_frames - len(actions))):
            actions.append((keys, mouse_x, mouse_y))
            camera = camera.step(keys, mouse_x, mouse_y)
    return actions


def _hash_bits(ix: np.ndarray, iz: np.ndarray, salt: int) -> np.ndarray:
    """Fixed pseudo-random uint32 bits per integer lattice point (no period in practice)."""
    h = ix.astype(np.uint32, copy=False) * np.uint32(0x8DA6B343) ^ iz.astype(np.uint32, copy=False) * np.uint32(0xD8163841)
    h ^= np.uint32((salt * 0x9E3779B9) & 0xFFFFFFFF)
    h ^= h >> np.uint32(15)
    h *= np.uint32(0x2C1B3C6D)
    h ^= h >> np.uint32(12)
    h *= np.uint32(0x297A2D39)
    h ^= h >> np.uint32(15)
    return h


def _hash01(ix: np.ndarray, iz: np.ndarray, salt: int) -> np.ndarray:
    return _hash_bits(ix, iz, salt).astype(np.float32) * np.float32(1 / 2**32)


def _value_noise(x: np.ndarray, z: np.ndarray, salt: int) -> np.ndarray:
    """Smooth noise in [0, 1) with features about one unit apart."""
    fx, fz = np.floor(x), np.floor(z)
    tx, tz = x - fx, z - fz
    sx, sz = tx * tx * (3 - 2 * tx), tz * tz * (3 - 2 * tz)
    ix, iz = fx.astype(np.int32).view(np.uint32), fz.astype(np.int32).view(np.uint32)  # wraps like ints
    one = np.uint32(1)
    a, b = _hash01(ix, iz, salt), _hash01(ix + one, iz, salt)
    c, d = _hash01(ix, iz + one, salt), _hash01(ix + one, iz + one, salt)
    return (a + (b - a) * sx) + ((c + (d - c) * sx) - (a + (b - a) * sx)) * sz


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0, 1)
    return t * t * (3 - 2 * t)


def _mix(a, b, t: np.ndarray) -> np.ndarray:
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return a + (b - a) * t[..., None]


_HAZE = (0.74, 0.80, 0.86)


def _ground_colour(px, pz, distance, footprint) -> np.ndarray:
    """Grass and dry earth in large patches, mid and fine detail, scattered stones; detail
    fades where a pixel covers more ground than the feature (no shimmer), haze far away."""
    def fade(size):
        return np.clip(1.5 - 2 * footprint / size, 0, 1)

    broad = _value_noise(px / 9.0, pz / 9.0, 1)
    colour = _mix((0.30, 0.50, 0.20), (0.62, 0.54, 0.34), _smoothstep(0.35, 0.7, broad))
    soil = _smoothstep(0.62, 0.8, _value_noise(px / 4.0 + 50, pz / 4.0, 2))
    colour = _mix(colour, (0.36, 0.27, 0.18), soil * 0.8)
    mid = _value_noise(px / 1.2, pz / 1.2, 3) - 0.5
    fine = _value_noise(px / 0.3, pz / 0.3, 4) - 0.5
    grain = _value_noise(px / 0.08, pz / 0.08, 10) - 0.5
    colour *= (1 + 0.6 * mid * fade(1.2) + 0.6 * fine * fade(0.3) + 0.5 * grain * fade(0.08))[..., None]

    cell_x, cell_z = np.floor(px / 1.3), np.floor(pz / 1.3)
    bits = _hash_bits(cell_x.astype(np.int32).view(np.uint32), cell_z.astype(np.int32).view(np.uint32), 5)
    byte = [(bits >> np.uint32(8 * k) & np.uint32(255)).astype(np.float32) / 256 for k in range(4)]
    centre_x, centre_z = (cell_x + 0.25 + 0.5 * byte[0]) * 1.3, (cell_z + 0.25 + 0.5 * byte[1]) * 1.3
    radius = 0.08 + 0.17 * byte[2]
    stone = ((px - centre_x) ** 2 + (pz - centre_z) ** 2 < radius ** 2) & (byte[3] < 0.4)
    shade = 0.3 + 0.45 * byte[2]
    stone_colour = np.stack([shade, shade * 0.97, shade * 0.9], -1)
    colour += (stone_colour - colour) * (stone * fade(0.4))[..., None]
    return _mix(colour, _HAZE, 1 - np.exp(-distance / 70.0))


def _sky_colour(dx, dy, dz, camera: DemoCamera) -> np.ndarray:
    """Gradient sky, a cloud layer, and a mountain skyline fixed to the compass directions."""
    norm = np.sqrt(dx * dx + dy * dy + dz * dz)
    elevation = dy / norm
    colour = _mix(_HAZE, (0.22, 0.42, 0.82), np.sqrt(np.clip(elevation, 0, 1)))
    up = np.maximum(dy, 1e-3)
    cloud_x, cloud_z = dx / up * 300 + camera.x, dz / up * 300 + camera.z
    clouds = 0.65 * _value_noise(cloud_x / 220, cloud_z / 220, 11) + 0.35 * _value_noise(cloud_x / 70, cloud_z / 70, 12)
    cover = _smoothstep(0.5, 0.72, clouds) * _smoothstep(0.03, 0.15, elevation)
    colour = _mix(colour, (0.97, 0.97, 0.98), cover * 0.9)

    azimuth = np.arctan2(dx, dz)
    ridge = 0.05 + 0.03 * (np.sin(3 * azimuth + 1.0) + 0.6 * np.sin(7 * azimuth + 2.0)
                           + 0.35 * np.sin(13 * azimuth + 0.4) + 0.2 * np.sin(31 * azimuth + 3.0))
    mountain = elevation < ridge
    rock = _mix((0.42, 0.47, 0.56), (0.58, 0.62, 0.70), np.clip(1 - elevation / 0.1, 0, 1))
    return np.where(mountain[..., None], rock, colour)


def _demo_pillars() -> list[tuple]:
    """Fixed world: (x, z, radius, height, colour) of pillars scattered around the start."""
    rng = random.Random(1234)
    palette = [(0.85, 0.20, 0.15), (0.15, 0.35, 0.85), (0.95, 0.80, 0.15), (0.55, 0.20, 0.70),
               (0.10, 0.65, 0.60), (0.95, 0.50, 0.10), (0.90, 0.90, 0.88), (0.20, 0.20, 0.22)]
    pillars = []
    while len(pillars) < 40:
        x, z = rng.uniform(-30, 30), rng.uniform(-30, 30)
        if math.hypot(x, z) > 4 and all(math.hypot(x - p[0], z - p[1]) > 3.5 for p in pillars):
            pillars.append((x, z, rng.uniform(0.3, 0.9), rng.uniform(2.5, 8.0), rng.choice(palette)))
    return pillars


_PILLARS = _demo_pillars()


def render_demo_frame(camera: DemoCamera, height: int = DEMO_HEIGHT, width: int = DEMO_WIDTH) -> np.ndarray:
    """The demo world seen from camera: uint8 [height, width, 3]."""
    tan_v = math.tan(math.radians(DEMO_FOV) / 2)
    tan_h = tan_v * width / height
    u = ((np.arange(width, dtype=np.float32) + 0.5) / width * 2 - 1) * tan_h
    v = (1 - (np.arange(height, dtype=np.float32) + 0.5) / height * 2) * tan_v
    u, v = np.broadcast_to(u[None, :], (height, width)), np.broadcast_to(v[:, None], (height, width))
    sin_p, cos_p = math.sin(math.radians(camera.pitch)), math.cos(math.radians(camera.pitch))
    sin_y, cos_y = math.sin(math.radians(camera.yaw)), math.cos(math.radians(camera.yaw))
    ry, rz = v * cos_p + sin_p, cos_p - v * sin_p          # pitch about the camera's x axis
    dx, dy, dz = u * cos_y + rz * sin_y, ry, rz * cos_y - u * sin_y  # then yaw about the vertical

    # Without roll the horizon is a row: sky above, ground below.
    horizon = int(np.searchsorted(-dy[:, 0], 1e-6))
    sky, ground = slice(0, horizon), slice(horizon, height)
    image = np.empty((height, width, 3), np.float32)
    depth = np.full((height, width), np.inf, np.float32)
    image[sky] = _sky_colour(dx[sky], dy[sky], dz[sky], camera)
    t = DEMO_EYE / -dy[ground]
    focal = (height / 2) / tan_v
    image[ground] = _ground_colour(camera.x + t * dx[ground], camera.z + t * dz[ground], t,
                                   t * t / (DEMO_EYE * focal) + t / focal)
    depth[ground] = t

    def to_screen(x, y, z):
        """World point -> (column, row, distance along the view axis)."""
        rx, ry, rz = x - camera.x, y - DEMO_EYE, z - camera.z
        side, ahead = rx * cos_y - rz * sin_y, rx * sin_y + rz * cos_y
        up, forward = ry * cos_p - ahead * sin_p, ry * sin_p + ahead * cos_p
        if forward <= 0.05:
            return None
        return ((side / forward / tan_h + 1) / 2 * width, (1 - up / forward / tan_v) / 2 * height, forward)

    for px, pz, radius, top, colour in _PILLARS:
        corners = [to_screen(px + sx, y, pz + sz) for sx in (-radius, radius) for sz in (-radius, radius)
                   for y in (0.0, top)]
        if all(c is None for c in corners):
            continue
        if any(c is None for c in corners):  # the box reaches behind the camera: test everything
            rows, cols = slice(0, height), slice(0, width)
        else:  # a box in front projects inside the hull of its projected corners
            cols = slice(max(0, int(min(c[0] for c in corners)) - 1), min(width, int(max(c[0] for c in corners)) + 2))
            rows = slice(max(0, int(min(c[1] for c in corners)) - 1), min(height, int(max(c[1] for c in corners)) + 2))
            if cols.start >= cols.stop or rows.start >= rows.stop:
                continue
        _draw_pillar(image[rows, cols], depth[rows, cols], dx[rows, cols], dy[rows, cols], dz[rows, cols],
                     camera.x - px, camera.z - pz, radius, top, colour)
    return (np.clip(image, 0, 1) * 255 + 0.5).astype(np.uint8)


def _draw_pillar(image, depth, dx, dy, dz, ox, oz, radius, top, colour) -> None:
    """Ray-cast one vertical cylinder (offset ox, oz from the camera) into image where it is nearest."""
    a = dx * dx + dz * dz
    b = 2 * (ox * dx + oz * dz)
    disc = b * b - 4 * a * (ox * ox + oz * oz - radius * radius)
    hit_t = (-b - np.sqrt(np.maximum(disc, 0))) / (2 * np.maximum(a, 1e-12))
    hit_y = DEMO_EYE + hit_t * dy
    hit = (disc > 0) & (hit_t > 0) & (hit_y >= 0) & (hit_y <= top) & (hit_t < depth)
    if not hit.any():
        return
    t, y = hit_t[hit], hit_y[hit]
    nx, nz = (ox + t * dx[hit]) / radius, (oz + t * dz[hit]) / radius
    stripes = 0.82 + 0.18 * (np.floor(np.arctan2(nz, nx) / (2 * math.pi) * 8) % 2)
    bands = 0.88 + 0.12 * (np.floor(y / 0.5) % 2)
    light = 0.45 + 0.55 * np.maximum(0, 0.6 * nx - 0.8 * nz)
    shade = (stripes * bands * light)[:, None] * np.asarray(colour, np.float32)
    shade = np.where((y > top - 0.3)[:, None], 0.95 * light[:, None], shade)  # a pale cap
    image[hit] = _mix(shade, _HAZE, 1 - np.exp(-t / 70.0))
    depth[hit] = t


def write_demo_recording(out_dir, num_frames: int = DEMO_FRAMES, height: int = DEMO_HEIGHT,
                         width: int = DEMO_WIDTH, seed: int = DEMO_SEED,
                         progress: bool = False) -> list[tuple[str, float, float]]:
    """Render demo_actions(num_frames, seed) into out_dir as frame_0001.png ... and input.csv
    (key,time,frame,mouse_x,mouse_y at 25 fps; mouse in degrees per frame). The row of frame f
    holds the input that moved the camera from frame f - 1 to frame f. The folder appears
    whole or not at all; it must not exist yet or be empty. Returns the actions."""
    out_dir = Path(out_dir)
    if num_frames < 1:
        raise DataError(f"--frames must be at least 1, got {num_frames}")
    try:
        check_image_size(height, width)
    except ValueError as error:
        raise DataError(f"demo recording: {error}") from None
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir}: exists and is not an empty folder; choose a new one for the demo recording")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the recording is an ordinary folder
    try:
        actions = demo_actions(num_frames, seed)
        cameras, camera = [], DemoCamera()
        for action in actions:
            camera = camera.step(*action)
            cameras.append(camera)
        digits = max(4, len(str(num_frames)))

        frames = range(1, num_frames + 1)
        for frame in tqdm(frames, desc="rendering demo", unit="frame") if progress else frames:
            Image.fromarray(render_demo_frame(cameras[frame - 1], height, width)).save(
                staging / f"frame_{frame:0{digits}d}.png", compress_level=1)
        lines = ["key,time,frame,mouse_x,mouse_y"] + [
            f"{keys or '='},{(frame - 1) / FPS:.2f},{frame},{mouse_x:.2f},{mouse_y:.2f}"
            for frame, (keys, mouse_x, mouse_y) in enumerate(actions, 1)]
        (staging / CSV_NAME).write_text("\n".join(lines) + "\n", encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return actions


# -----------------------------------------------------------------------------
# Command line

def _argument_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Check Unreal recordings (frame_0001.png ... + input.csv) and print the data report, "
                    "or write the synthetic demo recording.",
        epilog="Any setting at the top of this file can be overridden as --NAME=value, e.g. "
               "--SEQUENCE_LENGTH=33 --SKIP_BAD_FRAMES=true --KEYBOARD_KEYS=W,S,A,D. "
               "Exit code 1 when the data has problems.")
    parser.add_argument("data_dir", nargs="?", help="a recording or a folder of recordings (default: DATA_DIR)")
    parser.add_argument("--cache", action="store_true",
                        help="after the check, encode every clip into the latent cache CACHE_DIR with the VAE "
                             "(VAE_PATH) and CLIP (CLIP_PATH); clips already cached are reused")
    parser.add_argument("--demo", metavar="DIR", help="write the demo recording into DIR (new or empty) and exit")
    parser.add_argument("--frames", type=int, default=DEMO_FRAMES, help=f"demo: frames to render (default {DEMO_FRAMES})")
    parser.add_argument("--height", type=int, default=DEMO_HEIGHT,
                        help=f"demo: frame height, a multiple of 16 (default {DEMO_HEIGHT})")
    parser.add_argument("--width", type=int, default=DEMO_WIDTH,
                        help=f"demo: frame width, a multiple of 16 (default {DEMO_WIDTH}; 352x640 is the model's size)")
    parser.add_argument("--seed", type=int, default=DEMO_SEED, help=f"demo: action script seed (default {DEMO_SEED})")
    return parser


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    settings = {name: globals()[name] for name in SETTING_NAMES}
    try:
        overrides, argv = parse_overrides(argv, settings)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    settings.update(overrides)
    args = _argument_parser().parse_args(argv)
    try:
        if args.demo:
            actions = write_demo_recording(args.demo, args.frames, args.height, args.width, args.seed, progress=True)
            print(f"wrote {len(actions)} frames of {args.width}x{args.height} and {CSV_NAME} to {args.demo}; "
                  f"check it with: python convert_unreal_data.py {args.demo}")
            return 0
        report = check_data_with(settings, args.data_dir, decode_frames=True, progress=True)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(report.format())
    if report.problems:
        return 1
    if args.cache:
        import latent_cache  # imports the encoders; only needed here

        try:
            cache_report = latent_cache.build_latent_cache(
                report.split.used, settings["CACHE_DIR"], settings["VAE_PATH"], settings["CLIP_PATH"],
                settings["VIDEO_HEIGHT"], settings["VIDEO_WIDTH"], dtype=settings["CACHE_DTYPE"])
        except (FileNotFoundError, ValueError, latent_cache.CacheError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 1
        print(cache_report.format())
    return 0


if __name__ == "__main__":
    sys.exit(main())
