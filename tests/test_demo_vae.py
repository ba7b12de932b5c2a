"""The demo's VAE: its training helpers, and the shipped weights decoding to the demo world."""

import math
import random

import pytest
import torch

from demo_world.vae_training import (DEMO_VAE_DIM, DEMO_VAE_FILE, random_crop, random_walk_clip,
                                     recentre_latents, reconstruction_psnr)
from video.compare import psnr
from wan.vae import VAEConfig, WanVAE, load_vae


def test_psnr_of_known_errors():
    reference = torch.zeros(2, 3, 4, 4)
    assert psnr(reference, reference) == math.inf
    assert psnr(reference + 0.2, reference) == pytest.approx(10 * math.log10(4 / 0.04))
    assert psnr(reference + 5.0, reference) == pytest.approx(psnr(reference + 1.0, reference))  # clamped to [-1, 1]
    with pytest.raises(ValueError, match="one shape"):
        psnr(reference, reference[:1])


def test_random_walk_clips_are_seeded_moving_videos_in_model_range():
    clip = random_walk_clip(random.Random(3), 5, 32, 48)
    assert clip.shape == (3, 5, 32, 48) and clip.min() >= -1 and clip.max() <= 1
    assert torch.equal(clip, random_walk_clip(random.Random(3), 5, 32, 48))
    crops = random_crop(torch.stack([clip, clip]), (16, 24), random.Random(0))
    assert crops.shape == (2, 3, 5, 16, 24)


def test_recentring_normalises_the_latents_and_keeps_the_decode():
    torch.manual_seed(0)
    vae = WanVAE(VAEConfig(dim=DEMO_VAE_DIM)).eval()
    videos = torch.stack([random_walk_clip(random.Random(i), 5, 16, 16) for i in range(3)])
    before = [vae.decode(vae.encode(video[None])) for video in videos]
    mean, std = recentre_latents(vae, videos)
    latents = torch.cat([vae.encode(video[None]) for video in videos])
    assert latents.mean(dim=(0, 2, 3, 4)).abs().max() < 1e-3, mean
    assert (latents.std(dim=(0, 2, 3, 4)) - 1).abs().max() < 1e-3, std
    for video, old in zip(videos, before):
        assert torch.allclose(vae.decode(vae.encode(video[None])), old, atol=1e-4)


def test_the_shipped_demo_vae_reconstructs_the_demo_world():
    if not DEMO_VAE_FILE.is_file():
        pytest.skip(f"{DEMO_VAE_FILE} is not shipped in this checkout")
    vae = load_vae(DEMO_VAE_FILE)
    videos = torch.stack([random_walk_clip(random.Random(500 + i), 5, 64, 112) for i in range(2)])
    assert reconstruction_psnr(vae, videos) > 19.0  # 22.4 dB on these clips (600 steps: 17.9); a random VAE 11.3
