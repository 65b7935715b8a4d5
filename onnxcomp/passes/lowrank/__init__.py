"""lowrank: replace ``x @ W`` (W a constant K x N) by ``(x @ A) @ B`` with A: K x r, B: r x N.

Math. Plain: ``W = U S V^T``, ``A = U_r S_r^½``, ``B = S_r^½ V_r^T``; the kept energy is
``Σ_{i<r} s_i² / Σ s_i²`` and ``‖W − AB‖_F / ‖W‖_F = sqrt(1 − kept)``.

Activation-aware (calibration data present): ``C = E[x xᵀ]`` over the rows of the layer's input
(running float64 sums, one batch alive at a time; every leading dim is a sample). With
``C = L Lᵀ`` (eigh, plus a small ridge so L is invertible) the output error on the data is
``E‖xW − xAB‖² = ‖Lᵀ(W − AB)‖_F²``, so the SVD truncates ``W' = Lᵀ W = U S Vᵀ`` instead:
``A = L^{-T} U_r S_r^½``, ``B = S_r^½ V_r^T``. Energy is then measured on the whitened spectrum
and ``sqrt(1 − kept)`` is the relative output error on the calibration data (reported per layer,
computed exactly from C).

Sites: ``MatMul(x, W)`` with W 2-D; ``Gemm(x, W, C)`` with transA=0 (transB and alpha are folded
into W; C and beta stay on a second Gemm); Conv with an all-ones kernel and group=1 (strides and
pads stay on the first conv, the bias goes on the second). A site is factored only where
``r (K + N) <= (1 − min_saving) K N`` (and strictly below K N), so parameters and FLOPs drop.
Skipped with a reason: non-constant, non-2-D or non-float weights, spatial kernels, grouped
convs, transA, weights also read by other kinds of node, ranks above the break-even rank. A
weight shared by several sites of the same kind is factored once and the factors are shared.
Nodes inside If/Loop/Scan bodies are not touched (listed as skipped).

Idempotent: a factor A (K x r) or B (r x N) has full rank ``min(K, N) = r`` and
``r (K + N) > K N``, so a second run refuses it at the margin test.
"""

from __future__ import annotations

import fnmatch
import heapq
import logging
import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp.calibration import stream_activations
from onnxcomp.errors import OnnxcompError, UserError
from onnxcomp.graph import (
    constant_array,
    export_model,
    import_graph,
    replace_node,
    tidy,
    unique_name,
)
from onnxcomp.model import Model
from onnxcomp.pipeline import Context, PassRecord

NAME = "lowrank"
logger = logging.getLogger(__name__)

DEFAULT_ENERGY = 0.9
SUPPORTED_OPS = ("MatMul", "Gemm", "Conv")
# Cumulative energy is compared with this slack so that energy=1.0 keeps exactly the numerical rank.
ENERGY_SLACK = 1e-9
_FLOATS = (np.float16, np.float32, np.float64)
_RANK_MODES = ("energy", "rank", "rank_ratio", "param_budget")


class RankError(OnnxcompError, ValueError):
    """A fixed rank the weight cannot have: a user error (exit 2) and a ValueError."""


@dataclass(frozen=True)
class Config:
    """Exactly one rank rule: ``energy`` (default 0.9), ``rank``, ``rank_ratio`` or ``param_budget``
    (fraction of the factorable parameters to keep, ranks allocated greedily across layers)."""

    energy: float | None = None
    rank: int | None = None
    rank_ratio: float | None = None
    param_budget: float | None = None
    min_saving: float = 0.1
    min_params: int = 1024  # smaller weights don't pay for the extra node
    activation_aware: bool | None = None  # None: on when calibration data is present
    # Ridge added to C's eigenvalues, relative to their mean: keeps L^{-T} bounded in input
    # directions the calibration data barely excites (and so generalises beyond that data).
    damping: float = 0.01
    op_types: tuple[str, ...] = SUPPORTED_OPS
    exclude: tuple[str, ...] = ()  # fnmatch patterns on node names

    def __post_init__(self) -> None:
        for name in ("op_types", "exclude"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        chosen = [m for m in _RANK_MODES if getattr(self, m) is not None]
        if len(chosen) > 1:
            raise ValueError(f"lowrank: give one of energy, rank, rank_ratio, param_budget; "
                             f"got {', '.join(chosen)}")
        if not chosen:
            object.__setattr__(self, "energy", DEFAULT_ENERGY)
        for name in ("energy", "rank_ratio", "param_budget"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not 0 < value <= 1):
                raise ValueError(f"lowrank: {name} must be in (0, 1], got {value!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool)
                                      or self.rank < 1):
            raise ValueError(f"lowrank: rank must be a positive integer, got {self.rank!r}")
        if not _is_number(self.min_saving) or not 0 <= self.min_saving < 1:
            raise ValueError(f"lowrank: min_saving must be in [0, 1), got {self.min_saving!r}")
        for name in ("min_params", "damping"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ValueError(f"lowrank: {name} must be >= 0, got {value!r}")
        if self.activation_aware not in (None, True, False):
            raise ValueError(f"lowrank: activation_aware must be true/false, "
                             f"got {self.activation_aware!r}")
        bad = [op for op in self.op_types if op not in SUPPORTED_OPS]
        if bad or not self.op_types:
            raise ValueError(f"lowrank: op_types must be among {', '.join(SUPPORTED_OPS)}, "
                             f"got {list(self.op_types)!r}")

    @property
    def mode(self) -> str:
        return next(m for m in _RANK_MODES if getattr(self, m) is not None)

    @classmethod
    def from_short(cls, arg: str | None) -> Config:
        """``lowrank`` / ``lowrank:0.9`` (energy) / ``lowrank:rank=32`` / ``lowrank:rank_ratio=0.25``
        / ``lowrank:param_budget=0.5``."""
        if arg is None or not arg.strip():
            return cls()
        key, sep, value = arg.strip().partition("=")
        if not sep:
            key, value = "energy", key
        key = {"ratio": "rank_ratio", "budget": "param_budget"}.get(key.strip(), key.strip())
        if key not in _RANK_MODES:
            raise ValueError(f"lowrank: unknown option {key!r} in {arg!r}; use energy, rank, "
                             "rank_ratio or param_budget")
        try:
            number = int(value) if key == "rank" else float(value)
        except ValueError:
            raise ValueError(f"lowrank: {key} needs a number, got {value.strip()!r}") from None
        return cls(**{key: number})


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
                "reason")
        data = {key: getattr(self, key) for key in keys}
        data.update(shared_with=list(self.shared_with), params_before=self.params_before,
                    params_after=self.params_after)
        return data


@dataclass
class _Site:
    node: gs.Node
    plan: LayerPlan
    matrix: np.ndarray  # K x N, float64, alpha folded in
    kind: tuple  # sites share factors only when the weight was read the same way
    sampling: tuple | None = None  # Conv: per spatial axis (start, step) of the input rows read


def _label(node: gs.Node) -> str:
    return node.name or f"{node.op}({node.outputs[0].name if node.outputs else '?'})"


def _match(node: gs.Node) -> tuple[np.ndarray, tuple, tuple | None] | str:
    """The site's K x N matrix, its kind and its input sampling; or why it is skipped."""
    if node.op in ("MatMul", "Gemm") and len(node.inputs) >= 2:
        weight = constant_array(node.inputs[1])
        if weight is None:
            if constant_array(node.inputs[0]) is not None:
                return "the constant is the left operand"
            return "the weight is not a constant (activation x activation)"
        if constant_array(node.inputs[0]) is not None:
            return "both operands are constants"
    elif node.op == "Conv" and len(node.inputs) >= 2:
        weight = constant_array(node.inputs[1])
        if weight is None:
            return "the conv weight is not a constant"
    else:
        return "unexpected inputs"
    if weight.dtype.type not in _FLOATS:
        return f"weight dtype {weight.dtype} is not float"
    if node.op == "MatMul":
        if weight.ndim != 2:
            return f"weight has {weight.ndim} dims, not 2"
        return weight.astype(np.float64), ("MatMul",), None
    if node.op == "Gemm":
        if node.attrs.get("transA", 0):
            return "Gemm with transA=1"
        trans_b, alpha = int(node.attrs.get("transB", 0)), float(node.attrs.get("alpha", 1.0))
        matrix = (weight.T if trans_b else weight).astype(np.float64) * alpha
        return matrix, ("Gemm", trans_b, alpha), None
    if weight.ndim < 3 or any(k != 1 for k in weight.shape[2:]):
        return f"kernel {'x'.join(map(str, weight.shape[2:]))} is not 1x1"
    if int(node.attrs.get("group", 1)) != 1:
        return f"grouped conv (group={node.attrs['group']})"
    spatial = weight.ndim - 2
    strides = list(node.attrs.get("strides", [1] * spatial))
    pads = list(node.attrs.get("pads", [0] * 2 * spatial))
    exact = node.attrs.get("auto_pad", "NOTSET") in ("NOTSET", "VALID")
    sampling = tuple(((-pads[i]) % strides[i], strides[i]) for i in range(spatial)) if exact \
        else None
    return weight.reshape(weight.shape[0], -1).T.astype(np.float64), ("Conv",), sampling


def _subgraph_sites(graph: gs.Graph, ops: tuple[str, ...]) -> list[LayerPlan]:
    found = []
    for node in graph.nodes:
        for value in node.attrs.values():
            bodies = value if isinstance(value, (list, tuple)) else [value]
            for body in bodies:
                if not isinstance(body, gs.Graph):
                    continue
                for inner in body.nodes:
                    if inner.op in ops:
                        found.append(LayerPlan(_label(inner), inner.op, inner.outputs[0].name,
                                               reason=f"inside the {node.op} body of "
                                               f"{_label(node)}: not touched"))
                found.extend(_subgraph_sites(body, ops))
    return found


def _break_even(k: int, n: int, min_saving: float) -> int:
    rank = math.floor((1 - min_saving) * k * n / (k + n))
    while rank > 0 and rank * (k + n) >= k * n:
        rank -= 1
    return rank


def _find_sites(graph: gs.Graph, config: Config) -> tuple[list[_Site], list[LayerPlan]]:
    """Match every candidate node, then group sites by weight: share factors or skip."""
    sites, skipped = [], []
    for node in graph.nodes:
        if node.op not in config.op_types or not node.outputs:
            continue
        plan = LayerPlan(_label(node), node.op, node.outputs[0].name)
        pattern = next((p for p in config.exclude if fnmatch.fnmatchcase(node.name, p)), None)
        matched = f"excluded by pattern {pattern!r}" if pattern else _match(node)
        if isinstance(matched, str):
            plan.reason = matched
        else:
            plan.weight = node.inputs[1].name
            plan.K, plan.N = matched[0].shape
            plan.max_rank = _break_even(plan.K, plan.N, config.min_saving)
            sites.append(_Site(node, plan, *matched))
        if plan.reason:
            skipped.append(plan)
    by_weight: dict[str, list[_Site]] = {}
    for site in sites:
        by_weight.setdefault(site.plan.weight, []).append(site)
    kept = []
    for name, group in by_weight.items():
        readers = group[0].node.inputs[1].outputs
        ours = {id(s.node) for s in group}
        strangers = [_label(n) for n in readers if id(n) not in ours]
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


def _rows(x: np.ndarray, k: int, sampling: tuple | None, conv: bool) -> np.ndarray:
    if conv:
        if sampling is not None:
            x = x[(slice(None), slice(None)) + tuple(slice(s, None, t) for s, t in sampling)]
        x = np.moveaxis(x, 1, -1)
    return x.reshape(-1, k).astype(np.float64)


def _covariances(model: Model, sites: list[_Site], ctx: Context
                 ) -> dict[str, tuple[np.ndarray, int]]:
    """E[x xᵀ] and the row count per weight, from the inputs of the sites that read it."""
    keys = {}
    for site in sites:
        keys[(site.node.inputs[0].name, site.sampling, site.kind[0] == "Conv")] = site.plan.K
    sums = {key: np.zeros((k, k)) for key, k in keys.items()}
    counts = dict.fromkeys(keys, 0)

    def on_batch(index: int, activations: dict[str, np.ndarray]) -> None:
        for key, k in keys.items():
            rows = _rows(activations[key[0]], k, key[1], key[2])
            sums[key] += rows.T @ rows
            counts[key] += rows.shape[0]

    names = sorted({key[0] for key in keys})
    stream_activations(model, names, ctx.calibration, on_batch,
                       progress=lambda i, n: ctx.progress(f"lowrank: calibration batch {i}/{n}"))
    result = {}
    for weight in {s.plan.weight for s in sites}:
        group = {(s.node.inputs[0].name, s.sampling, s.kind[0] == "Conv")
                 for s in sites if s.plan.weight == weight}
        total = sum(counts[key] for key in group)
        result[weight] = (sum(sums[key] for key in group) / max(total, 1), total)
    return result


@dataclass
class _Spectrum:
    matrix: np.ndarray
    u: np.ndarray
    s: np.ndarray
    vt: np.ndarray
    unwhiten: np.ndarray | None  # L^{-T}, or None for plain SVD
    cov: np.ndarray | None  # the raw covariance, for the exact output error

    @property
    def cumulative(self) -> np.ndarray:
        energy = self.s ** 2
        total = energy.sum()
        return np.cumsum(energy) / total if total > 0 else np.ones_like(energy)

    def factors(self, rank: int) -> tuple[np.ndarray, np.ndarray]:
        root = np.sqrt(self.s[:rank])
        a = self.u[:, :rank] * root
        if self.unwhiten is not None:
            a = self.unwhiten @ a
        return a, root[:, None] * self.vt[:rank]

    def errors(self, a: np.ndarray, b: np.ndarray) -> tuple[float | None, float]:
        diff = self.matrix - a @ b
        weight_err = float(np.linalg.norm(diff) / max(np.linalg.norm(self.matrix), 1e-300))
        if self.cov is None:
            return None, weight_err
        total = float(np.sum(self.matrix * (self.cov @ self.matrix)))
        lost = max(float(np.sum(diff * (self.cov @ diff))), 0.0)
        return (math.sqrt(lost / total) if total > 0 else 0.0), weight_err


def _spectrum(matrix: np.ndarray, cov: np.ndarray | None, whiten: bool, damping: float
              ) -> _Spectrum:
    if not whiten or cov is None:
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        return _Spectrum(matrix, u, s, vt, None, cov)
    evals, q = np.linalg.eigh(cov)
    evals = np.clip(evals, 0.0, None)
    root = np.sqrt(evals + max(damping * float(evals.mean()), 1e-30))
    u, s, vt = np.linalg.svd(root[:, None] * (q.T @ matrix), full_matrices=False)
    return _Spectrum(matrix, u, s, vt, q / root, cov)


def _rank_for(plan: LayerPlan, spectrum: _Spectrum, config: Config) -> int:
    small = min(plan.K, plan.N)
    if config.rank is not None:
        if config.rank > small:
            raise RankError(f"lowrank: rank {config.rank} is larger than min(K, N) = {small} of "
                            f"{plan.node} ({plan.K}x{plan.N})")
        return config.rank
    if config.rank_ratio is not None:
        return max(1, round(config.rank_ratio * small))
    return int(np.searchsorted(spectrum.cumulative, config.energy - ENERGY_SLACK) + 1)


def _allocate_budget(groups: list[tuple[LayerPlan, _Spectrum]], fraction: float) -> list[int]:
    """Greedy: each step buys the next singular value (or, past the break-even rank, the dense
    weight) with the best normalized energy per parameter, while the budget lasts."""
    budget = fraction * sum(plan.K * plan.N for plan, _ in groups)
    ranks = [1] * len(groups)
    spent = sum(plan.K + plan.N for plan, _ in groups)
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        plan, spectrum = groups[i]
        r, cum = ranks[i], spectrum.cumulative
        if r < plan.max_rank:
            gain, cost = cum[r] - cum[r - 1], plan.K + plan.N
        elif r == plan.max_rank:
            gain, cost = 1.0 - cum[r - 1], plan.K * plan.N - r * (plan.K + plan.N)
        else:
            return
        heapq.heappush(heap, (-gain / cost, i, cost))

    for i in range(len(groups)):
        push(i)
    while heap:
        _, i, cost = heapq.heappop(heap)
        if spent + cost > budget:
            continue
        spent += cost
        ranks[i] += 1  # max_rank + 1 means: keep the dense weight
        push(i)
    return ranks


def plan(model: Model, config: Config, ctx: Context | None = None) -> list[LayerPlan]:
    """Every candidate site with its rank, errors and factors (or the reason it is skipped)."""
    ctx = ctx or Context()
    if config.activation_aware and ctx.calibration is None:
        raise UserError("lowrank: activation_aware needs calibration data (--calib)")
    whiten = ctx.calibration is not None and config.activation_aware is not False
    graph = import_graph(model)
    sites, skipped = _find_sites(graph, config)
    skipped += _subgraph_sites(graph, config.op_types)
    covs = _covariances(model, sites, ctx) if sites and ctx.calibration is not None else {}
    groups: dict[str, list[_Site]] = {}
    for site in sites:
        groups.setdefault(site.plan.weight, []).append(site)
    spectra = []
    for index, (weight, group) in enumerate(groups.items(), start=1):
        ctx.progress(f"lowrank: SVD {index}/{len(groups)} ({weight})")
        cov, rows = covs.get(weight, (None, 0))
        for site in group:
            site.plan.calibration_rows = rows
        spectra.append((group[0].plan, _spectrum(group[0].matrix, cov, whiten, config.damping)))
    if config.param_budget is not None:
        ranks = _allocate_budget(spectra, config.param_budget)
    else:
        ranks = [_rank_for(p, s, config) for p, s in spectra]
    for (head, spectrum), rank, group in zip(spectra, ranks, groups.values()):
        kept = float(spectrum.cumulative[min(rank, len(spectrum.s)) - 1])
        reason = None
        if float(np.sum(spectrum.s)) == 0.0:
            reason = "the weight is all zeros"
        elif rank > head.max_rank:
            rule = (f"param_budget {config.param_budget}: kept dense" if config.param_budget
                    else f"{config.mode} {getattr(config, config.mode)} needs rank {rank}")
            reason = (f"{rule}; break-even rank for {head.K}x{head.N} at min_saving "
                      f"{config.min_saving} is {head.max_rank}")
        factors = spectrum.factors(rank) if reason is None else None
        out_err, weight_err = spectrum.errors(*factors) if factors else (None, None)
        for site in group:
            p = site.plan
            p.rank, p.kept_energy, p.reason = (rank if reason is None else 0), kept, reason
            p.rel_output_error, p.rel_weight_error = out_err, weight_err
            p.activation_aware = spectrum.unwhiten is not None
            p.factors = factors
            if reason:
                logger.debug("lowrank: skip %s: %s", p.node, reason)
    order = {id(node): i for i, node in enumerate(graph.nodes)}
    ordered = sorted(sites, key=lambda s: order[id(s.node)])
    return [s.plan for s in ordered] + skipped


def plan_table(plans: list[LayerPlan]) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows for ``--dry-run`` (``report.markdown_table(*plan_table(plans))``)."""
    headers = ["node", "op", "K x N", "rank", "break-even", "kept energy", "rel. output error",
               "params before -> after", "skipped because"]
    rows = [[p.node, p.op, f"{p.K}x{p.N}" if p.K else "", p.rank or "", p.max_rank or "",
             p.kept_energy, p.rel_output_error, f"{p.params_before} -> {p.params_after}"
             if p.K else "", p.reason or ""] for p in plans]
    return headers, rows


def _new_nodes(graph: gs.Graph, node: gs.Node, plan: LayerPlan, a: gs.Constant,
               b: gs.Constant) -> tuple[list[gs.Node], gs.Variable, gs.Tensor | None]:
    base = node.name or f"lowrank_{plan.output}"
    hidden = gs.Variable(unique_name(graph, f"{plan.output}_lowrank_h"), dtype=a.values.dtype)
    x, outputs = node.inputs[0], list(node.outputs)
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if node.op == "Conv":
        first = gs.Node("Conv", f"{base}_lowrank_a", inputs=[x, a], outputs=[hidden],
                        attrs={k: v for k, v in node.attrs.items()
                               if k in ("strides", "pads", "auto_pad", "kernel_shape")})
        second = gs.Node("Conv", f"{base}_lowrank_b", inputs=[hidden, b] + ([bias] if bias else []),
                         outputs=outputs, attrs={"kernel_shape": list(a.values.shape[2:])})
        return [first, second], hidden, bias
    first = gs.Node("MatMul", f"{base}_lowrank_a", inputs=[x, a], outputs=[hidden])
    if node.op == "Gemm" and bias is not None:
        second = gs.Node("Gemm", f"{base}_lowrank_b", inputs=[hidden, b, bias], outputs=outputs,
                         attrs={"alpha": 1.0, "beta": float(node.attrs.get("beta", 1.0))})
    else:
        second = gs.Node("MatMul", f"{base}_lowrank_b", inputs=[hidden, b], outputs=outputs)
    return [first, second], hidden, bias


def apply(model: Model, plans: list[LayerPlan]) -> tuple[Model, list[dict[str, Any]]]:
    """Rewrite the factored sites of ``plans``; returns the new model and per-layer details
    (with the factor tensors' names and the original output tensor, for distill)."""
    graph = import_graph(model)
    by_output = {node.outputs[0].name: node for node in graph.nodes if node.outputs}
    made: dict[str, tuple[gs.Constant, gs.Constant]] = {}
    layers = []
    for p in plans:
        if not p.factored:
            continue
        node = by_output[p.output]
        if p.weight not in made:
            weight = constant_array(node.inputs[1])
            a, b = (f.astype(weight.dtype) for f in p.factors)
            if node.op == "Conv":
                ones = (1,) * (weight.ndim - 2)
                a, b = a.T.reshape((p.rank, p.K) + ones), b.T.reshape((p.N, p.rank) + ones)
            made[p.weight] = (gs.Constant(unique_name(graph, f"{p.weight}_lowrank_A"), a),
                              gs.Constant(unique_name(graph, f"{p.weight}_lowrank_B"), b))
        a, b = made[p.weight]
        x_name = node.inputs[0].name
        new, hidden, bias = _new_nodes(graph, node, p, a, b)
        replace_node(graph, node, new)
        layers.append({**p.summary(), "input": x_name, "hidden": hidden.name,
                       "factor_a": a.name, "factor_b": b.name,
                       "bias": bias.name if bias is not None else None,
                       "nodes": [n.name for n in new],
                       "layout": "conv (r,K,1,1)/(N,r,1,1)" if node.op == "Conv"
                       else "matmul (K,r)/(r,N)"})
    return export_model(tidy(graph), like=model), layers


def run(model: Model, config: Config, ctx: Context) -> tuple[Model, PassRecord]:
    plans = plan(model, config, ctx)
    record = PassRecord(NAME, params_before=model.parameter_count(),
                        bytes_before=model.weight_bytes())
    record.skipped = [(p.node, p.reason) for p in plans if not p.factored]
    factored = [p for p in plans if p.factored]
    record.details = {"mode": config.mode, "value": getattr(config, config.mode),
                      "activation_aware": any(p.activation_aware for p in factored),
                      "calibration_batches": len(ctx.calibration) if ctx.calibration else 0,
                      "layers": []}
    inside = sum(1 for p in plans if p.reason and " body of " in p.reason)
    if inside:
        record.notes.append(f"{inside} node(s) inside If/Loop/Scan bodies were not touched")
    few = [p.node for p in factored if p.activation_aware and p.calibration_rows < p.K]
    if few:
        record.notes.append(f"{len(few)} layer(s) ({', '.join(few[:3])}) saw fewer calibration rows "
                            "than inputs: their covariance is rank-deficient and the factors may "
                            "not generalise; use more calibration data")
    if not factored:
        record.params_after, record.bytes_after = record.params_before, record.bytes_before
        reasons = sorted({p.reason for p in plans if p.reason})
        record.notes.append("nothing to factor" + (f": {'; '.join(reasons[:5])}" if reasons
                                                    else ": no MatMul/Gemm/Conv with a weight"))
        return model, record
    new_model, layers = apply(model, plans)
    record.modified = True
    record.touched = [layer["node"] for layer in layers]
    record.details["layers"] = layers
    record.params_after = new_model.parameter_count()
    record.bytes_after = new_model.weight_bytes()
    return new_model, record


def describe_plan(model: Model, config: Config, ctx: Context) -> str:
    """The ``--dry-run`` text: the per-layer plan as a table, changing nothing."""
    from onnxcomp.report import markdown_table

    return markdown_table(*plan_table(plan(model, config, ctx)))
