"""fp16 / bf16 on every zoo model: size, fidelity, validity in ONNX Runtime and OpenVINO, speed.

For each model: ``quantize:fp16`` and ``quantize:bf16`` (default keep-float list, no
``min_cosine``), then
- size: the file against the float file;
- fidelity: mean and worst per-sample cosine of every output on the zoo's evaluation split,
  ONNX Runtime (CPU provider) against the float model;
- validity: the file loads and runs in ONNX Runtime and compiles and runs in OpenVINO (its own
  API; the cosine of its outputs against float in OpenVINO too);
- speed, 1 thread, interleaved, medians: ONNX Runtime float vs fp16 vs bf16 (its CPU provider
  runs float16 through Casts, so no gain is expected), and OpenVINO float at its f32 hint vs
  the float model at the bf16 hint (what an OpenVINO user on this AVX-512-BF16 CPU gets).

    python benchmarks/half.py --models ppocr-rec ppocr-det minilm tiny-clip clip-vit-b32

Writes benchmarks/results/half.json and the table into docs/targets.md (between markers).
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from doc_tables import write_between

from onnxcomp import api, runtime, runtime_openvino, zoo
from onnxcomp.model import load
from onnxcomp.report import environment, markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "half.json"
DOC = ROOT / "docs" / "targets.md"
BEGIN, END = "<!-- half:begin -->", "<!-- half:end -->"


def _cosines(reference: dict, candidate: dict) -> list[float]:
    out = []
    for name, want in reference.items():
        got = candidate[name]
        a = np.asarray(want, np.float64).reshape(want.shape[0], -1)
        b = np.asarray(got, np.float64).reshape(got.shape[0], -1)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        out.extend(((a * b).sum(1) / np.maximum(norms, 1e-30)).tolist())
    return out


def _median_ms(call, runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return float(np.median(times) * 1e3)


def _interleaved(calls: dict, runs: int) -> dict[str, float]:
    for call in calls.values():
        call()
    times: dict[str, list[float]] = {k: [] for k in calls}
    for _ in range(runs):
        for key, call in calls.items():
            started = time.perf_counter()
            call()
            times[key].append(time.perf_counter() - started)
    return {k: float(np.median(v) * 1e3) for k, v in times.items()}


def run_model(name: str, count: int, runs: int, work: Path) -> dict:
    source = zoo.fetch(name)
    data = list(zoo.dataset(name, "eval", count))
    float_ort = runtime.session(source, threads=1)
    reference = [dict(zip([o.name for o in float_ort.get_outputs()], float_ort.run(None, b)))
                 for b in data]
    row: dict = {"float_bytes": Path(source).stat().st_size}
    files = {}
    for mode in ("fp16", "bf16"):
        target = work / f"{name}.{mode}.onnx"
        started = time.perf_counter()
        result = api.compress(source, recipe=f"quantize:{mode}", validate=False,
                              show_progress=False)
        result.model.save(target)
        files[mode] = target
        sess = runtime.session(target, threads=1)
        names = [o.name for o in sess.get_outputs()]
        cos = [c for b, ref in zip(data, reference)
               for c in _cosines(ref, dict(zip(names, sess.run(None, b))))]
        entry = {"bytes": target.stat().st_size, "seconds": time.perf_counter() - started,
                 "size": target.stat().st_size / row["float_bytes"],
                 "cosine_mean": float(np.mean(cos)), "cosine_min": float(np.min(cos))}
        try:
            ov_ref = runtime_openvino.run(source, data[0], threads=1, precision="f32")
            ov_out = runtime_openvino.run(target, data[0], threads=1, precision="f32")
            # OpenVINO names an output by any of its tensor names: match them in order.
            entry["openvino_cosine_min"] = float(np.min(_cosines(
                dict(enumerate(ov_ref.values())), dict(enumerate(ov_out.values())))))
        except Exception as exc:  # noqa: BLE001 - recorded: the row says OpenVINO refused it
            entry["openvino_error"] = str(exc).splitlines()[0][:200]
        row[mode] = entry
    batch = data[0]
    ort_calls = {"float": lambda: float_ort.run(None, batch)}
    for mode, path in files.items():
        sess = runtime.session(path, threads=1)
        ort_calls[mode] = lambda sess=sess: sess.run(None, batch)
    row["ort_ms"] = _interleaved(ort_calls, runs)
    try:
        ov = {"float f32": runtime_openvino.Runner(source, batch, 1, precision="f32"),
              "float bf16 hint": runtime_openvino.Runner(source, batch, 1, precision="bf16"),
              "bf16 file, bf16 hint": runtime_openvino.Runner(files["bf16"], batch, 1,
                                                               precision="bf16")}
        row["openvino_ms"] = _interleaved(ov, runs)
    except Exception as exc:  # noqa: BLE001
        row["openvino_error"] = str(exc).splitlines()[0][:200]
    load(files["fp16"])  # the saved file reloads through onnxcomp's own checks
    return row


def table(results: dict) -> str:
    rows = []
    for name, row in results["models"].items():
        ort = row.get("ort_ms", {})
        ov = row.get("openvino_ms", {})
        for mode in ("fp16", "bf16"):
            e = row[mode]
            rows.append([
                name, mode, f"{e['size']:.4f}", f"{e['cosine_mean']:.6f}",
                f"{e['cosine_min']:.6f}",
                f"{e['openvino_cosine_min']:.6f}" if "openvino_cosine_min" in e
                else e.get("openvino_error", ""),
                f"{ort.get(mode, 0) / ort['float']:.2f}x" if ort else "",
                (f"{ov['bf16 file, bf16 hint'] / ov['float f32']:.2f}x (float at bf16 hint "
                 f"{ov['float bf16 hint'] / ov['float f32']:.2f}x)") if ov and mode == "bf16"
                else "",
            ])
    return markdown_table(["model", "mode", "size", "cosine mean (ORT)", "cosine worst (ORT)",
                           "cosine worst (OpenVINO)", "ORT latency vs float",
                           "OpenVINO latency vs float f32"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        default=["ppocr-rec", "ppocr-det", "minilm", "tiny-clip"])
    parser.add_argument("--count", type=int, default=8)
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"models": {}}
    results.update(environment=environment(), date=datetime.date.today().isoformat(),
                   command="python benchmarks/half.py --models " + " ".join(args.models))
    with tempfile.TemporaryDirectory() as scratch:
        for name in args.models:
            results["models"][name] = run_model(name, args.count, args.runs, Path(scratch))
            RESULTS.write_text(json.dumps(results, indent=2))
            print(name, json.dumps(results["models"][name])[:400])
    write_between(DOC, BEGIN, END, table(results), heading="## fp16 / bf16 (measured)")
    print(table(results))


if __name__ == "__main__":
    main()
