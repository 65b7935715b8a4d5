"""quantize: int8 static QDQ, int8 dynamic, int4 weight-only blockwise; fp16 / bf16 (half.py).

Plan, then apply. ``plan`` refuses a model already quantized, prepares a copy (Constant-node
weights lifted, Gemm as MatMul for static int8, opset raised: ``prepare.py``) and finds the sites
in it: Conv/MatMul/Gemm nodes with a constant weight (``match.py``), Gather tables, fused
Attention nodes, each other node with the reason it is skipped. ``apply`` rewrites them in one
place (``rewrite.py``):
- ``int8``: uint8 per-tensor activations (calibrated: minmax, percentile, entropy, mse) and int8
  symmetric per-channel weights as QuantizeLinear/DequantizeLinear pairs on the inputs of the
  planned nodes (and on Conv outputs, ``output_qdq="conv"``), the form ONNX Runtime fuses into
  QLinearConv / QLinearMatMul / MatMulIntegerToFloat; a conv net's feature-map Adds,
  squeeze-excitation Muls and Concats too (``conv_adds``: QLinearAdd / QLinearMul /
  QLinearConcat; ``placement.py``, which also places the output pairs); a tensor only
  saturating ops read (HardSwish below -3, ...) calibrated as clipped there
  (``saturation_ranges``); a HardSwish between two pairs as QLinearAdd + QLinearMul
  (``integer_hardswish``, ``hardswish.py``). Needs calibration data.
- ``int8-dynamic``: int8 weights, activations quantized at run time (DynamicQuantizeLinear +
  MatMulInteger, fused by ONNX Runtime into DynamicQuantizeMatMul). MatMul/Gemm by default.
- ``int4``: blockwise 4-bit MatMul weights, as com.microsoft.MatMulNBits or opset-21 QDQ; with
  ``int4_method="gptq"`` the blocks compensate each other's error on calibration data.
- every mode (``embeddings``): Gather tables as int8 rows, one scale per row, dequantized after
  the gather (``gather.py``); int8-dynamic (``attention``): the fuse pass's
  com.microsoft.Attention -> QAttention (``attention.py``); other modes leave it float, noted.
- every integer mode: LSTM/GRU/RNN ``W`` and ``R`` as int8 rows (``recurrent.py``): int8-dynamic
  LSTMs as com.microsoft.DynamicQuantizeLSTM, the rest weight-only (int8 -> Cast -> Mul, which
  ONNX Runtime folds at load: float compute; int4 keeps them at 8 bits).
Before the rewrite, for static int8 with per-channel weights (``depthwise_equalize``, on by
default): each depthwise Conv's input channels brought to one range, the inverse in its weights
(``depthwise.py``, an exact float rewrite measured on the calibration data). When asked:
cross-layer equalization of Conv -> Relu-like -> Conv chains
(``equalize.py``, an exact float rewrite, listed in the plan's notes), SmoothQuant
(``smooth.py``), int8 GPTQ of MatMul/Gemm and pointwise Conv weights (``gptq_int8.run_int8``),
bias correction of each layer's error mean (``bias.py``).
Then, with calibration data (scored on the held-out ``ctx.evaluation`` when given): per-layer
SQNR, and with ``min_cosine`` automatic mixed precision (``fidelity.py``): int8 modes return the
layers most harmful on their own to float; int4 raises the most sensitive layer groups to 8 bits
(``mixed.py``). Large models (weights on disk) are calibrated and measured a segment at a time.

Each quantized site is handed to later passes as a ``LayerChange`` with ``repair="bias"``: its
weights are on the quantization grid, so distill may only correct the bias.
Refuses models already quantized. Weights inside If/Loop/Scan bodies (nested ones too) are
quantized in their own body by every integer mode; static int8 calibrates them on each body run
alone on the values it got from the calibration data (``onnxcomp.subgraphs``), and keeps float,
saying so per node, the sites of a body the data never ran (an If branch not taken). A weight read by several
nodes is quantized once and shared (``rewrite.py``). An output whose weights came out larger
than the input's says so in a loud note (``graph.size_note``).
"""

from __future__ import annotations

from onnxcomp import calibration
from onnxcomp.graph import import_graph, proto_scopes, size_note
from onnxcomp.model import Model

# Modules by name (not their functions): a package attribute named like a submodule would hide it.
from onnxcomp.passes.quantize import (
    activations,
    bias,
    constants,
    depthwise,
    equalize,
    every_op,
    fidelity,
    gptq_int8,
    half,
    hardswish,
    overflow,
    prepare,
    ranges,
    recurrent,
    rewrite,
    stats,
)
from onnxcomp.passes.quantize.config import HALF_MODES, INTEGER_MODES, MODES, NAME, Config
from onnxcomp.passes.quantize.gptq import Hessians
from onnxcomp.passes.quantize.match import QuantPlan, Site, reached
from onnxcomp.passes.quantize.prepare import Planned
from onnxcomp.pipeline import (
    SKIP,
    Applied,
    Capabilities,
    Context,
    LayerChange,
    PassSpec,
    Plan,
    PlanRow,
)

__all__ = ["HALF_MODES", "INTEGER_MODES", "MODES", "NAME", "PASS", "Config", "apply", "plan"]


# every_op in uint8 below this output cosine says that uint16 activations exist (measured:
# MiniLM .843 -> .998, PP-OCRv4 rec line accuracy .61 -> .95 with them).
EVERY_OP_HINT_COSINE = 0.99


def _action(site: Site, config: Config) -> str:
    """What the rewrite will do to one site, as a plan row says it."""
    if site.op == "Gather" and site.weight_input is not None:  # else every_op's activations
        return "int8 table (Gather)"
    if site.op == "Attention":
        return f"QAttention ({'per-channel' if config.per_channel else 'per-tensor'})"
    if site.op in recurrent.OPS:
        return recurrent.action(site)
    if config.mode == "int8":
        if site.weight_input is None:
            action = ("quantize int8 activation x activation" if site.op == "MatMul"
                      else "quantize int8 activation inputs")
        else:
            action = f"quantize int8 {'per-channel' if site.axis is not None else 'per-tensor'}"
        return action + (" + output QDQ" if site.output_qdq else "")
    if config.mode == "int8-dynamic":
        if site.op == "Conv":
            return "int8-dynamic ConvInteger"
        return f"int8-dynamic {'per-channel' if config.per_channel else 'per-tensor'}"
    form = "MatMulNBits" if config.int4_format == "matmulnbits" else "QDQ"
    method = " GPTQ" if config.gptq else ""
    symmetry = "" if config.int4_symmetric else " asymmetric"
    return f"int4{method} block {config.block_size}{symmetry} {form}"


def _equalizes_depthwise(config: Config) -> bool:
    """Depthwise input equalization is free only with per-channel weights, and only helps
    where activations are quantized (static int8); not with ``constant_inputs``: its
    per-channel factors land in the Mul/Add/normalization constants before the depthwise Conv,
    which that stores per tensor (``DEPTHWISE_WITH_CONSTANTS``)."""
    return config.mode == "int8" and config.per_channel and config.depthwise_equalize \
        and not config.constant_inputs


# Measured with the qnn target in uint8 (QDQ math, 8 held-out batches): PP-OCRv4 det map
# cosine .915 with equalization, .990 without; rec probabilities .855 / .958.
DEPTHWISE_WITH_CONSTANTS = (
    "depthwise_equalize: not applied with constant_inputs (the per-channel factors it moves "
    "into the constants before each depthwise Conv, up to 700x apart on PP-OCRv4 det, would be "
    "stored per tensor: det map cosine .915 with it, .990 without)")


def plan(model: Model, config: Config, ctx: Context) -> Plan:
    """The sites ``config`` would quantize and the nodes it skips, with reasons; pure (the
    prepared copy of ``model`` travels in the payload for ``apply``)."""
    prepare.check_not_quantized(model)
    if ctx.calibration is not None:
        calibration.check_dataset(ctx.calibration, model)
    notes: list[str] = []
    prepared = prepare.prepare(model, config, notes)
    if config.mode in HALF_MODES:
        return half.plan(prepared, config, notes)
    sites = prepare.find_sites(prepared, config)
    recurrent.extend(prepared, config, sites)  # LSTM/GRU/RNN W and R
    result = Plan(NAME, config, notes=notes + sites.notes, payload=Planned(prepared, sites))
    result.rows = [PlanRow(s.node, _action(s, config),
                           f"weight {s.weight_name}" if s.weight_name else "")
                   for s in sites.sites]
    result.rows += [PlanRow(node, SKIP, reason) for node, reason in sites.skipped]
    if config.equalize:  # what apply will equalize, counted by activation and skip reason
        graph = import_graph(prepared)
        chains, refused = equalize.find_chains(graph, {s.node for s in sites.sites})
        result.notes.append(equalize.summary(chains, refused, {n.name: n for n in graph.nodes}))
    if config.mode == "int8" and config.per_channel and config.depthwise_equalize:
        # What apply will equalize (ranges from calibration data), or why it will not.
        found, refused = depthwise.find_sites(import_graph(prepared),
                                              {s.node for s in sites.sites})
        if found and not _equalizes_depthwise(config):
            result.notes.append(DEPTHWISE_WITH_CONSTANTS)
        elif found or refused:
            result.notes.append(depthwise.summary(found, refused))
    if not sites.sites:
        result.notes.append(_nothing_to_quantize(prepared, config))
    return result


# Ops that carry a model's weights, for the "nothing to quantize" hint.
_WEIGHTED_OPS = ("Conv", "ConvTranspose", "MatMul", "Gemm", *recurrent.OPS)


def _nothing_to_quantize(prepared: Model, config: Config) -> str:
    """The plan's note when no site was found: what the mode covers, what the model computes
    with, and the mode that would take it (a conv net under int8-dynamic or int4)."""
    counts: dict[str, int] = {}
    for body, _ in proto_scopes(prepared.graph):
        for node in body.node:
            if node.op_type in _WEIGHTED_OPS:
                counts[node.op_type] = counts.get(node.op_type, 0) + 1
    covered = config.ops + (() if config.op_types is not None else recurrent.OPS)
    note = f"nothing to quantize: {config.mode} quantizes {'/'.join(covered)} weights only"
    if not counts:
        return note + "; this model has none of " + "/".join(_WEIGHTED_OPS)
    compute = ", ".join(f"{op} ({n})" for op, n in sorted(counts.items(), key=lambda i: -i[1]))
    note += f"; this model's compute is {compute}"
    if set(counts) & set(covered):
        return note + ": every such node was skipped (the skip rows say why)"
    if config.mode != "int8" and set(counts) <= {"Conv", "ConvTranspose"}:
        return note + ": use quantize:int8 (static, calibrated) or quantize:fp16"
    return note


def apply(model: Model, plan_: Plan, ctx: Context) -> Applied:
    """Rewrite the planned sites of the prepared model (first, when asked: cross-layer
    equalization, SmoothQuant, int8 GPTQ, bias correction), then measure; ``min_cosine`` may
    return sites to float (recorded as skipped here)."""
    config: Config = plan_.config
    if config.mode in HALF_MODES:
        return half.apply(model, plan_, ctx)
    planned: Planned = plan_.payload
    quant_plan = planned.sites
    applied = Applied(model, modified=False)
    if not quant_plan.sites:
        return applied
    prepared = planned.prepared
    if config.equalize:
        # Its note is already the plan's (the chains found are the same).
        prepared = equalize.run(prepared, {s.node for s in quant_plan.sites}, [])
    if _equalizes_depthwise(config) and ctx.calibration is not None:
        # After equalization, which may rescale the same convs: each rewrite is exact.
        prepared = depthwise.run(prepared, {s.node for s in quant_plan.sites}, ctx.calibration,
                                 applied.notes)
    smoothing = config.smoothing(ctx.calibration is not None)
    # Asked for, it says when it found nothing. The int8 modes' default acts on transformers (a
    # planned MatMul reads a LayerNormalization), where it was measured, and stays quiet else.
    by_default = config.smoothquant_alpha is None
    if smoothing is not None and (not by_default or stats.smoothable(
            prepared, quant_plan, "norm")):
        prepared = stats.smooth(prepared, quant_plan, smoothing[0], ctx, applied.notes,
                                smoothing[1], quiet=by_default)
    elif smoothing is None and config.mode == "int8-dynamic" and config.dynamic_smoothquant \
            and stats.smoothable(prepared, quant_plan, "norm"):  # said for transformers only
        applied.notes.append("int8-dynamic: SmoothQuant needs calibration data (--calib): "
                             "not applied; with it transformers are more faithful (MiniLM "
                             "held-out sentence cosine 0.9938 -> 0.9985)")
    if config.mode == "int8" and config.every_op and prepared is not planned.prepared:
        # The rewrites above (SmoothQuant's Muls) added ops the plan's every_op did not see.
        quant_plan = QuantPlan(quant_plan.mode, list(quant_plan.sites), list(quant_plan.skipped),
                               list(quant_plan.notes))
        every_op.sites(import_graph(prepared), every_op.float_tensors(prepared.proto),
                       quant_plan, config.exclude)
    if config.int8_gptq:  # weights onto the int8 grid, compensated; bias correction sees them
        # Pointwise Convs too in static int8 (per-channel int8 weights there, like its grid).
        gptq_sites = [s for s in quant_plan.sites if s.op != "Conv" or config.mode == "int8"]
        seen = (config.calibration, config.percentile) if config.mode == "int8" else None
        prepared, left = gptq_int8.run_int8(prepared, gptq_sites, ctx.calibration,
                                       applied.notes, ctx.progress, seen)
        applied.details["int8_gptq_skipped"] = [{"node": n, "why": w} for n, w in left]
    collected = None
    if config.bias_correction != "none":  # last: it corrects the weights as they are stored
        if config.mode == "int8" and config.bias_correction == "all":
            # The input ranges first, so that their rounding and clipping is corrected too;
            # they are kept (the output ranges move by the small correction only).
            collected = stats.statistics(prepared, recurrent.calibrated(quant_plan), config,
                                         ctx)
        prepared, left = bias.run(prepared, quant_plan.sites, config, ctx.calibration,
                                  applied.notes, ctx.progress, collected)
        applied.details["bias_correction_skipped"] = [{"node": n, "why": w} for n, w in left]
    if collected is None:
        collected = stats.statistics(prepared, recurrent.calibrated(quant_plan), config, ctx)
    saturated = getattr(collected, "saturated", None)
    if saturated:
        applied.notes.append(f"calibrated {len(saturated)} tensors that only saturating ops "
                             f"read (HardSwish, HardSigmoid, Relu, Clip) as clipped at their "
                             f"bounds, ranges chosen by the readers' output error")
    if config.mode == "int8":  # body sites no calibration data reached stay float, said so
        quant_plan = reached(quant_plan, collected, import_graph(prepared))
    if config.mode == "int8" and config.every_op:
        quant_plan, masks = every_op.without_masks(import_graph(prepared), quant_plan, collected)
        if masks:
            applied.notes.append(f"every_op: {len(masks)} tensors whose range reaches "
                                 f"{every_op.MASK_MAGNITUDE:g} (masks) left float: "
                                 f"{', '.join(masks[:5])}{' ...' if len(masks) > 5 else ''}")
    result = rewrite.rewrite(prepared, quant_plan, config, collected)
    if isinstance(collected, Hessians):
        collected = None  # read once, a segment at a time: nothing to keep
    if config.range_search:
        result = _search_ranges(prepared, result, config, ctx, applied)
    final = quant_plan
    if ctx.calibration is not None:
        result, final = fidelity.measure(prepared, result, quant_plan, config, collected, ctx,
                                         applied)
    else:
        applied.notes.append("no calibration data: per-layer SQNR not measured")
    cosines = applied.details.get("output_cosine") or {}
    if config.every_op and config.activation_dtype == "uint8" and cosines and \
            min(cosines.values()) < EVERY_OP_HINT_COSINE:
        applied.notes.append(
            f"every_op: with 8-bit activations everywhere the output cosine is "
            f"{min(cosines.values()):.3f} here; 16-bit ones (--set "
            f"quantize.activation_dtype=uint16, QNN HTP's A16W8) measured at float's level on "
            f"transformers and text recognizers (docs/targets.md)")
    if config.range_search and len(final.sites) != len(quant_plan.sites):
        # Each mixed-precision trial is a fresh rewrite from the calibrated ranges.
        applied.notes.append("range_search: min_cosine returned layers to float, and that "
                             "model was rewritten from the calibrated ranges: the searched "
                             "ranges are not in the result")
    if config.activation_dtype != "uint8" and config.mode == "int8" and \
            config.u8s8_overflow != "none":
        applied.notes.append(
            "u8s8_overflow: not checked with int8 activations (it reads uint8 ones; ONNX "
            "Runtime on x86 runs int8 ones through the same kernels shifted to uint8): set "
            "quantize.u8s8_overflow=none to silence this" if config.activation_dtype == "int8"
            else "u8s8_overflow: not needed with uint16 activations (ONNX Runtime's CPU "
                 "provider computes 16-bit Q/DQ in float, no saturating integer kernel)")
    elif config.mode in ("int8", "int8-dynamic") and final.sites:  # exact: after measuring
        keeps = None if ctx.calibration is None else (
            lambda exact, widened: fidelity.widening_keeps(prepared, exact, widened, config, ctx))
        result = overflow.run(result, config.u8s8_overflow, ctx.calibration, applied.notes,
                              applied.details, config.u8s8_remedy, keeps)
    kept_float = {s.node for s in planned.sites.sites} - {s.node for s in final.sites}
    applied.skipped = [(node, why) for node, why in final.skipped if node in kept_float]
    applied.details["plan"] = final.describe()
    integer = hardswish.count(result.proto.graph)
    if integer:
        applied.notes.append(f"{integer} HardSwish run on uint8 as QLinearAdd + QLinearMul "
                             f"(x * clip(x/6 + 1/2, 0, 1); integer_hardswish)")
    retyped = activations.count(result.proto.graph, config.activation_dtype)
    signed_pairs = activations.count(result.proto.graph, "int8")
    if config.activation_dtype != "uint8" and retyped:
        kind = "symmetric int8" if config.activation_dtype == "int8" else "uint16"
        applied.notes.append(f"{retyped} activation QDQ pairs in {kind} (activation_dtype = "
                             f"{config.activation_dtype})")
    elif signed_pairs:
        applied.notes.append(f"{signed_pairs} feature-map QDQ pairs in symmetric int8, pooling "
                             f"and nearest Resizes reading the pairs (signed_feature_maps, "
                             f"for OpenVINO)")
    if config.constant_inputs and final.sites:
        still = constants.float_data_inputs(result.proto.graph)
        applied.notes.append(
            f"constant_inputs: {constants.count(result.proto.graph)} float constants the "
            f"quantized ops read stored quantized behind DequantizeLinear" + (
                f"; {len(still)} left float: {', '.join(f'{n} <- {i}' for n, i in still[:4])}"
                if still else ""))
    if not final.sites:  # every site went back to float to meet min_cosine
        return applied
    applied.model, applied.modified = result, True
    applied.touched = [s.node for s in final.sites]
    grew = size_note(model, result, NAME)
    if grew:
        applied.notes.append(grew)
    # Each site's output keeps its name in the student: the teacher has the same tensor (but
    # for a Gemm rewritten as MatMul + Add, whose product before the bias is new; distill
    # skips it, saying so).
    applied.changes = [LayerChange(s.node, NAME, s.output, repair="bias") for s in final.sites]
    return applied


def _search_ranges(prepared: Model, result: Model, config: Config, ctx: Context,
                   applied: Applied) -> Model:
    """``range_search``: the activation ranges scaled where the model output gains (ranges.py);
    said plainly where it cannot act."""
    if config.mode != "int8":
        applied.notes.append(f"range_search: static int8 only (activation ranges), not applied "
                             f"to {config.mode}")
        return result
    if ctx.calibration is None:
        applied.notes.append("range_search: needs calibration data (--calib), not applied")
        return result
    if not ranges.fits_in_memory(result):
        applied.notes.append("range_search: the model does not fit one in-memory ONNX Runtime "
                             "session, not applied")
        return result
    tuned, chosen, (before, after) = ranges.search(prepared, result, ctx.calibration,
                                                   ctx.progress)
    applied.details["range_search"] = [{"scale": name, "factor": factor}
                                       for name, factor in chosen.items()]
    tunable = len(ranges.tunable_scales(result.graph))
    applied.notes.append(f"range_search: {len(chosen)} of {tunable} activation ranges rescaled, "
                         f"model output error {before:.4g} -> {after:.4g} on the calibration "
                         f"data")
    return tuned


# Reads weights through gs constants only: works on models whose weights stay on disk.
PASS = PassSpec(NAME, Config, plan, apply,
                Capabilities(lazy_weights=True, needs_calibration=Config.needs_calibration,
                             notes="refuses models already quantized; static int8 keeps "
                                   "float the If branches / Loop bodies the calibration data "
                                   "never ran"),
                summary="int8 static QDQ (calibrated), int8 dynamic, int4 weight-only blocks; "
                        "Gather tables as int8 rows; mixed precision to a min_cosine")
