"""Does fine-tuning teach the controls? Train a tiny model on the demo world on CPU and
measure, epoch by epoch, how much its predictions and its videos depend on the keys.

    python bench/bench_learn_controls.py                    # the recipe below: ~16 minutes on 2 cores
    python bench/bench_learn_controls.py --shifts=1,3,5     # one run per TIMESTEP_SHIFT
    python bench/bench_learn_controls.py --epochs=5 --out=/tmp/lc   # shorter, elsewhere
    python bench/bench_learn_controls.py --world=turns      # the camera only turns, from one spot
    python bench/bench_learn_controls.py --redraw bench/learn_controls.json   # only the plot, from saved results

Training is finetune_base_model.train() itself, on the --demo set-up (demo_world/setup.py:
the demo recording, the trained demo VAE) with the recipe's settings, from a random tiny base
model wider than the demo's (MODEL); it saves the weights of every evaluated epoch. The
recording is one of WORLDS: the demo's own script (walks, strafes, turns, looks), or the same
world seen by a camera that only turns where it stands. Each saved epoch is then scored
(after training, so the training budget is training alone):

  * validation loss and action gain (training/flow_matching.validate: validation loss with
    another clip's actions / with the true ones) at EVAL_SIGMAS fixed noise levels, the same
    for every TIMESTEP_SHIFT (the training script's own validation sigmas follow the shift,
    so its numbers do not compare across shifts; they are printed too);
  * previews of PREVIEW_CLIPS validation clips, each generated from the same noise with its
    own actions and with another clip's (generation/previews.other_clip_index), scored by
    the action-following score against the clip's own actions, beside the real frames'
    score and the PSNR of generated frames 1-8 against the real ones. Each video is scored
    twice: over consecutive frames, and over every 4th frame (the frames the latent frames
    hold themselves: the motion the model decides, without what the VAE draws in between);
    and how far its content moves from one frame to the next, in pixels
    (video/action_score.mean_shift), which tells a video that moves the wrong way from one
    that barely moves.

Prints a table per run and writes OUT/learn_controls.png (the curves, drawn with matplotlib) and
OUT/learn_controls.json (learn_controls_turns.* for --world=turns). Progress is measured in
optimizer steps and epochs: the wall times printed depend on what else the machine runs.
"""

import argparse
import json
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import convert_unreal_data as data  # noqa: E402
import finetune_base_model as fb  # noqa: E402
from demo_world.recording import DEMO_RUNS  # noqa: E402
from demo_world.setup import DEMO_RECORDING_FRAMES, demo_paths_under, prepare_demo, write_demo_base_model  # noqa: E402
from generation.bidirectional import decode_frames  # noqa: E402
from generation.finetuned import FINAL_FILE, load_model  # noqa: E402
from generation.previews import (first_frames_psnr, generate_cached_clip, most_active_clips,  # noqa: E402
                                 other_clip_index, score_panels)
from latents.cache import EncodingSettings, LatentCache  # noqa: E402
from latents.dataset import CachedClipDataset  # noqa: E402
from recordings.clips import RecordingClipDataset  # noqa: E402
from recordings.report import check_data  # noqa: E402
from training.flow_matching import validate  # noqa: E402
from video.action_score import mean_shift  # noqa: E402
from wan import flow  # noqa: E402
from wan.files import write_atomic, write_json_atomic  # noqa: E402
from wan.shapes import VAE_TIME_STRIDE  # noqa: E402
from wan.vae import load_vae  # noqa: E402

# -----------------------------------------------------------------------------
# The recipe: the --demo settings (MOUSE_SCALE=0.3 among them) with these changes and MODEL
# below (2-core CPU: about 2 minutes to render and encode the recording, 10 of training,
# 4 of scoring).
# What mattered most, in trial runs of a plain loop on the cached recording (action gain at
# the fixed sigmas): the scale of the mouse input (demo_world/setup.py says why; 1.021 ->
# 1.040 after 500 steps), then the batch. The action signal is a small part of each clip's loss, and
# gradients of small batches bury it: batch 2 gave 1.005, 8 1.008, 16 1.014, 32 1.021 and
# 64 1.026 in the same time; 128 (1.013) made too few steps. The learning rate was raised with
# the batch (6e-3 at 64 for the demo's model; 8e-3 at 32 was worse than 4e-3); wider action
# modules did not help; a wider model did (MODEL).
# The training script's own validation is left to the last epoch: at this batch an epoch of
# training costs less than validating it, and the benchmark scores the saved epochs itself.
RECIPE = dict(BATCH_SIZE=64, LEARNING_RATE=4e-3, WARMUP_STEPS=20, NUM_EPOCHS=200, VAL_EVERY_EPOCHS=200)
# Wider and shallower than the demo's model (DEMO_MODEL: dim 64, 3 blocks): a token holds
# 2x2 latent pixels of 16 channels, 64 numbers, so at dim 64 the model has no room to carry a
# token's content beside anything else. In the plain loop, in the same 12 minutes on one
# thread: action gain 1.20 and validation loss 0.51 after 1,042 steps, against 1.07-1.10
# and 0.67 after about 1,200 at dim 64 (6e-3 there; 4e-3 here); dim 192 made too few
# steps (1.14). Its own folder (BENCH_MODEL_FOLDER), written afresh every run.
MODEL = dict(dim=128, num_layers=2, num_heads=4, ffn_dim=256)
BENCH_MODEL_FOLDER = "bench_base_model"
# Four times the demo's recording. On the demo's 900 frames (82 training clips) the model
# learns to use the keys on its training clips (action gain 1.011 there after 55 epochs at
# batch 2) but not on validation (1.000): it memorises how each clip moves. On 3600 frames
# the validation gain grows steadily.
RECORDING_FRAMES = 4 * DEMO_RECORDING_FRAMES
# The recordings, as decks of demo_world.recording's runs. "full": the demo's own. "turns":
# the camera stays where it starts and turns left or right at 1-3 degrees per frame. In
# trial runs (12 minutes on one thread, 8 validation clips) only "turns" made previews that
# follow the keys: from one spot the model learns the world's panorama and draws it turned
# as the mouse says; wherever the camera also walks it does not learn to draw the picture
# moved in 10 minutes (bench/RESULTS.md).
WORLDS = {"full": DEMO_RUNS, "turns": ("turn",)}
EVAL_EVERY_EPOCHS = 25                 # score every N epochs and the last
EVAL_SIGMAS = flow.validation_sigmas(8, shift=1.0)  # the quantiles of uniform noise levels
PREVIEW_CLIPS = 4                      # the most active validation clips
PREVIEW_STEPS = 20                     # Euler steps per preview (the scores barely change beyond)
# The videos each preview scores, all against the clip's own keys, in the plot's line styles:
# generated with its keys, generated with another clip's, the real frames, the VAE's
# reconstruction of them. Each over consecutive frames, and with LATENT_SUFFIX over every 4th.
PREVIEW_VIDEOS = {"true": ("-", "generated, own keys"), "shuffled": ("--", "generated, another clip's keys"),
                  "truth": (":", "the real frames"), "recon": ("", "the VAE's reconstruction of them (dots)")}
LATENT_SUFFIX = "_latent"
MOTION_SUFFIX = "_px"                  # the video's image motion per frame (pixels), not a score
PREVIEW_COLUMNS = tuple(name + suffix for suffix in ("", LATENT_SUFFIX, MOTION_SUFFIX) for name in PREVIEW_VIDEOS)
THREADS = 2                            # both cores: at batch 64 a step of the demo's model took 0.38-0.40 s, 0.52 s on one
# -----------------------------------------------------------------------------


@torch.no_grad()
def score_epoch(settings: dict, weights: Path, val_set, vae, truths: dict, recons: dict) -> dict:
    """Validation at EVAL_SIGMAS and the previews of one epoch's weights."""
    loaded = load_model(settings["BASE_MODEL_DIR"], weights, settings["KEYBOARD_KEYS"], torch.device("cpu"),
                        torch.float32)
    model, keys = loaded.model, loaded.keyboard_keys
    result = validate(model, val_set, EVAL_SIGMAS, settings["SEED"], torch.device("cpu"), nullcontext())
    # The training script's own measure (its validation sigmas follow TIMESTEP_SHIFT), for every
    # scored epoch, not only those the script validated.
    script_sigmas = flow.validation_sigmas(settings["VAL_SIGMAS"], settings["TIMESTEP_SAMPLING"], settings["TIMESTEP_SHIFT"],
                                           settings["MIN_SIGMA"], settings["MAX_SIGMA"])
    script = validate(model, val_set, script_sigmas, settings["SEED"], torch.device("cpu"), nullcontext())
    scores = {key: [] for key in PREVIEW_COLUMNS} | {"psnr": []}
    for index, truth in truths.items():
        item = val_set[index]
        other = val_set[other_clip_index(index, len(val_set))]
        videos = {}
        for name, actions in (("true", item), ("shuffled", other)):
            latents = generate_cached_clip(model, item, actions["keyboard"], actions["mouse"], PREVIEW_STEPS,
                                           settings["TIMESTEP_SHIFT"], settings["SEED"], nullcontext())
            videos[name] = decode_frames(vae, latents)
        videos["truth"] = truth
        videos["recon"] = recons[index]
        panel_scores = score_panels(videos, item["keyboard"], item["mouse"], keys)  # all against the true actions
        latent_scores = score_panels(videos, item["keyboard"], item["mouse"], keys, stride=VAE_TIME_STRIDE)
        for name in PREVIEW_VIDEOS:
            scores[name].append(panel_scores[name]["overall"])
            scores[name + LATENT_SUFFIX].append(latent_scores[name]["overall"])
            scores[name + MOTION_SUFFIX].append(mean_shift(panel_scores[name]["motion"]))
        scores["psnr"].append(first_frames_psnr(videos["true"], truth))
    return {"val_loss": result["val_loss"], "action_gain": result.get("action_gain"),
            "script_val_loss": script["val_loss"], "script_action_gain": script.get("action_gain"),
            **{f"preview_{name}": mean(values) for name, values in scores.items()}}


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def prepare_world(world_dir: Path, world: str, frames: int) -> dict:
    """The recipe's settings for a world's run under world_dir: its recording rendered and the
    tiny models written (demo_world/setup.py), the random base model MODEL drawn afresh from
    the settings' SEED. Shared with bench/bench_play_proof.py."""
    settings, _ = fb.parse_settings(["--demo", *(f"--{name}={value}" for name, value in demo_paths_under(world_dir / "demo").items())])
    settings.update(RECIPE)
    prepare_demo(settings, frames, WORLDS[world])
    settings["BASE_MODEL_DIR"] = str(world_dir / BENCH_MODEL_FOLDER)
    torch.manual_seed(settings["SEED"])
    write_demo_base_model(settings["BASE_MODEL_DIR"], len(settings["KEYBOARD_KEYS"]), MODEL)
    return settings


def train_run(base: dict, shift: float, epochs: int, run_dir: Path) -> tuple[dict, dict, float]:
    """finetune_base_model.train() with TIMESTEP_SHIFT=shift for `epochs` epochs into run_dir
    (cleared first), saving every EVAL_EVERY_EPOCHS. Returns (settings, summary, seconds)."""
    settings = dict(base, TIMESTEP_SHIFT=shift, NUM_EPOCHS=epochs, CHECKPOINT_DIR=str(run_dir),
                    SAVE_EVERY_EPOCHS=EVAL_EVERY_EPOCHS, PREVIEW_EVERY_EPOCHS=0, RESUME=False)
    fb.check_settings(settings)
    shutil.rmtree(run_dir, ignore_errors=True)  # the benchmark's own folder: a rerun starts afresh
    print(f"\n=== TIMESTEP_SHIFT={shift:g}: training {epochs} epochs into {run_dir}", flush=True)
    started = time.time()
    summary = fb.train(settings)
    return settings, summary, time.time() - started


def run_one(base: dict, shift: float, epochs: int, world_dir: Path) -> dict:
    """Train with TIMESTEP_SHIFT=shift, then score the saved epochs. Returns the run's record."""
    run_dir = world_dir / f"shift{shift:g}"
    settings, summary, train_seconds = train_run(base, shift, epochs, run_dir)
    history = {entry["epoch"]: entry for entry in summary["history"]}

    report = check_data(settings["DATA_DIR"], data.data_settings(settings))
    cache = LatentCache(settings["CACHE_DIR"])
    encoding = EncodingSettings.for_files(settings["VAE_PATH"], settings["CLIP_PATH"], settings["VIDEO_HEIGHT"],
                                          settings["VIDEO_WIDTH"], settings["CACHE_DTYPE"])
    val_set = CachedClipDataset(report.split.val, settings["CACHE_DIR"], encoding, cache)
    vae = load_vae(settings["VAE_PATH"])
    truths = {i: RecordingClipDataset([report.split.val[i]], settings["VIDEO_HEIGHT"], settings["VIDEO_WIDTH"])[0]
              ["video"].transpose(0, 1) for i in most_active_clips(report.split.val, PREVIEW_CLIPS)}
    # The VAE's own reconstruction of the real frames: the motion its decoder keeps, the fair
    # reference for generated videos, which all pass through it.
    recons = {i: decode_frames(vae, val_set[i]["latents"][None].float()) for i in truths}
    epochs_scored = sorted({e for e in history if e % EVAL_EVERY_EPOCHS == 0} | {max(history)})
    rows = []
    for epoch in epochs_scored:
        # Epoch files come every EVAL_EVERY_EPOCHS (SAVE_EVERY_EPOCHS above); a last epoch off that
        # beat has only the final file.
        weights = run_dir / (f"base_finetuned_epoch{epoch}.safetensors" if epoch % EVAL_EVERY_EPOCHS == 0
                             else FINAL_FILE)
        row = {"epoch": epoch, "step": history[epoch]["step"], "train_loss": history[epoch]["train_loss"],
               **score_epoch(settings, weights, val_set, vae, truths, recons)}
        rows.append(row)
        print(format_row(row), flush=True)
    return {"shift": shift, "train_seconds": train_seconds, "steps": summary["steps"], "rows": rows,
            "train_clips": len(report.split.train), "val_clips": len(report.split.val)}


HEADER = (f"{'epoch':>5} {'step':>6} {'train':>7} {'val':>7} {'gain':>7} {'val*':>7} {'gain*':>7} "
          f"{'true':>5} {'shuf':>5} {'real':>5} {'recon':>5} {'true4':>5} {'shuf4':>5} {'real4':>5} {'rec4':>5} "
          f"{'pxT':>5} {'pxS':>5} {'pxR':>5} {'pxV':>5} {'PSNR':>5}")


def format_row(row: dict) -> str:
    def number(value, width, digits):
        return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"

    return (f"{row['epoch']:>5} {row['step']:>6} {number(row['train_loss'], 7, 4)} {number(row['val_loss'], 7, 4)} "
            f"{number(row['action_gain'], 7, 4)} {number(row['script_val_loss'], 7, 4)} "
            f"{number(row['script_action_gain'], 7, 4)} "
            + "".join(f"{number(row[f'preview_{name}'], 5, 2)} " for name in PREVIEW_COLUMNS)
            + f"{number(row['preview_psnr'], 5, 1)}")


# -----------------------------------------------------------------------------
# The plot (matplotlib)

def preview_series(suffix: str) -> tuple:
    """(row key, line style, label) of every preview video's measure with that suffix."""
    return tuple((f"preview_{video}{suffix}", style, label) for video, (style, label) in PREVIEW_VIDEOS.items())


# (title, y-axis label, the series drawn: (row key, line style, label) each, a reference line or None)
PANELS = (("validation loss at fixed sigmas", "velocity MSE", (("val_loss", "-", "validation loss"),), None),
          ("action gain", "val loss, another clip's keys / its own",
           (("action_gain", "-", "at fixed sigmas"), ("script_action_gain", "--", "the training script's sigmas")),
           (1.0, "1: the keys change nothing")),
          ("PSNR of generated frames 1-8", "dB", (("preview_psnr", "-", "PSNR"),), None),
          ("following the keys (consecutive frames)", "share of frame pairs", preview_series(""), None),
          ("following the keys (every 4th frame: the latent frames')", "share of frame pairs",
           preview_series(LATENT_SUFFIX), None),
          ("image motion of the same videos", "pixels per frame", preview_series(MOTION_SUFFIX), None))
COLUMNS = 3


def plot(runs: list[dict], path: Path) -> Path:
    """One panel per measure, one colour per run, epochs along x (each scored epoch labelled)."""
    from matplotlib.figure import Figure

    lines = -(-len(PANELS) // COLUMNS)
    figure = Figure(figsize=(6.0 * COLUMNS, 4.2 * lines), layout="constrained")
    epochs = sorted({row["epoch"] for run in runs for row in run["rows"]})
    for index, (title, ylabel, series, reference) in enumerate(PANELS):
        axes = figure.add_subplot(lines, COLUMNS, index + 1)
        for r, run in enumerate(runs):
            name = f"{run['world']} world, TIMESTEP_SHIFT={run['shift']:g}"
            for k, (key, style, label) in enumerate(series):
                points = [(row["epoch"], row[key]) for row in run["rows"] if row.get(key) is not None]
                if points:  # one run: a colour per series; several: a colour per run, a line style per series
                    x, y = zip(*points)
                    axes.plot(x, y, linestyle=style or "none", marker="o", markersize=4,
                              color=f"C{k if len(runs) == 1 else r}",
                              label=label if len(runs) == 1 else f"{name}: {label}")
        if reference is not None:
            axes.axhline(reference[0], color="grey", linestyle=":", linewidth=1, label=reference[1])
        axes.set_title(title, fontsize="medium")
        axes.set_xlabel("epoch")
        axes.set_ylabel(ylabel)
        axes.set_xticks(epochs)
        axes.tick_params(axis="x", labelsize="small", labelrotation=45 if len(epochs) > 10 else 0)
        axes.grid(True, alpha=0.3)
        axes.legend(fontsize="x-small")
    figure.suptitle(", ".join(f"{run['world']} world, TIMESTEP_SHIFT={run['shift']:g}: {run['steps']} optimizer "
                              f"steps, {run['train_clips']} training / {run['val_clips']} validation clips"
                              for run in runs))
    return write_atomic(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))


def redraw(json_path: Path) -> Path:
    """The plot again from a results JSON this benchmark wrote (no training): beside it, .png."""
    results = json.loads(json_path.read_text(encoding="utf-8"))
    runs = [{"world": results.get("world", "full"), **run} for run in results["runs"]]
    return plot(runs, json_path.with_suffix(".png"))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shifts", default=None, help="TIMESTEP_SHIFT values, comma-separated (default: the recipe's)")
    parser.add_argument("--epochs", type=int, default=None, help=f"epochs per run (default {RECIPE['NUM_EPOCHS']})")
    parser.add_argument("--out", default="bench_runs/learn_controls", help="where runs, plot and JSON go")
    parser.add_argument("--frames", type=int, default=RECORDING_FRAMES,
                        help=f"frames of the demo recording (default {RECORDING_FRAMES})")
    parser.add_argument("--threads", type=int, default=THREADS, help=f"torch CPU threads (default {THREADS})")
    parser.add_argument("--world", choices=sorted(WORLDS), default="full",
                        help="the recording's deck of runs: the demo's (full) or turns only (default full)")
    parser.add_argument("--redraw", nargs="+", type=Path, metavar="JSON",
                        help="only redraw the plot of results JSONs this benchmark wrote (no training), beside each")
    args = parser.parse_args(argv)
    if args.redraw:
        for json_path in args.redraw:
            print(f"plot: {redraw(json_path)}")
        return 0
    torch.set_num_threads(args.threads)
    out = Path(args.out).resolve()
    # The demo's deck in OUT itself (as before worlds existed: its latent cache is reused), another under OUT/WORLD.
    world_dir = out if args.world == "full" else out / args.world
    results = "learn_controls" if args.world == "full" else f"learn_controls_{args.world}"
    settings = prepare_world(world_dir, args.world, args.frames)
    shifts = [float(s) for s in args.shifts.split(",")] if args.shifts else [settings["TIMESTEP_SHIFT"]]
    epochs = args.epochs or settings["NUM_EPOCHS"]
    print(f"torch {torch.__version__}, {args.threads} thread(s); model: {MODEL}; recipe: {RECIPE}; {args.frames} recorded frames "
          f"of the {args.world!r} world {WORLDS[args.world]}; "
          f"scored every {EVAL_EVERY_EPOCHS} epochs at sigmas {', '.join(f'{s:.2f}' for s in EVAL_SIGMAS.tolist())}")
    runs = []
    for shift in shifts:
        runs.append({"world": args.world, **run_one(settings, shift, epochs, world_dir)})
        plot(runs, out / f"{results}.png")
        write_json_atomic(out / f"{results}.json", {"model": MODEL, "recipe": RECIPE, "recording_frames": args.frames,
                                                    "world": args.world, "deck": WORLDS[args.world], "runs": runs})
    print("\nval/gain: at the fixed sigmas; val*/gain*: the training script's own validation (sigmas of its shift);"
          "\ntrue/shuf/real/recon: action-following of previews with the true keys, another clip's keys, the real "
          "frames and the VAE's reconstruction of them (all scored against the true keys); true4...rec4: the same "
          "over every 4th frame; pxT...pxV: how far the content of those four videos moves per frame (pixels); "
          "PSNR: generated frames 1-8 vs the real ones")
    for run in runs:
        print(f"\nTIMESTEP_SHIFT={run['shift']:g}: {run['steps']} optimizer steps in {run['train_seconds']:.0f} s "
              f"of train(), the latent cache's first build included (wall time: noisy where the cores are shared); {run['train_clips']} training / {run['val_clips']} validation clips")
        print(HEADER)
        for row in run["rows"]:
            print(format_row(row))
    print(f"\nplot: {out / (results + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
