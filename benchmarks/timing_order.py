"""Does the order of an interleaved timing favour a seat? The same int8 file timed twice beside
its float model, with the order ``bench`` used to use and with the one it uses now.

Three runners per round: the float model, then two compilations of one int8 file, ``A`` in the
second seat and ``B`` in the third. With the palindromic order (``F A B``, ``B A F``, ...) ``A``
always runs straight after another model, while ``B`` closes one round and opens the next, so it
runs straight after itself (caches warm with its own weights and buffers) in half the rounds; so
does the float model. ``bench`` now draws a seeded random order per round that never times a
runner straight after itself (``onnxcomp.measure.bench._round_orders``). ``B / A`` (p50 of the
same file in two seats) would be 1.000 without a seat effect; it is measured on ``sessions``
fresh sets of sessions per order and thread count, since one compiled copy of a file can run
1-3 % off another.

    python benchmarks/timing_order.py [--rounds 60] [--sessions 6]

ONNX Runtime times PP-OCRv4 rec (float and ``quantize:int8``) on one 48x320 line, intra-op
spinning off (as ``quantize_vs_ort.py``: with it on, a session's worker threads spin on after
its run and take the cores from the next one, and 2-thread seats differed by up to 60 %);
OpenVINO, where installed, times PP-OCRv4 det (float and ``quantize:int8 --target openvino``)
on one 640x640 image. Results: benchmarks/results/timing_order.json and the table in docs/bench_stability.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from doc_tables import write_between

from onnxcomp import api, zoo
from onnxcomp.measure.bench import _round_orders, _Runner, _time_runners, percentiles
from onnxcomp.report import environment, markdown_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "timing_order.json"
DOC = ROOT / "docs" / "bench_stability.md"
BEGIN, END = "<!-- timing-order:begin -->", "<!-- timing-order:end -->"


def palindrome(count: int) -> Iterator[list[int]]:
    """The order ``bench`` used before: forward, then reversed, round after round."""
    forward = list(range(count))
    while True:
        yield forward
        yield forward[::-1]


def time_seats(make_runners: Callable[[], list], orders: Iterator[list[int]], rounds: int
               ) -> list[float]:
    """p50 (ms) of each runner over ``rounds`` interleaved rounds in the given orders."""
    times = _time_runners(make_runners(), rounds, 5, orders=orders)
    return [percentiles(t)["p50_ms"] for t in times]


def measure(label: str, make_runners: Callable[[int], list], rounds: int, sessions: int
            ) -> list[dict]:
    rows = []
    for threads in (1, 2):
        for scheme, orders in (("palindrome (old)", palindrome), ("random (now)", _round_orders)):
            seat_b_over_a, int8_over_float = [], []
            for _ in range(sessions):
                p50 = time_seats(lambda t=threads: make_runners(t), orders(3), rounds)
                seat_b_over_a.append(p50[2] / p50[1])
                int8_over_float.append((p50[1] + p50[2]) / 2 / p50[0])
            rows.append({"runtime": label, "threads": threads, "order": scheme,
                         "sessions": sessions, "rounds": rounds,
                         "b_over_a": [round(x, 4) for x in seat_b_over_a],
                         "b_over_a_median": round(float(np.median(seat_b_over_a)), 4),
                         "b_over_a_mean": round(float(np.mean(seat_b_over_a)), 4),
                         "int8_over_float_median": round(float(np.median(int8_over_float)), 4)})
            print(f"  {label} {threads} thr {scheme}: B/A {rows[-1]['b_over_a']}", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--sessions", type=int, default=6)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxcomp-order-") as tmp:
        rec = zoo.fetch("ppocr-rec")
        rec_int8 = Path(tmp) / "rec_int8.onnx"
        api.compress(str(rec), recipe="quantize:int8", calib=zoo.dataset("ppocr-rec", "calib", 8),
                     validate=False, show_progress=False).model.save(rec_int8)
        feeds = zoo.dataset("ppocr-rec", "eval", 1).make_batch(0)
        rows += measure("onnxruntime, ppocr-rec", lambda threads: [
            _Runner(str(path), "CPUExecutionProvider", threads, feeds, spinning=False)
            for path in (rec, rec_int8, rec_int8)], args.rounds, args.sessions)
        try:
            from onnxcomp import runtime_openvino
            runtime_openvino.version()
        except Exception as error:  # noqa: BLE001 - an optional runtime, reported and skipped
            print(f"OpenVINO not measured: {error}", flush=True)
        else:
            det = zoo.fetch("ppocr-det")
            det_int8 = Path(tmp) / "det_int8.onnx"
            api.compress(str(det), recipe="quantize:int8", target="openvino",
                         calib=zoo.dataset("ppocr-det", "calib", 8), validate=False,
                         show_progress=False).model.save(det_int8)
            det_feeds = zoo.dataset("ppocr-det", "eval", 1).make_batch(0)
            rows += measure("openvino, ppocr-det", lambda threads: [
                runtime_openvino.Runner(str(path), det_feeds, threads, precision="f32")
                for path in (det, det_int8, det_int8)], args.rounds, args.sessions)
    result = {"rows": rows, "environment": environment(), "load_average": os.getloadavg(),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    RESULTS.write_text(json.dumps(result, indent=2))
    table = markdown_table(
        ["runtime, model", "threads", "order", "B / A per session", "median", "mean",
         "int8 / float"],
        [[r["runtime"], r["threads"], r["order"], " ".join(f"{x:.3f}" for x in r["b_over_a"]),
          f"{r['b_over_a_median']:.3f}", f"{r['b_over_a_mean']:.3f}",
          f"{r['int8_over_float_median']:.3f}"] for r in rows])
    write_between(DOC, BEGIN, END, f"Measured {result['date']} with `python benchmarks/"
                  f"timing_order.py --rounds {args.rounds} --sessions {args.sessions}` (load "
                  f"average at the end {', '.join(f'{x:.2f}' for x in result['load_average'])})."
                  f"\n\n{table}\n",
                  heading="## Does the order of an interleaved timing favour a seat?")
    print(table)


if __name__ == "__main__":
    main()
