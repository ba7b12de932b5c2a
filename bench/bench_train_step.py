"""Time a real training step per strategy; print s/step, peak memory and optimizer state size,
and on CUDA the planner's prediction beside the measured peak.

    python bench/bench_train_step.py                 # tiny config on CPU (57 frames 352x640);
                                                     #   + the real 1.8B config when CUDA is present
    python bench/bench_train_step.py --frames 17     # shorter clips
    python bench/bench_train_step.py --real-cpu      # + the real config on CPU at 5 frames 64x112

A step is what finetune_base_model.py does, through the same TrainingRecipe: the
strategy's float32 masters, flow-matching forward at a random sigma, backward, gradient
clipping, the two-group AdamW (fused on CUDA). The model is built on the meta device and
materialised on the target device: frozen weights in bf16 and trained ones in float32
under bf16 autocast on CUDA (as training holds them), everything float32 on CPU. Batch 1,
no accumulation, LAST_LAYERS 3, no EMA. Each case runs in a fresh process so that its peak
belongs to it alone; on CUDA the planner measures the same settings on fake tensors
(planning/measure.py) and the table shows both.
"""

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from demo_world.setup import DEMO_MODEL  # noqa: E402
from planning.measure import measure_training  # noqa: E402
from training.flow_matching import batch_from_random_inputs  # noqa: E402
from training.recipe import TrainingRecipe  # noqa: E402
from bench_model import bf16_peak_tflops, build_model, forward_flops, time_steps  # noqa: E402
from wan import flow  # noqa: E402
from wan.config import base_config, tiny_config  # noqa: E402
from wan.device import autocast_for  # noqa: E402
from wan.model import STRATEGIES, random_inputs  # noqa: E402
from wan.shapes import latent_frame_count, latent_size  # noqa: E402


def case_settings(strategy: str, frames: int, height: int, width: int, checkpointing: bool) -> dict:
    """The training script's settings for one case (what the planner is given too)."""
    import finetune_base_model as fb

    return dict(fb.SETTINGS.defaults, TRAINING_STRATEGY=strategy, LAST_LAYERS=3, SEQUENCE_LENGTH=frames,
                VIDEO_HEIGHT=height, VIDEO_WIDTH=width, BATCH_SIZE=1, GRAD_ACCUM_STEPS=1, EMA_DECAY=0.0,
                GRADIENT_CHECKPOINTING=checkpointing, MIXED_PRECISION="bf16", LEARNING_RATE=1e-5)


def one_case(config_name: str, strategy: str, frames: int, height: int, width: int, device_name: str,
             checkpointing: bool, steps: int) -> dict:
    device = torch.device(device_name)
    config = base_config() if config_name == "real" else tiny_config(**DEMO_MODEL, clip_dim=1280)
    settings = case_settings(strategy, frames, height, width, checkpointing)
    recipe = TrainingRecipe()
    use_bf16 = device.type == "cuda"
    if use_bf16:
        torch.cuda.reset_peak_memory_stats(device)
    model = build_model(config, device, compile_blocks=False)
    if use_bf16:
        model.to(torch.bfloat16)
    trainable = recipe.prepare(model, settings)
    model.set_gradient_checkpointing(checkpointing)
    model.train()
    optimizer = recipe.make_optimizer(trainable, settings, device, host=device)
    autocast = autocast_for(device)

    f = latent_frame_count(frames)
    h, w = latent_size(height, width)
    g = torch.Generator().manual_seed(0)
    inputs = batch_from_random_inputs(random_inputs(config, 1, f, h, w, device=device))

    def step():
        sigma = flow.sample_sigmas(1, generator=g)
        noise = torch.randn(inputs["latents"].shape, generator=g)
        recipe.micro_batch(model, optimizer, inputs, sigma, noise, autocast, 1.0)
        recipe.clip_gradients(optimizer, trainable, settings)
        recipe.optimizer_step(optimizer, None, trainable, 0)

    seconds = time_steps(step, device, steps, warmup=1)  # the warm-up step allocates the optimizer state
    optimizer_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values()
                          for t in s.values() if torch.is_tensor(t))
    predicted = None
    if use_bf16:
        peak = torch.cuda.max_memory_allocated(device) / 2**30
        planned, _ = measure_training(config, settings, f, h, w)
        predicted = planned.peak / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    # 3x the forward: exact for "full"; the partial strategies skip the frozen weights' gradients,
    # so their figure overstates the work done (reported only for "full")
    flops = 3 * forward_flops(config, 1, f, h, w)
    peak_tflops = bf16_peak_tflops(device)
    return {"config": config_name, "strategy": strategy, "device": device_name,
            "device_name": torch.cuda.get_device_name(device) if use_bf16 else "cpu",
            "frames": frames, "size": f"{height}x{width}", "checkpointing": checkpointing,
            "seconds_per_step": seconds, "peak_gib": peak, "peak_kind": "allocated" if use_bf16 else "RSS",
            "planned_gib": predicted,
            "trainable": sum(p.numel() for p in trainable.values()),
            "total": sum(p.numel() for p in model.parameters()),
            "optimizer_state_gib": optimizer_bytes / 2**30,
            "tflops": flops / seconds / 1e12 if strategy == "full" else None,
            "utilisation": flops / seconds / 1e12 / peak_tflops if peak_tflops and strategy == "full" else None}


def run_in_subprocess(*args) -> dict | str:
    done = subprocess.run([sys.executable, __file__, "--one", json.dumps(args)], capture_output=True, text=True)
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["failed"]
        return "OOM" if "OutOfMemoryError" in done.stderr else tail[0]
    return json.loads(done.stdout.strip().splitlines()[-1])


def show(result, label: str) -> None:
    if isinstance(result, str):
        print(f"{label}  {result}", flush=True)
        return
    r = result
    utilisation = f"  {100 * r['utilisation']:.1f}% of bf16 peak" if r["utilisation"] else ""
    planned = (f" (planner {r['planned_gib']:.2f} GiB, {100 * (r['planned_gib'] / r['peak_gib'] - 1):+.1f}%)"
               if r.get("planned_gib") else "")
    print(f"{label}  {r['seconds_per_step']:8.3f} s/step  peak {r['peak_gib']:6.2f} GiB {r['peak_kind']}{planned}  "
          f"trainable {r['trainable']:,} of {r['total']:,}  optimizer state {r['optimizer_state_gib']:.2f} GiB"
          + (f"  {r['tflops']:.3f} TFLOP/s{utilisation}" if r["tflops"] else ""), flush=True)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=57)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--real-cpu", action="store_true", help="also the real config on CPU at 5 frames 64x112")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(one_case(*json.loads(args.one))))
        return

    print(f"torch {torch.__version__}, {torch.get_num_threads()} CPU threads"
          + (f", CUDA: {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no CUDA"))
    cases = [("tiny", s, args.frames, 352, 640, "cpu", False, args.steps) for s in STRATEGIES]
    if args.real_cpu:
        cases += [("real", "action_only", 5, 64, 112, "cpu", ckpt, 1) for ckpt in (False, True)]
    if torch.cuda.is_available():
        cases += [("real", s, args.frames, 352, 640, "cuda", ckpt, args.steps)
                  for s in STRATEGIES for ckpt in (True, False)]
    for case in cases:
        name, strategy, frames, height, width, device, ckpt, _ = case
        label = (f"{name:<4} {strategy:<11} {frames}f {height}x{width} {device:<4} "
                 f"ckpt={'on ' if ckpt else 'off'}")
        show(run_in_subprocess(*case), label)


if __name__ == "__main__":
    main()
