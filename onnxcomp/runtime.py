"""ONNX Runtime sessions for our models, the checks our own output must pass (onnx.checker and a
session load: ``InvalidOutput`` when refused), and ``max_abs_difference``.

Small models are handed to ONNX Runtime as bytes; larger ones go through a temporary file (one
file under the protobuf limit, external data above it), which costs ONNX Runtime one copy of the
weights instead of two. Weights a model still holds on disk (lazy loading) are read by ONNX Runtime
from the model's folder.
"""

from __future__ import annotations

import ctypes
import gc
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxcomp import checks
from onnxcomp.errors import InvalidOutput, OnnxcompError, UserError
from onnxcomp.model import PROTOBUF_SAFE_BYTES, Model, save, weights_on_disk

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


# In-memory models with more weight bytes than this reach ONNX Runtime through a file: from bytes
# it held two copies of the weights (clip-vit-b32, 577 MB: +1172 MiB resident per session against
# +594 MiB from a file; as external data +1074 MiB, the mapped file counted too).
FILE_SESSION_BYTES = 64 << 20


def session_options(threads: int | None = None, optimize: bool = True,
                    optimized_model_path: str | None = None,
                    spinning: bool = True) -> ort.SessionOptions:
    """``spinning=False``: idle pool threads sleep between runs instead of spinning (for a
    session that runs beside other work, e.g. torch training)."""
    options = ort.SessionOptions()
    # Fatal only: ORT logs a failing run at error level on stderr, and its exception already
    # carries the message (which the caller turns into one line).
    options.log_severity_level = 4
    if threads:
        options.intra_op_num_threads = int(threads)
        options.inter_op_num_threads = 1
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    if optimized_model_path:
        options.optimized_model_filepath = optimized_model_path
    if not spinning:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return options


def release_free_memory(collect: bool = False) -> None:
    """Hand freed heap memory back to the operating system (glibc only; else nothing).

    Protobuf and numpy free large tensors into the C heap, which glibc keeps for reuse; after
    many trial models of a large model that retained heap shows as resident memory.
    ``collect``: collect cyclic garbage first (graph-surgeon graphs are cycles of nodes and
    tensors: uncollected, they held 1.9 GB of clip-vit-b32's copies past the pass that made
    them); a full collection walks every object of the process, so callers ask for it only
    where a large model was let go (the test suite ran 1.5x slower collecting each time)."""
    if collect:
        gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def session(model: Model | str | os.PathLike, provider: str = "cpu", threads: int | None = None,
            optimize: bool = True, optimized_model_path: str | None = None,
            spinning: bool = True) -> ort.InferenceSession:
    """An ONNX Runtime session for ``model`` (a Model, lazy or not, or a path); ``spinning``: see
    :func:`session_options`.

    A model ONNX Runtime refuses is the user's input here (``UserError``; callers say which
    file). For a model onnxcomp produced, :func:`check_loads` makes it ``InvalidOutput``."""
    if optimize and provider == "cpu":
        probe_optimizer(model)
    try:
        return _open_session(model, provider, threads, optimize, optimized_model_path,
                             spinning)
    except OnnxcompError:
        raise
    except Exception as exc:
        raise UserError(f"ONNX Runtime could not load the model: {_first_line(exc)}") from exc


# Models up to this size are first optimized by ONNX Runtime in a child process (see
# probe_optimizer); larger ones would cost a second copy of their weights.
PROBE_BYTES = 256 << 20
_PROBED: dict[str, None] = {}
_PROBE = ("import sys, onnxruntime as ort\n"
          "o = ort.SessionOptions(); o.log_severity_level = 4\n"
          "o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL\n"
          "ort.InferenceSession(sys.stdin.buffer.read(), o, providers=['CPUExecutionProvider'])\n")


def probe_optimizer(model: Model | str | os.PathLike) -> None:
    """Refuse a model that crashes ONNX Runtime's graph optimizer, instead of crashing with it.

    ONNX Runtime 1.32 segfaults optimizing some valid models (found by fuzzing: a
    LayerNormalization whose optional bias is omitted). A session with optimizations on is
    first created in a child process; a child killed by a signal is a ``UserError`` here (an
    ONNX Runtime bug the model triggers), any other failure is left to the real session to
    report. In-memory models up to ``PROBE_BYTES`` only (the child gets the serialized bytes;
    models with weights on disk are not probed); each distinct model is probed once."""
    import hashlib
    import subprocess
    import sys

    if not isinstance(model, Model):
        try:
            path = Path(model)
            if path.stat().st_size > PROBE_BYTES:
                return
            model = Model(onnx.load_model(str(path), load_external_data=False), path.parent)
        except Exception:  # noqa: BLE001  the real session reports unreadable files
            return
    if model.lazy or weights_on_disk(model.proto) or \
            model.weight_bytes() > PROBE_BYTES:
        return
    data = model.proto.SerializeToString()
    key = hashlib.sha1(data).hexdigest()
    if key in _PROBED:
        return
    try:
        child = subprocess.run([sys.executable, "-c", _PROBE], input=data, capture_output=True,
                               timeout=600, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return  # no verdict: the real session decides
    if child.returncode < 0:
        raise UserError(f"ONNX Runtime crashed (signal {-child.returncode}) while optimizing "
                        "the model: an ONNX Runtime bug this model triggers; nothing was run")
    _PROBED[key] = None


# Models up to this size (in memory) get onnx's full check (strict shape inference too); larger
# or lazy ones the structural check, which is linear in the number of nodes.
FULL_CHECK_BYTES = 1 << 30


def check_structure(model: Model, what: str) -> None:
    """onnx.checker's structural check (nodes, names, topological order, opsets) without shape
    inference and without reading weights: ``InvalidOutput`` naming ``what``."""
    try:
        onnx.checker.check_model(checks.skeleton(model.proto), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise InvalidOutput(f"{what} is not a valid ONNX model: {_first_line(exc)}") from exc


def check_onnx(model: Model, what: str, full: bool | None = None) -> None:
    """onnx.checker on a model onnxcomp produced: the full check (strict shape inference too)
    where ``full`` or, by default, where its size allows, else the structural one.
    ``InvalidOutput`` naming ``what``."""
    if full is None:
        full = fits_full_check(model)
    if not full:
        check_structure(model, what)
        return
    try:
        onnx.checker.check_model(model.proto, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise InvalidOutput(f"{what} is not a valid ONNX model: {_first_line(exc)}") from exc


def fits_full_check(model: Model) -> bool:
    """Weights all in memory and small enough for onnx's full check of the serialized model."""
    return not model.lazy and model.weight_bytes() <= min(FULL_CHECK_BYTES, PROTOBUF_SAFE_BYTES)


def fails_full_check(model: Model) -> bool:
    """Whether ``model`` (the user's input) fails the check :func:`check_onnx` gives by
    default: then that check says nothing about what onnxcomp did."""
    try:
        check_onnx(model, "the input model")
    except InvalidOutput:
        return True
    return False


def check_input(model: Model, what: str = "the input model", session: bool = True) -> None:
    """The checks of :func:`onnxcomp.model.load` plus, where the model is in memory and small
    enough (``fits_full_check``), onnx's full check (shape inference) and, with ``session``, an
    ONNX Runtime load (CPU, optimizations off). A model the full check refuses but ONNX Runtime
    loads is accepted (onnx's strict shape inference refuses some models ORT runs); one both
    refuse, or one ORT refuses, is a ``UserError`` naming ``what``. Large or lazy models get
    the structural checks of ``load`` only: a session would read every weight."""
    if not fits_full_check(model):
        return
    try:
        onnx.checker.check_model(model.proto, full_check=True)
        checker_error = None
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        checker_error = _first_line(exc)
    except Exception as exc:  # noqa: BLE001  onnx's C++ raises other types on hostile protos
        checker_error = f"{type(exc).__name__}: {_first_line(exc)}"
    if not session:
        if checker_error is not None:
            raise UserError(f"{what} is not a valid ONNX model: {checker_error}")
        return
    try:
        _open_session(model, "cpu", None, optimize=False, optimized_model_path=None)
    except OnnxcompError:
        raise
    except Exception as exc:  # noqa: BLE001  ORT's errors: the model is the user's
        if checker_error is not None:
            raise UserError(f"{what} is not a valid ONNX model: {checker_error}") from None
        raise UserError(f"ONNX Runtime cannot load {what}: {_first_line(exc)}") from None


def check_loads(model: Model, what: str) -> None:
    """A model onnxcomp produced must load in ONNX Runtime: a CPU session with graph
    optimizations off (so ORT's rewrites neither hide nor add problems). ``InvalidOutput``."""
    try:
        _open_session(model, "cpu", None, optimize=False, optimized_model_path=None)
    except OnnxcompError:
        raise
    except Exception as exc:
        raise InvalidOutput(f"ONNX Runtime refuses {what}: {_first_line(exc)}") from exc


_skeleton = checks.skeleton  # the old name, still used by tests/test_runtime.py


def _open_session(model: Model | str | os.PathLike, provider: str, threads: int | None,
                  optimize: bool, optimized_model_path: str | None,
                  spinning: bool = True) -> ort.InferenceSession:
    options = session_options(threads, optimize, optimized_model_path, spinning)
    providers = execution_providers(provider, threads)
    if not isinstance(model, Model):
        return ort.InferenceSession(str(model), options, providers=providers)
    lazy = model.lazy
    if lazy and model.weight_bytes() - model.lazy_bytes() <= PROTOBUF_SAFE_BYTES:
        # Weights still on disk: ONNX Runtime reads them from the model's folder.
        options.add_session_config_entry(
            "session.model_external_initializers_file_folder_path", str(model.source))
        return ort.InferenceSession(model.proto.SerializeToString(), options,
                                    providers=providers)
    if lazy or model.weight_bytes() > FILE_SESSION_BYTES:
        try:
            with tempfile.TemporaryDirectory(prefix="onnxcomp-session-") as tmp:
                path = save_for_session(model, Path(tmp))
                made = ort.InferenceSession(str(path), options, providers=providers)
            release_free_memory()  # what was freed while it was written
            return made
        except OSError:  # no room for the file: from bytes, at twice the weights' memory
            if lazy or model.weight_bytes() > PROTOBUF_SAFE_BYTES:
                raise
    return ort.InferenceSession(model.proto.SerializeToString(), options, providers=providers)


def save_for_session(model: Model, folder: Path) -> Path:
    """Write ``model`` into ``folder`` the way ONNX Runtime holds it in the least memory: one
    file under the protobuf limit, external data above it (or while weights are on disk)."""
    lazy = model.lazy
    external = lazy or model.weight_bytes() > PROTOBUF_SAFE_BYTES
    # The proto, not the Model: saving a Model that holds its weights makes the file its source,
    # and this folder is about to go (a lazy Model keeps its source; it needs it).
    return save(model if lazy else model.proto, folder / "model.onnx", external_data=external)


def execution_providers(provider: str, threads: int | None) -> list:
    """The ``providers`` argument of an ONNX Runtime session for ``provider``: with the CPU as
    fallback, and the provider options a provider needs to honour ``threads``."""
    providers: list = [resolve_provider(provider)]
    if providers[0] != "CPUExecutionProvider":
        providers.append("CPUExecutionProvider")
    if providers[0] == "OpenVINOExecutionProvider":
        # The OpenVINO EP takes its thread count and precision as provider options, not from
        # the session options; FP32 as in `bench --runtime openvino:f32` (bf16 is lossy).
        extra = {"num_of_threads": str(threads)} if threads else {}
        providers[0] = (providers[0], {"device_type": "CPU", "precision": "FP32", **extra})
    return providers


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
