"""activation_dtype: static int8's activation pairs as uint8 (as written), symmetric int8
(TensorRT) or uint16 (QNN HTP), each over the range the calibration chose; numerically in ONNX
Runtime against float."""

from __future__ import annotations

import builders
import numpy as np
import pytest
from onnx import helper, numpy_helper

from onnxcomp import api, runtime
from onnxcomp.model import Model
from onnxcomp.passes import quantize


def _quantized(dtype: str):
    overrides = [f"quantize.activation_dtype={dtype}", "quantize.u8s8_overflow=none"]
    return api.compress(builders.conv_net(), recipe="quantize:int8", calib="random:8",
                        validate=False, show_progress=False, overrides=overrides).model


def _pairs(model) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Activation QuantizeLinear input -> (scale, zero point)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.proto.graph.initializer}
    return {n.input[0]: (inits[n.input[1]], inits[n.input[2]]) for n in model.proto.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits}


def _covered(scale, zero, levels: int) -> tuple[float, float]:
    return -int(zero) * float(scale), (levels - 1 - int(zero)) * float(scale)


@pytest.mark.parametrize("dtype", ["int8", "uint16"])
def test_each_pair_covers_the_uint8_range(dtype):
    before, after = _pairs(_quantized("uint8")), _pairs(_quantized(dtype))
    assert before and set(before) == set(after)
    for name, (scale, zero) in before.items():
        low, high = _covered(scale, zero, 256)
        new_scale, new_zero = after[name]
        if dtype == "int8":
            assert new_zero.dtype == np.int8 and int(new_zero) == 0
            assert np.isclose(float(new_scale), max(-low, high) / 127, rtol=1e-6), name
        else:
            assert new_zero.dtype == np.uint16
            new_low, new_high = _covered(new_scale, new_zero, 65536)
            step = float(new_scale)
            assert abs(new_low - low) <= step and abs(new_high - high) <= step, name
            assert step <= float(scale) / 250


def _weights_only(model):
    """The same model with its activation pairs taken out (their readers read the float
    tensor): what is left is the int8 weights' error."""
    proto = type(model.proto)()
    proto.CopyFrom(model.proto)
    graph = proto.graph
    inits = {t.name for t in graph.initializer}
    quantizers = {n.output[0]: n.input[0] for n in graph.node
                  if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    bypass = {n.output[0]: quantizers[n.input[0]] for n in graph.node
              if n.op_type == "DequantizeLinear" and n.input[0] in quantizers}
    kept = [n for n in graph.node
            if n.output[0] not in quantizers and n.output[0] not in bypass]
    for node in kept:
        node.input[:] = [bypass.get(name, name) for name in node.input]
    outputs = {o.name for o in graph.output}
    kept += [helper.make_node("Identity", [bypass[name]], [name])
             for name in outputs & set(bypass)]
    del graph.node[:]
    graph.node.extend(kept)
    return Model(proto)


def test_uint16_is_opset_21_and_far_closer_to_its_weights_only_model():
    x = np.random.default_rng(3).standard_normal((4, 1, 3, 16, 16)).astype(np.float32)
    errors = {}
    for dtype in ("uint8", "uint16"):
        quantized = _quantized(dtype)
        if dtype == "uint16":
            assert quantized.opset() >= 21
        session = runtime.session(quantized, optimize=False)
        reference = runtime.session(_weights_only(quantized), optimize=False)
        errors[dtype] = np.median([float(np.abs(session.run(None, {"x": b})[0]
                                               - reference.run(None, {"x": b})[0]).mean())
                                   for b in x])
    # 256x finer steps; clipping at the calibrated range (the few largest values, hence the
    # mean error, not the largest) is the same for both.
    assert errors["uint16"] < errors["uint8"] / 20, errors


def test_non_uint8_activations_are_static_int8s():
    with pytest.raises(ValueError, match="DynamicQuantizeLinear"):
        quantize.Config(mode="int8-dynamic", activation_dtype="uint16")
    with pytest.raises(ValueError, match="DynamicQuantizeLinear"):
        quantize.Config(mode="int8-dynamic", activation_dtype="int8")
    with pytest.raises(ValueError, match="uint8, int8 or uint16"):
        quantize.Config(activation_dtype="int16")
