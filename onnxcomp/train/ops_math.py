"""Elementwise, reduction and matrix ops of the twin.

Broadcasting is numpy's (torch's is the same multidirectional rule ONNX uses). Integer division
truncates toward zero, as ONNX Runtime does; ``Pow`` keeps the base's type; ``Mod`` follows the
``fmod`` attribute (0: sign of the divisor, 1: C's fmod). Reductions take their axes from the
attribute (older opsets) or the second input (ReduceSum 13+, the others 18+), honour
``keepdims`` and ``noop_with_empty_axes``, and give the identity element (0, 1, ±inf) over empty
axes as ONNX does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onnxcomp.train.ops_common import Ctx, attr_or_input, axes_of, axis_of, ints, is_float


def _unary(fn):
    return lambda ctx, x, a: fn(x[0])


def _binary(fn):
    return lambda ctx, x, a: fn(x[0], x[1])


def _div(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    a, b = x
    if is_float(a):
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _pow(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    base, exponent = x
    if not is_float(base) and is_float(exponent):
        return torch.pow(base.to(exponent.dtype), exponent).to(base.dtype)
    if is_float(base) and exponent.dtype != base.dtype:
        exponent = exponent.to(base.dtype)
    return torch.pow(base, exponent)


def _mod(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    if attrs.get("fmod", 0):
        return torch.fmod(x[0], x[1])
    return torch.remainder(x[0], x[1])


def _bitshift(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    if attrs["direction"] == "LEFT":
        return torch.bitwise_left_shift(x[0], x[1])
    return torch.bitwise_right_shift(x[0], x[1])


def _variadic(fn):
    def op(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
        out = x[0]
        for other in x[1:]:
            out = fn(out, other)
        return out
    return op


def _mean(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return _variadic(torch.add)(ctx, x, attrs) / len(x)


def _clip(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value = x[0]
    low = x[1] if len(x) > 1 else None
    high = x[2] if len(x) > 2 else None
    if "min" in attrs:
        low = torch.tensor(attrs["min"], dtype=value.dtype)
    if "max" in attrs:
        high = torch.tensor(attrs["max"], dtype=value.dtype)
    if low is None and high is None:
        return value
    # ONNX: if min > max every value becomes max, as torch.clamp does.
    return torch.clamp(value, min=low, max=high)


def _isinf(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value = x[0]
    negative, positive = attrs.get("detect_negative", 1), attrs.get("detect_positive", 1)
    result = torch.zeros_like(value, dtype=torch.bool)
    if negative:
        result |= torch.isneginf(value)
    if positive:
        result |= torch.isposinf(value)
    return result


def _activation(name: str):
    def hard_sigmoid(x, a):
        return torch.clamp(a.get("alpha", 0.2) * x + a.get("beta", 0.5), 0, 1)

    table = {
        "Relu": lambda x, a: torch.relu(x),
        "LeakyRelu": lambda x, a: F.leaky_relu(x, a.get("alpha", 0.01)),
        "Elu": lambda x, a: torch.where(x > 0, x, a.get("alpha", 1.0) * torch.expm1(x)),
        "Celu": lambda x, a: F.celu(x, a.get("alpha", 1.0)),
        "Selu": lambda x, a: a.get("gamma", 1.05070102214813232421875) * torch.where(
            x > 0, x, a.get("alpha", 1.67326319217681884765625) * torch.expm1(x)),
        "ThresholdedRelu": lambda x, a: torch.where(x > a.get("alpha", 1.0), x,
                                                    torch.zeros_like(x)),
        "HardSigmoid": hard_sigmoid,
        "HardSwish": lambda x, a: x * hard_sigmoid(x, {"alpha": 1 / 6, "beta": 0.5}),
        "Softplus": lambda x, a: F.softplus(x),
        "Softsign": lambda x, a: x / (1 + torch.abs(x)),
        "Mish": lambda x, a: x * torch.tanh(F.softplus(x)),
        "Gelu": lambda x, a: F.gelu(x, approximate=a.get("approximate", "none")),
        "Shrink": lambda x, a: torch.where(
            x < -a.get("lambd", 0.5), x + a.get("bias", 0.0),
            torch.where(x > a.get("lambd", 0.5), x - a.get("bias", 0.0),
                        torch.zeros_like(x))).to(x.dtype),
    }
    fn = table[name]
    return lambda ctx, x, attrs: fn(x[0], attrs)


def _prelu(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.where(x[0] < 0, x[0] * x[1], x[0])


def _softmax_family(kind: str):
    def op(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
        value = x[0]
        if value.dim() == 0:
            raise ctx.unsupported("a 0-d input")
        if ctx.opset >= 13:
            return _soft(kind, value, axis_of(attrs.get("axis", -1), value.dim()))
        # Before opset 13: the input is seen as 2-D, [prod(shape[:axis]), prod(shape[axis:])].
        axis = axis_of(attrs.get("axis", 1), value.dim())
        flat = value.reshape(math.prod(value.shape[:axis]), -1)
        return _soft(kind, flat, 1).reshape(value.shape)
    return op


def _soft(kind: str, value: torch.Tensor, axis: int) -> torch.Tensor:
    if kind == "Softmax":
        return torch.softmax(value, axis)
    if kind == "LogSoftmax":
        return torch.log_softmax(value, axis)
    index = torch.argmax(value, axis, keepdim=True)
    return torch.zeros_like(value).scatter(axis, index, 1.0)


_REDUCERS = {
    "ReduceSum": (lambda x, d: torch.sum(x, d), 0.0),
    "ReduceMean": (lambda x, d: torch.mean(x, d), math.nan),
    "ReduceMax": (lambda x, d: torch.amax(x, d), -math.inf),
    "ReduceMin": (lambda x, d: torch.amin(x, d), math.inf),
    "ReduceProd": (lambda x, d: _prod(x, d), 1.0),
    "ReduceL1": (lambda x, d: torch.sum(torch.abs(x), d), 0.0),
    "ReduceL2": (lambda x, d: torch.sqrt(torch.sum(x * x, d)), 0.0),
    "ReduceSumSquare": (lambda x, d: torch.sum(x * x, d), 0.0),
    "ReduceLogSum": (lambda x, d: torch.log(torch.sum(x, d)), -math.inf),
    "ReduceLogSumExp": (lambda x, d: torch.logsumexp(x, d), -math.inf),
}


def _prod(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    for dim in sorted(dims, reverse=True):
        x = torch.prod(x, dim)
    return x


def _identity(value: float, dtype: torch.dtype):
    """The reduction's value over nothing, in the input's type (±inf saturates for ints)."""
    if dtype == torch.bool:
        return value > 0
    if dtype.is_floating_point or math.isfinite(value):
        return value
    info = torch.iinfo(dtype)
    return info.max if value > 0 else info.min


def _reduce(name: str):
    fn, empty_value = _REDUCERS[name]

    def op(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
        value = x[0]
        rank = value.dim()
        # Axes: an attribute before opset 13 (ReduceSum) / 18 (the others), then an input.
        axes = attr_or_input(attrs, "axes", x, 1)
        keepdims = bool(attrs.get("keepdims", 1))
        if not axes:
            if attrs.get("noop_with_empty_axes", 0):
                return value
            axes = list(range(rank))
        axes = sorted(set(axes_of(axes, rank)))
        shape = [1 if i in axes else n for i, n in enumerate(value.shape)]
        if any(value.shape[a] == 0 for a in axes):
            out = torch.full(shape, _identity(empty_value, value.dtype), dtype=value.dtype)
        elif not axes:
            out = value
        else:
            out = fn(value, axes).reshape(shape)
        if not keepdims:
            out = out.reshape([n for i, n in enumerate(shape) if i not in axes])
        return out
    return op


def _arg(kind: str):
    def op(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
        value = x[0]
        axis = axis_of(attrs.get("axis", 0), value.dim())
        keepdims = bool(attrs.get("keepdims", 1))
        fn = torch.argmax if kind == "ArgMax" else torch.argmin
        if attrs.get("select_last_index", 0):
            flipped = fn(torch.flip(value, [axis]), axis, keepdim=keepdims)
            return value.shape[axis] - 1 - flipped
        return fn(value, axis, keepdim=keepdims)
    return op


def _topk(ctx: Ctx, x: list, attrs: dict) -> tuple:
    value, k = x[0], ints(x[1])[0]
    axis = axis_of(attrs.get("axis", -1), value.dim())
    largest = bool(attrs.get("largest", 1))
    # A stable sort keeps ONNX's tie rule: equal values in index order.
    values, indices = torch.sort(value, dim=axis, descending=largest, stable=True)
    return values.narrow(axis, 0, k), indices.narrow(axis, 0, k)


def _matmul(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.matmul(x[0], x[1])


def _matmul_integer(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    a = x[0].to(torch.int64)
    b = x[1].to(torch.int64)
    if len(x) > 2 and x[2] is not None:
        zero = x[2].to(torch.int64)
        a = a - (zero.reshape(-1, 1) if zero.numel() > 1 else zero)
    if len(x) > 3 and x[3] is not None:
        b = b - x[3].to(torch.int64)
    # int64 matmul is exact; ONNX's result type is int32.
    return torch.matmul(a.double(), b.double()).to(torch.int32)


def _gemm(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    a, b = x[0], x[1]
    if attrs.get("transA", 0):
        a = a.transpose(0, 1)
    if attrs.get("transB", 0):
        b = b.transpose(0, 1)
    out = attrs.get("alpha", 1.0) * torch.matmul(a, b)
    if len(x) > 2 and x[2] is not None:
        out = out + attrs.get("beta", 1.0) * x[2]
    return out.to(x[0].dtype)


def _einsum(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.einsum(attrs["equation"].replace(" ", ""), *x)


def _cumsum(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value, axis = x[0], axis_of(ints(x[1])[0], x[0].dim())
    if attrs.get("reverse", 0):
        value = torch.flip(value, [axis])
    out = torch.cumsum(value, axis).to(value.dtype)
    if attrs.get("exclusive", 0):
        out = out - value
    if attrs.get("reverse", 0):
        out = torch.flip(out, [axis])
    return out


def _where(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.where(x[0], x[1], x[2])


OPS = {
    "Add": _binary(torch.add), "Sub": _binary(torch.sub), "Mul": _binary(torch.mul),
    "Div": _div, "Pow": _pow, "Mod": _mod, "BitShift": _bitshift,
    "Neg": _unary(torch.neg), "Abs": _unary(torch.abs), "Reciprocal": _unary(torch.reciprocal),
    "Sqrt": _unary(torch.sqrt), "Exp": _unary(torch.exp), "Log": _unary(torch.log),
    "Sin": _unary(torch.sin), "Cos": _unary(torch.cos), "Tan": _unary(torch.tan),
    "Asin": _unary(torch.asin), "Acos": _unary(torch.acos), "Atan": _unary(torch.atan),
    "Sinh": _unary(torch.sinh), "Cosh": _unary(torch.cosh), "Asinh": _unary(torch.asinh),
    "Acosh": _unary(torch.acosh), "Atanh": _unary(torch.atanh), "Tanh": _unary(torch.tanh),
    "Sigmoid": _unary(torch.sigmoid), "Erf": _unary(torch.erf), "Floor": _unary(torch.floor),
    "Ceil": _unary(torch.ceil), "Sign": _unary(torch.sign), "Round": _unary(torch.round),
    "IsNaN": _unary(torch.isnan), "IsInf": _isinf, "Not": _unary(torch.logical_not),
    "BitwiseNot": _unary(torch.bitwise_not),
    "And": _binary(torch.logical_and), "Or": _binary(torch.logical_or),
    "Xor": _binary(torch.logical_xor), "BitwiseAnd": _binary(torch.bitwise_and),
    "BitwiseOr": _binary(torch.bitwise_or), "BitwiseXor": _binary(torch.bitwise_xor),
    "Equal": _binary(torch.eq), "Greater": _binary(torch.gt), "Less": _binary(torch.lt),
    "GreaterOrEqual": _binary(torch.ge), "LessOrEqual": _binary(torch.le),
    "Max": _variadic(torch.maximum), "Min": _variadic(torch.minimum),
    "Sum": _variadic(torch.add), "Mean": _mean, "Where": _where, "Clip": _clip,
    "PRelu": _prelu, "MatMul": _matmul, "MatMulInteger": _matmul_integer, "Gemm": _gemm,
    "Einsum": _einsum, "CumSum": _cumsum, "TopK": _topk,
    "ArgMax": _arg("ArgMax"), "ArgMin": _arg("ArgMin"),
}
OPS.update({name: _activation(name) for name in (
    "Relu", "LeakyRelu", "Elu", "Celu", "Selu", "ThresholdedRelu", "HardSigmoid", "HardSwish",
    "Softplus", "Softsign", "Mish", "Gelu", "Shrink")})
OPS.update({name: _softmax_family(name) for name in ("Softmax", "LogSoftmax", "Hardmax")})
OPS.update({name: _reduce(name) for name in _REDUCERS})
