"""lower: rewrites for the runtime that will run the model, after every other step. Today one,
for ONNX Runtime's CPU execution provider: a static-int8 MatMul and the bias Add after it become
one ``com.microsoft.MatMulIntegerToFloat`` with the bias as its seventh input.

Why. ONNX Runtime turns ``DequantizeLinear(x_q) -> MatMul <- DequantizeLinear(W_q)`` (no
QuantizeLinear after it: a transformer's 3-D MatMuls) into ``MatMulIntegerToFloat`` itself, but
leaves the bias ``Add`` after it as a separate float op. The fusion that would take the bias
(``MatMulIntegerToFloatFusion``) matches ``MatMulInteger -> Cast -> Mul(Mul(scale_x, scale_W))
-> Add``, and in a static graph both scales are constants, so ONNX Runtime's constant folding
removes the inner ``Mul`` first and the pattern never matches (checked on all-MiniLM-L6-v2: 36
``MatMulInteger`` and 51 ``Add`` left). Writing the fused op directly is exact::

    y = ((x_q - zp_x) * s_x) @ ((W_q - zp_W) * s_W) + b

is what both forms compute, with the same integer kernel (outputs bit-identical on MiniLM and
PP-OCRv4 rec). Measured (benchmarks/quantize_vs_ort.py, docs/quantize.md): MiniLM static int8
0.418x -> 0.390x float latency at 1 thread (36 bias Adds gone), PP-OCRv4 rec 0.570x -> 0.565x
(9 of its MatMuls).

What it matches: a MatMul whose inputs are both ``DequantizeLinear`` outputs, the activation's
per-tensor uint8, the weight's a 2-D int8 (or uint8) initializer quantized per tensor or per
output column (``axis`` 1, no ``block_size``), float32 scales, and whose only reader is an
``Add`` of a 1-D float32 initializer of the weight's column count (> 1: ONNX Runtime's own rule
for a bias). The activation's ``DequantizeLinear`` stays while something else reads it.
Everything else is left as it is with the reason in the plan; If/Loop bodies are not walked
(said in the notes).

The result runs in ONNX Runtime only (a contrib op), so the ``ort-cpu`` target appends this step
to a recipe that quantizes in static int8 (``--set lower.matmul_bias=false`` turns it off) and
the other targets refuse it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

from onnxcomp.errors import UserError
from onnxcomp.graph import NodeIndex, node_attr
from onnxcomp.model import Model
from onnxcomp.pipeline import SKIP, Applied, Capabilities, Context, PassSpec, Plan, PlanRow, option

NAME = "lower"
MICROSOFT = "com.microsoft"
ACTION = "MatMul + bias Add -> MatMulIntegerToFloat"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    matmul_bias: bool = option(True, "fold the bias Add after a static-int8 MatMul into ONNX "
                                     "Runtime's MatMulIntegerToFloat (com.microsoft)")

    def __post_init__(self) -> None:
        if not isinstance(self.matmul_bias, bool):  # the contract: ValueError names it
            raise ValueError(  # noqa: TRY004
                f"matmul_bias must be true or false, got {self.matmul_bias!r}")

    @classmethod
    def from_short(cls, arg: str | None) -> Config:
        if arg:
            raise ValueError(f"lower takes no argument in the short form, got {arg!r}")
        return cls()


@dataclass(frozen=True)
class Site:
    """One MatMul to lower (its name), with its DequantizeLinear inputs and the bias Add it
    absorbs, each node by its first output (unique in a valid graph, named or not)."""

    matmul: str
    matmul_output: str
    activation_dq: str
    weight_dq: str
    add: str
    bias: str


class _Graph(NodeIndex):
    """The node index plus initializer facts of one graph (dims only: no weight is read)."""

    def __init__(self, graph: onnx.GraphProto):
        super().__init__(graph)
        self.inits = {t.name: t for t in graph.initializer}
        self.outputs = {o.name for o in graph.output}

    def init(self, name: str, dtype: int) -> TensorProto | None:
        tensor = self.inits.get(name)
        return tensor if tensor is not None and tensor.data_type == dtype else None


def _size(tensor: TensorProto) -> int:
    size = 1
    for dim in tensor.dims:
        size *= dim
    return size


def _activation_reason(g: _Graph, dq: onnx.NodeProto) -> str | None:
    scale = g.init(dq.input[1], TensorProto.FLOAT)
    if scale is None or _size(scale) != 1:
        return "the activation's DequantizeLinear is not per-tensor with a float32 scale"
    zero = g.init(dq.input[2], TensorProto.UINT8) if len(dq.input) > 2 and dq.input[2] else None
    if zero is None or _size(zero) != 1:
        return "the activation is not uint8 with a constant zero point"
    return None


def _weight_reason(g: _Graph, dq: onnx.NodeProto) -> str | None:
    # uint8 (zero point 128) where quantize's u8s8_remedy = u8u8 moved the layer: u8 x u8.
    weight = g.init(dq.input[0], TensorProto.INT8) or g.init(dq.input[0], TensorProto.UINT8)
    if weight is None or len(weight.dims) != 2:
        return "the weight is not a 2-D int8 or uint8 initializer"
    if node_attr(dq, "block_size", 0):
        return "the weight is quantized by blocks"
    scale = g.init(dq.input[1], TensorProto.FLOAT)
    columns = weight.dims[1]
    per_column = scale is not None and len(scale.dims) == 1 and scale.dims[0] == columns \
        and node_attr(dq, "axis", 1) in (1, -1)
    if scale is None or not (_size(scale) == 1 and len(scale.dims) <= 1 or per_column):
        return "the weight's scale is neither per-tensor nor per output column"
    if len(dq.input) > 2 and dq.input[2]:
        zero = g.init(dq.input[2], weight.data_type)
        if zero is None or list(zero.dims) != list(scale.dims):
            return "the weight's zero point is not a constant of its type shaped like its scale"
    return None


def _bias(g: _Graph, matmul: onnx.NodeProto, columns: int) -> tuple[onnx.NodeProto | None, str]:
    """The Add that adds a bias to the MatMul's output (and the bias's name), or why not."""
    readers = g.readers.get(matmul.output[0], [])
    if matmul.output[0] in g.outputs or len(readers) != 1 or readers[0].op_type != "Add" \
            or readers[0].domain:
        return None, "no bias Add is the output's only reader (ONNX Runtime fuses it alone)"
    add = readers[0]
    other = add.input[1] if add.input[0] == matmul.output[0] else add.input[0]
    bias = g.init(other, TensorProto.FLOAT)
    if bias is None or list(bias.dims) != [columns] or columns < 2:
        return None, "the Add's other input is not a 1-D float32 bias of the output's width"
    return add, other


def match(graph: onnx.GraphProto) -> tuple[list[Site], list[PlanRow]]:
    """The MatMuls to lower and a plan row for every MatMul (pure)."""
    g = _Graph(graph)
    sites, rows = [], []
    for node in graph.node:
        if node.op_type != "MatMul" or node.domain:
            continue
        name = node.name or node.output[0]
        act = g.made_by(node.input[0], "DequantizeLinear")
        weight = g.made_by(node.input[1], "DequantizeLinear")
        if act is None or weight is None:
            reason = "not a static-int8 MatMul (no DequantizeLinear on both inputs)"
        else:
            reason = _activation_reason(g, act) or _weight_reason(g, weight)
        add, bias = (None, "")
        if reason is None:
            add, bias = _bias(g, node, g.inits[weight.input[0]].dims[1])
            reason = None if add is not None else bias
        if reason is not None:
            logger.debug("lower: skip %s: %s", name, reason)
            rows.append(PlanRow(name, SKIP, reason))
            continue
        sites.append(Site(name, node.output[0], act.output[0], weight.output[0], add.output[0],
                          bias))
        rows.append(PlanRow(name, ACTION, f"bias {bias}"))
    return sites, rows


def plan(model: Model, config: Config, ctx: Context) -> Plan:
    """One row per MatMul: lowered, or why not. Pure."""
    quantized = any(node.op_type == "DequantizeLinear" for node in model.graph.node)
    sites, rows = match(model.graph) if config.matmul_bias and quantized else ([], [])
    result = Plan(NAME, config, rows=rows, payload=sites)
    if not config.matmul_bias:
        result.notes.append("matmul_bias = false: nothing to lower")
    elif not quantized:
        # a float model (or a dry run, planned on the input): no row per MatMul, one line
        result.notes.append("nothing to lower: no DequantizeLinear in the graph (this step "
                            "lowers what quantize int8 writes)")
    elif not sites:
        result.notes.append("nothing to lower: no static-int8 MatMul with a bias Add")
    if any(a.type == onnx.AttributeProto.GRAPH or a.type == onnx.AttributeProto.GRAPHS
           for node in model.graph.node for a in node.attribute):
        result.notes.append("If/Loop/Scan bodies are not walked: their MatMuls stay as they are")
    return result


def apply(model: Model, plan_: Plan, ctx: Context) -> Applied:
    """Each site's MatMul becomes MatMulIntegerToFloat writing the Add's output; the Add goes,
    and so does a DequantizeLinear nothing reads any more."""
    sites: list[Site] = plan_.payload
    if not sites:
        return Applied(model, False, notes=list(plan_.notes))
    result = model.copy()
    graph = result.graph
    nodes = {node.output[0]: node for node in graph.node if node.output}
    fused, dropped = {}, set()
    for site in sites:
        act, weight = nodes[site.activation_dq], nodes[site.weight_dq]
        weight_zero = weight.input[2] if len(weight.input) > 2 else ""
        inputs = [act.input[0], weight.input[0], act.input[1], weight.input[1], act.input[2],
                  weight_zero, site.bias]
        fused[site.matmul_output] = helper.make_node(
            "MatMulIntegerToFloat", inputs, [site.add], name=site.matmul, domain=MICROSOFT)
        dropped.add(site.add)
    kept = [fused.get(node.output[0], node) if node.output else node for node in graph.node
            if not (node.output and node.output[0] in dropped)]
    read = {name for node in kept for name in node.input} | {o.name for o in graph.output}
    kept = [node for node in kept
            if not (node.op_type == "DequantizeLinear" and node.output[0] not in read)]
    del graph.node[:]
    graph.node.extend(kept)
    if not any(op.domain == MICROSOFT for op in result.proto.opset_import):
        result.proto.opset_import.append(helper.make_opsetid(MICROSOFT, 1))
    notes = [(f"{len(sites)} MatMul + bias Add -> MatMulIntegerToFloat; the graph now needs "
              "ONNX Runtime (com.microsoft ops)"), *plan_.notes]
    return Applied(result, True, touched=[s.matmul for s in sites],
                   skipped=plan_.skipped(), notes=notes)


def refuse_for(target_name: str, runtime_name: str) -> UserError:
    """The error for a recipe with ``lower`` on a target that does not run ONNX Runtime's CPU
    contrib ops."""
    return UserError(f"target {target_name} ({runtime_name}) does not run ONNX Runtime's CPU "
                     "contrib ops that 'lower' writes: drop 'lower' from the recipe")


PASS = PassSpec(
    NAME, Config, plan, apply,
    Capabilities(lazy_weights=True,
                 notes="appended by the ort-cpu target after static int8; the result runs in "
                       "ONNX Runtime only"),
    summary="rewrites for ONNX Runtime's CPU provider: static-int8 MatMul + bias Add -> "
            "MatMulIntegerToFloat",
)
