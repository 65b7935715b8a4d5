"""ONNX Runtime sessions for our models, and the one helper that compares two models numerically.

Models under the protobuf limit are handed to ONNX Runtime as bytes; larger ones go through a
file. Weights a model still holds on disk (lazy loading) are read by ONNX Runtime from the model's
folder.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path

import numpy as np
import onnxruntime as ort

from onnxcomp.errors import OnnxcompError, UserError
from onnxcomp.model import PROTOBUF_SAFE_BYTES, Model

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
}


def resolve_provider(name: str) -> str:
    """Map a short name (``cpu``) or a full ONNX Runtime name to an available provider."""
    full = PROVIDERS.get(name.lower(), name)
    if full not in PROVIDERS.values() and not full.endswith("ExecutionProvider"):
        known = ", ".join(PROVIDERS)
        raise UserError(f"unknown provider {name!r}; known: {known}")
    available = ort.get_available_providers()
    if full not in available:
        raise UserError(
            f"provider {name!r} ({full}) is not available in this onnxruntime installation "
            f"(available: {', '.join(available)})"
        )
    return full


def session_options(threads: int | None = None, optimize: bool = True,
                    optimized_model_path: str | None = None) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if optimized_model_path:
        options.optimized_model_filepath = optimized_model_path
    return options


def release_free_memory() -> None:
    """Hand freed heap memory back to the operating system (glibc only; else nothing).

    Protobuf and numpy free large tensors into the C heap, which glibc keeps for reuse; after
    many trial models of a large model that retained heap shows as resident memory."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def session(model: Model | str | os.PathLike, provider: str = "cpu", threads: int | None = None,
            optimize: bool = True, optimized_model_path: str | None = None) -> ort.InferenceSession:
    options = session_options(threads, optimize, optimized_model_path)
    providers = [resolve_provider(provider)]
    if providers[0] != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    try:
        if isinstance(model, Model):
            lazy = model.lazy
            if lazy and model.weight_bytes() - model.lazy_bytes() <= PROTOBUF_SAFE_BYTES:
                # Weights still on disk: ONNX Runtime reads them from the model's folder.
                options.add_session_config_entry(
                    "session.model_external_initializers_file_folder_path", str(model.source))
                return ort.InferenceSession(model.proto.SerializeToString(), options,
                                            providers=providers)
            if lazy or model.weight_bytes() > PROTOBUF_SAFE_BYTES:
                with tempfile.TemporaryDirectory(prefix="onnxcomp-session-") as tmp:
                    path = Path(tmp) / "model.onnx"
                    model.save(path, external_data=True)
                    return ort.InferenceSession(str(path), options, providers=providers)
            return ort.InferenceSession(model.proto.SerializeToString(), options,
                                        providers=providers)
        return ort.InferenceSession(str(model), options, providers=providers)
    except OnnxcompError:
        raise
    except Exception as exc:
        raise UserError(f"ONNX Runtime could not load the model: {_first_line(exc)}") from exc


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray],
        outputs: list[str] | None = None) -> dict[str, np.ndarray]:
    names = outputs or [o.name for o in sess.get_outputs()]
    values = sess.run(names, feeds)
    return dict(zip(names, values))


def run_model(model: Model, feeds: dict[str, np.ndarray], optimize: bool = False
              ) -> dict[str, np.ndarray]:
    """Run once on the CPU with graph optimizations off, so ORT's fusions can't mask our bugs."""
    return run(session(model, optimize=optimize), feeds)


def max_abs_difference(reference: Model, candidate: Model, feeds: dict[str, np.ndarray]
                       ) -> dict[str, float]:
    """Per-output max |reference - candidate| on the same feeds (CPU, no graph optimizations)."""
    ref = run_model(reference, feeds)
    cand = run_model(candidate, feeds)
    if set(ref) != set(cand):
        raise UserError(f"outputs differ: {sorted(ref)} vs {sorted(cand)}")
    return {
        name: float(np.max(np.abs(ref[name].astype(np.float64) - cand[name].astype(np.float64))))
        if ref[name].size else 0.0
        for name in ref
    }
