import json
import math

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from model_helpers import tiny_model
from wan.loading import CheckpointError, load_base_model, save_base_model
from wan.model import random_inputs

WEIGHTS = "diffusion_pytorch_model.safetensors"


@pytest.fixture
def saved(tmp_path):
    model = tiny_model(seed=0)
    folder = save_base_model(model, tmp_path / "base_model", metadata={"note": "test"})
    return model, folder


def _rewrite(folder, change):
    tensors = load_file(folder / WEIGHTS)
    change(tensors)
    save_file(tensors, folder / WEIGHTS)


def test_save_load_round_trip(saved):
    model, folder = saved
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", WEIGHTS]
    with safe_open(folder / WEIGHTS, framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "test"}
    loaded, reinitialised = load_base_model(folder)
    assert reinitialised == []
    assert loaded.config == model.config
    assert json.loads((folder / "config.json").read_text()) == model.config.to_dict()
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    assert all(p.requires_grad and p.device.type == "cpu" for p in loaded.parameters())
    inputs = random_inputs(model.config, 1, 2, 4, 4)
    with torch.no_grad():
        # separately allocated tensors may be aligned differently and take other CPU kernels:
        # equal weights, outputs equal to rounding
        assert torch.allclose(loaded(**inputs), model(**inputs), atol=1e-6, rtol=1e-5)


def test_load_converts_to_the_requested_dtype(saved):
    model, folder = saved
    loaded, _ = load_base_model(folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert torch.equal(loaded.head.head.weight, model.head.head.weight.bfloat16())


def test_other_keyboard_width_reinitialises_exactly_the_keyboard_input_weights(saved):
    model, folder = saved
    loaded, reinitialised = load_base_model(folder, keyboard_dim=6)
    num_layers = model.config.num_layers
    assert reinitialised == [f"blocks.{i}.action_model.keyboard_embed.0.weight" for i in range(num_layers)]
    assert loaded.config.action_config.keyboard_dim_in == 6
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        if name in reinitialised:
            hidden = model.config.action_config.hidden_size
            assert tensor.shape == (hidden, 6)
            bound = math.sqrt(6 / (hidden + 6))  # xavier-uniform
            assert 0 < tensor.abs().max() <= bound
        else:
            assert torch.equal(tensor, original[name]), name
    inputs = random_inputs(loaded.config, 1, 2, 4, 4)
    with torch.no_grad():
        assert torch.isfinite(loaded(**inputs)).all()


def test_keyboard_width_comes_from_the_file_not_the_config(tmp_path):
    model = tiny_model(seed=1, keyboard_dim=6)
    folder = save_base_model(model, tmp_path / "m")
    config = json.loads((folder / "config.json").read_text())
    config["action_config"]["keyboard_dim_in"] = 4  # as in the public config
    (folder / "config.json").write_text(json.dumps(config))
    loaded, reinitialised = load_base_model(folder)
    assert reinitialised == [] and loaded.config.action_config.keyboard_dim_in == 6
    assert load_base_model(folder, keyboard_dim=6)[1] == []


def test_missing_tensor_is_named(saved):
    _, folder = saved
    _rewrite(folder, lambda t: t.pop("blocks.1.cross_attn.norm_k.weight"))
    with pytest.raises(CheckpointError, match=r"missing: blocks\.1\.cross_attn\.norm_k\.weight \(expected \[32\]\)"):
        load_base_model(folder)


def test_misshaped_and_unexpected_tensors_are_all_listed(saved):
    _, folder = saved

    def change(tensors):
        tensors["blocks.0.ffn.0.weight"] = torch.zeros(65, 32)
        tensors["head.head.bias"] = torch.zeros(3)
        tensors["text_embedding.0.weight"] = torch.zeros(2, 2)

    _rewrite(folder, change)
    with pytest.raises(CheckpointError) as info:
        load_base_model(folder, keyboard_dim=6)  # re-init does not hide other problems
    message = str(info.value)
    assert "3 problem(s)" in message
    assert "wrong shape: blocks.0.ffn.0.weight (expected [64, 32], found [65, 32])" in message
    assert "wrong shape: head.head.bias (expected [64], found [3])" in message
    assert "unexpected: text_embedding.0.weight (found [2, 2])" in message


def test_misshaped_keyboard_weight_is_not_hidden_by_reinit(saved):
    _, folder = saved
    _rewrite(folder, lambda t: t.update({"blocks.0.action_model.keyboard_embed.0.weight": torch.zeros(7, 4)}))
    with pytest.raises(CheckpointError, match=r"keyboard_embed\.0\.weight \(expected \[16, 4\], found \[7, 4\]\)"):
        load_base_model(folder, keyboard_dim=6)


def test_folder_without_weights_says_where_to_get_them(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    for folder in (tmp_path, tmp_path / "absent"):
        with pytest.raises(CheckpointError, match="Skywork/Matrix-Game-2.0") as info:
            load_base_model(folder)
        assert str(folder) in str(info.value)


def test_sharded_checkpoint_with_index(saved, tmp_path):
    model, folder = saved
    tensors = load_file(folder / WEIGHTS)
    names = list(tensors)
    shards = {"model-00001-of-00002.safetensors": names[:40], "model-00002-of-00002.safetensors": names[40:]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    (sharded / "config.json").write_text((folder / "config.json").read_text())
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, sharded / file)
    index = {"metadata": {}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (sharded / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
    loaded, reinitialised = load_base_model(sharded)
    assert reinitialised == []
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    index["weight_map"][names[0]] = "model-00009-of-00009.safetensors"
    (sharded / f"{WEIGHTS}.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="model-00009-of-00009.safetensors"):
        load_base_model(sharded)


def test_tensor_in_two_unindexed_files_is_an_error(saved):
    _, folder = saved
    save_file({"head.head.bias": torch.zeros(64)}, folder / "extra.safetensors")
    with pytest.raises(CheckpointError, match="head.head.bias is in both"):
        load_base_model(folder)


def test_save_refuses_a_folder_with_another_model(saved):
    model, folder = saved
    save_base_model(model, folder)  # overwriting its own files is fine
    (folder / "other_config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="other_config.json"):
        save_base_model(model, folder)


def test_truncated_weights_file_is_an_error_naming_it(tmp_path):
    from wan.loading import CheckpointError, load_base_model, save_base_model
    from model_helpers import tiny_model
    folder = save_base_model(tiny_model(), tmp_path / "model")
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model.safetensors: not a readable .safetensors"):
        load_base_model(folder)
