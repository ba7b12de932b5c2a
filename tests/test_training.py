import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from contextlib import nullcontext

import finetune_base_model as fb
from conftest import REPO_ROOT, data_settings
from demo_world.setup import DEMO_CONTROLS_NOTES, DEMO_DIR, TRAINING_DEMO_SETTINGS, prepare_demo
from runs.errors import TrainingError
from runs.folder import METRICS_FILE, STATE_FILE
from runs.metrics import METRICS_COLUMNS
from training.epochs import epoch_order, plan_epoch, sample_noise
from training.flow_matching import flow_matching_step, prepare_trainable, validate
from wan import flow
from wan.config import WanConfig
from wan.loading import load_base_model
from wan.model import WanModel


def run_settings(tiny_assets, tmp_path, *overrides):
    s = dict(tiny_assets, CHECKPOINT_DIR=str(tmp_path / "checkpoints"))
    s.update({"NUM_EPOCHS": 2, "BATCH_SIZE": 2, "GRAD_ACCUM_STEPS": 2, "NUM_WORKERS": 0, "SAVE_EVERY_EPOCHS": 1,
              "PREVIEW_EVERY_EPOCHS": 0, "VAL_EVERY_EPOCHS": 1})
    for item in overrides:
        name, value = item.split("=", 1)
        s[name] = type(TRAINING_DEMO_SETTINGS.get(name, getattr(fb, name)))(value) if not isinstance(
            getattr(fb, name), bool) else value.lower() == "true"
    fb.check_settings(s)
    return s


# ----------------------------------------------------------------------------- settings

def test_overrides_are_typed_and_unknown_names_list_the_valid_ones():
    s, demo = fb.parse_settings(["--NUM_EPOCHS=3", "--LEARNING_RATE=2e-4", "--RESUME=true",
                                 "--KEYBOARD_KEYS=W,S,A,D,Q,E"])
    assert not demo
    assert (s["NUM_EPOCHS"], s["LEARNING_RATE"], s["RESUME"]) == (3, 2e-4, True)
    assert s["KEYBOARD_KEYS"] == ("W", "S", "A", "D", "Q", "E")
    with pytest.raises(ValueError, match="unknown setting --NUM_EPOCH;.*NUM_EPOCHS"):
        fb.parse_settings(["--NUM_EPOCH=3"])
    with pytest.raises(ValueError, match="NUM_EPOCHS is an int"):
        fb.parse_settings(["--NUM_EPOCHS=three"])
    with pytest.raises(ValueError, match="unexpected argument"):
        fb.parse_settings(["epochs=3"])


def test_demo_settings_apply_and_overrides_win():
    s, demo = fb.parse_settings(["--demo", "--NUM_EPOCHS=1"])
    assert demo and s["NUM_EPOCHS"] == 1 and s["DATA_DIR"] == TRAINING_DEMO_SETTINGS["DATA_DIR"]


@pytest.mark.parametrize("override,message", [
    ("--TRAINING_STRATEGY=everything", "TRAINING_STRATEGY='everything': choose one of action_only"),
    ("--MIXED_PRECISION=fp16", "MIXED_PRECISION='fp16'"),
    ("--TIMESTEP_SAMPLING=cosine", "TIMESTEP_SAMPLING='cosine'"),
    ("--BATCH_SIZE=0", "BATCH_SIZE=0: must be at least 1"),
    ("--EMA_DECAY=1.0", "EMA_DECAY=1.0"),
    ("--MAX_SIGMA=0.0", "MIN_SIGMA < MAX_SIGMA"),
])
def test_bad_settings_are_named(override, message):
    with pytest.raises(ValueError, match=message):
        fb.parse_settings([override])


def test_epoch_order_is_seeded_and_differs_per_epoch():
    order = epoch_order(10, seed=1, epoch=3)
    assert sorted(order) == list(range(10)) and order == epoch_order(10, seed=1, epoch=3)
    assert order != epoch_order(10, seed=1, epoch=4)


def test_epoch_plan_by_hand():
    steps, dropped = plan_epoch(0, 7, batch_size=2, accum=2, world=1)
    assert steps == [[[[0, 1]], [[2, 3]]], [[[4, 5]], [[6]]]] and dropped == 0
    # two ranks with one clip each see the same clips per micro-batch as one rank with two
    steps2, dropped2 = plan_epoch(0, 7, batch_size=1, accum=2, world=2)
    assert steps2 == [[[[0], [1]], [[2], [3]]], [[[4], [5]]]] and dropped2 == 1
    # a short last micro-batch is split as evenly as possible
    assert plan_epoch(0, 7, batch_size=2, accum=1, world=2)[0][-1] == [[[4, 5], [6]]]
    # resuming at a step boundary continues the same plan
    assert plan_epoch(4, 7, batch_size=2, accum=2, world=1)[0] == steps[1:]
    # fewer clips than ranks: no step at all (the training script refuses to start)
    assert plan_epoch(0, 1, batch_size=1, accum=4, world=2) == ([], 1)


def test_noise_per_sample_does_not_depend_on_batching():
    sampling = dict(mode="uniform", shift=5.0, min_sigma=0.0, max_sigma=1.0)
    a = sample_noise(1, 2, 3, (4, 5), sampling)
    b = sample_noise(1, 2, 3, (4, 5), sampling)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    c = sample_noise(1, 2, 4, (4, 5), sampling)
    assert not torch.equal(a[1], c[1])


# ----------------------------------------------------------------------------- the objective

def tiny_batch(model: WanModel, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(2, 4, 3, 4, 6)
    mask[:, :, 0] = 1
    return {"latents": torch.randn(2, 16, 3, 4, 6, generator=g),
            "cond_concat": torch.cat([mask, torch.randn(2, 16, 3, 4, 6, generator=g)], 1),
            "visual_context": torch.randn(2, 5, model.config.clip_dim, generator=g),
            "keyboard": (torch.rand(2, 9, 4, generator=g) > 0.5).float(),
            "mouse": torch.randn(2, 9, 2, generator=g) * 0.1}


def test_flow_matching_step_is_the_velocity_mse(tiny_assets):
    model, _ = load_base_model(tiny_assets["BASE_MODEL_DIR"])
    batch = tiny_batch(model)
    sigma, noise = torch.tensor([0.3, 0.9]), torch.randn(2, 16, 3, 4, 6)
    losses = flow_matching_step(model, batch, sigma, noise, nullcontext())
    x0 = batch["latents"]
    x_t = (1 - sigma.view(-1, 1, 1, 1, 1)) * x0 + sigma.view(-1, 1, 1, 1, 1) * noise
    prediction = model(x_t, sigma * 1000, batch["visual_context"], batch["cond_concat"], batch["keyboard"],
                       batch["mouse"])
    expected = ((prediction - (noise - x0)) ** 2).flatten(1).mean(1)
    assert torch.allclose(losses, expected)


@pytest.mark.parametrize("strategy", ["action_only", "full"])
def test_one_optimizer_step_lowers_the_loss_on_a_fixed_batch(tiny_assets, strategy):
    torch.manual_seed(0)
    model, _ = load_base_model(tiny_assets["BASE_MODEL_DIR"])
    with torch.no_grad():  # a trained-looking model: no zero projections hiding the actions
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    trainable = prepare_trainable(model, strategy, 1)
    batch, sigma, noise = tiny_batch(model), torch.tensor([0.5, 0.8]), torch.randn(2, 16, 3, 4, 6)
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-3)
    before = flow_matching_step(model, batch, sigma, noise, nullcontext()).mean()
    before.backward()
    optimizer.step()
    after = flow_matching_step(model, batch, sigma, noise, nullcontext()).mean()
    assert after < before


def test_bf16_autocast_with_float32_masters_trains_only_the_strategy(tiny_assets):
    model, _ = load_base_model(tiny_assets["BASE_MODEL_DIR"], dtype=torch.bfloat16)
    trainable = prepare_trainable(model, "action_only", 0)
    batch = tiny_batch(model)
    loss = flow_matching_step(model, batch, torch.tensor([0.5, 0.7]), torch.randn(2, 16, 3, 4, 6),
                                 torch.autocast("cpu", dtype=torch.bfloat16)).mean()
    assert torch.isfinite(loss)
    loss.backward()
    for name, p in model.named_parameters():
        if name in trainable:
            assert p.dtype == torch.float32
        else:
            assert p.dtype == torch.bfloat16 and p.grad is None, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable.values())


# ----------------------------------------------------------------------------- whole runs

def test_run_writes_every_output_and_freezes_by_strategy(tiny_assets, tmp_path):
    s = run_settings(tiny_assets, tmp_path, "TRAINING_STRATEGY=action_only")
    summary = fb.train(s)
    out = Path(s["CHECKPOINT_DIR"])
    names = sorted(p.name for p in out.iterdir() if p.name != ".lock")  # the run's lock stays, unlocked
    assert names == ["base_finetuned_epoch1.safetensors", "base_finetuned_epoch2.safetensors",
                     "base_finetuned_final.safetensors", "metrics.csv", "tensorboard", "training_curves.png",
                     "training_info.txt", "training_state.pt"]

    base, _ = load_base_model(s["BASE_MODEL_DIR"])
    final = load_file(out / fb.FINAL_FILE)
    fresh = WanModel(WanConfig.from_json(Path(s["BASE_MODEL_DIR"]) / "config.json"))
    fresh.load_state_dict(final, strict=True)
    changed = {n for n, t in base.state_dict().items() if not torch.equal(t, final[n])}
    assert changed and all(".action_model." in n for n in changed)

    epoch_file = load_file(out / "base_finetuned_epoch2.safetensors")
    assert set(epoch_file) == {n for n in final if ".action_model." in n}
    assert all(torch.equal(epoch_file[n], final[n]) for n in epoch_file)
    with safe_open(out / "base_finetuned_epoch2.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["strategy"] == "action_only" and meta["keyboard_keys"] == "W,S,A,D" and meta["epoch"] == "2"

    rows = (out / "metrics.csv").read_text().splitlines()
    assert rows[0].split(",") == list(METRICS_COLUMNS) and len(rows) == 1 + summary["steps"]
    info = (out / "training_info.txt").read_text()
    for field in ("code commit:", "device: cpu", "strategy action_only", "trainable", "frozen",
                  "epoch 2: train loss", "action gain", "s per optimizer step", "Data report:",
                  "base_finetuned_final.safetensors", "LEARNING_RATE = "):
        assert field in info, field
    assert all("val_loss" in h and h["action_gain"] > 0 for h in summary["history"])


def test_validation_every_n_epochs_and_after_the_last(tiny_assets, tmp_path):
    s = run_settings(tiny_assets, tmp_path, "NUM_EPOCHS=3", "VAL_EVERY_EPOCHS=2", "SAVE_EVERY_EPOCHS=0")
    summary = fb.train(s)
    assert [("val_loss" in h) for h in summary["history"]] == [False, True, True]
    info = (Path(s["CHECKPOINT_DIR"]) / fb.INFO_FILE).read_text()
    epoch_lines = [line for line in info.splitlines() if line.startswith("  epoch ")]
    assert "val loss" not in epoch_lines[0] and all("val loss" in line for line in epoch_lines[1:]), epoch_lines


def test_existing_run_is_not_overwritten_without_resume(tiny_assets, tmp_path):
    s = run_settings(tiny_assets, tmp_path, "NUM_EPOCHS=1")
    fb.train(s)
    with pytest.raises(TrainingError, match="already holds a run.*RESUME"):
        fb.train(s)


def test_resume_refuses_changed_settings(tiny_assets, tmp_path):
    s = run_settings(tiny_assets, tmp_path, "NUM_EPOCHS=1")
    fb.train(s)
    with pytest.raises(TrainingError, match=f"LEARNING_RATE: {s['LEARNING_RATE']!r} -> 0.001"):
        fb.train(dict(s, RESUME=True, LEARNING_RATE=1e-3, NUM_EPOCHS=2))


def test_resume_refuses_changed_actions(tiny_assets, tmp_path, monkeypatch):
    s = run_settings(tiny_assets, tmp_path, "NUM_EPOCHS=1")
    fb.train(s)
    monkeypatch.setattr(fb.data, "INVERT_MOUSE_Y", True)  # edited in convert_unreal_data.py, not a setting here
    with pytest.raises(TrainingError, match="keyboard or mouse rows differ.*INVERT_MOUSE_Y"):
        fb.train(dict(s, RESUME=True, NUM_EPOCHS=2))


def test_demo_never_clears_a_checkpoint_dir_given_on_the_command_line(tiny_assets, tmp_path):
    mine = tmp_path / "my_run"
    mine.mkdir()
    (mine / "keep.txt").write_text("a real run")
    prepare_demo(dict(tiny_assets, CHECKPOINT_DIR=str(mine)), num_frames=80)
    assert (mine / "keep.txt").read_text() == "a real run"


def test_nan_loss_stops_with_a_clear_message_and_keeps_the_last_save(tiny_assets, tmp_path, monkeypatch):
    s = run_settings(tiny_assets, tmp_path, "SAVE_EVERY_STEPS=2")
    import training.recipe

    real_step, calls = training.recipe.flow_matching_step, []

    def poisoned(*args, **kwargs):
        calls.append(1)
        losses = real_step(*args, **kwargs)
        return losses * float("nan") if len(calls) == 5 else losses

    monkeypatch.setattr(training.recipe, "flow_matching_step", poisoned)
    with pytest.raises(TrainingError, match="loss became nan at optimizer step 3 .*remain valid"):
        fb.train(s)
    state = torch.load(Path(s["CHECKPOINT_DIR"]) / STATE_FILE, weights_only=True)
    assert state["global_step"] == 2
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())
    assert not (Path(s["CHECKPOINT_DIR"]) / fb.FINAL_FILE).exists()


def test_ema_weights_go_to_validation_and_the_final_file(tiny_assets, tmp_path):
    s = run_settings(tiny_assets, tmp_path, "NUM_EPOCHS=1", "EMA_DECAY=0.5", "TRAINING_STRATEGY=full")
    fb.train(s)
    out = Path(s["CHECKPOINT_DIR"])
    state = torch.load(out / STATE_FILE, weights_only=True)
    final = load_file(out / fb.FINAL_FILE)
    assert all(torch.equal(final[n], t) for n, t in state["ema"].items())
    assert any(not torch.equal(final[n], t) for n, t in state["trainable"].items())
    with safe_open(out / fb.FINAL_FILE, "pt") as f:
        assert f.metadata()["weights"] == "ema"


def test_validation_is_repeatable_and_the_action_gain_measures_action_use(tiny_assets, tmp_path):
    s = run_settings(tiny_assets, tmp_path)
    import latents.cache as latent_cache
    from latents.dataset import CachedClipDataset
    from recordings.report import check_data
    report = check_data(s["DATA_DIR"], data_settings(sequence_length=9, clip_stride=4, video_height=32, video_width=64))
    clips = report.clips[::4]  # spread over the recording: different actions
    assert len({tuple(c.keyboard.sum(0).tolist()) for c in clips}) > 1
    cache = latent_cache.build_latent_cache(clips, s["CACHE_DIR"], s["VAE_PATH"], s["CLIP_PATH"], 32, 64,
                                            dtype=s["CACHE_DTYPE"], num_workers=0, progress=False)
    val_set = CachedClipDataset(clips, s["CACHE_DIR"], cache.settings)
    model, _ = load_base_model(s["BASE_MODEL_DIR"])
    sigmas = flow.validation_sigmas(3)
    cpu = torch.device("cpu")
    a = validate(model, val_set, sigmas, 0, cpu, nullcontext())
    assert a == validate(model, val_set, sigmas, 0, cpu, nullcontext()) and len(a["val_loss_per_sigma"]) == 3
    with torch.no_grad():  # a model whose action outputs are zero cannot use actions: gain exactly 1
        for block in model.blocks:
            block.action_model.proj_keyboard.weight.zero_()
            block.action_model.proj_mouse.weight.zero_()
    assert validate(model, val_set, sigmas, 0, cpu, nullcontext())["action_gain"] == pytest.approx(1, abs=1e-6)
    with torch.no_grad():
        for block in model.blocks:
            block.action_model.proj_keyboard.weight.normal_(0, 1.0)
    using = validate(model, val_set, sigmas, 0, cpu, nullcontext())
    assert using["action_gain"] != pytest.approx(1.0, abs=1e-4)


# ----------------------------------------------------------------------------- kill and resume

KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import finetune_base_model as fb
mode, at = sys.argv[1], int(sys.argv[2])
count = [0]
if mode == "step":  # die in the middle of an optimizer step
    import training.recipe
    real = training.recipe.flow_matching_step
    def step(*a, **k):
        count[0] += 1
        if count[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **k)
    training.recipe.flow_matching_step = step
else:  # die while training_state.pt is being written, after part of it is on disk
    import runs.folder
    import wan.files
    real = runs.folder.torch_save_atomic
    def save(obj, path):
        count[0] += 1
        if count[0] == at:
            def half(tmp):
                open(tmp, "wb").write(b"half a training state")
                os.kill(os.getpid(), signal.SIGKILL)
            wan.files.write_atomic(path, half)
        return real(obj, path)
    runs.folder.torch_save_atomic = save
sys.exit(fb.main(sys.argv[3:]))
"""


def cli_args(s: dict) -> list:
    return [f"--{n}={','.join(v) if isinstance(v, tuple) else v}" for n, v in s.items() if n in fb.SETTING_NAMES]


@pytest.mark.slow
@pytest.mark.parametrize("mode,at,savers", [("step", 11, ("OFFLOAD_OPTIMIZER=true",)), ("save", 3, ())])
def test_killed_run_resumes_to_bit_identical_weights(tiny_assets, tmp_path, mode, at, savers):
    """Killed with SIGKILL in a step (with the optimizer offloaded, whose host copies must be
    taken from the resumed weights) or while the state is being written."""
    common = run_settings(tiny_assets, tmp_path, "NUM_EPOCHS=3", "SAVE_EVERY_STEPS=2", "TRAINING_STRATEGY=full",
                          "EMA_DECAY=0.9", *savers)
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
    straight = dict(common, CHECKPOINT_DIR=str(tmp_path / "straight"))
    done = subprocess.run([sys.executable, str(REPO_ROOT / "finetune_base_model.py"), *cli_args(straight)],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    killed = dict(common, CHECKPOINT_DIR=str(tmp_path / "killed"))
    script = tmp_path / "killer.py"
    script.write_text(KILLER.format(repo=str(REPO_ROOT)))
    died = subprocess.run([sys.executable, str(script), mode, str(at), *cli_args(killed)], env=env,
                          capture_output=True, text=True)
    assert died.returncode == -9, died.stderr[-2000:]
    assert not (tmp_path / "killed" / fb.FINAL_FILE).exists()
    resumed = subprocess.run([sys.executable, str(REPO_ROOT / "finetune_base_model.py"), *cli_args(killed),
                              "--RESUME=true"], env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed" in resumed.stdout

    a = load_file(tmp_path / "straight" / fb.FINAL_FILE)
    b = load_file(tmp_path / "killed" / fb.FINAL_FILE)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    metrics_a = (tmp_path / "straight" / METRICS_FILE).read_text().splitlines()
    metrics_b = (tmp_path / "killed" / METRICS_FILE).read_text().splitlines()
    assert [r.split(",")[:5] for r in metrics_a] == [r.split(",")[:5] for r in metrics_b]


# ----------------------------------------------------------------------------- the README's main job

@pytest.mark.slow
def test_demo_end_to_end(tmp_path):
    done = subprocess.run([sys.executable, str(REPO_ROOT / "finetune_base_model.py"), "--demo", "--NUM_EPOCHS=8",
                           "--SAVE_EVERY_EPOCHS=5", "--VAL_EVERY_EPOCHS=1"], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / DEMO_DIR / "checkpoints"
    for name in ("base_finetuned_epoch5.safetensors", fb.FINAL_FILE, METRICS_FILE, fb.INFO_FILE, STATE_FILE):
        assert (out / name).is_file(), name
    assert list((out / fb.PREVIEW_DIR).glob("epoch8.*"))  # the demo previews its last epoch
    history = torch.load(out / STATE_FILE, weights_only=True)["history"]
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < 0.8 * history[0]["val_loss"]
    info = (out / fb.INFO_FILE).read_text()
    for field in ("device:", "parameters: total", "trainable", "frozen", "strategy full", "Data report:",
                  "epoch 8: train loss", "action gain", "s per optimizer step", "checkpoints:", "status: finished",
                  "\ncontrols: action gain "):  # the one line on whether the keys were learned, under the status
        assert field in info, field
    assert "\ncontrols: action gain " in done.stdout  # and the last words of the run
    assert sum(note in done.stdout for note in DEMO_CONTROLS_NOTES.values()) == 1  # then what the demo showed
