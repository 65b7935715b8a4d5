"""The spectrum of a weight and the rank it gets.

Plain: ``W = U S V^T``, ``A = U_r S_r^½``, ``B = S_r^½ V_r^T``; the kept energy is
``Σ_{i<r} s_i² / Σ s_i²`` and ``‖W − AB‖_F / ‖W‖_F = sqrt(1 − kept)``.

Activation-aware (calibration data present): ``C = E[x xᵀ]`` over the rows of the layer's input
(running float32 sums of float64 products, one batch alive at a time; every leading dim is a
sample; decomposed in float64, one layer at a time). With
``C = L Lᵀ`` (eigh, plus a small ridge so L is invertible) the output error on the data is
``E‖xW − xAB‖² = ‖Lᵀ(W − AB)‖_F²``, so the SVD truncates ``W' = Lᵀ W = U S Vᵀ`` instead:
``A = L^{-T} U_r S_r^½``, ``B = S_r^½ V_r^T``. Energy is then measured on the whitened spectrum
and ``sqrt(1 − kept)`` is the relative output error on the calibration data (computed exactly
from C).

Rank rules: ``energy`` (the smallest rank keeping that share), ``rank``, ``rank_ratio`` of
min(K, N), or ``param_budget``: a greedy allocation across layers by energy gained per
parameter.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass

import numpy as np

from onnxcomp.calibration import stream_activations
from onnxcomp.errors import UserError
from onnxcomp.model import Model
from onnxcomp.passes.lowrank.config import Config
from onnxcomp.passes.lowrank.match import LayerPlan, Site
from onnxcomp.pipeline import Context

# Cumulative energy is compared with this slack so that energy=1.0 keeps exactly the numerical rank.
ENERGY_SLACK = 1e-9


# Widest layer input whose covariance is collected (K x K float32, 64 MiB at 4096, and an
# O(K^3) eigendecomposition): a wider layer (a CRNN's flattened conv features into a Gemm) is
# factored by its weight alone. Without this bound a 19 MB CRNN needed 6.1 GB and 157 s.
MAX_COVARIANCE_DIM = 4096
# Activation rows turned into float64 at a time (a big conv map is not copied whole).
ROWS_PER_CHUNK = 16384


def _rows(x: np.ndarray, k: int, sampling: tuple | None, conv: bool) -> np.ndarray:
    """The input rows a layer reads, as a float32 [rows, K] view or copy."""
    if conv:
        if sampling is not None:
            x = x[(slice(None), slice(None)) + tuple(slice(s, None, t) for s, t in sampling)]
        x = np.moveaxis(x, 1, -1)
    return x.reshape(-1, k)


def _accumulate(total: np.ndarray, rows: np.ndarray) -> None:
    """``total += rowsᵀ rows``, each chunk's product in float64, a chunk of rows at a time;
    ``total`` is float32 (every input's sums are held at once: 1.5 GB in float64 on CLIP
    ViT-B/32; a float32 sum of a few dozen float64 products keeps ~1e-7 of relative
    precision, far below the damping the whitening adds)."""
    for start in range(0, rows.shape[0], ROWS_PER_CHUNK):
        chunk = rows[start:start + ROWS_PER_CHUNK].astype(np.float64)
        total += chunk.T @ chunk


def covariances(model: Model, sites: list[Site], ctx: Context
                ) -> dict[str, tuple[np.ndarray, int]]:
    """E[x xᵀ] and the row count per weight, from the inputs of the sites that read it; none
    for weights wider than ``MAX_COVARIANCE_DIM`` (factored by the weight alone)."""
    sites = [site for site in sites if site.plan.K <= MAX_COVARIANCE_DIM]
    if not sites:
        return {}
    keys = {}
    for site in sites:
        keys[(site.node.inputs[0].name, site.sampling, site.kind[0] == "Conv")] = site.plan.K
    sums = {key: np.zeros((k, k), np.float32) for key, k in keys.items()}
    counts = dict.fromkeys(keys, 0)

    def on_batch(index: int, activations: dict[str, np.ndarray]) -> None:
        for key, k in keys.items():
            rows = _rows(activations[key[0]], k, key[1], key[2])
            _accumulate(sums[key], rows)
            counts[key] += rows.shape[0]

    names = sorted({key[0] for key in keys})
    stream_activations(model, names, ctx.calibration, on_batch,
                       progress=lambda i, n: ctx.progress(f"lowrank: calibration batch {i}/{n}"))
    result = {}
    made: dict[frozenset, tuple[np.ndarray, int]] = {}  # weights reading the same inputs
    for weight in {s.plan.weight for s in sites}:  # (q, k, v) share one matrix, read-only
        group = frozenset((s.node.inputs[0].name, s.sampling, s.kind[0] == "Conv")
                          for s in sites if s.plan.weight == weight)
        if group not in made:
            total = sum(counts[key] for key in group)
            made[group] = (sum(sums[key] for key in group) / max(total, 1), total)
        result[weight] = made[group]
    return result


@dataclass
class Spectrum:
    """A weight's (possibly whitened) SVD: the factors at any rank and their errors."""

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


def decompose(matrix: np.ndarray, cov: np.ndarray | None, whiten: bool, damping: float
              ) -> Spectrum:
    """Plain SVD of ``matrix``, or of ``Lᵀ matrix`` when whitening by ``cov`` (see above);
    in float64 whatever ``matrix``'s type."""
    matrix = np.asarray(matrix, np.float64)
    cov = None if cov is None else np.asarray(cov, np.float64)
    if not whiten or cov is None:
        u, s, vt = np.linalg.svd(matrix, full_matrices=False)
        return Spectrum(matrix, u, s, vt, None, cov)
    evals, q = np.linalg.eigh(cov)
    evals = np.clip(evals, 0.0, None)
    root = np.sqrt(evals + max(damping * float(evals.mean()), 1e-30))
    u, s, vt = np.linalg.svd(root[:, None] * (q.T @ matrix), full_matrices=False)
    return Spectrum(matrix, u, s, vt, q / root, cov)


def rank_for(plan: LayerPlan, spectrum: Spectrum, config: Config) -> int:
    """The rank the config's rule gives this weight; a fixed rank it cannot have is the
    user's mistake."""
    small = min(plan.K, plan.N)
    if config.rank is not None:
        if config.rank > small:
            raise UserError(f"lowrank: rank {config.rank} is larger than min(K, N) = {small} of "
                            f"{plan.node} ({plan.K}x{plan.N})")
        return config.rank
    if config.rank_ratio is not None:
        return max(1, round(config.rank_ratio * small))
    return int(np.searchsorted(spectrum.cumulative, config.value - ENERGY_SLACK) + 1)


def allocate_budget(groups: list[tuple[LayerPlan, np.ndarray]], fraction: float) -> list[int]:
    """Greedy: each step buys the next singular value (or, past the break-even rank, the dense
    weight) with the best normalized energy per parameter, while the budget lasts. ``groups``:
    each weight's plan and cumulative energy (``Spectrum.cumulative``)."""
    budget = fraction * sum(plan.K * plan.N for plan, _ in groups)
    ranks = [1] * len(groups)
    spent = sum(plan.K + plan.N for plan, _ in groups)
    heap: list[tuple[float, int, int]] = []

    def push(i: int) -> None:
        plan, cum = groups[i]
        r = ranks[i]
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
