"""prune's dependency analysis: which channels are coupled, and why a group is kept."""

from __future__ import annotations

import numpy as np
import prune_graphs as pg
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.model import Model
from onnxcomp.passes import prune
from onnxcomp.passes.prune.rules import align


def test_conv_net_groups_cover_concat_split_depthwise_residual_se():
    groups = prune.analyze_model(pg.conv_net())
    prunable = [g for g in groups if g.prunable]
    nodes = {n for g in prunable for n in g.nodes}
    # conv1 and conv2 are coupled by the residual Add, with BN and the depthwise conv
    residual = next(g for g in prunable if "conv1" in g.nodes)
    assert {"conv1", "bn1", "conv2", "dw3", "bn3", "conv4"} <= set(residual.nodes)
    assert {"conv4", "conv5", "se1", "se2", "conv6", "up7"} <= nodes
    assert all(g.kind == "conv" for g in prunable)
    blocked = [g for g in groups if not g.prunable]
    assert all("graph input/output" in g.reason for g in blocked)


def test_transformer_heads_ffn_and_kept_hidden_size():
    groups = prune.analyze_model(pg.transformer())
    kinds = sorted(g.kind for g in groups if g.prunable)
    assert kinds == ["ffn", "ffn", "heads", "heads"]
    heads = next(g for g in groups if g.prunable and g.kind == "heads")
    assert heads.size == 4  # whole heads, never the head size
    assert any(g.kind == "head_size" and "head size" in g.reason for g in groups)
    assert any(not g.prunable and "LayerNormalization" in g.reason for g in groups)


def test_decomposed_layernorm_keeps_the_residual_stream():
    groups = prune.analyze_model(pg.transformer(layer_norm_op=False, share_biases=False))
    residual = [g for g in groups if "l0.o_bias" in g.nodes]
    assert residual and not any(g.prunable for g in residual)


def test_unknown_op_blocks_only_its_own_channels():
    groups = prune.analyze_model(pg.unfollowable())
    assert any("CumSum" in g.reason for g in groups if not g.prunable)
    prunable = [g for g in groups if g.prunable]
    assert [g.nodes for g in prunable] == [["conv2", "conv3"]]


def test_channels_used_in_a_subgraph_are_kept():
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((6, 3, 1, 1)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((2, 6, 1, 1)).astype(np.float32), "w2")
    info = helper.make_tensor_value_info
    then = helper.make_graph([helper.make_node("Relu", ["h"], ["t"])], "then", [],
                             [info("t", TensorProto.FLOAT, [1, 6, 4, 4])])
    other = helper.make_graph([helper.make_node("Neg", ["h"], ["e"])], "else", [],
                              [info("e", TensorProto.FLOAT, [1, 6, 4, 4])])
    nodes = [helper.make_node("Conv", ["x", "w1"], ["h"], name="c1"),
             helper.make_node("If", ["c"], ["b"], name="branch", then_branch=then,
                              else_branch=other),
             helper.make_node("Conv", ["b", "w2"], ["y"], name="c2")]
    graph = helper.make_graph(nodes, "g", [info("x", TensorProto.FLOAT, [1, 3, 4, 4]),
                                           info("c", TensorProto.BOOL, [])],
                              [info("y", TensorProto.FLOAT, [1, 2, 4, 4])], [w1, w2])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    proto.ir_version = 8
    groups = prune.analyze_model(Model(proto))
    assert not any(g.prunable for g in groups)
    assert any("subgraph" in g.reason for g in groups)


def test_prunable_groups_summary():
    summaries = prune.prunable_groups(pg.transformer())
    assert {s.kind for s in summaries} == {"heads", "ffn"}
    assert all(s.prunable and s.size for s in summaries)


def test_align_reshape_axes():
    assert align([1, 6, 16], [1, 6, 4, 4]) == [("link", 0, 0), ("link", 1, 1),
                                                ("split", 2, [(2, 4, 4), (3, 1, 4)])]
    assert align([1, 6, 4, 4], [1, 6, 16]) == [("link", 0, 0), ("link", 1, 1),
                                                ("merge", 2, [(2, 4, 4), (3, 1, 4)])]
    assert align([2, 3], [5]) is None
