from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import calibration, runtime
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import Model
from onnxcomp.passes import distill
from onnxcomp.pipeline import Context, PassRecord

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


def _teacher_and_student(noise: float, bias: bool = True):
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
    record = PassRecord("lowrank", modified=True,
                        details={"layers": [{"nodes": ["fc_a", "fc_b"], "output": "mm"}]})
    return teacher, student, record, b


def _ctx(teacher, student, record, batches=8, rows=16):
    data = calibration.random_data(student, batches, dims={"b": rows})
    return Context(calibration=data, teacher=teacher, records=[record])


@pytest.mark.parametrize("bias", [True, False])
def test_refit_recovers_the_exact_factor(bias):
    teacher, student, record, b_true = _teacher_and_student(noise=0.3, bias=bias)
    out, rec = distill.run(student, distill.Config(ridge=1e-9), _ctx(teacher, student, record))
    assert rec.modified and rec.touched == ["fc_b"]
    fitted = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_allclose(fitted["B"], b_true, atol=1e-3)
    layer = rec.details["layers"][0]
    assert layer["rel_error_before"] > 0.05 and layer["rel_error_after"] < 1e-4
    # Numerically in ONNX Runtime, on fresh inputs: the repaired student equals the teacher.
    x = {"x": np.random.default_rng(9).standard_normal((5, K)).astype(np.float32)}
    assert max(runtime.max_abs_difference(teacher, out, x).values()) < 1e-3
    # The input model is untouched.
    untouched = {t.name: numpy_helper.to_array(t) for t in student.graph.initializer}
    assert not np.allclose(untouched["B"], b_true, atol=1e-3)


def test_too_little_data_is_regularized_with_a_warning():
    teacher, student, record, _ = _teacher_and_student(noise=0.3)
    ctx = _ctx(teacher, student, record, batches=1, rows=3)  # 3 samples for 6 inputs
    out, rec = distill.run(student, distill.Config(), ctx)
    text = " ".join(rec.notes)
    assert "under-determined" in text
    for layer in rec.details["layers"]:
        assert np.isfinite(layer["rel_error_after"])
        assert layer["rel_error_after"] <= layer["rel_error_before"]


def test_nothing_to_repair_is_a_note_not_an_error():
    teacher, student, _, _ = _teacher_and_student(noise=0.3)
    ctx = Context(calibration=calibration.random_data(student, 2), teacher=teacher, records=[])
    out, rec = distill.run(student, distill.Config(), ctx)
    assert out is student and not rec.modified and "nothing to repair" in rec.notes[0]


def test_needs_calibration_and_teacher():
    teacher, student, record, _ = _teacher_and_student(noise=0.3)
    with pytest.raises(OnnxcompError, match="calibration"):
        distill.run(student, distill.Config(), Context(teacher=teacher, records=[record]))
    with pytest.raises(ValueError):
        distill.Config(ridge=-1)


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
    record = PassRecord("quantize", modified=True,
                        details={"layers": [{"node": "fc", "output": "mm"}]})
    out, rec = distill.run(student, distill.Config(), _ctx(teacher, student, record))
    assert rec.details["layers"][0]["fit"] == "bias correction"
    fitted = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    np.testing.assert_allclose(fitted["bias"], bias + shift, atol=1e-5)
    np.testing.assert_array_equal(fitted["w"], w)
    x = {"x": np.random.default_rng(3).standard_normal((4, K)).astype(np.float32)}
    assert max(runtime.max_abs_difference(teacher, out, x).values()) < 1e-4


def test_fits_that_hurt_the_outputs_are_undone(monkeypatch):
    teacher, student, record, _ = _teacher_and_student(noise=0.3)
    scores = iter([0.99, 0.98])  # before, after: the outputs got worse
    monkeypatch.setattr(distill, "_output_cosine", lambda *args: next(scores))
    out, rec = distill.run(student, distill.Config(), _ctx(teacher, student, record))
    assert out is student and not rec.modified and "undone" in rec.notes[-1]
    assert rec.details["output_cosine"] == {"before": 0.99, "after": 0.98}


def test_output_cosine_measures_the_repair():
    teacher, student, record, _ = _teacher_and_student(noise=0.3)
    ctx = _ctx(teacher, student, record)
    out, rec = distill.run(student, distill.Config(ridge=1e-9), ctx)
    assert rec.details["output_cosine"]["before"] < 0.999
    assert rec.details["output_cosine"]["after"] > 0.99999
