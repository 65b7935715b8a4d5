"""Feature maps in signed int8 for OpenVINO (``signed_feature_maps``, ``signed.py``): pooling
reads the QDQ pair, pairs no Conv reads take symmetric int8 where their range is signed, and
OpenVINO folds them into the producing Conv as int8 output."""

from __future__ import annotations

import builders
import numpy as np
import pytest
from onnx import numpy_helper
from quantize_graphs import data_for

from onnxcomp import runtime, runtime_openvino
from onnxcomp.model import Model
from onnxcomp.passes import quantize
from onnxcomp.pipeline import Context

run = quantize.PASS.run


def _signed_squeeze_excite_net() -> Model:
    """x -> Conv = c (no activation: signed) -> Add(c, c * HardSigmoid(Conv1x1(
    GlobalAveragePool(c)))) -> Conv -> y: PP-LCNet's squeeze-excitation residual, whose Conv
    output three ops read."""
    b = builders.GraphBuilder(seed=7)
    c = b.conv("x", 3, 8, 3, "conv1")
    gate = b.node("HardSigmoid", [b.conv(b.node("GlobalAveragePool", [c], "pool"), 8, 8, 1,
                                          "se")], "gate")
    mixed = b.node("Add", [c, b.node("Mul", [c, gate], "excite")], "res")
    b.node("Conv", [mixed, b.weight("head.w", (4, 8, 3, 3), 0.3)], "head", outputs=["y"],
           pads=[1] * 4)
    return b.model([builders.tensor("x", [1, 3, 12, 12])],
                   [builders.tensor("y", [1, 4, 12, 12])], 13, "signed_se_net")


def _quantizer_of(model: Model, tensor: str):
    """(scale, zero point) of the QuantizeLinear reading ``tensor``."""
    constants = {t.name: numpy_helper.to_array(t) for t in model.proto.graph.initializer}
    node = next(n for n in model.proto.graph.node
                if n.op_type == "QuantizeLinear" and n.input[0] == tensor)
    return float(constants[node.input[1]]), constants[node.input[2]]


def _producer(model: Model, tensor: str) -> str:
    return next(n.op_type for n in model.proto.graph.node if tensor in n.output)


def _conv_output(model: Model) -> str:
    return next(n.output[0] for n in model.proto.graph.node if n.name == "conv1")


def test_signed_pairs_and_pooling_on_the_pair():
    model = _signed_squeeze_excite_net()
    data = data_for(model, 8)
    # The openvino target's layout: no QDQ on Conv outputs for their own sake.
    off, _ = run(model, quantize.Config(output_qdq="none"), Context(calibration=data))
    on, record = run(model, quantize.Config(output_qdq="none", signed_feature_maps=True),
                     Context(calibration=data))
    conv_out = _conv_output(on)
    # Off: uint8 with a zero point, and the pooling reads the Conv output itself.
    scale, zero_point = _quantizer_of(off, conv_out)
    assert zero_point.dtype == np.uint8 and 0 < int(zero_point) < 255
    pool = next(n for n in off.proto.graph.node if n.op_type == "GlobalAveragePool")
    assert pool.input[0] == conv_out
    # On: the same range as symmetric int8, every reader through the pair.
    signed_scale, signed_zero = _quantizer_of(on, conv_out)
    low, high = -int(zero_point) * scale, (255 - int(zero_point)) * scale
    assert signed_zero.dtype == np.int8 and int(signed_zero) == 0
    assert signed_scale == pytest.approx(max(-low, high) / 127, rel=1e-6)
    pool = next(n for n in on.proto.graph.node if n.op_type == "GlobalAveragePool")
    assert _producer(on, pool.input[0]) == "DequantizeLinear"
    readers = [n for n in on.proto.graph.node if conv_out in n.input]
    assert [n.op_type for n in readers] == ["QuantizeLinear"]
    # A pair only a Conv reads (the head's input) keeps uint8: the u8 x i8 kernels take it.
    head = next(n for n in on.proto.graph.node if n.name == "head")
    head_q = next(n for n in on.proto.graph.node if n.op_type == "DequantizeLinear"
                  and n.output[0] == head.input[0])
    constants = {t.name: numpy_helper.to_array(t) for t in on.proto.graph.initializer}
    assert constants[head_q.input[2]].dtype == np.uint8
    assert any("signed_feature_maps" in note for note in record.notes)
    # Numerically in ONNX Runtime: as faithful as the uint8 layout.
    for batch in list(data)[:3]:
        reference = runtime.run_model(model, batch)["y"].ravel()
        for result in (off, on):
            out = runtime.run_model(result, batch)["y"].ravel()
            assert np.dot(out, reference) / (np.linalg.norm(out) * np.linalg.norm(reference)) \
                > 0.99


def test_off_by_default_and_on_for_the_openvino_target():
    from onnxcomp import targets

    assert quantize.Config().signed_feature_maps is False
    with pytest.raises(ValueError, match="signed_feature_maps must be true or false"):
        quantize.Config(signed_feature_maps="yes")
    assert "quantize.signed_feature_maps=true" in targets.TARGETS["openvino"].int8_overrides
    assert not any("signed_feature_maps" in o for o in targets.TARGETS["ort-cpu"].int8_overrides)


@pytest.mark.skipif(not runtime_openvino.available(),
                    reason="openvino is not installed (pip install 'onnxcomp[openvino]')")
def test_openvino_folds_the_signed_pair_into_the_conv():
    """What the option is for, read from OpenVINO's compiled model: with the uint8 pair and the
    pooling reading the Conv output, no Convolution writes int8; with signed feature maps the
    Conv before the squeeze-excitation writes i8."""
    model = _signed_squeeze_excite_net()
    data = data_for(model, 8)
    written = {}
    for signed in (False, True):
        # int8 weights, as the openvino target keeps them (OpenVINO runs uint8 ones in f32)
        result, _ = run(model, quantize.Config(signed_feature_maps=signed, output_qdq="none",
                                               u8s8_overflow="none"),
                        Context(calibration=data))
        compiled = runtime_openvino.compile_model(result, threads=1, precision="f32")
        written[signed] = [
            str(op.get_rt_info()["outputPrecisions"].astype(str))
            for op in compiled.get_runtime_model().get_ops()
            if str(op.get_rt_info()["layerType"].astype(str)) == "Convolution"]
    assert "i8" not in written[False]
    assert "i8" in written[True]


def _pyramid_sum_net() -> Model:
    """x -> Conv = a -> Conv stride 2 = d; Add(d, Conv1x1(d)) = s -> nearest Resize x2 -> Add
    with a -> Conv -> y: a feature-pyramid level whose sum only the Resize reads."""
    b = builders.GraphBuilder(seed=11)
    fine = b.conv("x", 3, 6, 3, "c1")
    down = b.node("Conv", [fine, b.weight("down.w", (6, 6, 3, 3), 0.3)], "down",
                  strides=[2, 2], pads=[1] * 4)
    total = b.node("Add", [down, b.conv(down, 6, 6, 1, "side")], "sum")
    scales = b.const("scales", np.array([1, 1, 2, 2], np.float32))
    up = b.node("Resize", [total, "", scales], "up", mode="nearest")
    merged = b.node("Add", [fine, up], "merge")
    b.node("Conv", [merged, b.weight("head.w", (4, 6, 3, 3), 0.3)], "head", outputs=["y"],
           pads=[1] * 4)
    return b.model([builders.tensor("x", [1, 3, 16, 16])],
                   [builders.tensor("y", [1, 4, 16, 16])], 13, "pyramid_sum")


def test_a_nearest_resize_reads_a_copy_of_its_output_pair():
    model = _pyramid_sum_net()
    data = data_for(model, 8)
    layout = {"output_qdq": "none"}
    off, _ = run(model, quantize.Config(**layout), Context(calibration=data))
    on, _ = run(model, quantize.Config(**layout, signed_feature_maps=True),
                Context(calibration=data))
    graph = on.proto.graph
    resize = next(n for n in graph.node if n.op_type == "Resize")
    producer = {o: n for n in graph.node for o in n.output}
    # Off: the Resize reads the Add's float output; on: a pair whose parameters are those of
    # the pair after the Resize (nearest resizing copies values: the same grid on both sides).
    off_resize = next(n for n in off.proto.graph.node if n.op_type == "Resize")
    assert next(n for n in off.proto.graph.node if off_resize.input[0] in n.output).op_type \
        == "Add"
    before = producer[resize.input[0]]
    assert before.op_type == "DequantizeLinear"
    after = next(n for n in graph.node
                 if n.op_type == "QuantizeLinear" and n.input[0] == resize.output[0])
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for mine, theirs in zip(before.input[1:3], after.input[1:3]):
        assert constants[mine] == constants[theirs]
        assert constants[mine].dtype == constants[theirs].dtype
    for batch in list(data)[:3]:
        reference = runtime.run_model(model, batch)["y"].ravel()
        out = runtime.run_model(on, batch)["y"].ravel()
        assert np.dot(out, reference) / (np.linalg.norm(out) * np.linalg.norm(reference)) > 0.99
    if runtime_openvino.available():  # what it is for: OpenVINO resizes in 8 bits
        precisions = {
            str(op.get_rt_info()["runtimePrecision"].astype(str))
            for op in runtime_openvino.compile_model(on, threads=1, precision="f32")
            .get_runtime_model().get_ops()
            if str(op.get_rt_info()["layerType"].astype(str)) == "Interpolate"}
        assert precisions and precisions <= {"i8", "u8"}, precisions


def _sum_into_concat_net() -> Model:
    """x -> Conv = a -> Conv = b; Add(a, b) = s and Conv(x) = u go only into Concat(s, u) ->
    Conv -> y: a feature pyramid's finest level, computed only to be concatenated."""
    b = builders.GraphBuilder(seed=5)
    first = b.conv("x", 3, 6, 3, "c1")
    total = b.node("Add", [first, b.conv(first, 6, 6, 3, "c2")], "sum")
    joined = b.node("Concat", [total, b.conv("x", 3, 6, 3, "side")], "cat", axis=1)
    b.node("Conv", [joined, b.weight("head.w", (4, 12, 3, 3), 0.3)], "head", outputs=["y"],
           pads=[1] * 4)
    return b.model([builders.tensor("x", [1, 3, 12, 12])],
                   [builders.tensor("y", [1, 4, 12, 12])], 13, "sum_into_concat")


def test_a_concat_reads_what_only_it_reads_unrounded(monkeypatch):
    """A pair whose one reader is a quantized Concat is taken out (OpenVINO moves the Concat's
    FakeQuantize onto each input: two requantizations in a row otherwise); the Concat's own
    pair rounds once; ONNX Runtime's output stays as faithful."""
    from onnxcomp.passes.quantize import signed

    model = _sum_into_concat_net()
    data = data_for(model, 8)
    config = quantize.Config(output_qdq="none", signed_feature_maps=True)
    on, _ = run(model, config, Context(calibration=data))
    with monkeypatch.context() as patch:  # the same layout with the pairs left in
        patch.setattr(signed, "_drop_pairs_before_concats", lambda graph: 0)
        kept, _ = run(model, config, Context(calibration=data))
    producer = {o: n.op_type for n in kept.proto.graph.node for o in n.output}
    concat = next(n for n in kept.proto.graph.node if n.op_type == "Concat")
    assert [producer[t] for t in concat.input] == ["DequantizeLinear"] * 2
    producer = {o: n.op_type for n in on.proto.graph.node for o in n.output}
    concat = next(n for n in on.proto.graph.node if n.op_type == "Concat")
    assert [producer[t] for t in concat.input] == ["Add", "Conv"]
    assert [n.op_type for n in on.proto.graph.node if concat.output[0] in n.input] \
        == ["QuantizeLinear"]
    for batch in list(data)[:3]:
        reference = runtime.run_model(model, batch)["y"].ravel()
        errors = [np.abs(runtime.run_model(result, batch)["y"].ravel() - reference).max()
                  for result in (kept, on)]
        assert errors[1] <= errors[0] * 1.5
        out = runtime.run_model(on, batch)["y"].ravel()
        assert np.dot(out, reference) / (np.linalg.norm(out) * np.linalg.norm(reference)) > 0.99
    if runtime_openvino.available():  # what it is for: one requantization per executed op
        fused = {}
        for label, result in (("kept", kept), ("on", on)):
            compiled = runtime_openvino.compile_model(result, threads=1, precision="f32")
            fused[label] = {
                names[0]: [n for n in names if "_Q" in n]
                for op in compiled.get_runtime_model().get_ordered_ops()
                if (names := str(op.get_rt_info()["originalLayersNames"].astype(str))
                    .split(","))[0] in ("sum", "side/WithoutBiases")}
        # With the pairs kept, OpenVINO fuses the Add's own quantizer and the Concat's copy of
        # its quantizer into the Add: two in a row; without, only the Concat's.
        assert len(fused["kept"]["sum"]) == 2, fused
        assert all(len(quantizers) == 1 for quantizers in fused["on"].values()), fused
