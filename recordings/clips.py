"""Clips: fixed-length windows of a segment (4k+1 frames, never across a gap), the
leak-free train/validation split, and the Dataset that decodes a clip's frames."""

import random
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from recordings.errors import DataError
from recordings.frames import load_frame_pixels, to_model_range
from recordings.recording import Segment
from wan.shapes import check_frame_count, check_image_size


@dataclass(frozen=True, eq=False)
class ClipRef:
    """One training clip: everything needed to load it, nothing loaded yet."""

    recording: str               # Recording.name
    segment: int                 # index into the recording's segments
    first_frame: int             # 1-based frame number of the clip's first frame
    frame_paths: tuple           # str paths, one per frame
    keyboard: torch.Tensor       # [T, K] float32 multi-hot
    mouse: torch.Tensor          # [T, 2] float32 (pitch, yaw), scaled

    @property
    def num_frames(self) -> int:
        return len(self.frame_paths)

    @property
    def last_frame(self) -> int:
        return self.first_frame + self.num_frames - 1

    @property
    def clip_id(self) -> str:
        return f"{self.recording}:{self.first_frame}-{self.last_frame}"


def resolve_clip_stride(sequence_length: int, clip_stride: int | None) -> int:
    stride = sequence_length // 2 if clip_stride is None else clip_stride
    if not isinstance(stride, int) or stride < 1:
        raise DataError(f"CLIP_STRIDE must be a positive number of frames or None, got {clip_stride!r}")
    return stride


def clip_starts(segment: Segment, sequence_length: int, stride: int) -> range:
    """First frames of the clips that fit in a segment; a tail shorter than a clip gets none."""
    return range(segment.first, segment.last - sequence_length + 2, stride)


def index_clips(recordings, sequence_length: int, clip_stride: int | None) -> list[ClipRef]:
    """Every clip of every segment, in recording and frame order; never across a gap or recording."""
    check_frame_count(sequence_length, "SEQUENCE_LENGTH")
    stride = resolve_clip_stride(sequence_length, clip_stride)
    clips = []
    for recording in recordings:
        for index, segment in enumerate(recording.segments):
            for first in clip_starts(segment, sequence_length, stride):
                keyboard, mouse = recording.actions(first, sequence_length)
                clips.append(ClipRef(
                    recording=recording.name, segment=index, first_frame=first,
                    frame_paths=tuple(str(recording.frame_files[f]) for f in range(first, first + sequence_length)),
                    keyboard=torch.from_numpy(keyboard), mouse=torch.from_numpy(mouse),
                ))
    return clips


@dataclass
class Split:
    train: list
    val: list
    dropped: list                # training clips sharing a frame with a validation clip
    note: str = ""               # why there is no validation set, if there is none

    @property
    def used(self) -> list:
        """The clips training reads (and the latent cache must hold): train, then validation."""
        return self.train + self.val


def split_train_val(clips, val_fraction: float, seed: int, block_clips: int) -> Split:
    """Hold out runs of consecutive clips (time ranges) for validation; drop the training
    clips that would share a frame with them, so nothing leaks.

    Each segment's clips are cut into blocks of block_clips; a seeded shuffle picks blocks
    until round(val_fraction * clips) (at least 1) are held out, the last block only in part.
    """
    if not 0 <= val_fraction < 1:
        raise DataError(f"VAL_FRACTION must be in [0, 1), got {val_fraction}")
    if block_clips < 1:
        raise DataError(f"VAL_BLOCK_CLIPS must be at least 1, got {block_clips}")
    if val_fraction == 0:
        return Split(list(clips), [], [], "VAL_FRACTION is 0")
    target = max(1, round(val_fraction * len(clips)))
    blocks, run = [], []
    for clip in clips:
        if run and (run[-1].recording, run[-1].segment) != (clip.recording, clip.segment):
            blocks.append(run)
            run = []
        run.append(clip)
        if len(run) == block_clips:
            blocks.append(run)
            run = []
    if run:
        blocks.append(run)
    random.Random(seed).shuffle(blocks)
    held_out = set()
    for block in blocks:
        held_out.update(id(c) for c in block[:target - len(held_out)])
        if len(held_out) == target:
            break

    val = [c for c in clips if id(c) in held_out]
    val_frames = {}
    for clip in val:
        val_frames.setdefault(clip.recording, set()).update(range(clip.first_frame, clip.last_frame + 1))
    train, dropped = [], []
    for clip in clips:
        if id(clip) in held_out:
            continue
        frames = val_frames.get(clip.recording, set())
        overlaps = not frames.isdisjoint(range(clip.first_frame, clip.last_frame + 1))
        (dropped if overlaps else train).append(clip)
    if not train:
        return Split(list(clips), [], [], f"too few clips ({len(clips)}) for a validation split "
                                          "that leaves training clips")
    return Split(train, val, dropped)



class RecordingClipDataset(Dataset):
    """Clips decoded from their PNG frames on every access.

    Item: video [3, T, H, W] float32 in [-1, 1], keyboard [T, K], mouse [T, 2] (float32),
    recording (str, relative to DATA_DIR), first_frame (int, 1-based). A frame that fails
    to decode raises DataError naming the file.
    """

    def __init__(self, clips, height: int, width: int):
        check_image_size(height, width)
        self.clips = list(clips)
        self.height, self.width = height, width

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        clip = self.clips[index]
        frames = np.empty((clip.num_frames, self.height, self.width, 3), np.uint8)
        for t, path in enumerate(clip.frame_paths):
            frames[t] = load_frame_pixels(path, self.height, self.width)
        # One transpose of the uint8 clip, then the float passes over contiguous memory: far
        # faster than converting frame by frame into a strided [3, T, H, W] output.
        video = to_model_range(torch.from_numpy(frames).permute(3, 0, 1, 2).contiguous())
        return {
            "video": video,
            "keyboard": clip.keyboard.clone(),
            "mouse": clip.mouse.clone(),
            "recording": clip.recording,
            "first_frame": clip.first_frame,
        }
