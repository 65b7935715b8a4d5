"""Depthwise input equalization: float-exact in ONNX Runtime, channel ranges equalized, each
producer form (constant Mul/Add, Conv, BatchNormalization), refusals said, and the int8 gain."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import GraphBuilder, tensor
from onnx import numpy_helper
from quantize_graphs import data_for, rel_l2

from onnxcomp import runtime
from onnxcomp.graph import constant_array, import_graph
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import depthwise
from onnxcomp.pipeline import Context

C = 8


def _block(producer: str = "affine", residual: bool = False, group: int = C):
    """x -> Conv a -> [producer] -> Conv dw (3x3, ``group`` groups, zero padding) -> Relu ->
    Conv c -> y, the dw input's channel ranges 0.03..10 apart and dw's rows weighted 30..0.1
    (its outputs alike, as in PP-OCR). ``producer``: ``affine`` (HardSwish -> Mul(scalar) ->
    Mul(per channel) -> Add(scalar): PP-LCNet's block and a gain), ``conv`` (nothing between),
    ``bn`` (BatchNormalization), ``hardswish`` (HardSwish alone). ``residual``: an Add reads the
    dw input too."""
    b = GraphBuilder(seed=5)
    h = b.conv("x", 4, C, 1, "a")
    spread = np.logspace(-1.5, 1, C, dtype=np.float32)  # made by the last step before dw

    def scaled(name: str) -> None:
        b.inits[name] = numpy_helper.from_array(numpy_helper.to_array(b.inits[name]) * spread,
                                                name)

    if producer in ("conv", "hardswish"):
        b.inits["a.w"] = numpy_helper.from_array(
            numpy_helper.to_array(b.inits["a.w"]) * spread[:, None, None, None], "a.w")
        scaled("a.b")
    if producer == "bn":
        h = b.bn(h, C, "bn")
        scaled("bn.g")
        scaled("bn.b")
    elif producer in ("affine", "hardswish"):
        h = b.node("HardSwish", [h], "hswish")
        if producer == "affine":
            h = b.node("Mul", [h, b.const("lab.s", np.asarray([1.3], np.float32))], "lab_mul")
            h = b.node("Mul", [h, b.const("gain.s", spread.reshape(C, 1, 1))], "gain")
            h = b.node("Add", [h, b.const("lab.b", np.asarray([0.05], np.float32))], "lab_add")
    d = b.conv(h, C, C, 3, "dw", group=group)
    if residual:
        d = b.node("Add", [d, h], "residual")
    d = b.node("Relu", [d], "relu")
    y = b.conv(d, C, 4, 1, "c")
    b.inits["dw.w"] = numpy_helper.from_array(
        numpy_helper.to_array(b.inits["dw.w"]) / spread[:, None, None, None], "dw.w")
    return b.model([tensor("x", [2, 4, 10, 10])], [tensor(y, [2, 4, 10, 10])])


PLANNED = {"a", "dw", "c"}


def _equalized(model):
    notes: list[str] = []
    result = depthwise.run(model, PLANNED, data_for(model, 4), notes)
    return result, notes


def _ranges(model, name: str) -> tuple[np.ndarray, np.ndarray]:
    return depthwise.channel_ranges(model, [name], data_for(model, 4))[name]


@pytest.mark.parametrize("producer,absorber", [("affine", "gain"), ("conv", "a"),
                                               ("bn", "bn")])
def test_equalization_is_float_exact_and_equalizes_the_channels(producer, absorber):
    model = _block(producer)
    sites, skipped = depthwise.find_sites(import_graph(model), PLANNED)
    assert [(s.conv, s.absorber) for s in sites] == [("dw", absorber)] and not skipped
    assert sites[0].adds == (("lab_add",) if producer == "affine" else ())
    result, notes = _equalized(model)
    assert notes[0].startswith("depthwise inputs equalized on 1 Convs")
    batch = next(iter(data_for(model, 1)))
    ref, out = runtime.run_model(model, batch), runtime.run_model(result, batch)
    assert all(rel_l2(ref[k], out[k]) < 1e-5 for k in ref)
    name = sites[0].input
    low, high = _ranges(model, name)
    assert depthwise.scales(low, high).min() < 0.05  # built spread out
    new_low, new_high = _ranges(result, name)
    # the calibration data's range is kept; every channel now reaches one of its bounds
    assert np.isclose(new_low.min(), low.min(), rtol=1e-4)
    assert np.isclose(new_high.max(), high.max(), rtol=1e-4)
    assert np.allclose(depthwise.scales(new_low, new_high), 1.0, rtol=1e-4)


def test_the_scale_goes_into_the_weights_only_as_a_per_channel_factor():
    """The depthwise weights change by one factor per row: their per-channel int8 codes are
    the same, so the weights lose nothing."""
    model = _block("affine")
    result, _ = _equalized(model)
    before = constant_array(import_graph(model).tensors()["dw.w"]).reshape(C, -1)
    dw = next(n for n in import_graph(result).nodes if n.name == "dw")
    after = constant_array(dw.inputs[1]).reshape(C, -1)
    codes = lambda w: np.round(w / (np.abs(w).max(axis=1, keepdims=True) / 127))
    assert np.array_equal(codes(before), codes(after))
    assert not np.allclose(before, after)


@pytest.mark.parametrize("kwargs,why", [
    ({"producer": "hardswish"}, "made by HardSwish hswish, which takes no per-channel scale"),
    ({"residual": True}, "its input is read by other nodes too, or is a graph output"),
    ({"group": 2}, "grouped (2 groups of 4 channels), not depthwise")])
def test_refusals_say_why_and_leave_the_model_alone(kwargs, why):
    model = _block(**kwargs)
    sites, skipped = depthwise.find_sites(import_graph(model), PLANNED)
    assert not sites and skipped == [("dw", why)]
    result, notes = _equalized(model)
    assert result is model and not notes
    assert depthwise.summary(sites, skipped).endswith(f"skipped 1: 1 x {why}")


def test_nothing_to_do_without_depthwise_or_unplanned_convs():
    model = _block("affine")
    notes: list[str] = []
    assert depthwise.run(model, {"a", "c"}, data_for(model, 2), notes) is model and not notes


def test_equalizing_twice_changes_nothing_more():
    model = _block("affine")
    once, _ = _equalized(model)
    twice, _ = _equalized(once)
    weights = lambda m: {n.name: constant_array(n.inputs[1]) for n in import_graph(m).nodes
                         if n.op == "Conv"}
    first, second = weights(once), weights(twice)
    assert all(np.allclose(first[k], second[k], rtol=1e-5, atol=0) for k in first)


def test_scales_keep_the_range_and_its_sign_and_are_clamped():
    low = np.array([-0.4, -0.1, -1e-9, 0.0, -2.0, 0.0, -np.inf])
    high = np.array([4.0, 0.1, 1e-9, 0.0, 0.5, 2.0, 1.0])
    r = depthwise.scales(low, high)
    # [L, H] = [-2, 4]: a mostly negative channel is scaled to reach L, not to 4
    assert np.allclose(r[:2], [1.0, 0.05]) and r[4] == 1.0 and r[5] == 0.5
    assert r[2] == depthwise.SCALE_RANGE[0] and r[3] == 1.0 and r[6] == 1.0
    assert np.all(depthwise.scales(np.zeros(3), np.zeros(3)) == 1.0)


def test_static_int8_is_closer_to_float_with_it():
    model = _block("affine")
    calib = data_for(model, 8)
    batch = next(iter(data_for(model, 1)))
    ref = runtime.run_model(model, batch)["c"]
    plan = quantize.plan(model, quantize.Config(), Context())
    assert any(n.startswith("depthwise inputs: 1 equalized") for n in plan.notes)
    on, record = quantize.PASS.run(model, quantize.Config(), Context(calibration=calib))
    off, record_off = quantize.PASS.run(model, quantize.Config(depthwise_equalize=False),
                                        Context(calibration=calib))
    assert any(n.startswith("depthwise inputs equalized on 1 Convs") for n in record.notes)
    assert not any(n.startswith("depthwise") for n in record_off.notes)
    err_on = rel_l2(ref, runtime.run_model(on, batch)["c"])
    err_off = rel_l2(ref, runtime.run_model(off, batch)["c"])
    assert err_on < 0.5 * err_off


def test_per_tensor_weights_and_other_modes_leave_it_off():
    model = _block("affine")
    for config in (quantize.Config(per_channel=False), quantize.Config(mode="int8-dynamic")):
        plan = quantize.plan(model, config, Context())
        assert not any(n.startswith("depthwise") for n in plan.notes)


def test_config_refuses_non_booleans():
    with pytest.raises(ValueError, match="depthwise_equalize must be true or false"):
        quantize.Config(depthwise_equalize="yes")


def test_the_equalized_model_is_valid():
    result, _ = _equalized(_block("bn"))
    onnx.checker.check_model(result.proto, full_check=True)


@pytest.mark.zoo
@pytest.mark.parametrize("name,found", [
    ("ppocr-rec", "depthwise inputs: 14 equalized"),
    ("ppocr-det", "depthwise inputs: 11 equalized")])
def test_ppocr_depthwise_inputs_are_counted_and_equalized_exactly(name, found):
    """The counts docs/quantize.md gives, and float-exactness on the real model."""
    from onnxcomp import zoo
    from onnxcomp.model import load

    plan = quantize.plan(load(zoo.fetch(name)), quantize.Config(), Context())
    assert any(note.startswith(found) for note in plan.notes)
    prepared = plan.payload.prepared
    notes: list[str] = []
    result = depthwise.run(prepared, {s.node for s in plan.payload.sites.sites},
                           zoo.dataset(name, "calib", 2), notes)
    batch = zoo.dataset(name, "eval", 1).make_batch(0)
    ref, out = runtime.run_model(prepared, batch), runtime.run_model(result, batch)
    assert all(rel_l2(ref[k], out[k]) < 1e-5 for k in ref)
