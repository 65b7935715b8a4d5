"""``onnxcomp inspect``: what a model is made of and what each compression pass could act on.

FLOPs are estimated for Conv, ConvTranspose, MatMul and Gemm from shapes inferred by ONNX's shape
inference with concrete input shapes (dynamic dimensions resolved by ``shapes`` or defaults: batch
1, other dynamic axes 16), counting a multiply-add as two FLOPs. Nodes whose shapes cannot be
inferred are counted as unknown, not guessed.
"""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcomp import calibration
from onnxcomp.graph import export_model, import_graph, lift_constant_nodes, tidy
from onnxcomp.model import Model, iter_tensors, load
from onnxcomp.report import markdown_table

WEIGHT_OPS = ("Conv", "MatMul", "Gemm")


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


def _parameters(proto: onnx.ModelProto) -> dict[str, dict[str, int]]:
    by_dtype: dict[str, dict[str, int]] = {}
    for tensor in iter_tensors(proto):
        name = onnx.TensorProto.DataType.Name(tensor.data_type).lower()
        count = int(np.prod(tensor.dims)) if len(tensor.dims) else 1
        entry = by_dtype.setdefault(name, {"count": 0, "bytes": 0, "tensors": 0})
        entry["count"] += count
        entry["bytes"] += onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize * count \
            if tensor.data_type != onnx.TensorProto.STRING else 0
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
    except Exception:
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
    except Exception:
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


def _candidates(model: Model) -> dict[str, Any]:
    constants = {t.name for t in model.graph.initializer}
    with_weight = [n for n in model.graph.node
                   if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in constants]
    matmuls = [n for n in with_weight if n.op_type in ("MatMul", "Gemm")]
    convs_1x1 = []
    dims = {t.name: list(t.dims) for t in model.graph.initializer}
    for node in with_weight:
        if node.op_type == "Conv" and dims.get(node.input[1], [0, 0, 0, 0])[2:] == [1, 1]:
            convs_1x1.append(node)
    found: dict[str, Any] = {
        "quantize": {"int8": len(with_weight), "int8-dynamic": len(matmuls), "int4": len(matmuls),
                     "ops": dict(Counter(n.op_type for n in with_weight))},
        "lowrank": {"matmul_gemm": len(matmuls), "conv_1x1": len(convs_1x1)},
    }
    try:
        from onnxcomp.passes import prune
    except ImportError:
        prune = None
    if prune is not None and hasattr(prune, "prunable_groups"):
        try:
            groups = prune.prunable_groups(model)
            found["prune"] = [g if isinstance(g, dict) else vars(g) for g in groups]
        except Exception as exc:  # inspection must not fail because one analysis did
            found["prune"] = {"error": str(exc)}
    return found


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
    params = _parameters(proto)
    # Count FLOPs and candidates on the graph as passes see it: Constant-node weights lifted.
    normalized = model
    if histogram.get("Constant"):
        graph = import_graph(model)
        lift_constant_nodes(graph)
        normalized = export_model(tidy(graph), like=model)
    flops, unknown = _flops(_concrete_shapes(normalized, shapes))
    constant_nodes = histogram.get("Constant", 0)
    warnings = []
    if constant_nodes:
        warnings.append(f"{constant_nodes} weights/constants are stored as Constant nodes "
                        "(onnxcomp lifts them to initializers before compressing)")
    if in_subgraphs:
        warnings.append(f"{sum(in_subgraphs.values())} nodes live inside If/Loop/Scan bodies: "
                        "passes do not compress inside subgraphs")
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
        "parameters": sum(v["count"] for v in params.values()),
        "parameter_bytes": sum(v["bytes"] for v in params.values()),
        "parameters_by_dtype": params,
        "flops": flops,
        "flops_unknown_nodes": unknown,
        "candidates": _candidates(normalized),
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
                        for k, v in info["parameters_by_dtype"].items()]),
        "",
        markdown_table(["op", "count"], [[k, v] for k, v in info["ops"].items()]),
        "",
    ]
    cand = info["candidates"]
    rows = [["quantize", f"int8: {cand['quantize']['int8']} weighted ops "
             f"({cand['quantize']['ops']}); int8-dynamic/int4: {cand['quantize']['int4']} MatMul/Gemm"],
            ["lowrank", f"{cand['lowrank']['matmul_gemm']} MatMul/Gemm, "
             f"{cand['lowrank']['conv_1x1']} 1x1 Conv with constant weights"]]
    if "prune" in cand:
        prune = cand["prune"]
        if isinstance(prune, dict):
            rows.append(["prune", f"analysis failed: {prune.get('error')}"])
        else:
            kinds = Counter(g.get("kind", "?") for g in prune)
            channels = sum(int(g.get("size", 0)) for g in prune)
            rows.append(["prune", f"{len(prune)} prunable groups {dict(kinds)}, "
                         f"{channels} channels in all"])
    lines.append(markdown_table(["pass", "could act on"], rows))
    lines.extend(f"warning: {w}" for w in info["warnings"])
    return "\n".join(lines)
