"""Frames: the one preprocessing shared by training, the latent cache and previews
(VAE_CLIP_SPEC A.7 steps 1-2): EXIF-upright RGB, centre crop to the model's aspect,
bilinear resize, [-1, 1]."""

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile, ImageOps

from recordings.errors import DataError
from wan.shapes import VIDEO_HEIGHT, VIDEO_WIDTH


def crop_box(src_width: int, src_height: int, height: int = VIDEO_HEIGHT,
             width: int = VIDEO_WIDTH) -> tuple[float, float, float, float]:
    """The centred crop with the aspect height:width, as float (left, top, right, bottom).

    The kept side is truncated to an int; PIL's crop then rounds each coordinate
    half-to-even, so the crop may be a pixel off the truncated size, as in the reference.
    """
    if src_height / src_width > height / width:
        new_width, new_height = src_width, int(src_width * height / width)
    else:
        new_width, new_height = int(src_height * width / height), src_height
    if new_width < 1 or new_height < 1:
        raise ValueError(f"a {src_width}x{src_height} image has no {width}:{height} area to crop")
    return ((src_width - new_width) / 2, (src_height - new_height) / 2,
            (src_width + new_width) / 2, (src_height + new_height) / 2)


def _resize_rgb(image: Image.Image, height: int, width: int) -> np.ndarray:
    """EXIF-transpose, RGB, centre-crop to height:width, bilinear (antialiased) resize -> uint8 [H,W,3].

    Steps that would not change a pixel (no EXIF rotation, already RGB, nothing to crop,
    already the size) are skipped: they only cost copies.
    """
    if image.getexif().get(ExifTags.Base.Orientation, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode != "RGB":
        image = image.convert("RGB")
    box = crop_box(image.width, image.height, height, width)
    if box != (0, 0, image.width, image.height):
        image = image.crop(box)
    if image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.BILINEAR)
    return np.array(image, dtype=np.uint8)  # a writable copy, as torch.from_numpy wants


def to_model_range(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 -> float32 in [-1, 1]. The reference computes (x / 255 - 0.5) / 0.5; in float32
    x / 127.5 - 1 gives the same bits for every uint8 value (a test checks all 256), in two
    passes over the clip instead of three."""
    return pixels.float().div_(127.5).sub_(1)


def preprocess_image(image: Image.Image, height: int = VIDEO_HEIGHT,
                     width: int = VIDEO_WIDTH) -> torch.Tensor:
    """A PIL image -> float32 [3, height, width] in [-1, 1], exactly as training sees frames."""
    pixels = torch.from_numpy(_resize_rgb(image, height, width))
    return to_model_range(pixels.permute(2, 0, 1).contiguous())


def open_frame(path) -> Image.Image:
    """Open and fully decode an image; any unreadable or truncated file raises DataError naming it."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        raise RuntimeError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True: truncated frames would be "
                           "silently completed; set it back to False")
    image = None
    try:
        image = Image.open(path)
        image.load()  # PIL decodes lazily: force the whole file now
    except (OSError, ValueError, SyntaxError) as error:
        if image is not None:
            image.close()
        raise DataError(f"{path}: unreadable image ({error})") from None
    return image


def load_frame_pixels(path, height: int, width: int) -> np.ndarray:
    """An image file -> uint8 [height, width, 3], preprocessed; problems name the file."""
    with open_frame(path) as image:
        try:
            return _resize_rgb(image, height, width)
        except ValueError as error:
            raise DataError(f"{path}: {error}") from None


def load_frame(path, height: int = VIDEO_HEIGHT, width: int = VIDEO_WIDTH) -> torch.Tensor:
    """An image file -> float32 [3, height, width] in [-1, 1], exactly as training sees frames."""
    pixels = torch.from_numpy(load_frame_pixels(path, height, width))
    return to_model_range(pixels.permute(2, 0, 1).contiguous())


def inspect_frame(path, decode: bool, height: int, width: int) -> tuple[tuple[int, int] | None, str | None]:
    """(width, height) of a frame file, or the problem with it. Header only unless decode."""
    try:
        if decode:
            with open_frame(path) as image:
                size = image.size
        else:
            with Image.open(path) as image:
                size = image.size
        crop_box(*size, height, width)
    except DataError as error:
        return None, str(error)
    except (OSError, ValueError, SyntaxError) as error:
        return None, f"{path}: unreadable image ({error})"
    return size, None

