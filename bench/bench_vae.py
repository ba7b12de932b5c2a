"""Wan2.1 VAE: encode throughput (frames/s at 352x640), decode time and peak memory, tiled and untiled.

Real config (dim 96) with random weights: speed does not depend on the values. CPU runs
float32 on a short clip (--cpu-frames, default 5 frames: 2 latent frames) because a 57-frame
CPU encode takes minutes; CUDA, when present, runs the full 57-frame clip in bf16 (as
Matrix-Game encodes) and float32, and also tries channels-last-3d memory format in bf16.
Tiled runs use --tile/--stride in latent units (default 24x44 / 20x36: 2x2 tiles over a
44x80 latent frame); Matrix-Game's own (44,80)/(23,38) is a single whole-frame tile, i.e.
identical to untiled.

    python bench/bench_vae.py [--cpu-frames 5] [--cuda-frames 57] [--repeats 3] [--no-cpu]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory import GIB, measure_case  # noqa: E402

from wan.shapes import LATENT_CHANNELS, VIDEO_HEIGHT, VIDEO_WIDTH, latent_frame_count, latent_size  # noqa: E402
from wan.vae import VAEConfig, WanVAE  # noqa: E402

def timed(fn, repeats: int, sync) -> float:
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def parse_pair(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.split(","))
    return height, width


def cpu_cases(vae: WanVAE, frames: int, tile, stride, repeats: int) -> None:
    video = torch.rand(1, 3, frames, VIDEO_HEIGHT, VIDEO_WIDTH) * 2 - 1
    vae.encode(video[:, :, :1])  # warm-up on one frame
    latents = torch.randn(1, LATENT_CHANNELS, latent_frame_count(frames), *latent_size(VIDEO_HEIGHT, VIDEO_WIDTH))
    cases = [
        ("encode untiled", lambda: vae.encode(video), frames),
        (f"encode tiled {tile}/{stride}", lambda: vae.encode(video, tile, stride), frames),
        ("decode untiled", lambda: vae.decode(latents), frames),
        (f"decode tiled {tile}/{stride}", lambda: vae.decode(latents, tile, stride), frames),
    ]
    for name, fn, n in cases:
        seconds, before, peak, exact = measure_case(lambda: timed(fn, repeats, sync=lambda: None))
        note = "" if exact else " (VmHWM not resettable: process-wide peak)"
        print(f"  {name:34s} {seconds:8.2f} s  {n / seconds:7.3f} frames/s  "
              f"peak RSS {peak / GIB:5.2f} GiB (+{(peak - before) / GIB:.2f} over the loaded model){note}", flush=True)


def to_channels_last(vae: WanVAE) -> WanVAE:
    for p in vae.parameters():
        if p.ndim == 5:
            p.data = p.data.contiguous(memory_format=torch.channels_last_3d)
    return vae


def cuda_cases(frames: int, tile, stride, repeats: int) -> None:
    device = torch.device("cuda")
    print(f"CUDA on {torch.cuda.get_device_name(device)}, real config, {frames} frames at "
          f"{VIDEO_HEIGHT}x{VIDEO_WIDTH}; median of {repeats} after a warm-up")
    base = torch.rand(1, 3, frames, VIDEO_HEIGHT, VIDEO_WIDTH, device=device) * 2 - 1
    for dtype, channels_last in ((torch.bfloat16, False), (torch.bfloat16, True), (torch.float32, False)):
        torch.manual_seed(0)
        vae = WanVAE(VAEConfig()).eval().to(device, dtype)
        video = base.to(dtype)
        if channels_last:
            vae, video = to_channels_last(vae), video.contiguous(memory_format=torch.channels_last_3d)
        latents = vae.encode(video)
        weights = torch.cuda.memory_allocated(device)
        label = f"{str(dtype).removeprefix('torch.')}{' channels-last-3d' if channels_last else ''}"
        cases = [("encode untiled", lambda: vae.encode(video)),
                 (f"encode tiled {tile}/{stride}", lambda: vae.encode(video, tile, stride)),
                 ("decode untiled", lambda: vae.decode(latents)),
                 (f"decode tiled {tile}/{stride}", lambda: vae.decode(latents, tile, stride))]
        if channels_last:
            cases = cases[:1] + cases[2:3]
        for name, fn in cases:
            fn()  # warm-up (cuDNN algorithm choice)
            torch.cuda.reset_peak_memory_stats(device)
            seconds = timed(fn, repeats, sync=torch.cuda.synchronize)
            peak = torch.cuda.max_memory_allocated(device)
            print(f"  {label:26s} {name:34s} {seconds:7.3f} s  {frames / seconds:7.1f} frames/s  "
                  f"peak {peak / GIB:5.2f} GiB (+{(peak - weights) / GIB:.2f} over weights and inputs)", flush=True)
        del vae, video, latents
        torch.cuda.empty_cache()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-frames", type=int, default=5)
    parser.add_argument("--cuda-frames", type=int, default=57)
    parser.add_argument("--tile", type=parse_pair, default=(24, 44), help="latent units, H,W")
    parser.add_argument("--stride", type=parse_pair, default=(20, 36), help="latent units, H,W")
    parser.add_argument("--repeats", type=int, default=3, help="CUDA repeats (CPU runs each case once)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU part")
    args = parser.parse_args()
    if not args.no_cpu:
        torch.manual_seed(0)
        vae = WanVAE(VAEConfig()).eval()
        params = sum(p.numel() for p in vae.parameters())
        print(f"CPU float32, {torch.get_num_threads()} threads, real config ({params / 1e6:.1f}M parameters), "
              f"{args.cpu_frames} frames at {VIDEO_HEIGHT}x{VIDEO_WIDTH}, each case run once after a 1-frame warm-up")
        cpu_cases(vae, args.cpu_frames, args.tile, args.stride, repeats=1)
        del vae
    if torch.cuda.is_available():
        cuda_cases(args.cuda_frames, args.tile, args.stride, args.repeats)
    else:
        print("CUDA: not available on this machine")


if __name__ == "__main__":
    main()
