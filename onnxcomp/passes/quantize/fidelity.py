"""How close the quantized model stays to float, and automatic mixed precision to a target.

With calibration data (scored on the held-out ``ctx.evaluation`` when given), after the rewrite:
- per-layer SQNR of every site's output and the model output cosine (``onnxcomp.measure.compare``,
  the one numeric comparison), reported in the record's details;
- below ``min_cosine``, int8 modes return the layers most harmful *on their own* to float (each
  site scored by the output cosine with only it quantized, then the fewest from the top, doubling,
  that meet the target); with ``keep_float_by = "latency"`` the order is harm per millisecond
  the layer's int8 form saves (``latency.py``: ONNX Runtime's profiler on this model), and
  layers slower in int8 than float return to float first, whatever ``min_cosine``; int4 MatMulNBits raises the most sensitive layer groups to 8 bits
  (``mixed.search``). Either choice is fitted to the scoring data: when that is ``--eval``, the
  pass says so in ``ctx.tuned_on_evaluation``.
"""

from __future__ import annotations

import math

from onnxcomp.measure import compare
from onnxcomp.model import Model
from onnxcomp.passes.quantize import latency as quantize_latency
from onnxcomp.passes.quantize import mixed as quantize_mixed
from onnxcomp.passes.quantize.config import NAME, Config
from onnxcomp.passes.quantize.match import QuantPlan
from onnxcomp.passes.quantize.rewrite import rewrite
from onnxcomp.passes.quantize.stats import statistics
from onnxcomp.pipeline import Applied, Context

# Below this output cosine on the scoring data the pass says loudly that the result is not
# usable (PP-OCRv4 rec with calibration = entropy: 0.47), whatever min_cosine.
FAR_FROM_FLOAT = 0.9
# Batches of calibration data used for SQNR and the mixed-precision search.
EVAL_BATCHES = 16
# u8s8_remedy = auto keeps widened weight scales while the model's output error (1 - cosine) stays
# within this factor of the exact (uint8-weight) model's. Measured on 16 eval batches (AMD EPYC,
# AVX2; docs/quantize.md): PP-OCRv4 det x1.013 (14 layers), rec x0.95 (3), MiniLM static x1.024
# (18), int8-dynamic x1.014 (17): a quarter more is a clear margin over that and still a small
# loss where it is taken.
WIDEN_ERROR_GROWTH = 1.25
WIDEN_ERROR_FLOOR = 1e-5
# Batches per layer for the one-layer-at-a-time sensitivity probe of mixed precision.
SENSITIVITY_BATCHES = 8


def measure(prepared: Model, result: Model, quant_plan: QuantPlan, config: Config, stats,
            ctx: Context, applied: Applied) -> tuple[Model, QuantPlan]:
    """Per-layer SQNR; then, below ``min_cosine``, the mixed precision that meets it: the model
    and the sites finally quantized (int8 modes: fewer than planned)."""
    scoring = ctx.evaluation or ctx.calibration
    savings = None
    if config.keep_float_by == "latency" and config.mode == "int8":
        result, quant_plan, savings = _drop_slower(prepared, result, quant_plan, config, stats,
                                                   ctx, applied)
    ctx.progress(f"quantize: measuring per-layer SQNR on {scoring.name}")
    if ctx.evaluation is None and config.gptq:
        applied.notes.append("SQNR and output cosine measured on the calibration data GPTQ was "
                             "fitted to: optimistic (pass held-out data with --eval)")
    # Tensors inside If/Loop bodies can't be fetched from the model: those sites count only
    # through the model outputs.
    outputs = {s.output: s.node for s in quant_plan.sites if s.owner is None}
    comparison = compare.compare(prepared, result, list(outputs), scoring, EVAL_BATCHES)
    layer_sqnr = sorted(((outputs[t], comparison.sqnr.get(t, math.inf)) for t in outputs),
                        key=lambda item: item[1])
    applied.details["sqnr"] = [{"node": n, "sqnr_db": round(v, 2)} for n, v in layer_sqnr]
    applied.details["output_cosine"] = comparison.cosine
    if comparison.min_cosine < FAR_FROM_FLOAT:
        applied.notes.append(
            f"WARNING: the quantized outputs are far from float's on {scoring.name} (output "
            f"cosine {comparison.min_cosine:.3f}): the ranges or the mode do not suit this model "
            f"(calibration = {config.calibration}; the default is mse), or set min_cosine to "
            f"return the most harmful layers to float")
    if config.min_cosine is None or comparison.min_cosine >= config.min_cosine:
        return result, quant_plan
    if ctx.evaluation is not None:
        # The layer choice is fitted to this data: a fidelity check on it is optimistic.
        ctx.tuned_on_evaluation.append(NAME)
    if config.mode == "int4" and config.int4_format == "matmulnbits":
        return _mixed_bits(prepared, result, quant_plan, config, ctx, applied,
                           comparison.min_cosine), quant_plan
    return _keep_float(prepared, result, quant_plan, config, stats, ctx, applied,
                       comparison.min_cosine, savings)


def widening_keeps(prepared: Model, exact: Model, widened: Model, config: Config,
                   ctx: Context) -> tuple[bool, str]:
    """``u8s8_remedy = auto``: whether the widened-scale model stays as close to float as the
    exact one: its output error (1 - cosine) at most ``WIDEN_ERROR_GROWTH`` times the exact
    model's (plus ``WIDEN_ERROR_FLOOR``), and ``min_cosine`` still met; the figures in words."""
    scoring = ctx.evaluation or ctx.calibration
    ctx.progress(f"quantize: checking widened weight scales on {scoring.name}")
    reference = compare.Reference(prepared, scoring, EVAL_BATCHES)
    before, after = reference.min_cosine(exact), reference.min_cosine(widened)
    kept = 1 - after <= WIDEN_ERROR_GROWTH * (1 - before) + WIDEN_ERROR_FLOOR and (
        config.min_cosine is None or after >= config.min_cosine)
    return kept, f"output cosine {before:.5f} exact, {after:.5f} widened on {scoring.name}"


def _fresh_stats(prepared: Model, quant_plan: QuantPlan, config: Config, stats, ctx: Context):
    # GPTQ statistics are read once by rewrite (a segment at a time): every trial needs them anew.
    return ((lambda: statistics(prepared, quant_plan, config, ctx)) if config.gptq
            else (lambda: stats))


def _drop_slower(prepared: Model, result: Model, quant_plan: QuantPlan, config: Config, stats,
                 ctx: Context, applied: Applied
                 ) -> tuple[Model, QuantPlan, dict[str, float | None]]:
    """``keep_float_by = "latency"``: profile float and int8 (``latency.py``); layers whose
    int8 form is slower than float on this model return to float whatever ``min_cosine``."""
    if prepared.lazy:
        applied.notes.append("keep_float_by = latency: not measured (the weights stay on disk: "
                             "the profiles would load the whole model)")
        return result, quant_plan, {}
    ctx.progress("quantize: profiling float and int8 per layer (ONNX Runtime, 1 thread)")
    feeds = ctx.calibration.make_batch(0)
    nodes = {n.name: n for n in prepared.graph.node}
    inputs_of = {s.node: [nodes[s.node].input[i] for i in s.activation_inputs]
                 for s in quant_plan.sites if s.node in nodes}
    savings = quantize_latency.site_savings(
        quantize_latency.profile_ms(prepared, feeds), quantize_latency.profile_ms(result, feeds),
        quant_plan.sites, inputs_of, quantize_latency.float_names(prepared, quant_plan.sites))
    applied.details["latency_saved_ms"] = [
        {"node": n, "saved_ms": None if v is None else round(v, 4)} for n, v in savings.items()]
    slower = {n for n, v in savings.items() if v is not None and v < 0}
    unmeasured = sum(1 for v in savings.values() if v is None)
    if unmeasured:
        applied.notes.append(f"keep_float_by = latency: {unmeasured} layers not found in the "
                             "profiles (kept in harm order)")
    if not slower:
        return result, quant_plan, savings
    quant_plan = quant_plan.without(slower, "slower in int8 than float on this model (ONNX "
                                    "Runtime profile, 1 thread)")
    if quant_plan.sites:
        result = rewrite(prepared, quant_plan, config,
                         _fresh_stats(prepared, quant_plan, config, stats, ctx)())
    else:
        result = prepared
    applied.notes.append(f"keep_float_by = latency: {len(slower)} layers slower in int8 than "
                         f"float kept float ({', '.join(sorted(slower)[:5])}"
                         f"{' ...' if len(slower) > 5 else ''})")
    return result, quant_plan, savings


def _isolated_sensitivity(prepared: Model, quant_plan: QuantPlan, config: Config, fresh_stats,
                          ctx: Context) -> list[tuple[str, float]]:
    """(node, model output cosine with only that node quantized), most harmful first."""
    everything = {s.node for s in quant_plan.sites}
    scoring = ctx.evaluation or ctx.calibration
    scores = []
    for index, site in enumerate(quant_plan.sites, start=1):
        ctx.progress(f"quantize: sensitivity {index}/{len(quant_plan.sites)} {site.node}")
        alone = quant_plan.without(everything - {site.node}, "sensitivity probe")
        trial = rewrite(prepared, alone, config, fresh_stats())
        scores.append((site.node, compare.compare(prepared, trial, [], scoring,
                                                  SENSITIVITY_BATCHES).min_cosine))
    return sorted(scores, key=lambda item: item[1])


def _keep_float(prepared: Model, result: Model, quant_plan: QuantPlan, config: Config, stats,
                ctx: Context, applied: Applied, baseline: float,
                savings: dict[str, float | None] | None = None) -> tuple[Model, QuantPlan]:
    """int8 modes below ``min_cosine``: the most harmful layers return to float."""
    scoring = ctx.evaluation or ctx.calibration
    # SQNR inside the quantized model carries the error of every layer upstream, so it ranks
    # deep layers worst whatever their own harm (on MiniLM it pointed at attention outputs when
    # the FFN down-projections were the culprits). Rank by each layer's effect alone instead.
    # GPTQ statistics are read once by rewrite (a segment at a time): every trial needs them anew.
    fresh = _fresh_stats(prepared, quant_plan, config, stats, ctx)
    ranking = _isolated_sensitivity(prepared, quant_plan, config, fresh, ctx)
    applied.details["sensitivity"] = [{"node": n, "output_cosine_alone": round(c, 6)}
                                      for n, c in ranking]
    if savings:  # latency-aware: harm per millisecond saved (the report shows the ranking)
        ordered = quantize_latency.ranking(ranking, savings)
        applied.details["harm_cost_ranking"] = [
            {"node": n, "output_cosine_alone": round(c, 6),
             "saved_ms": None if v is None else round(v, 4)} for n, c, v in ordered]
        ranking = [(n, c) for n, c, _ in ordered]
    kept: list[str] = []
    cosine = baseline
    trial_plan, step = quant_plan, 1
    while cosine < config.min_cosine and len(kept) < len(ranking):
        kept = [n for n, _ in ranking[: min(len(ranking), len(kept) + step)]]
        step *= 2
        trial_plan = quant_plan.without(set(kept), "kept float to meet min_cosine "
                                        f"{config.min_cosine} (most sensitive)")
        if not trial_plan.sites:
            result, cosine = prepared, 1.0
            break
        result = rewrite(prepared, trial_plan, config, fresh())
        cosine = compare.compare(prepared, result, [], scoring, EVAL_BATCHES).min_cosine
        ctx.progress(f"quantize: {len(kept)} layers kept float, cosine {cosine:.5f}")
    applied.details["kept_float"] = kept
    applied.details["output_cosine_after"] = cosine
    applied.notes.append(f"mixed precision: {len(kept)} most sensitive layers kept float "
                         f"(output cosine {baseline:.5f} -> {cosine:.5f}, target "
                         f"{config.min_cosine})")
    if cosine < config.min_cosine:
        applied.notes.append("min_cosine not reached even with every layer float")
    return result, trial_plan


def _mixed_bits(prepared: Model, result: Model, quant_plan: QuantPlan, config: Config,
                ctx: Context, applied: Applied, baseline: float) -> Model:
    """int4 below ``min_cosine``: the most sensitive layer groups go to 8 bits (in place)."""
    layers = [s.node for s in quant_plan.sites if s.op in ("MatMul", "Gemm") and s.owner is None]
    ctx.progress(f"quantize: mixed precision, reference outputs on {EVAL_BATCHES} batches")
    found = quantize_mixed.search(prepared, result, layers, float(config.min_cosine), baseline,
                                  ctx.evaluation or ctx.calibration, ctx.progress,
                                  EVAL_BATCHES, SENSITIVITY_BATCHES)
    applied.details["mixed_groups"] = [
        {"group": s.group, "layers": len(s.layers), "cosine_at_8bit": round(s.cosine, 6),
         "gain": round(s.gain, 6), "added_bytes": s.added_bytes} for s in found.ranked]
    applied.details["int8_layers"] = found.layers
    applied.details["output_cosine_after"] = found.cosine
    applied.notes.append(
        f"mixed precision: {len(found.layers)} of {len(layers)} layers at 8 bits "
        f"({', '.join(found.groups)}; output cosine {baseline:.5f} -> {found.cosine:.5f}, "
        f"target {config.min_cosine})")
    if found.cosine < config.min_cosine:
        applied.notes.append("min_cosine not reached even with every layer at 8 bits")
    return result
