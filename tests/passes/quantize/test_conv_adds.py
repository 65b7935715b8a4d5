"""Feature-map Adds after Convs quantized so ONNX Runtime runs QLinearAdd (``conv_adds``)."""

from __future__ import annotations

import builders
import numpy as np
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


def test_a_residual_add_after_convs_becomes_qlinearadd(tmp_path):
    model = _squeeze_excite_net()
    data = data_for(model, 8)
    result, record = run(model, quantize.Config(), Context(calibration=data))
    assert "res" in record.touched
    assert "  Add res (activation inputs)" in record.details["plan"]
    kernels = optimized_ops(result, tmp_path)
    assert kernels.count("QLinearAdd") == 1 and "Add" not in kernels
    batch = next(iter(data))
    reference = runtime.run_model(model, batch)["y"]
    assert _cosine(reference, runtime.run_model(result, batch)["y"]) > 0.995
    # Off: the Mul's output has no QDQ, so the Add stays a float Add.
    off, off_record = run(model, quantize.Config(conv_adds=False), Context(calibration=data))
    assert "res" not in off_record.touched
    off_kernels = optimized_ops(off, tmp_path)
    assert "QLinearAdd" not in off_kernels and "Add" in off_kernels


def test_an_excluded_add_stays_float_with_the_reason():
    model = builders.conv_net()
    result, record = run(model, quantize.Config(exclude=("res",)),
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
