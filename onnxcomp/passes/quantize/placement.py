"""Where static int8 puts QDQ pairs beyond the weight sites ``match`` finds.

- **Feature-map sites** (``conv_adds``): the Adds, squeeze-excitation Muls and Concats of a conv
  net's feature maps, with QDQ pairs on every input and the output, so that ONNX Runtime runs
  ``QLinearAdd`` / ``QLinearMul`` / ``QLinearConcat`` on uint8 instead of DequantizeLinear, a
  float op and QuantizeLinear. A site qualifies when an input comes from a Conv site (after a
  Relu/Clip that ONNX Runtime folds into it, or a nearest-neighbour Resize) or from another
  feature-map site; a squeeze-excitation Mul also needs its other input to be a gate computed
  from a global pooling. A transformer's residual Adds read MatMul and LayerNormalization
  outputs, never a Conv's: they stay float (quantizing the residual stream is what ruins
  transformers, DESIGN.md). A nearest Resize between two quantized tensors gets its input's
  range for its output (``shared_ranges``): ONNX Runtime then drops the pair around it and
  resizes uint8 exactly.
- **Output QDQ** (``output_qdq``): after Conv sites (and MatMuls ONNX Runtime would otherwise
  fuse into a float Gemm), so QLinear kernels chain.
- **Ranges only its readers can tell apart** (``saturation_bounds``): a tensor that only ops
  constant beyond a bound read (HardSwish is 0 below -3, HardSigmoid 0 and 1 outside
  ``[-beta/alpha, (1-beta)/alpha]``, Relu below 0, Clip outside its constants) is calibrated as
  clipped there: the levels that range spent past the bound are given to the values that
  matter, exactly (the readers' outputs are the same for every value past it).

Measured on PP-OCRv4 det (1 thread, interleaved): QLinearAdd on its 11 Adds 0.715x -> 0.662x
float latency, then the 9 squeeze-excitation Muls 0.674x -> 0.654x and the uint8 Resizes with
QLinearConcat 0.708x -> 0.684x, text-mask IoU unchanged (.9684 -> .9687).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp import shape_inference
from onnxcomp.graph import constant_array, graph_nodes
from onnxcomp.passes.quantize.match import QuantPlan, Site, excluded

logger = logging.getLogger(__name__)

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


def tensor_shapes(proto: onnx.ModelProto) -> dict[str, list]:
    """Every tensor's shape that shape inference finds, by name (a dimension: its size, its
    name, or None); best effort: empty where inference fails (a shape then counts as
    unknown)."""
    try:
        inferred = shape_inference.inferred(proto)
    except Exception as exc:  # noqa: BLE001 - unknown shapes keep the safe placement
        logger.debug("quantize: shape inference failed: %s", exc)
        return {}
    found = {}
    for value in (*inferred.value_info, *inferred.input, *inferred.output):
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


def output_qdq(result: QuantPlan, graph: gs.Graph, which: str,
               shapes: dict[str, list], graph_outputs: bool = False) -> None:
    """Give each Conv site, each MatMul feeding a bias Add that ONNX Runtime would otherwise fuse
    into a float Gemm (``_fused_into_float_gemm``) and each activation x activation
    MatMul (every site for ``all``) an output QDQ unless its output already reaches another
    site's quantized input. Without a Q after it, ONNX Runtime turns an activation x activation
    MatMul into MatMulIntegerToFloat, not the QLinearMatMul its own quantizer gets (PP-OCRv4
    rec: the two measured within 1 % at 1 thread, QLinearMatMul 2 % faster at 2).
    ``graph_outputs`` (every_op): a site writing a graph output gets a pair on it too, so the
    op is inside the quantized graph (the output's DequantizeLinear writes the output)."""
    holders = {n.name: body for n, body in graph_nodes(graph) if n.name}
    nodes = {n.name: n for n, _ in graph_nodes(graph) if n.name}
    quantized_inputs = {(s.node, nodes[s.node].inputs[i].name) for s in result.sites
                        for i in s.activation_inputs}
    scoped: dict[int, tuple[dict, set[str]]] = {}  # per graph: its tensors and outputs
    for index, site in enumerate(result.sites):
        holder = holders[site.node]
        if id(holder) not in scoped:
            scoped[id(holder)] = (holder.tensors(), {t.name for t in holder.outputs})
        tensors, outputs = scoped[id(holder)]
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
               and tensor.name not in outputs):
            tensor = tensor.outputs[0].outputs[0]
        if tensor.name in outputs:
            if not (graph_outputs and holder is graph):
                continue
        elif _reaches(tensor, quantized_inputs, outputs):
            continue
        result.sites[index] = Site(**{**site.__dict__, "output_qdq": tensor.name})


# A squeeze-excitation gate: Sigmoid/HardSigmoid of a few ops over a global pooling.
_GATES = ("Sigmoid", "HardSigmoid")
_POOLS = ("GlobalAveragePool", "GlobalMaxPool", "ReduceMean", "ReduceMax")
_GATE_DEPTH = 6


def _is_nearest_resize(node: gs.Node) -> bool:
    return node.op == "Resize" and node.attrs.get("mode", "nearest") == "nearest"


def _source(tensor: gs.Tensor) -> gs.Node | None:
    """The node that computes ``tensor`` before Relu/Clip (folded into a QLinear kernel) and
    nearest Resizes (value-preserving)."""
    node = tensor.inputs[0] if tensor.inputs else None
    while node is not None and (node.op in _FOLDED_ACTIVATIONS or _is_nearest_resize(node)) \
            and node.inputs:
        node = node.inputs[0].inputs[0] if node.inputs[0].inputs else None
    return node


def _is_gate(tensor: gs.Tensor) -> bool:
    node = tensor.inputs[0] if tensor.inputs else None
    if node is None or node.op not in _GATES:
        return False
    for _ in range(_GATE_DEPTH):
        if not node.inputs or not node.inputs[0].inputs:
            return False
        node = node.inputs[0].inputs[0]
        if node.op in _POOLS:
            return True
    return False


def _activations(node: gs.Node) -> bool:
    return (len(node.inputs) >= 2 and all(constant_array(t) is None for t in node.inputs)
            and all(t.dtype in (None, np.float32) for t in node.inputs))


def feature_map_sites(graph: gs.Graph, result: QuantPlan, exclude: tuple[str, ...]) -> None:
    """Add the top-level feature-map sites of ``graph`` (see the module docstring) to
    ``result``, in graph order so that an Add after an Add qualifies."""
    sources = {s.node for s in result.sites if s.op in ("Conv", "ConvTranspose")
               and s.owner is None}
    taken = {s.node for s in result.sites}
    for node in graph.nodes:
        if node.op not in ("Add", "Mul", "Concat") or not node.name or node.name in taken:
            continue
        if not _activations(node) or (node.op != "Concat" and len(node.inputs) != 2):
            continue
        fed = [(found := _source(t)) is not None and found.name in sources for t in node.inputs]
        if node.op == "Concat":
            qualifies = all(fed)
        elif node.op == "Mul":
            qualifies = any(f and _is_gate(other) for f, other in zip(fed, node.inputs[::-1]))
        else:
            qualifies = any(fed)
        if not qualifies:
            continue
        reason = excluded(node, exclude)
        if reason:
            result.skipped.append((node.name, reason))
            continue
        result.sites.append(Site(node.name, node.op, tuple(range(len(node.inputs))), None, None,
                                 None, node.outputs[0].name))
        sources.add(node.name)
        taken.add(node.name)


@dataclass(frozen=True)
class Saturation:
    """Where a tensor's readers stop telling its values apart: every reader's output is the same
    for all values below ``low`` (above ``high``). ``function``: the readers' one function of
    the tensor (they are all the same op with the same constants), for range selection by the
    error of what they compute; None when they differ."""

    low: float
    high: float
    function: Callable[[np.ndarray], np.ndarray] | None


def _hard_swish(x: np.ndarray) -> np.ndarray:
    return x * np.clip(x + 3.0, 0.0, 6.0) / 6.0


def _reader_saturation(node: onnx.NodeProto, constants: dict[str, np.ndarray]
                       ) -> Saturation | None:
    """How ``node`` saturates in its first input, or None when it does not (or that is not
    known: a Clip bound computed at run time)."""
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if node.op_type == "HardSwish":
        return Saturation(-3.0, np.inf, _hard_swish)
    if node.op_type == "Relu":
        return Saturation(0.0, np.inf, lambda x: np.maximum(x, 0.0))
    if node.op_type == "HardSigmoid":
        alpha, beta = float(attrs.get("alpha", 0.2)), float(attrs.get("beta", 0.5))
        if alpha <= 0:
            return None
        return Saturation(-beta / alpha, (1.0 - beta) / alpha,
                          lambda x: np.clip(alpha * x + beta, 0.0, 1.0))
    if node.op_type != "Clip":
        return None
    if "min" in attrs or "max" in attrs:  # opset < 11: attributes
        low, high = float(attrs.get("min", -np.inf)), float(attrs.get("max", np.inf))
    else:
        bounds = []
        for index, default in ((1, -np.inf), (2, np.inf)):
            name = node.input[index] if len(node.input) > index else ""
            if not name:
                bounds.append(default)
            elif name in constants and constants[name].size == 1:
                bounds.append(float(constants[name].reshape(())))
            else:
                return None
        low, high = bounds
    return Saturation(low, high, lambda x: np.clip(x, low, high)) if low <= high else None


def _scalar_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    constants = {i.name: onnx.numpy_helper.to_array(i) for i in graph.initializer
                 if int(np.prod(i.dims)) == 1}
    for node in graph.node:
        if node.op_type == "Constant" and node.output and node.attribute \
                and node.attribute[0].name == "value":
            constants[node.output[0]] = onnx.numpy_helper.to_array(node.attribute[0].t)
    return constants


def saturation_bounds(graph: onnx.GraphProto, names: list[str]) -> dict[str, Saturation]:
    """For each of ``names`` (top-level tensors) whose every reader saturates (HardSwish,
    HardSigmoid, Relu, Clip with constant bounds, reading it as its first input only), the
    union of the readers' live intervals. Graph outputs and tensors with no reader are left
    out, and so is every tensor a QDQ site reads as an activation input (a Conv, MatMul, Add,
    ...: never one of these ops), so the quantized copy has only these readers."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in dict.fromkeys(node.input):
            readers.setdefault(name, []).append(node)
    constants = _scalar_constants(graph)
    outputs = {o.name for o in graph.output}
    found = {}
    for name in names:
        nodes = readers.get(name, [])
        each = [_reader_saturation(n, constants) if n.input[0] == name
                and name not in n.input[1:] else None for n in nodes]
        if name in outputs or not each or any(s is None for s in each):
            continue
        low, high = min(s.low for s in each), max(s.high for s in each)
        if not (np.isfinite(low) or np.isfinite(high)):
            continue
        same = len({(n.op_type, tuple(a.SerializeToString() for a in n.attribute),
                      tuple(n.input[1:])) for n in nodes}) == 1
        found[name] = Saturation(low, high, each[0].function if same else None)
    return found


def shared_ranges(graph: onnx.GraphProto, ranges: dict[str, tuple[float, float]]) -> int:
    """Give each calibrated tensor that a nearest Resize of ``graph`` (top level) writes from a
    calibrated tensor that tensor's range (in place); returns how many. Nearest resizing only
    copies values, so the range is the same, and with equal parameters on both sides ONNX
    Runtime drops the Q/DQ around the Resize and resizes uint8."""
    shared = 0
    for node in graph.node:
        mode = next((a.s.decode() for a in node.attribute if a.name == "mode"), "nearest")
        if (node.op_type == "Resize" and mode == "nearest" and node.input and node.output
                and node.output[0] in ranges and node.input[0] in ranges):
            ranges[node.output[0]] = ranges[node.input[0]]
            shared += 1
    return shared
