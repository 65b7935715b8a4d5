"""Loss-aware activation ranges (static int8, ``range_search``): each calibrated range scaled by
the factor that lowers the error of the *model's outputs* against float.

Calibration (``mse`` by default) picks every activation range from that tensor's own histogram;
what a user sees is the model output, and how an error at one tensor grows downstream is not in
the histogram. After the rewrite, this search (the idea of LAPQ, Nahshan et al. 2019, reduced
to one factor per tensor and a coordinate search) visits the activation quantizers in graph
order and, for each, tries the scale times each of ``FACTORS``; a factor is kept when it lowers
the mean relative squared output error ``|y - y_float|^2 / |y_float|^2`` on *both* halves of the
scoring batches (a change that helps one half only is fitted noise). Scaling ``s`` by ``f`` with
the zero point kept scales both ends of the range ``[(0 - z) s, (255 - z) s]`` by ``f``.

Only quantizers whose scale and zero point are read by nothing but that QuantizeLinear and its
DequantizeLinears with the same scale and zero point are tuned; the pairs the other rewrites
derive from a range (integer HardSwish's sixth, forward folds into a DequantizeLinear) are left
as calibrated. Trials run on one ONNX Runtime session of the QDQ graph with those scales as
graph inputs (not fused: QDQ emulation, the integer kernels' result up to float rounding).
Cost: tensors x factors x batches runs (PP-OCRv4 rec 70 x 4 x 16: 2.2 minutes here; det
123 x 4 x 8 pages of 640x640: 9.5 minutes).

What it fits is the calibration data's distribution (measured in docs/quantize.md): on PP-OCRv4
det it raised held-out pages' text-mask IoU, on PP-OCRv4 rec the zoo eval lines came up to
float while the noisy, low-contrast hard lines got worse. Hence opt-in: for deployments whose
inputs look like the calibration data.
"""

from __future__ import annotations

import collections
from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcomp import runtime
from onnxcomp.calibration import Dataset
from onnxcomp.graph import proto_scopes
from onnxcomp.model import PROTOBUF_SAFE_BYTES, Model

FACTORS = (0.7, 0.85, 1.2, 1.4)
# Batches the search scores on (split in two halves that must both improve).
SEARCH_BATCHES = 16
# A trial must lower the error by this fraction to count (float noise in the emulation).
MIN_GAIN = 1e-3


def tunable_scales(graph: onnx.GraphProto) -> list[str]:
    """Scale initializers of activation QuantizeLinear nodes that can move alone, graph order."""
    initializers = {t.name: t for t in graph.initializer}
    readers: dict[str, list[onnx.NodeProto]] = collections.defaultdict(list)
    for node in graph.node:
        for name in node.input:
            readers[name].append(node)
    # A name an If/Loop/Scan body reads from this scope is shared with that body.
    read_in_bodies = {name for body, parent in proto_scopes(graph) if parent is not None
                      for node in body.node for name in node.input}
    found = []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or len(node.input) < 3:
            continue
        source, scale, zero = node.input[:3]
        if source in initializers or scale not in initializers or zero not in initializers:
            continue  # a weight, or a range computed in the graph
        if {scale, zero} & read_in_bodies:
            continue
        if initializers[scale].data_type != onnx.TensorProto.FLOAT or \
                numpy_helper.to_array(initializers[scale]).size != 1:
            continue  # per-axis (not an activation range), or a float16 scale
        pairs = readers[node.output[0]]
        if not pairs or any(d.op_type != "DequantizeLinear" or list(d.input[1:3]) != [scale, zero]
                            for d in pairs):
            continue  # a reader that derives another range from this one
        # Nodes by their outputs (protobuf wrappers have no stable identity).
        expected = {tuple(node.output), *(tuple(d.output) for d in pairs)}
        if any(tuple(n.output) not in expected for n in readers[scale] + readers[zero]):
            continue  # the scale or zero point is shared with another pair
        found.append(scale)
    return found


def search(reference: Model, quantized: Model, data: Dataset, progress: Callable[[str], None]
           ) -> tuple[Model, dict[str, float], tuple[float, float]]:
    """The quantized model with its tunable activation scales searched; the factor chosen per
    scale (only those that moved) and the output error before and after."""
    scales = tunable_scales(quantized.graph)
    count = min(len(data), SEARCH_BATCHES)
    if not scales or count < 2:
        return quantized, {}, (0.0, 0.0)
    batches = [data.make_batch(i) for i in range(count)]
    float_session = runtime.session(reference)
    outputs = [o.name for o in float_session.get_outputs()
               if o.type == "tensor(float)"]
    if not outputs:  # nothing to score against (integer outputs only)
        return quantized, {}, (0.0, 0.0)
    targets = [[a.astype(np.float64) for a in float_session.run(outputs, b)] for b in batches]
    del float_session
    wanted = set(scales)
    initial = {t.name: numpy_helper.to_array(t) for t in quantized.graph.initializer
               if t.name in wanted}
    trial_session = runtime.session(_with_scale_inputs(quantized, scales), optimize=False)
    halves = (range(count // 2), range(count // 2, count))

    def errors(values: dict[str, np.ndarray]) -> tuple[float, float]:
        per_batch = []
        for batch, target in zip(batches, targets):
            found = trial_session.run(outputs, {**batch, **values})
            per_batch.append(np.mean([np.sum((y - t) ** 2) / max(np.sum(t ** 2), 1e-30)
                                      for y, t in zip(found, target)]))
        return (float(np.mean([per_batch[i] for i in halves[0]])),
                float(np.mean([per_batch[i] for i in halves[1]])))

    current = dict(initial)
    best = errors(current)
    start = sum(best) / 2
    chosen: dict[str, float] = {}
    for index, scale in enumerate(scales):
        progress(f"quantize: range search {index + 1}/{len(scales)} ({scale})")
        for factor in FACTORS:
            trial = {**current, scale: np.asarray(initial[scale] * factor, np.float32)}
            found = errors(trial)
            if all(f < b * (1 - MIN_GAIN) for f, b in zip(found, best)):
                best, current[scale], chosen[scale] = found, trial[scale], factor
    if not chosen:
        return quantized, {}, (start, start)
    tuned = quantized.copy()
    for tensor in tuned.graph.initializer:
        if tensor.name in chosen:
            tensor.CopyFrom(numpy_helper.from_array(
                current[tensor.name].reshape(initial[tensor.name].shape), tensor.name))
    return tuned, chosen, (start, sum(best) / 2)


def _with_scale_inputs(model: Model, scales: list[str]) -> Model:
    trial = model.copy()
    graph = trial.graph
    moved = set(scales)
    kept = [t for t in graph.initializer if t.name not in moved]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.input.extend(helper.make_tensor_value_info(s, onnx.TensorProto.FLOAT, [])
                       for s in scales)
    return trial


def fits_in_memory(model: Model) -> bool:
    """Trials need the QDQ graph in one in-memory session."""
    return not model.lazy and model.weight_bytes() <= PROTOBUF_SAFE_BYTES
