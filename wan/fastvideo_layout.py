"""FastVideo's layout of Matrix-Game 2.0 checkpoints, both ways.

FastVideo (https://github.com/hao-ai-lab/FastVideo) loads Matrix-Game 2.0 from
Diffusers-style model folders (its FastVideo/Matrix-Game-2.0-*-Diffusers repositories).
The part that changes with training is the `transformer/` folder:

    transformer/config.json      FastVideo's field names (num_attention_heads,
                                 attention_head_dim, in_channels, ...), the official
                                 action_config, and _class_name: MatrixGame2WanModel (the
                                 bidirectional model) or CausalMatrixGame2WanModel (streaming)
    transformer/*.safetensors    the tensors under Diffusers' names for the Wan parts
                                 (attn1.to_q, ffn.net.0.proj, condition_embedder..., proj_out,
                                 scale_shift_table) and the official names for the action
                                 modules; one file or shards named by an index JSON

No tensor changes shape or content between the layouts: only names. The facts come from
FastVideo's public code (fastvideo/configs/models/dits/matrixgame2.py: the name mapping
its loader applies to a checkpoint's keys; fastvideo/models/dits/matrixgame2/model.py and
causal_model.py: the modules the names land in, and which blocks own action modules;
scripts/checkpoint_conversion/wan_to_diffusers.py: the official Wan names' Diffusers
counterparts; fastvideo/models/loader/component_loader.py: config.json's _class_name picks
the class, every *.safetensors of the folder is read, and the load is strict).

The patch embedding: FastVideo's loader accepts `patch_embedding.weight` and
`patch_embedding.proj.weight` alike, and its Matrix-Game config notes that its own
Matrix-Game checkpoints use the second; we write the second and read both.

Strict both ways: every tensor is renamed by a rule or refused, no two names meet, the
renamed set is exactly the model's (built on the meta device from the config), and every
shape is checked. export then import gives back every tensor bit for bit.
"""

from pathlib import Path

import torch

from wan.causal import CausalWanModel
from wan.config import FRAMES_PER_BLOCK, NO_LOCAL_WINDOW, ConfigError, WanConfig, read_config_json
from wan.files import save_safetensors_atomic, write_json_atomic
from wan.loading import (CONFIG_NAME, WEIGHTS_NAME, CheckpointError, check_checkpoint_fits, find_weight_files,
                         read_shapes, save_base_model, save_streaming_model)
from wan.model import WanModel
from wan.shapes import PATCH_SIZE

BASE_CLASS, STREAMING_CLASS = "MatrixGame2WanModel", "CausalMatrixGame2WanModel"
DIFFUSERS_VERSION = "0.35.0.dev0"        # the official configs' own; FastVideo's loader drops the field
TRANSFORMER_FOLDER = "transformer"       # a FastVideo model folder's component with the weights
QK_NORM = "rms_norm_across_heads"        # q/k RMSNorm over all heads at once (the official norm_q: [dim])
HINT = ("a FastVideo Matrix-Game 2.0 transformer folder holds config.json (with _class_name "
        f"{BASE_CLASS} or {STREAMING_CLASS}) and .safetensors weights in Diffusers' names: the transformer/ "
        "folder of e.g. https://huggingface.co/FastVideo/Matrix-Game-2.0-Base-Diffusers")

# Renames of whole module paths (a name's leading dotted parts): ours -> FastVideo's.
TOP_LEVEL = {
    "patch_embedding": "patch_embedding.proj",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.0": "condition_embedder.image_embedder.norm1",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "img_emb.proj.4": "condition_embedder.image_embedder.norm2",
    "head.head": "proj_out",
    "head.modulation": "scale_shift_table",
}
IN_BLOCK = {
    "modulation": "scale_shift_table",
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0", "self_attn.norm_q": "attn1.norm_q", "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.norm_q": "attn2.norm_q", "cross_attn.norm_k": "attn2.norm_k",
    "norm3": "norm2",                    # the cross-attention's input norm (the only block norm with weights)
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
    "action_model": "action_model",      # the action modules keep the official names
}
ACCEPTED_ALIASES = {"patch_embedding": "patch_embedding"}   # FastVideo's: the bare Diffusers name is read too


def _rename(name: str, table: dict, where: str) -> str:
    """name with its longest leading module path in table replaced; an error if none is."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        head = ".".join(parts[:cut])
        if head in table:
            return ".".join([table[head], *parts[cut:]])
    raise CheckpointError(f"{where}: tensor {name!r} has no counterpart in the other layout")


def _renamed(name: str, top: dict, block: dict, where: str) -> str:
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        return f"blocks.{parts[1]}." + _rename(".".join(parts[2:]), block, where)
    return _rename(name, top, where)


def fastvideo_name(name: str) -> str:
    """Our (the official) tensor name -> FastVideo's."""
    return _renamed(name, TOP_LEVEL, IN_BLOCK, "our checkpoint")


_TOP_BACK = {v: k for k, v in TOP_LEVEL.items()} | ACCEPTED_ALIASES
_BLOCK_BACK = {v: k for k, v in IN_BLOCK.items()}


def official_name(name: str) -> str:
    """FastVideo's tensor name -> ours (the official)."""
    return _renamed(name, _TOP_BACK, _BLOCK_BACK, "the FastVideo checkpoint")


def renamed_state(state: dict, rename, where: str) -> dict:
    """state with every name renamed; two names that meet are an error."""
    out, source = {}, {}
    for name, tensor in state.items():
        new = rename(name)
        if new in out:
            raise CheckpointError(f"{where}: {source[new]!r} and {name!r} both become {new!r}")
        out[new], source[new] = tensor, name
    return out


# -----------------------------------------------------------------------------
# config.json

def fastvideo_config(config: WanConfig, streaming: bool) -> dict:
    """Our config as FastVideo's transformer/config.json."""
    return {
        "_class_name": STREAMING_CLASS if streaming else BASE_CLASS, "_diffusers_version": DIFFUSERS_VERSION,
        "num_attention_heads": config.num_heads, "attention_head_dim": config.head_dim, "num_layers": config.num_layers,
        "in_channels": config.in_dim, "out_channels": config.out_dim, "ffn_dim": config.ffn_dim,
        "freq_dim": config.freq_dim, "eps": config.eps, "image_dim": config.clip_dim, "text_dim": 0,
        "patch_size": list(PATCH_SIZE), "qk_norm": QK_NORM, "cross_attn_norm": True, "added_kv_proj_dim": None,
        "local_attn_size": config.local_attn_size if streaming else NO_LOCAL_WINDOW,
        "sink_size": config.sink_size if streaming else 0, "num_frames_per_block": FRAMES_PER_BLOCK,
        "action_config": config.action_config.to_dict(),
    }


# What a FastVideo config must say for our modules to be the model it describes.
FIXED_FIELDS = {"patch_size": list(PATCH_SIZE), "qk_norm": QK_NORM, "cross_attn_norm": True,
                "added_kv_proj_dim": None, "num_frames_per_block": FRAMES_PER_BLOCK}
REQUIRED_FIELDS = ("_class_name", "num_attention_heads", "attention_head_dim", "num_layers", "in_channels",
                   "out_channels", "ffn_dim", "freq_dim", "eps", "image_dim", "action_config")


def config_from_fastvideo(d: dict, where: str, kind: str = "auto") -> tuple[WanConfig, bool]:
    """FastVideo's transformer/config.json -> (our config, streaming). kind: "auto" (the
    _class_name decides), "base" or "streaming"."""
    if not isinstance(d, dict):
        raise CheckpointError(f"{where}: not a JSON object; {HINT}")
    missing = [name for name in REQUIRED_FIELDS if name not in d]
    if missing:
        raise CheckpointError(f"{where}: missing {missing}: not a FastVideo Matrix-Game 2.0 transformer config; {HINT}")
    if d["_class_name"] not in (BASE_CLASS, STREAMING_CLASS, "MatrixGameWanModel", "CausalMatrixGameWanModel"):
        raise CheckpointError(f"{where}: _class_name {d['_class_name']!r} is not a Matrix-Game 2.0 model of "
                              f"FastVideo ({BASE_CLASS} or {STREAMING_CLASS})")
    wrong = [f"{name} is {d[name]!r}, expected {value!r}" for name, value in FIXED_FIELDS.items()
             if name in d and d[name] != value]
    if d.get("text_dim") not in (None, 0):
        wrong.append(f"text_dim is {d['text_dim']!r}, expected 0 (Matrix-Game 2.0 has no text)")
    if wrong:
        raise CheckpointError(f"{where}: a model our code does not build: " + "; ".join(wrong))
    streaming = d["_class_name"].startswith("Causal") if kind == "auto" else kind == "streaming"
    window = d.get("local_attn_size", NO_LOCAL_WINDOW)
    if streaming and window == NO_LOCAL_WINDOW:
        raise CheckpointError(f"{where}: read as a streaming model, but its local_attn_size is {NO_LOCAL_WINDOW} (no "
                              "window): import it as a base model (KIND=base), or set local_attn_size and sink_size "
                              "in the config to the window it was trained with (the official students: 6 and 0)")
    ours = {"action_config": d["action_config"], "dim": d["num_attention_heads"] * d["attention_head_dim"],
            "eps": d["eps"], "ffn_dim": d["ffn_dim"], "freq_dim": d["freq_dim"], "in_dim": d["in_channels"],
            "model_type": "i2v", "num_heads": d["num_attention_heads"], "num_layers": d["num_layers"],
            "out_dim": d["out_channels"], "clip_dim": d["image_dim"],
            "local_attn_size": window if streaming else NO_LOCAL_WINDOW,
            "sink_size": d.get("sink_size", 0) if streaming else 0}
    try:
        return WanConfig.from_dict(ours, where), streaming
    except ConfigError as error:
        raise CheckpointError(str(error)) from None  # it names the file already
    except TypeError as error:
        raise CheckpointError(f"{where}: {error}") from None


# -----------------------------------------------------------------------------
# The model folders

def build_meta(config: WanConfig, streaming: bool):
    with torch.device("meta"):
        return CausalWanModel(config) if streaming else WanModel(config)


def export_fastvideo(state: dict, config: WanConfig, streaming: bool, folder, metadata: dict | None = None) -> Path:
    """Write a model's state dict (our names, every tensor of the model config describes) as
    FastVideo's transformer folder: config.json + diffusion_pytorch_model.safetensors, the
    tensors as they are (their dtypes kept)."""
    folder = Path(folder)
    expected = {name: list(t.shape) for name, t in build_meta(config, streaming).state_dict().items()}
    check_checkpoint_fits(expected, {n: list(t.shape) for n, t in state.items()}, Path("the model to export"))
    renamed = renamed_state(state, fastvideo_name, "export")
    others = sorted(p.name for p in folder.iterdir() if p.name not in (CONFIG_NAME, WEIGHTS_NAME)
                    and (".safetensors" in p.name or p.suffix == ".json")) if folder.is_dir() else []
    if others:
        raise CheckpointError(f"{folder} already holds other weight or config files {others}; export into an "
                              "empty folder (FastVideo reads every .safetensors of the folder)")
    save_safetensors_atomic(renamed, folder / WEIGHTS_NAME, {"format": "pt", **(metadata or {})})
    write_json_atomic(folder / CONFIG_NAME, fastvideo_config(config, streaming))
    return folder


def transformer_folder(path) -> Path:
    """A FastVideo transformer folder, given itself or the model folder around it."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such folder; {HINT}")
    if not (path / CONFIG_NAME).is_file() and (path / TRANSFORMER_FOLDER / CONFIG_NAME).is_file():
        return path / TRANSFORMER_FOLDER
    return path


def read_fastvideo(path, kind: str = "auto") -> tuple[dict, WanConfig, bool, dict]:
    """A FastVideo transformer folder -> (state dict in our names, config, streaming, the
    files' metadata), every tensor as stored (its dtype kept), after checking every name and
    shape against the model its config describes."""
    folder = transformer_folder(path)
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise CheckpointError(f"{config_path} does not exist; {HINT}")
    config, streaming = config_from_fastvideo(read_config_json(config_path), str(config_path), kind)
    located = find_weight_files(folder, HINT)
    names = {name: official_name(name) for name in located}
    shapes = renamed_state(read_shapes(located, HINT), official_name, str(folder))
    expected = {name: list(t.shape) for name, t in build_meta(config, streaming).state_dict().items()}
    check_checkpoint_fits(expected, shapes, folder, f" ({config.num_layers} blocks, keyboard width "
                          f"{config.action_config.keyboard_dim_in}; names read in FastVideo's layout)")
    from safetensors import safe_open

    state, metadata = {}, {}
    for file in sorted(set(located.values())):
        with safe_open(file, framework="pt") as f:
            metadata.update({k: v for k, v in (f.metadata() or {}).items() if k != "format"})
            for name in f.keys():
                if located[name] == file:
                    state[names[name]] = f.get_tensor(name)
    return state, config, streaming, metadata


def save_ours(state: dict, config: WanConfig, streaming: bool, folder, metadata: dict | None = None) -> Path:
    """An imported state dict as our model folder: a base-model folder (BASE_MODEL_DIR) or a
    streaming model folder (play_world.py's MODEL_DIR, a distillation's STUDENT_DIR)."""
    model = build_meta(config, streaming)
    model.load_state_dict(state, strict=True, assign=True)  # the tensors as they are, dtypes kept
    if streaming:
        return save_streaming_model(model, folder, metadata=metadata)
    return save_base_model(model, folder, metadata=metadata)
