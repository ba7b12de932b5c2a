"""Validation of a streaming student that means something: it streams fixed first frames
under fixed actions through the real streaming loop (generation.streaming.StreamingGenerator,
the loop play_world.py runs) and is compared with the teacher's many-step bidirectional
generation of the same window.

Per validation clip (the most active clips of the validation split, fixed for the run),
from `samples` noises each for student and teacher:
- teacher_distance: the root-mean-square difference between the student's streamed
  latents and the teacher's latents (TEACHER_STEPS Euler steps, same first frame and
  actions), in the VAE's normalised latent units, for the first noise of each;
- distribution_distance: the energy distance between the student's and the teacher's
  videos over all the noises - zero only when the student's videos are distributed like
  the teacher's, which is what distribution matching (DMD) drives towards;
- student_spread and teacher_spread: the mean RMS difference between two of the
  student's, and two of the teacher's, videos (different noises).
Why both distances: the student and the teacher sample independently (a few-step stream
with fresh noise at every step against a 50-step ODE), so teacher_distance^2 is about
student_spread^2 / 2 + teacher_spread^2 / 2 + the squared distance of the two mean videos.
A student that makes the average video scores well on it, and the teacher itself, given
another noise, scores teacher_spread. As the student's videos grow as varied as the
teacher's, teacher_distance rises while the distributions draw together; the energy
distance charges for both a wrong mean and a wrong spread.
- action_score: the action-following score (video/action_score.py) of the decoded
  stream, beside the teacher's own;
- fps: video frames streamed per second, student and streaming VAE decode included
  (on the training device, under the training's autocast).
Teacher latents are made once per run (seeded, so a resumed run remakes the same ones).
"""

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from generation.bidirectional import decode_frames, sample_latents
from generation.previews import write_preview
from generation.streaming import StreamingGenerator, block_action_chunks
from recordings.clips import RecordingClipDataset
from training.epochs import seeded_generator
from training.rollout import Conditions
from video.action_score import action_following_score
from wan.device import run_dtype
from wan.vae import StreamingDecoder, load_vae


@dataclass
class ValidationClip:
    clip: object                 # recordings.clips.ClipRef
    conditions: Conditions       # batch 1, on the device
    keyboard: torch.Tensor       # [T, K] on the CPU
    mouse: torch.Tensor          # [T, 2]
    teacher_samples: list        # the teacher's latents [1, 16, F, h, w] on the device, one per noise
    teacher_frames: torch.Tensor | None = None  # [T, 3, H, W] in [-1, 1] on the CPU, once decoded
    teacher_score: float | None = None

    @property
    def teacher_latents(self) -> torch.Tensor:
        """The teacher's video from the first noise: what teacher_distance, the action score and
        the preview use."""
        return self.teacher_samples[0]


def sample_seed(seed: int, clip_index: int, sample: int) -> int:
    """The noise seed of a validation clip's sample-th video, the teacher's and the
    student's: seed + clip_index for the first (teacher_distance's pair, as it always was),
    an independent seeded stream for each other."""
    if sample == 0:
        return seed + clip_index
    return seeded_generator(seed, "validation", clip_index, sample).initial_seed()


def most_active(clips, count: int) -> list[int]:
    """Indices of the count clips with the most frames where a key is held or the mouse moves
    (ties: the earlier clip), most active first."""
    active = [int((c.keyboard.any(dim=1) | c.mouse.ne(0).any(dim=1)).sum()) for c in clips]
    return sorted(range(len(clips)), key=lambda i: (-active[i], i))[:count]


@torch.no_grad()
def prepare_validation(teacher, dataset, count: int, teacher_steps: int, shift: float, seed: int, device,
                       autocast, samples: int = 1) -> list[ValidationClip]:
    """The run's validation clips with the teacher's latents from `samples` noises each
    (dataset: a CachedClipDataset)."""
    clips = []
    for n, index in enumerate(most_active(dataset.clips, count)):
        item = dataset[index]
        action = teacher.config.action_config
        conditions = Conditions(item["cond_concat"][None].to(device), item["visual_context"][None].to(device),
                                item["keyboard"][None].float().to(device) if action.enable_keyboard else None,
                                item["mouse"][None].float().to(device) if action.enable_mouse else None)
        latents = [sample_latents(teacher, conditions.cond_concat, conditions.visual_context, item["keyboard"],
                                  item["mouse"], teacher_steps, shift,
                                  torch.Generator().manual_seed(sample_seed(seed, n, k)), autocast)
                   for k in range(samples)]
        clips.append(ValidationClip(dataset.clips[index], conditions, item["keyboard"], item["mouse"], latents))
    return clips


@torch.no_grad()
def stream_clip(student, clip: ValidationClip, denoising_steps, shift: float, seed: int, decoder, autocast,
                cache_dtype=None, compile_mode: str = "off") -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """The student streams the clip's window block by block under the clip's own actions
    (compile_mode: StreamingGenerator's). Returns (latents [1, 16, F, h, w], frames
    [T, 3, H, W] on the CPU or None, seconds)."""
    c = clip.conditions
    generator = StreamingGenerator(student, c.cond_concat, c.visual_context, decoder,
                                   denoising_steps=denoising_steps, shift=shift, seed=seed, cache_dtype=cache_dtype,
                                   compile_mode=compile_mode)
    device = c.cond_concat.device
    started = time.perf_counter()
    latents, video = [], []
    for keyboard, mouse in block_action_chunks(c.keyboard, c.mouse, student.frames_per_block):
        with autocast:
            block = generator.step(keyboard, mouse)
        latents.append(block.latents)
        if block.video is not None:
            video.append(block.video[0].float().cpu())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - started
    frames = torch.cat(video, dim=1).transpose(0, 1) if video else None
    return torch.cat(latents, dim=2), frames, seconds


def latent_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Root-mean-square difference of two latent videos of the same shape."""
    return torch.sqrt(((a.float() - b.float()) ** 2).mean()).item()


def spread(videos: list) -> float | None:
    """The mean latent_distance between two different videos of the list (None: fewer than 2)."""
    pairs = [latent_distance(a, b) for i, a in enumerate(videos) for b in videos[i + 1:]]
    return sum(pairs) / len(pairs) if pairs else None


def energy_distance(students: list, teachers: list) -> float | None:
    """Szekely's energy distance between two sets of videos under latent_distance:
    2 E d(S, T) - E d(S, S') - E d(T, T'), each mean over distinct pairs (unbiased, so a
    small sample may give slightly below 0). For the Euclidean distance it is zero exactly
    when the two distributions are equal; a student that always makes the teacher's mean
    video is charged for its missing spread. None with fewer than 2 videos in a set."""
    within_students, within_teachers = spread(students), spread(teachers)
    if within_students is None or within_teachers is None:
        return None
    across = sum(latent_distance(s, t) for s in students for t in teachers) / (len(students) * len(teachers))
    return 2 * across - within_students - within_teachers


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


@torch.no_grad()
def validate_student(student, clips: list[ValidationClip], denoising_steps, shift: float, seed: int, vae_path,
                     keys, autocast, cache_dtype=None, preview_path=None, preview_info: dict | None = None,
                     height: int = 0, width: int = 0, compile_mode: str = "off") -> dict:
    """Stream every validation clip from as many noises as the teacher made videos for it;
    returns teacher_distance, distribution_distance, student_spread, teacher_spread,
    action_score, teacher_action_score (means over the clips), fps (of the first noise's
    streams, decoded as a player sees them), and the preview's summary when
    preview_path is given (the first clip: student, teacher and ground truth side by side,
    with the action overlay; the JSON beside it holds every panel's scores). compile_mode: the
    streams' (VAL_COMPILE; the first validation's fps then includes the compiling)."""
    device = clips[0].conditions.cond_concat.device
    was_training = student.training
    student.eval()
    vae = load_vae(vae_path, device=device, dtype=run_dtype(device))
    distances, energies, spreads, scores, frames_made, seconds = [], [], [], [], 0, 0.0
    first_frames = None
    for n, clip in enumerate(clips):
        latents, frames, took = stream_clip(student, clip, denoising_steps, shift, sample_seed(seed, n, 0),
                                            StreamingDecoder(vae), autocast, cache_dtype, compile_mode)
        samples = [latents] + [stream_clip(student, clip, denoising_steps, shift, sample_seed(seed, n, k), None,
                                           autocast, cache_dtype, compile_mode)[0]
                               for k in range(1, len(clip.teacher_samples))]
        distances.append(latent_distance(latents, clip.teacher_latents))
        energies.append(energy_distance(samples, clip.teacher_samples))
        spreads.append(spread(samples))
        scores.append(action_following_score(frames, clip.keyboard, clip.mouse, keys)["overall"])
        frames_made, seconds = frames_made + frames.shape[0], seconds + took
        if clip.teacher_frames is None:  # decoded once per run
            clip.teacher_frames = decode_frames(vae, clip.teacher_latents)
            clip.teacher_score = action_following_score(clip.teacher_frames, clip.keyboard, clip.mouse,
                                                        keys)["overall"]
        if n == 0:
            first_frames = frames
    del vae
    if device.type == "cuda":
        torch.cuda.empty_cache()
    student.train(was_training)
    result = {"teacher_distance": _mean(distances), "distribution_distance": _mean(energies),
              "student_spread": _mean(spreads), "teacher_spread": _mean([spread(c.teacher_samples) for c in clips]),
              "action_score": _mean(scores),
              "teacher_action_score": _mean([c.teacher_score for c in clips]), "fps": frames_made / seconds}
    if preview_path is not None:
        clip = clips[0]
        truth = RecordingClipDataset([clip.clip], height, width)[0]["video"].transpose(0, 1)
        written, _ = write_preview(Path(preview_path), {"student (streamed)": first_frames,
                                                        "teacher": clip.teacher_frames, "ground truth": truth},
                                   clip.keyboard, clip.mouse, keys,
                                   {**(preview_info or {}), "clip": clip.clip.clip_id,
                                    "teacher_distance": distances[0]})
        result["preview"] = f"{written.parent.name}/{written.name}"
    return result
