"""The run folder (CHECKPOINT_DIR) as a trainer uses it: locked for the whole run, the saved
state it resumes from, the check that a resumed run is the same run, and the files it
writes as it goes.

Every trainer writes the same kinds of file here: its state (to resume exactly),
metrics.csv (one row per optimizer step), weights files and an info file a person reads
first; metrics.csv, TensorBoard events and training_curves.png go through the folder's
logbook (runs/logbook.py). The state holds only what torch.load(weights_only=True) reads
back - tensors, dicts, lists, tuples, numbers, strings - so a state file from someone else
can never run code.
"""

import os
import pickle
from pathlib import Path

import torch

from runs.errors import TrainingError
from runs.logbook import Logbook
from runs.metrics import METRICS_COLUMNS, METRICS_FILE, read_metrics_csv
from runs.saved_state import check_common_fields
from wan.files import (FolderLock, check_output_folder, remove_stale_temp_files, save_safetensors_atomic,
                       torch_save_atomic, write_text_atomic)

STATE_FILE = "training_state.pt"


def load_state(path: Path) -> dict:
    """A saved training state, tensors and plain data only; a damaged file gets a message
    that names it and says what to do."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError:
        raise TrainingError(
            f"cannot read the saved training state {path}: it holds objects other than tensors and plain data, "
            "which are never loaded (loading them could run code). It is not a state this script wrote. "
            f"Restore the file from a backup, or start a new run in another CHECKPOINT_DIR (or remove {path.name} "
            "to start over in this one)") from None
    except Exception as error:
        reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
        raise TrainingError(
            f"cannot read the saved training state {path} ({reason}): it is truncated or corrupt. Restore the "
            "file from a backup, or start a new run in another CHECKPOINT_DIR (or remove "
            f"{path.name} to start over in this one)") from None
    if not isinstance(state, dict) or "settings" not in state:
        raise TrainingError(f"{path} is not a training state written by this script (no settings in it); restore "
                            "the file or start a new run in another CHECKPOINT_DIR")
    check_common_fields(state, path)  # the trainer checks the rest once its model is built
    return state


def same_setting(name: str, saved, current) -> bool:
    """Folders are the same folder however they are written (relative, absolute, with ..)."""
    if name.endswith(("_DIR", "_PATH")) and isinstance(saved, str) and isinstance(current, str):
        return os.path.realpath(saved) == os.path.realpath(current)
    return saved == current


class RunFolder:
    """CHECKPOINT_DIR of one run, locked by the main rank while the run lives. `resumed`
    holds the saved state when the run continues one. metrics_columns: the columns of the
    trainer's metrics.csv. `logbook` writes what people read as the run goes (metrics.csv,
    TensorBoard events when tensorboard is on, training_curves.png with the panels of
    curves, titled title)."""

    def __init__(self, path, resume: bool, main: bool = True, log=print, metrics_columns=METRICS_COLUMNS,
                 tensorboard: bool = False, curves=None, title: str = ""):
        self.path = check_output_folder(path, "CHECKPOINT_DIR")
        self.main = main
        self.metrics_columns = tuple(metrics_columns)
        self.state_path = self.path / STATE_FILE
        self.lock = FolderLock(self.path, "training run").acquire() if main else None
        if main:
            stale = remove_stale_temp_files(self.path)
            if stale:
                log(f"removed {len(stale)} unfinished temporary file(s) left in {self.path} by an interrupted "
                    f"write: {', '.join(str(p.relative_to(self.path)) for p in stale[:5])}"
                    + (" ..." if len(stale) > 5 else ""))
        if self.state_path.exists() and not resume:
            self.close()
            raise TrainingError(f"{self.path} already holds a run ({STATE_FILE}); set --RESUME=true to continue it, "
                                "or choose another CHECKPOINT_DIR (nothing was overwritten)")
        try:
            self.resumed = load_state(self.state_path) if resume and self.state_path.exists() else None
        except TrainingError:
            self.close()  # the folder is free again for the next try
            raise
        if resume and self.resumed is None:
            log(f"RESUME is on but {self.state_path} does not exist: starting a new run")
        self.saved_step = self.resumed["global_step"] if self.resumed is not None else None
        if main:
            self.path.mkdir(parents=True, exist_ok=True)
        self.logbook = Logbook(self.path, self.metrics_columns, main, tensorboard, curves, title, self.saved_step, log)

    def close(self) -> None:
        if getattr(self, "logbook", None) is not None:
            self.logbook.close()
        if self.lock is not None:
            self.lock.release()

    def __enter__(self) -> "RunFolder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def check_same_run(self, current: dict, must_match) -> None:
        """Refuse to resume with settings that shaped the saved state differently."""
        if self.resumed is None:
            return
        saved = self.resumed["settings"]
        changed = [f"{n}: {saved.get(n)!r} -> {current[n]!r}" for n in must_match
                   if not same_setting(n, saved.get(n), current[n])]
        if changed:
            raise TrainingError(f"cannot resume {self.state_path}: these settings differ from the saved run:\n  "
                                + "\n  ".join(changed))

    def on_disk(self) -> str:
        """What a stopped run leaves behind, for its last message."""
        if self.saved_step is None:
            return f"nothing was saved yet in {self.path}"
        return (f"the files in {self.path} are from the last save (optimizer step {self.saved_step}) and remain "
                "valid; continue from them with --RESUME=true")

    def saved_metrics(self, up_to_step: int) -> list:
        """The metrics rows of the resumed run up to its saved step (later ones are re-run)."""
        return (read_metrics_csv(self.path / METRICS_FILE, up_to_step, self.metrics_columns) if self.resumed is not None
                else [])

    def existing(self, pattern: str) -> list[str]:
        """Names of the files a resumed run already wrote (none for a new run)."""
        return [p.name for p in sorted(self.path.glob(pattern))] if self.resumed is not None else []

    def write_metrics(self, rows: list) -> None:
        """metrics.csv, and the new rows' TensorBoard events (runs/logbook.py)."""
        self.logbook.write_rows(rows)

    def save_state(self, state: dict, metrics: list) -> None:
        """Metrics first: a kill between the two writes must not lose the saved steps' rows."""
        if self.main:
            self.write_metrics(metrics)
            torch_save_atomic(state, self.state_path)
        self.saved_step = state["global_step"]

    def save_weights(self, tensors: dict, name: str, metadata: dict) -> None:
        if self.main:
            save_safetensors_atomic(tensors, self.path / name, metadata)

    def write_text(self, name: str, text: str) -> None:
        if self.main:
            write_text_atomic(self.path / name, text)
