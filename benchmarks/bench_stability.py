"""How repeatable are `onnxcomp bench` timings? Two separate invocations, same models, compared.

Runs ``onnxcomp.bench.bench`` in two fresh subprocesses, one after the other, on ppocr-rec (input
1x3x48x320, the size the design's figures use) and tiny-clip, at 1 and 2 threads, and writes each
run's p50 and the relative difference ``|p50_run2 - p50_run1| / p50_run1`` to
docs/bench_stability.md (target: within 10 %).

    python benchmarks/bench_stability.py [--runs 30] [--warmup 5] [--min-seconds 1]
                                         [--no-spinning] [--out docs/bench_stability.md]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ("ppocr-rec", "tiny-clip")
THREADS = (1, 2)
TARGET = 0.10


def child(runs: int, warmup: int, min_seconds: float, spinning: bool, out: Path) -> None:
    """One invocation: bench each zoo model on its own (no cross-model interleaving needed)."""
    import numpy as np

    from onnxcomp import calibration, zoo
    from onnxcomp.measure.bench import bench
    from onnxcomp.model import load

    results = {}
    for name in MODELS:
        path = zoo.fetch(name)
        data = None
        if name == "ppocr-rec":
            # the recognizer's height and width are dynamic: fix the design's 1x3x48x320
            model = load(path, load_weights=False)
            (value_info,) = calibration.graph_inputs(model)
            array = np.random.default_rng(0).standard_normal((1, 3, 48, 320)).astype(np.float32)
            data = calibration.from_batches([{value_info.name: array}], name="1x3x48x320")
        # the model twice, interleaved: the p50 ratio of a model to itself shows how much of the
        # noise the interleaving cancels (ratios are what compressed-vs-original reports use)
        report = bench([path, path], threads=THREADS, runs=runs, warmup=warmup, data=data,
                       names=[name, f"{name} (copy)"], memory=True, min_seconds=min_seconds,
                       spinning=spinning, progress=None)
        results[name] = report.bench
    out.write_text(json.dumps({"results": results, "load": os.getloadavg()}))


def relative(a: float, b: float) -> float:
    return abs(b - a) / a


def write_markdown(runs: list[dict], args: argparse.Namespace, out: Path) -> bool:
    from onnxcomp.report import environment, markdown_table

    env = environment()
    rows, worst = [], 0.0
    for name in MODELS:
        for threads in THREADS:
            p50s, p90s, counts, ratios = [], [], [], []
            for run in runs:
                row, copy = [r for r in run["results"][name]["results"]
                             if r["threads"] == threads]
                p50s.append(row["p50_ms"])
                p90s.append(row["p90_ms"])
                counts.append(str(row["runs"]))
                ratios.append(f"{copy['latency_ratio']:.3f}")
            diff = relative(*p50s)
            worst = max(worst, diff)
            rows.append([name, threads, p50s[0], p50s[1], f"{100 * diff:.1f} %",
                         "yes" if diff <= TARGET else "NO", p90s[0], p90s[1], " / ".join(counts),
                         " / ".join(ratios)])
    memory_rows = []
    for name in MODELS:
        peaks = [run["results"][name]["memory"][0] for run in runs]
        memory_rows.append([name, peaks[0]["session_peak_mb"], peaks[1]["session_peak_mb"],
                            peaks[0]["peak_rss_mb"], peaks[1]["peak_rss_mb"]])
    sizes = [[name, runs[0]["results"][name]["models"][0]["bytes"],
              runs[0]["results"][name]["models"][0]["params"]] for name in MODELS]
    ok = worst <= TARGET
    lines = [
        "# Bench stability: two separate `bench` invocations, same models",
        "",
        (f"Measured {time.strftime('%Y-%m-%d %H:%M')} with `python benchmarks/bench_stability.py "
         f"--runs {args.runs} --warmup {args.warmup} --min-seconds {args.min_seconds:g}"
         f"{' --no-spinning' if args.no_spinning else ''}`: onnxcomp {env['onnxcomp']}, ONNX Runtime "
         f"{env['onnxruntime']}, CPU provider, {env['cores']} cores ({env['machine']}), shared "
         "with other jobs. Each invocation is a fresh Python process; ppocr-rec gets one "
         "1x3x48x320 input, tiny-clip random inputs from its signature (batch 1). "
         f"At least {args.runs} timed runs (and at least {args.min_seconds:g} s of them) after "
         f"{args.warmup} warm-up per model and thread count."),
        "",
        markdown_table(["model", "threads", "run 1 p50 ms", "run 2 p50 ms",
                        "abs diff / run 1", f"within {TARGET:.0%}", "run 1 p90 ms",
                        "run 2 p90 ms", "timed runs", "copy / model p50"], rows),
        "",
        ("`copy / model p50`: each invocation times the model against a second session of the "
         "same file, interleaved; the p50 ratio (ideally 1.000) shows what interleaving keeps "
         "out of the comparisons even when the absolute p50 moves between invocations."),
        "",
        "Load average (1/5/15 min) at the end of each run: "
        + "; ".join("/".join(f"{x:.2f}" for x in run["load"]) for run in runs) + ".",
        "",
        (f"Worst p50 difference: {100 * worst:.1f} % ({'within' if ok else 'OVER'} the "
         f"{TARGET:.0%} target)."),
        "",
        "Peak memory (fresh child process per model, MB):",
        "",
        markdown_table(["model", "run 1 session peak", "run 2 session peak",
                        "run 1 process peak", "run 2 process peak"], memory_rows),
        "",
        markdown_table(["model", "bytes on disk", "parameters"], sizes),
        "",
    ]
    out.write_text("\n".join(lines))
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--min-seconds", type=float, default=1.0)
    parser.add_argument("--no-spinning", action="store_true",
                        help="idle ONNX Runtime threads sleep instead of spin-waiting")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench_stability.md")
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.runs, args.warmup, args.min_seconds, not args.no_spinning, args.child)
        return 0
    runs = []
    with tempfile.TemporaryDirectory(prefix="onnxcomp-stability-") as tmp:
        for i in range(2):
            result = Path(tmp) / f"run{i}.json"
            print(f"invocation {i + 1}/2 ...", file=sys.stderr, flush=True)
            subprocess.run([sys.executable, __file__, "--runs", str(args.runs), "--warmup",
                            str(args.warmup), "--min-seconds", str(args.min_seconds),
                            *(["--no-spinning"] if args.no_spinning else []),
                            "--child", str(result)], check=True)
            runs.append(json.loads(result.read_text()))
    ok = write_markdown(runs, args, args.out)
    print(args.out.read_text())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
