"""Fine-tuned checkpoints: the files the training script writes, and the model a preview
(or any generation) runs - the base model with such a file applied - with the names of
its keyboard columns."""

from dataclasses import dataclass
from pathlib import Path

import torch

from generation.errors import GenerationError
from wan.config import WanConfig
from wan.files import save_safetensors_atomic
from wan.fingerprint import FINGERPRINT_KEY, model_fingerprint
from wan.loading import (CheckpointError, checkpoint_keyboard_dim, find_config_file, load_base_model,
                         open_safetensors)
from wan.lora import LoRAConfig, add_lora, is_adapter_name, merge_lora
from wan.model import WanModel

BASE_MODEL_KEYS = ("W", "S", "A", "D")   # the official base checkpoint's keyboard columns
FINAL_FILE = "base_finetuned_final.safetensors"  # the training script's last file (every tensor, but for "lora")
MERGED_FILE = "base_finetuned_merged.safetensors"  # a "lora" run's final file merged into the base model
# The "contents" metadata of the files the training script writes
FULL_CONTENTS = "full state dict"
TRAINED_CONTENTS = "trainable tensors only; load over the base model"
LORA_CONTENTS = "LoRA adapters and fully trained tensors; load over the base model or merge (--merge)"
BASE_MODEL_KEY = "base_model_dir"        # the metadata entry naming the BASE_MODEL_DIR a file was trained over
CHECKPOINT_HINT = ("CHECKPOINT must be a file the training script wrote (base_finetuned_epoch<N>.safetensors or "
                   f"{FINAL_FILE}); a copy interrupted part-way is truncated - copy it again")


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
    raise GenerationError(f"{where} has a keyboard of {width} columns but KEYBOARD_KEYS has {len(keys)} "
                       f"({', '.join(keys)}); set --KEYBOARD_KEYS to the keys it was trained with")


def load_model(base_model_dir, checkpoint, keyboard_keys, device, dtype: torch.dtype,
               ignore_base_fingerprint: bool = False) -> LoadedModel:
    """The base model, with a fine-tuned checkpoint (empty: none) applied.

    A full file (the training script's final file: every tensor of the model) is loaded
    strictly on a model built from BASE_MODEL_DIR's config; a trainable-only file (its
    epoch files) is applied over the base model, and every tensor in it must be one of the
    model's with the same shape. A LoRA file (every file of a "lora" run) is applied the
    same way over the base model with its adapters, which are then merged: the model
    returned is a plain WanModel. The checkpoint's keyboard width decides the model's.
    A file applied over the base model must have been trained over that base (its recorded
    fingerprint, wan/fingerprint.py), unless ignore_base_fingerprint; every tensor read
    must be finite, and so must every merged weight.
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
    with open_safetensors(path, CHECKPOINT_HINT) as f:
        shapes = {name: list(f.get_slice(name).get_shape()) for name in f.keys()}
        metadata = f.metadata() or {}
    width = checkpoint_keyboard_dim(shapes, path) or len(keyboard_keys)
    keys = tuple(str(k).upper() for k in keyboard_keys)
    trained_keys = tuple(k for k in metadata.get("keyboard_keys", "").split(",") if k)
    if trained_keys and trained_keys != keys:
        raise GenerationError(f"{path} was trained with KEYBOARD_KEYS={','.join(trained_keys)} (its metadata), but "
                           f"KEYBOARD_KEYS is {','.join(keys)}: pass --KEYBOARD_KEYS={','.join(trained_keys)}")
    if width != len(keys):
        raise GenerationError(f"{path} has a keyboard of {width} columns but KEYBOARD_KEYS has {len(keys)} "
                           f"({', '.join(keys)}); set --KEYBOARD_KEYS to the keys it was trained with")

    lora = None
    if metadata.get("contents") == LORA_CONTENTS or any(is_adapter_name(n) for n in shapes):
        try:
            lora = LoRAConfig.from_metadata(metadata, str(path))
        except ValueError as error:
            raise CheckpointError(f"{error}; {CHECKPOINT_HINT}") from None
    config = WanConfig.from_json(find_config_file(base_dir)).with_keyboard_dim(width)
    with torch.device("meta"):
        model = WanModel(config)
        adapters = add_lora(model, lora) if lora is not None else []
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}
    unknown = [f"{n} {s}" for n, s in shapes.items() if n not in expected]
    wrong = [f"{n}: {s} here, {expected[n]} in the model" for n, s in shapes.items()
             if n in expected and s != expected[n]]
    full = lora is None and (metadata.get("contents") == FULL_CONTENTS or set(shapes) == set(expected))
    missing = [n for n in expected if n not in shapes] if full else [n for n in adapters if n not in shapes]
    if unknown or wrong or missing:
        what = ("this full state dict" if full else "this file of trained tensors" if lora is None
                else f"this LoRA file (rank {lora.rank}, {','.join(lora.layers())})")
        lines = ([f"not in the model: {x}" for x in unknown] + [f"wrong shape: {x}" for x in wrong]
                 + [f"missing from {what}: {x}" for x in missing])
        raise CheckpointError(f"{path} does not fit the model of {base_dir} with a keyboard of {width} "
                              f"({len(lines)} problem(s)):\n  " + "\n  ".join(lines[:20])
                              + (f"\n  ... and {len(lines) - 20} more" if len(lines) > 20 else ""))

    if not full and not ignore_base_fingerprint:
        check_base_fingerprint(path, metadata, base_dir)
    try:
        with open_safetensors(path, CHECKPOINT_HINT) as f:
            # adapters stay float32 until merged: a bf16 B A would round a small update away
            state = {name: f.get_tensor(name).to(device).to(torch.float32 if is_adapter_name(name) else dtype)
                     for name in shapes}
    except CheckpointError:
        raise
    except Exception as error:  # a header that promises more bytes than the file has
        raise CheckpointError(f"{path}: cannot read its tensors ({error}); {CHECKPOINT_HINT}") from error
    check_finite(state, str(path), "the file is damaged, or it was saved from a run that diverged")
    details = ", ".join(f"{k} {metadata[k]}" for k in ("strategy", "epoch", "weights") if k in metadata)
    if full:
        model.load_state_dict(state, strict=True, assign=True)
        description = f"{path} (full state dict{', ' + details if details else ''}; config from {base_dir})"
    else:
        model, reinitialised = load_base_model(base_dir, keyboard_dim=width, device=device, dtype=dtype)
        if lora is not None:
            add_lora(model, lora)
        untrained = [n for n in reinitialised if n not in state]
        if untrained:
            raise CheckpointError(f"the base model's keyboard width differs from {path}'s ({width}), so its "
                                  f"keyboard tensors were re-initialised, but {path} lacks "
                                  f"{len(untrained)} of them: {', '.join(untrained[:5])}")
        with torch.no_grad():
            params = model.state_dict()
            for name, tensor in state.items():
                params[name].copy_(tensor)
        if lora is not None:
            try:
                merge_lora(model, dtype)
            except ValueError as error:
                raise CheckpointError(f"{path}: {error} (LoRA alpha {lora.alpha:g}, rank {lora.rank}): its adapters "
                                      "do not give a usable model, and nothing was written") from None
            description = (f"{base_dir} + LoRA rank {lora.rank} on {len(adapters) // 2} layers (merged) and "
                           f"{len(state) - len(adapters)} fully trained tensors from {path}"
                           + (f" ({details})" if details else ""))
        else:
            description = (f"{base_dir} + {len(state)} fine-tuned tensors from {path} (trainable tensors only"
                           + (f", {details}" if details else "") + ")")
    return LoadedModel(model.eval().requires_grad_(False), keys, description + f"; keyboard {', '.join(keys)}")


def recorded_base_model(checkpoint) -> str | None:
    """The BASE_MODEL_DIR a file of the training script was trained over, as its metadata
    records it (files from before it was recorded: None)."""
    path = Path(checkpoint)
    if not path.is_file():
        return None
    with open_safetensors(path, CHECKPOINT_HINT) as f:
        return (f.metadata() or {}).get(BASE_MODEL_KEY) or None


def check_base_fingerprint(path: Path, metadata: dict, base_dir: Path) -> None:
    """A file trained over another base model than base_dir's (by the fingerprint the trainer
    recorded; files from before it recorded one are taken as they are) is refused."""
    recorded = metadata.get(FINGERPRINT_KEY)
    if recorded is None:
        return
    found = model_fingerprint(base_dir)
    if found != recorded:
        raise CheckpointError(
            f"{path} was trained over a base model whose weights differ from those in {base_dir} (fingerprint "
            f"{recorded} recorded in the file, {found} here): applied over another base it gives a broken model. "
            f"Point BASE_MODEL_DIR (play_world.py: MODEL_DIR) at the base it was trained on; if this folder holds "
            "the same weights in another form (another dtype, re-saved), set IGNORE_BASE_FINGERPRINT=true")


def check_finite(tensors: dict, where: str, why: str) -> None:
    """Every tensor finite, or an error naming the first ones that are not."""
    bad = [(name, int((~torch.isfinite(t)).sum())) for name, t in tensors.items()
           if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        listed = ", ".join(f"{name} ({count:,})" for name, count in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise CheckpointError(f"{where}: {len(bad)} tensor(s) hold non-finite values (NaN or inf): {listed}; {why}")


def merge_lora_file(base_model_dir, lora_file, out_path, ignore_base_fingerprint: bool = False) -> Path:
    """Write lora_file (a "lora" run's file) merged into the base model as a full state dict
    in float32, which loads strictly like the official checkpoint (its keyboard keys from
    the file's metadata). Returns out_path. A file trained over another base, or whose
    merge is not finite, is refused and nothing is written."""
    path = Path(lora_file)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (a \"lora\" run writes {FINAL_FILE} and epoch files)")
    with open_safetensors(path, CHECKPOINT_HINT) as f:
        metadata = f.metadata() or {}
    if metadata.get("contents") != LORA_CONTENTS:
        raise CheckpointError(f"{path} is not a LoRA file (its contents: {metadata.get('contents', 'not recorded')!r}); "
                              "only the files of a TRAINING_STRATEGY=\"lora\" run need merging")
    keys = tuple(k for k in metadata.get("keyboard_keys", "").split(",") if k)
    loaded = load_model(base_model_dir, path, keys, torch.device("cpu"), torch.float32, ignore_base_fingerprint)
    return save_safetensors_atomic(loaded.model.state_dict(), out_path,
                                   {**metadata, "contents": FULL_CONTENTS, "merged_from": path.name})


def select_keys(keyboard: torch.Tensor, keys, wanted) -> torch.Tensor:
    """The columns of keyboard [T, len(keys)] named by wanted, in wanted's order."""
    keys = [str(k).upper() for k in keys]
    return keyboard[:, [keys.index(k) for k in wanted]]
