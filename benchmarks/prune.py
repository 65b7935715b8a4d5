"""Structured pruning at 30 %: parameters, file size, FLOPs, latency and fidelity, side by side
with a zeroing-only baseline (the same channels set to zero, nothing removed).

    python benchmarks/prune.py [--models tiny-clip,tiny-clip-large,ppocr-det,ppocr-rec]
                               [--runs 30] [--det-runs 15] [--out docs/prune_results.json]

Latency: ONNX Runtime CPU, default graph optimizations, 1 and 2 threads, the three models run
interleaved in one process, p50 over the runs. FLOPs: multiply-adds of Conv/ConvTranspose/MatMul/
Gemm from the shapes of one real run. Fidelity: cosine of every output to the original's on the
zoo's eval data (mean over batches; the lowest output is reported).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from onnxcomp import calibration, runtime, zoo
from onnxcomp.model import Model, load
from onnxcomp.passes import prune
from onnxcomp.pipeline import Context

ROOT = Path(__file__).resolve().parent.parent


# Fallbacks while the zoo entries are not importable: transformer encoders of the same structure
# (tests/prune_graphs.py) and the PP-OCR files given with --path, fed text-like bar images.
FALLBACK_CLIP = {
    "tiny-clip": {"layers": 2, "seq": 16, "dim": 64, "heads": 4, "ffn": 256},
    "tiny-clip-large": {"layers": 4, "seq": 64, "dim": 256, "heads": 8, "ffn": 1024},
}
PPOCR_SHAPES = {"ppocr-det": (1, 3, 640, 640), "ppocr-rec": (1, 3, 48, 320)}


def _zoo_ready(name: str) -> bool:
    try:
        zoo.entry("tiny-clip" if name.startswith("tiny-clip") else name).implementation()
        return True
    except ModuleNotFoundError:
        return False


def _model(name: str, paths: dict[str, str]) -> tuple[Model, str]:
    if name in paths:
        return load(paths[name]), paths[name]
    if name == "tiny-clip-large" and _zoo_ready(name):
        from onnxcomp.zoo import tiny_clip

        built = tiny_clip.build(**LARGE_CLIP)
        return (built if isinstance(built, Model) else Model(built)), "tiny_clip.build(large)"
    if _zoo_ready(name):
        return load(zoo.fetch(name)), f"zoo {name}"
    if name in FALLBACK_CLIP:
        sys.path.insert(0, str(ROOT))
        from tests import prune_graphs

        return prune_graphs.transformer(**FALLBACK_CLIP[name], share_biases=False), \
            f"transformer {FALLBACK_CLIP[name]} (zoo entry not available)"
    raise SystemExit(f"{name}: zoo entry not available; pass --path {name}=FILE")


LARGE_CLIP: dict = {"width": 256, "layers": 4, "heads": 8}


def _bars(shape: tuple, count: int, seed: int):
    def make(i: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed * 1000 + i)
        x = np.full(shape, 0.9, np.float32)
        h, w = shape[2], shape[3]
        for _ in range(max(3, h * w // 8000)):
            r, c = rng.integers(0, h - h // 8), rng.integers(0, w - w // 6)
            x[:, :, r:r + max(2, h // 12), c:c + rng.integers(w // 20, w // 6)] = 0.1
        x += rng.normal(0, 0.05, shape).astype(np.float32)
        return {"x": ((x - 0.5) / 0.5).astype(np.float32)}

    return calibration.Dataset(f"bars{shape}", count, make)


def _data(name: str, split: str, count: int, model: Model):
    seed = 0 if split == "calib" else 7
    if _zoo_ready(name):
        try:
            data = zoo.dataset("tiny-clip" if name.startswith("tiny-clip") else name, split,
                               count)
            calibration.check_dataset(data, model)
            return data
        except Exception as exc:  # noqa: BLE001  a resized model may not fit the zoo's data
            print(f"{name}: zoo data does not fit ({exc}); random data", file=sys.stderr)
    if name in PPOCR_SHAPES:
        return _bars(PPOCR_SHAPES[name], count, seed)
    return calibration.random_data(model, count, seed=seed)


def macs(model: Model, batch: dict[str, np.ndarray]) -> int:
    """Multiply-adds of the weight ops, from the shapes of one real run."""
    graph = prune.prepare(model)
    ops = [n for n in graph.nodes if n.op in ("Conv", "ConvTranspose", "MatMul", "Gemm")]
    names = sorted({t.name for n in ops for t in (n.inputs[0], n.inputs[1], n.outputs[0])
                    if not hasattr(t, "values")} - set(batch))
    sess = runtime.session(calibration.with_outputs(model, names), optimize=False)
    values = runtime.run(sess, batch, names)
    values.update(batch)
    shape = {k: v.shape for k, v in values.items()}
    total = 0
    for n in ops:
        x = n.inputs[0]
        xs = np.asarray(x.values).shape if hasattr(x, "values") else shape[x.name]
        ys = shape[n.outputs[0].name]
        w = n.inputs[1]
        ws = np.asarray(w.values).shape if hasattr(w, "values") else shape[w.name]
        if n.op == "Conv":
            total += int(np.prod(ys)) * int(np.prod(ws[1:]))
        elif n.op == "ConvTranspose":
            total += int(np.prod(xs)) * int(np.prod(ws[1:]))
        else:
            total += int(np.prod(ys)) * int(xs[-1])
    return total


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30))


def fidelity(reference: Model, candidate: Model, data) -> float:
    ref_s, cand_s = runtime.session(reference), runtime.session(candidate)
    per_output: dict[str, list[float]] = {}
    for batch in data:
        ref, cand = runtime.run(ref_s, batch), runtime.run(cand_s, batch)
        for key in ref:
            per_output.setdefault(key, []).append(cosine(ref[key], cand[key]))
    return min(statistics.mean(v) for v in per_output.values())


def latency(models: list[Model], batch: dict, threads: int, runs: int) -> list[float]:
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


def bench(name: str, ratio: float, runs: int, calib: int, evals: int,
          paths: dict[str, str]) -> dict:
    model, source = _model(name, paths)
    config = prune.Config(ratio=ratio) if not name.startswith("tiny-clip") else \
        prune.Config(ratio=0.0, heads=ratio, ffn=ratio)
    ctx = Context(calibration=_data(name, "calib", calib, model))
    started = time.perf_counter()
    the_plan = prune.plan(model, config, ctx)
    pruned, _ = prune.apply(model, the_plan)
    seconds = time.perf_counter() - started
    zeroed = prune.zero_out(model, the_plan, consumers_only=False)
    eval_data = _data(name, "eval", evals, model)
    batch = eval_data.make_batch(0)
    groups = [g for g in the_plan.groups if g.id in the_plan.removed]
    row = {
        "model": name, "source": source, "ratio": ratio, "importance": the_plan.importance,
        "groups_pruned": len(groups),
        "groups_prunable": sum(g.prunable for g in the_plan.groups),
        "groups_total": len(the_plan.groups),
        "kinds": sorted({g.kind for g in groups}),
        "params": [m.parameter_count() for m in (model, pruned, zeroed)],
        "file_bytes": [len(m.proto.SerializeToString()) for m in (model, pruned, zeroed)],
        "macs": [macs(m, batch) for m in (model, pruned, zeroed)],
        "input_shapes": {k: list(v.shape) for k, v in batch.items()},
        "cosine_pruned": fidelity(model, pruned, eval_data),
        "cosine_zeroed": fidelity(model, zeroed, eval_data),
        "prune_seconds": round(seconds, 2),
    }
    for threads in (1, 2):
        row[f"p50_ms_{threads}t"] = latency([model, pruned, zeroed], batch, threads, runs)
    return row


def table(rows: list[dict]) -> str:
    lines = [("| model (input) | pruned groups | params | file | MACs | p50 1 thread "
              "| p50 2 threads | cosine |"), "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p, f, m = r["params"], r["file_bytes"], r["macs"]
        shapes = "; ".join("×".join(map(str, s)) for s in r["input_shapes"].values())
        cells = [
            f"{r['model']} ({shapes})",
            f"{r['groups_pruned']}/{r['groups_total']} ({', '.join(r['kinds'])})",
            f"{p[0] / 1e6:.3g} M → {p[1] / 1e6:.3g} M (−{1 - p[1] / p[0]:.0%})",
            f"{f[0] / 1e6:.3g} MB → {f[1] / 1e6:.3g} MB (zeroed: {f[2] / 1e6:.3g} MB)",
            f"{m[0] / 1e6:.4g} M → {m[1] / 1e6:.4g} M (−{1 - m[1] / m[0]:.0%})",
        ]
        for t in (1, 2):
            lat = r[f"p50_ms_{t}t"]
            cells.append(f"{lat[0]:.3g} → {lat[1]:.3g} ms (×{lat[0] / lat[1]:.2f}; "
                         f"zeroed ×{lat[0] / lat[2]:.2f})")
        cells.append(f"{r['cosine_pruned']:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-clip,tiny-clip-large,ppocr-det,ppocr-rec")
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--det-runs", type=int, default=15)
    parser.add_argument("--calib", type=int, default=8)
    parser.add_argument("--eval", type=int, default=8)
    parser.add_argument("--out", default=str(ROOT / "docs" / "prune_results.json"))
    parser.add_argument("--path", action="append", default=[], metavar="NAME=FILE",
                        help="use this ONNX file for a zoo name (e.g. before the zoo entry exists)")
    args = parser.parse_args(argv)
    paths = dict(item.split("=", 1) for item in args.path)
    rows = []
    for name in args.models.split(","):
        runs = args.det_runs if name == "ppocr-det" else args.runs
        calib, evals = (2, 4) if name == "ppocr-det" else (args.calib, args.eval)
        print(f"{name} …", file=sys.stderr, flush=True)
        rows.append(bench(name, args.ratio, runs, calib, evals, paths))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    from onnxcomp.report import environment

    document = {"environment": environment(), "cpu_count": os.cpu_count(), "rows": rows}
    Path(args.out).write_text(json.dumps(document, indent=1, default=str))
    print(table(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
