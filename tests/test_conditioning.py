import torch

from wan import conditioning
from wan.clip import CLIPVisionConfig, CLIPVisionTower
from wan.shapes import COND_CHANNELS
from wan.vae import VAEConfig, WanVAE


def tiny_encoders():
    torch.manual_seed(0)
    return WanVAE(VAEConfig.tiny()).eval(), CLIPVisionTower(CLIPVisionConfig.tiny()).eval()


def test_first_frame_video_is_the_frame_then_mid_grey():
    frame = torch.rand(2, 3, 16, 24) * 2 - 1
    video = conditioning.first_frame_video(frame, 9)
    assert video.shape == (2, 3, 9, 16, 24)
    assert torch.equal(video[:, :, 0], frame)
    assert torch.all(video[:, :, 1:] == 0)


def test_cond_concat_layout_mask_then_latent_of_first_frame_and_zeros():
    vae, _ = tiny_encoders()
    frame = torch.rand(2, 3, 32, 48) * 2 - 1
    cond = conditioning.build_cond_concat(vae, frame, 9)
    assert cond.shape == (2, COND_CHANNELS, 3, 4, 6)
    mask = cond[:, :4]
    assert torch.all(mask[:, :, 0] == 1) and torch.all(mask[:, :, 1:] == 0)
    padded = torch.cat([frame[:, :, None], torch.zeros(2, 3, 8, 32, 48)], dim=2)
    assert torch.equal(cond[:, 4:], vae.encode(padded))


def test_cond_latent_frame_zero_equals_the_clips_own_first_latent():
    # The VAE is causal: latent frame 0 sees only video frame 0, which both videos share.
    vae, _ = tiny_encoders()
    clip = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    cond = conditioning.build_cond_concat(vae, clip[:, :, 0], 9)
    latents = vae.encode(clip)
    assert torch.allclose(cond[:, 4:, 0], latents[:, :, 0], atol=1e-6)
    assert not torch.allclose(cond[:, 4:, 1:], latents[:, :, 1:], atol=1e-3)


def test_visual_context_is_clip_tokens_of_the_first_frame():
    _, clip = tiny_encoders()
    frame = torch.rand(2, 3, 32, 48) * 2 - 1
    tokens = conditioning.build_visual_context(clip, frame)
    assert tokens.shape == (2, clip.config.num_tokens, clip.config.width)
    assert torch.equal(tokens, clip.encode_frames(frame))
    other = conditioning.build_visual_context(clip, frame.flip(-1))
    assert not torch.allclose(tokens, other)
