"""What a run says about itself in training_info.txt: code version, device, counts."""

import os
import subprocess
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=REPO_ROOT, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=REPO_ROOT, timeout=5).stdout.strip()
        return out.stdout.strip() + (" (with uncommitted changes)" if dirty else "") if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"cpu ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def format_count(n: int) -> str:
    return f"{n:,} ({n / 1e6:.1f}M)"


def speed_lines(metrics: list[dict], device: torch.device, world: int) -> list[str]:
    """The mean seconds per optimizer step over the last 100 steps and, on CUDA, the peak
    GPU memory so far (of this rank)."""
    seconds = [m["seconds_per_step"] for m in metrics[-100:]]
    lines = [f"speed: {sum(seconds) / len(seconds):.3f} s per optimizer step (last {len(seconds)})"
             if seconds else "speed: no steps yet"]
    if device.type == "cuda":
        lines.append(f"peak GPU memory: {torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB"
                     + (" (rank 0)" if world > 1 else ""))
    return lines


def settings_and_data_lines(settings_text: str, report, cache_report) -> list[str]:
    """The end of an info file: every setting, the data report and the cache report."""
    return ["", "Settings:", settings_text, "", "Data report:", report.format(), "", cache_report.format(), ""]
