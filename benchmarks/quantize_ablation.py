"""Each pre-quantization technique of the quantize pass on and off, same models and data, one run.

Techniques: depthwise input equalization, saturation ranges (a tensor only HardSwish/HardSigmoid/
Relu/Clip read, calibrated clipped at their bounds) and HardSwish on uint8 (``integer_hardswish``),
each taken off on its own row (they are defaults); cross-layer equalization (``equalize``), bias correction (``bias_correction``:
``weights``, and ``all`` which with static int8 also corrects the inputs' rounding and clipping)
GPTQ for int8 MatMul/Gemm weights (``int8_method = "gptq"``), alone and with equalization, and
SmoothQuant (``smoothquant_alpha``, MatMuls reading a LayerNormalization: MiniLM, PP-OCR rec's
SVTR block) at 0.5 on LayerNormalization outputs, alone and with GPTQ, and with each tensor's
alpha chosen on every MatMul input (``auto``, ``all``), against the plain pass (the defaults:
both int8 modes include SmoothQuant auto on every MatMul input of a transformer, which the
``dynamic_smoothquant=false`` / ``static_smoothquant=false`` rows take off), and loss-aware
activation ranges (``range_search``, static int8). Fidelity only, no timing:
- ppocr-rec, static int8: line and character accuracy on the zoo evaluation lines and on the
  held-out ``hard`` split (other fonts, longer lines, blur, noise, low contrast), beside float;
- ppocr-det, static int8: cosine of the probability map against float and the IoU of the text
  masks at the DB threshold (0.3), on a few evaluation pages;
- minilm, static int8 and int8-dynamic: cosine of each held-out sentence embedding against float
  and nearest-neighbour agreement (each sentence's nearest other sentence is the same one).
  Equalization has no Conv chain there: its rows are left out.
A last row per mode quantizes plainly on the first three quarters of the calibration data: how
far the figures move with the calibration sample alone (the noise floor of the comparison).

    python benchmarks/quantize_ablation.py --eval 128 --hard 256 --pages 8
    python benchmarks/quantize_ablation.py --models ppocr-rec --techniques plain range_search \
        --calib-seed 1 --out FILE.json     (some rows, another calibration draw, docs untouched)

Writes ``benchmarks/results/quantize_ablation.json`` (the models run replace their entries) and
the table between the markers in ``docs/quantize.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from onnxcomp import runtime, zoo
from onnxcomp.model import load
from onnxcomp.passes import quantize
from onnxcomp.pipeline import Context
from onnxcomp.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "quantize.md"
RESULTS = ROOT / "benchmarks" / "results" / "quantize_ablation.json"
BEGIN, END = "<!-- quantize_ablation:begin -->", "<!-- quantize_ablation:end -->"
# "plain" is the defaults (depthwise input equalization on since 2026-12-06): its own row
# takes it off.
TECHNIQUES = {"plain": {}, "depthwise_equalize=false": {"depthwise_equalize": False},
              "saturation_ranges=false": {"saturation_ranges": False},
              "integer_hardswish=false": {"integer_hardswish": False},
              "equalize": {"equalize": True},
              "bias_correction=weights": {"bias_correction": "weights"},
              "bias_correction=all": {"bias_correction": "all"},
              "equalize + bias_correction=weights": {"equalize": True,
                                                     "bias_correction": "weights"},
              "int8_method=gptq": {"int8_method": "gptq"},
              "equalize + int8_method=gptq": {"equalize": True, "int8_method": "gptq"},
              "dynamic_smoothquant=false": {"dynamic_smoothquant": False},
              "static_smoothquant=false": {"static_smoothquant": False},
              "smoothquant_alpha=0.5": {"smoothquant_alpha": 0.5},
              "smoothquant_alpha=0.5 + int8_method=gptq": {"smoothquant_alpha": 0.5,
                                                          "int8_method": "gptq"},
              "smoothquant_alpha=auto, inputs=all": {"smoothquant_alpha": "auto",
                                                     "smoothquant_inputs": "all"},
              "range_search": {"range_search": True}}
MODES = {"ppocr-rec": ("int8",), "ppocr-det": ("int8",), "minilm": ("int8", "int8-dynamic")}


def _outputs(path: Path, data) -> list[dict[str, np.ndarray]]:
    session = runtime.session(path)
    names = [o.name for o in session.get_outputs()]
    return [dict(zip(names, session.run(None, batch))) for batch in data]


def _rec_metrics(path: Path, sets: dict, reference: dict | None = None) -> dict:
    """Line and character accuracy per data set, and (``reference``: float's outputs) the mean
    cosine of the per-step class scores against float on the hard lines."""
    from onnxcomp.zoo import ppocr

    model = load(path)
    found = {}
    for label, data in sets.items():
        outputs = _outputs(path, data)
        scores = ppocr.task_metric("ppocr-rec", model, outputs, data.labels)
        found.update({f"{label}_{k}": round(v, 4) for k, v in scores.items()})
        if reference is not None and label == "hard":
            cos = [float(np.sum(a * b) / (np.linalg.norm(a) * np.linalg.norm(b)))
                   for ref, out in zip(reference[label], outputs)
                   for a, b in zip(ref[ppocr.REC_OUTPUT][0].astype(np.float64),
                                   out[ppocr.REC_OUTPUT][0].astype(np.float64))]
            found["hard_step_cosine"] = round(float(np.mean(cos)), 5)
    return found


def _det_metrics(path: Path, reference: list, data) -> dict:
    from onnxcomp.zoo import ppocr

    maps = [o[ppocr.DET_OUTPUT] for o in _outputs(path, data)]
    cosines, ious = [], []
    for ref, out in zip(reference, maps):
        a, b = ref.ravel().astype(np.float64), out.ravel().astype(np.float64)
        cosines.append(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b))))
        ma, mb = ref > ppocr.DET_THRESHOLD, out > ppocr.DET_THRESHOLD
        ious.append(float((ma & mb).sum() / max((ma | mb).sum(), 1)))
    return {"map_cosine": round(float(np.mean(cosines)), 5),
            "mask_iou": round(float(np.mean(ious)), 4)}


def _embeddings(path: Path, data) -> np.ndarray:
    rows = [o["sentence_embedding"] for o in _outputs(path, data)]
    return np.concatenate(rows).astype(np.float64)


def _minilm_metrics(path: Path, reference: np.ndarray, data) -> dict:
    emb = _embeddings(path, data)
    norm = lambda m: m / np.linalg.norm(m, axis=1, keepdims=True)
    ref, emb = norm(reference), norm(emb)
    cosine = np.sum(ref * emb, axis=1)

    def nearest(m):
        sims = m @ m.T
        np.fill_diagonal(sims, -np.inf)
        return sims.argmax(axis=1)

    return {"cosine": round(float(cosine.mean()), 5),
            "cosine_min": round(float(cosine.min()), 5),
            "nn_agreement": round(float(np.mean(nearest(ref) == nearest(emb))), 4)}


def run_model(name: str, args, folder: Path) -> dict:
    source = zoo.fetch(name)
    calib = zoo.dataset(name, "calib", args.det_calib if name == "ppocr-det" else args.calib,
                        args.calib_seed)
    counts = {"ppocr-det": args.pages}
    evaluation = zoo.dataset(name, "eval", counts.get(name, args.eval))
    sets = {"eval": evaluation}
    if name == "ppocr-rec":
        sets["hard"] = zoo.dataset(name, "hard", args.hard)
    rows = []
    reference = None
    if name == "ppocr-rec":
        rows.append({"mode": "float", "technique": "-", **_rec_metrics(source, sets)})
        reference = {"hard": _outputs(source, sets["hard"])}
    if name == "ppocr-det":
        from onnxcomp.zoo import ppocr

        reference = [o[ppocr.DET_OUTPUT] for o in _outputs(source, evaluation)]
    if name == "minilm":
        reference = _embeddings(source, evaluation)
    # The noise floor: the plain pass on the first three quarters of the same calibration data.
    subset = calib.take(max(1, len(calib) * 3 // 4))
    variants = [*TECHNIQUES.items(), (f"plain, calibration[:{len(subset)}]", {})]
    if args.techniques:
        variants = [(k, v) for k, v in variants if k in args.techniques]
    for mode in MODES[name]:
        for technique, fields in variants:
            if name == "minilm" and (fields.get("equalize") or "depthwise_equalize" in fields
                                     or {"saturation_ranges", "integer_hardswish"} & set(fields)):
                continue  # no Conv, no HardSwish: nothing to equalize or saturate
            if mode != "int8" and (fields.get("bias_correction") == "all"
                                   or "range_search" in fields):
                continue  # static input quantizers only ("all" is "weights" without them)
            if name == "ppocr-det" and "smoothquant_alpha" in fields:
                continue  # no LayerNormalization or MatMul: nothing for SmoothQuant to act on
            if "dynamic_smoothquant" in fields and mode != "int8-dynamic":
                continue  # int8-dynamic's default (with calibration data): its own row
            if "static_smoothquant" in fields and (mode != "int8" or name != "minilm"):
                continue  # static int8's default acts on transformers only: MiniLM's row
            if mode == "int8" and fields.get("smoothquant_inputs") == "all" \
                    and name == "minilm":
                continue  # that is static int8's default on a transformer, its "plain" row
            if mode == "int8-dynamic" and fields.get("smoothquant_inputs") == "all":
                continue  # that is int8-dynamic's default, its "plain" row
            config = quantize.Config(mode=mode, **fields)
            started = time.perf_counter()
            data = subset if technique.startswith("plain, ") else calib
            result, record = quantize.PASS.run(load(source), config, Context(calibration=data))
            seconds = time.perf_counter() - started
            slug = "".join(c if c.isalnum() else "-" for c in technique)
            path = folder / f"{name}-{mode}-{slug}.onnx"
            result.save(path)
            notes = [n for n in record.notes
                     if n.startswith(("equalize", "bias correction", "int8 GPTQ", "smoothquant"))]
            if name == "ppocr-rec":
                metrics = _rec_metrics(path, sets, reference)
            elif name == "ppocr-det":
                metrics = _det_metrics(path, reference, evaluation)
            else:
                metrics = _minilm_metrics(path, reference, evaluation)
            rows.append({"mode": mode, "technique": technique, **metrics,
                         "quantize_s": round(seconds, 1), "notes": notes})
            print(name, rows[-1], flush=True)
    return {"model": name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": args.command, "calib": len(calib),
            "data": {k: v.name for k, v in sets.items()}, "rows": rows}


COLUMNS = {"ppocr-rec": ("eval_line_accuracy", "eval_char_accuracy", "hard_line_accuracy",
                         "hard_char_accuracy", "hard_step_cosine"),
           "ppocr-det": ("map_cosine", "mask_iou"),
           "minilm": ("cosine", "cosine_min", "nn_agreement")}


def table(results: list[dict]) -> str:
    parts = []
    for result in results:
        columns = COLUMNS[result["model"]]
        rows = [[r["mode"], r["technique"], *(f"{r[c]:.4f}" if c in r else "" for c in columns)]
                for r in result["rows"]]
        parts.append(f"**{result['model']}** (calibration {result['calib']} batches; data "
                     f"{', '.join(result['data'].values())}; {result['date'][:10]}; "
                     f"`{result['command']}`)\n\n"
                     + markdown_table(["mode", "technique", *columns], rows))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--hard", type=int, default=64)
    parser.add_argument("--pages", type=int, default=4, help="ppocr-det evaluation pages")
    parser.add_argument("--det-calib", type=int, default=8, help="ppocr-det calibration pages")
    parser.add_argument("--calib-seed", type=int, default=0, help="the calibration draw")
    parser.add_argument("--techniques", nargs="+", choices=list(TECHNIQUES),
                        help="only these rows (with --out: the docs table is left alone)")
    parser.add_argument("--out", type=Path, help="write the results here instead of "
                        "benchmarks/results/quantize_ablation.json and the docs table")
    args = parser.parse_args()
    args.command = "python benchmarks/quantize_ablation.py " + " ".join(sys.argv[1:])
    if args.techniques and not args.out:
        parser.error("--techniques writes a partial table: give --out")
    existing = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
    with tempfile.TemporaryDirectory() as tmp:
        fresh = [run_model(name, args, Path(tmp)) for name in args.models]
    if args.out:
        args.out.write_text(json.dumps(fresh, indent=1) + "\n")
        print(table(fresh))
        return
    done = {r["model"] for r in fresh}
    results = [r for r in existing if r["model"] not in done] + fresh
    results.sort(key=lambda r: list(MODES).index(r["model"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    doc = DOC.read_text()
    if BEGIN in doc and END in doc:
        head, _, rest = doc.partition(BEGIN)
        _, _, tail = rest.partition(END)
        DOC.write_text(f"{head}{BEGIN}\n{table(results)}\n{END}{tail}")


if __name__ == "__main__":
    main()
