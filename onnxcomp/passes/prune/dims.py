"""The vocabulary of the pruning dependency analysis: dims, groups, and the union-find that links
them (``Linker``), shared by the per-op rules (``rules``) and the graph walk (``analysis``).

A *dim* is one axis of a tensor, or one axis of a constant *as used by one node input* (a shared
initializer is one dim per use, so cutting it for one layer never cuts it for another). A dim may
name a part of its axis (``sub``): ``("seg", offset, size)`` for a Concat/Split segment,
``("fac", stride, size)`` for a factor of a reshaped axis (the heads of ``[B,S,H*d]``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable
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
# The ops whose weight (input slot) makes a group worth cutting.
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
    """Channels that must be removed together; ``reason`` says why the group is kept."""

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

    def label(self) -> str:
        """How plans and records name the group."""
        return f"group {self.id} ({self.kind}: {', '.join(self.nodes[:3])})"


def positions(dim: Dim, removed: Iterable[int], total: int) -> list[int]:
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


class Linker:
    """Dims, links and blocks of one graph: what a rule (``rules.RULES``) reads and writes."""

    def __init__(self, graph: gs.Graph):
        self.graph = graph
        self.nodes = {n.name: n for n in graph.nodes}
        self.tensors = graph.tensors()
        self.parent: dict[Dim, Dim] = {}
        self.blocked_tensors: dict[str, str] = {}
        self.blocked: dict[Dim, str] = {}
        self.subs: dict[Dim, set] = defaultdict(set)

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
        return None

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
            # A constant of known size broadcast to an axis of unknown size still links.
            known_constant = isinstance(t, gs.Constant) and si is not None and so is None
            if (si is None or so is None or si != so) and not known_constant:
                self.block(d, f"{node.name}: unknown broadcast")
                self.block(o, f"{node.name}: unknown broadcast")
                continue
            self.link(d, o)
        return None
