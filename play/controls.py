"""What the player's keys and mouse mean to a model: its keyboard columns, and the few
rules of the official students' scripts (STREAMING_SPEC 6.6) - templerun always holds one
column (no-move when nothing else is held), gta_drive steers with A/D and the mouse's yaw."""

from dataclasses import dataclass

from generation.streaming import STUDENT_KEYBOARD_KEYS

STEER_TURN = 0.1  # yaw per frame of a steering key (the gta_drive script's A and D: -0.1, +0.1)


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
