"""What the latent cache saves: one training epoch on the demo recording, reading the cache
vs encoding every clip on the fly; prints seconds per epoch and clips/s for both. First,
how fast the cache builds with 1, 2, 4 and 8 clips per encoder call (latents/cache.py
encode_batch_size picks one by ENCODE_BATCH_PIXELS).

    python bench/bench_cache.py            # the --demo settings (tiny model, VAE, CLIP), CPU

Both epochs do the same training steps (prepare_trainable + flow_matching_step + AdamW, as
finetune_base_model.py runs them) on the same clips; the on-the-fly epoch first decodes the clip's
PNGs and runs the VAE and CLIP on them, as a pipeline without a cache would every epoch.
With the demo's tiny encoders this understates the gap: the real VAE takes seconds per
352x640 frame on a CPU (bench/bench_vae.py).
"""

import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import convert_unreal_data as data  # noqa: E402
import finetune_base_model as fb  # noqa: E402
from demo_world.setup import TRAINING_DEMO_SETTINGS, demo_paths_under, prepare_demo  # noqa: E402
from latents.cache import build_latent_cache, encode_batch_size  # noqa: E402
from latents.dataset import CachedClipDataset  # noqa: E402
from latents.encoders import encode_clip_batch, load_encoders  # noqa: E402
from recordings.clips import RecordingClipDataset  # noqa: E402
from recordings.report import check_data  # noqa: E402
from training.flow_matching import flow_matching_step, prepare_trainable  # noqa: E402
from wan import flow  # noqa: E402
from wan.conditioning import cond_concat_from_latent  # noqa: E402
from wan.loading import load_base_model  # noqa: E402


ENCODE_SAMPLE_CLIPS = 32   # clips encoded at each batch size


def epoch(model, trainable, batches, prepare) -> float:
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for batch in batches:
        inputs = prepare(batch)
        sigma = flow.sample_sigmas(inputs["latents"].shape[0], generator=g)
        noise = torch.randn(inputs["latents"].shape, generator=g)
        flow_matching_step(model, inputs, sigma, noise, nullcontext()).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main():
    root = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    s = {**fb.SETTINGS.defaults, **TRAINING_DEMO_SETTINGS, **demo_paths_under(root)}
    prepare_demo(s)
    report = check_data(s["DATA_DIR"], data.data_settings(s))
    clips = report.split.train
    height, width = s["VIDEO_HEIGHT"], s["VIDEO_WIDTH"]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; demo recording: {len(clips)} training "
          f"clips of {s['SEQUENCE_LENGTH']} frames at {height}x{width}, batch {s['BATCH_SIZE']}")

    vae, clip_model = load_encoders(s["VAE_PATH"], s["CLIP_PATH"], torch.device("cpu"))
    sample = RecordingClipDataset(clips[:ENCODE_SAMPLE_CLIPS], height, width)
    with torch.no_grad():
        for size in (1, 2, 4, 8):
            start = time.perf_counter()
            for batch in DataLoader(sample, batch_size=size):
                encode_clip_batch(vae, clip_model, batch["video"], torch.float32)
            seconds = time.perf_counter() - start
            print(f"encoding {len(sample)} clips {size} per call: {seconds:6.2f} s ({len(sample) / seconds:5.2f} clips/s)")
    print(f"build_latent_cache encodes {encode_batch_size(clips, height, width)} per call at this size")

    built = build_latent_cache(clips, s["CACHE_DIR"], s["VAE_PATH"], s["CLIP_PATH"], height, width,
                                            dtype=s["CACHE_DTYPE"], num_workers=0, device="cpu", progress=False)
    print(f"building the cache once: {built.seconds:.1f} s ({built.encoded / built.seconds:.2f} clips/s)")

    model, _ = load_base_model(s["BASE_MODEL_DIR"])
    trainable = prepare_trainable(model, s["TRAINING_STRATEGY"], s["LAST_LAYERS"])
    cached = DataLoader(CachedClipDataset(clips, s["CACHE_DIR"], built.settings),
                        batch_size=s["BATCH_SIZE"])
    with_cache = epoch(model, trainable, cached, lambda b: b)

    raw = DataLoader(RecordingClipDataset(clips, height, width), batch_size=s["BATCH_SIZE"])

    def encode(batch):
        encoded = encode_clip_batch(vae, clip_model, batch["video"], torch.float32)
        return {"latents": torch.stack([e["latents"] for e in encoded]),
                "cond_concat": cond_concat_from_latent(torch.stack([e["first_frame_latent"] for e in encoded])),
                "visual_context": torch.stack([e["visual_context"] for e in encoded]),
                "keyboard": batch["keyboard"], "mouse": batch["mouse"]}

    on_the_fly = epoch(model, trainable, raw, encode)
    n = len(clips)
    print(f"epoch reading the cache:     {with_cache:7.2f} s  ({n / with_cache:6.2f} clips/s)")
    print(f"epoch encoding on the fly:   {on_the_fly:7.2f} s  ({n / on_the_fly:6.2f} clips/s)")
    print(f"the cache makes an epoch {on_the_fly / with_cache:.1f}x faster")


if __name__ == "__main__":
    main()
