"""Validation of a streaming student that means something: it streams fixed first frames
under fixed actions through the real streaming loop (generation.streaming.StreamingGenerator,
the loop play_world.py runs) and is compared with the teacher's many-step bidirectional
generation of the same window.

Per validation clip (the most active clips of the validation split, fixed for the run):
- teacher_distance: the root-mean-square difference between the student's streamed
  latents and the teacher's latents (TEACHER_STEPS Euler steps, same first frame and
  actions), in the VAE's normalised latent units - what distillation drives down;
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
    teacher_latents: torch.Tensor  # [1, 16, F, h, w] on the device
    teacher_frames: torch.Tensor | None = None  # [T, 3, H, W] in [-1, 1] on the CPU, once decoded
    teacher_score: float | None = None


def most_active(clips, count: int) -> list[int]:
    """Indices of the count clips with the most frames where a key is held or the mouse moves
    (ties: the earlier clip), most active first."""
    active = [int((c.keyboard.any(dim=1) | c.mouse.ne(0).any(dim=1)).sum()) for c in clips]
    return sorted(range(len(clips)), key=lambda i: (-active[i], i))[:count]


@torch.no_grad()
def prepare_validation(teacher, dataset, count: int, teacher_steps: int, shift: float, seed: int, device,
                       autocast) -> list[ValidationClip]:
    """The run's validation clips with the teacher's latents (dataset: a CachedClipDataset)."""
    clips = []
    for n, index in enumerate(most_active(dataset.clips, count)):
        item = dataset[index]
        action = teacher.config.action_config
        conditions = Conditions(item["cond_concat"][None].to(device), item["visual_context"][None].to(device),
                                item["keyboard"][None].float().to(device) if action.enable_keyboard else None,
                                item["mouse"][None].float().to(device) if action.enable_mouse else None)
        latents = sample_latents(teacher, conditions.cond_concat, conditions.visual_context, item["keyboard"],
                                 item["mouse"], teacher_steps, shift, torch.Generator().manual_seed(seed + n),
                                 autocast)
        clips.append(ValidationClip(dataset.clips[index], conditions, item["keyboard"], item["mouse"], latents))
    return clips


@torch.no_grad()
def stream_clip(student, clip: ValidationClip, denoising_steps, shift: float, seed: int, decoder, autocast,
                cache_dtype=None) -> tuple[torch.Tensor, torch.Tensor | None, float]:
    """The student streams the clip's window block by block under the clip's own actions.
    Returns (latents [1, 16, F, h, w], frames [T, 3, H, W] on the CPU or None, seconds)."""
    c = clip.conditions
    generator = StreamingGenerator(student, c.cond_concat, c.visual_context, decoder,
                                   denoising_steps=denoising_steps, shift=shift, seed=seed, cache_dtype=cache_dtype)
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


def _mean(values) -> float | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else None


@torch.no_grad()
def validate_student(student, clips: list[ValidationClip], denoising_steps, shift: float, seed: int, vae_path,
                     keys, autocast, cache_dtype=None, preview_path=None, preview_info: dict | None = None,
                     height: int = 0, width: int = 0) -> dict:
    """Stream every validation clip; returns teacher_distance, action_score,
    teacher_action_score (means over the clips), fps, and the preview's summary when
    preview_path is given (the first clip: student, teacher and ground truth side by side,
    with the action overlay; the JSON beside it holds every panel's scores)."""
    device = clips[0].conditions.cond_concat.device
    was_training = student.training
    student.eval()
    vae = load_vae(vae_path, device=device, dtype=run_dtype(device))
    distances, scores, frames_made, seconds = [], [], 0, 0.0
    first_frames = None
    for n, clip in enumerate(clips):
        latents, frames, took = stream_clip(student, clip, denoising_steps, shift, seed + n, StreamingDecoder(vae),
                                            autocast, cache_dtype)
        distances.append(latent_distance(latents, clip.teacher_latents))
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
    result = {"teacher_distance": _mean(distances), "action_score": _mean(scores),
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
