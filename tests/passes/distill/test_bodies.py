"""distill's refit inside If/Loop bodies, checked in ONNX Runtime against the teacher: a pruned
Loop MLP re-fitted on the values its body received (carried state included), a weight both
branches read given a copy of its own for the branch that was fitted, the untaken branch
skipped with the reason, and the teacher's body found by its owner's outputs when the teacher's
nodes have no names."""

from __future__ import annotations

import numpy as np
import onnx
import prune_body_graphs as pbg
from onnx import numpy_helper

from onnxcomp import calibration, runtime, subgraphs
from onnxcomp.model import Model
from onnxcomp.passes import distill, prune
from onnxcomp.passes.distill import bodies
from onnxcomp.pipeline import SKIP, Context, LayerChange, PassRecord


def _run(model: Model, feeds: dict) -> np.ndarray:
    return runtime.run(runtime.session(model, optimize=False), feeds)["y"]


def _error(teacher: Model, student: Model, feeds_list: list[dict]) -> float:
    """Relative error of the student's output against the teacher's over ``feeds_list``."""
    diff = sum(float(np.sum((_run(teacher, f) - _run(student, f)) ** 2)) for f in feeds_list)
    energy = sum(float(np.sum(_run(teacher, f) ** 2)) for f in feeds_list)
    return float(np.sqrt(diff / energy))


def _cosine(teacher: Model, student: Model, feeds_list: list[dict]) -> float:
    """Mean per-sample cosine of the student's output to the teacher's over ``feeds_list``."""
    found = []
    for feeds in feeds_list:
        a, b = _run(teacher, feeds).ravel(), _run(student, feeds).ravel()
        if np.linalg.norm(a) > 0:  # a ReLU that silenced every hidden unit: no direction
            found.append(float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)))
    return float(np.mean(found))


def _inits(model: Model) -> dict[str, np.ndarray]:
    found = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for body in subgraphs.all_bodies(model.graph):
        found.update({t.name: numpy_helper.to_array(t) for t in body.graph.initializer})
    return found


def _loop_feeds(count: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((1, pbg.D)).astype(np.float32)} for _ in range(count)]


def test_a_pruned_loop_body_is_refitted_to_the_teachers_body():
    teacher = pbg.loop_mlp()
    data = calibration.from_batches(_loop_feeds(48, seed=1))
    pruned, record = prune.PASS.run(teacher, prune.Config(ratio=0.25),
                                    Context(calibration=data, teacher=teacher))
    ctx = Context(calibration=data, teacher=teacher, records=[record])
    plan = distill.PASS.plan(pruned, distill.Config(), ctx)
    (row,) = [r for r in plan.rows if r.node == "body_mm2"]
    assert row.action == "refit weights to teacher tensor v" and "inside body loop/body" in \
        row.reason
    repaired, result = distill.PASS.run(pruned, distill.Config(), ctx)
    assert result.modified and "body_mm2" in result.touched
    (fitted,) = [f for f in result.details["layers"] if f["node"] == "body_mm2"]
    assert fitted["body"] == "loop/body" and fitted["samples"] == 48 * 3
    assert fitted["rel_error_after"] < fitted["rel_error_before"]
    held_out = _loop_feeds(64, seed=99)
    # Fitted before the Tanh, on each iteration's carried state: held-out output cosine
    # 0.609 -> 0.710 (the squared error moves less: Tanh saturates).
    before, after = _cosine(teacher, pruned, held_out), _cosine(teacher, repaired, held_out)
    assert after > before + 0.05, (before, after)
    # Only values changed: the same tensors with the same shapes, the same nodes.
    assert {k: v.shape for k, v in _inits(repaired).items()} == \
        {k: v.shape for k, v in _inits(pruned).items()}
    assert not np.array_equal(_inits(repaired)["W2"], _inits(pruned)["W2"])
    onnx.checker.check_model(repaired.proto, full_check=True)


def _perturbed_shared(teacher: Model, noise: float = 0.3) -> Model:
    """``teacher`` with the weight both branches read perturbed."""
    proto = onnx.ModelProto()
    proto.CopyFrom(teacher.proto)
    for tensor in proto.graph.initializer:
        if tensor.name == "shared.w":
            value = numpy_helper.to_array(tensor)
            value = value + noise * np.random.default_rng(3).standard_normal(value.shape)
            tensor.CopyFrom(numpy_helper.from_array(value.astype(np.float32), "shared.w"))
    return Model(proto)


def _if_feeds(count: int, seed: int, cond: bool, k: int = 32) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal((8, k)).astype(np.float32), "cond": np.array(cond)}
            for _ in range(count)]


def test_a_weight_both_branches_read_gets_a_copy_for_the_branch_fitted():
    teacher = pbg.if_matmuls(shared=True)
    student = _perturbed_shared(teacher)
    record = PassRecord("test", modified=True, changes=[
        LayerChange("then_mm", "test", "then_m"), LayerChange("else_mm", "test", "else_m")])
    data = calibration.from_batches(_if_feeds(12, seed=1, cond=True))
    ctx = Context(calibration=data, teacher=teacher, records=[record])
    repaired, result = distill.PASS.run(student, distill.Config(ridge=0.0), ctx)
    assert result.touched == ["then_mm"]
    # The else branch never ran on the data: skipped, with the reason.
    assert [(node, why) for node, why in result.skipped if node == "else_mm"] == [
        ("else_mm", "the teacher's body if/else_branch never ran on the calibration data")]
    then_body = subgraphs.find_body(repaired, ("if", "then_branch")).graph
    else_body = subgraphs.find_body(repaired, ("if", "else_branch")).graph
    (then_mm,) = [n for n in then_body.node if n.name == "then_mm"]
    (else_mm,) = [n for n in else_body.node if n.name == "else_mm"]
    assert then_mm.input[1] != "shared.w" and else_mm.input[1] == "shared.w"
    # The else branch computes what it did; the then branch is back on the teacher.
    for feeds in _if_feeds(3, seed=7, cond=False):
        np.testing.assert_array_equal(_run(repaired, feeds), _run(student, feeds))
    held_out = _if_feeds(4, seed=8, cond=True)
    assert _error(teacher, repaired, held_out) < 1e-4 < _error(teacher, student, held_out)


def test_the_teachers_body_is_found_by_its_owners_outputs_when_it_has_no_name():
    student = pbg.if_matmuls()
    proto = onnx.ModelProto()
    proto.CopyFrom(student.proto)
    proto.graph.node[0].name = ""  # the input model before cleanup named its nodes
    teacher = Model(proto)
    assert bodies.teacher_key(student, teacher, ("if", "else_branch")) == (
        "#0:If", "else_branch")
    assert bodies.locate(student, teacher, LayerChange("then_mm", "x", "missing")) == \
        "teacher body #0:If/then_branch has no tensor 'missing'"


def test_a_bias_correction_inside_the_taken_branch_lowers_its_error():
    teacher = pbg.if_conv_chain()
    rng = np.random.default_rng(0)
    feeds = [{"x": rng.standard_normal((1, pbg.C, pbg.L)).astype(np.float32),
              "cond": np.array(True)} for _ in range(16)]
    data = calibration.from_batches(feeds)
    pruned, record = prune.PASS.run(teacher, prune.Config(ratio=0.5),
                                    Context(calibration=data, teacher=teacher))
    ctx = Context(calibration=data, teacher=teacher, records=[record])
    plan = distill.PASS.plan(pruned, distill.Config(), ctx)
    assert {(r.node, r.action) for r in plan.rows} == {
        ("then_conv2", "bias correction to teacher tensor then_c"),
        ("else_conv2", "bias correction to teacher tensor else_c")}
    repaired, result = distill.PASS.run(pruned, distill.Config(), ctx)
    (fitted,) = result.details["layers"]
    assert fitted["node"] == "then_conv2" and fitted["fit"] == "bias correction"
    assert fitted["rel_error_after"] < fitted["rel_error_before"]
    assert [node for node, _ in result.skipped] == ["else_conv2"]
    if result.modified:  # kept only when the outputs got closer on the calibration data
        assert _error(teacher, repaired, feeds) < _error(teacher, pruned, feeds)
    else:
        assert any("undone" in note for note in result.notes)
    assert SKIP not in {r.action for r in plan.rows}
