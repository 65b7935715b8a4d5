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


# --- saturation ranges ---------------------------------------------------------------------------

def _hardswish_net(bias: float = -6.0) -> Model:
    """x -> Conv (a negative bias: a long tail below -3) -> HardSwish -> Conv -> y, opset 14."""
    b = builders.GraphBuilder(seed=5)
    conv = b.node("Conv", ["x", b.weight("c1.w", (8, 3, 3, 3), 1.0),
                           b.const("c1.b", np.full(8, bias, np.float32))], "c1",
                  kernel_shape=[3, 3], pads=[1] * 4)
    act = b.node("HardSwish", [conv], "hs")
    b.node("Conv", [act, b.weight("c2.w", (4, 8, 1, 1), 0.3)], "c2", outputs=["y"])
    return b.model([builders.tensor("x", [1, 3, 10, 10])],
                   [builders.tensor("y", [1, 4, 10, 10])], 14, "hardswish_net")


def _output_range(result: Model, tensor: str) -> tuple[float, float]:
    scale = float(_initializer(result, f"{tensor}_scale"))
    zero_point = int(_initializer(result, f"{tensor}_zero_point"))
    return -zero_point * scale, (255 - zero_point) * scale


def test_a_tensor_only_hardswish_reads_is_calibrated_from_minus_three_and_is_more_faithful():
    model = _hardswish_net()
    data = data_for(model, 8)
    on, record = run(model, quantize.Config(), Context(calibration=data))
    off, _ = run(model, quantize.Config(saturation_ranges=False), Context(calibration=data))
    assert any("1 tensors that only saturating ops read" in n for n in record.notes)
    low_on, _ = _output_range(on, "c1")
    low_off, _ = _output_range(off, "c1")
    assert low_off < -6.0  # the tail the plain MSE range spends levels on
    assert -3.05 <= low_on <= -2.95  # the bound stays (within one step), nothing below it
    errors = {}
    for label, result in (("on", on), ("off", off)):
        errors[label] = np.mean([np.mean((runtime.run_model(model, batch)["y"]
                                          - runtime.run_model(result, batch)["y"]) ** 2)
                                 for batch in data])
    assert errors["on"] < 0.7 * errors["off"], errors


def test_saturation_bounds_need_every_reader_to_saturate():
    from onnxcomp.passes.quantize import placement

    b = builders.GraphBuilder(seed=1)
    b.node("HardSwish", ["a"], "hs1", outputs=["a1"])
    b.node("HardSwish", ["a"], "hs2", outputs=["a2"])
    b.node("HardSwish", ["m"], "hs3", outputs=["m1"])
    b.node("Add", ["m", "m1"], "mix", outputs=["m2"])
    b.node("HardSigmoid", ["g"], "gate", outputs=["g1"], alpha=0.25, beta=0.5)
    b.node("Clip", ["c", b.const("lo", np.float32(-1)), b.const("hi", np.float32(2))], "clip",
           outputs=["c1"])
    b.node("Relu", ["r"], "relu", outputs=["r1"])
    b.node("Clip", ["c", b.const("lo2", np.float32(0))], "clip2", outputs=["c2"])
    b.node("Clip", ["d", "m2"], "clip3", outputs=["d1"])  # a bound computed at run time
    b.node("Relu", ["o"], "relu_o", outputs=["o1"])
    names = ["a", "m", "g", "c", "r", "d", "o"]
    inputs = [builders.tensor(n, [2, 3]) for n in names]
    outputs = [builders.tensor(n, [2, 3]) for n in ("a1", "a2", "m2", "g1", "c1", "c2", "r1",
                                                     "d1", "o1", "o")]
    graph = b.model(inputs, outputs, 14).proto.graph
    found = placement.saturation_bounds(graph, names)
    assert set(found) == {"a", "g", "c", "r"}  # m: an Add reads it; d: its Clip's bound is
    assert (found["a"].low, found["a"].high) == (-3.0, np.inf)  # not constant; o: an output
    assert (found["g"].low, found["g"].high) == (-2.0, 2.0)
    assert (found["c"].low, found["c"].high) == (-1.0, np.inf)  # [-1, 2] and [0, inf)
    assert found["c"].function is None  # two Clips with other bounds: no one function
    assert (found["r"].low, found["r"].high) == (0.0, np.inf)
    x = np.linspace(-5, 5, 11)
    np.testing.assert_allclose(found["a"].function(x), x * np.clip(x + 3, 0, 6) / 6)
    np.testing.assert_allclose(found["g"].function(x), np.clip(0.25 * x + 0.5, 0, 1))


def test_saturation_ranges_is_a_boolean():
    import pytest

    with pytest.raises(ValueError, match="saturation_ranges must be true or false"):
        quantize.Config(saturation_ranges="yes")
