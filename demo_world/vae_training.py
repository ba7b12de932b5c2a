"""The demo's tiny VAE: a Wan2.1 VAE (wan/vae.py, VAEConfig(dim=DEMO_VAE_DIM)) trained on
demo-world frames, so that the latents a demo model learns on decode to pictures of the world.

    python -m demo_world.vae_training                    # writes DEMO_VAE_FILE (the shipped weights)
    python -m demo_world.vae_training --out my_vae.pth --steps 200

A random VAE encodes frames to latents that decode to noise: the demo model could still
learn them, but nothing it generates would look like anything. Training is seeded and
runs on one CPU thread: clips of random walks are rendered on the fly (never the same clip
twice, so nothing to overfit), cropped, and the VAE learns to reconstruct them (L1) from
latents with a little noise added (so that the decoder tolerates the imprecise latents a
generator makes). Afterwards the latents are recentred: the VAE's own normalisation
(LATENT_MEAN / LATENT_STD in wan/vae.py) then gives every latent channel mean 0 and
standard deviation 1 on demo-world video, the scale flow matching assumes.
"""

import argparse
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from demo_world.recording import DEMO_MAX_PITCH
from demo_world.world import DemoCamera, render_demo_frame
from recordings.frames import to_model_range
from video.compare import psnr
from wan.vae import VAEConfig, WanVAE, load_vae, save_vae

DEMO_VAE_DIM = 8                     # VAEConfig.tiny(): the Wan2.1 structure at 1/12 of its width
DEMO_VAE_FILE = Path(__file__).with_name("demo_vae.pth")  # shipped; written by main()
DEMO_VAE_SEED = 0
# 3000 steps (35 minutes on one thread): at 600 the VAE reconstructed held-out clips at
# 18.4 dB and kept little motion between latent frames (its reconstruction of real video
# scored 0.16 on the action-following score, the video itself 0.76); at 3000, 21.6 dB and
# 0.43, and the demo model learns the keys faster on its latents (bench/RESULTS.md).
DEMO_VAE_STEPS = 3000
DEMO_VAE_BATCH = 4                   # clips per step
DEMO_VAE_FRAMES = 9                  # 1 + 4 + 4: the first frame alone, then latent frames with a past
DEMO_VAE_RENDER = (64, 112)          # the --demo run's frame size; training sees crops of it
DEMO_VAE_CROP = (32, 48)             # a multiple of 8; a fifth of the pixels, five times the steps
DEMO_VAE_LR = 3e-3
DEMO_VAE_LATENT_NOISE = 0.1          # noise added to the latents, relative to each channel's spread
DEMO_VAE_ALIGN = 0.1                 # weight of the latent-alignment loss (see aligned_targets)
DEMO_VAE_CALIBRATION_CLIPS = 32      # clips whose latents set the normalisation
ARENA_RADIUS = 24.0                  # camera positions are drawn within this radius of the start


def random_walk_clip(rng: random.Random, num_frames: int, height: int, width: int) -> torch.Tensor:
    """A clip [3, T, H, W] in [-1, 1] from a random pose, moved by one random action held for
    the clip (keys and turns like the demo recording's, a little stronger)."""
    camera = DemoCamera(x=rng.uniform(-1, 1) * ARENA_RADIUS / math.sqrt(2),
                        z=rng.uniform(-1, 1) * ARENA_RADIUS / math.sqrt(2),
                        yaw=rng.uniform(-180, 180), pitch=rng.uniform(-DEMO_MAX_PITCH, DEMO_MAX_PITCH))
    keys = rng.choice(("", "W", "S", "A", "D", "WA", "WD", "SA", "SD"))
    mouse_x = rng.choice((0.0, rng.uniform(-4, 4)))
    mouse_y = rng.choice((0.0, 0.0, rng.uniform(-1, 1)))
    frames = []
    for _ in range(num_frames):
        frames.append(render_demo_frame(camera, height, width))
        camera = camera.step(keys, mouse_x, mouse_y)
    pixels = torch.from_numpy(np.stack(frames)).permute(3, 0, 1, 2).contiguous()
    return to_model_range(pixels)


def random_crop(clips: torch.Tensor, size: tuple[int, int], rng: random.Random) -> torch.Tensor:
    """The same random window of every frame of each clip [B, 3, T, H, W] (the clip stays a clip)."""
    height, width = size
    crops = []
    for clip in clips:
        top, left = rng.randint(0, clip.shape[-2] - height), rng.randint(0, clip.shape[-1] - width)
        crops.append(clip[..., top:top + height, left:left + width])
    return torch.stack(crops)


def keyframe_latents(vae: WanVAE, clips: torch.Tensor) -> torch.Tensor:
    """The latent each latent frame is pulled towards: the latent of its last video frame
    (frames 0, 4, 8, ...) encoded on its own, as a first frame is. Without this pull the
    encoder gives a first frame and the later latent frames unrelated codes (a still video's
    latent frames 0 and 1 were uncorrelated), so a generator would have to learn a code
    conversion before it could learn that a scene moves; with it, latent frame k is a picture
    of frame 4k and motion between latent frames is motion of pictures."""
    keyframes = clips[:, :, ::4]
    b, c, f, h, w = keyframes.shape
    single = vae.encode(keyframes.transpose(1, 2).reshape(b * f, c, 1, h, w))  # no gradient: a target
    return single.reshape(b, f, *single.shape[1:2], *single.shape[3:]).transpose(1, 2)


def noisy(latents: torch.Tensor, relative: float, generator: torch.Generator) -> torch.Tensor:
    """latents plus Gaussian noise of `relative` times each channel's spread over the batch."""
    spread = latents.detach().std(dim=(0, 2, 3, 4), keepdim=True)
    return latents + relative * spread * torch.randn(latents.shape, generator=generator)


@torch.no_grad()
def recentre_latents(vae: WanVAE, videos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold the latent statistics of videos [N, 3, T, H, W] into the 1x1 convs around the latent
    (conv1's mean half and conv2), so that vae.encode gives them per-channel mean 0 and std 1
    and vae.decode of those latents decodes exactly what it did before. Returns the (mean, std)
    the latents had before."""
    latents = torch.cat([vae.encode(video[None]) for video in videos])
    mean = latents.mean(dim=(0, 2, 3, 4)).double()
    std = latents.std(dim=(0, 2, 3, 4)).double().clamp_min(1e-6)
    z = vae.config.z_dim
    # encode: normalised = (conv1(x) - M) / S. Rescale conv1's mean half so that
    # normalised' = (normalised - mean) / std, i.e. conv1' = M + (conv1 - M - S * mean) / std.
    big_mean, big_std = (t.flatten().double() for t in vae._latent_stats(torch.float64))
    weight, bias = vae.conv1.weight[:z].double(), vae.conv1.bias[:z].double()
    vae.conv1.weight[:z] = (weight / std.view(-1, 1, 1, 1, 1)).to(vae.dtype)
    vae.conv1.bias[:z] = (big_mean + (bias - big_mean - big_std * mean) / std).to(vae.dtype)
    # decode: conv2 sees M + S * normalised'; it must see what it saw before, M + S * (mean + std * normalised').
    # Before = M + S * mean + std * (after - M), so conv2' = conv2 o (x -> M + S * mean + std * (x - M)).
    weight2, bias2 = vae.conv2.weight.double().flatten(1), vae.conv2.bias.double()
    shift = big_mean + big_std * mean - std * big_mean
    vae.conv2.bias.copy_((bias2 + weight2 @ shift).to(vae.dtype))
    vae.conv2.weight.copy_((weight2 * std).view_as(vae.conv2.weight).to(vae.dtype))
    return mean.float(), std.float()


@torch.no_grad()
def reconstruction_psnr(vae: WanVAE, videos: torch.Tensor) -> float:
    """PSNR of vae.decode(vae.encode(video)) against each video [N, 3, T, H, W], pooled."""
    return psnr(torch.cat([vae.decode(vae.encode(video[None])) for video in videos]), videos)


def train_demo_vae(steps: int = DEMO_VAE_STEPS, seed: int = DEMO_VAE_SEED, dim: int = DEMO_VAE_DIM,
                   log=print) -> WanVAE:
    """Train the demo's VAE from its seeded initialisation; returns it recentred, in eval mode."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convs: more threads mostly wait for each other (and give other bits)
    try:
        torch.manual_seed(seed)
        rng, generator = random.Random(seed), torch.Generator().manual_seed(seed)
        vae = WanVAE(VAEConfig(dim=dim)).train()
        optimizer = torch.optim.Adam(vae.parameters(), lr=DEMO_VAE_LR)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / steps)))
        started = time.time()
        for step in range(steps):
            clips = torch.stack([random_walk_clip(rng, DEMO_VAE_FRAMES, *DEMO_VAE_RENDER) for _ in range(DEMO_VAE_BATCH)])
            clips = random_crop(clips, DEMO_VAE_CROP, rng)
            latents = vae.encode_with_grad(clips)
            reconstruction = vae.decode_with_grad(noisy(latents, DEMO_VAE_LATENT_NOISE, generator))
            targets = keyframe_latents(vae, clips)
            alignment = ((latents[:, :, 1:] - targets[:, :, 1:]) ** 2).mean() / targets.var().clamp_min(1e-6)
            loss = (reconstruction - clips).abs().mean() + DEMO_VAE_ALIGN * alignment
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if (step + 1) % 50 == 0 or step + 1 == steps:
                log(f"demo VAE step {step + 1}/{steps}: loss {loss.item():.4f}, alignment {alignment.item():.3f} "
                    f"({time.time() - started:.0f} s)")
        vae.eval()
        calibration = torch.stack([random_walk_clip(rng, 17, *DEMO_VAE_RENDER) for _ in range(DEMO_VAE_CALIBRATION_CLIPS)])
        recentre_latents(vae, calibration)
        return vae
    finally:
        torch.set_num_threads(threads)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--out", default=str(DEMO_VAE_FILE), help=f"where to write the weights (default {DEMO_VAE_FILE})")
    parser.add_argument("--steps", type=int, default=DEMO_VAE_STEPS, help=f"optimizer steps (default {DEMO_VAE_STEPS})")
    parser.add_argument("--seed", type=int, default=DEMO_VAE_SEED)
    args = parser.parse_args(argv)
    started = time.time()
    vae = train_demo_vae(args.steps, args.seed)
    videos = torch.stack([random_walk_clip(random.Random(10_000 + i), 9, *DEMO_VAE_RENDER) for i in range(16)])
    latents = torch.cat([vae.encode(v[None]) for v in videos])
    path = save_vae(vae.half(), args.out)  # half precision: half the file, no visible difference
    reloaded = load_vae(path)
    print(f"wrote {path} ({path.stat().st_size / 2**20:.2f} MiB) in {time.time() - started:.0f} s; held-out "
          f"reconstruction PSNR {reconstruction_psnr(reloaded, videos):.1f} dB; latents mean "
          f"{latents.mean():.3f}, std {latents.std():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
