"""Writing video: MP4 through PyAV (FFmpeg's encoders), GIF through PIL, atomically."""

from pathlib import Path

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


def mp4_codec(av) -> str:
    """H.264 (libx264, in PyAV's wheels) where present, else MPEG-4 part 2 (FFmpeg's own)."""
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # PyAV raises its own errors for an unknown codec, by version
            continue
    raise ValueError("this PyAV build has neither the libx264 nor the mpeg4 encoder; write a .gif instead")


def _write_mp4(av, filename: str, frames: np.ndarray, fps: int) -> None:
    codec = mp4_codec(av)
    with av.open(filename, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "medium"}
        else:
            stream.bit_rate = 8_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _write_gif(filename: str, frames: np.ndarray, fps: int) -> None:
    images = [Image.fromarray(f) for f in frames]
    images[0].save(filename, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps),
                   loop=0)
