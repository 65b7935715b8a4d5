"""The one place the quantize pass builds a quantized model: every planned site rewritten.

- Gather tables -> int8 rows (``gather.rewrite``); fused Attention -> QAttention
  (``attention.rewrite``);
- static int8: a QDQ pair on each activation input (calibrated ``(min, max)`` in ``stats``), an
  int8 per-channel weight behind a DequantizeLinear, and the planned output pairs
  (``int8.QdqWriter``);
- int8-dynamic: DynamicQuantizeLinear -> MatMulInteger / ConvInteger (``int8``);
- int4: MatMulNBits or opset-21 blockwise DequantizeLinear (``int4``), the blocks from GPTQ
  when ``stats`` holds the layer input's ``X^T X`` (``gptq``).

A weight read by several sites (an unrolled LSTM's Gemms, both branches of an If) is quantized
once and every reader reads the one result (``int8.Shared``; static int8's ``QdqWriter`` keeps
one DequantizeLinear per weight). Sites inside If/Loop/Scan bodies (int8-dynamic, int4) are
rewritten in their own body, where outer-scope tensors stay readable.
"""

from __future__ import annotations

import gc

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp import runtime
from onnxcomp.graph import (
    constant_array,
    export_model,
    graph_nodes,
    import_graph,
    proto_scopes,
    tidy,
    unique_name,
)
from onnxcomp.model import Model
from onnxcomp.passes.quantize import activations as quantize_activations
from onnxcomp.passes.quantize import attention as quantize_attention
from onnxcomp.passes.quantize import calib as quantize_calib
from onnxcomp.passes.quantize import constants as quantize_constants
from onnxcomp.passes.quantize import gather as quantize_gather
from onnxcomp.passes.quantize import gptq as quantize_gptq
from onnxcomp.passes.quantize import hardswish as quantize_hardswish
from onnxcomp.passes.quantize import int4 as quantize_int4
from onnxcomp.passes.quantize import int8 as quantize_int8
from onnxcomp.passes.quantize import recurrent as quantize_recurrent
from onnxcomp.passes.quantize import signed as quantize_signed
from onnxcomp.passes.quantize.config import Config
from onnxcomp.passes.quantize.match import QuantPlan, Site
from onnxcomp.passes.quantize.prepare import gemm_weight


def rewrite(model: Model, quant_plan: QuantPlan, config: Config, stats: dict | None = None
            ) -> Model:
    """Rewrite the planned sites of ``model`` (the prepared one) into a new model. ``stats``:
    calibration statistics of the activation inputs, by tensor name: ``(min, max)`` for static
    int8 (needed), ``X^T X`` for int4 with GPTQ."""
    graph = import_graph(model)
    holders = {n.name: body for n, body in graph_nodes(graph) if n.name}
    nodes = {n.name: n for n, _ in graph_nodes(graph) if n.name}
    tables: dict = {}
    sites = []
    # Gather tables, fused Attention and LSTM/GRU/RNN layers have their own rewrites.
    for site in quant_plan.sites:
        if site.op == "Gather" and site.weight_input is not None:  # else: activations only
            quantize_gather.rewrite(graph, nodes[site.node], tables)
        elif site.op == "Attention":
            quantize_attention.rewrite(graph, nodes[site.node], config.per_channel)
        elif site.op not in quantize_recurrent.OPS:
            sites.append(site)
    quantize_recurrent.rewrite(nodes, holders, [s for s in quant_plan.sites
                                                if s.op in quantize_recurrent.OPS])
    if config.mode == "int8":
        _static(graph, nodes, sites, stats, holders)
        if config.integer_hardswish:
            quantize_hardswish.rewrite(graph)
        if config.signed_feature_maps:
            quantize_signed.rewrite(graph)
        quantize_activations.rewrite(graph, config.activation_dtype)
        if config.constant_inputs:  # after the retyping: int32 biases read the input scales
            quantize_constants.rewrite(graph, config.activation_dtype)
    four_bit: set[str] = set()
    if config.mode != "int8":
        lazy = model.lazy
        shared = quantize_int8.Shared()
        for site in sites:
            four_bit.update(_weight_only(holders[site.node], nodes[site.node], site, config,
                                         stats, shared))
            if lazy:
                # A replaced weight's memory map is freed only by the cycle collector (gs tensors
                # and nodes point at each other): collect now, so that one float weight at a
                # time is resident, not every weight read so far.
                gc.collect()
    result = _export(tidy(graph), model)
    if model.lazy:
        runtime.release_free_memory()  # the float weights and statistics read on the way
    if four_bit:
        quantize_int4.to_4bit(result.proto, four_bit)
    share_transposed_int8(result.proto.graph)
    return result


def share_transposed_int8(graph: onnx.GraphProto) -> int:
    """An int8 matrix stored twice, once transposed (a tied embedding: the Gather table's int8
    rows and the lm_head's int8 weight, quantized by the same symmetric per-row rule), is
    stored once: the second becomes ``Transpose`` of the first, which ONNX Runtime folds when it
    loads the model (memory, not file). Returns how many copies were dropped."""
    by_key: dict[tuple, onnx.TensorProto] = {}
    matrices = [t for t in graph.initializer
                if t.data_type == onnx.TensorProto.INT8 and len(t.dims) == 2]
    if len(matrices) < 2:
        return 0
    for tensor in matrices:
        values = onnx.numpy_helper.to_array(tensor)
        by_key.setdefault((values.shape, values.tobytes()), tensor)
    # The Gather table stays (ONNX Runtime gathers rows from it); the matrix copy goes.
    gathered = {n.input[0] for n in graph.node if n.op_type == "Gather"}
    dropped = []
    for tensor in matrices:
        if tensor.name in gathered:
            continue
        values = onnx.numpy_helper.to_array(tensor).T
        twin = by_key.get((values.shape, np.ascontiguousarray(values).tobytes()))
        if twin is None or twin is tensor or twin.name in dropped or values.shape[0] == \
                values.shape[1]:
            continue
        dropped.append(tensor.name)
    if not dropped:
        return 0
    kept = [t for t in graph.initializer if t.name not in dropped]
    nodes = []
    for name in dropped:
        values = onnx.numpy_helper.to_array(next(t for t in matrices if t.name == name)).T
        twin = by_key[(values.shape, np.ascontiguousarray(values).tobytes())]
        nodes.append(onnx.helper.make_node("Transpose", [twin.name], [name], perm=[1, 0],
                                           name=f"{name}_transposed"))
    del graph.initializer[:]
    graph.initializer.extend(kept)
    existing = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + existing)
    return len(dropped)


def _static(graph: gs.Graph, nodes: dict[str, gs.Node], sites: list[Site], stats: dict,
            holders: dict[str, gs.Graph] | None = None) -> None:
    # Sites inside If/Loop/Scan bodies get their Q/DQ nodes in their own body.
    holders = holders or {}
    writers = quantize_int8.ScopedWriters(graph, any(s.owner for s in sites))
    for site in sites:
        node = nodes[site.node]
        writer = writers.of(holders.get(site.node, graph))
        for i in site.activation_inputs:
            scale, zp = quantize_calib.quant_params(*stats[node.inputs[i].name])
            node.inputs[i] = writer.activation(node.inputs[i], scale, zp)
        if site.weight_input is not None:  # None: activation x activation MatMul
            node.inputs[site.weight_input] = writer.weight(node.inputs[site.weight_input],
                                                           site.axis)
    tensors: dict[int, dict] = {}
    for site in sites:
        if site.output_qdq:
            writer = writers.of(holders.get(site.node, graph))
            if id(writer.graph) not in tensors:
                tensors[id(writer.graph)] = writer.graph.tensors()
            tensor = tensors[id(writer.graph)][site.output_qdq]  # renamed if an output
            scale, zp = quantize_calib.quant_params(*stats[site.output_qdq])
            dequantized = writer.activation(tensor, scale, zp)
            quantize_int8.rewire_consumers(tensor, dequantized)
            if any(out is tensor for out in writer.graph.outputs):  # every_op's outputs
                _output_from(writer.graph, tensor, dequantized)


def _output_from(graph: gs.Graph, tensor: gs.Variable, dequantized: gs.Variable) -> None:
    """Graph output ``tensor`` becomes ``dequantized`` under ``tensor``'s name (the model's
    outputs keep their names); the op's own result is renamed."""
    own = tensor.name
    tensor.name = unique_name(graph, f"{own}_float")
    dequantized.name = own
    dequantized.dtype, dequantized.shape = tensor.dtype, tensor.shape
    graph.outputs = [dequantized if out is tensor else out for out in graph.outputs]


def _weight_only(graph: gs.Graph, node: gs.Node, site: Site, config: Config,
                 stats: dict | None, shared: quantize_int8.Shared) -> list[str]:
    """Dynamic int8 or int4 rewrite of one site (in ``graph``, the body that holds it); returns
    initializers to store as 4-bit. Sites reading the same weight the same way share one
    quantized weight (and one bias) through ``shared``."""
    if node.op == "Conv":  # int8-dynamic only (the match refuses Conv for int4)
        bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
        quantize_int8.dynamic_conv(graph, node, constant_array(node.inputs[1]), bias)
        return []
    linear = gemm_weight(node)
    if isinstance(linear, str):  # the match checked what linear_weight checks
        raise TypeError(f"{node.name}: planned site has no linear weight ({linear})")
    weight, bias = linear.matrix, linear.bias
    key = (id(node.inputs[1]), linear.transposed, linear.alpha)
    bias_key = (id(node.inputs[2]), float(node.attrs.get("beta", 1.0))) if bias is not None \
        else None
    if config.mode == "int8-dynamic":
        axis = 1 if config.per_channel else None
        quantize_int8.dynamic_matmul(graph, node, weight, axis, bias, shared, key, bias_key)
        return []
    positive = config.int4_format == "qdq"
    hessian = (stats or {}).get(node.inputs[0].name) if config.gptq else None
    if hessian is not None:  # GPTQ fits the blocks to this reader's inputs: not shared
        key = (id(node),)
        blocks = quantize_gptq.quantize(weight, hessian, config.block_size, config.int4_symmetric,
                                        config.int4_scale, positive)
    else:
        blocks = shared.get(("int4", *key), lambda: quantize_int4.quantize_blocks(
            weight, config.block_size, config.int4_symmetric, config.int4_scale,
            positive=positive))
    weight_name = node.inputs[1].name or node.name
    activation, output = node.inputs[0], node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()
    if bias is not None:
        product = gs.Variable(unique_name(graph, f"{output.name}_nobias"), dtype=np.float32)
        bias_const = shared.get(("bias", *bias_key), lambda: gs.Constant(
            unique_name(graph, f"{node.name}_C"), bias))
        graph.nodes.append(gs.Node("Add", unique_name(graph, f"{node.name}_bias"),
                                   inputs=[product, bias_const], outputs=[output]))
        output = product
    if config.int4_format == "matmulnbits":
        # The MatMulNBits takes the layer's name, so mixed precision (and the user) can find it.
        name = node.name
        node.name = unique_name(graph, f"{name}_replaced")
        constants = shared.get(("nbits", *key), lambda: quantize_int4.nbits_constants(
            graph, weight_name if len(key) > 1 else name, blocks))
        graph.nodes.append(quantize_int4.matmulnbits_node(graph, name, activation, output,
                                                          blocks, name=name, constants=constants))
        return []
    dq, weight_out, four_bit = shared.get(("qdq", *key), lambda: quantize_int4.qdq_weight(
        graph, site.weight_name, blocks))
    # One DequantizeLinear per scope that reads the weight (a body can't read a sibling body's
    # tensors), all over the one set of 4-bit constants.
    scope = ("qdq-scope", *key, id(graph))
    if scope not in shared.made:
        if ("qdq-placed", *key) not in shared.made:
            shared.made[("qdq-placed", *key)] = True
            graph.nodes.append(dq)
            shared.made[scope] = weight_out
        else:
            out = gs.Variable(unique_name(graph, f"{weight_out.name}_{node.name}"),
                              dtype=np.float32, shape=weight_out.shape)
            graph.nodes.append(gs.Node("DequantizeLinear", unique_name(graph, f"{dq.name}_"
                                                                              f"{node.name}"),
                                       attrs=dict(dq.attrs), inputs=list(dq.inputs),
                                       outputs=[out]))
            shared.made[scope] = out
    weight_out = shared.made[scope]
    graph.nodes.append(gs.Node("MatMul", unique_name(graph, f"{node.name}_int4"),
                               inputs=[activation, weight_out], outputs=[output]))
    return four_bit


def _export(graph: gs.Graph, like: Model) -> Model:
    result = export_model(graph, like=like)
    domains = {n.domain for body, _ in proto_scopes(result.graph) for n in body.node if n.domain}
    declared = {o.domain for o in result.proto.opset_import}
    for domain in domains - declared:
        result.proto.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    return result
