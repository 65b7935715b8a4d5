"""Issue #17 on tiny graphs: a weight read by many nodes is quantized once (an unrolled LSTM's
Gemms), weights inside If branches are quantized by the weight-only modes (checked in ONNX
Runtime for both branch conditions), unnamed nodes are quantized after cleanup names them, and
an output larger than its input says so."""

from __future__ import annotations

import builders
import numpy as np
import onnx
import pytest

from onnxcomp import calibration, runtime
from onnxcomp.graph import proto_scopes
from onnxcomp.passes import quantize
from onnxcomp.pipeline import Context, Pipeline
from onnxcomp.recipe import parse_recipe, with_cleanup


def _size(model) -> int:
    return model.proto.ByteSize()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _compress(model, recipe: str, data=None):
    return Pipeline(with_cleanup(parse_recipe(recipe))).run(
        model, Context(calibration=data, teacher=model))


def _ops(model) -> list[str]:
    return [n.op_type for body, _ in proto_scopes(model.graph) for n in body.node]


@pytest.mark.parametrize("recipe, floor", [("quantize:int8", 0.99),
                                           ("quantize:int8-dynamic", 0.99),
                                           ("quantize:int4", 0.95)])
def test_shared_gemm_weights_are_quantized_once(recipe, floor):
    """20 Gemms over 2 weights: one quantized copy per weight, so the file shrinks (before the
    fix every Gemm got its own copy: 3.58x the float file on an unrolled LSTM)."""
    model = builders.shared_gemms()
    data = calibration.random_data(model, 4)
    out, records = _compress(model, recipe, data)
    assert _size(out) < 0.35 * _size(model)
    record = next(r for r in records if r.name == "quantize")
    assert len(record.touched) == 20
    feeds = dict(next(iter(data)))
    cosine = _cosine(runtime.run_model(model, feeds)["y"], runtime.run_model(out, feeds)["y"])
    assert cosine > floor  # 20 layers deep: 4-bit errors compound (measured 0.97)


@pytest.mark.parametrize("mode", ["int8-dynamic", "int4"])
def test_if_branches_are_quantized_and_faithful_for_both_conditions(mode):
    model = builders.if_graph()
    out, record = quantize.PASS.run(model, quantize.Config(mode=mode), Context())
    assert {"then_mm", "else_mm"} <= set(record.touched)
    onnx.checker.check_model(out.proto)
    kernel = "MatMulInteger" if mode == "int8-dynamic" else "MatMulNBits"
    for attr in next(n for n in out.graph.node if n.op_type == "If").attribute:
        assert kernel in [n.op_type for n in attr.g.node]  # both branches quantized
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        cosine = _cosine(runtime.run_model(model, feeds)["y"], runtime.run_model(out, feeds)["y"])
        assert cosine > 0.98


@pytest.mark.parametrize("mode", ["int8-dynamic", "int4"])
def test_a_weight_read_by_both_branches_is_quantized_once(mode):
    model = builders.if_shared_weight()
    out, record = quantize.PASS.run(model, quantize.Config(mode=mode), Context())
    assert sorted(record.touched) == ["else_own_mm", "else_shared_mm", "then_own_mm",
                                      "then_shared_mm"]
    # One float W (64x64) in: one quantized W out, written once, in the outer graph that
    # encloses both readers; the file is well under half the float one.
    assert _size(out) < 0.45 * _size(model)
    names = [t.name for body, _ in proto_scopes(out.graph) for t in body.initializer]
    assert len(names) == len(set(names))
    x = np.random.default_rng(1).standard_normal((2, 64)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        cosine = _cosine(runtime.run_model(model, feeds)["y"], runtime.run_model(out, feeds)["y"])
        assert cosine > 0.98


def test_nested_if_with_constant_weights_is_quantized_inside():
    model = builders.nested_if_constants()
    out, _ = _compress(model, "quantize:int4")
    assert _size(out) < 0.3 * _size(model)
    assert _ops(out).count("MatMulNBits") == 5
    x = np.random.default_rng(2).standard_normal((2, 64)).astype(np.float32)
    for c1 in (True, False):
        for c2 in (True, False):
            feeds = {"x": x, "c1": np.array(c1), "c2": np.array(c2)}
            assert _cosine(runtime.run_model(model, feeds)["y"],
                           runtime.run_model(out, feeds)["y"]) > 0.98


def test_static_int8_plans_body_weights_calibrated_inside_their_bodies():
    """Static int8 reaches into the branches (tests/passes/quantize/test_bodies_int8.py checks
    the calibration, the untaken branch's skip reason and the numerics)."""
    model = builders.if_graph()
    data = calibration.random_data(model, 2)
    plan = quantize.PASS.plan(model, quantize.Config(), Context(calibration=data))
    rows = {row.node: row for row in plan.rows}
    assert rows["then_mm"].action.startswith("quantize int8")
    assert rows["else_mm"].action.startswith("quantize int8")
    assert rows["pre"].action.startswith("quantize int8")
    assert any("calibrated inside their bodies" in note for note in plan.notes)


def test_unnamed_matmuls_are_all_quantized_after_cleanup():
    model = builders.unnamed_matmuls()
    out, records = _compress(model, "quantize:int4")
    record = next(r for r in records if r.name == "quantize")
    assert len(record.touched) == 6 and not record.skipped
    assert _ops(out).count("MatMulNBits") == 6


def test_a_larger_output_says_so():
    """A 16x16 If graph: Q/DQ nodes outweigh the bytes static int8 saves."""
    model = builders.if_graph()
    out, record = quantize.PASS.run(model, quantize.Config(),
                                       Context(calibration=calibration.random_data(model, 2)))
    assert _size(out) > _size(model)
    assert any(note.startswith("WARNING: quantize made the model larger") for note in record.notes)
