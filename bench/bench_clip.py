"""CLIP image encoder (ViT-H/14, 31 of 32 blocks): time per frame and peak memory.

Real config with random weights (speed does not depend on the values); input frames are
352x640 in [-1, 1], so the time includes the bicubic resize to 224x224. CPU runs in
float32; CUDA, when present, in bf16 weights as Matrix-Game runs it.

    python bench/bench_clip.py [--batch-sizes 1,8] [--cuda-batch-sizes 1,8,32] [--repeats 3]
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from memory import GIB, measure_case  # noqa: E402

from wan.clip import CLIPVisionConfig, CLIPVisionTower  # noqa: E402
from wan.shapes import VIDEO_HEIGHT, VIDEO_WIDTH  # noqa: E402

def time_encode(tower: CLIPVisionTower, frames: torch.Tensor, repeats: int, sync) -> float:
    tower.encode_frames(frames)  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        tower.encode_frames(frames)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_cpu(config: CLIPVisionConfig, batch_sizes: list[int], repeats: int) -> None:
    torch.manual_seed(0)
    tower = CLIPVisionTower(config).eval().requires_grad_(False)
    weights = sum(p.numel() * p.element_size() for p in tower.parameters())
    print(f"CPU float32, {torch.get_num_threads()} threads; weights {weights / GIB:.2f} GiB "
          f"({sum(p.numel() for p in tower.parameters()) / 1e6:.0f}M parameters incl. the unused block/head)")
    for batch in batch_sizes:
        frames = torch.rand(batch, 3, VIDEO_HEIGHT, VIDEO_WIDTH) * 2 - 1
        seconds = time_encode(tower, frames, repeats, sync=lambda: None)
        _, before, peak, exact_peak = measure_case(lambda: tower.encode_frames(frames))
        note = "" if exact_peak else " (VmHWM not resettable: process-wide peak)"
        print(f"  batch {batch:3d}: {seconds / batch:7.3f} s/frame ({seconds:7.2f} s/batch); "
              f"peak RSS {peak / GIB:.2f} GiB, +{(peak - before) / GIB:.3f} GiB over the loaded model{note}")


def bench_cuda(config: CLIPVisionConfig, batch_sizes: list[int], repeats: int) -> None:
    device = torch.device("cuda")
    torch.manual_seed(0)
    tower = CLIPVisionTower(config).eval().requires_grad_(False).to(device, torch.bfloat16)
    weights = torch.cuda.memory_allocated(device)
    print(f"CUDA bf16 on {torch.cuda.get_device_name(device)}; weights {weights / GIB:.2f} GiB")
    for batch in batch_sizes:
        frames = (torch.rand(batch, 3, VIDEO_HEIGHT, VIDEO_WIDTH, device=device) * 2 - 1).bfloat16()
        seconds = time_encode(tower, frames, repeats, sync=torch.cuda.synchronize)
        torch.cuda.reset_peak_memory_stats(device)
        tower.encode_frames(frames)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(device)
        print(f"  batch {batch:3d}: {1000 * seconds / batch:7.2f} ms/frame ({1000 * seconds:7.1f} ms/batch); "
              f"peak allocated {peak / GIB:.2f} GiB, +{(peak - weights) / GIB:.3f} GiB over the weights")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,8", help="CPU batch sizes (comma-separated)")
    parser.add_argument("--cuda-batch-sizes", default="1,8,32")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU part")
    args = parser.parse_args()
    config = CLIPVisionConfig()
    print(f"CLIP ViT-H/14 image tower: {config.num_output_blocks} blocks used, {config.num_tokens} tokens x "
          f"{config.width}; input {VIDEO_HEIGHT}x{VIDEO_WIDTH} frames resized to {config.image_size}^2; "
          f"median of {args.repeats}")
    with torch.no_grad():
        if not args.no_cpu:
            bench_cpu(config, [int(b) for b in args.batch_sizes.split(",")], args.repeats)
        if torch.cuda.is_available():
            bench_cuda(config, [int(b) for b in args.cuda_batch_sizes.split(",")], args.repeats)
        else:
            print("CUDA: not available on this machine")


if __name__ == "__main__":
    main()
