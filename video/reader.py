"""Reading a written video back: a few frames of an MP4 (PyAV) or GIF (PIL), e.g. to show a
preview as a still in TensorBoard."""

from pathlib import Path

import numpy as np
from PIL import Image, ImageSequence


def read_frames(path) -> list[np.ndarray]:
    """Every frame of an .mp4 or .gif as [H, W, 3] uint8."""
    path = Path(path)
    if path.suffix.lower() == ".mp4":
        import av

        with av.open(str(path)) as container:
            return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]
    with Image.open(path) as image:
        return [np.asarray(frame.convert("RGB")) for frame in ImageSequence.Iterator(image)]


def frame_grid(frames: list[np.ndarray], count: int, columns: int, max_width: int) -> np.ndarray:
    """count frames spread evenly over the video (its first and last included), tiled
    `columns` to a row, each scaled down to at most max_width / columns pixels wide:
    [H, W, 3] uint8."""
    if not frames:
        raise ValueError("no frames to tile")
    count = min(count, len(frames))
    picked = [frames[round(i * (len(frames) - 1) / max(1, count - 1))] for i in range(count)]
    height, width = picked[0].shape[:2]
    scale = min(1.0, max_width / columns / width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    tiles = [np.asarray(Image.fromarray(f).resize(size, Image.BILINEAR)) if scale < 1 else f for f in picked]
    rows = -(-count // columns)
    grid = np.full((rows * size[1], min(columns, count) * size[0], 3), 255, np.uint8)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, columns)
        grid[r * size[1]:(r + 1) * size[1], c * size[0]:(c + 1) * size[0]] = tile
    return grid
