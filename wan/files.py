"""File safety: atomic writes, folder locks, and clear errors when the disk is full.

Every output a user or a resumed run reads (checkpoints, training state, cache shards,
manifests, logs) goes through write_atomic: a crash leaves the old file or the new one,
never half of one, and a full disk leaves the earlier files as they were. A run folder
or a cache being written is locked with an OS file lock, which disappears with the
process that holds it (a kill -9 never leaves a stale lock).
"""

import datetime
import errno
import fcntl
import glob
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file

LOCK_NAME = ".lock"
TEMP_SUFFIX = r"[A-Za-z0-9_]{8}\.tmp"  # what mkstemp adds to write_atomic's ".NAME."
TEMP_FILE = re.compile(r"\..+\." + TEMP_SUFFIX)  # what write_atomic's temp files are named
OUT_OF_SPACE_WORDS = ("no space left", "storagefull", "file write failed", "disk quota")


class DiskFullError(OSError):
    """A write failed for lack of space; the message names the device's folder and the bytes needed."""


class FolderInUseError(OSError):
    """Another process holds the lock on a folder; the message names the folder and that process."""


def write_atomic(path, write: Callable[[str], None], size_hint: int | None = None) -> Path:
    """Call write(temp_path), fsync it, then rename it over path. size_hint (bytes the file
    will take) makes a full disk's error say how much was needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # Held while the file is written: remove_stale_temp_files leaves a locked one alone
        # (another process is writing it), whoever calls it, whatever else locks the folder.
        fcntl.flock(fd, fcntl.LOCK_EX)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp (and some writers) make it private; a normal file's mode
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if _out_of_space(error, path.parent, size_hint):
            raise DiskFullError(errno.ENOSPC, _disk_full_message(path, size_hint)) from error
        raise
    finally:
        os.close(fd)
    _fsync_directory(path.parent)
    return path


def _out_of_space(error: BaseException, folder: Path, size_hint: int | None) -> bool:
    """torch and safetensors report a full disk in their own words (or as a stream error),
    without an errno: a write that cannot fit in what is free failed for lack of space."""
    if not isinstance(error, Exception):
        return False
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    if size_hint is not None and shutil.disk_usage(folder).free < size_hint + (1 << 20):
        return True
    return any(w in str(error).lower() for w in OUT_OF_SPACE_WORDS)


def _disk_full_message(path: Path, size_hint: int | None) -> str:
    free = shutil.disk_usage(path.parent).free
    needed = f"{size_hint:,} bytes needed, {free:,} free" if size_hint else f"{free:,} bytes free"
    return (f"no space left on the device holding {path.parent} while writing {path.name}: {needed}. "
            f"Nothing was replaced: the earlier files in {path.parent} are as they were. Free some space "
            "(or point the output elsewhere) and run again")


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
    # A file name that is not valid UTF-8 reaches us as surrogate escapes; it is written as
    # its bytes in \x.. form (take\xff) instead of failing the whole write.
    data = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace").encode("utf-8")
    return write_atomic(path, lambda tmp: Path(tmp).write_bytes(data), len(data))


def write_json_atomic(path, obj) -> Path:
    return write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def tensor_bytes(obj) -> int:
    """Bytes of the tensors in a nest of dicts, lists and tuples (a file's size, roughly)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def torch_save_atomic(obj, path) -> Path:
    return write_atomic(path, lambda tmp: torch.save(obj, tmp), tensor_bytes(obj))


def save_safetensors_atomic(tensors: dict, path, metadata: dict | None = None) -> Path:
    """safetensors needs contiguous, non-shared tensors; metadata values must be strings."""
    tensors = {name: t.detach().contiguous() for name, t in tensors.items()}
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    return write_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata), tensor_bytes(tensors))


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


# -----------------------------------------------------------------------------
# Folders

def check_output_folder(path, setting: str) -> Path:
    """A folder this run will write into: it may not exist yet, but must not be a file."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{setting}={path} is a file, not a folder; choose a folder (it is created if "
                              "missing)")
    return path


class FolderLock:
    """An exclusive lock on a folder (flock on FOLDER/.lock) for as long as it is held.

    The lock file says who holds it, so a second process is told which one is in the way.
    flock locks belong to the open file: the OS drops them when the process ends, however
    it ends.
    """

    def __init__(self, folder, what: str):
        self.folder, self.what = Path(folder), what
        self.path = self.folder / LOCK_NAME
        self._fd = None

    def acquire(self) -> "FolderLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise FolderInUseError(errno.EBUSY, f"{self.folder} is in use by another {self.what}: {holder}. Wait "
                                                "for it to finish, or use another folder") from None
        os.ftruncate(fd, 0)
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.write(fd, f"process {os.getpid()} on {socket.gethostname()}, started {started}: "
                     f"{' '.join(sys.argv)[:300]}\n".encode("utf-8", "backslashreplace"))
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race)
            self._fd = None

    def __enter__(self) -> "FolderLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temp_files(folder, name: str | None = None) -> list[Path]:
    """Delete the temp files write_atomic leaves when killed mid-write, in folder and its
    subfolders - or, given a file's name, only that file's in folder itself (a script's
    output beside other files). A temp file another process is still writing is locked
    (write_atomic), and kept."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    if name is None:
        found = [p for p in folder.rglob(".*.tmp") if TEMP_FILE.fullmatch(p.name)]
    else:
        own = re.compile(re.escape(f".{name}.") + TEMP_SUFFIX)
        found = [p for p in folder.glob(f".{glob.escape(name)}.*.tmp") if own.fullmatch(p.name)]
    return [path for path in found if path.is_file() and _remove_unless_locked(path)]


def remove_stale_temps_of(path, log=print) -> list[Path]:
    """The temp files a killed write of this one file left beside it, removed and said."""
    path = Path(path)
    stale = remove_stale_temp_files(path.parent, path.name)
    if stale:
        log(f"removed {len(stale)} unfinished temporary file(s) of {path.name} left by an interrupted run: "
            f"{', '.join(p.name for p in stale[:5])}" + (" ..." if len(stale) > 5 else ""))
    return stale


def _remove_unless_locked(path: Path) -> bool:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False  # gone already (its writer finished)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    else:
        path.unlink(missing_ok=True)
        return True
    finally:
        os.close(fd)
