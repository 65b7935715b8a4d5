"""int4 weight-only, blockwise quantization of MatMul weights.

A weight ``W [K, N]`` is cut into blocks of ``block_size`` consecutive rows (along K) per column
``n``; each block gets one scale (and, asymmetric, one zero point). Scale rule ``max``:
- symmetric: ``s = max|w| / 7``, ``q = clip(round(w / s), -8, 7)``;
- asymmetric: ``s = (max - min) / 15`` over ``[min(w, 0), max(w, 0)]``, ``zp = round(-min / s)``,
  ``q = clip(round(w / s) + zp, 0, 15)``.
Dequantized: ``(q - zp) * s``, within ``s / 2`` of ``w``.

Scale rule ``mse`` (the default): per block, the scale among ``SEARCH_RATIOS`` that minimizes the
block's squared error ``sum (w - dequantized)^2``. A ratio below the ``max`` rule's clips the few
largest values to shrink the step of all the others: for Gaussian-like weights the error falls by
~20 % (4-bit levels are coarse, so the tails cost less than the step). Symmetric candidates are
``w_ext / -8 * r`` where ``w_ext`` is the block's signed extreme, so the extreme lands on -8 and
all 16 levels are used (ONNX Runtime's own quantizer does the same at ``r = 1``); the ``max`` rule
is among the candidates (``r = 8/7``), so the search is never worse than it. ``positive=True``
(for the opset-21 QDQ form, read by runtimes that may reject negative scales) keeps the sign of the
scale positive instead.

Two file formats:
- ``matmulnbits``: ONNX Runtime's ``com.microsoft.MatMulNBits``: ``B`` is uint8
  ``[N, n_blocks, block_size / 2]``, two 4-bit values a byte (element ``2i`` in the low nibble),
  stored as unsigned ``q + 8`` when symmetric (ORT's implicit zero point is 8), ``scales``
  ``[N * n_blocks]``, ``zero_points`` uint8 ``[N * ceil(n_blocks / 2)]`` (nibbles, block ``2j``
  low). K is zero-padded to a whole number of blocks.
- ``qdq``: the standard form, opset 21: an INT4 (symmetric) or UINT4 initializer ``[K, N]``,
  ``DequantizeLinear(axis=0, block_size)`` with scales ``[ceil(K / block_size), N]``, then the
  original MatMul.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from onnxcomp.graph import proto_scopes, unique_name


@dataclass(frozen=True)
class Blockwise:
    """Quantized blocks of a weight [K, N] in (N, n_blocks, block_size) layout."""

    q: np.ndarray  # int values: signed [-8, 7] if symmetric, else [0, 15]
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, n_blocks] values in [0, 15], or None (symmetric)
    k: int
    block_size: int
    bits: int = 4  # 8: symmetric q in [-127, 127] (``quantize_blocks8``)

    def dequantize(self) -> np.ndarray:
        """Back to float ``[K, N]``, exactly as the kernels compute it."""
        zp = 0 if self.zero_points is None else self.zero_points[..., None].astype(np.float32)
        blocks = (self.q.astype(np.float32) - zp) * self.scales[..., None]
        n = blocks.shape[0]
        return blocks.reshape(n, -1)[:, : self.k].T.copy()


# Multiples of the symmetric ``|w_ext| / 8`` step (of ``(max - min) / 15`` asymmetric) tried by
# the ``mse`` rule; 8/7 (1.0 asymmetric) is the ``max`` rule.
SEARCH_RATIOS = (8 / 7, 1.1, 1.05, 1.0, 0.96, 0.92, 0.88, 0.84, 0.8, 0.75, 0.7)
ASYM_RATIOS = (1.0, 0.96, 0.92, 0.88, 0.84, 0.8, 0.75)
SCALE_RULES = ("mse", "max")


def _as_blocks(weight: np.ndarray, block_size: int) -> tuple[int, np.ndarray]:
    """``K`` and the weight ``[K, N]`` as ``[N, n_blocks, block_size]`` blocks, K zero-padded."""
    weight = np.asarray(weight, dtype=np.float32)
    k, n = weight.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n_blocks * block_size, n), dtype=np.float32)
    padded[:k] = weight
    # Contiguous blocks: a view of the transpose would stride by a whole row per element.
    return k, np.ascontiguousarray(padded.T).reshape(n, n_blocks, block_size)


def quantize_blocks(weight: np.ndarray, block_size: int, symmetric: bool, rule: str = "max",
                    positive: bool = False) -> Blockwise:
    k, blocks = _as_blocks(weight, block_size)
    if rule not in SCALE_RULES:
        raise ValueError(f"int4 scale rule must be one of {', '.join(SCALE_RULES)}, got {rule!r}")
    if symmetric:
        if rule == "max":
            scales = _nonzero(np.abs(blocks).max(axis=2) / 7.0)
        else:
            scales = _search(blocks, _symmetric_candidates(blocks, positive), None)
        q = np.clip(np.round(blocks / scales[..., None]), -8, 7).astype(np.int8)
        return Blockwise(q, scales, None, k, block_size)
    low = np.minimum(blocks.min(axis=2), 0.0)
    high = np.maximum(blocks.max(axis=2), 0.0)
    if rule == "max":
        scales = _nonzero((high - low) / 15.0)
    else:
        scales = _search(blocks, [_nonzero((high - low) * r / 15.0) for r in ASYM_RATIOS], low)
    zero_points = np.clip(np.round(-low / scales), 0, 15).astype(np.uint8)
    q = np.clip(np.round(blocks / scales[..., None]) + zero_points[..., None], 0, 15)
    return Blockwise(q.astype(np.uint8), scales, zero_points, k, block_size)


def quantize_blocks8(weight: np.ndarray, block_size: int) -> Blockwise:
    """Symmetric 8-bit blocks, ``s = max|w| / 127``: the precision mixed-precision int4 gives
    the layers the model output is most sensitive to (within 0.4 % of the block's extreme)."""
    k, blocks = _as_blocks(weight, block_size)
    scales = _nonzero(np.abs(blocks).max(axis=2) / 127.0)
    q = np.clip(np.rint(blocks / scales[..., None]), -127, 127).astype(np.int8)
    return Blockwise(q, scales, None, k, block_size, bits=8)


def _nonzero(scales: np.ndarray) -> np.ndarray:
    return np.where(scales != 0, scales, 1.0).astype(np.float32)


def _symmetric_candidates(blocks: np.ndarray, positive: bool) -> list[np.ndarray]:
    index = np.abs(blocks).argmax(axis=2)[..., None]
    extreme = np.take_along_axis(blocks, index, axis=2)[..., 0]
    base = np.abs(extreme) / 8.0 if positive else extreme / -8.0
    return [_nonzero(base * r) for r in SEARCH_RATIOS]


def _search(blocks: np.ndarray, candidates: list[np.ndarray], low: np.ndarray | None
            ) -> np.ndarray:
    """Per block, the candidate scale with the least squared error. Works on a slab of rows at a
    time in reused buffers: the error of scale ``s`` is ``s^2 * sum((q - w/s)^2)``, so each
    candidate costs a handful of in-place passes over the slab."""
    best = candidates[0].copy()
    n, n_blocks, block = blocks.shape
    rows = max(1, (1 << 21) // max(1, n_blocks * block))
    ratio = np.empty((min(rows, n), n_blocks, block), np.float32)
    work = np.empty_like(ratio)
    for start in range(0, n, rows):
        part = slice(start, start + rows)
        chunk = blocks[part]
        t, q = ratio[: chunk.shape[0]], work[: chunk.shape[0]]
        best_error = None
        for scale in candidates:
            s = scale[part]
            np.divide(chunk, s[..., None], out=t)
            if low is None:
                np.rint(t, out=q)
                np.clip(q, -8, 7, out=q)
            else:
                zp = np.clip(np.rint(-low[part] / s), 0, 15)[..., None]
                np.add(t, zp, out=t)
                np.rint(t, out=q)
                np.clip(q, 0, 15, out=q)
            np.subtract(q, t, out=q)
            error = np.einsum("ijk,ijk->ij", q, q) * np.square(s)
            if best_error is None:
                best_error = error
                continue
            better = error < best_error
            best[part] = np.where(better, s, best[part])
            best_error = np.where(better, error, best_error)
    return best


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pack 4-bit values (last axis, padded to even) two a byte, element 2i in the low nibble."""
    values = np.asarray(values, dtype=np.uint8) & 0x0F
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def nbits_weight(blocks: Blockwise) -> np.ndarray:
    """MatMulNBits' ``B``: 4-bit values two a byte ``[N, n_blocks, block_size / 2]`` (symmetric:
    ``q + 8``), or 8-bit ones ``q + 128`` one a byte (the kernel's implicit zero points)."""
    if blocks.bits == 8:
        return (blocks.q.astype(np.int16) + 128).astype(np.uint8)
    unsigned = blocks.q.astype(np.int16) + (8 if blocks.zero_points is None else 0)
    return pack_nibbles(unsigned.astype(np.uint8))


def nbits_constants(graph: gs.Graph, base: str, blocks: Blockwise) -> list[gs.Constant]:
    """MatMulNBits' constant inputs ``B``, ``scales`` [, ``zero_points``] for ``blocks``."""
    constants = [gs.Constant(unique_name(graph, f"{base}_B_int{blocks.bits}"),
                             nbits_weight(blocks)),
                 gs.Constant(unique_name(graph, f"{base}_scales"), blocks.scales.reshape(-1))]
    if blocks.zero_points is not None:
        zp = pack_nibbles(blocks.zero_points).reshape(-1)
        constants.append(gs.Constant(unique_name(graph, f"{base}_zero_points"), zp))
    return constants


def matmulnbits_node(graph: gs.Graph, base: str, activation: gs.Tensor, output: gs.Tensor,
                     blocks: Blockwise, name: str | None = None,
                     constants: list[gs.Constant] | None = None) -> gs.Node:
    """A com.microsoft.MatMulNBits computing ``output = activation @ dequantize(blocks)``; 8-bit
    blocks are stored one a byte as ``q + 128`` (the kernel's implicit zero point).
    ``constants`` (from ``nbits_constants``): another node's, shared with this one."""
    n = blocks.q.shape[0]
    inputs = [activation, *(constants or nbits_constants(graph, base, blocks))]
    return gs.Node("MatMulNBits", name or unique_name(graph, f"{base}_nbits"),
                   domain="com.microsoft",
                   attrs={"K": int(blocks.k), "N": int(n), "bits": int(blocks.bits),
                          "block_size": int(blocks.block_size)},
                   inputs=inputs, outputs=[output])


def qdq_weight(graph: gs.Graph, name: str, blocks: Blockwise
               ) -> tuple[gs.Node, gs.Variable, list[str]]:
    """Opset-21 ``DequantizeLinear(block_size)`` over an INT4/UINT4 ``[K, N]`` initializer."""
    n, _, block_size = blocks.q.shape
    k = blocks.k
    q_kn = blocks.q.reshape(n, -1)[:, :k].T  # [K, N]
    symmetric = blocks.zero_points is None
    # gs can't write 4-bit tensors: they go out as int8/uint8 and ``to_4bit`` repacks them.
    q_name = unique_name(graph, f"{name}_int4")
    inputs = [gs.Constant(q_name, np.ascontiguousarray(q_kn).astype(np.int8 if symmetric
                                                                      else np.uint8)),
              gs.Constant(unique_name(graph, f"{name}_scales"),
                          np.ascontiguousarray(blocks.scales.T))]
    four_bit = [q_name]
    if not symmetric:
        zp_name = unique_name(graph, f"{name}_zero_points")
        inputs.append(gs.Constant(zp_name, np.ascontiguousarray(blocks.zero_points.T)))
        four_bit.append(zp_name)
    out = gs.Variable(unique_name(graph, f"{name}_dequantized"), dtype=np.float32,
                      shape=[k, n])
    dq = gs.Node("DequantizeLinear", unique_name(graph, f"{name}_DQ"),
                 attrs={"axis": 0, "block_size": int(block_size)}, inputs=inputs, outputs=[out])
    return dq, out, four_bit


def to_4bit(proto: onnx.ModelProto, names: set[str]) -> None:
    """Rewrite the named int8/uint8 initializers as INT4/UINT4 (packed two a byte), in the
    main graph and in If/Loop/Scan bodies."""
    for body, _ in proto_scopes(proto.graph):
        for i, tensor in enumerate(body.initializer):
            if tensor.name not in names:
                continue
            values = numpy_helper.to_array(tensor)
            dtype = onnx.TensorProto.INT4 if values.dtype == np.int8 else onnx.TensorProto.UINT4
            body.initializer[i].CopyFrom(
                onnx.helper.make_tensor(tensor.name, dtype, list(values.shape), values.ravel()))
