"""The data settings every script shares, as one small object for the library code.

The values themselves live in the scripts' settings blocks (convert_unreal_data.py is
their home; the training and preview scripts take its defaults): library functions only
receive them.
"""

import dataclasses
from dataclasses import dataclass, field

from recordings.layout import DEFAULT_FRAME_NAME, FrameName, check_layout_settings
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
    # how the recorder lays out a recording (recordings/layout.py)
    frame_name: str = DEFAULT_FRAME_NAME  # the frame files' names, one number placeholder
    csv_columns: dict = field(default_factory=dict)  # our column -> the CSV's header name or 1-based number
    csv_separator: str = "auto"  # "auto" or the separator
    csv_encoding: str = "auto"   # "auto" or a Python text encoding
    csv_frame_offset: int = 0    # the file number of CSV frame n is n + csv_frame_offset

    @classmethod
    def from_settings(cls, settings: dict) -> "DataSettings":
        """From a script's settings by NAME (every field's upper-case name must be there)."""
        return cls(**{f.name: settings[f.name.upper()] for f in dataclasses.fields(cls)})

    def as_settings(self) -> dict:
        """NAME -> value, as the scripts and the data report show them."""
        return {f.name.upper(): getattr(self, f.name) for f in dataclasses.fields(self)}

    def replace(self, **changes) -> "DataSettings":
        return dataclasses.replace(self, **changes)

    def check_layout(self) -> None:
        """DataError naming every layout setting with a value its rule refuses."""
        check_layout_settings(self.as_settings())

    @property
    def frames_identity(self) -> str | None:
        """What decides which files are a recording's frames, for a run's resume check (None:
        the default naming, so that runs from before FRAME_NAME existed still resume)."""
        self.check_layout()
        return FrameName(self.frame_name).identity

    @property
    def stride(self) -> int:
        """CLIP_STRIDE resolved: None means half a clip."""
        return self.sequence_length // 2 if self.clip_stride is None else self.clip_stride


SETTING_NAMES = tuple(f.name.upper() for f in dataclasses.fields(DataSettings))
