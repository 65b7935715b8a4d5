from __future__ import annotations

import numpy as np
from conftest import make_mlp

from onnxcomp import runtime
from onnxcomp.graph import constant_array, export_model, import_graph, lift_constant_nodes, tidy


def test_constant_nodes_are_weights_and_lifting_keeps_outputs(feeds):
    model = make_mlp(weights_as_constant_nodes=True)
    graph = import_graph(model)
    fc1 = next(n for n in graph.nodes if n.name == "fc1")
    np.testing.assert_array_equal(constant_array(fc1.inputs[1]).shape, (8, 16))
    assert lift_constant_nodes(graph) == 3
    lifted = export_model(tidy(graph), like=model)
    assert not [n for n in lifted.graph.node if n.op_type == "Constant"]
    assert {t.name for t in lifted.graph.initializer} == {"w1", "b1", "w2"}
    assert runtime.max_abs_difference(model, lifted, feeds) == {"y": 0.0}


def test_export_keeps_metadata_and_opsets():
    model = make_mlp()
    entry = model.proto.metadata_props.add()
    entry.key, entry.value = "character", "a\nb"
    again = export_model(import_graph(model), like=model)
    assert {p.key: p.value for p in again.proto.metadata_props} == {"character": "a\nb"}
    assert again.opset() == 17


def test_an_output_repeated_in_value_info_without_a_shape_keeps_its_shape():
    """ddddocr's exporter lists a graph output again in value_info, shapeless: the round trip
    through onnx-graphsurgeon used to drop the output's shape (onnx's checker refuses that)."""
    import onnx
    from onnx import TensorProto, helper

    from onnxcomp.model import Model
    from onnxcomp.passes import cleanup
    from onnxcomp.pipeline import Context

    bare = onnx.ValueInfoProto(name="y")
    bare.type.tensor_type.elem_type = TensorProto.FLOAT
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["h"], name="i"),
                               helper.make_node("Relu", ["h"], ["y"], name="r")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              value_info=[bare])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 12)], ir_version=6)
    onnx.checker.check_model(model, full_check=True)
    result, _ = cleanup.PASS.run(Model(model), cleanup.Config(), Context())
    onnx.checker.check_model(result.proto, full_check=True)
    assert [d.dim_value for d in result.graph.output[0].type.tensor_type.shape.dim] == [1, 4]
