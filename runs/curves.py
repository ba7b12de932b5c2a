"""training_curves.png: a run's curves, drawn with matplotlib and rewritten atomically at
each validation, so that a look at the run folder shows how training goes.

A picture is a few panels; each panel draws series of either the per-step metrics rows
(metrics.csv) or the per-validation history entries (the info file's lines), against the
optimizer step. The two trainers' pictures are FINE_TUNING_CURVES and DISTILLATION_CURVES.
matplotlib is imported only when a picture is drawn, on the Agg backend (no display), and
a run without it skips the picture with one note (runs/logbook.py).
"""

from dataclasses import dataclass
from pathlib import Path

from wan.files import write_atomic

STEP_ROWS, VALIDATIONS = "rows", "history"   # where a series' points come from
SMOOTH_WINDOW = 20                           # noisy per-step series: a centred mean over this many steps beside the raw


@dataclass(frozen=True)
class Series:
    key: str                     # a metrics column or a history entry's key
    label: str                   # the legend's words
    source: str = VALIDATIONS    # STEP_ROWS or VALIDATIONS
    style: str = "-"             # matplotlib's line style
    smooth: bool = False         # a noisy per-step series: drawn faint, with its centred mean over SMOOTH_WINDOW


@dataclass(frozen=True)
class Panel:
    title: str
    ylabel: str
    series: tuple
    reference: tuple = ()        # (y, label) horizontal lines, e.g. the action gain's 1
    log_y: bool = False


FINE_TUNING_CURVES = (
    Panel("loss", "flow-matching loss (velocity MSE)",
          (Series("loss", "train, per optimizer step", STEP_ROWS, smooth=True), Series("train_loss", "train, epoch mean"),
           Series("val_loss", "validation (fixed sigmas and noise)"))),
    Panel("action gain", "val loss with another clip's keys / with its own",
          (Series("action_gain", "action gain"),),
          reference=((1.0, "1: the keys change nothing"), (1.01, "1.01: learned (training/controls.py)"))),
    Panel("learning rate", "learning rate", (Series("lr", "learning rate", STEP_ROWS),)),
    Panel("gradient norm", "norm before clipping", (Series("grad_norm", "gradient norm", STEP_ROWS, smooth=True),),
          log_y=True),
)

DISTILLATION_CURVES = (
    Panel("losses", "loss", (Series("loss", "student", STEP_ROWS, smooth=True),
                             Series("critic_loss", "critic", STEP_ROWS, smooth=True))),
    Panel("distance to the teacher", "latent RMS / energy distance",
          (Series("teacher_distance", "teacher distance (one stream vs one teacher video)"),
           Series("distribution_distance", "distribution distance (what distillation lowers)"),
           Series("student_spread", "student spread", style="--"),
           Series("teacher_spread", "teacher spread", style=":"))),
    Panel("action-following score", "share of frame pairs that move as commanded",
          (Series("action_score", "student"), Series("teacher_action_score", "teacher", style="--"))),
    Panel("learning rate", "student learning rate", (Series("lr", "learning rate", STEP_ROWS),)),
)


def series_points(series: Series, rows: list, history: list) -> list[tuple[float, float]]:
    """(step, value) of every row or entry that has a number for the series."""
    items = rows if series.source == STEP_ROWS else history
    return [(item["step"], float(item[series.key])) for item in items
            if isinstance(item.get(series.key), (int, float)) and not isinstance(item.get(series.key), bool)]


def centred_mean(values: list[float], window: int) -> list[float]:
    """Each value's mean with its neighbours, window wide (narrower at the ends): no lag."""
    sums = [0.0]
    for value in values:
        sums.append(sums[-1] + value)
    half = window // 2
    return [(sums[min(len(values), i + half + 1)] - sums[max(0, i - half)]) /
            (min(len(values), i + half + 1) - max(0, i - half)) for i in range(len(values))]


def draw_curves(path, panels, rows: list, history: list, title: str) -> Path:
    """Draw the panels (two to a row) into path, atomically; returns path."""
    from matplotlib.figure import Figure  # no pyplot: no global state, no display needed

    columns = 2
    lines = -(-len(panels) // columns)
    figure = Figure(figsize=(6.4 * columns, 3.6 * lines + 0.6), layout="constrained")
    figure.suptitle(title)
    for index, panel in enumerate(panels):
        axes = figure.add_subplot(lines, columns, index + 1)
        drawn = False
        for colour, series in enumerate(panel.series):
            points = series_points(series, rows, history)
            if not points:
                continue
            drawn = True
            steps, values = zip(*points)
            colour = f"C{colour}"
            if series.smooth and len(points) > SMOOTH_WINDOW:
                axes.plot(steps, values, series.style, color=colour, alpha=0.3, linewidth=0.8)
                axes.plot(steps, centred_mean(list(values), SMOOTH_WINDOW), series.style, color=colour,
                          label=f"{series.label} (mean of {SMOOTH_WINDOW} steps)")
            else:
                axes.plot(steps, values, series.style, color=colour, label=series.label,
                          marker="o" if series.source == VALIDATIONS else None, markersize=4)
        for y, label in panel.reference:
            axes.axhline(y, color="grey", linestyle=":", linewidth=1, label=label)
        if panel.log_y and drawn and all(v > 0 for s in panel.series for _, v in series_points(s, rows, history)):
            axes.set_yscale("log")
        axes.set_title(panel.title)
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(panel.ylabel)
        axes.grid(True, alpha=0.3)
        if drawn:
            axes.legend(fontsize="small")
        else:
            axes.text(0.5, 0.5, "not measured yet", ha="center", va="center", transform=axes.transAxes,
                      color="grey")
    return write_atomic(Path(path), lambda temporary: figure.savefig(temporary, format="png", dpi=100))
