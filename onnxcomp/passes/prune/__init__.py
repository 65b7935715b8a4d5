"""prune: structured pruning that really removes channels, attention heads and FFN neurons.

Plan, then apply:
1. ``analyze``: lift Constant-node weights to initializers, infer shapes, and compute the coupled
   groups (``prune_groups``): conv channels through BatchNormalization, activations, residual
   Add/Mul, Concat/Split, depthwise convs, pooling, SE blocks; FFN neurons (``MatMul(+bias) → GELU
   → MatMul``); attention heads through ``Reshape → Transpose → MatMul → Softmax → MatMul →
   Transpose → Reshape``. Groups touching a graph input/output, a LayerNorm-normalized axis, an op
   or reshape the analysis cannot follow are kept, with the reason.
2. ``plan``: score each channel (``prune_importance``: weight norms, or Wanda-style activation ×
   weight scores with calibration data), and pick the channels to drop: ``ratio`` of each group
   (``ranking="local"``, rounded down, at least ``min_channels`` kept, whole heads for head groups)
   or of all the groups of a scope ranked together (``ranking="global"``).
3. ``apply``: every weight, bias and BatchNormalization parameter of the group is cut
   (``np.delete``; a constant shared with other nodes is copied first, never cut in place),
   depthwise ``group`` attributes, Split sizes and Reshape shape constants are rewritten, shapes
   are re-inferred. The result has fewer parameters and FLOPs and passes onnx.checker.

``sparsity`` (off by default) is separate: unstructured magnitude pruning that zeroes the smallest
weights of every Conv/MatMul/Gemm (smaller compressed files, no speed-up).
"""

from __future__ import annotations

import logging
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp.graph import export_model, import_proto, lift_constant_nodes, tidy
from onnxcomp.model import Model
from onnxcomp.passes.prune import importance as imp
from onnxcomp.passes.prune.analysis import WEIGHT_OPS, Group, analyze, positions
from onnxcomp.pipeline import Context, PassRecord

NAME = "prune"
logger = logging.getLogger(__name__)

IMPORTANCE = ("auto", "l1", "l2", "activation")
RANKING = ("local", "global")
SCOPES = ("heads", "ffn", "conv")


def _check_ratio(name: str, value) -> None:
    if value is None and name != "ratio":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


@dataclass(frozen=True)
class Config:
    """``ratio``: share of each group's channels to remove; ``heads``/``ffn``/``conv`` override it
    per kind of group (None = ``ratio``); ``importance``: auto (activation-aware with calibration
    data, else l2), l1, l2, activation; ``ranking``: local (per group) or global (per scope);
    ``multiple``: round each group's kept channel count up to a multiple (8 suits ONNX Runtime's
    blocked NCHWc conv kernels); ``sparsity``: unstructured magnitude pruning of the remaining
    weights (0 = off)."""

    ratio: float = 0.3
    heads: float | None = None
    ffn: float | None = None
    conv: float | None = None
    importance: str = "auto"
    ranking: str = "local"
    min_channels: int = 1
    multiple: int = 1
    sparsity: float = 0.0

    def __post_init__(self) -> None:
        for name in ("ratio", *SCOPES, "sparsity"):
            _check_ratio(name, getattr(self, name))
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {IMPORTANCE}, got {self.importance!r}")
        if self.ranking not in RANKING:
            raise ValueError(f"ranking must be one of {RANKING}, got {self.ranking!r}")
        if isinstance(self.min_channels, bool) or not isinstance(self.min_channels, int) \
                or self.min_channels < 1:
            raise ValueError(f"min_channels must be an integer >= 1, got {self.min_channels!r}")
        if isinstance(self.multiple, bool) or not isinstance(self.multiple, int) \
                or self.multiple < 1:
            raise ValueError(f"multiple must be an integer >= 1, got {self.multiple!r}")

    @classmethod
    def from_short(cls, arg: str | None) -> Config:
        if arg in (None, ""):
            return cls()
        try:
            ratio = float(arg)
        except ValueError:
            raise ValueError(f"prune takes a ratio such as 0.3, got {arg!r}") from None
        return cls(ratio=ratio)

    def ratio_for(self, kind: str) -> float:
        scoped = getattr(self, kind, None) if kind in SCOPES else None
        return self.ratio if scoped is None else scoped


@dataclass(frozen=True)
class GroupSummary:
    id: int
    kind: str
    size: int | None
    nodes: tuple[str, ...]
    prunable: bool
    reason: str | None = None


@dataclass
class PrunePlan:
    """The groups found, and for each prunable one the group indices to remove."""

    config: Config
    groups: list[Group]
    removed: dict[int, list[int]] = field(default_factory=dict)
    importance: str = "l2"
    notes: list[str] = field(default_factory=list)

    def summaries(self) -> list[GroupSummary]:
        return [_summary(g) for g in self.groups]

    def describe(self) -> list[dict]:
        """One row per group (``--dry-run``)."""
        return [{"group": g.id, "kind": g.kind, "size": g.size,
                 "remove": len(self.removed.get(g.id, [])), "nodes": len(g.nodes),
                 "first": g.nodes[0] if g.nodes else "", "kept_because": g.reason or ""}
                for g in self.groups]


def _summary(g: Group) -> GroupSummary:
    return GroupSummary(g.id, g.kind, g.size, tuple(g.nodes), g.prunable, g.reason)


def prepare(model: Model) -> gs.Graph:
    """The graph the analysis and the apply step share: shapes inferred, Constant-node weights
    lifted, every node named (deterministically, so plan and apply see the same names)."""
    try:
        proto = onnx.shape_inference.infer_shapes(model.proto, data_prop=True)
    except Exception as exc:  # noqa: BLE001  inference is best effort: unknown shapes only block groups
        logger.debug("prune: shape inference failed: %s", exc)
        proto = model.proto
    graph = import_proto(proto, model.source)
    lift_constant_nodes(graph)
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.op}_{i}_pruned"
        seen.add(node.name)
    return graph


def analyze_model(model: Model) -> list[Group]:
    return analyze(prepare(model))


def prunable_groups(model: Model) -> list[GroupSummary]:
    """What ``prune`` could cut (for ``onnxcomp inspect``)."""
    return [_summary(g) for g in analyze_model(model) if g.prunable]


def _scores(graph: gs.Graph, groups: list[Group], config: Config, ctx: Context | None,
            model: Model) -> tuple[dict[int, np.ndarray], str]:
    nodes = {n.name: n for n in graph.nodes}
    mode = config.importance
    data = ctx.calibration if ctx is not None else None
    if mode == "auto":
        mode = "activation" if data is not None else "l2"
    if mode == "activation" and data is None:
        raise ValueError("importance='activation' needs calibration data")
    scores = {g.id: imp.magnitude(nodes, g, "l1" if mode == "l1" else "l2") for g in groups}
    if mode == "activation":
        wanted = {name: axis for g in groups for _, name, axis in imp.consumer_inputs(nodes, g)}
        means = imp.activation_means(model, wanted, data) if wanted else {}
        for g in groups:
            aware = imp.activation_aware(nodes, g, means, "l2")
            if aware is not None:
                scores[g.id] = aware
    return scores, mode


def _count(config: Config, group: Group, ratio: float) -> int:
    n = math.floor(ratio * group.size + 1e-9)
    if config.multiple > 1 and group.kind != "heads" and n:
        keep = -(-(group.size - n) // config.multiple) * config.multiple  # round the kept count up
        n = max(0, group.size - keep)
    return max(0, min(n, group.size - config.min_channels))


def plan(model: Model, config: Config, ctx: Context | None = None) -> PrunePlan:
    graph = prepare(model)
    groups = analyze(graph)
    prunable = [g for g in groups if g.prunable and config.ratio_for(g.kind) > 0]
    result = PrunePlan(config, groups)
    if not any(g.prunable for g in groups):
        result.notes.append("nothing to prune: no channel group the analysis can follow")
    for scope in SCOPES:
        if getattr(config, scope) and not any(g.prunable and g.kind == scope for g in groups):
            result.notes.append(f"{scope}: nothing to prune")
    if not prunable:
        return result
    scores, result.importance = _scores(graph, prunable, config, ctx, model)
    if config.ranking == "local":
        for g in prunable:
            n = _count(config, g, config.ratio_for(g.kind))
            if n:
                result.removed[g.id] = sorted(np.argsort(scores[g.id], kind="stable")[:n].tolist())
        return result
    by_scope: dict[str, list[Group]] = defaultdict(list)
    for g in prunable:
        by_scope[g.kind].append(g)
    for kind, members in by_scope.items():
        budget = math.floor(config.ratio_for(kind) * sum(g.size for g in members) + 1e-9)
        pool = sorted((float(s) / (float(scores[g.id].mean()) or 1.0), g.id, int(i))
                      for g in members for i, s in enumerate(scores[g.id]))
        sizes = {g.id: g.size for g in members}
        for _score, gid, index in pool:
            if budget == 0:
                break
            if sizes[gid] - len(result.removed.get(gid, [])) <= config.min_channels:
                continue
            result.removed.setdefault(gid, []).append(index)
            budget -= 1
        for gid in result.removed:
            result.removed[gid].sort()
    return result


def _set_constant(graph: gs.Graph, node: gs.Node, slot: int, values: np.ndarray) -> None:
    """Give ``node`` input ``slot`` new values; a constant other nodes also use is copied."""
    const = node.inputs[slot]
    uses = sum(1 for user in const.outputs for t in user.inputs if t is const)
    if uses <= 1:
        const.values = values
        return
    names = set(graph.tensors())
    name, i = f"{const.name}_pruned", 1
    while name in names:
        name, i = f"{const.name}_pruned{i}", i + 1
    node.inputs[slot] = gs.Constant(name, values)


def _cut_lists(graph: gs.Graph, plan_: PrunePlan, params_only_in: bool = False):
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
                _set_constant(graph, node, 1, target)
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
        _set_constant(graph, node, 1, values)
    elif "split" in node.attrs or int(graph.opset or 0) < 13:
        node.attrs["split"] = sizes
    else:
        node.inputs.append(gs.Constant(f"{node.name}_split_sizes", values))


def _finish(graph: gs.Graph, like: Model) -> Model:
    keep = {t.name for t in list(graph.inputs) + list(graph.outputs)}
    for t in graph.tensors().values():
        if isinstance(t, gs.Variable) and t.name not in keep:
            t.shape = None
    tidy(graph)
    model = export_model(graph, like=like)
    del model.proto.graph.value_info[:]
    try:
        model.proto.CopyFrom(onnx.shape_inference.infer_shapes(model.proto))
    except Exception as exc:  # noqa: BLE001  the model stays valid without value_info
        logger.debug("prune: shape inference after pruning failed: %s", exc)
    return model


def _sparsify(graph: gs.Graph, sparsity: float) -> list[str]:
    touched = []
    for node in graph.nodes:
        slot = WEIGHT_OPS.get(node.op)
        if slot is None or len(node.inputs) <= slot or not isinstance(node.inputs[slot], gs.Constant):
            continue
        w = np.asarray(node.inputs[slot].values)
        k = int(sparsity * w.size)
        if w.ndim < 2 or k == 0 or not np.issubdtype(w.dtype, np.floating):
            continue
        threshold = np.partition(np.abs(w).reshape(-1), k - 1)[k - 1]
        node.inputs[slot].values = np.where(np.abs(w) <= threshold, 0, w).astype(w.dtype)
        touched.append(node.name)
    return touched


def apply(model: Model, plan_: PrunePlan) -> tuple[Model, list[str]]:
    """The pruned model and the names of the nodes whose weights or attributes changed."""
    graph = prepare(model)
    nodes, cuts, along = _cut_lists(graph, plan_)
    touched = set()
    for (name, slot), cut in cuts.items():
        values = np.asarray(nodes[name].inputs[slot].values)
        by_axis: dict[int, set[int]] = defaultdict(set)
        for axis, pos in cut:  # several groups may cut one axis (Concat/Split segments)
            by_axis[axis].update(pos)
        for axis, pos in by_axis.items():
            values = np.delete(values, sorted(pos), axis=axis)
        _set_constant(graph, nodes[name], slot, values)
        touched.add(name)
    touched.update(_rewrite_shapes(graph, nodes, along))
    if plan_.config.sparsity > 0:
        touched.update(_sparsify(graph, plan_.config.sparsity))
    return _finish(graph, model), sorted(touched)


def zero_out(model: Model, plan_: PrunePlan, consumers_only: bool = True) -> Model:
    """The planned channels set to zero instead of removed (same size and speed). With
    ``consumers_only`` only the weights that read them are zeroed, which makes the channels
    contribute exactly nothing: ``apply`` must then give the same outputs."""
    graph = prepare(model)
    nodes, cuts, _ = _cut_lists(graph, plan_, params_only_in=consumers_only)
    for (name, slot), cut in cuts.items():
        values = np.asarray(nodes[name].inputs[slot].values).copy()
        for axis, pos in cut:
            index = [slice(None)] * values.ndim
            index[axis] = sorted(set(pos))
            values[tuple(index)] = 0
        _set_constant(graph, nodes[name], slot, values)
    return _finish(graph, model)


def _layers_with_role(graph_nodes: dict[str, gs.Node], group: Group, role: str,
                      kept: list[int] | None = None) -> list[dict]:
    """The weighted layers that read (``in``) or produce (``out``) the group's channels; for
    producers of plain channel groups, the kept output channels (distill matches the teacher's
    output through them)."""
    found = []
    for d in group.params():
        node = graph_nodes[d.ref]
        if imp.weight_role(node, d) == role:
            entry = {"node": node.name, "output": node.outputs[0].name}
            if role == "out":
                entry["channels"] = kept if d.sub is None else None
            found.append(entry)
    return found


def run(model: Model, config: Config, ctx: Context) -> tuple[Model, PassRecord]:
    record = PassRecord(NAME, params_before=model.parameter_count(),
                        bytes_before=model.weight_bytes())
    the_plan = plan(model, config, ctx)
    record.notes.extend(the_plan.notes)
    for g in the_plan.groups:
        if not g.prunable:
            record.skipped.append((f"group {g.id} ({g.kind}: {', '.join(g.nodes[:3])})", g.reason))
    if not the_plan.removed and config.sparsity == 0:
        record.params_after, record.bytes_after = record.params_before, record.bytes_before
        if the_plan.groups and any(g.prunable for g in the_plan.groups):
            record.notes.append("ratio removes no channel")
        return model, record
    result, touched = apply(model, the_plan)
    onnx.checker.check_model(result.proto)
    graph_nodes = {n.name: n for n in prepare(model).nodes}
    record.modified = True
    record.touched = touched
    record.params_after = result.parameter_count()
    record.bytes_after = result.weight_bytes()
    removed = sum(len(v) for v in the_plan.removed.values())
    record.notes.append(f"{len(the_plan.removed)} groups pruned, {removed} channels/heads removed, "
                        f"importance {the_plan.importance}")
    record.details["groups"] = []
    for g in the_plan.groups:
        if g.id not in the_plan.removed:
            continue
        kept = [i for i in range(g.size) if i not in set(the_plan.removed[g.id])]
        record.details["groups"].append(
            {"id": g.id, "kind": g.kind, "size": g.size, "kept": kept, "nodes": g.nodes,
             "consumers": _layers_with_role(graph_nodes, g, "in"),
             "producers": _layers_with_role(graph_nodes, g, "out", kept)})
    return result, record
