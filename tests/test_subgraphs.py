"""onnxcomp.subgraphs: bodies as models of their own, and the feeds each body gets on data
(If: the taken branch; Loop and Scan: driven one iteration at a time; nested bodies
recursively), checked against ONNX Runtime running the whole model."""

from __future__ import annotations

import body_graphs
import numpy as np
import onnx
import pytest

from onnxcomp import runtime, subgraphs


def _x(seed: int = 0, shape=(1, body_graphs.CHANNELS, body_graphs.LENGTH)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def test_free_names_are_the_outer_values_a_body_reads():
    model = body_graphs.if_convs()
    found = {body.key: body for body in subgraphs.bodies(model.graph)}
    assert set(found) == {("if", "then_branch"), ("if", "else_branch")}
    # Its own weights are its initializers; the outer Conv's output is read from outside.
    assert subgraphs.free_names(found[("if", "then_branch")].graph) == ["t"]
    nested = body_graphs.nested_if_convs()
    outer_then = next(b for b in subgraphs.bodies(nested.graph) if b.attribute == "then_branch")
    assert subgraphs.free_names(outer_then.graph) == ["c2", "x"]  # read by the inner If


def test_a_branch_as_a_model_computes_what_the_branch_computes():
    model = body_graphs.if_convs()
    feeds = {"x": _x(), "cond": np.array(True)}
    recorded = subgraphs.record(model, [feeds])
    key = ("if", "then_branch")
    assert len(recorded.feeds[key]) == 1
    branch = recorded.models[key]
    assert [v.name for v in branch.graph.input] == ["t"]
    assert {t.name for t in branch.graph.initializer} == {"then.w", "then.b"}
    alone = runtime.run_model(branch, recorded.feeds[key][0])["then_out"]
    np.testing.assert_array_equal(alone, runtime.run_model(model, feeds)["y"])


def test_only_the_taken_branch_gets_feeds_and_the_other_says_why():
    model = body_graphs.if_convs()
    recorded = subgraphs.record(model, [{"x": _x(i), "cond": np.array(True)} for i in range(3)])
    assert len(recorded.feeds[("if", "then_branch")]) == 3
    assert ("if", "else_branch") not in recorded.feeds
    assert recorded.missing[("if", "else_branch")] == "never ran on the calibration data"


def test_nested_branches_are_recorded_through_their_enclosing_branch():
    model = body_graphs.nested_if_convs()
    batches = [{"x": _x(i), "c1": np.array(True), "c2": np.array(i % 2 == 0)} for i in range(3)]
    recorded = subgraphs.record(model, batches)
    inner_then = ("outer_if", "then_branch", "inner_if", "then_branch")
    inner_else = ("outer_if", "then_branch", "inner_if", "else_branch")
    assert len(recorded.feeds[inner_then]) == 2 and len(recorded.feeds[inner_else]) == 1
    np.testing.assert_array_equal(recorded.feeds[inner_else][0]["x"], batches[1]["x"])
    assert "never ran" in recorded.missing[("outer_if", "else_branch")]
    # Asked for one nested body only: its enclosing branch is recorded, the rest is not.
    only = subgraphs.record(model, batches, {inner_else})
    assert set(only.feeds) == {("outer_if", "then_branch"), inner_else}


def _simulate_loop(x: np.ndarray, w: np.ndarray, trips: int) -> list[np.ndarray]:
    states = [x]
    for _ in range(trips - 1):
        states.append(np.tanh(states[-1] @ w))
    return states


@pytest.mark.parametrize("carried_weight", [True, False])
def test_a_loop_body_is_driven_one_iteration_at_a_time(carried_weight):
    model = body_graphs.loop_matmul(carried_weight=carried_weight)
    x = _x(1, (2, body_graphs.DIM))
    recorded = subgraphs.record(model, [{"x": x}])
    feeds = recorded.feeds[("loop", "body")]
    assert [int(f["i"]) for f in feeds] == [0, 1, 2]
    w = onnx.numpy_helper.to_array(model.graph.initializer[0])
    for feed, expected in zip(feeds, _simulate_loop(x, w, 3)):
        np.testing.assert_allclose(feed["h_in"], expected, rtol=1e-5, atol=1e-6)
    # The last iteration's output is the model's output.
    last = runtime.run_model(recorded.models[("loop", "body")], feeds[-1])["h_out"]
    np.testing.assert_allclose(last, runtime.run_model(model, {"x": x})["y"], rtol=1e-6)


def test_iterations_are_bounded(monkeypatch):
    monkeypatch.setattr(subgraphs, "MAX_ITERATIONS", 2)
    model = body_graphs.loop_matmul(trips=10)
    recorded = subgraphs.record(model, [{"x": _x(i, (1, body_graphs.DIM))} for i in range(3)])
    assert len(recorded.feeds[("loop", "body")]) == 6


@pytest.mark.parametrize("reverse", [False, True])
def test_a_scan_body_is_driven_over_its_slices(reverse):
    model = body_graphs.scan_matmul(reverse=reverse)
    seq = _x(2, (5, 1, body_graphs.DIM))
    s0 = np.zeros((1, body_graphs.DIM), np.float32)
    recorded = subgraphs.record(model, [{"s0": s0, "seq": seq}])
    feeds = recorded.feeds[("scan", "body")]
    order = list(range(5))[::-1] if reverse else list(range(5))
    assert [np.array_equal(f["x_t"], seq[t]) for f, t in zip(feeds, order)] == [True] * 5
    out = runtime.run_model(model, {"s0": s0, "seq": seq})
    last = runtime.run_model(recorded.models[("scan", "body")], feeds[-1])["s_out"]
    np.testing.assert_allclose(last, out["s_final"], rtol=1e-5, atol=1e-6)


def test_find_body_follows_a_nested_key():
    model = body_graphs.nested_if_convs()
    found = subgraphs.find_body(model, ("outer_if", "then_branch", "inner_if", "else_branch"))
    assert found is not None and found.graph.node[1].name == "inner_else_conv"
    assert subgraphs.find_body(model, ("outer_if", "nowhere")) is None


def test_an_if_inside_a_loop_gets_one_feed_per_iteration():
    model = body_graphs.loop_with_if(trips=3)
    x = _x(4, (2, body_graphs.DIM))
    recorded = subgraphs.record(model, [{"x": x, "flag": np.array(True)}])
    feeds = recorded.feeds[("loop", "body", "body_if", "then_branch")]
    assert len(feeds) == 3 and set(feeds[0]) == {"h_in"}
    np.testing.assert_array_equal(feeds[0]["h_in"], x)
    assert "never ran" in recorded.missing[("loop", "body", "body_if", "else_branch")]
