"""The data settings every script shares, as one small object for the library code.

The values themselves live in the scripts' settings blocks (convert_unreal_data.py is
their home; the training and preview scripts take its defaults): library functions only
receive them.
"""

import dataclasses
from dataclasses import dataclass

from wan.shapes import VIDEO_HEIGHT, VIDEO_WIDTH


@dataclass(frozen=True)
class DataSettings:
    """How recordings become clips. Field names are the settings' names in lower case."""

    sequence_length: int         # frames per clip, 4k+1
    clip_stride: int | None      # frames between clip starts; None: sequence_length // 2
    keyboard_keys: tuple         # the keyboard tensor's columns
    key_map: dict                # a recording's key names -> keyboard_keys (or None: not ours)
    mouse_scale: float           # CSV degrees per frame -> the model's units
    invert_mouse_y: bool
    skip_bad_frames: bool        # an unreadable frame becomes a gap instead of an error
    val_fraction: float
    val_block_clips: int
    split_seed: int
    video_height: int = VIDEO_HEIGHT
    video_width: int = VIDEO_WIDTH

    @classmethod
    def from_settings(cls, settings: dict) -> "DataSettings":
        """From a script's settings by NAME (every field's upper-case name must be there)."""
        return cls(**{f.name: settings[f.name.upper()] for f in dataclasses.fields(cls)})

    def as_settings(self) -> dict:
        """NAME -> value, as the scripts and the data report show them."""
        return {f.name.upper(): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes) -> "DataSettings":
        return dataclasses.replace(self, **changes)

    @property
    def stride(self) -> int:
        """CLIP_STRIDE resolved: None means half a clip."""
        return self.sequence_length // 2 if self.clip_stride is None else self.clip_stride


SETTING_NAMES = tuple(f.name.upper() for f in dataclasses.fields(DataSettings))
