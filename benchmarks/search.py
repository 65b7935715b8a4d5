"""A small real search: PP-OCRv4 rec, line accuracy within 1 point of the float model on
held-out lines, objectives latency and size, on the local process pool.

    python benchmarks/search.py [--trials 10] [--out bench-search] [--workers 1]

Writes OUT/pareto.md (the table copied into docs/search.md), OUT/pareto.json, OUT/pareto.png,
OUT/best.onnx, and prints trials per hour. Rerunning with the same --out resumes the search.
"""

from __future__ import annotations

import argparse
import time

from onnxcomp import zoo
from onnxcomp.search import search

# fuse finds nothing useful in a CNN + 2 transformer blocks; lowrank only keeps ppocr-rec's
# fidelity at energy 0.9999 (docs/lowrank.md), so the space is narrowed to what can pay.
SPACE = {"dimensions": {"fuse.use": {"fixed": False},
                        "lowrank.energy": {"choices": [0.999, 0.9999]},
                        "prune.ratio": {"low": 0.05, "high": 0.2, "step": 0.05}}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--out", default="bench-search")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--executor", default="local")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    result = search(zoo.fetch("ppocr-rec"), calib="ppocr-rec:calib:16",
                    eval_data="ppocr-rec:eval:32", constraints=["line_accuracy>=float-0.01"],
                    objectives="latency,size", n_trials=args.trials, out_dir=args.out,
                    space=SPACE, executor=args.executor, workers=args.workers, seed=args.seed)
    hours = (time.perf_counter() - started) / 3600
    print(result.table())
    print(f"{len(result.trials)} trials in the study; this run: {hours * 60:.1f} min, "
          f"{args.workers} worker(s)")


if __name__ == "__main__":
    main()
