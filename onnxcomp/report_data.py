"""Facts the HTML report draws that the measurers do not keep yet: small, JSON-ready pieces for
the commands to add to a report (where each goes is said per function).

- :func:`model_breakdown`: parameters and bytes by consuming op type and dtype, for
  ``report.models[role]["breakdown"]``.
- :func:`similarity_sample`: the top-left corner of both models' similarity matrices, for
  ``fidelity["retrieval"]["similarity"]``.
- :func:`changed_lines`: the OCR lines whose text changed, each with its input image, for
  ``fidelity["task"]["changed"]``.
- :func:`png_data_uri`: an image as a ``data:image/png;base64,...`` string (Pillow, a core
  dependency).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx

# Ops that only carry a weight to its real consumer: a tensor read through them is counted
# under the op that finally uses it (an int8 Conv weight behind DequantizeLinear is "Conv").
_CARRIERS = {"DequantizeLinear", "QuantizeLinear", "Cast", "Transpose", "Reshape", "Identity",
             "Unsqueeze", "Squeeze", "Flatten"}
SIMILARITY_SAMPLES = 24
CHANGED_LINES = 24


def _elements(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims)) if len(tensor.dims) else 1


def _nbytes(tensor: onnx.TensorProto) -> int:
    count = _elements(tensor)
    if tensor.data_type == onnx.TensorProto.STRING:
        return sum(len(s) for s in tensor.string_data)
    if tensor.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4):
        return (count + 1) // 2
    return count * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _graph_tensors(graph: onnx.GraphProto):
    """(tensor, its consumers' op types) for every stored tensor of this graph and subgraphs."""
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                consumers.setdefault(name, []).append(node)

    def final_ops(name: str, depth: int = 0) -> list[str]:
        ops = []
        for node in consumers.get(name, []):
            if node.op_type in _CARRIERS and depth < 4 and node.output:
                ops.extend(final_ops(node.output[0], depth + 1) or [node.op_type])
            else:
                ops.append(node.op_type)
        return ops

    for tensor in graph.initializer:
        yield tensor, final_ops(tensor.name)
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t, final_ops(node.output[0]) if node.output else []
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _graph_tensors(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _graph_tensors(sub)


def model_breakdown(model: Any) -> dict[str, Any]:
    """Parameters and bytes by (op type, dtype); for ``report.models[role]["breakdown"]``.

    ``model``: an onnxcomp Model or a ModelProto. Every stored tensor (initializers and
    Constant nodes, subgraphs included) counts once, under the op type that finally reads it
    (through DequantizeLinear, Cast, Transpose, Reshape...; "(graph output)" or "(unused)" when
    none, the first consumer's op when several ops share it). Sizes come from the shapes, so a
    model whose weights stay on disk is not read. ``params`` counts every element, as
    ``model.parameter_count`` does minus its int64 exclusion: shape tensors show as an int64
    row of their own.
    """
    proto = getattr(model, "proto", model)
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    outputs = {o.name for o in proto.graph.output}
    for tensor, ops in _graph_tensors(proto.graph):
        op = ops[0] if ops else "(graph output)" if tensor.name in outputs else "(unused)"
        dtype = onnx.TensorProto.DataType.Name(tensor.data_type).lower()
        row = rows.setdefault((op, dtype), {"op": op, "dtype": dtype, "tensors": 0,
                                            "params": 0, "bytes": 0})
        row["tensors"] += 1
        row["params"] += _elements(tensor)
        row["bytes"] += _nbytes(tensor)
    ordered = sorted(rows.values(), key=lambda r: (-r["bytes"], r["op"], r["dtype"]))
    return {"rows": ordered, "params": sum(r["params"] for r in ordered),
            "bytes": sum(r["bytes"] for r in ordered)}


def _normalized(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.maximum(np.linalg.norm(rows, axis=1, keepdims=True), 1e-12)


def similarity_sample(ref_a: np.ndarray, ref_b: np.ndarray, cand_a: np.ndarray,
                      cand_b: np.ndarray, limit: int = SIMILARITY_SAMPLES) -> dict[str, Any]:
    """``S = normalize(a) @ normalize(b).T`` of both models on the first ``limit`` pairs, rounded
    to 4 decimals; for ``fidelity["retrieval"]["similarity"]`` (validate has the rows)."""
    count = min(limit, len(ref_a), len(ref_b))
    matrices = {}
    for key, (a, b) in (("reference", (ref_a, ref_b)), ("candidate", (cand_a, cand_b))):
        s = _normalized(a[:count]) @ _normalized(b[:count]).T
        matrices[key] = np.round(s, 4).tolist()
    return {"samples": count, **matrices}


def png_data_uri(image: np.ndarray) -> str:
    """uint8 [H, W] or [H, W, 3] -> ``data:image/png;base64,...``."""
    from PIL import Image

    array = np.asarray(image)
    if array.dtype != np.uint8:
        raise ValueError(f"expected a uint8 image, got {array.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def changed_lines(labels: Sequence[str], reference: Sequence[str], candidate: Sequence[str],
                  images: Sequence[np.ndarray] | None = None, limit: int = CHANGED_LINES
                  ) -> dict[str, Any]:
    """The lines where the candidate reads something else than the reference, for
    ``fidelity["task"]["changed"]``: ``{"count", "total", "lines": [{"index", "label",
    "reference", "candidate", "image"}]}``, at most ``limit`` lines, those that the reference
    read right and the candidate got wrong first. ``images``: the line crops (uint8 RGB), one
    per label, or None."""
    if not len(labels) == len(reference) == len(candidate):
        raise ValueError(f"{len(labels)} labels, {len(reference)} reference and "
                         f"{len(candidate)} candidate texts")
    changed = [i for i, (r, c) in enumerate(zip(reference, candidate)) if r.strip() != c.strip()]
    broke = [i for i in changed if reference[i].strip() == labels[i]]
    order = broke + [i for i in changed if i not in set(broke)]
    lines = []
    for i in order[:limit]:
        entry = {"index": i, "label": labels[i], "reference": reference[i].strip(),
                 "candidate": candidate[i].strip()}
        if images is not None:
            entry["image"] = png_data_uri(images[i])
        lines.append(entry)
    return {"count": len(changed), "total": len(labels), "lines": lines}
