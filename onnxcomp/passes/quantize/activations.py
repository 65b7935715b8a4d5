"""The element type of static int8's activation pairs (``activation_dtype``), set after the
rewrite: the pairs are placed and calibrated once, as uint8, and each is then re-expressed over
the float range it covers.

- ``uint8`` (default): as written, asymmetric, ``s = (high - low) / 255``; what ONNX Runtime's
  CPU kernels and OpenVINO take.
- ``int8``: symmetric, zero point 0, ``s = max(-low, high) / 127`` (a one-signed range, such as
  a Relu output, keeps 128 of its 256 levels): TensorRT's explicit quantization takes only this.
- ``uint16``: asymmetric over the same range with 65536 levels, ``s = (high - low) / 65535``,
  ``zp = round(-low / s)``: QNN HTP's 16-bit activations (its "A16W8"), 256x finer steps at the
  range the calibration chose. ``QuantizeLinear`` takes 16-bit types from opset 21, so the
  quantize pass raises the opset to 21 first (``prepare``).
  A Sigmoid or Tanh output takes the fixed parameters QNN's 16-bit kernels require (the ones
  ONNX Runtime's QNN quantization config writes): ``1/65536, 0`` over Sigmoid's ``[0, 1)``,
  ``1/32768, 32768`` over Tanh's ``[-1, 1)``, whatever the calibration saw.
Weights stay int8 per channel either way.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp.graph import unique_name
from onnxcomp.passes.quantize.signed import activation_pairs, to_symmetric, uint8_range

DTYPES = ("uint8", "int8", "uint16")
# QNN's 16-bit Sigmoid and Tanh take these output parameters only: (scale, zero point).
FIXED_16_BIT = {"Sigmoid": (1.0 / 65536.0, 0), "Tanh": (1.0 / 32768.0, 32768)}


def symmetric(graph: gs.Graph) -> int:
    """Every uint8 activation pair as symmetric int8 over the range it covers. Returns how
    many."""
    pairs = activation_pairs(graph)
    for quantize, dequantizes in pairs:
        to_symmetric(graph, quantize, dequantizes)
    return len(pairs)


def sixteen_bit(graph: gs.Graph) -> int:
    """Every uint8 activation pair as uint16 over the range it covers. Returns how many."""
    pairs = activation_pairs(graph)
    for quantize, dequantizes in pairs:
        low, high = uint8_range(quantize)
        scale = (high - low) / 65535
        source = quantize.inputs[0].inputs[0].op if quantize.inputs[0].inputs else None
        if source in FIXED_16_BIT:
            scale, zero_point = FIXED_16_BIT[source]
        elif not scale > 0:  # an empty range stays what it was (scale 1, the zero point)
            continue
        else:
            zero_point = int(np.clip(round(-low / scale), 0, 65535))
        name = quantize.outputs[0].name
        new_scale = gs.Constant(unique_name(graph, f"{name}_u16_scale"),
                                np.asarray(scale, np.float32))
        new_zero = gs.Constant(unique_name(graph, f"{name}_u16_zero_point"),
                               np.asarray(zero_point, np.uint16))
        for node in [quantize, *dequantizes]:
            node.inputs[1], node.inputs[2] = new_scale, new_zero
        quantize.outputs[0].dtype = np.uint16
    return len(pairs)


def rewrite(graph: gs.Graph, activation_dtype: str) -> int:
    """The pairs in ``activation_dtype`` (one of ``DTYPES``); how many changed (0 for uint8)."""
    if activation_dtype == "int8":
        return symmetric(graph)
    if activation_dtype == "uint16":
        return sixteen_bit(graph)
    return 0


def count(graph, activation_dtype: str) -> int:
    """Activation QuantizeLinear nodes with a scalar zero point of ``activation_dtype`` in an
    ONNX graph proto."""
    wanted = {"int8": 3, "uint16": 4, "uint8": 2}[activation_dtype]  # TensorProto types
    constants = {t.name: t for t in graph.initializer}
    found = 0
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants or len(node.input) < 3:
            continue
        zero_point = constants.get(node.input[2])
        if zero_point is not None and zero_point.data_type == wanted and not zero_point.dims:
            found += 1
    return found
