"""What the quantize pass will touch: a pure match over the graph, with a reason for every skip.

A site is a Conv, MatMul or Gemm (or what ``op_types`` names) reading one activation and one
constant float weight; with ``activation_matmuls`` (static int8 only) also a MatMul whose two
inputs are activations (attention scores and context), both inputs then calibrated per tensor.
Matching never mutates; ``rewrite.py`` does. ``prepare.find_sites`` adds the Gather tables
(``gather.py``) and fused Attention nodes (``attention.py``) to what ``match`` finds here.
"""

from __future__ import annotations

import fnmatch
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp.graph import constant_array, graph_nodes, nested_nodes
from onnxcomp.passes.quantize.int8 import weight_axis

logger = logging.getLogger(__name__)

# Ops that mean the model was quantized already.
QUANTIZED_OPS = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger",
                 "ConvInteger", "MatMulNBits", "QGemm", "MatMulIntegerToFloat",
                 "DynamicQuantizeMatMul", "QAttention", "DynamicQuantizeLSTM"}


def is_quantized_op(op: str) -> bool:
    return op in QUANTIZED_OPS or op.startswith("QLinear")


@dataclass(frozen=True)
class Site:
    """One node to quantize: its activation input(s), its weight and the weight's channel axis."""

    node: str
    op: str
    activation_inputs: tuple[int, ...]  # input positions that read activations
    weight_input: int | None  # None: activation x activation MatMul, no weight
    weight_name: str | None
    axis: int | None  # per-channel axis of the weight (None: per tensor)
    output: str  # the node's output tensor (SQNR is measured on it)
    # static: a tensor after the node to QDQ too (its output, or after a Relu/Clip), so that
    # ONNX Runtime finds DQ -> op -> Q and chains QLinear kernels; None: no output QDQ.
    output_qdq: str | None = None
    # The top-level If/Loop/Scan whose body holds the node (None: the main graph). No per-layer
    # SQNR, GPTQ statistics or bias correction there (body tensors are not model outputs).
    owner: str | None = None
    # The body that holds the node, as a path (owner/attribute, nested ones appended).
    scope: str | None = None


@dataclass
class QuantPlan:
    """The inspectable plan: sites to quantize, nodes skipped with the reason, notes."""

    mode: str
    sites: list[Site] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def without(self, names: set[str], reason: str) -> QuantPlan:
        kept = [s for s in self.sites if s.node not in names]
        dropped = [(s.node, reason) for s in self.sites if s.node in names]
        return QuantPlan(self.mode, kept, self.skipped + dropped, list(self.notes))

    def describe(self) -> list[str]:
        lines = [f"quantize {self.mode}: {len(self.sites)} nodes"]
        lines += [f"  {s.op} {s.node} (weight {s.weight_name}, axis {s.axis})"
                  if s.weight_input is not None else
                  f"  {s.op} {s.node} (activation {'x activation' if s.op == 'MatMul' else 'inputs'})"
                  for s in self.sites]
        lines += [f"  skip {name}: {why}" for name, why in self.skipped]
        lines += [f"  note: {note}" for note in self.notes]
        return lines


def excluded(node: gs.Node, patterns: tuple[str, ...]) -> str | None:
    for pattern in patterns:
        if node.op == pattern or node.name == pattern or fnmatch.fnmatchcase(node.name, pattern):
            return f"excluded by {pattern!r}"
    return None


def _float_constant(tensor: gs.Tensor) -> np.ndarray | None:
    value = constant_array(tensor)
    if value is None or not np.issubdtype(value.dtype, np.floating):
        return None
    return value


# A weight whose largest magnitude is this many times its typical (median non-zero) magnitude
# cannot be quantized: one scale per channel would round the rest of that channel to zero.
# Trained weights measure well under 1e4 (LLM outlier channels included); a flipped exponent bit
# gives 1e30+ (found by fuzzing: int8-dynamic on such a weight, cosine 0.78, exit 0).
MAX_OUTLIER_RATIO = 1e6
# Weights up to this many elements are checked exactly; larger ones on an even sample plus the
# exact maximum of that sample's blocks (reading a large weight in a dry run must stay cheap).
EXACT_CHECK_ELEMENTS = 1 << 24


def extreme_outliers(weight: np.ndarray) -> str | None:
    """Why ``weight`` cannot be quantized (absurd outliers or non-finite values), or None."""
    flat = np.asarray(weight).reshape(-1)
    if flat.size > EXACT_CHECK_ELEMENTS:
        flat = flat[:: flat.size // EXACT_CHECK_ELEMENTS + 1]
    magnitude = np.abs(flat.astype(np.float64))
    if not np.isfinite(magnitude).all():
        return "weight has NaN or Inf values: kept float"
    nonzero = magnitude[magnitude > 0]
    if nonzero.size == 0:
        return None
    typical, largest = float(np.median(nonzero)), float(nonzero.max())
    if largest > MAX_OUTLIER_RATIO * typical:
        return (f"weight outliers too extreme to quantize (max |w| {largest:.3g} vs median "
                f"{typical:.3g}): kept float")
    return None


def match_node(node: gs.Node, mode: str, per_channel: bool, activation_matmuls: bool = False
               ) -> Site | str:
    """The site for ``node``, or why it can't be quantized in ``mode``."""
    found = _match_node(node, mode, per_channel, activation_matmuls)
    if isinstance(found, Site) and found.weight_input is not None:
        weight = _float_constant(node.inputs[found.weight_input])
        problem = extreme_outliers(weight) if weight is not None else None
        if problem:
            return problem
    return found


def _match_node(node: gs.Node, mode: str, per_channel: bool, activation_matmuls: bool
                ) -> Site | str:
    inputs = node.inputs
    if node.op == "Conv":
        if mode == "int4":
            return "int4 is weight-only for MatMul/Gemm"
        if len(inputs) < 2 or (weight := _float_constant(inputs[1])) is None:
            return "weight is not a constant float tensor"
        if constant_array(inputs[0]) is not None:
            return "input is a constant (fold it first)"
        axis = 0 if per_channel and mode == "int8" else None
        return Site(node.name, node.op, (0,), 1, inputs[1].name, axis, node.outputs[0].name)
    if node.op == "MatMul":
        left, right = (_float_constant(t) for t in inputs[:2])
        if left is not None and right is not None:
            return "both inputs are constants (fold it first)"
        if right is None:
            if left is not None:
                return "the weight is the left operand (not supported)"
            if mode != "int8":
                return f"activation x activation (kept float: {mode} quantizes weights only)"
            if not activation_matmuls:
                return "activation x activation (kept float: activation_matmuls = false)"
            if any(t.dtype not in (None, np.float32) for t in inputs[:2]):
                return "activation x activation on non-float32 inputs"
            # Both inputs become uint8 per-tensor QDQ pairs, calibrated like any activation.
            return Site(node.name, node.op, (0, 1), None, None, None, node.outputs[0].name)
        if right.ndim < 2:
            return "weight of rank 1 (no output channels)"
        if right.ndim != 2 and mode != "int8":
            return f"weight of rank {right.ndim} ({mode} needs a 2-D weight)"
        axis = weight_axis("MatMul", node.attrs, right.ndim) if per_channel else None
        return Site(node.name, node.op, (0,), 1, inputs[1].name, axis, node.outputs[0].name)
    if node.op == "Gemm":
        if len(inputs) < 2 or (weight := _float_constant(inputs[1])) is None:
            return "B is not a constant float tensor"
        if constant_array(inputs[0]) is not None:
            return "A is a constant (fold it first)"
        if mode != "int8" and int(node.attrs.get("transA", 0)):
            return "transA=1 (only static int8 handles it)"
        if len(inputs) > 2 and mode != "int8" and constant_array(inputs[2]) is None:
            return "C is not a constant"
        axis = weight_axis("Gemm", node.attrs, weight.ndim) if per_channel else None
        return Site(node.name, node.op, (0,), 1, inputs[1].name, axis, node.outputs[0].name)
    if node.op == "ConvTranspose":
        if mode != "int8":
            return f"ConvTranspose is quantized by static int8 only ({mode})"
        if len(inputs) < 2 or _float_constant(inputs[1]) is None:
            return "weight is not a constant float tensor"
        if constant_array(inputs[0]) is not None:
            return "input is a constant (fold it first)"
        # The weight is [C_in, C_out / group, k...]: output channels on axis 1 (one group).
        grouped = int(node.attrs.get("group", 1)) != 1
        axis = 1 if per_channel and not grouped else None
        return Site(node.name, node.op, (0,), 1, inputs[1].name, axis, node.outputs[0].name)
    return f"{node.op} is not a supported op type"


def _scopes(graph: gs.Graph, prefix: str = "") -> tuple[dict[int, str], dict[str, int]]:
    """The body path of every nested node (by id) and how many bodies define each name
    (node outputs and formal inputs): more than one when sibling bodies reuse it."""
    where: dict[int, str] = {}
    defined: dict[str, int] = {}
    for index, node in enumerate(graph.nodes):
        for value_name, value in node.attrs.items():
            if not isinstance(value, gs.Graph):
                continue
            label = f"{prefix}{node.name or f'#{index}:{node.op}'}/{value_name}"
            names = {t.name for t in value.inputs}
            names.update(t.name for n in value.nodes for t in n.outputs)
            for name in names:
                defined[name] = defined.get(name, 0) + 1
            for inner in value.nodes:
                where[id(inner)] = label
            inner_where, inner_defined = _scopes(value, label + "/")
            where.update(inner_where)
            for name, count in inner_defined.items():
                defined[name] = defined.get(name, 0) + count
    return where, defined


def match(graph: gs.Graph, mode: str, op_types: tuple[str, ...], exclude: tuple[str, ...],
          per_channel: bool, output_qdq: str = "none", activation_matmuls: bool = False,
          shapes: dict[str, list] | None = None, conv_adds: bool = False) -> QuantPlan:
    """The Conv/MatMul/Gemm sites of ``graph`` (bodies included) for ``mode``, and why the
    others are skipped; with ``conv_adds`` (static int8) also the feature-map Adds
    ``_add_sites`` finds. ``shapes``: inferred tensor shapes by name (``tensor_shapes``), for
    the tensors ``graph`` does not type itself."""
    result = QuantPlan(mode)
    seen = set()
    owners = {id(inner): owner for inner, owner in nested_nodes(graph)}
    where, defined = _scopes(graph) if owners else ({}, {})
    for node, _ in graph_nodes(graph):
        if node.op not in op_types:
            continue
        if not node.name or node.name in seen:
            result.skipped.append((node.name or node.outputs[0].name,
                                   "node has no unique name (run cleanup, which names it)"))
            continue
        seen.add(node.name)
        owner = owners.get(id(node))
        reason = excluded(node, exclude)
        site = reason or match_node(node, mode, per_channel, activation_matmuls)
        if isinstance(site, Site) and owner is not None and mode == "int8":
            reused = [node.inputs[i].name for i in site.activation_inputs
                      if defined.get(node.inputs[i].name, 0) > 1]
            if reused:
                site = (f"its input {reused[0]} is a name sibling bodies reuse: its "
                        "calibration would mix two tensors (kept float)")
        if isinstance(site, str):
            logger.debug("quantize: skip %s: %s", node.name, site)
            result.skipped.append((node.name, site))
            continue
        if owner is not None:
            site = Site(**{**site.__dict__, "owner": owner.name, "scope": where.get(id(node))})
        result.sites.append(site)
    if mode == "int8" and conv_adds:
        _add_sites(graph, result, exclude)
    if mode == "int8" and output_qdq != "none":
        _place_output_qdq(result, graph, output_qdq, shapes or {})
    nested = sum(1 for s in result.sites if s.owner is not None)
    if nested:
        how = ("calibrated inside their bodies" if mode == "int8" else "weight-only")
        result.notes.append(f"{nested} sites inside If/Loop/Scan bodies ({how}; no per-layer "
                            "SQNR there, no GPTQ statistics or bias correction: round to "
                            "nearest)")
    return result


def _add_sites(graph: gs.Graph, result: QuantPlan, exclude: tuple[str, ...]) -> None:
    """Add the top-level Adds of two float activations where one input comes straight from a
    Conv/ConvTranspose site (after a Relu/Clip ONNX Runtime folds into it) or from another such
    Add: residual, squeeze-excitation and feature-pyramid Adds of a conv net. Both inputs and
    the output get QDQ pairs, so ONNX Runtime runs QLinearAdd on uint8 instead of two
    DequantizeLinear, a float Add and a QuantizeLinear (PP-OCRv4 det, 11 Adds: 0.715x -> 0.662x
    float latency at 1 thread, text-mask IoU .9724 -> .9722). A transformer's residual Adds
    read MatMul and LayerNormalization outputs, never a Conv's: they stay float (quantizing
    the residual stream is what ruins transformers, DESIGN.md)."""
    sources = {s.node for s in result.sites if s.op in ("Conv", "ConvTranspose")
               and s.owner is None}
    taken = {s.node for s in result.sites}

    def source(tensor: gs.Tensor) -> gs.Node | None:
        node = tensor.inputs[0] if tensor.inputs else None
        while node is not None and node.op in _FOLDED_ACTIVATIONS and node.inputs:
            node = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
        return node

    for node in graph.nodes:
        if (node.op != "Add" or len(node.inputs) != 2 or not node.name or node.name in taken
                or any(constant_array(t) is not None for t in node.inputs)
                or any(t.dtype not in (None, np.float32) for t in node.inputs)):
            continue
        if not any((found := source(t)) is not None and found.name in sources
                   for t in node.inputs):
            continue
        reason = excluded(node, exclude)
        if reason:
            result.skipped.append((node.name, reason))
            continue
        result.sites.append(Site(node.name, "Add", (0, 1), None, None, None,
                                 node.outputs[0].name))
        sources.add(node.name)
        taken.add(node.name)


def reached(plan: QuantPlan, ranges: dict, graph: gs.Graph) -> QuantPlan:
    """Static int8: the plan less the body sites whose calibrated tensors (inputs, output QDQ)
    got no values, each skipped with why (``ranges.missing``: its branch never ran on the
    calibration data, or the body could not be run alone)."""
    missing: dict[str, str] = getattr(ranges, "missing", {})
    nodes = {n.name: n for n, _ in graph_nodes(graph) if n.name}
    dropped: dict[str, str] = {}
    for site in plan.sites:
        if site.owner is None or site.node not in nodes:
            continue
        node = nodes[site.node]
        names = [node.inputs[i].name for i in site.activation_inputs]
        names += [site.output_qdq] if site.output_qdq else []
        absent = [name for name in names if name not in ranges]
        if absent:
            why = missing.get(absent[0], "no calibration value reached it")
            dropped[site.node] = f"inside {site.scope or site.owner}: {why} (kept float)"
    if not dropped:
        return plan
    kept = [s for s in plan.sites if s.node not in dropped]
    result = QuantPlan(plan.mode, kept, plan.skipped + list(dropped.items()), list(plan.notes))
    result.notes.append(f"{len(dropped)} body sites kept float: no calibration data reached "
                        "their body")
    return result


# Ops ONNX Runtime folds into the quantized kernel before an output Q (Relu/Clip with matching
# ranges are dropped), so the output QDQ goes after them.
_FOLDED_ACTIVATIONS = ("Relu", "Clip")
# Ops ONNX Runtime moves a Q across (value-preserving data movement).
_PASSTHROUGH = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", *_FOLDED_ACTIVATIONS)


def _reaches(tensor: gs.Tensor, quantized: set[tuple[str, str]], graph_outputs: set[str]
             ) -> bool:
    """Whether ``tensor`` flows, through single-consumer pass-through ops, into quantized
    inputs only (``quantized``: (node, tensor) pairs the plan quantizes). A tensor some other
    node reads in float (a residual Add beside the next Conv) needs its own output QDQ, which
    every reader then reads: ONNX Runtime fuses DQ -> Conv -> Q only when the Q is the Conv
    output's one reader (measured on the PP-OCR v2.0 direction classifier: its projection
    convs before a residual ran as float Conv behind a DequantizeLinear of their weight)."""
    for _ in range(8):
        readers = [(node.name, tensor.name) for node in tensor.outputs]
        if readers and all(read in quantized for read in readers):
            return True
        if (len(tensor.outputs) != 1 or tensor.outputs[0].op not in _PASSTHROUGH
                or tensor.name in graph_outputs):
            return False
        tensor = tensor.outputs[0].outputs[0]
    return False


def _feeds_bias_add(tensor: gs.Tensor) -> bool:
    """MatMul -> Add(constant): ONNX Runtime fuses the pair into a float Gemm before its QDQ
    fusions run, unless a Q follows the MatMul (then QLinearMatMul -> DQ -> Add)."""
    return (len(tensor.outputs) == 1 and tensor.outputs[0].op == "Add"
            and any(constant_array(t) is not None for t in tensor.outputs[0].inputs))


def tensor_shapes(proto) -> dict[str, list]:
    """Every tensor's shape shape inference finds, by name (a dimension: its size, its name,
    or None); best effort: empty where inference fails (a shape then counts as unknown)."""
    import onnx

    try:
        inferred = onnx.shape_inference.infer_shapes(proto)
    except Exception as exc:  # noqa: BLE001 - unknown shapes keep the safe placement
        logger.debug("quantize: shape inference failed: %s", exc)
        return {}
    found = {}
    for value in (*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output):
        kind = value.type.tensor_type
        if kind.HasField("shape"):
            found[value.name] = [d.dim_value if d.HasField("dim_value") else
                                 (d.dim_param or None) for d in kind.shape.dim]
    return found


def _fused_into_float_gemm(node: gs.Node, shapes: dict[str, list]) -> bool:
    """Whether ONNX Runtime's MatMul + Add fusion would make this MatMul and its bias Add a
    float Gemm when no Q follows the MatMul: its input is 2-D, or N-D with every dimension but
    the last static (the fusion reshapes around the Gemm then). A dynamic batch or sequence
    dimension on an N-D input (transformers) keeps the MatMul an integer kernel
    (MatMulIntegerToFloat) without the output QDQ; an unknown shape is taken as fusable.
    Measured with ONNX Runtime 1.32; ``test_int8.py`` checks each case in its optimized graph."""
    shape = node.inputs[0].shape or shapes.get(node.inputs[0].name)
    if shape is None or len(shape) <= 2:
        return True
    return all(isinstance(dim, int) and dim >= 0 for dim in shape[:-1])


def _place_output_qdq(result: QuantPlan, graph: gs.Graph, which: str,
                      shapes: dict[str, list]) -> None:
    """Give each Conv site, each MatMul feeding a bias Add that ONNX Runtime would otherwise fuse
    into a float Gemm (``_fused_into_float_gemm``) and each activation x activation
    MatMul (every site for ``all``) an output QDQ unless its output already reaches another
    site's quantized input. Without a Q after it, ONNX Runtime turns an activation x activation
    MatMul into MatMulIntegerToFloat, not the QLinearMatMul its own quantizer gets (PP-OCRv4
    rec: the two measured within 1 % at 1 thread, QLinearMatMul 2 % faster at 2)."""
    holders = {n.name: body for n, body in graph_nodes(graph) if n.name}
    nodes = {n.name: n for n, _ in graph_nodes(graph) if n.name}
    quantized_inputs = {(s.node, nodes[s.node].inputs[i].name) for s in result.sites
                        for i in s.activation_inputs}
    scoped: dict[int, tuple[dict, set[str]]] = {}  # per graph: its tensors and outputs
    for index, site in enumerate(result.sites):
        holder = holders[site.node]
        if id(holder) not in scoped:
            scoped[id(holder)] = (holder.tensors(), {t.name for t in holder.outputs})
        tensors, graph_outputs = scoped[id(holder)]
        tensor = tensors[site.output]
        if (which == "conv" and site.op != "Conv" and site.weight_input is not None
                and not (_feeds_bias_add(tensor) and _fused_into_float_gemm(nodes[site.node], shapes))):
            # The output QDQ of a MatMul costs fidelity (MiniLM's FFN outputs carry outliers
            # one uint8 scale cannot hold: cosine 0.947 with it, 0.994 without); it is there
            # only to keep ONNX Runtime from fusing the MatMul into a float Gemm.
            continue
        if which == "conv-only" and site.op != "Conv" and site.weight_input is not None:
            continue  # no output QDQ on MatMul -> bias Add (see docs/quantize.md: MiniLM)
        while (len(tensor.outputs) == 1 and tensor.outputs[0].op in _FOLDED_ACTIVATIONS
               and tensor.name not in graph_outputs):
            tensor = tensor.outputs[0].outputs[0]
        if tensor.name in graph_outputs or _reaches(tensor, quantized_inputs, graph_outputs):
            continue
        result.sites[index] = Site(**{**site.__dict__, "output_qdq": tensor.name})

