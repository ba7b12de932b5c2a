"""The shape rules shared by data, encoders, model and training - defined once, here.

The Wan2.1 VAE compresses time by 4 (the first frame alone, then groups of 4) and
space by 8; the transformer patches latents by (1, 2, 2). So a clip has T = 4k + 1
frames, F = k + 1 latent frames, and its sides must be multiples of 16 pixels.
"""

VIDEO_HEIGHT = 352
VIDEO_WIDTH = 640
FPS = 25

VAE_TIME_STRIDE = 4
VAE_SPACE_STRIDE = 8
LATENT_CHANNELS = 16
PATCH_SIZE = (1, 2, 2)
PIXELS_PER_TOKEN_SIDE = VAE_SPACE_STRIDE * PATCH_SIZE[1]  # 16

COND_MASK_CHANNELS = 4  # cond_concat = [mask(4), first-frame latent(16)]
COND_CHANNELS = COND_MASK_CHANNELS + LATENT_CHANNELS


def is_valid_frame_count(num_frames: int) -> bool:
    return num_frames >= 1 and (num_frames - 1) % VAE_TIME_STRIDE == 0


def check_frame_count(num_frames: int, what: str = "a clip") -> int:
    """Raise a ValueError naming the nearest valid counts unless num_frames is 4k+1."""
    if not isinstance(num_frames, int) or not is_valid_frame_count(num_frames):
        lower = max(1, ((int(num_frames) - 1) // VAE_TIME_STRIDE) * VAE_TIME_STRIDE + 1)
        raise ValueError(
            f"{what} has {num_frames} frames, but the Wan VAE needs 4k+1 frames "
            f"(1, 5, 9, ..., 53, 57, ...); nearest valid: {lower} or {lower + VAE_TIME_STRIDE}"
        )
    return num_frames


def latent_frame_count(num_frames: int) -> int:
    """Frames of video -> latent frames: 57 -> 15, 1 -> 1."""
    check_frame_count(num_frames)
    return (num_frames - 1) // VAE_TIME_STRIDE + 1


def video_frame_count(num_latent_frames: int) -> int:
    """Latent frames -> frames of video: 15 -> 57."""
    if num_latent_frames < 1:
        raise ValueError(f"need at least one latent frame, got {num_latent_frames}")
    return (num_latent_frames - 1) * VAE_TIME_STRIDE + 1


def check_image_size(height: int, width: int) -> tuple[int, int]:
    """Both sides must be multiples of 16 pixels (VAE x8, patch x2)."""
    step = PIXELS_PER_TOKEN_SIDE
    if height <= 0 or width <= 0 or height % step or width % step:
        raise ValueError(
            f"image size {height}x{width} (HxW) is not usable: both sides must be positive "
            f"multiples of {step} pixels (the VAE downsamples by {VAE_SPACE_STRIDE}, the "
            f"transformer patches by {PATCH_SIZE[1]}); the base model was trained at "
            f"{VIDEO_HEIGHT}x{VIDEO_WIDTH}"
        )
    return height, width


def latent_size(height: int, width: int) -> tuple[int, int]:
    """Pixels -> latent grid: 352x640 -> 44x80."""
    check_image_size(height, width)
    return height // VAE_SPACE_STRIDE, width // VAE_SPACE_STRIDE


def tokens_per_latent_frame(latent_height: int, latent_width: int) -> int:
    """Latent grid -> transformer tokens per latent frame: 44x80 -> 880."""
    return (latent_height // PATCH_SIZE[1]) * (latent_width // PATCH_SIZE[2])
