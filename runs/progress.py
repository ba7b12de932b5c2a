"""Progress that reads well wherever it goes: a tqdm bar on a terminal, and where the output
is a file or a pipe (a log captured with `> train.log 2>&1`, a cluster job's output) a
plain line every LINE_EVERY_SECONDS instead of a bar redrawn with carriage returns, which
fills a captured log with every redraw.

    bar = ProgressBar(total=120, desc="epoch 3/10", unit="step")
    for ...:
        bar.update(1, loss=f"{loss:.4f}")
    bar.close()
"""

import sys
import time

from tqdm import tqdm

LINE_EVERY_SECONDS = 30.0  # off a terminal: at most one line this often


def on_terminal(stream) -> bool:
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


class ProgressBar:
    """total units of work, `initial` of them already done (a resumed epoch). enabled=False
    shows nothing (the other ranks). stream: where it goes (stderr, as tqdm); clock: the
    time source (tests pass their own)."""

    def __init__(self, total: int, desc: str, unit: str = "step", initial: int = 0, enabled: bool = True,
                 stream=None, clock=time.monotonic, every_seconds: float = LINE_EVERY_SECONDS):
        self.stream = sys.stderr if stream is None else stream
        self.total, self.desc, self.unit, self.done = total, desc, unit, initial
        self.enabled, self.clock, self.every = enabled, clock, every_seconds
        self.postfix = {}
        self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream) \
            if enabled and on_terminal(self.stream) else None
        self.started = self.last_line = clock()
        self.started_at = initial

    def update(self, n: int = 1, **postfix) -> None:
        self.done += n
        self.postfix.update(postfix)
        if self.bar is not None:
            self.bar.update(n)
            if postfix:
                self.bar.set_postfix(self.postfix, refresh=False)
        elif self.enabled and self.clock() - self.last_line >= self.every:
            self.last_line = self.clock()
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def line(self) -> str:
        """The plain line: where the work stands, its pace and what is left."""
        elapsed, done_here = self.clock() - self.started, self.done - self.started_at
        text = f"{self.desc}: {self.done}/{self.total} {self.unit}s"
        if self.total:
            text += f" ({100 * self.done / self.total:.0f}%)"
        if done_here > 0:
            pace = elapsed / done_here
            text += f", {pace:.2f} s/{self.unit}" if pace < 60 else f", {format_seconds(pace)} per {self.unit}"
            if self.total > self.done:
                text += f", about {format_seconds(pace * (self.total - self.done))} left"
        if self.postfix:
            text += "; " + ", ".join(f"{name} {value}" for name, value in self.postfix.items())
        return text

    def write(self, text: str) -> None:
        """A message of the caller's that must not break the bar."""
        if self.bar is not None:
            self.bar.write(text, file=self.stream)
        elif self.enabled:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def progress_over(items, desc: str, unit: str = "step", total: int | None = None, **bar_options):
    """Iterate items with a ProgressBar: a bar on a terminal, a plain line now and then in a
    log. total: the count when items has no len(); bar_options: ProgressBar's (stream, clock)."""
    bar = ProgressBar(total=len(items) if total is None else total, desc=desc, unit=unit, **bar_options)
    try:
        for item in items:
            yield item
            bar.update(1)
    finally:
        bar.close()
