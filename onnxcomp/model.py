"""Loading and saving ONNX models safely.

- External data: every location is checked before any byte is read; absolute paths and paths that
  climb out of the model's folder (``../``, symlinks pointing out) are refused, since a crafted model
  could otherwise read any file on the machine.
- Saving is atomic: files are written into a temporary folder next to the target and moved into
  place, weights first and the ``.onnx`` last, so an interrupted save never leaves something that
  looks like a finished model. Models whose tensors exceed what one protobuf holds (2 GiB) are
  saved with their weights in one external data file beside the model.
- The input file is never written to.
- Lazy weights (``load(path, load_weights=False)``): tensors in external data stay on disk; a pass
  reads one when it processes that layer (``read_external``: a read-only memory map, so an
  untouched weight costs no memory and can't be changed in place), and ``save`` copies the
  untouched ones into the new data file in chunks. A model larger than memory allows then goes
  through a pass holding only the weights it rewrites.
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

from onnxcomp.errors import UnsafeModelError, UserError

# Protobuf refuses messages of 2 GiB; stay clear of it, the graph itself takes room too.
PROTOBUF_SAFE_BYTES = 1_800_000_000
# Tensors smaller than this stay inside the .onnx when weights go to external data.
EXTERNAL_DATA_THRESHOLD = 1024
# Offsets in the data file: page-aligned for large tensors (ONNX Runtime can memory-map them).
PAGE_ALIGN, PAGE_ALIGN_FROM, SMALL_ALIGN = 4096, 1 << 20, 64
COPY_CHUNK = 16 << 20


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

    @property
    def lazy(self) -> bool:
        """Some weights are still on disk (loaded with ``load_weights=False``)."""
        return weights_on_disk(self.proto)

    def lazy_bytes(self) -> int:
        return sum(tensor_nbytes(t) for t in iter_tensors(self.proto)
                   if external_data_helper.uses_external_data(t))

    def materialize(self) -> None:
        """Read every lazy weight into memory (in place): for code that needs them all."""
        if self.lazy:
            if self.source is None:
                raise UserError("the model's weights are on disk but its folder is unknown")
            _check_external_locations(self.proto, self.source)
            external_data_helper.load_external_data_for_model(self.proto, str(self.source))


def opset_version(proto: onnx.ModelProto, domain: str = "") -> int:
    for entry in proto.opset_import:
        if entry.domain in (domain, "ai.onnx" if domain == "" else domain):
            return int(entry.version)
    return 0


def iter_tensors(proto: onnx.ModelProto):
    """Every TensorProto of the model: initializers, Constant attributes, subgraphs included."""
    yield from external_data_helper._get_all_tensors(proto)


def weights_on_disk(proto: onnx.ModelProto) -> bool:
    """Some tensor's data is in an external file rather than in the protobuf."""
    return any(external_data_helper.uses_external_data(t) for t in iter_tensors(proto))


def tensor_bytes(proto: onnx.ModelProto) -> int:
    total = 0
    for tensor in iter_tensors(proto):
        total += tensor_nbytes(tensor)
    return total


def parameter_count(proto: onnx.ModelProto) -> int:
    """The one parameter count: elements of every stored tensor (initializers, Constant nodes,
    subgraphs included) except 64-bit integer ones, which are shapes and indices, not weights.
    Quantized weights, their scales and zero points count."""
    return sum(int(np.prod(t.dims)) if len(t.dims) else 1 for t in iter_tensors(proto)
               if t.data_type != onnx.TensorProto.INT64)


def tensor_nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of a tensor's values (as stored: 4-bit types packed two to a byte)."""
    count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * itemsize


_tensor_nbytes = tensor_nbytes  # the old name, still imported by segments.py


def _safe_location(tensor: onnx.TensorProto, location: str, root: Path) -> Path:
    """The data file of ``tensor``, refused unless it lies inside ``root`` (resolved)."""
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
        raise UserError(f"external data file {location!r} of tensor {tensor.name!r} is missing")
    return target


def _check_external_locations(proto: onnx.ModelProto, base_dir: Path) -> None:
    root = base_dir.resolve()
    for tensor in iter_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            _safe_location(tensor, external_data_helper.ExternalDataInfo(tensor).location, root)


def load(path: str | os.PathLike, load_weights: bool = True) -> Model:
    """Read an ONNX file; external data is checked to stay inside the model's folder, then read
    (``load_weights=False``: left on disk and read per tensor when needed, see the module doc)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: no such file")
    if path.is_dir():
        raise UserError(f"{path}: is a folder, expected an .onnx file")
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001  protobuf raises several unrelated types on garbage
        raise UserError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    if not proto.graph.node and not proto.graph.output:
        raise UserError(f"{path}: not an ONNX model (empty graph)")
    _check_external_locations(proto, path.parent)
    external = weights_on_disk(proto)
    if load_weights:
        external_data_helper.load_external_data_for_model(proto, str(path.parent))
    return Model(proto, path.resolve().parent, external)


def _needs_external_data(proto: onnx.ModelProto) -> bool:
    return tensor_bytes(proto) > PROTOBUF_SAFE_BYTES


def read_external(tensor: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    """A lazy tensor's values as a read-only memory map of its data file (nothing is read until
    used; the map can't write to the file)."""
    info = external_data_helper.ExternalDataInfo(tensor)
    path = _safe_location(tensor, info.location, Path(base_dir).resolve())
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    shape = tuple(int(d) for d in tensor.dims)
    count = int(np.prod(shape)) if shape else 1
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.STRING,
                            onnx.TensorProto.BFLOAT16) or dtype.itemsize == 0:
        copy = onnx.TensorProto()
        copy.CopyFrom(tensor)
        external_data_helper.load_external_data_for_tensor(copy, str(path.parent))
        return numpy_helper.to_array(copy)
    if info.length and int(info.length) != count * dtype.itemsize:
        raise UserError(f"tensor {tensor.name!r}: external data length {info.length} does not "
                            f"match its shape {list(shape)}")
    if count == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=int(info.offset or 0), shape=shape)


def save(model: Model | onnx.ModelProto, path: str | os.PathLike,
         external_data: bool | None = None) -> Path:
    """Write the model atomically. ``external_data=None``: external if the model was loaded with
    external data or its tensors pass ~1.8 GB."""
    proto = model.proto if isinstance(model, Model) else model
    source = model.source if isinstance(model, Model) else None
    target = Path(path)
    if target.is_dir():
        raise UserError(f"{target}: is a folder, expected an output file name")
    target.parent.mkdir(parents=True, exist_ok=True)
    lazy = weights_on_disk(proto)
    if external_data is None:
        external_data = getattr(model, "external_data", False) or _needs_external_data(proto)
    data_name = target.name + ".data"
    if lazy and source is None:
        raise UserError("this model's weights are on disk but its folder is unknown")
    if lazy and not external_data:  # asked for one self-contained file: read the weights in
        whole = model.copy()
        whole.materialize()
        return save(whole, target, external_data=False)
    if lazy and _reads_from(proto, source, target.parent / data_name):
        raise UserError(f"{target.parent / data_name}: the model reads its weights from this "
                            "file; save it under another name")
    staging = Path(tempfile.mkdtemp(prefix=".onnxcomp-", dir=target.parent))
    try:
        staged_model = staging / target.name
        if external_data:
            _write_with_external_data(proto, staged_model, data_name, source)
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
    if isinstance(model, Model) and not lazy:
        model.source = target.resolve().parent
    return target


def _reads_from(proto: onnx.ModelProto, source: Path | None, data_path: Path) -> bool:
    if source is None or not data_path.exists():
        return False
    for tensor in iter_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            location = external_data_helper.ExternalDataInfo(tensor).location
            if same_file(Path(source) / location, data_path):
                return True
    return False


def _aligned(offset: int, nbytes: int) -> int:
    align = PAGE_ALIGN if nbytes >= PAGE_ALIGN_FROM else SMALL_ALIGN
    return -(-offset // align) * align


def _write_with_external_data(proto: onnx.ModelProto, model_path: Path, data_name: str,
                              source: Path | None) -> None:
    """Stream every tensor of at least EXTERNAL_DATA_THRESHOLD bytes into ``data_name`` beside
    ``model_path``: in-memory ones from the proto, lazy ones copied in chunks from their files.
    The proto is pointed at the new file only while it is serialized, then put back as it was
    (in-memory weights are read back from the written file one at a time, so the caller's model
    stays whole without ever holding two copies)."""
    data_path = model_path.parent / data_name
    moved: list[tuple[onnx.TensorProto, list[tuple[str, str]] | None]] = []
    try:
        with open(data_path, "wb") as out:
            for tensor in iter_tensors(proto):
                if external_data_helper.uses_external_data(tensor):
                    info = external_data_helper.ExternalDataInfo(tensor)
                    src = _safe_location(tensor, info.location, Path(source).resolve())
                    nbytes = tensor_nbytes(tensor)
                    offset = _aligned(out.tell(), nbytes)
                    out.seek(offset)
                    with open(src, "rb") as handle:
                        handle.seek(int(info.offset or 0))
                        left = int(info.length) if info.length else nbytes
                        while left > 0:
                            chunk = handle.read(min(COPY_CHUNK, left))
                            if not chunk:
                                raise UserError(f"external data of {tensor.name!r} is "
                                                    "truncated")
                            out.write(chunk)
                            left -= len(chunk)
                    old = [(e.key, e.value) for e in tensor.external_data]
                    _point_at(tensor, data_name, offset, out.tell() - offset)
                    moved.append((tensor, old))
                    continue
                if tensor.data_type == onnx.TensorProto.STRING:
                    continue
                if tensor_nbytes(tensor) < EXTERNAL_DATA_THRESHOLD:
                    continue
                if not tensor.HasField("raw_data"):  # typed fields (float_data, ...): as raw
                    tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor),
                                                            tensor.name))
                raw = tensor.raw_data
                offset = _aligned(out.tell(), len(raw))
                out.seek(offset)
                out.write(raw)
                del raw
                tensor.ClearField("raw_data")
                tensor.data_location = onnx.TensorProto.EXTERNAL
                _point_at(tensor, data_name, offset, out.tell() - offset)
                moved.append((tensor, None))
        with open(model_path, "wb") as handle:
            handle.write(proto.SerializeToString())
    finally:
        _restore(moved, data_path)
    if not moved:
        data_path.unlink(missing_ok=True)


def _point_at(tensor: onnx.TensorProto, location: str, offset: int, length: int) -> None:
    del tensor.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


def _restore(moved, data_path: Path) -> None:
    """Put the proto back: lazy tensors at their old files, in-memory ones read back."""
    if not moved:
        return
    with open(data_path, "rb") as handle:
        for tensor, old in moved:
            if old is not None:
                del tensor.external_data[:]
                for key, value in old:
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                continue
            info = external_data_helper.ExternalDataInfo(tensor)
            handle.seek(int(info.offset))
            tensor.raw_data = handle.read(int(info.length))
            del tensor.external_data[:]
            tensor.data_location = onnx.TensorProto.DEFAULT



def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    a, b = Path(a), Path(b)
    if a.exists() and b.exists():
        return a.resolve() == b.resolve() or os.path.samefile(a, b)
    return a.resolve() == b.resolve()


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor)
