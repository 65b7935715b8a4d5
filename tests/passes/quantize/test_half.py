"""quantize fp16 / bf16 (onnxcomp/passes/quantize/half.py): storage, numerics in ONNX Runtime,
the keep-float list, mixed precision to min_cosine, and cleanup not undoing the storage."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import GraphBuilder, attention_block, mlp, tensor
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import calibration, runtime
from onnxcomp.model import Model
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import half as half_mode
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
    # dim 64: bf16 leaves float32 only weights whose Cast costs more than it saves (below).
    model = attention_block(dim=64, ffn=128)
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

    model = attention_block(dim=64, ffn=128)  # weights large enough to halve (bf16, below)
    result = api.compress(model, recipe=f"quantize:{mode}", calib=_data(model),
                          show_progress=False)
    assert result.passed and not result.below_floor
    assert result.report.fidelity["outputs"]
    assert result.model.weight_bytes() <= 0.52 * model.weight_bytes()


def test_fp16_leaves_no_inference_residue_and_runs_erf_in_float16():
    """The converter's value_info is not kept (runtimes infer types; 12 KB of tiny-clip's
    file); Erf is not kept float32: its output is rounded to float16 right after, so the
    float32 Erf only added two Casts per GELU (tiny-clip image/text cosine .999997 either way)."""
    b = GraphBuilder(0)
    h = b.linear("x", 16, 32, "fc1")
    erf = b.node("Erf", [b.node("Mul", [h, b.const("r", np.array(0.7071, np.float32))],
                                "scaled")], "erf")
    b.node("Mul", [h, erf], "gate", outputs=["y"])
    model = b.model([tensor("x", [2, 16])], [tensor("y", [2, 32])], 17, "erf_net")
    data = _data(model)
    result, record = quantize.PASS.run(model, quantize.Config(mode="fp16"),
                                       Context(calibration=data))
    assert not result.graph.value_info
    assert "erf" not in dict(record.skipped)
    casts = [n for n in result.graph.node if n.op_type == "Cast"]
    assert len(casts) == 2  # the float32 input and output only
    for batch in data:
        want, got = runtime.run_model(model, batch)["y"], runtime.run_model(result, batch)["y"]
        assert _cosine(want, got) > 0.9999


def test_bf16_keeps_float32_where_the_cast_would_cost_more_than_it_saves():
    """A bf16 weight is read through a Cast node: for a weight of a few values the node is
    larger than the two bytes a value it saves, so it stays float32 and the file is smaller
    than with every weight converted."""
    model = attention_block()  # dim 16: 16-value normalization weights and biases
    result, converted = half_mode.to_bf16(model)
    kept = {t.name for t in result.graph.initializer if t.data_type == TensorProto.FLOAT}
    sizes = {t.name: int(np.prod(t.dims)) for t in model.graph.initializer}
    assert kept and all(sizes[name] <= 16 for name in kept)
    assert all(sizes[name] >= 32 for name in converted)
    # Converting the kept ones too would give a larger file.
    everything = result.copy()
    for weight in list(everything.graph.initializer):
        if weight.name in kept and sizes[weight.name] >= half_mode.MIN_ELEMENTS:
            stored = half_mode.bf16_tensor(f"{weight.name}_bf16", numpy_helper.to_array(weight))
            everything.graph.initializer.remove(weight)
            everything.graph.initializer.append(stored)
            everything.graph.node.insert(0, helper.make_node(
                "Cast", [stored.name], [weight.name], to=TensorProto.FLOAT, name=weight.name))
    assert result.proto.ByteSize() < everything.proto.ByteSize()
    # Both run; keeping the small ones float32 is no less exact.
    x = {"x": np.random.default_rng(0).standard_normal((1, 6, 16)).astype(np.float32)}
    want = runtime.run_model(model, x)["y"]
    error = np.abs(runtime.run_model(result, x)["y"] - want).max()
    assert error <= np.abs(runtime.run_model(everything, x)["y"] - want).max()
