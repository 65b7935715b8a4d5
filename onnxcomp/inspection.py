"""``onnxcomp inspect``: what a model is made of and what each compression pass would do to it.

What each pass would do is its own plan (the same table ``compress --dry-run`` prints), asked on
the cleaned-up model, without calibration data: quantize int8 and int4, prune and lowrank at
their defaults. lowrank's plan computes an SVD of every weight it could factor (about
K·N·min(K, N) multiply-adds for a K×N weight), so it is asked only of models whose weights are
in memory and whose weight matrices sum to under ``LOWRANK_PLAN_WORK``; the others get a note
saying how to ask (``compress --dry-run --recipe lowrank``). No plan changes the model.

FLOPs are estimated for Conv, ConvTranspose, MatMul and Gemm from shapes inferred by ONNX's shape
inference with concrete input shapes (dynamic dimensions resolved by ``shapes`` or defaults: batch
1, other dynamic axes 16), counting a multiply-add as two FLOPs. Nodes whose shapes cannot be
inferred are counted as unknown, not guessed.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcomp import calibration, passes
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import Model, iter_tensors, load, tensor_nbytes
from onnxcomp.pipeline import SKIP, Context, Pipeline, Step, plan_step
from onnxcomp.recipe import with_cleanup
from onnxcomp.report import markdown_table

# lowrank's plan (an SVD per weight) is asked only of models whose weight matrices sum to at
# most this much K*N*min(K, N): a few seconds here (a 4096x1000 weight, 4.1e9, took 0.5 s on
# this 2-core machine; all-MiniLM-L6-v2 sums to 8.6e9 with its embedding table, CLIP ViT-B/32
# to 8e10, which is not asked).
LOWRANK_PLAN_WORK = 1e10


@dataclass(frozen=True)
class Asked:
    """One plan inspect asks for: the pass, its short-form argument, and whether the plan
    reads every weight in full (then it is skipped for lazy and large models)."""

    pass_name: str
    arg: str | None = None
    reads_all_weights: bool = False

    @property
    def label(self) -> str:
        return f"{self.pass_name}:{self.arg}" if self.arg else self.pass_name


ASKED = (Asked("quantize", "int8"), Asked("quantize", "int4"), Asked("prune"),
         Asked("lowrank", reads_all_weights=True))


def _dims(value_info: onnx.ValueInfoProto) -> list[int | str]:
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in value_info.type.tensor_type.shape.dim]


def _dtype(value_info: onnx.ValueInfoProto) -> str:
    elem = value_info.type.tensor_type.elem_type
    return onnx.helper.tensor_dtype_to_np_dtype(elem).name if elem else "?"


def _all_nodes(graph: onnx.GraphProto, depth: int = 0):
    for node in graph.node:
        yield node, depth
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g, depth + 1)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _all_nodes(sub, depth + 1)


def _tensors_by_dtype(proto: onnx.ModelProto) -> dict[str, dict[str, int]]:
    """Stored tensors by element type: how many, their elements and bytes (a breakdown of the
    file's contents; the parameter count is ``Model.parameter_count``)."""
    by_dtype: dict[str, dict[str, int]] = {}
    for tensor in iter_tensors(proto):
        name = onnx.TensorProto.DataType.Name(tensor.data_type).lower()
        entry = by_dtype.setdefault(name, {"count": 0, "bytes": 0, "tensors": 0})
        entry["count"] += int(np.prod(tensor.dims)) if len(tensor.dims) else 1
        entry["bytes"] += tensor_nbytes(tensor)
        entry["tensors"] += 1
    return by_dtype


def _concrete_shapes(model: Model, shapes: dict[str, list[int]] | None) -> Model:
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model.proto)
    for value_info in calibration.graph_inputs(Model(fixed)):
        shape = (shapes or {}).get(value_info.name) or calibration.input_shape(value_info)
        dims = value_info.type.tensor_type.shape.dim
        if len(dims) != len(shape):
            continue
        for dim, size in zip(dims, shape):
            dim.Clear()
            dim.dim_value = int(size)
    try:
        return Model(onnx.shape_inference.infer_shapes(fixed, data_prop=True), model.source)
    except Exception:  # noqa: BLE001  inference is best effort: unknown shapes are counted
        return Model(fixed, model.source)


def _static_shapes(model: Model) -> dict[str, list[int]]:
    graph = model.graph
    shapes: dict[str, list[int]] = {}
    for vi in [*graph.value_info, *graph.input, *graph.output]:
        dims = _dims(vi)
        if dims and all(isinstance(d, int) and d > 0 for d in dims):
            shapes[vi.name] = dims
    for tensor in graph.initializer:
        shapes[tensor.name] = list(tensor.dims)
    return shapes


def _runtime_shapes(model: Model, names: list[str]) -> dict[str, list[int]]:
    """Shapes that static inference could not give (data-dependent Reshapes): one real run."""
    from onnxcomp import runtime

    # The model's inputs were made concrete by _concrete_shapes, so random data fits them.
    feeds = calibration.random_data(model, 1).make_batch(0)
    try:
        sess = runtime.session(calibration.with_outputs(model, names), optimize=False)
        values = runtime.run(sess, feeds, names)
    except Exception:  # noqa: BLE001  best effort: the nodes stay "FLOPs unknown"
        return {}
    return {name: list(value.shape) for name, value in values.items()}


def _flops(model: Model) -> tuple[int, list[str]]:
    shapes = _static_shapes(model)
    wanted = [name for node in model.graph.node
              if node.op_type in ("Conv", "ConvTranspose", "MatMul", "Gemm")
              for name in (*node.input[:2], node.output[0]) if name and name not in shapes]
    if wanted:
        shapes.update(_runtime_shapes(model, sorted(set(wanted))))
    graph = model.graph
    total, unknown = 0, []
    for node in graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "MatMul", "Gemm"):
            continue
        try:
            if node.op_type in ("Conv", "ConvTranspose"):
                weight = shapes[node.input[1]]
                out = shapes[node.output[0]] if node.op_type == "Conv" else shapes[node.input[0]]
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                kernel = int(np.prod(weight[2:]))
                if node.op_type == "Conv":
                    total += 2 * int(np.prod(out)) * (weight[1]) * kernel
                else:
                    total += 2 * int(np.prod(out)) * (weight[1] * group) * kernel
            elif node.op_type == "MatMul":
                a, b = shapes[node.input[0]], shapes[node.input[1]]
                out = shapes[node.output[0]]
                total += 2 * int(np.prod(out)) * (a[-1] if len(a) else 1) if len(b) else 0
            else:
                a = shapes[node.input[0]]
                trans_a = next((x.i for x in node.attribute if x.name == "transA"), 0)
                out = shapes[node.output[0]]
                k = a[0] if trans_a else a[1]
                total += 2 * int(np.prod(out)) * k
        except (KeyError, IndexError):
            unknown.append(node.name or node.output[0])
    return total, unknown


def _plans(model: Model) -> dict[str, dict[str, Any]]:
    """Each asked pass's plan on ``model`` (already cleaned up): counts, rows and notes, or why
    it was not asked or could not be made."""
    found: dict[str, dict[str, Any]] = {}
    ctx = Context()
    for asked in ASKED:
        entry: dict[str, Any] = {"pass": asked.pass_name, "config": asked.arg}
        found[asked.label] = entry
        not_asked = _why_not(asked, model)
        if not_asked:
            entry["not_planned"] = not_asked
            continue
        spec = passes.get(asked.pass_name)
        try:
            step = Step(spec, spec.config_type.from_short(asked.arg))
            plan = plan_step(step, model, ctx)
        except OnnxcompError as exc:  # one pass's plan must not fail inspect
            entry["not_planned"] = f"{type(exc).__name__}: {_first_line(exc)}"
            continue
        entry.update(to_change=len(plan.actions()), skipped=len(plan.skipped()),
                     rows=plan.to_dict()["rows"], notes=list(plan.notes))
    return found


def _why_not(asked: Asked, model: Model) -> str | None:
    if not asked.reads_all_weights:
        return None
    how = f"run `onnxcomp compress MODEL -o OUT --dry-run --recipe {asked.label}`"
    if model.lazy:
        return f"not planned: its plan reads every weight and this model's are on disk ({how})"
    work = _svd_work(model)
    if work > LOWRANK_PLAN_WORK:
        return (f"not planned: its plan decomposes every weight, about {work:.1e} "
                f"multiply-adds for this model ({how})")
    return None


def _svd_work(model: Model) -> float:
    """Sum of K*N*min(K, N) over the float matrices (and 1x1 conv kernels) stored in the model:
    about what SVDs of all of them cost, from the dims alone."""
    work = 0.0
    for tensor in iter_tensors(model.proto):
        dims = list(tensor.dims)
        if len(dims) == 4 and dims[2:] == [1, 1]:
            dims = dims[:2]
        floating = tensor.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                                        onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE)
        if floating and len(dims) == 2:
            work += float(dims[0]) * dims[1] * min(dims)
    return work


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def inspect_model(model: Model | str | os.PathLike,
                  shapes: dict[str, list[int]] | None = None) -> dict[str, Any]:
    """A dict describing the model; ``format_inspection`` turns it into tables."""
    path = None
    if not isinstance(model, Model):
        path = Path(model)
        model = load(path, load_weights=False)  # weights stay on disk: only shapes are needed
    proto = model.proto
    histogram: Counter = Counter()
    in_subgraphs: Counter = Counter()
    for node, depth in _all_nodes(proto.graph):
        histogram[node.op_type if not node.domain or node.domain == "ai.onnx"
                  else f"{node.domain}.{node.op_type}"] += 1
        if depth:
            in_subgraphs[node.op_type] += 1
    # FLOPs and plans on the graph as passes see it: cleaned up (Constant-node weights lifted,
    # constants folded), as every compress run starts.
    warnings = []
    try:
        cleaned, _ = Pipeline(with_cleanup([])).run(model, Context())
    except OnnxcompError as exc:
        warnings.append(f"cleanup failed ({_first_line(exc)}): FLOPs and plans are on the "
                        "model as stored")
        cleaned = model
    flops, unknown = _flops(_concrete_shapes(cleaned, shapes))
    constant_nodes = histogram.get("Constant", 0)
    if constant_nodes:
        warnings.append(f"{constant_nodes} weights/constants are stored as Constant nodes "
                        "(onnxcomp lifts them to initializers before compressing)")
    if in_subgraphs:
        warnings.append(f"{sum(in_subgraphs.values())} nodes live inside If/Loop/Scan bodies: "
                        "every quantize mode, prune and lowrank act inside them, calibrated on "
                        "the values each body receives (a branch the calibration data never "
                        "takes stays float for static int8); distill re-fits top-level layers "
                        "only")
    if unknown:
        warnings.append(f"FLOPs unknown for {len(unknown)} nodes (shapes not inferable)")
    size = None
    if path is not None:
        size = path.stat().st_size + sum(f.stat().st_size for f in _external_files(model, path))
    return {
        "path": str(path) if path else None,
        "file_bytes": size,
        "ir_version": proto.ir_version,
        "opsets": {entry.domain or "ai.onnx": entry.version for entry in proto.opset_import},
        "producer": f"{proto.producer_name} {proto.producer_version}".strip(),
        "inputs": [{"name": v.name, "shape": _dims(v), "dtype": _dtype(v)}
                   for v in calibration.graph_inputs(model)],
        "outputs": [{"name": v.name, "shape": _dims(v), "dtype": _dtype(v)}
                    for v in proto.graph.output],
        "nodes": sum(histogram.values()),
        "ops": dict(histogram.most_common()),
        "parameters": model.parameter_count(),
        "parameter_bytes": model.weight_bytes(),
        "tensors_by_dtype": _tensors_by_dtype(proto),
        "flops": flops,
        "flops_unknown_nodes": unknown,
        "plans": _plans(cleaned),
        "warnings": warnings,
    }


def _external_files(model: Model, path: Path) -> list[Path]:
    from onnx import external_data_helper

    files = set()
    for tensor in iter_tensors(model.proto):
        if external_data_helper.uses_external_data(tensor):
            location = external_data_helper.ExternalDataInfo(tensor).location
            files.add(path.parent / location)
    return [f for f in files if f.exists()]


def _human(count: float, unit: str = "") -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(count) >= scale:
            return f"{count / scale:.3g} {suffix}{unit}"
    return f"{count:.0f} {unit}".strip()


def format_inspection(info: dict[str, Any]) -> str:
    lines = [
        f"model: {info['path'] or '(in memory)'}",
        f"opsets: {info['opsets']}  ir: {info['ir_version']}  producer: {info['producer']}",
        f"parameters: {info['parameters']:,} ({_human(info['parameter_bytes'], 'B')})"
        + (f"  file: {_human(info['file_bytes'], 'B')}" if info["file_bytes"] else ""),
        f"FLOPs (estimate): {_human(info['flops'])}  nodes: {info['nodes']}",
        "",
        markdown_table(["input", "shape", "dtype"],
                       [[v["name"], v["shape"], v["dtype"]] for v in info["inputs"]]),
        "",
        markdown_table(["output", "shape", "dtype"],
                       [[v["name"], v["shape"], v["dtype"]] for v in info["outputs"]]),
        "",
        markdown_table(["dtype", "tensors", "elements", "bytes"],
                       [[k, v["tensors"], v["count"], v["bytes"]]
                        for k, v in info["tensors_by_dtype"].items()]),
        "",
        markdown_table(["op", "count"], [[k, v] for k, v in info["ops"].items()]),
        "",
        ("What each pass would do (its plan at the defaults, without calibration data; "
         "--json lists every row):"),
        markdown_table(["pass", "to change", "skipped", "most common skip reason"],
                       [[label, entry.get("to_change", "-"), entry.get("skipped", "-"),
                         _top_skip(entry)] for label, entry in info["plans"].items()]),
    ]
    for label, entry in info["plans"].items():
        notes = [entry["not_planned"]] if "not_planned" in entry else entry["notes"]
        lines.extend(f"{label}: {note}" for note in notes)
    lines.extend(f"warning: {w}" for w in info["warnings"])
    return "\n".join(lines)


def _top_skip(entry: dict[str, Any]) -> str:
    reasons = Counter(row["reason"] for row in entry.get("rows", []) if row["action"] == SKIP)
    if not reasons:
        return ""
    reason, count = reasons.most_common(1)[0]
    return f"{reason} ({count}x)" if count > 1 else reason
