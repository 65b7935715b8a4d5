"""The held-out hard split of ppocr-rec: disjoint from calibration, other fonts, still readable."""

from __future__ import annotations

import numpy as np
import pytest

from onnxcomp.errors import UserError
from onnxcomp.zoo import ppocr, text_render


def test_hard_lines_are_seeded_and_disjoint_from_calibration():
    first = ppocr.rec_line(0, "hard", 3)
    again = ppocr.rec_line(0, "hard", 3)
    assert first[0] == again[0] and np.array_equal(first[1], again[1])
    hard = {ppocr.rec_line(0, "hard", i)[0] for i in range(40)}
    calib = {ppocr.rec_line(0, "calib", i)[0] for i in range(200)}
    assert not hard & calib
    # every hard text is from the evaluation half of the text split, so it never is a calib text
    assert {text_render.text_split(t) for t in hard} == {1}
    assert all(16 <= len(t) <= 28 and all(c in ppocr.ALPHABET for c in t) for t in hard)


def test_hard_fonts_are_not_the_calibration_fonts():
    hard = {p.name for p in text_render.hard_font_files()}
    assert hard and not hard & set(text_render.FACES)


def test_missing_hard_faces_are_said(tmp_path, monkeypatch, caplog):
    """Fewer faces draw other lines: the split says which are missing."""
    present = text_render.hard_font_files()
    (tmp_path / present[0].name).write_bytes(present[0].read_bytes())
    monkeypatch.setattr(text_render, "HARD_FONT_DIRS", (tmp_path,))
    text_render.hard_font_files.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="onnxcomp.zoo.text_render"):
            assert [p.name for p in text_render.hard_font_files()] == [present[0].name]
    finally:
        text_render.hard_font_files.cache_clear()
    assert f"found 1 of its {len(text_render.HARD_FACES)} faces" in caplog.text
    assert text_render.HARD_FACES[1] in caplog.text


def test_hard_dataset_shapes_labels_and_refusals():
    data = ppocr.dataset("ppocr-rec", "hard", 3)
    assert data.name == "ppocr-rec:hard:3" and len(data) == 3
    assert data.make_batch(1)["x"].shape == (1, 3, ppocr.REC_HEIGHT, ppocr.REC_WIDTH)
    assert data.labels[2] == [ppocr.rec_line(0, "hard", 2)[0]]
    with pytest.raises(UserError, match="ppocr-rec's only"):
        ppocr.dataset("ppocr-det", "hard", 2)
    with pytest.raises(UserError, match="calib, eval, hard or train"):
        ppocr.dataset("ppocr-rec", "test", 2)


def test_the_training_stream_is_wider_than_calibration_and_never_meets_held_out_lines():
    train = [ppocr.rec_line(0, "train", i)[0] for i in range(60)]
    assert train[:5] == [ppocr.rec_line(0, "train", i)[0] for i in range(5)]  # seeded
    held_out = {ppocr.rec_line(0, split, i)[0] for split in ("eval", "hard") for i in range(60)}
    assert not set(train) & held_out
    assert {text_render.text_split(t) for t in train} == {0}  # the calibration half
    assert max(map(len, train)) > 25 and min(map(len, train)) < 14  # longer lines, and short
    assert all(3 <= len(t) <= 34 and all(c in ppocr.ALPHABET for c in t) for t in train)
    styles = [text_render.train_style(np.random.default_rng(i)) for i in range(40)]
    faces = {s.line.font_path.name for s in styles}
    assert faces <= set(text_render.FACES + text_render.TRAIN_EXTRA_FACES)
    assert not faces & set(text_render.HARD_FACES)  # the hard faces stay unseen
    assert min(s.stretch for s in styles) < 0.9 and max(s.stretch for s in styles) > 1.15
    data = ppocr.dataset("ppocr-rec", "train", 3)
    assert data.make_batch(2)["x"].shape == (1, 3, ppocr.REC_HEIGHT, ppocr.REC_WIDTH)
    assert data.labels[1] == [train[1]]
    with pytest.raises(UserError, match="ppocr-rec's only"):
        ppocr.dataset("ppocr-det", "train", 2)


def test_the_training_stream_holds_every_printable_character():
    """A student distilled on a stream that never shows a glyph forgets it (measured: the hard
    lines holding such a symbol fell to 12 %); a third of the train lines are alphabet runs."""
    train = [ppocr.rec_line(0, "train", i)[0] for i in range(300)]
    assert set("".join(train)) >= set(text_render.PRINTABLE)
    rng = np.random.default_rng(5)
    runs = [text_render.alphabet_text(rng) for _ in range(200)]
    assert all(4 <= len(t) <= 30 and t == t.strip() and "  " not in t for t in runs)
    assert all(len(word) <= 8 for t in runs for word in t.split(" "))
    assert text_render.alphabet_text(np.random.default_rng(1)) == \
        text_render.alphabet_text(np.random.default_rng(1))
    with pytest.raises(UserError, match="allowed characters"):
        text_render.alphabet_text(rng, allowed=lambda t: False)


@pytest.mark.zoo
def test_hard_split_is_harder_than_eval_for_the_float_model():
    from onnxcomp import runtime, zoo
    from onnxcomp.model import load

    path = zoo.fetch("ppocr-rec")
    session = runtime.session(path)
    model = load(path)
    scores = {}
    for split in ("eval", "hard"):
        data = ppocr.dataset("ppocr-rec", split, 32)
        outputs = [{ppocr.REC_OUTPUT: session.run(None, data.make_batch(i))[0]}
                   for i in range(len(data))]
        scores[split] = ppocr.task_metric("ppocr-rec", model, outputs, data.labels)
    assert scores["hard"]["char_accuracy"] < scores["eval"]["char_accuracy"]
    assert 0.6 <= scores["hard"]["line_accuracy"] < scores["eval"]["line_accuracy"]


def test_missing_train_faces_are_said(monkeypatch, caplog):
    """Without matplotlib's STIX faces the train split draws the calibration faces alone, and
    says so (its lines then differ from a machine's with them)."""
    calibration_faces = text_render.font_files()  # cached before matplotlib "goes away"
    monkeypatch.setattr(text_render, "_matplotlib_font_dir", lambda: None)
    text_render.train_font_files.cache_clear()
    try:
        with caplog.at_level("WARNING", logger="onnxcomp.zoo.text_render"):
            assert text_render.train_font_files() == calibration_faces
    finally:
        text_render.train_font_files.cache_clear()
    assert f"found 0 of its {len(text_render.TRAIN_EXTRA_FACES)} extra faces" in caplog.text


def test_train_lines_are_slanted_and_reweighted_as_styled():
    """A slant grows the crop by |shear| x height and moves the ink; a bolder stroke darkens a
    dark-ink line, a lighter one brightens it; the same style and seed give the same pixels."""
    base = text_render.train_style(np.random.default_rng(3))
    line = text_render.LineStyle(**{**base.line.__dict__, "size": 32, "blur": 0.0, "noise": 0.0,
                                    "ink": (20, 20, 20), "paper": (230, 230, 230)})

    def draw(shear: float = 0.0, stroke: int = 0) -> np.ndarray:
        style = text_render.TrainStyle(line, 1.0, shear, stroke)
        return text_render.render_train_line("Hold 42 [x]", style, np.random.default_rng(0))

    plain, slanted = draw(), draw(shear=0.25)
    assert slanted.shape[0] == plain.shape[0]
    assert slanted.shape[1] == plain.shape[1] + round(0.25 * plain.shape[0])
    assert np.array_equal(draw(shear=0.25), slanted)
    assert draw(stroke=1).mean() < plain.mean() < draw(stroke=-1).mean()
    styles = [text_render.train_style(np.random.default_rng(i)) for i in range(200)]
    assert 0.15 < np.mean([s.shear != 0 for s in styles]) < 0.45
    assert {s.stroke for s in styles} == {-1, 0, 1}
    assert max(abs(s.shear) for s in styles) <= 0.3
