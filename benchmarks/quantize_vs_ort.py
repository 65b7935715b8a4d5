"""onnxcomp's quantize pass side by side with ONNX Runtime's own quantizer, in one run.

For each model: the float model (Constant-node weights lifted, opset raised to 13: the same
preprocessed file is given to every quantizer), onnxcomp int8 (static QDQ) and int8-dynamic,
ONNX Runtime's ``quantize_static`` (QDQ, per-channel, uint8 activations, int8 weights,
op_types_to_quantize Conv/MatMul/Gemm, the same calibration batches) and ``quantize_dynamic``.
Reported: file size, p50 latency at 1 and 2 threads (interleaved runs, median of ``--runs``),
fidelity on the evaluation split (mean cosine per output, and the zoo's task metric: PP-OCR line
and character accuracy, tiny-clip retrieval agreement through ``onnxcomp.validate``), and the
time each quantizer took.

    python benchmarks/quantize_vs_ort.py --models ppocr-rec tiny-clip --calib 32 --eval 64

Writes ``benchmarks/results/quantize_vs_ort.json`` and the table into ``docs/quantize.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxcomp import calibration, runtime
from onnxcomp.model import load
from onnxcomp.passes import cleanup, quantize
from onnxcomp.pipeline import Context
from onnxcomp.report import environment, markdown_table

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "quantize.md"
BEGIN, END = "<!-- quantize_vs_ort:begin -->", "<!-- quantize_vs_ort:end -->"


def preprocess(path: Path, folder: Path) -> Path:
    """Lift Constant-node weights, fold, raise opset 12 -> 13: what every quantizer is given."""
    model = load(path)
    model, _ = cleanup.run(model, cleanup.Config(), Context())
    if model.opset() < 13:
        model = type(model)(onnx.version_converter.convert_version(model.proto, 13), model.source)
    out = folder / "float.onnx"
    model.save(out)
    return out


class _Reader:
    """ONNX Runtime's CalibrationDataReader over our Dataset (same batches as onnxcomp)."""

    def __init__(self, data):
        self.iterator = iter(data)

    def get_next(self):
        return next(self.iterator, None)


def make_variants(float_path: Path, calib, folder: Path) -> dict[str, tuple[Path, float]]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    variants = {"float": (float_path, 0.0)}
    model = load(float_path)
    for name, config in (("onnxcomp int8", quantize.Config()),
                         ("onnxcomp int8-dynamic", quantize.Config(mode="int8-dynamic"))):
        started = time.perf_counter()
        result, _ = quantize.run(model, config, Context(calibration=calib))
        seconds = time.perf_counter() - started
        path = folder / (name.replace(" ", "_") + ".onnx")
        result.save(path)
        variants[name] = (path, seconds)
    started = time.perf_counter()
    path = folder / "ort_static.onnx"
    quantize_static(str(float_path), str(path), _Reader(calib), quant_format=QuantFormat.QDQ,
                    per_channel=True, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, op_types_to_quantize=["Conv", "MatMul", "Gemm"])
    variants["ORT quantize_static"] = (path, time.perf_counter() - started)
    started = time.perf_counter()
    path = folder / "ort_dynamic.onnx"
    quantize_dynamic(str(float_path), str(path), weight_type=QuantType.QInt8)
    variants["ORT quantize_dynamic"] = (path, time.perf_counter() - started)
    return variants


def latency(paths: dict[str, Path], feeds: dict[str, np.ndarray], threads: int, runs: int
            ) -> dict[str, float]:
    sessions = {name: runtime.session(path, threads=threads) for name, path in paths.items()}
    times = {name: [] for name in sessions}
    for sess in sessions.values():  # warm-up
        for _ in range(3):
            sess.run(None, feeds)
    for _ in range(runs):
        for name, sess in sessions.items():
            started = time.perf_counter()
            sess.run(None, feeds)
            times[name].append(time.perf_counter() - started)
    return {name: float(np.median(values) * 1000) for name, values in times.items()}


def _local_ppocr(model_path: str, split: str, count: int):
    """Stand-in while ``onnxcomp.zoo.ppocr`` is not there: DejaVu-rendered lines, unpadded,
    normalized as PP-OCR expects, labels for a greedy CTC line/char accuracy."""
    from PIL import Image, ImageDraw, ImageFont

    proto = onnx.load(model_path, load_external_data=False)
    chars = next(p.value for p in proto.metadata_props if p.key == "character").split("\n")
    vocab = ["<blank>", *chars, " "]
    alphabet = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
    fonts = sorted(Path("/usr/share/fonts/truetype/dejavu").glob("DejaVuSans*.ttf"))
    rng = np.random.default_rng({"calib": 11, "eval": 22}[split])
    samples = []
    for i in range(count):
        text = "".join(rng.choice(list(alphabet), size=int(rng.integers(4, 12))))
        font = ImageFont.truetype(str(fonts[i % len(fonts)]), 32)
        width = int(font.getlength(text)) + 16
        image = Image.new("RGB", (width, 48), "white")
        ImageDraw.Draw(image).text((8, 6), text, fill="black", font=font)
        array = (np.asarray(image, np.float32) / 255.0 - 0.5) / 0.5
        samples.append(({"x": array.transpose(2, 0, 1)[None].copy()}, text))
    data = calibration.from_batches([b for b, _ in samples], f"ppocr-local:{split}",
                                    labels=[t for _, t in samples])

    def metric(outputs, labels):
        lines = chars_ok = chars_total = 0
        for probs, label in zip(outputs, labels):
            ids = probs[0].argmax(-1)
            text = "".join(vocab[j] for k, j in enumerate(ids)
                           if j != 0 and (k == 0 or j != ids[k - 1]))
            lines += text == label
            chars_ok += len(label) - min(_edit_distance(text, label), len(label))
            chars_total += len(label)
        return {"line_accuracy": lines / len(labels), "char_accuracy": chars_ok / chars_total}

    return data, metric


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def _task(path: Path, data, metric) -> dict:
    sess = runtime.session(path)
    outputs = [sess.run(None, batch)[0] for batch in data]
    return metric(outputs, data.labels)


def run_model(name: str, args, workdir: Path) -> dict:
    from onnxcomp import zoo

    folder = workdir / name
    folder.mkdir(parents=True, exist_ok=True)
    local_metric = None
    try:
        source = zoo.fetch(name)
        calib = zoo.dataset(name, "calib", args.calib)
        evaluation = zoo.dataset(name, "eval", args.eval)
    except (ModuleNotFoundError, ImportError):
        if name != "ppocr-rec" or not args.ppocr_model:
            raise
        source = Path(args.ppocr_model)
        calib, _ = _local_ppocr(str(source), "calib", args.calib)
        evaluation, local_metric = _local_ppocr(str(source), "eval", args.eval)
    float_path = preprocess(source, folder)
    variants = make_variants(float_path, calib, folder)
    paths = {k: v[0] for k, v in variants.items()}
    feeds = evaluation.make_batch(0)
    rows = {k: {"size_mb": os.path.getsize(p) / 1e6, "quantize_s": variants[k][1]}
            for k, p in paths.items()}
    for threads in (1, 2):
        for k, ms in latency(paths, feeds, threads, args.runs).items():
            rows[k][f"p50_ms_{threads}t"] = ms
    for k, path in paths.items():
        rows[k]["fidelity"] = _fidelity_summary(float_path, path, evaluation)
        if local_metric is not None and "error" not in rows[k]["fidelity"]:
            rows[k]["fidelity"].update(_task(path, evaluation, local_metric))
    return {"model": name, "input": {k: list(v.shape) for k, v in feeds.items()},
            "calib": len(calib), "eval": len(evaluation), "variants": rows}


def _fidelity_summary(reference: Path, candidate: Path, data) -> dict:
    from onnxcomp import validate

    try:
        report = validate.validate(str(reference), str(candidate), data=data, progress=None)
    except Exception as exc:  # noqa: BLE001 - an unloadable variant is a result, not a crash
        return {"error": str(exc).splitlines()[0][:200]}
    return _flatten_fidelity(report.fidelity)


def _flatten_fidelity(fid) -> dict:
    """Pick per-output mean cosine, task metrics and retrieval agreement out of validate's dict."""
    flat = {}

    def walk(prefix, value):
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            key = prefix.lower()
            if any(word in key for word in ("cosine_mean", "accuracy", "recall", "agreement",
                                            "task")):
                flat[prefix] = float(value)

    walk("", fid)
    return flat


def table(results: list[dict]) -> str:
    lines = []
    for result in results:
        variants = result["variants"]
        metrics = sorted({m for v in variants.values() for m in v.get("fidelity", {})
                          if not m.startswith("error")})
        headers = ["variant", "size MB", "p50 ms 1T", "p50 ms 2T", "quantize s", *metrics]
        rows = []
        for name, v in variants.items():
            fid = v.get("fidelity", {})
            rows.append([name, f"{v['size_mb']:.2f}", f"{v['p50_ms_1t']:.2f}",
                         f"{v['p50_ms_2t']:.2f}", f"{v['quantize_s']:.1f}",
                         *[f"{fid[m]:.4f}" if m in fid else fid.get("error", "-")[:40]
                           for m in metrics]])
        lines.append(f"**{result['model']}** (input {result['input']}, calibration "
                     f"{result['calib']} samples, evaluation {result['eval']} samples)\n")
        lines.append(markdown_table(headers, rows))
        lines.append("")
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else f"{BEGIN}\n{END}\n"
    head, _, rest = doc.partition(BEGIN)
    _, _, tail = rest.partition(END)
    DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ppocr-rec", "tiny-clip"])
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=64)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--ppocr-model", help="ppocr-rec .onnx to use (with locally rendered "
                        "lines) while the zoo's ppocr module is missing")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="quantize-vs-ort-") as tmp:
        for name in args.models:
            try:
                results.append(run_model(name, args, Path(tmp)))
            except (ModuleNotFoundError, ImportError) as exc:
                print(f"{name}: skipped, its zoo module is not available ({exc})")
    output = {"environment": environment("cpu"), "ort_version": ort.__version__,
              "command": "python benchmarks/quantize_vs_ort.py " + " ".join(
                  f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
                  for k, v in vars(args).items() if k != "no_doc" and v is not None),
              "results": results}
    out = ROOT / "benchmarks" / "results" / "quantize_vs_ort.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(output, indent=2, default=str))
    text = table(results)
    if not args.no_doc:
        write_doc(f"Measured with `{output['command']}` (ONNX Runtime {ort.__version__}, "
                  f"{os.cpu_count()} cores):\n\n{text}")
    print(text)


if __name__ == "__main__":
    main()
