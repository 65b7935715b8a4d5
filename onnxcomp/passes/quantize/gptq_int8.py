"""int8 with GPTQ error compensation from calibration data (``int8_method = "gptq"``).

Static and dynamic int8, MatMul/Gemm, and static int8's pointwise Convs (a 1x1, one-group,
stride-1, unpadded Conv is a MatMul of ``W[:, :, 0, 0]^T`` over its input's pixels, ``X`` being
the NCHW input with the channels as features): GPTQ's loop (``gptq.py``) on the symmetric
per-channel int8 grid (``quantize_int8``), applied as a float rewrite before the rewrite
(``run_int8``): the weights it leaves are on that grid, which the rewrite's round-to-nearest
reproduces exactly. Each output column keeps the compensated values only where they do no worse
than round-to-nearest on the calibration rows (``X^T X``, unshrunk): never worse, by
construction. Other Convs are rounded to nearest (their inputs would need im2col statistics).
On PP-OCRv4 det (42 pointwise Convs) it cuts the weights' own error a lot (weights alone, all
activations float: text-mask IoU against float .9863 -> .9952), but with the activations
quantized the model is no better (.9793 -> .9789, .9760 -> .9698 on two calibration draws):
GPTQ fits each layer to its float input, and the input the int8 layer reads is rounded and
clipped. So static int8 fits each layer to the input it will read (``quantize_int8``'s
``quantized``; with GPTQ's own 1 % damping): .9822 / .9791.
Measured (``benchmarks/quantize_ablation.py``, 32 calibration sentences, 128 held out): MiniLM
int8-dynamic sentence cosine 0.9938 -> 0.9942, nearest-neighbour agreement 0.938 -> 0.953;
static int8 no gain (activation rounding dominates there), PP-OCR rec within the noise.

The loop itself, ``H`` and its damping and shrinkage are ``gptq.py``'s (int4's).
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from onnxcomp import calibration
from onnxcomp.graph import (
    constant_array,
    export_model,
    import_graph,
    linear_weight,
    readers,
    set_constant,
    tidy,
)
from onnxcomp.model import Model
from onnxcomp.passes.quantize.gptq import BLOCK, DAMP, Hessians, shrink_hessian
from onnxcomp.passes.quantize.int8 import INT8_MAX, symmetric_int8

# int8 GPTQ fits a static int8 layer to its quantized input only from this many calibration rows
# per input feature on: from fewer (MiniLM's 384-wide MatMuls, 320 tokens) the damped fit kept
# no column, and damping toward W instead fitted the sample (a held-out sentence at 0.970).
SEEN_ROWS_PER_INPUT = 4
# int8 GPTQ reads this many MatMul inputs a segment of the model at a time.
INT8_INPUTS_PER_SEGMENT = 4


def quantize_int8(weight: np.ndarray, hessian: np.ndarray, rows: int, damp: float = DAMP,
                  quantized: tuple[np.ndarray, np.ndarray] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """GPTQ of ``weight [K, N]`` on the symmetric int8 per-column grid, against the raw input
    statistics ``hessian = X^T X`` of ``rows`` calibration rows; returns the dequantized weight,
    which round-to-nearest of the rewrite (``int8.symmetric_int8``) maps onto the same levels,
    and which columns came from GPTQ (the others are rounded to nearest).

    The grid is round-to-nearest's: ``s_c = max|W_c| / 127`` per output column. Columns are
    independent in GPTQ, so each column is then kept from GPTQ only where (1) its levels reach
    +-127 (else the rewrite, deriving the scale from the max, would re-round it) and (2) its
    error on the calibration rows, ``d^T X^T X d``, is no larger than round-to-nearest's;
    otherwise that column is rounded to nearest. So the layer's error on the calibration data
    never exceeds round-to-nearest's.

    ``quantized = (X~^T X~, X~^T X)``: the layer reads its input through a static quantizer,
    ``X~``, so the error is ``|X W - X~ W_q|^2``. GPTQ then rounds the damped least-squares
    weights ``W* = (X~^T X~ + damping)^-1 X~^T X W`` (damped as GPTQ damps ``H``: 1 % of its
    mean diagonal) with ``X~^T X~``, and each column is kept only where it beats round-to-nearest
    of ``W`` on that error. Only from ``SEEN_ROWS_PER_INPUT`` calibration rows per input on (a
    conv's pixels; rarely a transformer's tokens); from fewer, the float-input fit above."""
    w0 = np.asarray(weight, np.float64)
    k = w0.shape[0]
    if hessian.shape != (k, k):
        raise ValueError(f"hessian of shape {hessian.shape} for a weight with {k} rows")
    if quantized is not None and rows >= SEEN_ROWS_PER_INPUT * k:
        return _quantize_int8_seen(weight, hessian, damp, quantized)
    levels_rtn, scale = symmetric_int8(weight.astype(np.float32), 1)
    s = scale.astype(np.float64)
    rtn = levels_rtn.astype(np.float64) * s
    h = np.array(hessian, dtype=np.float64)
    shrink_hessian(h, rows)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    levels = _int8_levels(w0, h, s)
    compensated = levels * s
    raw = np.asarray(hessian, np.float64)

    def column_error(candidate: np.ndarray) -> np.ndarray:
        d = candidate - w0
        return np.einsum("kn,kn->n", d, raw @ d)

    keep = (np.abs(levels).max(axis=0) == INT8_MAX) & (
        column_error(compensated) <= column_error(rtn))
    return np.where(keep[None, :], compensated, rtn).astype(np.float32), keep


def _int8_levels(weight: np.ndarray, h: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The GPTQ loop on the per-column int8 grid ``s``: ``weight [K, N]`` row by row, each row's
    rounding error spread over the rows after it through ``h`` (damped, invertible); the
    integer levels."""
    k = weight.shape[0]
    upper = np.linalg.cholesky(np.linalg.inv(h)).T
    w = weight.copy()
    levels = np.zeros_like(w)
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        errors = np.zeros((end - start, w.shape[1]))
        for row in range(start, end):
            levels[row] = np.clip(np.rint(w[row] / s), -INT8_MAX, INT8_MAX)
            error = (w[row] - levels[row] * s) / upper[row, row]
            w[row + 1:end] -= np.outer(upper[row, row + 1:end], error)
            errors[row - start] = error
        w[end:] -= upper[start:end, end:].T @ errors
    return levels


def _quantize_int8_seen(weight: np.ndarray, hessian: np.ndarray, damp: float,
                        quantized: tuple[np.ndarray, np.ndarray]
                        ) -> tuple[np.ndarray, np.ndarray]:
    """``quantize_int8`` for a layer that reads its input through a static quantizer."""
    w0 = np.asarray(weight, np.float64)
    seen, cross = (np.asarray(m, np.float64) for m in quantized)
    k = seen.shape[0]
    h = seen.copy()
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    # Measured on PP-OCRv4 det, two calibration draws (text-mask IoU against float): this
    # .9822 / .9791, GPTQ on the float input .9789 / .9698, round-to-nearest .9793 / .9760, the
    # undamped fit (damping toward W: W + h^-1 (X~^T X - X~^T X~) W) .9709 / .9674.
    target = np.linalg.solve(h, cross @ w0)
    levels_rtn, scale_rtn = symmetric_int8(weight.astype(np.float32), 1)
    rtn = levels_rtn.astype(np.float64) * scale_rtn.astype(np.float64)
    _, scale = symmetric_int8(target.astype(np.float32), 1)
    s = scale.astype(np.float64)
    levels = _int8_levels(target, h, s)
    compensated = levels * s
    raw = np.asarray(hessian, np.float64)

    def column_error(candidate: np.ndarray) -> np.ndarray:
        # |X w - X~ c|^2 per column: w^T X^T X w - 2 c^T X~^T X w + c^T X~^T X~ c
        return (np.einsum("kn,kn->n", w0, raw @ w0)
                - 2 * np.einsum("kn,kn->n", candidate, cross @ w0)
                + np.einsum("kn,kn->n", candidate, seen @ candidate))

    keep = (np.abs(levels).max(axis=0) == INT8_MAX) & (
        column_error(compensated) <= column_error(rtn))
    return np.where(keep[None, :], compensated, rtn).astype(np.float32), keep


def _fake_quantizer(low: float, high: float):
    """What a static uint8 QDQ pair over ``[low, high]`` passes on (``bias.fake_quantize``)."""
    from onnxcomp.passes.quantize.bias import fake_quantize
    from onnxcomp.passes.quantize.calib import quant_params

    scale, zero_point = quant_params(low, high)
    return lambda rows: fake_quantize(rows, scale, zero_point)


def _pointwise(node) -> str | None:
    """Why a Conv is not a pointwise layer GPTQ can treat as a MatMul over its pixels, or None:
    a 1x1 kernel, one group, stride 1 (every input pixel is a row of ``X``) and no padding."""
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    if weight is None or weight.ndim != 4 or weight.shape[2:] != (1, 1):
        return "not a 1x1 Conv with a constant weight (other Convs would need im2col statistics)"
    if int(node.attrs.get("group", 1)) != 1:
        return "a grouped 1x1 Conv"
    if any(int(v) != 1 for v in node.attrs.get("strides", [1])) or any(
            int(v) != 0 for v in node.attrs.get("pads", [0])):
        return "a strided or padded 1x1 Conv (its input pixels are not its rows)"
    return None


def run_int8(model: Model, sites: list, data: calibration.Dataset, notes: list[str],
             progress=None, static_ranges: tuple[str, float] | None = None
             ) -> tuple[Model, list[tuple[str, str]]]:
    """int8 GPTQ as a float rewrite before quantizing: each eligible MatMul/Gemm weight, and each
    pointwise (1x1, one group, stride 1, unpadded) Conv weight as the ``[C_in, C_out]`` matrix
    it applies to every pixel, is replaced by ``quantize_int8``'s result, already on the grid the
    rewrite will use (so the rewrite stores exactly those levels). A new model (``model`` itself
    when nothing is done) and the sites left to round-to-nearest, with the reason. Inputs are
    read a few at a time, a segment of the model at a time (``Hessians``). ``static_ranges``
    (static int8: the calibration method and percentile): the inputs are first calibrated as
    the rewrite will calibrate them, and each layer is fitted to its input as rounded and
    clipped by that range (``quantize_int8``'s ``quantized``)."""
    graph = import_graph(model)
    nodes = {n.name: n for n in graph.nodes}
    chosen, refused = [], []
    for site in sites:
        node = nodes.get(site.node)
        if site.op not in ("MatMul", "Gemm", "Conv"):
            continue
        if site.owner is not None or node is None:
            refused.append((site.node, ("inside an If/Loop/Scan body (GPTQ statistics are "
                                        "not collected there)")))
        elif site.op == "Conv" and (why := _pointwise(node)) is not None:
            refused.append((site.node, why))
        elif site.op != "Conv" and (site.weight_input != 1
                                    or isinstance(linear_weight(node), str)):
            refused.append((site.node, "no constant [K, N] weight"))
        elif readers(node.inputs[1]) != 1:
            why = "weight read by other nodes too (each would need its own compensated copy)"
            refused.append((site.node, why))
        else:
            chosen.append(node)
    if not chosen:
        notes.append("int8 GPTQ: no MatMul/Gemm/pointwise Conv to compensate")
        return model, refused
    names = [node.inputs[0].name for node in chosen]
    if progress:
        progress(f"quantize: int8 GPTQ statistics of {len(set(names))} inputs on {len(data)} "
                 "batches")
    axes = {node.inputs[0].name: 1 for node in chosen if node.op == "Conv"}
    unique = list(dict.fromkeys(names))
    quantizers = {}
    if static_ranges is not None:
        from onnxcomp.passes.quantize import calib as quantize_calib

        stats = quantize_calib.collect(model, unique, data)
        quantizers = {name: _fake_quantizer(*quantize_calib.tensor_range(stats[name],
                                                                         *static_ranges))
                      for name in unique if np.isfinite(stats[name].minimum)}
    hessians = Hessians(model, unique, data, Counter(names), INT8_INPUTS_PER_SEGMENT,
                        shrink=False, feature_axes=axes, quantizers=quantizers)
    kept = columns = 0
    for node, name in zip(chosen, names):
        if node.op == "Conv":
            conv = np.asarray(constant_array(node.inputs[1]), np.float32)
            hessian = hessians.get(name)  # first: it reads the segment that holds ``quantized``
            weight, keep = quantize_int8(np.ascontiguousarray(conv[:, :, 0, 0].T), hessian,
                                         hessians.rows[name], quantized=hessians.quantized.pop(
                                             name, None))
            set_constant(graph, node, 1, np.ascontiguousarray(weight.T)[:, :, None, None]
                         .astype(conv.dtype), "gptq")
        else:
            linear = linear_weight(node)
            hessian = hessians.get(name)
            weight, keep = quantize_int8(np.asarray(linear.matrix, np.float32), hessian,
                                         hessians.rows[name], quantized=hessians.quantized.pop(
                                             name, None))
            stored = weight / np.float32(linear.alpha)
            set_constant(graph, node, 1, np.ascontiguousarray(stored.T if linear.transposed
                                                              else stored), "gptq")
        kept, columns = kept + int(keep.sum()), columns + keep.size
    convs = sum(1 for node in chosen if node.op == "Conv")
    notes.append(f"int8 GPTQ: {len(chosen)} layers ({convs} pointwise Convs), {kept} of "
                 f"{columns} output channels compensated (the others rounded to nearest: no "
                 "better on the calibration data, or short of the grid's end)")
    return export_model(tidy(graph), like=model), refused
