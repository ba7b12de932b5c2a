"""The clips a trainer trains on: the recordings checked and split, and every clip in the
latent cache (encoded first where missing). Shared by fine-tuning and distillation."""

from contextlib import nullcontext
from dataclasses import dataclass

import torch

from latents.cache import LatentCache, build_latent_cache, cache_lock
from latents.dataset import CachedClipDataset
from recordings.report import check_data
from runs.errors import TrainingError
from training.ranks import Ranks


@dataclass
class PreparedData:
    report: object               # the data check (recordings.report.DataReport)
    split: object                # train / validation / dropped clips
    cache_report: object         # what the latent cache build did
    height: int
    width: int
    train_set: CachedClipDataset
    val_set: CachedClipDataset


def prepare_data(s: dict, data_settings, ranks: Ranks, device: torch.device, log) -> PreparedData:
    """Check the recordings of s["DATA_DIR"] (with data_settings, a DataSettings), split
    them, and make sure the latent cache s["CACHE_DIR"] holds every clip. Every rank
    encodes its share of what is missing; the main rank then merges the manifest."""
    report = check_data(s["DATA_DIR"], data_settings, decode_frames=s["SKIP_BAD_FRAMES"], progress=ranks.main)
    log(report.format())
    report.raise_for_problems()
    split = report.split
    if not split.train:
        raise TrainingError(f"no training clips in {s['DATA_DIR']}")
    height, width = report.settings["VIDEO_HEIGHT"], report.settings["VIDEO_WIDTH"]
    cache = LatentCache(s["CACHE_DIR"])
    # one process builds alone under the cache's lock; with several ranks the main rank
    # holds it while all of them encode
    shared_lock = cache_lock(s["CACHE_DIR"]) if ranks.world > 1 and ranks.main else nullcontext()
    with shared_lock:
        ranks.barrier()
        cache_report = build_latent_cache(
            split.used, s["CACHE_DIR"], s["VAE_PATH"], s["CLIP_PATH"], height, width,
            dtype=s["CACHE_DTYPE"], device=device, num_workers=s["NUM_WORKERS"],
            rank=ranks.rank, world_size=ranks.world, progress=ranks.main, cache=cache)
        ranks.barrier()
        if ranks.world > 1:
            cache.rescan()  # the shards the other ranks wrote (verified shards stay verified)
            if ranks.main:
                cache.write_manifest()
    log(cache_report.format())
    return PreparedData(report, split, cache_report, height, width,
                        CachedClipDataset(split.train, s["CACHE_DIR"], cache_report.settings, cache),
                        CachedClipDataset(split.val, s["CACHE_DIR"], cache_report.settings, cache))
