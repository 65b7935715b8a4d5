"""The fuzzing kit shared by ``tests/fuzz`` (a fast, derandomized CI budget) and
``benchmarks/fuzz.py`` (a long, seeded, parallel run).

A case is data (:class:`Case`): a base model (a tiny in-memory graph, a random chain of layers,
or a zoo model), a mutation of it, a data source mutation, and a command. :func:`run_case` writes
the (mutated) input into a fresh folder, runs ``onnxcomp.cli.main`` in-process with stdout and
stderr captured (fd 2 too, for what C++ libraries print) under a per-case time limit
(``signal.alarm``), and checks the contract of issue #16:

- exit 0: a compress output exists, passes ``onnx.checker`` and loads in ONNX Runtime, and is
  faithful on random data that fits the input model: every float output's cosine against the
  input model's is at least ``FIDELITY[recipe]`` (cleanup rewrites exactly: 0.9999 leaves room
  for float32 re-association only; int8-dynamic quantizes weights to 8 bits per channel and
  activations per tensor at run time: 0.98, where the unmutated tiny graphs measure >= 0.9995;
  0.9 where the mutation changed weight values, see ``FIDELITY_MUTATED_VALUES``).
  Cases whose input model gives NaN/Inf or all-zero outputs on that data are not scored;
- exit 1 or 2: exactly one error line on stderr (``onnxcomp: error: ...`` or ``onnxcomp: target
  missed ...``), the last one, and nothing written (the output folder stays empty);
- never exit 3, a traceback, a hang (the time limit), a crash (the benchmark's parent sees the
  worker die) or a changed input file (every input file is hashed before and after).

Progress lines printed before a refusal are counted (``late_refusal``: the refusal came after
work started) but are not a violation of the one-error-line rule.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import random
import shutil
import signal
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, external_data_helper, helper, numpy_helper

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the shared builders

import builders

BASES = ("mlp", "conv_net", "attention_block", "gemm_layers", "shared_weights", "if_graph",
         "constant_weights", "dense_chain", "conv_chain", "strided_skip")
ZOO_BASES = ("tiny-clip", "ppocr-det")
MUTATIONS = ("none", "truncate", "bitflip", "dims", "dtype", "name", "attribute", "external",
             "weights", "structure", "opset", "input_sig")
DATA = ("none", "random", "random_bad", "npz_good", "npz_bad_later", "npz_nan", "npz_hostile")
COMMANDS = ("inspect", "cleanup", "int8-dynamic", "int8", "validate", "bench")
FIDELITY = {"cleanup": 0.9999, "int8-dynamic": 0.98}
# Mutations that change weight values: one flipped exponent bit makes a weight an outlier
# 2**k times its channel's others, and per-channel int8 then rounds the rest of that channel
# to zero (measured down to 0.95). Below 0.9 a weight was lost (zeroed, a sparse initializer
# ignored), not rounded.
VALUE_MUTATIONS = ("bitflip", "weights", "truncate", "external")
FIDELITY_MUTATED_VALUES = 0.9
TIME_LIMIT_S = 30


class CaseTimeout(BaseException):
    """Raised by the alarm: a BaseException, so the CLI's ``except Exception`` cannot eat it."""


@dataclass(frozen=True)
class Case:
    base: str
    mutation: str
    data: str
    command: str
    seed: int

    def label(self) -> str:
        return f"{self.base}/{self.mutation}/{self.data}/{self.command}#{self.seed}"


@dataclass
class Outcome:
    case: Case
    outcome: str  # ok | refused | target_missed | violation
    rc: int | None
    kind: str = ""  # the violation
    detail: str = ""
    stderr: str = ""
    late_refusal: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        result = asdict(self)
        result["case"] = asdict(self.case)
        result["label"] = self.case.label()
        return result


def case_from_seed(seed: int, zoo: bool = False) -> Case:
    rng = random.Random(seed)
    bases = BASES + (ZOO_BASES if zoo and rng.random() < 0.05 else ())
    mutation = "none" if rng.random() < 0.15 else rng.choice(MUTATIONS[1:])
    data = rng.choice(DATA) if rng.random() < 0.3 else "none"
    return Case(rng.choice(bases), mutation, data, rng.choice(COMMANDS), seed)


# ---------------------------------------------------------------------------------------------
# base models


strided_skip_net = builders.strided_skip_net


def _random_chain(rng: random.Random, conv: bool):
    kinds = builders.CONV_KINDS if conv else builders.DENSE_KINDS
    layers = []
    for _ in range(rng.randint(1, 5)):
        kind = rng.choice(kinds)
        width = rng.choice((4, 8, 12, 16, 32)) if kind in ("matmul", "gemm", "conv1",
                                                           "conv3") else 0
        layers.append(builders.Layer(kind, width))
    return builders.chain(layers, rng.choice((4, 8, 16)), rng.choice((2, 4, 8)),
                          seed=rng.randint(0, 1000), conv=conv, spatial=rng.choice((4, 6, 8)))


def base_model(name: str, rng: random.Random) -> onnx.ModelProto:
    if name == "dense_chain" or name == "conv_chain":
        return _random_chain(rng, name == "conv_chain").proto
    if name == "strided_skip":
        return strided_skip_net(rng.randint(2, 5), rng.random() < 0.5, rng.randint(0, 99)).proto
    if name in ZOO_BASES:
        from onnxcomp import zoo

        return onnx.load(str(zoo.fetch(name)))
    build = builders.ALL[name]
    return build(seed=rng.randint(0, 1000)).proto if name != "if_graph" else build().proto


# ---------------------------------------------------------------------------------------------
# mutations (each edits the proto, or the files, in place; deterministic from the rng)


def _tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    found = list(proto.graph.initializer)
    for node in proto.graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                found.append(attr.t)
    return found


def _names(proto: onnx.ModelProto) -> list[str]:
    names = {n for node in proto.graph.node for n in (*node.input, *node.output) if n}
    return sorted(names | {t.name for t in proto.graph.initializer})


def _value_infos(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    return [*proto.graph.input, *proto.graph.output]


def _mutate_proto(proto: onnx.ModelProto, mutation: str, rng: random.Random) -> None:
    graph = proto.graph
    tensors = _tensors(proto)
    if mutation == "dims":
        if tensors and rng.random() < 0.6:
            tensor = rng.choice(tensors)
            choice = rng.choice(("drop", "grow", "huge", "zero", "negative", "swap"))
            dims = list(tensor.dims)
            if choice == "drop" and dims:
                dims.pop()
            elif choice == "grow":
                dims.append(rng.randint(1, 4))
            elif choice == "huge":
                dims = [2**40] + dims[1:]
            elif choice == "zero":
                dims = [0] + dims[1:]
            elif choice == "negative":
                dims = [-rng.randint(1, 5)] + dims[1:]
            else:
                dims = dims[::-1]
            del tensor.dims[:]
            tensor.dims.extend(dims)
        else:
            value_info = rng.choice(_value_infos(proto))
            shape = value_info.type.tensor_type.shape
            if shape.dim:
                dim = rng.choice(shape.dim)
                dim.dim_value = rng.choice((0, 1, 3, 7, 2**40, 2**31))
    elif mutation == "dtype":
        code = rng.choice((0, 2, 3, 6, 7, 8, 9, 10, 11, 13, 16, 17, 20, 22))
        if tensors and rng.random() < 0.5:
            rng.choice(tensors).data_type = code
        else:
            rng.choice(_value_infos(proto)).type.tensor_type.elem_type = code
    elif mutation == "name":
        names = _names(proto)
        target = rng.choice(names)
        new = rng.choice(("", rng.choice(names), target + "_renamed", "x", "y"))
        where = rng.choice(("node_in", "node_out", "init", "graph"))
        if where == "init" and graph.initializer:
            rng.choice(graph.initializer).name = new
        elif where == "graph":
            rng.choice(_value_infos(proto)).name = new
        elif graph.node:
            node = rng.choice(graph.node)
            slots = node.input if where == "node_in" else node.output
            if slots:
                slots[rng.randrange(len(slots))] = new
    elif mutation == "attribute":
        nodes = [n for n in graph.node if n.attribute]
        if nodes:
            node = rng.choice(nodes)
            attr = rng.choice(node.attribute)
            choice = rng.choice(("value", "delete", "type", "duplicate"))
            if choice == "delete":
                node.attribute.remove(attr)
            elif choice == "duplicate":
                node.attribute.append(attr)
            elif choice == "type":
                attr.type = rng.choice((0, 1, 2, 3, 4, 6, 7, 13))
            elif attr.ints:
                attr.ints[rng.randrange(len(attr.ints))] = rng.choice((0, -1, 3, 10**6, -(2**40)))
            elif attr.type == onnx.AttributeProto.FLOAT:
                attr.f = rng.choice((float("nan"), float("inf"), -1.0, 0.0, 1e30))
            else:
                attr.i = rng.choice((0, -1, 2, 10**9))
        elif graph.node:
            rng.choice(graph.node).attribute.append(helper.make_attribute("bogus", 3))
    elif mutation == "weights":
        floats = [t for t in graph.initializer if t.data_type == TensorProto.FLOAT]
        if floats:
            tensor = rng.choice(floats)
            values = numpy_helper.to_array(tensor).copy()
            choice = rng.choice(("nan", "inf", "huge", "zero_size", "raw_short", "sparse",
                                 "int_data"))
            if values.ndim == 0:
                choice = "raw_short"
            if choice in ("nan", "inf", "huge") and values.size:
                flat = values.reshape(-1)
                flat[rng.randrange(flat.size)] = {"nan": np.nan, "inf": np.inf,
                                                  "huge": 3e38}[choice]
                tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
            elif choice == "zero_size":
                tensor.CopyFrom(numpy_helper.from_array(
                    np.zeros((0, *values.shape[1:]), np.float32), tensor.name))
            elif choice == "raw_short":
                tensor.raw_data = tensor.raw_data[: len(tensor.raw_data) // 2]
            elif choice == "sparse" and values.ndim == 2:
                flat = values.reshape(-1)
                keep = np.flatnonzero(np.abs(flat) > np.median(np.abs(flat)))
                sparse = helper.make_sparse_tensor(
                    numpy_helper.from_array(flat[keep].astype(np.float32), tensor.name),
                    numpy_helper.from_array(keep.astype(np.int64), ""), list(values.shape))
                graph.initializer.remove(tensor)
                graph.sparse_initializer.append(sparse)
            else:
                tensor.ClearField("raw_data")
                tensor.int32_data.extend([1, 2, 3])
    elif mutation == "structure":
        choice = rng.choice(("drop_node", "dup_node", "cycle", "no_outputs", "reverse",
                             "extra_output", "op_type", "domain"))
        if choice == "drop_node" and graph.node:
            graph.node.remove(rng.choice(graph.node))
        elif choice == "dup_node" and graph.node:
            graph.node.append(rng.choice(graph.node))
        elif choice == "cycle" and len(graph.node) > 1:
            first, last = graph.node[0], graph.node[len(graph.node) - 1]
            if first.input and last.output:
                first.input[0] = last.output[0]
        elif choice == "no_outputs":
            del graph.output[:]
        elif choice == "reverse":
            nodes = list(graph.node)[::-1]
            del graph.node[:]
            graph.node.extend(nodes)
        elif choice == "extra_output":
            graph.output.append(helper.make_tensor_value_info(rng.choice(_names(proto)),
                                                              TensorProto.FLOAT, None))
        elif choice == "op_type" and graph.node:
            rng.choice(graph.node).op_type = rng.choice(("Relu", "MatMul", "Bogus", "Conv", ""))
        elif graph.node:
            rng.choice(graph.node).domain = rng.choice(("com.microsoft", "ai.onnx.ml", "x.y"))
    elif mutation == "opset":
        proto.opset_import[0].version = rng.choice((1, 6, 9, 11, 13, 21, 22, 99, 0))
        if rng.random() < 0.3:
            proto.ir_version = rng.choice((0, 3, 7, 10, 99))
    elif mutation == "input_sig":
        inputs = [v for v in graph.input if v.name not in {t.name for t in graph.initializer}]
        if inputs:
            value_info = rng.choice(inputs)
            choice = rng.choice(("sequence", "untyped", "no_shape", "dynamic_all", "rank"))
            if choice == "sequence":
                value_info.CopyFrom(helper.make_tensor_sequence_value_info(
                    value_info.name, TensorProto.FLOAT, None))
            elif choice == "untyped":
                value_info.ClearField("type")
            elif choice == "no_shape":
                value_info.type.tensor_type.ClearField("shape")
            elif choice == "dynamic_all":
                for i, dim in enumerate(value_info.type.tensor_type.shape.dim):
                    dim.dim_param = f"d{i}"
            else:
                value_info.type.tensor_type.shape.dim.add().dim_value = 1


def _mutate_external(folder: Path, proto: onnx.ModelProto, rng: random.Random) -> None:
    """Save with external data, then edit one entry or the data file."""
    big = [t for t in proto.graph.initializer if t.raw_data or t.float_data]
    for tensor in big:
        if not tensor.raw_data:
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor), tensor.name))
    external_data_helper.convert_model_to_external_data(
        proto, all_tensors_to_one_file=True, location="model.onnx.data", size_threshold=0)
    external_data_helper.write_external_data_tensors(proto, str(folder))
    tensors = [t for t in proto.graph.initializer if external_data_helper.uses_external_data(t)]
    choice = rng.choice(("offset", "length", "location", "truncate_file", "delete_file",
                         "field", "none", "self", "fifo"))
    data_file = folder / "model.onnx.data"
    if tensors and choice in ("offset", "length", "location", "field", "self"):
        tensor = rng.choice(tensors)
        entries = {e.key: e for e in tensor.external_data}
        if choice in ("offset", "length"):
            entry = entries.get(choice) or tensor.external_data.add()
            entry.key = choice
            entry.value = rng.choice(("-8", "abc", "99999999", str(2**62), "1.5", "", "4"))
        elif choice == "location":
            entries["location"].value = rng.choice(("../outside.bin", "/etc/passwd", "missing",
                                                    "", ".", "model.onnx.data/x"))
        elif choice == "self":
            entries["location"].value = "model.onnx"
        else:
            extra = tensor.external_data.add()
            extra.key, extra.value = rng.choice((("checksum", "x"), ("bogus", "1"),
                                                 ("location", "model.onnx.data")))
    elif choice == "truncate_file" and data_file.exists():
        data = data_file.read_bytes()
        data_file.write_bytes(data[: rng.randrange(max(1, len(data)))])
    elif choice == "delete_file" and data_file.exists():
        data_file.unlink()
    elif choice == "fifo" and data_file.exists():
        data_file.unlink()
        os.mkfifo(data_file)


def _bitflip(data: bytes, rng: random.Random) -> bytes:
    buffer = bytearray(data)
    for _ in range(rng.randint(1, 8)):
        i = rng.randrange(len(buffer))
        buffer[i] ^= 1 << rng.randrange(8)
    return bytes(buffer)


def write_input(case: Case, folder: Path) -> Path:
    """The case's (mutated) input model in ``folder``; returns the model path."""
    rng = random.Random(case.seed * 7919 + 17)
    proto = base_model(case.base, rng)
    path = folder / "model.onnx"
    if case.mutation == "external":
        _mutate_external(folder, proto, rng)
        path.write_bytes(proto.SerializeToString())
        return path
    if case.mutation not in ("none", "truncate", "bitflip"):
        _mutate_proto(proto, case.mutation, rng)
    data = proto.SerializeToString()
    if case.mutation == "truncate":
        data = data[: rng.randrange(len(data))]
    elif case.mutation == "bitflip":
        data = _bitflip(data, rng)
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------------------------
# data sources


def _npz_batches(model_path: Path, rng: random.Random) -> list[dict[str, np.ndarray]] | None:
    """Batches that fit the (unmutated) model, from onnxcomp's own random data."""
    from onnxcomp import calibration
    from onnxcomp.errors import OnnxcompError
    from onnxcomp.model import Model

    try:
        model = Model(onnx.load(str(model_path), load_external_data=False))
        data = calibration.random_data(model, 3, seed=rng.randint(0, 99))
        return [data.make_batch(i) for i in range(3)]
    except (OnnxcompError, Exception):  # noqa: BLE001  a broken model: use a made-up batch
        return None


def write_data(case: Case, folder: Path, model_path: Path) -> str | None:
    """The --calib/--data argument for the case (a path under ``folder`` or a spec)."""
    rng = random.Random(case.seed * 104729 + 5)
    if case.data == "none":
        return None
    if case.data == "random":
        return f"random:{rng.randint(1, 4)}"
    if case.data == "random_bad":
        return rng.choice(("random:0", "random:-3", "random:1.5", "random:abc", "random:100000000",
                           "random:", "random:4097", "nonexistent-zoo:3", "tiny-clip:0",
                           "/dev/zero", "/proc/self/mem", str(folder)))
    calib = folder / "calib"
    calib.mkdir()
    if case.data == "npz_hostile":
        choice = rng.choice(("fifo", "loop", "pickle", "huge", "junk", "empty"))
        target = calib / "b0.npz"
        if choice == "fifo":
            os.mkfifo(target)
        elif choice == "loop":
            os.symlink(target, target)
        elif choice == "pickle":
            np.savez(target, x=np.array([None, {"a": 1}], dtype=object))
        elif choice == "huge":
            with zipfile_open(target) as member:
                np.lib.format.write_array_header_1_0(
                    member, {"descr": "<f4", "fortran_order": False, "shape": (2**30, 2**10)})
        elif choice == "junk":
            target.write_bytes(bytes(rng.getrandbits(8) for _ in range(300)))
        return str(calib)
    batches = _npz_batches(model_path, rng) or [{"x": np.zeros((1, 8), np.float32)}] * 3
    for i, batch in enumerate(batches):
        if case.data == "npz_bad_later" and i == 1:
            name = next(iter(batch))
            batch = dict(batch)
            batch[name] = rng.choice((batch[name].astype(np.float64), batch[name][..., :1],
                                      batch[name][None]))
        if case.data == "npz_nan" and i == 1:
            batch = {k: (v.astype(np.float32) * np.nan if v.dtype.kind == "f" else v)
                     for k, v in batch.items()}
        np.savez(calib / f"b{i}.npz", **batch)
    return str(calib)


@contextlib.contextmanager
def zipfile_open(path: Path):
    import zipfile

    with zipfile.ZipFile(path, "w") as archive, archive.open("x.npy", "w") as member:
        yield member


# ---------------------------------------------------------------------------------------------
# running and judging one case


def command_line(case: Case, model: Path, out: Path, data: str | None,
                 rng: random.Random) -> list[str]:
    report = [] if rng.random() < 0.7 else ["--report", str(out / "report.json")]
    if case.command == "inspect":
        return ["inspect", str(model)] + (["--json"] if rng.random() < 0.5 else [])
    if case.command in ("cleanup", "int8-dynamic", "int8"):
        recipe = {"cleanup": "cleanup", "int8-dynamic": "quantize:int8-dynamic",
                  "int8": "quantize:int8"}[case.command]
        argv = ["compress", str(model), "-o", str(out / "out.onnx"), "--recipe", recipe, *report]
        if case.command == "int8":
            argv += ["--calib", data or "random:2"]
        elif data:
            argv += ["--eval", data]
        return argv
    if case.command == "validate":
        argv = ["validate", str(model), str(model), "--count", "2", *report]
        return argv + (["--data", data] if data else [])
    argv = ["bench", str(model), "--runs", "2", "--warmup", "0", "--min-seconds", "0",
            "--no-memory", "--json", *report]
    return argv + (["--data", data] if data else [])


def _hashes(folder: Path) -> dict[str, str]:
    result = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink() or not path.is_file():
            result[str(path)] = "special"
            continue
        result[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
    return result


def _alarm(signum, frame):
    raise CaseTimeout()


@contextlib.contextmanager
def _captured():
    """stdout/stderr captured at the Python level and fd 2 (C++ libraries) into a file."""
    out, err = io.StringIO(), io.StringIO()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as native:
        os.dup2(native.fileno(), 2)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                yield out, err, native
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def run_cli(argv: list[str], time_limit: int = TIME_LIMIT_S) -> tuple[int | None, str, str]:
    """(exit code or None on a time-out, stdout, stderr) of ``onnxcomp.cli.main(argv)``."""
    import traceback

    from onnxcomp import cli

    previous = signal.signal(signal.SIGALRM, _alarm)
    rc: int | None
    with _captured() as (out, err, native):
        signal.alarm(time_limit)
        try:
            rc = cli.main(argv)
        except CaseTimeout:
            rc = None
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 2
        except BaseException:  # noqa: BLE001  an escaped exception is a traceback
            err.write(traceback.format_exc())
            rc = -1
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, previous)
        native.seek(0)
        c_level = native.read().decode(errors="replace")
    return rc, out.getvalue(), err.getvalue() + c_level


def _cosines(reference: Path, candidate: Path) -> list[float] | None:
    """Per float output, the cosine of the candidate against the reference on random data that
    fits the reference; None when the reference cannot be scored (it fails, or its outputs are
    not finite or all zero)."""
    from onnxcomp import calibration, runtime
    from onnxcomp.model import load

    try:
        model = load(reference)
        feeds = calibration.random_data(model, 1, seed=11).make_batch(0)
        ref = runtime.run(runtime.session(model, optimize=False), feeds)
    except Exception:  # noqa: BLE001  the reference itself does not run on random data
        return None
    cand = runtime.run(runtime.session(str(candidate), optimize=False), feeds)
    result = []
    for name, a in ref.items():
        b = cand.get(name)
        if b is None or a.dtype.kind != "f":
            continue
        a, b = a.astype(np.float64).ravel(), np.asarray(b, np.float64).ravel()
        if a.shape != b.shape:
            return [-2.0]
        if not np.isfinite(a).all() or not np.any(a):
            return None
        if not np.isfinite(b).all():
            return [-3.0]
        norm = np.linalg.norm(a) * np.linalg.norm(b)
        result.append(float(a @ b / norm) if norm else 0.0)
    return result


def judge(case: Case, rc: int | None, stderr: str, out: Path, before: dict, after: dict,
          model: Path) -> Outcome:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith(("onnxcomp: error:",
                                                         "onnxcomp: target missed"))]
    written = sorted(p.name for p in out.iterdir()) if out.exists() else []

    def violation(kind: str, detail: str = "") -> Outcome:
        return Outcome(case, "violation", rc, kind, detail, stderr[-2000:])

    if rc is None:
        return violation("hang", f"no exit within {TIME_LIMIT_S} s")
    if "Traceback (most recent call last)" in stderr or rc == -1:
        return violation("traceback", lines[-1] if lines else "")
    if before != after:
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        return violation("input_changed", ", ".join(Path(c).name for c in changed))
    if rc == 3:
        return violation("exit3", errors[-1] if errors else (lines[-1] if lines else ""))
    if rc not in (0, 1, 2):
        return violation("exit_code", f"exit {rc}")
    if rc in (1, 2):
        if len(errors) != 1 or lines[-1] != errors[0]:
            return violation("stderr_lines", f"{len(errors)} error line(s) of {len(lines)}")
        if written and not (rc == 1 and written == ["report.json"]):
            return violation("written_on_error", ", ".join(written))
        outcome = Outcome(case, "refused" if rc == 2 else "target_missed", rc,
                          detail=errors[0][:300], stderr=stderr[-500:])
        outcome.late_refusal = len(lines) > 1
        return outcome
    if case.command in ("cleanup", "int8-dynamic", "int8"):
        target = out / "out.onnx"
        if not target.exists():
            return violation("no_output", ", ".join(written))
        try:
            onnx.checker.check_model(str(target))
            import onnxruntime as ort

            ort.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001
            return violation("invalid_output", f"{type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}")
        bound = FIDELITY.get(case.command)
        if bound is not None and case.mutation in VALUE_MUTATIONS:
            bound = min(bound, FIDELITY_MUTATED_VALUES)
        if bound is not None:
            try:
                cosines = _cosines(model, target)
            except Exception as exc:  # noqa: BLE001  ours runs where the input did not
                return violation("output_fails", f"{type(exc).__name__}: {exc}"[:300])
            if cosines and min(cosines) < bound:
                return violation("unfaithful", f"cosine {min(cosines):.6f} < {bound}")
    elif any(name != "report.json" for name in written):
        return violation("stray_files", ", ".join(written))
    return Outcome(case, "ok", rc)


def run_case(case: Case, workdir: Path, time_limit: int = TIME_LIMIT_S) -> Outcome:
    """Build the case's input in ``workdir`` (emptied first), run it, judge it."""
    if workdir.exists():
        shutil.rmtree(workdir)
    inputs, out = workdir / "in", workdir / "out"
    inputs.mkdir(parents=True)
    out.mkdir()
    try:
        model = write_input(case, inputs)
        data = write_data(case, inputs, model)
    except Exception as exc:  # noqa: BLE001  the mutation itself failed: not a finding
        return Outcome(case, "skipped", None, detail=f"{type(exc).__name__}: {exc}"[:200])
    argv = command_line(case, model, out, data, random.Random(case.seed))
    before = _hashes(inputs)
    rc, _, stderr = run_cli(argv, time_limit)
    after = _hashes(inputs)
    outcome = judge(case, rc, stderr, out, before, after, model)
    outcome.notes.append(" ".join(argv).replace(str(workdir), "$CASE"))
    return outcome


def save_reproducer(outcome: Outcome, workdir: Path, target: Path) -> Path:
    """The case's input folder and argv under ``target`` (for the benchmark's report)."""
    folder = target / f"case-{outcome.case.seed}"
    if folder.exists():
        shutil.rmtree(folder)
    shutil.copytree(workdir / "in", folder / "in", symlinks=True,
                    ignore_dangling_symlinks=True,
                    copy_function=lambda s, d: shutil.copy2(s, d)
                    if Path(s).is_file() else None)
    (folder / "case.json").write_text(json.dumps(outcome.to_dict(), indent=2, default=str))
    return folder
