"""The other remedy for a layer whose uint8 x int8 pair sums overflow (``u8s8_remedy = scale``):
its int8 weight kept, the scale widened in the output channels holding a pair that can overflow,
just enough that none can, on any input.

A pair ``a_k w_k + a_{k+1} w_{k+1}`` (``a`` uint8, ``w`` int8 of one sign) stays within int16
for every input when ``|w_k| + |w_{k+1}| <= 128`` (``255 * 128 = 32640``). A channel whose
largest such sum is ``m > 128`` is requantized ``q' = round(q / r)`` with its scale times
``r = m / 127``: rounding adds at most one to a pair's magnitudes, ``m / r + 1 = 128``, and no
other pair grows (``|round(q / r)| <= |q|`` for ``r >= 1``). The pairs are those of both im2col
orders ONNX Runtime's kernels use (``pairsums.pair_plans``). The cost is the coarser grid of the
widened channels (at most one bit: ``r <= 254 / 127``); the gain against uint8 weights
(``overflow.py``) is speed, ONNX Runtime keeping its u8 x s8 kernels: measured on an AMD EPYC (AVX2, no VNNI),
PP-OCRv4 det with its 14 saturating Convs widened ran at 0.745x of float latency against 0.897x
with them in u8 x u8, mask IoU 0.980 against 0.978 (docs/quantize.md).

Widened: static int8 layers (a DequantizeLinear reading the int8 weight, its scale an
initializer) and int8-dynamic's MatMulInteger (its int32 output rescaled by ``Mul(A_s, W_s)``),
in the main graph; QAttention and DynamicQuantizeLSTM (scales inside the op) and If/Loop bodies
are left to ``overflow.to_u8u8``. The requantization starts from the int8 values (the float weights are
gone by then): a second rounding, part of what ``quantize`` checks before keeping the result.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp.model import Model, tensor_values
from onnxcomp.passes.quantize import pairsums

# The largest pair magnitude that cannot overflow (255 * 128 <= 32767), less one for rounding.
SAFE_PAIR = 127


def widenable(site, model: Model) -> str:
    """Why ``site`` cannot be widened ("" where it can)."""
    if site.scope:
        return "in an If/Loop body"
    if site.op not in ("Conv", "MatMul", "Gemm", "MatMulInteger"):
        return f"{site.op} keeps its weight scale inside the op"
    found = _scale_slot(model.graph, site)
    if found is None:
        return ("its weight is not read by one DequantizeLinear" if site.op != "MatMulInteger"
                else "its output is not rescaled by Cast -> Mul(A_s * W_s)")
    inits = {t.name: t for t in model.graph.initializer}
    node, slot = found
    if node.input[slot] not in inits:
        return "its weight scale is not an initializer"
    if sum(site.weight in n.input for n in model.graph.node) > 1:
        return "its int8 weight is read by several nodes"
    per_channel = sum(d != 1 for d in inits[node.input[slot]].dims) == 1
    if node.op_type == "DequantizeLinear" and per_channel:
        rank = len(inits[site.weight].dims)
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % rank
        if axis != _axis(site, rank):
            return f"its per-channel scale runs along axis {axis}, not the output channels"
    # The weight's zero point: a DequantizeLinear's slot 2, MatMulInteger's slot 3.
    holder = node if node.op_type == "DequantizeLinear" else next(
        n for n in model.graph.node if n.output and n.output[0] == site.holder.split("#")[0])
    zero_slot = 3 if site.op == "MatMulInteger" else 2
    if len(holder.input) > zero_slot and holder.input[zero_slot]:
        zero = inits.get(holder.input[zero_slot])
        if zero is None or tensor_values(zero, model.source).any():
            return "its weight zero point is not 0"
    return ""


def _scale_slot(graph: onnx.GraphProto, site) -> tuple[onnx.NodeProto, int] | None:
    """The node and input slot holding the weight scale: a static layer's weight
    DequantizeLinear (slot 1), or for int8-dynamic's MatMulInteger the ``Mul(A_s, W_s)`` whose
    product rescales its Cast output (``int8._replace_by_dynamic_form``'s pattern)."""
    producer = {o: n for n in graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for name in n.input:
            readers.setdefault(name, []).append(n)
    holder = producer.get(site.holder.split("#")[0])
    if holder is None:
        return None
    if site.op != "MatMulInteger":
        return (holder, 1) if holder.op_type == "DequantizeLinear" else None
    quantizer = producer.get(holder.input[0])
    casts = readers.get(holder.output[0], [])
    if quantizer is None or quantizer.op_type != "DynamicQuantizeLinear" or len(casts) != 1 \
            or casts[0].op_type != "Cast":
        return None
    rescales = readers.get(casts[0].output[0], [])
    if len(rescales) != 1 or rescales[0].op_type != "Mul":
        return None
    both = producer.get(next((i for i in rescales[0].input if i != casts[0].output[0]), ""))
    if both is None or both.op_type != "Mul" or quantizer.output[1] not in both.input:
        return None
    return both, 1 - list(both.input).index(quantizer.output[1])


def factors(site, weight: np.ndarray) -> np.ndarray:
    """Per output channel, the scale factor ``r >= 1`` after which no pair can overflow."""
    worst = np.zeros(site.channels)
    for plan in pairsums.pair_plans(site, weight):
        per_group = site.channels // len(plan)
        for group, (_, pairs) in enumerate(plan):
            for _, _, channels, w1, w2 in pairs:
                np.maximum.at(worst, group * per_group + channels,
                              np.abs(w1.astype(np.int32)) + np.abs(w2.astype(np.int32)))
    return np.maximum(1.0, worst / SAFE_PAIR)


def widen(model: Model, sites: list) -> tuple[Model, dict[str, tuple[int, float]]]:
    """``sites`` (each :func:`widenable`) with their risky channels' scales widened (per-tensor
    weights: the whole tensor, by the largest factor); per weight, the channels widened and the
    largest factor. A scale other nodes read too is copied first."""
    result = model.copy()
    graph = result.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    done: dict[str, tuple[int, float]] = {}
    for site in sites:
        if site.weight in done:
            continue
        node, slot = _scale_slot(graph, site)
        q = tensor_values(inits[site.weight], model.source).astype(np.int32)
        r = factors(site, q)
        done[site.weight] = (int(np.count_nonzero(r > 1)), float(r.max()))
        if not done[site.weight][0]:
            continue
        scale = tensor_values(inits[node.input[slot]], model.source).astype(np.float64)
        if scale.size == 1:  # per-tensor weights stay so: one factor, the largest
            r = np.full_like(r, r.max())
        shape = [1] * q.ndim
        shape[_axis(site, q.ndim)] = -1
        widened = np.clip(np.round(q / r.reshape(shape)), -127, 127).astype(np.int8)
        new_scale = (scale * r[0] if scale.size == 1 else scale * r).astype(np.float32)
        inits[site.weight].CopyFrom(numpy_helper.from_array(widened, site.weight))
        if readers.get(node.input[slot], 0) > 1:  # a scale other nodes read: its own copy
            node.input[slot] = _unique(f"{node.input[slot]}_widened", inits)
            graph.initializer.append(onnx.TensorProto())
            inits[node.input[slot]] = graph.initializer[-1]
        inits[node.input[slot]].CopyFrom(numpy_helper.from_array(new_scale, node.input[slot]))
    return result, done


def _axis(site, rank: int) -> int:
    """The weight's output-channel axis: a Conv's 0, ``[N, K]`` of a Gemm with transB, else the
    last (``[K, N]``)."""
    transposed = site.op == "Gemm" and dict(site.attrs).get("transB", 0)
    return 0 if site.op == "Conv" or transposed else rank - 1


def _unique(base: str, taken: dict) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    return name
