"""Action scripts: a line of text -> the keyboard and mouse rows of every frame.

    W*24 A*8 W+mouse(0.1,0)*12 W+A*4 idle*8 mouse(0,-0.1)*8

A script is read into its terms first (read_action_script: one row and a count per term,
every problem named, nothing expanded), then expanded whole (ActionScript.tensors, for a
preview's fixed length) or a block at a time (ActionScript.chunks, for a stream of any
length in the memory of one block).
"""

import math
import re
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

from generation.errors import GenerationError
from wan.shapes import FPS

MAX_SCRIPT_ROWS = 3600 * FPS  # an hour of video at 25 fps: a script that says more is a typo


class ActionScriptError(GenerationError):
    pass


@dataclass(frozen=True)
class ActionTerm:
    keyboard: tuple[float, ...]      # one row, multi-hot in KEYBOARD_KEYS order
    mouse: tuple[float, float]       # (pitch, yaw)
    count: int                       # frames it holds for


@dataclass(frozen=True)
class ActionScript:
    terms: tuple[ActionTerm, ...]
    keys: tuple[str, ...]            # the keyboard columns, in order

    @property
    def rows(self) -> int:
        return sum(term.count for term in self.terms)

    @property
    def uses_mouse(self) -> bool:
        return any(term.mouse != (0.0, 0.0) for term in self.terms)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """keyboard [N, K] and mouse [N, 2], every row of the script."""
        return next(self.chunks([self.rows]))

    def chunks(self, sizes: Iterable[int]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The script's rows in successive chunks of these sizes (keyboard [n, K], mouse
        [n, 2]), its last row held past its end; only one chunk exists at a time."""
        term_index, left = 0, self.terms[0].count
        for size in sizes:
            pieces = []
            while size > 0:
                while left == 0 and term_index + 1 < len(self.terms):
                    term_index += 1
                    left = self.terms[term_index].count
                term = self.terms[term_index]
                take = size if left == 0 else min(left, size)  # left 0 at the end: hold the last row
                pieces.append((term, take))
                left -= min(left, take)
                size -= take
            yield (torch.cat([torch.tensor(t.keyboard, dtype=torch.float32).expand(n, -1) for t, n in pieces]),
                   torch.cat([torch.tensor(t.mouse, dtype=torch.float32).expand(n, -1) for t, n in pieces]))


def parse_action_script(script: str, keyboard_keys, max_rows: int | None = None,
                        limit: str = "asked for (NUM_FRAMES)") -> tuple[torch.Tensor, torch.Tensor]:
    """A text script -> keyboard [N, K] (multi-hot in KEYBOARD_KEYS order), mouse [N, 2]
    (see read_action_script)."""
    return read_action_script(script, keyboard_keys, max_rows, limit).tensors()


def read_action_script(script: str, keyboard_keys, max_rows: int | None = None,
                       limit: str = "asked for (NUM_FRAMES)") -> ActionScript:
    """A text script -> its terms, checked, none expanded.

    The script is terms separated by spaces; each term is one frame's input, repeated
    `*count` times (count a positive whole number; default 1). A term holds keys of
    KEYBOARD_KEYS (any case), `mouse(pitch,yaw)` and `idle` (nothing held), joined by `+`:

        W*24 A*8 W+mouse(0.1,0)*12 W+A*4 idle*8 mouse(0,-0.1)*8

    mouse values are in the model's units, the training data's (pitch, yaw) after
    MOUSE_SCALE: yaw > 0 turns right, pitch > 0 looks up, and 0.1 per frame is the base
    model's usual turn. Row i is frame i's input, the first frame's row included. A script
    that would give more than max_rows rows (None: MAX_SCRIPT_ROWS) is refused at the term
    that passes it (limit says where the bound comes from), before any row is made.
    """
    if max_rows is None:
        max_rows, limit = MAX_SCRIPT_ROWS, "of an hour at 25 fps, the most a script may give"
    keys = [str(k).upper() for k in keyboard_keys]
    terms, rows = [], 0
    found = list(_script_terms(script))
    if not found:
        raise ActionScriptError("ACTIONS is empty: give terms like W*24 A*8 W+mouse(0.1,0)*12")
    for number, (term, column) in enumerate(found, 1):
        def bad(problem: str) -> ActionScriptError:
            return ActionScriptError(f"ACTIONS term {number} {term[:60]!r} (column {column}): {problem}")

        body, count = term, 1
        split = _top_level_split(term, "*")
        if len(split) > 2:
            raise bad("more than one '*count'")
        if len(split) == 2:
            body, count_text = split
            count_text = count_text.strip()
            if not re.fullmatch(r"\d{1,12}", count_text) or int(count_text) < 1:
                raise bad(f"the count after '*' must be a positive whole number, got {count_text[:20]!r}")
            count = int(count_text)
        rows += count
        if rows > max_rows:
            raise bad(f"the script already gives {rows:,} rows here, more than the {max_rows:,} frames {limit}: "
                      "one row per frame")
        row, motion = [0.0] * len(keys), None
        for part in _top_level_split(body, "+"):
            part = part.strip()
            mouse_call = re.fullmatch(r"mouse\s*\((.*)\)", part, re.IGNORECASE | re.DOTALL)
            if mouse_call:
                if motion is not None:
                    raise bad("mouse(...) appears twice")
                motion = _mouse_values(mouse_call.group(1), bad)
            elif part.upper() in keys:
                row[keys.index(part.upper())] = 1.0
            elif part.lower() == "idle":
                pass
            elif not part:
                raise bad("an empty part: join keys with one '+', e.g. W+A")
            else:
                hint = ("; hold several keys with '+', e.g. " + "+".join(part.upper())
                        if len(part) > 1 and all(c in keys for c in part.upper()) else "")
                raise bad(f"{part[:40]!r} is not a key of KEYBOARD_KEYS ({', '.join(keys)}), 'idle' or "
                          f"mouse(pitch,yaw){hint}")
        terms.append(ActionTerm(tuple(row), motion or (0.0, 0.0), count))
    return ActionScript(tuple(terms), tuple(keys))


def _script_terms(script: str):
    """(term, 1-based column) for each whitespace-separated term; spaces inside (...) stay."""
    term, start, depth = "", 0, 0
    for column, char in enumerate(script + " ", 1):
        if char.isspace() and depth == 0:
            if term:
                yield term, start
            term = ""
            continue
        if not term:
            start = column
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            raise ActionScriptError(f"ACTIONS column {column}: ')' without '('")
        term += char
    if depth:
        raise ActionScriptError(f"ACTIONS term {term.strip()!r} (column {start}): '(' without ')'")


def _top_level_split(text: str, separator: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def _mouse_values(arguments: str, bad) -> tuple[float, float]:
    values = [v.strip() for v in arguments.split(",")]
    try:
        pitch, yaw = (float(v) for v in values)
    except ValueError:
        raise bad(f"mouse(pitch,yaw) needs two numbers, got mouse({arguments})") from None
    if not (math.isfinite(pitch) and math.isfinite(yaw)):
        raise bad(f"mouse values must be finite, got mouse({arguments})")
    return pitch, yaw


def check_action_rows(rows: int, num_frames: int) -> None:
    if rows != num_frames:
        change = f"add {num_frames - rows} rows" if rows < num_frames else f"remove {rows - num_frames} rows"
        raise ActionScriptError(f"ACTIONS gives {rows} rows but NUM_FRAMES is {num_frames}: one row per frame, "
                                f"the first frame's included ({change}, or set NUM_FRAMES to match; it must be 4k+1)")
