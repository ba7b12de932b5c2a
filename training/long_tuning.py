"""Stage C of distillation: streaming long tuning (DISTILL_SPEC 3, LongLive style).

After stage B the student has only streamed short clips from an empty cache; played, it
streams for minutes with a rolling window. Here one stream per micro-batch lives across
iterations: the first iteration of a sequence makes `chunk` latent frames from its clip's
first frame, every later one `chunk - overlap` more, continuing from the stream's KV cache
at its absolute frame offset (the same rollout as stage B, training/rollout.py), until the
stream is `max_latents` long and the next iteration starts a new clip. Teacher and critic
(both bidirectional, trained on short clips) judge only the stream's last `chunk` frames:
a window whose first frame is replaced by an anchor - the decoded stream's frame at that
point re-encoded as a one-frame image latent, what an image-to-video clip starts with -
and whose overlap frames (judged in the previous window) carry no loss.

The stream's length, window and clip follow from the iteration number alone
(StreamPlan); what it holds besides - the KV cache, whose keys and values the student's
weights of earlier iterations computed - cannot be rebuilt after a restart, so the script
saves its state only where a sequence ends (see distill_streaming_model.py).
"""

from dataclasses import dataclass

import torch

from training.rollout import Conditions, FewStepSchedule, SampleNoise, rollout
from wan.vae import StreamingDecoder, WanVAE


@dataclass(frozen=True)
class StreamPlan:
    """The bookkeeping of a stream, in latent frames (the script's STREAM_* settings)."""

    chunk: int        # the window teacher and critic judge, and a sequence's first iteration's new frames
    overlap: int      # of a later window, the frames the previous window already judged
    max_latents: int  # a sequence's whole length

    @classmethod
    def of(cls, settings: dict) -> "StreamPlan":
        """The script's STREAM_CHUNK_LATENTS, STREAM_OVERLAP_LATENTS, STREAM_MAX_LATENTS."""
        return cls(settings["STREAM_CHUNK_LATENTS"], settings["STREAM_OVERLAP_LATENTS"], settings["STREAM_MAX_LATENTS"])

    @property
    def new_per_iteration(self) -> int:
        """New latent frames of every iteration after a sequence's first."""
        return self.chunk - self.overlap

    @property
    def iterations_per_sequence(self) -> int:
        return 1 + (self.max_latents - self.chunk) // self.new_per_iteration

    def problems(self, frames_per_block: int) -> list[str]:
        """What keeps these numbers from streaming whole blocks up to exactly max_latents."""
        P = frames_per_block
        if self.chunk % P or self.overlap % P or not 0 < self.overlap < self.chunk:
            return [f"STREAM_CHUNK_LATENTS={self.chunk}, STREAM_OVERLAP_LATENTS={self.overlap}: both whole blocks "
                    f"of {P} latent frames, the overlap above 0 and below the chunk (the public recipe: 9 and 3)"]
        if self.max_latents < self.chunk or (self.max_latents - self.chunk) % self.new_per_iteration:
            fitting = [self.chunk + n * self.new_per_iteration for n in range(8)]
            return [f"STREAM_MAX_LATENTS={self.max_latents}: a sequence is STREAM_CHUNK_LATENTS plus whole "
                    f"iterations of STREAM_CHUNK_LATENTS - STREAM_OVERLAP_LATENTS = {self.new_per_iteration} new "
                    f"latent frames (e.g. {', '.join(map(str, fitting))}; the public recipe: 39)"]
        return []

    def position(self, step: int) -> tuple[int, int]:
        """(sequence, iteration within it) of optimizer step `step` (counted from 0)."""
        return divmod(step, self.iterations_per_sequence)

    def length_before(self, iteration: int) -> int:
        """The stream's length when iteration `iteration` of its sequence starts."""
        return 0 if iteration == 0 else self.chunk + (iteration - 1) * self.new_per_iteration

    def new_latents(self, iteration: int) -> int:
        return self.chunk if iteration == 0 else self.new_per_iteration

    def loss_mask(self, iteration: int, batch: int, device=None) -> torch.Tensor:
        """[batch, chunk]: 1 on the window's new frames, 0 on its overlap (a sequence's
        first window is all new)."""
        mask = torch.ones(batch, self.chunk, device=device)
        if iteration > 0:
            mask[:, :self.overlap] = 0
        return mask


class LongStream:
    """One persistent stream of a micro-batch's clips: their conditions (for max_latents
    latent frames), the student's KV cache, the latents made so far (detached), and the VAE
    decoder's causal state over the stream's decoded beginning (for the anchors)."""

    def __init__(self, conditions: Conditions, cache, vae: WanVAE):
        self.conditions, self.cache, self.vae = conditions, cache, vae
        self.decoder = StreamingDecoder(vae)
        self.latents = None      # [B, 16, length, h, w] float32
        self.decoded = 0         # latent frames the decoder has seen
        self.last_frame = None   # [B, 3, 1, H, W]: the last of them, decoded

    @property
    def length(self) -> int:
        return 0 if self.latents is None else self.latents.shape[2]

    @torch.no_grad()
    def anchor(self, frame: int) -> torch.Tensor:
        """The anchor of a window starting at latent frame `frame`: the stream decoded up to
        and including that frame, its last video frame encoded alone (a one-frame image
        latent), [B, 16, 1, h, w] float32. The decoder runs on through the stream, each
        latent frame once, so this equals decoding latents [0, frame] as one video."""
        if frame + 1 > self.decoded:
            video = self.decoder.decode(self.latents[:, :, self.decoded:frame + 1].to(self.vae.dtype))
            self.decoded, self.last_frame = frame + 1, video[:, :, -1:]
        elif frame + 1 < self.decoded:
            raise ValueError(f"the anchor of latent frame {frame} is behind the decoded stream ({self.decoded})")
        return self.vae.encode(self.last_frame).float().to(self.latents.device)


@dataclass
class Window:
    """What teacher and critic judge in one iteration."""

    latents: torch.Tensor    # [B, 16, chunk, h, w]; the new frames with the exit steps' graphs
    start: int               # its absolute latent frames [start, end)
    end: int
    mask: torch.Tensor       # [B, chunk]: the frames whose loss counts
    exit_step: int

    def conditions(self, stream: LongStream) -> dict:
        return stream.conditions.window(self.start, self.end)


def advance(student, stream: LongStream, plan: StreamPlan, iteration: int, noise: SampleNoise,
            schedule: FewStepSchedule, exit_step: int, autocast, with_grad: bool) -> Window:
    """One iteration of a stream: the next new latent frames, continuing from the stream's
    cache (with gradients at the exit steps when with_grad), and the window over the
    stream's last `chunk` frames, its first replaced by the anchor after a sequence's first
    iteration."""
    start = stream.length
    if start != plan.length_before(iteration):
        raise ValueError(f"iteration {iteration} of a sequence starts at latent frame "
                         f"{plan.length_before(iteration)}, but this stream is {start} frames long")
    made = rollout(student, stream.conditions, noise, schedule, exit_step, plan.new_latents(iteration), autocast,
                   with_grad=with_grad, cache=stream.cache, start_frame=start)
    old = stream.latents
    stream.latents = made.detach() if old is None else torch.cat([old, made.detach()], dim=2)
    end = stream.length
    first = end - plan.chunk
    latents = made if iteration == 0 else torch.cat([stream.anchor(first), old[:, :, first + 1:], made], dim=2)
    return Window(latents, first, end, plan.loss_mask(iteration, made.shape[0], made.device), exit_step)


def new_stream(student, conditions: Conditions, vae: WanVAE, cache_dtype: torch.dtype | None = None) -> LongStream:
    """An empty stream of these clips' conditions (one sample per clip)."""
    h, w = conditions.latent_size
    return LongStream(conditions, student.new_cache(conditions.batch, h, w, dtype=cache_dtype), vae)
