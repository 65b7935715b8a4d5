"""``onnxcomp demo``: the main job on the default zoo model, with no flags.

Fetches PP-OCRv4 recognition, compresses it with the demo recipe (calibrated on rendered text
lines), validates it on held-out lines (cosine and OCR accuracy side by side) and times both at
one and two threads. Writes the compressed model, ``report.json`` and ``report.html`` (the page a
person reads: :mod:`onnxcomp.report_html`) into the output folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from onnxcomp import api, progress, zoo
from onnxcomp.report import markdown_table

DEMO_MODEL = "ppocr-rec"
DEMO_RECIPE = "quantize:int8"
CALIB = f"{DEMO_MODEL}:calib:32"
EVAL = f"{DEMO_MODEL}:eval:100"


def _ratio(candidate, reference):
    if isinstance(candidate, (int, float)) and isinstance(reference, (int, float)) and reference:
        return f"{candidate / reference:.3f}x"
    return ""


def run_demo(out_dir: Path, recipe: str | None = None, as_json: bool = False) -> int:
    from onnxcomp.measure.bench import bench
    from onnxcomp.report_html import render_html

    progress.message(f"fetching {DEMO_MODEL}")
    reference_path = zoo.fetch(DEMO_MODEL)
    recipe = recipe or DEMO_RECIPE
    progress.message(f"compressing with {recipe!r}, calibration {CALIB}")
    result = api.compress(reference_path, recipe=recipe, calib=CALIB, eval_data=EVAL)
    out_dir.mkdir(parents=True, exist_ok=True)
    candidate_path = result.model.save(out_dir / f"{DEMO_MODEL}.compressed.onnx")
    progress.message("timing reference and candidate (interleaved, 1 and 2 threads)")
    timing = bench([reference_path, candidate_path], threads=[1, 2], runs=30,
                   data=f"{DEMO_MODEL}:eval:1", names=[f"{DEMO_MODEL} (reference)",
                                                       f"{DEMO_MODEL} (compressed)"])
    report = result.report
    report.bench = timing.bench
    report.models["candidate"]["path"] = str(candidate_path)
    report.write(out_dir / "report.json")
    page = render_html(report, out_dir / "report.html",
                       title=f"onnxcomp demo: {DEMO_MODEL}, {recipe}")

    rows = _summary_rows(reference_path, candidate_path, report)
    if as_json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.table())
        print()
        print(markdown_table(["", "reference", "candidate", "ratio"], rows))
        print(f"\ncandidate model: {candidate_path}\nreport: {out_dir / 'report.json'}\n"
              f"report page: {page}")
    return 0


def _summary_rows(reference_path: Path, candidate_path: Path, report) -> list[list]:
    rows = [["file size (bytes)", reference_path.stat().st_size, candidate_path.stat().st_size],
            ["parameters", report.models["reference"]["parameters"],
             report.models["candidate"]["parameters"]]]
    for entry in report.bench.get("results", []) if report.bench else []:
        if entry.get("model_index") == 0:
            for other in report.bench["results"]:
                if other.get("model_index") == 1 and other.get("threads") == entry.get("threads") \
                        and other.get("provider") == entry.get("provider"):
                    rows.append([f"latency p50 ms, {entry['threads']} thread(s)",
                                 entry["p50_ms"], other["p50_ms"]])
    fidelity = report.fidelity or {}
    for name, values in (fidelity.get("task") or {}).get("reference", {}).items():
        rows.append([name, values, fidelity["task"]["candidate"].get(name)])
    for output, metrics in (fidelity.get("outputs") or {}).items():
        rows.append([f"cosine {output} (mean)", 1.0, metrics.get("cosine_mean")])
    return [row + [_ratio(row[2], row[1])] for row in rows]
