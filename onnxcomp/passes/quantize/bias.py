"""Bias correction: the mean of each layer's quantization error, taken out of its bias.

A layer ``y = W x + b`` whose weight is stored as ``W_q`` gives ``y_q = W_q x + b``; on the
calibration data the error's mean per output channel is ``e = (W_q - W) E[x]`` (empirical bias
correction, Nagel et al. 2019, with per-channel input means from the float model), so
``b' = b - e`` removes it (``bias_correction = "weights"``). Fed the float layer input, the
layer's mean squared error on that data falls by exactly ``|e|^2`` (``E|d - e|^2 = E|d|^2 -
|e|^2`` for ``d = y_q - y``): it never grows on the data it was fitted to; held-out data gains
as far as its means are alike.
``bias_correction = "all"`` with static int8 also reads the input through its calibrated uint8
QDQ pair ``Q``: ``e = W_q E[Q(x)] - W E[x]``, which takes the mean shift of clipped ranges
(``mse``, ``entropy``, ``percentile``) out too. Measured (``benchmarks/quantize_ablation.py``)
it hurts PP-OCR rec: the clipping error sits on the few large activations (strokes), and a
per-channel constant moves every position, background included. ``weights`` measured: ppocr-det
static int8 map cosine 0.9913 -> 0.9942, text-mask IoU 0.973 -> 0.980; ppocr-rec hard lines
-1.6 points; MiniLM int8-dynamic cosine 0.9938 -> 0.9940: off by default.
- Conv: ``e_m = sum_{c, kh, kw} W_q[m, c, kh, kw] E[Q(x)_c] - W[m, c, kh, kw] E[x_c]`` with
  spatial means per input channel (``Q`` the identity but for "all"; groups handled). Zero
  padding makes the border positions see less than the mean: the correction is approximate there.
- MatMul ``x @ W`` ([K, N]): ``e = E[Q(x)] @ W_q - E[x] @ W``, taken out of the constant of the
  single Add that follows it; Gemm: out of ``C`` (``C -= e / beta``).
``W_q`` is what the rewrite will store: int8 symmetric per channel (static; dynamic MatMul/Gemm)
or per tensor (dynamic Conv), int4 round-to-nearest blocks. Dynamic int8's run-time activation
rounding is never corrected (its scale depends on each input).
A missing bias is created only where the correction is material (RMS of ``e`` at least
``MATERIAL`` of the RMS of the mean output ``W E[x]``): a new Conv bias (free in QLinearConv) or a
Gemm ``C``; a MatMul without a bias Add is left alone (an Add would be a float op between integer
kernels). Skipped, with the reason: int4 with GPTQ (it compensates the error itself), sites in
If/Loop bodies, Gather and Attention sites.

With "all", static int8 keeps the output ranges calibrated before the correction (they move by
``e`` only). A layer later returned to float by ``min_cosine`` keeps its corrected bias: off
from float by ``e``, the mean error its quantized form would have made.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp import calibration
from onnxcomp.calibration import Dataset
from onnxcomp.graph import (
    constant_array,
    export_model,
    import_graph,
    readers,
    set_constant,
    tidy,
    unique_name,
)
from onnxcomp.model import Model
from onnxcomp.passes.quantize import int4 as quantize_int4
from onnxcomp.passes.quantize import int8 as quantize_int8
from onnxcomp.passes.quantize.calib import SEGMENT_TENSORS, quant_params
from onnxcomp.passes.quantize.config import Config
from onnxcomp.passes.quantize.match import Site
from onnxcomp.passes.quantize.prepare import gemm_weight

# A missing bias is created when the correction's RMS is at least this share of the mean output's.
MATERIAL = 1e-3


def eligible(site: Site, config: Config) -> str | None:
    """None when the site's bias is corrected, else why not."""
    if site.op not in ("Conv", "MatMul", "Gemm"):
        return f"{site.op} site"
    if site.owner is not None:
        return "inside an If/Loop/Scan body (its output is not measured there)"
    if site.weight_input != 1 or site.activation_inputs != (0,):
        return "not an activation x constant-weight layer"
    if config.gptq or (config.int8_gptq and site.op != "Conv"):
        return "GPTQ compensates the weight error itself"
    return None


def fake_quantize(values: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """uint8 QuantizeLinear then DequantizeLinear, as the static rewrite's pair computes it."""
    q = np.clip(np.round(values / scale) + zero_point, 0, 255)
    return (q - zero_point) * scale


def input_means(model: Model, axes: dict[str, int], data: Dataset,
                quantizers: dict[str, tuple[float, int]] | None = None,
                progress: Callable[[int, int], None] | None = None
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per-channel means over ``data`` of the named tensors, channels along each one's axis (1
    for Conv inputs, -1 for MatMul/Gemm): ``(E[x], E[Q(x)])`` with ``Q`` the tensor's uint8
    quantizer from ``quantizers`` (``E[x]`` twice where it has none); streamed."""
    quantizers = quantizers or {}
    sums: dict[str, list] = {}
    counts: dict[str, int] = {}

    def on_batch(_: int, activations: dict[str, np.ndarray]) -> None:
        for name, value in activations.items():
            value = np.asarray(value, np.float64)
            flat = np.moveaxis(value, axes[name], -1).reshape(-1, value.shape[axes[name]])
            seen = sums.setdefault(name, [0.0, 0.0])
            seen[0] = seen[0] + flat.sum(axis=0)
            if name in quantizers:
                seen[1] = seen[1] + fake_quantize(flat, *quantizers[name]).sum(axis=0)
            counts[name] = counts.get(name, 0) + flat.shape[0]

    per_segment = SEGMENT_TENSORS if model.lazy else None
    calibration.stream_activations(model, list(axes), data, on_batch, progress, per_segment)
    found = {}
    for name, (plain, quantized) in sums.items():
        count = max(counts[name], 1)
        found[name] = (plain / count, (quantized if name in quantizers else plain) / count)
    return found


def quantized_weight(site: Site, weight: np.ndarray, config: Config) -> np.ndarray:
    """What the rewrite stores for ``weight`` (Conv layout, or a [K, N] matrix), dequantized."""
    if config.mode == "int4":
        return quantize_int4.quantize_blocks(
            weight, config.block_size, config.int4_symmetric, config.int4_scale,
            positive=config.int4_format == "qdq").dequantize()
    if config.mode == "int8-dynamic":
        axis = None if site.op == "Conv" or not config.per_channel else 1
    else:
        axis = site.axis
        if axis is not None and site.op != "Conv":
            axis = 1  # static MatMul [K, N]: per output column
    q, scale = quantize_int8.symmetric_int8(weight, axis)
    return quantize_int8.dequantize(q, scale, axis)


def conv_error_mean(error: np.ndarray, mean: np.ndarray, group: int) -> np.ndarray:
    """``e_m`` of a Conv weight error [M, C/g, ...] on inputs of per-channel mean ``mean`` [C]."""
    per_out = error.reshape(error.shape[0], error.shape[1], -1).sum(axis=2)  # [M, C/g]
    rows = error.shape[0] // group
    grouped_mean = mean.reshape(group, -1)  # [g, C/g]
    return np.einsum("mc,mc->m", per_out, np.repeat(grouped_mean, rows, axis=0))


def _material(e: np.ndarray, output_mean: np.ndarray) -> bool:
    rms = lambda v: float(np.sqrt(np.mean(np.square(v)))) if np.size(v) else 0.0
    return rms(e) >= MATERIAL * rms(output_mean) and rms(e) > 0.0


def _bias_add(node: gs.Node, width: int) -> tuple[gs.Node, int] | None:
    """The single Add after a MatMul whose other input is a constant of ``width`` values along
    the last axis, and that input's slot."""
    users = list(node.outputs[0].outputs)
    if len(users) != 1 or users[0].op != "Add" or readers(node.outputs[0]) != 1:
        return None
    add = users[0]
    for slot, tensor in enumerate(add.inputs):
        if tensor is node.outputs[0]:
            continue
        value = constant_array(tensor)
        if isinstance(tensor, gs.Constant) and value is not None and value.size == width \
                and value.shape[-1:] == (width,):
            return add, slot
    return None


def correct(graph: gs.Graph, site: Site, config: Config, mean: np.ndarray,
            quantized_mean: np.ndarray | None = None) -> str | None:
    """Correct one site's bias in ``graph`` (copy-on-write constants) by ``W_q E[Q(x)] - W E[x]``
    (``quantized_mean``: ``E[Q(x)]``, else ``E[x]``); None when done, else why not."""
    qmean = mean if quantized_mean is None else quantized_mean
    node = next((n for n in graph.nodes if n.name == site.node), None)
    if node is None:
        return "node not found"
    if node.op == "Conv":
        weight = np.asarray(constant_array(node.inputs[1]), np.float32)
        group = int(node.attrs.get("group", 1))
        if mean.size != weight.shape[1] * group:
            return f"input has {mean.size} channels, the weight reads {weight.shape[1] * group}"
        e = (conv_error_mean(quantized_weight(site, weight, config).astype(np.float64), qmean,
                             group) - conv_error_mean(weight.astype(np.float64), mean, group))
        if len(node.inputs) > 2 and node.inputs[2].name:
            bias = constant_array(node.inputs[2])
            if bias is None or not isinstance(node.inputs[2], gs.Constant):
                return "bias is not a constant"
            set_constant(graph, node, 2, (np.asarray(bias, np.float64) - e).astype(np.float32),
                         "corrected")
            return None
        if not _material(e, conv_error_mean(weight.astype(np.float64), mean, group)):
            return "no bias, and the correction is not material"
        node.inputs.append(gs.Constant(unique_name(graph, f"{node.name}_bias_corrected"),
                                       (-e).astype(np.float32)))
        return None
    linear = gemm_weight(node)
    if isinstance(linear, str):
        return linear
    weight = linear.matrix
    if mean.size != weight.shape[0]:
        return f"input has {mean.size} channels, the weight {weight.shape[0]} rows"
    e = qmean @ quantized_weight(site, weight, config).astype(np.float64) - mean @ weight
    if node.op == "Gemm":
        beta = float(node.attrs.get("beta", 1.0))
        if len(node.inputs) > 2 and node.inputs[2].name:
            c = constant_array(node.inputs[2])
            if c is None or not isinstance(node.inputs[2], gs.Constant) or c.size not in (
                    1, e.size) or beta == 0.0:
                return "Gemm C is not a constant of one value per output"
            c = np.broadcast_to(np.asarray(c, np.float64).reshape(-1), e.shape)
            set_constant(graph, node, 2, (c - e / beta).astype(np.float32), "corrected")
            return None
        if not _material(e, mean @ weight):
            return "no bias, and the correction is not material"
        node.attrs["beta"] = 1.0
        node.inputs.append(gs.Constant(unique_name(graph, f"{node.name}_C_corrected"),
                                       (-e).astype(np.float32)))
        return None
    found = _bias_add(node, e.size)
    if found is None:
        return "no bias Add after the MatMul (an Add would be a float op between integer kernels)"
    add, slot = found
    bias = np.asarray(constant_array(add.inputs[slot]), np.float64)
    set_constant(graph, add, slot, (bias - e.reshape(bias.shape)).astype(np.float32),
                 "corrected")
    return None


def run(model: Model, sites: list[Site], config: Config, data: Dataset,
        notes: list[str], progress: Callable[[str], None] | None = None,
        ranges: dict[str, tuple[float, float]] | None = None
        ) -> tuple[Model, list[tuple[str, str]]]:
    """Correct the biases of ``sites`` in a new model (``model`` itself when none is); the
    sites left alone, with the reason. ``data``: the calibration data the means come from;
    ``ranges``: static int8's calibrated input ranges, for ``bias_correction = "all"`` (their
    rounding and clipping is then corrected too)."""
    chosen, refused = [], []
    for site in sites:
        why = eligible(site, config)
        if why is None:
            chosen.append(site)
        elif site.op in ("Conv", "MatMul", "Gemm"):
            refused.append((site.node, why))
    if not chosen:
        notes.append("bias correction: no layer to correct")
        return model, refused
    graph = import_graph(model)
    nodes = {n.name: n for n in graph.nodes}
    inputs = {site.node: nodes[site.node].inputs[0].name for site in chosen}
    if progress:
        progress(f"bias correction: input means of {len(set(inputs.values()))} tensors on "
                 f"{len(data)} batches")
    # A tensor read by a Conv and a MatMul alike would need both axes: the Conv's wins (rare).
    axes = {inputs[s.node]: -1 for s in chosen if s.op != "Conv"}
    axes.update({inputs[s.node]: 1 for s in chosen if s.op == "Conv"})
    quantizers = {name: quant_params(*ranges[name]) for name in axes if name in (ranges or {})}
    means = input_means(model, axes, data, quantizers)
    done = 0
    for site in chosen:
        why = correct(graph, site, config, *means[inputs[site.node]])
        if why is None:
            done += 1
        else:
            refused.append((site.node, why))
    what = "weight and input rounding error's" if quantizers else "weight error's"
    notes.append(f"bias correction: {done} layers corrected by their {what} mean on "
                 f"{len(data)} calibration batches" + (f", {len(refused)} left alone"
                                                       if refused else ""))
    return (export_model(tidy(graph), like=model) if done else model), refused
