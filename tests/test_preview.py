"""generate_preview.py: action scripts, checkpoint loading, sampling, rendering, the files it
writes, and the training-time previews - on the tiny demo assets, on CPU."""

import json
import re
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import convert_unreal_data as data
import finetune_base_model as fb
import generate_preview as gp
from cli.settings import SettingsError
from demo_world.recording import write_demo_recording
from generation import action_scripts, bidirectional, finetuned, previews
from generation.errors import GenerationError
from latents.encoders import load_encoders
from recordings.frames import load_frame, preprocess_image
from recordings.report import check_data
from runs.folder import STATE_FILE
from video import overlay
from wan.files import save_safetensors_atomic
from wan.loading import CheckpointError, load_base_model

KEYS = ("W", "S", "A", "D")


# ----------------------------------------------------------------------------- action scripts

def test_action_script_gives_one_row_per_frame():
    keyboard, mouse = action_scripts.parse_action_script("W*3 a+D  mouse( 0.1 , -0.2 )*2 W+mouse(0,0.1) idle", KEYS)
    assert keyboard.shape == (8, 4) and mouse.shape == (8, 2)
    assert keyboard.tolist() == [[1, 0, 0, 0]] * 3 + [[0, 0, 1, 1]] + [[0, 0, 0, 0]] * 2 + [[1, 0, 0, 0]] + [[0] * 4]
    assert torch.equal(mouse, torch.tensor([[0, 0]] * 4 + [[0.1, -0.2]] * 2 + [[0, 0.1]] + [[0, 0]]))
    keyboard, _ = action_scripts.parse_action_script("Q+space*2", ("W", "S", "A", "D", "Q", "SPACE"))
    assert keyboard.tolist() == [[0, 0, 0, 0, 1, 1]] * 2


@pytest.mark.parametrize("script,message", [
    ("", "ACTIONS is empty"),
    ("W*3 Q*2", r"term 2 'Q\*2' \(column 5\): 'Q' is not a key of KEYBOARD_KEYS \(W, S, A, D\)"),
    ("WA*4", r"hold several keys with '\+', e.g. W\+A"),
    ("W*0", "positive whole number, got '0'"),
    ("W*2.5", "positive whole number, got '2.5'"),
    ("W*-1", "positive whole number, got '-1'"),
    ("W*2*3", r"more than one '\*count'"),
    ("W++A", "an empty part"),
    ("mouse(0.1)*3", r"mouse\(pitch,yaw\) needs two numbers, got mouse\(0.1\)"),
    ("mouse(up,0)", "needs two numbers"),
    ("mouse(nan,0)", "must be finite"),
    ("mouse(0.1,0)+mouse(0,0.1)", "appears twice"),
    ("W mouse(0.1,0", r"'mouse\(0.1,0' \(column 3\): '\(' without '\)'"),
    ("W)", r"column 2: '\)' without '\('"),
])
def test_bad_action_scripts_name_the_term(script, message):
    with pytest.raises(action_scripts.ActionScriptError, match=message):
        action_scripts.parse_action_script(script, KEYS)


def test_script_length_must_match_the_frames():
    action_scripts.check_action_rows(57, 57)
    with pytest.raises(action_scripts.ActionScriptError, match="gives 44 rows but NUM_FRAMES is 57.*first frame's included "
                                                   r"\(add 13 rows"):
        action_scripts.check_action_rows(44, 57)
    with pytest.raises(action_scripts.ActionScriptError, match=r"remove 3 rows"):
        action_scripts.check_action_rows(60, 57)


# ----------------------------------------------------------------------------- settings

def test_settings_overrides_and_errors(tmp_path, monkeypatch):
    s, demo = gp.parse_settings(["--NUM_STEPS=7", "--compare", "--KEYBOARD_KEYS=W,S,A,D,Q"])
    assert (s["NUM_STEPS"], s["COMPARE"], s["KEYBOARD_KEYS"], demo) == (7, True, ("W", "S", "A", "D", "Q"), False)
    with pytest.raises(ValueError, match="unknown setting --NUM_STEP;.*NUM_STEPS"):
        gp.parse_settings(["--NUM_STEP=3"])
    with pytest.raises(SettingsError, match="NUM_FRAMES has 56 frames.*4k\\+1"):
        gp.parse_settings(["--NUM_FRAMES=56"])
    with pytest.raises(SettingsError, match="OUTPUT='x.avi': must end in .mp4 or .gif"):
        gp.parse_settings(["--OUTPUT=x.avi"])
    with pytest.raises(SettingsError, match="COMPARE needs a fine-tuned CHECKPOINT"):
        gp.parse_settings(["--compare", "--CHECKPOINT="])
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SettingsError, match="run the training demo first|Run the training demo first"):
        gp.parse_settings(["--demo"])
    assert gp.main(["--demo"]) == 1


def test_windows_overlap_by_one_frame_and_stay_4k_plus_1():
    assert bidirectional.window_spans(57, 57) == [(0, 57)]
    assert bidirectional.window_spans(113, 57) == [(0, 57), (56, 113)]
    assert bidirectional.window_spans(65, 57) == [(0, 57), (56, 65)]
    assert bidirectional.window_spans(25, 9) == [(0, 9), (8, 17), (16, 25)]
    for start, end in bidirectional.window_spans(101, 17):
        assert (end - start - 1) % 4 == 0


# ----------------------------------------------------------------------------- a real run with previews

@pytest.fixture(scope="module")
def trained(tiny_assets, tmp_path_factory):
    """One epoch of action_only training with EMA and a preview; the weights the preview saw."""
    s = dict(tiny_assets, CHECKPOINT_DIR=str(tmp_path_factory.mktemp("run") / "checkpoints"), NUM_EPOCHS=1,
             BATCH_SIZE=2, GRAD_ACCUM_STEPS=1, NUM_WORKERS=0, SAVE_EVERY_EPOCHS=1, TRAINING_STRATEGY="action_only",
             EMA_DECAY=0.5, PREVIEW_EVERY_EPOCHS=1, PREVIEW_STEPS=2)
    fb.check_settings(s)
    real_preview, seen = previews.epoch_preview, {}

    def preview(model, *args, **kwargs):
        seen.update({n: p.detach().clone() for n, p in model.named_parameters() if ".action_model." in n})
        return real_preview(model, *args, **kwargs)

    fb.epoch_preview = preview
    try:
        summary = fb.train(s)
    finally:
        fb.epoch_preview = real_preview
    return s, summary, seen


@pytest.mark.slow
def test_training_writes_a_preview_of_a_validation_clip_with_the_ema_weights(trained):
    s, summary, seen = trained
    out = Path(s["CHECKPOINT_DIR"])
    assert sorted(p.name for p in (out / fb.PREVIEW_DIR).iterdir()) == ["epoch1.json", "epoch1.mp4"]
    info = json.loads((out / fb.PREVIEW_DIR / "epoch1.json").read_text())
    assert info["panels"] == ["generated", "ground truth"] and info["frames"] == s["SEQUENCE_LENGTH"]
    assert info["epoch"] == 1 and info["num_steps"] == 2
    assert set(info["scores"]["generated"]) >= {"forward_back", "strafe", "yaw", "pitch", "overall"}
    report = check_data(s["DATA_DIR"], data.data_settings(s))
    assert info["clip"] == report.split.val[previews.preview_clip_index(report.split.val)].clip_id
    entry = summary["history"][0]
    assert entry["preview"].startswith("previews/epoch1.mp4: action-following")
    assert "preview previews/epoch1.mp4: action-following" in (out / fb.INFO_FILE).read_text()
    # the preview ran on the EMA weights (those of the final file), not the raw trained ones
    final = load_file(out / fb.FINAL_FILE)
    raw = torch.load(out / STATE_FILE, weights_only=True)["trainable"]
    assert all(torch.equal(seen[n], final[n]) for n in seen)
    assert any(not torch.equal(seen[n], raw[n]) for n in seen)


@pytest.mark.slow
def test_the_preview_clip_is_the_most_active_one():
    class Clip:
        def __init__(self, keys, mouse):
            self.keyboard, self.mouse = torch.tensor(keys, dtype=torch.float32), torch.tensor(mouse)

    idle = Clip([[0, 0]] * 3, [[0.0, 0.0]] * 3)
    keys_once = Clip([[1, 0], [0, 0], [0, 0]], [[0.0, 0.0]] * 3)
    keys_and_mouse = Clip([[0, 1], [0, 0], [0, 0]], [[0.0, 0.0], [0.1, 0.0], [0.0, -0.1]])
    assert previews.preview_clip_index([idle, keys_once, keys_and_mouse]) == 2
    assert previews.preview_clip_index([idle, keys_once, keys_once]) == 1
    assert previews.preview_clip_index([idle]) == 0
    assert previews.most_active_clips([idle, keys_once, keys_and_mouse, keys_once], 3) == [2, 1, 3]
    assert previews.most_active_clips([idle], 4) == [0]


def test_epoch_preview_leaves_the_random_state_alone(tiny_assets, trained, tmp_path):
    import latents.cache as latent_cache
    from latents.dataset import CachedClipDataset
    s = tiny_assets
    report = check_data(s["DATA_DIR"], data.data_settings(s))
    cache = latent_cache.build_latent_cache(report.split.val[:1], s["CACHE_DIR"], s["VAE_PATH"], s["CLIP_PATH"],
                                            s["VIDEO_HEIGHT"], s["VIDEO_WIDTH"], dtype=s["CACHE_DTYPE"],
                                            num_workers=0, progress=False)
    clips = CachedClipDataset(report.split.val[:1], s["CACHE_DIR"], cache.settings)
    model, _ = load_base_model(s["BASE_MODEL_DIR"])
    model.train()
    state = torch.get_rng_state()
    result = previews.epoch_preview(model, clips, s["VAE_PATH"], s["VIDEO_HEIGHT"], s["VIDEO_WIDTH"], tmp_path, 3, KEYS,
                              2, 5.0, 0, nullcontext())
    assert torch.equal(torch.get_rng_state(), state) and model.training
    assert (tmp_path / "epoch3.mp4").is_file() and result["preview"].startswith(f"{tmp_path.name}/epoch3.mp4")


# ----------------------------------------------------------------------------- checkpoints

@pytest.mark.slow
def test_both_checkpoint_kinds_of_a_real_run_load(trained):
    s, _, _ = trained
    out = Path(s["CHECKPOINT_DIR"])
    final = load_file(out / fb.FINAL_FILE)
    epoch = load_file(out / "base_finetuned_epoch1.safetensors")
    base, _ = load_base_model(s["BASE_MODEL_DIR"])

    loaded = finetuned.load_model(s["BASE_MODEL_DIR"], out / fb.FINAL_FILE, KEYS, "cpu", torch.float32)
    assert "full state dict" in loaded.description and loaded.keyboard_keys == KEYS
    assert all(torch.equal(t, final[n]) for n, t in loaded.model.state_dict().items())

    loaded = finetuned.load_model(s["BASE_MODEL_DIR"], out / "base_finetuned_epoch1.safetensors", KEYS, "cpu",
                           torch.float32)
    assert f"{len(epoch)} fine-tuned tensors" in loaded.description and "trainable tensors only" in loaded.description
    state, base_state = loaded.model.state_dict(), base.state_dict()
    assert all(torch.equal(state[n], epoch[n]) for n in epoch)
    assert all(torch.equal(state[n], base_state[n]) for n in state if n not in epoch)
    assert any(not torch.equal(epoch[n], base_state[n]) for n in epoch)

    loaded = finetuned.load_model(s["BASE_MODEL_DIR"], "", KEYS, "cpu", torch.float32)
    assert loaded.description.startswith("base model")
    assert all(torch.equal(t, base_state[n]) for n, t in loaded.model.state_dict().items())


def action_tensors(model) -> dict:
    return {n: t.clone() + 0.01 for n, t in model.state_dict().items() if ".action_model." in n}


def test_a_full_file_is_recognised_by_its_tensors(tiny_assets, tmp_path):
    base, _ = load_base_model(tiny_assets["BASE_MODEL_DIR"])
    full = {n: t + 0.01 for n, t in base.state_dict().items()}
    save_safetensors_atomic(full, tmp_path / "full.safetensors")  # no metadata
    loaded = finetuned.load_model(tiny_assets["BASE_MODEL_DIR"], tmp_path / "full.safetensors", KEYS, "cpu", torch.float32)
    assert "full state dict" in loaded.description
    assert all(torch.equal(t, full[n]) for n, t in loaded.model.state_dict().items())
    del full["head.head.bias"]
    save_safetensors_atomic(full, tmp_path / "cut.safetensors", {"contents": finetuned.FULL_CONTENTS})
    with pytest.raises(CheckpointError, match="missing from this full state dict: head.head.bias"):
        finetuned.load_model(tiny_assets["BASE_MODEL_DIR"], tmp_path / "cut.safetensors", KEYS, "cpu", torch.float32)


def test_unknown_or_misshapen_tensors_are_named(tiny_assets, tmp_path):
    base, _ = load_base_model(tiny_assets["BASE_MODEL_DIR"])
    tensors = action_tensors(base)
    tensors["blocks.0.action_model.bogus"] = torch.zeros(3)
    tensors["blocks.1.action_model.proj_mouse.weight"] = torch.zeros(7)
    save_safetensors_atomic(tensors, tmp_path / "bad.safetensors", {"keyboard_keys": "W,S,A,D"})
    with pytest.raises(CheckpointError, match=r"(?s)2 problem\(s\).*not in the model: blocks.0.action_model.bogus "
                                              r"\[3\].*wrong shape: blocks.1.action_model.proj_mouse.weight: \[7\] here"):
        finetuned.load_model(tiny_assets["BASE_MODEL_DIR"], tmp_path / "bad.safetensors", KEYS, "cpu", torch.float32)
    with pytest.raises(CheckpointError, match="no such file"):
        finetuned.load_model(tiny_assets["BASE_MODEL_DIR"], tmp_path / "none.safetensors", KEYS, "cpu", torch.float32)


def test_the_checkpoint_keyboard_width_decides_the_model(tiny_assets, tmp_path):
    six = ("W", "S", "A", "D", "Q", "E")
    wide, reinitialised = load_base_model(tiny_assets["BASE_MODEL_DIR"], keyboard_dim=6)
    assert reinitialised
    tensors = action_tensors(wide)
    save_safetensors_atomic(tensors, tmp_path / "six.safetensors", {"keyboard_keys": ",".join(six)})
    loaded = finetuned.load_model(tiny_assets["BASE_MODEL_DIR"], tmp_path / "six.safetensors", six, "cpu", torch.float32)
    assert loaded.model.config.action_config.keyboard_dim_in == 6 and loaded.keyboard_keys == six
    assert all(torch.equal(loaded.model.state_dict()[n], t) for n, t in tensors.items())
    with pytest.raises(GenerationError, match="trained with KEYBOARD_KEYS=W,S,A,D,Q,E .*--KEYBOARD_KEYS=W,S,A,D,Q,E"):
        finetuned.load_model(tiny_assets["BASE_MODEL_DIR"], tmp_path / "six.safetensors", KEYS, "cpu", torch.float32)
    # the base model keeps its own W, S, A, D columns, picked out of the six
    base = finetuned.load_model(tiny_assets["BASE_MODEL_DIR"], "", six, "cpu", torch.float32)
    assert base.keyboard_keys == KEYS
    assert finetuned.select_keys(torch.eye(6), six, KEYS).tolist() == torch.eye(6)[:, :4].tolist()

    without = {n: t for n, t in tensors.items() if "keyboard_embed.0" not in n}
    save_safetensors_atomic(without, tmp_path / "partial.safetensors", {"keyboard_keys": ",".join(six)})
    with pytest.raises(CheckpointError, match="re-initialised, but .* lacks 3 of them: blocks.0.action_model.keyboard_embed.0.weight"):
        finetuned.load_model(tiny_assets["BASE_MODEL_DIR"], tmp_path / "partial.safetensors", six, "cpu", torch.float32)


# ----------------------------------------------------------------------------- sampling

@pytest.fixture(scope="module")
def encoders(tiny_assets):
    return load_encoders(tiny_assets["VAE_PATH"], tiny_assets["CLIP_PATH"], torch.device("cpu"))


def first_frame(s) -> torch.Tensor:
    return load_frame(Path(s["DATA_DIR"]) / "frame_0001.png", s["VIDEO_HEIGHT"], s["VIDEO_WIDTH"])


def test_sampling_is_seeded(tiny_assets, encoders):
    model = finetuned.load_model(tiny_assets["BASE_MODEL_DIR"], "", KEYS, "cpu", torch.float32).model
    keyboard, mouse = action_scripts.parse_action_script("W*3 D+mouse(0,0.1)*2", KEYS)

    def run(seed):
        return bidirectional.generate_frames(model, *encoders, first_frame(tiny_assets), keyboard, mouse, 5, 3, 5.0, seed,
                                  nullcontext())

    a = run(1)
    assert a.shape == (5, 3, tiny_assets["VIDEO_HEIGHT"], tiny_assets["VIDEO_WIDTH"])
    assert a.min() >= -1 and a.max() <= 1
    assert torch.equal(a, run(1))
    assert not torch.equal(a, run(2))


def test_long_clips_chain_windows_on_the_last_frame(tiny_assets, encoders, monkeypatch):
    model = finetuned.load_model(tiny_assets["BASE_MODEL_DIR"], "", KEYS, "cpu", torch.float32).model
    keyboard, mouse = action_scripts.parse_action_script("W*5 A*4", KEYS)
    firsts, real = [], bidirectional.build_cond_concat
    monkeypatch.setattr(bidirectional, "build_cond_concat", lambda vae, image, n: firsts.append((image, n)) or real(vae, image, n))
    frames = bidirectional.generate_frames(model, *encoders, first_frame(tiny_assets), keyboard, mouse, 5, 2, 5.0, 0,
                                nullcontext())
    assert frames.shape[0] == 9 and [n for _, n in firsts] == [5, 5]
    assert torch.equal(firsts[0][0][0], first_frame(tiny_assets))
    last_of_first_window = preprocess_image(Image.fromarray(overlay.to_uint8(frames[4:5])[0]),
                                                 *frames.shape[-2:])
    assert torch.equal(firsts[1][0][0], last_of_first_window)


# ----------------------------------------------------------------------------- the files

def preview_settings(tiny_assets, tmp_path, checkpoint, **changes) -> dict:
    s = {name: getattr(gp, name) for name in gp.SETTINGS.names}
    s.update(BASE_MODEL_DIR=tiny_assets["BASE_MODEL_DIR"], CHECKPOINT=str(checkpoint), VAE_PATH=tiny_assets["VAE_PATH"],
             CLIP_PATH=tiny_assets["CLIP_PATH"], RECORDING=tiny_assets["DATA_DIR"], START_FRAME=5, NUM_FRAMES=9,
             WINDOW_FRAMES=9, NUM_STEPS=2, VIDEO_HEIGHT=tiny_assets["VIDEO_HEIGHT"],
             VIDEO_WIDTH=tiny_assets["VIDEO_WIDTH"], DEVICE="cpu", OUTPUT=str(tmp_path / "preview.mp4"))
    s.update(changes)
    gp.check_settings(s)
    return s


def read_mp4(path) -> list[np.ndarray]:
    import av
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="rgb24") for frame in container.decode(video=0)]


@pytest.mark.slow
def test_compare_writes_base_finetuned_and_truth_side_by_side(tiny_assets, trained, tmp_path, capsys):
    pytest.importorskip("av")
    run, _, _ = trained
    s = preview_settings(tiny_assets, tmp_path, Path(run["CHECKPOINT_DIR"]) / fb.FINAL_FILE, COMPARE=True)
    result = gp.generate(s)
    frames = read_mp4(result["video"])
    height, width = s["VIDEO_HEIGHT"], s["VIDEO_WIDTH"]
    assert len(frames) == 9 and frames[0].shape == (height + overlay.strip_height(height), 3 * width, 3)
    # the ground-truth panel shows the recording's frame (up to the codec's loss at this tiny size)
    truth = np.asarray(Image.open(Path(s["RECORDING"]) / "frame_0007.png").convert("RGB"), dtype=np.float32)
    panels = [frames[2][12:height, i * width:(i + 1) * width].astype(np.float32) for i in range(3)]
    assert np.abs(panels[2] - truth[12:]).mean() < 0.5 * np.abs(panels[1] - truth[12:]).mean()
    info = json.loads(result["json"].read_text())
    assert info["panels"] == ["base", "fine-tuned", "ground truth"] and info["frames"] == 9
    assert set(info["scores"]) == {"base", "fine-tuned", "ground truth"}
    printed = capsys.readouterr().out
    assert "ground truth: overall" in printed and "fine-tuned: overall" in printed


def test_gif_fallback_without_pyav_and_a_script_without_truth(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "av", None)  # import av now raises ImportError
    s = preview_settings(tiny_assets, tmp_path, "", ACTIONS="W*2 A+mouse(0,0.1)*3 idle*4")
    result = gp.generate(s)
    assert result["video"] == tmp_path / "preview.gif" and not (tmp_path / "preview.mp4").exists()
    with Image.open(result["video"]) as gif:
        assert gif.n_frames == 9
        assert gif.size == (s["VIDEO_WIDTH"], s["VIDEO_HEIGHT"] + overlay.strip_height(s["VIDEO_HEIGHT"]))
    assert json.loads(result["json"].read_text())["panels"] == ["base"]


def test_chained_preview_warns_and_keeps_every_frame(tiny_assets, tmp_path, capsys):
    s = preview_settings(tiny_assets, tmp_path, "", WINDOW_FRAMES=5, OUTPUT=str(tmp_path / "long.gif"))
    result = gp.generate(s)
    assert re.search("warning: .*2 windows.*at frame 4.*bidirectional base model, not .*streaming",
                     capsys.readouterr().err, re.DOTALL)
    with Image.open(result["video"]) as gif:
        assert gif.n_frames == 9
    assert json.loads(result["json"].read_text())["windows"] == 2


def test_bad_inputs_are_clear(tiny_assets, tmp_path):
    s = preview_settings(tiny_assets, tmp_path, "", START_FRAME=75)
    with pytest.raises(GenerationError, match=r"START_FRAME=75 needs frames 75-83 without a gap \(NUM_FRAMES=9\), "
                                              "but its runs of consecutive frames are 1-80"):
        gp.load_inputs(s)
    scripted = gp.load_inputs(dict(s, ACTIONS="W*9"))  # a script needs only the first frame
    assert scripted.truth is None and scripted.keyboard.shape == (9, 4)
    with pytest.raises(GenerationError, match="START_FRAME=81 needs frame 81, but"):
        gp.load_inputs(dict(s, ACTIONS="W*9", START_FRAME=81))
    with pytest.raises(GenerationError, match="is not a recording"):
        gp.load_inputs(dict(s, RECORDING=str(tmp_path)))
    with pytest.raises(GenerationError, match="a picture, which has no recorded actions"):
        gp.load_inputs(dict(s, FIRST_FRAME=str(Path(s["RECORDING"]) / "frame_0001.png")))
    with pytest.raises(action_scripts.ActionScriptError, match="gives 5 rows but NUM_FRAMES is 9"):
        gp.load_inputs(dict(s, ACTIONS="W*5"))


# ----------------------------------------------------------------------------- overlay

def test_overlay_highlights_the_held_keys_and_points_the_mouse():
    height, width = 64, 112
    keyboard = torch.tensor([[1.0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    mouse = torch.tensor([[0.0, 0.2], [0.0, -0.2], [0.2, 0.0]])
    panels = {"x": np.full((3, height, width, 3), 10, np.uint8), "y": np.full((3, height, width, 3), 200, np.uint8)}
    video = overlay.compose_frames(panels, keyboard, mouse, KEYS)
    strip = overlay.strip_height(height)
    assert video.shape == (3, height + strip, 2 * width, 3)
    assert (video[:, 16:height, :width] == 10).all() and (video[:, 16:height, width:] == 200).all()
    boxes = overlay.key_boxes(KEYS, strip)

    def colour(t, key):
        x0, y0, _, _ = boxes[key]
        return tuple(video[t, height + y0 + 1, x0 + 1])

    assert colour(0, "W") == overlay.KEY_HELD and colour(0, "D") == overlay.KEY_IDLE
    assert colour(1, "W") == overlay.KEY_IDLE and colour(1, "D") == overlay.KEY_HELD
    assert all(colour(2, k) == overlay.KEY_IDLE for k in KEYS)
    # the arrow: yaw right, yaw left, pitch up
    right_of_keys = max(x1 for _, _, x1, _ in boxes.values())
    arrow = np.all(video[:, height:, right_of_keys:] == overlay.MOUSE_ARROW, axis=-1)
    columns = [np.nonzero(arrow[t].any(0))[0] for t in range(3)]
    rows = [np.nonzero(arrow[t].any(1))[0] for t in range(3)]
    centre_x, centre_y = (columns[0].min() + columns[1].max()) / 2, strip // 2
    assert columns[0].max() - centre_x > 5 and centre_x - columns[1].min() > 5
    assert rows[2].min() < centre_y - 5 and rows[2].max() <= centre_y + 3


# ----------------------------------------------------------------------------- the score on real motion

def test_demo_recording_scores_above_its_shuffled_actions(tmp_path):
    write_demo_recording(tmp_path / "rec", 120, 64, 112)
    s = {name: getattr(gp, name) for name in gp.SETTINGS.names}
    s.update(RECORDING=str(tmp_path / "rec"), START_FRAME=1, NUM_FRAMES=117, VIDEO_HEIGHT=64, VIDEO_WIDTH=112)
    inputs = gp.load_inputs(s)
    truth = previews.score_panels({"truth": inputs.truth}, inputs.keyboard, inputs.mouse, KEYS)["truth"]["overall"]
    blocks = torch.arange(117).split(8)
    for seed in range(3):
        order = torch.cat([blocks[i] for i in torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))])
        shuffled = previews.score_panels({"x": inputs.truth}, inputs.keyboard[order], inputs.mouse[order], KEYS)["x"]
        assert shuffled["overall"] < truth - 0.3, (seed, truth, shuffled["overall"])


def test_scoring_every_fourth_frame_measures_the_motion_across_four_frames(tmp_path):
    write_demo_recording(tmp_path / "rec", 40, 64, 112)
    s = {name: getattr(gp, name) for name in gp.SETTINGS.names}
    s.update(RECORDING=str(tmp_path / "rec"), START_FRAME=1, NUM_FRAMES=33, VIDEO_HEIGHT=64, VIDEO_WIDTH=112)
    inputs = gp.load_inputs(s)
    every = previews.score_panels({"x": inputs.truth}, inputs.keyboard, inputs.mouse, KEYS)["x"]
    fourth = previews.score_panels({"x": inputs.truth}, inputs.keyboard, inputs.mouse, KEYS, stride=4)["x"]
    steps = torch.tensor(every["motion"]["dx"]).view(8, 4).sum(1)  # four frames' shifts add up
    assert len(fourth["motion"]["dx"]) == 8 and steps.abs().max() > 2
    assert torch.allclose(torch.tensor(fourth["motion"]["dx"]), steps, atol=1.0), (fourth["motion"]["dx"], steps)
