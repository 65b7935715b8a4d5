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
          per_channel: bool, activation_matmuls: bool = False) -> QuantPlan:
    """The Conv/MatMul/Gemm sites of ``graph`` (bodies included) for ``mode``, and why the
    others are skipped. Static int8's feature-map sites and output QDQ pairs are placed after
    this by ``placement``."""
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
    nested = sum(1 for s in result.sites if s.owner is not None)
    if nested:
        how = ("calibrated inside their bodies" if mode == "int8" else "weight-only")
        result.notes.append(f"{nested} sites inside If/Loop/Scan bodies ({how}; no per-layer "
                            "SQNR there, no GPTQ statistics or bias correction: round to "
                            "nearest)")
    return result


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
