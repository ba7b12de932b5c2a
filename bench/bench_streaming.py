"""Seconds per block and frames per second of the streaming loop, and the FLOPs of a block.

    python bench/bench_streaming.py                 # tiny student + tiny VAE on CPU at 352x640;
                                                    #   + the distilled universal config on CUDA
    python bench/bench_streaming.py --blocks 20     # more timed blocks (median reported)
    python bench/bench_streaming.py --cpu-size 176x320   # the CPU case at another size

A block is P = 3 latent frames: 12 video frames (9 for a stream's first block, which is
not timed). Per block the loop runs J denoising passes of the student and one clean-context
pass (universal: J = 3, so 4 passes over 2,640 tokens at 352x640, attending to a window of
6 latent frames = 5,280 tokens) and decodes the block with the streaming VAE decoder. The
time is split into the student's passes (forward_cached), the VAE decode and the rest
(noise, x0 arithmetic, action bookkeeping, Python). On CUDA the student runs with bf16
weights and caches and the VAE decoder in float16, as the reference's scripts do; random
weights (the speed does not depend on them), batch 1, no torch.compile. On the CPU the
tiny VAE dominates: its narrow 3-D convolutions miss oneDNN's size heuristic and run
PyTorch's slow_conv3d fallback.

FLOPs: the student's matmul FLOPs per call from bench_model.forward_flops in its streaming
form (queries of one block, keys of the window, cross-attention k/v cached, one time
embedding per frame; tests/test_streaming_model.py checks it against torch's counter), and
the VAE decoder's per block counted by torch's FlopCounterMode on the meta device. The
frames-per-second ceiling is what a card would reach at 100% of its dense bf16 tensor peak
(FP32 accumulate) - no real run gets there; divide by the utilisation you expect:
  RTX 4090  165.2 TFLOP/s  NVIDIA Ada Lovelace architecture whitepaper, appendix table
                           ("Peak BF16 Tensor TFLOPS with FP32 Accumulate"; 330.3 with FP16 accumulate)
  A100      312 TFLOP/s    NVIDIA A100 Tensor Core GPU datasheet (BF16 Tensor Core, dense)
  H100 SXM  989 TFLOP/s    NVIDIA H100 Tensor Core GPU datasheet (BF16 Tensor Core, 1,979 with sparsity)
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_model import forward_flops, synchronize  # noqa: E402
from generation.streaming import DENOISING_STEPS, StreamingGenerator  # noqa: E402
from wan.action import block_action_rows  # noqa: E402
from wan.causal import CausalWanModel  # noqa: E402
from wan.config import FRAMES_PER_BLOCK, WanConfig, distilled_config, tiny_config  # noqa: E402
from wan.conditioning import STREAM_COND_LATENT_FRAMES, cond_concat_from_latent  # noqa: E402
from wan.model import CONTEXT_TOKENS  # noqa: E402
from wan.shapes import (LATENT_CHANNELS, VAE_TIME_STRIDE, VIDEO_HEIGHT, VIDEO_WIDTH,  # noqa: E402
                        latent_size)
from wan.vae import StreamingDecoder, VAEConfig, WanVAE  # noqa: E402

CARDS = (("RTX 4090", 165.2), ("A100", 312.0), ("H100 SXM", 989.0))
FRAMES_PER_BLOCK_VIDEO = VAE_TIME_STRIDE * FRAMES_PER_BLOCK  # 12 video frames per later block


def student_call_flops(config: WanConfig, latent_hw: tuple[int, int], frames: int = FRAMES_PER_BLOCK) -> int:
    """Matmul FLOPs of one cached call of a later block (the window full, the context cached)."""
    first_row, end_row = block_action_rows(config.action_config, config.local_attn_size, frames)
    return forward_flops(config, 1, frames, *latent_hw, CONTEXT_TOKENS, key_frames=config.local_attn_size,
                         action_rows=end_row - first_row, context_kv=False, per_frame_t=True)


def vae_block_flops(vae_config: VAEConfig, latent_hw: tuple[int, int], frames: int = FRAMES_PER_BLOCK) -> int:
    """FLOPs of decoding a later block (its caches filled), counted on the meta device."""
    with torch.device("meta"):
        decoder = StreamingDecoder(WanVAE(vae_config))
    latents = torch.empty(1, LATENT_CHANNELS, frames, *latent_hw, device="meta")
    decoder.decode(latents)  # the first block fills the caches
    counter = FlopCounterMode(display=False)
    with counter:
        decoder.decode(latents)
    return counter.get_total_flops()


def print_flops(config: WanConfig, steps, latent_hw: tuple[int, int]) -> None:
    passes = len(steps) + 1
    student = passes * student_call_flops(config, latent_hw)
    vae = vae_block_flops(VAEConfig(), latent_hw)
    total = student + vae
    print(f"distilled universal at {VIDEO_HEIGHT}x{VIDEO_WIDTH}, per block of {FRAMES_PER_BLOCK_VIDEO} frames: "
          f"student {passes} passes x {student / passes / 1e12:.2f} = {student / 1e12:.2f} TFLOP, "
          f"VAE decode {vae / 1e12:.2f} TFLOP, total {total / 1e12:.2f} TFLOP")
    for card, peak in CARDS:
        seconds = total / (peak * 1e12)
        print(f"  {card:<9} {peak:6.1f} TFLOP/s: >= {1000 * seconds:6.1f} ms/block, <= "
              f"{FRAMES_PER_BLOCK_VIDEO / seconds:6.1f} FPS at 100% of peak "
              f"(student alone <= {FRAMES_PER_BLOCK_VIDEO * peak * 1e12 / student:6.1f} FPS)")
    print()


class Stopwatch:
    """Wraps a callable and adds up the seconds spent in it (the device synchronised)."""

    def __init__(self, fn, device: torch.device):
        self.fn, self.device, self.seconds = fn, device, 0.0

    def __call__(self, *args, **kwargs):
        synchronize(self.device)
        start = time.perf_counter()
        out = self.fn(*args, **kwargs)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        return out


def build(config: WanConfig, vae_config: VAEConfig, device: torch.device, dtype, vae_dtype):
    """Student and VAE made on the meta device and initialised on the target device."""
    with torch.device("meta"):
        model, vae = CausalWanModel(config), WanVAE(vae_config)
    model.to_empty(device=device)
    model.init_weights()
    vae.to_empty(device=device)
    vae.reset_parameters()
    return model.to(dtype).eval(), vae.to(vae_dtype).eval()


def bench(name: str, config: WanConfig, vae_config: VAEConfig, device: torch.device, dtype, vae_dtype,
          latent_hw: tuple[int, int], blocks: int) -> None:
    model, vae = build(config, vae_config, device, dtype, vae_dtype)
    g = torch.Generator().manual_seed(0)
    cond_concat = cond_concat_from_latent(torch.randn(1, LATENT_CHANNELS, STREAM_COND_LATENT_FRAMES, *latent_hw,
                                                      generator=g))
    visual_context = torch.randn(1, CONTEXT_TOKENS, config.clip_dim, generator=g)
    steps = DENOISING_STEPS["universal"]
    generator = StreamingGenerator(model, cond_concat, visual_context, StreamingDecoder(vae), denoising_steps=steps)
    student = generator.model.forward_cached = Stopwatch(model.forward_cached, device)
    decode = generator.decoder.decode = Stopwatch(generator.decoder.decode, device)
    action = config.action_config
    keyboard = torch.zeros(1, action.keyboard_dim_in)
    keyboard[0, 0] = 1
    mouse = torch.tensor([[0.0, 0.1]]) if action.enable_mouse else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    generator.step(keyboard, mouse)  # the first block: 9 frames, warm-up
    per_block = []
    for _ in range(blocks):
        before = (student.seconds, decode.seconds)
        synchronize(device)
        start = time.perf_counter()
        generator.step(keyboard, mouse)
        synchronize(device)
        total = time.perf_counter() - start
        per_block.append((total, student.seconds - before[0], decode.seconds - before[1]))
    total, in_student, in_decode = (statistics.median(column) for column in zip(*per_block))
    memory = (f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
              if device.type == "cuda" else "")
    print(f"{name}: {total:.3f} s/block = {FRAMES_PER_BLOCK_VIDEO / total:.2f} FPS "
          f"(median of {blocks} blocks after the first{memory}); student {len(steps) + 1} passes "
          f"{in_student:.3f} s ({100 * in_student / total:.0f}%), VAE decode {in_decode:.3f} s "
          f"({100 * in_decode / total:.0f}%), rest {100 * max(0.0, total - in_student - in_decode) / total:.0f}%",
          flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks after the first (median reported)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU case (in a GPU session)")
    parser.add_argument("--cpu-size", default=f"{VIDEO_HEIGHT}x{VIDEO_WIDTH}", metavar="HxW",
                        help="video size of the CPU case (multiples of 16)")
    args = parser.parse_args(argv)
    try:
        cpu_hw = latent_size(*(int(v) for v in args.cpu_size.lower().split("x")))
    except ValueError as error:
        parser.error(f"--cpu-size: expected HxW in pixels, multiples of 16 ({error})")

    latent_hw = latent_size(VIDEO_HEIGHT, VIDEO_WIDTH)
    universal = distilled_config("universal")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", CUDA device: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA"))
    print_flops(universal, DENOISING_STEPS["universal"], latent_hw)

    tiny = tiny_config(local_attn_size=universal.local_attn_size, action_blocks=(0,))
    if not args.no_cpu:
        bench(f"tiny student + tiny VAE, {args.cpu_size} (cpu, float32)", tiny, VAEConfig.tiny(),
              torch.device("cpu"), torch.float32, torch.float32, cpu_hw, args.blocks)
    if torch.cuda.is_available():
        bench(f"distilled universal, {VIDEO_HEIGHT}x{VIDEO_WIDTH} (cuda, bf16 student, fp16 VAE)", universal,
              VAEConfig(), torch.device("cuda"), torch.bfloat16, torch.float16, latent_hw, args.blocks)


if __name__ == "__main__":
    main()
