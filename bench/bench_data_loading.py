"""Raw-frame clip loading speed: clips/s and MB/s through RecordingClipDataset + DataLoader.

    python bench/bench_data_loading.py [--frames 169] [--clips 12] [--workers 0,1,2]

Writes a demo recording at 352x640 into a temporary folder, then loads 57-frame clips with
0, 1 and 2 DataLoader workers. "PNG MB/s" is compressed input read, "tensor MB/s" the float32
video produced. The first batch (worker start-up) is timed separately. Also splits one
clip's time into PNG decoding, crop/resize and the conversion to float.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import convert_unreal_data as data  # noqa: E402
from demo_world.recording import write_demo_recording  # noqa: E402
from recordings.clips import RecordingClipDataset  # noqa: E402
from recordings.frames import _resize_rgb, open_frame, to_model_range  # noqa: E402
from recordings.report import check_data  # noqa: E402
from wan.shapes import VIDEO_HEIGHT, VIDEO_WIDTH  # noqa: E402


def time_loader(dataset, workers: int, clips: int) -> tuple[float, float]:
    """(seconds to the first clip, seconds for the next `clips` clips)."""
    loader = DataLoader(dataset, batch_size=1, num_workers=workers, shuffle=False)
    start = time.perf_counter()
    batches = iter(loader)
    next(batches)
    first = time.perf_counter()
    for _ in range(clips):
        next(batches)
    end = time.perf_counter()
    del batches
    return first - start, end - first


def one_clip_breakdown(clip, height: int, width: int) -> dict:
    """Per-frame milliseconds of the three steps of loading a clip, single-threaded."""
    decode = resize = 0.0
    frames = np.empty((clip.num_frames, height, width, 3), np.uint8)
    for t, path in enumerate(clip.frame_paths):
        t0 = time.perf_counter()
        image = open_frame(path)
        t1 = time.perf_counter()
        frames[t] = _resize_rgb(image, height, width)
        t2 = time.perf_counter()
        image.close()
        decode, resize = decode + t1 - t0, resize + t2 - t1
    t0 = time.perf_counter()
    to_model_range(torch.from_numpy(frames).permute(3, 0, 1, 2).contiguous())
    convert = time.perf_counter() - t0
    n = clip.num_frames
    return {"decode": 1000 * decode / n, "crop/resize": 1000 * resize / n, "to float": 1000 * convert / n}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=169, help="frames in the demo recording (default 169)")
    parser.add_argument("--clips", type=int, default=12, help="clips timed per worker count (default 12)")
    parser.add_argument("--workers", default="0,1,2", help="comma-separated worker counts (default 0,1,2)")
    args = parser.parse_args()
    length, height, width = data.SEQUENCE_LENGTH, VIDEO_HEIGHT, VIDEO_WIDTH

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "demo"
        start = time.perf_counter()
        write_demo_recording(folder, num_frames=args.frames, height=height, width=width)
        print(f"demo recording: {args.frames} frames {width}x{height} written in {time.perf_counter() - start:.1f} s")
        report = check_data(folder, data.data_settings({}).replace(sequence_length=length, clip_stride=4, val_fraction=0, video_height=height, video_width=width))
        report.raise_for_problems()
        clips = report.clips
        count = min(args.clips, len(clips) - 1)
        png_mb = np.mean([sum(os.path.getsize(p) for p in c.frame_paths) for c in clips]) / 1e6
        tensor_mb = 3 * length * height * width * 4 / 1e6
        print(f"clip: {length} frames {width}x{height}; {png_mb:.1f} MB of PNG (compress_level 1) -> "
              f"{tensor_mb:.0f} MB float32 video")
        print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
        steps = one_clip_breakdown(clips[0], height, width)
        print("one clip, per frame: " + ", ".join(f"{k} {v:.2f} ms" for k, v in steps.items()))

        dataset = RecordingClipDataset(clips, height, width)
        print(f"{'workers':>7}  {'first clip s':>12}  {'clips/s':>7}  {'PNG MB/s':>8}  {'tensor MB/s':>11}")
        for workers in (int(w) for w in args.workers.split(",")):
            first, seconds = time_loader(dataset, workers, count)
            rate = count / seconds
            print(f"{workers:>7}  {first:>12.2f}  {rate:>7.2f}  {rate * png_mb:>8.1f}  {rate * tensor_mb:>11.0f}")


if __name__ == "__main__":
    main()
