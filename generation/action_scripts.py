"""Action scripts: a line of text -> the keyboard and mouse rows of every frame.

    W*24 A*8 W+mouse(0.1,0)*12 W+A*4 idle*8 mouse(0,-0.1)*8
"""

import math
import re

import numpy as np
import torch

from generation.errors import GenerationError


class ActionScriptError(GenerationError):
    pass


def parse_action_script(script: str, keyboard_keys, max_rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """A text script -> keyboard [N, K] (multi-hot in KEYBOARD_KEYS order), mouse [N, 2].

    The script is terms separated by spaces; each term is one frame's input, repeated
    `*count` times (count a positive whole number; default 1). A term holds keys of
    KEYBOARD_KEYS (any case), `mouse(pitch,yaw)` and `idle` (nothing held), joined by `+`:

        W*24 A*8 W+mouse(0.1,0)*12 W+A*4 idle*8 mouse(0,-0.1)*8

    mouse values are in the model's units, the training data's (pitch, yaw) after
    MOUSE_SCALE: yaw > 0 turns right, pitch > 0 looks up, and 0.1 per frame is the base
    model's usual turn. Row i is frame i's input, the first frame's row included. A script
    that would give more than max_rows rows is refused before any row is made.
    """
    keys = [str(k).upper() for k in keyboard_keys]
    keyboard, mouse, rows = [], [], 0
    terms = list(_script_terms(script))
    if not terms:
        raise ActionScriptError("ACTIONS is empty: give terms like W*24 A*8 W+mouse(0.1,0)*12")
    for number, (term, column) in enumerate(terms, 1):
        def bad(problem: str) -> ActionScriptError:
            return ActionScriptError(f"ACTIONS term {number} {term!r} (column {column}): {problem}")

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
        if max_rows is not None and rows > max_rows:
            raise bad(f"the script already gives {rows:,} rows here, more than the {max_rows} frames asked for "
                      "(NUM_FRAMES): one row per frame")
        row, motion = np.zeros(len(keys), np.float32), None
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
                raise bad(f"{part!r} is not a key of KEYBOARD_KEYS ({', '.join(keys)}), 'idle' or "
                          f"mouse(pitch,yaw){hint}")
        keyboard += [row] * count
        mouse += [motion or (0.0, 0.0)] * count
    return torch.from_numpy(np.stack(keyboard)), torch.tensor(mouse, dtype=torch.float32)


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
