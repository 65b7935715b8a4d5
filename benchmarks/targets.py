"""Deployment targets side by side: one model, four variants, timed in OpenVINO and in ONNX
Runtime in one interleaved run, with fidelity measured in each runtime.

Variants, all from the same preprocessed float model (Constant-node weights lifted, opset >= 13)
and the same calibration batches (the zoo's ``calib`` split):
- ``float``;
- ``onnxcomp int8 ort-cpu``: ``compress --recipe quantize:int8 --target ort-cpu`` (the default)
  with ``--set lower.matmul_bias=false``, the QDQ graph that OpenVINO can read too;
- ``onnxcomp int8 openvino``: the same with ``--target openvino``;
- ``NNCF int8``: ``nncf.quantize(onnx_model, nncf.Dataset(batches))``, NNCF's post-training
  quantization run on the ONNX model (its default preset; ``model_type=TRANSFORMER`` for
  transformer models, as NNCF's documentation recommends for them).

- ``NNCF int8 (OpenVINO IR)``: ``nncf.quantize`` on ``ov.convert_model`` of the same file,
  OpenVINO's standard flow (OpenVINO only: ONNX Runtime cannot read IR).

Timing, interleaved round by round, p50 over the rounds (``bench``'s method): the ONNX variants
in ONNX Runtime (``onnxcomp.measure.bench``), and every variant in OpenVINO in one loop at
``INFERENCE_PRECISION_HINT=f32`` and at the plugin's default precision (bf16 on this CPU, which
makes "float" lossy, hence f32 for the ratios). Fidelity on the zoo's
held-out data, in each runtime: PP-OCR rec line/char accuracy (``eval`` and ``hard`` splits),
MiniLM mean cosine of ``sentence_embedding`` against float in ONNX Runtime. Executed ops by
runtime precision come from OpenVINO's compiled model (``runtime_openvino.precision_summary``).

    python benchmarks/targets.py --models ppocr-rec
    python benchmarks/targets.py --models minilm --calib 32 --eval 32

    python benchmarks/targets.py --models ppocr-det --threads 1,2 --keep /tmp/variants
    .venv-ov/bin/python benchmarks/targets.py --models ppocr-det --threads 1,2 \
        --ep /tmp/variants

``--sessions N`` (default 3) splits the OpenVINO rounds over N fresh compilations of every
variant; ONNX Runtime is timed with intra-op spinning off (an idle session's spinning threads
take the cores from the one being timed). ``--keep DIR`` saves the ONNX variants, the held-out
``eval`` batches (``.npz``) and the float model's outputs on them; ``--ep DIR`` (run in the
environment with onnxruntime-openvino, which has neither OpenVINO's own API nor NNCF) times
those files through ONNX Runtime's OpenVINO execution provider and its CPU provider,
interleaved, measures their output cosine against float through the EP, and adds the result to
the model's entry (``ep``).

Each run replaces its models' entries in ``benchmarks/results/targets.json`` and rewrites the
table in ``docs/targets.md`` between the markers.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from doc_tables import write_between

from onnxcomp import api, runtime, runtime_openvino, zoo
from onnxcomp.measure.bench import bench
from onnxcomp.model import load
from onnxcomp.passes import cleanup
from onnxcomp.pipeline import Context
from onnxcomp.report import environment, markdown_table

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "targets.json"
DOC = ROOT / "docs" / "targets.md"
BEGIN, END = "<!-- targets:begin -->", "<!-- targets:end -->"
TRANSFORMERS = {"minilm", "clip-vit-b32"}
EMBEDDING = {"minilm": "sentence_embedding"}


def preprocess(name: str, folder: Path) -> Path:
    """Constant-node weights lifted, folded, opset raised to 13: what every quantizer gets."""
    model = load(zoo.fetch(name))
    # as a pipeline's first cleanup: the exporter's Reshape targets stay (the float baseline
    # and every quantizer's input is the user's graph, lifted)
    model, _ = cleanup.PASS.run(model, cleanup.Config(static_reshapes=False), Context())
    if model.opset() < 13:
        model = type(model)(onnx.version_converter.convert_version(model.proto, 13),
                            model.source)
    path = folder / "float.onnx"
    model.save(path)
    return path


def nncf_int8(name: str, float_path: Path, batches: list[dict], out: Path) -> float:
    import nncf

    started = time.perf_counter()
    extra = {"model_type": nncf.ModelType.TRANSFORMER} if name in TRANSFORMERS else {}
    quantized = nncf.quantize(onnx.load(str(float_path)), nncf.Dataset(batches),
                              subset_size=len(batches), **extra)
    onnx.save(quantized, str(out))
    return time.perf_counter() - started


def nncf_int8_ir(name: str, float_path: Path, batches: list[dict], out: Path) -> float:
    """NNCF on OpenVINO's own model (``ov.convert_model`` of the same ONNX file), saved as IR:
    OpenVINO's standard flow, the second anchor (ONNX Runtime cannot run it)."""
    import nncf
    import openvino as ov

    started = time.perf_counter()
    extra = {"model_type": nncf.ModelType.TRANSFORMER} if name in TRANSFORMERS else {}
    quantized = nncf.quantize(ov.convert_model(str(float_path)), nncf.Dataset(batches),
                              subset_size=len(batches), **extra)
    ov.save_model(quantized, str(out))
    return time.perf_counter() - started


def openvino_timing(paths: dict[str, Path], feeds: dict, threads: list[int], runs: int,
                    sessions: int = 1) -> list[dict]:
    """Every variant (IR included) in OpenVINO at f32 and at the plugin's default precision,
    all interleaved in one loop per thread count (``bench``'s method). With ``sessions`` > 1
    the loop is repeated on freshly compiled models, ``runs / sessions`` rounds each, and the
    percentiles are taken over all rounds: one compiled copy of a file can run 1-3 % off
    another (docs/bench_stability.md), and more rounds on the same copy do not average that."""
    from onnxcomp.measure.bench import _time_runners, percentiles

    rows = []
    engines = [(label, precision) for precision in ("f32", None) for label in paths]
    for count in threads:
        times: list[list[float]] = [[] for _ in engines]
        for _ in range(sessions):
            runners = [runtime_openvino.Runner(paths[label], feeds, count, precision=precision)
                       for label, precision in engines]
            for pooled, run_times in zip(times, _time_runners(
                    runners, -(-runs // sessions), 5, 1.0 / sessions)):
                pooled.extend(run_times)
            del runners
        base: dict = {}
        for (label, precision), run_times in zip(engines, times):
            stats = percentiles(run_times)
            base.setdefault(precision, stats["p50_ms"])
            rows.append({"model": label, "threads": count, "runs": len(run_times),
                         "sessions": sessions,
                         "runtime": "openvino" if precision else "openvino (default precision)",
                         "provider": "OpenVINO CPU", **stats,
                         "latency_ratio": stats["p50_ms"] / base[precision]})
    return rows


def onnxcomp_int8(float_path: Path, calib, target: str, out: Path,
                  overrides: list[str] | None = None) -> float:
    started = time.perf_counter()
    result = api.compress(str(float_path), recipe="quantize:int8", calib=calib,
                          validate=False, show_progress=False, target=target,
                          overrides=overrides)
    result.model.save(out)
    return time.perf_counter() - started


def outputs_in(runtime_name: str, path: Path, data) -> list[dict[str, np.ndarray]]:
    """Every batch's outputs: ONNX Runtime (CPU, default optimizations) or OpenVINO (f32)."""
    batches = [data.make_batch(i) for i in range(len(data))]
    if runtime_name == "onnxruntime":
        sess = runtime.session(str(path), threads=1)
        return [runtime.run(sess, feeds) for feeds in batches]
    runner = runtime_openvino.Runner(path, batches[0], threads=1, precision="f32")
    results = []
    for feeds in batches:
        runner.feeds = {k: feeds[k] for k in runner.feeds}
        results.append(runner.outputs())
    return results


def fidelity(name: str, path: Path, float_path: Path, splits: dict, reference: dict
             ) -> dict[str, dict]:
    """Task metric (PP-OCR) or cosine against float in ONNX Runtime (MiniLM), per runtime
    (an OpenVINO IR file: OpenVINO only)."""
    result: dict[str, dict] = {}
    model = load(float_path, load_weights=False)
    for runtime_name in ("onnxruntime", "openvino"):
        if path.suffix == ".xml" and runtime_name == "onnxruntime":
            continue
        scores = {}
        for split, data in splits.items():
            outs = outputs_in(runtime_name, path, data)
            metric = zoo.task_metric(name)
            if name == "ppocr-rec":
                scores[split] = {k: round(v, 4) for k, v in
                                 metric(model, outs, data.labels).items()}
                continue
            key = EMBEDDING.get(name) or next(iter(reference[split][0]))
            cos = [float(np.dot(a[key].ravel(), b[key].ravel())
                         / (np.linalg.norm(a[key]) * np.linalg.norm(b[key]) + 1e-12))
                   for a, b in zip(outs, reference[split])]
            scores[split] = {"cosine_mean": round(float(np.mean(cos)), 5),
                             "cosine_min": round(float(np.min(cos)), 5)}
            if metric is not None and data.labels is not None:
                scores[split].update({k: round(v, 4) for k, v in
                                      metric(model, outs, data.labels).items()})
        result[runtime_name] = scores
    return result


def run_model(name: str, calib_count: int, eval_count: int, runs: int, threads: list[int],
              keep: Path | None = None, sessions: int = 1) -> dict:
    print(f"== {name}", flush=True)
    with tempfile.TemporaryDirectory(prefix="onnxcomp-targets-") as tmp:
        folder = Path(tmp)
        if keep is not None:
            folder = keep / name
            folder.mkdir(parents=True, exist_ok=True)
        float_path = preprocess(name, folder)
        calib = zoo.dataset(name, "calib", calib_count)
        batches = [calib.make_batch(i) for i in range(len(calib))]
        seconds = {}
        paths = {"float": float_path}
        paths["onnxcomp int8 ort-cpu"] = folder / "ort_cpu.onnx"
        # QDQ only: the ort-cpu target's `lower` step writes ONNX Runtime contrib ops, which
        # OpenVINO cannot read, and this file is timed in both runtimes.
        seconds["onnxcomp int8 ort-cpu"] = onnxcomp_int8(float_path, calib, "ort-cpu",
                                                         paths["onnxcomp int8 ort-cpu"],
                                                         ["lower.matmul_bias=false"])
        paths["onnxcomp int8 openvino"] = folder / "openvino.onnx"
        seconds["onnxcomp int8 openvino"] = onnxcomp_int8(float_path, calib, "openvino",
                                                          paths["onnxcomp int8 openvino"])
        paths["NNCF int8"] = folder / "nncf.onnx"
        seconds["NNCF int8"] = nncf_int8(name, float_path, batches, paths["NNCF int8"])
        ir = {"NNCF int8 (OpenVINO IR)": folder / "nncf_ir.xml"}
        seconds.update({k: nncf_int8_ir(name, float_path, batches, v) for k, v in ir.items()})
        print("  quantized:", {k: round(v, 1) for k, v in seconds.items()}, flush=True)
        # The placement choice behind the openvino target, recorded: attention's activation x
        # activation MatMuls with uint8 x uint8 QDQ (not timed; what OpenVINO executes).
        ablation_path = folder / "openvino_am.onnx"
        onnxcomp_int8(float_path, calib, "openvino", ablation_path,
                      ["quantize.activation_matmuls=true"])
        ablation = {"onnxcomp int8 openvino + activation_matmuls": runtime_openvino.
                    precision_summary(runtime_openvino.compile_model(
                        ablation_path, threads=1, precision="f32"))}

        splits = {split: zoo.dataset(name, split, eval_count)
                  for split in zoo.entry(name).splits if split != "calib"}
        reference = {split: outputs_in("onnxruntime", float_path, data)
                     for split, data in splits.items()}
        if keep is not None:  # what --ep reads: the eval batches and float's outputs on them
            save_eval(folder, name, splits["eval"], reference["eval"])
        variants = {}
        for label, path in {**paths, **ir}.items():
            compiled = runtime_openvino.compile_model(path, threads=1, precision="f32")
            variants[label] = {
                "bytes": path.stat().st_size + (path.with_suffix(".bin").stat().st_size
                                                if path.suffix == ".xml" else 0),
                "quantize_seconds": round(seconds.get(label, 0.0), 2),
                "openvino_ops_f32_hint": runtime_openvino.precision_summary(compiled),
                "fidelity": fidelity(name, path, float_path, splits, reference),
            }
            print(f"  {label}: {variants[label]['fidelity']}", flush=True)

        labels = list(paths)
        timing = bench([str(paths[k]) for k in labels], names=labels, threads=threads,
                       runs=runs, warmup=5, data=splits["eval"].take(1),
                       memory=False, progress=None, runtimes=("onnxruntime",),
                       spinning=False)  # idle sessions' spinning threads would take the cores
        rows = timing.bench["results"] + openvino_timing(
            {**paths, **ir}, splits["eval"].make_batch(0), threads, runs, sessions)
    for row in rows:
        row.pop("times_ms", None)
    return {"model": name, "calib_batches": calib_count, "eval_batches": eval_count,
            "variants": variants, "timing": rows, "ablation_openvino_ops_f32_hint": ablation,
            "environment": {**environment(), "openvino": runtime_openvino.version(),
                            "nncf": _nncf_version(), "loaded_machine": _load()},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


# The openvino target's placement choices, each taken back out once (--ablation), against
# float and NNCF on the same calibration batches: what each costs or buys in OpenVINO.
ABLATIONS = {
    "ppocr-det": [("openvino target", []),
                  ("- bias correction", ["quantize.bias_correction=none"]),
                  ("- ConvTranspose", ["quantize.op_types=Conv,MatMul,Gemm"]),
                  ("- opset 14 (x * HardSigmoid(x))", ["quantize.min_opset=none"]),
                  # feature maps: uint8 like ort-cpu's, then no feature-map QDQ at all
                  ("- signed feature maps", ["quantize.signed_feature_maps=false"]),
                  ("- feature-map QDQ", ["quantize.signed_feature_maps=false",
                                         "quantize.conv_adds=false"])],
    "ppocr-rec": [("openvino target", []),
                  ("- bias correction", ["quantize.bias_correction=none"]),
                  ("- feature-map QDQ", ["quantize.signed_feature_maps=false",
                                         "quantize.conv_adds=false"])],
    "minilm": [("openvino target", []),
               # alpha unset: static int8's default on transformers, alpha auto per tensor on
               # every MatMul input (smoothing Muls where no LayerNorm can take the scales)
               ("smoothquant auto, every MatMul input", ["quantize.smoothquant_alpha=none"]),
               ("- smoothquant", ["quantize.smoothquant_alpha=none",
                                  "quantize.static_smoothquant=false"]),
               ("- bias correction", ["quantize.bias_correction=none"])],
}
ABLATION_RESULTS = ROOT / "benchmarks" / "results" / "targets_ablation.json"
ABLATION_BEGIN, ABLATION_END = "<!-- targets-ablation:begin -->", "<!-- targets-ablation:end -->"


def run_ablation(name: str, calib_count: int, eval_count: int, runs: int, threads: list[int]
                 ) -> dict:
    """float, NNCF int8 and the openvino target with each choice taken out: OpenVINO f32 p50
    ratios (interleaved), executed int8 / f32 ops, output cosine against float (eval split)
    in ONNX Runtime and in OpenVINO."""
    from onnxcomp.measure.bench import _time_runners, percentiles

    print(f"== ablation {name}", flush=True)
    with tempfile.TemporaryDirectory(prefix="onnxcomp-ablation-") as tmp:
        folder = Path(tmp)
        float_path = preprocess(name, folder)
        calib = zoo.dataset(name, "calib", calib_count)
        paths = {"float": float_path, "NNCF int8": folder / "nncf.onnx"}
        nncf_int8(name, float_path, [calib.make_batch(i) for i in range(len(calib))],
                  paths["NNCF int8"])
        for index, (label, overrides) in enumerate(ABLATIONS[name]):
            paths[label] = folder / f"variant{index}.onnx"
            onnxcomp_int8(float_path, calib, "openvino", paths[label], overrides)
        data = zoo.dataset(name, "eval", eval_count)
        reference = outputs_in("onnxruntime", float_path, data)
        key = _output_key(name, reference[0])
        variants = {}
        for label, path in paths.items():
            summary = runtime_openvino.precision_summary(
                runtime_openvino.compile_model(path, threads=1, precision="f32"))
            scores = {}
            for run in ("onnxruntime", "openvino"):
                cos = [float(np.dot(a[key].ravel(), b[key].ravel()) / (
                    np.linalg.norm(a[key]) * np.linalg.norm(b[key]) + 1e-12))
                    for a, b in zip(outputs_in(run, path, data), reference)]
                scores[run] = [round(float(np.mean(cos)), 5), round(float(np.min(cos)), 5)]
            variants[label] = {"ops": summary["by_precision"], "executed": summary["executed"],
                               "cosine": scores, "ratio": {}}
        feeds = data.make_batch(0)
        for count in threads:
            runners = [runtime_openvino.Runner(path, feeds, count, precision="f32")
                       for path in paths.values()]
            times = _time_runners(runners, runs, 5, 1.0)
            base = percentiles(times[0])["p50_ms"]
            for label, run_times in zip(paths, times):
                variants[label]["ratio"][str(count)] = round(
                    percentiles(run_times)["p50_ms"] / base, 3)
    return {"model": name, "calib_batches": calib_count, "eval_batches": eval_count,
            "runs": runs, "variants": variants, "loaded_machine": _load(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def ablation_table(result: dict) -> str:
    threads = sorted({t for v in result["variants"].values() for t in v["ratio"]})
    headers = ["variant"] + [f"OV f32 ratio {t} thr" for t in threads] + [
        "executed ops (int8 / f32)", "cosine mean / min (ORT)", "cosine mean / min (OV)"]
    rows = [[label] + [f"{v['ratio'].get(t, '')}" for t in threads]
            + [f"{v['executed']} ({v['ops'].get('int8', 0)} / {v['ops'].get('f32', 0)})"]
            + [" / ".join(f"{x:.4f}" for x in v["cosine"][run])
               for run in ("onnxruntime", "openvino")]
            for label, v in result["variants"].items()]
    title = (f"{result['model']} ({result['runs']} interleaved rounds, "
             f"{result['eval_batches']} eval batches, {result['loaded_machine']} at the end, "
             f"{result['date']}):")
    return "\n".join([title, "", markdown_table(headers, rows)])


ONNX_VARIANTS = {"float": "float.onnx", "onnxcomp int8 ort-cpu": "ort_cpu.onnx",
                 "onnxcomp int8 openvino": "openvino.onnx", "NNCF int8": "nncf.onnx"}


def _output_key(name: str, outputs: dict) -> str:
    return EMBEDDING.get(name) or next(iter(outputs))


def save_eval(folder: Path, name: str, data, reference: list[dict]) -> None:
    """The eval batches as ``eval/NNN.npz`` (a data source ``bench`` reads) and float's
    outputs on them (``reference.npz``) for ``--ep``."""
    (folder / "eval").mkdir(exist_ok=True)
    for i in range(len(data)):
        np.savez(folder / "eval" / f"{i:03d}.npz", **data.make_batch(i))
    key = _output_key(name, reference[0])
    np.savez(folder / "reference.npz", **{f"{i:03d}": out[key] for i, out in
                                          enumerate(reference)})


def run_ep(name: str, folder: Path, runs: int, threads: list[int]) -> dict:
    """The kept ONNX variants through the OpenVINO EP and the CPU EP (one interleaved bench),
    and each variant's output cosine against float through the EP (FP32)."""
    import onnxruntime as ort

    folder = folder / name
    paths = {label: folder / file for label, file in ONNX_VARIANTS.items()}
    timing = bench([str(path) for path in paths.values()], names=list(paths),
                   providers=["openvino", "cpu"], threads=threads, runs=runs, warmup=5,
                   data=str(folder / "eval"), memory=False, progress=None,
                   spinning=False)
    reference = np.load(folder / "reference.npz")
    files = sorted((folder / "eval").glob("*.npz"))
    fidelity = {}
    for label, path in paths.items():
        sess = runtime.session(str(path), provider="openvino", threads=1)
        cos = []
        for file, key in zip(files, sorted(reference.files)):
            feeds = dict(np.load(file))
            out = runtime.run(sess, {i.name: feeds[i.name] for i in sess.get_inputs()})
            got, want = out[_output_key(name, out)].ravel(), reference[key].ravel()
            cos.append(float(np.dot(got, want) / (np.linalg.norm(got) * np.linalg.norm(want)
                                                  + 1e-12)))
        fidelity[label] = {"cosine_mean": round(float(np.mean(cos)), 5),
                           "cosine_min": round(float(np.min(cos)), 5)}
        print(f"  EP {label}: {fidelity[label]}", flush=True)
    rows = timing.bench["results"]
    for row in rows:
        row.pop("times_ms", None)
    return {"timing": rows, "fidelity": fidelity, "eval_batches": len(files),
            "environment": {**environment(), "onnxruntime_package": "onnxruntime-openvino",
                            "providers": ort.get_available_providers(),
                            "loaded_machine": _load()},
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _nncf_version() -> str:
    import nncf

    return str(nncf.__version__)


def _load() -> str:
    try:
        return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "unknown"


def table(result: dict) -> str:
    name = result["model"]
    timing = result["timing"]
    headers = ["variant", "size MB", "ORT p50 ms", "ORT ratio", "OV f32 p50 ms", "OV f32 ratio",
               "OV f32 min ms", "OV default p50 ms", "OV int8 / f32 ops"]
    splits = list(next(iter(result["variants"].values()))["fidelity"]["openvino"])
    for split in splits:
        headers += [f"{split} (ORT)", f"{split} (OV)"]
    two = any(r["threads"] == 2 for r in timing)
    if two:
        headers[6:6] = ["OV f32 ratio 2 thr", "ORT ratio 2 thr"]
    rows = []
    for label, variant in result["variants"].items():
        def p50(run: str, key: str = "p50_ms", label: str = label, threads: int = 1) -> str:
            found = [r for r in timing if r["model"] == label and r["runtime"] == run
                     and r["threads"] == threads]
            return f"{found[0][key]:.3g}" if found else ""
        ops = variant["openvino_ops_f32_hint"]["by_precision"]
        row = [label, f"{variant['bytes'] / 1e6:.2f}", p50("onnxruntime"),
               p50("onnxruntime", "latency_ratio"), p50("openvino"),
               p50("openvino", "latency_ratio"), p50("openvino", "min_ms"),
               p50("openvino (default precision)"),
               f"{ops.get('int8', 0)} / {ops.get('f32', 0)}"]
        if two:
            row[6:6] = [p50("openvino", "latency_ratio", threads=2),
                        p50("onnxruntime", "latency_ratio", threads=2)]
        for split in splits:
            for run in ("onnxruntime", "openvino"):
                score = variant["fidelity"].get(run, {}).get(split)
                row.append(" / ".join(f"{v:.4g}" for v in score.values()) if score else "n/a")
        rows.append(row)
    ops_rows = []
    for label, variant in result["variants"].items():
        summary = variant["openvino_ops_f32_hint"]
        ops_rows.append([label, summary["executed"],
                         ", ".join(f"{k} {v}" for k, v in summary["by_precision"].items()),
                         ", ".join(f"{k} x{v}" for k, v in summary["compute"].items()),
                         ", ".join(f"{k} x{v}" for k, v in summary["glue"].items())])
    for label, summary in result.get("ablation_openvino_ops_f32_hint", {}).items():
        ops_rows.append([f"{label} (not timed)", summary["executed"],
                         ", ".join(f"{k} {v}" for k, v in summary["by_precision"].items()),
                         ", ".join(f"{k} x{v}" for k, v in summary["compute"].items()),
                         ", ".join(f"{k} x{v}" for k, v in summary["glue"].items())])
    ops_table = markdown_table(["variant", "executed ops", "by runtime precision",
                                "Convolution / FullyConnected / MatMul",
                                "FakeQuantize / Convert / Eltwise / Reorder"], ops_rows)
    first_scores = next(iter(result["variants"].values()))["fidelity"]["openvino"]
    score_names = ", ".join(next(iter(first_scores.values())))
    metric = {"ppocr-rec": "line / char accuracy",
              "minilm": "sentence-embedding cosine mean / min vs float in ORT"}.get(
        name, f"output cosine vs float in ORT, then the zoo's task metrics ({score_names})")
    env = result["environment"]
    ep = ep_table(result["ep"]) if "ep" in result else []
    return "\n".join([
        f"### {name}", "",
        (f"Fidelity: {metric}. Ratios: p50 against float in the same runtime, 1 thread "
         f"(and 2 where shown), interleaved. Machine: {env.get('cores', '?')} cores, shared "
         f"and loaded "
         f"({env['loaded_machine']} at the end of the run); onnxruntime "
         f"{env.get('onnxruntime', '?')}, OpenVINO {env['openvino']}, NNCF {env['nncf']}; "
         f"{result['date']}."), "",
        markdown_table(headers, rows), "",
        ("What OpenVINO's CPU plugin executed (compiled with INFERENCE_PRECISION_HINT=f32; "
         "`compiled.get_runtime_model()`, each op's layerType and runtimePrecision; "
         "int8 = u8 or i8):"), "", ops_table, *ep])


def ep_table(ep: dict) -> list[str]:
    """The OpenVINO execution provider's rows: ratios against float through the same provider
    and thread count, and output cosine against float through the EP."""
    timing = ep["timing"]
    threads = sorted({r["threads"] for r in timing})
    headers = ["variant"] + [f"{p} {t} thr p50 ms / ratio" for p in ("OpenVINO EP", "CPU EP")
                             for t in threads] + ["cosine mean / min (EP)"]
    rows = []
    for label, fid in ep["fidelity"].items():
        row = [label]
        for provider in ("OpenVINOExecutionProvider", "CPUExecutionProvider"):
            for count in threads:
                found = [r for r in timing if r["model"] == label and r["threads"] == count
                         and r["provider"] == provider]
                row.append(f"{found[0]['p50_ms']:.3g} / {found[0]['latency_ratio']:.3g}"
                           if found else "")
        row.append(f"{fid['cosine_mean']:.4f} / {fid['cosine_min']:.4f}")
        rows.append(row)
    env = ep["environment"]
    return ["", (f"Through ONNX Runtime's OpenVINO execution provider (onnxruntime-openvino "
                 f"{env.get('onnxruntime', '?')}, its bundled OpenVINO; precision FP32; "
                 f"{ep['eval_batches']} eval batches; {env['loaded_machine']} at the end; "
                 f"{ep['date']}):"), "", markdown_table(headers, rows)]


def write_doc(results: dict) -> None:
    body = "\n\n".join(table(results[name]) for name in results)
    write_between(DOC, BEGIN, END, body, heading="## Measured")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["ppocr-rec"])
    parser.add_argument("--calib", type=int, default=32, help="calibration batches")
    parser.add_argument("--eval", type=int, default=64, help="held-out batches per split")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--sessions", type=int, default=3,
                        help="fresh OpenVINO compilations the rounds are split over")
    parser.add_argument("--threads", default="1")
    parser.add_argument("--keep", type=Path, help="save the variants and eval data here")
    parser.add_argument("--ep", type=Path, help="time the variants kept in this folder through "
                        "the OpenVINO execution provider (the onnxruntime-openvino venv)")
    parser.add_argument("--ablation", action="store_true",
                        help="the openvino target with each placement choice taken out")
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    if args.ablation:
        found = json.loads(ABLATION_RESULTS.read_text()) if ABLATION_RESULTS.exists() else {}
        for name in args.models:
            found[name] = run_ablation(name, args.calib, args.eval, args.runs, threads)
            ABLATION_RESULTS.write_text(json.dumps(found, indent=2))
            print(ablation_table(found[name]), flush=True)
        write_between(DOC, ABLATION_BEGIN, ABLATION_END,
                      "\n\n".join(ablation_table(found[n]) for n in found),
                      heading="## The openvino target's choices, each taken out once")
        return
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in args.models:
        if args.ep is not None:
            results[name]["ep"] = run_ep(name, args.ep, args.runs, threads)
        else:
            results[name] = run_model(name, args.calib, args.eval, args.runs, threads,
                                      args.keep, args.sessions)
        RESULTS.write_text(json.dumps(results, indent=2))
        print(table(results[name]), flush=True)
    write_doc(results)


if __name__ == "__main__":
    main()
