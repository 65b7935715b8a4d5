"""The export machinery shared by every source: export, tidy, check against PyTorch, save.

The package docstring (:mod:`onnxcomp.export`) says what is exported and how it is checked.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcomp.errors import UserError

EXTRA_HINT = "onnxcomp export needs the [export] extra: pip install 'onnxcomp[export]'"
TOLERANCE = 1e-4
MIN_OPSET, MAX_OPSET = 13, 20  # 20: the TorchScript exporter's newest opset in torch 2.13
EXPORTER = "torch.onnx.export (TorchScript, dynamo=False)"

Progress = Callable[[str], None]


@dataclass(frozen=True)
class OutputCheck:
    """ONNX Runtime against PyTorch for one output, over every check input."""

    name: str
    max_abs_error: float
    cosine: float


@dataclass(frozen=True)
class ExportResult:
    path: Path
    source: str
    architecture: str
    opset: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    parameters: int
    file_bytes: int  # the .onnx file and its external data
    seconds: float
    checks: tuple[OutputCheck, ...]
    tolerance: float

    @property
    def max_abs_error(self) -> float:
        return max((c.max_abs_error for c in self.checks), default=0.0)

    @property
    def min_cosine(self) -> float:
        return min((c.cosine for c in self.checks), default=1.0)

    @property
    def ok(self) -> bool:
        return self.max_abs_error <= self.tolerance

    def summary(self) -> str:
        lines = [f"exported {self.source} ({self.architecture}) -> {self.path}",
                 (f"  opset {self.opset}, {self.parameters / 1e6:.2f} M parameters, "
                  f"{self.file_bytes / 1e6:.1f} MB, {self.seconds:.1f} s"),
                 f"  inputs: {', '.join(self.inputs)}; outputs: {', '.join(self.outputs)}"]
        for check in self.checks:
            lines.append(f"  {check.name}: max abs error vs PyTorch {check.max_abs_error:.2e}, "
                         f"cosine {check.cosine:.6f}")
        verdict = "within" if self.ok else "NOT within"
        lines.append(f"  {verdict} tolerance {self.tolerance:g}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["path"] = str(self.path)
        data.update(max_abs_error=self.max_abs_error, min_cosine=self.min_cosine, ok=self.ok)
        return data


@dataclass
class Exportable:
    """A torch module ready for export: positional example inputs, names, axes, check inputs."""

    module: Any  # torch.nn.Module, eval mode, returns a tuple of tensors
    example: tuple
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    dynamic_axes: dict[str, dict[int, str]]
    architecture: str
    # Positional input tuples to compare ONNX Runtime with PyTorch on (the example if empty).
    check_inputs: list[tuple] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)


def require_torch():
    """The torch module, or the one-line error that names the extra."""
    try:
        import torch
    except ImportError:
        raise UserError(EXTRA_HINT) from None
    return torch


# ---------------------------------------------------------------------------------------------
# export, tidy, check


def _check_opset(opset: int) -> None:
    if not isinstance(opset, int) or not MIN_OPSET <= opset <= MAX_OPSET:
        raise UserError(f"--opset must be an integer from {MIN_OPSET} to {MAX_OPSET}, "
                            f"got {opset!r}")


def export_prepared(prepared: Exportable, output: str | os.PathLike, opset: int = 17,
                    tolerance: float = TOLERANCE, source: str = "",
                    progress: Progress | None = None) -> ExportResult:
    """Export, tidy, check, save and compare with PyTorch."""
    torch = require_torch()
    from onnxcomp import model as model_io

    _check_opset(opset)
    say = progress or (lambda message: None)
    output = Path(output)
    if output.is_dir():
        raise UserError(f"{output}: is a folder, expected an output file name")
    output.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    say(f"exporting {prepared.architecture} with {EXPORTER}, opset {opset}")
    with tempfile.TemporaryDirectory(prefix=".onnxcomp-export-", dir=output.parent) as scratch:
        raw = Path(scratch) / "raw.onnx"
        try:
            with warnings.catch_warnings(), torch.no_grad():
                warnings.simplefilter("ignore")  # the exporter's deprecation and tracer notes
                torch.onnx.export(prepared.module, prepared.example, str(raw), dynamo=False,
                                  input_names=list(prepared.input_names),
                                  output_names=list(prepared.output_names),
                                  dynamic_axes=prepared.dynamic_axes, opset_version=opset,
                                  do_constant_folding=True)
        except Exception as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise UserError(f"torch.onnx.export failed for {prepared.architecture}: "
                                f"{first}") from exc
        model = model_io.load(raw)
    split = split_shared_initializers(model.proto)
    _name_io_dims(model.proto, prepared)
    metadata = {
        "onnxcomp.export.source": source or prepared.architecture,
        "onnxcomp.export.architecture": prepared.architecture,
        "onnxcomp.export.exporter": f"{EXPORTER}, torch {torch.__version__}",
        **prepared.metadata,
    }
    _set_metadata(model.proto, metadata)
    try:
        if model.weight_bytes() > model_io.PROTOBUF_SAFE_BYTES:
            model_io.save(model, output)
            onnx.checker.check_model(str(output))
        else:
            onnx.checker.check_model(model.proto)
            model_io.save(model, output)
    except onnx.checker.ValidationError as exc:
        raise UserError(f"the exported model is not valid ONNX: {exc}") from exc
    seconds = time.perf_counter() - started
    parameters = model.parameter_count()
    del model  # ONNX Runtime loads its own copy from the file: don't hold two
    say(f"checking against PyTorch ({split} merged parameters split apart)")
    checks = compare_with_torch(prepared, output)
    data_file = output.parent / (output.name + ".data")
    size = output.stat().st_size + (data_file.stat().st_size if data_file.is_file() else 0)
    return ExportResult(output, source or prepared.architecture, prepared.architecture, opset,
                        prepared.input_names, prepared.output_names, parameters, size, seconds,
                        checks, tolerance)


def _name_io_dims(proto: onnx.ModelProto, prepared: Exportable) -> None:
    """Inputs and outputs get the dynamic axes' names and, elsewhere, the example's sizes
    (the exporter leaves some as made-up symbols, e.g. after a normalization)."""
    torch = require_torch()
    with torch.no_grad():
        results = prepared.module(*prepared.example)
    shapes = {name: tuple(value.shape) for name, value in zip(prepared.input_names,
                                                                prepared.example)}
    shapes.update({name: tuple(value.shape) for name, value in zip(prepared.output_names,
                                                                     results)})
    for value_info in list(proto.graph.input) + list(proto.graph.output):
        shape = shapes.get(value_info.name)
        dims = value_info.type.tensor_type.shape.dim
        if shape is None or len(dims) != len(shape):
            continue
        axes = prepared.dynamic_axes.get(value_info.name, {})
        for axis, dim in enumerate(dims):
            if axis in axes:
                dim.dim_param = str(axes[axis])
            else:
                dim.dim_value = int(shape[axis])


def _set_metadata(proto: onnx.ModelProto, values: Mapping[str, str]) -> None:
    kept = [p for p in proto.metadata_props if p.key not in values]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    for key, value in values.items():
        proto.metadata_props.add(key=key, value=str(value))


def split_shared_initializers(proto: onnx.ModelProto) -> int:
    """Give merged parameters their own tensors again; returns how many copies were made.

    - ``Identity(initializer)`` (how the TorchScript exporter shares equal parameters) becomes an
      initializer named like the Identity's output, which is the parameter's own name;
    - a 1-D float initializer read by several nodes gets a copy per extra reader.
    Larger shared tensors (tied embeddings) stay shared: copying them would cost real bytes.
    """
    graph = proto.graph
    inits = {t.name: t for t in graph.initializer}
    graph_outputs = {o.name for o in graph.output}
    copies = []
    kept_nodes = []
    for node in graph.node:
        if (node.op_type == "Identity" and node.input and node.input[0] in inits
                and node.output[0] not in graph_outputs):
            copy = onnx.TensorProto()
            copy.CopyFrom(inits[node.input[0]])
            copy.name = node.output[0]
            copies.append(copy)
            continue
        kept_nodes.append(node)
    seen: dict[str, int] = {}
    taken = set(inits) | {c.name for c in copies} | {o for n in graph.node for o in n.output}
    float_types = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                   onnx.TensorProto.DOUBLE)
    for node in kept_nodes:
        for index, name in enumerate(node.input):
            tensor = inits.get(name)
            if tensor is None or len(tensor.dims) != 1 or tensor.data_type not in float_types:
                continue
            seen[name] = seen.get(name, 0) + 1
            if seen[name] == 1:
                continue
            new_name = f"{name}.copy{seen[name] - 1}"
            while new_name in taken:
                new_name += "_"
            taken.add(new_name)
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = new_name
            copies.append(copy)
            node.input[index] = new_name
    if not copies:
        return 0
    del graph.node[:]
    graph.node.extend(kept_nodes)
    graph.initializer.extend(copies)
    used = {i for n in graph.node for i in n.input} | graph_outputs
    unused = [t for t in graph.initializer if t.name not in used]
    for tensor in unused:
        graph.initializer.remove(tensor)
    return len(copies)


def compare_with_torch(prepared: Exportable, path: Path) -> tuple[OutputCheck, ...]:
    """Max abs error and cosine per output, ONNX Runtime (CPU, no graph optimizations) vs
    PyTorch, over every check input."""
    torch = require_torch()
    from onnxcomp import runtime

    session = runtime.session(path, provider="cpu", optimize=False)
    worst = {name: 0.0 for name in prepared.output_names}
    dots = {name: [0.0, 0.0, 0.0] for name in prepared.output_names}
    for args in prepared.check_inputs or [prepared.example]:
        with torch.no_grad():
            expected = prepared.module(*args)
        feeds = {name: value.detach().cpu().numpy()
                 for name, value in zip(prepared.input_names, args)}
        got = runtime.run(session, feeds, list(prepared.output_names))
        for name, reference in zip(prepared.output_names, expected):
            ref = reference.detach().cpu().numpy().astype(np.float64).ravel()
            out = np.asarray(got[name], dtype=np.float64).ravel()
            if ref.shape != out.shape:
                raise UserError(f"output {name}: ONNX Runtime gave {out.size} values, "
                                    f"PyTorch {ref.size}")
            if ref.size:
                worst[name] = max(worst[name], float(np.max(np.abs(ref - out))))
            acc = dots[name]
            acc[0] += float(ref @ out)
            acc[1] += float(ref @ ref)
            acc[2] += float(out @ out)
    checks = []
    for name in prepared.output_names:
        dot, ref_sq, out_sq = dots[name]
        cosine = 1.0 if ref_sq == 0 and out_sq == 0 else dot / max(np.sqrt(ref_sq * out_sq),
                                                                     1e-300)
        checks.append(OutputCheck(name, worst[name], float(cosine)))
    return tuple(checks)


# ---------------------------------------------------------------------------------------------
# exporting into a cache folder once (the zoo)


def cached_export(target: Path) -> bool:
    """Whether ``target`` is a finished export: its record beside it names its size."""
    record = target.with_suffix(".export.json")
    if not (target.is_file() and record.is_file()):
        return False
    try:
        saved = json.loads(record.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    data_file = target.parent / (target.name + ".data")
    size = target.stat().st_size + (data_file.stat().st_size if data_file.is_file() else 0)
    return saved.get("file_bytes") == size and saved.get("ok") is True


def export_once(target: str | os.PathLike, make: Callable[[], Exportable], source: str,
                opset: int = 17, progress: Progress | None = None) -> Path:
    """Export ``make()`` to ``target`` unless a finished export is there already.

    The model is written atomically (:func:`onnxcomp.model.save`), then a record
    ``<name>.export.json`` (the :class:`ExportResult`) beside it; a model without its record is
    exported again. An export that does not match PyTorch within tolerance is removed and
    raised."""
    from onnxcomp.report import write_json_atomic

    target = Path(target)
    if cached_export(target):
        return target
    require_torch()
    result = export_prepared(make(), target, opset=opset, source=source, progress=progress)
    if not result.ok:
        target.unlink(missing_ok=True)
        (target.parent / (target.name + ".data")).unlink(missing_ok=True)
        raise UserError(f"{source}: the export differs from PyTorch by "
                            f"{result.max_abs_error:.2e} (tolerance {result.tolerance:g})")
    write_json_atomic(result.to_dict(), target.with_suffix(".export.json"))
    return target
