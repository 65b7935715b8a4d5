"""Feature-map sites of static int8 (``conv_adds``, ``placement.py``): Adds, squeeze-excitation
Muls and Concats after Convs quantized so that ONNX Runtime runs QLinearAdd / QLinearMul /
QLinearConcat, and nearest Resizes between them on uint8."""

from __future__ import annotations

import builders
import numpy as np
import onnx
from quantize_graphs import attention_block, data_for, optimized_ops

from onnxcomp import calibration, runtime
from onnxcomp.model import Model
from onnxcomp.passes import quantize
from onnxcomp.pipeline import Context

run = quantize.PASS.run


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _squeeze_excite_net() -> Model:
    """x[1,3,12,12] -> Conv+Relu = r -> Add(r, r * Sigmoid(Conv1x1(GlobalAveragePool(r))))
    -> Conv -> y: a squeeze-excitation residual, one Add input written by a float Mul."""
    b = builders.GraphBuilder(seed=2)
    r = b.node("Relu", [b.conv("x", 3, 8, 3, "conv1")], "relu1")
    gate = b.node("Sigmoid", [b.conv(b.node("GlobalAveragePool", [r], "pool"), 8, 8, 1,
                                      "se")], "gate")
    mixed = b.node("Add", [r, b.node("Mul", [r, gate], "excite")], "res")
    b.node("Conv", [mixed, b.weight("head.w", (4, 8, 3, 3), 0.3)], "head", outputs=["y"],
           pads=[1] * 4)
    return b.model([builders.tensor("x", [1, 3, 12, 12])],
                   [builders.tensor("y", [1, 4, 12, 12])], 13, "se_net")


def test_a_squeeze_excitation_residual_runs_as_qlinearmul_and_qlinearadd(tmp_path):
    model = _squeeze_excite_net()
    data = data_for(model, 8)
    result, record = run(model, quantize.Config(), Context(calibration=data))
    assert {"res", "excite"} <= set(record.touched)
    assert "  Add res (activation inputs)" in record.details["plan"]
    assert "  Mul excite (activation inputs)" in record.details["plan"]
    kernels = optimized_ops(result, tmp_path)
    assert kernels.count("QLinearAdd") == 1 and "Add" not in kernels
    assert kernels.count("QLinearMul") == 1 and "Mul" not in kernels
    batch = next(iter(data))
    reference = runtime.run_model(model, batch)["y"]
    assert _cosine(reference, runtime.run_model(result, batch)["y"]) > 0.995
    # Off: the Mul and the Add stay float ops between DequantizeLinear and QuantizeLinear.
    off, off_record = run(model, quantize.Config(conv_adds=False), Context(calibration=data))
    assert not {"res", "excite"} & set(off_record.touched)
    off_kernels = optimized_ops(off, tmp_path)
    assert not {"QLinearAdd", "QLinearMul"} & set(off_kernels)
    assert {"Add", "Mul"} <= set(off_kernels)


def _pyramid_net() -> Model:
    """x[1,3,16,16] -> Conv+Relu = a -> Conv stride 2 + Relu = b -> Resize x2 (nearest) ->
    Concat(a, up) -> Conv -> y: a feature-pyramid merge."""
    b = builders.GraphBuilder(seed=5)
    fine = b.node("Relu", [b.conv("x", 3, 6, 3, "conv1")], "relu1")
    coarse = b.node("Relu", [b.node("Conv", [fine, b.weight("down.w", (6, 6, 3, 3), 0.3)],
                                    "down", strides=[2, 2], pads=[1] * 4)], "relu2")
    scales = b.const("scales", np.array([1, 1, 2, 2], np.float32))
    up = b.node("Resize", [coarse, "", scales], "up", mode="nearest")
    merged = b.node("Concat", [fine, up], "merge", axis=1)
    b.node("Conv", [merged, b.weight("head.w", (4, 12, 3, 3), 0.3)], "head", outputs=["y"],
           pads=[1] * 4)
    return b.model([builders.tensor("x", [1, 3, 16, 16])],
                   [builders.tensor("y", [1, 4, 16, 16])], 13, "pyramid")


def test_a_pyramid_concat_runs_as_qlinearconcat_and_its_resize_on_uint8(tmp_path):
    model = _pyramid_net()
    data = data_for(model, 8)
    result, record = run(model, quantize.Config(), Context(calibration=data))
    assert "merge" in record.touched
    # The nearest Resize's output takes its input's range: the same scale and zero point on
    # both sides, so ONNX Runtime drops the pair and resizes the uint8 tensor.
    nodes = {n.op_type: n for n in result.proto.graph.node}
    producers = {o: n for n in result.proto.graph.node for o in n.output}
    consumers = {i: n for n in result.proto.graph.node for i in n.input}
    resize = nodes["Resize"]
    before = producers[resize.input[0]]
    after = consumers[resize.output[0]]
    assert (before.op_type, after.op_type) == ("DequantizeLinear", "QuantizeLinear")
    assert before.input[1:] == after.input[1:] or all(
        np.array_equal(_initializer(result, a), _initializer(result, b))
        for a, b in zip(before.input[1:], after.input[1:]))
    kernels = optimized_ops(result, tmp_path)
    assert kernels.count("QLinearConcat") == 1 and "Concat" not in kernels
    optimized = onnx.load(str(tmp_path / "optimized.onnx")).graph  # what optimized_ops wrote
    made_by = {o: n.op_type for n in optimized.node for o in n.output}
    (resized,) = [n for n in optimized.node if n.op_type == "Resize"]
    assert made_by[resized.input[0]] != "DequantizeLinear"  # uint8 in, uint8 out
    batch = next(iter(data))
    reference = runtime.run_model(model, batch)["y"]
    assert _cosine(reference, runtime.run_model(result, batch)["y"]) > 0.995


def _initializer(model: Model, name: str) -> np.ndarray:
    from onnx import numpy_helper

    return next(numpy_helper.to_array(t) for t in model.proto.graph.initializer
                if t.name == name)


def test_an_excluded_add_stays_float_with_the_reason():
    model = builders.conv_net()
    _, record = run(model, quantize.Config(exclude=("res",)),
                    Context(calibration=data_for(model)))
    assert "res" not in record.touched
    assert dict(record.skipped)["res"] == "excluded by 'res'"


def test_a_transformers_residual_adds_stay_float():
    # Its residual Adds read MatMul / LayerNormalization outputs, never a Conv's.
    model = attention_block()
    planned = quantize.plan(model, quantize.Config(), Context())
    assert not [s for s in planned.payload.sites.sites if s.op == "Add"]


def test_an_add_fed_by_a_resize_of_a_conv_output_is_quantized_too():
    # Feature-pyramid form: Add(Resize(conv), conv). Both inputs and the output get QDQ pairs.
    model = builders.strided_skip_net(levels=3)
    x = np.random.default_rng(0).standard_normal((1, 3, 32, 32)).astype(np.float32)
    data = calibration.from_batches([{"x": x * s} for s in (0.5, 1.0, 1.5)])
    result, record = run(model, quantize.Config(), Context(calibration=data))
    assert "skip" in record.touched
    reference = runtime.run_model(model, {"x": x})["y"]
    assert _cosine(reference, runtime.run_model(result, {"x": x})["y"]) > 0.99
