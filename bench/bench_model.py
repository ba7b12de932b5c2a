"""Time the base model's forward and forward+backward; print s/step, tokens/s, memory, TFLOP/s.

    python bench/bench_model.py                      # tiny config on CPU; + the real 1.8B
                                                     #   config when CUDA is present
    python bench/bench_model.py --real-cpu 2x8x8     # + the real config's forward on CPU at
                                                     #   FxHxW latents (a sanity check)
    python bench/bench_model.py --compile            # torch.compile every block (inductor)

On CUDA the real config runs at 57 frames 352x640 (15x44x80 latents, 13,200 tokens),
batch 1 and 2, with and without gradient checkpointing, float32 parameters under bf16
autocast (as training holds them). The model is built on the meta device and
materialised directly on the GPU. A case that runs out of memory prints "OOM".

FLOPs are counted analytically from the config (forward_flops): 2 per multiply-add of
every matmul - the linear layers and convolution (2 * tokens * fan_in * fan_out) plus
attention (QK^T and AV: 4 * queries * keys * width) - per sample:

  per block:  self-attn   8 L C^2 + 4 L^2 C
              cross-attn  4 L C^2 + 4 Lc C^2 + 4 L Lc C
              ffn         4 L C Dff
  per action module (in every block of the base model):
              mouse       2 L C Dm + 2 F (2P) Dm + 2 L Dm^2 + 6 L Dm^2 + 4 L F Dm + 2 L Dm C
              keyboard    2 N (K h + h^2) + 4 F (P h) Dk + 2 L C Dk + 4 L F Dk + 2 L Dk C
  once:       patch 2 L (36*4) C, time 2 (256 C + C^2 + 6 C^2), img_emb 2 Lc (1280^2 + 1280 C),
              head 2 L C 64

with L tokens, F latent frames, N raw frames, Lc = 257 context tokens, P = 12 window rows,
h = 128 keyboard embedding width. Norms, activations and RoPE are not counted. A training
step counts 3x the forward (backward = 2x); the recomputation of gradient checkpointing
is not counted, so TFLOP/s is the usual model-FLOPs utilisation against the device's
dense bf16 peak.
"""

import argparse
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from planning.cards import card_for_device  # noqa: E402
from wan.config import WanConfig, base_config, tiny_config  # noqa: E402
from wan.model import CONTEXT_TOKENS, WanModel, random_inputs  # noqa: E402
from wan.shapes import (PATCH_SIZE, VIDEO_HEIGHT, VIDEO_WIDTH, latent_frame_count,  # noqa: E402
                        latent_size, tokens_per_latent_frame, video_frame_count)

REAL_FRAMES = 57


def forward_flops(config: WanConfig, batch: int, latent_frames: int, latent_height: int,
                  latent_width: int, context_tokens: int = CONTEXT_TOKENS, key_frames: int | None = None,
                  action_rows: int | None = None, context_kv: bool = True, per_frame_t: bool = False) -> int:
    """Matmul FLOPs of one forward pass (see the module docstring for the formula).

    The defaults describe the base model's bidirectional pass. A streaming call of the
    causal model (bench_streaming.py) sets key_frames (latent frames each query attends to:
    its window), action_rows (raw rows the keyboard embedding runs over), context_kv=False
    when the cross-attention k/v come from the stream's cache, and per_frame_t (one time
    embedding per latent frame). Action terms count only the blocks that own a module.
    """
    a = config.action_config
    C, Dff, Lc = config.dim, config.ffn_dim, context_tokens
    F = latent_frames
    S = tokens_per_latent_frame(latent_height, latent_width)
    L = F * S
    Fk = F if key_frames is None else key_frames
    N = video_frame_count(F) if action_rows is None else action_rows
    P = a.window_frames
    block = 8 * L * C * C + 4 * L * Fk * S * C
    block += 4 * L * C * C + (4 * Lc * C * C if context_kv else 0) + 4 * L * Lc * C
    block += 4 * L * C * Dff
    action = 0
    if a.enable_mouse:
        Dm = a.mouse_hidden_dim
        action += (2 * L * C * Dm + 2 * F * a.mouse_dim_in * P * Dm + 2 * L * Dm * Dm
                   + 6 * L * Dm * Dm + 4 * L * Fk * Dm + 2 * L * Dm * C)
    if a.enable_keyboard:
        Dk, h = a.keyboard_hidden_dim, a.hidden_size
        action += (2 * N * (a.keyboard_dim_in * h + h * h) + 4 * F * P * h * Dk
                   + 2 * L * C * Dk + 4 * L * Fk * Dk + 2 * L * Dk * C)
    once = 2 * L * config.in_dim * math.prod(PATCH_SIZE) * C
    once += 2 * (config.freq_dim * C + C * C + 6 * C * C) * (F if per_frame_t else 1)
    once += 2 * Lc * (config.clip_dim ** 2 + config.clip_dim * C)
    once += 2 * L * C * math.prod(PATCH_SIZE) * config.out_dim
    return batch * (config.num_layers * block + len(a.blocks) * action + once)


def bf16_peak_tflops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    card = card_for_device(torch.cuda.get_device_name(device))
    return card.bf16_tflops if card is not None else None


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_model(config: WanConfig, device: torch.device, compile_blocks: bool) -> WanModel:
    """Meta build, then materialise on the device and initialise there: no CPU copy."""
    with torch.device("meta"):
        model = WanModel(config)
    model.to_empty(device=device)
    model.init_weights()
    if compile_blocks:
        for block in model.blocks:
            block.compile()
    return model


def time_steps(step, device: torch.device, steps: int, warmup: int) -> float:
    """Median seconds per step (robust to a shared machine's hiccups)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        step()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_case(model, inputs, device, autocast_dtype, mode, steps, warmup):
    """mode 'forward' (no grad, as in sampling) or 'train' (forward + backward)."""
    def forward():
        with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            return model(**inputs)

    def forward_only():
        with torch.no_grad():
            forward()

    def train_step():
        forward().square().mean().backward()  # a stand-in loss; the backward is what costs
        model.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_steps(forward_only if mode == "forward" else train_step, device, steps, warmup)
    if device.type == "cuda":
        peak = f"{torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB"
    else:
        peak = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB RSS*"
    return seconds, peak


def bench(name, config, device, autocast_dtype, latent_frames, latent_hw, batches, checkpointing,
          modes, steps, warmup, compile_blocks):
    model = build_model(config, device, compile_blocks)
    peak_tflops = bf16_peak_tflops(device)
    for batch in batches:
        inputs = random_inputs(config, batch, latent_frames, *latent_hw, device=device)
        tokens = batch * latent_frames * tokens_per_latent_frame(*latent_hw)
        flops = forward_flops(config, batch, latent_frames, *latent_hw)
        for mode in modes:
            for ckpt in (checkpointing if mode == "train" else (False,)):
                model.set_gradient_checkpointing(ckpt)
                label = f"{name:<28} B={batch} {mode:<7} ckpt={'on ' if ckpt else 'off'}"
                try:
                    seconds, peak = run_case(model, inputs, device, autocast_dtype, mode, steps, warmup)
                except torch.cuda.OutOfMemoryError:
                    model.zero_grad(set_to_none=True)
                    torch.cuda.empty_cache()
                    print(f"{label}  OOM", flush=True)
                    continue
                step_flops = flops * (3 if mode == "train" else 1)
                achieved = step_flops / seconds / 1e12
                utilisation = (f"{100 * achieved / peak_tflops:5.1f}% of {peak_tflops:.0f}"
                               if peak_tflops else "unknown peak")
                print(f"{label}  {seconds:9.4f} s/step  {tokens / seconds:11.0f} tokens/s  "
                      f"peak {peak:>14}  {achieved:8.4f} TFLOP/s  {utilisation}", flush=True)
    del model


def parse_size(text: str) -> tuple[int, int, int]:
    try:
        f, h, w = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FxHxW latent sizes like 2x8x8, got {text!r}")
    if f < 1 or h < 2 or w < 2 or h % 2 or w % 2:
        raise argparse.ArgumentTypeError(f"need F >= 1 and even H, W >= 2 latents, got {text!r}")
    return f, h, w


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="torch.compile every block")
    parser.add_argument("--real-cpu", type=parse_size, metavar="FxHxW",
                        help="also run the real config's forward on CPU at these latent sizes")
    parser.add_argument("--skip-tiny", action="store_true")
    args = parser.parse_args(argv)

    cpu = torch.device("cpu")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", CUDA device: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA"))
    config = base_config()
    real_flops = forward_flops(config, 1, latent_frame_count(REAL_FRAMES),
                               *latent_size(VIDEO_HEIGHT, VIDEO_WIDTH))
    print(f"real config at {REAL_FRAMES} frames {VIDEO_HEIGHT}x{VIDEO_WIDTH}: "
          f"{real_flops / 1e12:.1f} TFLOP per sample forward, {3 * real_flops / 1e12:.1f} per "
          f"training step")
    print("* CPU memory is the process's peak RSS so far, not per case\n")

    if not args.skip_tiny:
        bench("tiny (cpu, float32)", tiny_config(), cpu, None, 3, (8, 12), (1, 2), (False, True),
              ("forward", "train"), args.steps, args.warmup, args.compile)
    if args.real_cpu:
        f, h, w = args.real_cpu
        bench(f"real {f}x{h}x{w} (cpu, float32)", config, cpu, None, f, (h, w), (1,), (False,),
              ("forward",), max(1, args.steps // 5), 1, args.compile)
    if torch.cuda.is_available():
        gpu = torch.device("cuda")
        frames = latent_frame_count(REAL_FRAMES)
        bench("real 57f 352x640 (cuda, bf16)", config, gpu, torch.bfloat16, frames,
              latent_size(VIDEO_HEIGHT, VIDEO_WIDTH), (1, 2), (False, True),
              ("forward", "train"), args.steps, args.warmup, args.compile)


if __name__ == "__main__":
    main()
