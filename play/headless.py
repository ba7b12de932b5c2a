"""A stream without a browser: a whole action sequence (a script or a recording's own rows)
played block by block, each block's frames composed with the action overlay and handed on
as they come (to video.writer.write_video_stream), so a video of any length takes the
memory of one block."""

import time
from typing import Callable, Iterator

import numpy as np
import torch

from generation.streaming import StreamingGenerator, block_action_chunks
from video.overlay import compose_frames, to_uint8
from wan.shapes import VAE_TIME_STRIDE, video_frame_count


def blocks_covering(rows: int, frames_per_block: int) -> int:
    """The fewest blocks whose frames (1 + 4(nP - 1)) take `rows` action rows."""
    if rows < 1:
        raise ValueError(f"an action sequence needs at least one row, got {rows}")
    frames_per_later_block = VAE_TIME_STRIDE * frames_per_block
    return max(1, -(-(rows - video_frame_count(frames_per_block)) // frames_per_later_block) + 1)


def blocks_within(rows: int, frames_per_block: int) -> int:
    """The most blocks whose frames fit in `rows` frames (0 when not even the first does)."""
    first = video_frame_count(frames_per_block)
    return 0 if rows < first else (rows - first) // (VAE_TIME_STRIDE * frames_per_block) + 1


def fit_rows(rows: torch.Tensor | None, num_frames: int) -> torch.Tensor | None:
    """rows [R, width] cut to num_frames, or held at their last row to reach it."""
    if rows is None or len(rows) >= num_frames:
        return None if rows is None else rows[:num_frames]
    return torch.cat([rows, rows[-1:].expand(num_frames - len(rows), -1)])


def stream_frames(generator: StreamingGenerator, keyboard: torch.Tensor, mouse: torch.Tensor | None, keys,
                  num_blocks: int, truth: Callable[[int, int], np.ndarray] | None = None,
                  on_block: Callable[[int, float, int], None] | None = None) -> Iterator[np.ndarray]:
    """The composed frames [H + strip, n W, 3] uint8 of num_blocks blocks, one at a time.

    keyboard [R, K] and mouse [R, 2] (None: a model without a mouse branch): one row per
    frame, R = 1 + 4(num_blocks P - 1) (see fit_rows). truth(first, count): the real frames
    [count, H, W, 3] uint8 shown beside, when the actions are a recording's. on_block(index,
    seconds, frames): called after each block is generated (the seconds of generate + decode).
    """
    total = video_frame_count(num_blocks * generator.frames_per_block)
    if len(keyboard) != total or (mouse is not None and len(mouse) != total):
        raise ValueError(f"{num_blocks} blocks take {total} action rows, got {len(keyboard)}")
    chunks = block_action_chunks(keyboard[None], None if mouse is None else mouse[None], generator.frames_per_block)
    first = 0
    for index, (keyboard_rows, mouse_rows) in enumerate(chunks):
        start = time.perf_counter()
        block = generator.step(keyboard_rows, mouse_rows)
        video = to_uint8(block.video[0].transpose(0, 1).float().cpu())
        if on_block is not None:
            on_block(index, time.perf_counter() - start, len(video))
        panels = {"generated": video}
        if truth is not None:
            panels["ground truth"] = truth(first, len(video))
        shown_mouse = torch.zeros(len(video), 2) if mouse_rows is None else mouse_rows[0].cpu()
        yield from compose_frames(panels, keyboard_rows[0].cpu(), shown_mouse, keys, numbering=(first, total))
        first += len(video)
