"""PP-OCRv4 recognition and detection from the wheel ``rapidocr_onnxruntime==1.4.4``.

Models: ``rapidocr_onnxruntime/models/ch_PP-OCRv4_{rec,det}_infer.onnx``, sha256-pinned, as is
the wheel. Data: text rendered with the DejaVu fonts (:mod:`onnxcomp.zoo.text_render`).

Recognition input, as PaddleOCR's recognizer prepares it: a line crop of height h and width w is
resized to height 48 and width ``ceil(48 * w / h)`` capped at 320 (bilinear; Pillow's bilinear
filter, which antialiases when it shrinks, where PaddleOCR calls OpenCV's), scaled
``(x / 255 - 0.5) / 0.5``, laid out CHW in BGR channel order (PaddleOCR reads images with OpenCV)
and right-padded with zeros to 320: ``{"x": float32 [1, 3, 48, 320]}``, one line per batch,
labels ``[text]``.

Output ``softmax_11.tmp_0`` [N, T, C] is decoded by greedy CTC: argmax per step, repeats
collapsed, blanks dropped. Class 0 is the blank, classes 1..K are the characters of the model's
``character`` metadata (one per line), class K + 1 is the space.

Splits: ``calib`` and ``eval`` (DejaVu faces, 3-25 printable ASCII characters), and ``hard``,
recognition only: held-out lines of 16-28 characters with more brackets and symbols, in fonts
the other splits never use, rotated, blurred, noisy and low in contrast
(:func:`text_render.hard_style`); its texts come from the evaluation half of the text split, so
they never meet a calibration line. ``train``, recognition only: a wider stream to train on
(``distill.train_data``), from the calibration half of the text split in the calibration faces
and matplotlib's STIX serif: a third of its lines random runs of every printable character
(:func:`text_render.alphabet_text`), a third 14-34 characters long, over a wider range of
contrast, noise and blur, stretched or squeezed in width, some slanted or a pixel bolder or
lighter (:func:`text_render.train_style`); never rotated, never in a hard face.

Detection input: 640x640 pages with several lines at random places, same normalization,
``{"x": float32 [1, 3, 640, 640]}``; labels: the ink boxes of the lines.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from onnxcomp.calibration import Dataset
from onnxcomp.edits import edit_distance
from onnxcomp.errors import OnnxcompError, UserError
from onnxcomp.zoo import text_render, wheels

WHEEL = wheels.PinnedWheel(
    project="rapidocr_onnxruntime",
    version="1.4.4",
    filename="rapidocr_onnxruntime-1.4.4-py3-none-any.whl",
    sha256="971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf",
)

# zoo name -> (member of the wheel, sha256 of the member)
MODELS = {
    "ppocr-rec": ("rapidocr_onnxruntime/models/ch_PP-OCRv4_rec_infer.onnx",
                  "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b"),
    "ppocr-det": ("rapidocr_onnxruntime/models/ch_PP-OCRv4_det_infer.onnx",
                  "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"),
}

REC_HEIGHT, REC_WIDTH = 48, 320
DET_SIZE = 640
REC_OUTPUT = "softmax_11.tmp_0"
DET_OUTPUT = "sigmoid_0.tmp_0"
DET_THRESHOLD = 0.3  # the binarization threshold of the DB post-processing

# The generated text only uses printable ASCII; every such character (space aside, which the
# decoder appends) is in the model's character list (checked by the tests).
ALPHABET = frozenset(text_render.PRINTABLE + " ")

# Splits draw from different seed streams, and a text belongs to one split only
# (text_render.text_split), so calibration and evaluation data never share a line.
_SPLITS = {"calib": 0, "eval": 1, "hard": 2, "train": 3}  # the seed stream of each split
# Which half of the text split (text_render.text_split) each split's lines come from.
_TEXT_HALF = {"calib": 0, "eval": 1, "hard": 1, "train": 0}


def _check_name(name: str) -> None:
    if name not in MODELS:
        raise UserError(f"{name!r} is not a PP-OCR zoo model ({', '.join(MODELS)})")


def fetch(name: str, folder: Path) -> Path:
    """``folder/model.onnx``, checked by sha256; extracted from the (cached) wheel if needed."""
    _check_name(name)
    member, sha256 = MODELS[name]
    target = Path(folder) / "model.onnx"
    if target.is_file() and wheels.sha256_file(target) == sha256:
        return target
    from onnxcomp.zoo import cache_dir

    wheel_path = wheels.ensure_wheel(WHEEL, cache_dir() / "wheels")
    return wheels.extract_member(wheel_path, member, target, sha256)


# ---------------------------------------------------------------------------------------------
# recognition: preprocessing, CTC decoding, metric


def preprocess_line(image: np.ndarray) -> np.ndarray:
    """uint8 RGB [H, W, 3] line crop -> float32 [3, 48, 320] as PaddleOCR's recognizer feeds it."""
    height, width = image.shape[:2]
    resized_width = min(REC_WIDTH, math.ceil(REC_HEIGHT * width / height))
    resized = Image.fromarray(image[..., ::-1].copy(), "RGB").resize(
        (resized_width, REC_HEIGHT), Image.Resampling.BILINEAR)
    pixels = np.asarray(resized, dtype=np.float32).transpose(2, 0, 1) / 255.0
    pixels = (pixels - 0.5) / 0.5
    padded = np.zeros((3, REC_HEIGHT, REC_WIDTH), dtype=np.float32)
    padded[:, :, :resized_width] = pixels
    return padded


def ctc_classes(characters: Sequence[str]) -> list[str]:
    """The class table of the CTC head: blank (as ''), the characters, then the space."""
    return ["", *characters, " "]


def ctc_greedy_decode(probs: np.ndarray, classes: Sequence[str]) -> list[str]:
    """Greedy CTC over [N, T, C] scores: argmax per step, collapse repeats, drop blank (class 0)."""
    probs = np.asarray(probs)
    if probs.ndim != 3:
        raise ValueError(f"expected scores of shape [N, T, C], got {list(probs.shape)}")
    if probs.shape[2] > len(classes):
        raise ValueError(f"the scores have {probs.shape[2]} classes, the table {len(classes)}")
    texts = []
    for best in probs.argmax(axis=2):
        keep = np.ones(best.shape, dtype=bool)
        keep[1:] = best[1:] != best[:-1]
        keep &= best != 0
        texts.append("".join(classes[i] for i in best[keep]))
    return texts


def model_characters(model) -> list[str]:
    """The ``character`` metadata of a PP-OCR recognizer (a Model or ModelProto)."""
    proto = getattr(model, "proto", model)
    for prop in proto.metadata_props:
        if prop.key == "character":
            return prop.value.split("\n")
    raise UserError("the model has no 'character' metadata (not a PP-OCR recognizer?)")


@functools.lru_cache(maxsize=2)
def _reference_characters() -> tuple[str, ...]:
    from onnxcomp import model as model_io
    from onnxcomp import zoo

    return tuple(model_characters(model_io.load(zoo.fetch("ppocr-rec"))))


def text_accuracy(predicted: Sequence[str], expected: Sequence[str]) -> dict[str, float]:
    """Exact-line accuracy and character accuracy (1 - total edit distance / total length).

    Spaces at the ends of a prediction are dropped first: the recognizer reads a wide left or
    right margin as a space, and the labels have none there (inner spaces count)."""
    predicted = [p.strip(" ") for p in predicted]
    if len(predicted) != len(expected):
        raise ValueError(f"{len(predicted)} predictions for {len(expected)} labels")
    if not expected:
        return {"line_accuracy": 0.0, "char_accuracy": 0.0}
    lines = sum(p == e for p, e in zip(predicted, expected))
    errors = sum(edit_distance(p, e) for p, e in zip(predicted, expected))
    length = sum(len(e) for e in expected)
    return {"line_accuracy": lines / len(expected),
            "char_accuracy": max(0.0, 1.0 - errors / max(length, 1))}


def _output(batch_outputs: dict[str, np.ndarray], name: str) -> np.ndarray:
    if name in batch_outputs:
        return batch_outputs[name]
    if len(batch_outputs) == 1:
        return next(iter(batch_outputs.values()))
    raise UserError(f"the model outputs {sorted(batch_outputs)}, expected {name!r}")


def recognize(model, outputs: Sequence[dict[str, np.ndarray]]) -> list[str]:
    """Decoded texts of every batch's recognizer output, in order."""
    try:
        characters = model_characters(model)
    except OnnxcompError:  # a compressed copy that lost its metadata: use the reference's
        characters = list(_reference_characters())
    classes = ctc_classes(characters)
    texts: list[str] = []
    for batch_outputs in outputs:
        texts.extend(ctc_greedy_decode(_output(batch_outputs, REC_OUTPUT), classes))
    return texts


def task_metric(name: str, model, outputs: Sequence[dict[str, np.ndarray]],
                labels: Sequence | None) -> dict[str, float]:
    """ppocr-rec: line and character accuracy; ppocr-det: text/background pixel agreement."""
    _check_name(name)
    if labels is None:
        return {}
    if name == "ppocr-rec":
        expected = [text for batch_labels in labels for text in batch_labels]
        return text_accuracy(recognize(model, outputs), expected)
    return detection_scores([_output(o, DET_OUTPUT) for o in outputs], labels)


def task_changes(name: str, reference, candidate,
                 ref_outputs: Sequence[dict[str, np.ndarray]],
                 cand_outputs: Sequence[dict[str, np.ndarray]], labels: Sequence | None,
                 data_name: str = "") -> dict | None:
    """ppocr-rec: the lines whose text the candidate reads differently from the reference, with
    the label and both readings (:func:`onnxcomp.report_data.changed_lines`), and each line's
    input image where ``data_name`` is this zoo's generated data (``ppocr-rec:eval:100``, seed
    0, checked against the labels); None for other models or without labels."""
    if name != "ppocr-rec" or labels is None:
        return None
    from onnxcomp.report_data import changed_lines

    expected = [text for batch_labels in labels for text in batch_labels]
    ref_text, cand_text = recognize(reference, ref_outputs), recognize(candidate, cand_outputs)
    if not len(expected) == len(ref_text) == len(cand_text):
        return None  # not one line per label: nothing to pair
    return changed_lines(expected, ref_text, cand_text, _line_images(data_name, expected))


class _LineImages:
    """The rendered crops of generated lines, drawn on demand: only the lines shown are drawn."""

    def __init__(self, split: str):
        self.split = split

    def __getitem__(self, index: int) -> np.ndarray:
        return rec_line(0, self.split, index)[1]


def _line_images(data_name: str, labels: Sequence[str]) -> _LineImages | None:
    """The images of ``data_name`` when it is this zoo's generator (``ppocr-rec:SPLIT:N``, maybe
    cut to ``[:n]``) with the default seed: checked on the first label; else None."""
    parts = data_name.split(":")
    if len(parts) < 3 or parts[0] != "ppocr-rec" or parts[1] not in _SPLITS or not labels:
        return None
    if rec_line(0, parts[1], 0)[0] != labels[0]:
        return None
    return _LineImages(parts[1])


# ---------------------------------------------------------------------------------------------
# data


def _item_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLITS[split], int(index)])


def _allowed(text: str) -> bool:
    return all(c in ALPHABET for c in text)


def _line_text(rng: np.random.Generator, split: str) -> str:
    if split == "hard":
        return text_render.texts_for_split(rng, _TEXT_HALF[split], 1, allowed=_allowed,
                                           line=text_render.hard_text)[0]
    if split == "train":
        return text_render.texts_for_split(rng, _TEXT_HALF[split], 1, allowed=_allowed,
                                           line=text_render.train_text)[0]
    return text_render.texts_for_split(rng, _TEXT_HALF[split], 1, allowed=_allowed)[0]


def rec_line(seed: int, split: str, index: int) -> tuple[str, np.ndarray]:
    """The text and the rendered uint8 RGB crop of one recognition item."""
    rng = _item_rng(seed, split, index)
    text = _line_text(rng, split)
    if split == "hard":
        return text, text_render.render_hard_line(text, text_render.hard_style(rng), rng)
    if split == "train":
        return text, text_render.render_train_line(text, text_render.train_style(rng), rng)
    style = text_render.random_style(rng)
    return text, text_render.render_line(text, style, rng)


def _rec_dataset(split: str, count: int, seed: int) -> Dataset:
    # fail early, with a clear message, when no font is found
    if split == "hard":
        text_render.hard_font_files()
    else:
        text_render.font_files()
    labels = [[_line_text(_item_rng(seed, split, i), split)] for i in range(count)]

    def make(i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < count:
            raise IndexError(i)
        _, image = rec_line(seed, split, i)
        return {"x": preprocess_line(image)[None]}

    return Dataset(f"ppocr-rec:{split}:{count}", count, make, labels)


def _page_layout(seed: int, split: str, index: int):
    rng = _item_rng(seed, split, index)
    count = int(rng.integers(3, 9))
    texts = text_render.texts_for_split(rng, _TEXT_HALF[split], count, allowed=_allowed)
    return rng, text_render.layout_page(rng, texts, DET_SIZE)


def det_page(seed: int, split: str, index: int) -> tuple[list, np.ndarray]:
    """The placed lines and the rendered uint8 RGB page of one detection item."""
    rng, lines = _page_layout(seed, split, index)
    return lines, text_render.render_page(lines, rng, DET_SIZE)


def preprocess_page(image: np.ndarray) -> np.ndarray:
    """uint8 RGB [640, 640, 3] -> float32 [3, 640, 640], BGR, ``(x / 255 - 0.5) / 0.5``."""
    pixels = image[..., ::-1].astype(np.float32).transpose(2, 0, 1) / 255.0
    return np.ascontiguousarray((pixels - 0.5) / 0.5)


def _det_dataset(split: str, count: int, seed: int) -> Dataset:
    text_render.font_files()
    labels = [[(*line.box, line.text) for line in _page_layout(seed, split, i)[1]]
              for i in range(count)]

    def make(i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < count:
            raise IndexError(i)
        _, image = det_page(seed, split, i)
        return {"x": preprocess_page(image)[None]}

    return Dataset(f"ppocr-det:{split}:{count}", count, make, labels)


def dataset(name: str, split: str, count: int, seed: int = 0) -> Dataset:
    _check_name(name)
    if split not in _SPLITS:
        raise UserError(f"unknown data split {split!r}: use calib, eval, hard or train")
    if count <= 0:
        raise UserError(f"the data count must be positive, got {count}")
    if name == "ppocr-rec":
        return _rec_dataset(split, count, seed)
    if split in ("hard", "train"):
        raise UserError(f"the {split} split is ppocr-rec's only (line crops): use calib or "
                        "eval for ppocr-det")
    return _det_dataset(split, count, seed)


# ---------------------------------------------------------------------------------------------
# detection metric


def detection_scores(maps: Sequence[np.ndarray], labels: Sequence, threshold: float = DET_THRESHOLD
                     ) -> dict[str, float]:
    """How well the probability maps separate text from background, at the DB threshold.

    ``text_recall``: fraction of pixels in the central part of each ink box (the box shrunk by a
    third of its height on each side, as DB's targets are shrunk boxes) where the map exceeds the
    threshold; ``background_clean``: fraction of pixels outside every (slightly grown) box where
    it stays below; ``boxes_found``: fraction of boxes whose central part is mostly above it.
    """
    text_hits = text_total = clean = background = found = boxes = 0
    for page_maps, page_boxes in zip(maps, labels):
        prob = np.asarray(page_maps, dtype=np.float32).reshape(-1, *np.shape(page_maps)[-2:])[0]
        height, width = prob.shape
        inside = np.zeros(prob.shape, dtype=bool)
        above = prob > threshold
        for x0, y0, x1, y1, *_ in page_boxes:
            margin = max(1, (y1 - y0) // 3)
            core = above[y0 + margin:max(y1 - margin, y0 + margin + 1),
                         x0 + margin:max(x1 - margin, x0 + margin + 1)]
            text_hits += int(core.sum())
            text_total += core.size
            found += bool(core.mean() > 0.5) if core.size else 0
            boxes += 1
            grow = max(2, (y1 - y0) // 2)
            inside[max(0, y0 - grow):min(height, y1 + grow),
                   max(0, x0 - grow):min(width, x1 + grow)] = True
        clean += int((~above & ~inside).sum())
        background += int((~inside).sum())
    return {"text_recall": text_hits / max(text_total, 1),
            "background_clean": clean / max(background, 1),
            "boxes_found": found / max(boxes, 1)}
