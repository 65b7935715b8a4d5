"""lowrank inside If / Loop bodies: activation-aware (whitened) by the values each body received
on the calibration data, weights alone (with the reason) where a body never ran, one factor pair
for a weight both branches read, numerics in ONNX Runtime, and a second run doing nothing."""

from __future__ import annotations

import body_graphs as bg
import numpy as np
import onnx
import prune_body_graphs as pbg
from onnx import numpy_helper

from onnxcomp import calibration, runtime, subgraphs
from onnxcomp.model import Model
from onnxcomp.passes import lowrank
from onnxcomp.pipeline import Context

K = N = 32
RANK = 4


def _config(**overrides) -> lowrank.Config:
    return lowrank.Config(**{"rank": RANK, "min_params": 1, "max_layer_error": None,
                             **overrides})


def _x(rng: np.random.Generator, basis: np.ndarray, rows: int = 64) -> np.ndarray:
    """Inputs with few strong directions (``basis``) and a little noise everywhere."""
    strong = rng.standard_normal((rows, basis.shape[0])).astype(np.float32) @ basis
    return strong + 0.01 * rng.standard_normal((rows, K)).astype(np.float32)


def _data(conds: list[bool], seed: int = 0) -> calibration.Dataset:
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).standard_normal((RANK, K)).astype(np.float32)
    return calibration.from_batches([{"x": _x(rng, basis), "cond": np.array(c)} for c in conds])


def _plans(model: Model, ctx: Context, **overrides) -> dict[str, lowrank.LayerPlan]:
    return {p.node: p for p in lowrank.layer_plans(model, _config(**overrides), ctx)}


def _weights(model: Model) -> dict[str, np.ndarray]:
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for body in subgraphs.all_bodies(model.graph):
        found.update({t.name: numpy_helper.to_array(t) for t in body.graph.initializer})
    return found


def test_taken_branch_is_whitened_the_other_says_why_not():
    model = pbg.if_matmuls(K, N)
    ctx = Context(calibration=_data([True] * 4))
    plans = _plans(model, ctx)
    assert plans["then_mm"].activation_aware and plans["then_mm"].calibration_rows == 4 * 64
    assert plans["then_mm"].weights_only is None
    assert not plans["else_mm"].activation_aware
    assert "never ran on the calibration data" in plans["else_mm"].weights_only
    notes = lowrank.plan(model, _config(), ctx).notes
    assert any("whitened by the values their body received" in n and "then_mm" in n
               for n in notes)
    assert any("weights alone" in n and "never ran" in n and "else_mm" in n for n in notes)


def test_without_data_body_layers_are_weights_only_as_before():
    plans = _plans(pbg.if_matmuls(K, N), Context())
    assert not any(p.activation_aware for p in plans.values())
    assert {p.weights_only for p in plans.values()} == {"no calibration data"}


def test_whitening_lowers_the_body_layer_error_on_held_out_body_data():
    """At the same rank, factors whitened by the branch's recorded inputs reproduce the branch
    output on new inputs of the same distribution better than plain SVD factors."""
    model = pbg.if_matmuls(K, N)
    aware, _ = lowrank.PASS.run(model, _config(), Context(calibration=_data([True] * 4)))
    plain, _ = lowrank.PASS.run(model, _config(activation_aware=False),
                                Context(calibration=_data([True] * 4)))
    held_out = _data([True] * 2, seed=7)
    errors = {}
    for name, candidate in (("aware", aware), ("plain", plain)):
        total = 0.0
        for batch in held_out:
            want = runtime.run(runtime.session(model, optimize=False), batch)["y"]
            got = runtime.run(runtime.session(candidate, optimize=False), batch)["y"]
            total += float(np.linalg.norm(got - want) / np.linalg.norm(want))
        errors[name] = total
    assert errors["aware"] < 0.5 * errors["plain"]


def test_factored_branches_compute_x_at_a_at_b_in_onnx_runtime():
    model = pbg.if_matmuls(K, N)
    result, record = lowrank.PASS.run(model, _config(), Context(calibration=_data([True, False])))
    assert record.modified and sorted(record.touched) == ["else_mm", "then_mm"]
    onnx.checker.check_model(result.proto, full_check=True)
    weights = _weights(result)
    x = _data([True], seed=3).make_batch(0)["x"]
    for cond, prefix, scale in ((True, "then", 1.0), (False, "else", 3.0)):
        a, b = weights[f"{prefix}.w_lowrank_A"], weights[f"{prefix}.w_lowrank_B"]
        assert a.shape == (K, RANK) and b.shape == (RANK, N)
        got = runtime.run(runtime.session(result, optimize=False),
                          {"x": x, "cond": np.array(cond)})["y"]
        np.testing.assert_allclose(got, np.tanh((x * scale) @ a @ b), atol=1e-5)


def test_weight_read_by_both_branches_is_factored_once_from_both_bodies_rows():
    model = pbg.if_matmuls(K, N, shared=True)
    ctx = Context(calibration=_data([True, True, False]))
    plans = _plans(model, ctx)
    for node in ("then_mm", "else_mm"):
        assert plans[node].activation_aware and plans[node].calibration_rows == 3 * 64
    result, record = lowrank.PASS.run(model, _config(), ctx)
    layers = record.details["layers"]
    assert len(layers) == 2 and layers[0]["factor_a"] == layers[1]["factor_a"]
    assert sum(name.startswith("shared.w_lowrank_A") for name in _weights(result)) == 1


def test_loop_body_is_whitened_over_its_iterations():
    model = bg.loop_matmul(carried_weight=False, trips=3)
    rng = np.random.default_rng(0)
    data = calibration.from_batches(
        [{"x": rng.standard_normal((8, bg.DIM)).astype(np.float32)} for _ in range(2)])
    (plan,) = lowrank.layer_plans(model, _config(rank=2), Context(calibration=data))
    assert plan.node == "body_mm" and plan.activation_aware
    assert plan.calibration_rows == 2 * 3 * 8  # batches x iterations x rows


def test_a_second_run_has_nothing_to_do():
    ctx = Context(calibration=_data([True, False]))
    once, first = lowrank.PASS.run(pbg.if_matmuls(K, N), _config(), ctx)
    twice, second = lowrank.PASS.run(once, _config(), ctx)
    assert first.modified and not second.modified and twice is once
