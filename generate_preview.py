"""Watch the model: generate video from a first frame and your own keyboard/mouse actions.

    python generate_preview.py                                   # with the settings below
    python generate_preview.py --FIRST_FRAME=shot.png --ACTIONS="W*24 A*8 W+mouse(0.1,0)*25"
    python generate_preview.py --RECORDING=data/take3 --START_FRAME=400 --compare
    python generate_preview.py --demo                            # on the outputs of
                                                                 #   finetune_base_model.py --demo

It loads the base model and a fine-tuned CHECKPOINT over it, builds the first-frame
conditioning exactly as training does, samples with the flow-matching Euler sampler,
decodes with the VAE and writes OUTPUT (MP4; a GIF when PyAV is missing or OUTPUT ends in
.gif) with the held keys and the mouse drawn under the frames, plus OUTPUT's .json: the
action-following score of every panel (see action_score.py). With ACTIONS empty, the
actions are the recording's own and its real frames are shown beside the generated ones.

The training script calls epoch_preview() every PREVIEW_EVERY_EPOCHS epochs.
"""

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from safetensors import safe_open
from tqdm import tqdm

import convert_unreal_data as data
from action_score import action_following_score
from latent_cache import load_encoders
from wan import flow
from wan.conditioning import build_cond_concat, build_visual_context
from wan.device import autocast_for, pick_device, run_dtype
from wan.config import WanConfig
from wan.files import write_atomic, write_json_atomic
from wan.loading import CheckpointError, checkpoint_keyboard_dim, find_config_file, load_base_model
from wan.model import WanModel
from wan.shapes import FPS, LATENT_CHANNELS, check_frame_count, check_image_size
from wan.vae import load_vae

# -----------------------------------------------------------------------------
# Settings: edit them here, or override any of them with --NAME=value.
_names_before_settings = set(globals())
# the model
BASE_MODEL_DIR = "models/base_model"     # config JSON + diffusion_pytorch_model.safetensors
CHECKPOINT = "checkpoints/base_finetuned_final.safetensors"  # an epoch file or the final file; "": base alone
VAE_PATH = data.VAE_PATH
CLIP_PATH = data.CLIP_PATH
# the first frame: a PNG, or frame START_FRAME of RECORDING (a folder with input.csv)
FIRST_FRAME = ""
RECORDING = data.DATA_DIR
START_FRAME = 1
# the actions: a script (see parse_action_script), or "" for RECORDING's own rows from
# START_FRAME on, whose real frames are then shown beside the generated ones
ACTIONS = ""
KEYBOARD_KEYS = data.KEYBOARD_KEYS       # the keyboard columns the checkpoint was trained with
MOUSE_SCALE = data.MOUSE_SCALE           # as in training: the recording's mouse -> the model's units
# sampling
NUM_FRAMES = 57                          # 4k+1; more than WINDOW_FRAMES chains windows
WINDOW_FRAMES = data.SEQUENCE_LENGTH     # frames the model makes at once: its training clip length
NUM_STEPS = 50
TIMESTEP_SHIFT = 5.0
SEED = 0
VIDEO_HEIGHT = data.VIDEO_HEIGHT
VIDEO_WIDTH = data.VIDEO_WIDTH
DEVICE = "auto"                          # "auto", "cuda", "cuda:1", "cpu"
COMPARE = False                          # also render the base model alone, beside (or --compare)
OUTPUT = "previews/preview.mp4"          # .mp4 or .gif; the scores go to the same name .json
# -----------------------------------------------------------------------------

SETTING_NAMES = [name for name in list(globals()) if name.isupper() and name not in _names_before_settings]
BASE_MODEL_KEYS = ("W", "S", "A", "D")   # the official base checkpoint's keyboard columns
FULL_CONTENTS = "full state dict"        # the training script's metadata for its final file


class PreviewError(ValueError):
    """Bad settings or inputs for a preview; the message says what and where."""


# -----------------------------------------------------------------------------
# Settings

def parse_settings(argv) -> tuple[dict, bool]:
    """Defaults, then --demo's settings, then --NAME=value overrides (--compare = --COMPARE=true)."""
    argv = list(argv)
    demo, compare = "--demo" in argv, "--compare" in argv
    argv = [a for a in argv if a not in ("--demo", "--compare")]
    defaults = {name: globals()[name] for name in SETTING_NAMES}
    overrides, rest = data.parse_overrides(argv, defaults)
    if rest:
        raise PreviewError(f"unexpected argument(s) {' '.join(rest)}; use --NAME=value with one of: "
                           f"{', '.join(SETTING_NAMES)} (or --demo, --compare)")
    settings = {**defaults, **(demo_settings() if demo else {}), **overrides}
    if compare:
        settings["COMPARE"] = True
    check_settings(settings)
    return settings, demo


def check_settings(s: dict) -> None:
    problems = []
    for name in ("NUM_FRAMES", "WINDOW_FRAMES"):
        try:
            check_frame_count(s[name], name)
        except ValueError as error:
            problems.append(str(error))
    if s["WINDOW_FRAMES"] < 5:
        problems.append(f"WINDOW_FRAMES={s['WINDOW_FRAMES']}: a window needs at least 5 frames to move")
    if s["NUM_STEPS"] < 1:
        problems.append(f"NUM_STEPS={s['NUM_STEPS']}: must be at least 1")
    if not s["TIMESTEP_SHIFT"] > 0:
        problems.append(f"TIMESTEP_SHIFT={s['TIMESTEP_SHIFT']}: must be positive")
    try:
        check_image_size(s["VIDEO_HEIGHT"], s["VIDEO_WIDTH"])
    except ValueError as error:
        problems.append(str(error))
    if Path(s["OUTPUT"]).suffix.lower() not in (".mp4", ".gif"):
        problems.append(f"OUTPUT={s['OUTPUT']!r}: must end in .mp4 or .gif")
    if s["COMPARE"] and not s["CHECKPOINT"]:
        problems.append("COMPARE needs a fine-tuned CHECKPOINT to compare with the base model")
    if not s["KEYBOARD_KEYS"]:
        problems.append("KEYBOARD_KEYS is empty")
    if problems:
        raise PreviewError("bad settings:\n  " + "\n  ".join(problems))


def demo_settings() -> dict:
    """Preview the demo run: its final checkpoint and the base model, from the first frame of
    the validation clip its training previews show, two windows of the recording's own actions."""
    import finetune_base_model as fb  # here, not at the top: the training script imports this module

    d = fb.DEMO_SETTINGS
    checkpoint = Path(d["CHECKPOINT_DIR"]) / fb.FINAL_FILE
    needed = [Path(d["BASE_MODEL_DIR"]), Path(d["VAE_PATH"]), Path(d["CLIP_PATH"]), Path(d["DATA_DIR"]), checkpoint]
    missing = [str(p) for p in needed if not p.exists()]
    if missing:
        raise PreviewError(f"--demo previews the outputs of `python finetune_base_model.py --demo`, run from "
                           f"this folder; these are missing: {', '.join(missing)}. Run the training demo first.")
    report = data.check_data_with(d)
    report.raise_for_problems()
    clips = report.split.val or report.split.train
    first = clips[preview_clip_index(clips)].first_frame  # the clip the training previews show
    return dict(BASE_MODEL_DIR=d["BASE_MODEL_DIR"], CHECKPOINT=str(checkpoint), VAE_PATH=d["VAE_PATH"],
                CLIP_PATH=d["CLIP_PATH"], RECORDING=d["DATA_DIR"], START_FRAME=first,
                NUM_FRAMES=2 * d["SEQUENCE_LENGTH"] - 1, WINDOW_FRAMES=d["SEQUENCE_LENGTH"],
                VIDEO_HEIGHT=d["VIDEO_HEIGHT"], VIDEO_WIDTH=d["VIDEO_WIDTH"], DEVICE="cpu", COMPARE=True,
                OUTPUT=f"{fb.DEMO_DIR}/previews/demo_preview.mp4")


# -----------------------------------------------------------------------------
# Action scripts

class ActionScriptError(PreviewError):
    pass


def parse_action_script(script: str, keyboard_keys) -> tuple[torch.Tensor, torch.Tensor]:
    """A text script -> keyboard [N, K] (multi-hot in KEYBOARD_KEYS order), mouse [N, 2].

    The script is terms separated by spaces; each term is one frame's input, repeated
    `*count` times (count a positive whole number; default 1). A term holds keys of
    KEYBOARD_KEYS (any case), `mouse(pitch,yaw)` and `idle` (nothing held), joined by `+`:

        W*24 A*8 W+mouse(0.1,0)*12 W+A*4 idle*8 mouse(0,-0.1)*8

    mouse values are in the model's units, the training data's (pitch, yaw) after
    MOUSE_SCALE: yaw > 0 turns right, pitch > 0 looks up, and 0.1 per frame is the base
    model's usual turn. Row i is frame i's input, the first frame's row included.
    """
    keys = [str(k).upper() for k in keyboard_keys]
    keyboard, mouse = [], []
    terms = list(_script_terms(script))
    if not terms:
        raise ActionScriptError("ACTIONS is empty: give terms like W*24 A*8 W+mouse(0.1,0)*12")
    for number, (term, column) in enumerate(terms, 1):
        def bad(problem: str) -> ActionScriptError:
            return ActionScriptError(f"ACTIONS term {number} {term!r} (column {column}): {problem}")

        body, count = term, 1
        split = _top_level_split(term, "*")
        if len(split) > 2:
            raise bad("more than one '*count'")
        if len(split) == 2:
            body, count_text = split
            if not re.fullmatch(r"\d+", count_text.strip()) or int(count_text) < 1:
                raise bad(f"the count after '*' must be a positive whole number, got {count_text.strip()!r}")
            count = int(count_text)
        row, motion = np.zeros(len(keys), np.float32), None
        for part in _top_level_split(body, "+"):
            part = part.strip()
            mouse_call = re.fullmatch(r"mouse\s*\((.*)\)", part, re.IGNORECASE | re.DOTALL)
            if mouse_call:
                if motion is not None:
                    raise bad("mouse(...) appears twice")
                motion = _mouse_values(mouse_call.group(1), bad)
            elif part.upper() in keys:
                row[keys.index(part.upper())] = 1.0
            elif part.lower() == "idle":
                pass
            elif not part:
                raise bad("an empty part: join keys with one '+', e.g. W+A")
            else:
                hint = ("; hold several keys with '+', e.g. " + "+".join(part.upper())
                        if len(part) > 1 and all(c in keys for c in part.upper()) else "")
                raise bad(f"{part!r} is not a key of KEYBOARD_KEYS ({', '.join(keys)}), 'idle' or "
                          f"mouse(pitch,yaw){hint}")
        keyboard += [row] * count
        mouse += [motion or (0.0, 0.0)] * count
    return torch.from_numpy(np.stack(keyboard)), torch.tensor(mouse, dtype=torch.float32)


def _script_terms(script: str):
    """(term, 1-based column) for each whitespace-separated term; spaces inside (...) stay."""
    term, start, depth = "", 0, 0
    for column, char in enumerate(script + " ", 1):
        if char.isspace() and depth == 0:
            if term:
                yield term, start
            term = ""
            continue
        if not term:
            start = column
        depth += {"(": 1, ")": -1}.get(char, 0)
        if depth < 0:
            raise ActionScriptError(f"ACTIONS column {column}: ')' without '('")
        term += char
    if depth:
        raise ActionScriptError(f"ACTIONS term {term.strip()!r} (column {start}): '(' without ')'")


def _top_level_split(text: str, separator: str) -> list[str]:
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"(": 1, ")": -1}.get(char, 0)
        if char == separator and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def _mouse_values(arguments: str, bad) -> tuple[float, float]:
    values = [v.strip() for v in arguments.split(",")]
    try:
        pitch, yaw = (float(v) for v in values)
    except ValueError:
        raise bad(f"mouse(pitch,yaw) needs two numbers, got mouse({arguments})") from None
    if not (math.isfinite(pitch) and math.isfinite(yaw)):
        raise bad(f"mouse values must be finite, got mouse({arguments})")
    return pitch, yaw


def check_action_rows(rows: int, num_frames: int) -> None:
    if rows != num_frames:
        change = f"add {num_frames - rows} rows" if rows < num_frames else f"remove {rows - num_frames} rows"
        raise ActionScriptError(f"ACTIONS gives {rows} rows but NUM_FRAMES is {num_frames}: one row per frame, "
                                f"the first frame's included ({change}, or set NUM_FRAMES to match; it must be 4k+1)")


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
        keyboard, mouse = parse_action_script(s["ACTIONS"], s["KEYBOARD_KEYS"])
        check_action_rows(len(keyboard), num_frames)
    if s["FIRST_FRAME"]:
        if not s["ACTIONS"]:
            raise PreviewError(f"FIRST_FRAME={s['FIRST_FRAME']} is a picture, which has no recorded actions: give "
                               "ACTIONS, or use RECORDING and START_FRAME to take the actions from a recording")
        path = Path(s["FIRST_FRAME"])
        if not path.is_file():
            raise PreviewError(f"FIRST_FRAME={path}: no such file")
        return PreviewInputs(data.load_frame(path, height, width), keyboard, mouse, None,
                             f"first frame {path}, actions {s['ACTIONS']!r}")

    recording, first = s["RECORDING"], s["START_FRAME"]
    rows = recording_range(recording, first, 1 if s["ACTIONS"] else num_frames, s["KEYBOARD_KEYS"],
                           s["MOUSE_SCALE"], height, width)
    first_frame = data.load_frame(rows.frame_files[first], height, width)
    if s["ACTIONS"]:
        return PreviewInputs(first_frame, keyboard, mouse, None,
                             f"first frame {recording} frame {first}, actions {s['ACTIONS']!r}")
    paths = [rows.frame_files[f] for f in range(first, first + num_frames)]
    rows_slice = slice(first - 1, first - 1 + num_frames)
    truth = torch.stack([first_frame] + [data.load_frame(p, height, width) for p in paths[1:]])
    return PreviewInputs(first_frame, torch.from_numpy(rows.keyboard[rows_slice].copy()),
                         torch.from_numpy(rows.mouse[rows_slice].copy()), truth,
                         f"{recording} frames {first}-{first + num_frames - 1} and their recorded actions")


def recording_range(folder, first: int, num_frames: int, keyboard_keys, mouse_scale: float, height: int,
                    width: int) -> data.Recording:
    """The recording, checked to hold frames first .. first + num_frames - 1 without a gap."""
    folder = Path(folder)
    if not (folder / data.CSV_NAME).is_file():
        found = ""
        if folder.is_dir():
            try:
                found = "; recordings in it: " + ", ".join(str(p) for p in data.find_recordings(folder)[0][:10])
            except data.DataError:
                pass
        raise PreviewError(f"RECORDING={folder} is not a recording (a folder with frame_*.png and "
                           f"{data.CSV_NAME}){found}")
    recording = data.load_recording(folder, keyboard_keys=keyboard_keys, mouse_scale=mouse_scale,
                                    height=height, width=width)
    last = first + num_frames - 1
    if not any(seg.first <= first and last <= seg.last for seg in recording.segments):
        runs = ", ".join(f"{seg.first}-{seg.last}" for seg in recording.segments)
        need = f"frame {first}" if num_frames == 1 else f"frames {first}-{last} without a gap (NUM_FRAMES={num_frames})"
        raise PreviewError(f"{folder}: START_FRAME={first} needs {need}, but its runs of consecutive frames "
                           f"are {runs}")
    return recording


# -----------------------------------------------------------------------------
# Models

@dataclass
class LoadedModel:
    model: WanModel
    keyboard_keys: tuple             # the model's keyboard columns
    description: str


def model_keys(width: int, keyboard_keys, where: str) -> tuple:
    """The names of a model's keyboard columns: KEYBOARD_KEYS when the widths agree, or the
    base model's W, S, A, D picked out of a longer KEYBOARD_KEYS."""
    keys = tuple(str(k).upper() for k in keyboard_keys)
    if width == len(keys):
        return keys
    if width == len(BASE_MODEL_KEYS) and set(BASE_MODEL_KEYS) <= set(keys):
        return BASE_MODEL_KEYS
    raise PreviewError(f"{where} has a keyboard of {width} columns but KEYBOARD_KEYS has {len(keys)} "
                       f"({', '.join(keys)}); set --KEYBOARD_KEYS to the keys it was trained with")


def load_model(base_model_dir, checkpoint, keyboard_keys, device, dtype: torch.dtype) -> LoadedModel:
    """The base model, with a fine-tuned checkpoint (empty: none) applied.

    A full file (the training script's final file: every tensor of the model) is loaded
    strictly on a model built from BASE_MODEL_DIR's config; a trainable-only file (its
    epoch files) is applied over the base model, and every tensor in it must be one of the
    model's with the same shape. The checkpoint's keyboard width decides the model's.
    """
    base_dir = Path(base_model_dir)
    if not checkpoint:
        model, _ = load_base_model(base_dir, device=device, dtype=dtype)  # with the file's own keyboard width
        keys = model_keys(model.config.action_config.keyboard_dim_in, keyboard_keys, f"the base model in {base_dir}")
        return LoadedModel(model.eval().requires_grad_(False), keys,
                           f"base model {base_dir} (keyboard {', '.join(keys)})")

    path = Path(checkpoint)
    if not path.is_file():
        raise CheckpointError(f"CHECKPOINT={path}: no such file (the training script writes "
                              "base_finetuned_epoch<N>.safetensors and base_finetuned_final.safetensors)")
    with safe_open(path, framework="pt") as f:
        shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
        metadata = f.metadata() or {}
    width = checkpoint_keyboard_dim(shapes, path) or len(keyboard_keys)
    keys = tuple(str(k).upper() for k in keyboard_keys)
    trained_keys = tuple(k for k in metadata.get("keyboard_keys", "").split(",") if k)
    if trained_keys and trained_keys != keys:
        raise PreviewError(f"{path} was trained with KEYBOARD_KEYS={','.join(trained_keys)} (its metadata), but "
                           f"KEYBOARD_KEYS is {','.join(keys)}: pass --KEYBOARD_KEYS={','.join(trained_keys)}")
    if width != len(keys):
        raise PreviewError(f"{path} has a keyboard of {width} columns but KEYBOARD_KEYS has {len(keys)} "
                           f"({', '.join(keys)}); set --KEYBOARD_KEYS to the keys it was trained with")

    config = WanConfig.from_json(find_config_file(base_dir)).with_keyboard_dim(width)
    with torch.device("meta"):
        model = WanModel(config)
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    unknown = [f"{n} {s}" for n, s in shapes.items() if n not in expected]
    wrong = [f"{n}: {s} here, {expected[n]} in the model" for n, s in shapes.items()
             if n in expected and s != expected[n]]
    full = metadata.get("contents") == FULL_CONTENTS or set(shapes) == set(expected)
    missing = [n for n in expected if n not in shapes] if full else []
    if unknown or wrong or missing:
        lines = ([f"not in the model: {x}" for x in unknown] + [f"wrong shape: {x}" for x in wrong]
                 + [f"missing from this full state dict: {x}" for x in missing])
        raise CheckpointError(f"{path} does not fit the model of {base_dir} with a keyboard of {width} "
                              f"({len(lines)} problem(s)):\n  " + "\n  ".join(lines[:20])
                              + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""))

    with safe_open(path, framework="pt") as f:
        state = {name: f.get_tensor(name).to(device).to(dtype) for name in shapes}
    details = ", ".join(f"{k} {metadata[k]}" for k in ("strategy", "epoch", "weights") if k in metadata)
    if full:
        model.load_state_dict(state, strict=True, assign=True)
        description = f"{path} (full state dict{', ' + details if details else ''}; config from {base_dir})"
    else:
        model, reinitialised = load_base_model(base_dir, keyboard_dim=width, device=device, dtype=dtype)
        untrained = [n for n in reinitialised if n not in state]
        if untrained:
            raise CheckpointError(f"the base model's keyboard width differs from {path}'s ({width}), so its "
                                  f"keyboard tensors were re-initialised, but {path} lacks "
                                  f"{len(untrained)} of them: {', '.join(untrained[:5])}")
        with torch.no_grad():
            params = model.state_dict()
            for name, tensor in state.items():
                params[name].copy_(tensor)
        description = (f"{base_dir} + {len(state)} fine-tuned tensors from {path} (trainable tensors only"
                       + (f", {details}" if details else "") + ")")
    return LoadedModel(model.eval().requires_grad_(False), keys, description + f"; keyboard {', '.join(keys)}")


def select_keys(keyboard: torch.Tensor, keys, wanted) -> torch.Tensor:
    """The columns of keyboard [T, len(keys)] named by wanted, in wanted's order."""
    keys = [str(k).upper() for k in keys]
    return keyboard[:, [keys.index(k) for k in wanted]]


# -----------------------------------------------------------------------------
# Sampling

def window_spans(num_frames: int, window_frames: int) -> list[tuple[int, int]]:
    """[start, end) frame spans of the windows; each starts on the previous one's last frame,
    so with 4k+1 frames in all and per window every span is 4k+1 long too."""
    spans, start = [], 0
    while True:
        end = min(start + window_frames, num_frames)
        spans.append((start, end))
        if end == num_frames:
            return spans
        start = end - 1


@torch.no_grad()
def sample_latents(model: WanModel, cond_concat: torch.Tensor, visual_context: torch.Tensor,
                   keyboard: torch.Tensor, mouse: torch.Tensor, num_steps: int, shift: float,
                   generator: torch.Generator, autocast, progress=None) -> torch.Tensor:
    """One window: noise (drawn on the CPU from generator, so a seed means the same noise on
    any device) integrated by the Euler sampler -> latents [1, 16, F, h, w] float32."""
    device = cond_concat.device
    noise = torch.randn((1, LATENT_CHANNELS, *cond_concat.shape[2:]), generator=generator).to(device)
    actions = model.config.action_config
    keyboard_cond = keyboard[None].float().to(device) if actions.enable_keyboard else None
    mouse_cond = mouse[None].float().to(device) if actions.enable_mouse else None

    def velocity(x, timestep):
        with autocast:
            return model(x, timestep, visual_context, cond_concat, keyboard_cond=keyboard_cond, mouse_cond=mouse_cond)

    return flow.euler_sample(velocity, noise, num_steps, shift, progress)


def decode_frames(vae, latents: torch.Tensor) -> torch.Tensor:
    """Latents [1, 16, F, h, w] -> frames [T, 3, H, W] float32 in [-1, 1] on the CPU."""
    return vae.decode(latents.to(vae.dtype))[0].float().cpu().transpose(0, 1)


@torch.no_grad()
def generate_frames(model: WanModel, vae, clip, first_frame: torch.Tensor, keyboard: torch.Tensor,
                    mouse: torch.Tensor, window_frames: int, num_steps: int, shift: float, seed: int,
                    autocast, progress: bool = False) -> torch.Tensor:
    """first_frame [3, H, W] + actions [T, ...] -> frames [T, 3, H, W] in [-1, 1].

    Each window's cond_concat and visual_context come from its first frame exactly as the
    latent cache builds them; a window after the first starts from the last frame made,
    turned into 8-bit pixels and back as every training frame is.
    """
    generator = torch.Generator().manual_seed(seed)
    spans = window_spans(len(keyboard), window_frames)
    frames, first = [], first_frame
    for index, (start, end) in enumerate(spans):
        image = first[None].to(device=vae.device, dtype=vae.dtype)
        cond_concat = build_cond_concat(vae, image, end - start).float()
        visual_context = build_visual_context(clip, image).float()
        bar = (lambda steps: tqdm(steps, desc=f"window {index + 1}/{len(spans)}", unit="step")) if progress else None
        latents = sample_latents(model, cond_concat, visual_context, keyboard[start:end], mouse[start:end],
                                 num_steps, shift, generator, autocast, bar)
        video = decode_frames(vae, latents)
        frames.append(video if index == 0 else video[1:])
        first = data.preprocess_image(Image.fromarray(to_uint8(video[-1:])[0]), *video.shape[-2:])
    return torch.cat(frames)


def chaining_warning(num_frames: int, window_frames: int) -> str:
    spans = window_spans(num_frames, window_frames)
    seams = f"frame{'s' if len(spans) > 2 else ''} " + ", ".join(str(start) for start, _ in spans[1:])
    return (f"NUM_FRAMES={num_frames} is longer than one model window (WINDOW_FRAMES={window_frames}): the video "
            f"is {len(spans)} windows, each started from the last frame generated by the one before (at "
            f"{seams}). This is the bidirectional base model, not Matrix-Game's streaming (causal) model: expect a "
            "jump in motion and slow drift at each seam.")


# -----------------------------------------------------------------------------
# Rendering: panels side by side, the held keys and the mouse underneath

BACKGROUND = (18, 18, 18)
KEY_IDLE = (60, 60, 60)
KEY_HELD = (255, 196, 0)
TEXT = (235, 235, 235)
TEXT_ON_HELD = (0, 0, 0)
MOUSE_ARROW = (90, 200, 255)
MOUSE_FULL_SCALE = 0.2     # a mouse value this large draws the arrow to the rim
KEY_PLACES = {"W": (0, 1), "A": (1, 0), "S": (1, 1), "D": (1, 2)}  # (row, column) of the WASD cluster


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] -> [T, H, W, 3] uint8."""
    pixels = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def strip_height(panel_height: int) -> int:
    """The overlay strip under the panels: a fifth of their height, at least 40 px, even."""
    return max(40, panel_height // 5 + panel_height // 5 % 2)


def key_boxes(keys, strip: int) -> dict[str, tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) inside the strip of each key's box: W, A, S, D as on a keyboard,
    any other keys in columns to their right."""
    pad = max(2, strip // 16)
    size = (strip - 3 * pad) // 2
    others = [k for k in keys if k.upper() not in KEY_PLACES]
    boxes = {}
    for key in keys:
        i = others.index(key) if key in others else 0
        row, column = KEY_PLACES.get(key.upper(), (i % 2, 3 + i // 2))
        x0, y0 = pad + column * (size + pad), pad + row * (size + pad)
        boxes[key] = (x0, y0, x0 + size - 1, y0 + size - 1)
    return boxes


def _font(size: int):
    return ImageFont.load_default(size=max(8, size))


def draw_overlay(draw: ImageDraw.ImageDraw, top: int, strip: int, keys, held, mouse, frame: int, total: int) -> None:
    """The keys (held ones highlighted), a mouse arrow (yaw right, pitch up) and the frame number."""
    boxes = key_boxes(keys, strip)
    font = _font(strip // 4)
    for key, is_held in zip(keys, held):
        x0, y0, x1, y1 = boxes[key]
        draw.rectangle((x0, top + y0, x1, top + y1), fill=KEY_HELD if is_held else KEY_IDLE)
        draw.text(((x0 + x1) / 2, top + (y0 + y1) / 2), key[:3], fill=TEXT_ON_HELD if is_held else TEXT,
                  font=font, anchor="mm")
    pad = max(2, strip // 16)
    radius = strip // 2 - pad
    cx, cy = max(x1 for _, _, x1, _ in boxes.values()) + 2 * pad + radius, top + strip // 2
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=KEY_IDLE, width=max(1, pad // 2))
    pitch, yaw = float(mouse[0]), float(mouse[1])
    dx, dy = yaw / MOUSE_FULL_SCALE * radius, -pitch / MOUSE_FULL_SCALE * radius
    length = math.hypot(dx, dy)
    if length > radius:
        dx, dy = dx * radius / length, dy * radius / length
    draw.line((cx, cy, cx + dx, cy + dy), fill=MOUSE_ARROW, width=max(2, pad))
    dot = max(2, pad)
    draw.ellipse((cx + dx - dot, cy + dy - dot, cx + dx + dot, cy + dy + dot), fill=MOUSE_ARROW)
    draw.text((cx + radius + 2 * pad, cy), f"{frame}/{total - 1}", fill=TEXT, font=font, anchor="lm")


def compose_frames(panels: dict[str, np.ndarray], keyboard: torch.Tensor, mouse: torch.Tensor,
                   keys) -> np.ndarray:
    """Labelled panels [T, H, W, 3] uint8 side by side over the action strip -> [T, H + strip, n W, 3]."""
    frames = list(panels.values())
    count, height, width = frames[0].shape[:3]
    strip = strip_height(height)
    font = _font(height // 20)
    held = (keyboard > 0.5).tolist()
    out = np.empty((count, height + strip, width * len(frames), 3), np.uint8)
    for t in range(count):
        image = Image.new("RGB", (width * len(frames), height + strip), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for i, (label, video) in enumerate(panels.items()):
            image.paste(Image.fromarray(video[t]), (i * width, 0))
            box = draw.textbbox((i * width + 3, 2), label, font=font)
            draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=BACKGROUND)
            draw.text((i * width + 3, 2), label, fill=TEXT, font=font)
        draw_overlay(draw, height, strip, [str(k).upper() for k in keys], held[t], mouse[t].tolist(), t, count)
        out[t] = np.asarray(image)
    return out


# -----------------------------------------------------------------------------
# Writing: MP4 through PyAV (FFmpeg's encoders), GIF through PIL

def write_video(path, frames: np.ndarray, fps: int = FPS) -> Path:
    """frames [T, H, W, 3] uint8 -> path (.mp4 or .gif), atomically. Without PyAV an .mp4
    becomes a .gif beside it (said on stdout). Returns the path written."""
    path = Path(path)
    if path.suffix.lower() == ".mp4":
        try:
            import av
        except ImportError:
            path = path.with_suffix(".gif")
            print(f"PyAV is not installed (pip install av), so the preview is a GIF: {path}")
        else:
            return write_atomic(path, lambda tmp: _write_mp4(av, tmp, frames, fps))
    return write_atomic(path, lambda tmp: _write_gif(tmp, frames, fps))


def mp4_codec(av) -> str:
    """H.264 (libx264, in PyAV's wheels) where present, else MPEG-4 part 2 (FFmpeg's own)."""
    for name in ("libx264", "mpeg4"):
        try:
            av.codec.Codec(name, "w")
            return name
        except Exception:  # PyAV raises its own errors for an unknown codec, by version
            continue
    raise PreviewError("this PyAV build has neither the libx264 nor the mpeg4 encoder; write a .gif instead")


def _write_mp4(av, filename: str, frames: np.ndarray, fps: int) -> None:
    codec = mp4_codec(av)
    with av.open(filename, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "18", "preset": "medium"}
        else:
            stream.bit_rate = 8_000_000
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _write_gif(filename: str, frames: np.ndarray, fps: int) -> None:
    images = [Image.fromarray(f) for f in frames]
    images[0].save(filename, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps),
                   loop=0)


# -----------------------------------------------------------------------------
# Scores and the preview files

def score_panels(panels: dict[str, torch.Tensor], keyboard: torch.Tensor, mouse: torch.Tensor, keys) -> dict:
    return {label: action_following_score(frames, keyboard, mouse, tuple(str(k).upper() for k in keys))
            for label, frames in panels.items()}


def format_score(score: dict) -> str:
    def share(value):
        return "n/a" if value is None else f"{value:.2f}"

    kinds = ", ".join(f"{kind} {share(score[kind]['agree'])} ({score[kind]['pairs']} pairs)"
                      for kind in ("forward_back", "strafe", "yaw", "pitch"))
    return f"overall {share(score['overall'])} - {kinds}"


def write_preview(path, panels: dict[str, torch.Tensor], keyboard: torch.Tensor, mouse: torch.Tensor, keys,
                  info: dict) -> tuple[Path, dict]:
    """Write the video of panels {label: frames [T, 3, H, W] in [-1, 1]} and, beside it with
    the same name, .json: info plus every panel's action-following score. Returns (video path,
    scores)."""
    video = compose_frames({label: to_uint8(frames) for label, frames in panels.items()}, keyboard, mouse, keys)
    written = write_video(path, video)
    scores = score_panels(panels, keyboard, mouse, keys)
    write_json_atomic(written.with_suffix(".json"), {
        **info, "video": written.name, "frames": video.shape[0], "fps": FPS, "panels": list(panels),
        "keyboard_keys": [str(k).upper() for k in keys],
        "scores": scores,
        "score_meaning": "per action kind, the share of frame pairs with that action commanded whose image motion "
                         "goes the commanded way (agree) or the other way (oppose); overall pools the kinds "
                         "(see action_score.py)"})
    return written, scores


# -----------------------------------------------------------------------------
# Training-time previews

@torch.no_grad()
def preview_clip_index(clips) -> int:
    """The clip with the most frames where a key is held or the mouse moves (the first of
    equals): a clip of standing still would show, and score, nothing."""
    active = [int((c.keyboard.any(dim=1) | c.mouse.ne(0).any(dim=1)).sum()) for c in clips]
    return active.index(max(active))


def epoch_preview(model: WanModel, clips, vae_path, height: int, width: int, out_dir, epoch: int, keyboard_keys,
                  num_steps: int, shift: float, seed: int, autocast, write: bool = True) -> dict:
    """Generate the most active clip of `clips` (a CachedClipDataset; see preview_clip_index)
    with its own actions and its cached conditioning, beside its real frames; write
    out_dir/epoch{N}.mp4 (or .gif) and .json. Returns what the training script records.

    The VAE is loaded for the decode and freed after, so it holds no GPU memory while
    training. Only seeded generators are used: the training's random state is untouched.
    With write=False only the sampling runs (the other ranks of a sharded model take part).
    """
    device = next(model.parameters()).device
    index = preview_clip_index(clips.clips)
    item, clip = clips[index], clips.clips[index]
    was_training = model.training
    model.eval()
    latents = sample_latents(model, item["cond_concat"][None].to(device), item["visual_context"][None].to(device),
                             item["keyboard"], item["mouse"], num_steps, shift,
                             torch.Generator().manual_seed(seed), autocast)
    model.train(was_training)
    if not write:
        return {}
    vae = load_vae(vae_path, device=device, dtype=run_dtype(device))
    generated = decode_frames(vae, latents)
    del vae
    if device.type == "cuda":
        torch.cuda.empty_cache()
    truth = data.RecordingClipDataset([clip], height, width)[0]["video"].transpose(0, 1)
    written, scores = write_preview(
        Path(out_dir) / f"epoch{epoch}.mp4", {"generated": generated, "ground truth": truth}, item["keyboard"],
        item["mouse"], keyboard_keys,
        {"epoch": epoch, "clip": clip.clip_id, "num_steps": num_steps, "timestep_shift": shift, "seed": seed})
    ours, real = scores["generated"]["overall"], scores["ground truth"]["overall"]
    summary = (f"{written.parent.name}/{written.name}: action-following "
               + ("n/a" if ours is None else f"{ours:.2f}") + " (ground truth "
               + ("n/a" if real is None else f"{real:.2f}") + ")")
    return {"preview": summary, "preview_score": ours, "preview_truth_score": real}


# -----------------------------------------------------------------------------
# The whole preview

def generate(s: dict) -> dict:
    """Render the preview the settings describe; returns {"video", "json", "scores"}."""
    device = pick_device(s["DEVICE"])
    dtype, autocast = run_dtype(device), autocast_for(device)
    inputs = load_inputs(s)
    print(f"inputs: {inputs.description}")
    if s["NUM_FRAMES"] > s["WINDOW_FRAMES"]:
        print(f"warning: {chaining_warning(s['NUM_FRAMES'], s['WINDOW_FRAMES'])}", file=sys.stderr)
    vae, clip = load_encoders(s["VAE_PATH"], s["CLIP_PATH"], device)
    runs = [("base", "")] if s["COMPARE"] else []
    runs.append(("fine-tuned" if s["CHECKPOINT"] else "base", s["CHECKPOINT"]))
    panels, models = {}, {}
    for label, checkpoint in runs:
        loaded = load_model(s["BASE_MODEL_DIR"], checkpoint, s["KEYBOARD_KEYS"], device, dtype)
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
        generate(settings)
    except (ValueError, FileNotFoundError) as error:  # PreviewError, CheckpointError, DataError, ...
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
