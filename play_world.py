"""Play a world model: a streaming Matrix-Game 2.0 model, live in your browser or headless to MP4.

    python play_world.py --MODEL_DIR=models/base_distilled_model --START_IMAGE=shot.png
                                                  # then open the printed URL and play
    python play_world.py --headless --START_IMAGE=shot.png --ACTIONS="W*45 W+mouse(0,0.1)*24"
    python play_world.py --headless --RECORDING=data/take3 --START_FRAME=400 --NUM_BLOCKS=20
    python play_world.py --demo                   # the tiny demo model, headless to an MP4, on CPU
    python play_world.py --demo --HEADLESS=false  # ... or live in the browser
    python play_world.py --help                   # every setting, its value and meaning

It loads MODEL_DIR into the streaming (causal) architecture, builds the first-image
conditioning exactly as training does (recordings/frames.py), and generates one block of 3
latent frames - 12 video frames, 9 for the first - at a time, each from its own action,
with a KV cache and the streaming VAE decoder, in constant memory however long it runs.

Live: a local web page shows the frames as they come and sends your keys and mouse; before
each block, the keys held (or tapped) since the last one and the mouse motion become that
block's action (STREAMING_SPEC 6.5). Click the picture to capture the mouse (Esc frees it)
or drag over it. Restart starts over from the first image. The model runs in a background
thread: a slow machine just shows fewer frames per second.

Headless: ACTIONS (the action-script syntax of generate_preview.py) or RECORDING's own
actions from START_FRAME on are played block by block into OUTPUT (MP4, the action strip
drawn under the frames, the recording's real frames beside when the actions are its own),
written as the blocks come: any length, constant memory, no half-written file.

The work is done by the `play` package (the session, the player, the page and its server,
the headless stream) on `generation.streaming` and `wan`.
"""

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

import convert_unreal_data as data
from cli.settings import (MAX_PLAY_FRAMES, ScriptSettings, SettingsError, ShowHelp, check_choices, check_ranges,
                          raise_for_problems)
from demo_world.setup import (DEMO_DIR, PLAY_DEMO_CHECKPOINT, PLAY_DEMO_FALLBACK_CHECKPOINT,
                              PLAY_DEMO_FALLBACK_MODEL_DIR, PLAY_DEMO_MODEL_DIRS, TRAINING_DEMO_SETTINGS)
from generation.action_scripts import read_action_script
from generation.errors import GenerationError
from generation.inputs import recording_range
from generation.previews import preview_clip_index
from generation.streaming import DENOISING_STEPS as STUDENT_DENOISING_STEPS  # the setting takes the name
from generation.streaming import COMPILE_MODES, STUDENT_KEYBOARD_KEYS, StreamingGenerator, first_frame_conditions
from latents.encoders import load_encoders
from play.controls import controls_for, page_controls, page_keys
from play.headless import BlockActions, blocks_covering, blocks_within, script_blocks, sequence_blocks, stream_frames
from play.model import NOT_DISTILLED_WARNING, PlayModel, load_play_model, play_model_keys
from play.player import Player
from play.server import PlayServer
from play.session import InputSession
from recordings.frames import load_frame, load_frame_pixels
from recordings.report import check_data
from video.writer import write_video_stream
from wan.conditioning import STREAM_COND_LATENT_FRAMES
from wan.config import FRAMES_PER_BLOCK
from wan.device import pick_device, run_dtype
from wan.files import remove_stale_temps_of
from wan.flow import NUM_TRAIN_TIMESTEPS
from wan.shapes import FPS, VAE_TIME_STRIDE, video_frame_count
from wan.vae import StreamingDecoder

# -----------------------------------------------------------------------------
# Settings: edit them here, or override any of them with --NAME=value.
# the model
MODEL_DIR = "models/base_distilled_model"  # a streaming model folder (config JSON + .safetensors)
MODE = "universal"                       # universal / gta_drive / templerun: the config, keys and steps of the student
CHECKPOINT = ""                          # a fine-tuned file applied over a base-model MODEL_DIR ("": none)
IGNORE_BASE_FINGERPRINT = False          # True: apply CHECKPOINT over MODEL_DIR even if it is not the base it was trained on (e.g. a copy in another dtype)
KEYBOARD_KEYS = ()                       # the model's keyboard columns; (): the file's own, else MODE's
VAE_PATH = data.VAE_PATH                 # the Wan2.1 VAE
CLIP_PATH = data.CLIP_PATH               # the CLIP image encoder
DEVICE = "auto"                          # "auto", "cuda", "cuda:1", "cpu" (bf16 on a GPU, float32 on the CPU)
# the first image: a picture, or frame START_FRAME of RECORDING (a folder with input.csv)
START_IMAGE = ""                         # a picture to start from ("": frame START_FRAME of RECORDING)
RECORDING = data.DATA_DIR                # a recording folder (frame_*.png + input.csv)
START_FRAME = 1                          # the recording's frame to start from
VIDEO_HEIGHT = data.VIDEO_HEIGHT         # frame height, as in training
VIDEO_WIDTH = data.VIDEO_WIDTH           # frame width, as in training
MOUSE_SCALE = data.MOUSE_SCALE           # as in training: the recording's mouse -> the model's units
# sampling
DENOISING_STEPS = ()                     # the student's steps before warping; (): MODE's (1000,666,333)
TIMESTEP_SHIFT = 5.0                     # the schedule's shift (5: the students' own)
SEED = 0                                 # the noise seed
COMPILE = "off"                          # "off"; "default": torch.compile the student's calls (fused kernels, the first two blocks wait for the compiler; a CPU needs a C++ compiler); "reduce-overhead": the same replayed as CUDA graphs (GPU)
# live in the browser
HOST = "127.0.0.1"                       # the address the page is served on (0.0.0.0: every network; beyond loopback the URL carries a token)
PORT = 8000                              # its port (0: any free one)
MOUSE_SENSITIVITY = 0.01                 # model units per pixel over a block: 120 px -> 0.1 per frame
MOUSE_LIMIT = 0.25                       # the largest mouse value per frame sent to the model
OVERLAY = False                          # True: also draw the action strip into the page's frames (the page draws keys, mouse and rates over the picture)
# headless: to an MP4 instead of the browser (or --headless)
HEADLESS = False                         # True: play ACTIONS (or the recording's own) into OUTPUT
# an action script (generate_preview.py's, one row per frame; e.g. W*45 W+mouse(0,0.1)*24) played as
# whole blocks - the first 9 frames, each later one 12 -, the last row held to its block's end (W*20:
# 2 blocks, 21 frames); "": RECORDING's own actions from START_FRAME
ACTIONS = ""
NUM_BLOCKS = 0                           # blocks of 12 frames (the first 9); 0: as long as the actions
OUTPUT = "previews/play_world.mp4"       # the MP4 a headless run writes
# -----------------------------------------------------------------------------

SETTINGS = ScriptSettings.of(globals())
FLAGS = {"--demo": "play the model of `python finetune_base_model.py --demo` headless to an MP4 (CPU)",
         "--headless": "write an MP4 instead of serving the page (the same as --HEADLESS=true)"}
DEMO_BLOCKS = 4                          # --demo's length: 45 frames


# -----------------------------------------------------------------------------
# Settings

def parse_settings(argv) -> tuple[dict, bool]:
    """Defaults, then --demo's settings, then --NAME=value overrides (--headless = --HEADLESS=true)."""
    argv = list(argv)
    presets = {"--demo": demo_settings() if "--demo" in argv else {}, "--headless": {"HEADLESS": True}}
    return SETTINGS.parse_checked(argv, FLAGS, presets, check_settings)


def check_settings(s: dict) -> None:
    """Every range (cli/settings.py's rules) and choice, before any model is loaded."""
    problems = check_ranges(s)
    problems += check_choices(s, {"MODE": tuple(STUDENT_KEYBOARD_KEYS), "COMPILE": COMPILE_MODES})
    try:
        denoising_steps(s)
    except SettingsError as error:
        problems.append(str(error))
    if s["HEADLESS"] and Path(s["OUTPUT"]).suffix.lower() != ".mp4":
        problems.append(f"OUTPUT={s['OUTPUT']!r}: must end in .mp4")
    raise_for_problems(problems)


def denoising_steps(s: dict) -> tuple[int, ...]:
    if not s["DENOISING_STEPS"]:
        return STUDENT_DENOISING_STEPS.get(s["MODE"], STUDENT_DENOISING_STEPS["universal"])
    try:
        steps = tuple(int(step) for step in s["DENOISING_STEPS"])
    except ValueError:
        steps = ()
    # A block starts as pure noise, so the first step is the top of the schedule.
    if not steps or steps[0] != NUM_TRAIN_TIMESTEPS or any(a <= b for a, b in zip(steps, steps[1:])) \
            or steps[-1] < 1:
        raise SettingsError(f"DENOISING_STEPS={','.join(map(str, s['DENOISING_STEPS']))}: whole numbers from "
                            f"{NUM_TRAIN_TIMESTEPS} down, each below the one before, above 0 "
                            f"(universal: 1000,666,333)")
    return steps


def demo_settings() -> dict:
    """Play the demo's student (the first of PLAY_DEMO_MODEL_DIRS there, distilled by
    `distill_streaming_model.py --demo`: stage C's, else stage B's; until then the training
    demo's model, its final checkpoint over the base, run causally) headless on CPU from the
    first frame of the clip the training previews show, with the recording's own actions:
    DEMO_BLOCKS blocks beside the real frames."""
    d = TRAINING_DEMO_SETTINGS
    students = [folder for folder in PLAY_DEMO_MODEL_DIRS if Path(folder).is_dir()]
    if students:
        model_dir, checkpoint = students[0], PLAY_DEMO_CHECKPOINT
        if model_dir != PLAY_DEMO_MODEL_DIRS[0]:
            print(f"demo: no stage-C student in {PLAY_DEMO_MODEL_DIRS[0]}, so stage B's plays ({model_dir})")
    else:
        model_dir, checkpoint = PLAY_DEMO_FALLBACK_MODEL_DIR, PLAY_DEMO_FALLBACK_CHECKPOINT
        if Path(model_dir).is_dir():
            print(f"demo: no distilled student in {' or '.join(PLAY_DEMO_MODEL_DIRS)} (`python "
                  f"distill_streaming_model.py --demo` makes them), so the fine-tuned demo model plays, not distilled")
    needed = [Path(model_dir), Path(d["VAE_PATH"]), Path(d["CLIP_PATH"]), Path(d["DATA_DIR"])]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise SettingsError(f"--demo plays the outputs of `python finetune_base_model.py --demo`, run from this "
                            f"folder; these are missing: {', '.join(missing)}. Run the training demo first.")
    if checkpoint and not Path(checkpoint).is_file():
        print(f"demo: no {checkpoint} (the training demo did not finish), so the base model plays alone")
        checkpoint = ""
    report = check_data(d["DATA_DIR"], data.data_settings(d))
    report.raise_for_problems()
    clips = report.split.val or report.split.train
    first = clips[preview_clip_index(clips)].first_frame  # the clip the training previews show
    return dict(MODEL_DIR=model_dir, CHECKPOINT=checkpoint, MODE="universal", VAE_PATH=d["VAE_PATH"],
                CLIP_PATH=d["CLIP_PATH"], RECORDING=d["DATA_DIR"], START_FRAME=first,
                VIDEO_HEIGHT=d["VIDEO_HEIGHT"], VIDEO_WIDTH=d["VIDEO_WIDTH"], MOUSE_SCALE=d["MOUSE_SCALE"], DEVICE="cpu", HEADLESS=True,
                NUM_BLOCKS=DEMO_BLOCKS, OUTPUT=f"{DEMO_DIR}/play/demo_play.mp4")


# -----------------------------------------------------------------------------
# The world: the model, the first image, the stream

def load_model(s: dict) -> PlayModel:
    """MODEL_DIR as a streaming model, said on stdout (and warned about when it is not distilled)."""
    device = pick_device(s["DEVICE"])
    loaded = load_play_model(s["MODEL_DIR"], s["CHECKPOINT"], s["MODE"], s["KEYBOARD_KEYS"], device,
                             run_dtype(device), s["IGNORE_BASE_FINGERPRINT"])
    print(f"model: {loaded.description}")
    if not loaded.distilled:
        print(f"warning: {not_distilled_warning(s, loaded)}", file=sys.stderr)
    return loaded


def start_stream(s: dict, loaded: PlayModel, cond_latent_frames: int) -> StreamingGenerator:
    """A stream from the first image, ready for its first block. cond_latent_frames: how far
    the first-image conditioning reaches (STREAM_COND_LATENT_FRAMES serves any length)."""
    device = loaded.model.patch_embedding.weight.device
    image, where = first_image(s)
    vae, clip = load_encoders(s["VAE_PATH"], s["CLIP_PATH"], device)
    print(f"first image: {where}; encoding its conditioning ({video_frame_count(cond_latent_frames)} frames "
          f"through the VAE)", flush=True)
    cond_concat, visual_context = first_frame_conditions(vae, clip, image[None].to(device, vae.dtype),
                                                         cond_latent_frames)
    del clip
    return StreamingGenerator(loaded.model, cond_concat, visual_context, StreamingDecoder(vae),
                              denoising_steps=denoising_steps(s), shift=s["TIMESTEP_SHIFT"], seed=s["SEED"],
                              compile_mode=s["COMPILE"])


def not_distilled_warning(s: dict, loaded: PlayModel) -> str:
    return NOT_DISTILLED_WARNING.format(folder=s["MODEL_DIR"], window=loaded.model.config.local_attn_size,
                                        steps=len(denoising_steps(s)))


def first_image(s: dict) -> tuple[torch.Tensor, str]:
    """[3, H, W] in [-1, 1], preprocessed as training preprocesses frames, and where it came from."""
    height, width = s["VIDEO_HEIGHT"], s["VIDEO_WIDTH"]
    if s["START_IMAGE"]:
        path = Path(s["START_IMAGE"])
        if not path.is_file():
            raise GenerationError(f"START_IMAGE={path}: no such file")
        return load_frame(path, height, width), str(path)
    recording = recording_range(s["RECORDING"], s["START_FRAME"], 1, data.data_settings(s))
    return (load_frame(recording.frame_files[s["START_FRAME"]], height, width),
            f"{s['RECORDING']} frame {s['START_FRAME']}")


# -----------------------------------------------------------------------------
# Headless: a whole action sequence into an MP4

@dataclass
class HeadlessActions:
    blocks: Callable[[bool], BlockActions]            # each block's rows, made as the stream takes them;
                                                      # the argument: whether the model has a mouse branch
    uses_mouse: bool
    num_blocks: int
    truth: Callable[[int, int], np.ndarray] | None    # the recording's frames (first, count), when its own
    description: str


def headless_actions(s: dict, keys) -> HeadlessActions:
    """The actions of every block and the number of blocks, from ACTIONS (its rows made a
    block at a time) or the recording (its columns named by keys, the model's)."""
    P = FRAMES_PER_BLOCK
    if s["ACTIONS"]:
        if s["NUM_BLOCKS"]:
            limit, where = video_frame_count(s["NUM_BLOCKS"] * P), f"NUM_BLOCKS={s['NUM_BLOCKS']} shows"
        else:  # a headless video has no natural length: bound the script as NUM_BLOCKS is bounded
            limit, where = MAX_PLAY_FRAMES, "of an hour at 25 fps, the most one headless run makes"
        script = read_action_script(s["ACTIONS"], keys, max_rows=limit, limit=where)
        num_blocks = s["NUM_BLOCKS"] or blocks_covering(script.rows, P)
        rows = video_frame_count(num_blocks * P)
        if rows != script.rows:
            print(f"note: ACTIONS gives {script.rows} rows, one per frame; the model makes whole blocks (the first "
                  f"{video_frame_count(P)} frames, each later one {VAE_TIME_STRIDE * P}), so {num_blocks} blocks show "
                  f"{rows} frames (the last row held for {rows - script.rows} more)")
        return HeadlessActions(lambda mouse: script_blocks(script, num_blocks, P, mouse), script.uses_mouse,
                               num_blocks, None, f"actions {s['ACTIONS'][:200]!r}")
    if s["START_IMAGE"]:
        raise GenerationError(f"START_IMAGE={s['START_IMAGE']} is a picture, which has no recorded actions: give "
                              f"ACTIONS, or use RECORDING and START_FRAME to play a recording's own actions")
    settings = data.data_settings({**s, "KEYBOARD_KEYS": tuple(keys)})
    first = s["START_FRAME"]
    recording = recording_range(s["RECORDING"], first, 1, settings)
    available = next(seg.last for seg in recording.segments if seg.first <= first <= seg.last) - first + 1
    if s["NUM_BLOCKS"]:
        num_blocks = s["NUM_BLOCKS"]
        recording = recording_range(s["RECORDING"], first, video_frame_count(num_blocks * P), settings)
    else:
        num_blocks = blocks_within(available, P)
        if not num_blocks:
            raise GenerationError(f"{s['RECORDING']}: from START_FRAME={first} there are {available} consecutive "
                                  f"frames; one block needs {video_frame_count(P)}")
    rows = video_frame_count(num_blocks * P)
    height, width = s["VIDEO_HEIGHT"], s["VIDEO_WIDTH"]

    def truth(offset: int, count: int) -> np.ndarray:
        return np.stack([load_frame_pixels(recording.frame_files[first + offset + i], height, width)
                         for i in range(count)])

    keyboard, mouse = (torch.from_numpy(rows_) for rows_ in recording.actions(first, rows))  # by frame number:
    # the numbering may start anywhere
    return HeadlessActions(lambda with_mouse: sequence_blocks(keyboard, mouse if with_mouse else None, num_blocks, P),
                           bool(mouse.abs().sum() > 0), num_blocks, truth,
                           f"{s['RECORDING']} frames {first}-{first + rows - 1} and their recorded actions")


def play_headless(s: dict) -> dict:
    """Stream the actions the settings name into OUTPUT; returns what the run measured. The
    actions are checked (a typo in ACTIONS named) before the model loads."""
    remove_stale_temps_of(s["OUTPUT"])
    keys = play_model_keys(s["MODEL_DIR"], s["CHECKPOINT"], s["MODE"], s["KEYBOARD_KEYS"])
    actions = headless_actions(s, keys)
    loaded = load_model(s)
    if loaded.keyboard_keys != keys:  # a bidirectional model kept W, S, A, D of a longer KEYBOARD_KEYS
        actions = headless_actions(s, loaded.keyboard_keys)
    s = {**s, "KEYBOARD_KEYS": loaded.keyboard_keys}
    has_mouse = loaded.model.config.action_config.enable_mouse
    if not has_mouse and actions.uses_mouse:
        if s["ACTIONS"]:
            raise GenerationError("this model has no mouse branch (a keyboard-only student): take mouse(...) out of "
                                  "ACTIONS")
        print("note: this model has no mouse branch (a keyboard-only student): the recording's mouse rows are not used")
    print(f"actions: {actions.description}; {actions.num_blocks} blocks")
    generator = start_stream(s, loaded, min(STREAM_COND_LATENT_FRAMES, actions.num_blocks * FRAMES_PER_BLOCK))
    seconds = []

    def progress(index: int, took: float, frames: int) -> None:
        seconds.append(took)
        print(f"  block {index + 1}/{actions.num_blocks}: {frames} frames in {took:.2f} s", flush=True)

    frames = stream_frames(generator, actions.blocks(has_mouse), loaded.keyboard_keys, actions.num_blocks,
                           actions.truth, progress)
    written, count = write_video_stream(s["OUTPUT"], frames, FPS)
    fps = count / sum(seconds)
    print(f"wrote {written}: {count} frames ({count / FPS:.1f} s of video), generated at {fps:.1f} frames/s "
          f"({sum(seconds) / len(seconds):.2f} s per block, VAE decode included)")
    return {"video": written, "frames": count, "fps": fps}


# -----------------------------------------------------------------------------
# Live: the page in the browser

def play_live(s: dict) -> None:
    """Serve the page and stream from the player's actions until Ctrl+C."""
    loaded = load_model(s)
    s = {**s, "KEYBOARD_KEYS": loaded.keyboard_keys}  # a recording's columns are read by the model's key names
    has_mouse = loaded.model.config.action_config.enable_mouse
    controls = controls_for(s["MODE"], loaded.keyboard_keys, has_mouse)
    generator = start_stream(s, loaded, STREAM_COND_LATENT_FRAMES)
    session = InputSession(controls, s["MOUSE_SENSITIVITY"], s["MOUSE_LIMIT"], data.KEY_MAP)
    info = {"model": loaded.description, "mode": s["MODE"], **page_controls(s["MODE"], controls, s["MOUSE_LIMIT"]),
            "size": [s["VIDEO_HEIGHT"], s["VIDEO_WIDTH"]], "help": controls_help(controls),
            "warning": None if loaded.distilled else not_distilled_warning(s, loaded)}
    try:
        server = PlayServer((s["HOST"], s["PORT"]), Player(generator, session, loaded.keyboard_keys,
                                                           overlay=s["OVERLAY"]), session, info)
    except OSError as error:
        raise SettingsError(f"cannot serve on HOST={s['HOST']} PORT={s['PORT']}: {error} (another program may "
                            f"use the port: try --PORT={s['PORT'] + 1}, or --PORT=0 for any free one)") from None
    server.player.start()
    print(f"open {server.url} in a browser to play (Ctrl+C stops)", flush=True)
    if server.token:
        print(f"HOST={s['HOST']} reaches beyond this machine: every request needs the token in that URL (anyone "
              "who has the URL can watch and steer; an SSH forward to HOST=127.0.0.1 needs none)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping")
    finally:
        server.server_close()
        server.player.stop()


def controls_help(controls) -> str:
    """The page's line under the picture (the keys and what they do are drawn over it)."""
    text = ""
    if controls.idle_key:
        text += f"{controls.idle_key} is held while no other key is. "
    if controls.mouse:
        text += ("Mouse: click the picture to capture it (Esc frees it), or drag over it"
                 + ("" if controls.pitch else " (left and right only)") + ". ")
    keys = page_keys(controls)
    said = [f"{keys[action]} {verb}" for action, verb in (("pause", "pauses"), ("restart", "restarts")) if keys[action]]
    if said:
        text += f"{', '.join(said)} (the mouse captured or not). "
    return text + (f"Each block of {VAE_TIME_STRIDE * FRAMES_PER_BLOCK} frames takes the keys held or tapped and "
                   f"the mouse moved since the last.")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        settings, _ = parse_settings(argv)
        if settings["HEADLESS"]:
            play_headless(settings)
        else:
            play_live(settings)
    except ShowHelp as text:
        print(text)
        return 0
    except (ValueError, OSError) as error:  # SettingsError, GenerationError, CheckpointError, DataError, disk full
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # Ctrl+C before the page is up (a headless OUTPUT is then not written)
        print("stopped", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
