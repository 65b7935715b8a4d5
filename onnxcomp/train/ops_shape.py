"""Shape, indexing and data-movement ops of the twin.

Values that ONNX passes as tensors but that fix a shape (Reshape's shape, Slice's starts, Pad's
pads, Split's sizes, ...) are read as Python ints at each call: the twin runs eagerly, so a
dynamic shape is just another value. Opset changes handled: Slice (attributes before 10),
Squeeze/Unsqueeze/Split axes and sizes (attributes before 13), Split's ``num_outputs`` (18),
Pad (attributes before 11, ``axes`` from 18), Shape's ``start``/``end`` (15). Negative indices
(Gather, GatherElements, Scatter) count from the end as ONNX says.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from onnxcomp.train.ops_common import (
    Ctx,
    attr_or_input,
    axes_of,
    axis_of,
    ints,
    scalar,
    to_tensor,
    torch_dtype,
)


def _identity(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return x[0]


def _constant(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    if "value" in attrs:
        return to_tensor(attrs["value"])
    for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                       ("value_int", np.int64), ("value_ints", np.int64)):
        if key in attrs:
            return to_tensor(np.asarray(attrs[key], dtype=dtype))
    raise ctx.unsupported(f"attribute {next(iter(attrs), '?')}")


def _shape(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    shape = list(x[0].shape)
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return torch.tensor(shape[start:end] if end != 0 else shape[start:0], dtype=torch.int64)


def _size(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.tensor(x[0].numel(), dtype=torch.int64)


def _reshape(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value = x[0]
    shape = attr_or_input(attrs, "shape", x, 1)
    if not attrs.get("allowzero", 0):
        # 0 copies the input's dimension at that position.
        shape = [value.shape[i] if n == 0 else n for i, n in enumerate(shape)]
    return value.reshape(shape)


def _flatten(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value = x[0]
    axis = axis_of(attrs.get("axis", 1), value.dim())
    return value.reshape(math.prod(value.shape[:axis]), math.prod(value.shape[axis:]))


def _transpose(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    perm = attrs.get("perm", list(range(x[0].dim() - 1, -1, -1)))
    return x[0].permute(*perm)


def _squeeze(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value = x[0]
    axes = attr_or_input(attrs, "axes", x, 1)
    if axes is None:
        return value.reshape([n for n in value.shape if n != 1])
    axes = set(axes_of(axes, value.dim()))
    return value.reshape([n for i, n in enumerate(value.shape) if i not in axes])


def _unsqueeze(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value = x[0]
    axes = attr_or_input(attrs, "axes", x, 1)
    rank = value.dim() + len(axes)
    shape = list(value.shape)
    for axis in sorted(axes_of(axes, rank)):
        shape.insert(axis, 1)
    return value.reshape(shape)


def _concat(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    parts = [t for t in x if t is not None]
    axis = axis_of(attrs["axis"], parts[0].dim())
    return torch.cat(parts, axis)


def _split(ctx: Ctx, x: list, attrs: dict) -> tuple:
    value = x[0]
    axis = axis_of(attrs.get("axis", 0), value.dim())
    sizes = attr_or_input(attrs, "split", x, 1)
    if sizes is None:
        count = attrs.get("num_outputs", ctx.n_outputs)
        # Uneven (opset 18): every chunk ceil(n / count) long but the last.
        chunk = -(-value.shape[axis] // count)
        sizes = [min(chunk, value.shape[axis] - i * chunk) for i in range(count)]
    return tuple(torch.split(value, sizes, axis))


def _slice(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value = x[0]
    if ctx.opset < 10:
        starts, ends = attrs["starts"], attrs["ends"]
        axes, steps = attrs.get("axes"), None
    else:
        starts, ends = ints(x[1]), ints(x[2])
        axes = ints(x[3]) if len(x) > 3 else None
        steps = ints(x[4]) if len(x) > 4 else None
    axes = axes_of(axes if axes is not None else range(len(starts)), value.dim())
    steps = steps or [1] * len(starts)
    for axis, start, end, step in zip(axes, starts, ends, steps):
        # ONNX clamps like Python slicing does (INT64_MAX/MIN included).
        first, stop, step = slice(start, end, step).indices(value.shape[axis])
        if step > 0:
            index = [slice(None)] * axis + [slice(first, stop, step)]
            value = value[tuple(index)]
        else:
            positions = torch.arange(first, stop, step, dtype=torch.int64)
            value = value.index_select(axis, positions)
    return value


def _positive(index: torch.Tensor, size: int) -> torch.Tensor:
    return torch.where(index < 0, index + size, index)


def _gather(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value, index = x
    axis = axis_of(attrs.get("axis", 0), value.dim())
    index = _positive(index.to(torch.int64), value.shape[axis])
    picked = value.index_select(axis, index.reshape(-1))
    shape = list(value.shape[:axis]) + list(index.shape) + list(value.shape[axis + 1:])
    return picked.reshape(shape)


def _gather_elements(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value, index = x
    axis = axis_of(attrs.get("axis", 0), value.dim())
    return torch.gather(value, axis, _positive(index.to(torch.int64), value.shape[axis]))


def _gather_nd(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value, index = x[0], x[1].to(torch.int64)
    batch = attrs.get("batch_dims", 0)
    depth = index.shape[-1]
    batch_shape = list(value.shape[:batch])
    nb = math.prod(batch_shape)
    flat_value = value.reshape([nb] + list(value.shape[batch:]))
    flat_index = index.reshape(nb, -1, depth)
    dims = torch.tensor(value.shape[batch:batch + depth], dtype=torch.int64)
    flat_index = torch.where(flat_index < 0, flat_index + dims, flat_index)
    rows = []
    for b in range(nb):
        rows.append(flat_value[b][tuple(flat_index[b].unbind(-1))])
    out = torch.stack(rows)
    return out.reshape(list(index.shape[:-1]) + list(value.shape[batch + depth:]))


_SCATTER_REDUCE = {"add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter_elements(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value, index, updates = x
    axis = axis_of(attrs.get("axis", 0), value.dim())
    index = _positive(index.to(torch.int64), value.shape[axis])
    reduction = attrs.get("reduction", "none")
    if reduction == "none":
        return value.scatter(axis, index, updates)
    return value.scatter_reduce(axis, index, updates, _SCATTER_REDUCE[reduction])


def _scatter_nd(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value, index, updates = x[0].clone(), x[1].to(torch.int64), x[2]
    reduction = attrs.get("reduction", "none")
    depth = index.shape[-1]
    flat_index = index.reshape(-1, depth)
    flat_updates = updates.reshape([flat_index.shape[0]] + list(value.shape[depth:]))
    for i in range(flat_index.shape[0]):
        where = tuple(flat_index[i].tolist())
        current = value[where]
        update = flat_updates[i]
        if reduction == "add":
            update = current + update
        elif reduction == "mul":
            update = current * update
        elif reduction == "max":
            update = torch.maximum(current, update)
        elif reduction == "min":
            update = torch.minimum(current, update)
        value[where] = update
    return value


def _expand(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    shape = torch.broadcast_shapes(tuple(x[0].shape), tuple(ints(x[1])))
    return x[0].expand(shape)


def _tile(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return x[0].repeat(ints(x[1]))


def _pad_indices(size: int, before: int, after: int, mode: str) -> torch.Tensor:
    positions = torch.arange(-before, size + after)
    if mode == "edge":
        return positions.clamp(0, size - 1)
    if mode == "wrap":
        return positions % size
    # reflect: mirror without repeating the edge value.
    period = 2 * (size - 1) if size > 1 else 1
    folded = positions.abs() % period
    return torch.where(folded >= size, period - folded, folded)


def _pad(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    value = x[0]
    mode = attrs.get("mode", "constant")
    rank = value.dim()
    pads = attr_or_input(attrs, "pads", x, 1)
    fill = attrs.get("value", 0.0)
    if len(x) > 2 and x[2] is not None and x[2].numel():
        fill = scalar(x[2])
    axes = axes_of(ints(x[3]) if len(x) > 3 and x[3] is not None else range(rank), rank)
    count = len(axes)
    begin = dict(zip(axes, pads[:count]))
    end = dict(zip(axes, pads[count:]))
    if mode == "constant":
        flat = []
        for axis in reversed(range(rank)):
            flat += [begin.get(axis, 0), end.get(axis, 0)]
        return F.pad(value, flat, value=fill)
    for axis in axes:
        before, after = begin[axis], end[axis]
        if before < 0 or after < 0:  # negative pads crop first
            value = value.narrow(axis, max(-before, 0),
                                 value.shape[axis] - max(-before, 0) - max(-after, 0))
            before, after = max(before, 0), max(after, 0)
        index = _pad_indices(value.shape[axis], before, after, mode)
        value = value.index_select(axis, index)
    return value


def _constant_of_shape(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    fill = to_tensor(attrs["value"]) if "value" in attrs else torch.zeros(1)
    return fill.reshape(-1)[0].expand(ints(x[0])).clone()


def _range(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    start, limit, delta = (scalar(t) for t in x)
    count = max(math.ceil((limit - start) / delta), 0)
    # start + i * delta, as ONNX defines it (not a running sum).
    steps = torch.arange(count, dtype=torch.float64 if x[0].is_floating_point() else torch.int64)
    return (start + steps * delta).to(x[0].dtype)


def _dropout(ctx: Ctx, x: list, attrs: dict) -> tuple:
    ratio = scalar(x[1]) if len(x) > 1 and x[1] is not None else attrs.get("ratio", 0.5)
    if len(x) > 2 and x[2] is not None and bool(scalar(x[2])) and ratio != 0:
        raise ctx.unsupported("training_mode=True with a ratio above 0 (random masks)")
    return x[0], torch.ones_like(x[0], dtype=torch.bool)


def _cast(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return x[0].to(torch_dtype(ctx, attrs["to"]))


def _cast_like(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return x[0].to(x[1].dtype)


def _nonzero(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    return torch.nonzero(x[0]).transpose(0, 1).contiguous()


def _trilu(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    k = ints(x[1])[0] if len(x) > 1 and x[1] is not None else 0
    return torch.triu(x[0], k) if attrs.get("upper", 1) else torch.tril(x[0], k)


def _one_hot(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    indices, depth, values = x[0], int(scalar(x[1])), x[2]
    index = indices.to(torch.int64)
    index = torch.where(index < 0, index + depth, index)
    hot = (index.unsqueeze(-1) == torch.arange(depth))
    axis = axis_of(attrs.get("axis", -1), indices.dim() + 1)
    hot = torch.movedim(hot, -1, axis)
    return torch.where(hot, values[1], values[0])


def _eye_like(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    dtype = torch_dtype(ctx, attrs["dtype"]) if "dtype" in attrs else x[0].dtype
    rows, cols = x[0].shape
    diagonal = torch.arange(cols).unsqueeze(0) - torch.arange(rows).unsqueeze(1)
    return (diagonal == attrs.get("k", 0)).to(dtype)


def _depth_to_space(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    n, c, h, w = x[0].shape
    b = attrs["blocksize"]
    if attrs.get("mode", "DCR") == "DCR":
        out = x[0].reshape(n, b, b, c // (b * b), h, w).permute(0, 3, 4, 1, 5, 2)
    else:
        out = x[0].reshape(n, c // (b * b), b, b, h, w).permute(0, 1, 4, 2, 5, 3)
    return out.reshape(n, c // (b * b), h * b, w * b)


def _space_to_depth(ctx: Ctx, x: list, attrs: dict) -> torch.Tensor:
    n, c, h, w = x[0].shape
    b = attrs["blocksize"]
    out = x[0].reshape(n, c, h // b, b, w // b, b)
    if attrs.get("mode", "DCR") == "DCR":
        out = out.permute(0, 3, 5, 1, 2, 4)
    else:  # CRD (opset 25)
        out = out.permute(0, 1, 3, 5, 2, 4)
    return out.reshape(n, c * b * b, h // b, w // b)


OPS = {
    "Identity": _identity, "Constant": _constant, "Shape": _shape, "Size": _size,
    "Reshape": _reshape, "Flatten": _flatten, "Transpose": _transpose, "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze, "Concat": _concat, "Split": _split, "Slice": _slice,
    "Gather": _gather, "GatherElements": _gather_elements, "GatherND": _gather_nd,
    "ScatterElements": _scatter_elements, "ScatterND": _scatter_nd, "Expand": _expand,
    "Tile": _tile, "Pad": _pad, "ConstantOfShape": _constant_of_shape, "Range": _range,
    "Dropout": _dropout, "Cast": _cast, "CastLike": _cast_like, "NonZero": _nonzero,
    "Trilu": _trilu, "OneHot": _one_hot, "EyeLike": _eye_like,
    "DepthToSpace": _depth_to_space, "SpaceToDepth": _space_to_depth,
}
