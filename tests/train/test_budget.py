"""kd's budget: the learning rate warms up and decays over whichever of ``steps`` and
``max_minutes`` ends first, and the default evaluations fall at its tenths."""

from __future__ import annotations

import pytest

from onnxcomp.train import budget


def test_the_rate_warms_up_then_decays_to_zero():
    assert budget.lr_factor(0.0) == 0.0
    assert budget.lr_factor(budget.WARMUP / 2) == pytest.approx(0.5)
    assert budget.lr_factor(budget.WARMUP) == pytest.approx(1.0)
    assert budget.lr_factor((1 + budget.WARMUP) / 2) == pytest.approx(0.5)
    assert budget.lr_factor(1.0) == pytest.approx(0.0, abs=1e-12)


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _run(plan: budget.Budget, clock: _Clock, seconds_a_step: float, stop: float):
    """Steps until the clock passes ``stop`` seconds: each step's rate and the evaluations."""
    rates, evaluations, progress, step = [], 0, plan.start, plan.done
    while clock.now - 100.0 < stop and step < plan.steps:
        rates.append(plan.lr_factor(step + 1))
        clock.now += seconds_a_step
        step += 1
        plan.ran()
        before, progress = progress, plan.progress(step)
        evaluations += plan.crossed(before, progress)
    return rates, evaluations, progress


def test_a_time_budget_far_shorter_than_the_steps_still_warms_up_decays_and_evaluates():
    clock = _Clock()
    plan = budget.Budget(60000, 1.0, began=clock(), clock=clock)  # a step a second, 60 s
    rates, evaluations, progress = _run(plan, clock, 1.0, 60.0)
    assert len(rates) == 60 and progress == pytest.approx(1.0)
    assert max(rates) > 0.9 and rates.index(max(rates)) <= 5  # warm-up: the first 5 %
    assert rates[-1] < 0.01 and rates[30] == pytest.approx(0.5, abs=0.1)
    assert evaluations == budget.DEFAULT_EVALUATIONS


def test_a_step_budget_shorter_than_the_time_goes_by_steps():
    clock = _Clock()
    plan = budget.Budget(40, 60.0, began=clock(), clock=clock)  # 40 steps of 0.1 s in an hour
    rates, evaluations, progress = _run(plan, clock, 0.1, 3600.0)
    assert len(rates) == 40 and progress == 1.0 and evaluations == 10
    assert rates[0] == pytest.approx(budget.lr_factor(1 / 40))
    assert rates[20] == pytest.approx(budget.lr_factor(21 / 40))


def test_a_resumed_run_continues_from_its_saved_progress():
    clock = _Clock()
    plan = budget.Budget(60000, 1.0, began=clock(), clock=clock)
    plan.done, plan.start = 300, 0.5  # half the schedule run before, a fresh minute now
    rates, _, progress = _run(plan, clock, 1.0, 60.0)
    assert rates[0] <= budget.lr_factor(0.5) + 1e-9 and rates[-1] < 0.01
    assert progress == pytest.approx(1.0)
