"""Where the time goes: ONNX Runtime's profiler per op type, float against int8 variants.

For one zoo model: the float model and static int8 variants of it (``quantize`` overrides per
variant, e.g. ``fold=false`` for the pass without its pre-quantization rewrites), each profiled
on one held-out batch with ONNX Runtime's CPU provider (all graph optimizations, so what is
profiled is what runs: QLinearConv, fused activations, the Q/DQ left unfused) at each thread
count: milliseconds per run by op type, summed over the profiler's ``*_kernel_time`` events,
and the count of such nodes. The profiler adds its own cost, so the p50 latency and its ratio
to float come from ``onnxcomp.bench`` on the same files, interleaved, without profiling.

    python benchmarks/profile_ops.py --model ppocr-rec --threads 1 2
    python benchmarks/profile_ops.py --model ppocr-det --calib 8 --runs 10

Writes ``benchmarks/results/profile_ops_<model>.json`` and a table per thread count between the
markers for that model in ``docs/quantize.md``.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import re
import tempfile
from pathlib import Path

import onnxruntime as ort

from onnxcomp import zoo
from onnxcomp.measure.bench import bench
from onnxcomp.model import load
from onnxcomp.passes import quantize
from onnxcomp.pipeline import Context
from onnxcomp.recipe import config_from_table
from onnxcomp.report import markdown_table

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "quantize.md"
VARIANTS = {"int8 (fold = false)": {"fold": "false"},
            "int8 (integer_hardswish = false)": {"integer_hardswish": "false"}, "int8": {}}


def profile(path: Path, feeds: dict, threads: int, runs: int, folder: Path
            ) -> dict[str, dict[str, float]]:
    """Milliseconds per run and node count per op type of one model at ``threads``."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.enable_profiling = True
    options.profile_file_prefix = str(folder / f"{path.stem}_{threads}")
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    for _ in range(3):  # warm-up runs are profiled too: they are subtracted below
        session.run(None, feeds)
    for _ in range(runs):
        session.run(None, feeds)
    events = json.loads(Path(session.end_profiling()).read_text())
    per_op: dict[str, float] = collections.Counter()
    nodes: dict[str, set[str]] = collections.defaultdict(set)
    kernels = [e for e in events if e.get("cat") == "Node"
               and e.get("name", "").endswith("_kernel_time")]
    calls: dict[str, int] = collections.Counter(e["name"] for e in kernels)
    for event in kernels:
        op = event["args"]["op_name"]
        # Drop the warm-up calls of each node: its first three events.
        calls[event["name"]] -= 1
        if calls[event["name"]] < runs:
            per_op[op] += event["dur"] / 1000.0 / runs
            nodes[op].add(event["name"])
    return {op: {"ms": round(ms, 3), "nodes": len(nodes[op])} for op, ms in per_op.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ppocr-rec")
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--no-doc", action="store_true")
    args = parser.parse_args()

    source = Path(zoo.fetch(args.model))
    calib = zoo.dataset(args.model, "calib", args.calib)
    feeds = zoo.dataset(args.model, "eval", 1).make_batch(0)
    result = {"model": args.model, "date": datetime.date.today().isoformat(),
              "onnxruntime": ort.__version__, "cores": os.cpu_count(),
              "load_before": os.getloadavg()[0], "profiles": {}, "latency": {}}
    with tempfile.TemporaryDirectory(prefix="profile-ops-") as tmp:
        folder = Path(tmp)
        paths = {"float": source}
        for name, fields in VARIANTS.items():
            config = config_from_table("quantize", {"mode": "int8", **fields})
            model, _ = quantize.PASS.run(load(source), config, Context(calibration=calib))
            paths[name] = folder / f"{re.sub(r'[^a-z0-9]+', '_', name)}.onnx"
            model.save(paths[name])
        for threads in args.threads:
            result["profiles"][threads] = {name: profile(path, feeds, threads, args.runs, folder)
                                           for name, path in paths.items()}
        timing = bench(list(paths.values()), names=list(paths), threads=args.threads,
                       runs=args.runs, data=f"{args.model}:eval:1", memory=False)
        for row in timing.bench["results"]:
            result["latency"].setdefault(row["threads"], {})[row["model"]] = {
                "p50_ms": round(row["p50_ms"], 3), "ratio": round(row["latency_ratio"], 3)}
    result["load_after"] = os.getloadavg()[0]
    out = ROOT / "benchmarks" / "results" / f"profile_ops_{args.model}.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    text = tables(result)
    print(text)
    if not args.no_doc:
        write_doc(args.model, text)


def tables(result: dict) -> str:
    parts = []
    for threads, profiles in result["profiles"].items():
        names = list(profiles)
        ops = sorted({op for p in profiles.values() for op in p},
                     key=lambda op: -max(p.get(op, {"ms": 0})["ms"] for p in profiles.values()))
        rows = [[op, *[(f"{profiles[n][op]['ms']:.2f} ({profiles[n][op]['nodes']})"
                        if op in profiles[n] else "") for n in names]] for op in ops[:14]]
        rows.append(["all kernels", *[f"{sum(v['ms'] for v in profiles[n].values()):.2f}"
                                      for n in names]])
        latency = result["latency"].get(threads) or result["latency"].get(str(threads), {})
        rows.append(["p50 latency ms (ratio), unprofiled",
                     *[f"{latency[n]['p50_ms']:.2f} ({latency[n]['ratio']:.2f}x)"
                       if n in latency else "" for n in names]])
        parts.append(f"{result['model']}, {threads} thread(s): ms per run by op type (nodes)\n\n"
                     + markdown_table(["op type", *names], rows))
    parts.append(f"ONNX Runtime {result['onnxruntime']}, {result['date']}, {result['cores']} "
                 f"cores, load average {result['load_before']:.1f} before and "
                 f"{result['load_after']:.1f} after.")
    return "\n\n".join(parts)


def write_doc(model: str, text: str) -> None:
    begin, end = f"<!-- profile_ops {model} begin -->", f"<!-- profile_ops {model} end -->"
    doc = DOC.read_text(encoding="utf-8")
    if begin not in doc:
        doc = doc.rstrip("\n") + f"\n\n{begin}\n{end}\n"
    head, rest = doc.split(begin, 1)
    tail = rest.split(end, 1)[1]
    DOC.write_text(f"{head}{begin}\n{text}\n{end}{tail}", encoding="utf-8")


if __name__ == "__main__":
    main()
