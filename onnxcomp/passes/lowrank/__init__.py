"""lowrank: replace ``x @ W`` (W a constant K x N) by ``(x @ A) @ B`` with A: K x r, B: r x N.

Plan (``match``, ``spectrum``): every MatMul/Gemm/1x1 Conv with a constant weight is matched or
skipped with the reason; each weight's spectrum is computed (plain SVD, or whitened by the
calibration activations' covariance when data is present: then ``sqrt(1 − kept energy)`` is the
layer's relative output error on that data) and its rank chosen by the one rule the config gives
(``energy``, ``rank``, ``rank_ratio``, ``param_budget``). A site is factored only where
``r (K + N) <= (1 − min_saving) K N`` (and strictly below K N), so parameters and FLOPs drop;
above the break-even rank it is skipped with the rank it would need. Layers inside If/Loop/Scan
bodies are factored too, whitened by the values their body received on the calibration data
(``bodies``: each body run alone); by their weights alone where the body never ran (the
untaken branch), with that note. A weight read in both branches is factored once. One plan row per layer:
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

from onnxcomp.graph import graph_nodes, import_graph, size_note
from onnxcomp.model import Model
from onnxcomp.passes.lowrank.bodies import body_covariances
from onnxcomp.passes.lowrank.config import DEFAULT_ENERGY, Config, needs_calibration
from onnxcomp.passes.lowrank.factor import factor
from onnxcomp.passes.lowrank.match import LayerPlan, Site, find_sites, match
from onnxcomp.passes.lowrank.spectrum import (
    MAX_COVARIANCE_DIM,
    allocate_budget,
    covariances,
    decompose,
    rank_for,
)
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
    for site in sites:  # read again at its turn: held for every layer, the weights of a large
        site.matrix = None  # model were a second copy through the covariances (CLIP: 420 MB)
    outer = [site for site in sites if site.plan.owner is None]
    inner = [site for site in sites if site.plan.owner is not None]
    covs = covariances(model, outer, ctx) if outer and ctx.calibration is not None else {}
    if inner and whiten:
        # Body tensors are not model outputs: each body runs alone on the values it received.
        found, why = body_covariances(model, inner, ctx)
        covs.update(found)
        for site in inner:
            site.plan.weights_only = why.get(site.plan.weight)
    elif inner:
        for site in inner:
            site.plan.weights_only = "no calibration data" if ctx.calibration is None else \
                "activation_aware is off"
    groups: dict[str, list[Site]] = {}
    for site in sites:
        groups.setdefault(site.plan.weight, []).append(site)
    ranks = None
    if config.param_budget is not None:
        # One budget for every layer: their energies first (the spectra themselves are not kept:
        # on CLIP ViT-B/32 every layer's float64 factors, whitening and covariance together
        # held gigabytes), then each layer is decomposed again below, one at a time.
        energies = []
        for index, (weight, group) in enumerate(groups.items(), start=1):
            ctx.progress(f"lowrank: spectrum {index}/{len(groups)} ({weight})")
            cov = covs.get(weight, (None, 0))[0]
            energies.append((group[0].plan,
                             decompose(_matrix(group[0]), cov, whiten, config.damping).cumulative))
        ranks = allocate_budget(energies, config.param_budget)
    for index, (weight, group) in enumerate(groups.items(), start=1):
        ctx.progress(f"lowrank: SVD {index}/{len(groups)} ({weight})")
        cov, rows = covs.pop(weight, (None, 0))
        for site in group:
            site.plan.calibration_rows = rows
        spectrum = decompose(_matrix(group[0]), cov, whiten, config.damping)
        rank = ranks[index - 1] if ranks is not None else rank_for(group[0].plan, spectrum,
                                                                   config)
        _choose(group, spectrum, rank, config)
    order = {id(node): i for i, (node, _) in enumerate(graph_nodes(graph))}
    ordered = sorted(sites, key=lambda s: order[id(s.node)])
    return [s.plan for s in ordered] + skipped


def layer_error(output_error: float | None, weight_error: float) -> float:
    """The error ``max_layer_error`` bounds: the larger of the layer's output error on the
    calibration data and its weight error. The output error alone is blind to the input
    directions the data barely excites, which whitening truncates freely: on PP-OCRv4 rec,
    whitened factors within 15 % output error on 16 calibration images still left the model's
    cosine at 0.51 on held-out images (docs/lowrank.md)."""
    return weight_error if output_error is None else max(output_error, weight_error)


def _matrix(site: Site) -> np.ndarray:
    """The site's K x N weight, read from the graph (``match``)."""
    return match(site.node)[0]


def _choose(group: list[Site], spectrum, rank: int, config: Config) -> None:
    """Fill the plans of the sites reading one weight: its rank (raised to meet
    ``max_layer_error``), kept energy, errors and factors, or why it stays dense."""
    head = group[0].plan
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
    raised_from, rule_error = 0, None
    if factors and config.max_layer_error is not None:
        error = layer_error(out_err, weight_err)
        if error > config.max_layer_error:
            raised_from, rule_error = rank, error
            found = limit_rank(head, spectrum, config.max_layer_error, rank)
            if found is None:
                reason = (f"its own error {error:.2f} at rank {rank} is over "
                          f"max_layer_error {config.max_layer_error}, and a rank that meets "
                          f"it would pass the break-even rank {head.max_rank}")
                factors, out_err, weight_err = None, None, None
            else:
                rank, factors, (out_err, weight_err) = found
                kept = float(spectrum.cumulative[rank - 1])
    for site in group:
        p = site.plan
        p.raised_from, p.rule_error = raised_from, rule_error
        p.rank, p.kept_energy, p.reason = (rank if reason is None else 0), kept, reason
        p.rel_output_error, p.rel_weight_error = out_err, weight_err
        p.activation_aware = spectrum.unwhiten is not None
        p.factors = factors
        if reason:
            logger.debug("lowrank: skip %s: %s", p.node, reason)


def limit_rank(head: LayerPlan, spectrum, limit: float, start: int
               ) -> tuple[int, tuple, tuple] | None:
    """The smallest rank above ``start`` and within break-even whose own error
    (``layer_error``) is at most ``limit``, with its factors and errors; None when there is
    none. A bisection: the truncation error falls with the rank."""

    def at(rank: int) -> tuple[float, tuple, tuple]:
        factors = spectrum.factors(rank)
        errors = spectrum.errors(*factors)
        return layer_error(*errors), factors, errors

    low, high = start + 1, head.max_rank
    if low > high:
        return None
    best = at(high)
    if best[0] > limit:
        return None
    found = (high, best[1], best[2])
    while low < high:
        middle = (low + high) // 2
        error, factors, errors = at(middle)
        if error <= limit:
            high, found = middle, (middle, factors, errors)
        else:
            low = middle + 1
    return found


def _action(p: LayerPlan) -> str:
    saving = 1 - p.params_after / p.params_before
    action = f"factor rank {p.rank} of {min(p.K, p.N)} (-{saving:.0%} params)"
    if p.raised_from:
        action += f", raised from {p.raised_from} (its error {p.rule_error:.2f} was over the limit)"
    return action


def plan(model: Model, config: Config, ctx: Context) -> Plan:
    """One row per candidate layer: the rank it gets, or why it is skipped. The SVDs (and, with
    calibration data, the activation covariances) are computed here: the ranks depend on them."""
    layers = layer_plans(model, config, ctx)
    result = Plan(NAME, config, payload=layers)
    result.rows = [PlanRow(p.node, _action(p)) if p.factored else PlanRow(p.node, SKIP, p.reason)
                   for p in layers]
    factored = [p for p in layers if p.factored]
    _body_notes(result, [p for p in layers if p.owner is not None])
    raised = [p.node for p in factored if p.raised_from]
    refused = [p.node for p in layers if p.reason and "max_layer_error" in p.reason]
    if raised or refused:
        result.notes.append(
            f"max_layer_error {config.max_layer_error}: {len(raised)} layer(s) got a higher rank "
            f"({', '.join(raised[:3])}{' ...' if len(raised) > 3 else ''}), {len(refused)} "
            f"left dense ({', '.join(refused[:3])}{' ...' if len(refused) > 3 else ''})")
    wide = [p.node for p in factored if ctx.calibration is not None and p.owner is None
            and p.K > MAX_COVARIANCE_DIM]
    if wide:
        result.notes.append(f"{len(wide)} layer(s) ({', '.join(wide[:3])}) wider than "
                            f"{MAX_COVARIANCE_DIM} inputs factored by their weights alone (their "
                            "input covariance would cost K x K float64 and an O(K^3) "
                            "decomposition)")
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


def _body_notes(result: Plan, inside: list[LayerPlan]) -> None:
    """Which factored body layers were whitened by their body's recorded values, and why the
    body layers that were not (factored or not) got their weights alone."""
    aware = [p.node for p in inside if p.factored and p.activation_aware]
    if aware:
        result.notes.append(f"{len(aware)} layer(s) inside If/Loop/Scan bodies whitened by the "
                            f"values their body received on the calibration data "
                            f"({', '.join(aware[:3])}{' ...' if len(aware) > 3 else ''})")
    plain: dict[str, list[str]] = {}
    for p in inside:
        if p.weights_only and not p.activation_aware:
            plain.setdefault(p.weights_only, []).append(p.node)
    for why, nodes in plain.items():
        result.notes.append(f"{len(nodes)} layer(s) inside If/Loop/Scan bodies ranked by their "
                            f"weights alone: {why} ({', '.join(nodes[:3])}"
                            f"{' ...' if len(nodes) > 3 else ''})")


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
    applied = Applied(new_model, modified=True, touched=[layer["node"] for layer in done],
                      changes=changes, details=details)
    grew = size_note(model, new_model, NAME)
    if grew:
        applied.notes.append(grew)
    return applied


PASS = PassSpec(NAME, Config, plan, apply, Capabilities(needs_calibration=needs_calibration),
                summary="low-rank factorization x@W -> (x@A)@B where it saves parameters and "
                        "FLOPs; activation-aware with calibration data")
