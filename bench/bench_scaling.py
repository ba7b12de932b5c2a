"""Steps per second of the training script on 1 and 2 ranks (torchrun), same effective batch.

    python bench/bench_scaling.py                   # tiny demo model on CPU (gloo), DDP and FSDP
    python bench/bench_scaling.py --gpus 1,2,4,8    # on a multi-GPU machine (NCCL), real settings

Runs finetune_base_model.py for real (on the --demo recording and tiny weights unless
--real is given) and reads the optimizer steps and their seconds from metrics.csv,
skipping the first step of each run (start-up, allocation, compilation).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from demo_world.setup import demo_paths_under as demo_paths  # noqa: E402
from runs.folder import METRICS_FILE  # noqa: E402
from runs.metrics import METRICS_COLUMNS  # noqa: E402


def run(ranks: int, settings: dict, demo: bool) -> float:
    args = [f"--{n}={v}" for n, v in settings.items()]
    script = [str(ROOT / "finetune_base_model.py"), *(["--demo"] if demo else []), *args]
    cmd = ([sys.executable, *script] if ranks == 1 else
           [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *script])
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // ranks)))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{ranks} rank(s) failed:\n{done.stderr[-3000:]}")
    rows = (Path(settings["CHECKPOINT_DIR"]) / METRICS_FILE).read_text().splitlines()[2:]
    seconds = [float(r.split(",")[METRICS_COLUMNS.index("seconds_per_step")]) for r in rows]
    return statistics.median(seconds)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpus", default="", help="comma-separated rank counts on CUDA, e.g. 1,2,4,8")
    parser.add_argument("--real", action="store_true", help="use the settings in finetune_base_model.py as they are")
    parser.add_argument("--epochs", type=int, default=3)
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="bench_scaling_"))
    counts = [int(c) for c in args.gpus.split(",")] if args.gpus else [1, 2]
    device = "cuda" if args.gpus else "cpu"
    print(f"{os.cpu_count()} CPU cores; device {device}; {'real settings' if args.real else 'the --demo run'}")
    effective = max(counts) * 2
    for strategy in ("action_only", "full"):
        for ranks in counts:
            settings = {} if args.real else demo_paths(root)
            settings.update(CHECKPOINT_DIR=str(root / f"{strategy}_{ranks}"), DEVICE=device,
                            TRAINING_STRATEGY=strategy, NUM_EPOCHS=args.epochs, BATCH_SIZE=effective // ranks,
                            GRAD_ACCUM_STEPS=1, PREVIEW_EVERY_EPOCHS=0, SAVE_EVERY_EPOCHS=0)
            seconds = run(ranks, settings, demo=not args.real)
            engine = "single" if ranks == 1 else ("FSDP" if strategy == "full" else "DDP")
            print(f"{strategy:<11} {ranks} rank(s) ({engine:<6}) effective batch {effective}: "
                  f"{seconds:.3f} s/step, {1 / seconds:.2f} steps/s", flush=True)


if __name__ == "__main__":
    main()
