"""Where a ppocr-rec student loses the hard lines: accuracy by attribute, and the same texts
re-drawn with one property of the hard split taken away.

For each of the first N hard lines (seed 0): the float model's and the student's reading,
grouped by face, rotation, blur, inversion, length and "holds a character the train stream
never shows" (its characters counted over 3000 train lines); then the same texts drawn level
(no rotation), in a calibration face (DejaVu Sans, the rest of the hard style kept) and in the
train style, which tells a face from a text problem; and the edits the student makes where float
reads the line right.

    python benchmarks/rec_hard_breakdown.py STUDENT.onnx [--lines 256] [--out F.json]
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import difflib
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxcomp import model as model_io
from onnxcomp import zoo
from onnxcomp.zoo import ppocr
from onnxcomp.zoo import text_render as tr


def session(path: str) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def read(sess: ort.InferenceSession, images: list[np.ndarray], classes: list[str]) -> list[str]:
    x = np.stack([ppocr.preprocess_line(image) for image in images])
    texts: list[str] = []
    for start in range(0, len(x), 16):
        scores = sess.run(None, {"x": x[start:start + 16]})[0]
        texts += ppocr.ctc_greedy_decode(scores, classes)
    return [t.strip(" ") for t in texts]


def hard_items(count: int) -> list[dict]:
    """Each hard line's text, style and image, and the three re-drawings of its text."""
    items = []
    for i in range(count):
        rng = ppocr._item_rng(0, "hard", i)
        text = ppocr._line_text(rng, "hard")
        style = tr.hard_style(rng)
        image = tr.render_hard_line(text, style, rng)
        other = np.random.default_rng([9, i])  # the re-drawings' own noise
        calib_face = tr.LineStyle(**{**style.line.__dict__, "font_path": tr.font_files()[0]})
        items.append({
            "text": text, "style": style, "hard": image,
            "level": tr.render_hard_line(text, dataclasses.replace(style, angle=0.0), other),
            "calibration face": tr.render_hard_line(
                text, dataclasses.replace(style, line=calib_face), other),
            "train style": tr.render_train_line(text, tr.train_style(other), other)})
    return items


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("student")
    parser.add_argument("--lines", type=int, default=256)
    parser.add_argument("--out")
    args = parser.parse_args()
    reference = str(zoo.fetch("ppocr-rec"))
    classes = ppocr.ctc_classes(ppocr.model_characters(model_io.load(reference)))
    teacher, student = session(reference), session(args.student)
    train_chars: set[str] = set()
    for i in range(3000):
        train_chars |= set(ppocr._line_text(ppocr._item_rng(0, "train", i), "train"))
    items = hard_items(args.lines)
    texts = [item["text"] for item in items]
    result: dict = {"student": args.student, "lines": args.lines, "drawn as": {}, "by": {}}
    readings = {}
    for kind in ("hard", "level", "calibration face", "train style"):
        images = [item[kind] for item in items]
        readings[kind] = (read(teacher, images, classes), read(student, images, classes))
        result["drawn as"][kind] = {
            who: round(float(np.mean([a == b for a, b in zip(got, texts)])), 4)
            for who, got in zip(("float", "student"), readings[kind])}
    floats, students = readings["hard"]
    attributes = {
        "face": lambda it: it["style"].line.font_path.name,
        "|angle| (0.5 degree bins)": lambda it: round(abs(it["style"].angle) * 2) / 2,
        "blurred": lambda it: it["style"].line.blur > 0,
        "inverted": lambda it: sum(it["style"].line.ink) > sum(it["style"].line.paper),
        "length (4-character bins)": lambda it: len(it["text"]) // 4 * 4,
        "holds a character the train stream never shows":
            lambda it: bool(set(it["text"]) - train_chars),
    }
    for name, key in attributes.items():
        groups: dict = collections.defaultdict(list)
        for item, f, s in zip(items, floats, students):
            groups[str(key(item))].append((f == item["text"], s == item["text"]))
        result["by"][name] = {k: {"n": len(v), "float": round(float(np.mean([a for a, _ in v])), 3),
                                  "student": round(float(np.mean([b for _, b in v])), 3)}
                              for k, v in sorted(groups.items())}
    edits: collections.Counter = collections.Counter()
    for text, f, s in zip(texts, floats, students):
        if f == text and s != text:
            for op, i1, i2, j1, j2 in difflib.SequenceMatcher(None, text, s).get_opcodes():
                if op != "equal":
                    edits[f"{text[i1:i2]!r} -> {s[j1:j2]!r}"] += 1
    result["unseen characters"] = "".join(sorted(set("".join(texts)) - train_chars))
    result["student edits where float is right"] = dict(edits.most_common(15))
    for kind, scores in result["drawn as"].items():
        print(f"drawn as {kind:17s} float {scores['float']:.3f}  student {scores['student']:.3f}")
    for name, groups in result["by"].items():
        print(f"-- by {name}")
        for k, v in groups.items():
            print(f"   {k:36s} n={v['n']:4d}  float {v['float']:.2f}  student {v['student']:.2f}")
    print("characters of the hard lines the train stream never shows:",
          repr(result["unseen characters"]))
    print("student edits where float is right:", result["student edits where float is right"])
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
