"""Tiny graphs for the twin's tests, built in memory with onnx.helper.

``small_cnn`` stores its weights every way exporters do: an initializer in raw_data, an
initializer in float_data (the typed field), a Constant node (paddle2onnx), an int64 shape
initializer, and one-element float constants (formula constants, frozen by default).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.model import Model


def small_cnn(seed: int = 0) -> Model:
    """x[B,3,8,8] -> Conv(3->4, 3x3, pads 1) -> Relu -> Reshape[B,256] -> MatMul(256x5)
    -> Add(bias) -> LayerNormalization -> Mul(scale) -> y[B,5]."""
    rng = np.random.default_rng(seed)
    conv_w = (rng.standard_normal((4, 3, 3, 3)) * 0.3).astype(np.float32)
    conv_b = rng.standard_normal(4).astype(np.float32)
    fc_w = (rng.standard_normal((256, 5)) * 0.1).astype(np.float32)
    fc_b = rng.standard_normal(5).astype(np.float32)
    typed = helper.make_tensor("fc.weight", TensorProto.FLOAT, fc_w.shape, fc_w.ravel().tolist())
    initializers = [
        numpy_helper.from_array(conv_b, "conv.bias"),
        typed,
        numpy_helper.from_array(fc_b, "fc.bias"),
        numpy_helper.from_array(np.array([0, 256], np.int64), "flat_shape"),
        numpy_helper.from_array(np.ones(5, np.float32), "ln.gamma"),
        numpy_helper.from_array(np.zeros(5, np.float32), "ln.beta"),
        numpy_helper.from_array(np.array(1.5, np.float32), "out.scale"),
    ]
    nodes = [
        helper.make_node("Constant", [], ["conv.weight"], name="conv_w",
                         value=numpy_helper.from_array(conv_w, "conv.weight")),
        helper.make_node("Conv", ["x", "conv.weight", "conv.bias"], ["c"], name="conv",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Reshape", ["r", "flat_shape"], ["f"], name="flatten"),
        helper.make_node("MatMul", ["f", "fc.weight"], ["m"], name="fc"),
        helper.make_node("Add", ["m", "fc.bias"], ["a"], name="fc_bias"),
        helper.make_node("LayerNormalization", ["a", "ln.gamma", "ln.beta"], ["n"], name="ln"),
        helper.make_node("Mul", ["n", "out.scale"], ["y"], name="scale"),
    ]
    graph = helper.make_graph(
        nodes, "small_cnn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 5])],
        initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    model.doc_string = "twin test graph"
    onnx.checker.check_model(model)
    return Model(model)


def with_ops(*op_types: str) -> Model:
    """x -> op -> op -> ... -> y, each op one input and output (for unsupported-op checks)."""
    nodes, previous = [], "x"
    for i, op in enumerate(op_types):
        nodes.append(helper.make_node(op, [previous], [f"t{i}"], name=f"n{i}"))
        previous = f"t{i}"
    nodes.append(helper.make_node("Identity", [previous], ["y"]))
    graph = helper.make_graph(
        nodes, "ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def matmul_nbits(k: int = 40, n: int = 6, block: int = 16, seed: int = 0,
                 zero_points: bool = True) -> Model:
    """A[2,k] -> com.microsoft MatMulNBits (4-bit, uint8 zero points) -> Y[2,n]."""
    rng = np.random.default_rng(seed)
    blocks = -(-k // block)
    packed = rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8)
    scales = (rng.random(n * blocks) * 0.1 + 0.01).astype(np.float32)
    inputs = ["A", "B", "scales"]
    initializers = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "scales")]
    if zero_points:
        zp = rng.integers(0, 256, (n * -(-blocks // 2),), dtype=np.uint8)
        initializers.append(numpy_helper.from_array(zp, "zp"))
        inputs.append("zp")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block)
    graph = helper.make_graph(
        [node], "nbits", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    return Model(model)
