"""Writing video: MP4 through PyAV (FFmpeg's encoders), GIF through PIL, atomically.

write_video takes a whole clip; write_video_stream takes frames as they come (a stream of
any length in constant memory: each frame is encoded and let go before the next is drawn).
"""

from pathlib import Path
from typing import Iterable

import numpy as np
from PIL import Image

from wan.files import write_atomic
from wan.shapes import FPS


def write_video(path, frames: np.ndarray, fps: int = FPS) -> Path:
    """frames [T, H, W, 3] uint8 -> path (.mp4 or .gif), atomically. Without PyAV an .mp4
    becomes a .gif beside it (said on stdout). Returns the path written."""
    path = Path(path)
    if path.suffix.lower() == ".mp4":
        try:
            import av
        except ImportError:
            path = path.with_suffix(".gif")
            print(f"PyAV is not installed (pip install av), so the preview is a GIF: {path}")
        else:
            return write_atomic(path, lambda tmp: _write_mp4(av, tmp, frames, fps))
    return write_atomic(path, lambda tmp: _write_gif(tmp, frames, fps))


def write_video_stream(path, frames: Iterable[np.ndarray], fps: int = FPS) -> tuple[Path, int]:
    """Frames [H, W, 3] uint8, one at a time from any iterable (a generator: drawn only as the
    encoder takes them) -> an MP4 at path, atomically: the frames go to a temporary file
    that is renamed to path once the last one is in, so an interrupted stream leaves no
    file that looks whole. Returns (path, frames written). Needs PyAV (a GIF would hold
    every frame until the end)."""
    path = Path(path)
    if path.suffix.lower() != ".mp4":
        raise ValueError(f"{path}: a streamed video must be an .mp4")
    try:
        import av
    except ImportError:
        raise ValueError(f"writing {path} needs PyAV: pip install av") from None
    written = 0

    def counted():
        nonlocal written
        for frame in frames:
            written += 1
            yield frame

    write_atomic(path, lambda tmp: _write_mp4(av, tmp, counted(), fps))
    return path, written


def mp4_codec(av) -> str:
    """H.264 (libx264, in PyAV's wheels) where present, else MPEG-4 part 2 (FFmpeg's own)."""
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # PyAV raises its own errors for an unknown codec, by version
            continue
    raise ValueError("this PyAV build has neither the libx264 nor the mpeg4 encoder; write a .gif instead")


def _write_mp4(av, filename: str, frames: Iterable[np.ndarray], fps: int) -> None:
    """Encode frames as they come; the stream takes the first frame's size (every frame must have it)."""
    codec = mp4_codec(av)
    with av.open(filename, mode="w", format="mp4") as container:
        stream, size = None, None
        for frame in frames:
            if stream is None:
                size = frame.shape
                if len(size) != 3 or size[2] != 3 or frame.dtype != np.uint8 or size[0] % 2 or size[1] % 2:
                    raise ValueError(f"video frames must be [H, W, 3] uint8 with even H and W, got "
                                     f"{list(size)} {frame.dtype}")
                stream = container.add_stream(codec, rate=fps)
                stream.height, stream.width = size[:2]
                stream.pix_fmt = "yuv420p"
                if codec == "libx264":
                    stream.options = {"crf": "18", "preset": "medium"}
                else:
                    stream.bit_rate = 8_000_000
            elif frame.shape != size:
                raise ValueError(f"video frames must all be {list(size)}, got {list(frame.shape)}")
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        if stream is None:
            raise ValueError("no frames to write")
        container.mux(stream.encode())


def _write_gif(filename: str, frames: np.ndarray, fps: int) -> None:
    images = [Image.fromarray(f) for f in frames]
    images[0].save(filename, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps),
                   loop=0)
