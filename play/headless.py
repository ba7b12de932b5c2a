"""A stream without a browser: an action sequence (a script or a recording's own rows)
played block by block, each block's frames composed with the action overlay and handed on
as they come (to video.writer.write_video_stream), so a video of any length takes the
memory of one block. A script's rows are made a block at a time too (ActionScript.chunks)."""

import time
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from generation.action_scripts import ActionScript
from generation.streaming import StreamingGenerator, block_action_chunks, block_rows
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


BlockActions = Iterable[tuple[torch.Tensor, torch.Tensor | None]]  # each block's keyboard [R, K], mouse [R, 2]


def sequence_blocks(keyboard: torch.Tensor, mouse: torch.Tensor | None, num_blocks: int,
                    frames_per_block: int) -> BlockActions:
    """Whole sequences keyboard [R, K] and mouse [R, 2] (None: a model without a mouse
    branch), R = 1 + 4(num_blocks P - 1), as each block's rows."""
    total = video_frame_count(num_blocks * frames_per_block)
    if len(keyboard) != total or (mouse is not None and len(mouse) != total):
        raise ValueError(f"{num_blocks} blocks take {total} action rows, got {len(keyboard)}")
    for keyboard_rows, mouse_rows in block_action_chunks(keyboard[None], None if mouse is None else mouse[None],
                                                         frames_per_block):
        yield keyboard_rows[0], None if mouse_rows is None else mouse_rows[0]


def script_blocks(script: ActionScript, num_blocks: int, frames_per_block: int, mouse: bool = True) -> BlockActions:
    """A script's rows as each block's, made a block at a time, its last row held past its
    end; mouse=False: None for a model without a mouse branch."""
    sizes = (block_rows(index, frames_per_block) for index in range(num_blocks))
    for keyboard_rows, mouse_rows in script.chunks(sizes):
        yield keyboard_rows, mouse_rows if mouse else None


def stream_frames(generator: StreamingGenerator, actions: BlockActions, keys, num_blocks: int,
                  truth: Callable[[int, int], np.ndarray] | None = None,
                  on_block: Callable[[int, float, int], None] | None = None) -> Iterator[np.ndarray]:
    """The composed frames [H + strip, n W, 3] uint8 of num_blocks blocks, one at a time.

    actions: each block's keyboard [R, K] and mouse [R, 2] rows (None: a model without a
    mouse branch), R = the block's frames (9, then 12; see sequence_blocks and
    script_blocks). truth(first, count): the real frames [count, H, W, 3] uint8 shown
    beside, when the actions are a recording's. on_block(index, seconds, frames): called
    after each block is generated (the seconds of generate + decode).
    """
    total = video_frame_count(num_blocks * generator.frames_per_block)
    first = 0
    for index, (keyboard_rows, mouse_rows) in enumerate(actions):
        if index == num_blocks:
            break
        start = time.perf_counter()
        block = generator.step(keyboard_rows[None], None if mouse_rows is None else mouse_rows[None])
        video = to_uint8(block.video[0].transpose(0, 1).float().cpu())
        if on_block is not None:
            on_block(index, time.perf_counter() - start, len(video))
        panels = {"generated": video}
        if truth is not None:
            panels["ground truth"] = truth(first, len(video))
        shown_mouse = torch.zeros(len(video), 2) if mouse_rows is None else mouse_rows.cpu()
        yield from compose_frames(panels, keyboard_rows.cpu(), shown_mouse, keys, numbering=(first, total))
        first += len(video)
