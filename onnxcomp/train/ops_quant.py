"""Quantization ops of the twin: QuantizeLinear, DequantizeLinear and ONNX Runtime's MatMulNBits.

    QuantizeLinear    q = saturate(round_half_even(x / scale) + zero_point)
    DequantizeLinear  y = (q - zero_point) · scale

Scales are per tensor (scalar), per axis (1-D along ``axis``) or per block (same rank as the
input, ``block_size`` cells of ``axis`` per scale, opset 21). The quantized type is
``output_dtype``, else the zero point's, else uint8; int4/uint4/int2/uint2/uint16 are held in a
wider torch integer type with their own range applied (float8 and float4 are refused).
QuantizeLinear's output is an integer tensor, exactly as in ONNX, so no gradient flows through
it; quantization-aware training will replace a Q→DQ pair by a straight-through fake-quantizer,
which is the QAT loop's business, not the twin's.

MatMulNBits (com.microsoft) unpacks B (``bits`` per value, low bits first, ``block_size``
values per scale along K), subtracts the zero points (default 2^(bits-1)) and multiplies by the
scales, then computes A · Wᵀ (+ bias). ``g_idx`` (act-order) is refused.
"""

from __future__ import annotations

import torch

from onnxcomp.train.ops_common import (
    QUANT_RANGES,
    WIDENED_ONNX,
    Ctx,
    TensorProto,
    axis_of,
    torch_dtype,
)

_RANGES = {
    torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767),
    torch.int32: (-(2 ** 31), 2 ** 31 - 1),
}


def _expand_scale(ctx: Ctx, scale: torch.Tensor, value: torch.Tensor, attrs: dict
                  ) -> torch.Tensor:
    """The scale (or zero point) shaped to broadcast over ``value``."""
    if scale.numel() == 1 and scale.dim() <= 1:
        return scale.reshape([])
    axis = axis_of(attrs.get("axis", 1), value.dim())
    block = attrs.get("block_size", 0)
    if block:
        return scale.repeat_interleave(block, dim=axis).narrow(axis, 0, value.shape[axis])
    if scale.dim() != 1:
        raise ctx.unsupported(f"a scale of shape {list(scale.shape)} without block_size")
    shape = [1] * value.dim()
    shape[axis] = -1
    return scale.reshape(shape)


def _quantize(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value, scale = x[0], x[1]
    zero = x[2] if len(x) > 2 and x[2] is not None else None
    onnx_type = attrs.get("output_dtype", 0) or ctx.input_type(2) or (
        0 if zero is not None else TensorProto.UINT8)
    if onnx_type in QUANT_RANGES:  # 4-, 2-bit and uint16, held in a wider type
        dtype, (low, high) = WIDENED_ONNX[onnx_type], QUANT_RANGES[onnx_type]
    else:
        dtype = torch_dtype(ctx, onnx_type) if onnx_type else zero.dtype
        if dtype not in _RANGES:
            raise ctx.unsupported(f"quantized type {dtype}")
        low, high = _RANGES[dtype]
    work = value.float() if value.dtype != torch.float64 else value
    scaled = torch.round(work / _expand_scale(ctx, scale, value, attrs).to(work.dtype))
    if zero is not None:
        scaled = scaled + _expand_scale(ctx, zero, value, attrs).to(work.dtype)
    return scaled.clamp(low, high).to(dtype)


def _dequantize(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value, scale = x[0], x[1]
    zero = x[2] if len(x) > 2 and x[2] is not None else None
    work = value.to(torch.float32)
    if zero is not None:
        work = work - _expand_scale(ctx, zero, value, attrs).to(torch.float32)
    out = work * _expand_scale(ctx, scale, value, attrs).to(torch.float32)
    return out.to(scale.dtype)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 bytes → one value per ``bits``, low bits first, along a new last axis."""
    per_byte = 8 // bits
    shifts = torch.arange(per_byte, dtype=torch.int32) * bits
    values = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return values.reshape(list(packed.shape[:-1]) + [-1])


def _matmul_nbits(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    a, packed, scales = x[0], x[1], x[2]
    zero = x[3] if len(x) > 3 else None
    if len(x) > 4 and x[4] is not None:
        raise ctx.unsupported("g_idx (act-order)")
    bias = x[5] if len(x) > 5 else None
    k, n, bits = attrs["K"], attrs["N"], attrs.get("bits", 4)
    block = attrs["block_size"]
    if bits not in (2, 4, 8):
        raise ctx.unsupported(f"bits={bits}")
    blocks = -(-k // block)
    q = _unpack(packed.reshape(n, blocks, -1), bits).reshape(n, blocks, block).float()
    scale = scales.reshape(n, blocks, 1).float()
    if zero is None:
        offset = torch.full((n, blocks, 1), float(1 << (bits - 1)))
    elif zero.dtype == torch.uint8:
        offset = _unpack(zero.reshape(n, -1), bits)[:, :blocks].reshape(n, blocks, 1).float()
    else:  # float zero points: w = (q - zero) · scale in the same units
        offset = zero.reshape(n, blocks, 1).float()
    weight = ((q - offset) * scale).reshape(n, blocks * block)[:, :k].to(a.dtype)
    out = torch.matmul(a, weight.transpose(0, 1))
    if bias is not None:
        out = out + bias
    return out


OPS = {"QuantizeLinear": _quantize, "DequantizeLinear": _dequantize}
MICROSOFT_OPS = {"MatMulNBits": _matmul_nbits}
