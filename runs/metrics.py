"""metrics.csv: one row per optimizer step, rewritten atomically as the run goes."""

from pathlib import Path

from runs.errors import TrainingError

METRICS_FILE = "metrics.csv"
METRICS_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "sigma", "seconds_per_step")
WHOLE_NUMBERS = ("step", "epoch", "exit_step")


def format_metrics_csv(rows: list, columns=METRICS_COLUMNS) -> str:
    """A trainer's own columns may be given; a value of None (not measured at that step) is
    an empty field."""
    lines = [",".join(columns)]
    lines += [",".join(_csv_value(row[c]) for c in columns) for row in rows]
    return "\n".join(lines) + "\n"


def _csv_value(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _read_value(column: str, text: str):
    if text == "":
        return None
    return int(text) if column in WHOLE_NUMBERS else float(text)


def read_metrics_csv(path: Path, up_to_step: int, columns=METRICS_COLUMNS) -> list:
    """The rows of an earlier run up to its last saved step (later ones will be re-run).
    A line that is not a metrics row is an error naming the file and line."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()[1:], 2):
        values = line.split(",")
        try:
            if len(values) != len(columns):
                raise ValueError(f"{len(values)} fields, expected {len(columns)}")
            row = {c: _read_value(c, v) for c, v in zip(columns, values)}
            if row["step"] is None:
                raise ValueError("no step")
        except ValueError as error:
            raise TrainingError(f"{path}:{number}: not a metrics row ({error}): {line[:80]!r}. Expected "
                                f"{','.join(columns)}. Fix or delete that line (the run's state does not "
                                "depend on metrics.csv), then resume again") from None
        if row["step"] <= up_to_step:
            rows.append(row)
    return rows
