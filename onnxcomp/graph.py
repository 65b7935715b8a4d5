"""Small helpers over onnx-graphsurgeon that every pass needs.

Passes edit a ``gs.Graph`` (import → match → rewrite → cleanup/toposort → export). The helpers
here keep the model-level facts (opsets, metadata such as PP-OCR's character list, IR version)
across that round trip and treat weights stored as ``Constant`` nodes like initializers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx_graphsurgeon.logger import G_LOGGER

from onnxcomp.errors import UserError
from onnxcomp.model import Model, read_external, serialized_size

logger = logging.getLogger(__name__)
# onnx-graphsurgeon prints its warnings on stdout ("[W] Could not convert: BFLOAT16 ...", a tip
# about a colour module): our own notes say what matters; its errors still show.
G_LOGGER.severity = G_LOGGER.ERROR

# Ops whose first input is a pure pass-through of values (used to see through to a weight).
_VALUE_PASSTHROUGH = {"Identity"}


class _MappedWeight(np.memmap):
    """A lazy weight's values as read from disk; ``onnx_tensor`` names where they came from."""

    onnx_tensor: onnx.TensorProto | None = None


class _DiskValues(LazyValues):
    """gs's LazyValues for a tensor in external data: read from the model's folder (safely, as a
    read-only map) instead of from the working directory, and never copied into the proto."""

    def __init__(self, tensor: onnx.TensorProto, base_dir: Path):
        super().__init__(tensor)
        self.base_dir = base_dir

    def load(self) -> np.ndarray:
        values = read_external(self.tensor, self.base_dir)
        if isinstance(values, np.memmap):
            values = values.view(_MappedWeight)
            values.onnx_tensor = self.tensor
        return values


def _constants(graph: gs.Graph):
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant):
            yield tensor
    for subgraph in subgraphs(graph):
        yield from _constants(subgraph)


def import_graph(model: Model) -> gs.Graph:
    return import_proto(model.proto, model.source)


def import_proto(proto: onnx.ModelProto, source: Path | None) -> gs.Graph:
    """``gs.import_onnx``, with weights still in external data read from ``source`` (the model's
    folder) when a pass asks for them; never ``gs.import_onnx`` alone, which would read them
    relative to the working directory."""
    graph = gs.import_onnx(proto)
    for const in _constants(graph):
        lazy = const._values
        if (isinstance(lazy, LazyValues) and isinstance(lazy.tensor, onnx.TensorProto)
                and external_data_helper.uses_external_data(lazy.tensor)):
            if source is None:
                raise UserError(f"weight {lazy.tensor.name!r} is in external data but the "
                                    "model's folder is unknown")
            const._values = _DiskValues(lazy.tensor, Path(source))
    return graph


def _keep_on_disk(graph: gs.Graph) -> None:
    """Weights a pass only read go back out as references to their file, not as copies: the map
    is read-only, so values still backed by it are unchanged."""
    for const in _constants(graph):
        values = const._values
        if isinstance(values, _MappedWeight) and values.onnx_tensor is not None:
            const._values = LazyValues(values.onnx_tensor)
        elif not isinstance(values, LazyValues):
            # New values for a tensor imported from external data are written inline.
            const.data_location = None


def export_model(graph: gs.Graph, like: Model) -> Model:
    """Turn a gs graph back into a Model with the original's model-level fields."""
    _keep_on_disk(graph)
    proto = gs.export_onnx(graph, do_type_check=False)
    original = like.proto
    # IR < 4 requires every initializer to be listed as a graph input, which the exported graph
    # (and the initializers cleanup lifts from Constant nodes) does not do: IR 4 drops that rule
    # and changes nothing else a model relies on (found by fuzzing an IR-3 model).
    proto.ir_version = max(original.ir_version, 4)
    proto.producer_name = original.producer_name or "onnxcomp"
    proto.producer_version = original.producer_version
    proto.domain = original.domain
    proto.model_version = original.model_version
    proto.doc_string = original.doc_string
    del proto.metadata_props[:]
    proto.metadata_props.extend(original.metadata_props)
    # Keep every opset the original declared (gs only writes those it saw used).
    declared = {entry.domain: entry.version for entry in proto.opset_import}
    for entry in original.opset_import:
        if entry.domain not in declared:
            proto.opset_import.append(onnx.helper.make_opsetid(entry.domain, entry.version))
    if list(original.functions):
        del proto.functions[:]
        proto.functions.extend(original.functions)
    share_scoped_initializers(proto.graph)
    _keep_io_shapes(proto.graph, original.graph)
    return Model(proto, like.source, like.external_data)


def _keep_io_shapes(graph: onnx.GraphProto, original: onnx.GraphProto) -> None:
    """A graph input/output that lost its shape on the way through onnx-graphsurgeon gets the
    original declaration back: a ``value_info`` entry repeating an output without a shape
    (ddddocr's exporter writes one) overrode it, and onnx's checker refuses a graph output whose
    type has no shape (found by the breadth benchmark: exit 3 on every recipe)."""
    declared = {v.name: v for v in list(original.input) + list(original.output)}
    for value in list(graph.input) + list(graph.output):
        before = declared.get(value.name)
        tensor = value.type.tensor_type
        if (before is not None and value.type.HasField("tensor_type")
                and not tensor.HasField("shape")
                and before.type.tensor_type.HasField("shape")
                and before.type.tensor_type.elem_type == tensor.elem_type):
            value.type.CopyFrom(before.type)


def proto_scopes(graph: onnx.GraphProto) -> list[tuple[onnx.GraphProto, int | None]]:
    """Every graph of the model, depth first, with the index of its enclosing graph."""
    found: list[tuple[onnx.GraphProto, int | None]] = []

    def walk(body: onnx.GraphProto, parent: int | None) -> None:
        index = len(found)
        found.append((body, parent))
        for node in body.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    walk(attr.g, index)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for inner in attr.graphs:
                        walk(inner, index)

    walk(graph, None)
    return found


def share_scoped_initializers(graph: onnx.GraphProto) -> int:
    """Write a tensor read in several scopes once, in the innermost graph enclosing them all.

    gs exports every constant a subgraph's nodes read as that subgraph's own initializer, outer
    ones included: a weight read by both branches of an If, or lifted from a Constant node in an
    outer branch and read by a nested one, came out once per scope (a VAD whose LSTM weights
    are Constant nodes in nested If branches grew 1.44x through cleanup alone). Inner scopes see
    the outer one's names, so one copy serves them all. Only identical tensors of the same name
    are merged (sibling branches may legally reuse a name for different values). Returns how
    many copies were dropped."""
    scopes = proto_scopes(graph)
    if len(scopes) < 2:
        return 0
    where: dict[str, list[tuple[int, int]]] = {}
    for index, (body, _) in enumerate(scopes):
        for position, tensor in enumerate(body.initializer):
            where.setdefault(tensor.name, []).append((index, position))

    def chain(index: int | None) -> list[int]:
        path = []
        while index is not None:
            path.append(index)
            index = scopes[index][1]
        return path[::-1]  # root first

    drop: dict[int, list[int]] = {}
    dropped = 0
    for places in where.values():
        if len({index for index, _ in places}) < 2:
            continue
        first = scopes[places[0][0]][0].initializer[places[0][1]]
        if any(scopes[i][0].initializer[p] != first for i, p in places[1:]):
            continue
        paths = [chain(index) for index, _ in places]
        common = 0
        while all(len(path) > common and path[common] == paths[0][common] for path in paths):
            common += 1
        home = paths[0][common - 1]
        kept = next(((i, p) for i, p in places if i == home), None)
        if kept is None:  # no reader at the common scope itself: move one copy there
            scopes[home][0].initializer.add().CopyFrom(first)
        for index, position in places:
            if (index, position) != kept:
                drop.setdefault(index, []).append(position)
                dropped += 1
    for index, positions in drop.items():
        for position in sorted(positions, reverse=True):
            del scopes[index][0].initializer[position]
    return dropped


def producer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.inputs[0] if tensor.inputs else None


def consumers(tensor: gs.Tensor) -> list[gs.Node]:
    return list(tensor.outputs)


def scalar_constant(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a one-element initializer (a QDQ pair's scale or zero point), else None."""
    if isinstance(tensor, gs.Constant) and np.asarray(tensor.values).size == 1:
        return np.asarray(tensor.values)
    return None


def constant_array(tensor: gs.Tensor) -> np.ndarray | None:
    """The tensor's value if it is a constant (initializer, Constant node, or Identity of one)."""
    seen = 0
    while True:
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        node = producer(tensor)
        if node is None or seen > 8:
            return None
        if node.op == "Constant":
            return _constant_node_value(node)
        if node.op in _VALUE_PASSTHROUGH and node.inputs:
            tensor = node.inputs[0]
            seen += 1
            continue
        return None


def _constant_node_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if "value" in attrs:
        value = attrs["value"]
        return np.asarray(value.values if isinstance(value, gs.Constant) else value)
    for key, dtype in (("value_float", np.float32), ("value_int", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", np.float32), ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(list(attrs[key]), dtype=dtype)
    return None  # sparse_value / string values: left as nodes


def lift_constant_nodes(graph: gs.Graph) -> int:
    """Replace ``Constant`` nodes by initializers so weights look the same in every model.

    paddle2onnx (PP-OCR) and some exporters store every weight as a Constant node; passes
    then see them as ordinary constants. Returns how many nodes were lifted.
    """
    lifted = 0
    output_names = {t.name for t in graph.outputs}
    for node in list(graph.nodes):
        if node.op != "Constant" or len(node.outputs) != 1:
            continue
        out = node.outputs[0]
        if out.name in output_names:
            continue
        value = _constant_node_value(node)
        if value is None:
            continue
        replacement = gs.Constant(out.name, np.asarray(value))
        for consumer in list(out.outputs):
            for i, tensor in enumerate(consumer.inputs):
                if tensor is out:
                    consumer.inputs[i] = replacement
        node.outputs.clear()
        out.name = out.name + "__lifted_away"
        lifted += 1
    for subgraph in subgraphs(graph):
        lifted += lift_constant_nodes(subgraph)
    return lifted


def node_subgraphs(node: gs.Node) -> Iterator[gs.Graph]:
    """The graphs a node holds in its attributes (If branches, Loop/Scan bodies)."""
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, gs.Graph))


def subgraphs(graph: gs.Graph, recursive: bool = False) -> Iterator[gs.Graph]:
    """The one subgraph iterator: bodies of the graph's nodes, nested ones too if ``recursive``."""
    for node in graph.nodes:
        for body in node_subgraphs(node):
            yield body
            if recursive:
                yield from subgraphs(body, recursive=True)


def nested_nodes(graph: gs.Graph) -> Iterator[tuple[gs.Node, gs.Node]]:
    """(node, owner) for every node inside a subgraph at any depth; owner is the top-level
    node (If/Loop/Scan) whose body holds it."""
    for owner in graph.nodes:
        for body in node_subgraphs(owner):
            for inner in body.nodes:
                yield inner, owner
            for inner, _ in nested_nodes(body):
                yield inner, owner


def has_subgraphs(graph: gs.Graph) -> bool:
    return any(True for _ in subgraphs(graph))


def replace_node(graph: gs.Graph, node: gs.Node, new_nodes: list[gs.Node]) -> None:
    """Swap ``node`` for ``new_nodes``, which must already produce ``node``'s output tensors."""
    node.outputs.clear()
    node.inputs.clear()
    graph.nodes.extend(new_nodes)


def tidy(graph: gs.Graph) -> gs.Graph:
    """Remove what no output depends on and order the nodes."""
    return graph.cleanup(remove_unused_graph_inputs=False).toposort()


def name_nodes(graph: gs.Graph) -> list[tuple[str, str]]:
    """Give every unnamed or duplicate-named node, subgraphs included, a stable unique name
    ``<op>_<first output>`` (a counter after it when taken): passes address nodes by name and
    would otherwise skip them. Returns (old name, new name) for each renamed node, in graph
    order (the first holder of a duplicated name keeps it)."""
    everything: list[gs.Node] = []

    def collect(body: gs.Graph) -> None:
        for node in body.nodes:
            everything.append(node)
            for inner in node_subgraphs(node):
                collect(inner)

    collect(graph)
    taken: set[str] = set()
    renamed: list[tuple[str, str]] = []
    pending = []
    for node in everything:
        if node.name and node.name not in taken:
            taken.add(node.name)
        else:
            pending.append(node)
    for node in pending:
        output = next((t.name for t in node.outputs if t.name), "")
        base = f"{node.op}_{output}" if output else node.op
        name, i = base, 1
        while name in taken:
            name, i = f"{base}_{i}", i + 1
        taken.add(name)
        renamed.append((node.name, name))
        node.name = name
    return renamed


def graph_nodes(graph: gs.Graph) -> Iterator[tuple[gs.Node, gs.Graph]]:
    """(node, the graph that holds it) for every node, the bodies of If/Loop/Scan included
    (depth first, each body right after its owner)."""
    for node in list(graph.nodes):
        yield node, graph
        for body in node_subgraphs(node):
            yield from graph_nodes(body)


def stored_bytes(model: Model) -> int:
    """The model's size as saved: the protobuf (graph, inline weights) plus its weights still
    in external data. Graph structure counts: a quantized graph of many small layers can grow
    by its Q/DQ nodes alone."""
    return serialized_size(model.proto) + (model.lazy_bytes() if model.lazy else 0)


def size_note(before: Model, after: Model, pass_name: str) -> str | None:
    """A loud note when a compressing pass made the model larger (None when it did not)."""
    old, new = stored_bytes(before), stored_bytes(after)
    if new <= old:
        return None
    return (f"WARNING: {pass_name} made the model larger: {old} -> {new} bytes "
            f"({new / max(old, 1):.2f}x); this output is not worth it")


class NodeIndex:
    """Producer and readers of every tensor of one ``GraphProto`` (its own nodes, not its
    bodies'), for matchers that read protos without importing a gs graph."""

    def __init__(self, graph: onnx.GraphProto):
        self.producer = {out: node for node in graph.node for out in node.output if out}
        self.readers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                if name:
                    self.readers.setdefault(name, []).append(node)

    def made_by(self, name: str, op: str, domain: str = "") -> onnx.NodeProto | None:
        """The node writing ``name`` if it is ``op`` of ``domain`` ("" is the ONNX domain)."""
        node = self.producer.get(name)
        if node is None or node.op_type != op:
            return None
        return node if (node.domain or "ai.onnx") == (domain or "ai.onnx") else None


def node_attr(node: onnx.NodeProto, name: str, default=None):
    """The value of ``node``'s attribute ``name``, or ``default``."""
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def unique_name(graph: gs.Graph, base: str) -> str:
    names = graph.tensors().keys() | {n.name for n in graph.nodes}
    if base not in names:
        return base
    i = 1
    while f"{base}_{i}" in names:
        i += 1
    return f"{base}_{i}"


def set_constant(graph: gs.Graph, node: gs.Node, slot: int, values: np.ndarray,
                 suffix: str = "new") -> gs.Constant:
    """Copy-on-write: give ``node``'s input ``slot`` new values. A constant no other node (or
    other slot) reads is changed in place; a shared one is left to its other readers and this
    node gets its own copy, so one layer's edit never changes another layer."""
    const = node.inputs[slot]
    if not isinstance(const, gs.Constant):
        raise TypeError(f"input {slot} of {node.name!r} is not a constant")
    uses = sum(1 for user in const.outputs for t in user.inputs if t is const)
    if uses <= 1 and const.name not in {t.name for t in graph.outputs}:
        const.values = values
        return const
    copy = gs.Constant(unique_name(graph, f"{const.name}_{suffix}"), values)
    node.inputs[slot] = copy
    return copy


def readers(tensor: gs.Tensor) -> int:
    """How many node inputs read ``tensor`` (a node reading it twice counts twice)."""
    return sum(1 for user in tensor.outputs for t in user.inputs if t is tensor)


@dataclass(frozen=True)
class LinearWeight:
    """A MatMul/Gemm's constant weight as a [K, N] matrix ``x @ matrix`` (Gemm's transB and
    alpha folded in), with the bias ``beta * C`` when Gemm has one."""

    tensor: gs.Constant | gs.Tensor
    matrix: np.ndarray
    bias: np.ndarray | None
    transposed: bool   # Gemm transB = 1: the stored tensor is [N, K]
    alpha: float


def linear_weight(node: gs.Node) -> LinearWeight | str:
    """The one Gemm/MatMul weight accessor: the [K, N] weight, or why there is none."""
    if node.op not in ("MatMul", "Gemm") or len(node.inputs) < 2:
        return f"{node.op} with {len(node.inputs)} inputs is not a linear layer"
    weight = constant_array(node.inputs[1])
    if weight is None:
        if constant_array(node.inputs[0]) is not None:
            return "the constant is the left operand"
        return "the weight is not a constant (activation x activation)"
    if constant_array(node.inputs[0]) is not None:
        return "both operands are constants"
    if not np.issubdtype(weight.dtype, np.floating):
        return f"weight dtype {weight.dtype} is not float"
    if weight.ndim != 2:
        return f"weight has {weight.ndim} dims, not 2"
    if node.op == "MatMul":
        return LinearWeight(node.inputs[1], weight, None, False, 1.0)
    if int(node.attrs.get("transA", 0)):
        return "Gemm with transA=1"
    transposed = bool(int(node.attrs.get("transB", 0)))
    alpha = float(node.attrs.get("alpha", 1.0))
    matrix = (weight.T if transposed else weight)
    if alpha != 1.0:
        matrix = matrix * np.asarray(alpha, matrix.dtype)
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        c = constant_array(node.inputs[2])
        if c is None:
            return "Gemm's C is not a constant"
        bias = c * np.asarray(float(node.attrs.get("beta", 1.0)), c.dtype)
    return LinearWeight(node.inputs[1], matrix, bias, transposed, alpha)


def weight_count(graph: gs.Graph) -> int:
    """Elements in all constants (initializers, incl. lifted ones): the graph-level twin of
    ``Model.parameter_count`` (the one count; see model.py)."""
    total = 0
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and tensor.dtype != np.int64:
            total += int(np.prod(tensor.shape)) if tensor.shape is not None else 0
    return total
