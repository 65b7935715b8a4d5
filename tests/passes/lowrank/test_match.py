"""lowrank's matching: which layers are sites, and the reason every other one is skipped."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
from lowrank_graphs import low_rank, make_model, matmul_model, vi
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import runtime
from onnxcomp.graph import import_graph
from onnxcomp.passes import lowrank
from onnxcomp.passes.lowrank.match import break_even, find_sites, match
from onnxcomp.passes.lowrank.spectrum import decompose
from onnxcomp.pipeline import Context


def _node(model, name) -> gs.Node:
    return next(n for n in import_graph(model).nodes if n.name == name)


def test_matmul_gemm_and_conv_matrices_are_k_by_n_and_decomposed_in_float64():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((6, 4)).astype(np.float32)
    matrix, kind, sampling = match(_node(matmul_model(w), "mm"))
    # The weight's own values (no float64 copy per site held for the whole plan: memory on
    # large models); the decomposition works in float64.
    assert matrix.dtype == np.float32 and np.array_equal(matrix, w) and kind == ("MatMul",)
    assert decompose(matrix, None, False, 0.01).matrix.dtype == np.float64
    gemm = make_model([helper.make_node("Gemm", ["x", "W"], ["y"], name="g", transB=1,
                                        alpha=0.5)],
                      [vi("x", [2, 4])], [vi("y", [2, 6])], [numpy_helper.from_array(w, "W")])
    matrix, kind, _ = match(_node(gemm, "g"))
    assert np.allclose(matrix, w.T.astype(np.float64) * 0.5) and kind == ("Gemm", 1, 0.5)
    conv = make_model([helper.make_node("Conv", ["x", "W"], ["y"], name="c", strides=[2, 2],
                                        pads=[1, 1, 1, 1])],
                      [vi("x", [1, 4, 6, 6])], [vi("y", [1, 6, 4, 4])],
                      [numpy_helper.from_array(w.reshape(6, 4, 1, 1), "W")])
    matrix, kind, sampling = match(_node(conv, "c"))
    assert np.array_equal(matrix, w.T) and kind == ("Conv",) and sampling == ((1, 2), (1, 2))


def test_activation_by_activation_matmul_is_skipped():
    nodes = [helper.make_node("MatMul", ["a", "b"], ["y"], name="aa")]
    model = make_model(nodes, [vi("a", [2, 4]), vi("b", [4, 3])], [vi("y", [2, 3])])
    assert match(_node(model, "aa")) == "the weight is not a constant (activation x activation)"


def test_break_even_rank():
    assert break_even(64, 64, 0.0) == 31  # 32 * 128 = 64 * 64 is not cheaper
    assert break_even(64, 64, 0.1) == 28
    assert break_even(1, 2048, 0.0) == 0


def test_weight_read_by_another_kind_of_node_is_skipped():
    w = low_rank(np.random.default_rng(1), 64, 64, 2)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("Add", ["h", "W"], ["y"], name="add")]
    model = make_model(nodes, [vi("x", [64, 64])], [vi("y", [64, 64])],
                       [numpy_helper.from_array(w, "W")])
    sites, skipped = find_sites(import_graph(model), lowrank.Config(energy=1.0))
    assert not sites and "also read by add" in skipped[0].reason


def test_subgraph_weights_are_factored_in_their_body():
    """A MatMul inside an If branch reading an outer weight is factored there (by its weight
    alone), the factors written once; both branch conditions still compute the same."""
    w = low_rank(np.random.default_rng(13), 64, 64, 2)
    branch = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["t"], name="inner")],
                               "then", [], [vi("t", [2, 64])])
    other = helper.make_graph([helper.make_node("Identity", ["x"], ["e"])], "else", [],
                              [vi("e", [2, 64])])
    nodes = [helper.make_node("If", ["c"], ["y"], name="branch", then_branch=branch,
                              else_branch=other)]
    model = make_model(nodes, [vi("x", [2, 64]), vi("c", [], TensorProto.BOOL)],
                       [vi("y", [2, 64])], [numpy_helper.from_array(w, "W")])
    plan = lowrank.PASS.plan(model, lowrank.Config(energy=1.0), Context())
    assert [(r.node, r.action) for r in plan.rows] == \
        [("inner", "factor rank 2 of 64 (-94% params)")]
    assert plan.payload[0].owner == "branch"
    out, record = lowrank.PASS.run(model, lowrank.Config(energy=1.0), Context())
    assert record.modified and record.touched == ["inner"]
    body = next(a.g for a in out.graph.node[0].attribute if a.name == "then_branch")
    assert [n.op_type for n in body.node] == ["MatMul", "MatMul"]
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32)
    for cond in (True, False):
        feeds = {"x": x, "c": np.array(cond)}
        np.testing.assert_allclose(runtime.run_model(out, feeds)["y"],
                                   runtime.run_model(model, feeds)["y"], atol=1e-4, rtol=1e-4)


def test_a_bias_free_bottleneck_pair_is_a_factorization_already():
    rng = np.random.default_rng(2)
    a, b = rng.standard_normal((64, 8)), rng.standard_normal((8, 64))
    nodes = [helper.make_node("MatMul", ["x", "A"], ["h"], name="down"),
             helper.make_node("MatMul", ["h", "B"], ["y"], name="up")]
    model = make_model(nodes, [vi("x", [2, 64])], [vi("y", [2, 64])],
                       [numpy_helper.from_array(a.astype(np.float32), "A"),
                        numpy_helper.from_array(b.astype(np.float32), "B")])
    sites, skipped = find_sites(import_graph(model), lowrank.Config(min_params=0))
    assert not sites
    assert {(p.node, p.reason) for p in skipped} == {
        ("down", "already a rank-8 factor pair with up: not factored again"),
        ("up", "already a rank-8 factor pair with down: not factored again")}


def test_a_squeeze_conv_with_a_bias_is_not_a_factor_pair():
    # PP-OCR's SE blocks: a 1x1 squeeze conv with a bias straight into a 1x1 excite conv; lowrank
    # always factored those, and still does.
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("Conv", ["x", "W1", "b1"], ["h"], name="squeeze"),
             helper.make_node("Conv", ["h", "W2"], ["y"], name="excite")]
    model = make_model(nodes, [vi("x", [1, 96, 4, 4])], [vi("y", [1, 96, 4, 4])],
                       [numpy_helper.from_array(
                           rng.standard_normal((42, 96, 1, 1)).astype(np.float32), "W1"),
                        numpy_helper.from_array(rng.standard_normal(42).astype(np.float32), "b1"),
                        numpy_helper.from_array(
                            rng.standard_normal((96, 42, 1, 1)).astype(np.float32), "W2")])
    sites, skipped = find_sites(import_graph(model), lowrank.Config())
    assert [s.plan.node for s in sites] == ["squeeze", "excite"] and not skipped
