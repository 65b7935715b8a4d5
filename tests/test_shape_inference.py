"""shape_inference: ONNX shape inference on a weightless skeleton gives exactly what
onnx.shape_inference.infer_shapes gives the whole model."""

from __future__ import annotations

import onnx
import pytest
from builders import attention_block, conv_net, if_graph, mlp
from onnx import helper

from onnxcomp import shape_inference, zoo
from onnxcomp.model import load


def _same(proto: onnx.ModelProto, data_prop: bool) -> bool:
    ours = shape_inference.with_shapes(proto, data_prop=data_prop)
    theirs = onnx.shape_inference.infer_shapes(proto, data_prop=data_prop)
    return ours.SerializeToString() == theirs.SerializeToString()


@pytest.mark.parametrize("data_prop", [False, True])
@pytest.mark.parametrize("build", [mlp, conv_net, attention_block, if_graph])
def test_the_skeleton_infers_what_the_whole_model_infers(build, data_prop):
    proto = build().proto
    del proto.graph.value_info[:]
    assert _same(proto, data_prop)


def test_large_weights_are_stand_in_inputs_and_small_constants_stay():
    proto = attention_block(dim=64, ffn=128).proto
    shell, stand_ins = shape_inference.skeleton(proto)
    large = {t.name for t in proto.graph.initializer
             if len(t.dims) and int(onnx.numpy_helper.to_array(t).size) > shape_inference.SMALL}
    assert large and stand_ins == large
    assert not large & {t.name for t in shell.graph.initializer}
    assert {t.name for t in shell.graph.initializer} == \
        {t.name for t in proto.graph.initializer} - large
    graph = shape_inference.inferred(proto)
    assert not stand_ins & {i.name for i in graph.input}  # the stand-ins are not handed back


def test_an_old_ir_model_listing_its_initializers_as_inputs():
    proto = mlp().proto
    proto.graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                             for t in proto.graph.initializer)
    proto.ir_version = 3
    del proto.graph.value_info[:]
    assert _same(proto, False)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["ppocr-rec", "minilm", "tiny-clip"])
def test_zoo_models_infer_the_same(name):
    assert _same(load(zoo.fetch(name)).proto, data_prop=True)
