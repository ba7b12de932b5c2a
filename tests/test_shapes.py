import pytest

from wan import shapes


@pytest.mark.parametrize("frames,latent", [(1, 1), (5, 2), (57, 15), (81, 21)])
def test_frame_rule(frames, latent):
    assert shapes.latent_frame_count(frames) == latent
    assert shapes.video_frame_count(latent) == frames


@pytest.mark.parametrize("frames", [0, 2, 4, 56, 58])
def test_frame_rule_rejects_other_counts_with_nearest_valid(frames):
    with pytest.raises(ValueError, match="4k\\+1"):
        shapes.check_frame_count(frames)


def test_frame_rule_message_names_neighbours():
    with pytest.raises(ValueError, match="53 or 57"):
        shapes.check_frame_count(56, "SEQUENCE_LENGTH")


def test_default_size_gives_880_tokens_per_latent_frame():
    h, w = shapes.latent_size(shapes.VIDEO_HEIGHT, shapes.VIDEO_WIDTH)
    assert (h, w) == (44, 80)
    assert shapes.tokens_per_latent_frame(h, w) == 880


@pytest.mark.parametrize("size", [(350, 640), (352, 632), (0, 16)])
def test_sizes_must_be_multiples_of_16(size):
    with pytest.raises(ValueError, match="multiples of 16"):
        shapes.check_image_size(*size)
