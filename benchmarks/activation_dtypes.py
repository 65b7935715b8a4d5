"""Static int8 laid out for each target's activation type, side by side: fidelity, layout, size.

For each zoo model, from the same calibration batches (the zoo's ``calib`` split), ``compress
--recipe quantize:int8`` with:
- ``ort-cpu``: uint8 asymmetric activations, ONNX Runtime's layout (the default);
- ``tensorrt``: symmetric int8 activations, Q/DQ on every residual Add input, int8 weights,
  float biases (``docs/targets.md``);
- ``qnn``: uint8 activations and Q/DQ on every quantized op's output;
- ``qnn uint16``: the same with ``--set quantize.activation_dtype=uint16`` (QNN HTP's 16-bit
  activations, opset 21).
Fidelity on the zoo's held-out splits (task metrics and output cosine against float; ppocr-rec
also on its ``hard`` split), twice: in ONNX Runtime's CPU provider as deployed there, and as
``QDQ math`` (optimizations off: the Q/DQ arithmetic itself, which exact integer kernels such
as TensorRT's or HTP's compute up to accumulation order). For the tensorrt and qnn rows the QDQ
math is the figure that matters: ONNX Runtime's CPU provider fuses int8 MatMuls into its integer
kernels, which on an x86 CPU without VNNI saturate (``docs/quantize.md``, u8s8_overflow; those
targets leave the ONNX Runtime remedy off or do not need it), and runs uint16 Q/DQ in float.
``findings``: what ``targets.placement_findings`` says against the variant's own target's
documented rules (0 is the goal; for qnn on the model with its inputs fixed to the first
held-out batch's shapes, as ``--shape`` does; the sentences are in the JSON).
Where the TensorRT execution provider is installed (onnxruntime-gpu with TensorRT, its own
environment), ``--providers tensorrt`` also times float and the variants there; without it the
JSON says it was not measured.

    python benchmarks/activation_dtypes.py [--models ppocr-rec ppocr-det minilm tiny-clip]
        [--calib 32] [--eval 64] [--hard 128] [--providers tensorrt] [--doc]
    python benchmarks/activation_dtypes.py --from-json A.json B.json --doc   # table only
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from distill_kd import scores
from doc_tables import write_between

from onnxcomp import api, calibration, fixed_shapes, targets, zoo
from onnxcomp.measure.validate import validate
from onnxcomp.model import load
from onnxcomp.report import environment

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "activation_dtypes.json"
VARIANTS = (("ort-cpu", ()), ("tensorrt", ()), ("qnn", ()),
            ("qnn", ("quantize.activation_dtype=uint16",)))


def _findings(model, target: str, data) -> list[str]:
    """The target's structural findings; for qnn on the model with its inputs fixed to the
    first held-out batch's shapes, as a QNN user compresses it (``--shape``), while fidelity
    is measured on the unfixed file (the held-out batches' shapes differ)."""
    if target == "qnn":
        shapes = {name: list(value.shape) for name, value in data.make_batch(0).items()}
        model = fixed_shapes.fix(model, shapes)[0]
    return targets.placement_findings(model.proto, target)


def _activation_pairs(model) -> dict[str, int]:
    """Activation QuantizeLinear nodes by zero-point element type."""
    inits = {t.name: t for t in model.proto.graph.initializer}
    found: dict[str, int] = {}
    for node in model.proto.graph.node:
        if node.op_type == "QuantizeLinear" and node.input[0] not in inits:
            kind = {3: "int8", 4: "uint16"}.get(inits[node.input[2]].data_type, "uint8")
            found[kind] = found.get(kind, 0) + 1
    return found


def _qdq_math(original: str, path: Path, data, prefix: str) -> dict:
    """Output cosine (and the zoo task metric) with ONNX Runtime's optimizations off in both
    models: the Q/DQ arithmetic itself, what a runtime with exact int8 kernels computes."""
    import numpy as np

    from onnxcomp import runtime
    from onnxcomp.measure.compare import per_sample_cosine

    sessions = [runtime.session(p, optimize=False) for p in (original, path)]
    names = [o.name for o in sessions[0].get_outputs()]
    pairs = [[dict(zip(names, s.run(None, batch))) for s in sessions] for batch in data]
    out = {f"{prefix}QDQ math cos {n}": round(float(np.mean(np.concatenate(
        [per_sample_cosine(a[n], b[n]) for a, b in pairs]))), 4) for n in names}
    metric = zoo.task_metric(data.zoo_name) if data.zoo_name else None
    if metric is not None and data.labels is not None:
        found = metric(load(path), [b for _, b in pairs], data.labels)
        out.update({f"{prefix}QDQ math {k}": round(v, 4) for k, v in found.items()})
    return out


def _timings(paths: dict[str, Path], provider: str, data) -> dict:
    import onnxruntime as ort

    from onnxcomp.measure.bench import bench
    from onnxcomp.runtime import PROVIDERS

    if PROVIDERS.get(provider, provider) not in ort.get_available_providers():
        return {"not measured": f"{provider}: not in this onnxruntime's providers "
                                f"({', '.join(ort.get_available_providers())})"}
    report = bench(list(paths.values()), providers=(provider,), names=list(paths), data=data,
                   runs=200, progress=None)
    return report.bench


DOC = ROOT / "docs" / "targets.md"
BEGIN, END = "<!-- activation-dtypes:begin -->", "<!-- activation-dtypes:end -->"


def _fidelity(row: dict, prefix: str) -> str:
    """The row's headline figures under ``prefix`` (``QDQ math `` or ``""``): task metrics where
    the zoo has them, else the output cosines."""
    tasks = [k for k in ("line_accuracy", "char_accuracy") if f"{prefix}{k}" in row]
    if tasks:
        return " / ".join(f"{row[prefix + k]:.3f}" for k in tasks)
    cosines = [v for k, v in row.items() if k.startswith(f"{prefix}cos ")]
    return " / ".join(f"{v:.4f}" for v in cosines)


def doc_table(results: dict) -> str:
    """One row per model and variant: the figures as the target's runtime would compute them
    (QDQ math), ONNX Runtime CPU's, the hard lines' where measured, pairs, findings, size."""
    from onnxcomp.report import markdown_table

    rows = []
    for name, entry in results["models"].items():
        for row in entry["rows"]:
            hard = _fidelity(row, "hard QDQ math ") if "hard QDQ math line_accuracy" in row \
                else ""
            pairs = ", ".join(f"{n} {k}" for k, n in row["activation pairs"].items())
            rows.append([name, row["variant"], _fidelity(row, "QDQ math "), hard,
                         _fidelity(row, ""), pairs, row["findings"], row["size x"]])
    return markdown_table(["model", "variant", "QDQ math (eval)", "QDQ math (hard lines)",
                           "ONNX Runtime CPU (eval)", "activation pairs", "findings", "size x"],
                          rows)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+",
                        default=["ppocr-rec", "ppocr-det", "minilm", "tiny-clip"])
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--hard", type=int, default=128, help="ppocr-rec hard lines")
    parser.add_argument("--providers", default="", help="e.g. tensorrt (timed where present)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--doc", action="store_true", help=f"write the table into {DOC.name}")
    parser.add_argument("--from-json", nargs="+", type=Path,
                        help="no run: the table from these results files (merged)")
    args = parser.parse_args()
    if args.from_json:
        merged = {"models": {}}
        for path in args.from_json:
            merged["models"].update(json.loads(path.read_text())["models"])
        table = doc_table(merged)
        print(table)
        if args.doc:
            write_between(DOC, BEGIN, END, table)
        return 0
    results = {"date": datetime.datetime.now().isoformat(timespec="minutes"),
               "environment": environment(), "args": {k: str(v) for k, v in vars(args).items()},
               "models": {}}
    for name in args.models:
        original = zoo.fetch(name)
        reference = load(original)
        eval_data = calibration.resolve(f"{name}:eval:{args.eval}", reference, split="eval")
        hard = (calibration.resolve(f"{name}:hard:{args.hard}", reference, split="eval")
                if name == "ppocr-rec" and args.hard else None)
        rows, paths = [], {"float": Path(original)}
        with tempfile.TemporaryDirectory() as folder:
            for target, overrides in VARIANTS:
                label = f"{target} int8" + (" uint16" if overrides else "")
                result = api.compress(original, recipe="quantize:int8",
                                      calib=f"{name}:calib:{args.calib}", validate=False,
                                      show_progress=False, target=target,
                                      overrides=list(overrides))
                path = Path(folder) / f"{label.replace(' ', '_')}.onnx"
                result.model.save(path)
                paths[label] = path
                found = _findings(result.model, target, eval_data)
                row = {"variant": label,
                       "size x": round(path.stat().st_size / Path(original).stat().st_size, 3),
                       "activation pairs": _activation_pairs(result.model),
                       "findings": len(found), "findings said": found}
                row.update(scores(validate(original, path, data=eval_data, progress=None,
                                           ours=True).fidelity))
                row.update(_qdq_math(original, path, eval_data, ""))
                if hard is not None:
                    row.update(scores(validate(original, path, data=hard, progress=None,
                                               ours=True).fidelity, prefix="hard "))
                    row.update(_qdq_math(original, path, hard, "hard "))
                rows.append(row)
                print(name, row, flush=True)
            timed = {p: _timings(paths, p, eval_data) for p in args.providers.split(",") if p}
        results["models"][name] = {"rows": rows, "timings": timed or {
            "not measured": "no --providers given (TensorRT needs a GPU: none here)"}}
        args.out.parent.mkdir(parents=True, exist_ok=True)  # after each model: kept if one fails
        args.out.write_text(json.dumps(results, indent=1, default=str))
    if args.doc:
        write_between(DOC, BEGIN, END, doc_table(results))
    for name, entry in results["models"].items():
        headers = list(dict.fromkeys(k for r in entry["rows"] for k in r))
        print(f"\n### {name}\n\n| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
        for r in entry["rows"]:
            print("| " + " | ".join(str(r.get(h, "")) for h in headers) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
