"""Shared tiny-graph builders for the tests, built in memory with ``onnx.helper``.

Every builder returns a checked ``Model`` (onnx.checker passes), seeded so the same call gives
the same weights. The graphs cover what the passes must handle or skip:

- ``mlp``: MatMul + bias Add, Relu, an Identity, MatMul (the classic smoke graph);
- ``conv_net``: Conv + BatchNormalization + Relu, a residual Add, a Concat of two branches;
- ``attention_block``: one pre-LN transformer layer (q/k/v, heads through Reshape/Transpose,
  Softmax, out-projection, residuals, a Relu FFN);
- ``gemm_layers``: Gemm with transB=1 and transB=0, alpha/beta, bias C;
- ``shared_weights``: one initializer read by two MatMuls, one bias read by two Adds;
- ``if_graph``: weights inside the branches of an If node (passes leave subgraphs float);
- ``constant_weights``: the conv net with every weight a ``Constant`` node (as paddle2onnx writes);
- ``shared_gemms``: many Gemms reading two shared weights (an unrolled LSTM);
- ``unnamed_matmuls``: MatMuls without names (legal ONNX, common in hand-built graphs);
- ``nested_if_constants``: Constant-node weights in an If branch, read by a nested If's branches;
- ``if_shared_weight``: one outer weight read by a MatMul in both branches of an If;
- ``chain``: a chain of layers described as data (what the property-based tests draw).

``ALL`` names the fixed builders for parametrized tests.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.model import Model

IR_VERSION = 8


def tensor(name: str, shape: Sequence[int | str] | None, elem: int = TensorProto.FLOAT
           ) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, None if shape is None else list(shape))


class GraphBuilder:
    """Collects nodes and weights; ``constant_nodes`` stores weights as Constant nodes."""

    def __init__(self, seed: int = 0, constant_nodes: bool = False):
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: dict[str, onnx.TensorProto] = {}
        self.constant_nodes = constant_nodes

    def weight(self, name: str, shape: Sequence[int], scale: float = 1.0,
               positive: bool = False) -> str:
        """A seeded normal weight (``positive``: |w| + 0.5, for BN scales and variances)."""
        value = self.rng.standard_normal(tuple(shape)).astype(np.float32) * np.float32(scale)
        if positive:
            value = np.abs(value) + np.float32(0.5)
        return self.const(name, value)

    def const(self, name: str, value: np.ndarray) -> str:
        proto = numpy_helper.from_array(np.asarray(value), name)
        if self.constant_nodes:
            self.nodes.append(helper.make_node("Constant", [], [name], value=proto,
                                               name=f"const_{name}"))
        else:
            self.inits[name] = proto
        return name

    def node(self, op: str, inputs: Sequence[str], name: str,
             outputs: Sequence[str] | None = None, **attrs) -> str:
        outputs = list(outputs or [name])
        self.nodes.append(helper.make_node(op, list(inputs), outputs, name=name, **attrs))
        return outputs[0]

    # --- layers ------------------------------------------------------------------------------

    def linear(self, x: str, k: int, n: int, name: str, bias: bool = True) -> str:
        """``x @ W (+ b)`` as MatMul and a separate Add, as PyTorch exports a Linear."""
        scale = 1.0 / np.sqrt(k)  # keeps activations O(1) through a chain
        out = self.node("MatMul", [x, self.weight(f"{name}.w", (k, n), scale)], name)
        if bias:
            out = self.node("Add", [out, self.weight(f"{name}.b", (n,), 0.1)], f"{name}_bias")
        return out

    def gemm(self, x: str, k: int, n: int, name: str, trans_b: bool = True,
             alpha: float = 1.0, beta: float = 1.0) -> str:
        shape = (n, k) if trans_b else (k, n)
        w = self.weight(f"{name}.w", shape, 1.0 / np.sqrt(k))
        return self.node("Gemm", [x, w, self.weight(f"{name}.b", (n,), 0.1)], name,
                         transB=int(trans_b), alpha=alpha, beta=beta)

    def conv(self, x: str, cin: int, cout: int, k: int, name: str, group: int = 1,
             bias: bool = True) -> str:
        w = self.weight(f"{name}.w", (cout, cin // group, k, k),
                        1.0 / np.sqrt(cin // group * k * k))
        inputs = [x, w] + ([self.weight(f"{name}.b", (cout,), 0.1)] if bias else [])
        return self.node("Conv", inputs, name, kernel_shape=[k, k], pads=[k // 2] * 4,
                         group=group)

    def bn(self, x: str, c: int, name: str) -> str:
        return self.node("BatchNormalization", [
            x, self.weight(f"{name}.g", (c,), 0.2, positive=True),
            self.weight(f"{name}.b", (c,), 0.1), self.weight(f"{name}.m", (c,), 0.1),
            self.weight(f"{name}.v", (c,), 0.2, positive=True)], name)

    def layer_norm(self, x: str, dim: int, name: str) -> str:
        return self.node("LayerNormalization", [
            x, self.weight(f"{name}.g", (dim,), 0.1, positive=True),
            self.weight(f"{name}.b", (dim,), 0.1)], name, axis=-1)

    def model(self, inputs: Sequence[onnx.ValueInfoProto], outputs: Sequence[onnx.ValueInfoProto],
              opset: int = 17, name: str = "graph") -> Model:
        graph = helper.make_graph(self.nodes, name, list(inputs), list(outputs),
                                  list(self.inits.values()))
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        proto.ir_version = IR_VERSION
        onnx.checker.check_model(proto)
        return Model(proto)


# --- fixed graphs --------------------------------------------------------------------------------


def mlp(weights_as_constant_nodes: bool = False, seed: int = 0, opset: int = 17) -> Model:
    """x[B,8] -> MatMul(8x16)+Add -> Relu -> Identity -> MatMul(16x4) -> y[B,4].

    The weights are unscaled standard normals drawn in the order w1, b1, w2 (older tests
    compare figures on this exact graph)."""
    b = GraphBuilder(seed, weights_as_constant_nodes)
    w1 = b.weight("w1", (8, 16))
    b1 = b.weight("b1", (16,))
    w2 = b.weight("w2", (16, 4))
    h = b.node("Add", [b.node("MatMul", ["x", w1], "fc1", outputs=["h0"]), b1], "fc1_bias",
               outputs=["h1"])
    h = b.node("Relu", [h], "relu", outputs=["h2"])
    h = b.node("Identity", [h], "noop", outputs=["h3"])
    b.node("MatMul", [h, w2], "fc2", outputs=["y"])
    return b.model([tensor("x", ["batch", 8])], [tensor("y", ["batch", 4])], opset, "mlp")


def conv_net(seed: int = 0, channels: int = 8, constant_nodes: bool = False,
             opset: int = 13) -> Model:
    """x[1,3,16,16] -> Conv3x3+BN+Relu -> residual (Conv1x1+BN+Relu) Add -> two branches
    (Conv3x3, Conv1x1+Relu) -> Concat -> Conv1x1 head -> y[1,4,16,16]."""
    c = channels
    b = GraphBuilder(seed, constant_nodes)
    stem = b.node("Relu", [b.bn(b.conv("x", 3, c, 3, "conv1", bias=False), c, "bn1")], "relu1")
    inner = b.node("Relu", [b.bn(b.conv(stem, c, c, 1, "conv2"), c, "bn2")], "relu2")
    res = b.node("Add", [stem, inner], "res")
    left = b.conv(res, c, c, 3, "left")
    right = b.node("Relu", [b.conv(res, c, c // 2, 1, "right")], "right_relu")
    cat = b.node("Concat", [left, right], "cat", axis=1)
    b.node("Conv", [cat, b.weight("head.w", (4, c + c // 2, 1, 1), 0.3)], "head", outputs=["y"])
    return b.model([tensor("x", [1, 3, 16, 16])], [tensor("y", [1, 4, 16, 16])], opset,
                   "conv_net")


def attention_block(seq: int = 6, dim: int = 16, heads: int = 2, ffn: int = 32,
                    seed: int = 0) -> Model:
    """One pre-LN transformer layer: LayerNorm, q/k/v MatMul+Add, heads via Reshape [1,S,H,d]
    and Transpose, scaled Softmax attention, out-projection, residual, LayerNorm, Relu FFN,
    residual. x[1,S,D] -> y[1,S,D]."""
    b = GraphBuilder(seed)
    d = dim // heads
    split = b.const("shape_split", np.array([1, seq, heads, d], dtype=np.int64))
    merge = b.const("shape_merge", np.array([1, seq, dim], dtype=np.int64))
    scale = b.const("scale", np.array(1 / np.sqrt(d), dtype=np.float32))
    h = b.layer_norm("x", dim, "ln1")
    parts = {}
    for kind, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
        proj = b.linear(h, dim, dim, kind)
        parts[kind] = b.node("Transpose", [b.node("Reshape", [proj, split], f"{kind}_split")],
                             f"{kind}_t", perm=perm)
    scores = b.node("Mul", [b.node("MatMul", [parts["q"], parts["k"]], "qk"), scale], "scaled")
    att = b.node("Softmax", [scores], "softmax", axis=-1)
    ctx = b.node("Transpose", [b.node("MatMul", [att, parts["v"]], "av")], "ctx_t",
                 perm=[0, 2, 1, 3])
    ctx = b.node("Reshape", [ctx, merge], "merge")
    x = b.node("Add", ["x", b.linear(ctx, dim, dim, "o")], "res1")
    f = b.node("Relu", [b.linear(b.layer_norm(x, dim, "ln2"), dim, ffn, "fc1")], "ffn_relu")
    b.node("Add", [x, b.linear(f, ffn, dim, "fc2")], "res2", outputs=["y"])
    return b.model([tensor("x", [1, seq, dim])], [tensor("y", [1, seq, dim])], 17, "attention")


def conv_hardswish_net(seed: int = 1) -> Model:
    """x[1,3,12,12] -> Conv3x3 -> HardSwish -> Conv3x3 -> y[1,4,12,12] (opset 14): where
    ONNX Runtime's layout quantizes a Conv output for the Conv's own sake (QLinearConv)."""
    b = GraphBuilder(seed)
    act = b.node("HardSwish", [b.conv("x", 3, 8, 3, "c1")], "act")
    b.node("Conv", [act, b.weight("c2.w", (4, 8, 3, 3), 0.3)], "c2", outputs=["y"],
           pads=[1] * 4)
    return b.model([tensor("x", [1, 3, 12, 12])], [tensor("y", [1, 4, 12, 12])], 14,
                   "conv_hardswish_net")


def gemm_layers(seed: int = 0, sizes: Sequence[int] = (16, 32, 24, 8),
                constant_nodes: bool = False) -> Model:
    """x[B,sizes[0]] -> Gemm(transB=1) -> Relu -> Gemm(transB=0, alpha 0.5, beta 2) -> Relu
    -> ... -> y[B,sizes[-1]]: every other layer flips transB."""
    b = GraphBuilder(seed, constant_nodes)
    x = "x"
    last = len(sizes) - 2
    for i, (k, n) in enumerate(pairwise(sizes)):
        flip = i % 2 == 1
        x = b.gemm(x, k, n, f"gemm{i}", trans_b=not flip, alpha=0.5 if flip else 1.0,
                   beta=2.0 if flip else 1.0)
        if i < last:
            x = b.node("Relu", [x], f"relu{i}")
    b.node("Identity", [x], "out", outputs=["y"])
    return b.model([tensor("x", ["batch", sizes[0]])], [tensor("y", ["batch", sizes[-1]])], 13,
                   "gemm_layers")


def shared_weights(seed: int = 0, dim: int = 24) -> Model:
    """x[B,D] -> MatMul(W)+b -> Relu -> MatMul(W)+b -> Relu -> MatMul(V) -> y[B,D/2]: W and b
    are each one initializer read by two nodes (as exporters merge identical tensors)."""
    b = GraphBuilder(seed)
    w = b.weight("shared.w", (dim, dim), 1.0 / np.sqrt(dim))
    bias = b.weight("shared.b", (dim,), 0.1)
    x = "x"
    for i in range(2):
        x = b.node("Relu", [b.node("Add", [b.node("MatMul", [x, w], f"fc{i}"), bias],
                                   f"fc{i}_bias")], f"relu{i}")
    b.node("MatMul", [x, b.weight("out.w", (dim, dim // 2), 1.0 / np.sqrt(dim))], "out",
           outputs=["y"])
    return b.model([tensor("x", ["batch", dim])], [tensor("y", ["batch", dim // 2])], 17,
                   "shared_weights")


def if_graph(seed: int = 0, dim: int = 16) -> Model:
    """x[B,D] -> MatMul -> If(cond) with a MatMul (own weight) in each branch -> MatMul -> y:
    weights inside subgraphs, which the passes leave float and say so."""
    b = GraphBuilder(seed)
    h = b.linear("x", dim, dim, "pre")
    branches = {}
    for which in ("then", "else"):
        inner = GraphBuilder(seed + (1 if which == "then" else 2))
        out = inner.node("MatMul", [h, inner.weight(f"{which}.w", (dim, dim), 0.25)],
                         f"{which}_mm", outputs=[f"{which}_out"])
        branches[which] = helper.make_graph(inner.nodes, f"{which}_branch", [],
                                            [tensor(out, None)], list(inner.inits.values()))
    branched = b.node("If", ["cond"], "if", outputs=["branched"],
                      then_branch=branches["then"], else_branch=branches["else"])
    b.linear(branched, dim, dim // 2, "post", bias=False)
    b.node("Identity", ["post"], "out", outputs=["y"])
    return b.model([tensor("x", ["batch", dim]), tensor("cond", [], TensorProto.BOOL)],
                   [tensor("y", ["batch", dim // 2])], 17, "if_graph")


def constant_weights(seed: int = 0) -> Model:
    """The conv net with every weight stored as a Constant node (opset 13), as PP-OCR's are."""
    return conv_net(seed, constant_nodes=True)


def shared_gemms(count: int = 20, dim: int = 256, seed: int = 0) -> Model:
    """x[B,D] -> ``count`` x (Gemm(transB=1) -> Tanh) -> y, the Gemms alternating between two
    shared weights and two shared biases, as an LSTM unrolled over time reads its few weights."""
    b = GraphBuilder(seed)
    weights = [b.weight(f"w{i}", (dim, dim), 1.0 / np.sqrt(dim)) for i in range(2)]
    biases = [b.weight(f"b{i}", (dim,), 0.1) for i in range(2)]
    x = "x"
    for i in range(count):
        h = b.node("Gemm", [x, weights[i % 2], biases[i % 2]], f"gemm{i}", transB=1)
        x = b.node("Tanh", [h], f"tanh{i}", outputs=["y"] if i == count - 1 else None)
    return b.model([tensor("x", ["batch", dim])], [tensor("y", ["batch", dim])], 13,
                   "shared_gemms")


def unnamed_matmuls(count: int = 6, dim: int = 64, seed: int = 0) -> Model:
    """x -> ``count`` x (MatMul -> Relu), no node named (two MatMuls share a name "dup")."""
    b = GraphBuilder(seed)
    x = "x"
    for i in range(count):
        h = b.node("MatMul", [x, b.weight(f"w{i}", (dim, dim), 1.0 / np.sqrt(dim))], f"mm{i}")
        x = b.node("Relu", [h], f"relu{i}", outputs=["y"] if i == count - 1 else None)
    for i, node in enumerate(b.nodes):
        node.name = "dup" if node.op_type == "MatMul" and i >= 2 * count - 4 else ""
    return b.model([tensor("x", ["batch", dim])], [tensor("y", ["batch", dim])], 17,
                   "unnamed_matmuls")


def nested_if_constants(dim: int = 64, seed: int = 0) -> Model:
    """x -> If(c1): then: Constant W, V; inner If(c2) whose branches both read W (and V), else:
    x @ W2 (a Constant). A VAD's LSTM weights live like this; lifting must write W once."""
    rng = np.random.default_rng(seed)

    def const(name: str, shape: tuple[int, ...]) -> onnx.NodeProto:
        value = (rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32)
        return helper.make_node("Constant", [], [name], name=f"const_{name}",
                                value=numpy_helper.from_array(value, name))

    inner = {}
    for which in ("then", "else"):
        nodes = [helper.make_node("MatMul", ["x", "W"], [f"in_{which}_h"], name=f"in_{which}_mm"),
                 helper.make_node("Tanh" if which == "then" else "Relu", [f"in_{which}_h"],
                                  [f"in_{which}_a"], name=f"in_{which}_act"),
                 helper.make_node("MatMul", [f"in_{which}_a", "V"], [f"in_{which}_out"],
                                  name=f"in_{which}_mm2")]
        inner[which] = helper.make_graph(nodes, f"inner_{which}", [],
                                         [tensor(f"in_{which}_out", None)])
    then_nodes = [const("W", (dim, dim)), const("V", (dim, dim)),
                  helper.make_node("If", ["c2"], ["then_out"], name="inner_if",
                                   then_branch=inner["then"], else_branch=inner["else"])]
    else_nodes = [const("W2", (dim, dim)),
                  helper.make_node("MatMul", ["x", "W2"], ["else_out"], name="else_mm")]
    outer_then = helper.make_graph(then_nodes, "outer_then", [], [tensor("then_out", None)])
    outer_else = helper.make_graph(else_nodes, "outer_else", [], [tensor("else_out", None)])
    node = helper.make_node("If", ["c1"], ["y"], name="outer_if", then_branch=outer_then,
                            else_branch=outer_else)
    graph = helper.make_graph([node], "nested_if", [
        tensor("x", ["batch", dim]), tensor("c1", [], TensorProto.BOOL),
        tensor("c2", [], TensorProto.BOOL)], [tensor("y", ["batch", dim])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto)
    return Model(proto)


def if_shared_weight(dim: int = 64, seed: int = 0) -> Model:
    """x -> If(cond): then x @ W -> Relu, else x @ W -> Tanh, W one outer initializer; plus a
    MatMul with its own weight in each branch, so both kinds of body weight are there."""
    b = GraphBuilder(seed)
    w = b.weight("W", (dim, dim), 1.0 / np.sqrt(dim))
    branches = {}
    for which, act in (("then", "Relu"), ("else", "Tanh")):
        inner = GraphBuilder(seed + (1 if which == "then" else 2))
        h = inner.node("MatMul", ["x", w], f"{which}_shared_mm", outputs=[f"{which}_h"])
        a = inner.node(act, [h], f"{which}_act", outputs=[f"{which}_a"])
        own = inner.weight(f"{which}.w", (dim, dim), 1.0 / np.sqrt(dim))
        out = inner.node("MatMul", [a, own], f"{which}_own_mm", outputs=[f"{which}_out"])
        branches[which] = helper.make_graph(inner.nodes, f"{which}_branch", [],
                                            [tensor(out, None)], list(inner.inits.values()))
    b.node("If", ["cond"], "if", outputs=["y"], then_branch=branches["then"],
           else_branch=branches["else"])
    return b.model([tensor("x", ["batch", dim]), tensor("cond", [], TensorProto.BOOL)],
                   [tensor("y", ["batch", dim])], 17, "if_shared_weight")


# --- chains described as data (property-based tests) ---------------------------------------------

DENSE_KINDS = ("matmul", "gemm", "relu", "residual")
CONV_KINDS = ("conv1", "conv3", "bn", "relu", "residual")


@dataclass(frozen=True)
class Layer:
    """One step of a chain: ``kind`` and, for layers that set it, the output width.

    Dense: ``matmul`` (MatMul + bias Add), ``gemm`` (transB=1), ``relu``, ``residual``
    (``x + Relu(MatMul(x))``, width unchanged). Conv (NCHW): ``conv1``/``conv3`` (1x1/3x3
    with bias), ``bn``, ``relu``, ``residual`` (``x + BN(Conv3x3(x))``)."""

    kind: str
    width: int = 0


def chain(layers: Sequence[Layer], in_width: int, out_width: int, seed: int = 0,
          conv: bool = False, spatial: int = 6) -> Model:
    """A chain of ``layers`` between an input of ``in_width`` features (or channels, ``conv``)
    and a final linear layer (MatMul, or Conv1x1) of ``out_width``: the output is never a Relu,
    so it is never all zeros."""
    kinds = CONV_KINDS if conv else DENSE_KINDS
    b = GraphBuilder(seed)
    x, width = "x", in_width
    for i, layer in enumerate(layers):
        name = f"l{i}_{layer.kind}"
        if layer.kind not in kinds:
            raise ValueError(f"unknown {'conv' if conv else 'dense'} layer kind {layer.kind!r}")
        if layer.kind == "relu":
            x = b.node("Relu", [x], name)
        elif layer.kind == "bn":
            x = b.bn(x, width, name)
        elif layer.kind == "residual" and conv:
            x = b.node("Add", [x, b.bn(b.conv(x, width, width, 3, f"{name}.conv"), width,
                                       f"{name}.bn")], name)
        elif layer.kind == "residual":
            inner = b.node("Relu", [b.linear(x, width, width, f"{name}.fc")], f"{name}.relu")
            x = b.node("Add", [x, inner], name)
        elif layer.kind == "matmul":
            x, width = b.linear(x, width, layer.width, name), layer.width
        elif layer.kind == "gemm":
            x, width = b.gemm(x, width, layer.width, name), layer.width
        else:  # conv1 / conv3
            k = 1 if layer.kind == "conv1" else 3
            x, width = b.conv(x, width, layer.width, k, name), layer.width
    if conv:
        b.node("Conv", [x, b.weight("head.w", (out_width, width, 1, 1), 1 / np.sqrt(width))],
               "head", outputs=["y"])
        shape = [1, None, spatial, spatial]
    else:
        b.node("MatMul", [x, b.weight("head.w", (width, out_width), 1 / np.sqrt(width))],
               "head", outputs=["y"])
        shape = ["batch", None]
    return b.model([tensor("x", [shape[0], in_width, *shape[2:]])],
                   [tensor("y", [shape[0], out_width, *shape[2:]])], 17,
                   "conv_chain" if conv else "dense_chain")


ALL: dict[str, Callable[[], Model]] = {
    "mlp": mlp,
    "conv_net": conv_net,
    "attention_block": attention_block,
    "gemm_layers": gemm_layers,
    "shared_weights": shared_weights,
    "if_graph": if_graph,
    "constant_weights": constant_weights,
}


def strided_skip_net(levels: int = 5, concat: bool = False, seed: int = 3) -> Model:
    """x[1,3,H,W] -> ``levels`` Conv 3x3 stride 2 -> Resize x2 of the last -> Add (or Concat)
    with the one before: runs only when H and W are multiples of 2**levels."""
    b = GraphBuilder(seed=seed)
    x, cin = "x", 3
    taps = []
    for i in range(levels):
        w = b.weight(f"c{i}.w", (4, cin, 3, 3), 0.3)
        x = b.node("Conv", [x, w], f"c{i}", kernel_shape=[3, 3], strides=[2, 2], pads=[1] * 4)
        taps.append(x)
        cin = 4
    scales = b.const("scales", np.array([1, 1, 2, 2], np.float32))
    up = b.node("Resize", [taps[-1], "", scales], "up", mode="nearest")
    if concat:
        b.node("Concat", [up, taps[-2]], "skip", outputs=["y"], axis=1)
    else:
        b.node("Add", [up, taps[-2]], "skip", outputs=["y"])
    return b.model([tensor("x", [1, 3, "height", "width"])],
                   [tensor("y", [1, None, None, None])], 17, "strided_skip")
