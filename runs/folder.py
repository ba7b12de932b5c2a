"""The run folder (CHECKPOINT_DIR) as a trainer uses it: the saved state it resumes from,
the check that a resumed run is the same run, and the files it writes as it goes.

Every trainer writes the same three kinds of file here: its state (to resume exactly),
metrics.csv (one row per optimizer step) and an info file a person reads first.
"""

from pathlib import Path

import torch

from runs.metrics import format_metrics_csv, read_metrics_csv
from runs.errors import TrainingError
from wan.files import save_safetensors_atomic, torch_save_atomic, write_text_atomic

STATE_FILE = "training_state.pt"
METRICS_FILE = "metrics.csv"


class RunFolder:
    """CHECKPOINT_DIR of one run. `resumed` holds the saved state when the run continues one."""

    def __init__(self, path, resume: bool, main: bool = True, log=print):
        self.path = Path(path)
        self.main = main
        self.state_path = self.path / STATE_FILE
        if self.state_path.exists() and not resume:
            raise TrainingError(f"{self.path} already holds a run ({STATE_FILE}); set --RESUME=true to continue it, "
                                "or choose another CHECKPOINT_DIR (nothing was overwritten)")
        self.resumed = None
        if resume and self.state_path.exists():
            self.resumed = torch.load(self.state_path, map_location="cpu", weights_only=False, mmap=True)
        if resume and self.resumed is None:
            log(f"RESUME is on but {self.state_path} does not exist: starting a new run")
        if main:
            self.path.mkdir(parents=True, exist_ok=True)

    def check_same_run(self, current: dict, must_match) -> None:
        """Refuse to resume with settings that shaped the saved state differently."""
        if self.resumed is None:
            return
        saved = self.resumed["settings"]
        changed = [f"{n}: {saved.get(n)!r} -> {current[n]!r}" for n in must_match if saved.get(n) != current[n]]
        if changed:
            raise TrainingError(f"cannot resume {self.state_path}: these settings differ from the saved run:\n  "
                                + "\n  ".join(changed))

    def saved_metrics(self, up_to_step: int) -> list:
        """The metrics rows of the resumed run up to its saved step (later ones are re-run)."""
        return read_metrics_csv(self.path / METRICS_FILE, up_to_step) if self.resumed is not None else []

    def existing(self, pattern: str) -> list[str]:
        """Names of the files a resumed run already wrote (none for a new run)."""
        return [p.name for p in sorted(self.path.glob(pattern))] if self.resumed is not None else []

    def write_metrics(self, rows: list) -> None:
        if self.main:
            write_text_atomic(self.path / METRICS_FILE, format_metrics_csv(rows))

    def save_state(self, state: dict, metrics: list) -> None:
        """Metrics first: a kill between the two writes must not lose the saved steps' rows."""
        if self.main:
            self.write_metrics(metrics)
            torch_save_atomic(state, self.state_path)

    def save_weights(self, tensors: dict, name: str, metadata: dict) -> None:
        if self.main:
            save_safetensors_atomic(tensors, self.path / name, metadata)

    def write_text(self, name: str, text: str) -> None:
        if self.main:
            write_text_atomic(self.path / name, text)
