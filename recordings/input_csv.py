"""input.csv: one row per frame - the keys held, the frame number, the time and optionally
the mouse - read with pandas in the layouts recorders write: with a header or without,
our column names or theirs (recognised by name, or named in CSV_COLUMNS), extra columns
(ignored), any separator (detected, or CSV_SEPARATOR), UTF-8 with or without a BOM, UTF-16
with a BOM or another encoding (CSV_ENCODING), CRLF, quotes, blank lines, rows in any
order, a frame logged twice; keys as 'WA', 'aw', 'W+A', 'WSpaceBar', '=' or empty.

Every problem names the file and line. Problems of one kind are one message with their
count and first lines, and each message says what fixes it.
"""

import codecs
import csv
import io
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from recordings.errors import DataError
from recordings.layout import (COLUMN_ALIASES, COLUMNS, HEADERLESS_COLUMNS, MAX_CSV_COLUMNS, MAX_FRAME_NUMBER,
                               SEPARATOR_NAMES, SEPARATORS, normalise_column_name)

CSV_NAME = "input.csv"
LINES_SHOWN = 5           # line numbers a problem message lists
SNIFF_LINES = 50          # lines the separator is detected from
SEPARATOR_CANDIDATES = (",", ";", "\t", "|")
LINE_BREAK = re.compile(r"\r\n|\r|\n")
FLOAT32_MAX = float(np.finfo(np.float32).max)  # for messages

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



# -----------------------------------------------------------------------------
# What was read

@dataclass
class CsvLayout:
    """How an input.csv was read: what the report says was found and adapted."""

    encoding: str                # "UTF-8", "UTF-8 with BOM", "UTF-16 with BOM" or CSV_ENCODING's name
    separator: str               # the separator character
    header: tuple | None         # the header line's names as written; None: no header line
    columns: dict                # our column -> its 0-based position in the file
    ignored: tuple = ()          # header names of the columns that are not read
    mapped: bool = False         # CSV_COLUMNS named some columns
    decimal_comma: bool = False  # numbers written 0,04 (only where ',' is not the separator)

    def describe(self) -> str:
        if self.header is None:
            default = {name: i for i, name in enumerate(HEADERLESS_COLUMNS)}
            text = "no header, " + (",".join(HEADERLESS_COLUMNS) if self.columns == default else ", ".join(
                f"{name}=column {i + 1}" for name, i in sorted(self.columns.items(), key=lambda item: item[1])))
        else:
            text = "header " + ",".join(name for name in self.header if name)
            if any(self.header[i].lower() != name for name, i in self.columns.items()):
                text += " read as " + ", ".join(f"{name}={self.header[i]}" for name, i in
                                                sorted(self.columns.items(), key=lambda item: item[1]))
                text += " (CSV_COLUMNS)" if self.mapped else " (recognised by name)"
        if self.ignored:
            text += "; ignored columns: " + ", ".join(self.ignored)
        comma = "; decimal commas" if self.decimal_comma else ""
        return f"{text}; {SEPARATOR_NAMES[self.separator]} separated{comma}; {self.encoding}"


@dataclass
class InputCsv:
    """The rows of an input.csv, one per frame, sorted by frame."""

    path: Path
    layout: CsvLayout
    frames: np.ndarray           # [N] int64, sorted, distinct: each row's frame (CSV_FRAME_OFFSET applied)
    lines: np.ndarray            # [N] int64: the file line of each row
    keyboard: np.ndarray         # [N, K] float32 multi-hot, in KEYBOARD_KEYS order
    mouse: np.ndarray | None     # [N, 2] float32 (mouse_x, mouse_y) as written; None: no mouse columns
    duplicate_lines: list        # lines repeating an earlier row of their frame exactly (merged into it)
    out_of_order_lines: list     # lines whose frame comes before the previous row's (sorted into place)
    unmapped_keys: Counter       # key name -> rows holding it
    unmapped_examples: dict      # key name -> "'WSpace' (input.csv line 40)"

    @property
    def has_mouse(self) -> bool:
        return self.mouse is not None

    @property
    def duplicate_rows(self) -> int:
        return len(self.duplicate_lines)

    def line_of(self, frame: int) -> int | None:
        index = np.searchsorted(self.frames, frame)
        return int(self.lines[index]) if index < len(self.frames) and self.frames[index] == frame else None


class FileProblems:
    """A file's problems by kind: one message per kind, with the count and the first lines."""

    def __init__(self, path: Path):
        self.path = path
        self.kinds = {}  # kind -> (fix, [(line, detail)])

    def add(self, kind, line: int, detail: str, fix: str = "") -> None:
        self.kinds.setdefault(kind, (fix, []))[1].append((line, detail))

    def messages(self) -> list[str]:
        messages = []
        for fix, found in sorted(((fix, sorted(found)) for fix, found in self.kinds.values()),
                                 key=lambda entry: entry[1][0][0]):
            (first, detail), lines = found[0], [line for line, _ in found]
            text = f"{self.path}:{first}: {detail}"
            if len(lines) > 1:
                shown = ", ".join(map(str, lines[:LINES_SHOWN])) + (", ..." if len(lines) > LINES_SHOWN else "")
                text += f" ({len(lines):,} rows like this: lines {shown})"
            messages.append(text + (f" - {fix}" if fix else ""))
        return messages

    def raise_if_any(self) -> None:
        if self.kinds:
            raise DataError(self.messages())


# -----------------------------------------------------------------------------
# Reading

def parse_input_csv(path, key_parser: KeyParser, columns: dict | None = None, separator: str = "auto",
                    encoding: str = "auto", frame_offset: int = 0) -> InputCsv:
    """Read an input.csv (columns, separator, encoding, frame_offset: CSV_COLUMNS, CSV_SEPARATOR,
    CSV_ENCODING, CSV_FRAME_OFFSET). Every problem raises DataError naming file:line."""
    path = Path(path)
    text, found_encoding = _decode(path, encoding)
    sep = SEPARATORS[separator] or detect_separator(text)
    cells, lines = _read_cells(text, sep, path)
    if not len(cells):
        raise DataError(f"{path}:1: no rows (expected one row per frame: key,time,frame)")
    layout, has_header = _find_columns(cells[0], int(lines[0]), dict(columns or {}), path, sep, found_encoding)
    if has_header:
        header_line, cells, lines = int(lines[0]), cells[1:], lines[1:]
        if not len(cells):
            raise DataError(f"{path}:{header_line}: no rows after the header (expected one row per frame)")
    return _check_rows(path, cells, lines, layout, key_parser, frame_offset)


def _decode(path: Path, encoding: str) -> tuple[str, str]:
    """The file's text and its encoding as found ("auto": UTF-8 with or without a BOM, or UTF-16
    with a BOM). Text that cannot be decoded raises DataError naming the line and CSV_ENCODING."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"{path}: cannot read ({error})") from None
    if encoding == "auto":
        if raw.startswith(codecs.BOM_UTF8):
            codec, found = "utf-8-sig", "UTF-8 with BOM"
        elif raw.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
            codec, found = "utf-16", "UTF-16 with BOM"
        elif b"\x00" in raw:
            guess = "UTF-16" if raw[1:2] == b"\x00" or raw[:1] == b"\x00" else "binary"
            raise DataError(f"{path}: not UTF-8 text - it holds NUL bytes ({guess}?). Save it as UTF-8 CSV, or set "
                            "CSV_ENCODING to its encoding ('utf-16-le' or 'utf-16-be' for UTF-16 without a BOM)")
        else:
            codec, found = "utf-8", "UTF-8"
    else:
        codec, found = encoding, encoding
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as error:
        line = len(LINE_BREAK.findall(raw[:error.start].decode(codec, errors="replace"))) + 1
        fix = ("save the file as UTF-8, or set CSV_ENCODING to its encoding (e.g. 'cp1252' for Windows' Western "
               "European)") if encoding == "auto" else "check CSV_ENCODING"
        raise DataError(f"{path}:{line}: not {found} text (byte {raw[error.start]:#04x} at offset {error.start}) - "
                        f"{fix}") from None
    if codec != "utf-8-sig":
        text = text.removeprefix("\ufeff")
    if "\x00" in text:
        line = len(LINE_BREAK.findall(text[:text.index("\x00")])) + 1
        raise DataError(f"{path}:{line}: a NUL character: not {found} text - save it as UTF-8 CSV, or set "
                        "CSV_ENCODING to its encoding")
    return text, found


def detect_separator(text: str) -> str:
    """The candidate that splits the first lines into the same number of fields (at least two),
    the most fields winning; ',' when none does. Quoted fields are honoured."""
    sample = [line for line in LINE_BREAK.split(text, maxsplit=4 * SNIFF_LINES) if line.strip()][:SNIFF_LINES]
    best, best_score = ",", (False, 0)
    for candidate in SEPARATOR_CANDIDATES:
        counts = Counter(len(fields) for fields in csv.reader(sample, delimiter=candidate, skipinitialspace=True))
        fields, _ = counts.most_common(1)[0] if counts else (1, 0)
        score = (len(counts) == 1, fields)
        if fields >= 2 and score > best_score:
            best, best_score = candidate, score
    return best


def _read_cells(text: str, sep: str, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(stripped cells [R, W] of every non-blank record, the file line where each starts)."""
    physical = LINE_BREAK.split(text)
    width = 1 + max((line.count(sep) for line in physical), default=0)
    if width > MAX_CSV_COLUMNS:
        line = next(i for i, text_line in enumerate(physical, 1) if text_line.count(sep) >= MAX_CSV_COLUMNS)
        raise DataError(f"{path}:{line}: more than {MAX_CSV_COLUMNS} fields; an input.csv has a few columns - check "
                        f"CSV_SEPARATOR (read as {SEPARATOR_NAMES[sep]} separated)")
    if not text.strip():
        return np.empty((0, width), object), np.empty(0, np.int64)
    try:
        table = pd.read_csv(io.StringIO(text), sep=sep, header=None, names=range(width), dtype=str,
                            na_filter=False, skip_blank_lines=False, skipinitialspace=True, quotechar='"',
                            engine="c", index_col=False)
    except (pd.errors.ParserError, ValueError) as error:
        reason = " ".join(str(error).split())[:200]
        raise DataError(f"{path}: cannot be read as CSV ({reason}) - an unclosed quote (\")?") from None
    table = table.apply(lambda column: column.str.strip())
    cells = table.to_numpy(dtype=object)
    # pandas numbers records, not lines: a quoted field may hold line breaks
    breaks = table.apply(lambda column: column.str.count(LINE_BREAK.pattern)).to_numpy().sum(axis=1) \
        if '"' in text else np.zeros(len(cells), np.int64)
    lines = 1 + np.arange(len(cells)) + np.concatenate([[0], np.cumsum(breaks)[:-1]]).astype(np.int64)
    nonblank = (cells != "").any(axis=1)
    return cells[nonblank], lines[nonblank]


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _find_columns(first: np.ndarray, line: int, mapping: dict, path: Path, sep: str,
                  encoding: str) -> tuple[CsvLayout, bool]:
    """The columns, from the first record: a header (when it names a column or holds no number)
    or the headerless key,time,frame; CSV_COLUMNS (mapping) decides where it names a column."""
    first = [str(cell) for cell in first]
    while first and not first[-1]:
        first.pop()  # a trailing separator
    names = {ours: source.strip().lower() for ours, source in mapping.items() if isinstance(source, str)}
    positions = {ours: source - 1 for ours, source in mapping.items() if isinstance(source, int)}
    normalised = [normalise_column_name(cell) for cell in first]
    known = {alias for aliases in COLUMN_ALIASES.values() for alias in aliases} | set(COLUMNS)
    named = any(n in known for n in normalised) or any(cell.lower() in names.values() for cell in first)
    numbers = sum(_is_number(cell) for cell in first)
    header = numbers == 0 or (named and numbers < 2)
    where = f"{path}:{line}"
    problems = []
    if header:
        found = _header_columns(first, normalised, names, positions, problems)
    else:
        if names:
            raise DataError(f"{where}: CSV_COLUMNS names header columns ({', '.join(map(repr, names.values()))}), "
                            f"but this file has no header line (line {line} is data): map our columns to column "
                            "numbers (1 = the first), or add a header line")
        found = {name: i for i, name in enumerate(HEADERLESS_COLUMNS)
                 if name not in positions and i not in positions.values()}
        found.update(positions)
    missing = [name for name in ("key", "frame") if name not in found]
    shown = ",".join(first)
    if missing:
        problems.append(f"the header {shown!r} has no {' or '.join(missing)} column: name yours in CSV_COLUMNS, e.g. "
                        "CSV_COLUMNS = {\"key\": \"Keys\", \"frame\": \"FrameNumber\"} (our columns: key, time, "
                        "frame, mouse_x, mouse_y; names like Keys, Timestamp, FrameNumber, MouseDeltaX are "
                        "recognised without it)")
    if ("mouse_x" in found) != ("mouse_y" in found):
        has, lacks = ("mouse_x", "mouse_y") if "mouse_x" in found else ("mouse_y", "mouse_x")
        problems.append(f"the header {shown!r} has a {has} column but no {lacks}: name both in CSV_COLUMNS, or "
                        "neither")
    if problems:
        raise DataError([f"{where}: {problem}" for problem in problems])
    ignored = tuple(cell for i, cell in enumerate(first) if i not in found.values() and cell) if header else ()
    return CsvLayout(encoding, sep, tuple(first) if header else None, found, ignored, bool(mapping)), header


def _header_columns(header: list, normalised: list, names: dict, positions: dict, problems: list) -> dict:
    """Our column -> position in a header: CSV_COLUMNS' names and numbers first, then our own
    and the usual names, compared without case, spaces or '_'."""
    found = {}
    for ours, position in positions.items():
        if position >= len(header):
            problems.append(f"CSV_COLUMNS maps {ours} to column {position + 1}, but the header has "
                            f"{len(header)} columns: {','.join(header)}")
        else:
            found[ours] = position
    for ours, name in names.items():
        matches = [i for i, cell in enumerate(header) if cell.lower() == name] or \
            [i for i, n in enumerate(normalised) if n == normalise_column_name(name)]
        if len(matches) == 1:
            found[ours] = matches[0]
        else:
            problems.append(f"CSV_COLUMNS maps {ours} to {name!r}, but the header "
                            + (f"has no such column: {','.join(header)}" if not matches else
                               f"has it {len(matches)} times (columns {', '.join(str(i + 1) for i in matches)})"))
    for ours in COLUMNS:
        if ours in found or ours in names:
            continue
        candidates = [i for i, n in enumerate(normalised)
                      if (n == normalise_column_name(ours) or n in COLUMN_ALIASES[ours]) and i not in found.values()]
        if len(candidates) > 1:
            problems.append(f"the header's columns {', '.join(repr(header[i]) for i in candidates)} could each be "
                            f"{ours}: say which in CSV_COLUMNS, e.g. CSV_COLUMNS = {{{ours!r}: {header[candidates[0]]!r}}}")
        elif candidates:
            found[ours] = candidates[0]
    return found


def _numbers(cells, layout: CsvLayout) -> np.ndarray:
    """float64 of each cell (NaN where it is not a number), correctly rounded like float(). Where
    ',' is not the separator, a decimal comma (0,04: Excel in many locales) is read as a point."""
    cells = pd.Series(cells, dtype=object)
    if layout.separator != ",":
        commas = cells.str.fullmatch(r"[-+]?\d*,\d+(?:[eE][-+]?\d+)?")
        if commas.any():
            layout.decimal_comma = True
            cells = cells.where(~commas, cells.str.replace(",", ".", regex=False))
    return pd.to_numeric(cells, errors="coerce").to_numpy(np.float64, na_value=np.nan)


def _check_rows(path: Path, cells: np.ndarray, lines: np.ndarray, layout: CsvLayout, key_parser: KeyParser,
                frame_offset: int) -> InputCsv:
    """The rows of cells (each checked, the problems of all of them raised together), merged
    and sorted into one row per frame."""
    problems = FileProblems(path)
    ok = _check_fields(cells, lines, layout, problems)
    frame_text = cells[:, layout.columns["frame"]]
    frames = _frame_numbers(frame_text, lines, layout, frame_offset, ok, problems)
    times = _times(cells, lines, layout, ok, problems)
    mouse = _mouse(cells, frame_text, lines, layout, ok, problems)
    keys = KeyColumn(cells[:, layout.columns["key"]], key_parser)
    kept, duplicate_lines, out_of_order = _one_row_per_frame(frames, lines, ok, keys, mouse, problems)
    frames = frames[kept]
    if times is not None:
        _check_time_order(times[kept], frames, lines[kept], problems)
    problems.raise_if_any()
    unmapped_keys, examples = keys.unmapped(kept, lines)
    return InputCsv(path, layout, frames, lines[kept].astype(np.int64), keys.keyboard[keys.text_of_row[kept]],
                    None if mouse is None else mouse[kept].astype(np.float32), sorted(duplicate_lines),
                    out_of_order, unmapped_keys, examples)


def _check_fields(cells: np.ndarray, lines: np.ndarray, layout: CsvLayout, problems: FileProblems) -> np.ndarray:
    """Which rows have the fields the columns need (counted up to the last non-empty one: a
    trailing separator is not a field, and an empty key is no key)."""
    columns = layout.columns
    width = max(len(layout.header or ()), max(columns.values()) + 1)
    needed = max(columns[name] for name in columns if name != "key") + 1
    fields = cells.shape[1] - np.argmax((cells != "")[:, ::-1], axis=1)
    ok = (fields <= width) & (fields >= needed)
    for i in np.flatnonzero(~ok):
        count = int(fields[i])
        fix = f"fix the row, or check CSV_SEPARATOR (read as {SEPARATOR_NAMES[layout.separator]} separated)"
        if layout.header is None and count == 5 and width == 3:
            fix = ("if the last two are the mouse, add the header line key,time,frame,mouse_x,mouse_y (or map "
                   "mouse_x and mouse_y to columns 4 and 5 in CSV_COLUMNS)")
        problems.add(("fields", count), int(lines[i]),
                     f"{count} fields, expected {width} ({','.join(_names(layout, width))})", fix)
    return ok


def _frame_numbers(text: np.ndarray, lines: np.ndarray, layout: CsvLayout, offset: int, ok: np.ndarray,
                   problems: FileProblems) -> np.ndarray:
    """int64 frame of each row, CSV_FRAME_OFFSET added; rows without a valid one leave ok."""
    numbers = _numbers(text, layout) + offset
    valid = np.isfinite(numbers) & (numbers == np.floor(numbers)) & (numbers >= 0) & (numbers <= MAX_FRAME_NUMBER)
    after = f" (after CSV_FRAME_OFFSET={offset})" if offset else ""
    for i in np.flatnonzero(ok & ~valid):
        problems.add("frame", int(lines[i]), f"frame number {text[i][:40]!r} is not a whole number from 0 to "
                     f"{MAX_FRAME_NUMBER:,}{after}", "fix the row, or name the frame-number column in CSV_COLUMNS")
    ok &= valid
    return np.where(valid, numbers, -1).astype(np.int64)


def _times(cells: np.ndarray, lines: np.ndarray, layout: CsvLayout, ok: np.ndarray,
           problems: FileProblems) -> np.ndarray | None:
    """float64 time of each row (None without a time column); a bad one leaves ok."""
    if "time" not in layout.columns:
        return None
    text = cells[:, layout.columns["time"]]
    times = _numbers(text, layout)
    fix = "fix the row (time is in seconds), or name the time column in CSV_COLUMNS"
    for i in np.flatnonzero(ok & ~np.isfinite(times)):
        problems.add("time", int(lines[i]), f"time {text[i][:40]!r} is not a number", fix)
    for i in np.flatnonzero(ok & np.isfinite(times) & (times < 0)):
        problems.add("negative time", int(lines[i]), f"negative time {times[i]:g}", fix)
    ok &= np.isfinite(times) & (times >= 0)
    return times


def _mouse(cells: np.ndarray, frame_text: np.ndarray, lines: np.ndarray, layout: CsvLayout, ok: np.ndarray,
           problems: FileProblems) -> np.ndarray | None:
    """float64 (mouse_x, mouse_y) of each row (None without mouse columns). A value that is not
    finite, or is not once converted to float32 - the model's number type - leaves ok."""
    if "mouse_x" not in layout.columns:
        return None
    text = cells[:, [layout.columns["mouse_x"], layout.columns["mouse_y"]]]
    mouse = np.stack([_numbers(text[:, 0], layout), _numbers(text[:, 1], layout)], axis=1)
    finite = np.isfinite(mouse).all(axis=1)
    with np.errstate(over="ignore"):
        fits = np.isfinite(mouse.astype(np.float32)).all(axis=1)
    for i in np.flatnonzero(ok & ~finite):
        problems.add("mouse", int(lines[i]), f"frame {frame_text[i][:40]}: mouse_x,mouse_y {text[i, 0][:40]!r},"
                     f"{text[i, 1][:40]!r} are not finite numbers",
                     "fix the row (no movement is 0), or name the mouse columns in CSV_COLUMNS")
    for i in np.flatnonzero(ok & finite & ~fits):
        problems.add("mouse overflow", int(lines[i]), f"frame {frame_text[i][:40]}: mouse_x,mouse_y {text[i, 0][:40]},"
                     f"{text[i, 1][:40]} overflow float32 (beyond {FLOAT32_MAX:.3g}), the model's number type",
                     "fix the row: a mouse delta is degrees per frame")
    ok &= fits
    return mouse


class KeyColumn:
    """The key cells, parsed once per distinct text: multi-hot rows, and an identity per text
    that is the same for texts meaning the same keys (WA, AW)."""

    def __init__(self, text: np.ndarray, key_parser: KeyParser):
        self.texts, self.text_of_row = np.unique(text.astype(str), return_inverse=True)
        self.parsed = [key_parser.parse(t) for t in self.texts]
        keys = key_parser.keyboard_keys
        self.keyboard = np.zeros((len(self.texts), len(keys)), np.float32)
        identities = {}
        self.identity = np.zeros(len(self.texts), np.int64)
        for t, (held, unmapped) in enumerate(self.parsed):
            self.keyboard[t, [keys.index(k) for k in held]] = 1.0
            self.identity[t] = identities.setdefault((held, tuple(sorted(unmapped))), len(identities))

    def same(self, row_a: int, row_b: int) -> bool:
        return self.identity[self.text_of_row[row_a]] == self.identity[self.text_of_row[row_b]]

    def describe(self, row: int) -> str:
        held, unmapped = self.parsed[self.text_of_row[row]]
        return "".join(sorted(held)) + "".join(f"+{k}" for k in sorted(unmapped)) or "none"

    def unmapped(self, rows: np.ndarray, lines: np.ndarray) -> tuple[Counter, dict]:
        """(key name -> rows holding it, key name -> an example row) over rows, not in KEYBOARD_KEYS/KEY_MAP."""
        counts, examples = Counter(), {}
        rows_of_text = np.bincount(self.text_of_row[rows], minlength=len(self.texts))
        first_line = np.full(len(self.texts), np.iinfo(np.int64).max)
        np.minimum.at(first_line, self.text_of_row[rows], lines[rows])
        for t in np.argsort(first_line, kind="stable")[:np.count_nonzero(rows_of_text)]:
            for name in self.parsed[t][1]:
                counts[name] += int(rows_of_text[t])
                examples.setdefault(name, f"{str(self.texts[t])!r} ({CSV_NAME} line {first_line[t]})")
        return counts, examples


def _one_row_per_frame(frames: np.ndarray, lines: np.ndarray, ok: np.ndarray, keys: KeyColumn,
                       mouse: np.ndarray | None, problems: FileProblems) -> tuple[np.ndarray, list, list]:
    """(the rows kept, in frame order; lines merged into an identical row of their frame; lines
    out of frame order). Rows of one frame that disagree are a problem naming both lines."""
    kept = np.flatnonzero(ok)
    out_of_order = lines[kept][1:][frames[kept][1:] < frames[kept][:-1]].tolist()
    kept = kept[np.argsort(frames[kept], kind="stable")]
    repeats = np.flatnonzero(frames[kept][1:] == frames[kept][:-1]) + 1
    duplicate_lines, first, merged = [], {}, np.zeros(len(kept), bool)
    for i in repeats:
        first[i] = first.get(i - 1, i - 1)
        a, b = kept[first[i]], kept[i]
        if keys.same(a, b) and (mouse is None or np.array_equal(mouse[a], mouse[b])):
            duplicate_lines.append(int(lines[b]))
        else:
            problems.add("disagree", int(lines[b]), f"frame {frames[b]} already has a row at line {lines[a]} that "
                         f"disagrees ({_describe(keys, mouse, a)} there, {_describe(keys, mouse, b)} here)",
                         "remove the wrong one of the two rows")
        merged[i] = True
    return kept[~merged], duplicate_lines, out_of_order


def _check_time_order(times: np.ndarray, frames: np.ndarray, lines: np.ndarray, problems: FileProblems) -> None:
    """Time never goes backwards from frame to frame (it would mean the columns are mixed up)."""
    for i in np.flatnonzero(times[1:] < times[:-1]) + 1:
        problems.add("time backwards", int(lines[i]), f"time goes backwards ({times[i]:g} at frame {frames[i]}, after "
                     f"{times[i - 1]:g} at frame {frames[i - 1]}, line {lines[i - 1]})",
                     "fix the rows, or check that CSV_COLUMNS names the right time and frame columns")


def _names(layout: CsvLayout, width: int) -> list[str]:
    if layout.header is not None:
        return [name for name in layout.header if name]
    by_position = {i: name for name, i in layout.columns.items()}
    return [by_position.get(i, "?") for i in range(width)]


def _describe(keys: KeyColumn, mouse: np.ndarray | None, row: int) -> str:
    text = f"keys {keys.describe(row)}"
    return text if mouse is None else f"{text}, mouse {mouse[row, 0]:g},{mouse[row, 1]:g}"
