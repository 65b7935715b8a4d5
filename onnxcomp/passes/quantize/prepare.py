"""What the quantize plan does before matching: refuse quantized models, lift Constant-node
weights, fold BatchNormalization into Convs and rewrite Gemm as MatMul for static int8
(``fold.py``), raise the opset; then find every site.

Preparing builds a new model (the input is never mutated): the plan carries it to ``apply``,
which rewrites that model, so the sites found here are the ones rewritten.
- Gemm (transA = 0, constant float 2-D B, constant C) -> ``MatMul(A, alpha * B')`` [+
  ``Add(beta * C)``], same node name, for static int8: ONNX Runtime fuses ``DQ -> MatMul`` into
  integer kernels, not a float-output Gemm.
- Opset: per-channel DequantizeLinear needs 13 (PP-OCR is 12), DynamicQuantizeLinear 11, the
  int4 QDQ form (``block_size``) 21; an upgrade the converter can't do is a UserError.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from onnxcomp.errors import UserError
from onnxcomp.graph import (
    LinearWeight,
    constant_array,
    export_model,
    import_graph,
    lift_constant_nodes,
    linear_weight,
    tidy,
    unique_name,
)
from onnxcomp.model import Model
from onnxcomp.passes.quantize import attention as quantize_attention
from onnxcomp.passes.quantize import every_op, fold, gelu, placement
from onnxcomp.passes.quantize import gather as quantize_gather
from onnxcomp.passes.quantize.config import INTEGER_MODES, Config
from onnxcomp.passes.quantize.match import (
    QuantPlan,
    excluded,
    is_quantized_op,
    match,
)


@dataclass
class Planned:
    """The quantize plan's payload: the prepared model and the sites found in it."""

    prepared: Model
    sites: QuantPlan


def check_not_quantized(model: Model) -> None:
    ops = sorted({n.op_type for n in model.graph.node if is_quantized_op(n.op_type)})
    if ops:
        raise UserError(f"model is already quantized (it has {', '.join(ops)}): quantize a "
                        "float model")


def _opset_needed(config: Config) -> int:
    if config.mode == "bf16":
        return 13  # Cast from bfloat16
    if config.mode == "fp16":
        return 10
    if config.mode == "int8" and config.activation_dtype == "uint16":
        return 21  # QuantizeLinear's 16-bit types
    if config.mode == "int8":
        return 13 if config.per_channel else 10
    if config.mode == "int8-dynamic":
        return 11
    return 21 if config.int4_format == "qdq" else 10


def prepare(model: Model, config: Config, notes: list[str]) -> Model:
    """Constant-node weights lifted to initializers, Gemm as MatMul for static int8, the opset
    raised where the output needs it; a new model, ``model`` unchanged."""
    if config.min_opset is not None and model.opset() < config.min_opset:
        # First, so the rewrites below write the newer ops (HardSwish from opset 14).
        model = _upgrade(model, config.min_opset, "min_opset", notes)
    if config.mode == "int8" and config.fuse_gelu:
        model, fused = gelu.fuse(model)
        if fused:
            notes.append(f"fused {fused} Erf GELUs into com.microsoft.Gelu (fuse_gelu: QNN's "
                         "HTP runs Gelu, not Erf)")
    graph = import_graph(model)
    lifted = lift_constant_nodes(graph)
    if lifted:
        notes.append(f"lifted {lifted} Constant nodes to initializers")
    folds = config.mode == "int8" and "Conv" in config.ops and config.fold
    if folds and model.opset() < 14 and fold.count_hardswish(graph):
        # The HardSwish op needs opset 14 (OpenVINO fuses it; ONNX Runtime's CPU EP runs it
        # as x * HardSigmoid(x) either way). Measured on PP-OCRv4 rec, the upgrade pays in
        # ONNX Runtime for another reason: at opset 14 shape inference types its SVTR MatMul
        # inputs (dynamic 3-D: no output QDQ, MatMulIntegerToFloat) and ONNX Runtime folds
        # more of its shape arithmetic; int8 0.695x -> 0.651x float at 1 thread, same accuracy.
        try:
            model = _upgrade(model, 14, "HardSwish written as one op", notes)
            graph = import_graph(model)
            lift_constant_nodes(graph)
        except UserError as exc:
            notes.append(f"HardSwish stays x * HardSigmoid(x): {exc}")
    if config.mode in INTEGER_MODES and "MatMul" in config.ops and config.embeddings:
        untied = _tied_lm_heads(graph, config)
        if untied:
            notes.append(f"tied lm_head: {', '.join(untied)} read through Transpose; the "
                         "transposed weight is made a constant so the lm_head quantizes and the "
                         "table becomes int8 rows (int8 modes then store one int8 matrix)")
    if folds:
        folded = fold.fold_batchnorms(graph)
        if folded:
            notes.append(f"folded {len(folded)} BatchNormalization nodes into the Conv before "
                         "each (ONNX Runtime folds them in float models; behind a Conv's QDQ "
                         "it cannot, and each ran as a float op between integer kernels)")
        affine = fold.fold_affine(graph)
        if affine:
            notes.append(f"folded {len(affine)} constant Mul/Add nodes after Convs into their "
                         "weights and biases (exact; fewer float ops between integer kernels)")
        hardswish = fold.fuse_hardswish(graph, model.opset())
        if hardswish:
            notes.append(f"wrote {hardswish} HardSwish patterns (x * Clip(x + 3, 0, 6) / 6) as "
                         f"{'HardSwish' if model.opset() >= 14 else 'x * HardSigmoid(x)'} "
                         "(exact up to rounding; fewer float ops between integer kernels)")
        forward = fold.fold_affine_forward(graph)
        if forward:
            notes.append(f"folded {len(forward)} constant Mul/Add nodes before pointwise Convs "
                         "into their weights and biases (exact; fewer float ops between "
                         "integer kernels)")
    if config.mode == "int8" and "Gemm" in config.ops:
        rewritten = _gemms_as_matmul(graph, config)
        if rewritten:
            notes.append(f"{rewritten} Gemm nodes rewritten as MatMul + Add (ONNX Runtime fuses "
                         "DQ -> MatMul into integer kernels, not a float-output Gemm)")
    prepared = export_model(tidy(graph), like=model)
    needed = _opset_needed(config)
    if prepared.opset() < needed:
        why = {13: f"{config.mode} per-channel", 21: f"{config.mode} 16-bit Q/DQ"}.get(
            needed, config.mode)
        prepared = _upgrade(prepared, needed, why, notes)
    return prepared


def _upgrade(model: Model, needed: int, why: str, notes: list[str]) -> Model:
    """``model`` at opset ``needed`` (ONNX's version converter), or one UserError line."""
    opset = model.opset()
    try:
        proto = version_converter.convert_version(model.proto, needed)
        if model.lazy:
            # The checker would look for the weights' files in the working directory; the
            # graph's consistency is what the upgrade can break, and inference checks that.
            onnx.shape_inference.infer_shapes(proto, strict_mode=True)
        else:
            onnx.checker.check_model(proto)
    except Exception as exc:  # noqa: BLE001 - the converter raises many types
        raise UserError(f"could not upgrade the model from opset {opset} to {needed} "
                        f"(needed by {why}): {exc}") from None
    notes.append(f"upgraded the opset from {opset} to {needed} (needed by {why})")
    _name_new_nodes(proto.graph)
    return Model(proto, model.source, model.external_data)


def _name_new_nodes(graph: onnx.GraphProto) -> None:
    """Name the nodes the converter added without one (Softmax's opset-13 Reshape around it):
    sites are found by node name, and an unnamed node would be skipped."""
    taken = {node.name for node in graph.node}
    for node in graph.node:
        if node.name or not node.output:
            continue
        base = name = f"{node.op_type}_{node.output[0]}"
        i = 0
        while name in taken:
            i += 1
            name = f"{base}_{i}"
        node.name = name
        taken.add(name)


def gemm_weight(node: gs.Node) -> LinearWeight | str:
    """A Gemm/MatMul's weight as float32 ``[K, N]`` (transB, alpha folded) and ``beta * C``."""
    weight = linear_weight(node)
    if isinstance(weight, str):
        return weight
    bias = None if weight.bias is None else np.asarray(weight.bias, np.float32)
    return LinearWeight(weight.tensor, np.asarray(weight.matrix, np.float32), bias,
                        weight.transposed, weight.alpha)


def _tied_lm_heads(graph: gs.Graph, config: Config) -> list[str]:
    """``MatMul(x, Transpose(T))`` where the float table ``T`` is also gathered (an embedding
    tied to the lm_head, as SmolLM/Llama exports write it): the MatMuls read ``T``'s transpose
    as a constant instead, so they are quantization sites and ``T`` is read by Gathers only
    (gather.py then stores it as int8 rows). Returns the tables so treated."""
    done = []
    for node in list(graph.nodes):
        if node.op != "Transpose" or not isinstance(node.inputs[0], gs.Constant):
            continue
        table = node.inputs[0]
        values = constant_array(table)
        perm = list(node.attrs.get("perm", [1, 0]))
        if values is None or values.ndim != 2 or perm != [1, 0] or not np.issubdtype(
                values.dtype, np.floating):
            continue
        readers = list(node.outputs[0].outputs)
        gathered = any(r.op == "Gather" and r.inputs[0] is table for r in table.outputs)
        if not gathered or not readers or any(
                r.op != "MatMul" or r.inputs[1] is not node.outputs[0] or excluded(r, config.exclude)
                for r in readers):
            continue
        transposed = gs.Constant(unique_name(graph, f"{table.name}_transposed"),
                                 np.ascontiguousarray(values.T))
        for reader in readers:
            reader.inputs[1] = transposed
        done.append(table.name)
    return done


def _gemms_as_matmul(graph: gs.Graph, config: Config) -> int:
    """Gemm (transA=0, constant B) -> MatMul(A, alpha * B') [+ Add(beta * C)], same node name.
    Gemms reading the same B (and C) the same way share one rewritten constant: an LSTM unrolled
    into 80 Gemms over 4 weights keeps 4 weights, not 80 copies."""
    count = 0
    made: dict[tuple, gs.Constant] = {}
    for node in list(graph.nodes):
        if node.op != "Gemm" or excluded(node, config.exclude):
            continue
        weight = gemm_weight(node)
        if isinstance(weight, str):
            continue  # matched (and skipped with the reason) as a Gemm
        activation, output = node.inputs[0], node.outputs[0]
        source_b = node.inputs[1]
        source_c = node.inputs[2] if len(node.inputs) > 2 else None
        node.inputs.clear()
        node.outputs.clear()
        product = output
        name = node.name
        if weight.bias is not None:
            product = gs.Variable(unique_name(graph, f"{output.name}_matmul"), dtype=np.float32)
            key = ("C", id(source_c), float(node.attrs.get("beta", 1.0)))
            if key not in made:
                made[key] = gs.Constant(unique_name(graph, f"{name}_C"), weight.bias)
            graph.nodes.append(gs.Node("Add", unique_name(graph, f"{name}_bias"),
                                       inputs=[product, made[key]], outputs=[output]))
        key = ("B", id(source_b), weight.transposed, weight.alpha)
        if key not in made:
            made[key] = gs.Constant(unique_name(graph, f"{name}_B"), weight.matrix)
        node.name = unique_name(graph, f"{name}_replaced")
        graph.nodes.append(gs.Node("MatMul", name, inputs=[activation, made[key]],
                                   outputs=[product]))
        count += 1
    return count


def find_sites(model: Model, config: Config) -> QuantPlan:
    """The sites of ``model`` (a prepared one) that ``config`` quantizes; pure."""
    graph = import_graph(model)
    # Only the conv placement reads shapes (where ONNX Runtime would fuse a float Gemm).
    shapes = placement.tensor_shapes(model.proto) if config.mode == "int8" and \
        config.output_qdq == "conv" else {}
    result = match(graph, config.mode, config.ops, config.exclude, config.per_channel,
                   config.activation_matmuls)
    if config.mode == "int8" and config.conv_adds:
        placement.feature_map_sites(graph, result, config.exclude)
    if config.mode == "int8" and config.every_op:
        every_op.sites(graph, every_op.float_tensors(model.proto), result, config.exclude)
    if config.mode == "int8" and config.output_qdq != "none":
        placement.output_qdq(result, graph, config.output_qdq, shapes,
                             graph_outputs=config.every_op)
    if config.embeddings:
        sites, skipped = quantize_gather.match(
            graph, config.exclude, frozenset(s.node for s in result.sites))
        result.sites += sites
        result.skipped += skipped
    _attention(graph, config, result)
    if config.mode == "int8-dynamic" and "Conv" in config.ops:
        result.notes.append("int8-dynamic on Conv (ConvInteger) measured 4.5x slower and lost all "
                            "accuracy on PP-OCR: prefer static int8 for conv nets")
    return result


def _attention(graph: gs.Graph, config: Config, result: QuantPlan) -> None:
    fused = quantize_attention.float_count(graph)
    if config.mode == "int8-dynamic" and config.attention:
        sites, skipped = quantize_attention.match(graph, config.exclude)
        result.sites += sites
        result.skipped += skipped
    elif fused:
        why = {"int8-dynamic": "attention = false",
               "int8": "ONNX Runtime fuses no QDQ Attention; its QAttention is int8-dynamic's",
               "int4": "ONNX Runtime has no 4-bit Attention kernel"}[config.mode]
        result.notes.append(f"{fused} fused com.microsoft.Attention nodes left float ({why}): "
                            "their Q/K/V weights keep their float size")
