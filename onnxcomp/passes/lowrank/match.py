"""Which layers lowrank may factor, and why not the others (pure: the graph is only read).

Sites: ``MatMul(x, W)`` with W 2-D and ``Gemm(x, W, C)`` with transA=0 (``graph.linear_weight``:
transB and alpha folded into W); Conv with an all-ones kernel and group=1. Skipped with a reason:
non-constant, non-2-D or non-float weights, spatial kernels, grouped convs, transA, excluded
names, weights also read by other kinds of node or in different ways, weights below
``min_params``, weights where even rank 1 saves less than ``min_saving``, and pairs that are a
low-rank factorization already (``(x @ A) @ B`` through a narrow inner width: an earlier run's
factors, so a second run finds nothing to do). Nodes inside If/Loop/Scan bodies are matched
like any other (``Site.owner`` names the top-level node holding them); a weight read in both
branches of an If is one group, factored once.
"""

from __future__ import annotations

import fnmatch
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp.graph import constant_array, graph_nodes, linear_weight, nested_nodes
from onnxcomp.passes.lowrank.config import Config

logger = logging.getLogger(__name__)


@dataclass
class LayerPlan:
    """One candidate site: what will happen to it and why (``reason`` is set when skipped)."""

    node: str
    op: str
    output: str  # the node's first output tensor: its key in the graph and the teacher's tensor
    weight: str = ""
    K: int = 0
    N: int = 0
    rank: int = 0  # 0: not factored
    max_rank: int = 0  # the largest rank that still saves min_saving
    kept_energy: float | None = None
    rel_output_error: float | None = None  # on the calibration data, exact for its covariance
    rel_weight_error: float | None = None  # ‖W − AB‖_F / ‖W‖_F
    activation_aware: bool = False
    calibration_rows: int = 0
    shared_with: tuple[str, ...] = ()
    reason: str | None = None
    owner: str | None = None  # the top-level If/Loop/Scan whose body holds the node
    weights_only: str | None = None  # a body layer: why no covariance whitens it
    # The rank the rule gave, when max_layer_error raised it (0: not raised), and that error.
    raised_from: int = 0
    rule_error: float | None = None
    factors: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False, compare=False)

    @property
    def factored(self) -> bool:
        return self.reason is None and self.rank > 0

    @property
    def params_before(self) -> int:
        return self.K * self.N

    @property
    def params_after(self) -> int:
        return self.rank * (self.K + self.N) if self.factored else self.K * self.N

    def summary(self) -> dict[str, Any]:
        keys = ("node", "op", "output", "weight", "K", "N", "rank", "max_rank", "kept_energy",
                "rel_output_error", "rel_weight_error", "activation_aware", "calibration_rows",
                "owner", "weights_only", "raised_from", "reason")
        data = {key: getattr(self, key) for key in keys}
        data.update(shared_with=list(self.shared_with), params_before=self.params_before,
                    params_after=self.params_after)
        return data


@dataclass
class Site:
    """A matched layer: its node, its plan and its weight as a K x N matrix."""

    node: gs.Node
    plan: LayerPlan
    # K x N, alpha folded in: the weight's own values (a view where possible), float64 only
    # where alpha was folded; ``decompose`` works in float64. ``layer_plans`` lets it go and
    # reads it again at the layer's turn (held for every layer, it was a copy of the model).
    matrix: np.ndarray | None
    kind: tuple  # sites share factors only when the weight was read the same way
    sampling: tuple | None = None  # Conv: per spatial axis (start, step) of the input rows read
    graph: gs.Graph | None = None  # the graph (or If/Loop/Scan body) that holds the node


def label(node: gs.Node) -> str:
    return node.name or f"{node.op}({node.outputs[0].name if node.outputs else '?'})"


def _match_linear(node: gs.Node) -> tuple[np.ndarray, tuple, None] | str:
    found = linear_weight(node)
    if isinstance(found, str):
        return found
    if found.alpha == 1.0:
        # The weight itself (or its transposed view): made float64 one layer at a time, where
        # it is decomposed (146 float64 copies held at once took 1.2 GB on CLIP ViT-B/32).
        matrix = found.matrix
    else:  # alpha folded in float64, as the factors are computed
        raw = constant_array(found.tensor)
        matrix = (raw.T if found.transposed else raw).astype(np.float64) * found.alpha
    kind = ("MatMul",) if node.op == "MatMul" else ("Gemm", int(found.transposed), found.alpha)
    return matrix, kind, None


def _match_conv(node: gs.Node) -> tuple[np.ndarray, tuple, tuple | None] | str:
    weight = constant_array(node.inputs[1]) if len(node.inputs) >= 2 else None
    if weight is None:
        return "the conv weight is not a constant"
    if not np.issubdtype(weight.dtype, np.floating):
        return f"weight dtype {weight.dtype} is not float"
    if weight.ndim < 3 or any(k != 1 for k in weight.shape[2:]):
        return f"kernel {'x'.join(map(str, weight.shape[2:]))} is not 1x1"
    if int(node.attrs.get("group", 1)) != 1:
        return f"grouped conv (group={node.attrs['group']})"
    spatial = weight.ndim - 2
    strides = list(node.attrs.get("strides", [1] * spatial))
    pads = list(node.attrs.get("pads", [0] * 2 * spatial))
    # The input rows a strided conv reads: the covariance is taken over those only.
    exact = node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
    sampling = tuple(((-pads[i]) % strides[i], strides[i]) for i in range(spatial)) if exact \
        else None
    return weight.reshape(weight.shape[0], -1).T, ("Conv",), sampling


def match(node: gs.Node) -> tuple[np.ndarray, tuple, tuple | None] | str:
    """The site's K x N matrix, its kind and its input sampling; or why it is skipped."""
    return _match_conv(node) if node.op == "Conv" else _match_linear(node)


def break_even(k: int, n: int, min_saving: float) -> int:
    """The largest rank r with ``r (K + N) <= (1 - min_saving) K N`` and below K N."""
    rank = math.floor((1 - min_saving) * k * n / (k + n))
    while rank > 0 and rank * (k + n) >= k * n:
        rank -= 1
    return rank


def _skip_factor_pairs(graph: gs.Graph, sites: list[Site], skipped: list[LayerPlan]
                       ) -> list[Site]:
    """Sites that already form ``(x @ A) @ B`` with a narrow inner width r (A bias-free, its
    output read by B alone, ``r (K + N) < K N``) are skipped: the pair is a rank-r factorization already, and
    factoring A or B again would only truncate it further. This is what makes a second run
    find nothing to do (the energy rule on a factor's flatter spectrum can pick a rank below r,
    which the margin test alone does not refuse)."""
    by_node = {id(site.node): site for site in sites}
    outputs = {t.name for t in graph.outputs} | {t.name for site in sites if site.graph
                                                 for t in site.graph.outputs}
    pairs = []
    for first in sites:
        node = first.node
        if node.op == "Gemm" or (len(node.inputs) > 2 and node.inputs[2].name):
            continue  # a first factor is a bias-free MatMul or Conv (what ``factor`` writes)
        hidden = node.outputs[0]
        readers = list(hidden.outputs)
        if len(readers) != 1 or hidden.name in outputs:
            continue
        second = by_node.get(id(readers[0]))
        if second is None or second.node.inputs[0] is not hidden:
            continue
        k, r, n = first.plan.K, first.plan.N, second.plan.N
        if r * (k + n) < k * n:
            pairs.append((first, second, r))
    paired: set[int] = set()
    for first, second, r in pairs:
        for site, other in ((first, second), (second, first)):
            if id(site.node) not in paired:
                site.plan.reason = (f"already a rank-{r} factor pair with {other.plan.node}: "
                                    "not factored again")
                skipped.append(site.plan)
                paired.add(id(site.node))
    return [site for site in sites if id(site.node) not in paired]


def find_sites(graph: gs.Graph, config: Config) -> tuple[list[Site], list[LayerPlan]]:
    """Match every candidate node, then group sites by weight: share factors or skip."""
    sites, skipped = [], []
    owners = {id(inner): owner for inner, owner in nested_nodes(graph)}
    for node, holder in graph_nodes(graph):
        if node.op not in config.op_types or not node.outputs:
            continue
        owner = owners.get(id(node))
        plan = LayerPlan(label(node), node.op, node.outputs[0].name,
                         owner=label(owner) if owner is not None else None)
        pattern = next((p for p in config.exclude if fnmatch.fnmatchcase(node.name, p)), None)
        matched = f"excluded by pattern {pattern!r}" if pattern else match(node)
        if isinstance(matched, str):
            plan.reason = matched
        else:
            plan.weight = node.inputs[1].name
            plan.K, plan.N = matched[0].shape
            plan.max_rank = break_even(plan.K, plan.N, config.min_saving)
            sites.append(Site(node, plan, *matched, graph=holder))
        if plan.reason:
            skipped.append(plan)
    sites = _skip_factor_pairs(graph, sites, skipped)
    by_weight: dict[str, list[Site]] = {}
    for site in sites:
        by_weight.setdefault(site.plan.weight, []).append(site)
    kept = []
    for name, group in by_weight.items():
        readers = group[0].node.inputs[1].outputs
        ours = {id(s.node) for s in group}
        strangers = [label(n) for n in readers if id(n) not in ours]
        kinds = {s.kind for s in group}
        for site in group:
            site.plan.shared_with = tuple(s.plan.node for s in group if s is not site)
            if strangers:
                site.plan.reason = f"weight {name} is also read by {', '.join(strangers[:3])}"
            elif len(kinds) > 1:
                site.plan.reason = f"weight {name} is read in {len(kinds)} different ways"
            elif site.plan.K * site.plan.N < config.min_params:
                site.plan.reason = (f"{site.plan.K}x{site.plan.N} weight is below min_params "
                                    f"{config.min_params}")
            elif site.plan.max_rank < 1:
                site.plan.reason = (f"{site.plan.K}x{site.plan.N} weight: even rank 1 saves less "
                                    f"than {config.min_saving:.0%}")
            if site.plan.reason:
                skipped.append(site.plan)
            else:
                kept.append(site)
    for plan in skipped:
        logger.debug("lowrank: skip %s: %s", plan.node, plan.reason)
    return kept, skipped
