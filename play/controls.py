"""What the player's keys and mouse mean to a model: its keyboard columns, and the few
rules of the official students' scripts (STREAMING_SPEC 6.6) - templerun always holds one
column (no-move when nothing else is held), gta_drive steers with A/D and the mouse's yaw."""

from dataclasses import dataclass

from generation.streaming import STUDENT_KEYBOARD_KEYS

STEER_TURN = 0.1  # yaw per frame of a steering key (the gta_drive script's A and D: -0.1, +0.1)

# What each key does, as the page shows it: the official students' vocabularies (STREAMING_SPEC
# 6.6), then the usual meaning of a key for a fine-tuned model's own columns (its recordings
# say what they do; a key not here is shown by its name alone).
MODE_KEY_MEANINGS = {
    "universal": {"W": "forward", "S": "back", "A": "strafe left", "D": "strafe right"},
    "gta_drive": {"W": "accelerate", "S": "brake / reverse", "A": "steer left", "D": "steer right"},
    "templerun": {"Q": "no move", "W": "jump", "S": "slide", "Z": "turn left", "C": "turn right",
                  "A": "left side", "D": "right side"},
}
USUAL_KEY_MEANINGS = {"W": "forward", "S": "back", "A": "left", "D": "right", "UP": "forward", "DOWN": "back",
                      "LEFT": "left", "RIGHT": "right", "SPACE": "jump", "SHIFT": "sprint", "CTRL": "crouch",
                      "C": "crouch", "E": "use", "F": "use", "R": "reload", "Q": "lean / ability"}
# The page's own keys: the first of each list that is not one of the model's keys. They work
# while the mouse is captured, when the buttons cannot be clicked.
PAUSE_KEYS = ("P", "PAUSE", "F8")
RESTART_KEYS = ("R", "BACKSPACE", "F9")


@dataclass(frozen=True)
class Controls:
    keyboard_keys: tuple[str, ...]            # the model's keyboard columns, in order
    mouse: bool                               # the model has a mouse branch
    pitch: bool = True                        # the mouse's up/down reaches the model
    idle_key: str | None = None               # the column held while no other one is
    steer_keys: tuple[tuple[str, float], ...] = ()  # keys that turn (yaw per frame), not columns

    @property
    def game_keys(self) -> tuple[str, ...]:
        """Every key that does something: the page keeps them from the browser."""
        return self.keyboard_keys + tuple(key for key, _ in self.steer_keys)


def controls_for(mode: str, keyboard_keys, has_mouse: bool) -> Controls:
    """The controls of a model with these columns; a student's own vocabulary adds its
    mode's rules, any other set of columns (a fine-tuned model's) is keys plus mouse."""
    keys = tuple(str(k).upper() for k in keyboard_keys)
    if keys != STUDENT_KEYBOARD_KEYS.get(mode):
        return Controls(keys, has_mouse)
    if mode == "templerun" and not has_mouse:
        return Controls(keys, False, pitch=False, idle_key="Q")
    if mode == "gta_drive" and has_mouse:
        return Controls(keys, True, pitch=False, steer_keys=(("A", -STEER_TURN), ("D", STEER_TURN)))
    return Controls(keys, has_mouse)


def key_meanings(mode: str, controls: Controls) -> dict[str, str]:
    """What each of the model's keys does ({key: words}); a student of `mode` with the
    mode's own columns takes the mode's vocabulary, any other model the usual meanings."""
    own = controls.keyboard_keys == STUDENT_KEYBOARD_KEYS.get(mode)
    meanings = MODE_KEY_MEANINGS[mode] if own else USUAL_KEY_MEANINGS
    return {key: meanings[key] for key in controls.game_keys if key in meanings}


def page_keys(controls: Controls) -> dict[str, str | None]:
    """The keys of the page's Pause and Restart: the first of PAUSE_KEYS and RESTART_KEYS that
    the model does not use (None where it uses them all: the buttons only)."""
    return {action: next((key for key in keys if key not in controls.game_keys), None)
            for action, keys in (("pause", PAUSE_KEYS), ("restart", RESTART_KEYS))}


def page_controls(mode: str, controls: Controls, mouse_limit: float) -> dict:
    """What the page needs to know about the controls (part of /status): the model's keys, the
    keys it keeps from the browser, what each does, the page's own keys, the mouse."""
    return {"keys": list(controls.keyboard_keys), "capture": list(controls.game_keys),
            "meanings": key_meanings(mode, controls), "page_keys": page_keys(controls),
            "mouse": controls.mouse, "pitch": controls.pitch, "mouse_limit": mouse_limit}
