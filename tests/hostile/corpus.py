"""A corpus of hostile and edge-case ONNX inputs, written into a folder (``build(root)``).

Each case is a folder ``root/cases/<name>/`` holding the model (``m.onnx`` unless the case says
otherwise) and whatever files it reads; the model path may also be a special file elsewhere
(``/dev/null``). Families: file kinds (FIFO, folder, symlink loop, device, empty, garbage),
truncations and bit flips of small valid models, tensor encodings (raw/typed data vs dims, dtypes,
huge or negative dims, zero-size weights), external-data fields (offsets, lengths, locations:
outside, itself, folder, FIFO, device, loop), sparse initializers, graph structure (cycles,
duplicate/undefined names, no outputs, out of order), graph inputs (sequence, optional, map,
untyped, huge), NaN/Inf weights, outputs overlapping the input's files (hard links included), and
output paths (/proc, /sys, under a file, a folder, /dev/null).

Run ``python tests/hostile/corpus.py OUT`` to write it and print the case count.
"""

from __future__ import annotations

import json
import os
import random
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))

import builders


@dataclass
class Case:
    name: str
    family: str
    model: str  # path of MODEL (absolute)
    output: str  # path of -o (absolute)
    # "refuse": must exit 1/2; "ok": must exit 0; "any": either, within the contract.
    expect: str = "any"
    fast: bool = False  # in the default (CI) subset


def _save(proto: onnx.ModelProto, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    return path


def _mlp() -> onnx.ModelProto:
    return builders.mlp().proto


def _init(proto: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in proto.graph.initializer if t.name == name)


def _externalize(proto: onnx.ModelProto, folder: Path, data: str = "m.onnx.data",
                 names: tuple[str, ...] = ("w1", "b1", "w2")) -> dict[str, tuple[int, int]]:
    """Move the named initializers to ``folder/data``; returns name -> (offset, length)."""
    spans = {}
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / data, "ab") as out:
        for tensor in proto.graph.initializer:
            if tensor.name not in names:
                continue
            raw = numpy_helper.to_array(tensor).tobytes()
            offset = out.tell()
            out.write(raw)
            spans[tensor.name] = (offset, len(raw))
            _set_external(tensor, [("location", data), ("offset", str(offset)),
                                   ("length", str(len(raw)))])
    return spans


def _set_external(tensor: TensorProto, entries: list[tuple[str, str]]) -> None:
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    for key, value in entries:
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value


class Corpus:
    def __init__(self, root: Path):
        self.root = root
        self.cases: list[Case] = []

    def folder(self, name: str) -> Path:
        path = self.root / "cases" / name
        path.mkdir(parents=True, exist_ok=True)
        return path

    def add(self, name: str, family: str, model: Path | str, expect: str = "any",
            output: Path | str | None = None, fast: bool = False) -> None:
        out = output if output is not None else self.root / "outs" / name / "out.onnx"
        self.cases.append(Case(name, family, str(model), str(out), expect, fast))

    def proto_case(self, name: str, family: str, edit: Callable[[onnx.ModelProto], object],
                   expect: str = "refuse", base: Callable[[], onnx.ModelProto] = _mlp,
                   fast: bool = False) -> None:
        proto = base()
        edit(proto)
        self.add(name, family, _save(proto, self.folder(name) / "m.onnx"), expect, fast=fast)


def build(root: Path) -> list[Case]:
    """Write every case under ``root``; returns them (also written to ``root/cases.json``)."""
    corpus = Corpus(Path(root))
    _valid(corpus)
    _file_kinds(corpus)
    _truncations_and_flips(corpus)
    _encodings(corpus)
    _external(corpus)
    _sparse(corpus)
    _graphs(corpus)
    _inputs(corpus)
    _numerics(corpus)
    _overlaps(corpus)
    _output_paths(corpus)
    (corpus.root / "cases.json").write_text(json.dumps([asdict(c) for c in corpus.cases],
                                                       indent=1))
    return corpus.cases


# ---------------------------------------------------------------------------- families


def _valid(c: Corpus) -> None:
    for name, make in (("mlp", _mlp), ("conv", lambda: builders.conv_net().proto),
                       ("attention", lambda: builders.attention_block().proto),
                       ("if", lambda: builders.if_graph().proto),
                       ("constants", lambda: builders.constant_weights().proto)):
        c.proto_case(f"valid-{name}", "valid", lambda p: None, "ok", make, fast=True)
    proto = _mlp()
    folder = c.folder("valid-external")
    _externalize(proto, folder)
    c.add("valid-external", "valid", _save(proto, folder / "m.onnx"), "ok", fast=True)

    def shuffle(p):  # out of order but acyclic: sorted in memory
        nodes = list(p.graph.node)[::-1]
        del p.graph.node[:]
        p.graph.node.extend(nodes)
    c.proto_case("valid-out-of-order", "graph", shuffle, "ok", fast=True)

    def inf_mask(p):  # -inf in a non-weight constant (an attention mask) is kept
        p.graph.initializer.append(numpy_helper.from_array(
            np.array([0, -np.inf] * 8, np.float32), "mask"))
        add = next(n for n in p.graph.node if n.op_type == "Add")
        mid = helper.make_node("Add", [add.output[0], "mask"], ["masked"], name="mask_add")
        relu = next(n for n in p.graph.node if n.op_type == "Relu")
        relu.input[0] = "masked"
        p.graph.node.insert(list(p.graph.node).index(add) + 1, mid)
    c.proto_case("valid-inf-mask", "numerics", inf_mask, "ok")

    def empty_roi(p):  # a zero-element tensor outside a weight slot is fine
        p.graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), "empty"))
        p.graph.initializer.append(numpy_helper.from_array(np.zeros(0, np.float32), "empty2"))
        node = helper.make_node("Concat", ["empty", "empty2"], ["cat"], axis=0, name="cat")
        p.graph.node.append(node)
        p.graph.output.append(helper.make_tensor_value_info("cat", TensorProto.FLOAT, [0]))
    c.proto_case("valid-zero-size-constant", "encodings", empty_roi, "ok")

    def typed(p):  # float_data instead of raw_data
        for t in p.graph.initializer:
            values = numpy_helper.to_array(t).reshape(-1)
            t.ClearField("raw_data")
            t.float_data.extend(values.tolist())
    c.proto_case("valid-typed-data", "encodings", typed, "ok")


def _file_kinds(c: Corpus) -> None:
    folder = c.folder("kind-fifo")
    os.mkfifo(folder / "m.onnx")
    c.add("kind-fifo", "file-kind", folder / "m.onnx", "refuse", fast=True)
    folder = c.folder("kind-folder")
    (folder / "m.onnx").mkdir()
    c.add("kind-folder", "file-kind", folder / "m.onnx", "refuse")
    folder = c.folder("kind-symlink-loop")
    (folder / "m.onnx").symlink_to(folder / "m.onnx")
    c.add("kind-symlink-loop", "file-kind", folder / "m.onnx", "refuse", fast=True)
    folder = c.folder("kind-symlink-pair")
    (folder / "a.onnx").symlink_to(folder / "m.onnx")
    (folder / "m.onnx").symlink_to(folder / "a.onnx")
    c.add("kind-symlink-pair", "file-kind", folder / "m.onnx", "refuse")
    folder = c.folder("kind-dangling")
    (folder / "m.onnx").symlink_to(folder / "missing.onnx")
    c.add("kind-dangling", "file-kind", folder / "m.onnx", "refuse")
    folder = c.folder("kind-to-dev-zero")
    (folder / "m.onnx").symlink_to("/dev/zero")
    c.add("kind-to-dev-zero", "file-kind", folder / "m.onnx", "refuse", fast=True)
    c.add("kind-dev-null", "file-kind", "/dev/null", "refuse")
    c.add("kind-missing", "file-kind", c.folder("kind-missing") / "m.onnx", "refuse")
    for name, data in (("empty", b""), ("garbage", b"not protobuf \xff\xfe" * 40),
                       ("zeros", b"\0" * 4096), ("text", b"ir_version: 8\n"),
                       ("ff", b"\xff" * 100)):
        folder = c.folder(f"kind-{name}")
        (folder / "m.onnx").write_bytes(data)
        c.add(f"kind-{name}", "file-kind", folder / "m.onnx", "refuse")


def _truncations_and_flips(c: Corpus) -> None:
    rng = random.Random(1234)
    bases = {"mlp": _mlp().SerializeToString(),
             "conv": builders.conv_net().proto.SerializeToString()}
    for base, data in bases.items():
        cuts = sorted({int(len(data) * k / 31) for k in range(1, 31)})
        for i, cut in enumerate(cuts):
            folder = c.folder(f"trunc-{base}-{cut}")
            (folder / "m.onnx").write_bytes(data[:cut])
            c.add(f"trunc-{base}-{cut}", "truncation", folder / "m.onnx", fast=i % 10 == 3)
        for i in range(30):
            flipped = bytearray(data)
            for _ in range(1 if i < 20 else 4):
                pos = rng.randrange(len(flipped))
                flipped[pos] ^= 1 << rng.randrange(8)
            folder = c.folder(f"flip-{base}-{i}")
            (folder / "m.onnx").write_bytes(bytes(flipped))
            c.add(f"flip-{base}-{i}", "bit-flip", folder / "m.onnx", fast=i % 10 == 5)
    # The data file of a valid external-data model, truncated.
    for cut in (0, 1, 100, 500, 575):
        proto = _mlp()
        folder = c.folder(f"trunc-data-{cut}")
        _externalize(proto, folder)
        data = (folder / "m.onnx.data").read_bytes()
        (folder / "m.onnx.data").write_bytes(data[:cut])
        c.add(f"trunc-data-{cut}", "truncation", _save(proto, folder / "m.onnx"), "refuse",
              fast=cut == 100)


def _encodings(c: Corpus) -> None:
    def raw(name, data):
        return lambda p: setattr(_init(p, "w1"), "raw_data", data)
    c.proto_case("raw-short", "encodings", raw("w1", b"\0" * 100), fast=True)
    c.proto_case("raw-long", "encodings", raw("w1", b"\0" * 1000))
    c.proto_case("raw-empty", "encodings", raw("w1", b""))

    def dims(values):
        def edit(p):
            t = _init(p, "w1")
            del t.dims[:]
            t.dims.extend(values)
        return edit
    for label, values in (("2e40", [1 << 40]), ("2e40x2", [1 << 20, 1 << 20]),
                          ("huge-product", [1 << 31] * 4), ("negative", [-8, 16]),
                          ("zero", [0, 16]), ("3d", [1, 8, 16]), ("scalar", [])):
        c.proto_case(f"dims-{label}", "encodings", dims(values),
                     expect="any" if label == "3d" else "refuse", fast=label in ("2e40", "zero"))

    def huge_no_data(p):
        t = _init(p, "w1")
        t.ClearField("raw_data")
        del t.dims[:]
        t.dims.extend([1 << 40, 16])
    c.proto_case("dims-huge-no-data", "encodings", huge_no_data)

    def dtype(value):
        return lambda p: setattr(_init(p, "w1"), "data_type", value)
    for label, value in (("unknown", 99), ("undefined", 0), ("int64", TensorProto.INT64),
                         ("string", TensorProto.STRING), ("double", TensorProto.DOUBLE),
                         ("float16", TensorProto.FLOAT16), ("bool", TensorProto.BOOL)):
        c.proto_case(f"dtype-{label}", "encodings", dtype(value), fast=label == "unknown")

    def typed_wrong(p):
        t = _init(p, "w1")
        t.ClearField("raw_data")
        t.float_data.extend([1.0] * 7)
    c.proto_case("typed-count", "encodings", typed_wrong)

    def zero_weight(p):
        w = _init(p, "w1")
        w.CopyFrom(numpy_helper.from_array(np.zeros((8, 0), np.float32), "w1"))
        b = _init(p, "b1")
        b.CopyFrom(numpy_helper.from_array(np.zeros((0,), np.float32), "b1"))
        w2 = _init(p, "w2")
        w2.CopyFrom(numpy_helper.from_array(np.zeros((0, 4), np.float32), "w2"))
    c.proto_case("zero-size-weights", "encodings", zero_weight, fast=True)


def _external(c: Corpus) -> None:
    def case(name, entries, extra: Callable[[Path], None] | None = None, fast=False,
             tensor="w1", expect="refuse"):
        proto = _mlp()
        folder = c.folder(name)
        spans = _externalize(proto, folder)
        offset, length = spans[tensor]
        fields = [(k, v.format(offset=offset, length=length)) for k, v in entries]
        _set_external(_init(proto, tensor), fields)
        if extra:
            extra(folder)
        c.add(name, "external-data", _save(proto, folder / "m.onnx"), expect, fast=fast)

    loc = ("location", "m.onnx.data")
    good_off, good_len = ("offset", "{offset}"), ("length", "{length}")
    case("ext-valid-no-length", [loc, good_off], expect="ok")
    case("ext-offset-negative", [loc, ("offset", "-4"), good_len], fast=True)
    case("ext-offset-text", [loc, ("offset", "abc"), good_len], fast=True)
    case("ext-offset-float", [loc, ("offset", "0.5"), good_len])
    case("ext-offset-huge", [loc, ("offset", "99999999999999999999999"), good_len])
    case("ext-offset-past-end", [loc, ("offset", "100000"), good_len], fast=True)
    case("ext-length-negative", [loc, good_off, ("length", "-512")])
    case("ext-length-text", [loc, good_off, ("length", "x")])
    case("ext-length-past-end", [loc, ("offset", "{offset}"), ("length", "100000")])
    case("ext-length-mismatch", [loc, good_off, ("length", "8")])
    case("ext-offset-plus-length-past-end", [loc, ("offset", "500"), good_len])
    case("ext-no-location", [good_off, good_len])
    case("ext-empty-location", [("location", ""), good_off, good_len])
    case("ext-unknown-key", [loc, good_off, good_len, ("__class__", "x")], fast=True)
    case("ext-repeated-key", [loc, loc, good_off, good_len])
    case("ext-absolute", [("location", "/etc/passwd"), good_off, good_len], fast=True)
    case("ext-climbs-out", [("location", "../../secret.bin"), good_off, good_len])
    case("ext-is-model", [("location", "m.onnx"), ("offset", "0"), ("length", "512")],
         fast=True)
    case("ext-missing-file", [("location", "nope.data"), good_off, good_len])
    case("ext-folder", [("location", "sub"), good_off, good_len],
         extra=lambda f: (f / "sub").mkdir())
    case("ext-fifo", [("location", "pipe"), good_off, good_len],
         extra=lambda f: os.mkfifo(f / "pipe"), fast=True)
    case("ext-dev-zero", [("location", "zero"), good_off, good_len],
         extra=lambda f: (f / "zero").symlink_to("/dev/zero"))
    case("ext-symlink-loop", [("location", "loop"), good_off, good_len],
         extra=lambda f: (f / "loop").symlink_to(f / "loop"))
    case("ext-symlink-out", [("location", "link"), good_off, good_len],
         extra=lambda f: (f / "link").symlink_to("/etc/hostname"))
    case("ext-nul-location", [("location", "m.onnx.data\0x"), good_off, good_len])

    def marked_but_empty(p):
        t = _init(p, "w1")
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
    c.proto_case("ext-marked-no-fields", "external-data", marked_but_empty)


def _sparse(c: Corpus) -> None:
    def sparse(values, indices, dims=(8, 16), values_dims=None, indices_dims=None):
        def edit(p):
            w1 = _init(p, "w1")
            p.graph.initializer.remove(w1)
            v = numpy_helper.from_array(np.asarray(values, np.float32), "w1")
            if values_dims is not None:
                del v.dims[:]
                v.dims.extend(values_dims)
            i = numpy_helper.from_array(np.asarray(indices, np.int64), "w1_idx")
            if indices_dims is not None:
                del i.dims[:]
                i.dims.extend(indices_dims)
            p.graph.sparse_initializer.append(helper.make_sparse_tensor(v, i, list(dims)))
        return edit
    rng = np.random.default_rng(0)
    flat = np.sort(rng.choice(128, 20, replace=False))
    c.proto_case("sparse-valid", "sparse", sparse(rng.standard_normal(20), flat), "ok",
                 fast=True)
    coords = np.stack(np.unravel_index(flat, (8, 16)), axis=1)
    c.proto_case("sparse-valid-coords", "sparse", sparse(rng.standard_normal(20), coords), "ok")
    c.proto_case("sparse-index-out-of-range", "sparse", sparse([1.0, 2.0], [3, 500]), fast=True)
    c.proto_case("sparse-index-negative", "sparse", sparse([1.0, 2.0], [-1, 5]))
    c.proto_case("sparse-count-mismatch", "sparse", sparse([1.0, 2.0, 3.0], [1, 2]))
    c.proto_case("sparse-huge-dense", "sparse", sparse([1.0], [0], dims=(1 << 20, 1 << 20)))
    c.proto_case("sparse-negative-dims", "sparse", sparse([1.0], [0], dims=(-8, 16)))
    c.proto_case("sparse-2d-values", "sparse", sparse([1.0, 2.0], [0, 1], values_dims=[1, 2]))


def _graphs(c: Corpus) -> None:
    def node(p, name):
        return next(n for n in p.graph.node if n.name == name)

    def cycle(p):
        node(p, "fc1").input[0] = "h3"  # fc1 reads what noop writes, downstream of fc1
    c.proto_case("graph-cycle", "graph", cycle, fast=True)
    c.proto_case("graph-self-loop", "graph", lambda p: node(p, "relu").input.__setitem__(0, "h2"))
    c.proto_case("graph-undefined", "graph",
                 lambda p: node(p, "relu").input.__setitem__(0, "nowhere"), fast=True)
    c.proto_case("graph-produced-twice", "graph",
                 lambda p: node(p, "noop").output.__setitem__(0, "h2"), fast=True)
    c.proto_case("graph-writes-input", "graph",
                 lambda p: node(p, "noop").output.__setitem__(0, "x"))
    c.proto_case("graph-writes-initializer", "graph",
                 lambda p: node(p, "noop").output.__setitem__(0, "w2"))
    c.proto_case("graph-duplicate-input", "graph",
                 lambda p: p.graph.input.append(p.graph.input[0]))
    c.proto_case("graph-duplicate-initializer", "graph",
                 lambda p: p.graph.initializer.append(_init(p, "b1")))
    c.proto_case("graph-output-undefined", "graph",
                 lambda p: setattr(p.graph.output[0], "name", "ghost"))
    c.proto_case("graph-no-outputs", "graph", lambda p: p.graph.ClearField("output"), fast=True)
    c.proto_case("graph-no-nodes", "graph", lambda p: p.graph.ClearField("node"))
    c.proto_case("graph-unknown-op", "graph",
                 lambda p: setattr(node(p, "relu"), "op_type", "NoSuchOp"))
    c.proto_case("graph-bad-attribute", "graph",
                 lambda p: node(p, "relu").attribute.append(helper.make_attribute("alpha", 1.0)))
    c.proto_case("graph-opset-999", "graph",
                 lambda p: setattr(p.opset_import[0], "version", 999))
    c.proto_case("graph-ir-99", "graph", lambda p: setattr(p, "ir_version", 99))
    c.proto_case("graph-no-opset", "graph", lambda p: p.ClearField("opset_import"))

    def if_undefined(p):
        for n in p.graph.node:
            for attr in n.attribute:
                if attr.HasField("g") and attr.g.node:
                    attr.g.node[0].input[0] = "nowhere"
                    return
    c.proto_case("graph-subgraph-undefined", "graph", if_undefined,
                 base=lambda: builders.if_graph().proto)

    def chain_cycle(p):  # a longer cycle: fc2 feeds fc1
        node(p, "fc1").input[0] = "y"
    c.proto_case("graph-long-cycle", "graph", chain_cycle)


def _inputs(c: Corpus) -> None:
    def retype(kind):
        def edit(p):
            x = p.graph.input[0]
            if kind == "sequence":
                x.type.CopyFrom(helper.make_sequence_type_proto(
                    helper.make_tensor_type_proto(TensorProto.FLOAT, [3, 8])))
            elif kind == "optional":
                x.type.CopyFrom(helper.make_optional_type_proto(
                    helper.make_tensor_type_proto(TensorProto.FLOAT, [3, 8])))
            elif kind == "map":
                x.type.CopyFrom(helper.make_map_type_proto(
                    TensorProto.INT64, helper.make_tensor_type_proto(TensorProto.FLOAT, [8])))
            elif kind == "untyped":
                x.ClearField("type")
            elif kind == "no-elem":
                x.type.tensor_type.elem_type = 0
            elif kind == "elem-99":
                x.type.tensor_type.elem_type = 99
            elif kind == "huge":
                for d, v in zip(x.type.tensor_type.shape.dim, (1 << 30, 1 << 30)):
                    d.dim_value = v
            elif kind == "negative":
                x.type.tensor_type.shape.dim[1].dim_value = -8
        return edit
    for kind in ("sequence", "optional", "map", "untyped", "no-elem", "elem-99", "huge",
                 "negative"):
        c.proto_case(f"input-{kind}", "inputs", retype(kind),
                     fast=kind in ("sequence", "untyped", "huge"))


def _numerics(c: Corpus) -> None:
    def poison(name, value, index=3):
        def edit(p):
            t = _init(p, name)
            values = numpy_helper.to_array(t).copy()
            values.reshape(-1)[index] = value
            t.CopyFrom(numpy_helper.from_array(values, name))
        return edit
    c.proto_case("nan-weight", "numerics", poison("w1", np.nan), fast=True)
    c.proto_case("inf-weight", "numerics", poison("w1", np.inf), fast=True)
    c.proto_case("neg-inf-weight", "numerics", poison("w2", -np.inf))
    c.proto_case("nan-bias", "numerics", poison("b1", np.nan))

    def nan_typed(p):
        t = _init(p, "w2")
        values = numpy_helper.to_array(t).reshape(-1).tolist()
        values[0] = float("nan")
        t.ClearField("raw_data")
        t.float_data.extend(values)
    c.proto_case("nan-typed", "numerics", nan_typed)

    def nan_fp16(p):
        for name in ("w1", "b1", "w2"):
            t = _init(p, name)
            values = numpy_helper.to_array(t).astype(np.float16)
            if name == "w1":
                values[0, 0] = np.nan
            t.CopyFrom(numpy_helper.from_array(values, name))
        for v in list(p.graph.input) + list(p.graph.output):
            v.type.tensor_type.elem_type = TensorProto.FLOAT16
    c.proto_case("nan-fp16", "numerics", nan_fp16)

    def nan_constant_node(p):
        proto = builders.mlp(weights_as_constant_nodes=True).proto
        node = next(n for n in proto.graph.node if n.op_type == "Constant")
        values = numpy_helper.to_array(node.attribute[0].t).copy()
        values.reshape(-1)[0] = np.nan
        node.attribute[0].t.CopyFrom(numpy_helper.from_array(values))
        p.CopyFrom(proto)
    c.proto_case("nan-constant-node", "numerics", nan_constant_node)

    proto = _mlp()
    folder = c.folder("nan-external")
    poison("w1", np.nan)(proto)
    _externalize(proto, folder)
    c.add("nan-external", "numerics", _save(proto, folder / "m.onnx"), "refuse")


def _overlaps(c: Corpus) -> None:
    # The input keeps its weights in a file named like the output model.
    proto = _mlp()
    folder = c.folder("overlap-data-named-like-output")
    _externalize(proto, folder, data="w.onnx")
    c.add("overlap-data-named-like-output", "overlap", _save(proto, folder / "m.onnx"),
          "refuse", output=folder / "w.onnx", fast=True)
    # -o b.onnx where the input reads b.onnx.data.
    proto = _mlp()
    folder = c.folder("overlap-output-data-file")
    _externalize(proto, folder, data="b.onnx.data")
    c.add("overlap-output-data-file", "overlap", _save(proto, folder / "m.onnx"), "refuse",
          output=folder / "b.onnx", fast=True)
    # The output is a hard link of the input model / of its data file.
    proto = _mlp()
    folder = c.folder("overlap-hardlink-model")
    model = _save(proto, folder / "m.onnx")
    os.link(model, folder / "h.onnx")
    c.add("overlap-hardlink-model", "overlap", model, "refuse", output=folder / "h.onnx")
    proto = _mlp()
    folder = c.folder("overlap-hardlink-data")
    _externalize(proto, folder)
    os.link(folder / "m.onnx.data", folder / "h.onnx.data")
    c.add("overlap-hardlink-data", "overlap", _save(proto, folder / "m.onnx"), "refuse",
          output=folder / "h.onnx", fast=True)
    proto = _mlp()
    folder = c.folder("overlap-same-path")
    model = _save(proto, folder / "m.onnx")
    c.add("overlap-same-path", "overlap", model, "refuse", output=model)
    proto = _mlp()
    folder = c.folder("overlap-symlink-to-input")
    model = _save(proto, folder / "m.onnx")
    (folder / "s.onnx").symlink_to(model)
    c.add("overlap-symlink-to-input", "overlap", model, "refuse", output=folder / "s.onnx")


def _output_paths(c: Corpus) -> None:
    def case(name, output, fast=False, prepare: Callable[[Path], None] | None = None):
        folder = c.folder(name)
        model = _save(_mlp(), folder / "m.onnx")
        if prepare:
            prepare(folder)
        c.add(name, "output-path", model, "refuse", output=output(folder), fast=fast)
    case("out-proc", lambda f: Path("/proc/self/out.onnx"), fast=True)
    case("out-sys", lambda f: Path("/sys/out.onnx"))
    case("out-dev-null", lambda f: Path("/dev/null"))
    case("out-under-file", lambda f: f / "afile" / "out.onnx", fast=True,
         prepare=lambda f: (f / "afile").write_text("x"))
    case("out-existing-folder", lambda f: f / "dir.onnx",
         prepare=lambda f: (f / "dir.onnx").mkdir())
    case("out-fifo", lambda f: f / "pipe.onnx", prepare=lambda f: os.mkfifo(f / "pipe.onnx"))
    case("out-loop", lambda f: f / "loop.onnx",
         prepare=lambda f: (f / "loop.onnx").symlink_to(f / "loop.onnx"))


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "hostile-corpus")
    cases = build(target)
    print(f"{len(cases)} cases written to {target}")
