"""lowrank: parameters, latency and fidelity vs energy, plain SVD vs activation-aware.

For each model and each energy (0.9999, 0.999, 0.99, 0.95, 0.9) and each variant (plain SVD, activation-aware):
- parameters after / before (whole model) and how many layers were factored;
- p50 latency ratio vs the original: ONNX Runtime default optimizations, CPU, 1 thread, all
  models' sessions timed interleaved in one process, medians of ``--runs`` (>= 30);
- fidelity on evaluation data disjoint from the calibration data: mean per-sample output cosine,
  the predicted relative output error (the whitened spectrum's discarded energy), and a task proxy:
  for CLIP-like models the fraction of image->text nearest neighbours unchanged; for ppocr-rec the
  fraction of CTC time steps whose argmax is unchanged.

Models: clip-vit-b32 (zoo, ViT-B/32 size, seeded random weights; pass ``--energies 0.9`` to keep
the run short), minilm (real weights), tiny-clip (zoo, seeded random weights), a wider and deeper tiny-clip
(``tiny_clip.build(width=256, layers=4)``), the same with synthetic decaying spectra (each
MatMul/Gemm weight's singular values reshaped to s_i ∝ i^-0.5, same Frobenius norm: a stand-in
for trained weights, labelled as such), and ppocr-rec (real trained PP-OCRv4 weights).
Calibration: the zoo's calib split (16 batches); evaluation: its eval split (disjoint).

    python benchmarks/lowrank.py [--runs 40] [--models tiny-clip,tiny-clip-wide,...] [--json F]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from onnxcomp import runtime, zoo
from onnxcomp.calibration import Dataset
from onnxcomp.graph import constant_array, export_model, import_graph
from onnxcomp.model import Model, load
from onnxcomp.passes import lowrank
from onnxcomp.pipeline import Context
from onnxcomp.report import environment, markdown_table
from onnxcomp.zoo import tiny_clip

ENERGIES = (0.9999, 0.999, 0.99, 0.95, 0.9)
# A fixed rank (a quarter of min(K, N)) gives plain and activation-aware the same parameters, so
# their fidelity compares directly even where energy rules factor nothing.
RANK_RATIO = 0.25


# --- models -------------------------------------------------------------------------------------

def decayed_spectra(model: Model, power: float = 0.5) -> Model:
    """Every 2-D MatMul/Gemm weight with singular values reshaped to s_i ∝ (i+1)^-power, same
    Frobenius norm and singular vectors: a synthetic stand-in for trained weights."""
    graph = import_graph(model)
    for node in graph.nodes:
        if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
            continue
        w = constant_array(node.inputs[1])
        if w is None or w.ndim != 2 or not hasattr(node.inputs[1], "values"):
            continue
        u, s, vt = np.linalg.svd(w.astype(np.float64), full_matrices=False)
        shaped = (np.arange(len(s)) + 1.0) ** -power
        shaped *= np.linalg.norm(s) / np.linalg.norm(shaped)
        node.inputs[1].values = ((u * shaped) @ vt).astype(w.dtype)
    return export_model(graph, like=model)


def clip_model(wide: bool) -> tuple[Model, str]:
    if wide:
        return Model(tiny_clip.build(width=256, layers=4)), "zoo tiny_clip.build(width=256, layers=4)"
    return load(zoo.fetch("tiny-clip")), "zoo tiny-clip"


def cases(names: list[str]):
    for name in names:
        if name == "ppocr-rec":
            yield (name, load(zoo.fetch(name)), zoo.dataset(name, "calib", 16),
                   zoo.dataset(name, "eval", 32), "zoo ppocr-rec (real PP-OCRv4 weights)")
            continue
        if name == "minilm":
            yield (name, load(zoo.fetch(name)), zoo.dataset(name, "calib", 32),
                   zoo.dataset(name, "eval", 64),
                   ("zoo minilm (real all-MiniLM-L6-v2 weights; fidelity on sentence_embedding: "
                    "token_embeddings vary in length per sentence)"))
            continue
        if name == "clip-vit-b32":
            yield (name, load(zoo.fetch(name)), zoo.dataset(name, "calib", 16),
                   zoo.dataset(name, "eval", 16),
                   "zoo clip-vit-b32 (Hugging Face CLIP at ViT-B/32 size, seeded random weights)")
            continue
        model, source = clip_model(wide=name != "tiny-clip")
        if name == "tiny-clip-wide-decayed":
            model, source = decayed_spectra(model), source + ", spectra reshaped (synthetic)"
        yield (name, model, zoo.dataset("tiny-clip", "calib", 16),
               zoo.dataset("tiny-clip", "eval", 16), source)


# --- measurements -------------------------------------------------------------------------------

def outputs_over(model: Model, data: Dataset) -> dict[str, np.ndarray]:
    sess = runtime.session(model, optimize=False)
    collected: dict[str, list[np.ndarray]] = {}
    for batch in data:
        for name, value in runtime.run(sess, batch).items():
            collected.setdefault(name, []).append(value)
    # Outputs whose shape varies between batches (token embeddings of unpadded sentences)
    # can't be stacked; the fidelity uses the others.
    return {name: np.concatenate(values) for name, values in collected.items()
            if len({v.shape[1:] for v in values}) == 1}


def fidelity(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray]) -> dict:
    cosines = []
    for name, ref in reference.items():
        a = ref.reshape(ref.shape[0], -1).astype(np.float64)
        b = candidate[name].reshape(a.shape).astype(np.float64)
        cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)
        cosines.append(float(cos.mean()))
    result = {"cosine": min(cosines)}
    names = list(reference)
    image = next((n for n in names if "image" in n), None)
    text = next((n for n in names if "text" in n), None)
    if image and text:
        def nearest(out):
            return np.argmax(out[image] @ out[text].T, axis=1)
        result["retrieval_agreement"] = float(np.mean(nearest(reference) == nearest(candidate)))
    elif len(names) == 1 and reference[names[0]].ndim == 3:  # CTC: (batch, time, classes)
        ref, cand = reference[names[0]].argmax(-1), candidate[names[0]].argmax(-1)
        result["argmax_agreement"] = float(np.mean(ref == cand))
        result["line_agreement"] = float(np.mean([_ctc(a) == _ctc(b) for a, b in zip(ref, cand)]))
    return result


def _ctc(path: np.ndarray) -> list[int]:
    """Greedy CTC decoding: collapse repeats, drop the blank (class 0)."""
    return [int(c) for i, c in enumerate(path) if c != 0 and (i == 0 or c != path[i - 1])]


def latencies(models: list[Model], feeds: dict[str, np.ndarray], runs: int) -> list[float]:
    sessions = [runtime.session(m, threads=1, optimize=True) for m in models]
    for sess in sessions:  # warm-up
        for _ in range(3):
            sess.run(None, feeds)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, sess in enumerate(sessions):
            start = time.perf_counter()
            sess.run(None, feeds)
            times[i].append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]


def bench_case(name, model, calib, evaluation, source, runs, energies=ENERGIES) -> dict:
    ctx = Context(calibration=calib)
    reference = outputs_over(model, evaluation)
    variants = [("original", None, None, model, None)]
    rules = [{"energy": e} for e in energies] + [{"rank_ratio": RANK_RATIO}]
    for rule in rules:
        for aware in (False, True):
            config = lowrank.Config(**rule, activation_aware=aware)
            out, record = lowrank.PASS.run(model, config, ctx)
            label = f"energy {rule['energy']}" if "energy" in rule else f"rank ×{RANK_RATIO}"
            variants.append(("aware" if aware else "plain", label, record, out, config))
    feeds = evaluation.make_batch(0)
    p50 = latencies([v[3] for v in variants], feeds, runs)
    rows = []
    for (kind, rule, record, out, _), median in zip(variants, p50):
        row = {"model": name, "variant": kind, "rule": rule, "p50_ms": median * 1e3,
               "latency_ratio": median / p50[0], "params": out.parameter_count(),
               "params_ratio": out.parameter_count() / model.parameter_count()}
        if record is not None:
            layers = record.details["layers"]
            candidates = [s for s in record.skipped if "break-even" in s[1]]
            row.update(factored=len(layers), candidates=len(layers) + len(candidates),
                       predicted_error=float(np.mean([lyr["rel_output_error"] for lyr in layers]))
                       if layers else 0.0,
                       **fidelity(reference, outputs_over(out, evaluation)))
        rows.append(row)
    return {"model": name, "source": source, "rows": rows,
            "calibration": calib.name, "evaluation": evaluation.name}


def table(results: list[dict]) -> str:
    headers = ["model", "rank rule", "variant", "layers factored", "params ×", "p50 ms",
               "latency ×", "mean layer error", "output cosine", "task agreement"]
    rows = []
    for result in results:
        for r in result["rows"]:
            task = r.get("retrieval_agreement", r.get("line_agreement"))
            rows.append([r["model"], r["rule"] or "-", r["variant"],
                         f"{r['factored']}/{r['candidates']}" if "factored" in r else "-",
                         f"{r['params_ratio']:.3f}", f"{r['p50_ms']:.3f}",
                         f"{r['latency_ratio']:.3f}",
                         f"{r['predicted_error']:.3f}" if "predicted_error" in r else "-",
                         f"{r['cosine']:.4f}" if "cosine" in r else "-",
                         f"{task:.3f}" if task is not None else "-"])
    return markdown_table(headers, rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--models", default="tiny-clip,tiny-clip-wide,tiny-clip-wide-decayed,"
                                            "ppocr-rec")
    parser.add_argument("--energies", default=",".join(map(str, ENERGIES)),
                        help="energy thresholds to try (the rank ×0.25 rule always runs); "
                             "fewer keeps the 600 MB clip-vit-b32 case within memory and time")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if args.runs < 30:
        parser.error("--runs must be >= 30 (medians of at least 30 runs)")
    results = []
    for case in cases(args.models.split(",")):
        print(f"{case[0]}: {case[4]}", file=sys.stderr)
        energies = tuple(float(e) for e in args.energies.split(",") if e)
        results.append(bench_case(*case, runs=args.runs, energies=energies))
    print(table(results))
    for result in results:
        print(f"- {result['model']}: {result['source']}; calibration {result['calibration']}, "
              f"evaluation {result['evaluation']}")
    if args.json:
        args.json.write_text(json.dumps({"environment": environment(), "results": results},
                                        indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
