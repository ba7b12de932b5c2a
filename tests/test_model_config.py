import json

import pytest
import torch

from wan.config import ConfigError, WanConfig, base_config, tiny_config
from wan.model import WanModel, action_parameter_names


def read_manifest(path):
    rows = []
    for line in path.read_text().splitlines():
        name, shape = line.split("\t")
        rows.append((name, json.loads(shape)))
    return rows


@pytest.mark.parametrize("keyboard_dim", [4, 6])
def test_meta_state_dict_matches_reference_manifest(reference_dir, keyboard_dim):
    with torch.device("meta"):
        model = WanModel(base_config().with_keyboard_dim(keyboard_dim))
    expected = [
        (name, shape[:-1] + [keyboard_dim] if name.endswith("keyboard_embed.0.weight") else shape)
        for name, shape in read_manifest(reference_dir / "wan_base_model_keys.tsv")
    ]
    ours = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    assert ours == expected  # names, shapes and order
    assert len(ours) == 1399


def test_parameter_counts_of_the_real_config():
    with torch.device("meta"):
        model = WanModel(base_config())
    action = dict(model.named_parameters())
    assert sum(p.numel() for p in model.parameters()) == 1_824_405_824
    assert sum(action[n].numel() for n in action_parameter_names(model)) == 410_327_040


def test_base_config_round_trips_to_the_public_json(reference_dir):
    path = reference_dir / "matrix_game2_base_config.json"
    config = WanConfig.from_json(path)
    assert config.to_dict() == json.loads(path.read_text())
    assert WanConfig.from_dict(config.to_dict()) == config
    assert config.head_dim == 128 and config.action_config.window_frames == 12
    assert config.clip_dim == 1280 and "clip_dim" not in config.to_dict()


def test_with_keyboard_dim_changes_only_the_keyboard_width():
    config = base_config()
    wider = config.with_keyboard_dim(6)
    assert wider.action_config.keyboard_dim_in == 6
    assert wider.with_keyboard_dim(4) == config


def test_tiny_config_keeps_structure_and_round_trips():
    config = tiny_config(keyboard_dim=6, num_layers=3)
    base = base_config()
    action = config.action_config
    assert action.blocks == (0, 1, 2) and action.keyboard_dim_in == 6
    assert action.window_frames == base.action_config.window_frames
    assert action.rope_dim_list[0] == base.action_config.rope_dim_list[0]
    assert sum(action.rope_dim_list) == action.head_dim
    assert (config.in_dim, config.out_dim) == (base.in_dim, base.out_dim)
    d = config.to_dict()
    assert d["clip_dim"] == 32
    assert WanConfig.from_dict(json.loads(json.dumps(d))) == config


def _public_dict():
    return base_config().to_dict()


def test_unknown_fields_are_named():
    d = _public_dict()
    d["num_experts"] = 8
    with pytest.raises(ConfigError, match="num_experts"):
        WanConfig.from_dict(d)
    d = _public_dict()
    d["action_config"]["mouse_gain"] = 2
    with pytest.raises(ConfigError, match="action_config.*mouse_gain"):
        WanConfig.from_dict(d)


def test_missing_fields_are_named():
    d = _public_dict()
    del d["ffn_dim"]
    with pytest.raises(ConfigError, match="ffn_dim"):
        WanConfig.from_dict(d)
    d = _public_dict()
    del d["action_config"]["windows_size"]
    with pytest.raises(ConfigError, match="windows_size"):
        WanConfig.from_dict(d)
    d = _public_dict()
    del d["action_config"]
    with pytest.raises(ConfigError, match="action_config"):
        WanConfig.from_dict(d)


def test_streaming_fields_are_optional():
    d = _public_dict()
    for name in ("_class_name", "local_attn_size", "sink_size", "text_len"):
        del d[name]
    assert WanConfig.from_dict(d) == base_config()


@pytest.mark.parametrize("change, message", [
    (lambda d: d.update(dim="1536"), "dim must be a JSON int"),
    (lambda d: d["action_config"].update(enable_mouse=1), "enable_mouse must be a JSON bool"),
    (lambda d: d.update(num_heads=7), "divisible by num_heads"),
    (lambda d: d.update(in_dim=16), "in_dim must be 36"),
    (lambda d: d.update(model_type="t2v"), "model_type"),
    (lambda d: d["action_config"].update(rope_dim_list=[8, 24, 28]), "sums to 60"),
    (lambda d: d["action_config"].update(mouse_qk_dim_list=[16, 24, 24]), "mouse_qk_dim_list"),
    (lambda d: d["action_config"].update(blocks=[0, 1]), "every block"),
    (lambda d: d["action_config"].update(img_hidden_size=1024), "img_hidden_size"),
    (lambda d: d["action_config"].update(vae_time_compression_ratio=8), "time stride"),
])
def test_bad_values_are_clear_errors(change, message):
    d = _public_dict()
    change(d)
    with pytest.raises(ConfigError, match=message):
        WanConfig.from_dict(d, source="my_config.json")


def test_tiny_config_validates_its_arguments():
    with pytest.raises(ConfigError, match="three positive even"):
        tiny_config(action_head_dim=18)  # rope list [8, 5, 5]
    with pytest.raises(ConfigError, match="at least 6"):
        tiny_config(dim=8, num_heads=2)  # head dim 4 cannot hold three RoPE axes


def test_from_json_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        WanConfig.from_json(tmp_path / "nope.json")
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json is not valid JSON"):
        WanConfig.from_json(bad)
    bad.write_text(json.dumps({**_public_dict(), "dim": 0}))
    with pytest.raises(ConfigError, match=r"config.json: dim must be positive"):
        WanConfig.from_json(bad)
