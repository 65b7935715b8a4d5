"""onnxcomp's quantize pass side by side with ONNX Runtime's own quantizer, in one run per model.

For each model: the float model (Constant-node weights lifted, opset raised to 13: the same
preprocessed file is given to every quantizer), onnxcomp int8 (static QDQ) and int8-dynamic,
ONNX Runtime's ``quantize_static`` (QDQ, per-channel, uint8 activations, int8 weights,
op_types_to_quantize Conv/MatMul/Gemm, MinMax calibrator, the same calibration batches) and
``quantize_dynamic``, and NNCF's ``nncf.quantize`` (its defaults; ``ModelType.TRANSFORMER``
for transformers; same file and batches; an error row where nncf is missing). For conv nets also
onnxcomp int8 with latency-aware mixed precision (``min_cosine = 0.996``, ``keep_float_by =
"latency"``; issue #21), and for ppocr-det the text-mask IoU against float. For transformers
(more MatMul/Gemm weight than Conv weight: minilm, clip-vit-b32, tiny-clip) also: onnxcomp int4 (MatMulNBits, block 32, symmetric) against ONNX
Runtime's ``MatMulNBitsQuantizer`` (block 32, symmetric, same float model), and ONNX Runtime's
recommended transformer flow: the ``fuse`` pass (``onnxruntime.transformers.optimizer``), then
onnxcomp int8-dynamic and ``quantize_dynamic`` (per-tensor, its default, and per-channel) on the
same fused model. Where ONNX Runtime's default fusions include EmbedLayerNormalization
(minilm), which onnxcomp's ``fuse`` leaves off by default, ``quantize_dynamic`` also runs on
onnxcomp's fused graph: "fused" rows use ONNX Runtime's fusion defaults, "fused (no ELN)" rows
onnxcomp's, and onnxcomp int8-dynamic runs on the latter.

Reported: file size, float weight bytes left, p50 latency at 1 and 2 threads (interleaved runs,
median of ``--runs``), fidelity on the evaluation split against the unfused float model (mean
cosine per output; PP-OCR line and character accuracy; CLIP retrieval agreement, through
``onnxcomp.validate``), and the time each quantizer took.

    python benchmarks/quantize_vs_ort.py --models minilm clip-vit-b32
    python benchmarks/quantize_vs_ort.py --models ppocr-rec tiny-clip

Each run replaces its models' entries in ``benchmarks/results/quantize_vs_ort.json`` (the other
models' entries stay) and rewrites the tables of every model there into ``docs/quantize.md``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from doc_tables import write_between

from onnxcomp import calibration, runtime
from onnxcomp.measure.bench import _Runner, _time_runners
from onnxcomp.model import load
from onnxcomp.passes import cleanup, fuse, lower, quantize
from onnxcomp.pipeline import Context
from onnxcomp.report import environment, markdown_table

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "quantize.md"
RESULTS = ROOT / "benchmarks" / "results" / "quantize_vs_ort.json"
BEGIN, END = "<!-- quantize_vs_ort:begin -->", "<!-- quantize_vs_ort:end -->"
ORDER = ("ppocr-rec", "tiny-clip", "minilm", "clip-vit-b32")
# calibration batches, evaluation batches, timed runs when the flags are not given
SIZES = {"clip-vit-b32": (8, 8, 20)}
DEFAULT_SIZES = (32, 64, 30)
# ONNX Runtime's transformer optimizer settings per model. MiniLM's head count is not detected
# (no Attention fused without it). The CLIP optimizer fuses the attention of one tower per call
# (a second call on the fused graph matches nothing): given 12 heads x 768 it takes the vision
# tower, the larger one.
FUSE = {
    "minilm": fuse.Config(model_type="bert", num_heads=12, hidden_size=384,
                          embed_layer_norm=False),
    "clip-vit-b32": fuse.Config(model_type="clip", num_heads=12, hidden_size=768),
    "tiny-clip": fuse.Config(model_type="clip"),
}


def preprocess(path: Path, folder: Path) -> Path:
    """Lift Constant-node weights, fold, raise opset 12 -> 13: what every quantizer is given."""
    model = load(path)
    # as a pipeline's first cleanup: the exporter's Reshape targets stay (the float baseline
    # and every quantizer's input is the user's graph, lifted)
    model, _ = cleanup.PASS.run(model, cleanup.Config(static_reshapes=False), Context())
    if model.opset() < 13:
        model = type(model)(onnx.version_converter.convert_version(model.proto, 13), model.source)
    out = folder / "float.onnx"
    model.save(out)
    return out


def weight_params(proto: onnx.ModelProto) -> dict[str, int]:
    """Initializer elements read by each op type (MatMul/Gemm vs Conv decides 'transformer')."""
    sizes = {i.name: int(np.prod(i.dims)) for i in proto.graph.initializer}
    counts: dict[str, int] = {}
    for node in proto.graph.node:
        for name in node.input:
            if name in sizes:
                counts[node.op_type] = counts.get(node.op_type, 0) + sizes[name]
    return counts


def is_transformer(proto: onnx.ModelProto) -> bool:
    counts = weight_params(proto)
    return counts.get("MatMul", 0) + counts.get("Gemm", 0) > counts.get("Conv", 0)


def float_weight_mb(path: Path) -> float:
    """Megabytes of float initializers of 1024+ elements left in the file (weights kept float)."""
    proto = onnx.load(str(path))
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in proto.graph.initializer
               if i.data_type in floats and int(np.prod(i.dims)) >= 1024) / 1e6


class _Reader:
    """ONNX Runtime's CalibrationDataReader over our Dataset (same batches as onnxcomp)."""

    def __init__(self, data):
        self.iterator = iter(data)

    def get_next(self):
        return next(self.iterator, None)


def _timed(variants: dict, errors: dict, name: str, path: Path, make) -> None:
    """Run ``make(path)``; record (path, seconds), or the error when a quantizer fails."""
    started = time.perf_counter()
    try:
        make(path)
    except Exception as exc:  # noqa: BLE001 - a failing quantizer is a result, not a crash
        errors[name] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
        print(f"{name}: failed\n{traceback.format_exc()}")
        return
    variants[name] = (path, time.perf_counter() - started)


def _onnxcomp(source: Path, config: quantize.Config, calib=None, lowered: bool = True):
    """What ``compress --recipe quantize:...`` writes for the ort-cpu target: quantize, then
    the ``lower`` step it appends after static int8 (nothing to do in the other modes), then
    the pipeline's last cleanup (constant Reshape targets); ``lowered=False``: without lower."""
    def make(path: Path) -> None:
        result, _ = quantize.PASS.run(load(source), config, Context(calibration=calib))
        if lowered:
            result, _ = lower.PASS.run(result, lower.Config(), Context())
        result, _ = cleanup.PASS.run(result, cleanup.Config(), Context())
        result.save(path)
    return make


def make_variants(name: str, float_path: Path, calib, folder: Path, transformer: bool
                  ) -> tuple[dict[str, tuple[Path, float]], dict[str, str], dict]:
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    variants: dict[str, tuple[Path, float]] = {"float": (float_path, 0.0)}
    errors: dict[str, str] = {}
    extra: dict = {}
    _timed(variants, errors, "onnxcomp int8", folder / "onnxcomp_int8.onnx",
           _onnxcomp(float_path, quantize.Config(), calib))
    # The same QDQ graph without the `lower` step: what folding the bias Adds into
    # MatMulIntegerToFloat is worth (bit-identical outputs)
    _timed(variants, errors, "onnxcomp int8, QDQ only (no lower)",
           folder / "onnxcomp_int8_qdq.onnx",
           _onnxcomp(float_path, quantize.Config(), calib, lowered=False))
    qdq_only, lowered = (variants.get(f"onnxcomp int8{tail}")
                         for tail in (", QDQ only (no lower)", ""))
    if qdq_only and lowered and qdq_only[0].read_bytes() == lowered[0].read_bytes():
        del variants["onnxcomp int8, QDQ only (no lower)"]  # nothing lowered (a conv net)
    _timed(variants, errors, "onnxcomp int8-dynamic", folder / "onnxcomp_dyn.onnx",
           _onnxcomp(float_path, quantize.Config(mode="int8-dynamic")))
    _timed(variants, errors, "ORT quantize_static", folder / "ort_static.onnx",
           lambda path: quantize_static(
               str(float_path), str(path), _Reader(calib), quant_format=QuantFormat.QDQ,
               per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
               op_types_to_quantize=["Conv", "MatMul", "Gemm"]))
    _timed(variants, errors, "ORT quantize_dynamic", folder / "ort_dynamic.onnx",
           lambda path: quantize_dynamic(str(float_path), str(path), weight_type=QuantType.QInt8))

    def nncf_int8(path: Path) -> None:
        # The stronger post-training anchor (issue #21): NNCF's own defaults for the model
        # kind, on the same file and calibration batches; its output is timed in ONNX Runtime
        # like every other variant (it is laid out for OpenVINO: docs/targets.md).
        import nncf

        extra = {"model_type": nncf.ModelType.TRANSFORMER} if transformer else {}
        batches = list(calib)
        quantized = nncf.quantize(onnx.load(str(float_path)), nncf.Dataset(batches),
                                  subset_size=len(batches), **extra)
        onnx.save(quantized, str(path))

    _timed(variants, errors, "NNCF int8", folder / "nncf_int8.onnx", nncf_int8)
    if not transformer:
        # Latency-aware mixed precision (issue #21): layers slower in int8 than float stay
        # float, then the least harmful per millisecond saved until the calibration cosine
        # reaches 0.996
        _timed(variants, errors, "onnxcomp int8, min_cosine 0.996 by latency",
               folder / "onnxcomp_int8_latency.onnx",
               _onnxcomp(float_path, quantize.Config(min_cosine=0.996, keep_float_by="latency"),
                         calib))
        return variants, errors, extra
    # Not the default, but what a careful ORT user would set on a transformer: per-channel
    # weights (the default per-tensor weights cost MiniLM most of its fidelity)
    _timed(variants, errors, "ORT quantize_dynamic per_channel",
           folder / "ort_dynamic_pc.onnx",
           lambda path: quantize_dynamic(str(float_path), str(path), weight_type=QuantType.QInt8,
                                         per_channel=True))

    # With calibration data int8-dynamic applies SmoothQuant by default (transformers); GPTQ on
    # top; and static int8 with SmoothQuant asked for (alpha per tensor, every MatMul input).
    _timed(variants, errors, "onnxcomp int8-dynamic, calibrated", folder / "onnxcomp_dyn_cal.onnx",
           _onnxcomp(float_path, quantize.Config(mode="int8-dynamic"), calib))
    _timed(variants, errors, "onnxcomp int8-dynamic, calibrated + gptq",
           folder / "onnxcomp_dyn_gptq.onnx",
           _onnxcomp(float_path, quantize.Config(mode="int8-dynamic", int8_method="gptq"), calib))
    _timed(variants, errors, "onnxcomp int8 + smoothquant auto, all inputs",
           folder / "onnxcomp_int8_sq.onnx",
           _onnxcomp(float_path, quantize.Config(smoothquant_alpha="auto",
                                                 smoothquant_inputs="all"), calib))
    _timed(variants, errors, "onnxcomp int4", folder / "onnxcomp_int4.onnx",
           _onnxcomp(float_path, quantize.Config(mode="int4", block_size=32)))

    def ort_int4(path: Path) -> None:
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(float_path)), bits=4, block_size=32,
                                         is_symmetric=True)
        quantizer.process()
        quantizer.model.save_model_to_file(str(path))

    _timed(variants, errors, "ORT MatMulNBitsQuantizer int4", folder / "ort_int4.onnx", ort_int4)

    config = FUSE.get(name, fuse.Config())
    # ONNX Runtime's recommended flow uses its own fusion defaults, EmbedLayerNormalization
    # included; onnxcomp's fuse leaves that one off by default (its tables stay reachable for
    # quantize's int8 Gather rewrite). Where the two graphs differ, both are built and both
    # quantizers run on each; otherwise one fused graph serves both.
    ort_config = dataclasses.replace(config, embed_layer_norm=True)

    def fused(fuse_config: fuse.Config, key: str):
        def make(path: Path) -> None:
            model, record = fuse.PASS.run(load(float_path), fuse_config, Context())
            extra[key] = {"config": dataclasses.asdict(fuse_config), "notes": record.notes,
                          "fused": record.details.get("fused", {})}
            if not record.modified:
                raise RuntimeError(record.notes[0])
            model.save(path)
        return make

    def ort_dynamic(source: Path, per_channel: bool = False):
        # ONNX shape inference knows no types past com.microsoft ops; the option is what the
        # quantizer's own error message prescribes for such graphs
        return lambda path: quantize_dynamic(
            str(source), str(path), weight_type=QuantType.QInt8, per_channel=per_channel,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})

    ort_fused = folder / "fused.onnx"
    _timed(variants, errors, "fused float", ort_fused, fused(ort_config, "fuse"))
    if "fused float" not in variants:
        return variants, errors, extra
    if "EmbedLayerNormalization" in extra["fuse"]["fused"] and not config.embed_layer_norm:
        ours = folder / "fused_noeln.onnx"
        _timed(variants, errors, "fused float (no ELN)", ours, fused(config, "fuse_no_eln"))
        if "fused float (no ELN)" not in variants:
            return variants, errors, extra
        _timed(variants, errors, "fused (no ELN) + onnxcomp int8-dynamic",
               folder / "fused_noeln_onnxcomp_dyn.onnx",
               _onnxcomp(ours, quantize.Config(mode="int8-dynamic")))
        _timed(variants, errors, "fused (no ELN) + ORT quantize_dynamic",
               folder / "fused_noeln_ort_dynamic.onnx", ort_dynamic(ours))
    else:
        _timed(variants, errors, "fused + onnxcomp int8-dynamic",
               folder / "fused_onnxcomp_dyn.onnx",
               _onnxcomp(ort_fused, quantize.Config(mode="int8-dynamic")))
    _timed(variants, errors, "fused + ORT quantize_dynamic", folder / "fused_ort_dynamic.onnx",
           ort_dynamic(ort_fused))
    # the careful ORT user's flow again (per-channel weights), now after fusion
    _timed(variants, errors, "fused + ORT quantize_dynamic per_channel",
           folder / "fused_ort_dynamic_pc.onnx", ort_dynamic(ort_fused, per_channel=True))
    return variants, errors, extra


def wait_for_quiet(max_load: float, max_wait: float) -> float:
    """Wait (idle) until the 1-minute load average is under ``max_load``, at most ``max_wait``
    seconds: the machine is shared, and timings under load say little. Returns the wait."""
    started = time.monotonic()
    while os.getloadavg()[0] > max_load and time.monotonic() - started < max_wait:
        time.sleep(15)
    return time.monotonic() - started


def latency(paths: dict[str, Path], feeds: dict[str, np.ndarray], threads: int, runs: int
            ) -> dict[str, float]:
    """p50 milliseconds per variant, runs interleaved across the variants' sessions in
    ``bench``'s seeded random order per round (a fixed order times each variant after the same
    neighbour every round: docs/bench_stability.md).

    Intra-op spinning is off: with it on, each idle session's spinning worker threads took the
    cores from the one being timed (MiniLM, 2 threads: 12.4 ms with four sessions interleaved
    vs 3.0 ms alone; spinning off: 4.3-4.8 ms either way), so interleaved 2-thread timings
    measured the interference, not the model."""
    runners = [_Runner(str(path), "CPUExecutionProvider", threads, feeds, spinning=False)
               for path in paths.values()]
    times = _time_runners(runners, runs, 3)
    return {name: float(np.median(values) * 1000) for name, values in zip(paths, times)}


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
    n_calib, n_eval, runs = SIZES.get(name, DEFAULT_SIZES)
    n_calib, n_eval, runs = args.calib or n_calib, args.eval or n_eval, args.runs or runs
    local_metric = None
    try:
        source = zoo.fetch(name)
        calib = zoo.dataset(name, "calib", n_calib)
        evaluation = zoo.dataset(name, "eval", n_eval)
    except (ModuleNotFoundError, ImportError):
        if name != "ppocr-rec" or not args.ppocr_model:
            raise
        source = Path(args.ppocr_model)
        calib, _ = _local_ppocr(str(source), "calib", n_calib)
        evaluation, local_metric = _local_ppocr(str(source), "eval", n_eval)
    float_path = preprocess(source, folder)
    float_proto = onnx.load(str(float_path))
    transformer = is_transformer(float_proto)
    params = weight_params(float_proto)
    del float_proto
    print(f"{name}: quantizing ({'transformer' if transformer else 'conv net'})", flush=True)
    variants, errors, extra = make_variants(name, float_path, calib, folder, transformer)
    paths = {k: v[0] for k, v in variants.items()}
    feeds = evaluation.make_batch(0)
    rows = {k: {"size_mb": os.path.getsize(p) / 1e6, "float_weight_mb": float_weight_mb(p),
                "quantize_s": variants[k][1]} for k, p in paths.items()}
    waited = wait_for_quiet(args.max_load, args.max_wait)
    load_before = os.getloadavg()
    print(f"{name}: timing {len(paths)} variants x {runs} runs (load {load_before[0]:.2f})",
          flush=True)
    for threads in (1, 2):
        for k, ms in latency(paths, feeds, threads, runs).items():
            rows[k][f"p50_ms_{threads}t"] = ms
    load_after = os.getloadavg()
    print(f"{name}: fidelity", flush=True)
    for k, path in paths.items():
        rows[k]["fidelity"] = _fidelity_summary(float_path, path, evaluation)
        if local_metric is not None and "error" not in rows[k]["fidelity"]:
            rows[k]["fidelity"].update(_task(path, evaluation, local_metric))
    if name == "ppocr-det":  # issue #21's det bar is the text-mask IoU against float
        for k, iou in _mask_ious(paths, evaluation).items():
            rows[k]["fidelity"]["mask_iou"] = iou
    for k, message in errors.items():
        rows[k] = {"error": message}
    return {"model": name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
            "command": args.command, "input": {k: list(v.shape) for k, v in feeds.items()},
            "calib": len(calib), "eval": len(evaluation), "runs": runs,
            "transformer": transformer, "weight_params_by_op": params,
            "waited_for_load_s": round(waited),
            "loadavg_1_5_15": {"before_timing": [round(x, 2) for x in load_before],
                               "after_timing": [round(x, 2) for x in load_after]},
            **extra, "variants": rows}


def _mask_ious(paths: dict[str, Path], data) -> dict[str, float]:
    """PP-OCR det: mean IoU of each variant's text mask (probability map above the DB
    threshold) with float's on the evaluation pages. One session per variant; only float's
    masks are kept."""
    from onnxcomp.zoo import ppocr

    def masks(path: Path):
        sess = runtime.session(path)
        for index in range(len(data)):
            yield sess.run(None, data.make_batch(index))[0] > ppocr.DET_THRESHOLD

    reference = list(masks(paths["float"]))
    ious = {}
    for k, path in paths.items():
        per_page = [float((a & b).sum() / max((a | b).sum(), 1))
                    for a, b in zip(reference, masks(path))]
        ious[k] = round(float(np.mean(per_page)), 4)
    return ious


def _fidelity_summary(reference: Path, candidate: Path, data) -> dict:
    from onnxcomp.measure import validate

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


def _label(metric: str) -> str:
    parts = metric.split(".")
    if parts[0] == "outputs":
        short = {"cosine_mean": "cos", "top1_agreement": "top-1", "top5_agreement": "top-5"}
        return f"{short.get(parts[-1], parts[-1])} {'.'.join(parts[1:-1])}"
    if parts[0] == "task":
        return parts[-1].replace("_accuracy", " acc")
    if parts[0] == "retrieval":
        if parts[1].startswith("recall@"):
            return f"{parts[1]} {parts[2].replace('_to_', '->')}"
        return "agree " + parts[1].replace("_agreement", "").replace("_to_", "->")
    return metric


def _shown(metric: str) -> bool:
    """Table columns: the candidate's own figures (references are the float row, deltas are
    differences from it); everything stays in the JSON."""
    if metric.startswith("outputs.") and "embed" in metric and "_agreement" in metric:
        return False  # top-k of an embedding's dimensions means nothing
    return not any(word in metric for word in (".reference", ".delta", "error"))


def table(results: list[dict]) -> str:
    lines = []
    for result in results:
        variants = result["variants"]
        metrics = sorted({m for v in variants.values() for m in v.get("fidelity", {})
                          if _shown(m)})
        headers = ["variant", "size MB", "float weights MB", "p50 ms 1T", "p50 ms 2T",
                   "quantize s", *[_label(m) for m in metrics]]
        rows = []
        for name, v in variants.items():
            if "error" in v:
                rows.append([name, "failed: " + v["error"][:120], *[""] * (len(headers) - 2)])
                continue
            fid = v.get("fidelity", {})
            rows.append([name, f"{v['size_mb']:.2f}", f"{v.get('float_weight_mb', float('nan')):.2f}",
                         f"{v['p50_ms_1t']:.2f}", f"{v['p50_ms_2t']:.2f}",
                         f"{v['quantize_s']:.1f}",
                         *[f"{fid[m]:.4f}" if m in fid else fid.get("error", "-")[:40]
                           for m in metrics]])
        load = result.get("loadavg_1_5_15", {}).get("before_timing")
        lines.append(f"**{result['model']}** (input {result['input']}; calibration "
                     f"{result['calib']} batches, evaluation {result['eval']} batches, "
                     f"{result.get('runs', '?')} timed runs; {result.get('date', '')}"
                     + (f", load average {load[0]:.2f} / {load[1]:.2f} / {load[2]:.2f} "
                        "before timing" if load else "")
                     + (f" (after waiting {result['waited_for_load_s']} s)"
                        if result.get("waited_for_load_s") else "")
                     + f"; `{result.get('command', '')}`)\n")
        for key in ("fuse", "fuse_no_eln"):
            if result.get(key):
                lines.append(f"{key} {result[key]['config']}: {'; '.join(result[key]['notes'])}"
                             "\n")
        lines.append(markdown_table(headers, rows))
        lines.append("")
    return "\n".join(lines)


def write_doc(text: str) -> None:
    write_between(DOC, BEGIN, END, text, heading="")


def merged(results: list[dict]) -> list[dict]:
    """This run's results plus the other models' entries already in the JSON file."""
    fresh = {r["model"]: r for r in results}
    kept = {}
    if RESULTS.exists():
        try:
            previous = json.loads(RESULTS.read_text())
        except json.JSONDecodeError:
            previous = {}
        for entry in previous.get("results", []):
            entry.setdefault("command", previous.get("command", ""))
            kept[entry["model"]] = entry
    kept.update(fresh)
    rank = {name: i for i, name in enumerate(ORDER)}
    return sorted(kept.values(), key=lambda r: rank.get(r["model"], len(ORDER)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["ppocr-rec", "tiny-clip"])
    parser.add_argument("--calib", type=int, help="calibration batches (default: 32; "
                        "clip-vit-b32: 8)")
    parser.add_argument("--eval", type=int, help="evaluation batches (default: 64; "
                        "clip-vit-b32: 8)")
    parser.add_argument("--runs", type=int, help="timed runs per variant and thread count "
                        "(default: 30; clip-vit-b32: 20)")
    parser.add_argument("--max-load", type=float, default=2.5, help="before timing a model, "
                        "wait while the 1-minute load average is above this (default 2.5)")
    parser.add_argument("--max-wait", type=float, default=600, help="wait at most this many "
                        "seconds for --max-load (default 600)")
    parser.add_argument("--no-doc", action="store_true")
    parser.add_argument("--ppocr-model", help="ppocr-rec .onnx to use (with locally rendered "
                        "lines) while the zoo's ppocr module is missing")
    args = parser.parse_args()
    args.command = "python benchmarks/quantize_vs_ort.py " + " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in vars(args).items()
        if k not in ("no_doc", "command", "max_load", "max_wait") and v is not None)
    results = []
    with tempfile.TemporaryDirectory(prefix="quantize-vs-ort-") as tmp:
        for name in args.models:
            try:
                results.append(run_model(name, args, Path(tmp)))
            except (ModuleNotFoundError, ImportError) as exc:
                print(f"{name}: skipped, its zoo module is not available ({exc})")
            for leftover in (Path(tmp) / name).glob("*"):
                leftover.unlink()  # clip-vit-b32's variants take 2.5 GB
    everything = merged(results)
    output = {"environment": environment("cpu"), "ort_version": ort.__version__,
              "results": everything}
    if not args.no_doc:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(json.dumps(output, indent=2, default=str))
        write_doc(f"ONNX Runtime {ort.__version__}, {os.cpu_count()} cores; each model's "
                  f"command, date and load average are in its heading.\n\n{table(everything)}")
    print(table(results))


if __name__ == "__main__":
    main()
