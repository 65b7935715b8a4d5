"""Per-op rules of the pruning dependency analysis (``analysis.Analysis`` applies them).

Each rule links the dims of one node that share an index space, declares sub-dims where an axis is
concatenated, split or reshaped, and blocks what it cannot follow. A rule never mutates the graph.
"""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp.passes.prune.dims import BROADCAST, POOL, REDUCE, UNARY, Linker


def _const(t: gs.Tensor) -> np.ndarray | None:
    return np.asarray(t.values) if isinstance(t, gs.Constant) else None


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def unary(a: Linker, node: gs.Node) -> None:
    if node.op == "Dropout" and len(node.outputs) > 1 and node.outputs[1].outputs:
        return a.block_node(node, "dropout mask used")
    a.link_all(node, 0)


def broadcast(a: Linker, node: gs.Node) -> None:
    for slot in range(len(node.inputs)):
        a.link_broadcast(node, slot)


def conv(a: Linker, node: gs.Node) -> None:
    w = _const(node.inputs[1])
    if w is None or a.rank(node.inputs[0]) != w.ndim:
        return a.block_node(node, "weight is not a constant")
    x = a.dim(node, 0, 1)
    y = a.out(node, 1)
    a.link(y, a.dim(node, 1, 0))
    if len(node.inputs) > 2 and node.inputs[2].name:
        a.link(y, a.dim(node, 2, 0))
    group = int(node.attrs.get("group", 1))
    if group == 1:
        a.link(x, a.dim(node, 1, 1))
    elif w.shape[1] == 1 and w.shape[0] == group:  # depthwise: channel c reads input c only
        a.link(x, y)
    else:
        a.block(x, f"{node.name}: grouped conv")
        a.block(y, f"{node.name}: grouped conv")
    a.link(a.dim(node, 0, 0), a.out(node, 0))


def conv_transpose(a: Linker, node: gs.Node) -> None:
    w = _const(node.inputs[1])
    if w is None or int(node.attrs.get("group", 1)) != 1:
        return a.block_node(node, "grouped or non-constant ConvTranspose")
    a.link(a.dim(node, 0, 1), a.dim(node, 1, 0))
    a.link(a.out(node, 1), a.dim(node, 1, 1))
    if len(node.inputs) > 2 and node.inputs[2].name:
        a.link(a.out(node, 1), a.dim(node, 2, 0))
    a.link(a.dim(node, 0, 0), a.out(node, 0))


def batch_norm(a: Linker, node: gs.Node) -> None:
    if len(node.outputs) > 1 or int(node.attrs.get("training_mode", 0)):
        return a.block_node(node, "training-mode BatchNormalization")
    a.link_all(node, 0)
    for slot in range(1, len(node.inputs)):
        a.link(a.out(node, 1), a.dim(node, slot, 0))


def matmul(a: Linker, node: gs.Node) -> None:
    x, w, y = node.inputs[0], node.inputs[1], node.outputs[0]
    rx, rw, ry = a.rank(x), a.rank(w), a.rank(y)
    if None in (rx, rw, ry) or rx < 2 or rw < 2:
        return a.block_node(node, "MatMul of unknown or 1-D operands")
    if isinstance(x, gs.Constant):
        return a.block_node(node, "constant left operand")
    if isinstance(w, gs.Constant) and rw == 2:
        a.link(a.dim(node, 0, rx - 1), a.dim(node, 1, 0))
        a.link(a.out(node, ry - 1), a.dim(node, 1, 1))
        for ax in range(rx - 1):
            a.link(a.dim(node, 0, ax), a.out(node, ax + ry - rx))
        return None
    # Activation × activation (attention): contraction, rows, columns, broadcast batch dims.
    a.link(a.dim(node, 0, rx - 1), a.dim(node, 1, rw - 2))
    a.link(a.out(node, ry - 2), a.dim(node, 0, rx - 2))
    a.link(a.out(node, ry - 1), a.dim(node, 1, rw - 1))
    batch = range(ry - 2)
    a.link_broadcast(node, 0, batch)
    a.link_broadcast(node, 1, batch)
    return None


def gemm(a: Linker, node: gs.Node) -> None:
    w = _const(node.inputs[1])
    if w is None or int(node.attrs.get("transA", 0)) or w.ndim != 2:
        return a.block_node(node, "Gemm with transA or a non-constant weight")
    k_axis, n_axis = (1, 0) if int(node.attrs.get("transB", 0)) else (0, 1)
    a.link(a.dim(node, 0, 1), a.dim(node, 1, k_axis))
    a.link(a.out(node, 1), a.dim(node, 1, n_axis))
    a.link(a.dim(node, 0, 0), a.out(node, 0))
    if len(node.inputs) > 2 and node.inputs[2].name:
        a.link_broadcast(node, 2)
    return None


def transpose(a: Linker, node: gs.Node) -> None:
    r = a.rank(node.inputs[0])
    if r is None:
        return a.block_node(node, "unknown rank")
    perm = node.attrs.get("perm") or list(reversed(range(r)))
    for i, p in enumerate(perm):
        a.link(a.out(node, i), a.dim(node, 0, int(p)))
    return None


def concat(a: Linker, node: gs.Node) -> None:
    y = node.outputs[0]
    r = a.rank(y)
    if r is None:
        return a.block_node(node, "unknown rank")
    axis = _axis(int(node.attrs["axis"]), r)
    offset = 0
    for slot, t in enumerate(node.inputs):
        size = a.size(a.dim(node, slot, axis))
        if not isinstance(size, int) or a.rank(t) != r:
            return a.block_node(node, "input of unknown size")
        a.link(a.sub(a.out(node, axis), ("seg", offset, size)), a.dim(node, slot, axis))
        offset += size
        for ax in range(r):
            if ax != axis:
                a.link(a.dim(node, slot, ax), a.out(node, ax))
    return None


def split_sizes(a: Linker, node: gs.Node, axis: int) -> list[int] | None:
    if "split" in node.attrs:
        return [int(s) for s in node.attrs["split"]]
    if len(node.inputs) > 1 and node.inputs[1].name:
        values = _const(node.inputs[1])
        return None if values is None else [int(s) for s in values.reshape(-1)]
    total = a.size(a.dim(node, 0, axis))
    n = len(node.outputs)
    return [total // n] * n if isinstance(total, int) and total % n == 0 else None


def split(a: Linker, node: gs.Node) -> None:
    r = a.rank(node.inputs[0])
    if r is None or "num_outputs" in node.attrs:
        return a.block_node(node, "unknown rank or num_outputs form")
    axis = _axis(int(node.attrs.get("axis", 0)), r)
    sizes = split_sizes(a, node, axis)
    if sizes is None:
        return a.block_node(node, "split sizes unknown")
    offset = 0
    for slot, size in enumerate(sizes):
        a.link(a.sub(a.dim(node, 0, axis), ("seg", offset, size)), a.out(node, axis, slot))
        offset += size
        for ax in range(r):
            if ax != axis:
                a.link(a.dim(node, 0, ax), a.out(node, ax, slot))
    return None


def softmax(a: Linker, node: gs.Node) -> None:
    r = a.rank(node.inputs[0])
    if r is None:
        return a.block_node(node, "unknown rank")
    axis = _axis(int(node.attrs.get("axis", -1)), r)
    for ax in range(r):
        if ax == axis:
            a.block(a.dim(node, 0, ax), f"{node.name}: {node.op} axis")
            a.block(a.out(node, ax), f"{node.name}: {node.op} axis")
        else:
            a.link(a.dim(node, 0, ax), a.out(node, ax))
    return None


def layer_norm(a: Linker, node: gs.Node) -> None:
    r = a.rank(node.inputs[0])
    if r is None:
        return a.block_node(node, "unknown rank")
    axis = _axis(int(node.attrs.get("axis", -1)), r)
    for ax in range(r):
        if ax >= axis:
            a.block(a.dim(node, 0, ax), f"{node.name}: normalized by LayerNormalization")
            a.block(a.out(node, ax), f"{node.name}: normalized by LayerNormalization")
        else:
            a.link(a.dim(node, 0, ax), a.out(node, ax))
    return None


def reduce(a: Linker, node: gs.Node) -> None:
    r = a.rank(node.inputs[0])
    axes = node.attrs.get("axes")
    if axes is None and len(node.inputs) > 1 and node.inputs[1].name:
        values = _const(node.inputs[1])
        axes = None if values is None else values.reshape(-1).tolist()
    if r is None or not axes:
        return a.block_node(node, "reduces unknown or all axes")
    axes = {_axis(int(x), r) for x in axes}
    keep = int(node.attrs.get("keepdims", 1))
    j = 0
    for ax in range(r):
        if ax in axes:
            a.block(a.dim(node, 0, ax), f"{node.name}: reduced axis")
            j += keep
            continue
        a.link(a.dim(node, 0, ax), a.out(node, j))
        j += 1
    return None


def pool(a: Linker, node: gs.Node) -> None:
    if len(node.outputs) > 1 and node.outputs[1].outputs:
        return a.block_node(node, "pool indices used")
    a.link(a.dim(node, 0, 0), a.out(node, 0))
    a.link(a.dim(node, 0, 1), a.out(node, 1))
    return None


def resize(a: Linker, node: gs.Node) -> None:
    """Channels pass through when the scales/sizes leave batch and channel unchanged."""
    scales = _const(node.inputs[2]) if len(node.inputs) > 2 and node.inputs[2].name else None
    if node.op == "Upsample":
        scales = _const(node.inputs[1])
    has_sizes = len(node.inputs) > 3 and node.inputs[3].name
    if scales is None or has_sizes or scales.size < 2 or scales[0] != 1 or scales[1] != 1:
        return a.block_node(node, "resize scales not constant or not 1 on channels")
    a.link(a.dim(node, 0, 0), a.out(node, 0))
    a.link(a.dim(node, 0, 1), a.out(node, 1))
    return None


def pad(a: Linker, node: gs.Node) -> None:
    pads = node.attrs.get("pads")
    if pads is None and len(node.inputs) > 1:
        values = _const(node.inputs[1])
        pads = None if values is None else values.reshape(-1).tolist()
    r = a.rank(node.inputs[0])
    if pads is None or r is None or (len(node.inputs) > 3 and node.inputs[3].name):
        return a.block_node(node, "pads not constant")
    for ax in range(r):
        if pads[ax] == 0 and pads[ax + r] == 0:
            a.link(a.dim(node, 0, ax), a.out(node, ax))
    return None


def shape(a: Linker, node: gs.Node) -> None:
    """Shape reads sizes: block only the axes its consumers pick (Gather of constants)."""
    x = node.inputs[0]
    r = a.rank(x)
    if r is None:
        return a.block_tensor(x, f"read by {node.name}")
    start = _axis(int(node.attrs.get("start", 0)), r)
    picked: set[int] = set()
    for user in node.outputs[0].outputs:
        index = _const(user.inputs[1]) if user.op == "Gather" and len(user.inputs) > 1 else None
        if index is None:
            picked = set(range(r))
            break
        picked.update(start + _axis(int(i), r - start) for i in index.reshape(-1))
    for ax in picked:
        a.block(a.dim(node, 0, ax), f"size read by {node.name}")
    return None


def align(src: list, dst: list) -> list[tuple] | None:
    """Match the axes of a reshape: ``("link", i, j)``, ``("split", i, [(j, stride, size)])``,
    ``("merge", j, [(i, stride, size)])``; None if the axes cannot be followed."""
    steps, i, j = [], 0, 0
    while i < len(src) or j < len(dst):
        s = src[i] if i < len(src) else None
        d = dst[j] if j < len(dst) else None
        if s is not None and s == d:
            steps.append(("link", i, j))
            i, j = i + 1, j + 1
        elif s == 1:
            i += 1
        elif d == 1:
            j += 1
        elif isinstance(s, int) and isinstance(d, int) and s > d:
            k, prod = j, 1
            while k < len(dst) and isinstance(dst[k], int) and prod < s:
                prod, k = prod * dst[k], k + 1
            if prod != s:
                return None
            parts = [(jj, math.prod(dst[jj + 1:k]), dst[jj]) for jj in range(j, k)]
            steps.append(("split", i, parts))
            i, j = i + 1, k
        elif isinstance(s, int) and isinstance(d, int) and d > s:
            k, prod = i, 1
            while k < len(src) and isinstance(src[k], int) and prod < d:
                prod, k = prod * src[k], k + 1
            if prod != d:
                return None
            parts = [(ii, math.prod(src[ii + 1:k]), src[ii]) for ii in range(i, k)]
            steps.append(("merge", j, parts))
            i, j = k, j + 1
        else:
            return None
    return steps


def reshape(a: Linker, node: gs.Node) -> None:
    x, y = node.inputs[0], node.outputs[0]
    src = a.shape(x)
    target = _const(node.inputs[1]) if node.op == "Reshape" else None
    if node.op == "Reshape" and target is None:
        return a.block_node(node, "shape computed at run time")
    dst = a.shape(y)
    if src is None or dst is None:
        return a.block_node(node, "unknown shapes")
    src = [_static_dim(v) for v in src]
    dst = [_static_dim(v) for v in dst]
    if target is not None:  # fill what shape inference left open from the constant
        target = target.reshape(-1).tolist()
        for jj, v in enumerate(target):
            if dst[jj] is None and v > 0:
                dst[jj] = int(v)
            elif dst[jj] is None and v == 0 and jj < len(src):
                dst[jj] = src[jj]
    steps = align(src, dst)
    if steps is None:
        return a.block_node(node, f"cannot follow reshape {src} -> {dst}")
    for step in steps:
        if step[0] == "link":
            _, i, j = step
            if target is not None and target[j] == 0 and i != j:
                return a.block_node(node, "0 (copy) entry moves an axis")
    for step in steps:
        if step[0] == "link":
            a.link(a.dim(node, 0, step[1]), a.out(node, step[2]))
        elif step[0] == "split":
            for j, stride, size in step[2]:
                a.link(a.sub(a.dim(node, 0, step[1]), ("fac", stride, size)), a.out(node, j))
        else:
            for i, stride, size in step[2]:
                a.link(a.sub(a.out(node, step[1]), ("fac", stride, size)), a.dim(node, 0, i))
    if target is not None:
        for step in steps:  # a 0 entry copying a split or merged axis cannot stay right
            for jj in ([p[0] for p in step[2]] if step[0] == "split" else
                       [step[1]] if step[0] == "merge" else []):
                if target[jj] == 0:
                    a.block(a.out(node, jj), f"{node.name}: 0 entry on a reshaped axis")
    return None


def _static_dim(v):
    if isinstance(v, (int, np.integer)):
        return int(v) if v >= 0 else None
    return v if isinstance(v, str) and v else None


RULES = {op: unary for op in UNARY}
RULES.update({op: broadcast for op in BROADCAST})
RULES.update({op: pool for op in POOL})
RULES.update({op: reduce for op in REDUCE})
RULES.update({
    "Conv": conv, "ConvTranspose": conv_transpose, "BatchNormalization": batch_norm,
    "InstanceNormalization": batch_norm, "MatMul": matmul, "Gemm": gemm,
    "Transpose": transpose, "Concat": concat, "Split": split, "Softmax": softmax,
    "LogSoftmax": softmax, "LayerNormalization": layer_norm, "Resize": resize,
    "Upsample": resize, "Pad": pad, "Shape": shape, "Reshape": reshape, "Flatten": reshape,
    "Squeeze": reshape, "Unsqueeze": reshape,
})

__all__ = ["RULES", "align"]
