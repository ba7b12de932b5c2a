"""metrics.csv: one row per optimizer step, rewritten atomically as the run goes."""

from pathlib import Path

from runs.errors import TrainingError

METRICS_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "sigma", "seconds_per_step")
WHOLE_NUMBERS = ("step", "epoch")


def format_metrics_csv(rows: list) -> str:
    lines = [",".join(METRICS_COLUMNS)]
    lines += [",".join(_csv_value(row[c]) for c in METRICS_COLUMNS) for row in rows]
    return "\n".join(lines) + "\n"


def _csv_value(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def read_metrics_csv(path: Path, up_to_step: int) -> list:
    """The rows of an earlier run up to its last saved step (later ones will be re-run).
    A line that is not a metrics row is an error naming the file and line."""
    if not path.is_file():
        return []
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines()[1:], 2):
        values = line.split(",")
        try:
            if len(values) != len(METRICS_COLUMNS):
                raise ValueError(f"{len(values)} fields, expected {len(METRICS_COLUMNS)}")
            row = {c: int(v) if c in WHOLE_NUMBERS else float(v) for c, v in zip(METRICS_COLUMNS, values)}
        except ValueError as error:
            raise TrainingError(f"{path}:{number}: not a metrics row ({error}): {line[:80]!r}. Expected "
                                f"{','.join(METRICS_COLUMNS)}. Fix or delete that line (the run's state does not "
                                "depend on metrics.csv), then resume again") from None
        if row["step"] <= up_to_step:
            rows.append(row)
    return rows
