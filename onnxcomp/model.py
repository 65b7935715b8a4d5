"""Loading and saving ONNX models safely.

- External data: every location is checked before any byte is read; absolute paths and paths that
  climb out of the model's folder (``../``, symlinks pointing out) are refused, since a crafted model
  could otherwise read any file on the machine.
- Saving is atomic: files are written into a temporary folder next to the target and moved into
  place, weights first and the ``.onnx`` last, so an interrupted save never leaves something that
  looks like a finished model. Models whose tensors exceed what one protobuf holds (2 GiB) are
  saved with their weights in one external data file beside the model.
- The input is never written to: every file ``load`` read (the model and each external-data
  file, by device and inode, hard links included) is remembered for the life of the process, and
  ``save`` refuses to write over one of them; ``check_output_paths`` refuses the same before any
  work. Output paths under /proc or /sys, under a regular file, naming a folder or a special
  file, or in a folder that is not writable are refused (``check_output_path``).
- Every model ``load`` reads is checked first (``onnxcomp.checks``: FIFOs and devices refused
  before opening, tensor encodings, external-data fields against their files, the graph's
  names and cycles, NaN/Inf weights); a broken one is a ``UserError``.
- SIGTERM and SIGHUP during a save clean up like SIGINT: the temporary folder is removed, and
  the process then exits with 128 + the signal number.
- Lazy weights (``load(path, load_weights=False)``): tensors in external data stay on disk; a pass
  reads one when it processes that layer (``read_external``: a read-only memory map, so an
  untouched weight costs no memory and can't be changed in place), and ``save`` copies the
  untouched ones into the new data file in chunks. A model larger than memory allows then goes
  through a pass holding only the weights it rewrites.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper, numpy_helper

from onnxcomp import checks
from onnxcomp.checks import iter_tensors, tensor_nbytes
from onnxcomp.errors import UserError

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


def serialized_size(proto: onnx.ModelProto) -> int:
    """``proto.ByteSize()``, exactly, computed a weight at a time: the upb protobuf measures a
    message by encoding it, which for the whole of clip-vit-b32 took 2.7 s and 1.2 GB more
    resident (0.3 s and one tensor at a time here)."""
    if not proto.HasField("graph"):
        return proto.ByteSize()
    below, above, _, _, _, graph_size = _layout(proto)
    return below.ByteSize() + above.ByteSize() + _entry(graph_size)


# GraphProto.initializer is field 5 and ModelProto.graph field 7, both length-delimited.
_INITIALIZER_TAG, _GRAPH_TAG = bytes([5 << 3 | 2]), bytes([7 << 3 | 2])


def write_serialized(proto: onnx.ModelProto, path: Path) -> None:
    """Write ``proto.SerializeToString()`` into ``path``, byte for byte, a weight at a time: the
    fields before the graph, the graph's fields before its initializers, each initializer, then
    the fields after them (protobuf writes fields in field-number order). The whole encoded
    model never sits in memory beside the model (577 MB more for clip-vit-b32)."""
    if not proto.HasField("graph"):
        Path(path).write_bytes(proto.SerializeToString())
        return
    graph = proto.graph
    below, above, graph_below, graph_above, sizes, graph_size = _layout(proto)
    if below.ByteSize() + above.ByteSize() + _entry(graph_size) >= 2**31:
        raise ValueError("the model's protobuf would pass 2 GB: save it with external data")
    with open(path, "wb") as out:
        out.write(below.SerializeToString())
        out.write(_GRAPH_TAG + _varint(graph_size))
        out.write(graph_below.SerializeToString())
        for tensor, size in zip(graph.initializer, sizes):
            out.write(_INITIALIZER_TAG + _varint(size))
            out.write(tensor.SerializeToString())
        out.write(graph_above.SerializeToString())
        out.write(above.SerializeToString())


def _layout(proto: onnx.ModelProto):
    """The model's fields before and after the graph, the graph's before and after its
    initializers, each initializer's encoded size, and the graph's."""
    below, above = _split(proto, 7)
    graph_below, graph_above = _split(proto.graph, 5)
    sizes = [t.ByteSize() for t in proto.graph.initializer]
    graph_size = graph_below.ByteSize() + graph_above.ByteSize() + sum(map(_entry, sizes))
    return below, above, graph_below, graph_above, sizes, graph_size


def _split(message, number: int):
    """Two shells of ``message``: its set fields numbered below ``number``, and above it."""
    below, above = type(message)(), type(message)()
    for descriptor, value in message.ListFields():
        if descriptor.number != number:
            checks.copy_field(below if descriptor.number < number else above, descriptor, value)
    return below, above


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _entry(size: int) -> int:
    """Bytes of a length-delimited field with a one-byte tag holding ``size`` bytes."""
    return 1 + len(_varint(size)) + size


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
    return sum(checks.element_count(t) for t in iter_tensors(proto)
               if t.data_type != onnx.TensorProto.INT64)


_tensor_nbytes = tensor_nbytes  # the old name, still imported by segments.py


def _safe_location(tensor: onnx.TensorProto, location: str, root: Path) -> Path:
    """The data file of ``tensor``, refused unless it is a regular file inside ``root``."""
    return checks.resolve_location(tensor, location, root)


def _check_external_locations(proto: onnx.ModelProto, base_dir: Path) -> None:
    root = base_dir.resolve()
    for tensor in iter_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            checks.check_external(tensor, root)


def load(path: str | os.PathLike, load_weights: bool = True) -> Model:
    """Read an ONNX file, checked first (``onnxcomp.checks``: the path kind before opening,
    then tensors, external data against its files, the graph, NaN/Inf weights); external data
    is read (``load_weights=False``: left on disk and read per tensor when needed, see the
    module doc). Every file read is remembered so that ``save`` never writes over it."""
    path = checks.check_model_path(path)
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001  protobuf raises several unrelated types on garbage
        raise UserError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    if not proto.graph.node and not proto.graph.output:
        raise UserError(f"{path}: not an ONNX model (empty graph)")
    root = path.resolve().parent
    try:
        checks.check_proto(proto, path, root)
    except UserError as exc:
        raise type(exc)(f"{path}: {exc}") from None
    external = weights_on_disk(proto)
    remember_inputs([path, *checks.external_files(proto, root)])
    if load_weights:
        external_data_helper.load_external_data_for_model(proto, str(path.parent))
    return Model(proto, root, external)


def _needs_external_data(proto: onnx.ModelProto) -> bool:
    return tensor_bytes(proto) > PROTOBUF_SAFE_BYTES


def read_external(tensor: onnx.TensorProto, base_dir: Path) -> np.ndarray:
    """A lazy tensor's values as a read-only memory map of its data file (nothing is read until
    used; the map can't write to the file)."""
    path = checks.check_external(tensor, Path(base_dir).resolve())
    info = external_data_helper.ExternalDataInfo(tensor)
    dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type))
    shape = tuple(int(d) for d in tensor.dims)
    count = checks.element_count(tensor)
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
    external data or its tensors pass ~1.8 GB. Refused (``UserError``, before writing): a path
    ``check_output_path`` refuses, or a model file or data file that is one of the files this
    process loaded a model from, or that the model being saved still reads lazily."""
    proto = model.proto if isinstance(model, Model) else model
    source = model.source if isinstance(model, Model) else None
    target = check_output_path(path)
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
    check_output_paths([target] + ([target.parent / data_name] if external_data else []))
    target.parent.mkdir(parents=True, exist_ok=True)
    with terminate_cleanly():
        _save_staged(proto, target, data_name, external_data, source)
    if isinstance(model, Model) and not lazy:
        model.source = target.resolve().parent
    return target


def _save_staged(proto: onnx.ModelProto, target: Path, data_name: str, external_data: bool,
                 source: Path | None) -> None:
    """Write into a temporary folder beside ``target``, then move the data file and the model
    into place; on any exception (SIGINT, or SIGTERM/SIGHUP under ``terminate_cleanly``) the
    folder and a data file already moved are removed."""
    staging = Path(tempfile.mkdtemp(prefix=".onnxcomp-", dir=target.parent))
    moved_data: Path | None = None
    try:
        staged_model = staging / target.name
        if external_data:
            _write_with_external_data(proto, staged_model, data_name, source)
        else:
            write_serialized(proto, staged_model)
        _pause_for_tests(staging)
        # Staged files can come out owner-only; give them the modes a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        for written in (staged_model, staging / data_name):
            if written.exists():
                os.chmod(written, 0o666 & ~umask)
        if (staging / data_name).exists():  # absent when every tensor was under the threshold
            os.replace(staging / data_name, target.parent / data_name)
            moved_data = target.parent / data_name
        os.replace(staged_model, target)
        moved_data = None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if moved_data is not None:  # the model never arrived: its data file alone is no result
            moved_data.unlink(missing_ok=True)


def _pause_for_tests(staging: Path) -> None:
    """ONNXCOMP_TEST_SAVE_PAUSE=FILE: once the staged files are written, create FILE and wait
    (up to 60 s) for it to be removed, so a test can signal the process mid-save."""
    marker = os.environ.get("ONNXCOMP_TEST_SAVE_PAUSE")
    if not marker:
        return
    Path(marker).write_text(str(staging))
    deadline = time.monotonic() + 60
    while Path(marker).exists() and time.monotonic() < deadline:
        time.sleep(0.02)


class Terminated(SystemExit):
    """SIGTERM or SIGHUP arrived while onnxcomp was writing: raised so that cleanup runs, then
    the process exits with 128 + the signal number, as if killed by it."""

    def __init__(self, signum: int):
        super().__init__(128 + signum)
        self.signum = signum


@contextlib.contextmanager
def terminate_cleanly() -> Iterator[None]:
    """SIGTERM and SIGHUP raise ``Terminated`` inside the block (like SIGINT raises
    KeyboardInterrupt), so ``finally`` clauses run; the previous handlers come back after.
    Outside the main thread (where handlers cannot be set) the block runs as is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = [s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGHUP", None))
              if s is not None]
    previous = {}

    def raise_terminated(signum, frame):
        raise Terminated(signum)

    for signum in wanted:
        current = signal.getsignal(signum)
        if current in (signal.SIG_DFL, None) or current is signal.default_int_handler:
            previous[signum] = current
            signal.signal(signum, raise_terminated)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


# ---------------------------------------------------------------------------- never overwrite input

# (st_dev, st_ino) of every file a model was loaded from in this process -> (size, mtime_ns),
# the fingerprint that tells the same unchanged file from a new one reusing a freed inode.
_INPUTS: dict[tuple[int, int], tuple[int, int, str]] = {}


def remember_inputs(paths: Iterable[str | os.PathLike]) -> None:
    """Record ``paths`` as input files: ``save`` and ``check_output_paths`` refuse them."""
    for path in paths:
        try:
            info = os.stat(path)
        except OSError:
            continue
        _INPUTS[(info.st_dev, info.st_ino)] = (info.st_size, info.st_mtime_ns, str(path))


def forget_inputs() -> None:
    """Forget every remembered input file (for long-lived processes that load a file and later
    mean to write over it on purpose, e.g. a test suite)."""
    _INPUTS.clear()


def _input_file(path: Path) -> str | None:
    """The input file ``path`` is (same device and inode, unchanged since loaded), or None."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    known = _INPUTS.get((info.st_dev, info.st_ino))
    if known is None or known[:2] != (info.st_size, info.st_mtime_ns):
        return None
    return known[2]


def files_read(path: str | os.PathLike) -> list[Path]:
    """The model file and every external-data file it reads, resolved (the model is parsed
    without its weights, and checked like ``load``)."""
    path = checks.check_model_path(path)
    try:
        proto = onnx.load_model(str(path), load_external_data=False)
    except Exception as exc:  # noqa: BLE001
        raise UserError(f"{path}: not a readable ONNX model ({type(exc).__name__})") from None
    root = path.resolve().parent
    for tensor in iter_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            checks.check_external(tensor, root, path)
    return [path.resolve(), *checks.external_files(proto, root)]


def check_output_paths(outputs: Iterable[str | os.PathLike | None],
                       reads: Iterable[str | os.PathLike] = ()) -> None:
    """Refuse, before any work, an output that is (by device and inode, hard links included) a
    file the input reads: ``reads`` (e.g. ``files_read(MODEL)``) and every file this process
    loaded a model from. An output model ``X.onnx`` brings its data file ``X.onnx.data``
    along; each output must also pass :func:`check_output_path`."""
    reads = [Path(r) for r in reads]
    remember_inputs(reads)
    for output in outputs:
        if output is None:
            continue
        output = check_output_path(output)
        candidates = [output]
        if output.suffix == ".onnx":
            candidates.append(output.with_name(output.name + ".data"))
        for candidate in candidates:
            known = _input_file(candidate)
            if known is None:
                known = next((str(r) for r in reads if _same_existing(candidate, r)), None)
            if known is not None:
                what = "the output" if candidate == output else "the output's data file"
                raise UserError(f"{candidate}: refusing to write: {what} would overwrite "
                                f"{known}, which the input model reads; choose another name")


def _same_existing(a: Path, b: Path) -> bool:
    try:
        sa, sb = os.stat(a), os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


FORBIDDEN_ROOTS = ("/proc", "/sys", "/dev")
ALLOWED_UNDER_FORBIDDEN = ("/dev/shm",)  # a RAM disk: a fine place for outputs


def check_output_path(path: str | os.PathLike) -> Path:
    """Refuse an output path before any work: under /proc, /sys or /dev, under a regular file
    (``a/b.onnx`` with ``a`` a file), naming a folder or a special file, or in a folder that
    cannot be created or written. Returns the path."""
    target = Path(path)
    if not str(path) or "\0" in str(path):
        raise UserError(f"{str(path)!r}: not a usable output path")
    try:
        resolved = target.resolve()
    except (OSError, RuntimeError):
        raise UserError(f"{target}: the output path is a symlink loop") from None
    allowed = any(Path(root) in resolved.parents for root in ALLOWED_UNDER_FORBIDDEN)
    for root in FORBIDDEN_ROOTS:
        if not allowed and (resolved == Path(root) or Path(root) in resolved.parents):
            raise UserError(f"{target}: refusing to write under {root}")
    try:
        info = os.stat(target)
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise UserError(f"{target}: cannot be written ({exc.strerror or type(exc).__name__})"
                        ) from None
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise UserError(f"{target}: is a folder, expected an output file name")
        if not stat.S_ISREG(info.st_mode):
            raise UserError(f"{target}: exists and is not a regular file; refusing to replace it")
    parent = resolved.parent
    while not parent.exists():
        if parent.is_symlink():
            raise UserError(f"{target}: its folder is a broken symlink")
        parent = parent.parent
    if not parent.is_dir():
        raise UserError(f"{target}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{target}: the folder {parent} is not writable")
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
    """Same device and inode (hard links and symlinks included), or the same resolved path."""
    a, b = Path(a), Path(b)
    if _same_existing(a, b):
        return True
    try:
        return a.resolve() == b.resolve()
    except (OSError, RuntimeError):  # a symlink loop is no file of ours
        return False


def tensor_values(tensor: onnx.TensorProto, source: Path | None) -> np.ndarray:
    """An initializer's values, read from its data file (``source``: the model's folder) when
    it stays on disk."""
    if external_data_helper.uses_external_data(tensor):
        return np.array(read_external(tensor, source))
    return numpy_helper.to_array(tensor)


def tensor_array(tensor: onnx.TensorProto) -> np.ndarray:
    return numpy_helper.to_array(tensor)
