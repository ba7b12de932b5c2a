"""The learning-rate schedule: linear warm-up to the peak, then a cosine down to a floor.

For optimizer steps k = 0 .. total-1 (the factor multiplies LEARNING_RATE):
    k < warmup:   (k + 1) / (warmup + 1)          the first step is 1/(warmup + 1)
    k = warmup:   1                               the peak, applied once
    k > warmup:   cosine from 1 down to min_ratio, reached exactly at the last step
A run whose NUM_EPOCHS changes on resume keeps the steps it has done and continues from
the factor it was at (its "anchor"): a cosine from there down to min_ratio at the new last
step. A run that had already reached its floor goes on at the floor; nothing jumps.
"""

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class LRSchedule:
    warmup: int                  # optimizer steps of linear warm-up
    total: int                   # optimizer steps in the whole run
    min_ratio: float             # the floor, as a fraction of the peak
    anchor_step: int = 0         # where the cosine starts when a resume re-planned the run (0: at the peak)
    anchor_factor: float = 1.0   # the factor there

    def factor(self, step: int) -> float:
        if self.anchor_step == 0 and step < self.warmup:
            return (step + 1) / (self.warmup + 1)
        start, last = max(self.warmup, self.anchor_step), self.total - 1
        if last <= start:
            return self.anchor_factor if step <= start else self.min_ratio
        progress = min(1.0, max(0.0, (step - start) / (last - start)))
        return self.min_ratio + (self.anchor_factor - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    def extended_to(self, total: int, step: int) -> "LRSchedule":
        """This schedule after a resume at `step` that changed the run's length to `total`."""
        if total == self.total:
            return self
        if self.anchor_step == 0 and step < self.warmup:  # still warming up: the cosine starts later anyway
            return LRSchedule(self.warmup, total, self.min_ratio)
        return LRSchedule(self.warmup, total, self.min_ratio, step, self.factor(step))

    def describe_change(self, old: "LRSchedule", step: int) -> str:
        if self == old:
            return ""
        if self.anchor_step != step:
            return (f"the run now has {self.total} optimizer steps (was {old.total}); it is still warming up, so the "
                    "cosine simply ends later")
        if self.anchor_factor <= self.min_ratio + 1e-12:
            return (f"the run had reached its floor: steps {step + 1}-{self.total} train at MIN_LR_RATIO x "
                    "LEARNING_RATE")
        return (f"the run now has {self.total} optimizer steps (was {old.total}): the learning rate goes on from "
                f"{self.anchor_factor:.4f} x LEARNING_RATE at step {step + 1} down to {self.min_ratio:g} x at step "
                f"{self.total}, with no jump")

    def state_dict(self) -> dict:
        return asdict(self)


def apply_learning_rate(optimizer, peak: float, schedule: LRSchedule, step: int) -> float:
    """Set every parameter group's learning rate for this step; returns it."""
    lr = peak * schedule.factor(step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    return lr


def warmup_warning(warmup: int, total: int, peak: float, setting: str = "WARMUP_STEPS") -> str | None:
    """A warning when the warm-up is not shorter than the run (total optimizer steps): its
    learning rate never reaches the peak (a 3-step run with WARMUP_STEPS=50 trains at 1/51
    to 3/51 of it). The warm-up is not scaled to the run by itself: the schedule is part of
    what a run learns, and a resumed or lengthened run must keep it."""
    if warmup == 0 or warmup < total:
        return None
    last = LRSchedule(warmup, total, 1.0).factor(total - 1)
    return (f"warning: {setting}={warmup} is not shorter than this run's {total} optimizer steps: the learning rate "
            f"never reaches its peak {peak:g} (it ends at {peak * last:.2g}, {last:.0%} of it). Lower {setting} "
            f"(e.g. to {max(1, total // 10)}, a tenth of the run) or train longer")
