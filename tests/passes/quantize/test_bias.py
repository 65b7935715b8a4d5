"""Bias correction: the mean output error against float drops (in ONNX Runtime), the layer error
on the calibration data never grows, refusals are said."""

from __future__ import annotations

import numpy as np
import pytest
from builders import GraphBuilder, tensor

from onnxcomp import calibration, runtime
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import bias
from onnxcomp.pipeline import Context

K, N = 64, 32


def _linear(kind: str):
    b = GraphBuilder(seed=5)
    if kind == "matmul":
        y = b.linear("x", K, N, "fc")
        return b.model([tensor("x", [4, 6, K])], [tensor(y, [4, 6, N])])
    if kind == "gemm":
        y = b.gemm("x", K, N, "fc", trans_b=True, beta=0.5)
        return b.model([tensor("x", [6, K])], [tensor(y, [6, N])])
    y = b.conv("x", 16, N, 1 if kind == "conv1x1" else 3, "fc", bias=kind != "conv_nobias")
    return b.model([tensor("x", [2, 16, 9, 9])], [tensor(y, [2, N, 9, 9])])


def _shifted(model, count: int, seed: int):
    """Inputs whose channels have means far from 0 (as after a Relu), so W_q - W shows."""
    rng = np.random.default_rng(seed)
    shape = [d for d in model.proto.graph.input[0].type.tensor_type.shape.dim]
    dims = [d.dim_value for d in shape]
    axis = 1 if len(dims) == 4 else -1
    means = np.linspace(0.5, 4.0, dims[axis], dtype=np.float32)
    means = means.reshape([-1] + [1] * (len(dims) - 2)) if axis == 1 else means
    return calibration.from_batches([
        {"x": (rng.standard_normal(dims).astype(np.float32) * 0.5 + means).astype(np.float32)}
        for _ in range(count)])


def _errors(model, candidate, data):
    """Mean |E[y_q - y]| over output channels and the mean squared error, on ``data``."""
    diffs = []
    for batch in data:
        ref = next(iter(runtime.run_model(model, batch).values())).astype(np.float64)
        out = next(iter(runtime.run_model(candidate, batch).values())).astype(np.float64)
        diffs.append(np.moveaxis(out - ref, 1, -1) if ref.ndim == 4 else out - ref)
    d = np.concatenate([x.reshape(-1, x.shape[-1]) for x in diffs])
    return float(np.abs(d.mean(axis=0)).mean()), float(np.mean(d * d))


CASES = [("matmul", "int8", "weights"), ("matmul", "int8", "all"),
         ("matmul", "int8-dynamic", "weights"), ("matmul", "int4", "weights"),
         ("gemm", "int8-dynamic", "weights"), ("gemm", "int4", "weights"),
         ("gemm", "int8", "weights"), ("conv1x1", "int8", "weights"), ("conv1x1", "int8", "all"),
         ("conv3x3", "int8", "weights"), ("conv_nobias", "int8", "weights"),
         ("conv_nobias", "int8", "all")]


@pytest.mark.parametrize("kind,mode,how", CASES)
def test_correction_lowers_the_mean_error_and_never_raises_the_layer_error(kind, mode, how):
    model = _linear(kind)
    calib = _shifted(model, 8, seed=1)
    held_out = _shifted(model, 4, seed=2)
    extra = {"block_size": 16} if mode == "int4" else {}
    # per tensor: a coarser grid, so the weight error's mean is large enough to see
    plain, _ = quantize.PASS.run(model, quantize.Config(mode=mode, per_channel=False, **extra),
                                 Context(calibration=calib))
    fixed, record = quantize.PASS.run(
        model, quantize.Config(mode=mode, per_channel=False, bias_correction=how, **extra),
        Context(calibration=calib))
    assert any(n.startswith("bias correction: 1 layers corrected") for n in record.notes)
    for data in (calib, held_out):
        mean_plain, mse_plain = _errors(model, plain, data)
        mean_fixed, mse_fixed = _errors(model, fixed, data)
        assert mean_fixed < 0.5 * mean_plain, (mean_plain, mean_fixed)
        assert mse_fixed <= mse_plain * 1.0001, (mse_plain, mse_fixed)


def test_weight_error_mean_matches_numpy():
    rng = np.random.default_rng(0)
    error = rng.standard_normal((6, 2, 3, 3))  # group 2 of 4 input channels
    mean = rng.standard_normal(4)
    e = bias.conv_error_mean(error, mean, group=2)
    expected = [sum(error[m, c].sum() * mean[(m // 3) * 2 + c] for c in range(2))
                for m in range(6)]
    assert np.allclose(e, expected)


def test_no_bias_matmul_and_gptq_are_left_alone_with_the_reason():
    b = GraphBuilder(seed=5)
    y = b.linear("x", K, N, "fc", bias=False)
    model = b.model([tensor("x", [4, 6, K])], [tensor(y, [4, 6, N])])
    calib = _shifted(model, 2, seed=1)
    out, record = quantize.PASS.run(model, quantize.Config(mode="int8-dynamic",
                                                           bias_correction="weights"),
                                    Context(calibration=calib))
    assert record.details["bias_correction_skipped"][0]["why"].startswith("no bias Add")
    assert "Add" not in {n.op_type for n in out.graph.node}
    model = _linear("matmul")
    _, record = quantize.PASS.run(model, quantize.Config(mode="int4", int4_method="gptq",
                                                         bias_correction="weights"),
                                  Context(calibration=_shifted(model, 2, seed=1)))
    assert record.details["bias_correction_skipped"] == [
        {"node": "fc", "why": "GPTQ compensates the weight error itself"}]


def test_bias_correction_needs_calibration_data():
    config = quantize.Config(mode="int8-dynamic", bias_correction="weights")
    assert quantize.PASS.capabilities.needs_calibration(config) == \
        "int8-dynamic with bias_correction"
    assert not quantize.PASS.capabilities.needs_calibration(quantize.Config(mode="int8-dynamic"))
    with pytest.raises(ValueError, match="bias_correction must be one of none, weights, all"):
        quantize.Config(bias_correction=True)
