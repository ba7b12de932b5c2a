"""Seconds per block and frames per second of the streaming loop, eager and compiled, and the
FLOPs of a block with the frames-per-second ceiling per card.

    python bench/bench_streaming.py                 # tiny student + tiny VAE on CPU at 352x640;
                                                    #   + the distilled universal config on CUDA
    python bench/bench_streaming.py --blocks 20     # more timed blocks (median reported)
    python bench/bench_streaming.py --cpu-size 176x320   # the CPU case at another size
    python bench/bench_streaming.py --compile off,default --no-vae --cpu-size 176x320
                                                    # the student's calls eager and compiled
    python bench/bench_streaming.py --no-cpu --compile off,reduce-overhead --layers 6   # on a GPU

A block is P = 3 latent frames: 12 video frames (9 for a stream's first block, which is
not timed). Per block the loop runs J denoising passes of the student and one clean-context
pass (universal: J = 3, so 4 passes over 2,640 tokens at 352x640, attending to a window of
6 latent frames = 5,280 tokens) and decodes the block with the streaming VAE decoder. The
time is split into the student's passes (cached_step), the VAE decode and the rest
(noise, x0 arithmetic, action bookkeeping, Python). On CUDA the student runs with bf16
weights and caches and the VAE decoder in float16, as the reference's scripts do; random
weights (the speed does not depend on them), batch 1. On the CPU the tiny VAE dominates:
its narrow 3-D convolutions miss oneDNN's size heuristic and run PyTorch's slow_conv3d
fallback (--no-vae times the student alone).

--compile times each of the given COMPILE modes (generation/streaming.py: "off",
"default", "reduce-overhead") on the same stream and prints, per mode, the seconds of the
first two blocks (where the compiling happens), the median of the later ones, the ratio to
"off" and the largest difference of the streamed latents from "off" (same seed). --layers
gives the CUDA case fewer transformer blocks (half of them with an action module), to time
compiling within a GPU session's minutes; the ratio carries over, per block.

FLOPs: the student's matmul FLOPs per call from bench_model.forward_flops in its streaming
form (queries of one block, keys of the window, cross-attention k/v cached, one time
embedding per frame; tests/test_streaming_model.py checks it against torch's counter), and
the VAE decoder's per block counted by torch's FlopCounterMode on the meta device. The
frames-per-second ceiling is what a card would reach at 100% of its dense bf16 tensor peak
(FP32 accumulate; planning/cards.py, the planner's cards and their sources) - no real run
gets there; divide by the utilisation you expect.
"""

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_model import forward_flops, synchronize  # noqa: E402
from generation.streaming import COMPILE_MODES, DENOISING_STEPS, StreamingGenerator  # noqa: E402
from planning.cards import CARDS  # noqa: E402
from wan.action import block_action_rows  # noqa: E402
from wan.causal import CausalWanModel  # noqa: E402
from wan.config import FRAMES_PER_BLOCK, WanConfig, distilled_config, tiny_config  # noqa: E402
from wan.conditioning import STREAM_COND_LATENT_FRAMES, cond_concat_from_latent  # noqa: E402
from wan.model import CONTEXT_TOKENS  # noqa: E402
from wan.shapes import (LATENT_CHANNELS, VAE_TIME_STRIDE, VIDEO_HEIGHT, VIDEO_WIDTH,  # noqa: E402
                        latent_size)
from wan.vae import StreamingDecoder, VAEConfig, WanVAE  # noqa: E402

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


def print_flops(config: WanConfig, steps, latent_hw: tuple[int, int]) -> dict:
    """Prints the FLOPs per block and the ceiling per card; returns {card name: FPS ceiling}."""
    passes = len(steps) + 1
    student = passes * student_call_flops(config, latent_hw)
    vae = vae_block_flops(VAEConfig(), latent_hw)
    total = student + vae
    print(f"distilled universal at {VIDEO_HEIGHT}x{VIDEO_WIDTH}, per block of {FRAMES_PER_BLOCK_VIDEO} frames: "
          f"student {passes} passes x {student / passes / 1e12:.2f} = {student / 1e12:.2f} TFLOP, "
          f"VAE decode {vae / 1e12:.2f} TFLOP, total {total / 1e12:.2f} TFLOP")
    ceilings = {}
    for card in CARDS:
        seconds = total / (card.bf16_tflops * 1e12)
        ceilings[card.name] = FRAMES_PER_BLOCK_VIDEO / seconds
        print(f"  {card.name:<10} {card.bf16_tflops:6.1f} TFLOP/s: >= {1000 * seconds:6.1f} ms/block, <= "
              f"{FRAMES_PER_BLOCK_VIDEO / seconds:6.1f} FPS at 100% of peak "
              f"(student alone <= {FRAMES_PER_BLOCK_VIDEO * card.bf16_tflops * 1e12 / student:6.1f} FPS)")
    print()
    return ceilings


def with_layers(config: WanConfig, layers: int | None) -> WanConfig:
    """config with `layers` transformer blocks, the same share of them with an action module
    (the first ones, as the students have them in blocks 0-14 of 30 and the base in all)."""
    if not layers:
        return config
    owning = max(1, round(len(config.action_config.blocks) * layers / config.num_layers))
    action = dataclasses.replace(config.action_config, blocks=tuple(range(owning)))
    return dataclasses.replace(config, num_layers=layers, action_config=action)


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
    with torch.no_grad():  # off the zero-initialised projections, so that the compared outputs mean something
        noise = torch.Generator(device).manual_seed(0)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=noise, device=device) * 0.02)
    vae.to_empty(device=device)
    vae.reset_parameters()
    return model.to(dtype).eval(), vae.to(vae_dtype).eval()


def bench(name: str, config: WanConfig, vae_config: VAEConfig | None, device: torch.device, dtype, vae_dtype,
          latent_hw: tuple[int, int], blocks: int, compile_mode: str = "off", model_and_vae=None) -> dict:
    """Stream blocks + 1 blocks (the first is not timed; with compiling, the first two) and
    print the median; returns the figures and the streamed latents. vae_config None: no decoder."""
    model, vae = model_and_vae or build(config, vae_config or VAEConfig.tiny(), device, dtype, vae_dtype)
    g = torch.Generator().manual_seed(0)
    cond_concat = cond_concat_from_latent(torch.randn(1, LATENT_CHANNELS, STREAM_COND_LATENT_FRAMES, *latent_hw,
                                                      generator=g))
    visual_context = torch.randn(1, CONTEXT_TOKENS, config.clip_dim, generator=g)
    steps = DENOISING_STEPS["universal"]
    generator = StreamingGenerator(model, cond_concat, visual_context,
                                   StreamingDecoder(vae) if vae_config is not None else None, denoising_steps=steps,
                                   compile_mode=compile_mode)
    student = generator.cached_step = Stopwatch(generator.cached_step, device)
    decode = Stopwatch(generator.decoder.decode, device) if generator.decoder is not None else None
    if decode is not None:
        generator.decoder.decode = decode
    action = config.action_config
    keyboard = torch.zeros(1, action.keyboard_dim_in)
    keyboard[0, 0] = 1
    mouse = torch.tensor([[0.0, 0.1]]) if action.enable_mouse else None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    warm_up = 1 if compile_mode == "off" else 2  # the first block (9 frames); compiling: the second's shapes too
    started = time.perf_counter()
    latents = [generator.step(keyboard, mouse).latents for _ in range(warm_up)]
    synchronize(device)
    first_blocks = time.perf_counter() - started
    per_block = []
    for _ in range(blocks):
        before = (student.seconds, decode.seconds if decode else 0.0)
        synchronize(device)
        start = time.perf_counter()
        latents.append(generator.step(keyboard, mouse).latents)
        synchronize(device)
        total = time.perf_counter() - start
        per_block.append((total, student.seconds - before[0], (decode.seconds if decode else 0.0) - before[1]))
    total, in_student, in_decode = (statistics.median(column) for column in zip(*per_block))
    memory = (f", peak {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
              if device.type == "cuda" else "")
    print(f"{name}, COMPILE={compile_mode}: {total:.3f} s/block = {FRAMES_PER_BLOCK_VIDEO / total:.2f} FPS "
          f"(median of {blocks} blocks after the first {warm_up}, which took {first_blocks:.1f} s{memory}); "
          f"student {len(steps) + 1} passes {in_student:.3f} s ({100 * in_student / total:.0f}%)"
          + (f", VAE decode {in_decode:.3f} s ({100 * in_decode / total:.0f}%)" if decode else ", no VAE")
          + f", rest {100 * max(0.0, total - in_student - in_decode) / total:.0f}%", flush=True)
    return {"seconds": total, "student": in_student, "first_blocks": first_blocks,
            "latents": torch.cat(latents, dim=2).float().cpu(), "model_and_vae": (model, vae)}


def compare_modes(name: str, modes: list[str], *args, **kwargs) -> dict:
    """bench each COMPILE mode on the same model, then the ratios to "off" (the first mode);
    returns {mode: the student's time per block / the first mode's}."""
    results, shared = {}, None
    for mode in modes:
        results[mode] = bench(name, *args, compile_mode=mode, model_and_vae=shared, **kwargs)
        shared = results[mode].pop("model_and_vae")
    base = results[modes[0]]
    for mode in modes[1:]:
        r = results[mode]
        frames = min(r["latents"].shape[2], base["latents"].shape[2])  # the blocks both streamed
        difference = (r["latents"][:, :, :frames] - base["latents"][:, :, :frames]).abs().max().item()
        print(f"  COMPILE={mode} / {modes[0]}: {r['seconds'] / base['seconds']:.2f}x the time per block, the "
              f"student's passes {r['student'] / base['student']:.2f}x; first blocks {r['first_blocks']:.1f} s "
              f"against {base['first_blocks']:.1f} s; streamed latents differ by at most {difference:.2e} "
              f"(their largest magnitude {base['latents'].abs().max().item():.2f})", flush=True)
    return {mode: results[mode]["student"] / base["student"] for mode in modes}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=5, help="timed blocks after the first (median reported)")
    parser.add_argument("--no-cpu", action="store_true", help="skip the CPU case (in a GPU session)")
    parser.add_argument("--cpu-size", default=f"{VIDEO_HEIGHT}x{VIDEO_WIDTH}", metavar="HxW",
                        help="video size of the CPU case (multiples of 16)")
    parser.add_argument("--compile", default="off", metavar="MODES",
                        help=f"comma-separated COMPILE modes to time, the first the baseline ({', '.join(COMPILE_MODES)})")
    parser.add_argument("--no-vae", action="store_true", help="time the student alone (no decoder)")
    parser.add_argument("--layers", type=int, default=0, help="the CUDA case with this many blocks (0: the config's)")
    args = parser.parse_args(argv)
    try:
        cpu_hw = latent_size(*(int(v) for v in args.cpu_size.lower().split("x")))
    except ValueError as error:
        parser.error(f"--cpu-size: expected HxW in pixels, multiples of 16 ({error})")
    modes = args.compile.split(",")
    if any(mode not in COMPILE_MODES for mode in modes):
        parser.error(f"--compile: modes from {', '.join(COMPILE_MODES)}, got {args.compile}")

    latent_hw = latent_size(VIDEO_HEIGHT, VIDEO_WIDTH)
    universal = distilled_config("universal")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", CUDA device: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA"))
    ceilings = print_flops(universal, DENOISING_STEPS["universal"], latent_hw)

    tiny = tiny_config(local_attn_size=universal.local_attn_size, action_blocks=(0,))
    vae = None if args.no_vae else VAEConfig.tiny()
    if not args.no_cpu:
        ratios = compare_modes(f"tiny student{'' if args.no_vae else ' + tiny VAE'}, {args.cpu_size} (cpu, float32)",
                               modes, tiny, vae, torch.device("cpu"), torch.float32, torch.float32, cpu_hw, args.blocks)
        if len(modes) > 1:
            print("  the planner's ceilings at 100% of peak (above): "
                  + ", ".join(f"{card} {fps:.0f} FPS" for card, fps in ceilings.items()
                              if card in ("RTX 4090", "A100 80GB", "H100 SXM"))
                  + "; the student's passes on this CPU compiled: "
                  + ", ".join(f"COMPILE={mode} {ratio:.2f}x eager" for mode, ratio in ratios.items()
                              if mode != modes[0]), flush=True)
    if torch.cuda.is_available():
        config = with_layers(universal, args.layers)
        compare_modes(f"distilled universal{f' with {args.layers} blocks' if args.layers else ''}, "
                      f"{VIDEO_HEIGHT}x{VIDEO_WIDTH} (cuda, bf16 student"
                      + ("" if args.no_vae else ", fp16 VAE") + ")", modes, config,
                      None if args.no_vae else VAEConfig(), torch.device("cuda"), torch.bfloat16, torch.float16,
                      latent_hw, args.blocks)


if __name__ == "__main__":
    main()
