"""Channel importance for structured pruning.

- ``l1``/``l2``: the norm of every weight slice a group index covers (Conv/ConvTranspose/MatMul/Gemm
  weights, both the layers that produce the channel and those that consume it), each member's
  scores divided by their mean so that large and small layers weigh alike, then summed.
- ``activation`` (Wanda-style): for every layer that *consumes* the channel, mean |input
  activation| of the channel on the calibration data × the norm of the weights that read it,
  normalized per layer and summed. Activations are streamed through ONNX Runtime once, keeping only
  per-channel running sums.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp import calibration
from onnxcomp.calibration import Dataset
from onnxcomp.model import Model
from onnxcomp.passes.prune.dims import WEIGHT_OPS, Dim, Group


def weight_role(node: gs.Node, d: Dim) -> str | None:
    """``in`` (the layer reads the channel), ``out`` (it produces it), ``dw`` (both, depthwise)."""
    if node.op not in WEIGHT_OPS or d.index != WEIGHT_OPS[node.op]:
        return None
    if node.op == "Conv":
        if d.axis == 1:
            return "in"
        return "dw" if int(node.attrs.get("group", 1)) > 1 else "out"
    if node.op == "ConvTranspose":
        return "in" if d.axis == 0 else "out"
    if node.op == "Gemm":
        k_axis = 1 if int(node.attrs.get("transB", 0)) else 0
        return "in" if d.axis == k_axis else "out"
    return "in" if d.axis == 0 else "out"


def input_axis(node: gs.Node, rank: int) -> int:
    """The axis of the layer's data input that its weight's ``in`` axis reads."""
    return rank - 1 if node.op == "MatMul" else 1


def per_index(values: np.ndarray, d: Dim, size: int) -> np.ndarray:
    """Rows of ``values`` (axis 0 = ``d``'s axis) grouped by group index: shape (size, -1)."""
    if d.sub is None:
        return values.reshape(size, -1)
    kind, a, b = d.sub
    if kind == "seg":
        return values[a:a + size].reshape(size, -1)
    outer = values.shape[0] // (a * b)
    rest = values.reshape(outer, b, a, -1)
    return rest.transpose(1, 0, 2, 3).reshape(size, -1)


def _norms(w: np.ndarray, axis: int, norm: str) -> np.ndarray:
    rows = np.moveaxis(np.abs(w.astype(np.float64)), axis, 0).reshape(w.shape[axis], -1)
    return rows.sum(1) if norm == "l1" else np.sqrt((rows ** 2).sum(1))


def _normalized(scores: np.ndarray) -> np.ndarray:
    mean = float(scores.mean()) if scores.size else 0.0
    return scores / mean if mean > 0 else np.ones_like(scores)


def magnitude(graph_nodes: dict[str, gs.Node], group: Group, norm: str) -> np.ndarray:
    total = np.zeros(group.size)
    for d in group.params():
        node = graph_nodes[d.ref]
        if weight_role(node, d) is None:
            continue
        w = np.asarray(node.inputs[d.index].values)
        rows = _norms(w, d.axis, norm)
        total += _normalized(per_index(rows, d, group.size).sum(1))
    return total


def consumer_inputs(graph_nodes: dict[str, gs.Node], group: Group) -> list[tuple[Dim, str, int]]:
    """(weight dim, data-input tensor name, its channel axis) of each layer reading the group."""
    found = []
    for d in group.params():
        node = graph_nodes[d.ref]
        x = node.inputs[0]
        if weight_role(node, d) != "in" or isinstance(x, gs.Constant) or x.shape is None:
            continue
        found.append((d, x.name, input_axis(node, len(x.shape))))
    return found


def activation_means(model: Model, wanted: dict[str, int], data: Dataset | None,
                     stream=None) -> dict[str, np.ndarray]:
    """Mean |x| per position along the given axis of each named tensor, over the data set;
    ``stream`` replaces ``calibration.stream_activations`` (a body's recorded feeds)."""
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = defaultdict(int)

    def on_batch(_index: int, arrays: dict[str, np.ndarray]) -> None:
        for name, value in arrays.items():
            axis = wanted[name]
            moved = np.moveaxis(np.abs(value.astype(np.float32)), axis, 0)
            flat = moved.reshape(moved.shape[0], -1)
            sums[name] = sums.get(name, 0) + flat.sum(1, dtype=np.float64)
            counts[name] += flat.shape[1]

    (stream or calibration.stream_activations)(model, sorted(wanted), data, on_batch)
    return {name: sums[name] / max(counts[name], 1) for name in sums}


def activation_aware(graph_nodes: dict[str, gs.Node], group: Group, means: dict[str, np.ndarray],
                     norm: str) -> np.ndarray | None:
    total, used = np.zeros(group.size), False
    for d, name, _axis in consumer_inputs(graph_nodes, group):
        if name not in means:
            continue
        w = np.asarray(graph_nodes[d.ref].inputs[d.index].values)
        rows = _norms(w, d.axis, norm) * means[name]
        total += _normalized(per_index(rows, d, group.size).sum(1))
        used = True
    return total if used else None


def resolve(importance: str, data: Dataset | None) -> str:
    """The importance actually used: ``auto`` is activation-aware when data is present."""
    if importance == "auto":
        return "activation" if data is not None else "l2"
    return importance


def scores(graph_nodes: dict[str, gs.Node], groups: list[Group], mode: str, model: Model,
           data: Dataset | None, stream=None) -> dict[int, np.ndarray]:
    """One score per channel of every group (``mode`` as ``resolve`` gives it). A group no
    calibration activation reaches keeps its magnitude scores. ``activation`` needs ``data``
    (the Pipeline refuses the configuration without it); ``stream`` as in ``activation_means``."""
    result = {g.id: magnitude(graph_nodes, g, "l1" if mode == "l1" else "l2") for g in groups}
    if mode == "activation":
        wanted = {name: axis for g in groups for _, name, axis in consumer_inputs(graph_nodes, g)}
        means = activation_means(model, wanted, data, stream) if wanted else {}
        for g in groups:
            aware = activation_aware(graph_nodes, g, means, "l2")
            if aware is not None:
                result[g.id] = aware
    return result
