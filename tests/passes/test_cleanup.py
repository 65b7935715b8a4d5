from __future__ import annotations

import builders
import numpy as np
import onnx
import pytest
from conftest import make_mlp
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import runtime
from onnxcomp.graph import proto_scopes
from onnxcomp.model import Model
from onnxcomp.passes import cleanup
from onnxcomp.pipeline import SKIP, Context


def _run(model, config=None):
    return cleanup.PASS.run(model, config or cleanup.Config(), Context())


def _transposed_weight() -> Model:
    """x @ Transpose(w): a constant subgraph that folds into one initializer."""
    w = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    nodes = [helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0], name="transpose"),
             helper.make_node("MatMul", ["x", "wt"], ["y"], name="fc")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])], [w])
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


# --- structural + numerical -------------------------------------------------------------------


def test_structural_lifts_constants_and_drops_identity(feeds):
    model = make_mlp(weights_as_constant_nodes=True)
    out, record = _run(model)
    ops = [n.op_type for n in out.graph.node]
    assert "Constant" not in ops and "Identity" not in ops
    assert record.modified and "noop" in record.touched
    assert record.params_before == record.params_after == 8 * 16 + 16 + 16 * 4
    assert any("lifted 3 Constant nodes" in note for note in record.notes)
    # The input model is not modified.
    assert [n.op_type for n in model.graph.node].count("Constant") == 3


def test_numerically_identical_in_onnxruntime(feeds):
    model = make_mlp(weights_as_constant_nodes=True)
    out, _ = _run(model)
    assert runtime.max_abs_difference(model, out, feeds) == {"y": 0.0}
    onnx.checker.check_model(out.proto)


def test_folds_constant_subgraphs():
    model = _transposed_weight()
    out, record = _run(model)
    assert [n.op_type for n in out.graph.node] == ["MatMul"]
    assert any("folded 1 constant nodes" in note for note in record.notes)
    x = {"x": np.ones((1, 3), np.float32)}
    assert runtime.max_abs_difference(model, out, x) == {"y": 0.0}
    onnx.checker.check_model(out.proto)


def test_an_identity_producing_a_graph_output_stays():
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("Identity", ["h"], ["y"], name="out")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    out, record = _run(model)
    assert out is model and not record.modified


# --- negative and idempotent ------------------------------------------------------------------


def test_negative_and_idempotent():
    once, first = _run(make_mlp())
    assert first.modified
    twice, second = _run(once)
    assert not second.modified and twice is once
    assert not second.touched and second.params_after == second.params_before


def test_switched_off_steps_leave_the_model_alone():
    model = _transposed_weight()
    out, record = _run(model, cleanup.Config(fold_constants=False))
    assert out is model and not record.modified
    assert record.skipped == [("constant folding", "fold_constants = false")]


# --- the dry run and the config ----------------------------------------------------------------


def test_dry_run_lists_lifts_and_identities_without_mutating():
    model = make_mlp(weights_as_constant_nodes=True)
    before = model.proto.SerializeToString()
    plan = cleanup.PASS.plan(model, cleanup.Config(), Context())
    assert model.proto.SerializeToString() == before
    assert [(r.node, r.action) for r in plan.rows] == [
        ("const_w1", "lift to initializer"), ("const_b1", "lift to initializer"),
        ("const_w2", "lift to initializer"), ("noop", "remove Identity")]
    assert any("folded" in note for note in plan.notes)
    off = cleanup.PASS.plan(model, cleanup.Config(lift_constants=False, fold_constants=False),
                            Context())
    assert [(r.node, r.action) for r in off.rows] == [("noop", "remove Identity"),
                                                      ("constant folding", SKIP)]


def test_config_validates():
    with pytest.raises(ValueError, match="fold_size_limit"):
        cleanup.Config(fold_size_limit=-1)
    assert cleanup.Config.from_short(None) == cleanup.Config()
    with pytest.raises(ValueError, match="no argument"):
        cleanup.Config.from_short("x")


# --- issue #17: nested-If Constant weights written once, every node named --------------------


def test_nested_if_constant_weights_are_lifted_without_growing_the_file():
    """Constant-node weights in an If branch, read by a nested If's two branches: lifted, each
    is written once (gs alone wrote W and V once per scope: 1.66x here, 1.44x on a VAD)."""
    model = builders.nested_if_constants()
    out, record = cleanup.PASS.run(model, cleanup.Config(), Context())
    assert record.modified
    assert out.proto.ByteSize() <= model.proto.ByteSize()
    names = [t.name for body, _ in proto_scopes(out.graph) for t in body.initializer]
    assert sorted(names) == ["V", "W", "W2"]
    assert not [n for body, _ in proto_scopes(out.graph) for n in body.node
                if n.op_type == "Constant"]
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    for c1 in (True, False):
        for c2 in (True, False):
            feeds = {"x": x, "c1": np.array(c1), "c2": np.array(c2)}
            np.testing.assert_array_equal(runtime.run_model(out, feeds)["y"],
                                          runtime.run_model(model, feeds)["y"])
    again, second = cleanup.PASS.run(out, cleanup.Config(), Context())
    assert not second.modified and again.proto.ByteSize() == out.proto.ByteSize()


def test_unnamed_and_duplicate_nodes_get_stable_unique_names():
    model = builders.unnamed_matmuls()
    plan = cleanup.PASS.plan(model, cleanup.Config(), Context())
    named = {row.node: row.reason for row in plan.rows if row.action == "name node"}
    assert named["MatMul_mm0"] == "unnamed" and named["Relu_relu0"] == "unnamed"
    assert named["MatMul_mm5"] == "was 'dup'"  # the first "dup" keeps its name
    out, record = cleanup.PASS.run(model, cleanup.Config(), Context())
    names = [n.name for n in out.graph.node]
    assert all(names) and len(names) == len(set(names)) and "dup" in names
    assert any(note.startswith("named 11 nodes") for note in record.notes)
    assert set(named) <= set(record.touched)
    _, second = cleanup.PASS.run(out, cleanup.Config(), Context())
    assert not second.modified
    _, off = cleanup.PASS.run(model, cleanup.Config(name_nodes=False, lift_constants=False,
                                                    fold_constants=False), Context())
    assert not off.modified
