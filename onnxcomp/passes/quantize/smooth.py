"""SmoothQuant-style scale migration for MatMuls that read a LayerNormalization's output.

Transformer activations carry a few large channels; int8 per-tensor activation scales then
waste their range. For ``Y = LN(x) @ W`` with ``LN(x) = n(x) * gamma + beta`` and a per-input-
channel ``s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`` (``X = LN(x)`` on calibration data,
``W_j`` row j of every consumer's weight):
    ``Y = (n(x) * gamma / s + beta / s) @ (diag(s) W)``
exactly in real arithmetic, so the rewrite is float-exact up to rounding (the tests check it in
ONNX Runtime). Applied when the LN output's readers include MatMuls with a constant 2-D weight
among the planned sites, and gamma/beta are constants of the normalized width. When every
reader is such a MatMul, ``1/s`` is folded into gamma and beta; when others read it too (the
residual Add of a post-LN transformer such as MiniLM), those MatMuls read ``LN(x) * (1/s)``
through one new Mul instead (as NNCF does), and the other readers keep ``LN(x)``.

``inputs = "all"`` also smooths every other activation a planned MatMul with a constant 2-D
weight reads (a GELU output before an FFN down-projection, an attention context), through one
Mul per tensor: ``X @ W = (X / s) @ (diag(s) W)``. The Mul costs an elementwise op on the
MatMul's input; on MiniLM the FFN down-projections' inputs are where static int8 loses its
fidelity (docs/quantize.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp.graph import constant_array, unique_name


@dataclass(frozen=True)
class SmoothSite:
    norm: str  # the LayerNormalization node (or, for ``inputs = "all"``, the tensor's producer)
    output: str  # its output tensor (calibrated per channel)
    matmuls: tuple[str, ...]
    shared: bool = False  # the scale cannot go into the producer: the MatMuls read it via a Mul
    from_norm: bool = True  # a LayerNormalization output (else any MatMul input, "all")


def find_sites(graph: gs.Graph, quantized: set[str], inputs: str = "norm") -> list[SmoothSite]:
    """The tensors to smooth: LayerNormalization outputs planned MatMuls read, and for
    ``inputs = "all"`` every other activation they read (through a Mul)."""
    sites = _norm_sites(graph, quantized)
    if inputs == "all":
        sites += _other_sites(graph, quantized, {site.output for site in sites})
    return sites


def _other_sites(graph: gs.Graph, quantized: set[str], taken: set[str]) -> list[SmoothSite]:
    by_tensor: dict[str, list[gs.Node]] = {}
    tensors = {}
    for node in graph.nodes:
        if node.op != "MatMul" or node.name not in quantized or len(node.inputs) < 2:
            continue
        source = node.inputs[0]
        if isinstance(source, gs.Constant) or source.name in taken:
            continue
        weight = constant_array(node.inputs[1])
        if weight is None or weight.ndim != 2:
            continue
        by_tensor.setdefault(source.name, []).append(node)
        tensors[source.name] = source
    sites = []
    for name, matmuls in by_tensor.items():
        width = np.asarray(constant_array(matmuls[0].inputs[1])).shape[0]
        if not all(_fits(constant_array(m.inputs[1]), width) for m in matmuls):
            continue
        producer = tensors[name].inputs[0].name if tensors[name].inputs else name
        sites.append(SmoothSite(producer, name, tuple(m.name for m in matmuls), shared=True,
                                from_norm=False))
    return sites


def _norm_sites(graph: gs.Graph, quantized: set[str]) -> list[SmoothSite]:
    sites = []
    for node in graph.nodes:
        if node.op != "LayerNormalization":
            continue
        axis, rank = int(node.attrs.get("axis", -1)), len(node.inputs[0].shape or [])
        if axis != -1 and not (rank and axis == rank - 1):
            continue
        if len(node.inputs) > 2 and constant_array(node.inputs[2]) is None:
            continue
        gamma = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
        if gamma is None or gamma.ndim != 1:
            continue
        out = node.outputs[0]
        consumers = [c for c in out.outputs if c.op == "MatMul" and c.name in quantized
                     and c.inputs[0] is out and _fits(constant_array(c.inputs[1]), gamma.size)]
        if not consumers:
            continue
        shared = len(consumers) != len(out.outputs)
        sites.append(SmoothSite(node.name, out.name, tuple(c.name for c in consumers), shared))
    return sites


def _fits(weight: np.ndarray | None, width: int) -> bool:
    return weight is not None and weight.ndim == 2 and weight.shape[0] == width


def smoothing_scales(act_absmax: np.ndarray, weights: list[np.ndarray], alpha: float
                     ) -> np.ndarray:
    w_absmax = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.power(act_absmax, alpha) / np.power(w_absmax, 1.0 - alpha)
    s = np.where(np.isfinite(s) & (s > 1e-5), s, 1.0)
    return s.astype(np.float32)


ALPHA_GRID = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
# Rows of a MatMul input kept to choose its alpha (memory: at most this many values a site).
SAMPLE_VALUES = 1 << 20


def _fake_quant_rows(x: np.ndarray) -> np.ndarray:
    """Per-tensor asymmetric uint8 round trip (the activation quantizer), on its own range."""
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255 or 1.0
    zero = np.round(-lo / scale)
    return (np.clip(np.round(x / scale) + zero, 0, 255) - zero) * scale


def _fake_quant_columns(w: np.ndarray) -> np.ndarray:
    """Symmetric int8 per output channel (column of a [K, N] weight)."""
    scale = np.abs(w).max(axis=0) / 127
    scale = np.where(scale > 0, scale, 1.0)
    return np.clip(np.round(w / scale), -127, 127) * scale


# A smoothing is kept only if it takes at least this share off the unsmoothed error (below,
# the Mul it may cost is not worth it).
MIN_GAIN = 0.05


def choose_alpha(rows: np.ndarray, absmax: np.ndarray, weights: list[np.ndarray],
                 grid: tuple[float, ...] = ALPHA_GRID
                 ) -> tuple[float | None, dict[float | None, float]]:
    """The alpha of ``grid`` whose smoothing gives the least error of ``rows @ W`` with both
    sides quantized (activations per tensor, weights per output channel), every weight reading
    the tensor stacked, or None when no alpha takes ``MIN_GAIN`` off the unsmoothed error; and
    each candidate's relative error (None: unsmoothed). The sites differ (a LayerNorm output, a
    GELU output before the FFN down-projection), so one alpha does not fit all."""
    weight = np.concatenate([np.asarray(w, np.float64) for w in weights], axis=1)
    x = np.asarray(rows, np.float64)
    want = x @ weight
    energy = float(np.sum(want ** 2)) or 1.0

    def error(s: np.ndarray) -> float:
        got = _fake_quant_rows(x / s) @ _fake_quant_columns(weight * s[:, None])
        return float(np.sqrt(np.sum((want - got) ** 2) / energy))

    errors: dict[float | None, float] = {None: error(np.ones(x.shape[1]))}
    for alpha in grid:
        errors[alpha] = error(smoothing_scales(absmax, weights, alpha).astype(np.float64))
    best = min(grid, key=errors.get)
    return (best if errors[best] <= (1 - MIN_GAIN) * errors[None] else None), errors


def apply(graph: gs.Graph, sites: list[SmoothSite], absmax: dict[str, np.ndarray],
          alpha: float | dict[str, float]) -> list[str]:
    """Fold the scales in place; returns the nodes (or tensors) whose output was smoothed."""
    nodes = {n.name: n for n in graph.nodes}
    tensors = graph.tensors()
    done = []
    for site in sites:
        if site.output not in absmax or absmax[site.output] is None:
            continue
        matmuls = [nodes[name] for name in site.matmuls]
        weights = [np.asarray(constant_array(m.inputs[1]), np.float32) for m in matmuls]
        chosen = alpha.get(site.output) if isinstance(alpha, dict) else alpha
        if chosen is None:
            continue
        s = smoothing_scales(np.asarray(absmax[site.output], np.float64), weights, chosen)
        if site.shared:  # others read LN(x) too: the MatMuls read LN(x) / s through a Mul
            out = tensors[site.output]
            scaled = gs.Variable(unique_name(graph, f"{out.name}_smoothed"), np.float32,
                                 out.shape)
            inverse = gs.Constant(unique_name(graph, f"{site.norm}_inverse_scale"),
                                  (1.0 / s).astype(np.float32))
            graph.nodes.append(gs.Node("Mul", unique_name(graph, f"{site.norm}_smooth"),
                                       inputs=[out, inverse], outputs=[scaled]))
            for matmul in matmuls:
                matmul.inputs[0] = scaled
        else:
            _fold_into_norm(graph, nodes[site.norm], site.norm, s)
        for matmul, weight in zip(matmuls, weights):
            matmul.inputs[1] = gs.Constant(unique_name(graph, f"{matmul.name}_W_smoothed"),
                                           (weight * s[:, None]).astype(np.float32))
        done.append(site.norm)
    return done


def _fold_into_norm(graph: gs.Graph, norm: gs.Node, name: str, s: np.ndarray) -> None:
    gamma = np.asarray(constant_array(norm.inputs[1]), np.float32)
    norm.inputs[1] = gs.Constant(unique_name(graph, f"{name}_gamma_smoothed"),
                                 (gamma / s).astype(np.float32))
    if len(norm.inputs) > 2:
        beta = constant_array(norm.inputs[2])
        norm.inputs[2] = gs.Constant(unique_name(graph, f"{name}_beta_smoothed"),
                                     (np.asarray(beta, np.float32) / s).astype(np.float32))
