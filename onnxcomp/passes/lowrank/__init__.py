"""lowrank: replace ``x @ W`` (W a constant K x N) by ``(x @ A) @ B`` with A: K x r, B: r x N.

Plan (``match``, ``spectrum``): every MatMul/Gemm/1x1 Conv with a constant weight is matched or
skipped with the reason; each weight's spectrum is computed (plain SVD, or whitened by the
calibration activations' covariance when data is present: then ``sqrt(1 − kept energy)`` is the
layer's relative output error on that data) and its rank chosen by the one rule the config gives
(``energy``, ``rank``, ``rank_ratio``, ``param_budget``). A site is factored only where
``r (K + N) <= (1 − min_saving) K N`` (and strictly below K N), so parameters and FLOPs drop;
above the break-even rank it is skipped with the rank it would need. Nodes inside If/Loop/Scan
bodies are listed as skipped, never touched. One plan row per layer:
"factor rank 64 of 384 (-42% params)".

Apply (``factor``): the rewrite, and for each factored layer a ``LayerChange`` naming the
second factor (what distill re-fits) and the original layer's output (what it must reproduce).

Idempotent: a second run recognises an earlier run's factors as a pair (``match``: a bias-free
A read only by B through a narrow width r, ``r (K + N) < K N``) and skips both. The margin test
alone would not do: the energy rule on a factor's flatter spectrum can pick a rank below r.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxcomp.graph import import_graph
from onnxcomp.model import Model
from onnxcomp.passes.lowrank.config import DEFAULT_ENERGY, Config, needs_calibration
from onnxcomp.passes.lowrank.factor import factor
from onnxcomp.passes.lowrank.match import LayerPlan, Site, find_sites, subgraph_sites
from onnxcomp.passes.lowrank.spectrum import allocate_budget, covariances, decompose, rank_for
from onnxcomp.pipeline import (
    SKIP,
    Applied,
    Capabilities,
    Context,
    LayerChange,
    PassSpec,
    Plan,
    PlanRow,
)

NAME = "lowrank"
logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_ENERGY", "NAME", "PASS", "Config", "LayerPlan", "apply", "layer_plans",
           "plan"]


def layer_plans(model: Model, config: Config, ctx: Context) -> list[LayerPlan]:
    """Every candidate site with its rank, errors and factors (or the reason it is skipped):
    the factored sites in graph order, then the skipped ones. ``model`` is only read."""
    whiten = ctx.calibration is not None and config.activation_aware is not False
    graph = import_graph(model)
    sites, skipped = find_sites(graph, config)
    skipped += subgraph_sites(graph, config.op_types)
    covs = covariances(model, sites, ctx) if sites and ctx.calibration is not None else {}
    groups: dict[str, list[Site]] = {}
    for site in sites:
        groups.setdefault(site.plan.weight, []).append(site)
    spectra = []
    for index, (weight, group) in enumerate(groups.items(), start=1):
        ctx.progress(f"lowrank: SVD {index}/{len(groups)} ({weight})")
        cov, rows = covs.get(weight, (None, 0))
        for site in group:
            site.plan.calibration_rows = rows
        spectra.append((group[0].plan, decompose(group[0].matrix, cov, whiten, config.damping)))
    if config.param_budget is not None:
        ranks = allocate_budget(spectra, config.param_budget)
    else:
        ranks = [rank_for(p, s, config) for p, s in spectra]
    for (head, spectrum), rank, group in zip(spectra, ranks, groups.values()):
        kept = float(spectrum.cumulative[min(rank, len(spectrum.s)) - 1])
        reason = None
        if float(np.sum(spectrum.s)) == 0.0:
            reason = "the weight is all zeros"
        elif rank > head.max_rank:
            rule = (f"param_budget {config.param_budget}: kept dense" if config.param_budget
                    else f"{config.mode} {config.value} needs rank {rank}")
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


def _action(p: LayerPlan) -> str:
    saving = 1 - p.params_after / p.params_before
    return f"factor rank {p.rank} of {min(p.K, p.N)} (-{saving:.0%} params)"


def plan(model: Model, config: Config, ctx: Context) -> Plan:
    """One row per candidate layer: the rank it gets, or why it is skipped. The SVDs (and, with
    calibration data, the activation covariances) are computed here: the ranks depend on them."""
    layers = layer_plans(model, config, ctx)
    result = Plan(NAME, config, payload=layers)
    result.rows = [PlanRow(p.node, _action(p)) if p.factored else PlanRow(p.node, SKIP, p.reason)
                   for p in layers]
    factored = [p for p in layers if p.factored]
    inside = sum(1 for p in layers if p.reason and " body of " in p.reason)
    if inside:
        result.notes.append(f"{inside} node(s) inside If/Loop/Scan bodies were not touched")
    few = [p.node for p in factored if p.activation_aware and p.calibration_rows < p.K]
    if few:
        result.notes.append(f"{len(few)} layer(s) ({', '.join(few[:3])}) saw fewer calibration "
                            "rows than inputs: their covariance is rank-deficient and the factors "
                            "may not generalise; use more calibration data")
    if not factored:
        reasons = sorted({p.reason for p in layers if p.reason})
        result.notes.append("nothing to factor" + (f": {'; '.join(reasons[:5])}" if reasons
                                                    else ": no MatMul/Gemm/Conv with a weight"))
    return result


def apply(model: Model, plan_: Plan, ctx: Context) -> Applied:
    """Factor the planned layers; the input model back, ``modified`` False, when none is."""
    config: Config = plan_.config
    layers: list[LayerPlan] = plan_.payload
    if not any(p.factored for p in layers):
        return Applied(model, modified=False)
    new_model, done = factor(model, layers)
    changes = [LayerChange(layer["nodes"][-1], NAME, teacher_output=layer["output"],
                           repair="refit", nodes=tuple(layer["nodes"])) for layer in done]
    details = {"mode": config.mode, "value": config.value,
               "activation_aware": any(p.activation_aware for p in layers if p.factored),
               "calibration_batches": len(ctx.calibration) if ctx.calibration else 0,
               "layers": done}
    return Applied(new_model, modified=True, touched=[layer["node"] for layer in done],
                   changes=changes, details=details)


PASS = PassSpec(NAME, Config, plan, apply, Capabilities(needs_calibration=needs_calibration),
                summary="low-rank factorization x@W -> (x@A)@B where it saves parameters and "
                        "FLOPs; activation-aware with calibration data")
