"""Preparing and matching: already-quantized models refused, Constant-node weights lifted, the
opset raised, Gemm as MatMul (same numerics), exclusions and skip reasons, subgraphs noted."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from quantize_graphs import conv_mlp, data_for, init, ops

from onnxcomp import calibration, runtime
from onnxcomp.errors import UserError
from onnxcomp.model import Model
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize.prepare import find_sites, prepare
from onnxcomp.pipeline import Context

run = quantize.PASS.run


def test_refuses_already_quantized_model():
    model = conv_mlp()
    ctx = Context(calibration=data_for(model))
    result, _ = run(model, quantize.Config(), ctx)
    for mode in quantize.INTEGER_MODES:
        with pytest.raises(UserError, match="already quantized"):
            run(result, quantize.Config(mode=mode), ctx)
        with pytest.raises(UserError, match="already quantized"):  # the dry run says so too
            quantize.PASS.plan(result, quantize.Config(mode=mode), ctx)


def test_opset12_constant_weights_are_upgraded_and_lifted():
    model = conv_mlp(opset=12, constant_nodes=True)
    result, record = run(model, quantize.Config(), Context(calibration=data_for(model)))
    assert result.opset() == 13
    assert any("opset from 12 to 13" in note for note in record.notes)
    assert any("lifted" in note for note in record.notes)
    assert ops(result).count("QuantizeLinear") == 6
    runtime.session(result)  # ONNX Runtime loads per-channel DQ at opset 13
    assert model.opset() == 12 and "Constant" in ops(model)  # the input is unchanged


def test_gemm_as_matmul_is_exact_and_keeps_the_name():
    model = conv_mlp()
    notes: list[str] = []
    prepared = prepare(model, quantize.Config(), notes)
    assert any("1 Gemm nodes rewritten" in note for note in notes)
    nodes = {n.name: n.op_type for n in prepared.graph.node}
    assert nodes["gemm"] == "MatMul" and "Gemm" not in nodes.values()
    batch = next(iter(data_for(model)))
    # B' = B^T (transB) and C as an Add: float rounding only
    assert max(runtime.max_abs_difference(model, prepared, batch).values()) < 1e-5
    assert "gemm" in {s.node for s in find_sites(prepared, quantize.Config()).sites}
    # Other modes read Gemm as it is; an excluded Gemm stays a Gemm.
    assert "Gemm" in ops(prepare(model, quantize.Config(mode="int4"), []))
    assert "Gemm" in ops(prepare(model, quantize.Config(exclude=("gemm",)), []))


def test_exclude_and_skip_reasons():
    model = conv_mlp()
    config = quantize.Config(exclude=("conv2", "Gemm"), output_qdq="none")
    result, record = run(model, config, Context(calibration=data_for(model)))
    assert sorted(record.touched) == ["conv1", "mm"]
    reasons = dict(record.skipped)
    assert "excluded" in reasons["conv2"] and "excluded" in reasons["gemm"]
    assert ops(result).count("Gemm") == 1


def test_subgraph_weights_are_noted():
    inner = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wi"], ["yi"], name="inner_mm")], "body", [],
        [helper.make_tensor_value_info("yi", TensorProto.FLOAT, [1, 4])],
        [init("Wi", np.ones((4, 4), np.float32))])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=inner, else_branch=inner, name="if")],
        "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    # Static int8 quantizes them too, calibrated inside their bodies (issue #17; see
    # test_bodies_int8.py); the second branch's node waits for cleanup to name it.
    calib = calibration.random_data(model, 2)
    _, record = run(model, quantize.Config(), Context(calibration=calib))
    assert record.touched == ["inner_mm"]
    assert any("calibrated inside their bodies" in note for note in record.notes)
    # int8-dynamic quantizes them (issue #17); the second branch's node shares the first's
    # name, so it waits for cleanup to name it.
    out, record = run(model, quantize.Config(mode="int8-dynamic"), Context())
    assert record.touched == ["inner_mm"]
    assert record.skipped == [("inner_mm",
                               "node has no unique name (run cleanup, which names it)")]
    assert any("1 sites inside If/Loop/Scan bodies" in note for note in record.notes)
    for cond in (True, False):
        feeds = {"x": np.ones((1, 4), np.float32), "cond": np.array(cond)}
        np.testing.assert_allclose(runtime.run_model(out, feeds)["y"],
                                   runtime.run_model(model, feeds)["y"], rtol=0.02)
