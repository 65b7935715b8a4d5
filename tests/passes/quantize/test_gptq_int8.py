"""int8 GPTQ (``int8_method = "gptq"``): on the rewrite's grid, never worse than round-to-nearest
on the calibration data, better on correlated inputs, in ONNX Runtime too."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper
from quantize_graphs import correlated, correlated_batches, matmul_model

from onnxcomp import runtime
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import gptq_int8 as quantize_gptq
from onnxcomp.passes.quantize import int8 as quantize_int8
from onnxcomp.pipeline import Context


def _rtn(weight):
    q, scale = quantize_int8.symmetric_int8(weight, 1)
    return quantize_int8.dequantize(q, scale, 1)


def _column_errors(weight, candidate, x):
    return np.sum((x @ (candidate.astype(np.float64) - weight)) ** 2, axis=0)


@pytest.mark.parametrize("seed", range(4))
def test_never_worse_than_round_to_nearest_per_column_and_on_the_grid(seed):
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((72, 24)).astype(np.float32)
    x = correlated(1, 300, 72, seed=seed + 10)[0].astype(np.float64)
    compensated, keep = quantize_gptq.quantize_int8(weight, x.T @ x, x.shape[0])
    gptq_err, rtn_err = _column_errors(weight, compensated, x), _column_errors(weight, _rtn(
        weight), x)
    assert np.all(gptq_err <= rtn_err * (1 + 1e-9))
    assert gptq_err.sum() < 0.8 * rtn_err.sum() and keep.sum() > 0
    # the rewrite's round-to-nearest maps the result onto itself: the same levels
    np.testing.assert_allclose(_rtn(compensated), compensated, rtol=1e-6, atol=0)


def test_isotropic_inputs_give_round_to_nearest():
    weight = np.random.default_rng(0).standard_normal((72, 24)).astype(np.float32)
    compensated, _ = quantize_gptq.quantize_int8(weight, np.eye(72) * 100, 100)
    np.testing.assert_array_equal(compensated, _rtn(weight))


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic"])
def test_pass_layer_error_never_exceeds_rtn_in_onnx_runtime(mode):
    model = matmul_model(k=72, n=24)
    calib = correlated_batches(correlated(8, 10, 72, seed=3))
    held_out = correlated_batches(correlated(4, 10, 72, seed=4))
    # u8s8_remedy = u8u8: the stored levels stay GPTQ's / RTN's (widened scales re-round them:
    # test_widen.py)
    gptq, record = quantize.PASS.run(model, quantize.Config(
        mode=mode, int8_method="gptq", u8s8_remedy="u8u8"), Context(calibration=calib))
    rtn, _ = quantize.PASS.run(model, quantize.Config(mode=mode, u8s8_remedy="u8u8"),
                               Context(calibration=calib))
    assert any(n.startswith("int8 GPTQ: 2 layers") for n in record.notes)
    sessions = {k: runtime.session(m, optimize=False)
                for k, m in {"f": model, "g": gptq, "r": rtn}.items()}
    for data in (calib, held_out):
        err = {"g": 0.0, "r": 0.0}
        for batch in data:
            ref = runtime.run(sessions["f"], batch)
            for key in err:
                out = runtime.run(sessions[key], batch)
                err[key] += sum(float(np.sum((out[y] - ref[y]) ** 2)) for y in ("y", "y2"))
        assert err["g"] < err["r"], (err, record.notes)
    # the stored int8 levels are what quantize_int8 computed
    weight = numpy_helper.to_array(model.graph.initializer[0])
    x = np.concatenate([b["x"].reshape(-1, 72) for b in calib]).astype(np.float64)
    want, _ = quantize_gptq.quantize_int8(weight, x.T @ x, x.shape[0])
    stored = {i.name: numpy_helper.to_array(i) for i in gptq.graph.initializer}
    # int8, or uint8 + 128 where u8s8_overflow moved the layer (the same levels)
    levels = [v.astype(np.int16) - (128 if v.dtype == np.uint8 else 0)
              for v in stored.values() if v.dtype in (np.int8, np.uint8) and v.shape == (72, 24)]
    q_want, _ = quantize_int8.symmetric_int8(want, 1)
    assert any(np.array_equal(q, q_want) for q in levels)


def test_config_checks_and_calibration_need():
    with pytest.raises(ValueError, match="int8_method must be rtn or gptq"):
        quantize.Config(int8_method="adaround")
    with pytest.raises(ValueError, match="needs per_channel"):
        quantize.Config(int8_method="gptq", per_channel=False)
    assert quantize.PASS.capabilities.needs_calibration(
        quantize.Config(mode="int8-dynamic", int8_method="gptq")) == "int8-dynamic with GPTQ"
    assert not quantize.Config(mode="int4", int8_method="gptq").int8_gptq


def _seen(x: np.ndarray, low: float, high: float) -> np.ndarray:
    """What a static uint8 QDQ pair over [low, high] passes on."""
    from onnxcomp.passes.quantize.calib import quant_params

    scale, zero_point = quant_params(low, high)
    return (np.clip(np.rint(x / scale) + zero_point, 0, 255) - zero_point) * scale


@pytest.mark.parametrize("seed", range(3))
def test_fitted_to_a_quantized_input_never_worse_than_round_to_nearest(seed):
    """Static int8 reads its input rounded and clipped (X~): with enough rows GPTQ fits
    ``|X W - X~ W_q|^2``, per column no worse than round-to-nearest of W, on the grid."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((24, 16)).astype(np.float32)
    x = correlated(1, 400, 24, seed=seed + 20)[0].astype(np.float64)
    seen = _seen(x, x.min(), 0.7 * x.max())  # rounded, and clipped at the top
    assert x.shape[0] >= quantize_gptq.SEEN_ROWS_PER_INPUT * 24
    compensated, keep = quantize_gptq.quantize_int8(weight, x.T @ x, x.shape[0],
                                                    quantized=(seen.T @ seen, seen.T @ x))

    def errors(candidate):
        return np.sum((x @ weight.astype(np.float64) - seen @ candidate.astype(np.float64)) ** 2,
                      axis=0)

    assert np.all(errors(compensated) <= errors(_rtn(weight)) * (1 + 1e-9))
    assert errors(compensated).sum() < 0.9 * errors(_rtn(weight)).sum() and keep.sum() > 0
    np.testing.assert_allclose(_rtn(compensated), compensated, rtol=1e-6, atol=0)
    # Fitted to the float input instead, the same layer does worse on what it reads.
    plain, _ = quantize_gptq.quantize_int8(weight, x.T @ x, x.shape[0])
    assert errors(compensated).sum() <= errors(plain).sum()
    # Too few rows per input: the float-input fit, whatever ``quantized`` says.
    few = x[:40]
    fewer, _ = quantize_gptq.quantize_int8(weight, few.T @ few, 40, quantized=(
        seen[:40].T @ seen[:40], seen[:40].T @ few))
    np.testing.assert_array_equal(fewer, quantize_gptq.quantize_int8(weight, few.T @ few, 40)[0])


def _pointwise_net():
    import builders

    b = builders.GraphBuilder(seed=11)
    b.node("Conv", ["x", b.weight("p1.w", (8, 16, 1, 1), 0.25), b.weight("p1.b", (8,), 0.1)],
           "p1", outputs=["y"])
    b.node("Conv", ["x", b.weight("dw.w", (16, 1, 3, 3), 0.3)], "spatial", outputs=["z"],
           kernel_shape=[3, 3], pads=[1] * 4, group=16)
    return b.model([builders.tensor("x", [2, 16, 6, 6])],
                   [builders.tensor("y", [2, 8, 6, 6]), builders.tensor("z", [2, 16, 6, 6])],
                   13, "pointwise_net")


def test_static_int8_gptq_compensates_pointwise_convs():
    """A 1x1 Conv is a MatMul over its input's pixels: the pass stores GPTQ's levels for it,
    fitted to its input as the static quantizer passes it on, and its output error on the
    calibration data is below round-to-nearest's in ONNX Runtime; a depthwise Conv is left to
    round-to-nearest, saying why."""
    from onnxcomp import calibration
    from onnxcomp.passes.quantize import calib as quantize_calib

    model = _pointwise_net()
    x = correlated(8, 72, 16, seed=5)
    x[:, :3] *= 6.0  # a few outlying pixels: the calibrated range clips them
    calib = calibration.from_batches([{"x": np.ascontiguousarray(
        xi.reshape(2, 6, 6, 16).transpose(0, 3, 1, 2))} for xi in x])
    gptq, record = quantize.PASS.run(model, quantize.Config(
        int8_method="gptq", u8s8_remedy="u8u8"), Context(calibration=calib))  # levels kept
    rtn, _ = quantize.PASS.run(model, quantize.Config(u8s8_remedy="u8u8"),
                               Context(calibration=calib))
    assert any(n.startswith("int8 GPTQ: 1 layers (1 pointwise Convs)") for n in record.notes)
    skipped = record.details["int8_gptq_skipped"]
    assert [s["node"] for s in skipped] == ["spatial"] and "1x1" in skipped[0]["why"]
    weight = numpy_helper.to_array(next(i for i in model.graph.initializer
                                        if i.name == "p1.w"))[:, :, 0, 0].T  # [C_in, C_out]
    pixels = np.concatenate([b["x"].transpose(0, 2, 3, 1).reshape(-1, 16)
                             for b in calib]).astype(np.float64)
    stats = quantize_calib.TensorStats()
    for batch in calib:
        stats.update(batch["x"])
    seen = _seen(pixels, *quantize_calib.tensor_range(stats, "mse"))
    want, keep = quantize_gptq.quantize_int8(weight, pixels.T @ pixels, pixels.shape[0],
                                             quantized=(seen.T @ seen, seen.T @ pixels))
    assert keep.sum() > 0
    # int8, or uint8 + 128 where u8s8_overflow moved the layer (the same levels)
    arrays = [numpy_helper.to_array(i) for i in gptq.graph.initializer]
    stored = [v.astype(np.int16) - (128 if v.dtype == np.uint8 else 0) for v in arrays
              if v.dtype in (np.int8, np.uint8) and v.shape == (8, 16, 1, 1)]
    q_want, _ = quantize_int8.symmetric_int8(np.ascontiguousarray(want.T), 0)
    assert len(stored) == 1 and np.array_equal(stored[0][:, :, 0, 0], q_want)
    err = {"g": 0.0, "r": 0.0}
    for batch in calib:
        ref = runtime.run_model(model, batch)["y"]
        err["g"] += float(np.sum((runtime.run_model(gptq, batch)["y"] - ref) ** 2))
        err["r"] += float(np.sum((runtime.run_model(rtn, batch)["y"] - ref) ** 2))
    assert err["g"] < err["r"], err
