"""Preview files: generated (and real) panels with the action overlay as MP4/GIF, the
action-following scores beside them as JSON, and the training-time previews."""

from pathlib import Path

import torch

from generation.bidirectional import decode_frames, sample_latents
from recordings.clips import RecordingClipDataset
from video.action_score import action_following_score
from video.overlay import compose_frames, to_uint8
from video.writer import write_video
from wan.device import run_dtype
from wan.files import write_json_atomic
from wan.model import WanModel
from wan.shapes import FPS
from wan.vae import load_vae


def score_panels(panels: dict[str, torch.Tensor], keyboard: torch.Tensor, mouse: torch.Tensor, keys) -> dict:
    return {label: action_following_score(frames, keyboard, mouse, tuple(str(k).upper() for k in keys))
            for label, frames in panels.items()}


def format_score(score: dict) -> str:
    def share(value):
        return "n/a" if value is None else f"{value:.2f}"

    kinds = ", ".join(f"{kind} {share(score[kind]['agree'])} ({score[kind]['pairs']} pairs)"
                      for kind in ("forward_back", "strafe", "yaw", "pitch"))
    return f"overall {share(score['overall'])} - {kinds}"


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

@torch.no_grad()
def preview_clip_index(clips) -> int:
    """The clip with the most frames where a key is held or the mouse moves (the first of
    equals): a clip of standing still would show, and score, nothing."""
    active = [int((c.keyboard.any(dim=1) | c.mouse.ne(0).any(dim=1)).sum()) for c in clips]
    return active.index(max(active))


def epoch_preview(model: WanModel, clips, vae_path, height: int, width: int, out_dir, epoch: int, keyboard_keys,
                  num_steps: int, shift: float, seed: int, autocast, write: bool = True) -> dict:
    """Generate the most active clip of `clips` (a CachedClipDataset; see preview_clip_index)
    with its own actions and its cached conditioning, beside its real frames; write
    out_dir/epoch{N}.mp4 (or .gif) and .json. Returns what the training script records.

    The VAE is loaded for the decode and freed after, so it holds no GPU memory while
    training. Only seeded generators are used: the training's random state is untouched.
    With write=False only the sampling runs (the other ranks of a sharded model take part).
    """
    device = next(model.parameters()).device
    index = preview_clip_index(clips.clips)
    item, clip = clips[index], clips.clips[index]
    was_training = model.training
    model.eval()
    latents = sample_latents(model, item["cond_concat"][None].to(device), item["visual_context"][None].to(device),
                             item["keyboard"], item["mouse"], num_steps, shift,
                             torch.Generator().manual_seed(seed), autocast)
    model.train(was_training)
    if not write:
        return {}
    vae = load_vae(vae_path, device=device, dtype=run_dtype(device))
    generated = decode_frames(vae, latents)
    del vae
    if device.type == "cuda":
        torch.cuda.empty_cache()
    truth = RecordingClipDataset([clip], height, width)[0]["video"].transpose(0, 1)
    written, scores = write_preview(
        Path(out_dir) / f"epoch{epoch}.mp4", {"generated": generated, "ground truth": truth}, item["keyboard"],
        item["mouse"], keyboard_keys,
        {"epoch": epoch, "clip": clip.clip_id, "num_steps": num_steps, "timestep_shift": shift, "seed": seed})
    ours, real = scores["generated"]["overall"], scores["ground truth"]["overall"]
    summary = (f"{written.parent.name}/{written.name}: action-following "
               + ("n/a" if ours is None else f"{ours:.2f}") + " (ground truth "
               + ("n/a" if real is None else f"{real:.2f}") + ")")
    return {"preview": summary, "preview_score": ours, "preview_truth_score": real}
