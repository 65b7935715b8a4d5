"""``every_op``: a fully quantized graph, a QDQ pair on the float activation inputs of every op.

An NPU such as QNN's HTP runs a graph in 8 or 16 bits only where every op's inputs come
through DequantizeLinear and its outputs go to QuantizeLinear; an op left reading float splits
the graph, and that op and the layout changes around it run on the CPU (the QNN EP's
documentation). The Conv/MatMul/Gemm sites and their outputs are what ``match`` and
``output_qdq`` place; here every other top-level op with a float activation input becomes an
activation-only site (``Site`` with no weight): the static rewrite then puts one shared pair on
each of those tensors, calibrated like the rest, so every op reads a DequantizeLinear and every
op's output reaches a QuantizeLinear through its readers. Graph outputs stay float (their
producer's pair is on its inputs). Left float: ops whose result is not float (ArgMax, Equal,
Shape), a Relu/Clip fused into the Conv/MatMul/Gemm before it (its pair is after it), ops
inside If/Loop/Scan bodies (said in a note); skipped with the reason: ops without a name,
excluded ops.

Ops that only move or select values (Reshape, Transpose, Slice, MaxPool, nearest Resize, ...)
give their output the input's range (``share_ranges``): their output values are among their
input's, so the one range covers both sides exactly, and runtimes that require equal
parameters across such ops (HTP for Reshape and Transpose) get them.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from onnxcomp import shape_inference
from onnxcomp.passes.quantize.match import QuantPlan, Site, excluded

# Output values are a subset (or a rearrangement) of the first input's values.
VALUE_PRESERVING = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Identity",
                    "Slice", "Gather", "GatherElements", "GatherND", "Split", "Expand", "Tile",
                    "MaxPool", "GlobalMaxPool", "ReduceMax", "ReduceMin", "DepthToSpace",
                    "SpaceToDepth")
# Q/DQ themselves, shape arithmetic, and the weight-carrying ops the other rewrites own (fused
# Attention, LSTM/GRU/RNN: their inputs are theirs to place).
_NEVER = ("QuantizeLinear", "DequantizeLinear", "Constant", "Shape", "Size", "Attention",
          "LSTM", "GRU", "RNN")


def tensor_types(proto: onnx.ModelProto) -> dict[str, int]:
    """Element type (``TensorProto`` enum) of every tensor shape inference types (graph inputs,
    value_info, outputs, initializers); best effort: what it cannot type is left out."""
    try:
        inferred = shape_inference.inferred(proto)
    except Exception:  # noqa: BLE001 - untyped tensors just get no pair
        inferred = proto.graph
    values = (*inferred.value_info, *inferred.input, *inferred.output)
    types = {v.name: v.type.tensor_type.elem_type for v in values
             if v.type.tensor_type.elem_type}
    types.update((t.name, t.data_type) for t in proto.graph.initializer)
    return types


def float_tensors(proto: onnx.ModelProto) -> set[str]:
    """Names of the tensors typed float32 (``tensor_types``)."""
    return {name for name, kind in tensor_types(proto).items()
            if kind == onnx.TensorProto.FLOAT}


def sites(graph: gs.Graph, floats: set[str], result: QuantPlan,
          exclude: tuple[str, ...]) -> int:
    """Add an activation-only site for every top-level op of ``graph`` not yet a site that
    reads a float activation (a non-constant tensor in ``floats``); returns how many."""
    taken = {s.node for s in result.sites}
    weighted = {s.node for s in result.sites if s.weight_input is not None}
    added = 0
    for node in graph.nodes:
        if node.op in _NEVER or node.name in taken or _fused_activation(node, weighted):
            continue
        inputs = tuple(i for i, tensor in enumerate(node.inputs)
                       if isinstance(tensor, gs.Variable) and tensor.name in floats)
        if not inputs or not node.outputs or node.outputs[0].name not in floats:
            continue  # nothing float to read, or a non-float result (ArgMax, Equal): left
        if not node.name:
            result.skipped.append((f"<unnamed {node.op}>", "every_op: the node has no name"))
            continue
        reason = excluded(node, exclude)
        if reason:
            result.skipped.append((node.name, reason))
            continue
        result.sites.append(Site(node.name, node.op, inputs, None, None, None,
                                 node.outputs[0].name))
        taken.add(node.name)
        added += 1
    bodies = sum(1 for node in graph.nodes for attr in node.attrs.values()
                 if isinstance(attr, gs.Graph))
    if bodies:
        result.notes.append(f"every_op: the ops inside {bodies} If/Loop/Scan bodies keep float "
                            f"inputs (only their Conv/MatMul/Gemm sites are quantized)")
    return added


# A calibrated range reaching this far holds a mask (an attention mask's -10000 or the float
# minimum), not a signal: 256 or 65536 levels over it leave nothing for the scores it is added
# to (tiny-clip's causal text mask: text cosine 0.36 quantized, 0.63 even in uint16).
MASK_MAGNITUDE = 1e4


def without_masks(graph: gs.Graph, quant_plan: QuantPlan, ranges: dict[str, tuple[float, float]]
                  ) -> tuple[QuantPlan, list[str]]:
    """``quant_plan`` with the activation-only sites' inputs (and every output pair) whose
    calibrated range reaches ``MASK_MAGNITUDE`` left float; a site with no input left is
    skipped with the reason. Returns the plan and the tensors left float."""
    nodes = {n.name: n for n in graph.nodes if n.name}

    def masked(name: str | None) -> bool:
        span = ranges.get(name) if name else None
        return span is not None and max(abs(span[0]), abs(span[1])) >= MASK_MAGNITUDE

    sites, skipped, left = [], list(quant_plan.skipped), []
    for site in quant_plan.sites:
        if masked(site.output_qdq):
            left.append(site.output_qdq)
            site = Site(**{**site.__dict__, "output_qdq": None})
        node = nodes.get(site.node)
        if site.weight_input is not None or node is None:
            sites.append(site)
            continue
        kept = tuple(i for i in site.activation_inputs if not masked(node.inputs[i].name))
        left += [node.inputs[i].name for i in site.activation_inputs if i not in kept]
        if kept:
            sites.append(Site(**{**site.__dict__, "activation_inputs": kept}))
        else:
            why = f"every input's range reaches {MASK_MAGNITUDE:g} (a mask): left float"
            skipped.append((site.node, why))
    plan = QuantPlan(quant_plan.mode, sites, skipped, list(quant_plan.notes))
    return plan, sorted(set(left))


def _fused_activation(node: gs.Node, weighted: set[str]) -> bool:
    """A Relu/Clip that is the one reader of a Conv/MatMul/Gemm site's output: runtimes fuse it
    into that op (its pair goes after it, ``placement.output_qdq``), so it gets none between."""
    if node.op not in ("Relu", "Clip") or not node.inputs or not node.inputs[0].inputs:
        return False
    source = node.inputs[0].inputs[0]
    return source.name in weighted and len(node.inputs[0].outputs) == 1


def share_ranges(graph: onnx.GraphProto, ranges: dict[str, tuple[float, float]]) -> int:
    """Each calibrated output of a value-preserving op whose first input is calibrated takes
    that input's range (in place, in graph order so chains share one range); returns how
    many."""
    shared = 0
    for node in graph.node:
        if node.op_type not in VALUE_PRESERVING or not node.input or node.input[0] not in ranges:
            continue
        for output in node.output:
            if output in ranges:
                ranges[output] = ranges[node.input[0]]
                shared += 1
    return shared
