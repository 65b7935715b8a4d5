"""kd's training budget: how far through it a run is, which sets the learning rate (linear warm-up
over the first ``WARMUP`` of it, then cosine decay to zero) and when the default ten evaluations
happen.

The budget is ``steps`` and, when set, ``max_minutes``: whichever ends first. Progress is the
larger of the step share and the time share, the time share estimated for the step about to run
from the mean step time so far. Why: with a schedule over ``steps`` alone, a run that the clock
stops long before (``steps = 60000, max_minutes = 12``, the way a time budget is given) never
left its warm-up: clip-vit-b32 kd ran 136 steps at under 5 % of its peak learning rate and was
evaluated once, at the end (seventeenth session, docs/distill.md). A resumed run continues from
the progress its checkpoint saved, its new time budget covering what was left.
"""

from __future__ import annotations

import math
import time

WARMUP = 0.05
# Evaluations a run makes by default, at even shares of its budget.
DEFAULT_EVALUATIONS = 10


def lr_factor(progress: float) -> float:
    """The learning rate's share of its peak at this share of the budget."""
    if progress < WARMUP:
        return progress / WARMUP
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (progress - WARMUP) / (1 - WARMUP))))


class Budget:
    """Progress through ``steps`` / ``max_minutes``; a resumed run sets ``done`` (steps run
    before) and ``start`` (the progress its checkpoint saved)."""

    def __init__(self, steps: int, max_minutes: float | None, began: float | None = None,
                 clock=time.perf_counter):
        self.steps, self.done, self.start, self.clock = steps, 0, 0.0, clock
        self.began = clock() if began is None else began  # where max_minutes counts from
        self.seconds = max_minutes * 60 if max_minutes else None
        self.run_steps = 0  # steps of this invocation

    def progress(self, step: int) -> float:
        """The share of the budget at the end of step ``step`` (counted from 1): the step share,
        or the time share this invocation has used (plus the share before it), whichever is
        larger; estimated for a step not yet run from the mean step time."""
        share = step / self.steps
        if self.seconds is not None and self.run_steps:
            ahead = step - self.done - self.run_steps  # steps not run yet (0 or 1)
            used = (self.clock() - self.began) * (1 + ahead / self.run_steps)
            share = max(share, self.start + (1 - self.start) * used / self.seconds)
        return min(1.0, max(share, self.start))

    def until(self, deadline: float | None) -> None:
        """Count the time share from now to ``deadline`` (the training loop's own time: setup
        before it would otherwise eat a short run's warm-up)."""
        if deadline is not None:
            self.began = self.clock()
            self.seconds = max(deadline - self.began, 1e-9)

    def ran(self) -> None:
        self.run_steps += 1

    def lr_factor(self, next_step: int) -> float:
        """For step ``next_step`` (counted from 1): its progress's share of the peak rate (the
        first step of a run, its time per step unknown, goes by the step share)."""
        return lr_factor(self.progress(next_step))

    def crossed(self, before: float, after: float) -> bool:
        """Whether an evaluation mark (tenths of the budget) lies in ``(before, after]``."""
        marks = DEFAULT_EVALUATIONS
        return math.floor(after * marks + 1e-9) > math.floor(before * marks + 1e-9)
