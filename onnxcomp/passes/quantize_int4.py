"""int4 weight-only, blockwise quantization of MatMul weights.

A weight ``W [K, N]`` is cut into blocks of ``block_size`` consecutive rows (along K) per column
``n``; each block gets one scale (and, asymmetric, one zero point):
- symmetric: ``s = max|w| / 7``, ``q = clip(round(w / s), -8, 7)``;
- asymmetric: ``s = (max - min) / 15`` over ``[min(w, 0), max(w, 0)]``, ``zp = round(-min / s)``,
  ``q = clip(round(w / s) + zp, 0, 15)``.
Dequantized: ``(q - zp) * s``, within ``s / 2`` of ``w``.

Two file formats:
- ``matmulnbits``: ONNX Runtime's ``com.microsoft.MatMulNBits``: ``B`` is uint8
  ``[N, n_blocks, block_size / 2]``, two 4-bit values a byte (element ``2i`` in the low nibble),
  stored as unsigned ``q + 8`` when symmetric (ORT's implicit zero point is 8), ``scales``
  ``[N * n_blocks]``, ``zero_points`` uint8 ``[N * ceil(n_blocks / 2)]`` (nibbles, block ``2j`` low).
  K is zero-padded to a whole number of blocks.
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

from onnxcomp.graph import unique_name


@dataclass(frozen=True)
class Blockwise:
    """Quantized blocks of a weight [K, N] in (N, n_blocks, block_size) layout."""

    q: np.ndarray  # int values: signed [-8, 7] if symmetric, else [0, 15]
    scales: np.ndarray  # float32 [N, n_blocks]
    zero_points: np.ndarray | None  # uint8 [N, n_blocks] values in [0, 15], or None (symmetric)
    k: int
    block_size: int

    def dequantize(self) -> np.ndarray:
        """Back to float ``[K, N]``, exactly as the kernels compute it."""
        zp = 0 if self.zero_points is None else self.zero_points[..., None].astype(np.float32)
        blocks = (self.q.astype(np.float32) - zp) * self.scales[..., None]
        n = blocks.shape[0]
        return blocks.reshape(n, -1)[:, : self.k].T.copy()


def quantize_blocks(weight: np.ndarray, block_size: int, symmetric: bool) -> Blockwise:
    weight = np.asarray(weight, dtype=np.float32)
    k, n = weight.shape
    n_blocks = -(-k // block_size)
    padded = np.zeros((n_blocks * block_size, n), dtype=np.float32)
    padded[:k] = weight
    blocks = padded.T.reshape(n, n_blocks, block_size)
    if symmetric:
        scales = np.abs(blocks).max(axis=2) / 7.0
        scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
        q = np.clip(np.round(blocks / scales[..., None]), -8, 7).astype(np.int8)
        return Blockwise(q, scales, None, k, block_size)
    low = np.minimum(blocks.min(axis=2), 0.0)
    high = np.maximum(blocks.max(axis=2), 0.0)
    scales = ((high - low) / 15.0).astype(np.float32)
    scales = np.where(scales > 0, scales, 1.0).astype(np.float32)
    zero_points = np.clip(np.round(-low / scales), 0, 15).astype(np.uint8)
    q = np.clip(np.round(blocks / scales[..., None]) + zero_points[..., None], 0, 15)
    return Blockwise(q.astype(np.uint8), scales, zero_points, k, block_size)


def pack_nibbles(values: np.ndarray) -> np.ndarray:
    """Pack 4-bit values (last axis, padded to even) two a byte, element 2i in the low nibble."""
    values = np.asarray(values, dtype=np.uint8) & 0x0F
    if values.shape[-1] % 2:
        values = np.concatenate([values, np.zeros((*values.shape[:-1], 1), np.uint8)], axis=-1)
    return (values[..., 0::2] | (values[..., 1::2] << 4)).astype(np.uint8)


def matmulnbits_node(graph: gs.Graph, base: str, activation: gs.Tensor, output: gs.Tensor,
                     blocks: Blockwise) -> gs.Node:
    """A com.microsoft.MatMulNBits computing ``output = activation @ dequantize(blocks)``."""
    n = blocks.q.shape[0]
    unsigned = blocks.q.astype(np.int16) + (8 if blocks.zero_points is None else 0)
    packed = pack_nibbles(unsigned.astype(np.uint8))  # [N, n_blocks, block_size / 2]
    inputs = [activation,
              gs.Constant(unique_name(graph, f"{base}_B_int4"), packed),
              gs.Constant(unique_name(graph, f"{base}_scales"), blocks.scales.reshape(-1))]
    if blocks.zero_points is not None:
        zp = pack_nibbles(blocks.zero_points).reshape(-1)
        inputs.append(gs.Constant(unique_name(graph, f"{base}_zero_points"), zp))
    return gs.Node("MatMulNBits", unique_name(graph, f"{base}_nbits"), domain="com.microsoft",
                   attrs={"K": int(blocks.k), "N": int(n), "bits": 4,
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
    """Rewrite the named int8/uint8 initializers as INT4/UINT4 (packed two a byte)."""
    for i, tensor in enumerate(proto.graph.initializer):
        if tensor.name not in names:
            continue
        values = numpy_helper.to_array(tensor)
        dtype = onnx.TensorProto.INT4 if values.dtype == np.int8 else onnx.TensorProto.UINT4
        proto.graph.initializer[i].CopyFrom(
            onnx.helper.make_tensor(tensor.name, dtype, list(values.shape), values.ravel()))
