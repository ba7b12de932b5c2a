"""Do the keys steer the played world? The whole path on the turning world, end to end:
its recording -> fine-tuning (the learn-controls recipe) -> distillation stages A, B, C ->
headless play of scripted actions -> the action-following score of what was played.

    python bench/bench_play_proof.py                        # the whole chain (53 min on 2 cores shared with 3 other jobs)
    python bench/bench_play_proof.py --epochs=200           # the learn-controls recipe's full fine-tuning
    python bench/bench_play_proof.py --set SCORE_MIN_TIMESTEP=500 --tag=window  # a distillation variant
    python bench/bench_play_proof.py --only-finetune        # stop after the fine-tuning
    python bench/bench_play_proof.py --rows=teacher,A,B,C --seeds=2,3 --tag=seeds23   # other noises, trained folders reused
    python bench/bench_play_proof.py --show bench/play_proof.json                     # only the table of saved results

1. The turning world (bench/bench_learn_controls.py --world=turns: the camera stays where
   it starts and turns left or right) is fine-tuned by that benchmark's own functions
   (prepare_world, train_run) with its recipe for --epochs epochs. The trained folder is
   keyed on those settings (a hash of model, recipe, epochs, recording): a later run with
   the same settings reuses it, so distillation variants do not train it again.
2. Stages A, B and C (distill_streaming_model.train(), the --demo chain's settings,
   demo_world/distill_demo.py) distil it, the teacher being that fine-tuned model; each
   stage's folder keyed on its settings (and --set overrides) the same way.
3. Every model plays SCRIPTS (turn left, turn right, forward, mixed) from the same first
   frame (the validation clip the previews show) for PLAY_BLOCKS blocks, from SEEDS noises,
   through play_world.py --headless's own pieces (its settings, load_model, start_stream,
   headless_actions; the frames kept raw instead of composed into an MP4): the teacher
   (the fine-tuned model's bidirectional preview, generation/bidirectional.py, and the same
   model streamed block-causally with the official 3-step schedule 1000, 666, 333, not
   distilled), and each stage's student (the 3-step schedule it was distilled for).
4. Each stream is scored (video/action_score.py) against its own script's actions ("true")
   and against OTHER's script ("other": a left turn's stream scored as a right turn, ...),
   over consecutive frames and over every 4th frame (the latent frames' own motion).

Prints a table; writes bench/play_proof.json and bench/play_proof_strip.png (a left and a
right turn from the final student's stream) unless --out-results says elsewhere. Wall times
depend on what else the machine runs.
"""

import argparse
import hashlib
import json
import shutil
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import bench_learn_controls as lc  # noqa: E402
import convert_unreal_data as data  # noqa: E402
import distill_streaming_model as dsm  # noqa: E402
import play_world  # noqa: E402
from demo_world.distill_demo import DEMO_STAGES, DISTILL_DEMO_SETTINGS  # noqa: E402
from generation.action_scripts import read_action_script  # noqa: E402
from generation.bidirectional import generate_frames  # noqa: E402
from generation.finetuned import FINAL_FILE, load_model  # noqa: E402
from generation.previews import preview_clip_index  # noqa: E402
from latents.encoders import load_encoders  # noqa: E402
from recordings.report import check_data  # noqa: E402
from video.action_score import action_following_score, mean_shift  # noqa: E402
from generation.streaming import StreamingGenerator, first_frame_conditions  # noqa: E402
from wan.conditioning import STREAM_COND_LATENT_FRAMES  # noqa: E402
from wan.config import FRAMES_PER_BLOCK  # noqa: E402
from wan.files import write_atomic, write_json_atomic  # noqa: E402
from wan.shapes import VAE_TIME_STRIDE, video_frame_count  # noqa: E402
from wan.vae import StreamingDecoder  # noqa: E402

# -----------------------------------------------------------------------------
# Settings
WORLD = "turns"                          # bench_learn_controls.WORLDS: the camera only turns
FINETUNE_EPOCHS = 150                    # the recipe's 200 scaled down for a shared CPU: at 150 (900 steps) its previews already followed the keys 3x (bench/RESULTS.md)
PLAY_BLOCKS = 4                          # blocks per played stream: 9 + 3 x 12 = 45 frames
ROWS = video_frame_count(PLAY_BLOCKS * FRAMES_PER_BLOCK)
TURN = 0.6                               # yaw per frame in model units: the recording's 1-3 degrees x MOUSE_SCALE 0.3 = 0.3-0.9
# name: (action script of ROWS rows, the script whose actions are the "other" ones)
SCRIPTS = {
    "left": (f"mouse(0,{-TURN})*{ROWS}", "right"),
    "right": (f"mouse(0,{TURN})*{ROWS}", "left"),
    "forward": (f"W*{ROWS}", "back"),
    "mixed": (f"mouse(0,{-TURN})*21 mouse(0,{TURN})*{ROWS - 21}", "mixed_mirrored"),
}
OTHER_SCRIPTS = {  # scripts only scored against, never played
    "back": f"S*{ROWS}",
    "mixed_mirrored": f"mouse(0,{TURN})*21 mouse(0,{-TURN})*{ROWS - 21}",
}
SEEDS = (0, 1)                           # noises per script and model
TEACHER_STEPS = 20                       # Euler steps of the bidirectional teacher (the learn-controls previews'; the scores barely change beyond)
STRIP_FRAMES = (0, 8, 16, 24, 32, 44)    # the frames of each turn in the picture
# Over the --demo chain's distillation settings: validation streams from 2 noises per clip, not 4
# (validation only: training is the same; it halves the stages' validation time on a shared CPU).
DISTILL_OVERRIDES = {"VAL_SAMPLES": 2}
THREADS = 1                              # tiny models gain nothing from more threads on shared cores
GOAL_RATIO, GOAL_KEPT = 2.0, 0.7         # the final student: true >= 2x other, >= 70% of the teacher's true
# -----------------------------------------------------------------------------


def settings_key(settings: dict) -> str:
    """A short hash of the settings that shape a trained folder: the same settings, the same folder."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


MARKER = "bench_settings.json"           # written last into a trained folder: what made it


def reusable(folder: Path, settings: dict) -> bool:
    marker = folder / MARKER
    try:
        return json.loads(marker.read_text(encoding="utf-8"))["settings"] == json.loads(
            json.dumps(settings, sort_keys=True, default=str))
    except (OSError, ValueError, KeyError):
        return False


def mark(folder: Path, settings: dict, seconds: float) -> None:
    write_json_atomic(folder / MARKER, {"settings": json.loads(json.dumps(settings, sort_keys=True, default=str)),
                                        "seconds": seconds})


# -----------------------------------------------------------------------------
# 1. fine-tuning (the learn-controls recipe)

def finetune(out: Path, epochs: int, frames: int) -> tuple[dict, Path, float | None]:
    """The turning world's fine-tuned model: (settings, its final checkpoint, the seconds its
    train() took, in this run or the earlier one whose folder is reused)."""
    shape = {"model": lc.MODEL, "recipe": lc.RECIPE, "epochs": epochs, "frames": frames, "world": WORLD,
             "deck": lc.WORLDS[WORLD]}
    world_dir = out / f"finetune-{settings_key(shape)}"
    settings = lc.prepare_world(world_dir, WORLD, frames)
    run_dir = world_dir / "run"
    checkpoint = run_dir / FINAL_FILE
    if reusable(world_dir, shape) and checkpoint.is_file():
        seconds = json.loads((world_dir / MARKER).read_text(encoding="utf-8"))["seconds"]
        print(f"fine-tuning: reusing {run_dir} (same model, recipe, epochs and recording; its train() took "
              f"{seconds:.0f} s)")
        return settings, checkpoint, seconds
    settings, summary, seconds = lc.train_run(settings, settings["TIMESTEP_SHIFT"], epochs, run_dir)
    mark(world_dir, shape, seconds)
    print(f"fine-tuning: {summary['steps']} optimizer steps in {seconds:.0f} s")
    return settings, checkpoint, seconds


# -----------------------------------------------------------------------------
# 2. distillation (stages A, B, C with the --demo chain's settings)

def distil(finetuned: dict, checkpoint: Path, overrides: dict, out: Path) -> tuple[dict, dict]:
    """Stages A, B, C from the fine-tuned model. Returns ({stage: student folder}, {stage:
    summary with seconds, or None where reused})."""
    shared = {name: finetuned[name] for name in ("BASE_MODEL_DIR", "VAE_PATH", "CLIP_PATH", "DATA_DIR", "CACHE_DIR",
                                                 "CACHE_DTYPE", "VIDEO_HEIGHT", "VIDEO_WIDTH", "VAL_FRACTION",
                                                 "MOUSE_SCALE", "KEYBOARD_KEYS")}
    base = {**DISTILL_DEMO_SETTINGS, **DISTILL_OVERRIDES, **shared, "CHECKPOINT": str(checkpoint), **overrides}
    students, summaries, previous, upstream = {}, {}, "", settings_key({"checkpoint": str(checkpoint)})
    for stage in DEMO_STAGES:
        # a stage's folder is keyed on the settings it trains with, so that a variant of stage B
        # reuses stage A's student
        own = {name: value for name, value in base.items() if name not in LATER_STAGE_SETTINGS[stage]}
        shape = {"base": own, "stage": stage, "upstream": upstream}
        upstream = settings_key(shape)
        folder = out / f"distill-{upstream}" / stage
        settings, _ = dsm.parse_settings([f"--{name}={value_text(value)}" for name, value in base.items()]
                                         + [f"--STAGE={stage}", f"--CHECKPOINT_DIR={folder}", f"--STUDENT_DIR={previous}",
                                            "--RESUME=false"])
        student = folder / dsm.STUDENT_FOLDER
        if reusable(folder.parent, shape) and student.is_dir():
            print(f"stage {stage}: reusing {student}")
            summaries[stage] = None
        else:
            shutil.rmtree(folder.parent, ignore_errors=True)
            print(f"\n=== stage {stage} into {folder}", flush=True)
            summaries[stage] = dsm.train(settings)
            mark(folder.parent, shape, summaries[stage]["seconds"])
        students[stage], previous = student, str(student)
    return students, summaries


# Settings only the stages after a stage read (its run records them, never uses them).
_LONG_TUNE_ONLY = ("LONG_TUNE_STEPS", "STREAM_CHUNK_LATENTS", "STREAM_OVERLAP_LATENTS", "STREAM_MAX_LATENTS")
LATER_STAGE_SETTINGS = {
    "causal_init": ("DMD_STEPS", "GENERATOR_EVERY", "GENERATOR_LR", "CRITIC_LR", "SCORE_MIN_TIMESTEP",
                    "SCORE_MAX_TIMESTEP") + _LONG_TUNE_ONLY,
    "dmd": _LONG_TUNE_ONLY,
    "long_tune": (),
}


def value_text(value) -> str:
    """A setting's value as --NAME=value text."""
    if isinstance(value, (tuple, list)):
        return ",".join(map(str, value))
    return str(value)


# -----------------------------------------------------------------------------
# 3. playing and 4. scoring

def follow_scores(frames: torch.Tensor, own: tuple, other: tuple, keys) -> dict:
    """The action-following score of frames [T, 3, H, W] against its own actions and another
    script's ((keyboard [T, K], mouse [T, 2]) each): over consecutive frames, over every
    VAE_TIME_STRIDE-th frame (suffix 4), and how far its content moves per frame (px)."""
    keys = tuple(keys)
    result = {}
    for name, (keyboard, mouse) in (("true", own), ("other", other)):
        score = action_following_score(frames, keyboard, mouse, keys)
        latent = action_following_score(frames[::VAE_TIME_STRIDE], keyboard[::VAE_TIME_STRIDE],
                                        mouse[::VAE_TIME_STRIDE], keys)
        result[name], result[name + "4"] = score["overall"], latent["overall"]
        result["px"] = mean_shift(score["motion"])
    return result


def script_rows(script: str, keys) -> tuple[torch.Tensor, torch.Tensor]:
    parsed = read_action_script(script, keys, max_rows=ROWS, limit=f"{PLAY_BLOCKS} blocks show")
    keyboard, mouse = parsed.tensors()
    if len(keyboard) != ROWS:
        raise ValueError(f"script {script!r}: {len(keyboard)} rows, the stream shows {ROWS}")
    return keyboard, mouse


def play_settings(finetuned: dict, start_frame: int, model_dir, checkpoint, script: str, seed: int) -> dict:
    """play_world.py's settings for a headless run of this script."""
    s, _ = play_world.parse_settings([
        "--headless", f"--MODEL_DIR={model_dir}", f"--CHECKPOINT={checkpoint}", "--MODE=universal",
        f"--KEYBOARD_KEYS={','.join(finetuned['KEYBOARD_KEYS'])}",
        f"--VAE_PATH={finetuned['VAE_PATH']}", f"--CLIP_PATH={finetuned['CLIP_PATH']}",
        f"--RECORDING={finetuned['DATA_DIR']}", f"--START_FRAME={start_frame}",
        f"--VIDEO_HEIGHT={finetuned['VIDEO_HEIGHT']}", f"--VIDEO_WIDTH={finetuned['VIDEO_WIDTH']}",
        f"--MOUSE_SCALE={finetuned['MOUSE_SCALE']}", "--DEVICE=cpu", f"--ACTIONS={script}",
        f"--NUM_BLOCKS={PLAY_BLOCKS}", f"--SEED={seed}"])
    return s


class PlayedModel:
    """A model as play_world.py --headless loads it (load_model) with its first image's
    conditioning (start_stream's), made once and streamed from for every script and seed."""

    def __init__(self, s: dict):
        self.keys = play_world.play_model_keys(s["MODEL_DIR"], s["CHECKPOINT"], s["MODE"], s["KEYBOARD_KEYS"])
        self.loaded = play_world.load_model(s)
        image, _ = play_world.first_image(s)
        self.vae, clip = load_encoders(s["VAE_PATH"], s["CLIP_PATH"], torch.device("cpu"))
        self.conditions = first_frame_conditions(self.vae, clip, image[None],
                                                 min(STREAM_COND_LATENT_FRAMES, PLAY_BLOCKS * FRAMES_PER_BLOCK))

    @torch.no_grad()
    def frames(self, s: dict) -> torch.Tensor:
        """The stream of s's ACTIONS (play_world.headless_actions) from s's SEED, its frames
        [T, 3, H, W] in [-1, 1] as generated (before play_world's overlay)."""
        actions = play_world.headless_actions(s, self.keys)
        has_mouse = self.loaded.model.config.action_config.enable_mouse
        generator = StreamingGenerator(self.loaded.model, *self.conditions, StreamingDecoder(self.vae),
                                       denoising_steps=play_world.denoising_steps(s), shift=s["TIMESTEP_SHIFT"],
                                       seed=s["SEED"], compile_mode=s["COMPILE"])
        videos = []
        for index, (keyboard_rows, mouse_rows) in enumerate(actions.blocks(has_mouse)):
            if index == actions.num_blocks:
                break
            block = generator.step(keyboard_rows[None], None if mouse_rows is None else mouse_rows[None])
            videos.append(block.video[0].transpose(0, 1).float().cpu())
        return torch.cat(videos).clamp(-1, 1)


class Teacher:
    """The fine-tuned model's bidirectional preview of a script (generate_preview.py's
    sampler, windows of its SEQUENCE_LENGTH chained), frames [T, 3, H, W] in [-1, 1]."""

    def __init__(self, finetuned: dict, checkpoint: Path, first: torch.Tensor):
        self.finetuned, self.first = finetuned, first
        self.model = load_model(finetuned["BASE_MODEL_DIR"], checkpoint, finetuned["KEYBOARD_KEYS"],
                                torch.device("cpu"), torch.float32).model.eval()
        self.vae, self.clip = load_encoders(finetuned["VAE_PATH"], finetuned["CLIP_PATH"], torch.device("cpu"))

    @torch.no_grad()
    def frames(self, keyboard: torch.Tensor, mouse: torch.Tensor, seed: int) -> torch.Tensor:
        return generate_frames(self.model, self.vae, self.clip, self.first, keyboard, mouse,
                               self.finetuned["SEQUENCE_LENGTH"], TEACHER_STEPS, self.finetuned["TIMESTEP_SHIFT"],
                               seed, nullcontext()).clamp(-1, 1)


ROW_NAMES = ("teacher", "streamed", "A", "B", "C")  # --rows: the table's rows, in its order


def score_rows(finetuned: dict, checkpoint: Path, students: dict, wanted=ROW_NAMES, seeds=SEEDS) -> tuple[list, dict]:
    """The wanted models' streams of every script from every seed, scored. Returns (rows,
    the final student's frames of the left and right turns from the first seed)."""
    report = check_data(finetuned["DATA_DIR"], data.data_settings(finetuned))
    clips = report.split.val or report.split.train
    start_frame = clips[preview_clip_index(clips)].first_frame
    models = [("teacher: fine-tuned, bidirectional 20 steps", None, None),
              ("teacher: fine-tuned, streamed 3 steps (not distilled)", finetuned["BASE_MODEL_DIR"], checkpoint)]
    models += [(f"student {label} ({stage})", students[stage], "") for label, stage in zip("ABC", DEMO_STAGES)]
    models = [model for name, model in zip(ROW_NAMES, models) if name in wanted]
    keys = tuple(finetuned["KEYBOARD_KEYS"])
    actions = {name: script_rows(script, keys) for name, script in
               {**{n: s for n, (s, _) in SCRIPTS.items()}, **OTHER_SCRIPTS}.items()}
    rows, strip = [], {}
    for label, model_dir, model_checkpoint in models:
        started = time.time()
        first_settings = play_settings(finetuned, start_frame, model_dir or finetuned["BASE_MODEL_DIR"],
                                       checkpoint if model_dir is None else model_checkpoint, SCRIPTS["left"][0], 0)
        player = Teacher(finetuned, checkpoint, play_world.first_image(first_settings)[0]) if model_dir is None \
            else PlayedModel(first_settings)
        per_script = {}
        for name, (script, other) in SCRIPTS.items():
            results = []
            for seed in seeds:
                if model_dir is None:
                    frames = player.frames(*actions[name], seed)
                else:
                    frames = player.frames(play_settings(finetuned, start_frame, model_dir, model_checkpoint,
                                                         script, seed))
                results.append(follow_scores(frames, actions[name], actions[other], keys))
                if model_dir == students[DEMO_STAGES[-1]] and seed == seeds[0] and name in ("left", "right"):
                    strip[name] = frames
            per_script[name] = {k: mean([r[k] for r in results]) for k in results[0]}
        row = {"model": label, "scripts": per_script, "seconds": time.time() - started,
               **{k: mean([v[k] for v in per_script.values()]) for k in ("true", "other", "true4", "other4", "px")}}
        rows.append(row)
        print(format_row(row), flush=True)
    return rows, {"start_frame": start_frame, **strip}


def mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


TURNS = ("left", "right", "mixed")       # the scripts the turning world taught (it never walks: W is not in its data)
# The table's two measures: (name, true key, other key, the scripts averaged). Over consecutive
# frames the score asks each frame pair to move by more than video/action_score's 0.5 px
# deadzone; over every 4th frame (the latent frames' own pictures) a turn has 4 frames' motion.
MEASURES = (("consecutive frames, every script", "true", "other", tuple(SCRIPTS)),
            ("every 4th frame, the turns", "true4", "other4", TURNS))


def measure(row: dict, true_key: str, other_key: str, scripts) -> tuple[float | None, float | None]:
    """A row's mean true and other scores over these scripts."""
    return (mean([row["scripts"][n][true_key] for n in scripts]), mean([row["scripts"][n][other_key] for n in scripts]))


HEADER = (f"{'model':<56} {'true':>5} {'other':>5} {'ratio':>5} | {'true4':>5} {'oth4':>5} {'ratio':>5} | "
          f"{'px':>5} | " + " ".join(f"{name:>11}" for name in SCRIPTS))


def _number(value, width=5, digits=2):
    return f"{'n/a':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def format_row(row: dict) -> str:
    columns = []
    for _, true_key, other_key, scripts in MEASURES:
        true, other = measure(row, true_key, other_key, scripts)
        columns.append(f"{_number(true)} {_number(other)} {_number(true / other if other else None, 5, 1)}")
    return (f"{row['model']:<56} {columns[0]} | {columns[1]} | {_number(row['px'])} | "
            + " ".join(f"{_number(row['scripts'][n]['true4'], 5)}/{_number(row['scripts'][n]['other4'], 5)}"
                       for n in SCRIPTS))


def goals(rows: list) -> dict:
    """Per measure: the last row's ratio of true to other scores, and its share of the
    bidirectional teacher's true score (None without the teacher's row)."""
    teacher, final = rows[0], rows[-1]
    has_teacher = teacher["model"].startswith("teacher: fine-tuned, bidirectional")
    result = {}
    for name, true_key, other_key, scripts in MEASURES:
        true, other = measure(final, true_key, other_key, scripts)
        teacher_true = measure(teacher, true_key, other_key, scripts)[0] if has_teacher else None
        ratio = true / other if other else float("inf")
        kept = true / teacher_true if teacher_true else None
        result[name] = {"ratio": ratio, "kept": kept, "ratio_met": ratio >= GOAL_RATIO,
                        "kept_met": kept is not None and kept >= GOAL_KEPT}
    return result


def print_table(rows: list) -> None:
    print("\ntrue / other: the action-following score of each model's streams against their own script's actions / "
          "another script's (left<->right, forward<->back, mixed<->mirrored), mean over the scripts and seeds: "
          "over consecutive frames of every script, and (true4 / oth4) over every 4th frame of the turns; px: image "
          "motion per frame; per script: true4/other4")
    print(HEADER)
    for row in rows:
        print(format_row(row))
    for name, met in goals(rows).items():
        print(f"last row, {name}: true/other {met['ratio']:.2f}x (goal {GOAL_RATIO:g}x: "
              f"{'met' if met['ratio_met'] else 'not met'}), "
              f"{'n/a' if met['kept'] is None else format(met['kept'], '.0%')} of the bidirectional teacher's true "
              f"score (goal {GOAL_KEPT:.0%}: {'met' if met['kept_met'] else 'not met'})")


def draw_strip(strip: dict, path: Path) -> Path:
    """The final student's left and right turns, STRIP_FRAMES of each, one row per turn (matplotlib)."""
    from matplotlib.figure import Figure

    names = ("left", "right")
    figure = Figure(figsize=(1.9 * len(STRIP_FRAMES), 1.35 * len(names) + 0.5), layout="constrained")
    axes = figure.subplots(len(names), len(STRIP_FRAMES))
    for r, name in enumerate(names):
        frames = ((strip[name] + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        for c, index in enumerate(STRIP_FRAMES):
            axis = axes[r, c]
            axis.imshow(frames[index])
            axis.set_xticks([])
            axis.set_yticks([])
            if r == 0:
                axis.set_title(f"frame {index}", fontsize="small")
            if c == 0:
                axis.set_ylabel(f"turn {name}", fontsize="small")
    figure.suptitle("the distilled student (stage C), played headless: mouse yaw "
                    f"{-TURN:g} (left) and {TURN:g} (right) per frame", fontsize="small")
    return write_atomic(path, lambda temporary: figure.savefig(temporary, format="png", dpi=100))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench_runs/play_proof", help="where the trained folders go")
    parser.add_argument("--out-results", default=str(ROOT / "bench"), help="where play_proof.json and the strip go")
    parser.add_argument("--tag", default="", help="a suffix of the results' file names (play_proof_TAG.json)")
    parser.add_argument("--epochs", type=int, default=FINETUNE_EPOCHS, help=f"fine-tuning epochs (default {FINETUNE_EPOCHS})")
    parser.add_argument("--frames", type=int, default=lc.RECORDING_FRAMES, help="frames of the turning recording")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE",
                        help="distillation settings over the --demo chain's (e.g. SCORE_MIN_TIMESTEP=500)")
    parser.add_argument("--only-finetune", action="store_true", help="stop after the fine-tuning")
    parser.add_argument("--rows", default=",".join(ROW_NAMES),
                        help=f"the models played, of {','.join(ROW_NAMES)} (default all)")
    parser.add_argument("--seeds", default=",".join(map(str, SEEDS)), help="the noise seeds of every stream")
    parser.add_argument("--show", type=Path, metavar="JSON", help="only print the table of a results JSON it wrote")
    args = parser.parse_args(argv)
    if args.show:
        results = json.loads(args.show.read_text(encoding="utf-8"))
        print_table(results["rows"])
        print(f"timings (s): {json.dumps(results['timings'])}")
        return 0
    seeds = tuple(int(seed) for seed in args.seeds.split(","))
    torch.set_num_threads(THREADS)
    out = Path(args.out).resolve()
    overrides = {}
    for item in args.set:
        name, _, value = item.partition("=")
        if name not in dsm.SETTING_NAMES or not value:
            parser.error(f"--set {item}: expected NAME=VALUE with a setting of distill_streaming_model.py")
        overrides[name] = value
    started = time.time()
    timings = {}
    finetuned, checkpoint, timings["finetune_train_s"] = finetune(out, args.epochs, args.frames)
    timings["finetune_s"] = time.time() - started
    if args.only_finetune:
        return 0
    students, summaries = distil(finetuned, checkpoint, overrides, out)
    timings["distill_s"] = time.time() - started - timings["finetune_s"]
    timings["stages_s"] = {stage: None if summary is None else summary["seconds"] for stage, summary in summaries.items()}
    history = {stage: None if summary is None else summary["history"] for stage, summary in summaries.items()}
    print(f"\nplaying {len(SCRIPTS)} scripts x {len(seeds)} seeds per model, {PLAY_BLOCKS} blocks ({ROWS} frames) each")
    print(HEADER)
    wanted = args.rows.split(",")
    if not set(wanted) <= set(ROW_NAMES):
        parser.error(f"--rows={args.rows}: choose among {','.join(ROW_NAMES)}")
    rows, strip = score_rows(finetuned, checkpoint, students, wanted, seeds)
    timings["play_s"] = time.time() - started - timings["finetune_s"] - timings["distill_s"]
    timings["total_s"] = time.time() - started
    met = goals(rows)
    stem = "play_proof" + (f"_{args.tag}" if args.tag else "")
    results = Path(args.out_results)
    write_json_atomic(results / f"{stem}.json", {
        "epochs": args.epochs, "frames": args.frames, "model": lc.MODEL, "recipe": lc.RECIPE,
        "distill_overrides": overrides, "scripts": {n: s for n, (s, _) in SCRIPTS.items()},
        "other_scripts": {n: o for n, (_, o) in SCRIPTS.items()}, "seeds": list(seeds), "blocks": PLAY_BLOCKS,
        "start_frame": strip.pop("start_frame"), "rows": rows, "goals": met, "timings": timings,
        "stage_validations": history, "torch": torch.__version__, "threads": THREADS})
    strip_path = draw_strip(strip, results / f"{stem}_strip.png") if "C" in wanted else None
    print_table(rows)
    print(f"timings (s): {json.dumps({k: (round(v) if isinstance(v, float) else v) for k, v in timings.items()})}")
    print(f"wrote {results / (stem + '.json')}" + (f" and {strip_path}" if strip_path else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
