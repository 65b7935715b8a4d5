"""Convolution, pooling and normalization ops of the twin (1-D, 2-D and 3-D).

Padding is applied explicitly before the torch call whenever ONNX's can't be expressed by torch's
symmetric ``padding`` (asymmetric pads, ``auto_pad`` SAME_UPPER/SAME_LOWER, ``ceil_mode``):
zeros for Conv, -inf for MaxPool. AveragePool is a sum over windows divided by the count of the
cells that ONNX counts (``count_include_pad``), so every pad/ceil/dilation combination gives
ONNX's divisor. ConvTranspose runs unpadded and is then cropped by ``pads`` and extended by
``output_padding`` (or fitted to ``output_shape``), bias added last. BatchNormalization is the
inference form; its training mode (batch statistics, running-stat outputs) is refused.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from onnxcomp.train.ops_common import Ctx, axes_of, axis_of, channel_shape

_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
_MAXPOOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _auto_pads(auto_pad: str, sizes, kernel, strides, dilations) -> list[int]:
    """Begin pads then end pads, ONNX's layout."""
    begins, ends = [], []
    for size, k, s, d in zip(sizes, kernel, strides, dilations):
        if auto_pad == "VALID":
            begins.append(0)
            ends.append(0)
            continue
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small = total // 2
        begins.append(small if auto_pad == "SAME_UPPER" else total - small)
        ends.append(total - begins[-1])
    return begins + ends


def _window(ctx: Ctx, x: torch.Tensor, attrs: dict, kernel: list[int]):
    """Strides, dilations and pads (begins + ends) of a convolution or pooling window."""
    spatial = x.dim() - 2
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if auto_pad not in ("NOTSET", ""):
        pads = _auto_pads(auto_pad, x.shape[2:], kernel, strides, dilations)
    else:
        pads = list(attrs.get("pads", [0] * (2 * spatial)))
    return strides, dilations, pads


def _torch_pad(pads: list[int]) -> list[int]:
    """ONNX [b1, b2, ..., e1, e2, ...] as torch's F.pad list (last axis first)."""
    half = len(pads) // 2
    flat = []
    for axis in reversed(range(half)):
        flat += [pads[axis], pads[half + axis]]
    return flat


def _conv(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value, weight = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    spatial = value.dim() - 2
    if spatial not in _CONV:
        raise ctx.unsupported(f"{spatial}-D convolution")
    kernel = list(attrs.get("kernel_shape", weight.shape[2:]))
    strides, dilations, pads = _window(ctx, value, attrs, kernel)
    half = len(pads) // 2
    if pads[:half] == pads[half:]:
        padding = pads[:half]
    else:
        value = F.pad(value, _torch_pad(pads))
        padding = [0] * spatial
    return _CONV[spatial](value, weight, bias, strides, padding, dilations, attrs.get("group", 1))


def _conv_transpose(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value, weight = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    spatial = value.dim() - 2
    if spatial not in _CONV_T:
        raise ctx.unsupported(f"{spatial}-D transposed convolution")
    kernel = list(attrs.get("kernel_shape", weight.shape[2:]))
    strides = list(attrs.get("strides", [1] * spatial))
    dilations = list(attrs.get("dilations", [1] * spatial))
    extra = list(attrs.get("output_padding", [0] * spatial))
    full = [s * (n - 1) + (k - 1) * d + 1 for n, k, s, d
            in zip(value.shape[2:], kernel, strides, dilations)]
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if "output_shape" in attrs or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        wanted = list(attrs["output_shape"])[-spatial:] if "output_shape" in attrs else \
            [n * s for n, s in zip(value.shape[2:], strides)]
        totals = [f + e - w for f, e, w in zip(full, extra, wanted)]
        # As ONNX's reference: SAME_UPPER puts the smaller half first, otherwise the larger
        # (floor division, so a negative total, output_shape past the full size, extends the
        # end). ONNX Runtime splits an odd SAME_UPPER total the other way round.
        begins = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in totals]
        pads = begins + [t - b for t, b in zip(totals, begins)]
    elif auto_pad == "VALID":
        pads = [0] * (2 * spatial)
    else:
        pads = list(attrs.get("pads", [0] * (2 * spatial)))
    out = _CONV_T[spatial](value, weight, None, strides, 0, 0, attrs.get("group", 1), dilations)
    # output_padding adds cells at the end that no input reaches (zeros before the bias); the
    # pads then crop (a negative pad extends with zeros).
    out = F.pad(out, _torch_pad([0] * spatial + extra))
    out = F.pad(out, _torch_pad([-p for p in pads]))
    if bias is not None:
        out = out + channel_shape(bias, out.dim())
    return out


def _pool_geometry(ctx: Ctx, value: torch.Tensor, attrs: dict):
    kernel = list(attrs["kernel_shape"])
    strides, dilations, pads = _window(ctx, value, attrs, kernel)
    spatial = len(kernel)
    if attrs.get("ceil_mode", 0):
        # The last window may run past the end pad, but must start inside input or begin pad.
        for axis in range(spatial):
            size = value.shape[axis + 2] + pads[axis] + pads[spatial + axis]
            span = (kernel[axis] - 1) * dilations[axis] + 1
            out = math.ceil((size - span) / strides[axis]) + 1
            if (out - 1) * strides[axis] >= value.shape[axis + 2] + pads[axis]:
                out -= 1
            pads[spatial + axis] += max((out - 1) * strides[axis] + span - size, 0)
    return kernel, strides, dilations, pads


def _max_pool(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor | tuple:
    value = x[0]
    spatial = value.dim() - 2
    if spatial not in _MAXPOOL:
        raise ctx.unsupported("a pooling rank above 3")
    kernel, strides, dilations, pads = _pool_geometry(ctx, value, attrs)
    dtype = value.dtype
    work = value if dtype.is_floating_point else value.double()  # exact for the int types
    padded = F.pad(work, _torch_pad(pads), value=-math.inf)
    if ctx.n_outputs < 2:
        return _MAXPOOL[spatial](padded, kernel, strides, 0, dilations).to(dtype)
    out, where = _MAXPOOL[spatial](padded, kernel, strides, 0, dilations, return_indices=True)
    return out.to(dtype), _onnx_indices(where, padded.shape[2:], value.shape, pads,
                                        attrs.get("storage_order", 0))


def _onnx_indices(where: torch.Tensor, padded: list[int], shape, pads: list[int],
                  column_major: int) -> torch.Tensor:
    """torch's per-plane indices into the padded input → ONNX's flat indices into the input
    tensor (row-major, or column-major over H and W with ``storage_order=1``)."""
    spatial = len(padded)
    coords = []
    rest = where
    for axis in reversed(range(spatial)):
        coords.insert(0, rest % padded[axis] - pads[axis])
        rest = rest // padded[axis]
    sizes = list(shape[2:])
    order = list(reversed(range(spatial))) if column_major else list(range(spatial))
    flat = torch.zeros_like(where)
    for axis in order:
        flat = flat * sizes[axis] + coords[axis]
    n, c = shape[:2]
    plane = math.prod(sizes)
    offsets = torch.arange(n * c, dtype=torch.int64).reshape([n, c] + [1] * spatial) * plane
    return flat + offsets


def _window_sum(value: torch.Tensor, kernel, strides, dilations) -> torch.Tensor:
    """Sum over each window: a depthwise convolution with a kernel of ones."""
    n, c = value.shape[:2]
    flat = value.reshape([n * c, 1] + list(value.shape[2:]))
    ones = torch.ones([1, 1] + list(kernel), dtype=value.dtype)
    out = _CONV[len(kernel)](flat, ones, None, strides, 0, dilations)
    return out.reshape([n, c] + list(out.shape[2:]))


def _average_pool(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value = x[0]
    if value.dim() - 2 not in _CONV:
        raise ctx.unsupported("a pooling rank above 3")
    declared = list(_window(ctx, value, attrs, list(attrs["kernel_shape"]))[2])
    kernel, strides, dilations, pads = _pool_geometry(ctx, value, attrs)
    total = _window_sum(F.pad(value, _torch_pad(pads)), kernel, strides, dilations)
    # Count the input cells, plus the declared pads when count_include_pad (not ceil overhang).
    counted = torch.ones([1, 1] + list(value.shape[2:]), dtype=value.dtype)
    if attrs.get("count_include_pad", 0):
        counted = F.pad(counted, _torch_pad(declared), value=1.0)
        overhang = [p - d for p, d in zip(pads, declared)]
        counted = F.pad(counted, _torch_pad(overhang))
    else:
        counted = F.pad(counted, _torch_pad(pads))
    return total / _window_sum(counted, kernel, strides, dilations)


def _global_average_pool(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.mean(x[0], list(range(2, x[0].dim())), keepdim=True)


def _global_max_pool(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.amax(x[0], list(range(2, x[0].dim())), keepdim=True)


def _batch_norm(ctx: Ctx, x: list, attrs: dict) -> tuple:
    value, scale, bias, mean, var = x[:5]
    rank = value.dim()
    epsilon = attrs.get("epsilon", 1e-5)
    running = ()
    if attrs.get("training_mode", 0):
        # Batch statistics (population variance); running ones blended by momentum.
        dims = [0] + list(range(2, rank))
        momentum = attrs.get("momentum", 0.9)
        batch_mean = value.mean(dims)
        batch_var = ((value - channel_shape(batch_mean, rank)) ** 2).mean(dims)
        running = (mean * momentum + batch_mean * (1 - momentum),
                   var * momentum + batch_var * (1 - momentum))
        mean, var = batch_mean, batch_var
    elif ctx.n_outputs > 1:
        raise ctx.unsupported("running-statistics outputs without training_mode")
    inv = torch.rsqrt(channel_shape(var, rank) + epsilon)
    out = (value - channel_shape(mean, rank)) * inv * channel_shape(scale, rank) \
        + channel_shape(bias, rank)
    return (out,) + running


def _instance_norm(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value, scale, bias = x
    dims = list(range(2, value.dim()))
    mean = value.mean(dims, keepdim=True)
    var = ((value - mean) ** 2).mean(dims, keepdim=True)
    normed = (value - mean) * torch.rsqrt(var + attrs.get("epsilon", 1e-5))
    return normed * channel_shape(scale, value.dim()) + channel_shape(bias, value.dim())


def _layer_norm(ctx: Ctx, x: list, attrs: dict) -> tuple:
    value, scale = x[0], x[1]
    bias = x[2] if len(x) > 2 else None
    axis = axis_of(attrs.get("axis", -1), value.dim())
    dims = list(range(axis, value.dim()))
    # stash_type=1 (the default): statistics in float32 whatever the input type.
    work = value.float() if attrs.get("stash_type", 1) == 1 else value
    mean = work.mean(dims, keepdim=True)
    inv = torch.rsqrt(((work - mean) ** 2).mean(dims, keepdim=True) + attrs.get("epsilon", 1e-5))
    out = ((work - mean) * inv).to(value.dtype) * scale
    if bias is not None:
        out = out + bias
    return out, mean, inv


def _group_norm(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value, scale, bias = x
    groups = attrs["num_groups"]
    n, c = value.shape[:2]
    grouped = value.reshape(n, groups, -1).float()
    mean = grouped.mean(-1, keepdim=True)
    var = ((grouped - mean) ** 2).mean(-1, keepdim=True)
    normed = ((grouped - mean) * torch.rsqrt(var + attrs.get("epsilon", 1e-5)))
    normed = normed.reshape(value.shape).to(value.dtype)
    if scale.numel() == groups and groups != c:  # opset 18: one scale per group
        scale = scale.repeat_interleave(c // groups)
        bias = bias.repeat_interleave(c // groups)
    return normed * channel_shape(scale, value.dim()) + channel_shape(bias, value.dim())


def _lp_norm(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value = x[0]
    axis = axis_of(attrs.get("axis", -1), value.dim())
    p = attrs.get("p", 2)
    norm = value.abs().sum(axis, keepdim=True) if p == 1 else \
        torch.sqrt((value * value).sum(axis, keepdim=True))
    return torch.where(norm == 0, torch.zeros_like(value), value / norm)


def _mvn(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value = x[0]
    dims = axes_of(attrs.get("axes", [0, 2, 3]), value.dim())
    mean = value.mean(dims, keepdim=True)
    var = (value * value).mean(dims, keepdim=True) - mean * mean
    return (value - mean) / (torch.sqrt(var) + 1e-9)


OPS = {
    "Conv": _conv, "ConvTranspose": _conv_transpose, "MaxPool": _max_pool,
    "AveragePool": _average_pool, "GlobalAveragePool": _global_average_pool,
    "GlobalMaxPool": _global_max_pool, "BatchNormalization": _batch_norm,
    "InstanceNormalization": _instance_norm, "LayerNormalization": _layer_norm,
    "GroupNormalization": _group_norm, "LpNormalization": _lp_norm,
    "MeanVarianceNormalization": _mvn,
}
