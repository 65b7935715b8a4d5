"""quantize: int8 static QDQ, int8 dynamic, int4 weight-only blockwise.

Plan, then apply: ``plan()`` picks the Conv/MatMul/Gemm nodes with a constant weight (and says
why it skips the others); ``apply()`` rewrites them in one place:
- ``int8``: uint8 per-tensor activations (calibrated: minmax, percentile, entropy, mse) and int8
  symmetric per-channel weights as QuantizeLinear/DequantizeLinear pairs on the inputs of the
  planned nodes (and on Conv outputs, ``output_qdq="conv"``), the form ONNX Runtime fuses into
  QLinearConv / QLinearMatMul / MatMulIntegerToFloat. Needs calibration data.
- ``int8-dynamic``: int8 weights, activations quantized at run time (DynamicQuantizeLinear +
  MatMulInteger, fused by ONNX Runtime into DynamicQuantizeMatMul). MatMul/Gemm by default.
- ``int4``: blockwise 4-bit MatMul weights, as com.microsoft.MatMulNBits or opset-21 QDQ.
- every mode (``embeddings``): Gather tables as int8 rows, one scale per row, dequantized after
  the gather (``quantize_gather``); int8-dynamic (``attention``): the fuse pass's
  com.microsoft.Attention -> QAttention (``quantize_attention``); other modes leave it float, noted.
Then, with calibration data (scored on the held-out ``ctx.evaluation`` when given): per-layer
SQNR, and with ``min_cosine`` automatic mixed precision: int8 modes return the layers most harmful
on their own to float; int4 raises the most sensitive layer groups to 8 bits (``quantize_mixed``).
Large models (weights on disk) are calibrated and measured a segment at a time (``segments``).

Refuses models already quantized; weights inside If/Loop bodies are left float (noted).
Opset-12 models (PP-OCR) are upgraded to 13 for per-channel DequantizeLinear (21 for int4 QDQ).
"""

from __future__ import annotations

import gc
import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import version_converter

from onnxcomp import calibration, runtime
from onnxcomp.errors import UserError
from onnxcomp.graph import (
    constant_array,
    export_model,
    import_graph,
    lift_constant_nodes,
    tidy,
    unique_name,
)
from onnxcomp.measure import compare as quantize_eval
from onnxcomp.model import Model
from onnxcomp.passes.quantize import attention as quantize_attention
from onnxcomp.passes.quantize import calib as quantize_calib
from onnxcomp.passes.quantize import gather as quantize_gather
from onnxcomp.passes.quantize import gptq as quantize_gptq
from onnxcomp.passes.quantize import int4 as quantize_int4
from onnxcomp.passes.quantize import int8 as quantize_int8
from onnxcomp.passes.quantize import mixed as quantize_mixed
from onnxcomp.passes.quantize import smooth as quantize_smooth
from onnxcomp.passes.quantize.plan import QuantPlan, Site, excluded, is_quantized_op
from onnxcomp.passes.quantize.plan import plan as match_plan
from onnxcomp.pipeline import Context, PassRecord

NAME = "quantize"
# Reads weights through gs constants only: works on models whose weights stay on disk.
LAZY_WEIGHTS = True
MODES = ("int8", "int8-dynamic", "int4")
DEFAULT_OP_TYPES = {"int8": ("Conv", "MatMul", "Gemm"), "int8-dynamic": ("MatMul", "Gemm"),
                    "int4": ("MatMul", "Gemm")}
# Batches of calibration data used for SQNR and the mixed-precision search.
EVAL_BATCHES = 16
# Batches per layer for the one-layer-at-a-time sensitivity probe of mixed precision.
SENSITIVITY_BATCHES = 8
# GPTQ statistics are collected this many MatMul inputs at a time (a decoder block has four).
GPTQ_INPUTS_PER_SEGMENT = 4


@dataclass(frozen=True)
class Config:
    mode: str = "int8"
    calibration: str = "mse"
    percentile: float = 99.99
    op_types: tuple[str, ...] | None = None  # None: the mode's default
    exclude: tuple[str, ...] = ()  # node names, op types or fnmatch patterns
    per_channel: bool = True
    activation_dtype: str = "uint8"
    output_qdq: str = "conv"  # int8: also QDQ the outputs of "none" | "conv" | "all" sites
    block_size: int = 32
    int4_format: str = "matmulnbits"
    int4_symmetric: bool = True
    int4_scale: str = "mse"  # per-block scale: "mse" (least squared error) or "max" (no clipping)
    int4_method: str = "rtn"  # "rtn" (round to nearest) or "gptq" (error compensation; --calib)
    min_cosine: float | None = None
    smoothquant_alpha: float | None = None
    embeddings: bool = True  # Gather tables as int8 rows (every mode; quantize_gather)
    attention: bool = True  # int8-dynamic: fused Attention -> QAttention (quantize_attention)
    # int8: QDQ on both inputs of activation x activation MatMuls too (-> QLinearMatMul, as in
    # ORT's quantize_static); off: not faster on PP-OCR rec, slower on MiniLM at 128 tokens
    activation_matmuls: bool = False

    def __post_init__(self) -> None:
        for name in ("op_types", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):  # "a,b" from --set: a list of names or patterns
                value = tuple(v.strip() for v in value.split(",") if v.strip())
            if value is not None:
                object.__setattr__(self, name, tuple(str(v) for v in value))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.calibration not in quantize_calib.METHODS:
            raise ValueError(f"calibration must be one of {', '.join(quantize_calib.METHODS)}, "
                             f"got {self.calibration!r}")
        if not 50.0 < float(self.percentile) <= 100.0:
            raise ValueError(f"percentile must be in (50, 100], got {self.percentile!r}")
        if self.op_types is not None and not self.op_types:
            raise ValueError("op_types must name at least one op type")
        if self.activation_dtype != "uint8":
            raise ValueError(f"activation_dtype must be 'uint8' (the fast ONNX Runtime CPU path), "
                             f"got {self.activation_dtype!r}")
        if self.output_qdq not in ("none", "conv", "all"):
            raise ValueError(f"output_qdq must be none, conv or all, got {self.output_qdq!r}")
        if self.block_size not in (16, 32, 64, 128, 256):
            raise ValueError(f"block_size must be 16, 32, 64, 128 or 256, got {self.block_size!r}")
        if self.int4_scale not in quantize_int4.SCALE_RULES:
            raise ValueError(f"int4_scale must be one of {', '.join(quantize_int4.SCALE_RULES)}, "
                             f"got {self.int4_scale!r}")
        if self.int4_method not in ("rtn", "gptq"):
            raise ValueError(f"int4_method must be rtn or gptq, got {self.int4_method!r}")
        if self.int4_format not in ("matmulnbits", "qdq"):
            raise ValueError(f"int4_format must be matmulnbits or qdq, got {self.int4_format!r}")
        if self.min_cosine is not None and not -1.0 <= float(self.min_cosine) <= 1.0:
            raise ValueError(f"min_cosine must be in [-1, 1], got {self.min_cosine!r}")
        if self.smoothquant_alpha is not None and not 0.0 <= float(self.smoothquant_alpha) <= 1.0:
            raise ValueError(f"smoothquant_alpha must be in [0, 1], got {self.smoothquant_alpha!r}")
        for name in ("embeddings", "attention", "activation_matmuls"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    @classmethod
    def from_short(cls, arg: str | None) -> Config:
        mode = arg or "int8"
        if mode not in MODES:
            raise ValueError(f"quantize mode must be one of {', '.join(MODES)}, got {mode!r}")
        return cls(mode=mode)

    @property
    def ops(self) -> tuple[str, ...]:
        return self.op_types or DEFAULT_OP_TYPES[self.mode]


def check_not_quantized(model: Model) -> None:
    ops = sorted({n.op_type for n in model.graph.node if is_quantized_op(n.op_type)})
    if ops:
        raise UserError(f"model is already quantized (it has {', '.join(ops)})")


def prepare(model: Model, config: Config, notes: list[str]) -> Model:
    """Constant-node weights lifted to initializers; opset raised where the output needs it."""
    graph = import_graph(model)
    lifted = lift_constant_nodes(graph)
    if lifted:
        notes.append(f"lifted {lifted} Constant nodes to initializers")
    if config.mode == "int8" and "Gemm" in config.ops:
        rewritten = _gemms_as_matmul(graph, config)
        if rewritten:
            notes.append(f"{rewritten} Gemm nodes rewritten as MatMul + Add (ONNX Runtime fuses "
                         "DQ -> MatMul into integer kernels, not a float-output Gemm)")
    prepared = export_model(tidy(graph), like=model)
    needed = 10
    if config.mode == "int8" and config.per_channel:
        needed = 13
    if config.mode == "int8-dynamic":
        needed = 11
    if config.mode == "int4" and config.int4_format == "qdq":
        needed = 21
    opset = prepared.opset()
    if opset < needed:
        try:
            proto = version_converter.convert_version(prepared.proto, needed)
            if prepared.lazy:
                # The checker would look for the weights' files in the working directory; the
                # graph's consistency is what the upgrade can break, and inference checks that.
                onnx.shape_inference.infer_shapes(proto, strict_mode=True)
            else:
                onnx.checker.check_model(proto)
        except Exception as exc:  # noqa: BLE001 - the converter raises many types
            raise UserError(f"could not upgrade the model from opset {opset} to {needed} "
                                f"(needed by {config.mode}): {exc}") from None
        notes.append(f"upgraded the opset from {opset} to {needed} (needed by {config.mode}"
                     f"{' per-channel' if needed == 13 else ''})")
        prepared = Model(proto, model.source, model.external_data)
    return prepared


def plan(model: Model, config: Config) -> QuantPlan:
    """The sites of ``model`` (a prepared one) that ``config`` quantizes."""
    graph = import_graph(model)
    result = match_plan(graph, config.mode, config.ops, config.exclude, config.per_channel,
                        config.output_qdq, config.activation_matmuls)
    if config.embeddings:
        sites, skipped = quantize_gather.match(graph, config.exclude)
        result.sites += sites
        result.skipped += skipped
    _plan_attention(graph, config, result)
    if config.mode == "int8-dynamic" and "Conv" in config.ops:
        result.notes.append("int8-dynamic on Conv (ConvInteger) measured 4.5x slower and lost all "
                            "accuracy on PP-OCR: prefer static int8 for conv nets")
    return result


def _plan_attention(graph: gs.Graph, config: Config, result: QuantPlan) -> None:
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


def activation_tensors(model: Model, quant_plan: QuantPlan) -> list[str]:
    graph = import_graph(model)
    nodes = {n.name: n for n in graph.nodes}
    names = []
    for site in quant_plan.sites:
        node = nodes[site.node]
        names += [node.inputs[i].name for i in site.activation_inputs]
        if site.output_qdq:
            names.append(site.output_qdq)
    return list(dict.fromkeys(names))


def apply(model: Model, quant_plan: QuantPlan, config: Config,
          stats: dict | None = None) -> Model:
    """Rewrite the planned sites. ``stats``: calibration statistics of the activation inputs, by
    tensor name: ``(min, max)`` for static int8 (needed), ``X^T X`` for int4 with GPTQ."""
    graph = import_graph(model)
    nodes = {n.name: n for n in graph.nodes}
    tables: dict = {}
    sites = []
    for site in quant_plan.sites:  # Gather tables and fused Attention have their own rewrites
        if site.op == "Gather":
            quantize_gather.rewrite(graph, nodes[site.node], tables)
        elif site.op == "Attention":
            quantize_attention.rewrite(graph, nodes[site.node], config.per_channel)
        else:
            sites.append(site)
    if config.mode == "int8":
        writer = quantize_int8.QdqWriter(graph)
        for site in sites:
            node = nodes[site.node]
            for i in site.activation_inputs:
                scale, zp = quantize_calib.quant_params(*stats[node.inputs[i].name])
                node.inputs[i] = writer.activation(node.inputs[i], scale, zp)
            if site.weight_input is not None:  # None: activation x activation MatMul
                node.inputs[site.weight_input] = writer.weight(node.inputs[site.weight_input],
                                                               site.axis)
        tensors = graph.tensors()
        for site in sites:
            if site.output_qdq:
                tensor = tensors[site.output_qdq]
                scale, zp = quantize_calib.quant_params(*stats[tensor.name])
                quantize_int8.rewire_consumers(tensor, writer.activation(tensor, scale, zp))
    four_bit: set[str] = set()
    if config.mode != "int8":
        lazy = model.lazy
        for site in sites:
            four_bit.update(_apply_weight_only(graph, nodes[site.node], site, config, stats))
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
    return result


def _gemm_as_matmul(node: gs.Node) -> tuple[np.ndarray, np.ndarray | None]:
    """Gemm's B as a [K, N] weight with alpha folded in, and beta * C (or None)."""
    weight = np.asarray(constant_array(node.inputs[1]), np.float32)
    if int(node.attrs.get("transB", 0)):
        weight = weight.T
    weight = weight * float(node.attrs.get("alpha", 1.0))
    bias = None
    if len(node.inputs) > 2 and node.inputs[2].name:
        bias = np.asarray(constant_array(node.inputs[2]), np.float32)
        bias = bias * float(node.attrs.get("beta", 1.0))
    return weight, bias


def _gemms_as_matmul(graph: gs.Graph, config: Config) -> int:
    """Gemm (transA=0, constant B) -> MatMul(A, alpha * B') [+ Add(beta * C)], same node name."""
    count = 0
    for node in list(graph.nodes):
        if (node.op != "Gemm" or int(node.attrs.get("transA", 0)) or excluded(node, config.exclude)
                or constant_array(node.inputs[1]) is None
                or (len(node.inputs) > 2 and node.inputs[2].name
                    and constant_array(node.inputs[2]) is None)):
            continue
        weight, bias = _gemm_as_matmul(node)
        activation, output = node.inputs[0], node.outputs[0]
        node.inputs.clear()
        node.outputs.clear()
        product = output
        if bias is not None:
            product = gs.Variable(unique_name(graph, f"{output.name}_matmul"), dtype=np.float32)
            graph.nodes.append(gs.Node("Add", unique_name(graph, f"{node.name}_bias"),
                                       inputs=[product, gs.Constant(
                                           unique_name(graph, f"{node.name}_C"), bias)],
                                       outputs=[output]))
        name = node.name
        node.name = unique_name(graph, f"{name}_replaced")
        graph.nodes.append(gs.Node("MatMul", name, inputs=[activation, gs.Constant(
            unique_name(graph, f"{name}_B"), weight)], outputs=[product]))
        count += 1
    return count


def _apply_weight_only(graph: gs.Graph, node: gs.Node, site: Site, config: Config,
                       stats: dict | None = None) -> list[str]:
    """Dynamic int8 or int4 rewrite of one site; returns initializers to store as 4-bit."""
    if node.op == "Conv":  # int8-dynamic only (plan refuses Conv for int4)
        bias = constant_array(node.inputs[2]) if len(node.inputs) > 2 else None
        quantize_int8.dynamic_conv(graph, node, constant_array(node.inputs[1]), bias)
        return []
    if node.op == "Gemm":
        weight, bias = _gemm_as_matmul(node)
    else:
        weight, bias = np.asarray(constant_array(node.inputs[1]), np.float32), None
    if config.mode == "int8-dynamic":
        axis = 1 if config.per_channel else None
        quantize_int8.dynamic_matmul(graph, node, weight, axis, bias)
        return []
    positive = config.int4_format == "qdq"
    hessian = (stats or {}).get(node.inputs[0].name) if config.int4_method == "gptq" else None
    if hessian is not None:
        blocks = quantize_gptq.quantize(weight, hessian, config.block_size, config.int4_symmetric,
                                        config.int4_scale, positive)
    else:
        blocks = quantize_int4.quantize_blocks(weight, config.block_size, config.int4_symmetric,
                                               config.int4_scale, positive=positive)
    activation, output = node.inputs[0], node.outputs[0]
    node.outputs.clear()
    node.inputs.clear()
    if bias is not None:
        product = gs.Variable(unique_name(graph, f"{output.name}_nobias"), dtype=np.float32)
        graph.nodes.append(gs.Node("Add", unique_name(graph, f"{node.name}_bias"),
                                   inputs=[product, gs.Constant(unique_name(
                                       graph, f"{node.name}_C"), bias)],
                                   outputs=[output]))
        output = product
    if config.int4_format == "matmulnbits":
        # The MatMulNBits takes the layer's name, so mixed precision (and the user) can find it.
        name = node.name
        node.name = unique_name(graph, f"{name}_replaced")
        graph.nodes.append(quantize_int4.matmulnbits_node(graph, name, activation, output,
                                                          blocks, name=name))
        return []
    dq, weight_out, four_bit = quantize_int4.qdq_weight(graph, site.weight_name, blocks)
    graph.nodes += [dq, gs.Node("MatMul", unique_name(graph, f"{node.name}_int4"),
                                inputs=[activation, weight_out], outputs=[output])]
    return four_bit


def _export(graph: gs.Graph, like: Model) -> Model:
    result = export_model(graph, like=like)
    domains = {n.domain for n in result.graph.node if n.domain}
    declared = {o.domain for o in result.proto.opset_import}
    for domain in domains - declared:
        result.proto.opset_import.append(onnx.helper.make_opsetid(domain, 1))
    return result


def _statistics(model: Model, quant_plan: QuantPlan, config: Config, ctx: Context
                ) -> dict | None:
    """What ``apply`` needs from the calibration data for this mode, if anything."""
    if config.mode == "int8":
        return _ranges(model, quant_plan, config, ctx)
    if config.mode == "int4" and config.int4_method == "gptq":
        nodes = {n.name: n for n in import_graph(model).nodes}
        inputs = [nodes[s.node].inputs[0].name for s in quant_plan.sites
                  if s.op in ("MatMul", "Gemm")]
        names = list(dict.fromkeys(inputs))
        ctx.progress(f"quantize: GPTQ statistics of {len(names)} inputs on "
                     f"{len(ctx.calibration)} batches, {GPTQ_INPUTS_PER_SEGMENT} inputs a segment")

        def segment_done(done: int, total: int) -> None:
            ctx.progress(f"quantize: GPTQ statistics, segment {done}/{total}")

        return quantize_gptq.Hessians(model, names, ctx.calibration, Counter(inputs),
                                      GPTQ_INPUTS_PER_SEGMENT, segment_done)
    return None


def _ranges(model: Model, quant_plan: QuantPlan, config: Config, ctx: Context
            ) -> dict[str, tuple[float, float]]:
    names = activation_tensors(model, quant_plan)
    ctx.progress(f"quantize: calibrating {len(names)} tensors on {len(ctx.calibration)} batches")
    stats = quantize_calib.collect(model, names, ctx.calibration)
    return {name: quantize_calib.tensor_range(stats[name], config.calibration, config.percentile)
            for name in names}


def _smooth(model: Model, quant_plan: QuantPlan, config: Config, ctx: Context,
            record: PassRecord) -> Model:
    graph = import_graph(model)
    sites = quantize_smooth.find_sites(graph, {s.node for s in quant_plan.sites})
    if not sites:
        record.notes.append("smoothquant: no MatMul reads a LayerNormalization output")
        return model
    stats = quantize_calib.collect(model, [], ctx.calibration,
                                   channel_names=[s.output for s in sites])
    done = quantize_smooth.apply(graph, sites, {k: v.channel_absmax for k, v in stats.items()},
                                 float(config.smoothquant_alpha))
    record.notes.append(f"smoothquant (alpha {config.smoothquant_alpha}) on {len(done)} "
                        "LayerNormalization outputs")
    return export_model(tidy(graph), like=model)


def run(model: Model, config: Config, ctx: Context) -> tuple[Model, PassRecord]:
    record = PassRecord(NAME, params_before=model.parameter_count(),
                        bytes_before=model.weight_bytes())
    check_not_quantized(model)
    gptq = config.mode == "int4" and config.int4_method == "gptq"
    needs_data = config.mode == "int8" or config.smoothquant_alpha is not None or gptq
    if ctx.calibration is None and needs_data:
        what = ("int4 with GPTQ" if gptq else f"{config.mode}"
                f"{' with smoothquant' if config.mode != 'int8' else ''}")
        raise UserError(f"{what} needs calibration data (--calib)")
    if ctx.calibration is not None:
        calibration.check_dataset(ctx.calibration, model)
    notes: list[str] = []
    prepared = prepare(model, config, notes)
    quant_plan = plan(prepared, config)
    record.skipped = list(quant_plan.skipped)
    record.notes = notes + quant_plan.notes
    if not quant_plan.sites:
        record.notes.append(f"nothing to quantize ({config.mode}, op types {', '.join(config.ops)})")
        record.params_after, record.bytes_after = record.params_before, record.bytes_before
        return model, record
    if config.smoothquant_alpha is not None:
        prepared = _smooth(prepared, quant_plan, config, ctx, record)
    stats = _statistics(prepared, quant_plan, config, ctx)
    result = apply(prepared, quant_plan, config, stats)
    if isinstance(stats, quantize_gptq.Hessians):
        stats = None  # read once, a segment at a time: nothing to keep
    if ctx.calibration is not None:
        result, quant_plan = _measure(prepared, result, quant_plan, config, stats, ctx, record)
    else:
        record.notes.append("no calibration data: per-layer SQNR not measured")
    record.modified = True
    record.touched = [s.node for s in quant_plan.sites]
    record.skipped = list(quant_plan.skipped)
    record.params_after, record.bytes_after = result.parameter_count(), result.weight_bytes()
    record.details["plan"] = quant_plan.describe()
    # The quantized layers and their output tensors (the same names in the teacher): distill
    # uses them for bias correction.
    record.details["layers"] = [{"node": s.node, "output": s.output} for s in quant_plan.sites]
    return result, record


def _isolated_sensitivity(prepared: Model, quant_plan: QuantPlan, config: Config, fresh_stats,
                          ctx: Context) -> list[tuple[str, float]]:
    """(node, model output cosine with only that node quantized), most harmful first."""
    everything = {s.node for s in quant_plan.sites}
    scoring = ctx.evaluation or ctx.calibration
    scores = []
    for index, site in enumerate(quant_plan.sites, start=1):
        ctx.progress(f"quantize: sensitivity {index}/{len(quant_plan.sites)} {site.node}")
        alone = quant_plan.without(everything - {site.node}, "sensitivity probe")
        trial = apply(prepared, alone, config, fresh_stats())
        scores.append((site.node, quantize_eval.compare(prepared, trial, [], scoring,
                                                        SENSITIVITY_BATCHES).min_cosine))
    return sorted(scores, key=lambda item: item[1])


def _measure(prepared: Model, result: Model, quant_plan: QuantPlan, config: Config,
             stats, ctx: Context, record: PassRecord) -> tuple[Model, QuantPlan]:
    """Per-layer SQNR; then, below ``min_cosine``, return the worst layers to float."""
    scoring = ctx.evaluation or ctx.calibration
    ctx.progress(f"quantize: measuring per-layer SQNR on {scoring.name}")
    if ctx.evaluation is None and config.mode == "int4" and config.int4_method == "gptq":
        record.notes.append("SQNR and output cosine measured on the calibration data GPTQ was "
                            "fitted to: optimistic (pass held-out data with --eval)")
    outputs = {s.output: s.node for s in quant_plan.sites}
    comparison = quantize_eval.compare(prepared, result, list(outputs), scoring, EVAL_BATCHES)
    layer_sqnr = sorted(((outputs[t], comparison.sqnr.get(t, math.inf)) for t in outputs),
                        key=lambda item: item[1])
    record.details["sqnr"] = [{"node": n, "sqnr_db": round(v, 2)} for n, v in layer_sqnr]
    record.details["output_cosine"] = comparison.cosine
    if config.min_cosine is None or comparison.min_cosine >= config.min_cosine:
        return result, quant_plan
    if ctx.evaluation is not None:
        # The layer choice is fitted to this data: a fidelity check on it is optimistic.
        ctx.tuned_on_evaluation.append(NAME)
    if config.mode == "int4" and config.int4_format == "matmulnbits":
        return _mixed_bits(prepared, result, quant_plan, config, ctx, record,
                           comparison.min_cosine), quant_plan
    gptq = config.mode == "int4" and config.int4_method == "gptq"
    # SQNR inside the quantized model carries the error of every layer upstream, so it ranks
    # deep layers worst whatever their own harm (on MiniLM it pointed at attention outputs when
    # the FFN down-projections were the culprits). Rank by each layer's effect alone instead.
    # GPTQ statistics are read once by apply (a segment at a time): every trial needs them anew.
    fresh = (lambda: _statistics(prepared, quant_plan, config, ctx)) if gptq else (lambda: stats)
    ranking = _isolated_sensitivity(prepared, quant_plan, config, fresh, ctx)
    record.details["sensitivity"] = [{"node": n, "output_cosine_alone": round(c, 6)}
                                     for n, c in ranking]
    kept: list[str] = []
    cosine = comparison.min_cosine
    trial_plan, step = quant_plan, 1
    while cosine < config.min_cosine and len(kept) < len(ranking):
        kept = [n for n, _ in ranking[: min(len(ranking), len(kept) + step)]]
        step *= 2
        trial_plan = quant_plan.without(set(kept), "kept float to meet min_cosine "
                                        f"{config.min_cosine} (most sensitive)")
        if not trial_plan.sites:
            result, cosine = prepared, 1.0
            break
        result = apply(prepared, trial_plan, config, fresh())
        cosine = quantize_eval.compare(prepared, result, [], scoring, EVAL_BATCHES).min_cosine
        ctx.progress(f"quantize: {len(kept)} layers kept float, cosine {cosine:.5f}")
    quant_plan = trial_plan
    record.details["kept_float"] = kept
    record.details["output_cosine_after"] = cosine
    record.notes.append(f"mixed precision: {len(kept)} most sensitive layers kept float "
                        f"(output cosine {comparison.min_cosine:.5f} -> {cosine:.5f}, target "
                        f"{config.min_cosine})")
    if cosine < config.min_cosine:
        record.notes.append("min_cosine not reached even with every layer float")
    return result, quant_plan


def _mixed_bits(prepared: Model, result: Model, quant_plan: QuantPlan, config: Config,
                ctx: Context, record: PassRecord, baseline: float) -> Model:
    """int4 below ``min_cosine``: the most sensitive layer groups go to 8 bits (in place)."""
    layers = [s.node for s in quant_plan.sites if s.op in ("MatMul", "Gemm")]
    ctx.progress(f"quantize: mixed precision, reference outputs on {EVAL_BATCHES} batches")
    found = quantize_mixed.search(prepared, result, layers, float(config.min_cosine), baseline,
                                  ctx.evaluation or ctx.calibration, ctx.progress,
                                  EVAL_BATCHES, SENSITIVITY_BATCHES)
    record.details["mixed_groups"] = [
        {"group": s.group, "layers": len(s.layers), "cosine_at_8bit": round(s.cosine, 6),
         "gain": round(s.gain, 6), "added_bytes": s.added_bytes} for s in found.ranked]
    record.details["int8_layers"] = found.layers
    record.details["output_cosine_after"] = found.cosine
    record.notes.append(
        f"mixed precision: {len(found.layers)} of {len(layers)} layers at 8 bits "
        f"({', '.join(found.groups)}; output cosine {baseline:.5f} -> {found.cosine:.5f}, "
        f"target {config.min_cosine})")
    if found.cosine < config.min_cosine:
        record.notes.append("min_cosine not reached even with every layer at 8 bits")
    return result


def describe_plan(model: Model, config: Config, ctx: Context) -> str:
    """The ``--dry-run`` text: what would be quantized and what skipped, changing nothing."""
    notes: list[str] = []
    quant_plan = plan(prepare(model, config, notes), config)
    return "\n".join([*notes, *quant_plan.describe()])
