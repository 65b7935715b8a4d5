"""Cross-layer equalization: float-exact in ONNX Runtime, ranges equalized, refusals said."""

from __future__ import annotations

import numpy as np
import pytest
from builders import GraphBuilder, tensor
from quantize_graphs import data_for, rel_l2

from onnxcomp import runtime
from onnxcomp.graph import constant_array, export_model, import_graph, tidy
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import equalize
from onnxcomp.pipeline import Context

C = 8


def _chain(activation: str | None, second_group: int = 1, spread: bool = True,
           first_group: int = 1, **attrs):
    """x -> Conv a (per-channel ranges 0.01..100 when ``spread``) -> activation -> Conv b ->
    Relu -> Conv c (a second chain sharing b) -> y."""
    b = GraphBuilder(seed=3)
    h = b.conv("x", 4 if first_group == 1 else C, C, 3, "a", group=first_group)
    if spread:  # channel ranges a thousand-fold apart: what equalization is for
        w = b.inits["a.w"]
        from onnx import numpy_helper
        values = numpy_helper.to_array(w) * np.logspace(-2, 2, C, dtype=np.float32)[:, None,
                                                                                    None, None]
        b.inits["a.w"] = numpy_helper.from_array(values.astype(np.float32), "a.w")
    if activation == "PRelu":
        h = b.node("PRelu", [h, b.const("slope", np.linspace(0.05, 0.3, C, dtype=np.float32)
                                              .reshape(C, 1, 1))], "act")
    elif activation == "Clip":
        h = b.node("Clip", [h, b.const("low", np.asarray(0.0, np.float32))] + (
            [b.const("high", np.asarray(6.0, np.float32))] if attrs.get("high") else []),
            "act")
    elif activation is not None:
        h = b.node(activation, [h], "act", **{k: v for k, v in attrs.items() if k != "high"})
    h = b.conv(h, C, C, 3, "b", group=second_group)
    h = b.node("Relu", [h], "relu_b")
    y = b.conv(h, C, 4, 1, "c")
    first_in = 4 if first_group == 1 else C
    return b.model([tensor("x", [2, first_in, 10, 10])], [tensor(y, [2, 4, 10, 10])])


def _equalized(model, planned=("a", "b", "c")):
    graph = import_graph(model)
    chains, skipped = equalize.find_chains(graph, set(planned))
    equalize.apply(graph, chains)
    return export_model(tidy(graph), like=model), chains, skipped


def _outputs(model, batch):
    return runtime.run_model(model, batch)


@pytest.mark.parametrize("activation,kwargs", [
    ("Relu", {}), ("LeakyRelu", {"alpha": 0.1}), ("PRelu", {}), (None, {}), ("Clip", {}),
    ("Identity", {})])
def test_equalization_is_float_exact_and_equalizes_ranges(activation, kwargs):
    model = _chain(activation, **kwargs)
    result, chains, _ = _equalized(model)
    assert [(c.first, c.second) for c in chains] == [("a", "b"), ("b", "c")]
    batch = next(iter(data_for(model)))
    ref, out = _outputs(model, batch), _outputs(result, batch)
    for name in ref:
        assert rel_l2(ref[name], out[name]) < 1e-5
    graph = import_graph(result)
    nodes = {n.name: n for n in graph.nodes}
    w1 = constant_array(nodes["a"].inputs[1])
    w2 = constant_array(nodes["b"].inputs[1])
    r1 = np.abs(w1).reshape(C, -1).max(axis=1)
    r2 = np.abs(w2).transpose(1, 0, 2, 3).reshape(C, -1).max(axis=1)
    before = np.abs(constant_array(import_graph(model).tensors()["a.w"])).reshape(C, -1).max(1)
    assert before.max() / before.min() > 1000  # built spread out
    # b is also equalized against c afterwards: a's ranges now match b's input side within the
    # sweeps' tolerance, and a's spread shrank by orders of magnitude
    assert np.allclose(r1, r2, rtol=0.05)
    assert r1.max() / r1.min() < 0.1 * before.max() / before.min()


def test_equalizing_twice_changes_nothing_more():
    once, _, _ = _equalized(_chain("Relu"))
    twice, chains, _ = _equalized(once)
    assert len(chains) == 2
    first = {n.name: n for n in import_graph(once).nodes}
    second = {n.name: n for n in import_graph(twice).nodes}
    for name in ("a", "b", "c"):
        for slot in (1, 2):
            np.testing.assert_allclose(constant_array(second[name].inputs[slot]),
                                       constant_array(first[name].inputs[slot]),
                                       rtol=2e-3, atol=1e-6)


@pytest.mark.parametrize("group", [C, 2])
def test_grouped_and_depthwise_second_conv_is_exact(group):
    model = _chain("Relu", second_group=group)
    result, chains, _ = _equalized(model)
    assert ("a", "b") in [(c.first, c.second) for c in chains]
    batch = next(iter(data_for(model)))
    ref, out = _outputs(model, batch), _outputs(result, batch)
    assert all(rel_l2(ref[k], out[k]) < 1e-5 for k in ref)
    nodes = {n.name: n for n in import_graph(result).nodes}
    w1, w2 = constant_array(nodes["a"].inputs[1]), constant_array(nodes["b"].inputs[1])
    r2 = np.abs(equalize._second_view(w2, C, group)).reshape(C, -1).max(1)
    assert np.allclose(np.abs(w1).reshape(C, -1).max(1), r2, rtol=0.05)
    # the view is a permutation of W2: every weight once, back to the same tensor
    view = equalize._second_view(w2, C, group)
    np.testing.assert_array_equal(equalize._from_second_view(view, w2.shape, group), w2)


def test_depthwise_first_conv_is_exact():
    model = _chain("Relu", first_group=C)
    result, chains, _ = _equalized(model)
    assert len(chains) == 2
    batch = next(iter(data_for(model)))
    ref, out = _outputs(model, batch), _outputs(result, batch)
    assert all(rel_l2(ref[k], out[k]) < 1e-5 for k in ref)


@pytest.mark.parametrize("activation,kwargs,why", [
    ("HardSwish", {}, "HardSwish is not positively homogeneous"),
    ("Sigmoid", {}, "Sigmoid is not positively homogeneous"),
    ("Clip", {"high": True}, "Clip with an upper bound"),
])
def test_non_homogeneous_activations_are_skipped_with_the_reason(activation, kwargs, why):
    model = _chain(activation, **kwargs)
    _, chains, skipped = _equalized(model)
    assert [(c.first, c.second) for c in chains] == [("b", "c")]
    reasons = dict(skipped)
    assert why in reasons["a"] and reasons["c"] == "output read by several nodes or a graph output"


def test_nothing_to_do_and_unplanned_convs():
    model = _chain("Relu")
    graph = import_graph(model)
    chains, skipped = equalize.find_chains(graph, {"a"})  # b not quantized: no chain
    assert not chains and skipped == [("a", "next Conv is not quantized")]
    notes: list[str] = []
    assert equalize.run(model, set(), notes) is model and notes[0].startswith("equalize: 0")


def test_pass_option_plans_and_applies_equalization():
    model = _chain("Relu")
    config = quantize.Config(equalize=True)
    plan = quantize.plan(model, config, Context())
    assert any(n.startswith("equalize: 2 Conv chains (2 x Relu)") for n in plan.notes)
    calib = data_for(model, 8)
    out, record = quantize.PASS.run(model, config, Context(calibration=calib))
    assert any(n.startswith("equalize: 2") for n in record.notes)
    batch = next(iter(data_for(model, 1)))
    ref = _outputs(model, batch)["c"]
    # int8 per tensor: a thousand-fold channel spread is what equalization removes
    per_tensor = quantize.Config(per_channel=False)
    eq_tensor, _ = quantize.PASS.run(model, quantize.Config(per_channel=False, equalize=True),
                                     Context(calibration=calib))
    raw_tensor, _ = quantize.PASS.run(model, per_tensor, Context(calibration=calib))
    assert rel_l2(ref, _outputs(eq_tensor, batch)["c"]) < rel_l2(ref, _outputs(raw_tensor,
                                                                              batch)["c"])
    assert rel_l2(ref, _outputs(out, batch)["c"]) < 0.1


def test_config_refuses_non_booleans():
    with pytest.raises(ValueError, match="equalize must be true or false"):
        quantize.Config(equalize="yes")


def test_recipe_values_reach_the_new_fields():
    from onnxcomp.recipe import config_from_table

    config = config_from_table("quantize", {"equalize": "true", "bias_correction": "weights",
                                            "int8_method": "gptq"})
    assert config.equalize is True and config.bias_correction == "weights"
    assert config.int8_gptq


@pytest.mark.zoo
@pytest.mark.parametrize("name,found", [
    # BatchNormalization and the constant affine steps are folded into their Convs first
    # (fold.py), which opens more chains
    ("ppocr-rec", "equalize: 3 Conv chains (2 x Relu, 1 x none); skipped 35"),
    ("ppocr-det", "equalize: 18 Conv chains (10 x Relu, 8 x none); skipped 44")])
def test_ppocr_chains_are_counted_and_equalized_exactly(name, found):
    """The counts docs/quantize.md gives, and float-exactness on the real model."""
    from onnxcomp import zoo
    from onnxcomp.model import load

    model = load(zoo.fetch(name))
    plan = quantize.plan(model, quantize.Config(equalize=True), Context())
    assert any(note.startswith(found) for note in plan.notes)
    prepared = plan.payload.prepared
    result = equalize.run(prepared, {s.node for s in plan.payload.sites.sites}, [])
    batch = zoo.dataset(name, "eval", 1).make_batch(0)
    ref, out = _outputs(prepared, batch), _outputs(result, batch)
    assert all(rel_l2(ref[k], out[k]) < 1e-5 for k in ref)
