"""Structured pruning at 30 % on the zoo models: parameters, file size, MACs, latency and
fidelity, pruned only and pruned + distill, next to a zeroing-only baseline (the same channels
set to zero, nothing removed).

    python benchmarks/prune.py [--models tiny-clip,tiny-clip-large,ppocr-det,ppocr-rec]
                               [--runs 40] [--det-runs 20] [--out docs/prune_results.json]
                               [--doc docs/prune.md]

Models: the zoo's tiny-clip; a larger tiny-clip (``tiny_clip.build(width=256, layers=4,
heads=8)``, same image size, sequence length and vocabulary, so the zoo's tiny-clip data feeds
it); PP-OCRv4 det (zoo pages, 640×640) and rec (zoo lines, 48×320). Transformers: ``heads`` and
``ffn`` at the ratio; CNNs: ``ratio`` on every prunable conv group. Calibration (importance and
distill) on the zoo's calib split, fidelity on its disjoint eval split.

Latency: ONNX Runtime CPU, default graph optimizations, 1 and 2 threads; the original, pruned,
pruned + distill and zeroed models run interleaved in one process on one eval batch, p50 over
the runs (list order in the JSON: original, pruned, pruned + distill, zeroed and, for the CNNs,
pruned with kept channels rounded up to ``ALIGN``). The CNN rows also get ONNX Runtime's profile
(kernel time per op type, 1 thread) of the original, pruned and aligned models. MACs:
multiply-adds of Conv/ConvTranspose/MatMul/Gemm from the shapes of one real run.
The Markdown tables go into ``--doc`` between ``<!-- prune:begin -->`` and ``<!-- prune:end -->``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import onnxruntime as ort
from doc_tables import write_between

from onnxcomp import calibration, runtime, zoo
from onnxcomp.measure.validate import validate
from onnxcomp.model import Model, load
from onnxcomp.passes import distill, prune
from onnxcomp.pipeline import Context, Pipeline
from onnxcomp.recipe import with_cleanup
from onnxcomp.report import environment, write_json_atomic
from onnxcomp.zoo import tiny_clip

ROOT = Path(__file__).resolve().parent.parent
LARGE_CLIP = {"width": 256, "layers": 4, "heads": 8}
# calibration batches, eval batches (tiny-clip batches hold 8 pairs; PP-OCR batches one image)
SIZES = {"tiny-clip": (32, 32), "tiny-clip-large": (32, 32), "ppocr-rec": (32, 64),
         "ppocr-det": (8, 8)}
# ONNX Runtime's blocked (NCHWc) conv kernels work on 16 channels with AVX-512 (8 with AVX2):
# the CNN rows also time a plan whose kept channel counts are rounded up to it.
ALIGN = 16
BEGIN, END = "<!-- prune:begin -->", "<!-- prune:end -->"


def cached(data: calibration.Dataset) -> calibration.Dataset:
    """The same dataset with its batches rendered once (distill iterates it once per layer)."""
    batches = list(data)
    return calibration.Dataset(data.name, len(batches), batches.__getitem__, data.labels,
                               data.zoo_name)


def zoo_model(name: str) -> tuple[Model, str, str]:
    """The model, its zoo data name and where it comes from."""
    if name == "tiny-clip-large":
        args = ", ".join(f"{k}={v}" for k, v in LARGE_CLIP.items())
        model, data_name, source = Model(tiny_clip.build(**LARGE_CLIP)), "tiny-clip", \
            f"tiny_clip.build({args})"
    else:
        model, data_name, source = load(zoo.fetch(name)), name, f"zoo {name}"
    props = {p.key: p.value for p in model.proto.metadata_props}
    if "tiny_clip_recipe" in props:  # the zoo builder's version: its weights change with it
        source += f", tiny-clip recipe {props['tiny_clip_recipe']}"
    return model, data_name, source


def macs(model: Model, batch: dict[str, np.ndarray]) -> int:
    """Multiply-adds of the weight ops, from the shapes of one real run."""
    graph = prune.prepare(model)
    ops = [n for n in graph.nodes if n.op in ("Conv", "ConvTranspose", "MatMul", "Gemm")]
    names = sorted({t.name for n in ops for t in (n.inputs[0], n.inputs[1], n.outputs[0])
                    if not hasattr(t, "values")} - set(batch))
    values = runtime.run(runtime.session(calibration.with_outputs(model, names), optimize=False),
                         batch, names)
    shape = {k: v.shape for k, v in {**values, **batch}.items()}

    def shape_of(tensor) -> tuple:
        return np.asarray(tensor.values).shape if hasattr(tensor, "values") else shape[tensor.name]

    total = 0
    for n in ops:
        xs, ws, ys = shape_of(n.inputs[0]), shape_of(n.inputs[1]), shape[n.outputs[0].name]
        if n.op == "Conv":
            total += int(np.prod(ys)) * int(np.prod(ws[1:]))
        elif n.op == "ConvTranspose":
            total += int(np.prod(xs)) * int(np.prod(ws[1:]))
        else:
            total += int(np.prod(ys)) * int(xs[-1])
    return total


def latency(models: list[Model], batch: dict, threads: int, runs: int) -> list[float]:
    """p50 milliseconds of each model, the models run in turn inside every round."""
    sessions = [runtime.session(m, threads=threads) for m in models]
    for s in sessions:
        for _ in range(3):
            s.run(None, batch)
    times: list[list[float]] = [[] for _ in sessions]
    for _ in range(runs):
        for i, s in enumerate(sessions):
            start = time.perf_counter()
            s.run(None, batch)
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) * 1000 for t in times]


def op_times(models: list[Model], batch: dict, runs: int = 10) -> list[dict[str, float]]:
    """Mean kernel milliseconds per op type at 1 thread, from ONNX Runtime's profiler; the
    models run interleaved, as in :func:`latency`."""
    with tempfile.TemporaryDirectory() as tmp:
        sessions = []
        for i, model in enumerate(models):
            options = runtime.session_options(threads=1)
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / f"profile{i}")
            sessions.append(ort.InferenceSession(model.proto.SerializeToString(), options,
                                                 providers=["CPUExecutionProvider"]))
        for _ in range(runs + 1):
            for sess in sessions:
                sess.run(None, batch)
        results = []
        for sess in sessions:
            events = [e for e in json.loads(Path(sess.end_profiling()).read_text())
                      if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
            total: Counter = Counter()
            for e in events[len(events) // (runs + 1):]:  # the first run warms up
                total[e["args"]["op_name"]] += e["dur"] / 1000 / runs
            results.append(dict(total.most_common()))
    return results


def fidelity(reference: Model, candidate: Model, data) -> dict:
    """Lowest per-output mean cosine, retrieval agreement (dual encoders), task metric."""
    f = validate(reference, candidate, data=data, progress=None).fidelity
    out = {"cosine": min(o["cosine_mean"] for o in f["outputs"].values()),
           "cosine_per_output": {k: o["cosine_mean"] for k, o in f["outputs"].items()}}
    if f.get("retrieval"):
        r = f["retrieval"]
        out["retrieval"] = {"i2t": r["a_to_b_agreement"], "t2i": r["b_to_a_agreement"]}
        if "recall@1" in r:  # the true pair (i, i) found first, image → text
            out["retrieval"]["recall@1_i2t"] = r["recall@1"]["a_to_b"]
    if f.get("task"):
        out["task_reference"], out["task"] = f["task"]["reference"], f["task"]["candidate"]
    return out


def bench(name: str, ratio: float, runs: int, log) -> dict:
    model, data_name, source = zoo_model(name)
    n_calib, n_eval = SIZES[name]
    calib = cached(zoo.dataset(data_name, "calib", n_calib))
    eval_data = cached(zoo.dataset(data_name, "eval", n_eval))
    calibration.check_dataset(eval_data, model)
    transformer = name.startswith("tiny-clip")
    config = prune.Config(ratio=0.0, heads=ratio, ffn=ratio) if transformer else \
        prune.Config(ratio=ratio)

    def cleanup(m: Model) -> Model:  # what the pipeline runs before the first / after the last pass
        return Pipeline(with_cleanup([])).run(m, Context())[0]

    # The recipe `prune:0.3,distill` (with heads/ffn for transformers), step by step so the
    # pruned-only model and the plan (for the zeroed baseline) are kept too.
    ctx = Context(calibration=calib, teacher=model, progress=log)
    base = cleanup(model)
    started = time.perf_counter()
    pruned, _prune_record = prune.PASS.run(base, config, ctx)  # its changes go into ctx
    prune_seconds = time.perf_counter() - started
    started = time.perf_counter()
    distilled, distill_record = distill.PASS.run(pruned, distill.Config(), ctx)
    distill_seconds = time.perf_counter() - started
    pruned, distilled = cleanup(pruned), cleanup(distilled)
    the_plan = prune.PASS.plan(base, config, Context(calibration=calib)).payload
    zeroed = prune.zero_out(base, the_plan, consumers_only=False)

    models = [model, pruned, distilled, zeroed]
    if not transformer:  # shapes only: the cheap l2 ranking gives the same channel counts
        aligned_config = dataclasses.replace(config, multiple=ALIGN, importance="l2")
        aligned = prune.PASS.plan(base, aligned_config, Context())
        models.append(prune.PASS.apply(base, aligned, Context()).model)
    batch = eval_data.make_batch(0)
    groups = [g for g in the_plan.groups if g.id in the_plan.removed]
    row = {
        "model": name, "source": source, "ratio": ratio, "config": str(config),
        "importance": the_plan.importance, "calib_batches": n_calib, "eval_batches": n_eval,
        "groups_pruned": len(groups), "groups_total": len(the_plan.groups),
        "kinds": sorted({g.kind for g in groups}),
        "params": [m.parameter_count() for m in models],
        "file_bytes": [len(m.proto.SerializeToString()) for m in models],
        "macs": [macs(m, batch) for m in models],
        "input_shapes": {k: list(v.shape) for k, v in batch.items()},
        "prune_seconds": round(prune_seconds, 1), "distill_seconds": round(distill_seconds, 1),
        "distill_notes": distill_record.notes, "distill_skipped": distill_record.skipped,
    }
    log(f"{name}: fidelity")
    row["fidelity"] = {"pruned": fidelity(model, pruned, eval_data),
                       "distilled": fidelity(model, distilled, eval_data),
                       "zeroed": fidelity(model, zeroed, eval_data)}
    for threads in (1, 2):
        log(f"{name}: latency, {threads} thread(s)")
        row[f"p50_ms_{threads}t"] = latency(models, batch, threads, runs)
    row["runs"] = runs
    if not transformer:
        log(f"{name}: op profile")
        row["op_ms_1t"] = op_times([model, pruned, models[4]], batch)
    return row


TASK_KEYS = {"ppocr-rec": ("line_accuracy", "char_accuracy"),
             "ppocr-det": ("text_recall", "boxes_found")}


def _task_cell(name: str, fid: dict) -> str:
    """Task metric (recall@1 for dual encoders) of the original → pruned → + distill."""
    if "retrieval" in fid["pruned"]:  # dual encoder: true-pair recall@1, agreement with original
        a, b = fid["pruned"]["retrieval"], fid["distilled"]["retrieval"]
        recall = [a["recall@1_i2t"]["reference"], a["recall@1_i2t"]["candidate"],
                  b["recall@1_i2t"]["candidate"]]
        return (f"recall@1 i→t: {' → '.join(f'{v:.2f}' for v in recall)} (top-1 agreement "
                f"i→t/t→i {a['i2t']:.2f}/{a['t2i']:.2f} → {b['i2t']:.2f}/{b['t2i']:.2f})")
    keys = TASK_KEYS.get(name, ())
    steps = [fid["pruned"].get("task_reference"), fid["pruned"].get("task"),
             fid["distilled"].get("task")]
    if not keys or not all(steps):
        return ""
    label = "/".join(k.replace("_accuracy", "") for k in keys)
    return f"{label}: " + " → ".join("/".join(f"{s[k]:.2f}" for k in keys) for s in steps)


def table(rows: list[dict]) -> str:
    lines = [("| model (input) | pruned groups | params | file | MACs | p50 1 thread "
              "| p50 2 threads | cosine: pruned → + distill (zeroed) "
              "| task: original → pruned → + distill |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, f, m = r["params"], r["file_bytes"], r["macs"]
        shapes = "; ".join("×".join(map(str, s)) for s in r["input_shapes"].values())
        fid = r["fidelity"]
        cells = [
            f"{r['model']} ({shapes})",
            f"{r['groups_pruned']}/{r['groups_total']} ({', '.join(r['kinds'])})",
            f"{p[0] / 1e6:.3g} M → {p[1] / 1e6:.3g} M (−{1 - p[1] / p[0]:.0%})",
            f"{f[0] / 1e6:.3g} → {f[1] / 1e6:.3g} MB",
            f"{m[0] / 1e6:.4g} M → {m[1] / 1e6:.4g} M (−{1 - m[1] / m[0]:.0%})",
        ]
        for t in (1, 2):
            lat = r[f"p50_ms_{t}t"]
            cells.append(f"{lat[0]:.3g} → {lat[1]:.3g} ms (×{lat[0] / lat[1]:.2f}; distilled "
                         f"×{lat[0] / lat[2]:.2f}; zeroed ×{lat[0] / lat[3]:.2f})")
        cells.append(f"{fid['pruned']['cosine']:.4f} → {fid['distilled']['cosine']:.4f} "
                     f"({fid['zeroed']['cosine']:.4f})")
        cells.append(_task_cell(r["model"], fid))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def op_table(rows: list[dict]) -> str:
    """CNN rows: where the time goes (1 thread) for the original, pruned and channel-aligned."""
    lines = [("| model | variant | MACs | p50 1 thread | profile: conv kernels | MatMul/Gemm "
              "| other kernels |"), "|---|---|---|---|---|---|---|"]
    for r in (r for r in rows if "op_ms_1t" in r):
        for i, j, label in ((0, 0, "original"), (1, 1, "pruned"),
                            (4, 2, f"pruned, multiple={ALIGN}")):
            ops = r["op_ms_1t"][j]
            conv = sum(v for k, v in ops.items() if "Conv" in k)
            mm = sum(v for k, v in ops.items() if "MatMul" in k or k == "Gemm")
            lines.append(f"| {r['model']} | {label} | {r['macs'][i] / 1e6:.4g} M | "
                         f"{r['p50_ms_1t'][i]:.3g} ms | {conv:.3g} ms | {mm:.3g} ms | "
                         f"{sum(ops.values()) - conv - mm:.3g} ms |")
    return "\n".join(lines)


def write_doc(path: Path, text: str) -> None:
    write_between(path, BEGIN, END, text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-clip,tiny-clip-large,ppocr-det,ppocr-rec")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--det-runs", type=int, default=20)
    parser.add_argument("--out", default=str(ROOT / "docs" / "prune_results.json"))
    parser.add_argument("--doc", default=str(ROOT / "docs" / "prune.md"))
    args = parser.parse_args(argv)
    started = time.perf_counter()

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - started:6.0f} s] {message}", file=sys.stderr, flush=True)

    rows = []
    for name in args.models.split(","):
        runs = args.det_runs if name == "ppocr-det" else args.runs
        log(f"{name} …")
        rows.append(bench(name, args.ratio, runs, log))
    command = "python benchmarks/prune.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_json_atomic({"command": command.strip(), "environment": environment(),
                       "seconds": round(time.perf_counter() - started), "rows": rows}, args.out)
    text = table(rows) + "\n\n" + op_table(rows)
    if args.doc:
        write_doc(Path(args.doc), text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
