"""The cut: a ``PrunePlan`` applied to a model, and its zeroed twin used to prove it exact.

Every weight, bias and BatchNormalization parameter of a group is cut with ``np.delete`` (through
``graph.set_constant``: a constant other nodes also read is copied first, never cut in place),
depthwise ``group`` attributes, Split sizes and Reshape shape constants are rewritten, and shapes
are re-inferred. ``sparsity`` zeroes the smallest weights of every Conv/MatMul/Gemm instead.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp import shape_inference
from onnxcomp.graph import export_model, set_constant, tidy
from onnxcomp.model import Model
from onnxcomp.passes.prune import importance as imp
from onnxcomp.passes.prune.analysis import prepare
from onnxcomp.passes.prune.dims import WEIGHT_OPS, positions
from onnxcomp.passes.prune.select import PrunePlan

logger = logging.getLogger(__name__)


def _cut_lists(graph: gs.Graph, plan_: PrunePlan, params_only_in: bool = False):
    """Per (node, input slot): the (axis, positions) to remove; per (tensor, axis): how many
    positions go (for the shape constants)."""
    nodes = {n.name: n for n in graph.nodes}
    tensors = graph.tensors()
    cuts: dict[tuple[str, int], list] = defaultdict(list)
    along: dict[tuple[str, int], int] = defaultdict(int)
    for g in plan_.groups:
        removed = plan_.removed.get(g.id)
        if not removed:
            continue
        for d in g.dims:
            if d.kind == "p":
                node = nodes[d.ref]
                if params_only_in and imp.weight_role(node, d) != "in":
                    continue
                total = np.asarray(node.inputs[d.index].values).shape[d.axis]
                cuts[(d.ref, d.index)].append((d.axis, positions(d, removed, total)))
            else:
                shape = tensors[d.ref].shape
                total = shape[d.axis] if shape is not None else 0
                along[(d.ref, d.axis)] += len(positions(d, removed, total))
    return nodes, cuts, along


def _rewrite_shapes(graph: gs.Graph, nodes: dict, along: dict) -> list[str]:
    touched = []
    for node in nodes.values():
        if not node.outputs:
            continue
        if node.op == "Reshape":
            y = node.outputs[0].name
            if not isinstance(node.inputs[1], gs.Constant):
                continue  # the analysis blocks every group through a run-time shape
            target = np.asarray(node.inputs[1].values).copy()
            changed = False
            for j in range(target.size):
                if along.get((y, j)) and target[j] > 0:
                    target[j] -= along[(y, j)]
                    changed = True
            if changed:
                set_constant(graph, node, 1, target, suffix="pruned")
                touched.append(node.name)
        elif node.op == "Split":
            axis = int(node.attrs.get("axis", 0)) % len(node.inputs[0].shape)
            if any(along.get((o.name, axis)) for o in node.outputs):
                sizes = _split_sizes(node, axis)
                _write_split(graph, node, [s - along.get((o.name, axis), 0)
                                           for s, o in zip(sizes, node.outputs)])
                touched.append(node.name)
        elif node.op == "Conv" and int(node.attrs.get("group", 1)) > 1:
            cut = along.get((node.outputs[0].name, 1), 0)
            if cut:
                node.attrs["group"] = int(node.attrs["group"]) - cut
                touched.append(node.name)
    return touched


def _split_sizes(node: gs.Node, axis: int) -> list[int]:
    if "split" in node.attrs:
        return [int(v) for v in node.attrs["split"]]
    if len(node.inputs) > 1 and node.inputs[1].name:
        return [int(v) for v in np.asarray(node.inputs[1].values).reshape(-1)]
    return [int(node.inputs[0].shape[axis]) // len(node.outputs)] * len(node.outputs)


def _write_split(graph: gs.Graph, node: gs.Node, sizes: list[int]) -> None:
    values = np.asarray(sizes, dtype=np.int64)
    if len(node.inputs) > 1 and node.inputs[1].name:
        set_constant(graph, node, 1, values, suffix="pruned")
    elif "split" in node.attrs or int(graph.opset or 0) < 13:
        node.attrs["split"] = sizes
    else:
        node.inputs.append(gs.Constant(f"{node.name}_split_sizes", values))


def finish(graph: gs.Graph, like: Model) -> Model:
    """Export with the stale intermediate shapes dropped and re-inferred."""
    keep = {t.name for t in list(graph.inputs) + list(graph.outputs)}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in keep:
            t.shape = None
    tidy(graph)
    model = export_model(graph, like=like)
    del model.proto.graph.value_info[:]
    try:
        model.proto = shape_inference.with_shapes(model.proto)
    except Exception as exc:  # noqa: BLE001  the model stays valid without value_info
        logger.debug("prune: shape inference after pruning failed: %s", exc)
    return model


def sparse_targets(graph: gs.Graph, sparsity: float) -> list[gs.Node]:
    """The Conv/MatMul/Gemm nodes whose constant float weight (2-D or more) ``sparsity``
    zeroes at least one element of."""
    found = []
    for node in graph.nodes:
        slot = WEIGHT_OPS.get(node.op)
        if slot is None or len(node.inputs) <= slot or not isinstance(node.inputs[slot],
                                                                      gs.Constant):
            continue
        w = np.asarray(node.inputs[slot].values)
        if w.ndim >= 2 and int(sparsity * w.size) > 0 and np.issubdtype(w.dtype, np.floating):
            found.append(node)
    return found


def _sparsify(graph: gs.Graph, sparsity: float) -> list[str]:
    touched = []
    for node in sparse_targets(graph, sparsity):
        slot = WEIGHT_OPS[node.op]
        w = np.asarray(node.inputs[slot].values)
        k = int(sparsity * w.size)
        threshold = np.partition(np.abs(w).reshape(-1), k - 1)[k - 1]
        node.inputs[slot].values = np.where(np.abs(w) <= threshold, 0, w).astype(w.dtype)
        touched.append(node.name)
    return touched


def cut(model: Model, plan_: PrunePlan) -> tuple[Model, list[str]]:
    """The pruned model and the names of the nodes whose weights or attributes changed;
    ``model`` itself is left as it is."""
    graph = prepare(model)
    touched = cut_graph(graph, plan_)
    return finish(graph, model), touched


def cut_graph(graph: gs.Graph, plan_: PrunePlan) -> list[str]:
    """``cut`` on a graph from ``prepare`` (edited in place; ``finish`` exports it): the nodes
    whose weights or attributes changed."""
    nodes, cuts, along = _cut_lists(graph, plan_)
    touched = set()
    for (name, slot), found in cuts.items():
        values = np.asarray(nodes[name].inputs[slot].values)
        by_axis: dict[int, set[int]] = defaultdict(set)
        for axis, pos in found:  # several groups may cut one axis (Concat/Split segments)
            by_axis[axis].update(pos)
        for axis, pos in by_axis.items():
            values = np.delete(values, sorted(pos), axis=axis)
        set_constant(graph, nodes[name], slot, values, suffix="pruned")
        touched.add(name)
    touched.update(_rewrite_shapes(graph, nodes, along))
    if plan_.config.sparsity > 0:
        touched.update(_sparsify(graph, plan_.config.sparsity))
    return sorted(touched)


def zero_out(model: Model, plan_: PrunePlan, consumers_only: bool = True) -> Model:
    """The planned channels set to zero instead of removed (same size and speed). With
    ``consumers_only`` only the weights that read them are zeroed, which makes the channels
    contribute exactly nothing: ``cut`` must then give the same outputs."""
    graph = prepare(model)
    nodes, cuts, _ = _cut_lists(graph, plan_, params_only_in=consumers_only)
    for (name, slot), found in cuts.items():
        values = np.asarray(nodes[name].inputs[slot].values).copy()
        for axis, pos in found:
            index = [slice(None)] * values.ndim
            index[axis] = sorted(set(pos))
            values[tuple(index)] = 0
        set_constant(graph, nodes[name], slot, values, suffix="pruned")
    return finish(graph, model)
