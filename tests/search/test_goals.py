"""Constraints and objectives: strict parsing, bounds relative to the float model."""

from __future__ import annotations

import math

import pytest

from onnxcomp.errors import UserError
from onnxcomp.search import goals


@pytest.mark.parametrize("text, metric, op, value, relative", [
    ("cosine>=0.99", "cosine", ">=", 0.99, False),
    ("  line_accuracy >= float - 0.01 ", "line_accuracy", ">=", -0.01, True),
    ("char_accuracy>=float", "char_accuracy", ">=", 0.0, True),
    ("latency<=0.8", "latency", "<=", 0.8, False),
    ("rel_l2<1e-2", "rel_l2", "<", 0.01, False),
    ("top1>.9", "top1", ">", 0.9, False),
])
def test_parse_constraint(text, metric, op, value, relative):
    parsed = goals.parse_constraint(text)
    assert (parsed.metric, parsed.op, parsed.relative) == (metric, op, relative)
    assert parsed.value == pytest.approx(value)


@pytest.mark.parametrize("text", [
    "cosine", "cosine>=", "cosine=>0.9", "cosine==0.9", ">=0.9", "cosine>=0.9x",
    "cosine>=nan", "cosine>=inf", "cosine>=float*2", "latency<=float", "", "cos ine>=0.9",
])
def test_bad_constraints_are_user_errors(text):
    with pytest.raises(UserError):
        goals.parse_constraint(text)


def test_violation_sign_and_relative_bound():
    reference = {"line_accuracy": 0.95}
    at_least = goals.parse_constraint("line_accuracy>=float-0.01")
    assert at_least.bound(reference) == pytest.approx(0.94)
    assert at_least.violation(0.96, reference) < 0 < at_least.violation(0.93, reference)
    at_most = goals.parse_constraint("latency<=0.8")
    assert at_most.violation(0.7, reference) < 0 < at_most.violation(0.9, reference)
    assert math.isinf(at_least.violation(math.nan, reference))
    with pytest.raises(UserError, match="no 'cosine_x'"):
        goals.parse_constraint("cosine_x>=float").bound(reference)


def test_unknown_metric_fails_before_any_trial():
    with pytest.raises(UserError, match="unknown metric 'line_acc'"):
        goals.check_metrics([goals.parse_constraint("line_acc>=0.9")], {"line_accuracy": 0.9})
    goals.check_metrics([goals.parse_constraint("cosine>=0.9")], goals.reference_metrics({}))


def test_objectives():
    assert goals.parse_objectives("latency, size") == ("latency", "size")
    for bad in ("", "speed", "latency,latency"):
        with pytest.raises(UserError):
            goals.parse_objectives(bad)


def test_fidelity_metrics_from_a_validate_report():
    fidelity = {"outputs": {"a": {"cosine_mean": 0.99, "cosine_min": 0.9, "rel_l2": 0.1,
                                  "top1_agreement": 0.97},
                            "b": {"cosine_mean": 0.98, "cosine_min": 0.95, "rel_l2": 0.2}},
                "task": {"reference": {"line_accuracy": 0.95, "name": "x"},
                         "candidate": {"line_accuracy": 0.9}}}
    metrics = goals.fidelity_metrics(fidelity)
    assert metrics == {"cosine": 0.98, "cosine_min": 0.9, "rel_l2": 0.2, "top1": 0.97,
                       "line_accuracy": 0.9}
    assert goals.reference_metrics(fidelity)["line_accuracy"] == 0.95
