"""Reading the latent cache: the Dataset training iterates over."""

from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from latents.cache import CacheError, EncodingSettings, LatentCache, clip_key
from wan.conditioning import cond_concat_from_latent
from wan.shapes import latent_frame_count, latent_size


class CachedClipDataset(Dataset):
    """Clips served from the latent cache.

    Item: latents [16, F, h, w], cond_concat [20, F, h, w], visual_context [tokens, width]
    (float32), keyboard [T, K], mouse [T, 2], recording, first_frame. Raises CacheError,
    listing what is missing, unless every clip has a verified entry.
    """

    def __init__(self, clips, cache_dir, settings: EncodingSettings, cache: LatentCache | None = None):
        self.clips = list(clips)
        self.cache_dir = Path(cache_dir)
        self.keys = [clip_key(c, settings) for c in self.clips]
        cache = cache or LatentCache(cache_dir)
        problems = cache.verify(self.keys, remove=False)
        missing = [c.clip_id for c, k in zip(self.clips, self.keys) if k not in cache.entries]
        if problems or missing:
            shown = "\n  ".join(problems + missing[:10] + ([f"... and {len(missing) - 10} more"] if len(missing) > 10 else []))
            raise CacheError(
                f"the latent cache {self.cache_dir} lacks {len(missing)} of {len(self.clips)} clips "
                f"(or their settings/frames changed):\n  {shown}\n"
                "build it with: python convert_unreal_data.py DATA_DIR --cache (the training script "
                "builds it by itself before training)")
        self.shard_of = [cache.entries[k] for k in self.keys]
        latent_frames = latent_frame_count(self.clips[0].num_frames) if self.clips else 0
        self.latent_shape = (latent_frames, *latent_size(settings.height, settings.width))
        self._handles = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_handles"] = {}  # open files do not cross into DataLoader workers
        return state

    def __len__(self) -> int:
        return len(self.clips)

    def _tensor(self, index: int, part: str) -> torch.Tensor:
        name = self.shard_of[index]
        if name not in self._handles:
            self._handles[name] = safe_open(str(self.cache_dir / "shards" / name), framework="pt")
        return self._handles[name].get_tensor(f"{self.keys[index]}/{part}").float()

    def __getitem__(self, index: int) -> dict:
        clip = self.clips[index]
        latents = self._tensor(index, "latents")
        if tuple(latents.shape[1:]) != self.latent_shape:
            raise CacheError(f"{self.cache_dir}: entry for {clip.clip_id} has latents {list(latents.shape)}, "
                             f"expected [16, {', '.join(map(str, self.latent_shape))}]")
        first_latent = self._tensor(index, "first_frame_latent")
        return {
            "latents": latents,
            "cond_concat": cond_concat_from_latent(first_latent[None])[0],
            "visual_context": self._tensor(index, "visual_context"),
            "keyboard": clip.keyboard.clone(),
            "mouse": clip.mouse.clone(),
            "recording": clip.recording,
            "first_frame": clip.first_frame,
        }
