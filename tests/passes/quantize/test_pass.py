"""The quantize pass through the contract: the plan as a dry run (rows, no mutation), the typed
hand-over (LayerChange, repair "bias"), nothing to do -> not modified, refusals as user errors,
the same result twice, weights left on disk."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper
from quantize_graphs import conv_mlp, data_for, gather_model, matmul_model

from onnxcomp import calibration
from onnxcomp.errors import UserError
from onnxcomp.model import Model
from onnxcomp.passes import PASSES, quantize
from onnxcomp.pipeline import SKIP, Context, LayerChange

run = quantize.PASS.run


def test_registered_with_its_capabilities():
    assert PASSES["quantize"] is quantize.PASS
    caps = quantize.PASS.capabilities
    assert caps.lazy_weights
    needs = caps.needs_calibration
    assert needs(quantize.Config()) and not needs(quantize.Config(mode="int8-dynamic"))
    assert not needs(quantize.Config(mode="int4"))


def test_dry_run_plans_every_site_and_changes_nothing():
    model = conv_mlp(opset=12, constant_nodes=True)
    before = model.proto.SerializeToString()
    ctx = Context(calibration=data_for(model))
    plan = quantize.PASS.plan(model, quantize.Config(exclude=("conv2",)), ctx)
    assert model.proto.SerializeToString() == before  # pure: the input is not touched
    rows = {row.node: row for row in plan.rows}
    assert rows["conv1"].action == "quantize int8 per-channel + output QDQ"
    assert rows["conv2"].action == SKIP and "excluded" in rows["conv2"].reason
    assert rows["mm"].action.startswith("quantize int8 per-channel")
    assert rows["gemm"].action.startswith("quantize int8")  # the Gemm, as a MatMul
    assert any("opset from 12 to 13" in note for note in plan.notes)
    assert "conv1" in plan.table() and "skipped" in plan.table()
    assert plan.to_dict()["rows"]


@pytest.mark.parametrize("config, action", [
    (quantize.Config(mode="int8-dynamic"), "int8-dynamic per-channel"),
    (quantize.Config(mode="int4"), "int4 block 32 MatMulNBits"),
    (quantize.Config(mode="int4", block_size=64, int4_format="qdq", int4_symmetric=False),
     "int4 block 64 asymmetric QDQ"),
    (quantize.Config(mode="int4", int4_method="gptq"), "int4 GPTQ block 32 MatMulNBits"),
])
def test_plan_rows_name_the_rewrite(config, action):
    model = gather_model()
    plan = quantize.PASS.plan(model, config, Context())
    rows = {row.node: row.action for row in plan.rows}
    assert rows == {"proj": action, "emb_gather": "int8 table (Gather)"}


def test_changes_are_layer_changes_for_bias_correction():
    model = conv_mlp()
    result, record = run(model, quantize.Config(), Context(calibration=data_for(model)))
    assert [c.node for c in record.changes] == record.touched
    assert all(isinstance(c, LayerChange) and c.pass_name == "quantize" and c.repair == "bias"
               for c in record.changes)
    teacher = {c.node: c.teacher_output for c in record.changes}
    # Each site's own output tensor, whose name the student keeps: where the teacher has the same
    # tensor distill compares them. The Gemm became MatMul + Add: its MatMul's output is the
    # product before the bias, a tensor the teacher lacks (distill skips it and says so).
    assert teacher == {"conv1": "c1", "conv2": "c2", "mm": "mm", "gemm": "y_matmul"}
    produced = {o for n in result.graph.node for o in n.output}
    assert set(teacher.values()) <= produced
    assert "layers" not in record.details  # the typed hand-over replaces it


def test_nothing_to_quantize_is_not_modified():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    result, record = run(model, quantize.Config(), Context(calibration=data_for(model)))
    assert not record.modified and result is model and not record.changes
    assert any("nothing to quantize" in note for note in record.notes)
    assert record.params_after == record.params_before


def test_int8_static_needs_calibration_and_matching_data():
    model = conv_mlp()
    with pytest.raises(UserError, match=r"\(int8 \(static activation ranges\)\) needs calibration data"):
        run(model, quantize.Config(), Context())
    wrong = calibration.from_batches([{"x": np.zeros((1, 3, 9, 9), np.float32)}])
    with pytest.raises(UserError):
        run(model, quantize.Config(), Context(calibration=wrong))
    with pytest.raises(UserError):  # the dry run checks the data as well
        quantize.PASS.plan(model, quantize.Config(), Context(calibration=wrong))


@pytest.mark.parametrize("config", [quantize.Config(), quantize.Config(mode="int8-dynamic"),
                                    quantize.Config(mode="int4")])
def test_the_same_input_gives_the_same_model_and_a_second_run_is_refused(config):
    model = matmul_model()
    ctx = Context(calibration=data_for(model))
    once, first = run(model, config, ctx)
    again, second = run(model, config, ctx)
    assert once.proto.SerializeToString() == again.proto.SerializeToString()
    assert first.touched == second.touched == ["mm1", "mm2"]
    # Quantizing a quantized model is a user mistake (exit 2), not a second rewrite.
    with pytest.raises(UserError, match="already quantized"):
        run(once, config, ctx)
