"""The latent cache: each clip's VAE latents and first-frame conditioning, encoded once.

Training never sees pixels. For every clip it needs the normalised VAE latents of the clip
[16, F, h, w], the VAE latent of "first frame + zero frames" (the image half of
cond_concat) and the CLIP tokens of the first frame. Encoding them costs far more than a
training step of the action modules, so they are computed once and stored here:

    CACHE_DIR/shards/shard-*.safetensors   tensors "<key>/latents", "<key>/first_frame_latent",
                                           "<key>/visual_context" for up to SHARD_CLIPS clips
    CACHE_DIR/shards/shard-*.json          the shard's sidecar: sha256, size, entries
    CACHE_DIR/manifest.json                every entry and shard, merged from the sidecars

An entry's key is a hash of everything that determines it: the frame files (name, size,
mtime), the clip's place in its recording, the frame size, the storage dtype and the
identity of the VAE and CLIP files. Change any of them and the key changes, so stale
entries are never served; they are rebuilt under the new key. A shard is written before
its sidecar (both atomically), so a killed build loses at most the shard in progress, and
a shard whose bytes no longer match its sidecar's sha256 is deleted and rebuilt, never read.

Actions (keyboard, mouse) are not cached: they are cheap to parse and depend on KEY_MAP,
MOUSE_SCALE and KEYBOARD_KEYS, which a user should be able to change without re-encoding.
"""

import hashlib
import json
import os
import time
import uuid
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from latents.encoders import encode_clip_batch, load_encoders
from recordings.clips import ClipRef, RecordingClipDataset
from runs.progress import ProgressBar
from wan.device import pick_device
from wan.files import FolderLock, save_safetensors_atomic, write_json_atomic
from wan.shapes import latent_size

CACHE_FORMAT_VERSION = 1
SHARD_CLIPS = 16          # clips per shard: a killed build loses at most this many encodings
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
TENSOR_NAMES = ("latents", "first_frame_latent", "visual_context")
MANIFEST_NAME = "manifest.json"
STRAY_AGE_SECONDS = 600   # an unfinished shard this old is a killed build's, not one in progress
HASH_BLOCK = 16 << 20
# Clips per VAE/CLIP call: small clips share a call, since every convolution call has a fixed
# cost that one small clip cannot amortise (the demo's 17 frames of 64x112 encode 2.5-3x
# faster per clip in twos to eights than one at a time on the CPU, no faster in eights than
# in fours: bench/bench_cache.py). A call holds at most ENCODE_BATCH_PIXELS pixels, so a
# real-size clip (57 frames of 352x640, 12.8 Mpx) goes alone.
ENCODE_BATCH_PIXELS = 2_000_000
MAX_ENCODE_BATCH = 4


class CacheError(RuntimeError):
    """The cache cannot serve what was asked; the message says what is missing and what to run."""


# -----------------------------------------------------------------------------
# Keys

def file_identity(path) -> dict:
    """What identifies a file's content cheaply: its name, size and modification time."""
    stat = os.stat(path)
    return {"name": Path(path).name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


@dataclass(frozen=True)
class EncodingSettings:
    """Everything besides the frames that determines a cache entry."""

    height: int
    width: int
    dtype: str
    vae: dict = field(hash=False)
    clip: dict = field(hash=False)

    @classmethod
    def for_files(cls, vae_path, clip_path, height: int, width: int, dtype: str = "bf16") -> "EncodingSettings":
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"CACHE_DTYPE must be one of {sorted(CACHE_DTYPES)}, got {dtype!r}")
        latent_size(height, width)  # validates the size
        missing = [str(p) for p in (vae_path, clip_path) if not Path(p).is_file()]
        if missing:
            raise FileNotFoundError(
                "the latent cache is keyed by the encoder files, and these are missing: " + ", ".join(missing)
                + " (see FINETUNING_GUIDE.md, 'Set-up', for where the VAE and CLIP weights go)")
        return cls(height, width, dtype, file_identity(vae_path), file_identity(clip_path))


def clip_key(clip: ClipRef, settings: EncodingSettings) -> str:
    payload = {
        "format": CACHE_FORMAT_VERSION,
        "recording": clip.recording,
        "first_frame": clip.first_frame,
        "frames": [file_identity(p) for p in clip.frame_paths],
        "settings": asdict(settings),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:40]


def sha256_of_file(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


# -----------------------------------------------------------------------------
# The cache folder

class LatentCache:
    """The shards of one cache folder, as their sidecars describe them."""

    def __init__(self, cache_dir):
        self.cache_dir = Path(cache_dir)
        self.shard_dir = self.cache_dir / "shards"
        self.shards: dict[str, dict] = {}    # shard file name -> sidecar
        self.entries: dict[str, str] = {}    # key -> shard file name
        self.verified: set[str] = set()      # shards whose sha256 was checked in this process
        self.corrupt: list[str] = []         # sidecars refused by rescan, with why
        self.rescan()

    def rescan(self) -> None:
        """Read every sidecar again (shards written by other processes appear).

        A sidecar may only describe its own twin, the .safetensors file of the same name
        beside it: a file name in it that points anywhere else (another shard, '..', an
        absolute path) makes it a corrupt entry, reported in `corrupt` and never acted on.
        """
        self.shards, self.entries, self.corrupt = {}, {}, []
        if not self.shard_dir.is_dir():
            return
        for sidecar in sorted(self.shard_dir.glob("shard-*.json")):
            try:
                info = json.loads(sidecar.read_text())
                name = info["file"]
                entries = info["entries"]
                if not isinstance(entries, dict) or not all(isinstance(k, str) for k in entries):
                    raise TypeError("'entries' is not an object of clip keys")
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise CacheError(f"{sidecar}: unreadable cache sidecar ({error}); delete it and its "
                                 ".safetensors file to have those clips re-encoded") from error
            twin = sidecar.with_suffix(".safetensors").name
            if name != twin:
                self.corrupt.append(f"{sidecar}: corrupt cache entry: it names the shard {str(name)[:200]!r} instead "
                                    f"of its own {twin!r}; ignored (no file it names is read or deleted) and its "
                                    "clips are re-encoded - delete this sidecar")
                continue
            self.shards[name] = info
            for key in entries:
                self.entries[key] = name

    def stray_files(self, older_than: float = 0.0) -> list[Path]:
        """Shards without a sidecar (a build killed between the two writes) and temp files,
        last modified more than older_than seconds ago (younger ones may be another
        process's build in progress)."""
        if not self.shard_dir.is_dir():
            return []
        now = time.time()
        return [p for p in self.shard_dir.iterdir()
                if (p.name.endswith(".tmp") or (p.suffix == ".safetensors" and p.name not in self.shards))
                and now - p.stat().st_mtime > older_than]

    def remove_shard(self, name: str, delete_files: bool = True) -> None:
        if delete_files:
            for path in (self.shard_dir / name, self.shard_dir / Path(name).with_suffix(".json").name):
                path.unlink(missing_ok=True)
        self.verified.discard(name)
        self.shards.pop(name, None)
        self.entries = {k: s for k, s in self.entries.items() if s != name}

    def check_shard(self, name: str) -> str | None:
        """None if the shard's bytes match its sidecar, else what is wrong."""
        if name in self.verified:
            return None
        info, path = self.shards[name], self.shard_dir / name
        if not path.is_file():
            return "file missing"
        size = path.stat().st_size
        if size != info["bytes"]:
            return f"{size} bytes, its sidecar says {info['bytes']} (truncated?)"
        if sha256_of_file(path) != info["sha256"]:
            return "sha256 differs from its sidecar (corrupt)"
        self.verified.add(name)
        return None

    def verify(self, keys, progress: bool = False, remove: bool = True) -> list[str]:
        """Check every shard holding one of keys; forget (and with remove, delete) the bad
        ones so that they are never read. Returns the problems."""
        names = sorted({self.entries[k] for k in keys if k in self.entries} - self.verified)
        problems = []
        bar = ProgressBar(len(names), "verifying cache shards", unit="shard", enabled=progress and bool(names))
        for name in names:
            problem = self.check_shard(name)
            if problem:
                problems.append(f"{self.shard_dir / name}: {problem}; its clips will be re-encoded")
                self.remove_shard(name, delete_files=remove)
            bar.update(1)
        bar.close()
        return problems

    def write_shard(self, tensors_by_key: dict[str, dict], descriptions: dict[str, dict], tag: str) -> str:
        name = f"shard-{tag}-{time.time_ns():x}-{uuid.uuid4().hex[:8]}.safetensors"
        path = self.shard_dir / name
        tensors = {f"{key}/{part}": t for key, parts in tensors_by_key.items() for part, t in parts.items()}
        save_safetensors_atomic(tensors, path, {"format": CACHE_FORMAT_VERSION})
        info = {"file": name, "bytes": path.stat().st_size, "sha256": sha256_of_file(path),
                "format": CACHE_FORMAT_VERSION, "entries": descriptions}
        write_json_atomic(path.with_suffix(".json"), info)
        self.shards[name] = info
        self.verified.add(name)
        for key in descriptions:
            self.entries[key] = name
        return name

    def write_manifest(self) -> Path:
        manifest = {
            "format": CACHE_FORMAT_VERSION,
            "shards": {name: {k: info[k] for k in ("bytes", "sha256")} for name, info in self.shards.items()},
            "entries": {key: {"shard": name, **self.shards[name]["entries"][key]} for key, name in self.entries.items()},
        }
        return write_json_atomic(self.cache_dir / MANIFEST_NAME, manifest)


# -----------------------------------------------------------------------------
# Building

@dataclass
class CacheReport:
    cache_dir: str
    settings: EncodingSettings | None = None
    clips: int = 0
    reused: int = 0
    encoded: int = 0
    rebuilt_shards: list = field(default_factory=list)
    corrupt_entries: list = field(default_factory=list)
    removed_strays: int = 0
    unused_entries: int = 0
    reasons: dict = field(default_factory=dict)   # why the encoded clips were encoded: reason -> clips
    device: str = ""
    seconds: float = 0.0

    def format(self) -> str:
        rate = f", {self.encoded / self.seconds:.2f} clips/s on {self.device}" if self.encoded and self.seconds else ""
        lines = [f"latent cache {self.cache_dir}: {self.clips} clips, {self.reused} reused, "
                 f"{self.encoded} encoded{rate}"]
        lines += [f"  encoded {count} clip(s): {reason}" for reason, count in self.reasons.items()]
        lines += [f"  rebuilt: {p}" for p in self.rebuilt_shards]
        lines += [f"  {p}" for p in self.corrupt_entries]
        if self.removed_strays:
            lines.append(f"  removed {self.removed_strays} incomplete shard file(s) left by an interrupted build")
        if self.unused_entries:
            lines.append(f"  {self.unused_entries} cached entries are not used by these clips (other data or "
                         "settings); delete the cache folder to reclaim their space")
        return "\n".join(lines)


def build_latent_cache(clips, cache_dir, vae_path, clip_path, height: int, width: int, dtype: str = "bf16",
                       device=None, batch_size: int | None = None, num_workers: int = 2, rank: int = 0,
                       world_size: int = 1, progress: bool = True,
                       cache: LatentCache | None = None) -> CacheReport:
    """Encode every clip that has no valid entry yet; reuse the rest.

    A single process locks the cache folder for the build (a second build there exits at
    once, naming the first). With world_size > 1 each rank encodes the missing clips among
    every world_size-th clip of `clips` (by position, so that the split does not depend on
    what the other ranks have written yet) into its own shards, while the main rank holds
    the lock (cache_lock); once all have finished, cache.rescan() on every rank and
    cache.write_manifest() on one. Pass the same `cache` to CachedClipDataset to skip
    verifying the shards twice. batch_size: clips per encoder call (default: encode_batch_size).
    """
    started = time.perf_counter()
    settings = EncodingSettings.for_files(vae_path, clip_path, height, width, dtype)
    with cache_lock(cache_dir) if world_size == 1 else nullcontext():
        keys = [clip_key(c, settings) for c in clips]
        cache = cache or LatentCache(cache_dir)
        report = CacheReport(cache_dir=str(cache_dir), clips=len(clips), settings=settings,
                             corrupt_entries=list(cache.corrupt))
        if world_size == 1:
            strays = cache.stray_files(older_than=STRAY_AGE_SECONDS)
            for path in strays:
                path.unlink(missing_ok=True)
            report.removed_strays = len(strays)
        report.rebuilt_shards = cache.verify(keys, progress=progress)
        report.reused = sum(k in cache.entries for k in keys)
        mine = [(c, k) for i, (c, k) in enumerate(zip(clips, keys)) if i % world_size == rank and k not in cache.entries]
        report.reasons = encoding_reasons(cache, [c for c, _ in mine], settings)
        if mine and progress:
            print(f"latent cache {cache_dir}: encoding {len(mine)} clip(s) - "
                  + "; ".join(f"{count}: {reason}" for reason, count in report.reasons.items()), flush=True)
        if mine:
            device = torch.device(device) if device is not None else pick_device("auto")
            report.device = str(device)
            batch_size = batch_size or encode_batch_size([c for c, _ in mine], height, width)
            encode_clips(cache, mine, vae_path, clip_path, height, width, dtype, device, batch_size, num_workers,
                         f"r{rank}", progress, asdict(settings))
            report.encoded = len(mine)
        if world_size == 1:
            cache.write_manifest()
    report.unused_entries = len(set(cache.entries) - set(keys))
    report.seconds = time.perf_counter() - started
    return report


NEW_CLIPS = "not in the cache yet"


def encoding_reasons(cache: LatentCache, clips, settings: EncodingSettings) -> dict[str, int]:
    """Why each of these clips (none of them served by the cache) is encoded: {reason: clips}.
    A clip the cache holds under other settings is encoded again because of what differs,
    which the reason names (CACHE_DTYPE, the frame size, the VAE or CLIP file, or the frames
    themselves); a clip it does not hold is new."""
    earlier = {}  # clip id -> the settings its cached entries were encoded with (None: not recorded)
    for info in cache.shards.values():
        for entry in info["entries"].values():
            if isinstance(entry, dict) and "clip" in entry:
                earlier.setdefault(entry["clip"], []).append(entry.get("settings"))
    reasons = Counter()
    current = asdict(settings)
    for clip in clips:
        recorded = earlier.get(clip.clip_id)
        if recorded is None:
            reasons[NEW_CLIPS] += 1
        elif current in recorded:
            reasons["its frame files changed (size or modification time: re-exported, or copied without their "
                    "times)"] += 1
        elif all(r is None for r in recorded):
            reasons["the cache holds it under other settings that its older entries do not record (CACHE_DTYPE, "
                    "the frame size, the VAE or CLIP file, or the frames)"] += 1
        else:
            reasons[settings_change(next(r for r in recorded if r is not None), current)] += 1
    return dict(reasons)


def settings_change(cached: dict, now: dict) -> str:
    """What differs between the settings a clip was cached with and these, in setting names."""
    changes = []
    if cached.get("dtype") != now["dtype"]:
        changes.append(f"CACHE_DTYPE differs (cached as {cached.get('dtype')}, now {now['dtype']})")
    if (cached.get("height"), cached.get("width")) != (now["height"], now["width"]):
        changes.append(f"the frame size differs (cached at {cached.get('width')}x{cached.get('height')}, now "
                       f"{now['width']}x{now['height']}: VIDEO_WIDTH x VIDEO_HEIGHT)")
    for part, setting in (("vae", "VAE_PATH"), ("clip", "CLIP_PATH")):
        if cached.get(part) != now[part]:
            changes.append(f"{setting}'s file differs from the one it was encoded with (name, size or "
                           "modification time)")
    return "; ".join(changes) or "its frame files changed"


def encode_batch_size(clips, height: int, width: int) -> int:
    """Clips per encoder call: as many as ENCODE_BATCH_PIXELS allow (at most MAX_ENCODE_BATCH),
    and 1 where the clips differ in length (a batch is one tensor)."""
    lengths = {clip.num_frames for clip in clips}
    if len(lengths) != 1:
        return 1
    return max(1, min(MAX_ENCODE_BATCH, ENCODE_BATCH_PIXELS // (lengths.pop() * height * width)))


def cache_lock(cache_dir) -> FolderLock:
    return FolderLock(cache_dir, "latent-cache build")


def encode_clips(cache: LatentCache, clips_and_keys, vae_path, clip_path, height: int, width: int, dtype: str,
                 device: torch.device, batch_size: int, num_workers: int, tag: str, progress: bool,
                 settings: dict | None = None) -> None:
    """Encode the clips with the VAE and CLIP into shards of SHARD_CLIPS, each written as soon as
    full. settings (the EncodingSettings as a dict) are recorded with each entry, so that a
    later build can say what changed when it encodes a clip again."""
    if device.type == "cpu":
        warnings.warn("encoding the latent cache on the CPU is slow (the real VAE takes seconds per 352x640 "
                      "frame); it is done once, later runs reuse the cache", stacklevel=3)
    vae, clip_model = load_encoders(vae_path, clip_path, device)
    frames = DataLoader(RecordingClipDataset([c for c, _ in clips_and_keys], height, width), batch_size=batch_size,
                        num_workers=num_workers)
    pending, described, done = {}, {}, 0
    bar = ProgressBar(len(clips_and_keys), "encoding clips", unit="clip", enabled=progress)
    for batch in frames:
        for encoded in encode_clip_batch(vae, clip_model, batch["video"], CACHE_DTYPES[dtype]):
            clip_ref, key = clips_and_keys[done]
            pending[key] = encoded
            described[key] = {"clip": clip_ref.clip_id, "num_frames": clip_ref.num_frames,
                              **({"settings": settings} if settings is not None else {})}
            done += 1
            if len(pending) == SHARD_CLIPS:
                cache.write_shard(pending, described, tag)
                pending, described = {}, {}
        bar.update(batch["video"].shape[0])
    if pending:
        cache.write_shard(pending, described, tag)
    bar.close()
    del vae, clip_model
    if device.type == "cuda":
        torch.cuda.empty_cache()
