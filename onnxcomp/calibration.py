"""Calibration and evaluation data, and streaming intermediate activations out of ONNX Runtime.

A data source (``SRC`` on the command line) is one of:
- a folder of ``.npz`` files, each one batch: input name → array (or one ``.npz`` file);
- a zoo generator: ``NAME``, ``NAME:N`` or ``NAME:SPLIT:N`` (``SPLIT`` is ``calib`` or ``eval``);
- ``random:N``: N batches drawn from the model's input signature (seeded), 1 ≤ N ≤
  ``MAX_BATCHES``.

Batches are produced lazily, so a large data set never sits in memory whole. Every batch a
resolved data source produces is checked against the model's input signature (names, dtypes,
ranks, fixed dims) and for NaN/Inf, not only the first: a bad batch N is a ``UserError`` naming
the file or batch and the input. ``.npz`` files are read only when they are regular files, hold
no Python objects (no pickle) and declare (in their array headers, read before any data) at most
``MAX_BATCH_BYTES`` per batch.

Random data sized for the model: a dynamic dimension that the caller does not size is chosen so
the model can take it (:func:`fitting_shapes`): the zoo generator's sizes when the model is a
zoo model, else the divisibility the graph's strided Conv/pooling layers need, checked by
running the model once in ONNX Runtime and, where that fails, other sizes (16, 32, 64, 224, 320,
640 and their multiples of that divisor). When none runs: a ``UserError`` asking for real data
or sizes.
"""

from __future__ import annotations

import errno
import hashlib
import math
import os
import re
import stat
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from onnxcomp.errors import UserError
from onnxcomp.model import Model, serialized_size

if TYPE_CHECKING:
    import onnxruntime as ort

Batch = dict[str, np.ndarray]

DEFAULT_DYNAMIC_DIM = 16
# random:N and zoo NAME:N above this are refused: calibration statistics settle long before
# (int8 uses 16-128 batches), and a typo (random:100000000) must not run for hours.
MAX_BATCHES = 4096
# One batch (all inputs together) may not exceed this, checked before any allocation: random
# shapes from declared dims, and .npz files from their array headers.
MAX_BATCH_BYTES = 1 << 30
# Sizes tried for a dynamic spatial dim, after the smallest one the graph's strides allow.
SIZE_CANDIDATES = (16, 32, 64, 224, 320, 640)
# Trial runs (see fitting_shapes) are skipped for models whose weights exceed this or are lazy.
TRIAL_MAX_BYTES = 1 << 29
# Trial runs try candidates of at most this many bytes a batch, for at most this long in all.
TRIAL_MAX_BATCH_BYTES = 1 << 26
TRIAL_SECONDS = 10.0
# A model up to this size is hashed to recognise a zoo model (sha256 of the file's bytes).
ZOO_HASH_MAX_BYTES = 1 << 26
NEEDS_DATA = "give real data with --calib, --eval or --data (a folder of .npz batches)"


@dataclass
class Dataset:
    """A sized, re-iterable source of input batches, with optional task labels per batch."""

    name: str
    count: int
    make_batch: Callable[[int], Batch]
    labels: Sequence | None = None
    # The zoo entry the data came from, so validate can attach its task metric.
    zoo_name: str | None = None
    notes: list[str] = field(default_factory=list)
    # How an error names batch i (the .npz file it came from); default "NAME batch i".
    label: Callable[[int], str] | None = None
    # A larger draw of the same source (zoo generators: ``count`` batches of the same split,
    # this one's first), so training can read more batches than calibration plans on.
    grow: Callable[[int], Dataset] | None = None

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[Batch]:
        for i in range(self.count):
            yield self.make_batch(i)

    def where(self, index: int) -> str:
        return self.label(index) if self.label else f"{self.name} batch {index}"

    def take(self, count: int) -> Dataset:
        count = min(count, self.count)
        labels = list(self.labels)[:count] if self.labels is not None else None
        return Dataset(f"{self.name}[:{count}]", count, self.make_batch, labels, self.zoo_name,
                       label=self.label)


def from_batches(batches: Sequence[Batch], name: str = "arrays", labels=None) -> Dataset:
    batches = list(batches)
    return Dataset(name, len(batches), lambda i: batches[i], labels)


# ---------------------------------------------------------------------------------------------
# .npz files


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISDIR, "a folder")):
        if test(mode):
            return kind
    return "not a regular file"


def _stat(path: str | Path, what: str) -> os.stat_result | None:
    """``os.stat`` (symlinks followed); None when nothing is there; a symlink loop or an
    unreadable path is a ``UserError``."""
    try:
        return os.stat(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise UserError(f"{what} {str(path)!r}: a symlink loop") from None
        raise UserError(f"{what} {str(path)!r}: cannot be read ({exc.strerror})") from None


def _regular_file(path: Path) -> None:
    """Refuse what would block or stream forever (FIFO, device, socket) before opening it."""
    info = _stat(path, "data file")
    if info is None:
        raise UserError(f"{path}: no such file (or a dangling symlink)")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path}: {_file_kind(info.st_mode)}, expected an .npz file")


def _npy_header(member) -> tuple[tuple[int, ...], np.dtype]:
    version = np.lib.format.read_magic(member)
    if version == (1, 0):
        shape, _, dtype = np.lib.format.read_array_header_1_0(member)
    elif version == (2, 0):
        shape, _, dtype = np.lib.format.read_array_header_2_0(member)
    else:
        raise ValueError(f"unsupported .npy format version {version}")
    return tuple(int(d) for d in shape), np.dtype(dtype)


def check_npz(path: Path) -> None:
    """Read every array header of the .npz (no data) and refuse Python objects (pickles),
    absurd sizes (over ``MAX_BATCH_BYTES`` in all) and data shorter than its header says."""
    _regular_file(path)
    total = 0
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                key = info.filename
                if not key.endswith(".npy"):
                    raise UserError(f"{path}: member {key!r} is not an .npy array")
                with archive.open(info) as member:
                    shape, dtype = _npy_header(member)
                    header_bytes = member.tell()
                if dtype.hasobject:
                    raise UserError(f"{path}: array {key[:-4]!r} holds Python objects (a pickle);"
                                    " only plain numeric arrays are read")
                if any(d < 0 for d in shape):
                    raise UserError(f"{path}: array {key[:-4]!r} declares shape {list(shape)}")
                nbytes = math.prod(shape) * dtype.itemsize
                total += nbytes
                if total > MAX_BATCH_BYTES:
                    raise UserError(f"{path}: array {key[:-4]!r} declares shape {list(shape)} "
                                    f"({nbytes / 2**20:.0f} MiB); a batch may hold at most "
                                    f"{MAX_BATCH_BYTES >> 20} MiB")
                if info.file_size < header_bytes + nbytes:
                    raise UserError(f"{path}: array {key[:-4]!r} is truncated ({info.file_size} "
                                    f"bytes for a {list(shape)} {dtype} array)")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001  zipfile/numpy raise several types on garbage
        raise UserError(f"{path}: not a readable .npz file ({type(exc).__name__}: "
                        f"{_first_line(exc)})") from None


def _load_npz(path: Path) -> Batch:
    check_npz(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            return {key: npz[key] for key in npz.files}
    except Exception as exc:  # noqa: BLE001  a corrupt member (CRC, compression)
        raise UserError(f"{path}: not a readable .npz file ({type(exc).__name__}: "
                        f"{_first_line(exc)})") from None


def from_npz_files(files: Sequence[Path], name: str) -> Dataset:
    files = list(files)
    for path in files:  # cheap (stat only), and it keeps a FIFO from blocking batch 7
        _regular_file(path)
    return Dataset(name, len(files), lambda i: _load_npz(files[i]),
                   label=lambda i: f"{files[i]} (batch {i})")


def from_npz_folder(folder: str | Path) -> Dataset:
    folder = Path(folder)
    files = sorted(folder.glob("*.npz"))
    if not files:
        raise UserError(f"{folder}: no .npz files in this folder")
    return from_npz_files(files, str(folder))


# ---------------------------------------------------------------------------------------------
# The input signature


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _elem_dtype(value_info: onnx.ValueInfoProto) -> np.dtype:
    """The numpy dtype of a tensor input; a ``UserError`` for inputs that are not tensors
    (sequences, maps, optionals) or have no element type."""
    kind = value_info.type.WhichOneof("value")
    if kind != "tensor_type":
        what = {None: "has no type", "sequence_type": "is a sequence", "map_type": "is a map",
                "optional_type": "is an optional", "sparse_tensor_type": "is a sparse tensor"}
        raise UserError(f"model input {value_info.name!r} {what.get(kind, f'is a {kind}')}: "
                        "onnxcomp feeds dense tensor inputs only")
    elem = value_info.type.tensor_type.elem_type
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    except Exception:  # noqa: BLE001  KeyError/ValueError for unknown or undefined types
        dtype = None
    if elem == onnx.TensorProto.UNDEFINED or dtype is None:
        raise UserError(f"model input {value_info.name!r} has no usable element type ({elem})")
    return np.dtype(dtype)


def graph_inputs(model: Model) -> list[onnx.ValueInfoProto]:
    """The real inputs (not initializers listed as inputs, as old exporters do)."""
    initializers = {t.name for t in model.graph.initializer}
    return [i for i in model.graph.input if i.name not in initializers]


def _free(dim: onnx.TensorShapeProto.Dimension, dims: dict[str, int]) -> bool:
    return not (dim.HasField("dim_value") and dim.dim_value > 0) and dim.dim_param not in dims


def input_shape(value_info: onnx.ValueInfoProto, dims: dict[str, int] | None = None,
                batch: int = 1) -> list[int]:
    dims = dims or {}
    shape = []
    for axis, dim in enumerate(value_info.type.tensor_type.shape.dim):
        if dim.HasField("dim_value") and dim.dim_value > 0:
            shape.append(dim.dim_value)
        elif dim.dim_param and dim.dim_param in dims:
            shape.append(int(dims[dim.dim_param]))
        elif axis == 0:
            shape.append(batch)
        else:
            shape.append(DEFAULT_DYNAMIC_DIM)
    return shape


def _vocab_size(model: Model, input_name: str) -> int | None:
    """For token-id inputs: the row count of the embedding table a Gather reads with them."""
    tables = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == input_name:
            table = tables.get(node.input[0])
            if table is not None and len(table.dims) >= 1 and table.dims[0] > 0:
                return int(table.dims[0])
    return None


def _signature(model: Model) -> list[tuple[str, np.dtype, list[int | None] | None]]:
    """(name, dtype, dims) per input; dims None when the rank is unknown, a dim None when it
    is not fixed."""
    result = []
    for value_info in graph_inputs(model):
        dtype = _elem_dtype(value_info)
        tensor_type = value_info.type.tensor_type
        dims = None
        if tensor_type.HasField("shape"):
            dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
                    for d in tensor_type.shape.dim]
        result.append((value_info.name, dtype, dims))
    return result


# ---------------------------------------------------------------------------------------------
# Checking batches


def _check_against(batch: Batch, signature, where: str) -> None:
    if not isinstance(batch, dict):
        raise UserError(f"{where}: expected arrays by input name, got {type(batch).__name__}")
    expected = [name for name, _, _ in signature]
    if set(batch) != set(expected):
        raise UserError(
            f"{where}: arrays {sorted(batch)} do not match the model inputs {sorted(expected)}"
        )
    for name, want, dims in signature:
        array = batch[name]
        if not isinstance(array, np.ndarray):
            raise UserError(f"{where}: input {name!r} is a {type(array).__name__}, not an array")
        if dims is not None and array.ndim != len(dims):
            raise UserError(
                f"{where}: input {name!r} has rank {array.ndim}, the model expects {len(dims)}"
            )
        for axis, dim in enumerate(dims or ()):
            if dim is not None and array.shape[axis] != dim:
                raise UserError(
                    f"{where}: input {name!r} has shape {list(array.shape)}, the model expects "
                    f"{dim} on axis {axis}"
                )
        if array.dtype != want:
            raise UserError(f"{where}: input {name!r} is {array.dtype}, the model expects {want}")
        if np.issubdtype(array.dtype, np.inexact) and not np.isfinite(array).all():
            bad = int(array.size - np.count_nonzero(np.isfinite(array)))
            raise UserError(f"{where}: input {name!r} holds {bad} NaN/Inf value(s) of "
                            f"{array.size}: data must be finite")


def check_batch(batch: Batch, model: Model, where: str = "batch") -> None:
    """The batch must match the model's input signature exactly (names, dtypes, ranks, fixed
    dims) and be finite, or a ``UserError`` naming ``where`` and the input."""
    _check_against(batch, _signature(model), where)


class _Checked:
    """``make_batch`` with every batch checked against a model's signature."""

    def __init__(self, make_batch: Callable[[int], Batch], signature, where):
        self.inner, self.signature, self.where = make_batch, signature, where

    def __call__(self, index: int) -> Batch:
        batch = self.inner(index)
        _check_against(batch, self.signature, self.where(index))
        return batch


def check_dataset(dataset: Dataset, model: Model) -> None:
    """Check the first batch now, so a wrong data source fails before any work starts, and
    every later batch as it is made (the dataset's ``make_batch`` is wrapped in place): a bad
    batch N is a ``UserError`` naming it and the input wherever it is read."""
    if dataset.count <= 0:
        raise UserError(f"data source {dataset.name!r} is empty")
    signature = _signature(model)
    current = dataset.make_batch
    if not (isinstance(current, _Checked) and current.signature == signature):
        dataset.make_batch = _Checked(current, signature, dataset.where)
    dataset.make_batch(0)


# ---------------------------------------------------------------------------------------------
# Random data that fits the model


_DOWNSAMPLE = {"Conv", "ConvInteger", "QLinearConv", "MaxPool", "AveragePool", "LpPool"}
_UPSAMPLE = {"ConvTranspose"}
_RESIZE = {"Resize", "Upsample"}


def _ints(node: onnx.NodeProto, name: str) -> list[int] | None:
    for attr in node.attribute:
        if attr.name == name:
            return list(attr.ints)
    return None


def _resize_scales(node: onnx.NodeProto, constants: dict[str, onnx.TensorProto]
                   ) -> list[float] | None:
    slot = 1 if node.op_type == "Upsample" or len(node.input) == 2 else 2
    if len(node.input) > slot and node.input[slot] in constants:
        try:
            return [float(v) for v in onnx.numpy_helper.to_array(constants[node.input[slot]])
                    .reshape(-1)]
        except Exception:  # noqa: BLE001  an unreadable constant: no information
            return None
    return None


def stride_divisors(model: Model) -> dict[str, list[int]]:
    """For each input of rank ≥ 3 (N, C, spatial...): per spatial axis, the largest product of
    strides along any path from it (Conv and pooling multiply, ConvTranspose and Resize by a
    constant scale divide). A size that is a multiple of it survives every downsampling
    without rounding, which a skip connection (Add/Concat of two scales) needs. Inputs with
    nothing strided on their path are left out. A heuristic for the usual NCHW layout: the
    trial run in :func:`fitting_shapes` has the last word."""
    constants = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            constants[node.output[0]] = node.attribute[0].t
    result = {}
    for value_info in graph_inputs(model):
        rank = len(value_info.type.tensor_type.shape.dim)
        if value_info.type.WhichOneof("value") != "tensor_type" or rank < 3:
            continue
        spatial = rank - 2
        factor = {value_info.name: (1,) * spatial}
        need = [1] * spatial
        for node in model.graph.node:
            seen = [factor[name] for name in node.input if name in factor]
            if not seen:
                continue
            current = [max(f[axis] for f in seen) for axis in range(spatial)]
            if node.op_type in _DOWNSAMPLE | _UPSAMPLE:
                strides = _ints(node, "strides") or [1] * spatial
                if len(strides) == spatial and all(0 < s <= 64 for s in strides):
                    if node.op_type in _DOWNSAMPLE:
                        current = [c * s for c, s in zip(current, strides)]
                    else:
                        current = [max(1, c // s) for c, s in zip(current, strides)]
            elif node.op_type in _RESIZE:
                scales = _resize_scales(node, constants)
                if scales and len(scales) == rank:
                    current = [max(1, round(c / s)) if s >= 1 else c
                               for c, s in zip(current, scales[2:])]
            need = [max(n, c) for n, c in zip(need, current)]
            for name in node.output:
                factor[name] = tuple(current)
        if any(n > 1 for n in need):
            result[value_info.name] = [min(n, 1 << 12) for n in need]
    return result


def _conv_channels(model: Model, input_name: str) -> int | None:
    """The channel count a Conv reading the input directly expects (its weight's dim 1 times
    ``group``), for a dynamic channel axis."""
    weights = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].HasField("t"):
            weights[node.output[0]] = node.attribute[0].t
    for node in model.graph.node:
        if node.op_type == "Conv" and len(node.input) > 1 and node.input[0] == input_name:
            weight = weights.get(node.input[1])
            group = next((a.i for a in node.attribute if a.name == "group"), 1)
            if weight is not None and len(weight.dims) > 2 and weight.dims[1] > 0 and group > 0:
                return int(weight.dims[1]) * int(group)
    return None


def _model_digest(model: Model) -> str | None:
    if model.lazy or serialized_size(model.proto) > ZOO_HASH_MAX_BYTES:
        return None
    return hashlib.sha256(model.proto.SerializeToString()).hexdigest()


def zoo_name(model: Model, digest: str | None = None) -> str | None:
    """The zoo entry this model is, recognised by the sha256 its zoo module pins (the bytes of
    an unmodified zoo file serialise back identically) or by its zoo cache folder."""
    from onnxcomp import zoo  # the zoo imports this module

    digest = digest or _model_digest(model)
    for name, chosen in zoo.ENTRIES.items():
        if model.source is not None and digest is None:
            try:
                if Path(model.source).resolve() == (zoo.cache_dir() / name).resolve():
                    return name
            except OSError:
                continue
        if digest is not None:
            pinned = getattr(chosen.implementation(), "MODELS", {}).get(name)
            if pinned and pinned[1] == digest:
                return name
    return None


def _zoo_shapes(model: Model, name: str) -> dict[str, list[int]] | None:
    from onnxcomp import zoo

    try:
        batch = zoo.dataset(name, "calib", 1).make_batch(0)
    except Exception:  # noqa: BLE001  the generator needs an optional extra: sizes by trial
        return None
    return {key: list(value.shape) for key, value in batch.items()}


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _draw(specs, shapes: dict[str, list[int]], rng: np.random.Generator) -> Batch:
    arrays = {}
    for name, dtype, vocab in specs:
        shape = shapes[name]
        lowered = name.lower()
        if np.issubdtype(dtype, np.floating):
            arrays[name] = rng.standard_normal(shape).astype(dtype)
        elif np.issubdtype(dtype, np.complexfloating):
            arrays[name] = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)
                            ).astype(dtype)
        elif dtype == np.bool_:
            arrays[name] = np.ones(shape, dtype=bool)
        elif "mask" in lowered:
            arrays[name] = np.ones(shape, dtype=dtype)
        elif "type" in lowered or "segment" in lowered:
            arrays[name] = np.zeros(shape, dtype=dtype)
        elif np.issubdtype(dtype, np.integer):
            high = min(vocab or 100, int(np.iinfo(dtype).max) + 1)
            arrays[name] = rng.integers(0, high, size=shape).astype(dtype)
        else:  # strings and other exotic inputs: zeros of the type
            arrays[name] = np.zeros(shape, dtype=dtype)
    return arrays


def _batch_bytes(specs, shapes: dict[str, list[int]]) -> int:
    return sum(math.prod(shapes[name]) * max(dtype.itemsize, 1) for name, dtype, _ in specs)


def _check_bytes(specs, shapes: dict[str, list[int]]) -> None:
    for name, dtype, _ in specs:
        if any(d < 0 for d in shapes[name]):
            raise UserError(f"model input {name!r} declares shape {shapes[name]}")
    total = _batch_bytes(specs, shapes)
    if total > MAX_BATCH_BYTES:
        sizes = ", ".join(f"{name!r} {shapes[name]}" for name, _, _ in specs)
        raise UserError(f"random data of the declared sizes ({sizes}) would take "
                        f"{total / 2**20:.0f} MiB a batch, over the {MAX_BATCH_BYTES >> 20} MiB "
                        f"allowed: {NEEDS_DATA}")


_FITTING_CACHE: dict[tuple, dict[str, list[int]]] = {}


def fitting_shapes(model: Model, dims: dict[str, int] | None = None, batch: int = 1
                   ) -> dict[str, list[int]]:
    """Input shapes for random data that the model can take (see the module docstring).

    Fixed dims and the ``dims`` the caller names are kept, axis 0 is ``batch``; the other
    dynamic dims are chosen for image-like inputs (a dynamic axis ≥ 2, or strided layers on the
    path): the zoo generator's sizes for a zoo model; else the smallest size ≥ 16 that
    the graph's strides divide (:func:`stride_divisors`), tried in ONNX Runtime, then the
    other ``SIZE_CANDIDATES`` (rounded up to that divisor) until one runs; ``UserError`` when
    none does. Other dynamic dims (sequence lengths) get ``DEFAULT_DYNAMIC_DIM`` untried, as
    do lazy or large models (no trial run)."""
    dims = dict(dims or {})
    inputs = graph_inputs(model)
    specs = [(v.name, _elem_dtype(v), _vocab_size(model, v.name)) for v in inputs]
    base = {v.name: input_shape(v, dims, batch) for v in inputs}
    free = {v.name: [axis for axis, d in enumerate(v.type.tensor_type.shape.dim)
                     if axis > 0 and _free(d, dims)] for v in inputs}
    free = {name: axes for name, axes in free.items() if axes}
    if not free:
        return base
    digest = _model_digest(model)
    key = (digest, tuple(sorted(dims.items())), batch) if digest else None
    if key in _FITTING_CACHE:
        return {name: list(shape) for name, shape in _FITTING_CACHE[key].items()}
    shapes = _choose_shapes(model, specs, base, free, digest)
    if key is not None:
        if len(_FITTING_CACHE) > 64:
            _FITTING_CACHE.clear()
        _FITTING_CACHE[key] = shapes
    return {name: list(shape) for name, shape in shapes.items()}


def _choose_shapes(model: Model, specs, base: dict[str, list[int]],
                   free: dict[str, list[int]], digest: str | None) -> dict[str, list[int]]:
    divisors = stride_divisors(model)
    rank = {key: len(shape) for key, shape in base.items()}
    spatial = any(axis >= 2 and rank[key] >= 3 for key, axes in free.items() for axis in axes)
    if not spatial and not any(key in divisors for key in free):
        return base
    name = zoo_name(model, digest)
    known = _zoo_shapes(model, name) if name else None
    if known:
        shapes = {key: list(shape) for key, shape in base.items()}
        for key, axes in free.items():
            if key in known and len(known[key]) == len(shapes[key]):
                for axis in axes:
                    shapes[key][axis] = known[key][axis]
        return shapes

    channels = {key: _conv_channels(model, key) for key, axes in free.items()
                if 1 in axes and rank[key] >= 3}

    def sized(size: int) -> dict[str, list[int]]:
        shapes = {key: list(shape) for key, shape in base.items()}
        for key, axes in free.items():
            for axis in axes:
                if axis == 1 and channels.get(key):
                    shapes[key][axis] = channels[key]
                    continue
                divisor = 1
                if key in divisors and axis >= 2 and axis - 2 < len(divisors[key]):
                    divisor = divisors[key][axis - 2]
                shapes[key][axis] = _round_up(size, divisor)
        return shapes

    candidates = []
    for size in (DEFAULT_DYNAMIC_DIM, *SIZE_CANDIDATES):
        shapes = sized(size)
        if shapes not in candidates and _batch_bytes(specs, shapes) <= TRIAL_MAX_BATCH_BYTES:
            candidates.append(shapes)
    if not candidates:
        return sized(DEFAULT_DYNAMIC_DIM)  # _check_bytes refuses it with the sizes
    if model.lazy or model.weight_bytes() > TRIAL_MAX_BYTES:
        return candidates[0]
    from onnxcomp import runtime

    try:
        sess = runtime.session(model, optimize=False)
    except Exception:  # noqa: BLE001  a model ONNX Runtime refuses: its callers say so
        return candidates[0]
    rng = np.random.default_rng(0)
    first_error, tried = None, []
    deadline = time.monotonic() + TRIAL_SECONDS
    for shapes in candidates:
        if time.monotonic() > deadline:
            break
        tried.append(str(shapes[next(iter(free))]))
        try:
            runtime.run(sess, _draw(specs, shapes, rng))
            return shapes
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001  ONNX Runtime's errors: try the next size
            first_error = first_error or _first_line(exc)
    raise UserError(f"random data: the model runs on none of the sizes tried for its dynamic "
                    f"dims ({', '.join(tried)}; first error: {first_error}): {NEEDS_DATA}")


def random_data(model: Model, count: int, seed: int = 0, dims: dict[str, int] | None = None,
                batch: int = 1) -> Dataset:
    """``count`` batches drawn from the input signature, at shapes the model can take
    (:func:`fitting_shapes`): normal floats, token ids below the vocabulary size, masks of ones,
    type ids of zeros."""
    _check_count(count, f"random:{count}")
    if not isinstance(batch, int) or isinstance(batch, bool) or not 0 < batch <= 1 << 16:
        raise UserError(f"batch size {batch!r}: expected an integer from 1 to {1 << 16}")
    for name, value in (dims or {}).items():
        if not isinstance(value, (int, np.integer)) or not 0 < int(value) <= 1 << 20:
            raise UserError(f"dim {name!r} = {value!r}: expected a positive integer")
    inputs = graph_inputs(model)
    specs = [(v.name, _elem_dtype(v), _vocab_size(model, v.name)) for v in inputs]
    shapes = fitting_shapes(model, dims, batch)
    _check_bytes(specs, shapes)

    def make(i: int) -> Batch:
        return _draw(specs, shapes, np.random.default_rng(seed * 100_003 + i))

    return Dataset(f"random:{count}", count, make)


# ---------------------------------------------------------------------------------------------
# Data sources


def _check_count(count, text: str) -> None:
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)):
        raise UserError(f"bad data source {text!r}: the count must be an integer")
    if count <= 0:
        raise UserError(f"bad data source {text!r}: the count must be positive")
    if count > MAX_BATCHES:
        raise UserError(f"bad data source {text!r}: at most {MAX_BATCHES} batches (use a "
                        "folder of .npz files for more)")


_RANDOM_SPEC = re.compile(r"^random:(?P<n>[0-9]{1,12})$")
_ZOO_SPEC = re.compile(r"^(?P<name>[a-z0-9][a-z0-9_.-]*?)(?::(?P<split>[a-z][a-z-]*))?"
                       r"(?::(?P<n>\d+))?$")


def zoo_source(text: str) -> tuple[str, str | None, int | None] | None:
    """``NAME[:SPLIT][:N]`` -> (name, split, count) when it names a zoo model, else None."""
    match = _ZOO_SPEC.match(text)
    if not match:
        return None
    from onnxcomp import zoo  # the zoo imports this module

    if match["name"] not in zoo.names():
        return None
    return match["name"], match["split"], int(match["n"]) if match["n"] else None


def resolve(spec: str | Path | Dataset | None, model: Model, default_count: int = 16,
            split: str = "calib", dims: dict[str, int] | None = None) -> Dataset:
    """Turn a ``SRC`` (see the module docstring) into a Dataset checked against the model
    (every batch, see :func:`check_dataset`). ``dims`` sizes named dynamic input dimensions
    of random data."""
    if isinstance(spec, Dataset):
        dataset = spec
    elif spec is None or str(spec) == "random":
        dataset = random_data(model, default_count, dims=dims)
    else:
        text = str(spec)
        if text.startswith("random:"):
            match = _RANDOM_SPEC.match(text)
            if not match:
                raise UserError(f"bad data source {text!r}: expected random:N, N a positive "
                                f"integer up to {MAX_BATCHES}")
            count = int(match["n"])
            _check_count(count, text)
            dataset = random_data(model, count, dims=dims)
        elif (info := _stat(text, "data source")) is not None:
            if stat.S_ISDIR(info.st_mode):
                dataset = from_npz_folder(text)
            elif stat.S_ISREG(info.st_mode) and text.endswith(".npz"):
                dataset = from_npz_files([Path(text)], text)
            else:
                kind = "a file" if stat.S_ISREG(info.st_mode) else _file_kind(info.st_mode)
                raise UserError(f"data source {text!r} is {kind}: expected a folder of .npz "
                                "files, an .npz file, random:N or a zoo generator")
        else:
            match = _ZOO_SPEC.match(text)
            from onnxcomp import zoo  # the zoo imports this module

            if not match or match["name"] not in zoo.names():
                raise UserError(
                    f"data source {text!r} is neither a folder of .npz files, random:N, nor a zoo "
                    f"generator ({', '.join(zoo.names())})"
                )
            count = int(match["n"]) if match["n"] else default_count
            _check_count(count, text)
            dataset = zoo.dataset(match["name"], match["split"] or split, count)
    check_dataset(dataset, model)
    return dataset


# ---------------------------------------------------------------------------------------------
# Activations


def with_outputs(model: Model, names: Sequence[str]) -> Model:
    """A copy of the model that also returns the named intermediate tensors."""
    extended = model.copy()
    present = {o.name for o in extended.graph.output}
    for name in names:
        if name not in present:
            extended.graph.output.append(onnx.ValueInfoProto(name=name))
    return extended


def session_with_outputs(model: Model, names: Sequence[str]) -> ort.InferenceSession:
    """An ONNX Runtime session (CPU, optimizations off) of ``model`` that also returns the
    named intermediate tensors: ``runtime.session(with_outputs(model, names))`` without the
    copy, which holds every in-memory weight twice while the session is built (605 MB more for
    CLIP ViT-B/32). The outputs are appended to the model's own graph and removed once ONNX
    Runtime has the model; the model is left as it was, also when that fails."""
    from onnxcomp import runtime

    outputs, source = model.graph.output, model.source
    kept = len(outputs)
    present = {o.name for o in outputs}
    for name in dict.fromkeys(names):
        if name not in present:
            outputs.append(onnx.ValueInfoProto(name=name))
    try:
        return runtime.session(model, optimize=False)
    finally:
        del outputs[kept:]
        model.source = source  # a model over 2 GiB is saved for ONNX Runtime, which moves it


def stream_activations(model: Model, names: Sequence[str], data: Dataset,
                       on_batch: Callable[[int, dict[str, np.ndarray]], None],
                       progress: Callable[[int, int], None] | None = None,
                       per_segment: int | None = None) -> None:
    """Run the model over the data and hand each batch's named activations to ``on_batch``.

    Only one batch of activations is alive at a time, so memory does not grow with the data set;
    callers keep running statistics (min/max, histograms, covariances). With ``per_segment``, the
    model runs one segment at a time (``onnxcomp.segments``: at most that many of the names
    each), so only one segment's weights are in ONNX Runtime at once; ``on_batch`` is then called
    once per segment and batch with that segment's names, batches in order for each name, and
    ``progress`` counts segments."""
    from onnxcomp import runtime, segments

    if per_segment is not None:
        flow = segments.iterate(model, names, data, per_segment)
        total = len(segments.plan(model, names, per_segment))
        for done, (_, values) in enumerate(flow, start=1):
            # Not enumerate(values): its cached (i, batch) tuple keeps a batch alive while the
            # next one is computed, and so does the loop variable until deleted: two at once.
            i = 0
            for batch in values:
                on_batch(i, batch)
                del batch
                i += 1  # noqa: SIM113  (see above)
            if progress:
                progress(done, total)
        return
    sess = session_with_outputs(model, names)
    for i, batch in enumerate(data):
        on_batch(i, runtime.run(sess, batch, list(names)))
        if progress:
            progress(i + 1, len(data))
    # The activations were freed batch by batch into the C heap, which keeps them: hand them
    # back, or the next step (the fidelity check's two sessions) starts on top of them.
    del sess
    runtime.release_free_memory()
