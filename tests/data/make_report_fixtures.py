"""Regenerate the report fixtures the HTML tests render (run by hand, not by pytest).

    python tests/data/make_report_fixtures.py DEMO_DIR TINY_CLIP_DIR

``DEMO_DIR``: the output folder of ``onnxcomp demo`` (report.json and the compressed model);
``TINY_CLIP_DIR``: a folder with ``report.json`` and ``tc.onnx`` from
``onnxcomp compress tiny-clip -o TINY_CLIP_DIR/tc.onnx --recipe quantize:int8 --calib
tiny-clip:16 --min-cosine 0.999 --set quantize.min_cosine=0.999 --report TINY_CLIP_DIR/report.json``.

It adds to the real reports what the HTML page can draw and today's measurers do not keep yet
(``onnxcomp.report_data`` has the helpers; the lead wires them into validate/bench/api):
``models[role]["breakdown"]``, ``fidelity.outputs[name].per_sample_cosine``,
``fidelity.retrieval.similarity``, ``fidelity.task.changed`` and ``bench.results[i].times_ms``.
Paths are replaced by file names so the fixtures name no machine.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from onnxcomp import runtime, zoo
from onnxcomp.measure.compare import per_sample_cosine
from onnxcomp.model import load
from onnxcomp.report_data import changed_lines, model_breakdown, similarity_sample

HERE = Path(__file__).resolve().parent


def _outputs(path, dataset):
    session = runtime.session(str(path))
    names = [o.name for o in session.get_outputs()]
    return [runtime.run(session, batch, names) for batch in dataset]


def _cosines(ref_out, cand_out):
    result = {}
    for name in ref_out[0]:
        values = np.concatenate([per_sample_cosine(r[name], c[name])
                                 for r, c in zip(ref_out, cand_out)])
        result[name] = [round(float(v), 6) for v in values]
    return result


def _times(bench_section, paths):
    from onnxcomp.measure.bench import _feeds_for, _time_interleaved, percentiles

    feeds = [_feeds_for(load(p, load_weights=False), bench_section["data"], 1) for p in paths]
    for result in bench_section["results"]:
        if result["model_index"] == 0:
            times = _time_interleaved(paths, "cpu", result["threads"], feeds, result["runs"], 5)
            for row in bench_section["results"]:
                if row["threads"] == result["threads"]:
                    model_times = times[row["model_index"]]
                    row.update(percentiles(model_times), runs=len(model_times))
                    row["times_ms"] = [round(t * 1000, 4) for t in model_times]
            base = None
            for row in bench_section["results"]:  # ratios and throughput from these times
                if row["threads"] == result["threads"]:
                    base = base or row["p50_ms"]
                    row["latency_ratio"], row["speedup"] = row["p50_ms"] / base, base / row["p50_ms"]
                    row["throughput"] = 1000.0 / row["p50_ms"]


def _anonymize(report):
    for info in report["models"].values():
        if isinstance(info, dict) and "path" in info:
            info["path"] = Path(info["path"]).name
    fidelity = report.get("fidelity") or {}
    for key in ("reference", "candidate"):
        if key in fidelity:
            fidelity[key] = Path(fidelity[key]).name


def demo(folder: Path) -> None:
    from onnxcomp.zoo import ppocr

    report = json.loads((folder / "report.json").read_text())
    reference, candidate = zoo.fetch("ppocr-rec"), folder / "ppocr-rec.compressed.onnx"
    report["models"]["reference"]["breakdown"] = model_breakdown(load(reference))
    report["models"]["candidate"]["breakdown"] = model_breakdown(load(candidate))
    data = zoo.dataset("ppocr-rec", "eval", report["fidelity"]["batches"])
    ref_out, cand_out = _outputs(reference, data), _outputs(candidate, data)
    for name, values in _cosines(ref_out, cand_out).items():
        report["fidelity"]["outputs"][name]["per_sample_cosine"] = values
    labels = [text for batch in data.labels for text in batch]
    ref_text = ppocr.recognize(load(reference, load_weights=False), ref_out)
    cand_text = ppocr.recognize(load(reference, load_weights=False), cand_out)
    images = [ppocr.rec_line(0, "eval", i)[1] for i in range(len(labels))]
    report["fidelity"]["task"]["changed"] = changed_lines(labels, ref_text, cand_text, images,
                                                          limit=12)
    _times(report["bench"], [reference, candidate])
    for row in report["bench"]["models"]:
        row["path"] = "<in-memory>"
    _anonymize(report)
    (HERE / "report_ppocr_demo.json").write_text(json.dumps(report, indent=1) + "\n")


def tiny_clip(folder: Path) -> None:
    report = json.loads((folder / "report.json").read_text())
    reference, candidate = zoo.fetch("tiny-clip"), folder / "tc.onnx"
    report["models"]["reference"]["breakdown"] = model_breakdown(load(reference))
    report["models"]["candidate"]["breakdown"] = model_breakdown(load(candidate))
    data = zoo.dataset("tiny-clip", "eval", report["fidelity"]["batches"])
    ref_out, cand_out = _outputs(reference, data), _outputs(candidate, data)
    for name, values in _cosines(ref_out, cand_out).items():
        report["fidelity"]["outputs"][name]["per_sample_cosine"] = values
    retrieval = report["fidelity"]["retrieval"]
    a, b = retrieval["a"], retrieval["b"]

    def rows(outputs, name):
        return np.concatenate([o[name] for o in outputs])

    retrieval["similarity"] = similarity_sample(rows(ref_out, a), rows(ref_out, b),
                                                rows(cand_out, a), rows(cand_out, b))
    _anonymize(report)
    (HERE / "report_tiny_clip.json").write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    demo(Path(sys.argv[1]))
    tiny_clip(Path(sys.argv[2]))
