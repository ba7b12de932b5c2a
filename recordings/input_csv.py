"""input.csv: one row per frame - the keys held, the time, the frame number, optionally the
mouse - in every variant Unreal exporters write (header or none, any case, CRLF, BOM,
quotes, '=' or empty for no key, WA / AW / W+A)."""

import csv
import io
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from recordings.errors import DataError
from recordings.frames import MAX_FRAME_NUMBER

CSV_NAME = "input.csv"
MAX_PROBLEMS_PER_FILE = 20  # a CSV's check stops after this many problems

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

    def __init__(self, keyboard_keys, key_map: dict):
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


def parse_input_csv(path, key_parser: KeyParser) -> InputCsv:
    """Read an input.csv in any of its variants; every problem raises DataError naming file:line."""
    path = Path(path)
    records = _read_records(path)
    columns = _take_header(records, path)
    if not records:
        raise DataError(f"{path}:1: no rows (expected one row per frame: key,time,frame)")
    has_mouse = "mouse_x" in columns

    problems, rows, unmapped_keys, examples, duplicates = [], {}, Counter(), {}, 0
    previous_time = None
    for line, cells in records:
        if len(problems) >= MAX_PROBLEMS_PER_FILE:
            problems.append(f"{path}:{line}: stopped checking after {MAX_PROBLEMS_PER_FILE} problems")
            break
        where = f"{path}:{line}"
        try:
            frame, row, key_text = _parse_row(line, cells, columns, key_parser)
        except ValueError as problem:
            problems.append(f"{where}: {problem}")
            continue
        if previous_time is not None and row.time < previous_time:
            problems.append(f"{where}: time goes backwards ({row.time} after {previous_time})")
        previous_time = row.time
        earlier = rows.get(frame)
        if earlier is not None:
            if (earlier.keys, sorted(earlier.unmapped), earlier.mouse) != (row.keys, sorted(row.unmapped), row.mouse):
                problems.append(f"{where}: frame {frame} already has a row at line {earlier.line} "
                                f"that disagrees ({_describe(earlier)} there, {_describe(row)} here)")
            else:
                duplicates += 1
            continue
        rows[frame] = row
        for name in row.unmapped:
            unmapped_keys[name] += 1
            examples.setdefault(name, f"{key_text!r} ({CSV_NAME} line {line})")
    if problems:
        raise DataError(problems)
    return InputCsv(path, rows, has_mouse, duplicates, unmapped_keys, examples)


def _read_records(path: Path) -> list[tuple[int, list[str]]]:
    """(file line where the record starts, stripped cells) of every non-blank CSV record."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    if b"\x00" in raw:
        encoding = "UTF-16" if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or raw[1:2] == b"\x00" or raw[:1] == b"\x00" \
            else "binary"
        raise DataError(f"{path}: not UTF-8 text - it holds NUL bytes ({encoding}?). Save it as UTF-8 (or ASCII) "
                        "CSV: one row per frame, key,time,frame[,mouse_x,mouse_y]")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[:error.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte {raw[error.start]:#04x} at offset {error.start}); "
                        "save the file as UTF-8") from None
    records, end = [], 0
    try:
        with io.StringIO(text, newline="") as f:
            reader = csv.reader(f, skipinitialspace=True)
            for row in reader:
                start, end = end + 1, reader.line_num
                cells = [cell.strip() for cell in row]
                if any(cells):
                    records.append((start, cells))
    except csv.Error as error:
        raise DataError(f"{path}:{end + 1}: cannot read ({error})") from None
    return records


def _take_header(records: list, path: Path) -> list[str]:
    """The columns: the header's, removed from records, when there is one; else key,time,frame."""
    if not (records and any(c.lower() in ("key", "frame") for c in records[0][1])):
        return ["key", "time", "frame"]
    line, header = records.pop(0)
    header = [c.lower() for c in header]
    allowed = ("key", "time", "frame", "mouse_x", "mouse_y")
    unknown = [c for c in header if c not in allowed]
    missing = [c for c in ("key", "time", "frame") if c not in header]
    if unknown or missing or len(set(header)) != len(header) or (("mouse_x" in header) != ("mouse_y" in header)):
        raise DataError(f"{path}:{line}: header {','.join(header)!r} is not usable: expected "
                        "the columns key,time,frame and optionally mouse_x,mouse_y")
    return header


def _parse_row(line: int, cells: list[str], columns: list[str], key_parser: KeyParser) -> tuple[int, CsvRow, str]:
    """(frame, row, the key cell as written) of one record; a problem raises ValueError saying it."""
    if len(cells) != len(columns):
        hint = "" if "mouse_x" in columns or len(cells) != 5 else " (mouse columns need a header line)"
        raise ValueError(f"{len(cells)} fields, expected {len(columns)} ({','.join(columns)}){hint}")
    value = dict(zip(columns, cells))
    frame = _parse_frame_number(value["frame"])
    if frame is None:
        raise ValueError(f"frame number {value['frame'][:40]!r} is not a positive integer (1 to {MAX_FRAME_NUMBER:,})")
    try:
        time = float(value["time"])
    except ValueError:
        time = math.nan
    if not math.isfinite(time):
        raise ValueError(f"time {value['time']!r} is not a number")
    if time < 0:
        raise ValueError(f"negative time {time}")
    mouse = None
    if "mouse_x" in columns:
        try:
            mouse = (float(value["mouse_x"]), float(value["mouse_y"]))
        except ValueError:
            mouse = (math.nan, math.nan)
        if not all(math.isfinite(m) for m in mouse):
            raise ValueError(f"mouse_x,mouse_y {value['mouse_x']!r},{value['mouse_y']!r} are not numbers")
    keys, unmapped = key_parser.parse(value["key"])
    return frame, CsvRow(line, time, keys, unmapped, mouse), value["key"]


def _parse_frame_number(text: str) -> int | None:
    try:
        number = float(text)
    except ValueError:
        return None
    if not number.is_integer() or not 1 <= number <= MAX_FRAME_NUMBER:
        return None
    return int(number)


def _describe(row: CsvRow) -> str:
    keys = "".join(sorted(row.keys)) + "".join(f"+{k}" for k in sorted(row.unmapped))
    text = f"keys {keys or 'none'}"
    return text if row.mouse is None else f"{text}, mouse {row.mouse[0]:g},{row.mouse[1]:g}"
