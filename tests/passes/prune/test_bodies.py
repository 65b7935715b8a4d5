"""prune inside If / Loop bodies: the hidden channels of a branch are cut, the channels crossing
the body boundary kept, numerics against a hand-cut reference in ONNX Runtime, a weight shared
between the branches left alone, activation ranking from the values a body received, and a
second run at the floor doing nothing."""

from __future__ import annotations

import numpy as np
import onnx
import prune_body_graphs as pbg
from onnx import numpy_helper

from onnxcomp import calibration, runtime, subgraphs
from onnxcomp.model import Model
from onnxcomp.passes import prune
from onnxcomp.pipeline import SKIP, Context

# Cutting channels only drops terms of a sum: float32 reordering, no approximation.
EXACT = 1e-5


def _body_weights(model: Model) -> dict[str, tuple]:
    """Every initializer of the model, bodies included, by name: its shape."""
    found = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for body in subgraphs.all_bodies(model.graph):
        found.update({t.name: tuple(t.dims) for t in body.graph.initializer})
    return found


def _x(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, pbg.C, pbg.L)).astype(np.float32)


def _run(model: Model, feeds: dict) -> np.ndarray:
    return runtime.run(runtime.session(model, optimize=False), feeds)["y"]


def _reference(model: Model, removed: dict[str, list[int]]) -> Model:
    """``model`` with the second Conv of each branch reading none of the removed hidden
    channels (their columns of ``<branch>.w2`` zeroed): what the cut must compute."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    scopes = [proto.graph] + [b.graph for b in subgraphs.all_bodies(proto.graph)]
    for graph in scopes:
        for tensor in graph.initializer:
            branch = tensor.name.split(".")[0]
            if tensor.name.endswith(".w2") and branch in removed:
                values = numpy_helper.to_array(tensor).copy()
                values[:, removed[branch], :] = 0
                tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return Model(proto)


def _removed(record) -> dict[str, list[int]]:
    """Branch prefix -> the hidden channels its group lost, from the record's details."""
    found = {}
    for group in record.details["groups"]:
        if "body" in group:
            branch = group["body"].split("/")[-1].split("_")[0]
            found[branch] = [i for i in range(group["size"]) if i not in group["kept"]]
    return found


def test_plan_cuts_hidden_channels_and_keeps_the_boundary():
    model = pbg.if_conv_chain()
    plan = prune.plan(model, prune.Config(ratio=0.5), Context())
    rows = {row.node: row for row in plan.rows}
    for branch in ("then", "else"):
        hidden = rows[f"body if/{branch}_branch: group 0 (conv: {branch}_conv1, {branch}_conv2)"]
        assert hidden.action == f"cut {pbg.H // 2} of {pbg.H} channels (conv)"
        boundary = [r for name, r in rows.items() if name.startswith(f"body if/{branch}")
                    and r.action == SKIP]
        assert boundary and all("crosses the body boundary" in r.reason for r in boundary)
    assert _body_weights(model)["then.w1"] == (pbg.H, pbg.C, 3)  # the plan is pure


def test_cut_inside_both_branches_matches_the_hand_cut_reference():
    model = pbg.if_conv_chain()
    result, record = prune.PASS.run(model, prune.Config(ratio=0.5), Context())
    assert record.modified
    onnx.checker.check_model(result.proto, full_check=True)
    shapes = _body_weights(result)
    half = pbg.H // 2
    for branch in ("then", "else"):
        assert shapes[f"{branch}.w1"] == (half, pbg.C, 3) and shapes[f"{branch}.b1"] == (half,)
        assert shapes[f"{branch}.w2"] == (pbg.C, half, 3)
        assert shapes[f"{branch}.b2"] == (pbg.C,)  # the boundary channels stay
    assert shapes["top.w"] == (pbg.C, pbg.C, 3)
    assert {o.name for o in result.graph.output} == {"y"}
    assert any("inside 2 If/Loop/Scan bodies" in note for note in record.notes)
    reference = _reference(model, _removed(record))
    for cond in (True, False):
        feeds = {"x": _x(3), "cond": np.array(cond)}
        got = _run(result, feeds)
        assert got.shape == (1, pbg.C, pbg.L)
        np.testing.assert_allclose(got, _run(reference, feeds), atol=EXACT)


def test_outer_weights_read_by_one_branch_are_cut_where_they_are_defined():
    model = pbg.if_conv_chain(outer_weights=True)
    assert not subgraphs.all_bodies(model.graph)[0].graph.initializer
    result, record = prune.PASS.run(model, prune.Config(ratio=0.5), Context())
    assert record.modified
    shapes = _body_weights(result)
    assert shapes["then.w1"] == (pbg.H // 2, pbg.C, 3)
    assert shapes["else.w2"] == (pbg.C, pbg.H // 2, 3)
    reference = _reference(model, _removed(record))
    for cond in (True, False):
        feeds = {"x": _x(4), "cond": np.array(cond)}
        np.testing.assert_allclose(_run(result, feeds), _run(reference, feeds), atol=EXACT)


def test_dead_channels_are_cut_float_exactly():
    """Hidden channels whose producing rows and reading columns are zero score lowest: cutting
    them changes nothing."""
    model = pbg.if_conv_chain(outer_weights=True)
    dead = [1, 4, 6, 7]
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor).copy()
        if tensor.name.endswith((".w1", ".b1")):
            values[dead] = 0
        elif tensor.name.endswith(".w2"):
            values[:, dead] = 0
        else:
            continue
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    result, record = prune.PASS.run(model, prune.Config(ratio=0.5, importance="l2"), Context())
    assert _removed(record) == {"then": dead, "else": dead}
    for cond in (True, False):
        feeds = {"x": _x(5), "cond": np.array(cond)}
        np.testing.assert_allclose(_run(result, feeds), _run(model, feeds), atol=1e-6)


def test_a_weight_shared_by_both_branches_is_kept_and_said():
    model = pbg.if_conv_chain(shared=True)
    plan = prune.plan(model, prune.Config(ratio=0.5), Context())
    hidden = [r for r in plan.rows if "group 0" in r.node and r.node.startswith("body")]
    assert len(hidden) == 2 and all(r.action == SKIP for r in hidden)
    assert all("shared.w1 is also read in if/" in r.reason for r in hidden)
    assert any("shared.w1" in note and "kept uncut" in note for note in plan.notes)
    result, record = prune.PASS.run(model, prune.Config(ratio=0.5), Context())
    assert not record.modified and result is model


def test_activation_ranking_uses_the_values_the_taken_branch_received():
    model = pbg.if_conv_chain()
    batches = [{"x": _x(seed), "cond": np.array(True)} for seed in range(4)]
    ctx = Context(calibration=calibration.from_batches(batches))
    plan = prune.plan(model, prune.Config(ratio=0.5, importance="auto"), ctx)
    bodies = {b.label: b for b in plan.payload.bodies}
    assert bodies["if/then_branch"].plan.importance == "activation"
    assert bodies["if/else_branch"].plan.importance == "l2"
    assert any("if/else_branch never ran on the calibration data" in n for n in plan.notes)
    result, record = prune.PASS.run(model, prune.Config(ratio=0.5), ctx)
    reference = _reference(model, _removed(record))
    feeds = {"x": _x(9), "cond": np.array(True)}
    np.testing.assert_allclose(_run(result, feeds), _run(reference, feeds), atol=EXACT)


def test_loop_body_hidden_width_is_cut():
    model = pbg.loop_mlp()
    result, record = prune.PASS.run(model, prune.Config(ratio=0.5), Context())
    assert record.modified
    shapes = _body_weights(result)
    assert shapes["W1"] == (pbg.D, pbg.H // 2) and shapes["b1"] == (pbg.H // 2,)
    assert shapes["W2"] == (pbg.H // 2, pbg.D)
    (group,) = [g for g in record.details["groups"] if g.get("body") == "loop/body"]
    removed = [i for i in range(group["size"]) if i not in group["kept"]]
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    body = subgraphs.all_bodies(proto.graph)[0].graph
    for tensor in body.initializer:
        if tensor.name == "W2":
            values = numpy_helper.to_array(tensor).copy()
            values[removed] = 0
            tensor.CopyFrom(numpy_helper.from_array(values, "W2"))
    x = np.random.default_rng(0).standard_normal((1, pbg.D)).astype(np.float32)
    np.testing.assert_allclose(_run(result, {"x": x}), _run(Model(proto), {"x": x}), atol=EXACT)


def test_pruned_to_the_floor_a_second_run_has_nothing_to_do():
    config = prune.Config(ratio=0.99)
    once, first = prune.PASS.run(pbg.if_conv_chain(outer_weights=True), config, Context())
    twice, second = prune.PASS.run(once, config, Context())
    assert first.modified and not second.modified and twice is once
    assert _body_weights(once)["then.w1"] == (1, pbg.C, 3)


def test_models_without_bodies_plan_as_before():
    import prune_graphs as pg

    plan = prune.plan(pg.conv_net(), prune.Config(ratio=0.5), Context())
    assert plan.payload.bodies == []
    assert not any(row.node.startswith("body ") for row in plan.rows)


def test_distill_after_prune_plans_the_body_layers_it_hands_over():
    from onnxcomp.passes import distill

    model = pbg.if_conv_chain()
    data = calibration.from_batches([{"x": _x(seed), "cond": np.array(True)}
                                     for seed in range(2)])
    pruned, record = prune.PASS.run(model, prune.Config(ratio=0.5),
                                    Context(calibration=data, teacher=model))
    assert {c.node for c in record.changes} == {"then_conv2", "else_conv2"}
    ctx = Context(calibration=data, teacher=model, records=[record])
    plan = distill.PASS.plan(pruned, distill.Config(), ctx)
    assert {(r.node, r.reason) for r in plan.rows} == {
        ("then_conv2", "changed by prune; inside body if/then_branch"),
        ("else_conv2", "changed by prune; inside body if/else_branch")}


def test_nested_branch_is_cut_in_place():
    model = pbg.nested_if_conv_chain()
    result, record = prune.PASS.run(model, prune.Config(ratio=0.5), Context())
    shapes = _body_weights(result)
    assert shapes["inner_then.w1"] == (pbg.H // 2, pbg.C, 3)
    assert shapes["inner_else.w2"] == (pbg.C, pbg.H // 2, 3)
    assert {g["body"] for g in record.details["groups"]} == {
        "outer_if/then_branch/inner_if/then_branch", "outer_if/then_branch/inner_if/else_branch"}
    removed = {f"inner_{k}": v for k, v in
               ((g["body"].split("/")[-1].split("_")[0],
                 [i for i in range(g["size"]) if i not in g["kept"]])
                for g in record.details["groups"])}
    reference = _reference(model, removed)
    for c1, c2 in ((True, True), (True, False), (False, True)):
        feeds = {"x": _x(6), "c1": np.array(c1), "c2": np.array(c2)}
        np.testing.assert_allclose(_run(result, feeds), _run(reference, feeds), atol=EXACT)


def test_a_main_graph_weight_a_branch_also_reads_is_kept():
    model = pbg.weight_read_in_main_and_branch()
    plan = prune.plan(model, prune.Config(ratio=0.5), Context())
    (hidden,) = [r for r in plan.rows if r.node.startswith("group")
                 and "main_conv1, main_conv2" in r.node]
    assert hidden.action == SKIP and "wa is also read in if/then_branch" in hidden.reason
    result, record = prune.PASS.run(model, prune.Config(ratio=0.5), Context())
    assert not record.modified and _body_weights(result)["wa"] == (pbg.H, pbg.C, 3)
