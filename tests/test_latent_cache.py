import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

import convert_unreal_data as data
import latents.cache as latent_cache
from conftest import data_settings
from latents.dataset import CachedClipDataset
from recordings.clips import RecordingClipDataset
from recordings.report import check_data
from wan.clip import load_clip
from wan.conditioning import build_cond_concat
from wan.vae import load_vae


@pytest.fixture
def setup(tiny_assets, tmp_path):
    """A private copy of the tiny recording (tests modify frames) and its clips."""
    data_dir = tmp_path / "data"
    shutil.copytree(tiny_assets["DATA_DIR"], data_dir)
    s = dict(tiny_assets, DATA_DIR=str(data_dir), CACHE_DIR=str(tmp_path / "cache"))
    report = check_data(data_dir, data_settings(sequence_length=9, clip_stride=8, video_height=32, video_width=64))
    clips = report.clips[:4]
    return s, clips


def build(s, clips, **options):
    return latent_cache.build_latent_cache(clips, s["CACHE_DIR"], s["VAE_PATH"], s["CLIP_PATH"], 32, 64,
                                           dtype="fp32", num_workers=0, progress=False, device="cpu", **options)


def dataset(s, clips, report):
    return CachedClipDataset(clips, s["CACHE_DIR"], report.settings)


def test_cached_entries_are_the_real_encodings_and_are_reused(setup):
    s, clips = setup
    first = build(s, clips)
    assert (first.encoded, first.reused) == (4, 0)
    vae, clip_model = load_vae(s["VAE_PATH"]), load_clip(s["CLIP_PATH"])
    item = dataset(s, clips, first)[2]
    video = RecordingClipDataset([clips[2]], 32, 64)[0]["video"][None]
    # The build encoded the 4 clips in one call (encode_batch_size): equal to encoding this
    # clip alone up to the order of floating-point sums.
    assert latent_cache.encode_batch_size(clips, 32, 64) > 1
    close = dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(item["latents"], vae.encode(video)[0], **close)
    torch.testing.assert_close(item["cond_concat"], build_cond_concat(vae, video[:, :, 0], 9)[0], **close)
    torch.testing.assert_close(item["visual_context"], clip_model.encode_frames(video[:, :, 0])[0], **close)
    assert torch.equal(item["keyboard"], clips[2].keyboard) and torch.equal(item["mouse"], clips[2].mouse)
    assert (item["recording"], item["first_frame"]) == (clips[2].recording, clips[2].first_frame)

    again = build(s, clips)
    assert (again.encoded, again.reused) == (0, 4)
    assert torch.equal(dataset(s, clips, again)[2]["latents"], item["latents"])
    manifest = (latent_cache.LatentCache(s["CACHE_DIR"]).cache_dir / latent_cache.MANIFEST_NAME).read_text()
    assert clips[2].clip_id in manifest


def test_encode_batch_size_fills_the_pixel_budget_and_keeps_unequal_clips_apart(setup):
    _, clips = setup
    per_clip = 9 * 32 * 64
    assert latent_cache.encode_batch_size(clips, 32, 64) == min(latent_cache.MAX_ENCODE_BATCH,
                                                                  latent_cache.ENCODE_BATCH_PIXELS // per_clip)
    assert latent_cache.encode_batch_size(clips, 352, 640) == 1  # 9 frames of 352x640: 2 Mpx
    shorter = dataclasses.replace(clips[1], frame_paths=clips[1].frame_paths[:5])
    assert latent_cache.encode_batch_size([clips[0], shorter], 32, 64) == 1


def test_changed_frame_invalidates_exactly_the_clips_that_use_it(setup):
    s, clips = setup
    build(s, clips)
    frame = clips[1].frame_paths[3]  # only in clip 1 (clips are 9 frames, 8 apart)
    assert sum(frame in c.frame_paths for c in clips) == 1
    shutil.copy(clips[0].frame_paths[0], frame)
    os.utime(frame, ns=(1, 1))
    report = build(s, clips)
    assert (report.encoded, report.reused) == (1, 3)
    assert list(report.reasons) == ["its frame files changed (size or modification time: re-exported, or copied "
                                    "without their times)"] and report.reasons[list(report.reasons)[0]] == 1


def test_changed_encoder_file_invalidates_everything(setup):
    s, clips = setup
    build(s, clips)
    os.utime(s["VAE_PATH"], ns=(2, 2))
    try:
        report = build(s, clips)
        assert report.encoded == 4
        assert report.reasons == {"VAE_PATH's file differs from the one it was encoded with (name, size or "
                                  "modification time)": 4}
    finally:
        os.utime(s["VAE_PATH"])


def test_the_report_says_which_setting_made_the_cache_encode_again(setup, capsys):
    """CACHE_DTYPE changed: every clip is encoded again, and the build says so before it
    starts (and in its report); clips the cache never held are new; entries of an older
    cache that recorded no settings get the honest 'not recorded'."""
    s, clips = setup

    def build_as(dtype, chosen, progress=False):
        return latent_cache.build_latent_cache(chosen, s["CACHE_DIR"], s["VAE_PATH"], s["CLIP_PATH"], 32, 64,
                                               dtype=dtype, num_workers=0, progress=progress, device="cpu")

    first = build_as("fp32", clips[:3])
    assert first.reasons == {latent_cache.NEW_CLIPS: 3}
    capsys.readouterr()
    again = build_as("bf16", clips, progress=True)
    change = "CACHE_DTYPE differs (cached as fp32, now bf16)"
    assert again.reasons == {change: 3, latent_cache.NEW_CLIPS: 1}
    assert f"encoding 4 clip(s) - 3: {change}; 1: {latent_cache.NEW_CLIPS}" in capsys.readouterr().out
    assert f"encoded 3 clip(s): {change}" in again.format()

    for sidecar in (Path(s["CACHE_DIR"]) / "shards").glob("*.json"):  # as an older version wrote them
        info = json.loads(sidecar.read_text())
        for entry in info["entries"].values():
            entry.pop("settings")
        sidecar.write_text(json.dumps(info))
    older = build_as("fp32", clips[3:], progress=False)  # clip 3 was only encoded as bf16
    assert list(older.reasons) == ["the cache holds it under other settings that its older entries do not record "
                                   "(CACHE_DTYPE, the frame size, the VAE or CLIP file, or the frames)"]


def test_interrupted_build_resumes_where_it_stopped(setup, monkeypatch):
    s, clips = setup
    monkeypatch.setattr(latent_cache, "SHARD_CLIPS", 2)
    real_write = latent_cache.LatentCache.write_shard
    calls = []

    def write_then_die(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt("killed")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(latent_cache.LatentCache, "write_shard", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        build(s, clips)
    monkeypatch.setattr(latent_cache.LatentCache, "write_shard", real_write)
    report = build(s, clips)
    assert (report.reused, report.encoded) == (2, 2)


def test_shard_without_sidecar_is_removed_once_old_and_re_encoded(setup):
    s, clips = setup
    build(s, clips)
    cache = latent_cache.LatentCache(s["CACHE_DIR"])
    (shard,) = cache.shards
    (cache.shard_dir / shard).with_suffix(".json").unlink()  # killed between the two writes
    report = build(s, clips)  # a fresh one may be another process's build in progress: kept
    assert report.removed_strays == 0 and report.encoded == 4 and (cache.shard_dir / shard).exists()
    old = time.time() - latent_cache.STRAY_AGE_SECONDS - 1
    os.utime(cache.shard_dir / shard, (old, old))
    report = build(s, clips)
    assert report.removed_strays == 1 and report.encoded == 0
    assert not (cache.shard_dir / shard).exists()


def test_ranks_split_the_clips_by_position_whatever_the_others_wrote(setup):
    s, clips = setup
    # rank 1 of 2 builds first; rank 0 then sees rank 1's shard but still encodes exactly its own
    second = build(s, clips, rank=1, world_size=2)
    first = build(s, clips, rank=0, world_size=2)
    assert (second.encoded, first.encoded) == (2, 2)
    cache = latent_cache.LatentCache(s["CACHE_DIR"])
    assert len(CachedClipDataset(clips, s["CACHE_DIR"], first.settings, cache)) == 4


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_damaged_shard_is_detected_never_read_and_rebuilt(setup, damage):
    s, clips = setup
    first = build(s, clips)
    cache = latent_cache.LatentCache(s["CACHE_DIR"])
    (shard,) = cache.shards
    path = cache.shard_dir / shard
    raw = bytearray(path.read_bytes())
    if damage == "truncate":
        path.write_bytes(raw[: len(raw) // 2])
    else:
        raw[-100] ^= 0xFF  # inside the tensor data: the header still parses
        path.write_bytes(raw)
    with pytest.raises(latent_cache.CacheError, match="sha256|truncated"):
        dataset(s, clips, first)
    report = build(s, clips)
    assert report.encoded == 4 and len(report.rebuilt_shards) == 1 and shard in report.rebuilt_shards[0]
    assert len(dataset(s, clips, report)) == 4


def test_dataset_names_missing_clips(setup):
    s, clips = setup
    report = build(s, clips[:2])
    with pytest.raises(latent_cache.CacheError, match="lacks 2 of 4 clips") as error:
        dataset(s, clips, report)
    assert clips[3].clip_id in str(error.value) and "--cache" in str(error.value)


def test_dataset_works_with_loader_workers(setup):
    s, clips = setup
    report = build(s, clips)
    ds = dataset(s, clips, report)
    batches = list(DataLoader(ds, batch_size=2, num_workers=2))
    assert torch.equal(torch.cat([b["latents"] for b in batches]), torch.stack([ds[i]["latents"] for i in range(4)]))


def test_missing_encoder_files_are_a_clear_error(setup, tmp_path):
    s, clips = setup
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        latent_cache.build_latent_cache(clips, s["CACHE_DIR"], tmp_path / "nowhere.pth", s["CLIP_PATH"], 32, 64)


def test_cli_check_then_cache_reuses_on_the_second_run(setup, capsys):
    s, _ = setup
    args = [s["DATA_DIR"], "--cache", f"--CACHE_DIR={s['CACHE_DIR']}", f"--VAE_PATH={s['VAE_PATH']}",
            f"--CLIP_PATH={s['CLIP_PATH']}", "--VIDEO_HEIGHT=32", "--VIDEO_WIDTH=64", "--SEQUENCE_LENGTH=17",
            "--CLIP_STRIDE=16", "--CACHE_DTYPE=fp32"]
    assert data.main(args) == 0
    out = capsys.readouterr().out
    # what training reads: train and validation clips, not those dropped to keep validation apart
    split = check_data(s["DATA_DIR"], data_settings(sequence_length=17, clip_stride=16, video_height=32, video_width=64)).split
    used = len(split.used)
    assert split.dropped and used == len(split.train) + len(split.val) < 4
    assert "Problems: none" in out and f"{used} clips, 0 reused, {used} encoded" in out
    assert data.main(args) == 0
    assert f"{used} clips, {used} reused, 0 encoded" in capsys.readouterr().out
    assert data.main(args[:3] + ["--VAE_PATH=/nowhere/vae.pth"] + args[4:]) == 1
    assert "/nowhere/vae.pth" in capsys.readouterr().err
