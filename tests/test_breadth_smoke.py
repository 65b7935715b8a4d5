"""The breadth benchmark's bookkeeping (benchmarks/breadth.py) on tiny graphs: the static facts
it reads from a model and the verdict it gives a cell. No network, no CLI run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import builders
import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "breadth.py"


@pytest.fixture(scope="module")
def breadth():
    spec = importlib.util.spec_from_file_location("breadth_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _cell(recipe: str = "quantize:int8", rc: int = 0, **extra) -> dict:
    return {"recipe": recipe, "rc": rc, "stderr": "", "stderr_line": "", "notes": [],
            "verdicts": [], **extra}


def test_facts_see_layers_inside_if_bodies_and_outside(breadth, tmp_path):
    path = tmp_path / "if.onnx"
    builders.if_graph().save(path)
    facts = breadth.facts(path)
    assert facts["control_flow"] == ["If"]
    assert facts["quantizable_outside"] == {"int8": 2, "int4": 2}  # pre and post MatMuls
    assert [op for op, _ in facts["body_layers"]] == ["MatMul", "MatMul"]


def test_facts_count_unnamed_nodes(breadth, tmp_path):
    path = tmp_path / "unnamed.onnx"
    builders.unnamed_matmuls(count=3).save(path)
    assert breadth.facts(path)["unnamed_nodes"] >= 3


def test_each_done_when_rule_is_a_violation(breadth):
    plain = {"bytes": 1000, "control_flow": [], "quantizable_outside": {"int8": 2, "int4": 2},
             "body_layers": []}
    assert breadth.classify(_cell(size_ratio=0.3, worst_cosine=0.99), plain) == []
    assert breadth.classify(_cell(rc=3, stderr_line="internal error"), plain)
    assert "3.580x" in breadth.classify(_cell(size_ratio=3.58), plain)[0]
    # a few bytes more with nothing compressed is counted as a no-op, not a larger output
    noop = _cell(size_ratio=1.00003)
    assert breadth.classify(noop, plain) == []
    assert breadth.status({**noop, "violations": []}) == "no-op"
    assert breadth.classify(_cell(worst_cosine=0.67), plain)[0].startswith("exit 0 at cosine")
    # the verdict (or exit 1) is what the floor asks for
    assert breadth.classify(_cell(worst_cosine=0.67, verdicts=["below"]), plain) == []
    assert breadth.classify(_cell(rc=1, worst_cosine=0.67), plain) == []
    assert breadth.classify(_cell("prune:0.3", worst_cosine=0.92), plain) == []
    quiet = _cell("quantize:int4", notes=["quantize: nothing to quantize (int4)"])
    assert "nothing to quantize" in breadth.classify(quiet, plain)[0]
    conv_only = {**plain, "quantizable_outside": {"int8": 3, "int4": 0}}
    dynamic = _cell("quantize:int8-dynamic", notes=["quantize: nothing to quantize"])
    assert breadth.classify(dynamic, conv_only) == []  # dynamic covers MatMul/Gemm only
    assert "peak RSS" in breadth.classify(_cell(peak_rss=2 << 30), plain)[0]


def test_control_flow_bodies_must_change(breadth):
    body = [("MatMul", "(1, 256)")]
    model = {"bytes": 1000, "control_flow": ["If"], "body_layers": body,
             "quantizable_outside": {"int8": 0, "int4": 0}}
    assert "bodies not compressed" in breadth.classify(_cell(body_layers=body), model)[0]
    changed = [("DequantizeLinear", "(3, 256)"), ("MatMul", "None")]
    assert breadth.classify(_cell(body_layers=changed), model) == []
    assert "refused" in breadth.classify(_cell(rc=2), model)[0]
    assert breadth.classify(_cell("cleanup", body_layers=body), model) == []


def test_matrix_renders_every_cell(breadth):
    cell = _cell(size_ratio=0.5, worst_cosine=0.99, violations=[])
    cell["status"] = breadth.status(cell)
    results = {"recipes": ["quantize:int8", "cleanup"],
               "models": {"toy": {"cells": {"quantize:int8": cell},
                                  "ort": {"size_ratio": 0.3, "worst_cosine": 0.98}}}}
    table = breadth.matrix(results)
    assert "| toy | ok 0.50x, cos 0.990 | not run | 0.30x, cos 0.980 |" in table
