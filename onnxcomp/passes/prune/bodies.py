"""prune inside If/Loop/Scan bodies: each body is pruned as a graph of its own.

Plan: every body (at any depth) becomes a model of its own (``subgraphs.typed_body_model``: its
formal inputs and the outer values it reads as graph inputs, typed by shape inference; outer
weights it reads copied in). The same analysis runs on it with its inputs and outputs blocked
("crosses the body boundary"), so no shape the enclosing graph sees changes: channels that cross
the boundary are kept. A weight another scope also reads (the other branch, the enclosing graph,
a nested body) is blocked too, never cut for one reader only, and the record says so. Channels
are scored as at top level: activation-aware on the values the body received on the calibration
data (``subgraphs.record``: the taken branch, Loop iterations, Scan slices), by weight magnitude
(l2) where the body never ran (the untaken branch), with a note.

Apply: bodies are cut deepest first (a body's own cut never changes the values its nested bodies
read: those are blocked in it), each through the same ``cut_graph``, and put back in place: the
formal inputs and outputs as declared, the body's own weights in the body, and a cut outer
weight (read by this body alone) written back where it is defined, under its own name.

Limits: ``sparsity`` stays top-level; ``global`` ranking ranks the groups of each body among
themselves. The body layers' ``LayerChange``s go to distill, which re-fits them on the values
their body received (``passes/distill/bodies.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp import calibration, subgraphs
from onnxcomp.model import Model
from onnxcomp.passes.prune import importance as imp
from onnxcomp.passes.prune.analysis import Analysis, prepare
from onnxcomp.passes.prune.config import Config
from onnxcomp.passes.prune.cut import cut_graph, finish
from onnxcomp.passes.prune.select import PrunePlan, choose
from onnxcomp.pipeline import Context

logger = logging.getLogger(__name__)

BOUNDARY = "crosses the body boundary"


@dataclass
class BodyPlan:
    """One body's groups and cuts (``plan.groups`` as the body's own graph names them)."""

    key: subgraphs.Key
    label: str
    plan: PrunePlan
    shared: dict[str, str] = field(default_factory=dict)  # weight -> where else it is read
    note: str | None = None


def _defined(graph: onnx.GraphProto) -> set[str]:
    names = {t.name for t in graph.initializer} | {v.name for v in graph.input}
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def _readers(graph: onnx.GraphProto, key: subgraphs.Key = (),
             found: dict[str, set] | None = None) -> dict[str, set]:
    """Name -> the scopes (body keys, () for the main graph) whose nodes or outputs read it."""
    found = {} if found is None else found
    names = [n for node in graph.node for n in node.input if n]
    if key:
        names += [o.name for o in graph.output]
    for name in names:
        found.setdefault(name, set()).add(key)
    for body in subgraphs.bodies(graph, key):
        _readers(body.graph, body.key, found)
    return found


def _shared(name: str, key: subgraphs.Key, local: set[str], readers: dict[str, set],
            inputs: set[str]) -> str | None:
    """Where else the weight ``name`` read in body ``key`` is read, or None."""
    if name in inputs:
        return "is also a graph input"
    others = readers.get(name, set()) - {key}
    if name in local:  # its own weight: only a nested body can read it too
        others = {s for s in others if s[:len(key)] == key}
    if not others:
        return None
    where = min(others)
    return "is also read in the main graph" if where == () else \
        f"is also read in {'/'.join(where)}"


def _block_weight(analysis: Analysis, node: gs.Node, slot: int, reason: str) -> bool:
    """Block every axis of a node's weight the rules linked (a kernel axis, never linked,
    would only make a group of its own); whether any was."""
    blocked = False
    for axis in range(np.ndim(node.inputs[slot].values)):
        dim = analysis.dim(node, slot, axis)
        if dim in analysis.parent:
            analysis.block(dim, reason)
            blocked = True
    return blocked


def _analyze(built: Model, body: subgraphs.Body, readers: dict[str, set], inputs: set[str]
             ) -> tuple[gs.Graph, list, dict[str, str]]:
    graph = prepare(built)
    analysis = Analysis(graph, boundary=BOUNDARY)
    local = _defined(body.graph)
    shared: dict[str, str] = {}
    for node in graph.nodes:
        for slot, tensor in enumerate(node.inputs):
            if not isinstance(tensor, gs.Constant):
                continue
            why = _shared(tensor.name, body.key, local, readers, inputs)
            if why is None:
                continue
            if _block_weight(analysis, node, slot, f"weight {tensor.name} {why}: kept, not "
                                                   "cut for one reader"):
                shared[tensor.name] = why
    return graph, analysis.groups(), shared


def analyze_top(graph: gs.Graph, model: Model) -> list:
    """The main graph's groups (``analysis.analyze``), with any weight a body also reads
    kept: it is never cut for the main graph's reader alone."""
    analysis = Analysis(graph)
    readers = _readers(model.graph)
    for node in graph.nodes:
        for slot, tensor in enumerate(node.inputs):
            if isinstance(tensor, gs.Constant) and readers.get(tensor.name, set()) - {()}:
                where = "/".join(min(readers[tensor.name] - {()}))
                _block_weight(analysis, node, slot, f"weight {tensor.name} is also read in "
                                                    f"{where}: kept, not cut for one reader")
    return analysis.groups()


def plan_bodies(model: Model, config: Config, ctx: Context) -> list[BodyPlan]:
    """A ``BodyPlan`` per body (empty for a model without bodies). ``model`` is only read."""
    found = subgraphs.all_bodies(model.graph)
    if not found:
        return []
    types = subgraphs.value_types(model)
    readers = _readers(model.graph)
    inputs = {v.name for v in model.graph.input}
    mode = imp.resolve(config.importance, ctx.calibration)
    recorded = None
    result = []
    for body in found:
        located = subgraphs.locate(model, body.key, types)
        if located is None:
            continue
        try:
            built = subgraphs.typed_body_model(*located, types)
            graph, groups, shared = _analyze(built, body, readers, inputs)
        except Exception as exc:  # noqa: BLE001 - this body stays as it is, saying why
            logger.warning("prune: body %s not analysed: %s", body.label, exc)
            result.append(BodyPlan(body.key, body.label, PrunePlan(config, []),
                                   note=f"body {body.label} kept: not analysed ({exc})"))
            continue
        payload = PrunePlan(config, groups)
        entry = BodyPlan(body.key, body.label, payload, shared)
        result.append(entry)
        prunable = [g for g in groups if g.prunable and config.ratio_for(g.kind) > 0]
        if not prunable:
            continue
        used, data, run_model, stream = mode, None, built, None
        if mode == "activation":
            if recorded is None:
                ctx.progress("prune: recording the values If/Loop/Scan bodies receive")
                recorded = subgraphs.record(model, ctx.calibration)
            feeds = recorded.feeds.get(body.key)
            if feeds and body.key in recorded.models:
                run_model, data = recorded.models[body.key], calibration.from_batches(feeds)
                stream = _streamer(feeds)
            else:
                used = "l2"
                why = recorded.missing.get(body.key, "got no calibration values")
                entry.note = (f"body {body.label} {why}: its channels ranked by weight "
                              "magnitude (l2)")
        nodes = {n.name: n for n in graph.nodes}
        try:
            scores = imp.scores(nodes, prunable, used, run_model, data, stream=stream)
        except Exception as exc:  # noqa: BLE001 - ranked by magnitude instead, saying why
            logger.warning("prune: body %s: activation scores failed: %s", body.label, exc)
            used = "l2"
            entry.note = (f"body {body.label} could not be run alone ({exc}): its channels "
                          "ranked by weight magnitude (l2)")
            scores = imp.scores(nodes, prunable, used, built, None)
        payload.importance = used
        payload.removed = choose(config, prunable, scores)
    return result


def _streamer(feeds: list[subgraphs.Batch]):
    def stream(built: Model, names, _data, on_batch) -> None:
        subgraphs.body_activations(built, feeds, list(names), on_batch)
    return stream


# --- apply ------------------------------------------------------------------------------------


def _taken_names(graph: onnx.GraphProto, found: set[str]) -> set[str]:
    found |= _defined(graph)
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _taken_names(attr.g, found)
    return found


def _write_outer(model: Model, key: subgraphs.Key, tensor: onnx.TensorProto) -> None:
    """Replace the outer weight ``tensor.name`` where it is defined (innermost scope first)."""
    for depth in range(len(key) - 2, -1, -2):
        graph = model.graph if depth == 0 else subgraphs.find_body(model, key[:depth]).graph
        for init in graph.initializer:
            if init.name == tensor.name:
                init.CopyFrom(tensor)
                return
    raise ValueError(f"prune: outer weight {tensor.name!r} of body {'/'.join(key)} not found")


def _put_back(model: Model, key: subgraphs.Key, holder: Model, cut: Model) -> None:
    """Write the cut body model back into ``model``'s body at ``key`` (see the module
    docstring)."""
    real = subgraphs.find_body(model, key)
    original = onnx.GraphProto()
    original.CopyFrom(real.graph)
    outer = {t.name: t for t in holder.graph.initializer}
    copied = set(outer) & set(subgraphs.free_names(original))
    taken = _taken_names(model.graph, set()) - _defined(original)
    new = onnx.GraphProto()
    new.CopyFrom(cut.graph)
    new.name = original.name
    del new.input[:]
    new.input.extend(original.input)
    del new.output[:]
    new.output.extend(original.output)
    del new.value_info[:]
    own = []
    for tensor in new.initializer:
        if tensor.name in copied:
            if list(tensor.dims) != list(outer[tensor.name].dims):
                _write_outer(model, key, tensor)
            continue
        if tensor.name in taken:  # a copy the cut made, under a name another scope uses
            fresh, i = f"{tensor.name}_body", 1
            while fresh in taken:
                fresh, i = f"{tensor.name}_body{i}", i + 1
            for node in new.node:
                node.input[:] = [fresh if n == tensor.name else n for n in node.input]
            tensor.name = fresh
        own.append(tensor)
    del new.initializer[:]
    new.initializer.extend(own)
    real.graph.CopyFrom(new)


def apply_bodies(model: Model, plans: list[BodyPlan], hand_over
                 ) -> tuple[Model, list[str], list, list[dict]]:
    """The planned body cuts on a copy of ``model``: the new model, the touched nodes (as
    ``body/node``), the ``LayerChange``s ``hand_over(graph, plan)`` gives for each body (distill
    re-fits them) and the per-group details (with the body)."""
    todo = sorted((p for p in plans if p.plan.removed), key=lambda p: -len(p.key))
    if not todo:
        return model, [], [], []
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    working = Model(proto, model.source, model.external_data)
    types = subgraphs.value_types(model)
    touched, changes, details = [], [], []
    for entry in todo:
        holder, body = subgraphs.locate(working, entry.key, types)
        built = subgraphs.typed_body_model(holder, body, types)
        graph = prepare(built)
        found, groups = hand_over(graph, entry.plan)
        changes.extend(found)
        details.extend({"body": entry.label, **group} for group in groups)
        names = cut_graph(graph, entry.plan)
        _put_back(working, entry.key, holder, finish(graph, built))
        touched.extend(f"{entry.label}/{name}" for name in names)
    return working, touched, changes, details
