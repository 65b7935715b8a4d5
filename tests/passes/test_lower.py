"""lower: static-int8 MatMul + bias Add -> com.microsoft.MatMulIntegerToFloat. Structural (op
counts, the Add gone, a shared activation DequantizeLinear kept), numerical in ONNX Runtime
against the QDQ graph it came from, negative (float model, no bias, a bias read twice, an
output MatMul), idempotence, and the ort-cpu target appending it (other targets refuse it)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import api, calibration, runtime, targets
from onnxcomp.errors import UserError
from onnxcomp.model import Model
from onnxcomp.passes import PASSES, lower, quantize
from onnxcomp.pipeline import SKIP, Context


def mlp(bias_read_twice: bool = False) -> Model:
    """x[B,S,24] -> q/k MatMul+bias (one input) -> Add -> Relu -> MatMul+bias -> MatMul (no
    bias) -> y: dynamic batch and sequence, so quantize leaves the MatMuls without an output
    QDQ (ONNX Runtime's MatMulIntegerToFloat)."""
    rng = np.random.default_rng(4)
    weights = {"wq": (24, 32), "wk": (24, 32), "w2": (32, 16), "w3": (16, 8)}
    inits = [numpy_helper.from_array((rng.standard_normal(s) * 0.3).astype(np.float32), k)
             for k, s in weights.items()]
    inits += [numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), k)
              for k, n in (("bq", 32), ("bk", 32), ("b2", 16))]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "wq"], ["q"], name="q"), n("Add", ["q", "bq"], ["qb"], name="q_bias"),
             n("MatMul", ["x", "wk"], ["k"], name="k"), n("Add", ["bk", "k"], ["kb"], name="k_bias"),
             n("Add", ["qb", "kb"], ["s"], name="sum"), n("Relu", ["s"], ["r"], name="relu"),
             n("MatMul", ["r", "w2"], ["h"], name="fc2"),
             n("Add", ["h", "b2"], ["hb"], name="fc2_bias"),
             n("MatMul", ["hb", "w3"], ["y"], name="head")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", "S", 8])]
    if bias_read_twice:  # the MatMul's output is read by its bias Add and by a graph output
        outputs.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, ["B", "S", 16]))
    graph = helper.make_graph(
        nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", "S", 24])],
        outputs, inits)
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def batches(count: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((2, 5, 24)).astype(np.float32)} for _ in range(count)]


def quantized(model: Model) -> Model:
    data = calibration.from_batches(batches(8, 0))
    result, _ = quantize.PASS.run(model, quantize.Config(), Context(calibration=data))
    return result


def run(model: Model, optimize: bool = True) -> list[np.ndarray]:
    session = runtime.session(model, optimize=optimize)
    return [session.run(None, feed) for feed in batches(3, 1)]


def ops(model: Model) -> list[str]:
    return [node.op_type for node in model.graph.node]


def test_registered_and_configured():
    assert PASSES["lower"] is lower.PASS and lower.PASS.capabilities.lazy_weights
    with pytest.raises(ValueError, match="matmul_bias"):
        lower.Config(matmul_bias="yes")
    with pytest.raises(ValueError, match="no argument"):
        lower.Config.from_short("x")


def test_bias_adds_fold_into_matmul_integer_to_float_with_the_same_outputs():
    qdq = quantized(mlp())
    before = qdq.proto.SerializeToString()
    plan = lower.PASS.plan(qdq, lower.Config(), Context())
    rows = {row.node: row for row in plan.rows}
    assert {n for n, r in rows.items() if r.action == lower.ACTION} == {"q", "k", "fc2"}
    assert rows["head"].action == SKIP and "no bias Add" in rows["head"].reason
    lowered, record = lower.PASS.run(qdq, lower.Config(), Context())
    assert record.modified and sorted(record.touched) == ["fc2", "k", "q"]
    counts = {op: ops(lowered).count(op) for op in ("MatMulIntegerToFloat", "MatMul", "Add")}
    assert counts == {"MatMulIntegerToFloat": 3, "MatMul": 1, "Add": 1}  # "sum" stays
    fused = [n for n in lowered.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert all(n.domain == lower.MICROSOFT and len(n.input) == 7 for n in fused)
    # q and k read one quantized x: its DequantizeLinear went with them (nothing else reads it)
    assert sum(n.input[0] == fused[0].input[0] for n in fused) == 2
    onnx.checker.check_model(lowered.proto)
    assert any("com.microsoft" in note for note in record.notes)
    # ONNX Runtime runs the same integer kernel either way (optimized: it fuses the QDQ MatMul
    # itself), so the outputs agree to float rounding of the bias addition.
    for ref, got in zip(run(qdq), run(lowered)):
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)
    # Unoptimized, the QDQ graph runs dequantized float MatMuls: same values up to the order
    # of the float accumulation.
    for ref, got in zip(run(qdq, optimize=False), run(lowered, optimize=False)):
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-4, atol=1e-4)
    assert qdq.proto.SerializeToString() == before  # the input model is not touched


def test_nothing_to_lower_is_said_and_not_modified():
    float_model = mlp()
    result, record = lower.PASS.run(float_model, lower.Config(), Context())
    assert not record.modified and result is float_model
    assert any(note.startswith("nothing to lower") for note in record.notes)
    qdq = quantized(mlp())
    _, off = lower.PASS.run(qdq, lower.Config(matmul_bias=False), Context())
    assert not off.modified and any("matmul_bias = false" in n for n in off.notes)


def test_a_matmul_whose_output_is_read_twice_keeps_its_add():
    qdq = quantized(mlp(bias_read_twice=True))
    rows = {row.node: row for row in lower.PASS.plan(qdq, lower.Config(), Context()).rows}
    assert rows["fc2"].action == SKIP and "only reader" in rows["fc2"].reason
    assert rows["q"].action == lower.ACTION


def test_a_bias_that_is_not_a_vector_of_the_width_is_left():
    model = quantized(mlp())
    graph = model.graph
    bias = next(t for t in graph.initializer if t.name == "b2")
    bias.CopyFrom(numpy_helper.from_array(np.ones((1, 16), np.float32), "b2"))
    rows = {row.node: row for row in lower.PASS.plan(model, lower.Config(), Context()).rows}
    assert rows["fc2"].action == SKIP and "1-D float32 bias" in rows["fc2"].reason


def test_unnamed_nodes_are_lowered_too():
    qdq = quantized(mlp())
    for node in qdq.graph.node:
        node.name = ""
    lowered, record = lower.PASS.run(qdq, lower.Config(), Context())
    assert record.modified and ops(lowered).count("MatMulIntegerToFloat") == 3
    for ref, got in zip(run(qdq), run(lowered)):
        np.testing.assert_allclose(got[0], ref[0], rtol=1e-5, atol=1e-5)


def test_idempotent():
    once, _ = lower.PASS.run(quantized(mlp()), lower.Config(), Context())
    twice, record = lower.PASS.run(once, lower.Config(), Context())
    assert not record.modified
    assert twice.proto.SerializeToString() == once.proto.SerializeToString()


def test_the_ort_cpu_target_appends_it_after_static_int8_only():
    cpu = targets.get("ort-cpu")
    names = [s.name for s in api.target_steps("quantize:int8", None, cpu)]
    assert names == ["quantize", "lower"]
    assert [s.name for s in api.target_steps("quantize:int8,distill:kd", None, cpu)] == \
        ["quantize", "distill", "lower"]  # after QAT, which trains the QDQ graph
    assert [s.name for s in api.target_steps("quantize:int8-dynamic", None, cpu)] == ["quantize"]
    assert [s.name for s in api.target_steps("quantize:int8,lower", None, cpu)] == \
        ["quantize", "lower"]
    off = api.target_steps("quantize:int8", ["lower.matmul_bias=false"], cpu)
    assert off[-1].config == lower.Config(matmul_bias=False)
    for other in ("openvino", "ort-mobile"):
        assert [s.name for s in api.target_steps("quantize:int8", None,
                                                 targets.get(other))] == ["quantize"]
    with pytest.raises(UserError, match="drop 'lower'"):
        api.target_steps("quantize:int8,lower", None, targets.get("openvino"))


def test_compress_writes_the_lowered_graph(tmp_path):
    model = mlp()
    calib = tmp_path / "calib"
    calib.mkdir()
    for i, batch in enumerate(batches(4, 0)):
        np.savez(calib / f"{i}.npz", **batch)
    result = api.compress(model, recipe="quantize:int8", calib=str(calib), validate=False)
    assert ops(result.model).count("MatMulIntegerToFloat") == 3
    assert [r.name for r in result.report.passes][-2:] == ["lower", "cleanup"]
