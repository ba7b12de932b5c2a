"""Atomic file writes: a crash leaves the old file or the new one, never half of one.

Every output a user or a resumed run reads (checkpoints, training state, cache shards,
manifests, logs) goes through here.
"""

import json
import os
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file


def write_atomic(path, write: Callable[[str], None]) -> Path:
    """Call write(temp_path), fsync it, then rename it over path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); give it a normal file's mode
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    _fsync_directory(path.parent)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_directory(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_text_atomic(path, text: str) -> Path:
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    return write_atomic(path, write)


def write_json_atomic(path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def torch_save_atomic(obj, path) -> Path:
    return write_atomic(path, lambda tmp: torch.save(obj, tmp))


def save_safetensors_atomic(tensors: dict, path, metadata: dict | None = None) -> Path:
    """safetensors needs contiguous, non-shared tensors; metadata values must be strings."""
    tensors = {name: t.detach().contiguous() for name, t in tensors.items()}
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def load_torch_checkpoint(path, what: str, hint: str) -> dict:
    """A .pth state dict, memory-mapped and tensors only (weights_only), or an error naming
    the file: missing, unreadable (a partial download), or not a dict."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} checkpoint not found: {path}. {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ValueError(f"could not read the {what} checkpoint {path} ({error}); the file may be incomplete "
                         f"or corrupt. {hint}") from error
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, expected a state dict. {hint}")
    return state
