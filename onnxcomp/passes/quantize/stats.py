"""What the quantize rewrite needs from the calibration data, by mode.

- static int8: the ``(min, max)`` range (``calibration`` method) of every activation input and
  planned output QDQ tensor, streamed through the model once (``calib.collect``);
- int4 with GPTQ: ``X^T X`` of every MatMul input, a few inputs a segment of the model at a
  time and read once (``gptq.Hessians``);
- SmoothQuant (``smoothquant_alpha``, or int8-dynamic's default with calibration data):
  per-channel max |x| of LayerNormalization outputs, then
  the scales migrated into gamma/beta and the MatMul weights (``smooth``), before the above.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from onnxcomp.graph import constant_array, export_model, graph_nodes, import_graph, tidy
from onnxcomp.model import Model
from onnxcomp.passes.quantize import calib as quantize_calib
from onnxcomp.passes.quantize import every_op, placement
from onnxcomp.passes.quantize import gptq as quantize_gptq
from onnxcomp.passes.quantize import smooth as quantize_smooth
from onnxcomp.passes.quantize.config import Config
from onnxcomp.passes.quantize.match import QuantPlan
from onnxcomp.pipeline import Context

# GPTQ statistics are collected this many MatMul inputs at a time (a decoder block has four).
GPTQ_INPUTS_PER_SEGMENT = 4


def activation_tensors(model: Model, quant_plan: QuantPlan) -> list[str]:
    """The tensors static int8 calibrates: planned activation inputs and output QDQ tensors."""
    graph = import_graph(model)
    nodes = {n.name: n for n, _ in graph_nodes(graph) if n.name}  # body sites too
    names = []
    for site in quant_plan.sites:
        node = nodes[site.node]
        names += [node.inputs[i].name for i in site.activation_inputs]
        if site.output_qdq:
            names.append(site.output_qdq)
    return list(dict.fromkeys(names))


def statistics(model: Model, quant_plan: QuantPlan, config: Config, ctx: Context
               ) -> dict | None:
    """What ``rewrite`` needs from the calibration data for this mode, if anything."""
    if config.mode == "int8":
        return _ranges(model, quant_plan, config, ctx)
    if config.gptq:
        nodes = {n.name: n for n in import_graph(model).nodes}
        # Inputs inside If/Loop bodies are not graph tensors: those sites round to nearest.
        inputs = [nodes[s.node].inputs[0].name for s in quant_plan.sites
                  if s.op in ("MatMul", "Gemm") and s.owner is None]
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
    # Tensors inside If/Loop/Scan bodies are calibrated on each body run alone; those of a body
    # the data never ran get no range (``match.reached`` keeps their sites float).
    stats, missing = quantize_calib.collect_scoped(model, names, ctx.calibration)
    # A tensor only saturating ops read (HardSwish below -3, ...) is calibrated as clipped at
    # their bound, which stays put (the values piled up there must stay exact), and its range is
    # chosen by the error of what the readers compute.
    saturated = (placement.saturation_bounds(model.proto.graph, names)
                 if config.saturation_ranges else {})
    fixed = {}
    for name, bound in list(saturated.items()):
        if name not in stats or not np.isfinite(stats[name].minimum):
            del saturated[name]
            continue
        stats[name] = stats[name].clamped(bound.low, bound.high)
        fixed[name] = (stats[name].minimum == bound.low, stats[name].maximum == bound.high)
    ranges = {name: quantize_calib.tensor_range(
                  stats[name], config.calibration, config.percentile,
                  fixed.get(name, (False, False)),
                  saturated[name].function if name in saturated else None)
              for name in names if name in stats}
    placement.shared_ranges(model.proto.graph, ranges)
    if config.every_op:
        every_op.share_ranges(model.proto.graph, ranges)
    return quantize_calib.Ranges(ranges, missing, sorted(saturated))


def smoothable(model: Model, quant_plan: QuantPlan, inputs: str = "norm") -> bool:
    """Whether SmoothQuant would act: a planned MatMul reads a LayerNormalization output (or,
    for ``inputs = "all"``, any activation)."""
    return bool(quantize_smooth.find_sites(import_graph(model),
                                           {s.node for s in quant_plan.sites}, inputs))


def _auto_alphas(model: Model, graph, sites, absmax: dict[str, np.ndarray], ctx: Context
                 ) -> dict[str, float]:
    """Per smoothed tensor, the alpha with the least quantized-MatMul error on a sample of its
    rows from the calibration data (``smooth.choose_alpha``)."""
    from onnxcomp import calibration

    nodes = {n.name: n for n in graph.nodes}
    names = [site.output for site in sites if absmax.get(site.output) is not None]
    kept: dict[str, list[np.ndarray]] = {name: [] for name in names}
    counts = dict.fromkeys(names, 0)
    rng = np.random.default_rng(0)

    def on_batch(_index: int, values: dict[str, np.ndarray]) -> None:
        for name in (n for n in values if n in kept):  # a segment's names only, when lazy
            rows = np.asarray(values[name], np.float32)
            rows = rows.reshape(-1, rows.shape[-1])
            budget = max(16, quantize_smooth.SAMPLE_VALUES // rows.shape[1]) - counts[name]
            if budget <= 0:
                continue
            if rows.shape[0] > budget:
                rows = rows[rng.choice(rows.shape[0], budget, replace=False)]
            kept[name].append(rows)
            counts[name] += rows.shape[0]

    ctx.progress(f"quantize: choosing SmoothQuant alphas for {len(names)} tensors")
    # A large (lazily loaded) model runs a segment at a time, as the range calibration does.
    per_segment = quantize_calib.SEGMENT_TENSORS if model.lazy else None
    calibration.stream_activations(model, names, ctx.calibration, on_batch,
                                   per_segment=per_segment)
    chosen = {}
    for site in sites:
        if site.output not in kept or not kept[site.output]:
            continue
        weights = [np.asarray(constant_array(nodes[m].inputs[1]), np.float32)
                   for m in site.matmuls]
        chosen[site.output], _ = quantize_smooth.choose_alpha(  # None: left as it is
            np.concatenate(kept[site.output]), np.asarray(absmax[site.output], np.float64),
            weights)
    return chosen


def smooth(model: Model, quant_plan: QuantPlan, alpha: float | str, ctx: Context,
           notes: list[str], inputs: str = "norm", quiet: bool = False) -> Model:
    """SmoothQuant at ``alpha`` on the tensors ``smooth.find_sites`` gives for ``inputs``; a
    new model (float-exact up to rounding), or ``model`` itself when there is none.
    ``quiet``: no note when nothing was smoothed (a default, not something asked for)."""
    graph = import_graph(model)
    sites = quantize_smooth.find_sites(graph, {s.node for s in quant_plan.sites}, inputs)
    if not sites:
        notes.append("smoothquant: no MatMul reads a LayerNormalization output" if inputs ==
                     "norm" else "smoothquant: no MatMul with a constant weight to smooth")
        return model
    stats = quantize_calib.collect(model, [], ctx.calibration,
                                   channel_names=[s.output for s in sites])
    absmax = {k: v.channel_absmax for k, v in stats.items()}
    chosen: float | dict[str, float] = alpha
    if alpha == "auto":
        chosen = _auto_alphas(model, graph, sites, absmax, ctx)
        spread = sorted(a for a in chosen.values() if a is not None)
        if not spread:
            if not quiet:
                notes.append("smoothquant (alpha auto): no tensor's quantized error drops by "
                             f"{quantize_smooth.MIN_GAIN:.0%} with smoothing: none smoothed")
            return model
        label = (f"alpha auto: {spread[0]}-{spread[-1]}, median {spread[len(spread) // 2]}; "
                 f"{len(chosen) - len(spread)} tensors left as they are, smoothing did not pay")
    else:
        label = f"alpha {alpha}"
    done = quantize_smooth.apply(graph, sites, absmax, chosen)
    others = sum(1 for site in sites if not site.from_norm and site.norm in done)
    notes.append(f"smoothquant ({label}) on {len(done) - others} "
                 "LayerNormalization outputs" + (f" and {others} other MatMul inputs (through "
                                                  "a Mul)" if others else ""))
    return export_model(tidy(graph), like=model)
