"""Control-flow bodies (If branches, Loop and Scan bodies) as models of their own, the values that
feed them on real data, and one body rewrite (loop-invariant carried values).

Calibration (static int8) needs the activations *inside* a body, which ONNX Runtime cannot return
from the model: a body's tensors are not graph outputs. So each body is run alone:
- ``body_model``: the body as a model: its formal inputs, then the outer-scope values it (or a
  body nested in it) reads, as graph inputs typed from the recorded values; outer initializers it
  reads are copied in (a weight stays a weight); the body's outputs as outputs.
- ``record``: the feeds each body gets on the data. The main model runs once per batch with the
  values the bodies need exposed as extra outputs (an If's condition, a Loop's trip count,
  condition and initial carried values, a Scan's states and sequences, and every captured
  value). If: the branch the condition picks gets the batch. Loop: the body is driven in Python
  one iteration at a time (one ONNX Runtime session of the body), the carried values and the
  condition fed back, at most ``MAX_ITERATIONS`` iterations a batch. Scan (opset >= 9): the
  body is driven over the slices along each scan axis (directions honoured), states fed back,
  at most ``MAX_ITERATIONS`` slices. A body keeps at most ``MAX_FEEDS`` feeds.
- nested bodies: a body's own bodies are recorded the same way from its body model and its
  recorded feeds, recursively (``MAX_DEPTH`` levels).

A body that never ran on the data (the untaken branch) gets no feeds and a reason; so does one
that cannot be driven (Scan-8's batched form, a body ONNX Runtime refuses alone). Names are
those of the graph: ONNX forbids a body to shadow an outer name, and sibling bodies that reuse
a name are told apart by ``scopes`` (the caller refuses such names).

``inline_loop_invariants``: a Loop-carried value the body passes through unchanged (Paddle2ONNX
carries a decoder's weights into its Loop that way, ``p2o.loop.input.N``) is the same value in
every iteration: the body reads the outer value directly, and the carried slot is removed when
its final value is not a graph output (readers of that final value read the outer value, which
it always equals).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper

from onnxcomp import shape_inference
from onnxcomp.graph import graph_nodes
from onnxcomp.model import Model

logger = logging.getLogger(__name__)

CONTROL_FLOW = ("If", "Loop", "Scan")
# A Loop/Scan body is driven at most this many iterations per batch of data.
MAX_ITERATIONS = 32
# Feeds kept per body (memory: each holds the values the body reads).
MAX_FEEDS = 256
# Nested bodies are recorded this deep.
MAX_DEPTH = 8

Key = tuple[str, ...]
Batch = dict[str, np.ndarray]


@dataclass(frozen=True)
class Body:
    """One body: ``key`` is the path (owner node, attribute)* from the main graph down."""

    key: Key
    owner: onnx.NodeProto
    attribute: str
    graph: onnx.GraphProto

    @property
    def label(self) -> str:
        return "/".join(self.key)


@dataclass
class Recorded:
    """What ``record`` found: the feeds of each body that ran, and why the others got none."""

    feeds: dict[Key, list[Batch]] = field(default_factory=dict)
    missing: dict[Key, str] = field(default_factory=dict)
    models: dict[Key, Model] = field(default_factory=dict)


def node_key(node: onnx.NodeProto, index: int) -> str:
    return node.name or f"#{index}:{node.op_type}"


def bodies(graph: onnx.GraphProto, prefix: Key = ()) -> list[Body]:
    """The bodies held by ``graph``'s own nodes (not nested deeper)."""
    found = []
    for index, node in enumerate(graph.node):
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                found.append(Body((*prefix, node_key(node, index), attr.name), node, attr.name,
                                  attr.g))
    return found


def _defined(graph: onnx.GraphProto) -> set[str]:
    names = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    names |= {t.values.name for t in graph.sparse_initializer}
    for node in graph.node:
        names.update(o for o in node.output if o)
    return names


def free_names(graph: onnx.GraphProto) -> list[str]:
    """Outer-scope values ``graph`` reads, its nested bodies included, in first-use order."""
    defined = _defined(graph)
    used: list[str] = []
    for node in graph.node:
        used.extend(name for name in node.input if name)
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                used.extend(free_names(attr.g))
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for inner in attr.graphs:
                    used.extend(free_names(inner))
    used.extend(o.name for o in graph.output)
    return [name for name in dict.fromkeys(used) if name not in defined]


def scopes(graph: onnx.GraphProto, prefix: Key = ()) -> dict[str, list[Key]]:
    """Every name defined inside a body (node outputs, formal inputs, initializers) with the
    bodies that define it: more than one when sibling bodies reuse a name."""
    found: dict[str, list[Key]] = {}
    for body in bodies(graph, prefix):
        for name in _defined(body.graph):
            found.setdefault(name, []).append(body.key)
        for name, keys in scopes(body.graph, body.key).items():
            found.setdefault(name, []).extend(keys)
    return found


def _value_info(name: str, value: np.ndarray | None, like: onnx.ValueInfoProto | None = None
                ) -> onnx.ValueInfoProto:
    if value is None:
        return like if like is not None else onnx.ValueInfoProto(name=name)
    value = np.asarray(value)
    elem = helper.np_dtype_to_tensor_dtype(value.dtype)
    # Rank from the recorded value, every size free: other batches may differ.
    return helper.make_tensor_value_info(name, elem, [f"{name}_{i}" for i in range(value.ndim)])


def body_model(model: Model, body: Body, example: Batch) -> Model:
    """``body`` as a model of its own (see the module docstring); ``example`` (one recorded
    feed) types its inputs."""
    graph = onnx.GraphProto()
    graph.CopyFrom(body.graph)
    graph.name = f"{body.label}"
    outer = {t.name: t for t in model.graph.initializer}
    formal = [v.name for v in graph.input]
    del graph.input[:]
    for name in formal:
        graph.input.append(_value_info(name, example.get(name)))
    for name in free_names(body.graph):
        if name in outer:
            graph.initializer.add().CopyFrom(outer[name])
        else:
            graph.input.append(_value_info(name, example.get(name)))
    outputs = [o.name for o in graph.output]
    del graph.output[:]
    graph.output.extend(onnx.ValueInfoProto(name=name) for name in outputs)
    proto = helper.make_model(graph, opset_imports=list(model.proto.opset_import))
    proto.ir_version = model.proto.ir_version
    proto.functions.extend(model.proto.functions)
    return Model(proto, model.source, model.external_data)


def _needed(body: Body) -> list[str]:
    """Outer values the owner's body reads or its driver needs (condition, loop inputs)."""
    names = list(body.owner.input) if body.owner.op_type in ("Loop", "Scan") else [
        body.owner.input[0]]
    return [n for n in dict.fromkeys(names + free_names(body.graph)) if n]


def _scalar_like(value, declared: onnx.ValueInfoProto, dtype) -> np.ndarray:
    """A Loop's iteration number / condition as the body declares it (scalar or [1])."""
    array = np.asarray(value, dtype=dtype)
    shape = declared.type.tensor_type
    if shape.HasField("shape") and len(shape.shape.dim) == 1:
        return array.reshape(1)
    return array.reshape(())


class _Driver:
    """Feeds one body and, for Loop/Scan, runs its iterations with one ORT session."""

    def __init__(self, model: Model, body: Body, recorded: Recorded):
        self.model, self.body, self.recorded = model, body, recorded
        constants = {t.name for t in model.graph.initializer}
        # Outer initializers are copied into the body model, not fed.
        self.captured = [n for n in free_names(body.graph) if n not in constants]
        self.session = None
        self.failed: str | None = None

    def _keep(self, feed: Batch) -> bool:
        feeds = self.recorded.feeds.setdefault(self.body.key, [])
        if len(feeds) >= MAX_FEEDS:
            return False
        feeds.append(feed)
        return True

    def _run(self, feed: Batch) -> dict[str, np.ndarray] | None:
        from onnxcomp import runtime

        if self.failed:
            return None
        try:
            if self.session is None:
                built = body_model(self.model, self.body, feed)
                self.recorded.models[self.body.key] = built
                self.session = runtime.session(built, optimize=False)
            names = [o.name for o in self.body.graph.output]
            return runtime.run(self.session, feed, names)
        except Exception as exc:  # noqa: BLE001 - the caller says why this body stays float
            self.failed = f"its body could not be run alone in ONNX Runtime ({exc})"
            logger.warning("subgraphs: %s: %s", self.body.label, self.failed)
            return None

    def feed(self, values: dict[str, np.ndarray]) -> None:
        """One batch of the enclosing model: the values of ``_needed(body)``."""
        captured = {n: values[n] for n in self.captured}
        op = self.body.owner.op_type
        if op == "If":
            taken = bool(np.asarray(values[self.body.owner.input[0]]).reshape(-1)[0])
            if (self.body.attribute == "then_branch") == taken:
                self._keep(captured)
        elif op == "Loop":
            self._loop(values, captured)
        elif op == "Scan":
            self._scan(values, captured)

    def _loop(self, values: dict[str, np.ndarray], captured: Batch) -> None:
        node, graph = self.body.owner, self.body.graph
        trips = values.get(node.input[0]) if node.input[0] else None
        trips = None if trips is None else int(np.asarray(trips).reshape(-1)[0])
        cond = values.get(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        cond = True if cond is None else bool(np.asarray(cond).reshape(-1)[0])
        carried = [values[name] for name in node.input[2:]]
        formal = list(graph.input)
        for i in range(MAX_ITERATIONS):
            if (trips is not None and i >= trips) or not cond:
                return
            feed = dict(captured)
            feed[formal[0].name] = _scalar_like(i, formal[0], np.int64)
            feed[formal[1].name] = _scalar_like(cond, formal[1], np.bool_)
            feed.update({v.name: value for v, value in zip(formal[2:], carried)})
            if not self._keep(feed):
                return
            out = self._run(feed)
            if out is None:
                return
            names = [o.name for o in graph.output]
            cond = bool(np.asarray(out[names[0]]).reshape(-1)[0])
            carried = [out[name] for name in names[1:1 + len(carried)]]

    def _scan(self, values: dict[str, np.ndarray], captured: Batch) -> None:
        node, graph = self.body.owner, self.body.graph
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        count = int(attrs["num_scan_inputs"])
        states = [values[name] for name in node.input[:len(node.input) - count]]
        sequences = [np.asarray(values[name]) for name in node.input[len(node.input) - count:]]
        axes = list(attrs.get("scan_input_axes", [0] * count))
        directions = list(attrs.get("scan_input_directions", [0] * count))
        formal = list(graph.input)
        length = sequences[0].shape[axes[0] % sequences[0].ndim] if sequences else 0
        for t in range(min(length, MAX_ITERATIONS)):
            feed = dict(captured)
            feed.update({v.name: s for v, s in zip(formal, states)})
            for v, seq, axis, direction in zip(formal[len(states):], sequences, axes,
                                               directions):
                index = length - 1 - t if direction else t
                feed[v.name] = np.take(seq, index, axis=axis % seq.ndim)
            if not self._keep(feed):
                return
            out = self._run(feed)
            if out is None:
                return
            states = [out[o.name] for o in graph.output[:len(states)]]


def _unsupported(body: Body, opset: int) -> str | None:
    if body.owner.op_type not in CONTROL_FLOW:
        return f"{body.owner.op_type} bodies are not driven"
    if body.owner.op_type == "Scan" and opset < 9:
        return "Scan-8 (batched, with sequence_lens) bodies are not driven"
    return None


def record(model: Model, data: Iterable[Batch], wanted: set[Key] | None = None,
           depth: int = 0, prefix: Key = ()) -> Recorded:
    """The feeds of every body of ``model`` (nested ones too) on ``data``; ``wanted``: only
    these bodies and the ones enclosing them (None: all)."""
    from onnxcomp import calibration, runtime

    recorded = Recorded()
    direct = [b for b in bodies(model.graph, prefix)
              if wanted is None or any(w[:len(b.key)] == b.key for w in wanted)]
    if not direct:
        return recorded
    opset = model.opset()
    drivers = []
    for body in direct:
        why = _unsupported(body, opset)
        if why:
            recorded.missing[body.key] = why
        else:
            drivers.append(_Driver(model, body, recorded))
    inputs = {v.name for v in model.graph.input}
    constants = {t.name: t for t in model.graph.initializer}
    exposed = [n for d in drivers for n in _needed(d.body)
               if n not in inputs and n not in constants]
    exposed = list(dict.fromkeys(exposed))
    try:
        sess = runtime.session(calibration.with_outputs(model, exposed), optimize=False) \
            if drivers else None
    except Exception as exc:  # noqa: BLE001 - the bodies stay float, saying why
        for driver in drivers:
            driver.failed = f"the values feeding it could not be exposed ({exc})"
        sess = None
    if sess is not None:
        # Constant driver inputs (an If's condition, a Loop's trip count) are read once.
        control = [n for d in drivers for n in d.body.owner.input
                   if n in constants and n not in inputs]
        fixed = {n: onnx.numpy_helper.to_array(constants[n], model.source or "")
                 for n in control}
        for batch in data:
            values = {**fixed, **batch, **runtime.run(sess, batch, exposed)} if exposed else \
                {**fixed, **batch}
            for driver in drivers:
                driver.feed(values)
    for driver in drivers:
        key = driver.body.key
        if driver.failed:
            recorded.missing[key] = driver.failed
            recorded.feeds.pop(key, None)
        elif not recorded.feeds.get(key):
            recorded.missing[key] = ("never ran on the calibration data" if
                                     driver.body.owner.op_type == "If" else
                                     "ran no iteration on the calibration data")
        elif key not in recorded.models:
            recorded.models[key] = body_model(model, driver.body, recorded.feeds[key][0])
    if depth + 1 >= MAX_DEPTH:
        return recorded
    for body in direct:
        feeds = recorded.feeds.get(body.key)
        inner = bodies(body.graph, body.key)
        if not inner or (wanted is not None and not any(
                len(w) > len(body.key) and w[:len(body.key)] == body.key for w in wanted)):
            continue
        if not feeds:
            for nested in (b.key for b in all_bodies(body.graph, body.key)):
                recorded.missing[nested] = f"its enclosing body {body.label} got no feeds"
            continue
        deeper = record(recorded.models[body.key], feeds, wanted, depth + 1, body.key)
        recorded.feeds.update(deeper.feeds)
        recorded.missing.update(deeper.missing)
        recorded.models.update(deeper.models)
    return recorded


def find_body(model: Model, key: Key) -> Body | None:
    """The body at ``key`` (a path from ``bodies``)."""
    graph, found = model.graph, None
    for depth in range(0, len(key), 2):
        found = next((b for b in bodies(graph, key[:depth]) if b.key == key[:depth + 2]), None)
        if found is None:
            return None
        graph = found.graph
    return found


# ---------------------------------------------------------------------------------------------
# Loop-invariant carried values (a gs rewrite, used by cleanup)


def _passes_through(body: gs.Graph, slot: int) -> bool:
    """Whether the body's carried output ``slot`` is its carried input ``slot`` unchanged
    (directly or through Identity nodes)."""
    source, result = body.inputs[2 + slot], body.outputs[1 + slot]
    for _ in range(8):
        if result is source:
            return True
        if len(result.inputs) != 1 or result.inputs[0].op != "Identity":
            return False
        result = result.inputs[0].inputs[0]
    return False


def _replace_reads(graph: gs.Graph, old: gs.Tensor, new: gs.Tensor) -> int:
    """Every node of ``graph`` (nested bodies too) reading ``old`` reads ``new``; a count."""
    count = 0
    for node in graph.nodes:
        for i, tensor in enumerate(node.inputs):
            if tensor is old:
                node.inputs[i] = new
                count += 1
        for value in node.attrs.values():
            inner = [value] if isinstance(value, gs.Graph) else [
                v for v in value if isinstance(v, gs.Graph)] if isinstance(value, list) else []
            for body in inner:
                count += _replace_reads(body, old, new)
    return count


def inline_loop_invariants(graph: gs.Graph) -> list[tuple[str, str, bool]]:
    """Rewrite each Loop-carried value that the body passes through unchanged into an outer
    reference (see the module docstring), in ``graph`` and its bodies. Returns (loop, initial
    value, slot removed) for each rewritten slot. Float-exact: the body computes on the very
    same values, and a removed slot's final value always equals its initial one."""
    done = []
    for node, holder in list(graph_nodes(graph)):
        if node.op != "Loop" or not isinstance(node.attrs.get("body"), gs.Graph):
            continue
        body: gs.Graph = node.attrs["body"]
        carried = len(node.inputs) - 2
        if carried <= 0 or len(body.inputs) != 2 + carried or len(body.outputs) < 1 + carried:
            continue
        outer_outputs = {t.name for t in holder.outputs}
        for slot in reversed(range(carried)):
            initial, inside = node.inputs[2 + slot], body.inputs[2 + slot]
            if not initial.name or not _passes_through(body, slot) or any(
                    out is inside for k, out in enumerate(body.outputs) if k != 1 + slot):
                continue  # changing, or also another output (which must stay a body value)
            final = node.outputs[slot] if slot < len(node.outputs) else None
            keep = final is not None and final.name in outer_outputs
            if keep and not _replace_reads(body, inside, initial):
                continue  # only the pass-through that keeps the graph output is left
            if keep:
                body.outputs[1 + slot] = inside  # a dead pass-through keeps the output
            else:
                _replace_reads(body, inside, initial)
                if final is not None:  # its readers read the value it always equals
                    _replace_reads(holder, final, initial)
                    node.outputs.pop(slot)
                body.inputs.pop(2 + slot)
                body.outputs.pop(1 + slot)
                node.inputs.pop(2 + slot)
            done.append((node.name, initial.name, not keep))
    return done


def fold_body_transposes(graph: gs.Graph) -> list[str]:
    """Inside If/Loop/Scan bodies, ``Transpose(W)`` of a float constant that nothing else reads
    becomes the transposed constant (GRU weights read through a Transpose in Paddle2ONNX's
    decoder Loop): the one fold done in bodies, where general folding is not, so that their
    MatMuls see a constant weight. The file does not grow (the original goes). Returns the
    folded nodes."""
    folded = []
    for node, holder in list(graph_nodes(graph)):
        if holder is graph or node.op != "Transpose" or len(node.inputs) != 1:
            continue
        source, result = node.inputs[0], node.outputs[0]
        if (not isinstance(source, gs.Constant) or len(source.outputs) != 1
                or not np.issubdtype(np.dtype(source.dtype), np.floating)
                or result.name in {t.name for t in holder.outputs}):
            continue
        values = np.asarray(source.values)
        perm = node.attrs.get("perm")
        transposed = gs.Constant(result.name, np.ascontiguousarray(
            np.transpose(values, list(perm) if perm is not None else None)))
        for reader, _ in graph_nodes(graph):
            for i, tensor in enumerate(reader.inputs):
                if tensor is result:
                    reader.inputs[i] = transposed
        node.inputs.clear()
        node.outputs.clear()
        folded.append(node.name)
    return folded


# ---------------------------------------------------------------------------------------------
# Bodies typed from shape inference, walked at every depth, and their values streamed (used by
# prune and lowrank inside bodies)


def all_bodies(graph: onnx.GraphProto, prefix: Key = ()) -> list[Body]:
    """Every body at every depth, each before the bodies nested in it."""
    found = []
    for body in bodies(graph, prefix):
        found.append(body)
        found.extend(all_bodies(body.graph, body.key))
    return found


def value_types(model: Model) -> dict[str, onnx.ValueInfoProto]:
    """The type of every value shape inference finds (bodies included), by name; best effort:
    empty where inference fails. Sibling bodies reusing a name: the first wins."""
    try:
        graph = shape_inference.inferred(model.proto, data_prop=True)
    except Exception as exc:  # noqa: BLE001 - untyped values only block what needs a shape
        logger.debug("subgraphs: shape inference failed: %s", exc)
        graph = model.proto.graph
    found: dict[str, onnx.ValueInfoProto] = {}

    def collect(graph: onnx.GraphProto) -> None:
        for value in (*graph.input, *graph.value_info, *graph.output):
            if value.type.HasField("tensor_type") and value.name not in found:
                found[value.name] = value
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    collect(attr.g)

    collect(graph)
    return found


def typed_body_model(model: Model, body: Body, types: dict[str, onnx.ValueInfoProto]) -> Model:
    """``body_model`` typed without data: each formal input as the body declares it (else as
    ``types`` has it), each captured value as ``types`` has it (``value_types`` of the model
    holding ``body``, or of the main model for nested bodies); untyped where neither knows."""
    built = body_model(model, body, {})
    declared = {v.name: v for v in body.graph.input}
    for value in built.graph.input:
        known = declared.get(value.name)
        if known is None or not known.type.HasField("tensor_type"):
            known = types.get(value.name)
        if known is not None and known.type.HasField("tensor_type"):
            value.CopyFrom(known)
    return built


def locate(model: Model, key: Key, types: dict[str, onnx.ValueInfoProto]
           ) -> tuple[Model, Body] | None:
    """The body at ``key`` and the model holding it: ``model`` itself for a top-level body,
    else the typed body model of its enclosing body (so that ``body_model`` finds the values
    the enclosing bodies define). ``body.graph`` is then a copy, not ``model``'s own graph
    (``find_body`` gives that)."""
    holder = model
    for depth in range(0, len(key), 2):
        found = next((b for b in bodies(holder.graph, key[:depth]) if b.key == key[:depth + 2]),
                     None)
        if found is None:
            return None
        if depth + 2 == len(key):
            return holder, found
        holder = typed_body_model(holder, found, types)
    return None


def body_activations(built: Model, feeds: list[Batch], names: list[str],
                     on_batch) -> None:
    """``calibration.stream_activations`` on a body model over its recorded feeds; a name that
    is one of its inputs (formal or captured) is read from the feed itself, as ONNX Runtime
    cannot return an input as an output."""
    from onnxcomp import calibration

    inputs = {v.name for v in built.graph.input}
    direct = [n for n in names if n in inputs]
    computed = [n for n in names if n not in inputs]
    if computed:
        def joined(index: int, values: dict[str, np.ndarray]) -> None:
            on_batch(index, {**values, **{n: feeds[index][n] for n in direct}})

        calibration.stream_activations(built, computed, calibration.from_batches(feeds),
                                       joined)
    else:
        for index, feed in enumerate(feeds):
            on_batch(index, {n: feed[n] for n in direct})
