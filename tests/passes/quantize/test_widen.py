"""``u8s8_remedy = scale`` (the default through ``auto``): a saturating layer keeps its int8
weight, the scale widened in the channels with a pair that can overflow. After it no pair can
overflow in either kernel order, the weights move by at most half a widened step, the layer still
runs as ONNX Runtime's u8 x s8 integer conv, and (on a CPU without VNNI) that kernel now matches
its own QDQ math; per-tensor and shared scales, and what cannot be widened, are handled."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from quantize_graphs import bright_images as _bright_images
from quantize_graphs import dense_matmul, x86_without_vnni
from quantize_graphs import saturating_conv as _conv_model
from quantize_graphs import weight_dtypes as _dtypes
from quantize_graphs import weight_values as _weights

from onnxcomp import runtime
from onnxcomp.model import Model
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import overflow, pairsums, widen
from onnxcomp.pipeline import Context


@pytest.fixture(scope="module")
def bright():
    weight = np.random.default_rng(1).uniform(0.5, 1.0, (4, 3, 3, 3))
    model, data = _conv_model(weight), _bright_images(3)
    results = {remedy: quantize.PASS.run(model.copy(), quantize.Config(
        mode="int8", u8s8_remedy=remedy), Context(calibration=data))
        for remedy in ("auto", "scale", "u8u8")}
    plain = quantize.PASS.run(model.copy(), quantize.Config(mode="int8", u8s8_overflow="none"),
                              Context(calibration=data))
    return model, data, results, plain


def _site(name: str, op: str, weight: np.ndarray, **attrs) -> overflow.Site:
    channels = weight.shape[0] if op == "Conv" else weight.shape[-1]
    if op == "Conv":
        attrs.setdefault("kernel_shape", list(weight.shape[2:]))
    return overflow.Site(name, op, "a", 0, "wq#0", "w", tuple(attrs.items()), channels)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("op", ["Conv", "MatMul"])
def test_after_widening_no_pair_can_overflow_in_either_order(seed, op):
    rng = np.random.default_rng(seed)
    shape = (6, 5, 3, 3) if op == "Conv" else (40, 6)
    q = np.clip(np.round(rng.standard_normal(shape) * 60), -127, 127).astype(np.int32)
    site = _site("n", op, q)
    assert any(pairs for plan in pairsums.pair_plans(site, q) for _, pairs in plan)
    r = widen.factors(site, q)
    axis_shape = (-1, 1, 1, 1) if op == "Conv" else (1, -1)
    widened = np.clip(np.round(q / r.reshape(axis_shape)), -127, 127)
    assert not any(pairs for plan in pairsums.pair_plans(site, widened.astype(np.int32))
                   for _, pairs in plan)
    # Only the risky channels move, by at most a factor of two.
    risky = {int(c) for plan in pairsums.pair_plans(site, q) for _, pairs in plan
             for *_, channels, _, _ in pairs for c in channels}
    assert {int(c) for c in np.flatnonzero(r > 1)} == risky
    assert (r >= 1).all() and (r <= 2).all()  # at most one bit: 254 / 127


def test_grouped_conv_channels_are_indexed_across_groups():
    q = np.zeros((4, 2, 1, 1), np.int32)
    q[3, :, 0, 0] = [120, 110]  # the second group's second channel: one risky pair
    site = _site("n", "Conv", q, group=2)
    assert widen.factors(site, q).tolist() == [1, 1, 1, 230 / widen.SAFE_PAIR]


def test_the_default_widens_the_saturating_layer_and_keeps_it_int8(bright):
    _, _, results, (plain, _) = bright
    result, record = results["auto"]
    assert _dtypes(result) == {TensorProto.INT8}
    note = next(n for n in record.notes if "scales widened" in n)
    assert note.startswith("u8s8_overflow: 1 layers'") and "exact" in note  # the check's words
    [entry] = record.details["u8s8_remedy"]["scale"]
    assert entry["node"] == "conv" and entry["channels"] == 4 and 1 < entry["factor"] < 2
    assert record.details["u8s8_remedy"]["u8u8"] == []
    # Within half a widened step of the exact weights; the graph is the same but for values.
    before, after = _weights(plain), _weights(result)
    scale = {t.name: numpy_helper.to_array(t) for t in result.graph.initializer}
    dq = next(n for n in result.graph.node if n.op_type == "DequantizeLinear"
              and n.input[0].startswith("w"))
    step = scale[dq.input[1]].reshape(-1, 1, 1, 1)
    assert (np.abs(after[dq.output[0]] - before[dq.output[0]]) <= step / 2 + 1e-7).all()
    assert [n.op_type for n in result.graph.node] == [n.op_type for n in plain.graph.node]
    # Idempotent: nothing left that can overflow, so nothing to do.
    site = next(s for s in overflow.sites(result.graph) if s.node == "conv")
    q = numpy_helper.to_array(next(t for t in result.graph.initializer if t.name == site.weight))
    assert (widen.factors(site, q) == 1).all()


def test_the_widened_layer_runs_as_an_integer_conv_matching_its_qdq_math(bright, tmp_path):
    model, data, results, _ = bright
    result = results["scale"][0]
    path = tmp_path / "optimized.onnx"
    runtime.session(result, optimized_model_path=str(path))
    weight = next(s.weight for s in overflow.sites(result.graph) if s.node == "conv")
    assert any(n.op_type == "QLinearConv" and weight in n.input
               for n in onnx.load(str(path)).graph.node)
    for batch in data:
        exact = runtime.run_model(result, batch)["y"]
        kernels = runtime.run_model(result, batch, optimize=True)["y"]
        reference = runtime.run_model(model, batch)["y"]
        # No pair saturates on any CPU: the kernel is its emulation but for the output's
        # requantization rounding (on a CPU without VNNI the int8 layer is 45 % off).
        assert np.linalg.norm(kernels - exact) <= 0.02 * np.linalg.norm(exact)
        assert np.linalg.norm(kernels - reference) <= 0.05 * np.linalg.norm(reference)


@pytest.mark.skipif(not x86_without_vnni(), reason="needs an x86 CPU without VNNI")
def test_without_vnni_the_widened_layer_is_as_close_to_float_as_uint8_weights(bright):
    model, data, results, _ = bright
    for batch in data:
        reference = runtime.run_model(model, batch)["y"]
        errors = {remedy: np.linalg.norm(runtime.run_model(results[remedy][0], batch,
                                                           optimize=True)["y"] - reference)
                  for remedy in ("scale", "u8u8")}
        assert errors["scale"] <= 2 * errors["u8u8"] + 0.01 * np.linalg.norm(reference)


def test_all_with_scale_leaves_layers_without_risky_pairs_alone(bright):
    _, data, _, (plain, _) = bright
    notes, details = [], {}
    result = overflow.run(plain, "all", data, notes, details, "scale")
    assert [e["node"] for e in details["u8s8_remedy"]["scale"]] == ["conv"]
    assert details["u8s8_remedy"]["u8u8"] == [] and _dtypes(result) == {TensorProto.INT8}
    assert [n.split(":")[1].split()[0] for n in notes] == ["1"]  # one note, one layer
    head = next(s for s in overflow.sites(plain.graph) if s.node == "head")
    weights = {t.name: t for t in result.graph.initializer}
    assert weights[head.weight] == next(t for t in plain.graph.initializer
                                        if t.name == head.weight)


def test_auto_falls_back_to_uint8_weights_when_the_check_refuses(bright):
    _, data, _, (plain, _) = bright
    notes, details = [], {}
    result = overflow.run(plain, "auto", data, notes, details, "auto",
                          lambda exact, widened: (False, "output cosine 0.9 exact, 0.5 widened"))
    assert _dtypes(result) == {TensorProto.UINT8, TensorProto.INT8}
    assert details["u8s8_remedy"]["u8u8"] == ["conv"]
    assert any("widening them lost fidelity (output cosine 0.9 exact" in n for n in notes)


def _matmul(scale_shared: bool) -> Model:
    """Two QDQ MatMuls on one uint8 input, per-tensor int8 weights, one risky pair in ``a``;
    with ``scale_shared`` both weight DequantizeLinears read one scale initializer."""
    qa = np.array([[120, 0], [110, 0], [5, 100], [5, -100]], np.int8)  # [K=4, N=2]
    qb = np.array([[120, 0], [-110, 1], [5, -3], [5, 3]], np.int8)
    inits = [numpy_helper.from_array(np.float32(0.01), "xs"),
             numpy_helper.from_array(np.uint8(0), "xz"),
             numpy_helper.from_array(qa, "wa"), numpy_helper.from_array(qb, "wb"),
             numpy_helper.from_array(np.float32(0.02), "sa")]
    if not scale_shared:
        inits.append(numpy_helper.from_array(np.float32(0.02), "sb"))
    nodes = [helper.make_node("QuantizeLinear", ["x", "xs", "xz"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "xs", "xz"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wa", "sa"], ["wad"], name="dqa"),
             helper.make_node("DequantizeLinear", ["wb", "sa" if scale_shared else "sb"],
                              ["wbd"], name="dqb"),
             helper.make_node("MatMul", ["xd", "wad"], ["ya"], name="a"),
             helper.make_node("MatMul", ["xd", "wbd"], ["yb"], name="b")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [3, 4])], [helper.make_tensor_value_info(
            n, TensorProto.FLOAT, [3, 2]) for n in ("ya", "yb")], inits)
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


@pytest.mark.parametrize("scale_shared", [False, True])
def test_per_tensor_scales_stay_per_tensor_and_shared_ones_are_copied(scale_shared):
    model = _matmul(scale_shared)
    found = {s.node: s for s in overflow.sites(model.graph)}
    assert set(found) == {"a", "b"}
    assert all(not widen.widenable(s, model) for s in found.values())
    result, done = widen.widen(model, [found["a"]])
    assert done["wa"] == (1, 230 / widen.SAFE_PAIR)  # one risky channel; the factor
    inits = {t.name: numpy_helper.to_array(t) for t in result.graph.initializer}
    dqa, dqb = (next(n for n in result.graph.node if n.name == k) for k in ("dqa", "dqb"))
    assert inits[dqa.input[1]].shape == () and not any(a.name == "axis" for a in dqa.attribute)
    assert float(inits[dqa.input[1]]) == pytest.approx(0.02 * 230 / widen.SAFE_PAIR)
    assert dqb.input[1] == ("sa" if scale_shared else "sb")  # b untouched
    assert float(inits[dqb.input[1]]) == np.float32(0.02)
    assert (dqa.input[1] != "sa") == scale_shared
    x = np.random.default_rng(0).uniform(0, 2.5, (3, 4)).astype(np.float32)
    before, after = runtime.run_model(model, {"x": x}), runtime.run_model(result, {"x": x})
    assert after["yb"].tolist() == before["yb"].tolist()
    step = 0.02 * 230 / widen.SAFE_PAIR
    assert np.abs(after["ya"] - before["ya"]).max() <= 4 * 2.55 * step / 2 + 1e-5


def test_what_cannot_be_widened_says_why():
    model = _matmul(False)
    site = next(s for s in overflow.sites(model.graph) if s.node == "a")
    inside = overflow.Site("q", "QAttention", "a", 0, "y#1", "w", (), 2)
    assert "inside the op" in widen.widenable(inside, model)
    assert "If/Loop" in widen.widenable(overflow.Site(**{**vars(site), "scope": 1}), model)
    shared = model.copy()  # one int8 weight, two DequantizeLinears
    next(n for n in shared.graph.node if n.name == "dqb").input[0] = "wa"
    assert "several nodes" in widen.widenable(site, shared)
    zero = model.copy()  # an asymmetric weight: requantizing would move its zero point
    zero.graph.initializer.append(numpy_helper.from_array(np.int8(3), "za"))
    next(n for n in zero.graph.node if n.name == "dqa").input.append("za")
    assert "zero point" in widen.widenable(site, zero)
    rows = model.copy()  # per-channel along K: not the output channels the pairs are sorted by
    scale = next(t for t in rows.graph.initializer if t.name == "sa")
    scale.CopyFrom(numpy_helper.from_array(np.full(4, 0.02, np.float32), "sa"))
    next(n for n in rows.graph.node if n.name == "dqa").attribute.append(
        helper.make_attribute("axis", 0))
    assert "along axis 0" in widen.widenable(site, rows)


def test_int8_dynamic_matmulinteger_is_widened_through_its_rescale():
    """int8-dynamic with calibration data: the MatMulInteger weight stays int8, its scale in
    Mul(A_s, W_s) widens, and ONNX Runtime's kernel (u8 x s8, saturating without VNNI) is as
    close to float as the uint8 remedy."""
    rng = np.random.default_rng(4)
    model = dense_matmul(rng)
    from onnxcomp import calibration
    data = calibration.from_batches([{"x": rng.uniform(-1, 1, (4, 32)).astype(np.float32)}
                                     for _ in range(4)])
    results = {remedy: quantize.PASS.run(model, quantize.Config(
        mode="int8-dynamic", u8s8_remedy=remedy), Context(calibration=data))
        for remedy in ("auto", "u8u8")}
    result, record = results["auto"]
    [entry] = record.details["u8s8_remedy"]["scale"]
    assert entry["channels"] > 0 and "exact" in record.details["u8s8_remedy"]["check"]
    matmul = next(n for n in result.graph.node if n.op_type == "MatMulInteger")
    inits = {t.name: numpy_helper.to_array(t) for t in result.graph.initializer}
    assert inits[matmul.input[1]].dtype == np.int8
    site = next(s for s in overflow.sites(result.graph))
    assert (widen.factors(site, inits[site.weight].astype(np.int32)) == 1).all()
    for batch in data:
        want = runtime.run_model(model, batch)["y"]
        errors = {k: np.linalg.norm(runtime.run_model(m, batch, optimize=True)["y"] - want)
                  for k, (m, _) in results.items()}
        assert errors["auto"] <= 2 * errors["u8u8"] + 0.01 * np.linalg.norm(want)
        assert errors["auto"] <= 0.03 * np.linalg.norm(want)


def test_the_config_checks_the_remedy():
    with pytest.raises(ValueError, match="u8s8_remedy"):
        quantize.Config(u8s8_remedy="widen")
