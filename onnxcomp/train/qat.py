"""Quantization-aware training on the twin of a quantized graph: fake quantization with a
straight-through estimator (STE), on the exact scales and zero points the graph already holds.

    fake_quant(w) = (clamp(round(w / s) + z, lo, hi) - z) · s       forward
    ∂fake_quant/∂w = 1 inside [lo, hi] (after rounding), 0 outside   backward (clipped STE)

- Weight sites: a ``DequantizeLinear`` whose input is a constant integer initializer (int8, uint8,
  int4, uint4, int32), and ``com.microsoft:MatMulNBits`` (its packed ``B``). Each gets a float
  *shadow* parameter (``twin.shadows``), initialized to its dequantized value; the node computes
  ``fake_quant(shadow)`` with the node's own scale, zero point and per-axis / per-block layout.
- Activation sites: a ``QuantizeLinear`` whose outputs only feed ``DequantizeLinear`` rounds
  with the STE and hands on float-valued integers; the ``DequantizeLinear`` after it is the
  twin's own. Its calibrated scale and zero point stay as they are.
- Scales and zero points are frozen (learnable scales are not offered yet).
- ``write_back`` re-quantizes each shadow with the same formula into the same initializer (same
  name, element type, shape; MatMulNBits re-packed low bits first, its padding kept), so the
  graph is still the QDQ / MatMulNBits graph ONNX Runtime fuses into integer kernels. An
  untrained shadow re-quantizes to the very same integers.

Limits: integer weights stored as ``Constant`` nodes are left as they are (frozen); a
``QuantizeLinear`` read by anything other than ``DequantizeLinear`` keeps ONNX's integer output
(no gradient through it); MatMulNBits ``g_idx`` is refused by the twin already.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from onnxcomp.model import Model
from onnxcomp.train.ops_common import QUANT_RANGES, TensorProto, to_tensor
from onnxcomp.train.ops_quant import _expand_scale, _unpack
from onnxcomp.train.twin import Twin, _replace_values, _tensor_array

MICROSOFT = "com.microsoft"
_INT_RANGES = {np.dtype(np.int8): (-128, 127), np.dtype(np.uint8): (0, 255),
               np.dtype(np.int16): (-32768, 32767), np.dtype(np.uint16): (0, 65535),
               np.dtype(np.int32): (-(2 ** 31), 2 ** 31 - 1)}
_ONNX_RANGES = {TensorProto.INT8: (-128, 127), TensorProto.UINT8: (0, 255),
                TensorProto.INT16: (-32768, 32767), TensorProto.INT32: (-(2 ** 31), 2 ** 31 - 1),
                **QUANT_RANGES}


def fake_quant(value: torch.Tensor, scale, zero, low: float, high: float) -> torch.Tensor:
    """``(clamp(round(value / scale) + zero, low, high) - zero) · scale`` with the STE: ONNX's
    QuantizeLinear (the zero point added after rounding half to even: before, an odd zero point
    would move exact ties to the other integer) then DequantizeLinear.

    A zero scale (the quantize pass stores the subnormal scale of a dead channel as 0) gives 0
    and a zero gradient there, not 0/0 = NaN; clamping before the rounding (the same integers:
    the bounds are integers) keeps ``value / tiny scale = inf`` out of the STE's ``inf - inf``."""
    return ste_round(quant_offset(value, scale, zero, low, high)) * scale


def quant_offset(value: torch.Tensor, scale, zero, low: float, high: float) -> torch.Tensor:
    """``clamp(value / scale, low - zero, high - zero)``: the integer's distance from the zero
    point before rounding; a zero scale read as 1 (its channel is 0)."""
    if isinstance(scale, torch.Tensor):
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
    elif scale == 0:
        scale = 1.0
    shifted = value / scale
    if isinstance(zero, torch.Tensor):
        return torch.clamp(shifted, min=low - zero, max=high - zero)
    return shifted.clamp(low - zero, high - zero)


def ste_round(value: torch.Tensor) -> torch.Tensor:
    """Round half to even forward (as ONNX), identity backward."""
    return value + (torch.round(value) - value).detach()


@dataclass
class Site:
    kind: str        # "dq" (DequantizeLinear weight) or "nbits" (MatMulNBits)
    output: str      # output of the node computing it
    weight: str      # the integer initializer holding the quantized values
    key: str         # the shadow's key in twin.shadows
    low: float = 0.0
    high: float = 0.0


@dataclass
class Qat:
    """The QAT sites of a twin; ``write_back`` puts the re-quantized shadows into the model."""

    twin: Twin
    sites: list[Site]
    activations: list[str]   # QuantizeLinear outputs rounded with the STE

    def __bool__(self) -> bool:
        return bool(self.sites or self.activations)

    def write_back(self, model: Model) -> Model:
        result = self.twin.write_back(model)
        stored = {t.name: t for t in result.graph.initializer}
        nodes = {n.output[0]: n for n in model.graph.node if n.output}
        for site in self.sites:
            shadow = self.twin.shadows[site.key].detach().cpu()
            tensor = stored[site.weight]
            if site.kind == "dq":
                values = _requantize_dq(self.twin, nodes[site.output], shadow, site)
            else:
                values = _requantize_nbits(self.twin, nodes[site.output], shadow,
                                           _tensor_array(tensor, model.source))
            _replace_values(tensor, values, model.source)
        return result


def prepare(twin: Twin, model: Model) -> Qat:
    """Shadows and STE quantizers for every quantized site of ``model`` in ``twin``; freezes
    every scale and float zero point. Nothing happens to a model without Q/DQ or MatMulNBits."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    twin.shadows = torch.nn.ParameterDict()
    sites: list[Site] = []
    activations: list[str] = []
    device = next(iter(twin.weights.values())).device if len(twin.weights) else None
    for node in graph.node:
        op = node.op_type
        if op in ("QuantizeLinear", "DequantizeLinear") or (node.domain == MICROSOFT
                                                            and op == "MatMulNBits"):
            _freeze(twin, node)
        if op == "DequantizeLinear" and node.input[0] in inits:
            q = _tensor_array(inits[node.input[0]], model.source)
            kind = q.dtype.name
            if kind not in ("int8", "uint8", "int16", "uint16", "int32", "int4", "uint4"):
                continue
            site = Site("dq", node.output[0], node.input[0], f"s{len(sites)}")
            site.low, site.high = _dq_range(q, inits, node)
            shadow = _dequantized(twin, node)
            twin.shadows[site.key] = torch.nn.Parameter(shadow.to(device))
            twin.replace_op(site.output, _dq_fn(twin, site))
            sites.append(site)
        elif op == "MatMulNBits" and node.domain == MICROSOFT and node.input[1] in inits:
            site = Site("nbits", node.output[0], node.input[1], f"s{len(sites)}")
            bits = _attr(node, "bits", 4)
            site.low, site.high = 0, (1 << bits) - 1
            shadow = _nbits_dequantized(twin, node)
            twin.shadows[site.key] = torch.nn.Parameter(shadow.to(device))
            twin.replace_op(site.output, _nbits_fn(twin, site))
            sites.append(site)
        elif op == "QuantizeLinear" and node.output[0] and all(
                c.op_type == "DequantizeLinear" for c in consumers.get(node.output[0], [])):
            twin.replace_op(node.output[0], _quantize_ste)
            activations.append(node.output[0])
    return Qat(twin, sites, activations)


def _attr(node: onnx.NodeProto, name: str, default):
    for attribute in node.attribute:
        if attribute.name == name:
            return onnx.helper.get_attribute_value(attribute)
    return default


def _freeze(twin: Twin, node: onnx.NodeProto) -> None:
    # Scales (input 1) and zero points (input 2; MatMulNBits: 2 and 3) stay calibrated.
    for name in node.input[1:4]:
        if name and name in twin._keys:
            twin.parameter(name).requires_grad_(False)


def _value(twin: Twin, name: str) -> torch.Tensor | None:
    if not name:
        return None
    if name in twin._keys:
        return twin.parameter(name).detach()
    if name in twin._buffers_by_name:
        return getattr(twin.constants, twin._buffers_by_name[name])
    return None


def _dq_range(q: np.ndarray, inits: dict, node: onnx.NodeProto) -> tuple[float, float]:
    if q.dtype.name in ("int4", "uint4"):
        low, high = _ONNX_RANGES[TensorProto.INT4 if q.dtype.name == "int4" else TensorProto.UINT4]
    else:
        low, high = _INT_RANGES[q.dtype]
    zero = node.input[2] if len(node.input) > 2 else ""
    if zero and zero not in inits:
        symmetric = False  # a zero point computed in the graph: keep the full range
    else:
        symmetric = not zero or not np.any(numpy_helper.to_array(inits[zero]).astype(np.int64))
    if low < 0 and symmetric and q.astype(np.int64).min() > low:
        low = -high  # a symmetric grid ([-127, 127]) stays symmetric
    return float(low), float(high)


def _dq_inputs(twin: Twin, node: onnx.NodeProto, value: torch.Tensor):
    ctx = next(c for n, _, c, _ in twin._steps if list(n.output) == list(node.output))
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    scale = _expand_scale(ctx, _value(twin, node.input[1]), value, attrs).float()
    zero_value = _value(twin, node.input[2]) if len(node.input) > 2 else None
    zero = _expand_scale(ctx, zero_value, value, attrs).float() if zero_value is not None \
        else torch.zeros(())
    return scale, zero


def _dequantized(twin: Twin, node: onnx.NodeProto) -> torch.Tensor:
    q = _value(twin, node.input[0]).float()
    scale, zero = _dq_inputs(twin, node, q)
    return ((q - zero) * scale).float()


def _dq_fn(twin: Twin, site: Site):
    def dequantize_shadow(ctx, x: list, attrs: dict) -> torch.Tensor:
        shadow = twin.shadows[site.key]
        scale = _expand_scale(ctx, x[1], shadow, attrs).float()
        zero = _expand_scale(ctx, x[2], shadow, attrs).float() \
            if len(x) > 2 and x[2] is not None else 0.0
        return fake_quant(shadow, scale, zero, site.low, site.high).to(x[1].dtype)
    return dequantize_shadow


def _requantize_dq(twin: Twin, node: onnx.NodeProto, shadow: torch.Tensor, site: Site
                   ) -> np.ndarray:
    scale, zero = _dq_inputs(twin, node, shadow)
    with torch.no_grad():
        q = torch.round(quant_offset(shadow.float(), scale.cpu(), zero.cpu(), site.low,
                                     site.high)) + zero.cpu()
        # A zero-scale channel reads 0 whatever its integers: keep the stored ones.
        stored = _value(twin, node.input[0]).cpu().to(q.dtype)
        q = torch.where(scale.cpu() == 0, stored, q)
    return q.numpy().astype(np.int64)


def _quantize_ste(ctx, x: list, attrs: dict) -> torch.Tensor:
    """QuantizeLinear whose integers only go to DequantizeLinear: float-valued integers, STE."""
    value, scale = x[0], x[1]
    zero = x[2] if len(x) > 2 and x[2] is not None else None
    onnx_type = attrs.get("output_dtype", 0) or ctx.input_type(2) or (
        TensorProto.UINT8 if zero is None else {torch.int8: TensorProto.INT8,
                                                torch.uint8: TensorProto.UINT8}[zero.dtype])
    low, high = _ONNX_RANGES[onnx_type]
    s = _expand_scale(ctx, scale, value, attrs).float()
    z = _expand_scale(ctx, zero, value, attrs).float() if zero is not None else 0.0
    return ste_round(quant_offset(value.float(), s, z, low, high)) + z


def _nbits_layout(twin: Twin, node: onnx.NodeProto):
    k, n, bits, block = (_attr(node, "K", 0), _attr(node, "N", 0), _attr(node, "bits", 4),
                         _attr(node, "block_size", 0))
    blocks = -(-k // block)
    scale = _value(twin, node.input[2]).reshape(n, blocks, 1).float()
    zero = _value(twin, node.input[3]) if len(node.input) > 3 else None
    if zero is None:
        offset = torch.full((n, blocks, 1), float(1 << (bits - 1)))
    elif zero.dtype == torch.uint8:
        offset = _unpack(zero.reshape(n, -1), bits)[:, :blocks].reshape(n, blocks, 1).float()
    else:
        offset = zero.reshape(n, blocks, 1).float()
    return k, n, bits, block, blocks, scale, offset.to(scale.device)


def _nbits_dequantized(twin: Twin, node: onnx.NodeProto) -> torch.Tensor:
    k, n, bits, block, blocks, scale, offset = _nbits_layout(twin, node)
    packed = _value(twin, node.input[1])
    q = _unpack(packed.reshape(n, blocks, -1), bits).reshape(n, blocks, block).float()
    return ((q - offset) * scale).reshape(n, blocks * block)[:, :k].contiguous()


def _nbits_fn(twin: Twin, site: Site):
    def matmul_shadow(ctx, x: list, attrs: dict) -> torch.Tensor:
        k, n, _, block, blocks, scale, offset = _nbits_layout(twin, ctx.node)
        shadow = twin.shadows[site.key]
        padded = torch.nn.functional.pad(shadow, (0, blocks * block - k))
        weight = fake_quant(padded.reshape(n, blocks, block), scale.to(shadow.device),
                            offset.to(shadow.device), site.low, site.high)
        weight = weight.reshape(n, blocks * block)[:, :k].to(x[0].dtype)
        out = torch.matmul(x[0], weight.transpose(0, 1))
        bias = x[5] if len(x) > 5 else None
        return out + bias if bias is not None else out
    return matmul_shadow


def _requantize_nbits(twin: Twin, node: onnx.NodeProto, shadow: torch.Tensor,
                      packed: np.ndarray) -> np.ndarray:
    k, n, bits, block, blocks, scale, offset = _nbits_layout(twin, node)
    original = _unpack(to_tensor(packed).reshape(n, blocks, -1), bits).reshape(n, -1)
    with torch.no_grad():
        padded = torch.nn.functional.pad(shadow.float(), (0, blocks * block - k))
        q = torch.round(quant_offset(padded.reshape(n, blocks, block), scale.cpu(),
                                     offset.cpu(), 0, (1 << bits) - 1)) + offset.cpu()
        dead = (scale.cpu() == 0).expand(n, blocks, block).reshape(n, -1)
        q = q.reshape(n, -1).to(torch.int64)
    q[dead] = original.to(torch.int64)[dead]  # zero-scale blocks read 0: stored values kept
    q[:, k:] = original[:, k:].to(torch.int64)  # the padding of the last block, as stored
    per_byte = 8 // bits
    groups = q.reshape(n, blocks, -1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int64) * bits
    packed_new = (groups << shifts).sum(dim=-1).to(torch.uint8)
    return packed_new.numpy().reshape(packed.shape)
