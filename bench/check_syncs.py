"""Host-device synchronisations where there should be none, caught on a GPU.

    python bench/check_syncs.py                       # streaming eager (30 blocks) and compiled
                                                      #   (6 blocks), a training step per strategy
    python bench/check_syncs.py --part streaming --compile-layers 30
    python bench/check_syncs.py --part training --layers 4

Everything runs under torch.cuda.set_sync_debug_mode: "error" where the goal is none (a
streaming block from the third on - the stream's first two make its tables and, compiled,
its graphs - and a training micro-batch with its gradient clipping: the loop reads its
figures every LOG_EVERY_STEPS steps, training/step_log.py), "warn" around the optimizer
step, whose syncs are counted (OFFLOAD_OPTIMIZER waits once per step for the gradients it
steps on the host; the others should not wait). A streaming block's actions come from the
host, as a player's do. Besides, per streaming case the frames per second of the checked
blocks (the student bf16 with random weights, the VAE decoder fp16), and per training case
the loss read after the checked steps and OFFLOAD_FROZEN's prefetch hits. One line per case;
a sync prints where it happened and fails the case; the exit status counts failed cases.
The tests on the CPU (tests/test_streaming_compile.py, tests/test_training_stalls.py) check
the same paths on fake 'cuda' tensors, where no GPU can say what really waits.
"""

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_model import build_model  # noqa: E402
from bench_streaming import FRAMES_PER_BLOCK_VIDEO, build, with_layers  # noqa: E402
from generation.streaming import StreamingGenerator  # noqa: E402
from training.epochs import sample_noise  # noqa: E402
from training.flow_matching import batch_from_random_inputs, noised_inputs  # noqa: E402
from training.ranks import Ranks  # noqa: E402
from training.recipe import TrainingRecipe  # noqa: E402
from training.step_log import StepLog  # noqa: E402
from wan.conditioning import STREAM_COND_LATENT_FRAMES, cond_concat_from_latent  # noqa: E402
from wan.config import base_config, distilled_config  # noqa: E402
from wan.device import autocast_for  # noqa: E402
from wan.model import CONTEXT_TOKENS, random_inputs  # noqa: E402
from wan.shapes import LATENT_CHANNELS, VIDEO_HEIGHT, VIDEO_WIDTH, latent_frame_count, latent_size  # noqa: E402
from wan.vae import StreamingDecoder, VAEConfig  # noqa: E402

CUDA = torch.device("cuda")
SAMPLING = dict(mode="uniform", shift=5.0, min_sigma=0.0, max_sigma=1.0)
# (strategy, savers): every strategy plain, and each saver once
TRAINING_CASES = (("action_only", {}), ("last_layers", {}), ("lora", {}), ("full", {}),
                  ("lora", {"OFFLOAD_FROZEN": True}), ("full", {"OFFLOAD_OPTIMIZER": True}),
                  ("full", {"OPTIMIZER_IN_BACKWARD": True}), ("action_only", {"OPTIMIZER": "adamw_8bit"}))


def where(error: BaseException) -> str:
    """The innermost frames of this project's code in the error's traceback."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if str(ROOT) in f.filename]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(frames[-4:]))


def sync_warnings(caught) -> int:
    return sum("synchronizing" in str(w.message) for w in caught)


# ----------------------------------------------------------------------------- streaming

def streaming_case(layers: int, compile_mode: str, blocks: int) -> bool:
    config = with_layers(distilled_config("universal"), layers)
    latent_hw = latent_size(VIDEO_HEIGHT, VIDEO_WIDTH)
    model, vae = build(config, VAEConfig(), CUDA, torch.bfloat16, torch.float16)
    g = torch.Generator().manual_seed(0)
    cond_concat = cond_concat_from_latent(torch.randn(1, LATENT_CHANNELS, STREAM_COND_LATENT_FRAMES, *latent_hw,
                                                      generator=g))
    visual_context = torch.randn(1, CONTEXT_TOKENS, config.clip_dim, generator=g)
    generator = StreamingGenerator(model, cond_concat, visual_context, StreamingDecoder(vae), compile_mode=compile_mode)
    keyboard, mouse = torch.zeros(1, 4), torch.tensor([[0.0, 0.1]])  # on the host, as a player's
    keyboard[0, 0] = 1
    label = f"streaming, {layers} blocks, COMPILE={compile_mode}"
    started = time.perf_counter()
    with autocast_for(CUDA):
        for _ in range(2):  # the stream's tables; compiled: its two graphs (and their CUDA graphs)
            generator.step(keyboard, mouse)
        torch.cuda.synchronize()
        first = time.perf_counter() - started
        started = time.perf_counter()
        try:
            torch.cuda.set_sync_debug_mode("error")
            for _ in range(blocks):
                made = generator.step(keyboard, mouse)
        except RuntimeError as error:
            print(f"FAIL {label}: a sync in block {generator.block_index}: {str(error).splitlines()[0]} at "
                  f"{where(error)}", flush=True)
            return False
        finally:
            torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    seconds = (time.perf_counter() - started) / blocks
    finite = bool(torch.isfinite(made.video).all())
    print(f"ok   {label}: {blocks} blocks without a sync; {seconds:.3f} s/block = "
          f"{FRAMES_PER_BLOCK_VIDEO / seconds:.1f} FPS (the first two blocks {first:.1f} s); frames finite: {finite}",
          flush=True)
    return finite


# ----------------------------------------------------------------------------- training

def training_case(strategy: str, savers: dict, layers: int, frames: int, steps: int) -> bool:
    import finetune_base_model as fb

    settings = dict(fb.SETTINGS.defaults, TRAINING_STRATEGY=strategy, LAST_LAYERS=1, GRAD_ACCUM_STEPS=1,
                    GRADIENT_CHECKPOINTING=True, MIXED_PRECISION="bf16", LEARNING_RATE=1e-5, EMA_DECAY=0.0, **savers)
    config = with_layers(base_config(), layers)
    recipe, host = TrainingRecipe(), torch.device("cpu")
    model = build_model(config, CUDA, compile_blocks=False).to(torch.bfloat16)
    trainable = recipe.prepare(model, settings)
    model.set_gradient_checkpointing(True)
    model.train()
    offload = recipe.offload(model, settings, host)
    optimizer = recipe.make_optimizer(trainable, settings, CUDA, host=host)
    latent_frames, (h, w) = latent_frame_count(frames), latent_size(VIDEO_HEIGHT, VIDEO_WIDTH)
    batch = batch_from_random_inputs(random_inputs(config, 1, latent_frames, h, w))
    sigma, noise = sample_noise(0, 0, 0, batch["latents"].shape[1:], SAMPLING)
    batch.update(sigma=sigma, noise=noise[None], recording=["take"], first_frame=torch.zeros(1, dtype=torch.long))
    batch = {k: v.pin_memory() if torch.is_tensor(v) else v for k, v in batch.items()}  # as the DataLoader pins it
    step_log, optimizer_syncs = StepLog(Ranks()), 0
    label = f"training {strategy}" + (f" + {', '.join(savers)}" if savers else "") + f", {layers} blocks"
    for step in range(steps + 1):  # the first makes the tables and the optimizer state
        checked = step > 0
        try:
            torch.cuda.set_sync_debug_mode("error" if checked else 0)
            inputs, sigma, noise = noised_inputs(batch, CUDA)
            losses = recipe.micro_batch(model, optimizer, inputs, sigma, noise, autocast_for(CUDA), 1.0)
            step_log.micro_batch(losses, batch["sigma"], batch["recording"], batch["first_frame"])
            norm = recipe.clip_gradients_on_device(optimizer, trainable, settings)
        except RuntimeError as error:
            print(f"FAIL {label}: a sync in the micro-batch: {str(error).splitlines()[0]} at {where(error)}", flush=True)
            return False
        finally:
            torch.cuda.set_sync_debug_mode(0)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn" if checked else 0)
            try:
                recipe.optimizer_step(optimizer, None, trainable, step)
            finally:
                torch.cuda.set_sync_debug_mode(0)
        optimizer_syncs += sync_warnings(caught) if checked else 0
        step_log.step_done(step + 1, 1, settings["LEARNING_RATE"], norm, 1)
    rows = step_log.flush("")
    prefetch = f"; OFFLOAD_FROZEN prefetch hits {offload.hits}, misses {offload.misses}" if offload else ""
    print(f"ok   {label}: {steps} micro-batches + clipping without a sync; optimizer step "
          f"{optimizer_syncs / steps:g} sync(s) per step; loss {rows[-1]['loss']:.4f}, gradient norm "
          f"{rows[-1]['grad_norm']:.3g}{prefetch}", flush=True)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("all", "streaming", "training"), default="all")
    parser.add_argument("--blocks", type=int, default=4, help="streaming blocks checked after the first two")
    parser.add_argument("--layers", type=int, default=30, help="transformer blocks of the eager streaming model")
    parser.add_argument("--compile-layers", type=int, default=6, help="... of the compiled one (0: skip it)")
    parser.add_argument("--compile", default="reduce-overhead", help="the compiled streaming case's COMPILE")
    parser.add_argument("--train-layers", type=int, default=4, help="transformer blocks of the training model")
    parser.add_argument("--frames", type=int, default=17, help="training clip length at 352x640")
    parser.add_argument("--steps", type=int, default=2, help="training steps checked after the first")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA GPU: nothing to check here (the CPU tests check these paths on fake 'cuda' tensors)")
        return 0
    print(f"torch {torch.__version__}, {torch.cuda.get_device_name()}", flush=True)
    cases = []
    if args.part in ("all", "streaming"):
        cases.append(lambda: streaming_case(args.layers, "off", args.blocks))
        if args.compile_layers:
            cases.append(lambda: streaming_case(args.compile_layers, "off", args.blocks))
            cases.append(lambda: streaming_case(args.compile_layers, args.compile, args.blocks))
    if args.part in ("all", "training"):
        cases += [lambda s=strategy, v=savers: training_case(s, v, args.train_layers, args.frames, args.steps)
                  for strategy, savers in TRAINING_CASES]
    failed = 0
    for case in cases:
        try:
            failed += not case()
        except Exception as error:  # a case that breaks otherwise is reported, and the others still run
            print(f"FAIL {type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''} at {where(error)}",
                  flush=True)
            failed += 1
        torch.cuda.empty_cache()
    print(f"{len(cases) - failed} of {len(cases)} cases passed", flush=True)
    return failed


if __name__ == "__main__":
    sys.exit(main())
