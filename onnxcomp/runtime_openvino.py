"""OpenVINO's own runtime behind a small interface: compile an ONNX model for a device, run it,
and read which precision each executed op really ran in.

OpenVINO (``pip install 'onnxcomp[openvino]'``, openvino 2026.4) reads ONNX files directly; its
CPU plugin turns QuantizeLinear/DequantizeLinear pairs into FakeQuantize and then, by its
low-precision transformations, into u8/i8 kernels where the layout allows. Which ops ran in
int8 is read from the compiled model (``get_runtime_model()``: each op's ``layerType`` and
``runtimePrecision``), not assumed. OpenVINO is imported inside functions: without it, every
entry point raises one ``UserError`` saying how to install it.

Precision: OpenVINO's CPU plugin runs float models in bf16 by default on CPUs with bf16
support (this machine: AVX-512-BF16); ``precision="f32"`` sets ``INFERENCE_PRECISION_HINT``
so that float is float32, as in ONNX Runtime. Benchmarks say which they used.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from onnxcomp.errors import InvalidOutput, UserError
from onnxcomp.model import Model

INSTALL = ("OpenVINO is not installed: pip install 'onnxcomp[openvino]' "
           "(openvino==2026.4.*)")
# Executed-op classes by runtime precision; Const/Input/Output are not executed ops.
_NOT_EXECUTED = {"Const", "Input", "Output", "Parameter", "Result"}
_INT8 = {"u8", "i8"}


def available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def require():
    """The openvino module, or one ``UserError`` line saying how to install it."""
    try:
        import openvino
    except ImportError:
        raise UserError(INSTALL) from None
    return openvino


def version() -> str | None:
    if not available():
        return None
    return str(require().__version__)


def config(threads: int | None = None, precision: str | None = None) -> dict[str, Any]:
    """The CPU plugin's properties for a latency run: one stream, ``threads`` inference threads
    (None: OpenVINO's choice), ``precision`` ("f32", "bf16"; None: the plugin's default)."""
    result: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY", "NUM_STREAMS": 1}
    if threads:
        result["INFERENCE_NUM_THREADS"] = int(threads)
    if precision:
        if precision not in ("f32", "bf16", "f16"):
            raise UserError(f"OpenVINO precision must be f32, bf16 or f16, got {precision!r}")
        result["INFERENCE_PRECISION_HINT"] = precision
    return result


def compile_model(model: Model | str | os.PathLike, device: str = "CPU",
                  threads: int | None = None, precision: str | None = None):
    """``openvino.Core().compile_model`` on an ONNX file (an in-memory Model goes through a
    temporary file). A model OpenVINO refuses is a ``UserError`` naming its first line."""
    ov = require()
    core = ov.Core()
    try:
        if isinstance(model, Model):
            with tempfile.TemporaryDirectory(prefix="onnxcomp-ov-") as tmp:
                path = Path(tmp) / "model.onnx"
                model.copy().save(path)
                return core.compile_model(str(path), device, config(threads, precision))
        return core.compile_model(str(model), device, config(threads, precision))
    except UserError:
        raise
    except Exception as exc:  # OpenVINO raises RuntimeError subclasses with long messages
        raise UserError(f"OpenVINO could not compile the model: {_first_line(exc)}") from exc


def check_compiles(model: Model, what: str) -> None:
    """A model onnxcomp produced for the openvino target must compile: ``InvalidOutput``."""
    try:
        compile_model(model, threads=1)
    except UserError as exc:
        if str(exc) == INSTALL:
            raise
        raise InvalidOutput(f"OpenVINO refuses {what}: {exc}") from exc


class Runner:
    """One compiled model with an infer request and its inputs ready; ``__call__`` runs once."""

    def __init__(self, path: str | os.PathLike, feeds: dict[str, np.ndarray],
                 threads: int | None = None, device: str = "CPU",
                 precision: str | None = None):
        self.path = str(path)
        try:
            self.compiled = compile_model(path, device, threads, precision)
        except UserError as exc:
            raise UserError(f"{self.path}: {exc}") from None
        self.request = self.compiled.create_infer_request()
        self.feeds = {}
        for port in self.compiled.inputs:
            name = next((n for n in port.get_names() if n in feeds), None)
            if name is None:
                raise UserError(f"{self.path}: input {port.get_any_name()!r} has no data")
            self.feeds[name] = feeds[name]

    def first_run(self) -> None:
        try:
            self()
        except MemoryError:
            raise
        except Exception as exc:  # OpenVINO's errors: the inputs do not fit the model
            raise UserError(f"{self.path} cannot run in OpenVINO on the bench inputs (check "
                            f"--data, --shape and --batch): {_first_line(exc)}") from exc

    def __call__(self) -> None:
        self.request.infer(self.feeds)

    def outputs(self) -> dict[str, np.ndarray]:
        """The last run's outputs by name (runs once first)."""
        result = self.request.infer(self.feeds)
        return {port.get_any_name(): np.asarray(value) for port, value in result.items()}


def run(model: Model | str | os.PathLike, feeds: dict[str, np.ndarray],
        threads: int | None = None, precision: str | None = None) -> dict[str, np.ndarray]:
    """Run ``model`` once in OpenVINO on the CPU: outputs by name."""
    if isinstance(model, Model):
        with tempfile.TemporaryDirectory(prefix="onnxcomp-ov-") as tmp:
            path = Path(tmp) / "model.onnx"
            model.copy().save(path)
            return Runner(path, feeds, threads, precision=precision).outputs()
    return Runner(model, feeds, threads, precision=precision).outputs()


def runtime_ops(compiled) -> list[tuple[str, str, str]]:
    """(name, layer type, runtime precision) of every op the compiled model executes."""
    result = []
    for op in compiled.get_runtime_model().get_ops():
        info = op.get_rt_info()
        layer = str(info["layerType"].astype(str)) if "layerType" in info else op.get_type_name()
        precision = (str(info["runtimePrecision"].astype(str)) if "runtimePrecision" in info
                     else "?")
        if layer not in _NOT_EXECUTED:
            result.append((op.get_friendly_name(), layer, precision))
    return result


def precision_summary(compiled) -> dict[str, Any]:
    """Executed ops counted by precision class (int8 = u8/i8), and the compute ops
    (Convolution, FullyConnected, MatMul) by layer type and precision."""
    ops = runtime_ops(compiled)
    classes = Counter("int8" if p in _INT8 else p for _, _, p in ops)
    compute = Counter(f"{layer} {'int8' if p in _INT8 else p}" for _, layer, p in ops
                      if layer in ("Convolution", "FullyConnected", "MatMul", "Deconvolution"))
    kinds = Counter(f"{layer} {p}" for _, layer, p in ops
                    if layer in ("FakeQuantize", "Convert", "Eltwise", "Reorder"))
    return {"executed": len(ops), "by_precision": dict(sorted(classes.items())),
            "compute": dict(sorted(compute.items())), "glue": dict(sorted(kinds.items()))}


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__
