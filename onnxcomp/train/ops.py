"""The twin's op table: ONNX (domain, op_type) → a PyTorch function.

Composition is explicit: each family module exports an ``OPS`` dict and this module merges them;
nothing registers itself at import. An op missing here is reported by name
(``unsupported_ops``) before any tensor is computed. Ops with subgraphs (If, Loop, Scan), random
ops, recurrent cells (LSTM, GRU, RNN), sequences, strings and the contrib ops other than
MatMulNBits are not in the table.
"""

from __future__ import annotations

from onnxcomp.train import ops_math, ops_nn, ops_quant, ops_resize, ops_shape
from onnxcomp.train.ops_common import Op

DEFAULT_DOMAINS = ("", "ai.onnx")
MICROSOFT = "com.microsoft"

ONNX_OPS: dict[str, Op] = {
    **ops_math.OPS,
    **ops_shape.OPS,
    **ops_nn.OPS,
    **ops_quant.OPS,
    "Resize": ops_resize.resize,
}
DOMAIN_OPS: dict[str, dict[str, Op]] = {MICROSOFT: ops_quant.MICROSOFT_OPS}


def lookup(domain: str, op_type: str) -> Op | None:
    if domain in DEFAULT_DOMAINS:
        return ONNX_OPS.get(op_type)
    return DOMAIN_OPS.get(domain, {}).get(op_type)


def supported_ops() -> list[str]:
    """Every supported op, ``op_type`` for the default domain, ``domain:op_type`` otherwise."""
    names = sorted(ONNX_OPS)
    names += sorted(f"{domain}:{op}" for domain, table in DOMAIN_OPS.items() for op in table)
    return names
