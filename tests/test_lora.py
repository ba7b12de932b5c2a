"""LoRA: adapters that leave the model unchanged at the start, train with the action
modules, merge into a plain model, and a whole lora run: files, resume, merge, preview."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import finetune_base_model as fb
import generate_preview as gp
from generation import finetuned
from model_helpers import tiny_model
from runs.errors import TrainingError
from training.flow_matching import prepare_trainable
from wan.config import WanConfig
from wan.loading import CheckpointError
from wan.fingerprint import FINGERPRINT_KEY, model_fingerprint
from wan.lora import LoRAConfig, LoRALinear, add_lora, is_adapter_name, merge_lora
from wan.model import WanModel, random_inputs

LORA = LoRAConfig(rank=4, alpha=8.0, targets=("self_attn", "cross_attn", "ffn"))
KEYS = ("W", "S", "A", "D")


def randomise_adapters_(model, seed: int = 0) -> None:
    """Give the up-projections values, as training would (they start at zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_up.weight.copy_(torch.randn(module.lora_up.weight.shape, generator=g) * 0.1)


def test_targets_name_groups_or_layers_and_bad_ones_are_refused():
    assert LORA.layers() == ("self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q",
                             "cross_attn.k", "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2")
    assert LoRAConfig(8, 8.0, ("ffn.2", "self_attn.q")).layers() == ("self_attn.q", "ffn.2")
    with pytest.raises(ValueError, match="choose from the groups self_attn, cross_attn, ffn"):
        LoRAConfig(8, 8.0, ("mlp",)).check()
    round_trip = LoRAConfig.from_metadata(LORA.metadata(), "file")
    assert round_trip.layers() == LORA.layers() and round_trip.scale == LORA.scale
    with pytest.raises(ValueError, match="file: its LoRA metadata"):
        LoRAConfig.from_metadata({"lora_rank": "four"}, "file")


def test_adapters_leave_the_output_unchanged_until_they_train():
    model = tiny_model(seed=1)
    inputs = random_inputs(model.config, 1, 2, 4, 4, seed=2)
    with torch.no_grad():
        before = model(**inputs)
    names = add_lora(model, LORA)
    assert len(names) == 2 * len(LORA.layers()) * len(model.blocks)
    with torch.no_grad():
        after = model(**inputs)
    assert torch.allclose(before, after, atol=1e-6, rtol=0)
    state = model.state_dict()  # the official names stay: the base checkpoint still loads
    assert "blocks.0.self_attn.q.weight" in state and "blocks.0.self_attn.q.lora_down.weight" in state
    randomise_adapters_(model)
    with torch.no_grad():
        assert not torch.allclose(before, model(**inputs), atol=1e-4)


def test_adapters_depend_on_the_seed_alone():
    def adapters(seed):
        model = tiny_model(seed=1)
        torch.randn(int(torch.randint(1, 100, ())))  # whatever ran before must not matter
        add_lora(model, LORA, seed)
        return {n: p.clone() for n, p in model.named_parameters() if is_adapter_name(n)}

    first, again, other = adapters(5), adapters(5), adapters(6)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first["blocks.0.ffn.0.lora_down.weight"], other["blocks.0.ffn.0.lora_down.weight"])


def test_lora_trains_the_adapters_and_the_action_modules_only():
    model = tiny_model(seed=3)
    trainable = prepare_trainable(model, "lora", 0, LORA)
    assert all(is_adapter_name(n) or ".action_model." in n for n in trainable)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == set(trainable)
    assert all(p.dtype == torch.float32 for p in trainable.values())
    model(**random_inputs(model.config, 1, 2, 4, 4, seed=4)).square().mean().backward()
    ups = [p.grad for n, p in trainable.items() if ".lora_up." in n]
    assert ups and all(g is not None and g.abs().max() > 0 for g in ups)  # B's gradient is A x: not zero
    with_head = prepare_trainable(tiny_model(seed=3), "lora", 0, LORA, lora_head=True)
    assert set(with_head) - set(trainable) == {"head.modulation", "head.head.weight", "head.head.bias"}


def test_merged_model_computes_what_the_adapters_compute():
    model = tiny_model(seed=5)
    add_lora(model, LORA)
    randomise_adapters_(model, seed=6)
    inputs = random_inputs(model.config, 1, 2, 4, 4, seed=7)
    with torch.no_grad():
        adapted = model(**inputs)
        merged = merge_lora(model)
        assert not any(isinstance(m, LoRALinear) for m in merged.modules())
        assert set(merged.state_dict()) == set(WanModel(model.config).state_dict())
        assert torch.allclose(merged(**inputs), adapted, atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- a whole lora run

@pytest.fixture(scope="module")
def lora_run(tiny_assets, tmp_path_factory):
    s = dict(tiny_assets, CHECKPOINT_DIR=str(tmp_path_factory.mktemp("lora") / "checkpoints"), NUM_EPOCHS=2,
             BATCH_SIZE=2, GRAD_ACCUM_STEPS=1, NUM_WORKERS=0, SAVE_EVERY_EPOCHS=1, PREVIEW_EVERY_EPOCHS=0,
             TRAINING_STRATEGY="lora", LORA_RANK=4, LORA_ALPHA=8.0, LEARNING_RATE=1e-3, WARMUP_STEPS=1,
             EMA_DECAY=0.5, SAVE_EVERY_STEPS=2)
    fb.check_settings(s)
    fb.train(s)
    return s


def test_a_lora_run_writes_small_files_of_adapters_and_action_modules(lora_run):
    out = Path(lora_run["CHECKPOINT_DIR"])
    final = load_file(out / fb.FINAL_FILE)
    assert set(final) == set(load_file(out / "base_finetuned_epoch2.safetensors"))
    assert any(is_adapter_name(n) for n in final) and all(is_adapter_name(n) or ".action_model." in n for n in final)
    with safe_open(out / fb.FINAL_FILE, "pt") as f:
        meta = f.metadata()
    assert meta["contents"] == finetuned.LORA_CONTENTS and meta["strategy"] == "lora" and meta["weights"] == "ema"
    assert (meta["lora_rank"], float(meta["lora_alpha"])) == ("4", 8.0)
    assert meta[FINGERPRINT_KEY] == model_fingerprint(lora_run["BASE_MODEL_DIR"])  # the base it was trained over
    assert "4-rank LoRA on self_attn.q" in (out / fb.INFO_FILE).read_text()


def test_merge_writes_a_full_state_dict_with_the_adapters_output(lora_run, tiny_assets):
    assert fb.main(["--merge", f"--BASE_MODEL_DIR={lora_run['BASE_MODEL_DIR']}",
                    f"--CHECKPOINT_DIR={lora_run['CHECKPOINT_DIR']}"]) == 0
    out = Path(lora_run["CHECKPOINT_DIR"])
    config = WanConfig.from_json(Path(lora_run["BASE_MODEL_DIR"]) / "config.json")
    merged = WanModel(config)
    merged.load_state_dict(load_file(out / finetuned.MERGED_FILE), strict=True)  # like the official file

    # the model the adapters make: base + adapters + the trained tensors, not merged
    adapted, _ = finetuned.load_base_model(lora_run["BASE_MODEL_DIR"])
    add_lora(adapted, LoRAConfig.from_metadata(safe_open(out / fb.FINAL_FILE, "pt").metadata(), "final"))
    adapted.load_state_dict(load_file(out / fb.FINAL_FILE), strict=False)
    inputs = random_inputs(config, 1, 3, 4, 8, seed=8)
    with torch.no_grad():
        expected = adapted.eval()(**inputs)
        assert torch.allclose(merged.eval()(**inputs), expected, atol=1e-5, rtol=1e-5)
        loaded = finetuned.load_model(lora_run["BASE_MODEL_DIR"], out / fb.FINAL_FILE, KEYS, "cpu", torch.float32)
        assert "LoRA rank 4" in loaded.description
        assert torch.allclose(loaded.model(**inputs), expected, atol=1e-5, rtol=1e-5)
    with safe_open(out / finetuned.MERGED_FILE, "pt") as f:
        assert f.metadata()["contents"] == finetuned.FULL_CONTENTS
    with pytest.raises(CheckpointError, match="is not a LoRA file"):
        finetuned.merge_lora_file(lora_run["BASE_MODEL_DIR"], out / finetuned.MERGED_FILE, out / "again.safetensors")


def test_merge_takes_the_base_model_the_run_recorded(lora_run, tmp_path, capsys, monkeypatch):
    """Without --BASE_MODEL_DIR (the default, models/base_model, is not there) the merge uses
    the base its final file records; a final file from before that was recorded: the
    training state's."""
    out = Path(lora_run["CHECKPOINT_DIR"])
    with safe_open(out / fb.FINAL_FILE, "pt") as f:
        assert f.metadata()[finetuned.BASE_MODEL_KEY] == lora_run["BASE_MODEL_DIR"]
    monkeypatch.chdir(tmp_path)  # where models/base_model does not exist
    assert fb.main(["--merge", f"--CHECKPOINT_DIR={out}"]) == 0
    said = capsys.readouterr().out
    assert f"merged into {lora_run['BASE_MODEL_DIR']}'s model (the base model the run recorded" in said
    merged = load_file(out / finetuned.MERGED_FILE)

    older = tmp_path / "older"
    older.mkdir()
    tensors, meta = load_file(out / fb.FINAL_FILE), safe_open(out / fb.FINAL_FILE, "pt").metadata()
    meta.pop(finetuned.BASE_MODEL_KEY)
    from safetensors.torch import save_file
    save_file(tensors, older / fb.FINAL_FILE, metadata=meta)
    shutil.copy(out / "training_state.pt", older / "training_state.pt")
    assert fb.main(["--merge", f"--CHECKPOINT_DIR={older}"]) == 0
    capsys.readouterr()
    again = load_file(older / finetuned.MERGED_FILE)
    assert all(torch.equal(merged[n], again[n]) for n in merged)


def test_a_lora_file_missing_adapters_is_refused(lora_run, tmp_path):
    out = Path(lora_run["CHECKPOINT_DIR"])
    tensors = load_file(out / fb.FINAL_FILE)
    with safe_open(out / fb.FINAL_FILE, "pt") as f:
        meta = f.metadata()
    dropped = next(n for n in tensors if ".lora_up." in n)
    del tensors[dropped]
    from safetensors.torch import save_file
    save_file(tensors, tmp_path / "cut.safetensors", metadata=meta)
    with pytest.raises(CheckpointError, match=f"missing from this LoRA file .*{dropped}"):
        finetuned.load_model(lora_run["BASE_MODEL_DIR"], tmp_path / "cut.safetensors", KEYS, "cpu", torch.float32)


def test_a_lora_file_previews(lora_run, tmp_path):
    from test_preview import preview_settings

    s = preview_settings(lora_run, tmp_path, Path(lora_run["CHECKPOINT_DIR"]) / fb.FINAL_FILE)
    result = gp.generate(s)
    assert result["video"].is_file() and "LoRA rank 4" in result["json"].read_text()


def test_a_lora_run_resumes_to_the_same_weights(lora_run, tmp_path, monkeypatch):
    import training.recipe

    s = dict(lora_run, CHECKPOINT_DIR=str(tmp_path / "killed"))
    real, calls = training.recipe.flow_matching_step, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:  # step 6, after the save at step 4
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(training.recipe, "flow_matching_step", dies)
    with pytest.raises(KeyboardInterrupt):
        fb.train(s)
    monkeypatch.setattr(training.recipe, "flow_matching_step", real)
    with pytest.raises(TrainingError, match="LORA"):  # the adapters' shape is part of the run
        fb.train(dict(s, RESUME=True, LORA_RANK=8))
    fb.train(dict(s, RESUME=True))
    a = load_file(Path(lora_run["CHECKPOINT_DIR"]) / fb.FINAL_FILE)
    b = load_file(Path(s["CHECKPOINT_DIR"]) / fb.FINAL_FILE)
    assert a.keys() == b.keys()
    worst = max((a[n] - b[n]).abs().max().item() for n in a)
    assert worst < 1e-6, worst
