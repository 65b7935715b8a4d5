"""Tiny graphs for the prune tests and benchmark, built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.model import Model


class _Builder:
    def __init__(self, seed: int):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.constant_nodes = False

    def weight(self, name: str, shape, scale: float = 0.5, positive: bool = False) -> str:
        value = self.rng.standard_normal(shape).astype(np.float32) * scale
        if positive:
            value = np.abs(value) + 0.5
        return self.const(name, value)

    def const(self, name: str, value) -> str:
        tensor = numpy_helper.from_array(np.asarray(value), name)
        if self.constant_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor,
                                               name=f"c_{name}"))
        else:
            self.inits[name] = tensor
        return name

    def node(self, op: str, inputs, name: str, outputs=None, **attrs) -> str:
        outputs = outputs or [name]
        self.nodes.append(helper.make_node(op, list(inputs), list(outputs), name=name, **attrs))
        return outputs[0]

    def conv(self, x: str, cin: int, cout: int, k: int, name: str, group: int = 1,
             bias: bool = True) -> str:
        w = self.weight(f"{name}.w", (cout, cin // group, k, k))
        inputs = [x, w] + ([self.weight(f"{name}.b", (cout,))] if bias else [])
        return self.node("Conv", inputs, name, kernel_shape=[k, k], pads=[k // 2] * 4, group=group)

    def bn(self, x: str, c: int, name: str) -> str:
        return self.node("BatchNormalization", [
            x, self.weight(f"{name}.g", (c,), positive=True), self.weight(f"{name}.b", (c,)),
            self.weight(f"{name}.m", (c,)), self.weight(f"{name}.v", (c,), positive=True)], name)

    def model(self, inputs, outputs, opset: int) -> Model:
        graph = helper.make_graph(self.nodes, "g", inputs, outputs, list(self.inits.values()))
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        proto.ir_version = 8
        onnx.checker.check_model(proto)
        return Model(proto)


def conv_net(seed: int = 0, constant_nodes: bool = False, opset: int = 14) -> Model:
    """Conv+BN+Relu, a residual Add, depthwise Conv+BN+HardSwish, Split, Concat, swish, an SE
    block (GAP → conv → relu → conv → HardSigmoid → Mul with the trunk), ConvTranspose head."""
    b = _Builder(seed)
    b.constant_nodes = constant_nodes
    a = b.node("Relu", [b.bn(b.conv("x", 3, 8, 3, "conv1", bias=False), 8, "bn1")], "relu1")
    c2 = b.conv(a, 8, 8, 1, "conv2")
    r1 = b.node("Add", [b.node("Relu", [c2], "relu2"), a], "res1")
    d = b.node("HardSwish", [b.bn(b.conv(r1, 8, 8, 3, "dw3", group=8), 8, "bn3")], "hswish3")
    c4 = b.conv(d, 8, 6, 1, "conv4")
    split_sizes = b.const("split4", np.array([2, 4], dtype=np.int64))
    b.node("Split", [c4, split_sizes], "split4", outputs=["s1", "s2"], axis=1)
    c5 = b.conv("s1", 2, 4, 3, "conv5")
    sw = b.node("Mul", [c5, b.node("Sigmoid", [c5], "sig5")], "swish5")
    cat = b.node("Concat", ["s2", sw], "cat", axis=1)
    gap = b.node("GlobalAveragePool", [cat], "gap")
    se = b.node("Relu", [b.conv(gap, 8, 4, 1, "se1")], "se_relu")
    gate = b.node("HardSigmoid", [b.conv(se, 4, 8, 1, "se2")], "se_gate")
    scaled = b.node("Mul", [cat, gate], "se_mul")
    c6 = b.node("Relu", [b.conv(scaled, 8, 6, 3, "conv6")], "relu6")
    w7 = b.weight("up7.w", (6, 4, 2, 2))
    up = b.node("ConvTranspose", [c6, w7, b.weight("up7.b", (4,))], "up7", strides=[2, 2])
    b.node("Conv", [up, b.weight("head.w", (2, 4, 1, 1))], "head", outputs=["y"])
    return b.model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                   [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2, 32, 32])], opset)


def transformer(layers: int = 2, seq: int = 6, dim: int = 16, heads: int = 4, ffn: int = 32,
                seed: int = 0, share_biases: bool = True, layer_norm_op: bool = True) -> Model:
    """Pre-LN encoder layers: MatMul+Add q/k/v, heads via Reshape [1,S,H,d] → Transpose, scaled
    masked Softmax attention, out-projection, residuals; Erf-GELU MLP. With ``share_biases`` all
    layers use one FFN bias initializer and the Reshape shape constants are shared (as exporters
    do)."""
    b = _Builder(seed)
    d = dim // heads
    split_shape = b.const("shape_split", np.array([1, -1, heads, d], dtype=np.int64))
    merge_shape = b.const("shape_merge", np.array([0, 0, dim], dtype=np.int64))
    mask = np.triu(np.full((seq, seq), -1e4, dtype=np.float32), 1)[None, None]
    b.const("mask", mask)
    b.const("scale", np.array(1 / np.sqrt(d), dtype=np.float32))
    if share_biases:
        b.weight("shared_ffn_bias", (ffn,))
    x = "x"
    for i in range(layers):
        p = f"l{i}"
        h = _norm(b, x, dim, f"{p}.ln1", layer_norm_op)
        heads_out = {}
        for kind, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            proj = b.node("MatMul", [h, b.weight(f"{p}.{kind}.w", (dim, dim))], f"{p}.{kind}")
            proj = b.node("Add", [proj, b.weight(f"{p}.{kind}.b", (dim,))], f"{p}.{kind}_bias")
            split = b.node("Reshape", [proj, split_shape], f"{p}.{kind}_split")
            heads_out[kind] = b.node("Transpose", [split], f"{p}.{kind}_t", perm=perm)
        s = b.node("MatMul", [heads_out["q"], heads_out["k"]], f"{p}.qk")
        s = b.node("Add", [b.node("Mul", [s, "scale"], f"{p}.scaled"), "mask"], f"{p}.masked")
        att = b.node("Softmax", [s], f"{p}.softmax", axis=-1)
        ctx = b.node("MatMul", [att, heads_out["v"]], f"{p}.av")
        ctx = b.node("Transpose", [ctx], f"{p}.ctx_t", perm=[0, 2, 1, 3])
        ctx = b.node("Reshape", [ctx, merge_shape], f"{p}.merge")
        o = b.node("MatMul", [ctx, b.weight(f"{p}.o.w", (dim, dim))], f"{p}.o")
        o = b.node("Add", [o, b.weight(f"{p}.o.b", (dim,))], f"{p}.o_bias")
        x = b.node("Add", [x, o], f"{p}.res1")
        h = _norm(b, x, dim, f"{p}.ln2", layer_norm_op)
        f = b.node("MatMul", [h, b.weight(f"{p}.fc1.w", (dim, ffn))], f"{p}.fc1")
        bias = "shared_ffn_bias" if share_biases else b.weight(f"{p}.fc1.b", (ffn,))
        f = b.node("Add", [f, bias], f"{p}.fc1_bias")
        f = _gelu(b, f, p)
        f = b.node("MatMul", [f, b.weight(f"{p}.fc2.w", (ffn, dim))], f"{p}.fc2")
        f = b.node("Add", [f, b.weight(f"{p}.fc2.b", (dim,))], f"{p}.fc2_bias")
        x = b.node("Add", [x, f], f"{p}.res2")
    b.node("Identity", [x], "out", outputs=["y"])
    info = helper.make_tensor_value_info
    return b.model([info("x", TensorProto.FLOAT, [1, seq, dim])],
                   [info("y", TensorProto.FLOAT, [1, seq, dim])], 17 if layer_norm_op else 13)


def _norm(b: _Builder, x: str, dim: int, name: str, op: bool) -> str:
    g, beta = b.weight(f"{name}.g", (dim,), positive=True), b.weight(f"{name}.b", (dim,))
    if op:
        return b.node("LayerNormalization", [x, g, beta], name, axis=-1)
    mean = b.node("ReduceMean", [x], f"{name}.mean", axes=[-1])
    c = b.node("Sub", [x, mean], f"{name}.c")
    var = b.node("ReduceMean", [b.node("Mul", [c, c], f"{name}.sq")], f"{name}.var", axes=[-1])
    eps = b.const(f"{name}.eps", np.array(1e-5, dtype=np.float32))
    std = b.node("Sqrt", [b.node("Add", [var, eps], f"{name}.vare")], f"{name}.std")
    n = b.node("Div", [c, std], f"{name}.n")
    return b.node("Add", [b.node("Mul", [n, g], f"{name}.scale"), beta], name)


def _gelu(b: _Builder, x: str, p: str) -> str:
    sqrt2 = b.const(f"{p}.sqrt2", np.array(np.sqrt(2), dtype=np.float32))
    one = b.const(f"{p}.one", np.array(1, dtype=np.float32))
    half = b.const(f"{p}.half", np.array(0.5, dtype=np.float32))
    e = b.node("Erf", [b.node("Div", [x, sqrt2], f"{p}.gelu_div")], f"{p}.gelu_erf")
    g = b.node("Mul", [x, b.node("Add", [e, one], f"{p}.gelu_add")], f"{p}.gelu_mul")
    return b.node("Mul", [g, half], f"{p}.gelu")


def unfollowable(seed: int = 0) -> Model:
    """conv1 → CumSum over channels (an op the analysis does not know) → conv2 → Relu → conv3:
    conv1's channels must stay, conv2's may go."""
    b = _Builder(seed)
    c1 = b.conv("x", 3, 6, 3, "conv1")
    cs = b.node("CumSum", [c1, b.const("axis", np.array(1, dtype=np.int64))], "cumsum")
    c2 = b.node("Relu", [b.conv(cs, 6, 8, 3, "conv2")], "relu2")
    b.node("Conv", [c2, b.weight("conv3.w", (2, 8, 1, 1))], "conv3", outputs=["y"])
    info = helper.make_tensor_value_info
    return b.model([info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [info("y", TensorProto.FLOAT, [1, 2, 8, 8])], 13)


def single_conv() -> Model:
    b = _Builder(0)
    b.node("Conv", ["x", b.weight("w", (4, 3, 3, 3))], "conv", outputs=["y"], pads=[1, 1, 1, 1])
    info = helper.make_tensor_value_info
    return b.model([info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [info("y", TensorProto.FLOAT, [1, 4, 8, 8])], 13)
