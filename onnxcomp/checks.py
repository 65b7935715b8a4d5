"""Checks on an input model, before any work: a broken or hostile file is refused with one line
saying what is wrong (``UserError``), never found later as a traceback or a silent wrong result.

Everything here reads the protobuf and, for external data, only file headers (``os.stat``): it
is linear in the number of nodes and tensors, so it runs on every :func:`onnxcomp.model.load`,
huge lazy models included. ``onnxcomp.runtime.check_input`` adds onnx's full check (shape
inference) and an ONNX Runtime load where those are cheap.

What is refused, and why:

- the path itself: missing, a folder, a FIFO, a device or a socket (opening a FIFO blocks
  forever), a symlink loop, an empty file (:func:`check_model_path`, before anything is opened);
- tensor encodings: an unknown data type, negative dims, raw or typed data whose length does
  not match ``prod(dims)``, a declared size past this machine's memory (the estimate is in the
  message, nothing is allocated);
- external data: malformed fields (unknown or repeated keys, offset/length not a non-negative
  integer), a location that is absolute, climbs out of the model's folder (symlinks included),
  is the model file itself, or is not a regular file (folder, FIFO, device), and an
  offset + length past the end of its file or a length that does not match the dims;
- sparse initializers: densified in memory when the dense tensor is at most
  ``SPARSE_DENSIFY_BYTES`` and its indices are valid, else refused (a pass reading the empty
  dense slot would quantize the weight to zeros);
- the graph: duplicate graph inputs or initializers, a tensor produced twice, a node reading a
  name nothing defines, an output nothing produces, no outputs at all, cycles (a graph that is
  merely out of order is sorted in memory), then onnx's structural checker;
- an opset of the default domain this onnx does not know (0, or newer than its newest);
- graph inputs onnxcomp cannot feed: sequence, optional, map or sparse inputs, inputs with no
  type or no element type, negative dims, static shapes past this machine's memory;
- weights: NaN anywhere in a float tensor, +-Inf in a weight a pass rewrites (MatMul, Gemm,
  Conv, ConvTranspose, Gather, RNN weights): refused naming the tensor (never made finite).
  +-Inf elsewhere (attention masks) is kept. Weights still on disk are scanned when they sum to
  at most ``FINITE_SCAN_LAZY_BYTES`` (else left to the pass that reads them:
  :func:`refuse_nonfinite`);
- zero-element weights of those same ops: refused (a layer with no weights has nothing to
  compress and makes passes divide by zero); zero-element tensors elsewhere (Resize's empty roi)
  are fine.
"""

from __future__ import annotations

import errno
import heapq
import math
import os
import re
import stat
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, numpy_helper

from onnxcomp.errors import UnsafeModelError, UserError

# Sparse initializers are densified in memory up to this many bytes of dense tensor.
SPARSE_DENSIFY_BYTES = 256 << 20
# Weights still on disk are scanned for NaN/Inf when they sum to at most this much.
FINITE_SCAN_LAZY_BYTES = 1 << 30
EXTERNAL_KEYS = ("location", "offset", "length", "checksum")
# Weight slots (input indices) of the ops passes rewrite: Inf and zero-size refused there.
WEIGHT_SLOTS = {
    "MatMul": (0, 1), "Gemm": (0, 1, 2), "Conv": (1, 2), "ConvTranspose": (1, 2),
    "Gather": (0,), "LSTM": (1, 2, 3), "GRU": (1, 2, 3), "RNN": (1, 2, 3),
}
FLOAT_TYPES = {TensorProto.FLOAT: np.float32, TensorProto.DOUBLE: np.float64,
               TensorProto.FLOAT16: np.float16}
_PACKED_4BIT = {TensorProto.INT4, TensorProto.UINT4}
_PACKED_4BIT |= {TensorProto.FLOAT4E2M1} if hasattr(TensorProto, "FLOAT4E2M1") \
    else set()
_KNOWN_TYPES = {value for value in TensorProto.DataType.values() if value != TensorProto.UNDEFINED}
_INTEGER = re.compile(r"[0-9]{1,19}")


def memory_limit() -> int:
    """Bytes of physical memory: no single declared tensor may need more."""
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(count) < 1024 or unit == "PiB":
            return f"{count:.1f} {unit}" if unit != "B" else f"{int(count)} B"
        count /= 1024
    return f"{count:.1f} EiB"


# ---------------------------------------------------------------------------- the path


def check_model_path(path: str | os.PathLike) -> Path:
    """Refuse MODEL before opening it: missing, a folder, a FIFO/device/socket (opening would
    block or read forever), a symlink loop, an empty file. Returns the path."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise UserError(f"{path}: a symlink to a missing file") from None
        raise UserError(f"{path}: no such file") from None
    except OSError as exc:  # ELOOP, EACCES, ENAMETOOLONG, ENOTDIR ...
        if exc.errno == errno.ELOOP:
            raise UserError(f"{path}: a symlink loop, not a file") from None
        raise UserError(f"{path}: cannot be read ({exc.strerror or type(exc).__name__})") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{path}: is a folder, expected an .onnx file")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{path}: is a {_kind(info.st_mode)}, expected a regular .onnx file")
    if info.st_size == 0:
        raise UserError(f"{path}: is empty, not an ONNX model")
    if not os.access(path, os.R_OK):
        raise UserError(f"{path}: permission denied")
    return path


def _kind(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device"
    if stat.S_ISSOCK(mode):
        return "socket"
    if stat.S_ISDIR(mode):
        return "folder"
    return "special file"


# ---------------------------------------------------------------------------- tensors


def iter_tensors(proto: onnx.ModelProto) -> Iterator[TensorProto]:
    """Every TensorProto of the model: initializers, Constant attributes, subgraphs included."""
    yield from external_data_helper._get_all_tensors(proto)


def element_count(tensor: TensorProto) -> int:
    return math.prod(int(d) for d in tensor.dims)  # Python ints: no int64 overflow


def tensor_nbytes(tensor: TensorProto) -> int:
    """Bytes of a tensor's values (as stored: 4-bit types packed two to a byte)."""
    if tensor.data_type == TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    return _nbytes(tensor.data_type, element_count(tensor))


def _nbytes(data_type: int, count: int) -> int:
    if data_type in _PACKED_4BIT:
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(data_type).itemsize


def _label(tensor: TensorProto) -> str:
    return repr(tensor.name) if tensor.name else "(unnamed)"


def check_tensor_header(tensor: TensorProto, limit: int | None = None) -> None:
    """Data type known, dims non-negative, declared size under ``limit`` (this machine's
    memory by default): refused with the estimate, before anything is allocated."""
    name = _label(tensor)
    if tensor.data_type not in _KNOWN_TYPES:
        raise UserError(f"tensor {name} has an unknown data type ({tensor.data_type})")
    if any(d < 0 for d in tensor.dims):
        raise UserError(f"tensor {name} has negative dims {list(tensor.dims)}")
    if tensor.data_type == TensorProto.STRING:
        return
    declared = _nbytes(tensor.data_type, element_count(tensor))
    limit = memory_limit() if limit is None else limit
    if declared > limit:
        raise UserError(f"tensor {name} declares dims {list(tensor.dims)}: "
                        f"{human_bytes(declared)}, more than this machine's memory "
                        f"({human_bytes(limit)}); refused before allocating")


def _typed_count(tensor: TensorProto) -> tuple[str, int]:
    """The typed field this tensor's values would live in, and how many entries it needs."""
    count = element_count(tensor)
    field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    if tensor.data_type in (TensorProto.COMPLEX64, TensorProto.COMPLEX128):
        return field, 2 * count
    if tensor.data_type in _PACKED_4BIT:
        return field, (count + 1) // 2
    return field, count


def check_tensor_data(tensor: TensorProto) -> None:
    """An in-memory tensor's stored values match its dims (raw bytes or typed entries)."""
    name = _label(tensor)
    count = element_count(tensor)
    if tensor.data_type == TensorProto.STRING:
        if tensor.HasField("raw_data"):
            raise UserError(f"string tensor {name} stores raw_data (not allowed for strings)")
        if len(tensor.string_data) != count:
            raise UserError(f"tensor {name} has {len(tensor.string_data)} strings for dims "
                            f"{list(tensor.dims)} ({count} elements)")
        return
    expected = _nbytes(tensor.data_type, count)
    if tensor.HasField("raw_data"):
        actual = len(tensor.raw_data)
        if actual != expected:
            raise UserError(f"tensor {name} stores {actual} bytes of raw data, its dims "
                            f"{list(tensor.dims)} need {expected}")
        return
    field, needed = _typed_count(tensor)
    actual = len(getattr(tensor, field))
    if actual != needed and not (needed == 0 and actual == 0):
        raise UserError(f"tensor {name} stores {actual} values in {field}, its dims "
                        f"{list(tensor.dims)} need {needed}")


def external_fields(tensor: TensorProto) -> dict[str, Any]:
    """The external-data fields of ``tensor``, validated: ``location`` (str), ``offset`` and
    ``length`` (non-negative ints; ``length`` None when absent)."""
    name = _label(tensor)
    fields: dict[str, str] = {}
    for entry in tensor.external_data:
        if entry.key not in EXTERNAL_KEYS:
            raise UserError(f"tensor {name}: unknown external-data field {entry.key!r}")
        if entry.key in fields:
            raise UserError(f"tensor {name}: external-data field {entry.key!r} given twice")
        fields[entry.key] = entry.value
    if not fields.get("location"):
        raise UserError(f"tensor {name} is marked external but names no data file")
    parsed: dict[str, Any] = {"location": fields["location"], "offset": 0, "length": None}
    for key in ("offset", "length"):
        if key in fields:
            value = fields[key].strip()
            if not _INTEGER.fullmatch(value):
                raise UserError(f"tensor {name}: external-data {key} {fields[key]!r} is not a "
                                "non-negative integer")
            parsed[key] = int(value)
    return parsed


def resolve_location(tensor: TensorProto, location: str, root: Path,
                     model_file: Path | None = None) -> Path:
    """The data file of ``tensor``: refused unless it is a regular file inside ``root`` (the
    model's folder, resolved; symlinks followed) other than the model file itself."""
    name = _label(tensor)
    if not location or os.path.isabs(location) or Path(location).drive or "\0" in location:
        raise UnsafeModelError(f"tensor {name} stores its data at {location!r}: only paths "
                               "inside the model's folder are allowed")
    try:
        target = (root / location).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise UserError(f"tensor {name}: external data {location!r} is a symlink loop") from None
    if root != target and root not in target.parents:
        raise UnsafeModelError(f"tensor {name} stores its data at {location!r}, outside the "
                               f"model's folder {root}: refused")
    try:
        info = os.stat(target)
    except FileNotFoundError:
        raise UserError(f"external data file {location!r} of tensor {name} is missing") from None
    except OSError as exc:
        raise UserError(f"external data file {location!r} of tensor {name} cannot be read "
                        f"({exc.strerror or type(exc).__name__})") from None
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"external data {location!r} of tensor {name} is a "
                        f"{_kind(info.st_mode)}, not a regular file")
    if model_file is not None and _same_inode(target, model_file):
        raise UserError(f"tensor {name} stores its data in the model file itself "
                        f"({location!r}): refused")
    return target


def check_external(tensor: TensorProto, root: Path, model_file: Path | None = None) -> Path:
    """Fields valid, file safe (:func:`resolve_location`), and the bytes the dims need lie
    inside the file. Returns the data file."""
    name = _label(tensor)
    if tensor.data_type == TensorProto.STRING:
        raise UserError(f"string tensor {name} is stored as external data (not allowed)")
    fields = external_fields(tensor)
    path = resolve_location(tensor, fields["location"], root, model_file)
    needed = tensor_nbytes(tensor)
    length = fields["length"]
    if length is not None and length != needed:
        raise UserError(f"tensor {name}: external data length {length} does not match its dims "
                        f"{list(tensor.dims)} ({needed} bytes)")
    size = os.stat(path).st_size
    end = fields["offset"] + needed
    if end > size:
        raise UserError(f"tensor {name}: external data {fields['location']!r} ends at byte "
                        f"{size}, the tensor needs bytes {fields['offset']}..{end}")
    return path


def external_files(proto: onnx.ModelProto, root: Path) -> list[Path]:
    """Every data file the model reads (resolved), once each; assumes :func:`check_proto`."""
    files: dict[Path, None] = {}
    for tensor in iter_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            location = external_fields(tensor)["location"]
            files[resolve_location(tensor, location, root)] = None
    return list(files)


def _same_inode(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def check_tensors(proto: onnx.ModelProto, root: Path, model_file: Path | None = None) -> None:
    limit = memory_limit()
    for tensor in iter_tensors(proto):
        check_tensor_header(tensor, limit)
        if external_data_helper.uses_external_data(tensor):
            check_external(tensor, root, model_file)
        else:
            check_tensor_data(tensor)


# ---------------------------------------------------------------------------- sparse tensors


def densify_sparse(proto: onnx.ModelProto) -> int:
    """Replace every sparse initializer (and Constant ``sparse_value``) by its dense form, in
    memory; refused when the dense tensor passes ``SPARSE_DENSIFY_BYTES`` or is malformed.
    Returns how many were densified."""
    done = 0
    for graph in _graphs(proto.graph):
        for sparse in list(graph.sparse_initializer):
            graph.initializer.append(_dense(sparse))
            done += 1
        del graph.sparse_initializer[:]
        for node in graph.node:
            for attr in node.attribute:
                if attr.name == "sparse_value" and attr.HasField("sparse_tensor"):
                    dense = _dense(attr.sparse_tensor)
                    attr.Clear()
                    attr.CopyFrom(onnx.helper.make_attribute("value", dense))
                    done += 1
    return done


def _dense(sparse: onnx.SparseTensorProto) -> TensorProto:
    values, indices = sparse.values, sparse.indices
    name = _label(values)
    dims = [int(d) for d in sparse.dims]
    if any(d < 0 for d in dims):
        raise UserError(f"sparse tensor {name} has negative dims {dims}")
    for part in (values, indices):
        if external_data_helper.uses_external_data(part):
            raise UserError(f"sparse tensor {name} keeps its values in external data: "
                            "not supported, store it dense")
        check_tensor_header(part)
        check_tensor_data(part)
    if values.data_type == TensorProto.STRING or values.data_type in _PACKED_4BIT:
        raise UserError(f"sparse tensor {name}: {TensorProto.DataType.Name(values.data_type)} "
                        "values are not supported")
    dense_bytes = _nbytes(values.data_type, math.prod(dims))
    if dense_bytes > SPARSE_DENSIFY_BYTES:
        raise UserError(f"sparse tensor {name} would take {human_bytes(dense_bytes)} dense "
                        f"(limit {human_bytes(SPARSE_DENSIFY_BYTES)}): store it dense")
    nnz = element_count(values)
    if len(values.dims) != 1:
        raise UserError(f"sparse tensor {name}: values must be 1-D, got dims {list(values.dims)}")
    if indices.data_type != TensorProto.INT64:
        raise UserError(f"sparse tensor {name}: indices must be int64")
    index = numpy_helper.to_array(indices)
    size = math.prod(dims)
    if index.ndim == 1 and index.shape[0] == nnz:
        flat = index
    elif index.ndim == 2 and index.shape == (nnz, len(dims)):
        if np.any(index < 0) or np.any(index >= np.asarray(dims, dtype=np.int64)):
            raise UserError(f"sparse tensor {name}: an index lies outside dims {dims}")
        flat = np.ravel_multi_index(tuple(index.T), dims) if nnz else index.reshape(0)
    else:
        raise UserError(f"sparse tensor {name}: indices of shape {list(index.shape)} do not fit "
                        f"{nnz} values of a {len(dims)}-D tensor")
    if nnz and (np.any(flat < 0) or np.any(flat >= size)):
        raise UserError(f"sparse tensor {name}: an index lies outside dims {dims}")
    dense = np.zeros(size, dtype=onnx.helper.tensor_dtype_to_np_dtype(values.data_type))
    dense[flat] = numpy_helper.to_array(values)
    return numpy_helper.from_array(dense.reshape(dims), values.name)


# ---------------------------------------------------------------------------- the graph


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    found = []
    for attr in node.attribute:
        if attr.HasField("g"):
            found.append(attr.g)
        found.extend(attr.graphs)
    return found


def check_graph(graph: onnx.GraphProto, outer: frozenset[str] = frozenset(),
                where: str = "the graph") -> set[str]:
    """Names unique, every read defined, no cycles (an out-of-order graph is sorted in place).
    Returns the outer-scope names the graph reads (its implicit inputs)."""
    inputs = [v.name for v in graph.input]
    _no_duplicates(inputs, f"{where}: graph input")
    initializers = [t.name for t in graph.initializer]
    _no_duplicates(initializers, f"{where}: initializer")
    local = set(inputs) | set(initializers)
    producer: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if not name:
                continue
            if name in producer:
                first = graph.node[producer[name]]
                raise UserError(f"{where}: tensor {name!r} is produced twice (by nodes "
                                f"{_node(first)} and {_node(node)})")
            if name in local:
                raise UserError(f"{where}: node {_node(node)} writes {name!r}, which is already "
                                "a graph input or initializer")
            producer[name] = index
    visible = outer | local | set(producer)
    needs: list[set[int]] = []
    implicit: set[str] = set()
    for node in graph.node:
        reads = [name for name in node.input if name]
        for sub in _subgraphs(node):
            reads.extend(sorted(check_graph(sub, frozenset(visible),
                                            f"{where}: a subgraph of node {_node(node)}")))
        deps = set()
        for name in reads:
            if name in producer:
                deps.add(producer[name])
            elif name not in local:
                if name not in outer:
                    raise UserError(f"{where}: node {_node(node)} reads {name!r}, which nothing "
                                    "defines")
                implicit.add(name)
        needs.append(deps)
    for output in graph.output:
        if output.name not in visible:
            raise UserError(f"{where}: output {output.name!r} is produced by no node")
        if output.name in outer and output.name not in local | set(producer):
            implicit.add(output.name)
    _sort_nodes(graph, needs, where)
    return implicit


def _no_duplicates(names: list[str], what: str) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise UserError(f"{what} {name!r} is declared twice")
        seen.add(name)


def _node(node: onnx.NodeProto) -> str:
    return repr(node.name) if node.name else f"({node.op_type})"


def _sort_nodes(graph: onnx.GraphProto, needs: list[set[int]], where: str) -> None:
    """Kahn's algorithm, keeping the stored order where it is valid: a cycle is refused naming
    its nodes; a graph merely out of order is reordered (onnx requires topological order)."""
    count = len(needs)
    waiting = [len(deps) for deps in needs]
    users: list[list[int]] = [[] for _ in range(count)]
    for index, deps in enumerate(needs):
        for dep in deps:
            users[dep].append(index)
    ready = [i for i in range(count) if waiting[i] == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        index = heapq.heappop(ready)
        order.append(index)
        for user in users[index]:
            waiting[user] -= 1
            if waiting[user] == 0:
                heapq.heappush(ready, user)
    if len(order) < count:
        cycle = _find_cycle(needs, set(range(count)) - set(order))
        names = ", ".join(_node(graph.node[i]) for i in cycle[:6])
        more = f" and {len(cycle) - 6} more" if len(cycle) > 6 else ""
        raise UserError(f"{where} has a cycle through nodes {names}{more}")
    if order != list(range(count)):
        nodes = [onnx.NodeProto() for _ in order]
        for copy, index in zip(nodes, order):
            copy.CopyFrom(graph.node[index])
        del graph.node[:]
        graph.node.extend(nodes)


def _find_cycle(needs: list[set[int]], stuck: set[int]) -> list[int]:
    """One cycle among the nodes Kahn's algorithm could not place (each has a stuck dep)."""
    start = min(stuck)
    seen: dict[int, int] = {}
    path = []
    node = start
    while node not in seen:
        seen[node] = len(path)
        path.append(node)
        node = min(dep for dep in needs[node] if dep in stuck)
    return sorted(path[seen[node]:])


def check_graph_inputs(graph: onnx.GraphProto, limit: int | None = None) -> None:
    """Every graph input onnxcomp must feed is a typed tensor with sane dims."""
    initializers = {t.name for t in graph.initializer}
    limit = memory_limit() if limit is None else limit
    for value in graph.input:
        if value.name in initializers:
            continue
        kind = value.type.WhichOneof("value")
        if kind is None:
            raise UserError(f"input {value.name!r} has no type: onnxcomp cannot feed it")
        if kind != "tensor_type":
            what = kind.replace("_type", "").replace("_", " ")
            raise UserError(f"input {value.name!r} is a {what}: onnxcomp can only feed tensor "
                            "inputs")
        elem = value.type.tensor_type.elem_type
        if elem not in _KNOWN_TYPES:
            raise UserError(f"input {value.name!r} has no or an unknown element type ({elem})")
        if not value.type.tensor_type.HasField("shape"):
            continue
        dims = value.type.tensor_type.shape.dim
        # -1 is paddle2onnx's way to say "dynamic" (ONNX Runtime reads it so): fed like a named
        # dynamic dimension. Other negative sizes mean nothing.
        if any(d.HasField("dim_value") and d.dim_value < -1 for d in dims):
            raise UserError(f"input {value.name!r} has a negative dim")
        if any(d.HasField("dim_value") and d.dim_value == -1 for d in dims):
            continue
        if elem == TensorProto.STRING or not all(d.HasField("dim_value") for d in dims):
            continue
        declared = _nbytes(elem, math.prod(d.dim_value for d in dims))
        if declared > limit:
            raise UserError(f"input {value.name!r} declares shape {[d.dim_value for d in dims]}: "
                            f"{human_bytes(declared)} per batch, more than this machine's memory "
                            f"({human_bytes(limit)})")


# ---------------------------------------------------------------------------- weights


def _weight_names(proto: onnx.ModelProto) -> dict[str, str]:
    """Tensor name -> the node reading it in a weight slot (the layers passes rewrite)."""
    slots: dict[str, str] = {}
    for graph in _graphs(proto.graph):
        for node in graph.node:
            for index in WEIGHT_SLOTS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") \
                    else ():
                if index < len(node.input) and node.input[index]:
                    slots.setdefault(node.input[index], _node(node))
    return slots


def _constant_outputs(proto: onnx.ModelProto) -> dict[int, str]:
    """id(tensor) of each Constant node's value -> the name it produces (the tensor's own name
    is often empty)."""
    names = {}
    for graph in _graphs(proto.graph):
        for node in graph.node:
            if node.op_type == "Constant" and node.output:
                for attr in node.attribute:
                    if attr.name == "value" and attr.HasField("t"):
                        names[id(attr.t)] = node.output[0]
    return names


def nonfinite_values(values: np.ndarray) -> tuple[bool, bool]:
    """(has NaN, has +-Inf), scanned in chunks so no full-size temporary is made."""
    flat = values.reshape(-1)
    nan = inf = False
    step = 1 << 22
    for start in range(0, flat.size, step):
        chunk = np.asarray(flat[start:start + step])
        finite = np.isfinite(chunk)
        if not finite.all():
            bad = chunk[~finite]
            nan = nan or bool(np.isnan(bad).any())
            inf = inf or bool(np.isinf(bad).any())
            if nan and inf:
                break
    return nan, inf


def refuse_nonfinite(name: str, values: np.ndarray, weight: bool = True) -> None:
    """NaN anywhere, or +-Inf in a weight (``weight``): ``UserError`` naming the tensor."""
    if values.dtype.kind != "f":
        return
    nan, inf = nonfinite_values(values)
    if nan:
        raise UserError(f"tensor {name!r} contains NaN: refused (onnxcomp never makes weights "
                        "finite silently; fix the model)")
    if inf and weight:
        raise UserError(f"tensor {name!r} contains +-Inf in a layer weight: refused (onnxcomp "
                        "never makes weights finite silently; fix the model)")


def _float_values(tensor: TensorProto, root: Path | None) -> np.ndarray | None:
    if tensor.data_type == TensorProto.BFLOAT16:
        raw = _raw_bytes(tensor, root)
        if raw is None:
            return None
        bits = np.frombuffer(raw, dtype=np.uint16).astype(np.uint32) << 16
        return bits.view(np.float32)
    dtype = FLOAT_TYPES.get(tensor.data_type)
    if dtype is None:
        return None
    if external_data_helper.uses_external_data(tensor):
        if root is None:
            return None
        fields = external_fields(tensor)
        path = resolve_location(tensor, fields["location"], root)
        count = element_count(tensor)
        if count == 0:
            return np.zeros(0, dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=fields["offset"], shape=(count,))
    if tensor.HasField("raw_data"):
        return np.frombuffer(tensor.raw_data, dtype=dtype)
    if tensor.data_type == TensorProto.FLOAT16:  # stored as uint16 bit patterns in int32_data
        return np.asarray(tensor.int32_data, dtype=np.uint16).view(np.float16)
    field = "double_data" if tensor.data_type == TensorProto.DOUBLE else "float_data"
    return np.asarray(getattr(tensor, field), dtype=dtype)


def _raw_bytes(tensor: TensorProto, root: Path | None) -> bytes | None:
    if external_data_helper.uses_external_data(tensor):
        return None  # bfloat16 on disk: left to the pass that reads it
    if tensor.HasField("raw_data"):
        return tensor.raw_data
    return np.asarray(tensor.int32_data, dtype=np.uint16).tobytes()


def check_weights(proto: onnx.ModelProto, root: Path | None) -> None:
    """NaN/Inf (see the module doc) and zero-element layer weights, refused by name."""
    weights = _weight_names(proto)
    constant_names = _constant_outputs(proto)
    lazy_bytes = sum(tensor_nbytes(t) for t in iter_tensors(proto)
                     if external_data_helper.uses_external_data(t))
    scan_lazy = lazy_bytes <= FINITE_SCAN_LAZY_BYTES
    for tensor in iter_tensors(proto):
        name = tensor.name or constant_names.get(id(tensor), "")
        if name in weights and element_count(tensor) == 0:
            raise UserError(f"weight {name!r} of node {weights[name]} has no elements (dims "
                            f"{list(tensor.dims)}): refused, a layer without weights cannot be "
                            "compressed")
        if external_data_helper.uses_external_data(tensor) and not scan_lazy:
            continue
        values = _float_values(tensor, root)
        if values is not None and values.size:
            refuse_nonfinite(name or "(unnamed)", values, weight=name in weights)


# ---------------------------------------------------------------------------- all of it


def check_proto(proto: onnx.ModelProto, model_file: Path | None = None,
                root: Path | None = None) -> None:
    """Every structural check of the module doc, on a parsed model (external data by file
    headers only, NaN/Inf scan within budget). Densifies sparse initializers and sorts an
    out-of-order graph in place; raises ``UserError`` on anything broken."""
    if root is None and model_file is not None:
        root = Path(model_file).resolve().parent
    if not proto.graph.output:
        raise UserError("the model has no outputs")
    if root is not None:
        check_tensors(proto, root, model_file)
    else:
        for tensor in iter_tensors(proto):
            check_tensor_header(tensor)
            if not external_data_helper.uses_external_data(tensor):
                check_tensor_data(tensor)
    check_opsets(proto)
    densify_sparse(proto)
    check_graph(proto.graph)
    check_graph_inputs(proto.graph)
    try:
        onnx.checker.check_model(skeleton(proto), full_check=False)
    except onnx.checker.ValidationError as exc:
        raise UserError(f"not a valid ONNX model: {first_line(exc)}") from None
    except UnicodeDecodeError:
        # protobuf parses string fields lazily: a corrupt name only fails when it is read
        raise UserError("not a valid ONNX model: a name or string field is not valid UTF-8 "
                        "(the file is corrupt)") from None
    check_weights(proto, root)


def check_opsets(proto: onnx.ModelProto) -> None:
    """The default domain's opset must be one this onnx knows (passes rely on its schemas)."""
    newest = onnx.defs.onnx_opset_version()
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx") and not 1 <= entry.version <= newest:
            raise UserError(f"opset {entry.version} of the default domain is not one onnx "
                            f"{onnx.__version__} knows (1..{newest})")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------- skeleton


def skeleton(proto: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``proto`` without its weights, for onnx's structural check: every tensor
    (graph initializers, Constant attributes, subgraphs included) becomes a one-element
    placeholder of its type. The structural check reads neither values nor dims, but would open
    external data relative to the working directory, and a full copy would hold a large model
    twice."""
    copy = onnx.ModelProto()
    copy_fields(copy, proto, skip=("graph",))
    _skeleton_graph(proto.graph, copy.graph)
    return copy


def _skeleton_graph(graph: onnx.GraphProto, into: onnx.GraphProto) -> None:
    copy_fields(into, graph, skip=("node", "initializer"))
    into.initializer.extend(_placeholder(t) for t in graph.initializer)
    for node in graph.node:
        stub = into.node.add()
        copy_fields(stub, node, skip=("attribute",))
        for attr in node.attribute:
            kept = stub.attribute.add()
            copy_fields(kept, attr, skip=("t", "g", "tensors", "graphs"))
            if attr.HasField("t"):
                kept.t.CopyFrom(_placeholder(attr.t))
            if attr.HasField("g"):
                _skeleton_graph(attr.g, kept.g)
            kept.tensors.extend(_placeholder(t) for t in attr.tensors)
            for sub in attr.graphs:
                _skeleton_graph(sub, kept.graphs.add())


def model_shell(proto: onnx.ModelProto, graph_skip: Collection[str]) -> onnx.ModelProto:
    """A copy of ``proto`` whose graph lacks the fields named in ``graph_skip`` (for callers
    that fill those in themselves, so the weights are never copied whole)."""
    shell = onnx.ModelProto()
    copy_fields(shell, proto, skip=("graph",))
    copy_fields(shell.graph, proto.graph, skip=graph_skip)
    return shell


def copy_fields(target: Any, source: Any, skip: Collection[str] = ()) -> None:
    """Copy every set field of the protobuf message ``source`` into ``target`` but ``skip``."""
    for descriptor, value in source.ListFields():
        if descriptor.name not in skip:
            copy_field(target, descriptor, value)


def copy_field(target: Any, descriptor: Any, value: Any) -> None:
    if descriptor.is_repeated or descriptor.message_type is not None:
        getattr(target, descriptor.name).MergeFrom(value)
    else:
        setattr(target, descriptor.name, value)


def _placeholder(tensor: TensorProto) -> TensorProto:
    stub = TensorProto(name=tensor.name, data_type=tensor.data_type)
    if tensor.data_type == TensorProto.STRING:
        stub.string_data.append(b"")
    elif tensor.data_type in _KNOWN_TYPES:
        stub.raw_data = b"\0" * _nbytes(tensor.data_type, 1)
    return stub
