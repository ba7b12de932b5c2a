"""Preview files: generated (and real) panels with the action overlay as MP4/GIF, the
action-following scores beside them as JSON, and the training-time previews."""

from pathlib import Path

import torch

from generation.bidirectional import decode_frames, sample_latents
from recordings.clips import RecordingClipDataset
from video.action_score import action_following_score, format_share
from video.compare import psnr
from video.overlay import compose_frames, to_uint8
from video.writer import write_video
from wan.device import run_dtype
from wan.files import write_json_atomic
from wan.model import WanModel
from wan.shapes import FPS
from wan.vae import load_vae


def score_panels(panels: dict[str, torch.Tensor], keyboard: torch.Tensor, mouse: torch.Tensor, keys,
                 stride: int = 1) -> dict:
    """The action-following score of every panel {label: frames [T, 3, H, W]} against the same
    actions. With stride > 1 only every stride-th frame and action row is scored: at
    VAE_TIME_STRIDE these are the frames the latent frames hold themselves, so the score
    measures the motion the model decided, not what the VAE draws between latent frames -
    where the pictures move: frames that far apart that change shape instead give large
    shift estimates in random directions (bench/RESULTS.md, "what caps the previews")."""
    keys = tuple(str(k).upper() for k in keys)
    return {label: action_following_score(frames[::stride], keyboard[::stride], mouse[::stride], keys)
            for label, frames in panels.items()}


def format_score(score: dict) -> str:
    kinds = ", ".join(f"{kind} {format_share(score[kind]['agree'])} ({score[kind]['pairs']} pairs)"
                      for kind in ("forward_back", "strafe", "yaw", "pitch"))
    return f"overall {format_share(score['overall'])} - {kinds}"


def write_preview(path, panels: dict[str, torch.Tensor], keyboard: torch.Tensor, mouse: torch.Tensor, keys,
                  info: dict) -> tuple[Path, dict]:
    """Write the video of panels {label: frames [T, 3, H, W] in [-1, 1]} and, beside it with
    the same name, .json: info plus every panel's action-following score. Returns (video path,
    scores)."""
    video = compose_frames({label: to_uint8(frames) for label, frames in panels.items()}, keyboard, mouse, keys)
    written = write_video(path, video)
    scores = score_panels(panels, keyboard, mouse, keys)
    write_json_atomic(written.with_suffix(".json"), {
        **info, "video": written.name, "frames": video.shape[0], "fps": FPS, "panels": list(panels),
        "keyboard_keys": [str(k).upper() for k in keys],
        "scores": scores,
        "score_meaning": "per action kind, the share of frame pairs with that action commanded whose image motion "
                         "goes the commanded way (agree) or the other way (oppose); overall pools the kinds "
                         "(see video/action_score.py)"})
    return written, scores


# -----------------------------------------------------------------------------
# Training-time previews

PSNR_FRAMES = 8  # frames 1..8 after the given first one: the first two latent frames the model makes


@torch.no_grad()
def most_active_clips(clips, count: int) -> list[int]:
    """Indices of the count clips with the most frames where a key is held or the mouse
    moves, most active first (the first of equals): a clip of standing still would show,
    and score, nothing."""
    active = [int((c.keyboard.any(dim=1) | c.mouse.ne(0).any(dim=1)).sum()) for c in clips]
    return sorted(range(len(clips)), key=lambda i: (-active[i], i))[:count]


def preview_clip_index(clips) -> int:
    """The most active clip (see most_active_clips)."""
    return most_active_clips(clips, 1)[0]


def other_clip_index(index: int, count: int) -> int:
    """The clip whose actions stand in for clip index's in a control (the previews' and
    validation's shuffled actions): half the set away, because neighbouring clips overlap in
    time and share most of their actions, so a shift by one would change little."""
    return (index + max(1, count // 2)) % count


def first_frames_psnr(generated: torch.Tensor, truth: torch.Tensor, count: int = PSNR_FRAMES) -> float | None:
    """PSNR in dB of frames 1..count of generated [T, 3, H, W] against the real ones (frame 0
    is the given first frame, not a prediction); None for a one-frame clip."""
    end = min(count + 1, generated.shape[0], truth.shape[0])
    return psnr(generated[1:end], truth[1:end]) if end > 1 else None


def generate_cached_clip(model: WanModel, item: dict, keyboard: torch.Tensor, mouse: torch.Tensor, num_steps: int,
                         shift: float, seed: int, autocast) -> torch.Tensor:
    """Latents of a cached clip's item (its first frame's conditioning) generated with the given
    actions [T, K] and [T, 2], from the noise of seed; the model's train/eval mode is kept."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    latents = sample_latents(model, item["cond_concat"][None].to(device), item["visual_context"][None].to(device),
                             keyboard, mouse, num_steps, shift, torch.Generator().manual_seed(seed), autocast)
    model.train(was_training)
    return latents


def epoch_preview(model: WanModel, clips, vae_path, height: int, width: int, out_dir, epoch: int, keyboard_keys,
                  num_steps: int, shift: float, seed: int, autocast, write: bool = True, control: bool = True) -> dict:
    """Generate the most active clip of `clips` (a CachedClipDataset; see preview_clip_index)
    with its own actions and its cached conditioning, beside its real frames; write
    out_dir/epoch{N}.mp4 (or .gif) and .json. Returns what the training script records:
    the summary line, the action-following scores and the PSNR of frames 1..8.

    With control (and 2+ clips) the same clip is generated a second time from the same noise
    with another clip's actions (other_clip_index) and scored against its own actions: a model
    that follows the keys scores clearly lower there; one that ignores them scores the same.

    The VAE is loaded for the decode and freed after, so it holds no GPU memory while
    training. Only seeded generators are used: the training's random state is untouched.
    With write=False only the sampling runs (the other ranks of a sharded model take part).
    """
    device = next(model.parameters()).device
    index = preview_clip_index(clips.clips)
    item, clip = clips[index], clips.clips[index]
    latents = generate_cached_clip(model, item, item["keyboard"], item["mouse"], num_steps, shift, seed, autocast)
    other = other_clip_index(index, len(clips)) if control and len(clips) > 1 else None
    if other is not None:
        swapped = clips[other]
        control_latents = generate_cached_clip(model, item, swapped["keyboard"], swapped["mouse"], num_steps, shift,
                                               seed, autocast)
    if not write:
        return {}
    vae = load_vae(vae_path, device=device, dtype=run_dtype(device))
    generated = decode_frames(vae, latents)
    controlled = decode_frames(vae, control_latents) if other is not None else None
    del vae
    if device.type == "cuda":
        torch.cuda.empty_cache()
    truth = RecordingClipDataset([clip], height, width)[0]["video"].transpose(0, 1)
    frames_psnr = first_frames_psnr(generated, truth)
    info = {"epoch": epoch, "clip": clip.clip_id, "num_steps": num_steps, "timestep_shift": shift, "seed": seed,
            "psnr_frames_1_to_8": frames_psnr}
    if other is not None:
        control_score = score_panels({"control": controlled}, item["keyboard"], item["mouse"], keyboard_keys)["control"]
        info["control"] = {
            "meaning": "the same clip generated from the same noise with another clip's actions, scored against "
                       "this clip's actions: a model that follows the keys scores clearly lower here",
            "actions_of": clips.clips[other].clip_id, "score": control_score}
    written, scores = write_preview(
        Path(out_dir) / f"epoch{epoch}.mp4", {"generated": generated, "ground truth": truth}, item["keyboard"],
        item["mouse"], keyboard_keys, info)
    ours, real = scores["generated"]["overall"], scores["ground truth"]["overall"]
    shuffled = control_score["overall"] if other is not None else None
    summary = (f"{written.parent.name}/{written.name}: action-following {format_share(ours)} ("
               + (f"another clip's keys {format_share(shuffled)}, " if other is not None else "")
               + f"ground truth {format_share(real)})"
               + ("" if frames_psnr is None else f", PSNR of frames 1-{PSNR_FRAMES} {frames_psnr:.1f} dB"))
    result = {"preview": summary, "preview_score": ours, "preview_truth_score": real, "preview_psnr": frames_psnr}
    if other is not None:
        result["preview_shuffled_score"] = shuffled
    return result

