"""lowrank as a pass: structure, numerics in ONNX Runtime, negatives, idempotence, the dry-run
plan, the LayerChange hand-over, configuration and recipes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from lowrank_graphs import feeds_for, low_rank, make_model, matmul_model, mini_transformer, ops, vi
from onnx import helper, numpy_helper

from onnxcomp import calibration, runtime
from onnxcomp.errors import OnnxcompError, UserError
from onnxcomp.passes import lowrank
from onnxcomp.passes.lowrank import spectrum
from onnxcomp.pipeline import SKIP, Context
from onnxcomp.recipe import apply_overrides, parse_recipe

# Exact rewrites in float32 through two GEMMs instead of one: ~1e-6 relative, 1e-4 absolute on
# outputs of magnitude ~10.
EXACT = 1e-4


def run_pass(model, ctx=None, **kwargs):
    return lowrank.PASS.run(model, lowrank.Config(**{"max_layer_error": None, **kwargs}),
                           ctx or Context())


def assert_close(reference, candidate, tol=EXACT, seed=1):
    diffs = runtime.max_abs_difference(reference, candidate, feeds_for(reference, seed))
    assert max(diffs.values()) < tol, diffs


# --- structure and numerics at full (numerical) rank -------------------------------------------

def test_matmul_exact_at_full_rank():
    rng = np.random.default_rng(0)
    model = matmul_model(low_rank(rng, 64, 48, 6))
    out, record = run_pass(model, energy=1.0)
    assert record.modified and record.touched == ["mm"]
    assert ops(out) == ["MatMul", "MatMul"]
    assert {t.name for t in out.graph.initializer} == {"W_lowrank_A", "W_lowrank_B"}
    shapes = {t.name: list(t.dims) for t in out.graph.initializer}
    assert shapes == {"W_lowrank_A": [64, 6], "W_lowrank_B": [6, 48]}
    assert record.params_after < record.params_before
    assert record.params_after == 6 * (64 + 48)
    assert ops(model) == ["MatMul"]  # the input model is untouched
    assert_close(model, out)
    onnx.checker.check_model(out.proto)


def test_gemm_transb_bias_alpha_beta_exact():
    rng = np.random.default_rng(1)
    w = low_rank(rng, 48, 64, 5)  # stored N x K for transB=1
    bias = rng.standard_normal(48).astype(np.float32)
    node = helper.make_node("Gemm", ["x", "W", "C"], ["y"], name="fc", transB=1, alpha=0.5,
                            beta=2.0)
    model = make_model([node], [vi("x", [4, 64])], [vi("y", [4, 48])],
                       [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "C")])
    out, record = run_pass(model, energy=1.0)
    assert record.modified and ops(out) == ["MatMul", "Gemm"]
    layer = record.details["layers"][0]
    assert (layer["K"], layer["N"], layer["rank"]) == (64, 48, 5)
    assert layer["bias"] == "C"
    assert_close(model, out)


def test_conv_1x1_with_stride_and_pads_exact():
    rng = np.random.default_rng(2)
    w = low_rank(rng, 40, 32, 5).reshape(40, 32, 1, 1)
    bias = rng.standard_normal(40).astype(np.float32)
    node = helper.make_node("Conv", ["x", "W", "b"], ["y"], name="pw", kernel_shape=[1, 1],
                            strides=[2, 2], pads=[1, 1, 0, 0])
    model = make_model([node], [vi("x", [1, 32, 9, 9])], [vi("y", [1, 40, 5, 5])],
                       [numpy_helper.from_array(w, "W"), numpy_helper.from_array(bias, "b")])
    out, record = run_pass(model, energy=1.0)
    assert record.modified and ops(out) == ["Conv", "Conv"]
    first, second = out.graph.node
    assert list(second.input)[2] == "b"  # the bias goes on the second conv
    assert [list(a.ints) for a in first.attribute if a.name == "strides"] == [[2, 2]]
    assert_close(model, out)


def test_constant_node_weight_and_report_details():
    rng = np.random.default_rng(3)
    model = matmul_model(low_rank(rng, 64, 64, 4), as_constant_node=True)
    out, record = run_pass(model, energy=1.0)
    assert record.modified and "Constant" not in ops(out)
    layer = record.details["layers"][0]
    names = {t.name for t in out.graph.initializer}
    assert layer["factor_a"] in names and layer["factor_b"] in names
    assert layer["output"] == "y" and layer["input"] == "x"
    produced = {o: n for n in out.graph.node for o in n.output}
    assert produced["y"].name == layer["nodes"][1] and produced[layer["hidden"]].name == \
        layer["nodes"][0]
    assert_close(model, out)


def test_shared_weight_is_factored_once():
    rng = np.random.default_rng(4)
    w = low_rank(rng, 64, 64, 4)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="a"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W"], ["y"], name="b")]
    model = make_model(nodes, [vi("x", [3, 64])], [vi("y", [3, 64])],
                       [numpy_helper.from_array(w, "W")])
    out, record = run_pass(model, energy=1.0)
    assert sorted(record.touched) == ["a", "b"]
    assert len(out.graph.initializer) == 2  # one shared pair of factors
    assert ops(out).count("MatMul") == 4
    assert_close(model, out)


# --- the hand-over and the dry run ---------------------------------------------------------------

def test_layer_changes_name_the_second_factor_and_the_teacher_output():
    rng = np.random.default_rng(4)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="first"),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "W2", "C"], ["y"], name="second", transB=1)]
    model = make_model(nodes, [vi("x", [3, 64])], [vi("y", [3, 48])],
                       [numpy_helper.from_array(low_rank(rng, 64, 64, 4), "W1"),
                        numpy_helper.from_array(low_rank(rng, 48, 64, 3), "W2"),
                        numpy_helper.from_array(np.ones(48, np.float32), "C")])
    ctx = Context()
    out, record = lowrank.PASS.run(model, lowrank.Config(energy=1.0), ctx)
    assert [(c.node, c.pass_name, c.teacher_output, c.repair, c.nodes) for c in record.changes] \
        == [("first_lowrank_b", "lowrank", "h", "refit", ("first_lowrank_a", "first_lowrank_b")),
            ("second_lowrank_b", "lowrank", "y", "refit",
             ("second_lowrank_a", "second_lowrank_b"))]
    assert all(c.teacher_channels is None for c in record.changes)
    assert ctx.changes() == record.changes  # what distill reads
    produced = {n.name: list(n.output) for n in out.graph.node}
    teacher = {o for n in model.graph.node for o in n.output}
    for change in record.changes:
        assert change.node in produced and change.nodes[0] in produced
        assert produced[change.node] == [change.teacher_output]
        assert change.teacher_output in teacher


def test_dry_run_rows_and_no_mutation():
    model = mini_transformer()
    before = model.proto.SerializeToString()
    plan = lowrank.PASS.plan(model, lowrank.Config(energy=0.95, max_layer_error=None),
                             Context())
    assert model.proto.SerializeToString() == before
    rows = {row.node: row for row in plan.rows}
    assert rows["scores"].action == SKIP and "activation x activation" in rows["scores"].reason
    factored = [p for p in plan.payload if p.factored]
    assert factored and all(p.params_after < p.params_before for p in factored)
    for p in factored:
        saving = 1 - p.params_after / p.params_before
        assert rows[p.node].action == \
            f"factor rank {p.rank} of {min(p.K, p.N)} (-{saving:.0%} params)"
    assert len(plan.rows) == len(plan.payload)
    assert "q_proj" in plan.table() and "factor rank" in plan.table()
    # apply builds the model the plan describes; the input stays as it was
    applied = lowrank.PASS.apply(model, plan, Context())
    assert sorted(applied.touched) == sorted(p.node for p in factored)
    assert model.proto.SerializeToString() == before


def test_activation_aware_without_data_is_refused_before_any_work():
    w = np.random.default_rng(10).standard_normal((64, 64)).astype(np.float32)
    with pytest.raises(UserError, match="calibration"):
        run_pass(matmul_model(w), activation_aware=True)


def test_fixed_rank_too_large_is_one_user_error_line():
    w = np.random.default_rng(6).standard_normal((64, 32)).astype(np.float32)
    with pytest.raises(UserError, match="rank 33") as caught:
        run_pass(matmul_model(w), rank=33)
    assert str(caught.value).count("lowrank:") == 1


# --- negatives and idempotence ------------------------------------------------------------------

def test_nothing_to_factor():
    rng = np.random.default_rng(11)
    conv = rng.standard_normal((16, 8, 3, 3)).astype(np.float32)
    small = rng.standard_normal((4, 4)).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "K"], ["c"], name="conv3", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Gemm", ["m", "T"], ["g"], name="ta", transA=1),
             helper.make_node("MatMul", ["g", "S"], ["y"], name="small"),
             helper.make_node("MatMul", ["x2", "L"], ["y2"], name="wide")]
    model = make_model(nodes, [vi("x", [1, 8, 6, 6]), vi("x2", [3, 1])],
                       [vi("y", [16, 4]), vi("y2", [3, 2048])],
                       [numpy_helper.from_array(conv, "K"), numpy_helper.from_array(small, "S"),
                        numpy_helper.from_array(rng.standard_normal((1, 4)).astype(np.float32),
                                                "T"),
                        numpy_helper.from_array(rng.standard_normal((1, 2048)).astype(np.float32),
                                                "L")],
                       opset=13)
    out, record = run_pass(model, energy=0.5)
    assert not record.modified and out is model and not record.changes
    reasons = dict(record.skipped)
    assert "not 1x1" in reasons["conv3"] and "transA" in reasons["ta"]
    assert "below min_params" in reasons["small"]
    assert "rank 1 saves less" in reasons["wide"]  # 1 x 2048: a factor pair costs 2049
    assert record.params_after == record.params_before
    assert any(note.startswith("nothing to factor") for note in record.notes)


def test_flat_spectrum_above_break_even_is_skipped_with_reason():
    w = np.random.default_rng(12).standard_normal((64, 64)).astype(np.float32)
    _out, record = run_pass(matmul_model(w), energy=0.9)
    assert not record.modified
    assert "needs rank" in record.skipped[0][1] and "break-even" in record.skipped[0][1]
    assert "energy 0.9 needs rank" in record.skipped[0][1]  # the default rule, named


def test_idempotent_at_full_rank():
    rng = np.random.default_rng(14)
    model = matmul_model(low_rank(rng, 64, 48, 6))
    once, first = run_pass(model, energy=1.0, min_params=0)
    twice, second = run_pass(once, energy=1.0, min_params=0)
    assert first.modified and not second.modified and twice is once
    # The two factors are recognised as the rank-6 pair they are (6 * (64 + 48) < 64 * 48).
    assert sorted(second.skipped) == [
        ("mm_lowrank_a", "already a rank-6 factor pair with mm_lowrank_b: not factored again"),
        ("mm_lowrank_b", "already a rank-6 factor pair with mm_lowrank_a: not factored again")]


def test_a_factor_is_not_factored_again_at_a_lower_rank():
    # The energy rule on a factor's flatter spectrum (sqrt of W's) can pick fewer components
    # than the factor's full rank, which the margin test alone would accept.
    rng = np.random.default_rng(3)
    w = (rng.standard_normal((96, 96)) * (0.8 ** np.arange(96))).astype(np.float32)
    model = matmul_model(w)
    once, first = run_pass(model, energy=0.999, min_params=0)
    assert first.modified
    twice, second = run_pass(once, energy=0.5, min_params=0)
    assert not second.modified and twice is once
    assert all("factor pair" in reason for _, reason in second.skipped)


# --- configuration ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,field", [
    ({"energy": 0}, "energy"), ({"energy": 1.5}, "energy"), ({"rank_ratio": 0.0}, "rank_ratio"),
    ({"rank_ratio": 2}, "rank_ratio"), ({"rank": 0}, "rank"), ({"rank": 2.5}, "rank"),
    ({"param_budget": 0}, "param_budget"), ({"min_saving": 1.0}, "min_saving"),
    ({"min_saving": -0.1}, "min_saving"), ({"energy": 0.9, "rank": 4}, "one of"),
    ({"op_types": ("Relu",)}, "op_types"), ({"energy": True}, "energy")])
def test_bad_config_values(kwargs, field):
    with pytest.raises(ValueError, match=field):
        lowrank.Config(**kwargs)


def test_from_short_and_recipe():
    default = lowrank.Config.from_short(None)
    assert (default.mode, default.value) == ("energy", lowrank.DEFAULT_ENERGY)
    assert lowrank.Config.from_short("0.95").energy == 0.95
    assert lowrank.Config.from_short("rank=16").rank == 16
    assert lowrank.Config.from_short("budget=0.5").param_budget == 0.5
    for bad in ("abc", "1.5", "rank=x", "speed=2"):
        with pytest.raises(ValueError):
            lowrank.Config.from_short(bad)
    [step] = parse_recipe("lowrank:0.8")
    assert step.config.energy == 0.8
    with pytest.raises(OnnxcompError, match="lowrank") as caught:
        parse_recipe("lowrank:1.5")
    assert "lowrank: lowrank" not in str(caught.value)


def test_set_overrides_exclude_and_the_rank_rule():
    [step] = apply_overrides(parse_recipe("lowrank"), ["lowrank.exclude=q_*, fc?",
                                                       "lowrank.rank=32"])
    assert step.config.exclude == ("q_*", "fc?")
    assert (step.config.mode, step.config.value) == ("rank", 32)
    with pytest.raises(UserError, match="one of"):
        apply_overrides(parse_recipe("lowrank:0.9"), ["lowrank.rank=32"])


def test_excluded_and_op_types():
    model = matmul_model(low_rank(np.random.default_rng(15), 64, 64, 3))
    _, excluded = run_pass(model, energy=1.0, exclude=("m*",))
    _, only_conv = run_pass(model, energy=1.0, op_types=("Conv",))
    assert not excluded.modified and "excluded" in excluded.skipped[0][1]
    assert not only_conv.modified


# --- a transformer-like graph and the zoo -------------------------------------------------------

def test_transformer_like_graph_end_to_end():
    model = mini_transformer()
    calib = calibration.random_data(model, 16, seed=3)
    out, record = run_pass(model, Context(calibration=calib), energy=0.999)
    touched = set(record.touched)
    assert {"q_proj", "fc1", "fc2"} <= touched
    assert "scores" not in touched and "context" not in touched
    assert record.params_after < record.params_before
    assert record.bytes_after < record.bytes_before
    # 99.9 % of the whitened energy kept per layer (<= 3.2 % error each, on the calibration
    # data): six layers on held-out data stay within 10 %.
    y, z = (runtime.run_model(m, feeds_for(model, seed=7))["y"] for m in (model, out))
    rel = np.linalg.norm(y - z) / np.linalg.norm(y)
    assert rel < 0.1, rel
    assert max(layer["rel_output_error"] for layer in record.details["layers"]) <= 0.0317


@pytest.mark.zoo
def test_tiny_clip_zoo():
    pytest.importorskip("onnxcomp.zoo.tiny_clip")
    from onnxcomp import zoo
    from onnxcomp.model import load

    model = load(zoo.fetch("tiny-clip"))
    calib = zoo.dataset("tiny-clip", "calib", 4)
    out, record = run_pass(model, Context(calibration=calib), energy=1.0, min_saving=0.0)
    data = zoo.dataset("tiny-clip", "eval", 1).make_batch(0)
    diffs = runtime.max_abs_difference(model, out, data)
    assert max(diffs.values()) < 1e-3, diffs
    assert len(record.changes) == len(record.touched)
    out9, record9 = run_pass(model, Context(calibration=calib), energy=0.9)
    runtime.run_model(out9, data)  # valid either way
    assert record9.params_after <= record9.params_before


# --- issue #17: per-layer error limit, wide inputs, shared weights ---------------------------


def test_max_layer_error_raises_the_rank_or_leaves_the_layer_dense():
    """A layer whose own error at the rule's rank is over the limit gets the smallest rank
    that meets it; where that rank saves nothing the layer stays dense, with the reason."""
    rng = np.random.default_rng(5)
    w = rng.standard_normal((64, 64)).astype(np.float32)  # flat spectrum: no cheap rank
    model = matmul_model(w)
    free = lowrank.PASS.plan(model, lowrank.Config(rank=8, max_layer_error=None), Context())
    assert free.payload[0].factored and free.payload[0].rel_weight_error > 0.5
    limited = lowrank.PASS.plan(model, lowrank.Config(rank=8, max_layer_error=0.2), Context())
    (layer,) = limited.payload
    assert not layer.factored and "over max_layer_error 0.2" in layer.reason
    assert any("left dense" in note for note in limited.notes)
    # A low-rank-ish weight: rank 1 is over the limit, a higher rank below break-even meets it.
    u = rng.standard_normal((64, 6)) @ rng.standard_normal((6, 64))
    soft = (u + 0.05 * rng.standard_normal((64, 64))).astype(np.float32)
    plan = lowrank.PASS.plan(matmul_model(soft), lowrank.Config(rank=1, max_layer_error=0.2),
                             Context())
    (layer,) = plan.payload
    assert layer.factored and layer.raised_from == 1 and 1 < layer.rank <= layer.max_rank
    assert layer.rel_weight_error <= 0.2
    assert "raised from 1" in plan.rows[0].action


def test_wide_inputs_are_factored_without_a_covariance(monkeypatch):
    """Inputs wider than MAX_COVARIANCE_DIM get no K x K covariance (a CRNN's 16k-wide Gemm
    needed GBs): factored by the weight, and the plan says so."""
    monkeypatch.setattr(spectrum, "MAX_COVARIANCE_DIM", 32)
    monkeypatch.setattr(lowrank, "MAX_COVARIANCE_DIM", 32)
    model = matmul_model(low_rank(np.random.default_rng(3), 64, 48, 4))
    data = calibration.random_data(model, 2)
    plan = lowrank.PASS.plan(model, lowrank.Config(energy=0.99), Context(calibration=data))
    (layer,) = plan.payload
    assert layer.factored and not layer.activation_aware
    assert any("wider than 32 inputs" in note for note in plan.notes)
