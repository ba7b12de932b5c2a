"""The image-to-video conditioning built from a clip's first frame (VAE_CLIP_SPEC A.7).

cond_concat [B, 20, F, h, w]: 4 mask channels (1 on latent frame 0, 0 elsewhere) and the
VAE latent of "first frame followed by 4(F-1) zero frames" (zero in [-1, 1] is mid-grey).
visual_context [B, tokens, width]: the CLIP image tokens of the first frame.
Training, the latent cache and previews all build them here, so they agree exactly.
"""

import torch

from wan.shapes import COND_MASK_CHANNELS, check_frame_count, latent_frame_count

# The latent of "first frame, then zero frames" stops depending on the first frame, and so
# stops changing, at latent frame 29: the reach of the Wan2.1 encoder's causal temporal
# convs (a fact of its layer structure, not of its weights; tests/test_streaming_generation
# checks it with random weights). So cond_concat of this many latent frames serves a stream
# of any length: every later frame equals the last one.
STREAM_COND_LATENT_FRAMES = 30


def first_frame_mask(batch: int, num_latent_frames: int, latent_height: int, latent_width: int,
                     device=None, dtype=torch.float32) -> torch.Tensor:
    mask = torch.zeros(batch, COND_MASK_CHANNELS, num_latent_frames, latent_height, latent_width,
                       device=device, dtype=dtype)
    mask[:, :, 0] = 1
    return mask


def first_frame_video(first_frame: torch.Tensor, num_frames: int) -> torch.Tensor:
    """[B, 3, H, W] -> [B, 3, num_frames, H, W]: the frame, then zero (mid-grey) frames."""
    check_frame_count(num_frames)
    b, c, h, w = first_frame.shape
    video = first_frame.new_zeros(b, c, num_frames, h, w)
    video[:, :, 0] = first_frame
    return video


def cond_concat_from_latent(first_frame_latent: torch.Tensor) -> torch.Tensor:
    """[B, 16, F, h, w] latent of first_frame_video -> cond_concat [B, 20, F, h, w]."""
    b, _, f, h, w = first_frame_latent.shape
    mask = first_frame_mask(b, f, h, w, device=first_frame_latent.device, dtype=first_frame_latent.dtype)
    return torch.cat([mask, first_frame_latent], dim=1)


@torch.no_grad()
def encode_first_frame_latent(vae, first_frame: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The 16-channel half of cond_concat: encode the first frame followed by zero frames."""
    return vae.encode(first_frame_video(first_frame, num_frames))


@torch.no_grad()
def build_cond_concat(vae, first_frame: torch.Tensor, num_frames: int) -> torch.Tensor:
    latent = encode_first_frame_latent(vae, first_frame, num_frames)
    assert latent.shape[2] == latent_frame_count(num_frames)
    return cond_concat_from_latent(latent)


@torch.no_grad()
def build_visual_context(clip, first_frame: torch.Tensor) -> torch.Tensor:
    """[B, 3, H, W] in [-1, 1] -> CLIP tokens [B, tokens, width]."""
    return clip.encode_frames(first_frame)
