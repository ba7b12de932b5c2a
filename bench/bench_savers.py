"""The memory savers: the planner's peak per strategy x saver, each saver's CPU step time, and
whether each changes what training learns.

    python bench/bench_savers.py --plan      # planner table, real 1.8B config, 57 frames 352x640, batch 1
    python bench/bench_savers.py --time      # s/step of each saver on the demo's tiny model, CPU
    python bench/bench_savers.py --plan --frames 33
    python bench/bench_savers.py --resume    # stop a run mid-step, resume: distance to the unstopped run
    python bench/bench_savers.py --eight-bit # 8-bit AdamW against float32: largest step, distances
    python bench/bench_savers.py --backward  # the in-backward step's cost per backward, many tensors

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

--resume trains tests/test_saver_resume.py's cases (the guide's saver recipes) on a small
demo recording (finetune_base_model.train: 2 epochs, a save every 2 steps), once straight
through and once stopped inside optimizer step 3 (an exception in a training forward: what
is left is what is on disk) and resumed, and prints the largest difference between the two
final files (0 = resumed to the bit).

--eight-bit prints, for torchao's own 8-bit map and ours (training/optim.py: the second
moment without zero), the largest single-number step in learning rates against float32
AdamW's, and the max-abs and L2 distances to float32 AdamW's weights (relative to how far
those moved): 100 steps of `full` on a dim-64 tiny model, and 150 steps of gradients that
span six orders of magnitude in each block.

--backward times one backward of a 30-block tiny model (1,300+ trained tensors) plainly and
with the optimizer step in the backward (both passes), median of --steps.
"""

import argparse
import contextlib
import io
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


def plan_table(frames: int, height: int, width: int, only: list) -> None:
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
            if not applies(strategy, savers) or name not in only:
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
            recipe.micro_batch(model, optimizer, inputs, sigma, noise, nullcontext(), 1 / (2 * s["GRAD_ACCUM_STEPS"]))
        recipe.clip_gradients(optimizer, trainable, s)
        recipe.optimizer_step(optimizer, ema, trainable, step)
        if step:  # the first step makes the optimizer state
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def measures(module: str):
    """A test module of tests/ whose measures the benchmark prints (their one home)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    return __import__(module)


def resume_table(root: Path) -> None:
    from demo_world.setup import demo_paths_under, prepare_demo

    resume = measures("test_saver_resume")
    settings, _ = fb.parse_settings(["--demo", *(f"--{n}={v}" for n, v in demo_paths_under(root).items()),
                                     "--VIDEO_HEIGHT=32", "--VIDEO_WIDTH=64", "--SEQUENCE_LENGTH=9", "--CLIP_STRIDE=4"])
    prepare_demo(settings, num_frames=80)
    print("finetune_base_model.train on an 80-frame demo recording (32x64, 9-frame clips), 2 epochs, batch 2, a save "
          f"every 2 steps; stopped inside optimizer step {resume.STOP_IN_STEP} and resumed "
          "(tests/test_saver_resume.py's cases)")
    print("| case | largest difference of the final weights, resumed vs straight |")
    print("|---|---|")
    for name, (strategy, savers) in {"full, no saver": ("full", {}), **resume.CASES}.items():
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            runs = resume.stopped_and_resumed(settings, root / "runs" / name.replace(" ", "_"), strategy, savers)
        print(f"| {name} | {resume.largest_difference(runs['straight'], runs['resumed']):.2e} |", flush=True)


def eight_bit_table() -> None:
    """tests/test_savers.py's measures, printed for each optimizer."""
    savers = measures("test_savers")

    makers = {"float32 AdamW": savers.float32_adamw,
              "torchao AdamW8bit (zero in the second moment's map)": savers.torchao_adamw_8bit,
              "ours (second moment without zero)": savers.our_adamw_8bit}
    print(f"{savers.STEPS} steps of `full` on a tiny model {savers.WIDE}, lr {savers.BASE['LEARNING_RATE']}, "
          "fixed inputs, seeded noise; and 150 steps of gradients spanning 1e-6..1 in each 256-number block")
    print("| optimizer | model: largest step / lr | x float32's | max-abs distance | L2 distance | "
          "spread gradients: largest step / lr | x float32's |")
    print("|---|---|---|---|---|---|---|")
    lr = savers.BASE["LEARNING_RATE"]
    runs = {name: (savers.train("full", {}, savers.WIDE, make), savers.spread_out_steps(make).max().item())
            for name, make in makers.items()}
    reference, spread_reference = runs["float32 AdamW"]
    for name, (run, spread) in runs.items():
        print(f"| {name} | {max(run['largest_steps']) / lr:.2f} | {savers.step_ratio(reference, run):.2f} | "
              f"{savers.distance(reference, run):.3f} | {savers.l2(reference, run):.3f} | {spread:.1f} | "
              f"{spread / spread_reference:.2f} |", flush=True)


def backward_table(steps: int) -> None:
    config = tiny_config(num_layers=30)
    s = {**fb.SETTINGS.defaults, "TRAINING_STRATEGY": "full", "GRAD_ACCUM_STEPS": 1, "MIXED_PRECISION": "fp32"}
    print(f"tiny model with 30 blocks (dim {config.dim}), batch 1, 2 latent frames 4x4, float32, checkpointing; "
          f"{torch.get_num_threads()} threads; median of {steps} backward passes")
    print("| step | trained tensors | s per micro-batch (forward + backward + step) | x plain |")
    print("|---|---|---|---|")
    plain = None
    for name, savers in (("plain AdamW (step after the backward)", {}),
                         ("OPTIMIZER_IN_BACKWARD", {"OPTIMIZER_IN_BACKWARD": True})):
        torch.manual_seed(0)
        model = WanModel(config)
        recipe, settings = fb.RECIPE, {**s, **savers}
        trainable = recipe.prepare(model, settings)
        model.set_gradient_checkpointing(True)
        model.train()
        optimizer = recipe.make_optimizer(trainable, settings, torch.device("cpu"), torch.device("cpu"))
        inputs = batch_from_random_inputs(random_inputs(config, 1, 2, 4, 4))
        g = torch.Generator().manual_seed(0)
        times = []
        for step in range(steps + 1):
            sigma, noise = torch.rand(1, generator=g), torch.randn(inputs["latents"].shape, generator=g)
            started = time.perf_counter()
            recipe.micro_batch(model, optimizer, inputs, sigma, noise, nullcontext(), 1.0)
            recipe.clip_gradients(optimizer, trainable, settings)
            recipe.optimizer_step(optimizer, None, trainable, step)
            if step:  # the first step makes the optimizer state
                times.append(time.perf_counter() - started)
        seconds = statistics.median(times)
        plain = plain or seconds
        print(f"| {name} | {len(trainable)} | {seconds:.3f} | {seconds / plain:.2f} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", action="store_true", help="the planner's table for the real config")
    parser.add_argument("--time", action="store_true", help="CPU seconds per step of each saver, tiny model")
    parser.add_argument("--frames", type=int, default=57)
    parser.add_argument("--height", type=int, default=352)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--resume", action="store_true", help="stop and resume each saver: difference to straight")
    parser.add_argument("--eight-bit", action="store_true", help="8-bit AdamW against float32: steps, distances")
    parser.add_argument("--backward", action="store_true", help="the in-backward step's cost, 30-block tiny model")
    parser.add_argument("--out", default="bench_savers_runs", help="--resume's folder (its runs are kept there)")
    parser.add_argument("--savers", default=",".join(SAVERS), help="--plan's rows: saver names, comma-separated")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    if not (args.plan or args.time or args.resume or args.eight_bit or args.backward):
        parser.error("choose --plan, --time, --resume, --eight-bit or --backward")
    if args.plan:
        only = args.savers.split(",")
        unknown = [name for name in only if name not in SAVERS]
        if unknown:
            parser.error(f"--savers: unknown {', '.join(unknown)}; choose from {', '.join(SAVERS)}")
        plan_table(args.frames, args.height, args.width, only)
    if args.time:
        time_savers(args.steps)
    if args.resume:
        resume_table(Path(args.out))
    if args.eight_bit:
        eight_bit_table()
    if args.backward:
        backward_table(args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
