"""``constant_inputs``: the float constants a fully quantized graph's ops read, quantized.

QNN's HTP runs an op in its quantized graph only when every data input comes through a
DequantizeLinear; an Add reading a float bias, a LayerNormalization reading float scale and
bias, a Gather reading a float table falls out of it (to the CPU). After ``every_op`` placed
the activation pairs, each float initializer such an op reads as data is stored quantized and
read through a DequantizeLinear, per tensor, the way ONNX Runtime's QNN quantization config
writes them:

- operands of elementwise ops, Concat inputs, Gather/Expand data, ...: the activation type,
  asymmetric over ``[min(0, v), max(0, v)]`` (``s = (hi - lo) / (2^b - 1)``, ``zp =
  round(-lo / s)``), so 0 and both extremes are on the grid;
- a normalization's scale (LayerNormalization, InstanceNormalization, BatchNormalization
  input 1): 8-bit uint8 even beside 16-bit activations (QNN's A16W8);
- its bias (input 2): int32 with ``s = s_x * s_w`` (the input's and the scale's) and zero
  point 0, as a conv bias.
With ``activation_dtype = int8`` every constant is symmetric int8 (``s = max|v| / 127``).

Left as they are, by design: the weights and biases of Conv/ConvTranspose/MatMul/Gemm (their
weights are the rewrite's; a float conv bias beside quantized inputs is quantized to int32 by
ONNX Runtime itself when it loads the model), inputs QNN reads as parameters (Clip bounds,
Resize scales, Pad's value, BatchNormalization's mean and variance), non-float constants, and
constants holding inf or NaN (an -inf attention mask: no grid holds it; the check lists them).
An op that reads no DequantizeLinear and writes to no QuantizeLinear is not in the quantized
graph, and its constants stay float.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp.graph import unique_name

# Inputs read as op parameters, not data (QNN takes them as static values).
PARAMETERS = {"Clip": (1, 2), "Resize": (1, 2), "Upsample": (1,), "Pad": (1, 2, 3),
              "BatchNormalization": (3, 4)}
NORMALIZATIONS = ("LayerNormalization", "InstanceNormalization", "BatchNormalization")
# Their weights are the static rewrite's; their float biases ONNX Runtime quantizes itself.
_WEIGHTED = ("Conv", "ConvTranspose", "MatMul", "Gemm")
_SKIP = ("QuantizeLinear", "DequantizeLinear", "Constant", *_WEIGHTED)
_LEVELS = {"uint8": (np.uint8, 255), "uint16": (np.uint16, 65535)}


def _in_quantized_graph(node: gs.Node) -> bool:
    reads = any(isinstance(t, gs.Variable) and t.inputs and t.inputs[0].op == "DequantizeLinear"
                for t in node.inputs)
    writes = any(reader.op == "QuantizeLinear" for out in node.outputs for reader in out.outputs)
    return reads or writes


def _float(tensor) -> np.ndarray | None:
    if not isinstance(tensor, gs.Constant):
        return None
    values = np.asarray(tensor.values)
    return values if values.dtype == np.float32 else None


def asymmetric(values: np.ndarray, dtype: str) -> tuple[np.ndarray, float, int]:
    """(quantized values, scale, zero point), per tensor over ``[min(0, v), max(0, v)]``."""
    kind, top = _LEVELS[dtype]
    low, high = min(0.0, float(values.min())), max(0.0, float(values.max()))
    scale = (high - low) / top
    if not scale > 0:  # all zeros
        return np.zeros(values.shape, kind), 1.0, 0
    zero = int(np.clip(round(-low / scale), 0, top))
    q = np.asarray(np.clip(np.round(values / np.float32(scale)) + zero, 0, top), kind)
    return q, scale, zero


def symmetric(values: np.ndarray) -> tuple[np.ndarray, float, int]:
    magnitude = float(np.abs(values).max())
    scale = magnitude / 127 if magnitude > 0 else 1.0
    return np.asarray(np.clip(np.round(values / np.float32(scale)), -127, 127), np.int8), \
        scale, 0


def _scalar_scale(tensor: gs.Tensor) -> float | None:
    """The scale of the DequantizeLinear that writes ``tensor``, when it is one scalar."""
    if not tensor.inputs or tensor.inputs[0].op != "DequantizeLinear":
        return None
    scale = tensor.inputs[0].inputs[1]
    if not isinstance(scale, gs.Constant) or np.asarray(scale.values).size != 1:
        return None
    return float(np.asarray(scale.values).reshape(()))


class _Writer:
    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.made: dict[tuple, gs.Variable] = {}

    def dequantized(self, constant: gs.Constant, q: np.ndarray, scale: float, zero: int,
                    key: tuple) -> gs.Variable:
        if key in self.made:
            return self.made[key]
        name = constant.name
        inputs = [gs.Constant(unique_name(self.graph, f"{name}_quantized"), q),
                  gs.Constant(unique_name(self.graph, f"{name}_scale"),
                              np.asarray(scale, np.float32)),
                  gs.Constant(unique_name(self.graph, f"{name}_zero_point"),
                              np.asarray(zero, q.dtype))]
        out = gs.Variable(unique_name(self.graph, f"{name}_dequantized"), dtype=np.float32,
                          shape=list(q.shape))
        self.graph.nodes.append(gs.Node("DequantizeLinear", unique_name(
            self.graph, f"{name}_DQ"), inputs=inputs, outputs=[out]))
        self.made[key] = out
        return out


def rewrite(graph: gs.Graph, activation_dtype: str) -> int:
    """Quantize the float constants the quantized ops of ``graph`` (top level) read as data;
    returns how many inputs now read a DequantizeLinear. A normalization bias whose input or
    scale is not quantized per tensor stays float (``float_data_inputs`` lists it)."""
    writer = _Writer(graph)
    done = 0
    for node in list(graph.nodes):
        if node.op in _SKIP or not _in_quantized_graph(node):
            continue
        weight_scale = None
        for i, tensor in enumerate(list(node.inputs)):
            values = _float(tensor)
            if values is None or i in PARAMETERS.get(node.op, ()) or values.size == 0 or \
                    not np.all(np.isfinite(values)):  # an -inf mask has no grid: left float
                continue
            if node.op in NORMALIZATIONS and i == 2:
                input_scale = _scalar_scale(node.inputs[0])
                if input_scale is None or weight_scale is None:
                    continue
                scale = input_scale * weight_scale
                q = np.asarray(np.clip(np.round(values / scale), -2**31, 2**31 - 1), np.int32)
                node.inputs[i] = writer.dequantized(tensor, q, scale, 0,
                                                    (id(tensor), "bias", scale))
            else:
                weight = node.op in NORMALIZATIONS and i == 1
                if activation_dtype == "int8":
                    q, scale, zero = symmetric(values)
                else:
                    q, scale, zero = asymmetric(values, "uint8" if weight else activation_dtype)
                if weight:
                    weight_scale = scale
                node.inputs[i] = writer.dequantized(tensor, q, scale, zero,
                                                    (id(tensor), str(q.dtype)))
            done += 1
    return done



def _data_inputs(graph: onnx.GraphProto):
    """(node, input name, its producer or None) for the data inputs of the quantized graph's
    ops (top level), as ``rewrite`` sees them."""
    producers = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type in _SKIP:
            continue
        reads = any(name in producers and producers[name].op_type == "DequantizeLinear"
                    for name in node.input)
        writes = any(r.op_type == "QuantizeLinear" for out in node.output
                     for r in readers.get(out, []))
        if reads or writes:
            for i, name in enumerate(node.input):
                if name and i not in PARAMETERS.get(node.op_type, ()):
                    yield node, name, producers.get(name)


def float_data_inputs(graph: onnx.GraphProto) -> list[tuple[str, str]]:
    """(node, input) for each float32 initializer an op of the quantized graph reads as data:
    what ``rewrite`` left float (or would quantize)."""
    floats = {t.name for t in graph.initializer if t.data_type == onnx.TensorProto.FLOAT}
    return [(node.name, name) for node, name, _ in _data_inputs(graph) if name in floats]


def count(graph: onnx.GraphProto) -> int:
    """Data inputs of the quantized graph's ops that read a stored constant through a
    DequantizeLinear (``rewrite``'s work)."""
    stored = {t.name for t in graph.initializer}
    return sum(1 for _, _, producer in _data_inputs(graph)
               if producer is not None and producer.op_type == "DequantizeLinear"
               and producer.input[0] in stored)
