"""Weight-only int8 for embedding tables read by ``Gather`` (every quantize mode).

A constant float table ``T [V, D...]`` read by ``Gather(T, ids, axis=0)`` is stored as int8 with
one symmetric scale per row: ``s_v = max|T_v| / 127``, ``q_v = clip(round(T_v / s_v), -127, 127)``,
so ``|q_v * s_v - T_v| <= s_v / 2``. The Gather becomes

    Gather(q, ids) -> Cast(float) -> Mul(Gather(s [V, 1...], ids))

which dequantizes only the rows it gathers: with a ``DequantizeLinear`` over the whole table
before the Gather, ONNX Runtime rebuilt all ``V x D`` floats on every run (MiniLM 4.4x slower at
9 tokens). The scales are stored ``[V, 1, ...]`` so that the gathered scales broadcast over the
gathered rows with no reshape.

Skipped, with the reason logged and recorded: a table that is not a constant float tensor, a
Gather on another axis, a table under ``MIN_ELEMENTS`` (no size to win), and a table that
something besides a quantizable Gather reads (an unquantized reader would need the float table
as well, and the file would grow), an excluded Gather or a subgraph. A table tied to an lm_head
MatMul/Gemm that the pass quantizes is quantized too: both readers get their own quantized
layout and no float copy is left (whisper-tiny.en's 79.7 MB tied token table: int8-dynamic
decoder 109.7 -> about 50 MB a file). Gathers sharing one table share one int8 copy. The fuse pass's
``EmbedLayerNormalization`` gathers inside the op from float tables: those are recorded as kept.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp.graph import constant_array, nested_nodes, unique_name
from onnxcomp.passes.quantize.int8 import symmetric_int8
from onnxcomp.passes.quantize.match import Site, excluded

logger = logging.getLogger(__name__)

# Smaller tables (e.g. BERT's [2, 384] token types) win nothing worth three extra nodes.
MIN_ELEMENTS = 4096
# What ONNX Runtime's CPU Cast and Mul take: the gathered rows come back in the table's dtype.
_FLOAT_TYPES = (np.float32, np.float16)


def _axis(node: gs.Node) -> int:
    return int(node.attrs.get("axis", 0))


def _subgraph_names(graph: gs.Graph) -> set[str]:
    """Names read inside If/Loop bodies (outer-scope tensors they may capture)."""
    return {t.name for inner, _ in nested_nodes(graph) for t in inner.inputs}


def match_node(node: gs.Node, exclude: tuple[str, ...], captured: set[str],
               quantized: frozenset[str] = frozenset()) -> Site | str:
    """The site for a Gather ``node``, or why its table stays float. ``quantized``: the nodes
    the pass quantizes anyway (a tied lm_head): sharing the table with them is no reason to keep
    it float, since no reader is left that needs the float table."""
    table = node.inputs[0]
    value = constant_array(table)
    if value is None or not isinstance(table, gs.Constant):
        return "table is not a constant initializer"
    if value.dtype.type not in _FLOAT_TYPES:
        return f"table is {value.dtype}, not float32/float16"
    if _axis(node) != 0:
        return f"axis {_axis(node)} (only row gathers, axis 0)"
    if value.ndim < 2:
        return f"table of rank {value.ndim} (no rows to scale)"
    if value.size < MIN_ELEMENTS:
        return f"table of {value.size} elements (< {MIN_ELEMENTS}: too small to pay)"
    if table.name in captured:
        return f"table {table.name} is also read inside a subgraph"
    for other in table.outputs:
        if other is node:
            continue
        if other.name in quantized and other.op in ("MatMul", "Gemm"):
            continue  # tied lm_head: quantized in its own layout; the float table goes away
        if other.op != "Gather" or _axis(other) != 0 or other.inputs[0] is not table:
            return (f"table {table.name} is shared with {other.op} {other.name!r} (tied "
                    "weights): kept float, an int8 copy would grow the file")
        if reason := excluded(other, exclude):
            return f"table {table.name} is shared with Gather {other.name!r}, {reason}"
    return Site(node.name, "Gather", (), 0, table.name, 0, node.outputs[0].name)


def _large_float_table_tensor(tensor: gs.Tensor) -> bool:
    value = constant_array(tensor)
    return (value is not None and np.issubdtype(value.dtype, np.floating)
            and value.size >= MIN_ELEMENTS)


def _large_float_table(node: gs.Node) -> bool:
    return _large_float_table_tensor(node.inputs[0])


def match(graph: gs.Graph, exclude: tuple[str, ...], quantized: frozenset[str] = frozenset()
          ) -> tuple[list[Site], list[tuple[str, str]]]:
    """Gather sites of ``graph`` and the skipped Gathers with their reasons; pure. ``quantized``:
    the MatMul/Gemm nodes the pass quantizes (see match_node).

    Only Gathers of a large float table are recorded as skipped: exported transformers have
    dozens of Gathers on shapes and small tables, which were never candidates (logged only)."""
    captured = _subgraph_names(graph)
    sites, skipped, seen = [], [], set()
    for node in graph.nodes:
        if node.op != "Gather" or node.domain not in (None, "", "ai.onnx"):
            continue
        if not node.name or node.name in seen:
            site = "node has no unique name"
        else:
            site = excluded(node, exclude) or match_node(node, exclude, captured, quantized)
        seen.add(node.name)
        if isinstance(site, str):
            logger.debug("quantize: skip Gather %s: %s", node.name, site)
            if _large_float_table(node):
                skipped.append((node.name or node.outputs[0].name, site))
            continue
        sites.append(site)
    skipped += _fused_tables(graph)
    return sites, skipped


def _fused_tables(graph: gs.Graph) -> list[tuple[str, str]]:
    """The fuse pass's EmbedLayerNormalization does its own gathers, from float tables only
    (ONNX Runtime's QEmbedLayerNormalization takes one uint8 scale per table): say so."""
    skipped = []
    for node in graph.nodes:
        if node.op != "EmbedLayerNormalization":
            continue
        large = [t.name for t in node.inputs[2:5] if _large_float_table_tensor(t)]
        if large:
            skipped.append((node.name, (f"tables {', '.join(large)} stay float: the fused "
                                        "EmbedLayerNormalization reads whole float tables")))
    return skipped


def quantize_table(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 table and per-row scales shaped ``[V, 1, ...]`` (in the table's float dtype)."""
    q, scale = symmetric_int8(values, 0)
    shape = [-1] + [1] * (values.ndim - 1)
    return q, scale.reshape(shape).astype(values.dtype)


def rewrite(graph: gs.Graph, node: gs.Node, tables: dict[str, tuple[gs.Constant, gs.Constant]]
            ) -> None:
    """Replace one planned Gather; ``tables`` caches the int8 copy of each table by name."""
    table, ids, output = node.inputs[0], node.inputs[1], node.outputs[0]
    if table.name not in tables:
        q, scale = quantize_table(np.asarray(table.values))
        tables[table.name] = (gs.Constant(unique_name(graph, f"{table.name}_int8"), q),
                              gs.Constant(unique_name(graph, f"{table.name}_row_scale"), scale))
    q_table, scales = tables[table.name]
    dtype = scales.values.dtype  # the table's float type
    name = node.name
    node.name = unique_name(graph, f"{name}_float")
    node.inputs.clear()
    node.outputs.clear()
    rows = gs.Variable(unique_name(graph, f"{output.name}_int8"), dtype=np.int8)
    rows_f = gs.Variable(unique_name(graph, f"{output.name}_unscaled"), dtype=dtype)
    row_scales = gs.Variable(unique_name(graph, f"{output.name}_row_scale"), dtype=dtype)
    to = onnx.helper.np_dtype_to_tensor_dtype(dtype)
    graph.nodes += [
        gs.Node("Gather", name, attrs={"axis": 0}, inputs=[q_table, ids], outputs=[rows]),
        gs.Node("Gather", unique_name(graph, f"{name}_scale"), attrs={"axis": 0},
                inputs=[scales, ids], outputs=[row_scales]),
        gs.Node("Cast", unique_name(graph, f"{name}_cast"), attrs={"to": int(to)},
                inputs=[rows], outputs=[rows_f]),
        gs.Node("Mul", unique_name(graph, f"{name}_dequantize"), inputs=[rows_f, row_scales],
                outputs=[output]),
    ]
