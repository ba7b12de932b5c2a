"""The action overlay: panels of video side by side over a strip that shows the held keys
(W, A, S, D as on a keyboard, other keys beside) and the mouse as an arrow."""

import math

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (18, 18, 18)
KEY_IDLE = (60, 60, 60)
KEY_HELD = (255, 196, 0)
TEXT = (235, 235, 235)
TEXT_ON_HELD = (0, 0, 0)
MOUSE_ARROW = (90, 200, 255)
MOUSE_FULL_SCALE = 0.2     # a mouse value this large draws the arrow to the rim
KEY_PLACES = {"W": (0, 1), "A": (1, 0), "S": (1, 1), "D": (1, 2)}  # (row, column) of the WASD cluster


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """[T, 3, H, W] in [-1, 1] -> [T, H, W, 3] uint8."""
    pixels = ((frames.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def strip_height(panel_height: int) -> int:
    """The overlay strip under the panels: a fifth of their height, at least 40 px, even."""
    return max(40, panel_height // 5 + panel_height // 5 % 2)


def key_boxes(keys, strip: int) -> dict[str, tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) inside the strip of each key's box: W, A, S, D as on a keyboard,
    any other keys in columns to their right."""
    pad = max(2, strip // 16)
    size = (strip - 3 * pad) // 2
    others = [k for k in keys if k.upper() not in KEY_PLACES]
    boxes = {}
    for key in keys:
        i = others.index(key) if key in others else 0
        row, column = KEY_PLACES.get(key.upper(), (i % 2, 3 + i // 2))
        x0, y0 = pad + column * (size + pad), pad + row * (size + pad)
        boxes[key] = (x0, y0, x0 + size - 1, y0 + size - 1)
    return boxes


def _font(size: int):
    return ImageFont.load_default(size=max(8, size))


def draw_overlay(draw: ImageDraw.ImageDraw, top: int, strip: int, keys, held, mouse, frame: int,
                 total: int | None) -> None:
    """The keys (held ones highlighted), a mouse arrow (yaw right, pitch up) and the frame
    number (out of total - 1; just the number when the total is not known, a live stream)."""
    boxes = key_boxes(keys, strip)
    font = _font(strip // 4)
    for key, is_held in zip(keys, held):
        x0, y0, x1, y1 = boxes[key]
        draw.rectangle((x0, top + y0, x1, top + y1), fill=KEY_HELD if is_held else KEY_IDLE)
        draw.text(((x0 + x1) / 2, top + (y0 + y1) / 2), key[:3], fill=TEXT_ON_HELD if is_held else TEXT,
                  font=font, anchor="mm")
    pad = max(2, strip // 16)
    radius = strip // 2 - pad
    cx, cy = max(x1 for _, _, x1, _ in boxes.values()) + 2 * pad + radius, top + strip // 2
    draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), outline=KEY_IDLE, width=max(1, pad // 2))
    pitch, yaw = float(mouse[0]), float(mouse[1])
    dx, dy = yaw / MOUSE_FULL_SCALE * radius, -pitch / MOUSE_FULL_SCALE * radius
    length = math.hypot(dx, dy)
    if length > radius:
        dx, dy = dx * radius / length, dy * radius / length
    draw.line((cx, cy, cx + dx, cy + dy), fill=MOUSE_ARROW, width=max(2, pad))
    dot = max(2, pad)
    draw.ellipse((cx + dx - dot, cy + dy - dot, cx + dx + dot, cy + dy + dot), fill=MOUSE_ARROW)
    number = f"{frame}" if total is None else f"{frame}/{total - 1}"
    draw.text((cx + radius + 2 * pad, cy), number, fill=TEXT, font=font, anchor="lm")


def compose_frames(panels: dict[str, np.ndarray], keyboard: torch.Tensor, mouse: torch.Tensor,
                   keys, numbering: tuple[int, int | None] | None = None) -> np.ndarray:
    """Labelled panels [T, H, W, 3] uint8 side by side over the action strip -> [T, H + strip, n W, 3]
    (a panel labelled "" shows no label).

    numbering: (first frame, total frames) when the panels are a piece of a longer video (a
    stream's block), the total None for a stream of unknown length; None: the whole video."""
    frames = list(panels.values())
    count, height, width = frames[0].shape[:3]
    first_frame, total_frames = numbering or (0, count)
    strip = strip_height(height)
    font = _font(height // 20)
    held = (keyboard > 0.5).tolist()
    out = np.empty((count, height + strip, width * len(frames), 3), np.uint8)
    for t in range(count):
        image = Image.new("RGB", (width * len(frames), height + strip), BACKGROUND)
        draw = ImageDraw.Draw(image)
        for i, (label, video) in enumerate(panels.items()):
            image.paste(Image.fromarray(video[t]), (i * width, 0))
            if label:
                box = draw.textbbox((i * width + 3, 2), label, font=font)
                draw.rectangle((box[0] - 2, box[1] - 1, box[2] + 2, box[3] + 1), fill=BACKGROUND)
                draw.text((i * width + 3, 2), label, fill=TEXT, font=font)
        draw_overlay(draw, height, strip, [str(k).upper() for k in keys], held[t], mouse[t].tolist(),
                     first_frame + t, total_frames)
        out[t] = np.asarray(image)
    return out
