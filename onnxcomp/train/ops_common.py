"""What every op of the twin's table shares: the call context, ONNX ↔ torch dtypes, and helpers
for the inputs that ONNX passes as tensors but that are really Python values (axes, shapes,
pads, sizes).

An op is ``fn(ctx, inputs, attrs) -> Tensor | tuple[Tensor | None, ...]``: ``inputs`` is the
node's input list with ``None`` for an omitted optional input, ``attrs`` the node's attributes as
Python values (tensors as numpy arrays, strings decoded). Ops raise ``ctx.unsupported(...)`` for a
feature they do not implement, so the caller learns which node and which feature.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import torch

from onnxcomp.errors import UserError

TensorProto = onnx.TensorProto

# ONNX element types the twin can hold. UINT16/32/64 have only partial support in torch 2.x and
# FLOAT8/INT4/STRING none: graphs that compute in them are refused by name.
TORCH_DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
    TensorProto.INT8: torch.int8,
    TensorProto.UINT8: torch.uint8,
    TensorProto.INT16: torch.int16,
    TensorProto.INT32: torch.int32,
    TensorProto.INT64: torch.int64,
    TensorProto.BOOL: torch.bool,
}
ONNX_DTYPES: dict[torch.dtype, int] = {v: k for k, v in TORCH_DTYPES.items()}
FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


class Unsupported(UserError):
    """A node uses an op, attribute value or dtype the twin does not implement."""


@dataclass(frozen=True)
class Ctx:
    """Where an op is being evaluated: the node, the opset of its domain, how many outputs the
    node asks for (optional outputs left off are not computed)."""

    node: onnx.NodeProto
    opset: int
    n_outputs: int
    # ONNX element type of each input where the graph states it (inputs, weights, value_info),
    # else 0: how a widened tensor (int4 held as int8) is told apart.
    input_types: tuple[int, ...] = ()

    def input_type(self, index: int) -> int:
        return self.input_types[index] if index < len(self.input_types) else 0

    def unsupported(self, feature: str) -> Unsupported:
        name = self.node.name or (self.node.output[0] if self.node.output else "?")
        return Unsupported(f"twin: {self.node.op_type} node {name!r}: {feature} is not supported")


Op = Callable[[Ctx, list, dict], "torch.Tensor | tuple"]


def torch_dtype(ctx: Ctx, onnx_type: int) -> torch.dtype:
    if onnx_type not in TORCH_DTYPES:
        raise ctx.unsupported(f"element type {TensorProto.DataType.Name(onnx_type)}")
    return TORCH_DTYPES[onnx_type]


_NUMPY_KINDS = {np.dtype(t) for t in (np.float16, np.float32, np.float64, np.int8, np.uint8,
                                       np.int16, np.int32, np.int64, np.bool_)}


# Quantized types torch lacks, held in a wider integer type with the same values (their ranges
# are applied by QuantizeLinear; arithmetic on them does not wrap at their width).
WIDENED = {"int4": np.int8, "int2": np.int8, "uint4": np.uint8, "uint2": np.uint8,
           "uint16": np.int32}
WIDENED_ONNX = {TensorProto.INT4: torch.int8, TensorProto.INT2: torch.int8,
                TensorProto.UINT4: torch.uint8, TensorProto.UINT2: torch.uint8,
                TensorProto.UINT16: torch.int32}
QUANT_RANGES = {TensorProto.INT4: (-8, 7), TensorProto.UINT4: (0, 15),
                TensorProto.INT2: (-2, 1), TensorProto.UINT2: (0, 3),
                TensorProto.UINT16: (0, 65535)}


def to_tensor(array: np.ndarray) -> torch.Tensor:
    """A numpy array as a torch tensor of the same ONNX element type (copied, writable)."""
    array = np.asarray(array)
    if array.dtype.name == "bfloat16":  # ml_dtypes, as onnx's numpy_helper gives it
        return torch.tensor(array.astype(np.float32)).to(torch.bfloat16)
    if array.dtype.name in WIDENED:
        return torch.tensor(array.astype(WIDENED[array.dtype.name]))
    if array.dtype not in _NUMPY_KINDS:
        raise Unsupported(f"twin: element type {array.dtype} is not supported (torch lacks it)")
    return torch.tensor(array)


def to_numpy(tensor: torch.Tensor) -> np.ndarray:
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:
        import ml_dtypes  # onnx's own dependency

        return tensor.float().numpy().astype(ml_dtypes.bfloat16)
    return tensor.numpy()


def ints(tensor: torch.Tensor | None) -> list[int] | None:
    """A shape/axes/pads input as a Python list (None stays None)."""
    if tensor is None:
        return None
    return [int(v) for v in tensor.reshape(-1).tolist()]


def floats(tensor: torch.Tensor | None) -> list[float] | None:
    if tensor is None:
        return None
    return [float(v) for v in tensor.reshape(-1).tolist()]


def scalar(tensor: torch.Tensor) -> float | int | bool:
    return tensor.reshape(-1)[0].item()


def axis_of(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def axes_of(axes: Sequence[int], rank: int) -> list[int]:
    return [axis_of(int(a), rank) for a in axes]


def attr_or_input(attrs: dict, key: str, inputs: list, index: int) -> list[int] | None:
    """Opsets moved axes/sizes from an attribute to an input; the graph has one or the other."""
    if key in attrs:
        return [int(v) for v in attrs[key]]
    if len(inputs) > index:
        return ints(inputs[index])
    return None


def is_float(tensor: torch.Tensor) -> bool:
    return tensor.dtype.is_floating_point


def channel_shape(tensor: torch.Tensor, rank: int) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over [N, C, ...] of the given rank."""
    return tensor.reshape([1, -1] + [1] * (rank - 2))


def decode_attribute(attribute: onnx.AttributeProto):
    value = onnx.helper.get_attribute_value(attribute)
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, onnx.TensorProto):
        return onnx.numpy_helper.to_array(value)
    if isinstance(value, list) and value and isinstance(value[0], bytes):
        return [v.decode("utf-8") for v in value]
    return value
