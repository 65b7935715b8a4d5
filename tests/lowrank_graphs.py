"""Tiny graphs and data for the lowrank tests, built with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import calibration
from onnxcomp.model import Model


def low_rank(rng, k, n, r, dtype=np.float32):
    """A random K x N matrix of rank r."""
    return (rng.standard_normal((k, r)) @ rng.standard_normal((r, n)) / np.sqrt(r)).astype(dtype)


def make_model(nodes, inputs, outputs, initializers=(), opset=17) -> Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return Model(proto)


def vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def matmul_model(w: np.ndarray, lead=(2, 8), as_constant_node=False) -> Model:
    """x[*lead, K] @ W -> y; W an initializer or a Constant node."""
    k, n = w.shape
    if as_constant_node:
        nodes = [helper.make_node("Constant", [], ["W"], value=numpy_helper.from_array(w, "W")),
                 helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
        inits = []
    else:
        nodes = [helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
        inits = [numpy_helper.from_array(w, "W")]
    return make_model(nodes, [vi("x", [*lead, k])], [vi("y", [*lead, n])], inits)


def feeds_for(model: Model, seed=1):
    return calibration.random_data(model, 1, seed=seed).make_batch(0)


def ops(model: Model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def anisotropic_batches(count, k, seed):
    """Inputs where a few directions carry most of the signal (what whitening exploits)."""
    rng = np.random.default_rng(seed)
    mix = np.linalg.qr(np.random.default_rng(99).standard_normal((k, k)))[0]
    scales = 0.85 ** np.arange(k)
    return [{"x": ((rng.standard_normal((16, k)) * scales) @ mix).astype(np.float32)}
            for _ in range(count)]


def mini_transformer(width=64, seq=8, seed=16) -> Model:
    """x -> Q/K/V projections -> attention -> out proj -> residual -> FFN (Gemm-free MatMuls)."""
    rng = np.random.default_rng(seed)

    def weight(name, k, n):  # a decaying spectrum, as trained weights have
        u, s, vt = np.linalg.svd(rng.standard_normal((k, n)), full_matrices=False)
        w = (u * (s * 0.85 ** np.arange(len(s)))) @ vt / 3
        return numpy_helper.from_array(w.astype(np.float32), name)

    inits = [weight("Wq", width, width), weight("Wk", width, width), weight("Wv", width, width),
             weight("Wo", width, width), weight("W1", width, 4 * width),
             weight("W2", 4 * width, width),
             numpy_helper.from_array(np.array(1 / np.sqrt(width), np.float32), "scale")]
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", ["x", "Wv"], ["v"], name="v_proj"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1]),
             helper.make_node("MatMul", ["q", "kt"], ["s0"], name="scores"),
             helper.make_node("Mul", ["s0", "scale"], ["s1"]),
             helper.make_node("Softmax", ["s1"], ["p"], axis=-1),
             helper.make_node("MatMul", ["p", "v"], ["ctx"], name="context"),
             helper.make_node("MatMul", ["ctx", "Wo"], ["o"], name="o_proj"),
             helper.make_node("Add", ["x", "o"], ["r"]),
             helper.make_node("MatMul", ["r", "W1"], ["f1"], name="fc1"),
             helper.make_node("Relu", ["f1"], ["f2"]),
             helper.make_node("MatMul", ["f2", "W2"], ["f3"], name="fc2"),
             helper.make_node("Add", ["r", "f3"], ["y"])]
    return make_model(nodes, [vi("x", [1, seq, width])], [vi("y", [1, seq, width])], inits)
