"""Activation-aware lowrank inside If/Loop/Scan bodies: the input covariance of a body layer from
the values its body received on the calibration data.

A body's tensors are not model outputs, so ``spectrum.covariances`` cannot fetch them. Each body
holding a site is run alone on what it got (``subgraphs.record``: the taken If branch, Loop
iterations, Scan slices, nested bodies too) and the layer's input rows are summed the same way
(``E[x xᵀ]`` in float64). A weight read in several bodies (both branches) sums the rows of every
body that ran. A body that never ran on the data (the untaken branch), or could not be run
alone, leaves its layers to their weights alone (plain SVD), with the reason.
"""

from __future__ import annotations

import logging

import numpy as np

from onnxcomp import subgraphs
from onnxcomp.model import Model
from onnxcomp.passes.lowrank.match import Site
from onnxcomp.passes.lowrank.spectrum import MAX_COVARIANCE_DIM, _accumulate, _rows
from onnxcomp.pipeline import Context

logger = logging.getLogger(__name__)


def _key(site: Site) -> tuple:
    return site.node.inputs[0].name, site.sampling, site.kind[0] == "Conv"


def body_covariances(model: Model, sites: list[Site], ctx: Context
                     ) -> tuple[dict[str, tuple[np.ndarray, int]], dict[str, str]]:
    """E[x xᵀ] and the row count per weight of the body ``sites``, and, per weight left to
    plain SVD, why (its body never ran, could not be run alone, or the layer is too wide)."""
    defined = subgraphs.scopes(model.graph)
    by_body: dict[subgraphs.Key, list[Site]] = {}
    why: dict[str, str] = {}
    for site in sites:
        keys = defined.get(site.plan.output, [])
        if site.plan.K > MAX_COVARIANCE_DIM:
            why[site.plan.weight] = f"wider than {MAX_COVARIANCE_DIM} inputs"
        elif len(keys) != 1:
            why[site.plan.weight] = "its output name is defined in several bodies"
        else:
            by_body.setdefault(keys[0], []).append(site)
    if not by_body:
        return {}, why
    ctx.progress("lowrank: recording the values If/Loop/Scan bodies receive")
    recorded = subgraphs.record(model, ctx.calibration, set(by_body))
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    for key, group in by_body.items():
        feeds, built = recorded.feeds.get(key), recorded.models.get(key)
        label = "/".join(key)
        if not feeds or built is None:
            reason = recorded.missing.get(key, "got no calibration values")
            for site in group:
                why.setdefault(site.plan.weight, f"body {label} {reason}")
            continue
        wanted = {_key(site): site.plan.K for site in group}
        local = {k: np.zeros((size, size)) for k, size in wanted.items()}
        rows_seen = dict.fromkeys(wanted, 0)

        def on_batch(_index: int, values: dict[str, np.ndarray], wanted=wanted, local=local,
                     rows_seen=rows_seen) -> None:
            for k, size in wanted.items():
                rows = _rows(np.asarray(values[k[0]]), size, k[1], k[2])
                _accumulate(local[k], rows)
                rows_seen[k] += rows.shape[0]

        try:
            subgraphs.body_activations(built, feeds, sorted({k[0] for k in wanted}), on_batch)
        except Exception as exc:  # noqa: BLE001 - its layers are factored by their weights
            logger.warning("lowrank: body %s could not be run alone: %s", label, exc)
            for site in group:
                why.setdefault(site.plan.weight, f"body {label} could not be run alone ({exc})")
            continue
        for weight in {site.plan.weight for site in group}:
            read = {_key(site) for site in group if site.plan.weight == weight}
            sums[weight] = sums.get(weight, 0) + sum(local[k] for k in read)
            counts[weight] = counts.get(weight, 0) + sum(rows_seen[k] for k in read)
            why.pop(weight, None)  # a branch that ran covers a weight both branches read
    result = {w: (sums[w] / max(counts[w], 1), counts[w]) for w in sums if counts[w]}
    return result, {w: r for w, r in why.items() if w not in result}
