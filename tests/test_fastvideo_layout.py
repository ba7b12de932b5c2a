"""FastVideo's layout (wan/fastvideo_layout.py): the official manifests map onto FastVideo's
names one to one, shapes kept; a tiny model taken there and back is the same to the bit
(base and streaming, float32 and bf16 tensors); every stray, missing or mis-shaped tensor
is refused by name; the front door (convert_fastvideo.py) exports and imports."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import convert_fastvideo as cf
from model_helpers import tiny_causal_model, tiny_model
from test_model_config import read_manifest
from wan.config import base_config, distilled_config
from wan.fastvideo_layout import (BASE_CLASS, STREAMING_CLASS, build_meta, config_from_fastvideo, export_fastvideo,
                                  fastvideo_config, fastvideo_name, official_name, read_fastvideo, save_ours)
from wan.loading import WEIGHTS_NAME, CheckpointError, load_base_model, load_streaming_model

# FastVideo's names of one block's Wan tensors and of the tensors outside the blocks, as its
# Matrix-Game 2.0 loader reads them (fastvideo/configs/models/dits/matrixgame2.py and the
# modules of fastvideo/models/dits/matrixgame2/): the facts the mapping must meet.
FASTVIDEO_BLOCK = {
    "scale_shift_table", "norm2.weight", "norm2.bias",
    *(f"attn{a}.to_{p}.{w}" for a in (1, 2) for p in "qkv" for w in ("weight", "bias")),
    *(f"attn{a}.to_out.0.{w}" for a in (1, 2) for w in ("weight", "bias")),
    *(f"attn{a}.norm_{p}.weight" for a in (1, 2) for p in "qk"),
    *(f"ffn.net.{i}.{w}" for i in ("0.proj", "2") for w in ("weight", "bias")),
}
FASTVIDEO_TOP = {
    "patch_embedding.proj.weight", "patch_embedding.proj.bias", "proj_out.weight", "proj_out.bias",
    "scale_shift_table",
    *(f"condition_embedder.time_embedder.linear_{i}.{w}" for i in (1, 2) for w in ("weight", "bias")),
    *(f"condition_embedder.time_proj.{w}" for w in ("weight", "bias")),
    *(f"condition_embedder.image_embedder.{part}.{w}" for part in ("norm1", "ff.net.0.proj", "ff.net.2", "norm2")
      for w in ("weight", "bias")),
}


@pytest.mark.parametrize("manifest", ["wan_base_model_keys", "mg2_distilled_universal_keys",
                                      "mg2_distilled_gta_drive_keys", "mg2_distilled_templerun_keys"])
def test_the_official_manifests_map_one_to_one_onto_fastvideo_names(reference_dir, manifest):
    rows = read_manifest(reference_dir / f"{manifest}.tsv")
    theirs = [fastvideo_name(name) for name, _ in rows]
    assert len(set(theirs)) == len(rows)
    assert [official_name(name) for name in theirs] == [name for name, _ in rows]  # and back
    top = {n for n in theirs if not n.startswith("blocks.")}
    assert top == FASTVIDEO_TOP
    blocks = {int(n.split(".")[1]) for n in theirs if n.startswith("blocks.")}
    for block in blocks:
        own = {n.split(".", 2)[2] for n in theirs if n.startswith(f"blocks.{block}.")}
        assert {n for n in own if not n.startswith("action_model.")} == FASTVIDEO_BLOCK
    # the action modules keep the official names
    assert {n for n in theirs if ".action_model." in n} == {n for n, _ in rows if ".action_model." in n}


@pytest.mark.parametrize("streaming,config", [(False, base_config())] + [
    (True, distilled_config(mode)) for mode in ("universal", "gta_drive", "templerun")])
def test_the_real_configs_go_there_and_back_and_build_the_manifests_shapes(reference_dir, streaming, config):
    written = fastvideo_config(config, streaming)
    assert written["_class_name"] == (STREAMING_CLASS if streaming else BASE_CLASS)
    assert (written["num_attention_heads"], written["attention_head_dim"], written["in_channels"]) == (12, 128, 36)
    back, is_streaming = config_from_fastvideo(json.loads(json.dumps(written)), "config.json")
    assert back == config and is_streaming == streaming
    # the model FastVideo's config describes, built on the meta device: every renamed tensor, same shapes
    manifest = "wan_base_model_keys" if not streaming else {
        4: "mg2_distilled_universal_keys", 2: "mg2_distilled_gta_drive_keys",
        7: "mg2_distilled_templerun_keys"}[config.action_config.keyboard_dim_in]
    model = build_meta(back, is_streaming)
    ours = [(name, list(t.shape)) for name, t in model.state_dict().items()]
    assert ours == read_manifest(reference_dir / f"{manifest}.tsv")


def assert_same_bits(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_a_base_model_goes_there_and_back_to_the_bit(tmp_path):
    model = tiny_model(seed=3)
    state = {name: t.detach().clone() for name, t in model.state_dict().items()}
    state["blocks.0.ffn.0.weight"] = state["blocks.0.ffn.0.weight"].bfloat16()  # dtypes are kept too
    export_fastvideo(state, model.config, False, tmp_path / "transformer", {"keyboard_keys": "W,S,A,D"})
    with safe_open(tmp_path / "transformer" / WEIGHTS_NAME, "pt") as f:
        names = set(f.keys())
        assert f.metadata()["keyboard_keys"] == "W,S,A,D"
    assert "blocks.0.attn1.to_q.weight" in names and "patch_embedding.proj.weight" in names
    assert json.loads((tmp_path / "transformer" / "config.json").read_text())["_class_name"] == BASE_CLASS

    back, config, streaming, metadata = read_fastvideo(tmp_path)  # the model folder around transformer/ works too
    assert config == model.config and not streaming and metadata["keyboard_keys"] == "W,S,A,D"
    assert_same_bits(back, state)
    save_ours(back, config, streaming, tmp_path / "ours")
    loaded, _ = load_base_model(tmp_path / "ours")
    assert all(torch.equal(t, loaded.state_dict()[n].to(t.dtype)) for n, t in state.items())

    # FastVideo's files -> ours -> FastVideo's: the same file contents
    export_fastvideo(back, config, False, tmp_path / "again")
    assert_same_bits(load_file(tmp_path / "again" / WEIGHTS_NAME), load_file(tmp_path / "transformer" / WEIGHTS_NAME))


def test_a_streaming_student_goes_there_and_back_to_the_bit(tmp_path):
    model = tiny_causal_model(seed=4, local_attn_size=6, sink_size=1, action_blocks=(1,))
    state = dict(model.state_dict())
    export_fastvideo(state, model.config, True, tmp_path / "transformer")
    config = json.loads((tmp_path / "transformer" / "config.json").read_text())
    assert (config["_class_name"], config["local_attn_size"], config["sink_size"]) == (STREAMING_CLASS, 6, 1)
    back, read_config, streaming, _ = read_fastvideo(tmp_path / "transformer")
    assert streaming and read_config == model.config
    assert_same_bits(back, state)
    save_ours(back, read_config, streaming, tmp_path / "student")
    loaded = load_streaming_model(tmp_path / "student")
    assert_same_bits(dict(loaded.state_dict()), state)
    # read as a bidirectional model, whose class builds action modules in every block: refused
    with pytest.raises(CheckpointError, match=r"config.json: action_config: blocks must list every block 0..1"):
        read_fastvideo(tmp_path / "transformer", kind="base")


@pytest.fixture
def exported(tmp_path):
    model = tiny_model(seed=5)
    folder = export_fastvideo(dict(model.state_dict()), model.config, False, tmp_path / "transformer")
    return folder


def rewrite(folder, change):
    tensors = load_file(folder / WEIGHTS_NAME)
    change(tensors)
    save_file(tensors, folder / WEIGHTS_NAME)


@pytest.mark.parametrize("change,message", [
    (lambda t: t.update(extra=torch.zeros(1)), "tensor 'extra' has no counterpart"),
    (lambda t: t.update({"blocks.0.attn1.to_q.lora_A": torch.zeros(1)}), "unexpected: blocks.0.self_attn.q.lora_A"),
    (lambda t: t.pop("blocks.1.attn2.to_out.0.bias"), "missing: blocks.1.cross_attn.o.bias"),
    (lambda t: t.update({"proj_out.bias": torch.zeros(3)}), r"wrong shape: head.head.bias \(expected \[64\], found \[3\]"),
    (lambda t: t.update({"patch_embedding.weight": t["patch_embedding.proj.weight"].clone()}),
     "'patch_embedding.proj.weight' and 'patch_embedding.weight' both become 'patch_embedding.weight'"),
])
def test_every_stray_missing_or_misshaped_tensor_is_refused_by_name(exported, change, message):
    rewrite(exported, change)
    with pytest.raises(CheckpointError, match=message):
        read_fastvideo(exported)


def test_the_bare_diffusers_patch_embedding_name_is_read_too(exported):
    def bare(tensors):
        tensors["patch_embedding.weight"] = tensors.pop("patch_embedding.proj.weight")
        tensors["patch_embedding.bias"] = tensors.pop("patch_embedding.proj.bias")

    before = load_file(exported / WEIGHTS_NAME)["patch_embedding.proj.weight"]
    rewrite(exported, bare)
    state, _, _, _ = read_fastvideo(exported)
    assert torch.equal(state["patch_embedding.weight"], before)


@pytest.mark.parametrize("field,value,message", [
    ("_class_name", "WanTransformer3DModel", "not a Matrix-Game 2.0 model of FastVideo"),
    ("qk_norm", "rms_norm", "qk_norm is 'rms_norm', expected 'rms_norm_across_heads'"),
    ("text_dim", 4096, "text_dim is 4096, expected 0"),
    ("num_frames_per_block", 4, "num_frames_per_block is 4, expected 3"),
])
def test_a_config_our_code_cannot_build_is_refused(exported, field, value, message):
    path = exported / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(CheckpointError, match=message):
        read_fastvideo(exported)


def test_the_script_exports_a_fine_tuned_model_and_imports_it_back(tiny_assets, tmp_path, capsys):
    out, back = tmp_path / "fv" / "transformer", tmp_path / "back"
    assert cf.main([f"--BASE_MODEL_DIR={tiny_assets['BASE_MODEL_DIR']}", "--CHECKPOINT=",
                    f"--FASTVIDEO_DIR={out}"]) == 0
    assert "MatrixGame2WanModel (bidirectional)" in capsys.readouterr().out
    assert cf.main(["--DIRECTION=import", f"--FASTVIDEO_DIR={tmp_path / 'fv'}", f"--OUTPUT_DIR={back}"]) == 0
    assert f"use it as BASE_MODEL_DIR={back}" in capsys.readouterr().out
    original, _ = load_base_model(tiny_assets["BASE_MODEL_DIR"])
    loaded, _ = load_base_model(back)
    assert_same_bits(dict(original.state_dict()), dict(loaded.state_dict()))
    # a second export into the same folder replaces it; a folder holding other weights is refused
    (out / "model.safetensors").write_bytes(b"x")
    assert cf.main([f"--BASE_MODEL_DIR={tiny_assets['BASE_MODEL_DIR']}", "--CHECKPOINT=",
                    f"--FASTVIDEO_DIR={out}"]) == 1
    assert "already holds other weight or config files ['model.safetensors']" in capsys.readouterr().err
