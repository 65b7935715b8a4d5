"""int4 and int8 with error compensation from calibration data (GPTQ, Frantar et al. 2022).

Round-to-nearest quantizes each weight on its own. GPTQ quantizes the K input rows of
``W [K, N]`` one at a time and spreads each row's rounding error over the rows not yet quantized,
weighted by how the layer's inputs co-vary, so that the layer's *output* error on the calibration
inputs ``X`` is what gets minimized:

    H = X^T X + damp * mean(diag(H)) * I          (K x K, accumulated batch by batch)
    U = upper Cholesky factor of H^-1
    for each row k:  q_k = quantize(w_k);  e = (w_k - q_k) / U[k, k];  w_j -= U[k, j] * e  (j > k)

done in blocks of ``BLOCK`` rows with the updates for later blocks applied as one matrix product.
The int4 grid is the same as round-to-nearest's: blocks of ``block_size`` rows per column, each
block's scale chosen (max or mse rule, ``quantize_int4``) from the block's weights as updated by
the rows before it. The result is a ``Blockwise`` like round-to-nearest's, written as MatMulNBits
or opset-21 QDQ alike.

int8 (``int8_method = "gptq"``): the same loop on the int8 grid, ``gptq_int8.py``.

Where it helps: layers whose inputs are correlated (trained models; the attention output
projection even in random ones). With isotropic inputs ``H`` is a multiple of the identity and
GPTQ is round-to-nearest. Memory: one ``K x K`` float64 matrix per distinct MatMul input, for
one segment of the model at a time (``Hessians``: a 2048-wide decoder block's four inputs,
about 350 MB). Rows that the calibration data never excites (``H[k, k] == 0``) are quantized
as they are.
"""

from __future__ import annotations

import numpy as np

from onnxcomp import calibration, segments
from onnxcomp.model import Model
from onnxcomp.passes.quantize.int4 import Blockwise, quantize_blocks

# Rows per lazy-update block: the inner loop touches only these; later rows get one GEMM each.
BLOCK = 128
DAMP = 0.01
# Shrinkage of the input statistics toward isotropic, relative to K / calibration rows.
SHRINK = 0.5


class Hessians:
    """``X^T X`` (float64) of named activations (last axis = features), computed a segment of the
    model at a time (``onnxcomp.segments``) as ``get`` asks for them, and dropped once each has
    been read ``uses[name]`` times: at most one segment's matrices are held, never the model's.
    Reading in graph order runs the model once over the data."""

    def __init__(self, model: Model, names: list[str], data: calibration.Dataset,
                 uses: dict[str, int], per_segment: int = 4, progress=None,
                 shrink: bool = True, feature_axes: dict[str, int] | None = None,
                 quantizers: dict | None = None):
        self._flow = segments.iterate(model, names, data, per_segment)
        # Static int8: a layer reads its input through a fixed quantizer. For those names also
        # X~^T X~ and X~^T X (X~ = quantizer(X)), put in ``quantized`` by each ``get`` (the
        # caller pops them, so that one segment's matrices are held at a time).
        self._quantizers = dict(quantizers or {})
        self.quantized: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        self._pending: dict[str, list[np.ndarray]] = {}
        # The axis that holds the features, by name (default: the last; 1 for an NCHW Conv
        # input, whose rows are then its pixels).
        self._axes = dict(feature_axes or {})
        # shrink=False: the raw X^T X, with the rows it summed in ``rows`` (int8 GPTQ needs
        # the raw matrix to compare with round-to-nearest exactly).
        self._shrink = shrink
        self.rows: dict[str, int] = {}
        self._uses = dict(uses)
        self._ready: dict[str, np.ndarray] = {}
        self._progress = progress
        self._total = len(segments.plan(model, names, per_segment))
        self._done = 0

    def get(self, name: str, default=None) -> np.ndarray | None:
        while name not in self._ready:
            try:
                _, values = next(self._flow)
            except StopIteration:
                return default
            counts: dict[str, int] = {}
            for batch in values:
                for key, value in batch.items():
                    value = np.moveaxis(np.asarray(value, np.float64), self._axes.get(key, -1),
                                        -1)
                    rows = value.reshape(-1, value.shape[-1])
                    product = rows.T @ rows
                    self._ready[key] = product if key not in self._ready else (
                        self._ready[key] + product)
                    if key in self._quantizers:
                        seen = self._quantizers[key](rows)
                        pair = [seen.T @ seen, seen.T @ rows]
                        old = self._pending.get(key)
                        self._pending[key] = pair if old is None else [old[0] + pair[0],
                                                                       old[1] + pair[1]]
                    counts[key] = counts.get(key, 0) + rows.shape[0]
            for key, count in counts.items():
                self.rows[key] = count
                if self._shrink:
                    shrink_hessian(self._ready[key], count)
            self._done += 1
            if self._progress:
                self._progress(self._done, self._total)
        hessian = self._ready[name]
        if name in self._pending:
            self.quantized[name] = tuple(self._pending[name])
        self._uses[name] = self._uses.get(name, 1) - 1
        if self._uses[name] <= 0:
            del self._ready[name]
            self._pending.pop(name, None)
        if all(count <= 0 for count in self._uses.values()):
            self._flow.close()  # frees the last segment's session and boundary tensors
        return hessian


def shrink_hessian(hessian: np.ndarray, rows: int) -> None:
    """Shrink ``X^T X`` toward a multiple of the identity by ``SHRINK * K / rows`` (in place).

    From fewer rows than about a few times ``K`` the matrix is a poor (for ``rows < K``, rank
    deficient) estimate of the inputs' covariance, and GPTQ pushes rounding error into the
    directions the calibration rows happen not to span, which held-out inputs do excite: on the
    ``small`` decoder 512 calibration tokens gave a *worse* held-out cosine than rounding to
    nearest (0.932 vs 0.940). Shrinking as the sample gets small moves GPTQ toward rounding to
    nearest exactly where its statistics can't be trusted (0.949 there, unchanged with 2048)."""
    k = hessian.shape[0]
    mean = float(np.mean(np.diag(hessian)))
    hessian[np.diag_indices(k)] += SHRINK * k / max(rows, 1) * mean


def quantize(weight: np.ndarray, hessian: np.ndarray, block_size: int, symmetric: bool,
             rule: str = "mse", positive: bool = False, damp: float = DAMP) -> Blockwise:
    """GPTQ of ``weight [K, N]`` (``y = x @ W``) against the input statistics ``hessian [K, K]``."""
    w = np.array(weight, dtype=np.float64)
    k, n = w.shape
    if hessian.shape != (k, k):
        raise ValueError(f"hessian of shape {hessian.shape} for a weight with {k} rows")
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) <= 0
    h[dead, dead] = 1.0
    h[np.diag_indices(k)] += damp * float(np.mean(np.diag(h)))
    upper = np.linalg.cholesky(np.linalg.inv(h)).T  # H^-1 = U^T U
    n_blocks = -(-k // block_size)
    q = np.zeros((k, n), np.float64)
    scales = np.ones((n, n_blocks), np.float32)
    zero_points = None if symmetric else np.zeros((n, n_blocks), np.uint8)
    for start in range(0, k, BLOCK):
        end = min(start + BLOCK, k)
        errors = np.zeros((end - start, n))
        for row in range(start, end):
            group = row // block_size
            if row % block_size == 0:  # this block's scale, from the weights as updated so far
                rows = w[row:min(row + block_size, k)].astype(np.float32)
                chosen = quantize_blocks(rows, rows.shape[0], symmetric, rule, positive)
                scales[:, group] = chosen.scales[:, 0]
                if zero_points is not None:
                    zero_points[:, group] = chosen.zero_points[:, 0]
            s = scales[:, group].astype(np.float64)
            if zero_points is None:
                level = np.clip(np.rint(w[row] / s), -8, 7)
                restored = level * s
            else:
                zp = zero_points[:, group].astype(np.float64)
                level = np.clip(np.rint(w[row] / s) + zp, 0, 15)
                restored = (level - zp) * s
            q[row] = level
            error = (w[row] - restored) / upper[row, row]
            w[row + 1:end] -= np.outer(upper[row, row + 1:end], error)
            errors[row - start] = error
        w[end:] -= upper[start:end, end:].T @ errors
    padded = np.zeros((n_blocks * block_size, n), np.float64)
    padded[:k] = q
    if zero_points is not None:  # padding rows hold the zero point, i.e. dequantize to 0
        padded[k:] = zero_points[:, -1]
    blocks = np.ascontiguousarray(padded.T).reshape(n, n_blocks, block_size)
    return Blockwise(blocks.astype(np.int8 if symmetric else np.uint8), scales, zero_points, k,
                     block_size)
