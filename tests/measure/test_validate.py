"""validate: metrics checked against direct numpy computations on small, hand-built cases."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import calibration
from onnxcomp.errors import OnnxcompError
from onnxcomp.measure.validate import (
    OutputStats,
    per_sample_cosine,
    retrieval_metrics,
    topk_hits,
    validate,
)
from onnxcomp.model import Model
from onnxcomp.report import fidelity_table

OPSET = [helper.make_opsetid("", 17)]


def _model(nodes, inputs, outputs, initializers=()) -> Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    proto = helper.make_model(graph, opset_imports=OPSET)
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return Model(proto)


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def classifier(weight: np.ndarray) -> Model:
    """x [N, T, D] -> Softmax(x @ W) [N, T, C]."""
    d, c = weight.shape
    return _model(
        [helper.make_node("MatMul", ["x", "W"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probs"], axis=-1)],
        [_vi("x", ["N", 3, d])], [_vi("probs", ["N", 3, c])],
        [numpy_helper.from_array(weight.astype(np.float32), "W")])


def dual_encoder(text_matrix: np.ndarray | None = None) -> Model:
    """image [N, 4] -> image_embeds (identity); text [N, 4] -> text_embeds (text @ M)."""
    matrix = np.eye(4, dtype=np.float32) if text_matrix is None else text_matrix
    return _model(
        [helper.make_node("Identity", ["image"], ["image_embeds"]),
         helper.make_node("MatMul", ["text", "M"], ["text_embeds"])],
        [_vi("image", ["N", 4]), _vi("text", ["N", 4])],
        [_vi("image_embeds", ["N", 4]), _vi("text_embeds", ["N", 4])],
        [numpy_helper.from_array(matrix.astype(np.float32), "M")])


# ---------------------------------------------------------------------------------------------
# Metrics on arrays


def test_cosine_matches_numpy_and_handles_zero_vectors():
    rng = np.random.default_rng(1)
    a = rng.standard_normal((5, 2, 3))
    b = a + 0.3 * rng.standard_normal((5, 2, 3))
    expected = [float(x.ravel() @ y.ravel() / np.linalg.norm(x) / np.linalg.norm(y))
                for x, y in zip(a, b)]
    np.testing.assert_allclose(per_sample_cosine(a, b), expected, rtol=1e-12)
    zeros = np.zeros((2, 3))
    np.testing.assert_array_equal(per_sample_cosine(zeros, zeros), [1.0, 1.0])
    np.testing.assert_array_equal(per_sample_cosine(zeros, np.ones((2, 3))), [0.0, 0.0])
    np.testing.assert_allclose(per_sample_cosine(np.ones((2, 3)), -np.ones((2, 3))), [-1, -1])
    # rank 1: the whole array is one sample
    assert per_sample_cosine(np.array([1.0, 0.0]), np.array([1.0, 1.0])).tolist() == pytest.approx(
        [1 / np.sqrt(2)])


def test_running_stats_match_numpy_over_all_batches():
    rng = np.random.default_rng(2)
    refs = [rng.standard_normal((3, 4, 6)).astype(np.float32) for _ in range(3)]
    cands = [r + rng.standard_normal(r.shape).astype(np.float32) * 0.1 for r in refs]
    stats = OutputStats("y")
    for r, c in zip(refs, cands):
        stats.add(r, c)
    summary = stats.summary(min_cosine=0.999)
    a = np.concatenate(refs).astype(np.float64)
    b = np.concatenate(cands).astype(np.float64)
    cos = [x.ravel() @ y.ravel() / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)]
    assert summary["samples"] == 9
    assert summary["cosine_mean"] == pytest.approx(np.mean(cos), rel=1e-12)
    assert summary["cosine_min"] == pytest.approx(np.min(cos), rel=1e-12)
    assert summary["rel_l2"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a), rel=1e-9)
    assert summary["max_abs"] == pytest.approx(np.max(np.abs(a - b)), rel=1e-12)
    assert summary["passed"] is False  # cosine ~0.995 < 0.999
    flat_a, flat_b = a.reshape(-1, 6), b.reshape(-1, 6)
    assert summary["positions"] == 36
    assert summary["top1_agreement"] == pytest.approx(
        np.mean(flat_a.argmax(1) == flat_b.argmax(1)))


def test_topk_agreement_on_hand_built_logits():
    reference = np.array([[
        [9.0, 8, 7, 6, 5, 4, 0],   # top-1 0, top-5 {0..4}
        [0.0, 1, 2, 3, 4, 5, 6],   # top-1 6, top-5 {2..6}
        [1.0, 0, 0, 0, 0, 0, 0],   # top-1 0
        [0.0, 0, 0, 0, 0, 0, 1],   # top-1 6, top-5 includes 6 and four of the zeros
    ]])
    candidate = np.array([[
        [9.0, 8, 7, 6, 5, 4, 0],   # argmax 0: top-1 yes
        [0.0, 0, 9, 0, 0, 0, 0],   # argmax 2: in reference top-5 {2..6}, not top-1
        [0.0, 0, 0, 0, 0, 0, 1],   # argmax 6: reference top-5 of row 2 is 0 + four zeros
        [9.0, 0, 0, 0, 0, 0, 0],   # argmax 0: ties in the reference's top-5
    ]])
    positions, top1, _ = topk_hits(reference, candidate)
    assert (positions, top1) == (4, 1)
    # rows 0 and 1 are certain top-5 hits; rows 2 and 3 are ties, so pin them with a clean case
    clean_ref = reference[:, :2]
    clean_cand = candidate[:, :2]
    assert topk_hits(clean_ref, clean_cand) == (2, 1, 2)
    # k = min(5, C): with 3 classes every argmax is in the "top 5"
    three = np.array([[[3.0, 2, 1], [1.0, 2, 3]]])
    assert topk_hits(three, three[:, ::-1]) == (2, 0, 2)


def test_retrieval_metrics_on_a_swapped_pair():
    eye = np.eye(4)
    swap = eye[[1, 0, 2, 3]]
    result = retrieval_metrics(eye, eye, eye, eye @ swap)
    assert result["a_to_b_agreement"] == 0.5
    assert result["b_to_a_agreement"] == 0.5
    assert result["max_abs_sim_diff"] == 1.0
    assert result["mean_abs_sim_diff"] == 4 / 16
    assert result["recall@1"]["a_to_b"] == {"reference": 1.0, "candidate": 0.5}
    assert result["recall@1"]["b_to_a"] == {"reference": 1.0, "candidate": 0.5}


def test_retrieval_metrics_blockwise_matches_numpy():
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((7, 5)), rng.standard_normal((7, 5))
    ca, cb = a + 0.5 * rng.standard_normal(a.shape), b + 0.5 * rng.standard_normal(b.shape)

    def sim(x, y):
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
        y = y / np.linalg.norm(y, axis=1, keepdims=True)
        return x @ y.T

    s_ref, s_cand = sim(a, b), sim(ca, cb)
    result = retrieval_metrics(a, b, ca, cb, block=3)
    assert result["a_to_b_agreement"] == np.mean(s_ref.argmax(1) == s_cand.argmax(1))
    assert result["b_to_a_agreement"] == np.mean(s_ref.argmax(0) == s_cand.argmax(0))
    assert result["mean_abs_sim_diff"] == pytest.approx(np.abs(s_ref - s_cand).mean())
    assert result["max_abs_sim_diff"] == pytest.approx(np.abs(s_ref - s_cand).max())
    diag = np.arange(7)
    assert result["recall@1"]["b_to_a"]["candidate"] == np.mean(s_cand.argmax(0) == diag)
    assert result["recall@1"]["a_to_b"]["reference"] == np.mean(s_ref.argmax(1) == diag)


# ---------------------------------------------------------------------------------------------
# validate() end to end in ONNX Runtime


def test_model_against_itself_is_perfect():
    model = classifier(np.random.default_rng(4).standard_normal((5, 6)))
    report = validate(model, model, data="random:3", min_cosine=0.999, progress=None)
    out = report.fidelity["outputs"]["probs"]
    assert out["cosine_mean"] == pytest.approx(1.0, abs=1e-9)
    assert out["cosine_min"] == pytest.approx(1.0, abs=1e-9)
    assert out["rel_l2"] == 0.0 and out["max_abs"] == 0.0
    assert out["top1_agreement"] == 1.0 and out["top5_agreement"] == 1.0
    assert report.fidelity["passed"] is True
    assert report.fidelity["batches"] == 3
    assert "probs" in report.table()


def test_classifier_metrics_match_numpy_forward(tmp_path):
    rng = np.random.default_rng(5)
    w_ref = rng.standard_normal((5, 6))
    w_cand = w_ref + 0.4 * rng.standard_normal((5, 6))
    ref_path, cand_path = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    classifier(w_ref).save(ref_path)
    classifier(w_cand).save(cand_path)
    batches = [{"x": rng.standard_normal((4, 3, 5)).astype(np.float32)} for _ in range(3)]
    data = calibration.from_batches(batches)
    report = validate(ref_path, cand_path, data=data, min_cosine=0.9999, progress=None)
    out = report.fidelity["outputs"]["probs"]

    def forward(w):
        logits = np.concatenate([b["x"] for b in batches]).astype(np.float64) @ w.astype(
            np.float32).astype(np.float64)
        e = np.exp(logits - logits.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    a, b = forward(w_ref), forward(w_cand)
    cos = [x.ravel() @ y.ravel() / np.linalg.norm(x) / np.linalg.norm(y) for x, y in zip(a, b)]
    assert out["samples"] == 12 and out["positions"] == 36
    assert out["cosine_mean"] == pytest.approx(np.mean(cos), abs=1e-5)
    assert out["rel_l2"] == pytest.approx(np.linalg.norm(a - b) / np.linalg.norm(a), rel=1e-4)
    assert out["max_abs"] == pytest.approx(np.abs(a - b).max(), abs=1e-5)
    flat_a, flat_b = a.reshape(-1, 6), b.reshape(-1, 6)
    expected_top1 = np.mean(flat_a.argmax(1) == flat_b.argmax(1))
    top5 = np.argsort(-flat_a, axis=1)[:, :5]
    expected_top5 = np.mean([c in t for c, t in zip(flat_b.argmax(1), top5)])
    assert out["top1_agreement"] == pytest.approx(expected_top1)
    assert out["top5_agreement"] == pytest.approx(expected_top5)
    assert 0 < expected_top1 < 1  # the case really tests something
    assert out["passed"] is False and report.fidelity["passed"] is False
    assert "FAIL" in fidelity_table(report.fidelity)


def test_dual_encoder_swapped_text_features():
    """Candidate's text tower swaps features 0 and 1: exactly pairs 0 and 1 lose their match."""
    swap = np.eye(4)[[1, 0, 2, 3]]
    eye = np.eye(4, dtype=np.float32)
    # two batches of two samples: the metric must see all four across batches
    batches = [{"image": eye[i:i + 2] + 0.01, "text": eye[i:i + 2] + 0.01} for i in (0, 2)]
    report = validate(dual_encoder(), dual_encoder(swap), data=calibration.from_batches(batches),
                      progress=None)
    retrieval = report.fidelity["retrieval"]
    assert (retrieval["a"], retrieval["b"]) == ("image_embeds", "text_embeds")
    assert retrieval["samples"] == 4
    assert retrieval["a_to_b_agreement"] == 0.5
    assert retrieval["b_to_a_agreement"] == 0.5
    assert retrieval["recall@1"]["a_to_b"] == {"reference": 1.0, "candidate": 0.5}
    assert retrieval["recall@1"]["b_to_a"] == {"reference": 1.0, "candidate": 0.5}
    # embeddings get no top-k (they are not class scores)
    assert "top1_agreement" not in report.fidelity["outputs"]["text_embeds"]
    assert report.fidelity["outputs"]["image_embeds"]["cosine_mean"] == pytest.approx(1.0)
    assert "retrieval" in report.table()

    same = validate(dual_encoder(), dual_encoder(), data="random:2", progress=None)
    assert same.fidelity["retrieval"]["a_to_b_agreement"] == 1.0
    assert same.fidelity["retrieval"]["b_to_a_agreement"] == 1.0
    assert same.fidelity["retrieval"]["max_abs_sim_diff"] == pytest.approx(0.0, abs=1e-6)


def test_task_metric_from_zoo_data_is_reported_side_by_side(monkeypatch):
    from onnxcomp import zoo

    seen = []

    def metric(model, outputs, labels):
        seen.append((len(outputs), labels))
        return {"accuracy": float(np.mean([o["probs"].argmax() == lab
                                           for o, lab in zip(outputs, labels)]))}

    monkeypatch.setattr(zoo, "task_metric", lambda name: metric)
    model = classifier(np.random.default_rng(6).standard_normal((5, 6)))
    data = calibration.random_data(model, 2)
    data.labels, data.zoo_name = [0, 1], "tiny-clip"
    report = validate(model, model, data=data, progress=None)
    task = report.fidelity["task"]
    assert task["name"] == "tiny-clip"
    assert task["reference"]["accuracy"] == task["candidate"]["accuracy"]
    assert task["delta"] == {"accuracy": 0.0}
    assert "task metric (tiny-clip)" in report.table()
    assert seen == [(2, [0, 1]), (2, [0, 1])]


# ---------------------------------------------------------------------------------------------
# Errors


def test_mismatched_input_names():
    other = _model([helper.make_node("Identity", ["y"], ["probs"])], [_vi("y", ["N", 3, 6])],
                   [_vi("probs", ["N", 3, 6])])
    with pytest.raises(OnnxcompError, match="inputs differ.*'x'.*'y'"):
        validate(classifier(np.ones((5, 6))), other, progress=None)


def test_mismatched_input_dtype_and_rank_and_outputs():
    ref = _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", ["N", 4])],
                 [_vi("y", ["N", 4])])
    as_double = _model([helper.make_node("Identity", ["x"], ["y"])],
                       [_vi("x", ["N", 4], TensorProto.DOUBLE)],
                       [_vi("y", ["N", 4], TensorProto.DOUBLE)])
    with pytest.raises(OnnxcompError, match="'x' is FLOAT in the reference but DOUBLE"):
        validate(ref, as_double, progress=None)
    rank3 = _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", ["N", 4, 1])],
                   [_vi("y", ["N", 4, 1])])
    with pytest.raises(OnnxcompError, match="rank 2 in the reference but 3"):
        validate(ref, rank3, progress=None)
    renamed = _model([helper.make_node("Identity", ["x"], ["z"])], [_vi("x", ["N", 4])],
                     [_vi("z", ["N", 4])])
    with pytest.raises(OnnxcompError, match="outputs differ"):
        validate(ref, renamed, progress=None)


def test_output_shape_differs_at_run_time():
    ref = _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", ["N", 4])],
                 [_vi("y", ["N", None])])
    doubled = _model([helper.make_node("Concat", ["x", "x"], ["y"], axis=1)],
                     [_vi("x", ["N", 4])], [_vi("y", ["N", None])])
    with pytest.raises(OnnxcompError, match=r"'y' has shape \[1, 4\] in the reference but "
                                            r"\[1, 8\] in the candidate"):
        validate(ref, doubled, data="random:1", progress=None)


def test_wrong_data_arrays(tmp_path):
    model = classifier(np.ones((5, 6)))
    folder = tmp_path / "data"
    folder.mkdir()
    np.savez(folder / "0.npz", wrong=np.zeros((1, 3, 5), np.float32))
    with pytest.raises(OnnxcompError, match=r"arrays \['wrong'\] do not match the model inputs"):
        validate(model, model, data=str(folder), progress=None)
    # the reference accepts the data, the candidate (fixed width 5 -> 4) does not
    ref = _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", ["N", 5])],
                 [_vi("y", ["N", 5])])
    cand = _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", ["N", 4])],
                  [_vi("y", ["N", 4])])
    with pytest.raises(OnnxcompError, match="candidate: .*expects 4 on axis 1"):
        validate(ref, cand, progress=None)
    with pytest.raises(OnnxcompError, match="count must be positive"):
        validate(ref, ref, count=0, progress=None)


def test_count_and_batch_dims():
    model = classifier(np.ones((5, 6)))
    report = validate(model, model, data="random:6", count=2, batch_dims={"N": 3}, progress=None)
    assert report.fidelity["batches"] == 2
    assert report.fidelity["outputs"]["probs"]["shape"] == [3, 3, 6]
    assert report.fidelity["outputs"]["probs"]["samples"] == 6


def test_no_gate_no_verdict():
    model = classifier(np.ones((5, 6)))
    report = validate(model, model, data="random:1", progress=None)
    assert "passed" not in report.fidelity
    assert "passed" not in report.fidelity["outputs"]["probs"]


@pytest.mark.zoo
def test_ppocr_rec_against_itself_with_task_metric():
    from onnxcomp import zoo

    path = zoo.fetch("ppocr-rec")
    report = validate(path, path, data="ppocr-rec:eval:4", min_cosine=0.999, progress=None)
    (out,) = report.fidelity["outputs"].values()
    assert out["cosine_mean"] == pytest.approx(1.0) and out["top1_agreement"] == 1.0
    task = report.fidelity["task"]
    assert task["name"] == "ppocr-rec" and set(task["reference"]) >= {"line_accuracy"}
    assert task["reference"] == task["candidate"]
    assert report.fidelity["passed"] is True


# ---------------------------------------------------------------------------------------------
# Errors at the edge: both files are the user's


def _cut_in_threes() -> Model:
    """x [N, 8] -> Reshape [-1, 3]: valid, but runs only where 8 * N divides by 3."""
    return _model([helper.make_node("Reshape", ["x", "shape"], ["y"])], [_vi("x", ["N", 8])],
                  [_vi("y", [None, 3])],
                  [numpy_helper.from_array(np.array([-1, 3], np.int64), "shape")])


def _refused_by_onnx_runtime() -> Model:
    """Valid for onnx's checker (an op of a domain it does not know); ONNX Runtime refuses it."""
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], domain="com.example")],
                              "g", [_vi("x", ["N", 8])], [_vi("y", ["N", 8])])
    proto = helper.make_model(graph, opset_imports=[*OPSET,
                                                    helper.make_opsetid("com.example", 1)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return Model(proto)


def test_reference_that_cannot_run_on_the_data_is_a_user_error(tmp_path):
    import subprocess
    import sys

    from onnxcomp.errors import UserError

    model = _cut_in_threes()
    with pytest.raises(UserError, match=r"the reference .* cannot run on random:8 batch 0 "
                                        r"\(check --data\)"):
        validate(model, model, progress=None)
    # Data it can take (N = 3) runs.
    assert validate(model, model, batch_dims={"N": 3}, progress=None).fidelity["outputs"]
    ref, cand = tmp_path / "ref.onnx", tmp_path / "cand.onnx"
    model.save(ref)
    model.save(cand)
    # In a real process: ONNX Runtime's own log lines would be on stderr too.
    # --quiet: no progress lines, so stderr holds exactly what ONNX Runtime and the error add.
    done = subprocess.run([sys.executable, "-m", "onnxcomp.cli", "--quiet", "validate", str(ref),
                           str(cand)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and f"the reference {ref} cannot run" in done.stderr


def test_a_model_onnx_runtime_refuses_is_named(tmp_path, capsys):
    from onnxcomp.cli import main

    good = _model([helper.make_node("Relu", ["x"], ["y"])], [_vi("x", ["N", 8])],
                  [_vi("y", ["N", 8])])
    paths = {"good": tmp_path / "good.onnx", "bad": tmp_path / "bad.onnx"}
    good.save(paths["good"])
    _refused_by_onnx_runtime().save(paths["bad"])
    for role, argv in (("reference", [paths["bad"], paths["good"]]),
                       ("candidate", [paths["good"], paths["bad"]])):
        assert main(["validate", *map(str, argv)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1
        assert f"error: {role} {paths['bad']}: ONNX Runtime could not load the model" in err


def test_candidate_failing_where_the_reference_runs():
    from onnxcomp.errors import InvalidOutput, UserError

    ref = _model([helper.make_node("Identity", ["x"], ["y"])], [_vi("x", ["N", 8])],
                 [_vi("y", [None, 3])])
    cand = _cut_in_threes()
    with pytest.raises(UserError, match="the candidate .* cannot run on random:8 batch 0, "
                                        "where the reference runs"):
        validate(ref, cand, progress=None)
    # A candidate onnxcomp produced (compress) failing there is our bug, not the user's.
    with pytest.raises(InvalidOutput, match="the compressed model fails on random:8 batch 0"):
        validate(ref, cand, progress=None, ours=True)
    with pytest.raises(InvalidOutput, match="candidate .*: ONNX Runtime could not load"):
        validate(ref, _refused_by_onnx_runtime(), progress=None, ours=True)
    renamed = _model([helper.make_node("Identity", ["z"], ["y"])], [_vi("z", ["N", 8])],
                     [_vi("y", ["N", 8])])
    with pytest.raises(InvalidOutput, match="signature changed: the models' inputs differ"):
        validate(ref, renamed, progress=None, ours=True)


# ---------------------------------------------------------------------------------------------
# What the report keeps for the HTML page


def test_report_keeps_per_sample_cosines_similarity_and_breakdown(monkeypatch):
    from onnxcomp.measure import validate as validate_module

    monkeypatch.setattr(validate_module, "PER_SAMPLE_LIMIT", 5)
    swap = np.eye(4)[[1, 0, 2, 3]]
    data = calibration.random_data(dual_encoder(), 3, dims={"N": 4})
    report = validate(dual_encoder(), dual_encoder(swap), data=data, progress=None)
    text = report.fidelity["outputs"]["text_embeds"]
    assert text["samples"] == 12 and len(text["per_sample_cosine"]) == 5  # capped
    first = data.make_batch(0)["text"]
    expected = per_sample_cosine(first, first @ swap.astype(np.float32))[:4]
    assert text["per_sample_cosine"][:4] == pytest.approx(expected, abs=1e-6)
    similarity = report.fidelity["retrieval"]["similarity"]
    assert similarity["samples"] == 12
    assert np.asarray(similarity["reference"]).shape == (12, 12)
    assert similarity["reference"] != similarity["candidate"]
    for role in ("reference", "candidate"):
        breakdown = report.models[role]["breakdown"]
        assert {r["op"] for r in breakdown["rows"]} == {"MatMul"} and breakdown["params"] == 16


def _recognizer_outputs(texts, characters):
    """[1, T, C] one-hot CTC scores that decode to each text (blanks between characters)."""
    classes = {c: i + 1 for i, c in enumerate(characters)}
    classes[" "] = len(characters) + 1
    outputs = []
    for text in texts:
        steps = [0] + [k for c in text for k in (classes[c], 0)]
        scores = np.zeros((1, len(steps), len(characters) + 2), np.float32)
        scores[0, np.arange(len(steps)), steps] = 1.0
        outputs.append({"softmax_11.tmp_0": scores})
    return outputs


def test_ocr_lines_whose_text_changed_come_with_their_images():
    from onnxcomp import zoo
    from onnxcomp.zoo import ppocr

    data = zoo.dataset("ppocr-rec", "eval", 3)
    characters = sorted(ppocr.ALPHABET - {" "})
    proto = helper.make_model(helper.make_graph([], "g", [], []))
    helper.set_model_props(proto, {"character": "\n".join(characters)})
    labels = [batch[0] for batch in data.labels]
    misread = labels[1][:-1] + ("x" if labels[1][-1] != "x" else "y")
    ref_out = _recognizer_outputs(labels, characters)
    cand_out = _recognizer_outputs([labels[0], misread, labels[2]], characters)
    changed = ppocr.task_changes("ppocr-rec", proto, proto, ref_out, cand_out, data.labels,
                                 data.name)
    assert changed["count"] == 1 and changed["total"] == 3
    (line,) = changed["lines"]
    assert (line["index"], line["label"], line["reference"], line["candidate"]) == (
        1, labels[1], labels[1], misread)
    assert line["image"].startswith("data:image/png;base64,")
    # data that is not the generator's (or another seed): no images, the texts still
    other = ppocr.task_changes("ppocr-rec", proto, proto, ref_out, cand_out, data.labels,
                               "arrays")
    assert "image" not in other["lines"][0] and other["count"] == 1
    assert ppocr.task_changes("ppocr-det", proto, proto, ref_out, cand_out, data.labels,
                              data.name) is None
