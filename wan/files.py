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
