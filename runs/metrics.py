"""metrics.csv: one row per optimizer step, rewritten atomically as the run goes."""

from pathlib import Path

METRICS_COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "sigma", "seconds_per_step")


def format_metrics_csv(rows: list) -> str:
    lines = [",".join(METRICS_COLUMNS)]
    lines += [",".join(_csv_value(row[c]) for c in METRICS_COLUMNS) for row in rows]
    return "\n".join(lines) + "\n"


def _csv_value(value) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def read_metrics_csv(path: Path, up_to_step: int) -> list:
    """The rows of an earlier run up to its last saved step (later ones will be re-run)."""
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines()[1:]:
        values = line.split(",")
        row = {c: (float(v) if c not in ("step", "epoch") else int(v)) for c, v in zip(METRICS_COLUMNS, values)}
        if row["step"] <= up_to_step:
            rows.append(row)
    return rows
