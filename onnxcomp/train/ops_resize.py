"""Resize (opsets 10-19) as separable per-axis interpolation.

Each resized axis maps an output index ``i`` to a source coordinate by the
``coordinate_transformation_mode`` (``scale`` = output/input, or the given scale):

    half_pixel            (i + 0.5) / scale - 0.5
    half_pixel_symmetric  half_pixel shifted so both ends map symmetrically (opset 19)
    pytorch_half_pixel    half_pixel, or 0 when the output axis has one cell
    align_corners         i · (in - 1) / (out - 1)
    asymmetric            i / scale
    tf_crop_and_resize    roi_start · (in - 1) + i · (roi_end - roi_start) · (in - 1) / (out - 1)

then ``nearest`` rounds it (``nearest_mode``), ``linear`` mixes the two neighbours, ``cubic`` the
four (Keys kernel with ``cubic_coeff_a``, ``exclude_outside`` renormalizes). Neighbours past an
edge repeat the edge. Nearest, linear and cubic are products of one-axis kernels, so applying
the axes one after another is exact. ``antialias`` is refused.
"""

from __future__ import annotations

import math

import torch

from onnxcomp.train.ops_common import Ctx, axes_of, floats, ints


def _source(mode: str, out: int, size: int, scale: float, roi: tuple[float, float]) -> torch.Tensor:
    i = torch.arange(out, dtype=torch.float64)
    if mode == "half_pixel":
        return (i + 0.5) / scale - 0.5
    if mode == "half_pixel_symmetric":
        adjustment = out / (scale * size)
        offset = size / 2 * (1 - adjustment)
        return offset + (i + 0.5) / scale - 0.5
    if mode == "pytorch_half_pixel":
        return (i + 0.5) / scale - 0.5 if out > 1 else torch.zeros(out, dtype=torch.float64)
    if mode == "align_corners":
        # ONNX divides by the unrounded resized length, size · scale, minus one.
        length = size * scale
        return i * (size - 1) / (length - 1) if out > 1 else torch.zeros(out, dtype=torch.float64)
    if mode == "asymmetric":
        return i / scale
    if mode == "tf_crop_and_resize":
        start, end = roi
        if out > 1:
            return start * (size - 1) + i * (end - start) * (size - 1) / (out - 1)
        return torch.full((out,), 0.5 * (start + end) * (size - 1), dtype=torch.float64)
    raise ValueError(mode)


def _nearest(coords: torch.Tensor, mode: str) -> torch.Tensor:
    if mode == "round_prefer_ceil":
        return torch.floor(coords + 0.5)
    if mode == "floor":
        return torch.floor(coords)
    if mode == "ceil":
        return torch.ceil(coords)
    return torch.ceil(coords - 0.5)  # round_prefer_floor


def _cubic_weights(t: torch.Tensor, a: float) -> list[torch.Tensor]:
    def kernel(d: torch.Tensor) -> torch.Tensor:
        d = d.abs()
        near = ((a + 2) * d - (a + 3)) * d * d + 1
        far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return torch.where(d <= 1, near, torch.where(d < 2, far, torch.zeros_like(d)))
    return [kernel(t + 1), kernel(t), kernel(1 - t), kernel(2 - t)]


def _along(value: torch.Tensor, axis: int, index: torch.Tensor) -> torch.Tensor:
    return value.index_select(axis, index)


def _weighted(value: torch.Tensor, axis: int, weight: torch.Tensor) -> torch.Tensor:
    shape = [1] * value.dim()
    shape[axis] = -1
    return value * weight.to(value.dtype).reshape(shape)


def _resize_axis(ctx: Ctx, value: torch.Tensor, axis: int, out: int, scale: float,
                 roi: tuple[float, float], attrs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The value resized along one axis, and which output cells fall inside the input."""
    size = value.shape[axis]
    mode = attrs.get("mode", "nearest")
    transform = attrs.get("coordinate_transformation_mode", "half_pixel")
    if ctx.opset < 11:
        transform = "asymmetric"
    coords = _source(transform, out, size, scale, roi)
    inside = (coords >= 0) & (coords <= size - 1)
    if mode == "nearest":
        index = _nearest(coords, attrs.get("nearest_mode", "round_prefer_floor"))
        index = index.clamp(0, size - 1).to(torch.int64)
        return _along(value, axis, index), inside
    if mode == "linear":
        coords = coords.clamp(0, size - 1)
        low = torch.floor(coords)
        t = coords - low
        low = low.to(torch.int64)
        high = (low + 1).clamp(max=size - 1)
        return (_weighted(_along(value, axis, low), axis, 1 - t)
                + _weighted(_along(value, axis, high), axis, t)), inside
    if mode == "cubic":
        base = torch.floor(coords)
        weights = _cubic_weights(coords - base, attrs.get("cubic_coeff_a", -0.75))
        indexes = [base.to(torch.int64) + k for k in (-1, 0, 1, 2)]
        if attrs.get("exclude_outside", 0):
            weights = [torch.where((ix >= 0) & (ix < size), w, torch.zeros_like(w))
                       for ix, w in zip(indexes, weights)]
            total = sum(weights)
            weights = [w / total for w in weights]
        result = None
        for ix, w in zip(indexes, weights):
            term = _weighted(_along(value, axis, ix.clamp(0, size - 1)), axis, w)
            result = term if result is None else result + term
        return result, inside
    raise ctx.unsupported(f"mode={mode!r}")


def resize(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value = x[0]
    rank = value.dim()
    if attrs.get("antialias", 0):
        raise ctx.unsupported("antialias=1")
    if ctx.opset < 11:
        roi, scales, sizes = None, floats(x[1]), None
    else:
        roi = floats(x[1]) if len(x) > 1 and x[1] is not None and x[1].numel() else None
        scales = floats(x[2]) if len(x) > 2 and x[2] is not None and x[2].numel() else None
        sizes = ints(x[3]) if len(x) > 3 and x[3] is not None and x[3].numel() else None
    axes = axes_of(attrs.get("axes", range(rank)), rank)
    shape = list(value.shape)
    if sizes is not None:
        policy = attrs.get("keep_aspect_ratio_policy", "stretch")
        ratios = [sizes[k] / shape[a] for k, a in enumerate(axes)]
        if policy != "stretch":
            common = min(ratios) if policy == "not_larger" else max(ratios)
            ratios = [common] * len(axes)
            sizes = [math.floor(common * shape[a] + 0.5) for a in axes]
        axis_scale = dict(zip(axes, ratios))
        axis_out = dict(zip(axes, sizes))
    else:
        axis_scale = dict(zip(axes, scales))
        axis_out = {a: math.floor(shape[a] * s) for a, s in axis_scale.items()}
    transform = attrs.get("coordinate_transformation_mode", "half_pixel")
    crop = transform == "tf_crop_and_resize"
    if crop and roi is not None and "axes" in attrs:
        half = len(roi) // 2
        roi = _full_roi(roi[:half], roi[half:], axes, rank)
    inside = torch.ones([1] * rank, dtype=torch.bool)
    for axis in axes:
        out, scale = axis_out[axis], axis_scale[axis]
        if out == shape[axis] and scale == 1.0 and not crop:
            continue
        bounds = (roi[axis], roi[rank + axis]) if roi is not None else (0.0, 1.0)
        value, valid = _resize_axis(ctx, value, axis, out, scale, bounds, attrs)
        if crop:
            view = [1] * rank
            view[axis] = -1
            inside = inside & valid.reshape(view)
    if crop:
        fill = torch.tensor(attrs.get("extrapolation_value", 0.0), dtype=value.dtype)
        value = torch.where(inside, value, fill)
    return value


def _full_roi(starts: list[float], ends: list[float], axes: list[int], rank: int) -> list[float]:
    full = [0.0] * rank + [1.0] * rank
    for k, axis in enumerate(axes):
        full[axis], full[rank + axis] = starts[k], ends[k]
    return full
