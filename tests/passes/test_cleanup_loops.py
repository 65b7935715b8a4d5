"""cleanup's loop-invariant rewrite: a Loop-carried weight the body passes through unchanged
(Paddle2ONNX's ``p2o.loop.input.N``) is read from the outer scope, float-exactly, so the
weight-only quantizers then see the body's MatMul as a weight layer."""

from __future__ import annotations

import body_graphs
import numpy as np
import onnx
import pytest

from onnxcomp import runtime
from onnxcomp.graph import proto_scopes
from onnxcomp.model import Model
from onnxcomp.passes import cleanup, quantize
from onnxcomp.pipeline import Context


def _run(model):
    return cleanup.PASS.run(model, cleanup.Config(), Context())


def _loop(model) -> onnx.NodeProto:
    return next(n for n in model.graph.node if n.op_type == "Loop")


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(3).standard_normal((2, body_graphs.DIM)).astype(
        np.float32)}


def test_a_carried_constant_weight_becomes_an_outer_read_and_its_slot_goes():
    model = body_graphs.loop_matmul()
    out, record = _run(model)
    assert record.modified and "loop" in record.touched
    assert record.details["loop_invariants"] == [
        {"loop": "loop", "value": "W", "slot_removed": True}]
    loop = _loop(out)
    assert list(loop.input) == ["M", "keep_going", "x"] and list(loop.output) == ["y"]
    body = loop.attribute[0].g
    assert [v.name for v in body.input] == ["i", "cond_in", "h_in"]
    assert next(n for n in body.node if n.op_type == "MatMul").input[1] == "W"
    onnx.checker.check_model(out.proto, full_check=True)
    # Float-exact: the body computes on the very same values.
    np.testing.assert_array_equal(runtime.run_model(model, _feeds())["y"],
                                  runtime.run_model(out, _feeds())["y"])


def test_a_carried_weight_whose_final_value_is_an_output_keeps_a_dead_slot():
    model = body_graphs.loop_matmul(weight_output=True)
    out, record = _run(model)
    assert record.details["loop_invariants"][0]["slot_removed"] is False
    loop = _loop(out)
    assert list(loop.output) == ["y", "w_final"]
    body = loop.attribute[0].g
    assert next(n for n in body.node if n.op_type == "MatMul").input[1] == "W"
    before, after = runtime.run_model(model, _feeds()), runtime.run_model(out, _feeds())
    for name in ("y", "w_final"):
        np.testing.assert_array_equal(before[name], after[name])


@pytest.mark.parametrize("weight_output", [False, True])
def test_the_rewrite_is_idempotent(weight_output):
    once, _ = _run(body_graphs.loop_matmul(weight_output=weight_output))
    twice, record = _run(once)
    assert not record.modified and twice is once


def test_nothing_to_do_when_every_carried_value_changes():
    model, _ = _run(body_graphs.loop_matmul(carried_weight=False))  # tidied (nodes sorted)
    out, record = _run(model)
    assert not record.modified and out is model
    assert not any(row.action.startswith("read loop-invariant") for row in
                   cleanup.PASS.plan(model, cleanup.Config(), Context()).rows)


def test_the_plan_lists_the_slot_and_the_option_turns_it_off():
    model = body_graphs.loop_matmul()
    rows = cleanup.PASS.plan(model, cleanup.Config(), Context()).rows
    assert [(r.node, r.action) for r in rows if "loop" in r.action] == [
        ("loop", "read loop-invariant from outer scope")]
    out, record = cleanup.PASS.run(model, cleanup.Config(loop_invariants=False), Context())
    assert "loop_invariants" not in record.details
    assert list(_loop(out).input) == ["M", "keep_going", "x", "W"]


@pytest.mark.parametrize("mode, kernel", [("int8-dynamic", "MatMulInteger"),
                                          ("int4", "MatMulNBits")])
def test_after_cleanup_the_body_matmul_is_quantized(mode, kernel):
    model = body_graphs.loop_matmul()
    _, before = quantize.PASS.run(model, quantize.Config(mode=mode), Context())
    assert not before.modified  # a carried weight looks like an activation
    cleaned, _ = _run(model)
    out, record = quantize.PASS.run(cleaned, quantize.Config(mode=mode), Context())
    assert record.touched == ["body_mm"]
    ops = [n.op_type for body, _ in proto_scopes(out.graph) for n in body.node]
    assert kernel in ops
    ref, got = runtime.run_model(model, _feeds())["y"], runtime.run_model(out, _feeds())["y"]
    cosine = float(ref.ravel() @ got.ravel() / (np.linalg.norm(ref) * np.linalg.norm(got)))
    assert cosine > (0.999 if mode == "int8-dynamic" else 0.95)  # int4 of a 16x16: ~0.97


def test_a_transpose_of_a_body_weight_is_folded():
    """Paddle2ONNX reads GRU weights through Transpose inside the Loop: folded, so the MatMul
    sees a constant weight; the file does not grow and the outputs agree."""
    model = body_graphs.loop_matmul(carried_weight=False)
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    body = proto.graph.node[0].attribute[0].g
    mm = next(n for n in body.node if n.op_type == "MatMul")
    mm.input[1] = "W_t"
    body.node.insert(0, onnx.helper.make_node("Transpose", ["Wb"], ["W_t"], name="body_t",
                                              perm=[1, 0]))
    body.initializer.append(onnx.numpy_helper.from_array(
        np.ascontiguousarray(onnx.numpy_helper.to_array(proto.graph.initializer[0]).T), "Wb"))
    shaped = Model(proto)
    out, record = _run(shaped)
    assert any("Transpose nodes of constant weights" in note for note in record.notes)
    ops = [n.op_type for b, _ in proto_scopes(out.graph) for n in b.node]
    assert "Transpose" not in ops
    assert out.proto.ByteSize() <= shaped.proto.ByteSize()
    np.testing.assert_allclose(runtime.run_model(shaped, _feeds())["y"],
                               runtime.run_model(out, _feeds())["y"], rtol=1e-6, atol=1e-6)
