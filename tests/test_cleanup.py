from __future__ import annotations

import numpy as np
import onnx
from conftest import make_mlp
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import runtime
from onnxcomp.model import Model
from onnxcomp.passes import cleanup
from onnxcomp.pipeline import Context


def _run(model):
    return cleanup.PASS.run(model, cleanup.Config(), Context())


def test_structural_lifts_constants_and_drops_identity(feeds):
    model = make_mlp(weights_as_constant_nodes=True)
    out, record = _run(model)
    ops = [n.op_type for n in out.graph.node]
    assert "Constant" not in ops and "Identity" not in ops
    assert record.modified and "noop" in record.touched
    assert record.params_before == record.params_after == 8 * 16 + 16 + 16 * 4
    # The input model is not modified.
    assert [n.op_type for n in model.graph.node].count("Constant") == 3


def test_numerically_identical_in_onnxruntime(feeds):
    model = make_mlp(weights_as_constant_nodes=True)
    out, _ = _run(model)
    assert runtime.max_abs_difference(model, out, feeds) == {"y": 0.0}


def test_folds_constant_subgraphs():
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    out, record = _run(model)
    assert [n.op_type for n in out.graph.node] == ["MatMul"]
    x = {"x": np.ones((1, 3), np.float32)}
    assert runtime.max_abs_difference(model, out, x) == {"y": 0.0}
    onnx.checker.check_model(out.proto)


def test_negative_and_idempotent(feeds):
    once, first = _run(make_mlp())
    assert first.modified
    twice, second = _run(once)
    assert not second.modified and twice is once
