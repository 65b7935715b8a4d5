"""lowrank's rank rules and its activation-aware (whitened) spectrum."""

from __future__ import annotations

import numpy as np
import pytest
from lowrank_graphs import anisotropic_batches, feeds_for, low_rank, make_model, matmul_model, vi
from onnx import helper, numpy_helper

from onnxcomp import calibration, runtime
from onnxcomp.passes import lowrank
from onnxcomp.pipeline import Context

EXACT = 1e-4


def rules_only(**kwargs) -> lowrank.Config:
    """The rank rules alone: these tests check them, not the per-layer error limit."""
    return lowrank.Config(**{"max_layer_error": None, **kwargs})


def plans(model, ctx=None, **kwargs):
    return lowrank.layer_plans(model, rules_only(**kwargs), ctx or Context())


def run_pass(model, ctx=None, **kwargs):
    return lowrank.PASS.run(model, rules_only(**kwargs), ctx or Context())


# --- rank rules ---------------------------------------------------------------------------------

@pytest.mark.parametrize("seed,k,n,r", [(0, 64, 64, 1), (1, 96, 40, 7), (2, 50, 120, 12),
                                        (3, 128, 128, 30)])
def test_random_rank_r_weight_factors_with_rank_r(seed, k, n, r):
    rng = np.random.default_rng(seed)
    w = low_rank(rng, k, n, r)
    [plan] = plans(matmul_model(w), energy=1.0)
    assert plan.factored and plan.rank == r
    a, b = plan.factors
    assert np.abs(a @ b - w).max() < 1e-4 * np.abs(w).max()


@pytest.mark.parametrize("energy", [0.5, 0.8, 0.9, 0.97])
def test_energy_threshold_is_respected_and_minimal(energy):
    rng = np.random.default_rng(5)
    # A decaying spectrum so that the chosen rank stays below break-even.
    w = (rng.standard_normal((96, 96)) * (0.8 ** np.arange(96))).astype(np.float32)
    [plan] = plans(matmul_model(w), energy=energy)
    s2 = np.linalg.svd(w.astype(np.float64), compute_uv=False) ** 2
    kept = np.cumsum(s2) / s2.sum()
    assert plan.factored
    assert kept[plan.rank - 1] >= energy and plan.kept_energy >= energy
    assert plan.rank == 1 or kept[plan.rank - 2] < energy  # rank - 1 would not do
    assert plan.rel_weight_error == pytest.approx(np.sqrt(1 - kept[plan.rank - 1]), rel=1e-3)


def test_default_rule_is_energy_0_9():
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((96, 96)) * (0.8 ** np.arange(96))).astype(np.float32)
    [default] = plans(matmul_model(w))
    [explicit] = plans(matmul_model(w), energy=lowrank.DEFAULT_ENERGY)
    assert default.rank == explicit.rank and default.factored


def test_rank_ratio_and_fixed_rank():
    w = np.random.default_rng(6).standard_normal((64, 32)).astype(np.float32)
    [by_ratio] = plans(matmul_model(w), rank_ratio=0.25)
    [fixed] = plans(matmul_model(w), rank=3)
    assert (by_ratio.rank, fixed.rank) == (8, 3)


def test_param_budget_prefers_fast_decaying_spectra():
    rng = np.random.default_rng(7)
    steep = (rng.standard_normal((64, 64)) * (0.7 ** np.arange(64))).astype(np.float32)
    flat = rng.standard_normal((64, 64)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "S"], ["h"], name="steep"),
             helper.make_node("MatMul", ["h", "F"], ["y"], name="flat")]
    model = make_model(nodes, [vi("x", [2, 64])], [vi("y", [2, 64])],
                       [numpy_helper.from_array(steep, "S"), numpy_helper.from_array(flat, "F")])
    by_node = {p.node: p for p in plans(model, param_budget=0.5)}
    kept_params = sum(p.params_after for p in by_node.values())
    assert kept_params <= 0.5 * 2 * 64 * 64
    assert by_node["steep"].factored and \
        by_node["steep"].kept_energy > by_node["flat"].kept_energy
    assert by_node["flat"].rank > by_node["steep"].rank  # the flat one needs the parameters
    # Better than spending the same budget uniformly (rank 16 each).
    uniform = {p.node: p for p in plans(model, rank=16)}
    assert sum(p.kept_energy for p in by_node.values()) > \
        sum(p.kept_energy for p in uniform.values()) + 0.05


# --- activation-aware ---------------------------------------------------------------------------

def output_error(reference, candidate, batches):
    num = den = 0.0
    ref_sess, cand_sess = runtime.session(reference, optimize=False), \
        runtime.session(candidate, optimize=False)
    for batch in batches:
        y = runtime.run(ref_sess, batch)["y"].astype(np.float64)
        z = runtime.run(cand_sess, batch)["y"].astype(np.float64)
        num, den = num + ((y - z) ** 2).sum(), den + (y ** 2).sum()
    return float(np.sqrt(num / den))


def test_activation_aware_beats_plain_svd_on_output_error():
    k = 64
    w = np.random.default_rng(8).standard_normal((k, k)).astype(np.float32)
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")],
                       [vi("x", [16, k])], [vi("y", [16, k])], [numpy_helper.from_array(w, "W")])
    calib = calibration.from_batches(anisotropic_batches(8, k, seed=1))
    held_out = anisotropic_batches(8, k, seed=2)
    aware, aware_rec = run_pass(model, Context(calibration=calib), rank=8)
    plain, plain_rec = run_pass(model, Context(calibration=calib), rank=8,
                                activation_aware=False)
    aware_layer, plain_layer = aware_rec.details["layers"][0], plain_rec.details["layers"][0]
    assert aware_layer["activation_aware"] and not plain_layer["activation_aware"]
    calib_batches = list(calib)
    # The reported error is the measured one on the calibration data.
    for out, layer in ((aware, aware_layer), (plain, plain_layer)):
        measured = output_error(model, out, calib_batches)
        assert layer["rel_output_error"] == pytest.approx(measured, rel=1e-3, abs=1e-5)
    # ... and whitening wins, on the calibration data and on held-out data from the same source.
    assert aware_layer["rel_output_error"] < 0.5 * plain_layer["rel_output_error"]
    assert output_error(model, aware, held_out) < 0.5 * output_error(model, plain, held_out)


def test_activation_aware_conv_reads_only_the_strided_positions():
    rng = np.random.default_rng(17)
    w = rng.standard_normal((48, 32, 1, 1)).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W"], ["y"], name="pw", kernel_shape=[1, 1],
                            strides=[2, 2], pads=[1, 1, 1, 1])
    model = make_model([node], [vi("x", [2, 32, 8, 8])], [vi("y", [2, 48, 5, 5])],
                       [numpy_helper.from_array(w, "W")])
    # Positions the conv reads (odd rows/columns: pad 1, stride 2) get another distribution than
    # the positions it skips, so a covariance over all positions would be the wrong one.
    batches = []
    for _ in range(4):
        x = rng.standard_normal((2, 32, 8, 8)) * (0.7 ** np.arange(32))[None, :, None, None]
        x[:, :, ::2, :] = rng.standard_normal((2, 32, 4, 8)) * 3
        batches.append({"x": x.astype(np.float32)})
    calib = calibration.from_batches(batches)
    out, record = run_pass(model, Context(calibration=calib), rank=6)
    layer = record.details["layers"][0]
    assert layer["rel_output_error"] == pytest.approx(output_error(model, out, batches), rel=1e-3)


def test_activation_aware_is_exact_at_full_rank():
    rng = np.random.default_rng(9)
    model = matmul_model(low_rank(rng, 64, 64, 5), lead=(16,))
    calib = calibration.from_batches(anisotropic_batches(4, 64, seed=3))
    out, record = run_pass(model, Context(calibration=calib), energy=1.0)
    assert record.details["layers"][0]["rank"] == 5 and record.details["activation_aware"]
    diffs = runtime.max_abs_difference(model, out, feeds_for(model))
    assert max(diffs.values()) < EXACT, diffs


def test_few_calibration_rows_are_noted_in_the_plan():
    rng = np.random.default_rng(9)
    model = matmul_model(low_rank(rng, 64, 64, 5), lead=(16,))
    calib = calibration.from_batches(anisotropic_batches(2, 64, seed=3)[:1])  # 16 rows < 64
    plan = lowrank.PASS.plan(model, lowrank.Config(energy=1.0), Context(calibration=calib))
    assert any("fewer calibration rows" in note for note in plan.notes)
