"""Loading and saving ONNX models safely.

- External data: every location is checked before any byte is read; absolute paths and paths that
  climb out of the model's folder (``../``, symlinks pointing out) are refused, since a crafted model
  could otherwise read any file on the machine.
- Saving is atomic: files are written into a temporary folder next to the target and moved into
  place, weights first and the ``.onnx`` last, so an interrupted save never leaves something that
  looks like a finished model. Models whose tensors exceed what one protobuf holds (2 GiB) are
  saved with their weights in one external data file beside the model.
- The input file is never written to.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from onnxcomp.errors import OnnxcompError, UnsafeModelError

# Protobuf refuses messages of 2 GiB; stay clear of it, the graph itself takes room too.
PROTOBUF_SAFE_BYTES = 1_800_000_000
# Tensors smaller than this stay inside the .onnx when weights go to external data.
EXTERNAL_DATA_THRESHOLD = 1024


@dataclass
class Model:
    """An ONNX model in memory, with the folder it came from (for its external data)."""

    proto: onnx.ModelProto
    source: Path | None = None
    # Loaded from a model whose weights were in external data: saved the same way by default.
    external_data: bool = False

    @property
    def graph(self) -> onnx.GraphProto:
        return self.proto.graph

    def opset(self, domain: str = "") -> int:
        return opset_version(self.proto, domain)

    def weight_bytes(self) -> int:
        return tensor_bytes(self.proto)

    def parameter_count(self) -> int:
        return parameter_count(self.proto)

    def save(self, path: str | os.PathLike, external_data: bool | None = None) -> Path:
        return save(self, path, external_data=external_data)

    def copy(self) -> Model:
        duplicate = onnx.ModelProto()
        duplicate.CopyFrom(self.proto)
        return Model(duplicate, self.source, self.external_data)


def opset_version(proto: onnx.ModelProto, domain: str = "") -> int:
    for entry in proto.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(entry.version)
    return 0


def iter_tensors(proto: onnx.ModelProto):
    """Every TensorProto of the model: initializers, Constant attributes, subgraphs included."""
    yield from external_data_helper._get_all_tensors(proto)


def tensor_bytes(proto: onnx.ModelProto) -> int:
    total = 0
    for tensor in iter_tensors(proto):
        total += _tensor_nbytes(tensor)
    return total


def parameter_count(proto: onnx.ModelProto) -> int:
    """Elements in every stored tensor (initializers, Constant nodes, subgraphs)."""
    return sum(int(np.prod(t.dims)) if len(t.dims) else 1 for t in iter_tensors(proto))


def _tensor_nbytes(tensor: onnx.TensorProto) -> int:
    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * itemsize


def _check_external_locations(proto: onnx.ModelProto, base_dir: Path) -> None:
    root = base_dir.resolve()
    for tensor in iter_tensors(proto):
        if not external_data_helper.uses_external_data(tensor):
            continue
        info = external_data_helper.ExternalDataInfo(tensor)
        location = info.location
        if not location or os.path.isabs(location) or Path(location).drive:
            raise UnsafeModelError(
                f"tensor {tensor.name!r} stores its data at {location!r}: only paths inside the "
                "model's folder are allowed"
            )
        target = (root / location).resolve()
        if root != target and root not in target.parents:
            raise UnsafeModelError(
                f"tensor {tensor.name!r} stores its data at {location!r}, outside the model's "
                f"folder {root}: refused"
            )
        if not target.is_file():
            raise OnnxcompError(f"external data file {location!r} of tensor {tensor.name!r} is missing")


def load(path: str | os.PathLike, load_weights: bool = True) -> Model:
    """Read an ONNX file; external data is checked to stay inside the model's folder, then read."""
    path = Path(path)
    if not path.exists():
        raise OnnxcompError(f"{path}: no such file")
    if path.is_dir():
        raise OnnxcompError(f"{path}: is a folder, expected an .onnx file")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types on garbage
        raise OnnxcompError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    if not proto.graph.node and not proto.graph.output:
        raise OnnxcompError(f"{path}: not an ONNX model (empty graph)")
    _check_external_locations(proto, path.parent)
    external = any(external_data_helper.uses_external_data(t) for t in iter_tensors(proto))
    if load_weights:
        external_data_helper.load_external_data_for_model(proto, str(path.parent))
    return Model(proto, path.resolve().parent, external)


def _needs_external_data(proto: onnx.ModelProto) -> bool:
    return tensor_bytes(proto) > PROTOBUF_SAFE_BYTES


def save(model: Model | onnx.ModelProto, path: str | os.PathLike,
         external_data: bool | None = None) -> Path:
    """Write the model atomically. ``external_data=None``: external if the model was loaded with
    external data or its tensors pass ~1.8 GB."""
    proto = model.proto if isinstance(model, Model) else model
    target = Path(path)
    if target.is_dir():
        raise OnnxcompError(f"{target}: is a folder, expected an output file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    if external_data is None:
        external_data = getattr(model, "external_data", False) or _needs_external_data(proto)
    data_name = target.name + ".data"
    staging = Path(tempfile.mkdtemp(prefix=".onnxcomp-", dir=target.parent))
    try:
        staged_model = staging / target.name
        if external_data:
            onnx.save_model(proto, str(staged_model), save_as_external_data=True,
                            all_tensors_to_one_file=True, location=data_name,
                            size_threshold=EXTERNAL_DATA_THRESHOLD)
            # save_model moved the weights out of the in-memory proto; read them back so the
            # caller's model stays whole (from the staged copy: the same bytes).
            external_data_helper.load_external_data_for_model(proto, str(staging))
            if (staging / data_name).exists():  # absent when every tensor was under the threshold
                os.replace(staging / data_name, target.parent / data_name)
        else:
            onnx.save_model(proto, str(staged_model))
        # Staged files can come out owner-only; give them the modes a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        for written in (staged_model, target.parent / data_name):
            if written.exists() and (written == staged_model or external_data):
                os.chmod(written, 0o666 & ~umask)
        os.replace(staged_model, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if isinstance(model, Model):
        model.source = target.resolve().parent
    return target


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor)
