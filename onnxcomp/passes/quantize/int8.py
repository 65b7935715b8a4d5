"""int8 rewrites of the quantize pass: static QDQ and dynamic (run-time activation) quantization.

Static (``QuantizeLinear``/``DequantizeLinear`` pairs, the form ONNX Runtime fuses):
- an activation ``x`` read by a planned node becomes ``DQ(Q(x, s, zp), s, zp)`` with uint8,
  ``s = (rmax - rmin) / 255``, ``zp = round(-rmin / s)`` (per tensor, one pair per tensor);
- a weight ``W`` becomes an int8 initializer ``q = clip(round(W / s_c), -127, 127)`` with
  ``s_c = max|W_c| / 127`` per output channel ``c`` (symmetric, zero point 0) and a
  ``DequantizeLinear`` with the channel axis (Conv: 0; MatMul ``[K, N]``: last; Gemm: 0 if transB
  else 1). So ``|DQ(q) - W| <= s_c / 2`` element-wise. A channel with ``s_c < MIN_SCALE``
  (weights under ~1e-28, dead channels of trained nets) is stored as zeros with scale 1.
- biases stay float: ONNX Runtime folds a float Conv bias into QLinearConv itself (checked in the
  tests through the optimized graph).

Dynamic: ``Y = MatMul(A, W)`` becomes ``DynamicQuantizeLinear(A) -> MatMulInteger(A_q, W_q, A_zp)
-> Cast -> Mul(A_s * W_s)``, the pattern ONNX Runtime fuses into ``DynamicQuantizeMatMul``;
a Gemm becomes the same plus ``Add(beta * C)`` (``alpha`` folded into ``W``); a Conv becomes
``ConvInteger`` with a uint8 weight (zero point 128, per tensor, all ORT's CPU kernel takes).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp.graph import unique_name

INT8_MAX = 127
# A channel whose scale would fall under this holds weights below ~1e-28: zeros for any float32
# computation next to normal values. It gets scale 1 and int8 zeros instead, as ONNX Runtime's
# own quantizer does for subnormal scales: ONNX Runtime's integer kernels multiply by
# ``x_scale * w_scale / y_scale``, and a subnormal factor takes the CPU's slow path. Measured on
# PP-OCRv4 rec, whose trained convs have such dead channels (conv2d_180: 14 of 480, max |w|
# ~1e-40): that one QLinearConv ran 1.9x slower with their subnormal scales. The margin over
# float32's smallest normal (1.2e-38) keeps the kernel's combined factor normal too.
MIN_SCALE = 1e-30


def _usable(scale: np.ndarray) -> np.ndarray:
    return np.where(scale >= MIN_SCALE, scale, np.float32(1.0)).astype(np.float32)


def symmetric_int8(weight: np.ndarray, axis: int | None) -> tuple[np.ndarray, np.ndarray]:
    """int8 values and scales (per channel along ``axis``, or one scale if None), zero point 0."""
    weight = np.asarray(weight, dtype=np.float32)
    if axis is None:
        scale = _usable(np.asarray(np.abs(weight).max() / INT8_MAX, dtype=np.float32))
        q = np.clip(np.round(weight / scale), -INT8_MAX, INT8_MAX).astype(np.int8)
        return q, scale
    axis = axis % weight.ndim
    reduce = tuple(i for i in range(weight.ndim) if i != axis)
    scale = _usable((np.abs(weight).max(axis=reduce) / INT8_MAX).astype(np.float32))
    shape = [1] * weight.ndim
    shape[axis] = -1
    q = np.clip(np.round(weight / scale.reshape(shape)), -INT8_MAX, INT8_MAX).astype(np.int8)
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int | None, zero_point=0) -> np.ndarray:
    if axis is None or np.ndim(scale) == 0:
        return (q.astype(np.float32) - zero_point) * scale
    shape = [1] * q.ndim
    shape[axis % q.ndim] = -1
    zp = np.reshape(zero_point, shape) if np.ndim(zero_point) else zero_point
    return (q.astype(np.float32) - zp) * np.reshape(scale, shape)


def weight_axis(op: str, node_attrs: dict, weight_rank: int) -> int:
    if op == "Conv":
        return 0
    if op == "Gemm":
        return 0 if int(node_attrs.get("transB", 0)) else 1
    return weight_rank - 1  # MatMul: [..., K, N], channels are the columns


class QdqWriter:
    """Adds Q/DQ pairs and quantized weights to a gs graph, one pair per tensor."""

    def __init__(self, graph: gs.Graph, taken: set[str] | None = None,
                 made: dict | None = None):
        self.graph = graph
        self.tensors = graph.tensors()
        self.pairs: dict[str, gs.Variable] = {}
        self.weights: dict[tuple[str, int | None], gs.Variable] = {}
        self.bytes_saved = 0
        # ScopedWriters: names unique across every scope, int8 constants shared between scopes.
        self.taken = taken
        self.made = made if made is not None else {}

    def _name(self, base: str) -> str:
        if self.taken is not None:
            name, i = base, 1
            while name in self.taken:
                name, i = f"{base}_{i}", i + 1
            self.taken.add(name)
            return name
        name = unique_name(self.graph, base)
        self.tensors[name] = None  # reserve
        return name

    def activation(self, tensor: gs.Tensor, scale: float, zero_point: int) -> gs.Variable:
        if tensor.name in self.pairs:
            return self.pairs[tensor.name]
        s = gs.Constant(self._name(f"{tensor.name}_scale"), np.asarray(scale, dtype=np.float32))
        zp = gs.Constant(self._name(f"{tensor.name}_zero_point"),
                         np.asarray(zero_point, dtype=np.uint8))
        quantized = gs.Variable(self._name(f"{tensor.name}_quantized"), dtype=np.uint8,
                                shape=tensor.shape)
        dequantized = gs.Variable(self._name(f"{tensor.name}_dequantized"), dtype=np.float32,
                                  shape=tensor.shape)
        self.graph.nodes.append(gs.Node("QuantizeLinear", self._name(f"{tensor.name}_Q"),
                                        inputs=[tensor, s, zp], outputs=[quantized]))
        self.graph.nodes.append(gs.Node("DequantizeLinear", self._name(f"{tensor.name}_DQ"),
                                        inputs=[quantized, s, zp], outputs=[dequantized]))
        self.pairs[tensor.name] = dequantized
        return dequantized

    def weight(self, tensor: gs.Constant, axis: int | None) -> gs.Variable:
        key = (tensor.name, axis)
        if key in self.weights:
            return self.weights[key]
        values = np.asarray(tensor.values, dtype=np.float32)
        made = (id(tensor), axis)  # sibling bodies may reuse a name for another weight
        if made not in self.made:
            q, scale = symmetric_int8(values, axis)
            self.made[made] = (gs.Constant(self._name(f"{tensor.name}_int8"), q),
                              gs.Constant(self._name(f"{tensor.name}_scale"), scale),
                              gs.Constant(self._name(f"{tensor.name}_zero_point"),
                                          np.zeros_like(scale, np.int8)))
        quantized, s, zp = self.made[made]
        dequantized = gs.Variable(self._name(f"{tensor.name}_dequantized"), dtype=np.float32,
                                  shape=list(values.shape))
        attrs = {"axis": int(axis)} if axis is not None else {}
        self.graph.nodes.append(gs.Node("DequantizeLinear", self._name(f"{tensor.name}_DQ"),
                                        attrs=attrs, inputs=[quantized, s, zp],
                                        outputs=[dequantized]))
        self.weights[key] = dequantized
        return dequantized


class ScopedWriters:
    """One ``QdqWriter`` per graph (the main graph, each If/Loop/Scan body): a Q/DQ pair is
    written in the graph of the node that reads it, since ONNX Runtime fuses DQ -> op -> Q only
    within one graph; a weight read in several graphs is quantized once (one set of int8
    constants, one DequantizeLinear per graph); new names are unique across all scopes (a body
    may not shadow an outer name). Without body sites (``scoped`` false) it is the one plain
    writer of the main graph."""

    def __init__(self, graph: gs.Graph, scoped: bool):
        self.graph = graph
        self.taken: set[str] | None = None
        if scoped:
            self.taken = set()
            stack = [graph]
            while stack:
                body = stack.pop()
                self.taken.update(body.tensors())
                for node in body.nodes:
                    self.taken.add(node.name)
                    stack.extend(v for v in node.attrs.values() if isinstance(v, gs.Graph))
        self.made: dict = {}
        self.writers: dict[int, QdqWriter] = {}

    def of(self, holder: gs.Graph) -> QdqWriter:
        if id(holder) not in self.writers:
            self.writers[id(holder)] = QdqWriter(holder, self.taken, self.made)
        return self.writers[id(holder)]


def rewire_consumers(tensor: gs.Tensor, replacement: gs.Tensor, skip_ops=("QuantizeLinear",)
                     ) -> None:
    """Every consumer of ``tensor`` (but its own Q node) reads ``replacement`` instead."""
    for consumer in list(tensor.outputs):
        if consumer.op in skip_ops:
            continue
        for i, value in enumerate(consumer.inputs):
            if value is tensor:
                consumer.inputs[i] = replacement


class Shared:
    """One constant per source tensor and transform: readers of a shared weight (an unrolled LSTM's
    80 Gemms reading 4 weights) get one quantized copy between them, not one each. Keys hold the
    source tensor's id, so they are only valid for one graph import."""

    def __init__(self) -> None:
        self.made: dict[tuple, object] = {}

    def get(self, key: tuple, make):
        if key not in self.made:
            self.made[key] = make()
        return self.made[key]


def dynamic_matmul(graph: gs.Graph, node: gs.Node, weight: np.ndarray, axis: int | None,
                   bias: np.ndarray | None = None, shared: Shared | None = None,
                   key: tuple | None = None, bias_key: tuple | None = None) -> None:
    """Replace a MatMul-like node (activation input 0, float weight [K, N]) by the dynamic form.
    ``key`` / ``bias_key`` name the weight's / bias's source (tensor and transform): nodes with
    the same key share one quantized weight / one bias constant through ``shared``."""
    shared = shared or Shared()
    base = node.name or node.outputs[0].name
    key = key or (id(node),)
    source = node.inputs[1].name or base

    def make_weight():
        q, scale = symmetric_int8(weight, axis)
        return (gs.Constant(unique_name(graph, f"{source}_W_{q.dtype}"), q),
                gs.Constant(unique_name(graph, f"{source}_W_scale"), scale))

    weight_q, weight_scale = shared.get(("dynamic", *key, axis), make_weight)
    bias_const = None
    if bias is not None:
        bias_const = shared.get(("bias", *(bias_key or (id(node),))), lambda: gs.Constant(
            unique_name(graph, f"{base}_bias_value"), bias.astype(np.float32)))
    _replace_by_dynamic_form(graph, node, "MatMulInteger", weight_q=weight_q,
                             weight_scale=weight_scale, bias_value=bias_const)


def dynamic_conv(graph: gs.Graph, node: gs.Node, weight: np.ndarray,
                 bias: np.ndarray | None) -> None:
    """Conv -> DynamicQuantizeLinear + ConvInteger (uint8 weight, zero point 128) + rescale."""
    q, scale = symmetric_int8(weight, None)
    # ORT's CPU ConvInteger takes uint8 weights only: the symmetric int8 values shifted by 128.
    q_u8 = (q.astype(np.int16) + 128).astype(np.uint8)
    bias_value = None
    base = node.name or node.outputs[0].name
    if bias is not None:  # [C] -> [1, C, 1, ...] so it broadcasts over the conv output
        bias_value = gs.Constant(unique_name(graph, f"{base}_bias_value"), bias.astype(
            np.float32).reshape(1, -1, *([1] * (weight.ndim - 2))))
    _replace_by_dynamic_form(graph, node, "ConvInteger", attrs=dict(node.attrs),
                             weight_q=gs.Constant(unique_name(graph, f"{base}_W_uint8"), q_u8),
                             weight_zero_point=np.asarray(128, np.uint8),
                             weight_scale=gs.Constant(unique_name(graph, f"{base}_W_scale"),
                                                      scale),
                             bias_value=bias_value)


def _replace_by_dynamic_form(graph: gs.Graph, node: gs.Node, integer_op: str, *,
                             weight_q: gs.Constant, weight_scale: gs.Constant,
                             weight_zero_point: np.ndarray | None = None,
                             attrs: dict | None = None,
                             bias_value: gs.Constant | None = None) -> None:
    """Replace ``node`` (activation input 0) by DynamicQuantizeLinear(A) -> ``integer_op``(A_q,
    W_q, A_zp[, W_zp]) -> Cast -> Mul(A_s * W_s) [-> Add(bias_value)], into its own output.

    The int32 result is rescaled once, by the activation's run-time scale times the weight
    scale, the form ONNX Runtime fuses. New names are ``<node (else output) name>_<step>``."""
    activation, output = node.inputs[0], node.outputs[0]
    base = node.name or output.name
    name = lambda suffix: unique_name(graph, f"{base}_{suffix}")
    a_q = gs.Variable(name("a_quantized"), dtype=np.uint8)
    a_s = gs.Variable(name("a_scale"), dtype=np.float32)
    a_zp = gs.Variable(name("a_zero_point"), dtype=np.uint8)
    acc = gs.Variable(name("int32"), dtype=np.int32)
    acc_f = gs.Variable(name("float"), dtype=np.float32)
    both = gs.Variable(name("scale"), dtype=np.float32)
    integer_inputs = [a_q, weight_q, a_zp]
    if weight_zero_point is not None:
        integer_inputs.append(gs.Constant(name("W_zero_point"), weight_zero_point))
    nodes = [
        gs.Node("DynamicQuantizeLinear", name("dql"), inputs=[activation],
                outputs=[a_q, a_s, a_zp]),
        gs.Node(integer_op, name(integer_op.lower()), attrs=attrs, inputs=integer_inputs,
                outputs=[acc]),
        gs.Node("Cast", name("cast"), attrs={"to": 1}, inputs=[acc], outputs=[acc_f]),
        gs.Node("Mul", name("scale_mul"), inputs=[a_s, weight_scale], outputs=[both]),
    ]
    node.outputs.clear()
    node.inputs.clear()
    if bias_value is None:
        nodes.append(gs.Node("Mul", name("rescale"), inputs=[acc_f, both], outputs=[output]))
    else:
        scaled = gs.Variable(name("scaled"), dtype=np.float32)
        nodes.append(gs.Node("Mul", name("rescale"), inputs=[acc_f, both], outputs=[scaled]))
        nodes.append(gs.Node("Add", name("bias"), inputs=[scaled, bias_value], outputs=[output]))
    graph.nodes.extend(nodes)
