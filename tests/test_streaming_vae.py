"""The streaming VAE decode: block after block equals the whole-sequence decode."""

import torch

from test_vae import fully_random
from wan.vae import StreamingDecoder, VAEConfig, WanVAE


def test_block_decodes_concatenate_to_the_whole_decode():
    torch.manual_seed(0)
    vae = fully_random(WanVAE(VAEConfig.tiny())).eval()
    latents = torch.randn(2, 16, 9, 2, 4, generator=torch.Generator().manual_seed(1))
    whole = vae.decode(latents)
    decoder = StreamingDecoder(vae)
    blocks = [decoder.decode(latents[:, :, start:start + 3]) for start in (0, 3, 6)]
    assert [b.shape[2] for b in blocks] == [9, 12, 12]  # 1 + 4(P-1), then 4P
    streamed = torch.cat(blocks, dim=2)
    assert streamed.shape == whole.shape == (2, 3, 33, 16, 32)
    assert torch.allclose(streamed, whole, atol=1e-6)
    # the slots carry real history: a fresh decoder on block 1 alone gives other frames
    alone = StreamingDecoder(vae).decode(latents[:, :, 3:6])  # 9 frames, latent frame 3 as a first frame
    assert not torch.allclose(alone[:, :, 1:], blocks[1][:, :, 4:], atol=1e-3)


def test_reset_starts_a_new_video_and_slots_stay_bounded():
    torch.manual_seed(2)
    vae = fully_random(WanVAE(VAEConfig.tiny())).eval()
    latents = torch.randn(1, 16, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    decoder = StreamingDecoder(vae)
    first = decoder.decode(latents)
    for _ in range(4):
        decoder.decode(latents)
    assert len(decoder.state.slots) == 32  # the Wan2.1 decoder's temporal convs, not one per block
    decoder.reset()
    assert torch.equal(decoder.decode(latents), first)
