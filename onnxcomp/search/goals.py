"""What a search aims at: constraints ("line_accuracy>=float-0.01", "cosine>=0.99") and
objectives (latency, size), and the metrics a trial measures to check them.

A constraint is ``METRIC OP BOUND``: ``OP`` is ``>=``, ``<=``, ``>`` or ``<``; ``BOUND`` is a
number, ``float`` (the uncompressed model's own value of that metric) or ``float-N`` /
``float+N``. Parsing is strict: anything else is a ``UserError``. Metrics (all measured by the
trial on the held-out data, the ratios against the float model timed in the same process):

- ``cosine``: the lowest mean output cosine over the model's outputs; ``cosine_min``: the lowest
  per-sample cosine; ``top1``: the lowest top-1 agreement over class-score outputs;
  ``rel_l2``: the largest relative L2 error;
- the task metrics of zoo data (``line_accuracy``, ``char_accuracy`` for ppocr-rec, ...): the
  compressed model's value;
- ``latency``: p50 latency / the float model's p50; ``size``: file bytes / the float model's;
  ``params``: parameter count / the float model's.

Objectives are minimized ratios: ``latency``, ``size``, ``params``. Optuna wants constraint
values that are ``<= 0`` when satisfied: ``bound - value`` for ``>=``, ``value - bound`` for
``<=`` (strict comparisons get the same value: the boundary itself counts as met, a gap of one
float ulp is not worth a different rule).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from onnxcomp.errors import UserError

OBJECTIVES = ("latency", "size", "params")
FIDELITY_METRICS = ("cosine", "cosine_min", "top1", "rel_l2")
_CONSTRAINT = re.compile(
    r"^\s*(?P<metric>[A-Za-z_][A-Za-z0-9_@.]*)\s*(?P<op>>=|<=|>|<)\s*"
    r"(?:(?P<float>float)\s*(?:(?P<sign>[+-])\s*(?P<delta>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?))?"
    r"|(?P<number>[+-]?\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|[+-]?\.\d+(?:[eE][+-]?\d+)?))\s*$")


@dataclass(frozen=True)
class Constraint:
    """``metric op bound``; ``relative``: the bound is the float model's value + ``value``."""

    metric: str
    op: str
    value: float
    relative: bool = False
    text: str = ""

    @property
    def at_least(self) -> bool:
        return self.op in (">=", ">")

    def bound(self, reference: dict[str, float]) -> float:
        """The bound in absolute terms (``reference``: the float model's metrics)."""
        if not self.relative:
            return self.value
        if self.metric not in reference:
            raise UserError(f"constraint {self.text!r}: the float model has no {self.metric!r} "
                            f"to be relative to (known: {', '.join(sorted(reference)) or 'none'})")
        return reference[self.metric] + self.value

    def violation(self, value: float, reference: dict[str, float]) -> float:
        """Optuna's constraint value: <= 0 when met."""
        bound = self.bound(reference)
        if value is None or not math.isfinite(value):
            return math.inf
        return bound - value if self.at_least else value - bound

    def describe(self) -> str:
        return self.text or f"{self.metric}{self.op}{self.value}"


def parse_constraint(text: str) -> Constraint:
    """``"line_accuracy>=float-0.01"`` -> Constraint, or a UserError saying what is wrong."""
    if not isinstance(text, str):
        raise UserError(f"constraint must be text like 'cosine>=0.99', got {text!r}")
    match = _CONSTRAINT.match(text)
    if not match:
        raise UserError(f"bad constraint {text!r}: expected METRIC OP BOUND, e.g. "
                        "'cosine>=0.99' or 'line_accuracy>=float-0.01' (OP: >=, <=, >, <)")
    metric, op = match["metric"], match["op"]
    if metric in OBJECTIVES and match["float"]:
        raise UserError(f"constraint {text!r}: {metric} is already a ratio to the float model; "
                        "give a number (e.g. 'latency<=0.8')")
    if match["float"]:
        delta = float(match["delta"]) if match["delta"] else 0.0
        value = -delta if match["sign"] == "-" else delta
        return Constraint(metric, op, value, relative=True, text=text.strip())
    value = float(match["number"])
    if not math.isfinite(value):
        raise UserError(f"constraint {text!r}: the bound must be a finite number")
    return Constraint(metric, op, value, text=text.strip())


def parse_objectives(objectives: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"latency,size"`` or a list -> names (all minimized), or a UserError."""
    items = objectives.split(",") if isinstance(objectives, str) else list(objectives)
    names = tuple(str(item).strip() for item in items if str(item).strip())
    if not names:
        raise UserError(f"no objective given; choose from {', '.join(OBJECTIVES)}")
    for name in names:
        if name not in OBJECTIVES:
            raise UserError(f"unknown objective {name!r}; choose from {', '.join(OBJECTIVES)}")
    if len(set(names)) != len(names):
        raise UserError(f"objective given twice: {','.join(names)}")
    return names


def check_metrics(constraints: list[Constraint], reference: dict[str, float]) -> None:
    """Every constraint names a metric the search measures (``reference``: the float model's
    fidelity and task metrics), so a typo fails before the first trial, not after the last."""
    known = set(reference) | set(FIDELITY_METRICS) | set(OBJECTIVES)
    for constraint in constraints:
        if constraint.metric not in known:
            raise UserError(f"constraint {constraint.text!r}: unknown metric "
                            f"{constraint.metric!r}; measured here: {', '.join(sorted(known))}")
        constraint.bound(reference)


def fidelity_metrics(fidelity: dict[str, Any], side: str = "candidate") -> dict[str, float]:
    """The search's fidelity metrics out of a validate report's ``fidelity`` section."""
    outputs = fidelity.get("outputs") or {}
    metrics: dict[str, float] = {}
    if outputs:
        metrics["cosine"] = min(float(o["cosine_mean"]) for o in outputs.values())
        metrics["cosine_min"] = min(float(o["cosine_min"]) for o in outputs.values())
        metrics["rel_l2"] = max(float(o["rel_l2"]) for o in outputs.values())
        top1 = [float(o["top1_agreement"]) for o in outputs.values() if "top1_agreement" in o]
        if top1:
            metrics["top1"] = min(top1)
    task = fidelity.get("task") or {}
    for key, value in (task.get(side) or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key] = float(value)
    return metrics


def reference_metrics(fidelity: dict[str, Any]) -> dict[str, float]:
    """The float model's own metrics: task metrics as measured, fidelity ones perfect."""
    metrics = {"cosine": 1.0, "cosine_min": 1.0, "rel_l2": 0.0, "top1": 1.0,
               "latency": 1.0, "size": 1.0, "params": 1.0}
    task = fidelity.get("task") or {}
    for key, value in (task.get("reference") or {}).items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[key] = float(value)
    return metrics


def feasible(metrics: dict[str, float], constraints: list[Constraint],
             reference: dict[str, float]) -> list[float]:
    """Optuna's constraint values for a trial's metrics (missing metric: infinitely violated)."""
    return [c.violation(metrics.get(c.metric, math.nan), reference) for c in constraints]
