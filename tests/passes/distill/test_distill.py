from __future__ import annotations

import numpy as np
import pytest
from conftest import make_mlp
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp import calibration, runtime
from onnxcomp.errors import UserError
from onnxcomp.model import Model
from onnxcomp.passes import distill
from onnxcomp.passes.distill import refit
from onnxcomp.pipeline import SKIP, Context, LayerChange, PassRecord, Pipeline
from onnxcomp.recipe import parse_recipe, with_cleanup

K, R, N = 24, 6, 16


def _model(nodes, inits, out_dim=N) -> Model:
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                        ["b", K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             ["b", out_dim])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def _factors(seed=0):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((K, R)).astype(np.float32)
    b = rng.standard_normal((R, N)).astype(np.float32)
    return a, b


def _changed(*changes: LayerChange, name: str = "lowrank") -> PassRecord:
    """What an earlier pass leaves in the context: its typed list of changed layers."""
    return PassRecord(name, modified=True, changes=list(changes))


def _teacher_and_student(noise: float, bias: bool = True):
    """A lowrank-style student: fc = fc_a · fc_b, with the second factor perturbed."""
    a, b = _factors()
    bias_value = np.linspace(-1, 1, N).astype(np.float32)
    teacher_nodes = [helper.make_node("MatMul", ["x", "w"], ["mm"], name="fc")]
    student_nodes = [helper.make_node("MatMul", ["x", "A"], ["h"], name="fc_a"),
                     helper.make_node("MatMul", ["h", "B"], ["mm"], name="fc_b")]
    tail = [helper.make_node("Add", ["mm", "bias"], ["y"], name="fc_bias")] if bias else \
        [helper.make_node("Identity", ["mm"], ["y"], name="out")]
    noisy = b + noise * np.random.default_rng(5).standard_normal(b.shape).astype(np.float32)
    teacher = _model(teacher_nodes + tail, {"w": a @ b, **({"bias": bias_value} if bias else {})})
    student = _model(student_nodes + tail, {"A": a, "B": noisy,
                                            **({"bias": bias_value} if bias else {})})
    record = _changed(LayerChange("fc_b", "lowrank", "mm", nodes=("fc_a", "fc_b")))
    return teacher, student, record, b


def _ctx(teacher, student, *records, batches=8, rows=16):
    data = calibration.random_data(student, batches, dims={"b": rows})
    return Context(calibration=data, teacher=teacher, records=list(records))


def _run(student, config, ctx):
    return distill.PASS.run(student, config, ctx)


def _weights(model: Model) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# --- structural + numerical -------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
def test_refit_recovers_the_exact_factor(bias):
    teacher, student, record, b_true = _teacher_and_student(noise=0.3, bias=bias)
    out, rec = _run(student, distill.Config(ridge=1e-9), _ctx(teacher, student, record))
    assert rec.modified and rec.touched == ["fc_b"]
    # Only initializer values change: same nodes, same wiring.
    assert [(n.op_type, list(n.input)) for n in out.graph.node] == \
        [(n.op_type, list(n.input)) for n in student.graph.node]
    np.testing.assert_allclose(_weights(out)["B"], b_true, atol=1e-3)
    layer = rec.details["layers"][0]
    assert layer["rel_error_before"] > 0.05 and layer["rel_error_after"] < 1e-4
    assert layer["source"] == "lowrank"
    # Numerically in ONNX Runtime, on fresh inputs: the repaired student equals the teacher.
    x = {"x": np.random.default_rng(9).standard_normal((5, K)).astype(np.float32)}
    assert max(runtime.max_abs_difference(teacher, out, x).values()) < 1e-3
    # The input model is untouched.
    assert not np.allclose(_weights(student)["B"], b_true, atol=1e-3)


def test_bias_correction_removes_a_constant_output_shift():
    # A quantize-style site: the weight stays, the mean output error moves into the bias.
    a, b = _factors()
    w, bias = a @ b, np.linspace(-1, 1, N).astype(np.float32)
    shift = np.linspace(0.5, 1.5, N).astype(np.float32)
    teacher = _model([helper.make_node("MatMul", ["x", "w"], ["mm0"], name="fc"),
                      helper.make_node("Add", ["mm0", "shift"], ["mm"], name="shifted"),
                      helper.make_node("Add", ["mm", "bias"], ["y"], name="fc_bias")],
                     {"w": w, "shift": shift, "bias": bias})
    student = _model([helper.make_node("MatMul", ["x", "w"], ["mm"], name="fc"),
                      helper.make_node("Add", ["mm", "bias"], ["y"], name="fc_bias")],
                     {"w": w, "bias": bias})
    record = _changed(LayerChange("fc", "quantize", "mm", repair="bias"), name="quantize")
    out, rec = _run(student, distill.Config(), _ctx(teacher, student, record))
    assert rec.details["layers"][0]["fit"] == "bias correction"
    fitted = _weights(out)
    np.testing.assert_allclose(fitted["bias"], bias + shift, atol=1e-5)
    np.testing.assert_array_equal(fitted["w"], w)
    x = {"x": np.random.default_rng(3).standard_normal((4, K)).astype(np.float32)}
    assert max(runtime.max_abs_difference(teacher, out, x).values()) < 1e-4


def test_pruned_output_channels_match_the_kept_teacher_channels():
    # A prune-style site whose own outputs were cut: the teacher's kept channels are the target.
    rng = np.random.default_rng(2)
    w = rng.standard_normal((K, N)).astype(np.float32)
    v = rng.standard_normal((N, 4)).astype(np.float32)
    kept = (0, 3, 4, 9, 15)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
             helper.make_node("MatMul", ["h", "v"], ["y"], name="fc2")]
    teacher = _model(nodes, {"w": w, "v": v}, out_dim=4)
    noisy = w[:, kept] + 0.2 * rng.standard_normal((K, len(kept))).astype(np.float32)
    student = _model(nodes, {"w": noisy, "v": v[list(kept)]}, out_dim=4)
    record = _changed(LayerChange("fc", "prune", "h", teacher_channels=kept), name="prune")
    out, rec = _run(student, distill.Config(ridge=1e-9), _ctx(teacher, student, record))
    assert rec.modified and rec.touched == ["fc"]
    np.testing.assert_allclose(_weights(out)["w"], w[:, kept], atol=1e-3)


def test_output_cosine_measures_the_repair():
    teacher, student, record, _ = _teacher_and_student(noise=0.3)
    _, rec = _run(student, distill.Config(ridge=1e-9), _ctx(teacher, student, record))
    assert rec.details["output_cosine"]["before"] < 0.999
    assert rec.details["output_cosine"]["after"] > 0.99999


def test_too_little_data_is_regularized_with_a_warning():
    teacher, student, record, _ = _teacher_and_student(noise=0.3)
    ctx = _ctx(teacher, student, record, batches=1, rows=3)  # 3 samples for 6 inputs
    _, rec = _run(student, distill.Config(), ctx)
    assert "under-determined" in " ".join(rec.notes)
    for layer in rec.details["layers"]:
        assert np.isfinite(layer["rel_error_after"])
        assert layer["rel_error_after"] <= layer["rel_error_before"]


def test_fits_that_hurt_the_outputs_are_undone(monkeypatch):
    teacher, student, record, _ = _teacher_and_student(noise=0.3)
    scores = iter([0.99, 0.98])  # before, after: the outputs got worse
    monkeypatch.setattr(refit, "_output_cosine", lambda *args: next(scores))
    out, rec = _run(student, distill.Config(), _ctx(teacher, student, record))
    assert out is student and not rec.modified and not rec.touched
    assert "undone" in rec.notes[-1]
    assert rec.details["output_cosine"] == {"before": 0.99, "after": 0.98}
    assert rec.params_after == rec.params_before


def test_a_teacher_shape_mismatch_is_skipped_in_apply():
    teacher, student, _, _ = _teacher_and_student(noise=0.3)
    record = _changed(LayerChange("fc_a", "lowrank", "mm"))  # [b, N] for fc_a's [b, R]
    out, rec = _run(student, distill.Config(), _ctx(teacher, student, record))
    assert out is student and not rec.modified
    assert rec.skipped and rec.skipped[0][0] == "fc_a" and "shape" in rec.skipped[0][1]


# --- negative -----------------------------------------------------------------------------------


def test_nothing_to_repair_is_a_note_not_an_error():
    teacher, student, _, _ = _teacher_and_student(noise=0.3)
    unchanged = PassRecord("prune", modified=False,
                           changes=[LayerChange("fc_b", "prune", "mm")])  # not modified: ignored
    ctx = Context(calibration=calibration.random_data(student, 2), teacher=teacher,
                  records=[unchanged])
    out, rec = _run(student, distill.Config(), ctx)
    assert out is student and not rec.modified and "nothing to repair" in rec.notes[0]


def test_needs_calibration_and_teacher():
    teacher, student, record, _ = _teacher_and_student(noise=0.3)
    with pytest.raises(UserError, match="calibration"):
        _run(student, distill.Config(), Context(teacher=teacher, records=[record]))
    with pytest.raises(UserError, match="teacher"):
        _run(student, distill.Config(),
             Context(calibration=calibration.random_data(student, 2), records=[record]))
    with pytest.raises(ValueError, match="ridge"):
        distill.Config(ridge=-1)
    with pytest.raises(ValueError, match="max_batches"):
        distill.Config(max_batches=0)
    assert distill.Config.from_short("0.01").ridge == 0.01
    with pytest.raises(ValueError, match="ridge value"):
        distill.Config.from_short("lots")


def test_empty_calibration_data_is_a_user_error():
    teacher, student, record, _ = _teacher_and_student(noise=0.3)
    ctx = Context(calibration=calibration.from_batches([]), teacher=teacher, records=[record])
    with pytest.raises(UserError, match="no batches"):
        _run(student, distill.Config(), ctx)


# --- idempotence --------------------------------------------------------------------------------


def test_a_second_run_gives_the_same_weights():
    teacher, student, record, _ = _teacher_and_student(noise=0.3)
    ctx = _ctx(teacher, student, record)
    once, first = _run(student, distill.Config(ridge=1e-9), ctx)
    twice, second = _run(once, distill.Config(ridge=1e-9), ctx)  # the same changes in ctx
    assert first.modified
    for name, value in _weights(once).items():
        np.testing.assert_allclose(_weights(twice)[name], value, atol=1e-4)
    assert second.details["layers"][0]["rel_error_before"] < 1e-4


# --- the hand-over and the dry run ------------------------------------------------------------


def test_sites_one_per_node_a_bias_change_never_replaces_a_refit():
    refit = LayerChange("fc", "prune", "t1")
    bias = LayerChange("fc", "quantize", "t2", repair="bias")
    later = LayerChange("fc", "lowrank", "t3")
    assert distill.sites([refit, bias]) == [refit]
    assert distill.sites([bias, refit]) == [refit]
    assert distill.sites([refit, bias, later]) == [later]
    other = LayerChange("fc2", "quantize", "t4", repair="bias")
    assert distill.sites([bias, other]) == [bias, other]


def test_dry_run_lists_repairs_and_skips_in_graph_order_without_mutating():
    teacher, student, _, _ = _teacher_and_student(noise=0.3)
    record = _changed(LayerChange("fc_b", "lowrank", "mm"),
                      LayerChange("gone", "lowrank", "mm"),
                      LayerChange("fc_a", "lowrank", "not_in_teacher"),
                      LayerChange("fc_bias", "lowrank", "y"))
    ctx = _ctx(teacher, student, record)
    before = student.proto.SerializeToString()
    plan = distill.PASS.plan(student, distill.Config(), ctx)
    assert student.proto.SerializeToString() == before
    rows = [(r.node, r.action, r.reason) for r in plan.rows]
    assert rows == [
        ("fc_a", SKIP, "teacher has no tensor 'not_in_teacher'"),
        ("fc_b", "refit weights+bias to teacher tensor mm", "changed by lowrank"),
        ("fc_bias", SKIP, "op Add is not re-fitted"),
        ("gone", SKIP, "node no longer in the graph"),
    ]
    assert [s.node for s, _ in plan.payload] == ["fc_b"]
    assert "1 to change, 3 skipped" in plan.table()
    # The Pipeline copies the plan's skips into the record.
    _, rec = _run(student, distill.Config(), ctx)
    assert rec.touched == ["fc_b"] and len(rec.skipped) == 3


def test_dry_run_names_bias_corrections_and_what_is_off():
    a, b = _factors()
    student = _model([helper.make_node("MatMul", ["x", "w"], ["mm"], name="fc"),
                      helper.make_node("Add", ["mm", "bias"], ["y"], name="fc_bias")],
                     {"w": a @ b, "bias": np.zeros(N, np.float32)})
    record = _changed(LayerChange("fc", "quantize", "mm", repair="bias"), name="quantize")
    ctx = _ctx(student, student, record)
    (row,) = distill.PASS.plan(student, distill.Config(), ctx).rows
    assert row.action == "bias correction to teacher tensor mm"
    (row,) = distill.PASS.plan(student, distill.Config(bias_correction=False), ctx).rows
    assert row.skipped and "bias_correction = false" in row.reason


# --- end to end, with the real passes -----------------------------------------------------------


@pytest.mark.parametrize("recipe", ["prune:0.3,distill", "quantize:int8,distill"])
def test_end_to_end_through_the_recipe(recipe):
    model = make_mlp()
    data = calibration.random_data(model, 8, dims={"batch": 32})
    ctx = Context(calibration=data, teacher=model)
    out, records = Pipeline(with_cleanup(parse_recipe(recipe))).run(model, ctx)
    compressed, repair = records[1], records[2]
    assert compressed.modified and compressed.changes, f"{compressed.name} recorded no changes"
    assert repair.name == "distill" and repair.details.get("layers")
    assert all(change.pass_name == compressed.name for change in compressed.changes)
    assert ctx.changes() == compressed.changes  # distill itself hands nothing over
    if repair.modified:
        cos = repair.details["output_cosine"]
        assert cos["after"] >= cos["before"]
    x = {"x": np.random.default_rng(4).standard_normal((3, 8)).astype(np.float32)}
    runtime.max_abs_difference(model, out, x)  # the result runs in ONNX Runtime


@pytest.mark.zoo
def test_tiny_clip_prune_then_distill_recovers_fidelity():
    from onnxcomp import zoo

    model = onnxcomp.load(zoo.fetch("tiny-clip"))
    data = calibration.resolve("tiny-clip:calib:8", model)
    ctx = Context(calibration=data, teacher=model)
    _, records = Pipeline(with_cleanup(parse_recipe("prune:0.3,distill"))).run(model, ctx)
    repair = records[2]
    assert repair.modified and len(repair.touched) >= 4
    cos = repair.details["output_cosine"]
    # Measured before the move to LayerChange: 0.2625 -> 0.7393 (8 calibration batches).
    assert cos["before"] < 0.5 and cos["after"] > cos["before"] + 0.3


# --- method = "kd" (training; the loop itself is tested in tests/train) ----------------------


def test_short_forms_keep_the_ridge_and_accept_the_methods():
    assert distill.Config.from_short("kd").method == "kd"
    assert distill.Config.from_short("refit") == distill.Config()
    assert distill.Config.from_short("0.5") == distill.Config(ridge=0.5)
    with pytest.raises(ValueError, match="kd, refit or a ridge"):
        distill.Config.from_short("train")
    with pytest.raises(ValueError, match="loss must be"):
        distill.Config(method="kd", loss="l1")
    with pytest.raises(ValueError, match="device must be"):
        distill.Config(device="tpu")


def test_kd_without_torch_is_one_line_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "torch" else real(name, *a))
    teacher, student, record, _ = _teacher_and_student(noise=0.3)
    ctx = _ctx(teacher, student, record)
    with pytest.raises(UserError) as error:
        _run(student, distill.Config(method="kd"), ctx)
    message = str(error.value)
    assert "\n" not in message and "onnxcomp[train]" in message and "torch" in message
    # refit needs no torch
    _run(student, distill.Config(), _ctx(teacher, student, record))
