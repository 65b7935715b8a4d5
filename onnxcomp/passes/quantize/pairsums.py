"""Pair sums of a u8 x s8 layer as an x86 CPU without VNNI adds them (``vpmaddubsw``: two
products at a time into a saturating signed 16-bit lane), for ``overflow.py``.

A layer's reduction axis is walked in the orders ONNX Runtime's kernels use (a Conv's im2col in
NCHW order ``(c, kh, kw)`` and NHWC order ``(kh, kw, c)``; a MatMul's K), pairing ``(2j, 2j+1)``.
Only the weight pairs that can overflow at all are summed (same sign, ``|w1| + |w2| >= 129``),
on the uint8 activations the calibration data gives, or in expectation over uniform uint8 inputs
where no data reaches the layer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# overflow.py's Site and Finding (not imported: that module imports this one).
Site = Finding = Any

INT16_MAX = 32767
# A pair can overflow only if 255 * (|w1| + |w2|) > INT16_MAX.
PAIR_WEIGHT_MIN = INT16_MAX // 255 + 1  # 129
# Output positions checked per layer and batch (a strided sample beyond it): bounded time on
# large feature maps.
MAX_POSITIONS = 1 << 16
# int8-dynamic's integer ops, which read their weights as [K, N] (DynamicQuantizeLSTM: per
# direction).
INTEGER_OPS = ("MatMulInteger", "QAttention", "DynamicQuantizeLSTM")


def assume_uniform(site: Site, plans: list[list], finding: Finding) -> None:
    """Expected overflowing pair sums per output value with both uint8 inputs uniform on
    [0, 255], in the worst of the kernel orders."""
    levels = np.arange(256, dtype=np.float64)
    expected = []
    for plan in plans:
        total = 0.0
        for _, pairs in plan:
            for _, _, _, w1, w2 in pairs:
                u = np.abs(w1)[:, None].astype(np.float64)
                v = np.abs(w2)[:, None].astype(np.float64)
                # a2 above (32767 - a1 u) / v overflows (same sign: the magnitudes add up)
                above = 255 - np.floor((INT16_MAX - levels[None, :] * u) / v)
                total += float(np.clip(above, 0, 256).sum()) / 256 ** 2
        expected.append(total)
    finding.overflows, finding.outputs, finding.assumed = max(expected), site.channels, True
    finding.worst = 255 * 254 / INT16_MAX


def pair_plans(site: Site, weight: np.ndarray) -> list[list]:
    """Per kernel order: ``(order_name, [(k1, k2, channels, w1, w2), ...])`` per group, the
    weight pairs able to overflow (same sign, ``|w1| + |w2| >= 129``), ``k`` indexing that
    order's reduction axis."""
    attrs = dict(site.attrs)
    w = weight.astype(np.int32)
    if site.op == "Conv":
        groups = int(attrs.get("group", 1))
        if w.shape[1] == 1 and groups > 1:
            return []  # depthwise: a 32-bit kernel
        per_group = w.shape[0] // groups
        orders = {"nchw": lambda g: g.reshape(g.shape[0], -1)}
        if w.ndim > 2 and int(np.prod(w.shape[2:])) > 1 and w.shape[1] > 1:
            orders["nhwc"] = lambda g: np.moveaxis(g, 1, -1).reshape(g.shape[0], -1)
        plans = []
        for name, flatten in orders.items():
            plans.append([(name, g, _pairs(flatten(w[g * per_group:(g + 1) * per_group])))
                          for g in range(groups)])
        return [[(name, pairs) for name, _, pairs in plan] for plan in plans]
    if site.op == "DynamicQuantizeLSTM":  # [directions, K, 4 * hidden], one plan each
        return [[("k", _pairs(w[d].T)) for d in range(w.shape[0])]]
    if site.op in INTEGER_OPS:
        return [[("k", _pairs(w.T))]]  # [K, N] -> [N, K]
    if site.op == "Gemm" and int(attrs.get("transB", 0)):
        matrix = w  # [N, K]
    else:
        matrix = w.T if w.ndim == 2 else None  # MatMul [K, N] -> [N, K]
    if matrix is None or (site.op == "Gemm" and int(attrs.get("transA", 0))):
        return []
    return [[("k", _pairs(matrix))]]


def _pairs(rows: np.ndarray) -> list[tuple]:
    """``rows`` [channels, K]: the pairs ``(2j, 2j+1)`` that can overflow, by ``j``."""
    k = rows.shape[1] - rows.shape[1] % 2
    first, second = rows[:, 0:k:2], rows[:, 1:k:2]
    risky = (np.sign(first) == np.sign(second)) & (np.abs(first) + np.abs(second)
                                                   >= PAIR_WEIGHT_MIN)
    found = []
    for j in np.flatnonzero(risky.any(axis=0)):
        channels = np.flatnonzero(risky[:, j])
        found.append((2 * j, 2 * j + 1, channels, first[channels, j], second[channels, j]))
    return found


def check(site: Site, plans: list[list], values: np.ndarray, finding: Finding) -> None:
    """Adds this batch's overflows, in the order with the most of them (the kernel runs one)."""
    counts = []
    for plan in plans:
        overflows, excess = 0, 0.0
        for group, (order, pairs) in enumerate(plan):
            for k1, k2, _, w1, w2 in pairs:
                a1 = _column(site, order, group, k1, values)
                a2 = _column(site, order, group, k2, values)
                sums = np.abs(a1[:, None] * w1[None, :] + a2[:, None] * w2[None, :])
                over = np.maximum(sums - INT16_MAX, 0).astype(np.float64)
                overflows += int(np.count_nonzero(over))
                excess += float(np.sum(over * over))
                finding.worst = max(finding.worst, float(sums.max()) / INT16_MAX)
        counts.append((excess, overflows))
    excess, overflows = max(counts)
    finding.overflows += overflows
    finding.excess += excess
    finding.outputs += _outputs(site, values)


def _outputs(site: Site, values: np.ndarray) -> int:
    """Output values per batch at the sampled positions: positions x output channels."""
    return len(_column(site, "nchw", 0, 0, values)) * site.channels


def _column(site: Site, order: str, group: int, k: int, values: np.ndarray) -> np.ndarray:
    """The uint8 activations the reduction index ``k`` multiplies, at every output position
    (int32, a strided sample past ``MAX_POSITIONS``)."""
    if site.op != "Conv":
        flat = values.reshape(-1, values.shape[-1])[:, k]
        return _sample(flat).astype(np.int32)
    attrs = dict(site.attrs)
    spatial = values.ndim - 2
    kernel = list(attrs.get("kernel_shape") or [])
    channels = values.shape[1] // int(attrs.get("group", 1))
    if not kernel:
        kernel = [1] * spatial
    taps = int(np.prod(kernel))
    channel, tap = (k // taps, k % taps) if order == "nchw" else (k % channels, k // channels)
    offsets = np.unravel_index(tap, kernel)
    strides = list(attrs.get("strides") or [1] * spatial)
    dilations = list(attrs.get("dilations") or [1] * spatial)
    pads = list(attrs.get("pads") or [0] * (2 * spatial))
    plane = values[:, group * channels + channel]
    padded = np.pad(plane, [(0, 0)] + [(pads[i], pads[i + spatial]) for i in range(spatial)],
                    constant_values=site.zero_point)
    index = [slice(None)]
    for i in range(spatial):
        extent = (padded.shape[i + 1] - dilations[i] * (kernel[i] - 1) - 1) // strides[i] + 1
        start = offsets[i] * dilations[i]
        index.append(slice(start, start + (extent - 1) * strides[i] + 1, strides[i]))
    return _sample(padded[tuple(index)].reshape(-1)).astype(np.int32)


def _sample(flat: np.ndarray) -> np.ndarray:
    step = -(-flat.size // MAX_POSITIONS)
    return flat[::step] if step > 1 else flat
