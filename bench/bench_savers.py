"""The memory savers: the planner's peak per strategy x saver, and each saver's CPU step time.

    python bench/bench_savers.py --plan      # planner table, real 1.8B config, 57 frames 352x640, batch 1
    python bench/bench_savers.py --time      # s/step of each saver on the demo's tiny model, CPU
    python bench/bench_savers.py --plan --frames 33

--plan measures the real training step on fake tensors (planning/measure.py) through the
trainer's own recipe with the savers' settings: gradient checkpointing on, bf16,
GRAD_ACCUM_STEPS=4 - except OPTIMIZER_IN_BACKWARD, which has no gradients to accumulate
and runs with GRAD_ACCUM_STEPS=1 (its rows say so). GB = 1e9 bytes; "+margin" is what the
plan compares with a card (10% + 0.75 GiB).

--time runs real steps (the recipe's prepare, offload, make_optimizer, micro_batch,
clip_gradients, optimizer_step) on the tiny demo model at 17 frames 64x112 and prints the
median seconds per optimizer step, and its ratio to plain AdamW. On a CPU the offloads
copy between two places in the same memory, so their cost here is the bookkeeping, not a
PCIe transfer.
"""

import argparse
import statistics
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import finetune_base_model as fb  # noqa: E402
from demo_world.setup import DEMO_MODEL  # noqa: E402
from planning.measure import latent_grid, measure_training  # noqa: E402
from planning.plan import model_config, with_margin  # noqa: E402
from training.flow_matching import batch_from_random_inputs  # noqa: E402
from wan.config import tiny_config  # noqa: E402
from wan.model import WanModel, random_inputs  # noqa: E402

SAVERS = {
    "none": {},
    "adamw_8bit": {"OPTIMIZER": "adamw_8bit"},
    "in_backward": {"OPTIMIZER_IN_BACKWARD": True, "GRAD_ACCUM_STEPS": 1},
    "adamw_8bit + in_backward": {"OPTIMIZER": "adamw_8bit", "OPTIMIZER_IN_BACKWARD": True, "GRAD_ACCUM_STEPS": 1},
    "offload_optimizer": {"OFFLOAD_OPTIMIZER": True},
    "offload_frozen": {"OFFLOAD_FROZEN": True},
    "adamw_8bit + offload_frozen": {"OPTIMIZER": "adamw_8bit", "OFFLOAD_FROZEN": True},
    "offload_optimizer + offload_frozen": {"OFFLOAD_OPTIMIZER": True, "OFFLOAD_FROZEN": True},
}
STRATEGIES = ("action_only", "last_layers", "lora", "full")
PLAN_ORDER = ("full", "lora", "action_only", "last_layers")  # the question first: does full fit in 24 GB?


def applies(strategy: str, savers: dict) -> bool:
    return not (strategy == "full" and savers.get("OFFLOAD_FROZEN"))


def plan_table(frames: int, height: int, width: int) -> None:
    settings = dict(fb.SETTINGS.defaults, SEQUENCE_LENGTH=frames, VIDEO_HEIGHT=height, VIDEO_WIDTH=width,
                    BATCH_SIZE=1, GRAD_ACCUM_STEPS=4, GRADIENT_CHECKPOINTING=True, MIXED_PRECISION="bf16")
    config, source = model_config(settings)
    grid = latent_grid(frames, height, width)
    print(f"config: {source}; {frames} frames at {width}x{height}, batch 1, checkpointing on, bf16; "
          f"LoRA rank {settings['LORA_RANK']} on {','.join(settings['LORA_TARGETS'])}; torch {torch.__version__}")
    print("| strategy | savers | accum | peak GB | +margin GiB | weights | optimizer state | gradients | rest | "
          "seconds |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for strategy in PLAN_ORDER:
        for name, savers in SAVERS.items():
            if not applies(strategy, savers):
                continue
            started = time.perf_counter()
            case = {**settings, "TRAINING_STRATEGY": strategy, **savers}
            step, _ = measure_training(config, case, *grid)
            b = step.breakdown
            fixed = {k: b.get(k, 0) for k in ("weights", "optimizer state", "gradients")}
            print(f"| {strategy} | {name} | {case['GRAD_ACCUM_STEPS']} | {step.peak / 1e9:.2f} | "
                  f"{with_margin(step.peak) / 2**30:.2f} | "
                  + " | ".join(f"{v / 1e9:.2f}" for v in fixed.values())
                  + f" | {(step.peak - sum(fixed.values())) / 1e9:.2f} | {time.perf_counter() - started:.0f} |",
                  flush=True)


def time_savers(steps: int) -> None:
    config = tiny_config(**DEMO_MODEL, clip_dim=32)
    frames, latent_h, latent_w = 5, 8, 14  # 17 frames at 64x112, the demo's clips
    print(f"tiny demo model {DEMO_MODEL} on CPU, {torch.get_num_threads()} threads; 17 frames 64x112, batch 2, "
          f"float32, checkpointing on; median of {steps} optimizer steps (GRAD_ACCUM_STEPS as in the table)")
    print("| strategy | savers | accum | s/step | x plain AdamW |")
    print("|---|---|---|---|---|")
    for strategy in ("action_only", "lora", "full"):
        plain = None
        for name, savers in SAVERS.items():
            if not applies(strategy, savers):
                continue
            s = {**fb.SETTINGS.defaults, "TRAINING_STRATEGY": strategy, "GRAD_ACCUM_STEPS": 2,
                 "MIXED_PRECISION": "fp32", "GRADIENT_CHECKPOINTING": True, "LORA_RANK": 8, **savers}
            seconds = _seconds_per_step(config, s, frames, latent_h, latent_w, steps)
            if name == "none":
                plain = seconds
            print(f"| {strategy} | {name} | {s['GRAD_ACCUM_STEPS']} | {seconds:.3f} | {seconds / plain:.2f} |",
                  flush=True)


def _seconds_per_step(config, s: dict, frames: int, latent_h: int, latent_w: int, steps: int) -> float:
    torch.manual_seed(0)
    recipe, cpu = fb.RECIPE, torch.device("cpu")
    model = WanModel(config)
    trainable = recipe.prepare(model, s)
    model.set_gradient_checkpointing(True)
    model.train()
    recipe.offload(model, s, cpu)
    optimizer = recipe.make_optimizer(trainable, s, cpu, cpu)
    ema = recipe.make_ema(trainable, s, cpu)
    inputs = batch_from_random_inputs(random_inputs(config, 2, frames, latent_h, latent_w))
    g = torch.Generator().manual_seed(0)
    times = []
    for step in range(steps + 1):
        started = time.perf_counter()
        for _ in range(s["GRAD_ACCUM_STEPS"]):
            sigma, noise = torch.rand(2, generator=g), torch.randn(inputs["latents"].shape, generator=g)
            recipe.micro_batch(model, inputs, sigma, noise, nullcontext(), 1 / (2 * s["GRAD_ACCUM_STEPS"]))
        recipe.clip_gradients(optimizer, trainable, s)
        recipe.optimizer_step(optimizer, ema, trainable, step)
        if step:  # the first step makes the optimizer state
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", action="store_true", help="the planner's table for the real config")
    parser.add_argument("--time", action="store_true", help="CPU seconds per step of each saver, tiny model")
    parser.add_argument("--frames", type=int, default=57)
    parser.add_argument("--height", type=int, default=352)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if not (args.plan or args.time):
        parser.error("choose --plan, --time or both")
    if args.plan:
        plan_table(args.frames, args.height, args.width)
    if args.time:
        time_savers(args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
