"""Shared fixtures: tiny graphs built in memory with onnx.helper."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.model import Model


def make_mlp(weights_as_constant_nodes: bool = False, seed: int = 0, opset: int = 17) -> Model:
    """x[B,8] -> MatMul(8x16)+Add -> Relu -> Identity -> MatMul(16x4) -> y[B,4]."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((8, 16)).astype(np.float32)
    b1 = rng.standard_normal(16).astype(np.float32)
    w2 = rng.standard_normal((16, 4)).astype(np.float32)
    nodes, initializers = [], []
    for name, value in (("w1", w1), ("b1", b1), ("w2", w2)):
        tensor = numpy_helper.from_array(value, name)
        if weights_as_constant_nodes:
            nodes.append(helper.make_node("Constant", [], [name], value=tensor, name=f"const_{name}"))
        else:
            initializers.append(tensor)
    nodes += [
        helper.make_node("MatMul", ["x", "w1"], ["h0"], name="fc1"),
        helper.make_node("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
        helper.make_node("Relu", ["h1"], ["h2"], name="relu"),
        helper.make_node("Identity", ["h2"], ["h3"], name="noop"),
        helper.make_node("MatMul", ["h3", "w2"], ["y"], name="fc2"),
    ]
    graph = helper.make_graph(
        nodes, "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])],
        initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return Model(model)


@pytest.fixture
def mlp() -> Model:
    return make_mlp()


@pytest.fixture
def feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).standard_normal((3, 8)).astype(np.float32)}
