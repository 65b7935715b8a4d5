"""int8 on an x86 CPU without VNNI: what ONNX Runtime's u8 x s8 kernels do to fidelity, and what
``quantize.u8s8_overflow`` gives back with each ``u8s8_remedy`` (widened int8 scales, the
default through ``auto``; uint8 weights, exact and slower) for the layers that overflow.

Every variant's fidelity is read as deployed: ONNX Runtime's CPU provider with its default
optimizations (the integer kernels). ``QDQ math`` is the same file with optimizations off (the
QDQ emulation, no integer kernel: what the quantize pass and ``validate`` measure). Latency: one
interleaved ``bench`` per thread count, ratios against float. ONNX Runtime's own
``quantize_static`` (QDQ, per channel) with and without ``reduce_range`` (7-bit weights, its
documented remedy on such CPUs) is the anchor.

    python benchmarks/u8s8_overflow.py [--models ppocr-rec ppocr-det minilm] [--eval 256]
        [--hard 512] [--pages 8] [--calib 32] [--runs 200]

Results: benchmarks/results/u8s8_overflow.json and the tables in docs/quantize.md. The report
records the CPU (``int8_dot_product``): on a CPU with VNNI every row reads like ``QDQ math``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import tempfile
from pathlib import Path

import numpy as np
from doc_tables import write_between
from quantize_ablation import _det_metrics, _minilm_metrics, _outputs
from quantize_vs_ort import _Reader, preprocess

from onnxcomp import api, runtime, zoo
from onnxcomp.measure.bench import bench
from onnxcomp.model import load
from onnxcomp.report import environment, markdown_table

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "u8s8_overflow.json"
DOC = ROOT / "docs" / "quantize.md"
BEGIN, END = "<!-- u8s8-overflow:begin -->", "<!-- u8s8-overflow:end -->"


def _rec(path: Path, sets: dict, optimize: bool = True) -> dict:
    from onnxcomp.zoo import ppocr

    model, session = load(path), runtime.session(path, optimize=optimize)
    names = [o.name for o in session.get_outputs()]
    found = {}
    for label, data in sets.items():
        outputs = [dict(zip(names, session.run(None, batch))) for batch in data]
        scores = ppocr.task_metric("ppocr-rec", model, outputs, data.labels)
        found[f"{label} line / char"] = (f"{scores['line_accuracy']:.4f} / "
                                         f"{scores['char_accuracy']:.4f}")
    return found


def _onnxcomp(source: Path, calib, path: Path, mode: str, choice: str, remedy: str) -> str:
    """Quantize with this u8s8_overflow choice and remedy; the layers it widened / moved to
    uint8."""
    result = api.compress(str(source), recipe=f"quantize:{mode}", calib=calib, validate=False,
                          show_progress=False, overrides=[f"quantize.u8s8_overflow={choice}",
                                                          f"quantize.u8s8_remedy={remedy}"])
    result.model.save(path)
    moved = [n for p in result.report.passes for n in p.notes if n.startswith("u8s8_overflow:")]
    print(f"  {path.name}: {' | '.join(moved)[:400]}", flush=True)
    counts = {"widened": 0, "uint8": 0}
    for note in moved:
        kind = "widened" if "scales widened" in note else "uint8" if "stored as uint8" in note \
            else ""
        if kind:
            counts[kind] = int(note.split()[1])
    return f"{counts['widened']} / {counts['uint8']}"


def run_model(name: str, args, folder: Path) -> dict:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

    print(f"== {name}", flush=True)
    float_path = preprocess(zoo.fetch(name), folder)
    # det: 640x640 pages, calibrated on as many as it is scored on (the ablation's choice)
    calib = zoo.dataset(name, "calib", min(args.calib, args.pages) if name == "ppocr-det"
                        else args.calib)
    paths = {"float": float_path}
    moved: dict[str, str] = {}
    modes = ["int8", "int8-dynamic"] if name == "minilm" else ["int8"]
    for mode in modes:
        for choice, remedy in (("none", "auto"), ("auto", "auto"), ("auto", "u8u8"),
                               ("all", "u8u8")):
            label = f"onnxcomp {mode}, u8s8_overflow={choice}" + (
                f", u8s8_remedy={remedy}" if choice != "none" else "")
            paths[label] = folder / f"{mode}_{choice}_{remedy}.onnx"
            moved[label] = _onnxcomp(float_path, calib, paths[label], mode, choice, remedy)
    for reduce in (False, True):
        label = f"ORT quantize_static{', reduce_range' if reduce else ''}"
        paths[label] = folder / f"ort_static_{int(reduce)}.onnx"
        quantize_static(str(float_path), str(paths[label]), _Reader(calib),
                        quant_format=QuantFormat.QDQ, per_channel=True, reduce_range=reduce,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    exact = {"QDQ math of u8s8_overflow=none (optimizations off)":
             paths["onnxcomp int8, u8s8_overflow=none"]}
    rows, extra = [], {}
    if name == "ppocr-rec":
        sets = {"eval": zoo.dataset(name, "eval", args.eval),
                "hard": zoo.dataset(name, "hard", args.hard)}
        for label, path in paths.items():
            rows.append({"variant": label, **_rec(path, sets)})
        for label, path in exact.items():
            rows.append({"variant": label, **_rec(path, sets, optimize=False)})
        from onnxcomp.zoo import text_render  # the hard lines depend on the faces installed

        extra = {"hard_fonts": [f.name for f in text_render.hard_font_files()]}
    elif name == "ppocr-det":
        from onnxcomp.zoo import ppocr

        data = zoo.dataset(name, "eval", args.pages)
        reference = [o[ppocr.DET_OUTPUT] for o in _outputs(float_path, data)]
        for label, path in paths.items():
            rows.append({"variant": label, **_det_metrics(path, reference, data)})
    else:
        data = zoo.dataset(name, "eval", args.eval)
        reference = np.concatenate([o["sentence_embedding"] for o in _outputs(float_path, data)])
        for label, path in paths.items():
            rows.append({"variant": label, **_minilm_metrics(path, reference.astype(np.float64),
                                                            data)})
    labels = list(paths)
    timing = bench([str(paths[k]) for k in labels], names=labels, threads=args.threads,
                   runs=args.runs, warmup=5, data=zoo.dataset(name, "eval", 1), memory=False,
                   progress=None, spinning=False)
    for row in rows:
        row["layers widened / uint8"] = moved.get(row["variant"], "")
        for result in timing.bench["results"]:
            if result["model"] == row["variant"]:
                row[f"latency {result['threads']} thr"] = round(result["latency_ratio"], 3)
        row["size MB"] = round(paths.get(row["variant"], float_path).stat().st_size / 1e6, 2) \
            if row["variant"] in paths else ""
    for row in rows:
        print("  ", row, flush=True)
    return {"model": name, "rows": rows, **extra}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["ppocr-rec", "ppocr-det", "minilm"])
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=256)
    parser.add_argument("--hard", type=int, default=512)
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=lambda s: [int(t) for t in s.split(",")],
                        default=[1, 2])
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="onnxcomp-u8s8-") as tmp:
        results = []
        for name in args.models:
            folder = Path(tmp) / name
            folder.mkdir()
            results.append(run_model(name, args, folder))
    stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    env = environment()
    args.out.write_text(json.dumps({"when": stamp, "environment": env, "args": {
        k: v for k, v in vars(args).items() if k != "out"}, "results": results}, indent=1))
    if args.out != RESULTS:
        return
    header = (f"CPU: {env.get('cpu', '?')}, int8 dot product: "
              f"{env.get('int8_dot_product', '?')}; onnxruntime {env['onnxruntime']}; {stamp}; "
              f"`python benchmarks/u8s8_overflow.py --models {' '.join(args.models)} --eval "
              f"{args.eval} --hard {args.hard} --pages {args.pages} --calib {args.calib} "
              f"--runs {args.runs}`")
    text = [header]
    for result in results:
        headers = list(dict.fromkeys(k for row in result["rows"] for k in row))
        rows = [[row.get(h, "") for h in headers] for row in result["rows"]]
        text += ["", f"**{result['model']}**", "", markdown_table(headers, rows)]
    write_between(DOC, BEGIN, END, "\n".join(text))


if __name__ == "__main__":
    main()
