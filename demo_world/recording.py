"""The demo recording: a seeded script of walks, strafes and turns through the demo world,
rendered and written in exactly the Unreal format (frame_0001.png ... + input.csv), so
the whole pipeline can run, and be tested, without a studio's data."""

import math
import os
import random
import shutil
import tempfile
from pathlib import Path

from PIL import Image

from demo_world.world import DEMO_HEIGHT, DEMO_WIDTH, DemoCamera, render_demo_frame
from recordings.errors import DataError
from recordings.input_csv import CSV_NAME
from runs.progress import progress_over
from wan.shapes import FPS, check_image_size

DEMO_FRAMES = 300
DEMO_SEED = 0
DEMO_MAX_PITCH = 10.0                # the script keeps the camera within +-this many degrees
DEMO_ARENA = 22.0                    # the script turns back towards the pillars beyond this radius

DEMO_RUNS = ("W", "S", "A", "D", "WA", "WD", "SA", "SD", "idle", "turn", "turn", "W+turn", "look")
DEMO_RUN_FRAMES = (6, 24)            # a run holds its action this many frames (inclusive range)
DEMO_TURN_SPEED = (1.0, 3.0)         # degrees per frame of a turn


def demo_actions(num_frames: int = DEMO_FRAMES, seed: int = DEMO_SEED,
                 runs: tuple[str, ...] = DEMO_RUNS) -> list[tuple[str, float, float]]:
    """A seeded script of (keys, mouse_x, mouse_y) per frame: runs of 6-24 frames drawn from a
    shuffled deck of `runs` (kinds named as in DEMO_RUNS), so that with DEMO_RUNS every kind
    (walking, strafing, combinations, idling, turning, turning while walking, looking up or
    down) recurs about every 200 frames."""
    rng = random.Random(seed)
    actions, camera, deck = [], DemoCamera(), []
    while len(actions) < num_frames:
        if not deck:
            deck = list(runs)
            rng.shuffle(deck)
        kind, length = deck.pop(), rng.randint(*DEMO_RUN_FRAMES)
        keys, mouse_x, mouse_y = "", 0.0, 0.0
        if math.hypot(camera.x, camera.z) > DEMO_ARENA:
            # Turn towards the middle while walking instead of leaving the pillars behind.
            deck.append(kind)
            bearing = (math.degrees(math.atan2(-camera.x, -camera.z)) - camera.yaw + 180) % 360 - 180
            keys, mouse_x = "W", math.copysign(2.5, bearing)
            length = max(DEMO_RUN_FRAMES[0], min(DEMO_RUN_FRAMES[1], int(abs(bearing) / 2.5)))
        elif kind in ("turn", "W+turn"):
            keys = "W" if kind == "W+turn" else ""
            mouse_x = round(rng.choice((-1, 1)) * rng.uniform(*DEMO_TURN_SPEED), 2)
        elif kind == "look":
            mouse_y = round(rng.uniform(0.4, 1.0), 2)
            if camera.pitch > 0:
                mouse_y = -mouse_y  # head back towards level, never past DEMO_MAX_PITCH
            room = DEMO_MAX_PITCH - math.copysign(1, mouse_y) * camera.pitch
            length = min(length, int(room / abs(mouse_y)))
        elif kind != "idle":
            keys = kind
        for _ in range(min(length, num_frames - len(actions))):
            actions.append((keys, mouse_x, mouse_y))
            camera = camera.step(keys, mouse_x, mouse_y)
    return actions


def demo_csv_text(actions: list[tuple[str, float, float]]) -> str:
    """The recording's input.csv for these actions (key,time,frame,mouse_x,mouse_y at 25 fps;
    mouse in degrees per frame; "=" for no key)."""
    lines = ["key,time,frame,mouse_x,mouse_y"] + [
        f"{keys or '='},{(frame - 1) / FPS:.2f},{frame},{mouse_x:.2f},{mouse_y:.2f}"
        for frame, (keys, mouse_x, mouse_y) in enumerate(actions, 1)]
    return "\n".join(lines) + "\n"


def is_current_demo_recording(data_dir, num_frames: int, seed: int = DEMO_SEED,
                              runs: tuple[str, ...] = DEMO_RUNS) -> bool:
    """Whether data_dir's input.csv is the one this version of the script writes (a recording
    from an older script would train the model on another deck of actions)."""
    try:
        written = (Path(data_dir) / CSV_NAME).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return written == demo_csv_text(demo_actions(num_frames, seed, runs))


def write_demo_recording(out_dir, num_frames: int = DEMO_FRAMES, height: int = DEMO_HEIGHT,
                         width: int = DEMO_WIDTH, seed: int = DEMO_SEED, progress: bool = False,
                         runs: tuple[str, ...] = DEMO_RUNS) -> list[tuple[str, float, float]]:
    """Render demo_actions(num_frames, seed, runs) into out_dir as frame_0001.png ... and input.csv
    (key,time,frame,mouse_x,mouse_y at 25 fps; mouse in degrees per frame). The row of frame f
    holds the input that moved the camera from frame f - 1 to frame f. The folder appears
    whole or not at all; it must not exist yet or be empty. Returns the actions."""
    out_dir = Path(out_dir)
    if num_frames < 1:
        raise DataError(f"--frames must be at least 1, got {num_frames}")
    try:
        check_image_size(height, width)
    except ValueError as error:
        raise DataError(f"demo recording: {error}") from None
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise DataError(f"{out_dir}: exists and is not an empty folder; choose a new one for the demo recording")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the recording is an ordinary folder
    try:
        actions = demo_actions(num_frames, seed, runs)
        cameras, camera = [], DemoCamera()
        for action in actions:
            camera = camera.step(*action)
            cameras.append(camera)
        digits = max(4, len(str(num_frames)))

        frames = range(1, num_frames + 1)
        for frame in progress_over(frames, "rendering demo", "frame") if progress else frames:
            Image.fromarray(render_demo_frame(cameras[frame - 1], height, width)).save(
                staging / f"frame_{frame:0{digits}d}.png", compress_level=1)
        (staging / CSV_NAME).write_text(demo_csv_text(actions), encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return actions
