"""The streaming students' configs and checkpoints: meta builds against the official key
manifests, strict loading of both key layouts, and our saver's files loading like official ones."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model_helpers import tiny_causal_model
from test_model_config import read_manifest
from wan.causal import CausalWanModel
from wan.config import DISTILLED_CONFIG_PATHS, ConfigError, WanConfig, distilled_config, tiny_config
from wan.loading import (STREAMING_WEIGHTS_NAME, CheckpointError, load_streaming_model, save_base_model,
                         save_streaming_model)
from wan.model import WanModel, random_inputs

# tensors, parameters (STREAMING_SPEC 9)
MANIFEST_TOTALS = {
    "universal": (1114, 1_619_242_304),
    "gta_drive": (1114, 1_619_238_464),
    "templerun": (964, 1_508_715_584),
}


@pytest.mark.parametrize("mode", sorted(MANIFEST_TOTALS))
def test_meta_build_of_each_student_matches_its_manifest(reference_dir, mode):
    with torch.device("meta"):
        model = CausalWanModel(distilled_config(mode))
    ours = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    assert ours == read_manifest(reference_dir / f"mg2_distilled_{mode}_keys.tsv")  # names, shapes, order
    tensors, parameters = MANIFEST_TOTALS[mode]
    assert len(ours) == tensors
    assert sum(p.numel() for p in model.parameters()) == parameters


@pytest.mark.parametrize("mode", sorted(MANIFEST_TOTALS))
def test_student_configs_read_and_round_trip(mode):
    path = DISTILLED_CONFIG_PATHS[mode]
    config = distilled_config(mode)
    assert config.to_dict() == json.loads(path.read_text())
    assert config.action_config.blocks == tuple(range(15))
    expected = {"universal": (6, 4, True), "gta_drive": (4, 2, True), "templerun": (6, 7, False)}[mode]
    action = config.action_config
    assert (config.local_attn_size, action.keyboard_dim_in, action.enable_mouse) == expected
    assert config.sink_size == 0 and config.windowed


def test_streaming_config_errors_are_clear():
    d = distilled_config("universal").to_dict()
    with pytest.raises(ConfigError, match="sink_size must be >= 0 and below local_attn_size"):
        WanConfig.from_dict(dict(d, sink_size=6))
    with pytest.raises(ConfigError, match="local_attn_size must be a number of latent frames"):
        WanConfig.from_dict(dict(d, local_attn_size=0))
    with pytest.raises(ConfigError, match="only a streaming config"):
        WanConfig.from_dict(dict(d, local_attn_size=-1))
    with pytest.raises(ConfigError, match=r"increasing block indices in 0..29, got \[0, 30\]"):
        WanConfig.from_dict(dict(d, action_config=dict(d["action_config"], blocks=[0, 30])))
    no_mouse = distilled_config("templerun").to_dict()
    with pytest.raises(ConfigError, match=r"enable_mouse is true but \['mouse_dim_in'"):
        WanConfig.from_dict(dict(no_mouse, action_config=dict(no_mouse["action_config"], enable_mouse=True)))
    with pytest.raises(ValueError, match="unknown streaming model 'zelda'"):
        distilled_config("zelda")


@pytest.fixture
def saved(tmp_path):
    model = tiny_causal_model(seed=0, local_attn_size=4, keyboard_dim=7, enable_mouse=False)
    return model, save_streaming_model(model, tmp_path / "student", metadata={"step": "10"})


def _outputs(model, config):
    inputs = random_inputs(config, 1, 3, 4, 6, seed=1)
    with torch.no_grad():
        return model(**dict(inputs, t=torch.full((1, 3), 500.0)))


def test_saved_in_the_official_layout_and_loaded_back_strictly(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", STREAMING_WEIGHTS_NAME]
    with safe_open(folder / STREAMING_WEIGHTS_NAME, framework="pt") as f:
        keys = list(f.keys())
        assert f.metadata() == {"format": "pt", "step": "10"}
    assert keys and all(k.startswith("model.") for k in keys)
    assert sorted(k[len("model."):] for k in keys) == sorted(model.state_dict())
    loaded = load_streaming_model(folder)
    assert isinstance(loaded, CausalWanModel) and loaded.config == model.config
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    assert torch.allclose(_outputs(loaded, model.config), _outputs(model, model.config), atol=1e-6, rtol=1e-5)


def test_bare_keys_and_bf16_files_load(saved, tmp_path):
    model, folder = saved
    tensors = load_file(folder / STREAMING_WEIGHTS_NAME)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "config.json").write_text((folder / "config.json").read_text())
    save_file({k[len("model."):]: v.bfloat16() for k, v in tensors.items()}, bare / "student_bf16.safetensors")
    loaded = load_streaming_model(bare)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert torch.equal(loaded.head.head.weight, model.head.head.weight.bfloat16().float())
    assert load_streaming_model(bare, dtype=torch.bfloat16).head.head.weight.dtype == torch.bfloat16


def test_a_file_that_fits_neither_layout_gets_one_message(saved):
    model, folder = saved
    tensors = load_file(folder / STREAMING_WEIGHTS_NAME)
    tensors.pop("model.blocks.0.action_model.proj_keyboard.weight")
    tensors["model.blocks.1.action_model.proj_keyboard.weight"] = torch.zeros(32, 32)  # block 1 owns none
    tensors["blocks.0.ffn.0.bias"] = tensors.pop("model.blocks.0.ffn.0.bias")  # one bare key
    tensors["model.head.head.bias"] = torch.zeros(3)
    save_file(tensors, folder / STREAMING_WEIGHTS_NAME)
    with pytest.raises(CheckpointError) as info:
        load_streaming_model(folder)
    message = str(info.value)
    assert "read as keys under 'model.'" in message and "5 problem(s)" in message
    assert "missing: model.blocks.0.action_model.proj_keyboard.weight (expected [32, 32])" in message
    assert "missing: model.blocks.0.ffn.0.bias" in message
    assert "unexpected: blocks.0.ffn.0.bias (found [64])" in message
    assert "unexpected: model.blocks.1.action_model.proj_keyboard.weight" in message
    assert "wrong shape: model.head.head.bias (expected [64], found [3])" in message


def test_the_config_argument_overrides_the_folder_and_base_folders_load_as_students(tmp_path):
    torch.manual_seed(2)
    base = WanModel(tiny_config())
    folder = save_base_model(base, tmp_path / "base")
    student = load_streaming_model(folder, config=base.config.with_window(6))
    assert student.config.local_attn_size == 6 and len(student.state_dict()) == len(base.state_dict())
    with pytest.raises(CheckpointError, match=r"blocks\.1\.action_model.* \(found"):
        load_streaming_model(folder, config=tiny_config(local_attn_size=6, action_blocks=(0,)))


def test_missing_folder_and_other_files_are_clear_errors(saved, tmp_path):
    model, folder = saved
    with pytest.raises(CheckpointError, match="does not exist.*base_distilled_model"):
        load_streaming_model(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model weights"):
        load_streaming_model(tmp_path / "empty", config=model.config)
    save_streaming_model(model, folder)  # its own files are fine to overwrite
    with pytest.raises(CheckpointError, match="already holds other"):
        save_streaming_model(model, folder, weights_name="other.safetensors")
