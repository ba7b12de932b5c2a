"""The player's input between two blocks: key presses and mouse motion from the page, read
once before each block as that block's one action (STREAMING_SPEC 6.5).

Events arrive on the server's threads at any time; the generating thread takes the action
when it starts a block. A key counts for a block when it is held then, or was pressed since
the last block (a tap shorter than a block is not lost). Mouse motion is summed between
blocks and spread over the frames the block shows, so the view turns as far as the mouse
moved, however fast the machine generates.
"""

import math
import re
import threading
from dataclasses import dataclass

import torch

from play.controls import Controls

KEY_NAME = re.compile(r"[A-Z0-9_]{1,32}")
MAX_KEYS_PER_MESSAGE = 64
MAX_MOTION = 1e5  # pixels in one message; more is not a mouse
MAX_SEQ = 2**53  # a message's number: a whole number the page's JavaScript counts exactly


def _clipped(text: str, most: int = 80) -> str:
    """Text from a message, as an error quotes it (a hostile one can be long)."""
    return text if len(text) <= most else text[:most - 3] + "..."


def _shown(value) -> str:
    return _clipped(repr(value))


class InputError(ValueError):
    """A message from the page that is not what the page sends; the text says what is wrong."""


@dataclass(frozen=True)
class BlockAction:
    keyboard: torch.Tensor          # [K] multi-hot in the model's column order
    mouse: torch.Tensor | None      # [2] (pitch, yaw) per frame; None: the model has no mouse branch
    keys: tuple[str, ...]           # the columns held
    input_seq: int = -1             # the highest message number (`seq`) read into it; -1: none

    def describe(self) -> dict:
        mouse = None if self.mouse is None else [round(v, 4) + 0.0 for v in self.mouse.tolist()]  # no -0.0
        return {"keys": list(self.keys), "mouse": mouse, "seq": self.input_seq}


class InputSession:
    """Held keys and summed mouse motion, safe to use from any thread.

    mouse_sensitivity: model units per pixel, spread over a block's frames (120 px in one
    block at 0.01 -> 0.1 per frame, the models' usual turn); mouse_limit caps each value per
    frame. key_aliases: other names of the columns' keys (e.g. UP -> W), as the recordings'
    KEY_MAP. Pixels: x to the right, y down, as the browser reports them.
    """

    def __init__(self, controls: Controls, mouse_sensitivity: float, mouse_limit: float, key_aliases=None):
        if not (math.isfinite(mouse_sensitivity) and mouse_sensitivity > 0):
            raise ValueError(f"mouse_sensitivity must be a positive number, got {mouse_sensitivity}")
        if not (math.isfinite(mouse_limit) and mouse_limit > 0):
            raise ValueError(f"mouse_limit must be a positive number, got {mouse_limit}")
        self.controls = controls
        self.sensitivity, self.limit = mouse_sensitivity, mouse_limit
        self.aliases = {str(k).upper(): str(v).upper() for k, v in (key_aliases or {}).items()}
        self._lock = threading.Lock()
        self._held: set[str] = set()
        self._tapped: set[str] = set()
        self._motion = [0.0, 0.0]
        self._seq = -1

    # ------------------------------------------------------------------ events

    def press(self, key: str) -> None:
        """Hold one of the model's keys (any other is refused: it would only take memory)."""
        self._check_known([key])
        key = self._name(key)
        with self._lock:
            self._held.add(key)
            self._tapped.add(key)

    def release(self, key: str) -> None:
        key = self._name(key)
        with self._lock:
            self._held.discard(key)

    def release_all(self) -> None:
        """The page lost focus: it will not hear the keys come up."""
        with self._lock:
            self._held.clear()

    def move(self, dx: float, dy: float) -> None:
        with self._lock:
            self._motion[0] += dx
            self._motion[1] += dy

    def apply(self, message) -> None:
        """One message from the page: {"down": [keys], "up": [keys], "move": [dx, dy],
        "release_all": true, "seq": n}, each part optional. Checked whole before any part is
        applied."""
        if not isinstance(message, dict):
            raise InputError(f"an input message is a JSON object, got {type(message).__name__}")
        unknown = sorted(set(message) - {"down", "up", "move", "release_all", "seq"})
        if unknown:
            raise InputError(f"unknown input field(s) {_shown(unknown)}; known: down, up, move, release_all, seq")
        down, up = (self._key_list(message, part) for part in ("down", "up"))
        self._check_known(down + up)
        motion = message.get("move")
        if motion is not None:
            if (not isinstance(motion, list) or len(motion) != 2
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in motion)
                    or not all(math.isfinite(v) and abs(v) <= MAX_MOTION for v in motion)):
                raise InputError(f"move must be [dx, dy], two numbers of pixels below {MAX_MOTION:g}, got "
                                 f"{_shown(motion)}")
        release_all = message.get("release_all", False)
        if not isinstance(release_all, bool):
            raise InputError(f"release_all must be true or false, got {_shown(release_all)}")
        seq = message.get("seq")
        if seq is not None and (not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq < MAX_SEQ):
            raise InputError(f"seq must be a whole number from 0 to 2**53 (the page's number for the message), "
                             f"got {_shown(seq)}")
        if release_all:
            self.release_all()
        for key in down:
            self.press(key)
        for key in up:
            self.release(key)
        if motion is not None:
            self.move(*motion)
        if seq is not None:
            with self._lock:  # the highest: two messages may be answered out of order
                self._seq = max(self._seq, seq)

    # ------------------------------------------------------------------ the block's action

    def take_action(self, frames: int) -> BlockAction:
        """The action of the block about to be generated, which shows `frames` frames; the
        taps and the mouse motion start over."""
        with self._lock:
            active = self._held | self._tapped
            self._tapped = set()
            dx, dy = self._motion
            self._motion = [0.0, 0.0]
            seq = self._seq
        c = self.controls
        columns = [key in active for key in c.keyboard_keys]
        if c.idle_key in c.keyboard_keys and not any(columns):
            columns[c.keyboard_keys.index(c.idle_key)] = True
        keyboard = torch.tensor(columns, dtype=torch.float32)
        mouse = None
        if c.mouse:
            pitch = -dy * self.sensitivity / frames if c.pitch else 0.0  # up the screen = look up = pitch > 0
            yaw = dx * self.sensitivity / frames + sum(turn for key, turn in c.steer_keys if key in active)
            mouse = torch.tensor([self._clip(pitch), self._clip(yaw)], dtype=torch.float32)
        return BlockAction(keyboard, mouse, tuple(k for k, on in zip(c.keyboard_keys, columns) if on), seq)

    def restart(self) -> None:
        """A new stream: forget the taps and the motion (keys still down stay held)."""
        with self._lock:
            self._tapped = set()
            self._motion = [0.0, 0.0]

    def accepted_keys(self) -> list[str]:
        """The key names a message may hold: the model's (its columns and steering keys), and
        the other names of them (key_aliases); any other key is refused, never held."""
        game = self.controls.game_keys
        return list(game) + sorted(alias for alias, key in self.aliases.items() if key in game and alias not in game)

    def held(self) -> list[str]:
        with self._lock:
            return sorted(self._held)

    # ------------------------------------------------------------------ helpers

    def _check_known(self, keys) -> None:
        unknown = sorted({str(key).upper() for key in keys if self._name(key) not in self.controls.game_keys})
        if unknown:
            raise InputError(f"unknown key(s) {_clipped(', '.join(unknown))}: this model's keys are "
                             f"{', '.join(self.accepted_keys())}")

    def _clip(self, value: float) -> float:
        return max(-self.limit, min(self.limit, value))

    def _name(self, key: str) -> str:
        key = str(key).upper()
        return self.aliases.get(key, key)

    @staticmethod
    def _key_list(message: dict, part: str) -> list[str]:
        keys = message.get(part, [])
        if (not isinstance(keys, list) or len(keys) > MAX_KEYS_PER_MESSAGE
                or not all(isinstance(k, str) and KEY_NAME.fullmatch(k.upper()) for k in keys)):
            raise InputError(f"{part} must be a list of at most {MAX_KEYS_PER_MESSAGE} key names "
                             f"(letters, digits, _; up to 32 characters), got {_shown(keys)}")
        return keys
