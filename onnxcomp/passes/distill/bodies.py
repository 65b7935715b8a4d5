"""distill's closed-form refit of layers inside If/Loop/Scan bodies.

A body's tensors are not model outputs, so the top-level fit cannot fetch them. Each body holding
a changed layer is run alone on what it received (``subgraphs.record``: the taken If branch,
Loop iterations, Scan slices, nested bodies too), in the student and in the teacher, and run i of
the student's body is paired with run i of the teacher's: the layer's input X comes from the
student, the target Y from the teacher's same tensor, and the same least squares (or bias
correction) as at top level is solved on them (``refit.fit``).

- The teacher's body is found by its owner node's outputs, not its name: the teacher is the
  input model, where cleanup had not named the nodes yet.
- The student is recorded again before each fit, so a fit sees the layers fitted before it (and,
  in a Loop, the carried values they changed).
- Pairing needs both bodies to have run equally often on the data (same If branches taken, same
  trip counts); otherwise the layer is skipped with both counts.
- The fit is solved on the recorded body model (a copy); the new values are written back where
  the tensor lives (the body's own initializer, or an outer one it reads). A weight another node
  also reads (the other branch, a second reader) is not changed for the others: this body's node
  gets a copy of its own.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp import runtime, subgraphs
from onnxcomp.calibration import with_outputs
from onnxcomp.model import Model
from onnxcomp.passes.distill.config import Config
from onnxcomp.passes.distill.layer import Layer
from onnxcomp.pipeline import Context, LayerChange


@dataclass(frozen=True)
class Where:
    """Where a body site lives: its body in the student and the same body in the teacher."""

    key: subgraphs.Key
    teacher_key: subgraphs.Key


def holders(model: Model, node_name: str) -> list[subgraphs.Key]:
    """The bodies (at any depth) whose own nodes include one named ``node_name``."""
    return [body.key for body in subgraphs.all_bodies(model.graph)
            if any(n.name == node_name for n in body.graph.node)]


def teacher_key(student: Model, teacher: Model, key: subgraphs.Key) -> subgraphs.Key | None:
    """The teacher's body matching the student's body ``key``: at each depth the owner node
    with the same op and outputs, the same attribute; None when there is none."""
    s_graph, t_graph, found = student.graph, teacher.graph, ()
    for depth in range(0, len(key), 2):
        s_body = next((b for b in subgraphs.bodies(s_graph, key[:depth])
                       if b.key == key[:depth + 2]), None)
        if s_body is None:
            return None
        owner = s_body.owner
        matches = [(i, n) for i, n in enumerate(t_graph.node)
                   if n.op_type == owner.op_type and list(n.output) == list(owner.output)]
        if len(matches) != 1:
            return None
        index, node = matches[0]
        attr = next((a for a in node.attribute if a.name == s_body.attribute
                     and a.type == onnx.AttributeProto.GRAPH), None)
        if attr is None:
            return None
        found = (*found, subgraphs.node_key(node, index), s_body.attribute)
        s_graph, t_graph = s_body.graph, attr.g
    return found


def body_layer(model: Model, key: subgraphs.Key, node_name: str, need_weight: bool
               ) -> tuple[Model, Layer] | str:
    """The body at ``key`` as a model of its own (outer weights copied in) and the layer named
    ``node_name`` in it, or why it cannot be repaired."""
    located = subgraphs.locate(model, key, {})
    if located is None:
        return "its body is no longer in the graph"
    built = subgraphs.body_model(*located, {})
    node = next(n for n in built.graph.node if n.name == node_name)
    layer = Layer.open(built.proto, node, need_weight=need_weight)
    return layer if isinstance(layer, str) else (built, layer)


def locate(model: Model, teacher: Model, site: LayerChange) -> Where | str:
    """Where the body site lives in both models, or why it cannot be re-fitted."""
    keys = holders(model, site.node)
    if len(keys) != 1:
        return ("node no longer in the graph" if not keys else
                f"node name used in {len(keys)} bodies")
    t_key = teacher_key(model, teacher, keys[0])
    if t_key is None:
        return f"the teacher has no body matching {'/'.join(keys[0])}"
    t_body = subgraphs.find_body(teacher, t_key)
    if not any(site.teacher_output in n.output for n in t_body.graph.node):
        return f"teacher body {'/'.join(t_key)} has no tensor {site.teacher_output!r}"
    return Where(keys[0], t_key)


def record_teacher(teacher: Model, places: list[Where], ctx: Context, config: Config
                   ) -> subgraphs.Recorded:
    """The teacher's body feeds for every body holding a site (once for all sites)."""
    ctx.progress("distill: recording the teacher's If/Loop/Scan bodies")
    return subgraphs.record(teacher, islice(ctx.calibration, config.max_batches),
                            {w.teacher_key for w in places})


def _values(built: Model, feeds: list[subgraphs.Batch], names: list[str]
            ) -> Iterator[dict[str, np.ndarray]]:
    """``names`` for each feed of a body model, a body input read from the feed itself."""
    inputs = {v.name for v in built.graph.input}
    computed = [n for n in dict.fromkeys(names) if n not in inputs]
    session = runtime.session(with_outputs(built, computed), optimize=False) if computed \
        else None
    for feed in feeds:
        got = runtime.run(session, feed, computed) if session is not None else {}
        yield {n: (got[n] if n in got else feed[n]) for n in names}


def fit_site(student: Model, teacher_recorded: subgraphs.Recorded, site: LayerChange,
             where: Where, ctx: Context, config: Config, fit) -> dict | str:
    """Fit one body layer (``fit``: ``refit.fit``) and, unless it raised the layer's own error,
    write the new values into ``student`` (in place). Returns the fit's figures (``reverted``
    when not written) or why it was skipped."""
    t_feeds = teacher_recorded.feeds.get(where.teacher_key)
    t_built = teacher_recorded.models.get(where.teacher_key)
    if not t_feeds or t_built is None:
        why = teacher_recorded.missing.get(where.teacher_key, "got no calibration values")
        return f"the teacher's body {'/'.join(where.teacher_key)} {why}"
    recorded = subgraphs.record(student, islice(ctx.calibration, config.max_batches),
                                {where.key})
    s_feeds, s_built = recorded.feeds.get(where.key), recorded.models.get(where.key)
    if not s_feeds or s_built is None:
        why = recorded.missing.get(where.key, "got no calibration values")
        return f"body {'/'.join(where.key)} {why}"
    if len(s_feeds) != len(t_feeds):
        return (f"body {'/'.join(where.key)} ran {len(s_feeds)} times on the calibration data, "
                f"the teacher's {len(t_feeds)}: runs cannot be paired")
    node = next(n for n in s_built.graph.node if n.name == site.node)
    layer = Layer(s_built.proto, node)
    x_name, y_name = node.input[0], node.output[0]
    triples = ((s[x_name], s[y_name], t[site.teacher_output]) for s, t in zip(
        _values(s_built, s_feeds, [x_name, y_name]),
        _values(t_built, t_feeds, [site.teacher_output])))
    result = fit(triples, site, layer, config)
    if isinstance(result, str):
        return result
    if result["rel_error_after"] > result["rel_error_before"]:
        result.update(reverted=True, rel_error_after=result["rel_error_before"])
        return result
    _write_back(student, where.key, site.node, layer)
    return result


def _readers(graph: onnx.GraphProto, name: str) -> int:
    """How many node inputs read ``name`` in ``graph`` and every body nested in it."""
    count = sum(name in node.input for node in graph.node)
    return count + sum(_readers(b.graph, name) for b in subgraphs.bodies(graph))


def _write_back(student: Model, key: subgraphs.Key, node_name: str, layer: Layer) -> None:
    """Copy the fitted weight and bias from the body model into ``student``'s body."""
    body = subgraphs.find_body(student, key)
    node = next(n for n in body.graph.node if n.name == node_name)
    holders_of = {"weight": node, "bias": node}
    if layer.bias_add is not None:
        holders_of["bias"] = next(n for n in body.graph.node if n.name == layer.bias_add.name)
    fitted = {"weight": layer.weight_name, "bias": layer.bias_name}
    for which, name in fitted.items():
        if name is None:
            continue
        value = numpy_helper.to_array(layer.inits[name])
        holder = holders_of[which]
        # The body model may have given a shared tensor a copy under a new name; the real
        # tensor is the one the real node reads at the same slot.
        slot = list(layer.bias_add.input if which == "bias" and layer.bias_add is not None
                    else layer.node.input).index(name)
        real = holder.input[slot]
        if _readers(student.graph, real) > 1:
            fresh = _fresh_name(student, f"{real}__distill_{node_name}")
            body.graph.initializer.append(numpy_helper.from_array(value, fresh))
            holder.input[slot] = fresh
        else:
            _write_in_place(student, key, real, value)


def _fresh_name(model: Model, wanted: str) -> str:
    taken = {t.name for t in model.graph.initializer}
    for body in subgraphs.all_bodies(model.graph):
        taken |= {t.name for t in body.graph.initializer}
        taken |= {o for n in body.graph.node for o in n.output}
    taken |= {o for n in model.graph.node for o in n.output}
    name, i = wanted, 1
    while name in taken:
        name, i = f"{wanted}_{i}", i + 1
    return name


def _write_in_place(model: Model, key: subgraphs.Key, name: str, value: np.ndarray) -> None:
    """Replace initializer ``name`` where the body at ``key`` sees it: its own scope first,
    then each enclosing one."""
    for depth in range(len(key), -1, -2):
        graph = model.graph if depth == 0 else subgraphs.find_body(model, key[:depth]).graph
        for tensor in graph.initializer:
            if tensor.name == name:
                tensor.CopyFrom(numpy_helper.from_array(value.astype(
                    numpy_helper.to_array(tensor).dtype), name))
                return
    raise ValueError(f"distill: tensor {name!r} of body {'/'.join(key)} not found")
