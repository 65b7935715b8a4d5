"""Dependency analysis for structured pruning: which channels must be removed together.

Every axis of every tensor is a *dim*; so is every axis of every constant *as used by one node
input* (a shared initializer is one dim per use, so cutting it for one layer never cuts it for
another: the apply step writes a copy). Rules per op link dims that share one index space (Conv
output channels ↔ weight axis 0 ↔ bias; elementwise ops ↔ their output, broadcast-aware;
Transpose by its permutation; MatMul contraction/batch dims; BatchNormalization parameters; …)
and block dims whose index space cannot change (graph inputs and outputs, LayerNormalization's
normalized axes, Softmax/Reduce axes, any op the analysis does not know). A union-find over the
links gives the coupled groups (Torch-Pruning's idea, on the ONNX graph).

Ops that reshape an axis create *sub-dims*: Concat/Split cut an axis into segments
(``seg(offset, size)``), Reshape splits or merges axes into factors (``fac(stride, size)``: a
``[B,S,H*d] → [B,S,H,d]`` Reshape makes the heads the outer factor of the projection's output axis,
so cutting head ``h`` cuts positions ``h*d:(h+1)*d``). Sub-dims spread to every dim linked to the
split axis, so the q/k/v projection columns and the out-projection rows follow the heads. Only the
outermost factor is cut (whole heads), never the head size.

A group is prunable when none of its dims is blocked, all known sizes agree, and it holds a weight
of a Conv/ConvTranspose/MatMul/Gemm. Otherwise it is left alone and the reason is kept.
"""

from __future__ import annotations

import itertools
import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import onnx_graphsurgeon as gs

logger = logging.getLogger(__name__)

UNARY = {"Relu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Clip", "LeakyRelu", "Erf", "Gelu",
         "Identity", "Neg", "Abs", "Exp", "Sqrt", "Reciprocal", "Softplus", "Elu", "Selu", "Cast",
         "Mish", "Swish", "Floor", "Ceil", "Round", "Sign", "Celu", "ThresholdedRelu", "Softsign",
         "Dropout"}
BROADCAST = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "PRelu"}
POOL = {"GlobalAveragePool", "GlobalMaxPool", "MaxPool", "AveragePool", "LpPool",
        "GlobalLpPool"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL1",
          "ReduceL2", "ReduceSumSquare", "ReduceLogSumExp", "ReduceLogSum"}
WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "MatMul": 1, "Gemm": 1}


class Dim(NamedTuple):
    """One axis: of a tensor (``kind="t"``, ``ref`` = tensor name) or of a constant used by a node
    input (``kind="p"``, ``ref`` = node name, ``index`` = input slot); ``sub`` names a part of it:
    ``("seg", offset, size)`` or ``("fac", stride, size)``."""

    kind: str
    ref: str
    index: int
    axis: int
    sub: tuple | None = None

    def whole(self) -> Dim:
        return self._replace(sub=None)

    def with_sub(self, sub: tuple) -> Dim:
        return self._replace(sub=sub)


@dataclass
class Group:
    id: int
    dims: list[Dim]
    size: int | None = None
    kind: str = "other"
    reason: str | None = None  # why it cannot be pruned; None = prunable
    nodes: list[str] = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return self.reason is None

    def params(self) -> list[Dim]:
        return [d for d in self.dims if d.kind == "p"]


def positions(dim: Dim, removed, total: int) -> list[int]:
    """Positions along ``dim``'s axis (of length ``total``) that group indices ``removed`` cover."""
    removed = list(removed)
    if dim.sub is None:
        return removed
    kind, a, b = dim.sub
    if kind == "seg":
        return [a + r for r in removed]
    stride, size = a, b
    outer = total // (stride * size)
    return [o * size * stride + r * stride + k
            for o in range(outer) for r in removed for k in range(stride)]


def _static(v):
    if isinstance(v, (int, np.integer)) and v > 0:
        return int(v)
    if isinstance(v, str) and v:
        return v
    return None


class Analysis:
    """Dims, links and blocks of one graph; ``groups()`` gives the coupled groups."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.nodes = {n.name: n for n in graph.nodes}
        self.tensors = graph.tensors()
        self.parent: dict[Dim, Dim] = {}
        self.blocked_tensors: dict[str, str] = {}
        self.blocked: dict[Dim, str] = {}
        self.subs: dict[Dim, set] = defaultdict(set)
        self._build()

    # --- union-find -----------------------------------------------------------------------
    def find(self, d: Dim) -> Dim:
        self.parent.setdefault(d, d)
        while self.parent[d] != d:
            self.parent[d] = self.parent[self.parent[d]]
            d = self.parent[d]
        return d

    def link(self, a: Dim, b: Dim) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            self.parent[ra] = rb

    def block(self, d: Dim, reason: str) -> None:
        self.find(d)
        self.blocked.setdefault(d, reason)

    def block_tensor(self, tensor: gs.Tensor, reason: str) -> None:
        if not isinstance(tensor, gs.Constant) and tensor.name:
            self.blocked_tensors.setdefault(tensor.name, reason)

    def block_node(self, node: gs.Node, reason: str) -> None:
        logger.debug("prune: %s (%s): %s", node.name, node.op, reason)
        for t in list(node.inputs) + list(node.outputs):
            self.block_tensor(t, f"{node.op} {node.name}: {reason}")

    # --- dims and sizes -------------------------------------------------------------------
    def shape(self, t: gs.Tensor) -> list | None:
        if isinstance(t, gs.Constant):
            return list(np.asarray(t.values).shape)
        return list(t.shape) if t.shape is not None else None

    def rank(self, t: gs.Tensor) -> int | None:
        s = self.shape(t)
        return None if s is None else len(s)

    def dim(self, node: gs.Node, slot: int, axis: int, output: bool = False) -> Dim:
        t = node.outputs[slot] if output else node.inputs[slot]
        if not output and isinstance(t, gs.Constant):
            return Dim("p", node.name, slot, axis)
        return Dim("t", t.name, -1, axis)

    def out(self, node: gs.Node, axis: int, slot: int = 0) -> Dim:
        return self.dim(node, slot, axis, output=True)

    def size(self, d: Dim):
        if d.sub is not None:
            return d.sub[2]
        if d.kind == "p":
            t = self.nodes[d.ref].inputs[d.index]
        else:
            t = self.tensors.get(d.ref)
        s = self.shape(t) if t is not None else None
        return _static(s[d.axis]) if s is not None and d.axis < len(s) else None

    def sub(self, whole: Dim, spec: tuple) -> Dim:
        self.subs[whole].add(spec)
        return whole.with_sub(spec)

    def link_all(self, node: gs.Node, slot: int = 0) -> None:
        r = self.rank(node.inputs[slot])
        if r is None or r != self.rank(node.outputs[0]):
            return self.block_node(node, "unknown rank")
        for a in range(r):
            self.link(self.dim(node, slot, a), self.out(node, a))

    def link_broadcast(self, node: gs.Node, slot: int, out_axes: range | None = None) -> None:
        """Link input ``slot`` to the output with numpy broadcasting (trailing axes aligned)."""
        t, y = node.inputs[slot], node.outputs[0]
        ri, r = self.rank(t), self.rank(y)
        if ri is None or r is None or ri > r:
            return self.block_node(node, "unknown rank")
        for a in range(ri):
            oa = a + r - ri
            if out_axes is not None and oa not in out_axes:
                continue
            d, o = self.dim(node, slot, a), self.out(node, oa)
            si, so = self.size(d), self.size(o)
            if si == 1 and so != 1:
                continue
            if si is None or so is None or si != so:
                if isinstance(t, gs.Constant) and si is not None and so is None:
                    pass
                else:
                    self.block(d, f"{node.name}: unknown broadcast")
                    self.block(o, f"{node.name}: unknown broadcast")
                    continue
            self.link(d, o)

    # --- graph walk -----------------------------------------------------------------------
    def _build(self) -> None:
        for t in list(self.graph.inputs) + list(self.graph.outputs):
            self.block_tensor(t, "graph input/output")
        for node in self.graph.nodes:
            if not node.outputs:
                continue
            if any(isinstance(v, gs.Graph) for v in node.attrs.values()):
                self.block_node(node, "has a subgraph")
                for sub_node in _subgraph_nodes(node):
                    for t in list(sub_node.inputs) + list(sub_node.outputs):
                        self.block_tensor(t, f"used in a subgraph of {node.name}")
                continue
            rule = RULES.get(node.op)
            if rule is None:
                self.block_node(node, "op not understood by the pruning analysis")
                continue
            rule(self, node)

    def groups(self) -> list[Group]:
        self._spread_subs()
        bad_sub = self._check_subs()
        comps: dict[Dim, list[Dim]] = defaultdict(list)
        for d in list(self.parent):
            comps[self.find(d)].append(d)
        order = {n.name: i for i, n in enumerate(self.graph.nodes)}
        groups = []
        for dims in comps.values():
            params = [d for d in dims if d.kind == "p"]
            weights = [d for d in params if self.nodes[d.ref].op in WEIGHT_OPS
                       and d.index == WEIGHT_OPS[self.nodes[d.ref].op]]
            if not weights:
                continue
            dims.sort(key=lambda d: (order.get(d.ref, order.get(self._producer(d), 0)), d))
            group = Group(0, dims)
            group.nodes = sorted({d.ref for d in params}, key=lambda n: order.get(n, 0))
            group.kind = self._kind(dims, params)
            group.reason = self._why_not(dims, bad_sub, group)
            if group.reason and "inner factor" in group.reason:
                group.kind = "head_size"
            if group.size is None:
                known = [s for s in map(self.size, dims) if isinstance(s, int) and s > 1]
                group.size = max(set(known), key=known.count) if known else None
            if group.reason and group.reason.startswith("composite"):
                continue  # pruned through its parts
            groups.append(group)
        groups.sort(key=lambda g: order.get(g.nodes[0], 0))
        for i, g in enumerate(groups):
            g.id = i
            if g.reason:
                logger.debug("prune: group %d (%s, %s) kept: %s", i, g.kind, g.nodes, g.reason)
        return groups

    def _producer(self, d: Dim) -> str:
        t = self.tensors.get(d.ref)
        return t.inputs[0].name if t is not None and t.inputs else ""

    def _kind(self, dims: list[Dim], params: list[Dim]) -> str:
        if any(d.sub is not None and d.sub[0] == "fac" for d in dims):
            return "heads"
        ops = {self.nodes[d.ref].op for d in params}
        if ops & {"Conv", "ConvTranspose"}:
            return "conv"
        return "ffn" if ops & {"MatMul", "Gemm"} else "other"

    def _why_not(self, dims: list[Dim], bad_sub: dict[Dim, str], group: Group) -> str | None:
        for d in dims:
            if d.sub is None and self.subs.get(d):
                return "composite axis"
        sizes = set()
        for d in dims:
            if d.kind == "t" and d.ref in self.blocked_tensors:
                return f"{d.ref} axis {d.axis}: {self.blocked_tensors[d.ref]}"
            for key in (d, d.whole()):
                if key in self.blocked:
                    return f"{d.ref} axis {d.axis}: {self.blocked[key]}"
            if d.sub is not None and d in bad_sub:
                return bad_sub[d]
            s = self.size(d)
            if d.kind == "p" and not isinstance(s, int):
                return f"{d.ref} input {d.index}: unknown size"
            if s is not None:
                sizes.add(s)
        if len(sizes) != 1 or not isinstance(next(iter(sizes)), int):
            return f"inconsistent sizes {sorted(map(str, sizes))}"
        group.size = next(iter(sizes))
        return None

    def _spread_subs(self) -> None:
        """Give every dim linked to a split axis the same parts, linked part by part."""
        changed = True
        while changed:
            changed = False
            members: dict[Dim, list[Dim]] = defaultdict(list)
            for d in list(self.parent):
                if d.sub is None:
                    members[self.find(d)].append(d)
            for whole, specs in list(self.subs.items()):
                for other in members[self.find(whole)]:
                    for spec in list(specs):
                        part = other.with_sub(spec)
                        if spec not in self.subs[other]:
                            self.subs[other].add(spec)
                            changed = True
                        self.link(whole.with_sub(spec), part)

    def _check_subs(self) -> dict[Dim, str]:
        bad: dict[Dim, str] = {}
        for whole, specs in self.subs.items():
            kinds = {s[0] for s in specs}
            total = self.size(whole)
            reason = None
            if len(kinds) > 1:
                reason = "axis both concatenated and reshaped"
            elif "seg" in kinds:
                spans = sorted((s[1], s[1] + s[2]) for s in specs)
                if any(b[0] < a[1] for a, b in itertools.pairwise(spans)):
                    reason = "overlapping concat/split segments"
            for spec in specs:
                part_reason = reason
                if spec[0] == "fac" and (not isinstance(total, int) or spec[1] * spec[2] != total):
                    part_reason = part_reason or "inner factor of a reshaped axis (head size)"
                if part_reason:
                    bad[whole.with_sub(spec)] = part_reason
        return bad


def _subgraph_nodes(node: gs.Node):
    for value in node.attrs.values():
        graphs = value if isinstance(value, (list, tuple)) else [value]
        for g in graphs:
            if isinstance(g, gs.Graph):
                for n in g.nodes:
                    yield n
                    yield from _subgraph_nodes(n)


def analyze(graph: gs.Graph) -> list[Group]:
    """Coupled channel groups of a graph whose weights are initializers (lift Constant nodes
    first) and whose tensors carry inferred shapes."""
    return Analysis(graph).groups()


from onnxcomp.passes.prune.rules import RULES
