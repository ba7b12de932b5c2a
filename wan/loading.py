"""Find, check and load model checkpoints; save models in the official formats.

A model folder holds one config JSON and either one `.safetensors` file or several
shards named by a `*.safetensors.index.json`. Loading builds the model on the meta
device and hands it the file's tensors with `assign=True`, one tensor at a time moved to
the target device and converted there, so the 1.8B model never exists twice.

Base model: the checkpoint's keyboard width K is read from `keyboard_embed.0.weight` in
the file, not from the config. If the caller asks for another width, exactly the 30
tensors that depend on it are re-initialised and reported; every other tensor must match
exactly.

Streaming models (the distilled students, and our own distilled checkpoints): strict.
The official files are believed to store every key under `model.` (the reference loads
them into a wrapper whose only child is `model`); bare keys are accepted too, and we
write the official layout, so our checkpoints load like the official ones.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from wan.causal import CausalWanModel
from wan.config import FRAMES_PER_BLOCK, WanConfig
from wan.files import save_safetensors_atomic, write_json_atomic
from wan.model import WanModel, init_linear_weight_

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
KEYBOARD_WEIGHT_SUFFIX = ".action_model.keyboard_embed.0.weight"
DOWNLOAD_HINT = (
    "download the base model's files (its config JSON and diffusion_pytorch_model.safetensors, "
    "the base_model/ folder of Skywork/Matrix-Game-2.0 on Hugging Face: "
    "https://huggingface.co/Skywork/Matrix-Game-2.0) and put them in that folder"
)
STREAMING_WEIGHTS_NAME = "streaming_model.safetensors"
STREAMING_KEY_PREFIX = "model."  # the official streaming files' layout
STREAMING_HINT = (
    "a streaming model folder holds its config.json and one .safetensors file; the official "
    "students are the base_distilled_model/, gta_distilled_model/ and templerun_distilled_model/ "
    "folders of https://huggingface.co/Skywork/Matrix-Game-2.0 (their configs are also in "
    "reference/matrix_game2_distilled_*_config.json)"
)


class CheckpointError(ValueError):
    pass


def open_safetensors(path: Path, hint: str = DOWNLOAD_HINT):
    """safe_open, with an error that names the file when it is not a readable safetensors file."""
    try:
        return safe_open(path, framework="pt")
    except Exception as error:
        raise CheckpointError(f"{path}: not a readable .safetensors file ({error}); the download may be "
                              f"incomplete: {hint}") from error


def find_config_file(model_dir: Path, hint: str = DOWNLOAD_HINT) -> Path:
    candidates = sorted(p for p in model_dir.glob("*.json") if not p.name.endswith(".index.json"))
    named = [p for p in candidates if "config" in p.name]
    chosen = named or candidates
    if len(chosen) != 1:
        found = [p.name for p in candidates] or "none"
        raise CheckpointError(f"{model_dir}: expected exactly one config JSON, found {found}; "
                              f"{hint}")
    return chosen[0]


def find_weight_files(model_dir: Path, hint: str = DOWNLOAD_HINT) -> dict[str, Path]:
    """{tensor name: file} from an index JSON, else from every .safetensors in the folder."""
    indexes = sorted(model_dir.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{model_dir}: more than one index JSON: {[p.name for p in indexes]}")
    if indexes:
        index = indexes[0]
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError(f"'weight_map' is a {type(weight_map).__name__}")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' "
                                  f"object): {e}") from None
        missing = sorted({f for f in weight_map.values() if not (model_dir / f).is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are not in {model_dir}: {missing}")
        located = {name: model_dir / f for name, f in weight_map.items()}
        for path in sorted(set(located.values())):
            with open_safetensors(path, hint) as f:
                keys = set(f.keys())
            listed = {n for n, p in located.items() if p == path}
            if keys != listed:
                raise CheckpointError(
                    f"{path} does not hold what {index.name} says: missing "
                    f"{sorted(listed - keys)}, not listed {sorted(keys - listed)}")
        return located
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no model weights (.safetensors) in {model_dir}: {hint}")
    located = {}
    for path in files:
        with open_safetensors(path, hint) as f:
            for name in f.keys():
                if name in located:
                    raise CheckpointError(f"tensor {name} is in both {located[name].name} and "
                                          f"{path.name} (in {model_dir}); remove one of them")
                located[name] = path
    return located


def read_shapes(located: dict[str, Path], hint: str = DOWNLOAD_HINT) -> dict[str, list[int]]:
    """Tensor shapes from the file headers (no tensor data is read)."""
    shapes = {}
    for path in sorted(set(located.values())):
        with open_safetensors(path, hint) as f:
            for name in f.keys():
                if located.get(name) == path:
                    shapes[name] = list(f.get_slice(name).get_shape())
    return shapes


def checkpoint_keyboard_dim(shapes: dict[str, list[int]], where: Path) -> int | None:
    """K from the keyboard_embed.0.weight tensors ([128, K]); None if the file has none."""
    widths = {name: shape[-1] for name, shape in shapes.items()
              if name.endswith(KEYBOARD_WEIGHT_SUFFIX) and len(shape) == 2}
    if len(set(widths.values())) > 1:
        raise CheckpointError(f"{where}: blocks disagree on the keyboard width: {widths}")
    return next(iter(widths.values()), None)


@dataclass
class BaseModelFiles:
    """What a base-model folder holds, read from its headers (no tensor data)."""

    located: dict                # tensor name -> file
    config: WanConfig            # with the keyboard width the caller asked for
    expected: dict               # tensor name -> shape of the model to build
    reinit: list                 # keyboard tensors to re-initialise (the widths differ)


def inspect_base_model(model_dir, keyboard_dim: int | None = None) -> BaseModelFiles:
    """Find and check the base model's files: config, weights, every key and shape. Reads
    only file headers, so a wrong BASE_MODEL_DIR fails in a second, before any other work."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"base-model folder {model_dir} does not exist: {DOWNLOAD_HINT}")
    located = find_weight_files(model_dir)
    config = WanConfig.from_json(find_config_file(model_dir))
    shapes = read_shapes(located)
    file_keyboard_dim = checkpoint_keyboard_dim(shapes, model_dir)
    if file_keyboard_dim is not None:
        config = config.with_keyboard_dim(file_keyboard_dim)
    if keyboard_dim is not None:
        config = config.with_keyboard_dim(keyboard_dim)
    with torch.device("meta"):
        model = WanModel(config)
    expected = {name: list(t.shape) for name, t in model.state_dict().items()}

    reinit = []
    if file_keyboard_dim is not None and config.action_config.keyboard_dim_in != file_keyboard_dim:
        reinit = [n for n in expected if n.endswith(KEYBOARD_WEIGHT_SUFFIX)]
    # What the file must hold: the model's shapes, with the file's own keyboard width.
    in_file = {n: s[:-1] + [file_keyboard_dim] if n in reinit else s for n, s in expected.items()}
    check_checkpoint_fits(in_file, shapes, model_dir)
    return BaseModelFiles(located, config, expected, reinit)


def load_base_model(model_dir, keyboard_dim: int | None = None, device="cpu",
                    dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[WanModel, list[str]]:
    """Load the base model; return it and the names of re-initialised tensors.

    keyboard_dim: the keyboard width the caller's data has (None: the checkpoint's own).
    When it differs from the checkpoint's, the blocks' keyboard_embed.0.weight tensors are
    re-initialised (the spec's Linear init) and named in the returned list. They are drawn
    in float32 on the CPU from a generator of their own seeded by seed, so that they depend
    on the seed alone - not on what else used the global generator before, nor on the device.
    """
    files = inspect_base_model(model_dir, keyboard_dim)
    with torch.device("meta"):
        model = WanModel(files.config)
    state = read_tensors(files.located, device, dtype, {n: n for n in files.expected if n not in files.reinit})
    generator = torch.Generator().manual_seed(seed)
    for name in files.reinit:
        drawn = init_linear_weight_(torch.empty(files.expected[name]), generator)
        state[name] = drawn.to(device=device, dtype=dtype)
    model.load_state_dict(state, strict=True, assign=True)
    return model, files.reinit


def check_checkpoint_fits(in_file: dict[str, list[int]], shapes: dict[str, list[int]], model_dir: Path,
                          note: str = "") -> None:
    """One error listing every missing, unexpected and mis-shaped tensor (names as in the file)."""
    problems = [f"missing: {n} (expected {in_file[n]})" for n in in_file if n not in shapes]
    problems += [f"unexpected: {n} (found {s})" for n, s in shapes.items() if n not in in_file]
    problems += [f"wrong shape: {n} (expected {in_file[n]}, found {s})"
                 for n, s in shapes.items() if n in in_file and s != in_file[n]]
    if problems:
        raise CheckpointError(
            f"the checkpoint in {model_dir} does not fit the model its config describes{note} "
            f"({len(problems)} problem(s)):\n  " + "\n  ".join(problems))


def read_tensors(located: dict[str, Path], device, dtype: torch.dtype, names: dict[str, str],
                 hint: str = DOWNLOAD_HINT) -> dict[str, torch.Tensor]:
    """{model name: tensor} for the file names in `names` ({file name: model name})."""
    device = torch.device(device)
    state = {}
    for path in sorted(set(located.values())):
        with open_safetensors(path, hint) as f:
            for name in f.keys():
                if located[name] == path and name in names:
                    # Move in the file's dtype, convert on the target: no float32 copy on CPU.
                    state[names[name]] = f.get_tensor(name).to(device).to(dtype)
    return state


def _check_save_folder(model_dir: Path, weights_name: str) -> None:
    others = [p.name for p in (*model_dir.glob("*.json"), *model_dir.glob("*.safetensors"))
              if p.name not in (CONFIG_NAME, weights_name)] if model_dir.is_dir() else []
    if others:
        raise CheckpointError(f"{model_dir} already holds other config/weight files {others}; "
                              f"save into an empty folder so the loader finds one model")


def save_base_model(model: WanModel, model_dir, metadata: dict | None = None) -> Path:
    """Write config.json + diffusion_pytorch_model.safetensors, the format load_base_model reads."""
    model_dir = Path(model_dir)
    _check_save_folder(model_dir, WEIGHTS_NAME)
    tensors = {name: t.detach().cpu() for name, t in model.state_dict().items()}
    save_safetensors_atomic(tensors, model_dir / WEIGHTS_NAME, {"format": "pt", **(metadata or {})})
    write_json_atomic(model_dir / CONFIG_NAME, model.config.to_dict())
    return model_dir


def load_streaming_model(model_dir, config: WanConfig | None = None, device="cpu",
                         dtype: torch.dtype = torch.float32,
                         frames_per_block: int = FRAMES_PER_BLOCK) -> CausalWanModel:
    """Load a streaming model strictly: every tensor the config's model has, no other.

    config: the model's config (default: the folder's config JSON). The official scripts
    take it from their repository, not from the download (reference/ has those three);
    a causal student made from a base-model folder passes the base config with_window(...).
    Keys may be bare or all under `model.`; the file may be float32 or bf16.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"streaming-model folder {model_dir} does not exist: {STREAMING_HINT}")
    located = find_weight_files(model_dir, STREAMING_HINT)
    if config is None:
        config = WanConfig.from_json(find_config_file(model_dir, STREAMING_HINT))
    shapes = read_shapes(located, STREAMING_HINT)
    with torch.device("meta"):
        model = CausalWanModel(config, frames_per_block)
    # The layout most of the file's keys follow; the others are reported in it.
    prefix = STREAMING_KEY_PREFIX if 2 * sum(n.startswith(STREAMING_KEY_PREFIX) for n in shapes) > len(shapes) else ""
    in_file = {prefix + name: list(t.shape) for name, t in model.state_dict().items()}
    layout = f"keys under '{prefix}'" if prefix else "bare keys"
    check_checkpoint_fits(in_file, shapes, model_dir,
                          f" (read as {layout}; bare keys or all under '{STREAMING_KEY_PREFIX}' are accepted)")
    state = read_tensors(located, device, dtype, {n: n[len(prefix):] for n in shapes}, STREAMING_HINT)
    model.load_state_dict(state, strict=True, assign=True)
    return model


def save_streaming_model(model: CausalWanModel, model_dir, weights_name: str = STREAMING_WEIGHTS_NAME,
                         metadata: dict | None = None) -> Path:
    """Write config.json + one .safetensors in the official streaming layout (keys under
    `model.`, the parameters' dtype), which load_streaming_model reads like an official file."""
    model_dir = Path(model_dir)
    if not weights_name.endswith(".safetensors"):
        raise CheckpointError(f"weights_name must end in .safetensors, got {weights_name!r}")
    _check_save_folder(model_dir, weights_name)
    tensors = {STREAMING_KEY_PREFIX + name: t.detach().cpu() for name, t in model.state_dict().items()}
    save_safetensors_atomic(tensors, model_dir / weights_name, {"format": "pt", **(metadata or {})})
    write_json_atomic(model_dir / CONFIG_NAME, model.config.to_dict())
    return model_dir
