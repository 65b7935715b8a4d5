"""int8-dynamic for fused attention: ``com.microsoft.Attention`` -> ``com.microsoft.QAttention``.

After the ``fuse`` pass a transformer's Q/K/V projections are one constant weight
``W [D, 3H]`` inside an ``Attention`` node, which the MatMul rewrites never see. QAttention
(ONNX Runtime CPU kernel, checked against its 1.32 schema and kernel source) computes the same
attention from

- ``input`` uint8 with a scalar scale and zero point: from ``DynamicQuantizeLinear`` at run time;
- ``weight`` int8 ``[D, 3H]`` with a scalar or per-column ``[3H]`` scale (the kernel applies
  ``input_scale * weight_scale[c]`` per column) and an optional zero point (absent: 0); here
  symmetric, per column unless ``per_channel`` is off, so ``|q * s_c - W| <= s_c / 2``;
- ``bias``, ``mask_index`` (int32) and ``past`` unchanged, in float.

QAttention has no ``qkv_hidden_sizes``, ``rotary_embedding_dim``, ``attention_bias`` or
``past_sequence_length``: an Attention using any of them stays float, with the reason.
Static int8 and int4 have no quantized attention kernel to target: ``float_note`` says so.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp.graph import constant_array, unique_name
from onnxcomp.passes.quantize.int8 import symmetric_int8
from onnxcomp.passes.quantize.match import Site, excluded

logger = logging.getLogger(__name__)

# Attention attributes QAttention also has; any other one set means a variant it can't run.
_SHARED_ATTRS = ("num_heads", "unidirectional", "scale", "mask_filter_value",
                 "past_present_share_buffer", "do_rotary")


def _attention_nodes(graph: gs.Graph) -> list[gs.Node]:
    return [n for n in graph.nodes if n.op == "Attention" and n.domain == "com.microsoft"]


def match_node(node: gs.Node) -> Site | str:
    """The site for one fused Attention node, or why it stays float."""
    inputs = node.inputs
    extra = sorted(set(node.attrs) - set(_SHARED_ATTRS))
    if extra:
        return f"attribute(s) {', '.join(extra)} (QAttention has none)"
    if len(inputs) > 5 and any(t.name for t in inputs[5:]):
        return "attention_bias / past_sequence_length inputs (QAttention has none)"
    if constant_array(inputs[0]) is not None:
        return "input is a constant (fold it first)"
    weight = constant_array(inputs[1])
    if weight is None or weight.dtype != np.float32:
        return "weight is not a constant float32 tensor"
    if weight.ndim != 2 or weight.shape[1] % 3:
        return f"weight of shape {list(weight.shape)} (QAttention needs [D, 3H])"
    if len(inputs) < 3 or not inputs[2].name:
        return "no bias (QAttention needs one)"
    return Site(node.name, "Attention", (0,), 1, inputs[1].name, 1, node.outputs[0].name)


def match(graph: gs.Graph, exclude: tuple[str, ...]) -> tuple[list[Site], list[tuple[str, str]]]:
    """Attention sites of ``graph`` and the skipped ones with their reasons; pure."""
    sites, skipped = [], []
    for node in _attention_nodes(graph):
        site = "node has no name" if not node.name else excluded(node, exclude) or match_node(node)
        if isinstance(site, str):
            logger.debug("quantize: skip Attention %s: %s", node.name, site)
            skipped.append((node.name or node.outputs[0].name, site))
            continue
        sites.append(site)
    return sites, skipped


def float_count(graph: gs.Graph) -> int:
    """Fused Attention nodes with a constant Q/K/V weight (the ones a mode may leave float)."""
    return sum(1 for n in _attention_nodes(graph)
               if len(n.inputs) > 1 and constant_array(n.inputs[1]) is not None)


def rewrite(graph: gs.Graph, node: gs.Node, per_channel: bool) -> None:
    """Replace one planned Attention by DynamicQuantizeLinear -> QAttention."""
    inputs = list(node.inputs) + [gs.Variable.empty()] * (5 - len(node.inputs))
    activation, weight, bias, mask, past = inputs[:5]
    q, scale = symmetric_int8(constant_array(weight), 1 if per_channel else None)
    name = node.name
    node.name = unique_name(graph, f"{name}_float")
    outputs = list(node.outputs)
    node.inputs.clear()
    node.outputs.clear()
    a_q = gs.Variable(unique_name(graph, f"{name}_input_quantized"), dtype=np.uint8)
    a_s = gs.Variable(unique_name(graph, f"{name}_input_scale"), dtype=np.float32)
    a_zp = gs.Variable(unique_name(graph, f"{name}_input_zero_point"), dtype=np.uint8)
    attrs = {k: v for k, v in node.attrs.items() if k in _SHARED_ATTRS}
    q_inputs = [a_q, gs.Constant(unique_name(graph, f"{weight.name}_int8"), q), bias, a_s,
                gs.Constant(unique_name(graph, f"{weight.name}_scale"), scale), mask, a_zp,
                gs.Variable.empty(), past]
    while not q_inputs[-1].name:  # trailing optional inputs left out
        q_inputs.pop()
    graph.nodes += [
        gs.Node("DynamicQuantizeLinear", unique_name(graph, f"{name}_dql"), inputs=[activation],
                outputs=[a_q, a_s, a_zp]),
        gs.Node("QAttention", name, domain="com.microsoft", attrs=attrs, inputs=q_inputs,
                outputs=outputs),
    ]
