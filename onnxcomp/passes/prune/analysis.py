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

import onnx_graphsurgeon as gs

from onnxcomp import shape_inference
from onnxcomp.graph import import_proto, lift_constant_nodes, nested_nodes, node_subgraphs
from onnxcomp.model import Model
from onnxcomp.passes.prune.dims import WEIGHT_OPS, Dim, Group, Linker
from onnxcomp.passes.prune.rules import RULES

logger = logging.getLogger(__name__)


class Analysis(Linker):
    """The graph walk: every node's rule applied; ``groups()`` gives the coupled groups."""

    def __init__(self, graph: gs.Graph, boundary: str = "graph input/output"):
        super().__init__(graph)
        self._build(boundary)

    # --- graph walk -----------------------------------------------------------------------
    def _build(self, boundary: str) -> None:
        for t in list(self.graph.inputs) + list(self.graph.outputs):
            self.block_tensor(t, boundary)
        for node in self.graph.nodes:
            if not node.outputs:
                continue
            if any(True for _ in node_subgraphs(node)):
                # Channels crossing into an If/Loop/Scan body are kept (the body is pruned
                # on its own, its boundary fixed: ``bodies``).
                self.block_node(node, "has a subgraph")
                for sub_node in _body_nodes(node):
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


def _body_nodes(node: gs.Node):
    """Every node in ``node``'s bodies, at any depth."""
    for body in node_subgraphs(node):
        yield from body.nodes
        for inner, _owner in nested_nodes(body):
            yield inner


def analyze(graph: gs.Graph) -> list[Group]:
    """Coupled channel groups of a graph whose weights are initializers (lift Constant nodes
    first) and whose tensors carry inferred shapes."""
    return Analysis(graph).groups()


def prepare(model: Model) -> gs.Graph:
    """The graph the analysis and the cut share: shapes inferred, Constant-node weights lifted,
    every node named (deterministically, so plan and apply see the same names). ``model`` is
    only read."""
    try:
        proto = shape_inference.with_shapes(model.proto, data_prop=True)
    except Exception as exc:  # noqa: BLE001  best effort: unknown shapes only block groups
        logger.debug("prune: shape inference failed: %s", exc)
        proto = model.proto
    graph = import_proto(proto, model.source)
    lift_constant_nodes(graph)
    seen: set[str] = set()
    for i, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            node.name = f"{node.op}_{i}_pruned"
        seen.add(node.name)
    return graph


def analyze_model(model: Model) -> list[Group]:
    """``analyze`` on a model (prepared first)."""
    return analyze(prepare(model))
