"""int4 with GPTQ error compensation: exact packing, RTN on isotropic inputs, lower output error on
correlated ones."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import numpy_helper
from quantize_graphs import correlated, correlated_batches, matmul_model

from onnxcomp import runtime
from onnxcomp.errors import UserError
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import gptq as quantize_gptq
from onnxcomp.passes.quantize import int4 as quantize_int4
from onnxcomp.pipeline import Context

run = quantize.PASS.run


@pytest.mark.parametrize("symmetric", [True, False])
def test_isotropic_inputs_give_round_to_nearest(symmetric):
    weight = np.random.default_rng(0).standard_normal((72, 24)).astype(np.float32)
    gptq = quantize_gptq.quantize(weight, np.eye(72), 32, symmetric)
    rtn = quantize_int4.quantize_blocks(weight, 32, symmetric, "mse")
    np.testing.assert_array_equal(gptq.q, rtn.q)
    np.testing.assert_allclose(gptq.scales, rtn.scales, rtol=1e-6)


@pytest.mark.parametrize("symmetric", [True, False])
def test_output_error_on_correlated_inputs_is_lower_than_rtn(symmetric):
    weight = np.random.default_rng(0).standard_normal((72, 24)).astype(np.float32)
    x = correlated(1, 400, 72, seed=1)[0].astype(np.float64)
    gptq = quantize_gptq.quantize(weight, x.T @ x, 32, symmetric)
    rtn = quantize_int4.quantize_blocks(weight, 32, symmetric, "mse")
    held_out = correlated(1, 400, 72, seed=2)[0].astype(np.float64)

    def error(blocks, inputs):
        return np.linalg.norm(inputs @ (blocks.dequantize() - weight))

    assert error(gptq, x) < 0.7 * error(rtn, x)
    assert error(gptq, held_out) < 0.7 * error(rtn, held_out)  # not fitted to the sample


def test_gptq_model_runs_exactly_and_beats_rtn_in_onnx_runtime():
    model = matmul_model(k=72, n=24)
    calib = correlated_batches(correlated(8, 10, 72, seed=3))
    held_out = correlated(4, 10, 72, seed=4)
    config = quantize.Config(mode="int4", int4_method="gptq")
    result, _ = run(model, config, Context(calibration=calib))
    rtn, _ = run(model, quantize.Config(mode="int4"), Context())
    weight = numpy_helper.to_array(model.graph.initializer[0])
    h = sum(b["x"].reshape(-1, 72).astype(np.float64).T @ b["x"].reshape(-1, 72) for b in calib)
    quantize_gptq.shrink_hessian(h, sum(b["x"].reshape(-1, 72).shape[0] for b in calib))
    want_blocks = quantize_gptq.quantize(weight, h, 32, True)
    sess_f = runtime.session(model, optimize=False)
    sess_g = runtime.session(result, optimize=False)
    sess_r = runtime.session(rtn, optimize=False)
    err_g = err_r = 0.0
    for xi in held_out:
        feed = {"x": xi.reshape(2, 5, 72)}
        ref = runtime.run(sess_f, feed)["y"]
        got = runtime.run(sess_g, feed)["y"]
        # The packed weights are exactly what quantize_gptq computed.
        np.testing.assert_allclose(got, feed["x"] @ want_blocks.dequantize(), rtol=1e-4,
                                   atol=1e-4)
        err_g += float(np.sum((got - ref) ** 2))
        err_r += float(np.sum((runtime.run(sess_r, feed)["y"] - ref) ** 2))
    assert err_g < 0.5 * err_r


def test_gptq_needs_calibration_data():
    config = quantize.Config(mode="int4", int4_method="gptq")
    needs = quantize.PASS.capabilities.needs_calibration
    assert needs(config) and not needs(quantize.Config(mode="int4"))
    # The Pipeline refuses it (a user error, exit 2) before any work.
    with pytest.raises(UserError, match=r"quantize \(int4 with GPTQ\) needs calibration data"):
        run(matmul_model(), config, Context())
    with pytest.raises(ValueError, match="int4_method"):
        quantize.Config(mode="int4", int4_method="awq")


def test_held_out_data_scores_gptq_and_calibration_scores_are_flagged():
    from onnxcomp.measure import compare as quantize_eval

    model = matmul_model(k=72, n=24)
    calib = correlated_batches(correlated(8, 10, 72, seed=3))
    held_out = correlated_batches(correlated(4, 10, 72, seed=4))
    config = quantize.Config(mode="int4", int4_method="gptq")
    result, record = run(model, config, Context(calibration=calib, evaluation=held_out))
    assert not any("optimistic" in note for note in record.notes)
    want = quantize_eval.compare(model, result, [], held_out, 16).cosine
    assert record.details["output_cosine"] == pytest.approx(want)
    _, fitted = run(model, config, Context(calibration=calib))
    assert any("optimistic" in note for note in fitted.notes)
    # GPTQ fits the calibration inputs: it scores better on them than on held-out ones.
    assert fitted.details["output_cosine"]["y"] > record.details["output_cosine"]["y"]
