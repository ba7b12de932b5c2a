"""The model a player runs: a streaming model folder loaded into the causal architecture,
with the names of its keyboard columns and whether it was distilled for streaming.

A folder whose config has a streaming window (`local_attn_size`) holds a student - an
official one or ours - and loads strictly. A folder without a config is taken for an
official student whose config is MODE's (the official scripts read it from their
repository, not from the download). A folder whose config has no window holds a
bidirectional model (the base model, with a fine-tuned CHECKPOINT over it if one is
given): it runs in the causal architecture with MODE's window, but was never trained to
denoise a block in a few steps, so what it streams is poor.
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from generation.errors import GenerationError
from generation.finetuned import BASE_MODEL_KEYS, load_model
from generation.streaming import STUDENT_KEYBOARD_KEYS
from wan.causal import CausalWanModel, causal_from
from wan.config import DISTILLED_CONFIG_PATHS, WanConfig, distilled_config
from wan.loading import (STREAMING_HINT, CheckpointError, find_config_file, find_weight_files, load_streaming_model,
                         open_safetensors)

NOT_DISTILLED_WARNING = (
    "{folder} holds a bidirectional model (the base model or a fine-tuned one), not a distilled streaming "
    "student: it runs in the causal architecture (blocks of 3 latent frames, a window of {window} frames) "
    "but was never trained to make a block in {steps} steps, so the streamed video will be poor (blurred "
    "or noisy). Play a distilled student (an official one, or one distilled from your fine-tuned model) "
    "for real output.")


@dataclass
class PlayModel:
    model: CausalWanModel
    keyboard_keys: tuple[str, ...]  # the model's keyboard columns, in order
    distilled: bool                 # a streaming student (False: a bidirectional model run causally)
    description: str


def _folder_config(model_dir, mode: str) -> tuple[Path, WanConfig, str]:
    """MODEL_DIR, its config (its own, else MODE's for a folder without one) and where it came from."""
    folder = Path(model_dir)
    if not folder.is_dir():
        raise CheckpointError(f"MODEL_DIR={folder} is not a folder: {STREAMING_HINT}")
    configs = [p for p in folder.glob("*.json") if not p.name.endswith(".index.json")]
    if configs:
        return folder, WanConfig.from_json(find_config_file(folder, STREAMING_HINT)), "its config"
    return folder, distilled_config(mode), f"MODE={mode}'s config ({DISTILLED_CONFIG_PATHS[mode].name})"


def play_model_keys(model_dir, checkpoint: str, mode: str, keyboard_keys) -> tuple[str, ...]:
    """The keyboard columns load_play_model names, from the config and the files' headers
    only, so that an action script is checked before any weights are read. (A
    bidirectional model may then keep W, S, A, D out of a longer KEYBOARD_KEYS: see
    generation.finetuned.model_keys.)"""
    folder, config, _ = _folder_config(model_dir, mode)
    keys = tuple(str(k).upper() for k in keyboard_keys)
    if config.windowed:
        return _student_keys(keys or _recorded_keys(folder), mode, config.action_config.keyboard_dim_in, folder)
    return keys or (_recorded_keys(Path(checkpoint)) if checkpoint else ()) or BASE_MODEL_KEYS


def load_play_model(model_dir, checkpoint: str, mode: str, keyboard_keys, device,
                    dtype: torch.dtype, ignore_base_fingerprint: bool = False) -> PlayModel:
    """Load MODEL_DIR (and CHECKPOINT over a bidirectional one) as a streaming model, in
    eval mode without gradients. keyboard_keys: the columns' names; empty: the file's own
    (our checkpoints record them), else MODE's for a student, the base model's for a
    bidirectional model. ignore_base_fingerprint: apply CHECKPOINT even over a base model
    other than the one it was trained on (generation.finetuned.load_model)."""
    folder, config, source = _folder_config(model_dir, mode)
    keys = play_model_keys(folder, checkpoint, mode, keyboard_keys)

    if config.windowed:
        if checkpoint:
            raise GenerationError(f"CHECKPOINT={checkpoint} is a fine-tuned file to apply over a base model, but "
                                  f"MODEL_DIR={folder} holds a streaming model; leave CHECKPOINT empty")
        model = load_streaming_model(folder, config, device, dtype)
        description = (f"streaming model {folder} ({source}; window {config.local_attn_size} latent frames, "
                       f"keyboard {', '.join(keys)}, {'with' if config.action_config.enable_mouse else 'no'} mouse)")
        return PlayModel(model.eval().requires_grad_(False), keys, True, description)

    window = distilled_config(mode)
    try:
        loaded = load_model(folder, checkpoint, keys, device, dtype, ignore_base_fingerprint)
    except CheckpointError as error:
        raise CheckpointError(f"{error}\n(MODEL_DIR={folder} has a config without a streaming window, so it was "
                              f"read as a bidirectional base model; if it holds an official student, its "
                              f"config.json is not the one the official scripts use: move it out of the folder "
                              f"and MODE's config is used)") from None
    model = causal_from(loaded.model, window.local_attn_size, window.sink_size)
    description = (f"{loaded.description}, run causally with MODE={mode}'s window of "
                   f"{window.local_attn_size} latent frames (not distilled)")
    return PlayModel(model, loaded.keyboard_keys, False, description)


def _student_keys(keys: tuple, mode: str, width: int, folder: Path) -> tuple[str, ...]:
    if not keys:
        keys = STUDENT_KEYBOARD_KEYS[mode]
        if len(keys) != width:
            fitting = [m for m, k in STUDENT_KEYBOARD_KEYS.items() if len(k) == width]
            raise GenerationError(f"{folder} has a keyboard of {width} columns but MODE={mode} has "
                                  f"{len(keys)} ({', '.join(keys)}); set MODE"
                                  + (f" (to {' or '.join(fitting)})" if fitting else "")
                                  + " or name the columns with KEYBOARD_KEYS")
    elif len(keys) != width:
        raise GenerationError(f"{folder} has a keyboard of {width} columns but KEYBOARD_KEYS has {len(keys)} "
                              f"({', '.join(keys)})")
    return keys


def _recorded_keys(path: Path) -> tuple[str, ...]:
    """The keyboard_keys our trainers write into a weights file's metadata (a folder: any of
    its files); () when there are none."""
    files = sorted(set(find_weight_files(path, STREAMING_HINT).values())) if path.is_dir() else [path]
    for file in files:
        if not file.is_file():
            continue
        with open_safetensors(file, STREAMING_HINT) as f:
            recorded = (f.metadata() or {}).get("keyboard_keys", "")
        keys = tuple(k.strip().upper() for k in recorded.split(",") if k.strip())
        if keys:
            return keys
    return ()
