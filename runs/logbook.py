"""What a run writes for people as it goes, behind one object both trainers use:

    metrics.csv            one row per optimizer step, rewritten atomically (runs/metrics.py)
    tensorboard/           TensorBoard event files: every metrics column as train/<column>,
                           every number of a validation as validation/<name> (an epoch's
                           mean loss: train/loss_epoch_mean), each preview as an image
                           (preview/video: frames of the video in a grid)
    training_curves.png    the run's curves (runs/curves.py), redrawn at each validation

TensorBoard is the field's convention (`tensorboard --logdir CHECKPOINT_DIR`); its
events are optional (the TENSORBOARD setting, on where the package is installed) and so is
the picture (matplotlib): a run without either package goes on with a one-line note.

Previews go in as stills: TensorBoard's video panel needs moviepy, which is not a
dependency, so PREVIEW_FRAMES frames spread over the preview are tiled into one image.

Resuming: a resumed run re-runs the steps after its last save. Its writer starts with
purge_step = the saved step + 1, which tells TensorBoard to drop the earlier run's events
from that step on, so no step appears twice. An event file is a log of records each with
its own checksum: a kill mid-record leaves a torn last record that readers skip.
"""

import importlib.util
from pathlib import Path

from runs.curves import draw_curves
from runs.metrics import METRICS_FILE, format_metrics_csv
from wan.files import write_text_atomic

TENSORBOARD_DIR = "tensorboard"
CURVES_FILE = "training_curves.png"
PREVIEW_FRAMES, PREVIEW_COLUMNS, PREVIEW_WIDTH = 8, 4, 2048   # the preview still: 8 frames, 4 a row, <= 2048 px
NOT_LOGGED = ("step", "epoch", "seconds")                     # numbers of an entry that are its place, not a measure


def tensorboard_installed() -> bool:
    """The TENSORBOARD setting's default: on where the package is there."""
    return importlib.util.find_spec("tensorboard") is not None


class Logbook:
    """The run folder's files for people. main: only the main rank writes. resumed_step: the
    saved step a resumed run continues from (None: a new run). curves: the panels of
    training_curves.png (None: no picture). log: where the one-line notes go."""

    def __init__(self, folder: Path, columns, main: bool, tensorboard: bool, curves, title: str,
                 resumed_step: int | None, log=print):
        self.folder, self.columns, self.main = Path(folder), tuple(columns), main
        self.curves, self.title, self.log = curves, title, log
        self.writer = None               # opened at the first write: a run refused at its start leaves no events
        self.tensorboard, self.resumed_step = main and tensorboard, resumed_step
        self.logged_rows, self.logged_history = 0, -1   # the last step already in the event files (a
        # validation may come before the first step: step 0)

    def _events(self):
        """The TensorBoard writer, opened at first use; None where there is none."""
        if self.tensorboard and self.writer is None:
            self.tensorboard = False  # opened once (or noted once)
            self.writer = self._open_writer(self.resumed_step)
        return self.writer

    def _open_writer(self, resumed_step: int | None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            self.log("TENSORBOARD: the tensorboard package is not installed (pip install tensorboard), so no "
                     "event files are written; metrics.csv and training_curves.png have every number")
            return None
        directory = self.folder / TENSORBOARD_DIR
        earlier = directory.is_dir() and any(directory.glob("events.out.tfevents.*"))
        if resumed_step is not None and earlier:
            # the earlier run's events up to the saved step stay; the re-run steps replace theirs
            self.logged_rows = self.logged_history = resumed_step
            return SummaryWriter(str(directory), purge_step=resumed_step + 1)
        return SummaryWriter(str(directory))

    @property
    def tensorboard_dir(self) -> Path | None:
        """Where the events go (None: nowhere)."""
        return self.folder / TENSORBOARD_DIR if self.writer is not None or self.tensorboard else None

    def describe(self) -> str:
        """The info file's line on these files."""
        events = self.tensorboard_dir
        return (f"to watch: {METRICS_FILE} (every step)"
                + (f", {CURVES_FILE} (redrawn at each validation)" if self.curves is not None else "")
                + (f", TensorBoard events in {events} (tensorboard --logdir {events})" if events is not None else
                   ", no TensorBoard events (TENSORBOARD is off)"))

    def write_rows(self, rows: list) -> None:
        """metrics.csv with every row, and the rows TensorBoard has not seen yet."""
        if not self.main:
            return
        write_text_atomic(self.folder / METRICS_FILE, format_metrics_csv(rows, self.columns))
        writer = self._events()
        if writer is None:
            return
        for row in rows:
            if row["step"] > self.logged_rows:
                for name in self.columns:
                    if name not in NOT_LOGGED and _is_number(row.get(name)):
                        writer.add_scalar(f"train/{name}", row[name], row["step"])
        self.logged_rows = max([self.logged_rows] + [row["step"] for row in rows])
        writer.flush()

    def record(self, rows: list, history: list, preview=None) -> None:
        """After a validation (or an epoch's end): its numbers into TensorBoard, the preview
        video at `preview` (a path; its .mp4 or .gif) as a still, and the curves redrawn."""
        if not self.main:
            return
        writer = self._events()
        if writer is not None:
            for entry in history:
                if entry["step"] > self.logged_history:
                    for name, value in entry.items():
                        if name not in NOT_LOGGED and _is_number(value):
                            writer.add_scalar(history_tag(name), value, entry["step"])
            if history:
                self.logged_history = max(self.logged_history, history[-1]["step"])
            if preview is not None:
                self._preview(writer, Path(preview), history[-1]["step"] if history else 0)
            writer.flush()
        self.draw(rows, history)

    @staticmethod
    def _preview(writer, path: Path, step: int) -> None:
        from video.reader import frame_grid, read_frames

        found = [p for p in (path.with_suffix(".mp4"), path.with_suffix(".gif")) if p.is_file()]
        if found:
            grid = frame_grid(read_frames(found[0]), PREVIEW_FRAMES, PREVIEW_COLUMNS, PREVIEW_WIDTH)
            writer.add_image("preview/video", grid, step, dataformats="HWC")

    def draw(self, rows: list, history: list) -> None:
        if not self.main or self.curves is None:
            return
        try:
            draw_curves(self.folder / CURVES_FILE, self.curves, rows, history, self.title)
        except ImportError:
            self.log(f"matplotlib is not installed (pip install matplotlib): no {CURVES_FILE}")
            self.curves = None

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None


def history_tag(name: str) -> str:
    """A history entry's number in TensorBoard: validation/<name>, but train/<what>_epoch_mean for
    the training means an entry carries (train_loss: the epoch's mean loss)."""
    return f"train/{name[len('train_'):]}_epoch_mean" if name.startswith("train_") else f"validation/{name}"


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
