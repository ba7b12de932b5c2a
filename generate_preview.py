"""Watch the model: generate video from a first frame and your own keyboard/mouse actions.

    python generate_preview.py                                   # with the settings below
    python generate_preview.py --FIRST_FRAME=shot.png --ACTIONS="W*24 A*8 W+mouse(0.1,0)*25"
    python generate_preview.py --RECORDING=data/take3 --START_FRAME=400 --compare
    python generate_preview.py --demo                            # on the outputs of
                                                                 #   finetune_base_model.py --demo
    python generate_preview.py --help                            # every setting, its value and meaning

It loads the base model and a fine-tuned CHECKPOINT over it, builds the first-frame
conditioning exactly as training does, samples with the flow-matching Euler sampler,
decodes with the VAE and writes OUTPUT (MP4; a GIF when PyAV is missing or OUTPUT ends in
.gif) with the held keys and the mouse drawn under the frames, plus OUTPUT's .json: the
action-following score of every panel (see video/action_score.py). With ACTIONS empty, the
actions are the recording's own and its real frames are shown beside the generated ones.

The work is done by the `generation` package (models, sampling, preview files); the
training script makes its own previews with generation.previews.epoch_preview().
"""

import sys
from dataclasses import dataclass
from pathlib import Path

import torch

import convert_unreal_data as data
from cli.settings import ScriptSettings, SettingsError, ShowHelp, check_ranges, raise_for_problems
from demo_world.setup import DEMO_DIR, TRAINING_DEMO_SETTINGS
from generation.action_scripts import check_action_rows, parse_action_script
from generation.bidirectional import chaining_warning, generate_frames, window_spans
from generation.errors import GenerationError
from generation.finetuned import FINAL_FILE, load_model, select_keys
from generation.inputs import recording_range
from generation.previews import format_score, preview_clip_index, write_preview
from latents.encoders import load_encoders
from planning.plan import plan_preview
from recordings.frames import load_frame
from recordings.report import check_data
from wan.device import autocast_for, pick_device, run_dtype
from wan.files import remove_stale_temps_of

# -----------------------------------------------------------------------------
# Settings: edit them here, or override any of them with --NAME=value.
# the model
BASE_MODEL_DIR = "models/base_model"     # config JSON + diffusion_pytorch_model.safetensors
CHECKPOINT = f"checkpoints/{FINAL_FILE}"  # an epoch file or the final file; "": base alone
IGNORE_BASE_FINGERPRINT = False          # True: apply CHECKPOINT over BASE_MODEL_DIR even if it is not the base it was trained on (e.g. a copy in another dtype)
VAE_PATH = data.VAE_PATH                 # the Wan2.1 VAE
CLIP_PATH = data.CLIP_PATH               # the CLIP image encoder
# the first frame: a PNG, or frame START_FRAME of RECORDING (a folder with input.csv)
FIRST_FRAME = ""                         # a picture to start from ("": frame START_FRAME of RECORDING)
RECORDING = data.DATA_DIR                # a recording folder (frame_*.png + input.csv)
START_FRAME = 1                          # the recording's frame to start from
# the actions: "" for RECORDING's own rows from START_FRAME on (its real frames are then shown
# beside the generated ones), or a script: terms separated by spaces, each one frame's input -
# keys of KEYBOARD_KEYS joined by +, mouse(pitch,yaw) (yaw > 0 turns right) or idle - repeated
# by *count, e.g. "W*24 A*8 W+mouse(0,0.1)*25"; one row per frame, the first frame's included,
# so NUM_FRAMES rows (57 = 1 + 56); generation/action_scripts.py has the whole syntax
ACTIONS = ""
KEYBOARD_KEYS = data.KEYBOARD_KEYS       # the keyboard columns the checkpoint was trained with
MOUSE_SCALE = data.MOUSE_SCALE           # as in training: the recording's mouse -> the model's units
# sampling
NUM_FRAMES = 57                          # 4k+1; more than WINDOW_FRAMES chains windows
WINDOW_FRAMES = data.SEQUENCE_LENGTH     # frames the model makes at once: its training clip length
NUM_STEPS = 50                           # Euler sampling steps per window
TIMESTEP_SHIFT = 5.0                     # the sampling grid's shift (5: Matrix-Game's own)
SEED = 0                                 # the noise seed
VIDEO_HEIGHT = data.VIDEO_HEIGHT         # frame size, as in training
VIDEO_WIDTH = data.VIDEO_WIDTH           # (both multiples of 16)
DEVICE = "auto"                          # "auto", "cuda", "cuda:1", "cpu"
GPU_MEMORY_GB = 24                       # --plan: the card to fit (its memory in GB)
COMPARE = False                          # also render the base model alone, beside (or --compare)
OUTPUT = "previews/preview.mp4"          # .mp4 or .gif; the scores go to the same name .json
# -----------------------------------------------------------------------------

SETTINGS = ScriptSettings.of(globals())
FLAGS = {"--demo": "preview the outputs of `python finetune_base_model.py --demo`",
         "--compare": "also render the base model alone, beside (the same as --COMPARE=true)",
         "--plan": "predict this preview's GPU memory and time on a GPU_MEMORY_GB card and the common ones "
                   "(no GPU needed)"}


# -----------------------------------------------------------------------------
# Settings

def parse_settings(argv) -> tuple[dict, bool]:
    """Defaults, then --demo's settings, then --NAME=value overrides (--compare = --COMPARE=true)."""
    argv = list(argv)
    presets = {"--demo": demo_settings() if "--demo" in argv else {}, "--compare": {"COMPARE": True}}
    return SETTINGS.parse_checked(argv, FLAGS, presets, check_settings)


def check_settings(s: dict) -> None:
    """Every range (cli/settings.py's rules) and choice, before any model is loaded."""
    problems = check_ranges(s)
    for name in ("NUM_FRAMES", "WINDOW_FRAMES"):
        if isinstance(s[name], int) and 0 < s[name] < 5:
            problems.append(f"{name}={s[name]}: a preview needs at least 5 frames (two latent frames) to move")
    if Path(s["OUTPUT"]).suffix.lower() not in (".mp4", ".gif"):
        problems.append(f"OUTPUT={s['OUTPUT']!r}: must end in .mp4 or .gif")
    if s["COMPARE"] and not s["CHECKPOINT"]:
        problems.append("COMPARE needs a fine-tuned CHECKPOINT to compare with the base model")
    if not s["KEYBOARD_KEYS"]:
        problems.append("KEYBOARD_KEYS is empty")
    raise_for_problems(problems)


def demo_settings() -> dict:
    """Preview the demo run: its final checkpoint and the base model, from the first frame of
    the validation clip its training previews show, two windows of the recording's own actions."""
    d = TRAINING_DEMO_SETTINGS
    checkpoint = Path(d["CHECKPOINT_DIR"]) / FINAL_FILE
    needed = [Path(d["BASE_MODEL_DIR"]), Path(d["VAE_PATH"]), Path(d["CLIP_PATH"]), Path(d["DATA_DIR"]), checkpoint]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise SettingsError(f"--demo previews the outputs of `python finetune_base_model.py --demo`, run from "
                            f"this folder; these are missing: {', '.join(missing)}. Run the training demo first.")
    report = check_data(d["DATA_DIR"], data.data_settings(d))
    report.raise_for_problems()
    clips = report.split.val or report.split.train
    first = clips[preview_clip_index(clips)].first_frame  # the clip the training previews show
    return dict(BASE_MODEL_DIR=d["BASE_MODEL_DIR"], CHECKPOINT=str(checkpoint), VAE_PATH=d["VAE_PATH"],
                CLIP_PATH=d["CLIP_PATH"], RECORDING=d["DATA_DIR"], START_FRAME=first,
                NUM_FRAMES=2 * d["SEQUENCE_LENGTH"] - 1, WINDOW_FRAMES=d["SEQUENCE_LENGTH"],
                VIDEO_HEIGHT=d["VIDEO_HEIGHT"], VIDEO_WIDTH=d["VIDEO_WIDTH"], MOUSE_SCALE=d["MOUSE_SCALE"], DEVICE="cpu", COMPARE=True,
                OUTPUT=f"{DEMO_DIR}/previews/demo_preview.mp4")


# -----------------------------------------------------------------------------
# Inputs: the first frame, the actions, and the real frames when there are any

@dataclass
class PreviewInputs:
    first_frame: torch.Tensor        # [3, H, W] in [-1, 1]
    keyboard: torch.Tensor           # [T, K] in KEYBOARD_KEYS order
    mouse: torch.Tensor              # [T, 2] (pitch, yaw)
    truth: torch.Tensor | None       # [T, 3, H, W] the recording's frames, when the actions are its own
    description: str


def load_inputs(s: dict) -> PreviewInputs:
    """The first frame and the actions the settings name; the real frames when the actions
    are the recording's own."""
    height, width, num_frames = s["VIDEO_HEIGHT"], s["VIDEO_WIDTH"], s["NUM_FRAMES"]
    if s["ACTIONS"]:
        keyboard, mouse = parse_action_script(s["ACTIONS"], s["KEYBOARD_KEYS"], max_rows=num_frames)
        check_action_rows(len(keyboard), num_frames)
    if s["FIRST_FRAME"]:
        if not s["ACTIONS"]:
            raise GenerationError(f"FIRST_FRAME={s['FIRST_FRAME']} is a picture, which has no recorded actions: "
                                  "give ACTIONS, or use RECORDING and START_FRAME to take the actions from a "
                                  "recording")
        path = Path(s["FIRST_FRAME"])
        if not path.is_file():
            raise GenerationError(f"FIRST_FRAME={path}: no such file")
        return PreviewInputs(load_frame(path, height, width), keyboard, mouse, None,
                             f"first frame {path}, actions {s['ACTIONS']!r}")

    recording, first = s["RECORDING"], s["START_FRAME"]
    rows = recording_range(recording, first, 1 if s["ACTIONS"] else num_frames, data.data_settings(s))
    first_frame = load_frame(rows.frame_files[first], height, width)
    if s["ACTIONS"]:
        return PreviewInputs(first_frame, keyboard, mouse, None,
                             f"first frame {recording} frame {first}, actions {s['ACTIONS']!r}")
    paths = [rows.frame_files[f] for f in range(first, first + num_frames)]
    truth = torch.stack([first_frame] + [load_frame(p, height, width) for p in paths[1:]])
    keyboard, mouse = rows.actions(first, num_frames)
    return PreviewInputs(first_frame, torch.from_numpy(keyboard), torch.from_numpy(mouse), truth,
                         f"{recording} frames {first}-{first + num_frames - 1} and their recorded actions")


# -----------------------------------------------------------------------------
# The whole preview

def generate(s: dict) -> dict:
    """Render the preview the settings describe; returns {"video", "json", "scores"}."""
    device = pick_device(s["DEVICE"])
    dtype, autocast = run_dtype(device), autocast_for(device)
    for written in (Path(s["OUTPUT"]), Path(s["OUTPUT"]).with_suffix(".json")):  # a killed run's temp files
        remove_stale_temps_of(written)
    inputs = load_inputs(s)
    print(f"inputs: {inputs.description}")
    if s["NUM_FRAMES"] > s["WINDOW_FRAMES"]:
        print(f"warning: {chaining_warning(s['NUM_FRAMES'], s['WINDOW_FRAMES'])}", file=sys.stderr)
    vae, clip = load_encoders(s["VAE_PATH"], s["CLIP_PATH"], device)
    runs = [("base", "")] if s["COMPARE"] else []
    runs.append(("fine-tuned" if s["CHECKPOINT"] else "base", s["CHECKPOINT"]))
    panels, models = {}, {}
    for label, checkpoint in runs:
        loaded = load_model(s["BASE_MODEL_DIR"], checkpoint, s["KEYBOARD_KEYS"], device, dtype,
                            s["IGNORE_BASE_FINGERPRINT"])
        print(f"{label}: {loaded.description}")
        keyboard = select_keys(inputs.keyboard, s["KEYBOARD_KEYS"], loaded.keyboard_keys)
        panels[label] = generate_frames(loaded.model, vae, clip, inputs.first_frame, keyboard, inputs.mouse,
                                        s["WINDOW_FRAMES"], s["NUM_STEPS"], s["TIMESTEP_SHIFT"], s["SEED"],
                                        autocast, progress=True)
        models[label] = loaded.description
        del loaded
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if inputs.truth is not None:
        panels["ground truth"] = inputs.truth
    info = {"inputs": inputs.description, "models": models, "num_steps": s["NUM_STEPS"],
            "timestep_shift": s["TIMESTEP_SHIFT"], "seed": s["SEED"], "window_frames": s["WINDOW_FRAMES"],
            "windows": len(window_spans(s["NUM_FRAMES"], s["WINDOW_FRAMES"])), "device": str(device)}
    written, scores = write_preview(s["OUTPUT"], panels, inputs.keyboard, inputs.mouse, s["KEYBOARD_KEYS"], info)
    print(f"wrote {written} ({' | '.join(panels)}, {s['NUM_FRAMES']} frames) and {written.with_suffix('.json')}")
    print("action-following score (share of frame pairs with an action whose image motion goes its way):")
    for label, score in scores.items():
        print(f"  {label}: {format_score(score)}")
    return {"video": written, "json": written.with_suffix(".json"), "scores": scores}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings, _ = parse_settings(argv)
        if "--plan" in argv:
            print(plan_preview(settings).format())
            return 0
        generate(settings)
    except ShowHelp as text:
        print(text)
        return 0
    except (ValueError, OSError) as error:  # SettingsError, GenerationError, CheckpointError, DataError, disk full
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
