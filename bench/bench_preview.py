"""Time a preview: seconds per sampling step, the VAE decode, and a whole preview.

    python bench/bench_preview.py                       # CPU: the tiny config at 57 frames
                                                        #   352x640, and the real (1.8B) config
                                                        #   at 5 frames 32x64; CUDA: the real
                                                        #   config at 57 frames 352x640
    python bench/bench_preview.py --real-cpu 9x64x112   # the real config on CPU at FRAMESxHxW
    python bench/bench_preview.py --measured-steps 5    # Euler steps timed (default 3)

A preview is generate_preview.py's work for one window: the conditioning (VAE encode of
the first frame followed by zero frames, CLIP of the first frame), NUM_STEPS = 50 Euler
steps of the model (one forward each), the VAE decode, then drawing the panels and
overlay, encoding the MP4 and the action-following score. Weights are random (the speed
does not depend on them); the model, VAE and CLIP run as generate_preview runs them:
bf16 weights under bf16 autocast on CUDA, float32 on the CPU. A sampling step is timed
over --measured-steps steps after one warm-up step, and 50 steps are extrapolated from
it; every other part is timed once (after a warm-up run on CUDA).
"""

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from generation.bidirectional import decode_frames, sample_latents  # noqa: E402
from generation.previews import write_preview  # noqa: E402
from bench_model import build_model, synchronize  # noqa: E402
from wan.clip import CLIPVisionConfig, CLIPVisionTower  # noqa: E402
from wan.conditioning import build_cond_concat, build_visual_context  # noqa: E402
from wan.device import autocast_for, run_dtype  # noqa: E402
from wan.config import base_config, tiny_config  # noqa: E402
from wan.shapes import (VIDEO_HEIGHT, VIDEO_WIDTH, check_frame_count, check_image_size,  # noqa: E402
                        latent_frame_count, latent_size, tokens_per_latent_frame)
from wan.vae import VAEConfig, WanVAE  # noqa: E402

PREVIEW_FRAMES = 57
PREVIEW_STEPS = 50
KEYS = ("W", "S", "A", "D")


def timed(fn, device: torch.device):
    synchronize(device)
    start = time.perf_counter()
    result = fn()
    synchronize(device)
    return time.perf_counter() - start, result


def build_encoders(real: bool, device: torch.device, dtype: torch.dtype):
    """The VAE and CLIP tower with their own random initialisation, built on the device."""
    vae_config, clip_config = (VAEConfig(), CLIPVisionConfig()) if real else (VAEConfig.tiny(), CLIPVisionConfig.tiny())
    with torch.device(device):
        vae, clip = WanVAE(vae_config), CLIPVisionTower(clip_config)
    return vae.to(dtype).eval().requires_grad_(False), clip.to(dtype).eval().requires_grad_(False)


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB RSS (process peak)"


def bench(name: str, real: bool, frames: int, height: int, width: int, device: torch.device, measured_steps: int):
    dtype, autocast = run_dtype(device), autocast_for(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    vae, clip = build_encoders(real, device, dtype)
    config = base_config() if real else tiny_config(clip_dim=clip.config.width)
    model = build_model(config, device, compile_blocks=False).to(dtype).eval().requires_grad_(False)
    latent = (latent_frame_count(frames), *latent_size(height, width))
    tokens = latent[0] * tokens_per_latent_frame(*latent[1:])
    print(f"{name}: dim {config.dim}, {config.num_layers} blocks; {frames} frames {height}x{width} "
          f"({'x'.join(map(str, latent))} latents, {tokens:,} tokens)", flush=True)

    generator = torch.Generator().manual_seed(0)
    first = (torch.rand(1, 3, height, width, generator=generator) * 2 - 1).to(device, dtype)
    keyboard = (torch.rand(frames, len(KEYS), generator=generator) > 0.7).float()
    mouse = torch.randn(frames, 2, generator=generator) * 0.1

    def conditioning():
        return build_cond_concat(vae, first, frames).float(), build_visual_context(clip, first).float()

    warm_up = device.type == "cuda"  # kernels and autotuning; a CPU has none worth the minutes
    if warm_up:
        conditioning()
    seconds_conditioning, (cond_concat, visual_context) = timed(conditioning, device)

    def sample(steps):
        return sample_latents(model, cond_concat, visual_context, keyboard, mouse, steps, 5.0,
                                 torch.Generator().manual_seed(0), autocast)

    sample(1)
    seconds, latents = timed(lambda: sample(measured_steps), device)
    seconds_per_step = seconds / measured_steps

    if warm_up:
        decode_frames(vae, latents[:, :, :1])
    seconds_decode, video = timed(lambda: decode_frames(vae, latents), device)

    panels = {"fine-tuned": video, "ground truth": video.flip(-1)}
    with tempfile.TemporaryDirectory() as folder:
        seconds_write, _ = timed(lambda: write_preview(Path(folder) / "bench.mp4", panels, keyboard, mouse, KEYS, {}),
                                 torch.device("cpu"))
    total = seconds_conditioning + PREVIEW_STEPS * seconds_per_step + seconds_decode + seconds_write
    print(f"  conditioning (VAE encode of the first-frame video, CLIP): {seconds_conditioning:8.2f} s\n"
          f"  sampling: {seconds_per_step:8.3f} s per step (mean of {measured_steps}) -> "
          f"{PREVIEW_STEPS * seconds_per_step:8.1f} s for {PREVIEW_STEPS} steps\n"
          f"  VAE decode ({'real' if real else 'tiny'} VAE): {seconds_decode:8.2f} s\n"
          f"  panels + overlay + MP4 + action-following score (2 panels): {seconds_write:8.2f} s\n"
          f"  one preview at {PREVIEW_STEPS} steps: {total:8.1f} s; peak memory {peak_memory(device)}", flush=True)
    del model, vae, clip
    if device.type == "cuda":
        torch.cuda.empty_cache()


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        frames, height, width = (int(v) for v in text.lower().split("x"))
        check_frame_count(frames)
        check_image_size(height, width)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"expected FRAMESxHEIGHTxWIDTH like 9x64x112 (4k+1 frames, sides "
                                         f"multiples of 16), got {text!r}: {error}")
    return frames, height, width


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--measured-steps", type=int, default=3, help="Euler steps timed per case")
    parser.add_argument("--real-cpu", type=parse_size, default=(5, 32, 64), metavar="FRAMESxHxW",
                        help="the real config's size on the CPU (default 5x32x64)")
    parser.add_argument("--skip-tiny", action="store_true")
    args = parser.parse_args(argv)

    if torch.cuda.is_available():
        device = torch.device("cuda")
        torch.backends.cuda.matmul.allow_tf32 = True
        print(f"device: {torch.cuda.get_device_name(device)}; torch {torch.__version__}", flush=True)
        bench("real config (1.8B)", True, PREVIEW_FRAMES, VIDEO_HEIGHT, VIDEO_WIDTH, device, args.measured_steps)
        return
    device = torch.device("cpu")
    print(f"device: cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads); torch {torch.__version__}",
          flush=True)
    if not args.skip_tiny:
        bench("tiny config", False, PREVIEW_FRAMES, VIDEO_HEIGHT, VIDEO_WIDTH, device, args.measured_steps)
    bench("real config (1.8B)", True, *args.real_cpu, device, args.measured_steps)


if __name__ == "__main__":
    main()
