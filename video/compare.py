"""Comparing a video with the real one, pixel by pixel: PSNR."""

import math

import torch


def psnr(video: torch.Tensor, reference: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of two videos (or frames) of the same shape in [-1, 1]
    (a peak-to-peak range of 2; values outside are clamped first). Identical inputs give inf."""
    if video.shape != reference.shape:
        raise ValueError(f"PSNR needs two videos of one shape, got {list(video.shape)} and {list(reference.shape)}")
    mse = float(((video.float().clamp(-1, 1) - reference.float().clamp(-1, 1)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(4 / mse)
