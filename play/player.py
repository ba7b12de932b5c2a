"""The live stream: a generating thread that makes one block per action and a showing
thread that hands its frames to the page at the video's frame rate.

The generating thread reads the player's action before each block (play.session), runs
the block, and queues its frames. It starts the next block just in time: when the frames
still waiting to be shown last about as long as the last block took to make (LEAD_MARGIN
more, and a frame), and never with a block's frames or more waiting. A fast machine thus
reads the keys as late as it can (a key's first frame comes about one block-making time
after the key, not a whole block's showing later), and a slow one starts each block as
soon as the last one is out and simply shows fewer frames per second. The showing thread
encodes each frame as JPEG (the action strip drawn under it only with overlay=True: the
page draws its own over the picture) and makes it the latest frame, which the page
fetches, with the action it was made from.

The frames of a block are shown at the stream's own rate: 1/fps apart when the model keeps
up, else spread over the time the last block took to make, so that a slow machine shows a
steady, slower picture rather than a block's frames in a burst and then a still. A frame
waits no longer for that than the next block would: the first frame of a block is shown
when it comes, and a queue longer than a block is shown at 1/fps until it is one block.
"""

import io
import math
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from generation.streaming import StreamingGenerator
from play.session import BlockAction, InputSession
from video.overlay import compose_frames, to_uint8
from wan.shapes import FPS, VAE_TIME_STRIDE

JPEG_QUALITY = 90
FPS_WINDOW_SECONDS = 2.0  # the shown frame rate is counted over this much recent time
# Blocks are made only while a page watches: one asked for a frame this recently (an open
# page always has a request waiting, see play.server.FRAME_WAIT_SECONDS). The stream waits
# for the first page, so its first block takes the player's first keys, and a closed tab
# stops spending the GPU.
WATCHED_SECONDS = 15.0
LEAD_MARGIN = 1.25  # the next block starts when the frames waiting last this many times its making time


@dataclass(frozen=True)
class Frame:
    index: int        # frames shown since the player started, across restarts: the page asks for newer ones
    jpeg: bytes
    action: dict      # the action it was made from (BlockAction.describe: keys, mouse, seq)
    shown_at: float   # time.monotonic() when it became the latest (for measurements on this machine)


@dataclass
class _Queued:
    pixels: np.ndarray  # [H, W, 3] uint8
    action: BlockAction
    number: int         # the frame's number in its stream
    stream: int         # which stream (restarts count up)


class Player:
    """Runs `generator` from the actions `session` gives, in two background threads
    (start/stop), with restart and pause, while a page watches (WATCHED_SECONDS);
    `frame_after` and `status` serve the page."""

    def __init__(self, generator: StreamingGenerator, session: InputSession, keys, fps: int = FPS,
                 overlay: bool = False):
        self.generator, self.session = generator, session
        self.keys = tuple(keys)
        self.fps, self.overlay = fps, overlay
        self.block_frames = VAE_TIME_STRIDE * generator.frames_per_block  # a later block's frames
        self._changed = threading.Condition()
        self._queue: deque[_Queued] = deque()
        self._latest: Frame | None = None
        self._stopping = threading.Event()
        self._restart_requested = False
        self._paused = False
        self._threads: list[threading.Thread] = []
        self.stream, self.frames_made = 0, 0
        self.error: str | None = None
        self.last_action: BlockAction | None = None
        self.last_block: tuple[int, float] | None = None  # its frames and its generate + decode seconds
        self._shown_times: deque[float] = deque()
        self._asked_at = -float("inf")  # when a page last asked for a frame

    # ------------------------------------------------------------------ control

    def start(self) -> "Player":
        for name, loop in (("generate", self._generate_loop), ("show", self._show_loop)):
            thread = threading.Thread(target=loop, name=f"play-{name}", daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self, timeout: float = 30.0) -> None:
        """Stop both threads (the generating one after the block it is on)."""
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        for thread in self._threads:
            thread.join(timeout)

    def restart(self) -> None:
        """Start the stream over from the first image (after the block being made)."""
        with self._changed:
            self._restart_requested = True
            self._changed.notify_all()

    @property
    def stopped(self) -> bool:
        return self._stopping.is_set()

    def pause(self, paused: bool) -> None:
        with self._changed:
            self._paused = paused
            self._changed.notify_all()

    # ------------------------------------------------------------------ the page's view

    def frame_after(self, index: int, timeout: float) -> Frame | None:
        """The latest shown frame if it is newer than `index`, waiting up to timeout seconds
        for one; None when none came."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self._asked_at = time.monotonic()
            self._changed.notify_all()  # a page is watching: the generating thread may go on
            while not (self._latest is not None and self._latest.index > index):
                left = deadline - time.monotonic()
                if left <= 0 or self._stopping.is_set():
                    return None
                self._changed.wait(left)
            return self._latest

    def status(self) -> dict:
        with self._changed:
            self._forget_old_shown_times(time.monotonic())
            shown_fps = len(self._shown_times) / FPS_WINDOW_SECONDS
            return {
                "stream": self.stream,
                "block": self.generator.block_index,
                "frames_made": self.frames_made,
                "frames_shown": -1 if self._latest is None else self._latest.index,
                "model_fps": None if self.last_block is None else round(self.last_block[0] / self.last_block[1], 2),
                "seconds_per_block": None if self.last_block is None else round(self.last_block[1], 3),
                "shown_fps": round(shown_fps, 2),
                "last_action": None if self.last_action is None else self.last_action.describe(),
                "held": self.session.held(),
                "paused": self._paused,
                "watched": self._watched(),
                "error": self.error,
            }

    # ------------------------------------------------------------------ the threads

    def _generate_loop(self) -> None:
        try:
            while True:
                with self._changed:
                    while not self._stopping.is_set() and not self._restart_requested and (
                            self._paused or not self._watched() or len(self._queue) >= self._lead_frames()):
                        self._changed.wait(0.5)
                    if self._stopping.is_set():
                        return
                    if self._restart_requested:
                        self._restart_requested = False
                        self._queue.clear()
                        self.generator.reset()
                        self.session.restart()
                        self.stream, self.frames_made = self.stream + 1, 0
                    stream = self.stream
                action = self.session.take_action(self.generator.rows_for_next_block)
                start = time.perf_counter()
                block = self.generator.step(action.keyboard[None], None if action.mouse is None else action.mouse[None])
                frames = to_uint8(block.video[0].transpose(0, 1).float().cpu())
                seconds = time.perf_counter() - start
                with self._changed:
                    if self._restart_requested or stream != self.stream:
                        continue  # made for the stream being replaced
                    for pixels in frames:
                        self._queue.append(_Queued(pixels, action, self.frames_made, stream))
                        self.frames_made += 1
                    self.last_action, self.last_block = action, (len(frames), seconds)
                    self._changed.notify_all()
        except Exception as error:  # the page shows it; the server keeps answering
            self.error = f"generation stopped: {type(error).__name__}: {error}"
            print(f"error: {self.error}", file=sys.stderr)
            with self._changed:
                self._changed.notify_all()

    def _forget_old_shown_times(self, now: float) -> None:
        while self._shown_times and now - self._shown_times[0] > FPS_WINDOW_SECONDS:
            self._shown_times.popleft()

    def _watched(self) -> bool:
        return time.monotonic() - self._asked_at < WATCHED_SECONDS

    def _lead_frames(self) -> int:
        """Start the next block once fewer frames than this wait to be shown (see the module's note)."""
        if self.last_block is None:
            return self.block_frames
        return min(self.block_frames, math.ceil(self.last_block[1] * self.fps * LEAD_MARGIN) + 1)

    def _frame_interval(self, waiting: int) -> float:
        """Seconds between a block's frame and the one before: the time the last block took
        per frame, or 1/fps when that is shorter or `waiting` frames make a backlog."""
        if self.last_block is None or waiting >= self.block_frames:
            return 1 / self.fps
        frames, seconds = self.last_block
        return max(1 / self.fps, seconds / frames)

    def _show_loop(self) -> None:
        shown_at, previous = None, None
        while True:
            with self._changed:
                while not self._stopping.is_set() and not self._queue:
                    self._changed.wait(0.5)
                if self._stopping.is_set():
                    return
                item = self._queue.popleft()
                waiting = len(self._queue)
                self._changed.notify_all()  # room for the generating thread
            jpeg = self._encode(item)
            first_of_block = previous is None or item.action is not previous.action or item.stream != previous.stream
            previous = item
            interval = 1 / self.fps if first_of_block else self._frame_interval(waiting)
            due = None if shown_at is None else shown_at + interval
            now = time.monotonic()
            if due is not None and now < due:
                self._stopping.wait(due - now)
            shown_at = time.monotonic()
            with self._changed:
                if item.stream != self.stream:
                    continue
                index = 0 if self._latest is None else self._latest.index + 1
                self._latest = Frame(index, jpeg, item.action.describe(), shown_at)
                self._shown_times.append(shown_at)
                self._forget_old_shown_times(shown_at)
                self._changed.notify_all()

    def _encode(self, item: _Queued) -> bytes:
        pixels = item.pixels
        if self.overlay:
            mouse = torch.zeros(2) if item.action.mouse is None else item.action.mouse
            pixels = compose_frames({"": pixels[None]}, item.action.keyboard[None], mouse[None], self.keys,
                                    numbering=(item.number, None))[0]
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
        return buffer.getvalue()
