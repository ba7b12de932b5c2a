"""Hostile and broken input: nothing in a user's files runs code, deletes data outside its
folder or loses a run; every bad file or setting gets a message that names it."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import convert_unreal_data as data
import finetune_base_model as fb
import generate_preview as gp
from cli.settings import SettingsError
from conftest import REPO_ROOT, data_settings
from generation.action_scripts import ActionScriptError, parse_action_script
from latents.cache import LatentCache, build_latent_cache
from recordings.errors import DataError
from recordings.report import check_data
from runs.errors import TrainingError
from runs.folder import METRICS_FILE, STATE_FILE
from wan import files
from wan.clip import CLIPVisionConfig, CLIPVisionTower, load_clip, visual_state_dict
from wan.loading import CheckpointError


def run_settings(tiny_assets, tmp_path, **changes) -> dict:
    s = dict(tiny_assets, CHECKPOINT_DIR=str(tmp_path / "checkpoints"), NUM_EPOCHS=1, BATCH_SIZE=2,
             GRAD_ACCUM_STEPS=1, NUM_WORKERS=0, SAVE_EVERY_EPOCHS=1, PREVIEW_EVERY_EPOCHS=0)
    s.update(changes)
    fb.check_settings(s)
    return s


# ----------------------------------------------------------------------------- must fix 1: no code runs on resume

class Payload:
    """What a hostile state file could carry: unpickling it would create a file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_a_state_file_that_would_run_code_is_refused_not_run(tiny_assets, tmp_path):
    s = run_settings(tiny_assets, tmp_path)
    fb.train(s)
    marker = tmp_path / "pwned.txt"
    state_path = Path(s["CHECKPOINT_DIR"]) / STATE_FILE
    torch.save({"settings": {}, "evil": Payload(str(marker))}, state_path)
    with pytest.raises(TrainingError, match=f"cannot read the saved training state {state_path}: it holds objects "
                                            "other than tensors.*never loaded.*another CHECKPOINT_DIR"):
        fb.train(dict(s, RESUME=True, NUM_EPOCHS=2))
    assert not marker.exists()


def test_a_truncated_state_file_is_named_with_what_to_do(tiny_assets, tmp_path):
    s = run_settings(tiny_assets, tmp_path)
    fb.train(s)
    state_path = Path(s["CHECKPOINT_DIR"]) / STATE_FILE
    state_path.write_bytes(state_path.read_bytes()[:1000])
    with pytest.raises(TrainingError, match="it is truncated or corrupt. Restore the file from a backup"):
        fb.train(dict(s, RESUME=True, NUM_EPOCHS=2))


def test_the_state_file_holds_only_what_weights_only_reads(tiny_assets, tmp_path):
    s = run_settings(tiny_assets, tmp_path, EMA_DECAY=0.9)
    fb.train(s)
    state = torch.load(Path(s["CHECKPOINT_DIR"]) / STATE_FILE, weights_only=True)
    assert state["global_step"] > 0 and state["ema"] and state["schedule"]["total"] > 0


def test_no_torch_load_in_the_project_unpickles():
    offenders = subprocess.run(["git", "grep", "-n", "weights_only *= *False", "--", "*.py", ":!tests"],
                               cwd=REPO_ROOT, capture_output=True, text=True).stdout
    assert offenders == ""


# ----------------------------------------------------------------------------- must fix 2: the cache's own paths

def test_a_sidecar_naming_a_file_outside_the_cache_is_ignored_and_that_file_kept(tiny_assets, tmp_path):
    cache_dir = tmp_path / "cache"
    report = check_data(tiny_assets["DATA_DIR"], data.data_settings(tiny_assets))
    clips = report.split.used[:2]
    args = (clips, cache_dir, tiny_assets["VAE_PATH"], tiny_assets["CLIP_PATH"], tiny_assets["VIDEO_HEIGHT"],
            tiny_assets["VIDEO_WIDTH"])
    build_latent_cache(*args, dtype="fp32", num_workers=0, progress=False, device="cpu")
    victim = tmp_path / "precious.safetensors"
    victim.write_bytes(b"a user's file that does not match any sidecar")
    sidecar = next((cache_dir / "shards").glob("shard-*.json"))
    info = json.loads(sidecar.read_text())
    info["file"] = "../../precious.safetensors"
    sidecar.write_text(json.dumps(info))
    cache = LatentCache(cache_dir)
    assert cache.corrupt and "corrupt cache entry" in cache.corrupt[0] and not cache.entries
    rebuilt = build_latent_cache(*args, dtype="fp32", num_workers=0, progress=False, device="cpu")
    assert rebuilt.encoded == 2 and "corrupt cache entry" in rebuilt.format()
    assert victim.read_bytes() == b"a user's file that does not match any sidecar"
    info["file"] = str(victim.resolve())  # an absolute path: the same
    sidecar.write_text(json.dumps(info))
    assert LatentCache(cache_dir).corrupt and victim.exists()


# ----------------------------------------------------------------------------- must fix 3: one run per folder

HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from wan.files import FolderLock
FolderLock(sys.argv[1], "training run").acquire()
print("locked", flush=True)
time.sleep(60)
"""


def hold_lock(folder: Path):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER.format(repo=str(REPO_ROOT)), str(folder)],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_run_in_the_same_folder_exits_at_once_naming_the_first(tiny_assets, tmp_path):
    s = run_settings(tiny_assets, tmp_path)
    holder = hold_lock(Path(s["CHECKPOINT_DIR"]))
    try:
        started = time.time()
        with pytest.raises(files.FolderInUseError, match=f"{s['CHECKPOINT_DIR']} is in use by another training "
                                                         f"run: process {holder.pid} "):
            fb.train(s)
        assert time.time() - started < 10
        assert not (Path(s["CHECKPOINT_DIR"]) / STATE_FILE).exists()
    finally:
        holder.kill()
        holder.wait()
    fb.train(s)  # the holder was killed: its lock went with it, nothing stale is left


def test_two_cache_builds_never_write_the_same_cache_at_once(tiny_assets, tmp_path):
    report = check_data(tiny_assets["DATA_DIR"], data.data_settings(tiny_assets))
    holder = hold_lock(tmp_path / "cache")
    try:
        with pytest.raises(files.FolderInUseError, match="cache is in use by another"):
            build_latent_cache(report.split.used[:1], tmp_path / "cache", tiny_assets["VAE_PATH"],
                               tiny_assets["CLIP_PATH"], tiny_assets["VIDEO_HEIGHT"], tiny_assets["VIDEO_WIDTH"],
                               num_workers=0, progress=False, device="cpu")
    finally:
        holder.kill()
        holder.wait()


# ----------------------------------------------------------------------------- must fix 4: absurd frame numbers

def write_frames(folder: Path, numbers, rows: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n in numbers:
        Image.new("RGB", (64, 32), (n % 256, 0, 0)).save(folder / f"frame_{n:04d}.png")
    (folder / "input.csv").write_text(rows if rows is not None else
                                      "".join(f"W,{i * 0.04:.2f},{n}\n" for i, n in enumerate(numbers)))
    return folder


def test_a_huge_frame_number_is_reported_by_file_without_allocating_for_it(tmp_path):
    folder = write_frames(tmp_path / "rec", range(1, 10))
    Image.new("RGB", (64, 32)).save(folder / "frame_1000000000000.png")
    report = check_data(tmp_path, data_settings(sequence_length=5, video_height=32, video_width=64))
    assert any("frame_1000000000000.png" in p and "implausibly large" in p for p in report.problems)


def test_a_huge_frame_number_in_the_csv_is_reported_by_line(tmp_path):
    write_frames(tmp_path / "rec", range(1, 10), "W,0,1\nW,0.04,1000000000000\n")
    with pytest.raises(DataError, match=r"input.csv:2: frame number '1000000000000' is not a whole number from 0 to 1,000,000,000"):
        check_data(tmp_path, data_settings(sequence_length=5, video_height=32, video_width=64)).raise_for_problems()


def test_far_apart_frames_cost_one_row_each(tmp_path):
    write_frames(tmp_path / "rec", [*range(1, 6), *range(900_000_001, 900_000_006)])
    report = check_data(tmp_path, data_settings(sequence_length=5, clip_stride=5, val_fraction=0,
                                                video_height=32, video_width=64))
    recording = report.recordings[0]
    assert recording.keyboard.shape == (10, 4) and len(report.clips) == 2
    assert report.clips[1].first_frame == 900_000_001 and report.clips[1].keyboard[:, 0].all()


# ----------------------------------------------------------------------------- settings

@pytest.mark.parametrize("override,message", [
    ("--TIMESTEP_SHIFT=0", "TIMESTEP_SHIFT=0.0: must be a positive number"),
    ("--TIMESTEP_SHIFT=-1", "TIMESTEP_SHIFT=-1.0: must be a positive number"),
    ("--LEARNING_RATE=nan", "LEARNING_RATE=nan: must be a positive number"),
    ("--VAL_FRACTION=1", "VAL_FRACTION=1.0: must be in \\[0, 1\\)"),
    ("--SEQUENCE_LENGTH=56", "SEQUENCE_LENGTH has 56 frames.*4k\\+1"),
    ("--VIDEO_HEIGHT=100", "VIDEO_HEIGHT=100: must be a positive multiple of 16"),
    ("--DEVICE=bogus", "DEVICE='bogus' is not a device: use auto, cpu, cuda or cuda:N"),
    ("--SAVE_EVERY_STEPS=-2", "SAVE_EVERY_STEPS=-2: must be at least 0"),
])
def test_every_range_is_checked_once_and_named(override, message):
    with pytest.raises(SettingsError, match=message):
        fb.parse_settings([override])


def test_the_preview_checks_the_same_ranges():
    with pytest.raises(SettingsError, match="TIMESTEP_SHIFT=0.0: must be a positive number"):
        gp.parse_settings(["--TIMESTEP_SHIFT=0"])
    with pytest.raises(SettingsError, match="NUM_FRAMES=1: a preview needs at least 5 frames"):
        gp.parse_settings(["--NUM_FRAMES=1"])


@pytest.mark.parametrize("script", [fb, gp, data])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_every_setting_with_its_value_and_comment(script, flag, capsys):
    assert script.main([flag, "--SEED=7"] if "SEED" in script.SETTINGS.names else [flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python ")
    for name in script.SETTINGS.names:
        assert f"  {name} = " in out, name
        assert script.SETTINGS.descriptions[name], f"{name} has no comment in its settings block"
    if "SEED" in script.SETTINGS.names:
        assert "  SEED = 7" in out  # the values as this command line sets them
    assert "--demo" in out


def test_output_folders_that_are_files_are_refused_before_any_work(tmp_path):
    regular = tmp_path / "a_file"
    regular.write_text("x")
    for name in ("CHECKPOINT_DIR", "CACHE_DIR"):
        with pytest.raises(SettingsError, match=f"{name}={regular} is a file, not a folder"):
            fb.parse_settings([f"--{name}={regular}"])


def test_a_wrong_base_model_dir_fails_before_the_cache_is_encoded(tiny_assets, tmp_path):
    s = run_settings(tiny_assets, tmp_path, BASE_MODEL_DIR=str(tmp_path / "nowhere"),
                     CACHE_DIR=str(tmp_path / "fresh_cache"))
    with pytest.raises(CheckpointError, match="nowhere does not exist"):
        fb.train(s)
    assert not (tmp_path / "fresh_cache").exists()
    broken_vae = tmp_path / "vae.pth"
    broken_vae.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=f"could not read the VAE checkpoint {broken_vae}"):
        fb.train(dict(s, BASE_MODEL_DIR=tiny_assets["BASE_MODEL_DIR"], VAE_PATH=str(broken_vae)))
    assert not (tmp_path / "fresh_cache").exists()


@pytest.mark.slow
def test_a_folder_name_that_is_not_utf8_trains(tiny_assets, tmp_path):
    odd = Path(os.fsdecode(bytes(tmp_path) + b"/take\xff"))
    shutil.copytree(tiny_assets["DATA_DIR"], odd)
    s = run_settings(tiny_assets, tmp_path, DATA_DIR=str(odd), CACHE_DIR=str(tmp_path / "cache"))
    fb.train(s)
    assert "take\\xff" in (Path(s["CHECKPOINT_DIR"]) / fb.INFO_FILE).read_text()


# ----------------------------------------------------------------------------- resume

def test_resume_accepts_the_same_folder_written_another_way(tiny_assets, tmp_path):
    s = run_settings(tiny_assets, tmp_path)
    fb.train(s)
    elsewhere = os.path.relpath(s["DATA_DIR"], os.getcwd())
    fb.train(dict(s, RESUME=True, NUM_EPOCHS=2, DATA_DIR=str(Path(elsewhere) / "." )))


def test_resume_refuses_edited_validation_actions(tiny_assets, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_assets["DATA_DIR"], data_dir)
    s = run_settings(tiny_assets, tmp_path, DATA_DIR=str(data_dir))
    fb.train(s)
    split = check_data(data_dir, data.data_settings(s)).split
    frame = split.val[0].first_frame + 2
    csv_path = data_dir / "input.csv"
    lines = csv_path.read_text().splitlines()
    row = next(i for i, line in enumerate(lines) if line.split(",")[2] == str(frame))
    keys, *rest = lines[row].split(",")
    lines[row] = ",".join(["S" if keys != "S" else "W", *rest])
    csv_path.write_text("\n".join(lines) + "\n")
    with pytest.raises(TrainingError, match="the validation clips' keyboard or mouse rows differ"):
        fb.train(dict(s, RESUME=True, NUM_EPOCHS=2))


def test_a_malformed_metrics_line_is_named(tiny_assets, tmp_path):
    s = run_settings(tiny_assets, tmp_path)
    fb.train(s)
    metrics = Path(s["CHECKPOINT_DIR"]) / METRICS_FILE
    metrics.write_text(metrics.read_text() + "3,1,oops\n")
    with pytest.raises(TrainingError, match=f"{metrics}:\\d+: not a metrics row"):
        fb.train(dict(s, RESUME=True, NUM_EPOCHS=2))


def test_a_killed_write_s_temp_files_are_removed_and_reported(tiny_assets, tmp_path, capsys):
    s = run_settings(tiny_assets, tmp_path)
    out = Path(s["CHECKPOINT_DIR"])
    out.mkdir(parents=True)
    (out / ".training_state.pt.k3j_9x2a.tmp").write_bytes(b"half")
    (out / "previews").mkdir()
    (out / "previews" / ".epoch1.mp4.abcdefgh.tmp").write_bytes(b"half")
    (out / ".notes.tmp").write_text("not ours: kept")
    fb.train(s)
    assert "removed 2 unfinished temporary file(s)" in capsys.readouterr().out
    assert sorted(p.name for p in out.rglob("*.tmp")) == [".notes.tmp"]


def test_a_nan_before_any_save_says_nothing_was_saved(tiny_assets, tmp_path, monkeypatch):
    s = run_settings(tiny_assets, tmp_path)
    import training.recipe

    real = training.recipe.flow_matching_step
    monkeypatch.setattr(training.recipe, "flow_matching_step", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(TrainingError, match="nothing was saved yet in"):
        fb.train(s)


# ----------------------------------------------------------------------------- a full disk

def test_a_full_disk_says_so_and_keeps_the_earlier_file(tmp_path, monkeypatch):
    target = tmp_path / "state.pt"
    files.torch_save_atomic({"step": 1}, target)

    def full(tmp):
        with open(tmp, "wb") as f:
            f.write(b"part of it")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(files.shutil, "disk_usage", lambda _: shutil._ntuple_diskusage(10**9, 10**9 - 512, 512))
    with pytest.raises(files.DiskFullError, match=f"no space left on the device holding {tmp_path} while writing "
                                                  "state.pt: 4,096 bytes needed, 512 free.*earlier files"):
        files.write_atomic(target, full, size_hint=4096)
    assert torch.load(target)["step"] == 1 and os.listdir(tmp_path) == ["state.pt"]
    with pytest.raises(files.DiskFullError):
        files.write_atomic(target, lambda tmp: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left")))


def test_a_real_full_disk_when_this_machine_can_mount_one(tmp_path):
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        files.save_safetensors_atomic({"a": torch.zeros(10)}, mount / "w.safetensors")
        with pytest.raises(files.DiskFullError, match="bytes needed"):
            files.save_safetensors_atomic({"a": torch.zeros(1 << 20)}, mount / "w.safetensors")
        assert torch.equal(load_file(mount / "w.safetensors")["a"], torch.zeros(10))
        with pytest.raises(files.DiskFullError, match="bytes needed"):
            files.torch_save_atomic({"a": torch.zeros(1 << 20)}, mount / "state.pt")
        assert sorted(os.listdir(mount)) == ["w.safetensors"]
    finally:
        subprocess.run(["umount", str(mount)])


# ----------------------------------------------------------------------------- previews

def test_a_checkpoint_that_is_not_safetensors_is_named(tiny_assets, tmp_path):
    bad = tmp_path / "final.safetensors"
    bad.write_bytes(b"\x00" * 10)
    from generation.finetuned import load_model

    with pytest.raises(CheckpointError, match=f"{bad}: not a readable .safetensors file.*training script wrote"):
        load_model(tiny_assets["BASE_MODEL_DIR"], str(bad), ("W", "S", "A", "D"), "cpu", torch.float32)


def test_a_truncated_checkpoint_is_named(tiny_assets, tmp_path):
    from generation.finetuned import load_model

    model_file = next(Path(tiny_assets["BASE_MODEL_DIR"]).glob("*.safetensors"))
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(model_file.read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match=f"{cut}"):
        load_model(tiny_assets["BASE_MODEL_DIR"], str(cut), ("W", "S", "A", "D"), "cpu", torch.float32)


def test_huge_repeat_counts_are_refused_before_any_row_is_made():
    with pytest.raises(ActionScriptError, match="more than the 57 frames asked for"):
        parse_action_script("W*99999999999", "WSAD", max_rows=57)
    with pytest.raises(ActionScriptError, match="positive whole number"):
        parse_action_script("W*" + "9" * 5000, "WSAD")


# ----------------------------------------------------------------------------- input files

def test_a_utf16_csv_is_said_to_be_not_utf8(tmp_path):
    folder = write_frames(tmp_path / "rec", range(1, 6), "")
    (folder / "input.csv").write_bytes("key,time,frame\nW,0,1\n".encode("utf-16-le"))
    with pytest.raises(DataError, match="not UTF-8 text - it holds NUL bytes \\(UTF-16\\?\\)"):
        check_data(tmp_path, data_settings(sequence_length=5)).raise_for_problems()


def test_safetensors_files_get_the_usual_permissions(tmp_path):
    mask = os.umask(0o022)
    try:
        path = files.save_safetensors_atomic({"a": torch.zeros(2)}, tmp_path / "w.safetensors")
    finally:
        os.umask(mask)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_clip_file_missing_its_last_block_is_refused_with_the_keys_listed(tmp_path):
    full = CLIPVisionConfig()
    with torch.device("meta"):
        tower = CLIPVisionTower(full)
    state = {k: v for k, v in visual_state_dict(tower).items()
             if not k.startswith(f"visual.transformer.{full.layers - 1}.")}
    path = tmp_path / "clip.pth"
    # the official tower's shapes without the tensors (meta): pickled by torch.save like the real file
    torch.save({k: torch.zeros(1).as_strided(v.shape, [0] * len(v.shape)) for k, v in state.items()}, path)
    with pytest.raises(ValueError, match=f"missing visual.transformer.{full.layers - 1}.attn"):
        load_clip(path)
