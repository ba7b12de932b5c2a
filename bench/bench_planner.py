"""The planner's training-step peaks per strategy x gradient checkpointing, and its own run time.

    python bench/bench_planner.py                    # the real 1.8B config, 57 frames 352x640, batch 1
    python bench/bench_planner.py --frames 33 --batch 2
    python bench/bench_planner.py --plan             # + the whole plan (plan_training) and its time

Every case is measured on fake tensors (planning/measure.py): the real training code runs
for its shapes only, so this runs on any CPU in seconds per case. "peak" is the step with
GRAD_ACCUM_STEPS=1, "peak, accum" with gradients kept between micro-batches (>= 2);
GB = 1e9 bytes. TFLOP counts one micro-batch, recomputation included.
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import finetune_base_model as fb  # noqa: E402
from planning.measure import latent_grid, measure_training  # noqa: E402
from planning.plan import model_config, plan_training  # noqa: E402
from wan.model import STRATEGIES  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--frames", type=int, default=57)
    parser.add_argument("--height", type=int, default=352)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--plan", action="store_true", help="also run and print plan_training for these settings")
    args = parser.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    settings = dict(fb.SETTINGS.defaults)
    settings.update(SEQUENCE_LENGTH=args.frames, VIDEO_HEIGHT=args.height, VIDEO_WIDTH=args.width,
                    BATCH_SIZE=args.batch)
    config, source = model_config(settings)
    grid = latent_grid(args.frames, args.height, args.width)
    print(f"config: {source}; {args.frames} frames at {args.width}x{args.height}, batch {args.batch}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| strategy | checkpointing | peak GB (GiB) | peak, accum GB (GiB) | TFLOP per micro-batch | "
          "peak at | seconds |")
    print("|---|---|---|---|---|---|---|")
    started = time.perf_counter()
    for strategy in STRATEGIES:
        for checkpointing in (True, False):
            case_started = time.perf_counter()
            peaks = []
            for accum in (1, 4):
                case = dict(settings, TRAINING_STRATEGY=strategy, GRADIENT_CHECKPOINTING=checkpointing,
                            GRAD_ACCUM_STEPS=accum)
                step, _ = measure_training(config, case, *grid, count_flops=accum == 1)
                peaks.append(step)
            name = strategy + (f" ({settings['LAST_LAYERS']})" if strategy == "last_layers" else "")
            print(f"| {name} | {'on' if checkpointing else 'off'} | "
                  + " | ".join(f"{m.peak / 1e9:.2f} ({m.peak / 2**30:.2f})" for m in peaks)
                  + f" | {peaks[0].flops / 1e12:.1f} | {peaks[1].peak_op} | "
                  f"{time.perf_counter() - case_started:.1f} |", flush=True)
    print(f"table: {time.perf_counter() - started:.1f} s")
    if args.plan:
        plan = plan_training(dict(settings, SEQUENCE_LENGTH=args.frames, VIDEO_HEIGHT=args.height,
                                  VIDEO_WIDTH=args.width, BATCH_SIZE=args.batch))
        print()
        print(plan.format())
        print(f"plan_training: {plan.seconds:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
