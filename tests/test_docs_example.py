"""The worked example in docs/architecture.md is real: its pass runs, plans, and behaves."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from onnxcomp import runtime
from onnxcomp.model import Model
from onnxcomp.pipeline import Context, PassSpec

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _example_pass() -> types.ModuleType:
    block = re.search(r"## Adding a pass.*?```python\n(.*?)```", DOC.read_text(), re.S).group(1)
    module = types.ModuleType("dropout_example")
    sys.modules[module.__name__] = module  # dataclasses look their module up by name
    exec(compile(block, str(DOC), "exec"), module.__dict__)  # our own doc, not a model
    return module


def _model_with_dropout() -> Model:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Dropout", ["r"], ["d"], name="drop"),
             helper.make_node("Neg", ["d"], ["y"], name="neg")]
    graph = helper.make_graph(nodes, "g", [x], [y])
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_the_worked_example_pass_plans_applies_and_is_exact():
    example = _example_pass()
    assert isinstance(example.PASS, PassSpec)
    model = _model_with_dropout()
    before = model.proto.SerializeToString()
    plan = example.PASS.plan(model, example.Config(), Context())
    assert [(r.node, r.action) for r in plan.rows] == [("drop", "bypass")]
    assert model.proto.SerializeToString() == before
    result, record = example.PASS.run(model, example.Config(), Context())
    assert record.modified and record.touched == ["drop"]
    assert not any(n.op_type == "Dropout" for n in result.proto.graph.node)
    onnx.checker.check_model(result.proto)
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    np.testing.assert_allclose(runtime.run_model(result, feeds)["y"],
                               runtime.run_model(model, feeds)["y"], rtol=1e-6)
    again, record2 = example.PASS.run(result, example.Config(), Context())
    assert not record2.modified and again is result
