"""prune: structured pruning that really removes channels, attention heads and FFN neurons.

Plan, then apply:
1. ``plan``: the dependency analysis (``analysis``, ``rules``) lifts Constant-node weights, infers
   shapes and computes the coupled groups: conv channels through BatchNormalization, activations,
   residual Add/Mul, Concat/Split, depthwise convs, pooling, SE blocks; FFN neurons
   (``MatMul(+bias) → GELU → MatMul``); attention heads through ``Reshape → Transpose → MatMul →
   Softmax → MatMul → Transpose → Reshape``. Groups touching a graph input/output, a
   LayerNorm-normalized axis, an If/Loop/Scan boundary, an op or reshape the analysis cannot
   follow are kept, with the reason (a SKIP row). Each If/Loop/Scan body is pruned as a graph of
   its own, its boundary fixed (``bodies``; rows ``body <path>: group ...``). Each channel is scored (``importance``: weight norms, or
   Wanda-style activation × weight scores with calibration data) and the channels to drop are
   chosen (``select``): ``ratio`` of each group (``ranking="local"``, rounded down, at least
   ``min_channels`` kept, whole heads for head groups) or of all the groups of a scope ranked
   together (``ranking="global"``). One plan row per group: "cut 2 of 4 heads".
2. ``apply`` (``cut``): every weight, bias and BatchNormalization parameter of the group is cut
   (``np.delete``; a constant shared with other nodes is copied first, never cut in place),
   depthwise ``group`` attributes, Split sizes and Reshape shape constants are rewritten, shapes
   are re-inferred. The result has fewer parameters and FLOPs and passes onnx.checker. Every
   layer that reads cut channels is handed to distill as a ``LayerChange`` (with the teacher
   channels it kept when its own outputs were cut too).

``sparsity`` (off by default) is separate: unstructured magnitude pruning that zeroes the smallest
weights of every Conv/MatMul/Gemm (smaller compressed files, no speed-up).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx
import onnx_graphsurgeon as gs

from onnxcomp import checks
from onnxcomp.graph import size_note
from onnxcomp.model import Model
from onnxcomp.passes.prune import importance as imp
from onnxcomp.passes.prune.analysis import analyze_model, prepare
from onnxcomp.passes.prune.bodies import analyze_top, apply_bodies, plan_bodies
from onnxcomp.passes.prune.config import SCOPES, Config, needs_calibration
from onnxcomp.passes.prune.cut import cut_graph, finish, sparse_targets, zero_out
from onnxcomp.passes.prune.dims import Group
from onnxcomp.passes.prune.select import PrunePlan, choose
from onnxcomp.pipeline import (
    SKIP,
    Applied,
    Capabilities,
    Context,
    LayerChange,
    PassSpec,
    Plan,
    PlanRow,
)

NAME = "prune"
CHECKED_WHOLE_BYTES = 256 << 20
logger = logging.getLogger(__name__)

__all__ = ["NAME", "PASS", "Config", "GroupSummary", "PrunePlan", "analyze_model", "apply",
           "plan", "prepare", "prunable_groups", "zero_out"]

_UNITS = {"heads": "heads", "ffn": "neurons (ffn)", "conv": "channels (conv)"}


@dataclass(frozen=True)
class GroupSummary:
    id: int
    kind: str
    size: int | None
    nodes: tuple[str, ...]
    prunable: bool
    reason: str | None = None


def prunable_groups(model: Model) -> list[GroupSummary]:
    """What ``prune`` could cut (for ``onnxcomp inspect``)."""
    return [GroupSummary(g.id, g.kind, g.size, tuple(g.nodes), g.prunable, g.reason)
            for g in analyze_model(model) if g.prunable]


# --- plan -------------------------------------------------------------------------------------


def _unit(kind: str) -> str:
    return _UNITS.get(kind, f"channels ({kind})")


def _kept_all(config: Config, group: Group) -> str:
    """Why a prunable group loses no channel."""
    ratio = config.ratio_for(group.kind)
    if ratio == 0:
        return f"ratio for {group.kind} groups is 0"
    if config.ranking == "global":
        return f"the global {group.kind} ranking keeps all {group.size} {_unit(group.kind)}"
    return (f"ratio {ratio} of {group.size} {_unit(group.kind)} removes none "
            f"(min_channels {config.min_channels}, multiple {config.multiple})")


def plan(model: Model, config: Config, ctx: Context) -> Plan:
    """The groups, their scores and the channels to cut; one row per group. Pure: ``model`` is
    only read (activation importance runs it on the calibration data)."""
    graph = prepare(model)
    groups = analyze_top(graph, model)
    payload = PrunePlan(config, groups)
    payload.bodies = plan_bodies(model, config, ctx)
    result = Plan(NAME, config, payload=payload)
    everywhere = groups + [g for b in payload.bodies for g in b.plan.groups]
    if not any(g.prunable for g in everywhere):
        result.notes.append("nothing to prune: no channel group the analysis can follow")
    for scope in SCOPES:
        if getattr(config, scope) and not any(g.prunable and g.kind == scope
                                              for g in everywhere):
            result.notes.append(f"{scope}: nothing to prune")
    prunable = [g for g in groups if g.prunable and config.ratio_for(g.kind) > 0]
    if prunable:
        payload.importance = imp.resolve(config.importance, ctx.calibration)
        scores = imp.scores({n.name: n for n in graph.nodes}, prunable, payload.importance,
                            model, ctx.calibration)
        payload.removed = choose(config, prunable, scores)
    for g in groups:
        removed = len(payload.removed.get(g.id, ()))
        if not g.prunable:
            result.rows.append(PlanRow(g.label(), SKIP, g.reason or ""))
        elif removed:
            result.rows.append(PlanRow(g.label(), f"cut {removed} of {g.size} {_unit(g.kind)}"))
        else:
            result.rows.append(PlanRow(g.label(), SKIP, _kept_all(config, g)))
    _body_rows(result, payload, config)
    if config.sparsity > 0:
        for node in sparse_targets(graph, config.sparsity):
            result.rows.append(PlanRow(node.name, f"zero {config.sparsity:.0%} of the weights "
                                                  "(sparsity)"))
    elif not payload.cuts() and any(g.prunable for g in everywhere):
        result.notes.append("ratio removes no channel")
    return result


def _body_rows(result: Plan, payload: PrunePlan, config: Config) -> None:
    """Rows for the groups inside If/Loop/Scan bodies, named ``body <path>: group ...``."""
    for body in payload.bodies:
        for g in body.plan.groups:
            label = f"body {body.label}: {g.label()}"
            removed = len(body.plan.removed.get(g.id, ()))
            if not g.prunable:
                result.rows.append(PlanRow(label, SKIP, g.reason or ""))
            elif removed:
                result.rows.append(PlanRow(label, f"cut {removed} of {g.size} {_unit(g.kind)}"))
            else:
                result.rows.append(PlanRow(label, SKIP, _kept_all(config, g)))
        if body.note and (body.plan.removed or not body.plan.groups):
            result.notes.append(body.note)
        if body.shared:
            names = sorted(body.shared)
            result.notes.append(f"body {body.label}: {len(names)} weight(s) also read elsewhere "
                                f"kept uncut ({names[0]} {body.shared[names[0]]}"
                                f"{' ...' if len(names) > 1 else ''})")


# --- apply ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Layer:
    node: str
    output: str
    channels: tuple[int, ...] | None = None  # producers: the kept output channels


def _layers(nodes: dict[str, gs.Node], group: Group, role: str,
            kept: list[int]) -> list[_Layer]:
    """The weighted layers that read (``in``) or produce (``out``) the group's channels; for
    producers of plain channel groups, the kept output channels."""
    found = []
    for d in group.params():
        node = nodes[d.ref]
        if imp.weight_role(node, d) == role:
            channels = tuple(kept) if role == "out" and d.sub is None else None
            found.append(_Layer(node.name, node.outputs[0].name, channels))
    return found


def _hand_over(graph: gs.Graph, payload: PrunePlan) -> tuple[list[LayerChange], list[dict]]:
    """The layers distill must re-fit (every reader of cut channels, with the teacher channels
    it kept when its own outputs were cut too), and the per-group details for the report.
    Read from the graph before it is cut (a depthwise conv's role depends on its groups)."""
    nodes = {n.name: n for n in graph.nodes}
    details, readers, kept_out = [], [], {}
    for g in payload.groups:
        if g.id not in payload.removed:
            continue
        kept = payload.kept(g)
        consumers, producers = _layers(nodes, g, "in", kept), _layers(nodes, g, "out", kept)
        readers.extend(consumers)
        kept_out.update((p.node, p.channels) for p in producers)  # a later group wins
        details.append({
            "id": g.id, "kind": g.kind, "size": g.size, "kept": kept, "nodes": g.nodes,
            "consumers": [{"node": c.node, "output": c.output} for c in consumers],
            "producers": [{"node": p.node, "output": p.output,
                           "channels": list(p.channels) if p.channels is not None else None}
                          for p in producers]})
    changes: dict[str, LayerChange] = {}
    for layer in readers:
        changes[layer.node] = LayerChange(layer.node, NAME, teacher_output=layer.output,
                                          repair="refit",
                                          teacher_channels=kept_out.get(layer.node))
    return list(changes.values()), details


def apply(model: Model, plan_: Plan, ctx: Context) -> Applied:
    """Cut the planned channels (and zero weights for ``sparsity``); the input model back, with
    ``modified`` False, when the plan changes nothing."""
    payload: PrunePlan = plan_.payload
    config: Config = plan_.config
    if not payload.cuts() and config.sparsity == 0:
        return Applied(model, modified=False)
    # Bodies first: the top-level cut renames unnamed nodes, which body keys are made of.
    inner, body_touched, body_changes, body_details = apply_bodies(model, payload.bodies,
                                                                   _hand_over)
    graph = prepare(inner)
    changes, details = _hand_over(graph, payload)
    changes += body_changes
    touched = cut_graph(graph, payload) + body_touched
    if not touched:
        return Applied(model, modified=False)
    result = finish(graph, inner)
    # onnx's checker serializes the whole model (1.2 GB more resident for clip-vit-b32's 577
    # MB): a large result gets the structural check here, the full one at the end (api).
    large = result.weight_bytes() > CHECKED_WHOLE_BYTES
    onnx.checker.check_model(checks.skeleton(result.proto) if large else result.proto)
    removed = sum(len(v) for v in payload.removed.values())
    notes = [(f"{len(payload.removed)} groups pruned, {removed} channels/heads removed, "
              f"importance {payload.importance}")] if payload.removed else []
    if body_details:
        bodies = sorted({d["body"] for d in body_details})
        cut = sum(d["size"] - len(d["kept"]) for d in body_details)
        used = sorted({b.plan.importance for b in payload.bodies if b.plan.removed})
        notes.append(f"inside {len(bodies)} If/Loop/Scan bod{'y' if len(bodies) == 1 else 'ies'}"
                     f": {len(body_details)} groups pruned, {cut} channels removed, importance "
                     f"{'/'.join(used)}; their boundary kept")
        details.extend(body_details)
    grew = size_note(model, result, NAME)
    if grew:
        notes.append(grew)
    return Applied(result, modified=True, touched=touched, notes=notes, changes=changes,
                   details={"groups": details})


PASS = PassSpec(NAME, Config, plan, apply, Capabilities(needs_calibration=needs_calibration),
                summary="structured pruning: coupled conv channels, attention heads and FFN "
                        "neurons really cut, shape constants rewritten")
