"""quantize fp16 / bf16 (onnxcomp/passes/quantize/half.py): storage, numerics in ONNX Runtime,
the keep-float list, mixed precision to min_cosine, and cleanup not undoing the storage."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import attention_block, mlp
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import calibration, runtime
from onnxcomp.model import Model
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize.half import _to_bfloat16_bits
from onnxcomp.pipeline import Context, Pipeline
from onnxcomp.recipe import parse_recipe, with_cleanup


def _data(model: Model, count: int = 4) -> calibration.Dataset:
    return calibration.random_data(model, count)


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def test_bfloat16_rounding_matches_ml_dtypes():
    ml_dtypes = pytest.importorskip("ml_dtypes")  # onnx's own dependency since onnx 1.17
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.standard_normal(10000).astype(np.float32) * 10.0 ** rng.integers(
        -30, 30, 10000), np.array([0.0, -0.0, np.inf, -np.inf, 1.0, 3.14159], np.float32)])
    ours = _to_bfloat16_bits(values)
    want = values.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(ours, want)
    assert (_to_bfloat16_bits(np.array([np.nan], np.float32)) & 0x7F80) == 0x7F80


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_half_modes_halve_the_weights_and_keep_the_outputs(mode):
    model = attention_block()
    data = _data(model)
    steps = with_cleanup(parse_recipe(f"quantize:{mode}"))
    result, records = Pipeline(steps).run(model, Context(calibration=data))
    assert records[1].modified
    assert records[-1].bytes_after <= 0.52 * records[0].bytes_before  # cleanup kept the storage
    stored = {t.data_type for t in result.graph.initializer if len(t.dims) >= 2}
    assert stored == {TensorProto.FLOAT16 if mode == "fp16" else TensorProto.BFLOAT16}
    # inputs and outputs stay float32
    assert {i.type.tensor_type.elem_type for i in result.graph.input} == {TensorProto.FLOAT}
    assert {o.type.tensor_type.elem_type for o in result.graph.output} == {TensorProto.FLOAT}
    for batch in data:
        want = runtime.run_model(model, batch)
        got = runtime.run_model(result, batch)
        for name in want:
            assert _cosine(want[name], got[name]) > 0.999


def test_fp16_keeps_normalizations_and_softmax_in_float32():
    model = attention_block()
    result, record = quantize.PASS.run(model, quantize.Config(mode="fp16"),
                                       Context(calibration=_data(model)))
    skipped = dict(record.skipped)
    kept_ops = {n.op_type for n in model.graph.node if n.name in skipped}
    assert {"Softmax", "LayerNormalization"} & kept_ops
    for node in result.graph.node:
        if node.name in skipped and node.op_type == "Softmax":
            assert node.op_type == "Softmax"
    plan = quantize.PASS.plan(model, quantize.Config(mode="fp16"), Context())
    assert any(row.action == "fp16" for row in plan.rows)
    assert all(row.reason for row in plan.rows if row.action == "skip")


def _overflowing_model() -> Model:
    """x -> MatMul(W_big) -> Mul(tiny) -> y: the MatMul's output overflows float16 (> 65504)
    for ordinary inputs; every other node is harmless. Mixed precision must pick it."""
    rng = np.random.default_rng(1)
    big = (rng.standard_normal((16, 16)) * 3e4).astype(np.float32)
    small = (rng.standard_normal((16, 16)) * 0.1).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "small"], ["a"], name="harmless"),
         helper.make_node("MatMul", ["a", "big"], ["b"], name="overflows"),
         helper.make_node("Mul", ["b", "scale"], ["y"], name="rescale")],
        "overflow", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 16])],
        [numpy_helper.from_array(small, "small"), numpy_helper.from_array(big, "big"),
         numpy_helper.from_array(np.array(1e-4, np.float32), "scale")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return Model(model)


def test_fp16_mixed_precision_keeps_the_overflowing_node_float32():
    model = _overflowing_model()
    batches = [{"x": (np.random.default_rng(i).standard_normal((4, 16)) * 30).astype(
        np.float32)} for i in range(4)]
    data = calibration.from_batches(batches)
    _, plain = quantize.PASS.run(model, quantize.Config(mode="fp16"), Context(calibration=data))
    result, record = quantize.PASS.run(model, quantize.Config(mode="fp16", min_cosine=0.999),
                                       Context(calibration=data))
    assert plain.details["output_cosine"] < 0.999
    assert record.details["mixed_extra_float"] == ["overflows"]
    assert record.details["output_cosine"] >= 0.999
    for batch in batches:
        want = runtime.run_model(model, batch)["y"]
        got = runtime.run_model(result, batch)["y"]
        assert np.isfinite(got).all() and _cosine(want, got) >= 0.999


def test_bf16_excluded_weights_stay_float32():
    model = mlp()
    first = model.graph.node[0].name
    result, _ = quantize.PASS.run(model, quantize.Config(mode="bf16", exclude=(first,)),
                                       Context())
    weight = model.graph.node[0].input[1]
    kinds = {t.name: t.data_type for t in result.graph.initializer}
    assert kinds[weight] == TensorProto.FLOAT
    assert any(k == TensorProto.BFLOAT16 for k in kinds.values())


def test_half_modes_refuse_a_quantized_model_and_do_nothing_without_float_weights():
    model = mlp()
    half, _ = quantize.PASS.run(model, quantize.Config(mode="fp16"), Context())
    again, record = quantize.PASS.run(half, quantize.Config(mode="bf16"), Context())
    assert not record.modified  # nothing float32 left to store narrower
    assert again.proto == half.proto


@pytest.mark.parametrize("mode", ["fp16", "bf16"])
def test_half_modes_pass_compress_checks_after_every_step(mode):
    from onnxcomp import api

    model = attention_block()
    result = api.compress(model, recipe=f"quantize:{mode}", calib=_data(model),
                          show_progress=False)
    assert result.passed and not result.below_floor
    assert result.report.fidelity["outputs"]
    assert result.model.weight_bytes() <= 0.52 * model.weight_bytes()
