"""How a recorder lays out a recording, and the settings that adapt other layouts:
FRAME_NAME (the frame files' names), CSV_COLUMNS (which column of input.csv is which),
CSV_SEPARATOR, CSV_ENCODING and CSV_FRAME_OFFSET.

Each setting's check returns what is expected of a value it refuses (or None), so that
cli/settings.py's SETTING_RULES and the data check share one rule per setting.
"""

import codecs
import re

from recordings.errors import DataError

# 1e9 frames is over a year at 25 fps: a larger number is a renamed or damaged file, not a recording
MAX_FRAME_NUMBER = 1_000_000_000
DEFAULT_FRAME_NAME = "frame_%04d.png"
MAX_NAME_LENGTH = 255

# input.csv's columns, in the order a headerless file has them (key,time,frame), then the mouse
COLUMNS = ("key", "time", "frame", "mouse_x", "mouse_y")
HEADERLESS_COLUMNS = ("key", "time", "frame")
REQUIRED_COLUMNS = ("key", "frame")
MAX_CSV_COLUMNS = 256     # a line with more fields than this is not a recorder's
# Header names recognised without CSV_COLUMNS, compared in lower case without spaces, '_', '-', '.'
COLUMN_ALIASES = {
    "key": ("key", "keys", "keyboard", "keyspressed", "pressedkeys", "heldkeys", "input", "inputs"),
    "time": ("time", "times", "timestamp", "seconds", "timeseconds", "elapsed", "elapsedtime", "gametime"),
    "frame": ("frame", "frames", "framenumber", "frameno", "framenum", "frameindex", "frameid", "framecount"),
    "mouse_x": ("mousex", "mousedx", "mousedeltax", "mousexdelta", "deltax", "dx", "mousemovex", "mouseyaw"),
    "mouse_y": ("mousey", "mousedy", "mousedeltay", "mouseydelta", "deltay", "dy", "mousemovey", "mousepitch"),
}
SEPARATORS = {"auto": None, ",": ",", ";": ";", "tab": "\t", "\t": "\t", "\\t": "\t", "|": "|"}
SEPARATOR_NAMES = {",": "','", ";": "';'", "\t": "tab", "|": "'|'"}


def normalise_column_name(name: str) -> str:
    return re.sub(r"[\s_\-.]+", "", str(name)).lower()


# -----------------------------------------------------------------------------
# FRAME_NAME

PLACEHOLDER = re.compile(r"%(0?\d*)d|#+")


class FrameName:
    """FRAME_NAME: a file name with one frame-number placeholder - %d, %04d (printf) or
    #### - matched case-insensitively with any zero padding and any first number."""

    def __init__(self, pattern: str):
        problem = frame_name_problem(pattern)
        if problem:
            raise DataError(f"FRAME_NAME={pattern!r}: {problem}")
        match = PLACEHOLDER.search(pattern)
        self.pattern = pattern
        self.prefix, self.suffix = pattern[:match.start()], pattern[match.end():]
        self.regex = re.compile(re.escape(self.prefix) + r"(\d+)" + re.escape(self.suffix), re.IGNORECASE)

    def digits(self, file_name: str) -> str | None:
        """The number part of a frame file's name, or None when the name is not a frame's."""
        match = self.regex.fullmatch(file_name)
        return match.group(1) if match else None

    def name(self, number: int, width: int = 4) -> str:
        """A frame's file name, for messages (real files are always found by listing the folder)."""
        return f"{self.prefix}{number:0{width}d}{self.suffix}"

    @property
    def generic(self) -> str:
        return f"{self.prefix}*{self.suffix}"

    @property
    def identity(self) -> str | None:
        """What decides which files are frames, for a run's resume check: None for the
        default naming (so runs from before FRAME_NAME existed still resume)."""
        default = FrameName(DEFAULT_FRAME_NAME) if self.pattern != DEFAULT_FRAME_NAME else self
        same = (self.prefix.lower(), self.suffix.lower()) == (default.prefix.lower(), default.suffix.lower())
        return None if same else self.generic


def suggest_frame_name(file_name: str) -> str | None:
    """A FRAME_NAME for a file like this one: its last run of digits as the number."""
    runs = list(re.finditer(r"\d+", file_name))
    if not runs or "%" in file_name or "#" in file_name:
        return None
    last = runs[-1]
    return f"{file_name[:last.start()]}%0{len(last.group())}d{file_name[last.end():]}"


def frame_name_problem(value) -> str | None:
    """What is expected of a FRAME_NAME it refuses, or None."""
    if not isinstance(value, str) or not value.strip():
        return "must be a file name with one frame-number placeholder, e.g. 'frame_%04d.png' or 'shot.####.png'"
    if len(value) > MAX_NAME_LENGTH:
        return f"must be at most {MAX_NAME_LENGTH} characters"
    if "/" in value or "\\" in value or "\x00" in value or value.startswith("~"):
        return ("must be a file name inside the recording's folder, not a path (no '/', '\\' or '~'): frames are "
                "only ever looked for in the recording's own folder")
    placeholders = PLACEHOLDER.findall(value)
    if len(placeholders) != 1 or "%" in PLACEHOLDER.sub("", value):
        return (f"must hold exactly one frame-number placeholder (%d, %04d or ####), found {len(placeholders)}"
                " (a literal '%' or '#' elsewhere is not allowed)")
    return None


# -----------------------------------------------------------------------------
# CSV_COLUMNS, CSV_SEPARATOR, CSV_ENCODING, CSV_FRAME_OFFSET

def csv_columns_problem(value) -> str | None:
    """What is expected of a CSV_COLUMNS it refuses, or None. CSV_COLUMNS maps our column
    names to the CSV's header names (any case) or to 1-based column numbers."""
    expected = ("must be a dict from our column names (key, time, frame, mouse_x, mouse_y) to the CSV's header "
                "names or 1-based column numbers, e.g. {\"key\": \"Keys\", \"frame\": \"FrameNumber\"}")
    if not isinstance(value, dict):
        return expected
    unknown = [name for name in value if name not in COLUMNS]
    if unknown:
        return f"names {', '.join(map(repr, unknown))}, which is not one of our columns: {expected}"
    for name, source in value.items():
        if isinstance(source, bool) or not isinstance(source, (str, int)):
            return f"maps {name!r} to {source!r}: {expected}"
        if isinstance(source, int) and not 1 <= source <= MAX_CSV_COLUMNS:
            return f"maps {name!r} to column {source}: column numbers run from 1 to {MAX_CSV_COLUMNS}"
        if isinstance(source, str) and not 0 < len(source.strip()) <= MAX_NAME_LENGTH:
            return f"maps {name!r} to {source!r}: a header name has 1 to {MAX_NAME_LENGTH} characters"
    sources = [s.strip().lower() if isinstance(s, str) else s for s in value.values()]
    if len(set(sources)) != len(sources):
        return "maps two of our columns to the same CSV column"
    return None


def csv_separator_problem(value) -> str | None:
    if value not in SEPARATORS:
        return "must be one of 'auto' (detected), ',', ';', 'tab' or '|'"
    return None


def csv_encoding_problem(value) -> str | None:
    if value == "auto":
        return None
    try:
        if not isinstance(value, str) or len(value) > 40:
            raise LookupError
        b"csv".decode(value)  # also refuses codecs that do not decode bytes to text (base64, ...)
    except UnicodeDecodeError:
        pass  # a text encoding in which these bytes are not text (utf-16 needs an even count)
    except LookupError:
        return "must be 'auto' (UTF-8 with or without a BOM, UTF-16 with a BOM) or a Python text encoding, " \
               "e.g. 'cp1252', 'latin-1', 'utf-16-le'"
    return None


def csv_frame_offset_problem(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or abs(value) > MAX_FRAME_NUMBER:
        return f"must be a whole number from {-MAX_FRAME_NUMBER:,} to {MAX_FRAME_NUMBER:,}"
    return None


LAYOUT_RULES = {"FRAME_NAME": frame_name_problem, "CSV_COLUMNS": csv_columns_problem,
                "CSV_SEPARATOR": csv_separator_problem, "CSV_ENCODING": csv_encoding_problem,
                "CSV_FRAME_OFFSET": csv_frame_offset_problem}


def check_layout_settings(settings: dict) -> None:
    """DataError naming every layout setting (NAME -> value) that breaks its rule."""
    problems = [f"{name}={settings[name]!r}: {problem}" for name, rule in LAYOUT_RULES.items()
                if name in settings and (problem := rule(settings[name]))]
    if problems:
        raise DataError(problems)
