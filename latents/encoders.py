"""The encoders of the latent cache and of previews: the VAE and the CLIP image tower,
loaded in the dtype they run in, and one batch of clips encoded into cache entries."""

import torch

from wan.clip import load_clip
from wan.conditioning import encode_first_frame_latent
from wan.device import run_dtype
from wan.vae import load_vae


def load_encoders(vae_path, clip_path, device: torch.device):
    """The VAE and CLIP tower in the dtype they run in: bf16 on GPU (as the reference), fp32 on CPU."""
    vae = load_vae(vae_path, device=device, dtype=run_dtype(device)).requires_grad_(False)
    clip = load_clip(clip_path, device=device, dtype=run_dtype(device))
    return vae, clip


@torch.no_grad()
def encode_clip_batch(vae, clip, video: torch.Tensor, out_dtype: torch.dtype) -> list[dict]:
    """video [B, 3, T, H, W] in [-1, 1] -> per clip: latents, first_frame_latent, visual_context."""
    video = video.to(device=vae.device, dtype=vae.dtype)
    first = video[:, :, 0]
    latents = vae.encode(video)
    first_latent = encode_first_frame_latent(vae, first, video.shape[2])
    visual = clip.encode_frames(first)
    return [{"latents": latents[i].to("cpu", out_dtype), "first_frame_latent": first_latent[i].to("cpu", out_dtype),
             "visual_context": visual[i].to("cpu", out_dtype)} for i in range(video.shape[0])]
