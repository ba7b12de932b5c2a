"""What a run writes for people (runs/logbook.py, runs/curves.py, runs/progress.py):
TensorBoard events that TensorBoard's own reader reads back - every step once, also after a
run stopped past its last save is resumed -, training_curves.png, and progress that
becomes plain lines off a terminal."""

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import finetune_base_model as fb
from runs.curves import FINE_TUNING_CURVES
from runs.logbook import CURVES_FILE, TENSORBOARD_DIR, Logbook
from runs.metrics import METRICS_COLUMNS, METRICS_FILE, read_metrics_csv
from runs.progress import ProgressBar, progress_over
from test_training import run_settings
from video.writer import write_video


def events(folder: Path) -> EventAccumulator:
    reader = EventAccumulator(str(folder / TENSORBOARD_DIR), size_guidance={"scalars": 0, "images": 0})
    reader.Reload()
    return reader


def steps(reader: EventAccumulator, tag: str) -> list[int]:
    return [event.step for event in reader.Scalars(tag)]


def row(step, loss):
    return {"step": step, "epoch": 1, "loss": loss, "lr": 1e-3, "grad_norm": 0.5, "sigma": 0.4, "seconds_per_step": 1.0}


def test_rows_validations_and_a_preview_read_back_and_a_resume_replaces_the_rerun_steps(tmp_path):
    book = Logbook(tmp_path, METRICS_COLUMNS, True, True, FINE_TUNING_CURVES, "test", None)
    rows = [row(s, 1.0 / s) for s in range(1, 6)]
    book.write_rows(rows[:3])
    book.write_rows(rows)                                 # rows already written are not written again
    history = [{"epoch": 1, "step": 5, "train_loss": 0.5, "val_loss": 0.4, "action_gain": 1.02, "seconds": 3.0}]
    frames = np.zeros((9, 16, 24, 3), np.uint8)
    frames[:, :, :, 0] = np.arange(9)[:, None, None] * 20
    write_video(tmp_path / "previews" / "epoch1.gif", frames)
    book.record(rows, history, tmp_path / "previews" / "epoch1")
    book.close()
    reader = events(tmp_path)
    assert steps(reader, "train/loss") == [1, 2, 3, 4, 5]
    assert {"train/lr", "train/grad_norm", "train/sigma", "validation/val_loss", "validation/action_gain",
            "train/loss_epoch_mean"} <= set(reader.Tags()["scalars"])
    assert "validation/epoch" not in reader.Tags()["scalars"]  # a place, not a measure
    assert [e.step for e in reader.Images("preview/video")] == [5]
    assert Image.open(tmp_path / CURVES_FILE).size[0] > 500

    # a run resumed from its save at step 3 re-runs steps 4 and 5 (here with other losses)
    again = Logbook(tmp_path, METRICS_COLUMNS, True, True, FINE_TUNING_CURVES, "test", resumed_step=3)
    rerun = rows[:3] + [row(4, 9.0), row(5, 8.0), row(6, 7.0)]
    again.write_rows(rerun)
    again.close()
    scalars = events(tmp_path).Scalars("train/loss")
    assert [(e.step, round(e.value, 4)) for e in scalars] == [(1, 1.0), (2, 0.5), (3, 0.3333), (4, 9.0), (5, 8.0),
                                                              (6, 7.0)]
    assert events(tmp_path).Scalars("validation/val_loss") == []  # step 5's validation was re-run: purged too
    assert len(read_metrics_csv(tmp_path / METRICS_FILE, 99)) == 6


def test_no_tensorboard_and_no_matplotlib_still_write_metrics(tmp_path, monkeypatch):
    import runs.curves

    book = Logbook(tmp_path, METRICS_COLUMNS, True, False, FINE_TUNING_CURVES, "test", None, log=lambda m: None)
    book.write_rows([row(1, 1.0)])
    notes = []
    book.log = notes.append
    monkeypatch.setattr(runs.logbook, "draw_curves", lambda *a, **k: (_ for _ in ()).throw(ImportError("no")))
    book.record([row(1, 1.0)], [{"epoch": 1, "step": 1, "val_loss": 1.0}])
    book.record([row(1, 1.0)], [{"epoch": 1, "step": 1, "val_loss": 1.0}])
    assert notes == [f"matplotlib is not installed (pip install matplotlib): no {CURVES_FILE}"]  # said once
    assert not (tmp_path / TENSORBOARD_DIR).exists() and (tmp_path / METRICS_FILE).is_file()
    assert "no TensorBoard events (TENSORBOARD is off)" in book.describe()
    assert runs.curves is not None


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_progress_off_a_terminal_is_a_plain_line_every_half_minute():
    out, clock = io.StringIO(), Clock()
    bar = ProgressBar(total=100, desc="epoch 2/5", unit="step", initial=10, stream=out, clock=clock)
    for _ in range(30):
        clock.now += 2.0
        bar.update(1, loss="0.5000")
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue() and len(lines) == 2  # at 30 s and 60 s
    assert lines[0] == "epoch 2/5: 25/100 steps (25%), 2.00 s/step, about 2 min 30 s left; loss 0.5000"
    quiet = io.StringIO()
    ProgressBar(total=5, desc="x", stream=quiet, clock=clock, enabled=False).update(5)
    assert quiet.getvalue() == ""


def test_progress_on_a_terminal_is_tqdm_s_bar():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    out = Terminal()
    bar = ProgressBar(total=3, desc="epoch 1/1", stream=out)
    bar.update(3, loss="0.1")
    bar.close()
    assert "\r" in out.getvalue() and "3/3" in out.getvalue()


class Stop(Exception):
    pass


def test_a_training_run_stopped_after_its_save_resumes_without_duplicated_steps(tiny_assets, tmp_path, monkeypatch):
    """The demo-sized run: 2 epochs of 4 steps, saved at the end of epoch 1, stopped in step
    7 after steps 1-6 went to TensorBoard; the resumed run re-runs steps 5 and 6 and ends at 8."""
    s = run_settings(tiny_assets, tmp_path, "LOG_EVERY_STEPS=1", "SAVE_EVERY_EPOCHS=0", "PREVIEW_EVERY_EPOCHS=2",
                     "PREVIEW_STEPS=2")
    real = fb.RECIPE.optimizer_step

    def stop_in_seven(optimizer, ema, trainable, step):
        if step == 6:
            raise Stop
        return real(optimizer, ema, trainable, step)

    monkeypatch.setattr(fb.RECIPE, "optimizer_step", stop_in_seven)
    with pytest.raises(Stop):
        fb.train(s)
    out = Path(s["CHECKPOINT_DIR"])
    assert steps(events(out), "train/loss") == [1, 2, 3, 4, 5, 6]
    assert torch.load(out / "training_state.pt", weights_only=True)["global_step"] == 4
    monkeypatch.setattr(fb.RECIPE, "optimizer_step", real)
    summary = fb.train(dict(s, RESUME=True))
    assert summary["steps"] == 8

    reader = events(out)
    metrics = read_metrics_csv(out / METRICS_FILE, 99)
    for column in ("loss", "lr", "grad_norm", "sigma"):
        logged = reader.Scalars(f"train/{column}")
        assert [e.step for e in logged] == list(range(1, 9)), column
        assert [e.value for e in logged] == pytest.approx([r[column] for r in metrics], rel=1e-5), column
    assert steps(reader, "validation/val_loss") == [4, 8] and steps(reader, "validation/action_gain") == [4, 8]
    assert steps(reader, "validation/preview_score") == [8]
    assert [e.step for e in reader.Images("preview/video")] == [8]
    assert Image.open(out / CURVES_FILE).format == "PNG"
    info = (out / fb.INFO_FILE).read_text()
    assert f"TensorBoard events in {out / TENSORBOARD_DIR} (tensorboard --logdir {out / TENSORBOARD_DIR})" in info
    # the tiny runs warm up for 10 steps of 8: the header says the peak is never reached
    assert "warning: WARMUP_STEPS=10 is not shorter than this run's 8 optimizer steps" in info


def test_the_learn_controls_benchmark_redraws_its_plot_from_its_committed_json(tmp_path):
    import shutil
    import sys

    from conftest import REPO_ROOT

    sys.path.insert(0, str(REPO_ROOT / "bench"))
    import bench_learn_controls

    shutil.copy(REPO_ROOT / "bench" / "learn_controls.json", tmp_path / "learn_controls.json")
    assert bench_learn_controls.main(["--redraw", str(tmp_path / "learn_controls.json")]) == 0
    with Image.open(tmp_path / "learn_controls.png") as picture:
        assert picture.format == "PNG" and picture.size[0] >= 1200


def test_progress_over_an_iterable_reads_as_lines_in_a_log():
    """The samplers' and frame decoders' progress: every item passes through, and off a
    terminal the bar is a plain line every 30 s, never a carriage return."""
    now = [0.0]

    def clock():
        now[0] += 20.0  # each item takes 20 s
        return now[0]

    out = io.StringIO()
    seen = list(progress_over(iter(range(4)), "window 1/2", total=4, stream=out, clock=clock))
    assert seen == [0, 1, 2, 3]
    assert "\r" not in out.getvalue()
    assert out.getvalue().splitlines()[0].startswith("window 1/2: 2/4 steps (50%)")
