"""Depthwise input equalization ahead of static int8: a float rewrite that gives every input
channel of a depthwise Conv the same range, the inverse going into the depthwise weights.

A depthwise Conv (``group`` = input channels, weight ``[C·m, 1, kh, kw]``) computes output
channel ``o`` from input channel ``c = o // m`` alone, so for any ``r_c > 0``
    ``DWConv(X, W)[o] = DWConv(X / r, W · r)[o]``   (``W_o · r_c`` for the rows of channel c)
exactly, zero padding included (a zero stays zero). Static int8 gives ``X`` one uint8 scale
(ONNX Runtime's CPU kernels take no other), so a channel whose range is a small fraction of the
tensor's gets a few levels, and, unlike a dense Conv, no other channel averages its rounding
error away. The weights cost nothing: with one scale per output channel, ``W_o · r_c`` has the
same int8 codes as ``W_o`` (its scale is ``s_o · r_c``). So the spread can move into the weights
(SmoothQuant's migration at alpha = 1, free on the weight side). With ``[lo_c, hi_c]`` channel
``c``'s range on the calibration data and ``[L, H]`` the tensor's (``L <= 0 <= H``),
``r_c = max(hi_c / H, lo_c / L)`` scales each channel up until it touches a bound of the
tensor's range, clamped to ``SCALE_RANGE`` (1 for a channel that never moved): the range, and
so the loudest channel's grid, stay as they were and every other channel gets more of the 256
levels. Not ``max|X_c|``: after a HardSwish most channels are non-negative, and bringing a
mostly negative one (``[-0.375, 0.1]``) up to the others' ``max|x|`` would double the tensor's
range and halve everyone's resolution (measured on PP-OCRv4 rec: hard-set line accuracy
0.762 -> 0.730 that way).

``1 / r`` goes into the node that makes ``X``, through constant per-channel (or scalar) ``Add``
steps read only on the way (their shift is divided by ``r`` too): a ``Mul`` by a constant (its
factor), a ``Conv`` (its output channels: weights and bias) or a ``BatchNormalization`` (its
scale and shift). PP-LCNet's blocks (PP-OCR) end ``HardSwish -> Mul(a) -> Add(b)`` (scalar
"learnable affine") before each depthwise Conv: ``a`` and ``b`` become per-channel constants,
the same ops. Skipped, with the reason: per-tensor weights (``per_channel = false``: then ``r``
is not free), a depthwise input read by other nodes too or a graph output, a producer that takes
no per-channel scale (HardSwish, Sigmoid, a residual Add, ...), grouped Convs that are not
depthwise, weights that are not constants.

Measured on PP-OCRv4 rec (32 calibration lines, three calibration seeds; docs/quantize.md):
its 14 depthwise inputs span 6-18x their median channel's range (pointwise inputs 2-3x); static
int8's hard-set line accuracy went from 0.738 to 0.814 in the mean (float 0.809), the zoo eval
lines' from 0.951 to 0.955 (float 0.961). Same ops, same size. On quantize_ablation.py's own
draw of hard lines, one calibration set: 0.770 -> 0.793 (float 0.848).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp import calibration
from onnxcomp.calibration import Dataset
from onnxcomp.graph import constant_array, export_model, import_graph, readers, tidy, unique_name
from onnxcomp.model import Model

logger = logging.getLogger(__name__)

# r_c is kept in this range: a channel a thousand times quieter than the loudest gets ten
# levels of 256 instead of none, and a near-dead one does not scale its weights to denormals.
SCALE_RANGE = (1e-3, 1.0)


@dataclass(frozen=True)
class Site:
    conv: str  # the depthwise Conv
    input: str  # its input tensor (calibrated per channel)
    absorber: str  # the Mul, Conv or BatchNormalization that takes 1 / r
    adds: tuple[str, ...] = ()  # constant Adds between the absorber and the input


def _group_channels(node: gs.Node) -> int | str:
    """The input channel count of a depthwise Conv, or why ``node`` is not one."""
    weight = constant_array(node.inputs[1]) if len(node.inputs) > 1 else None
    group = int(node.attrs.get("group", 1))
    if group == 1:
        return "not grouped"
    if weight is None or weight.dtype != np.float32:
        return "weight is not a constant float32 tensor"
    if weight.shape[1] != 1 or weight.shape[0] % group:
        return f"grouped ({group} groups of {weight.shape[1]} channels), not depthwise"
    return group


def _per_channel(values: np.ndarray | None, channels: int, rank: int) -> np.ndarray | None:
    """``values`` as one float per channel when it broadcasts that way against an NC.. tensor
    of ``rank`` dims (a scalar, ``[C, 1, ..]`` or ``[1, C, 1, ..]``); else None."""
    if values is None or values.dtype != np.float32:
        return None
    if values.size == 1 and values.ndim <= rank:
        return np.full(channels, float(values.ravel()[0]), np.float32)
    if tuple(values.shape) in ((channels, *(1,) * (rank - 2)), (1, channels, *(1,) * (rank - 2))):
        return values.reshape(channels)
    return None


def _constant_side(node: gs.Node, channels: int, rank: int) -> tuple[int, np.ndarray] | None:
    """For a two-input elementwise node with one per-channel constant input: the position of
    the other (activation) input and the constant per channel."""
    if len(node.inputs) != 2:
        return None
    for position in (0, 1):
        values = _per_channel(constant_array(node.inputs[position]), channels, rank)
        if values is not None and constant_array(node.inputs[1 - position]) is None:
            return 1 - position, values
    return None


def _only_read_by(tensor: gs.Tensor, node: gs.Node, outputs: set[str]) -> bool:
    return (tensor.name not in outputs and readers(tensor) == 1 and len(tensor.outputs) == 1
            and tensor.outputs[0] is node)


def _absorber(conv: gs.Node, channels: int, rank: int, outputs: set[str]
              ) -> tuple[gs.Node, list[gs.Node]] | str:
    """The node that takes ``1 / r`` for ``conv``'s input and the constant Adds on the way."""
    tensor, reader, adds = conv.inputs[0], conv, []
    while True:
        if not _only_read_by(tensor, reader, outputs):
            return "its input is read by other nodes too, or is a graph output"
        producer = tensor.inputs[0] if tensor.inputs else None
        if producer is None:
            return "its input is a graph input"
        if producer.op in ("Add", "Mul"):
            found = _constant_side(producer, channels, rank)
            if found is None:
                return f"made by {producer.op} {producer.name} of two activations"
            if producer.op == "Mul":
                return producer, adds
            adds.append(producer)
            tensor, reader = producer.inputs[found[0]], producer
            continue
        if producer.op == "Conv":
            weight = constant_array(producer.inputs[1]) if len(producer.inputs) > 1 else None
            bias = producer.inputs[2] if len(producer.inputs) > 2 and producer.inputs[2].name \
                else None
            if weight is None or weight.shape[0] != channels or (
                    bias is not None and constant_array(bias) is None):
                return f"made by Conv {producer.name} without constant weights of its own"
            return producer, adds
        if producer.op == "BatchNormalization":
            if len(producer.outputs) != 1 or any(constant_array(t) is None
                                                 for t in producer.inputs[1:3]):
                return f"made by BatchNormalization {producer.name} not in inference form"
            return producer, adds
        return f"made by {producer.op} {producer.name}, which takes no per-channel scale"


def find_sites(graph: gs.Graph, planned: set[str]) -> tuple[list[Site], list[tuple[str, str]]]:
    """The depthwise Convs among ``planned`` whose input can be equalized, and the refused
    ones with the reason (grouped Convs only: a dense Conv is not a candidate); pure."""
    sites, skipped = [], []
    outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        if node.op != "Conv" or node.name not in planned:
            continue
        channels = _group_channels(node)
        if channels == "not grouped":
            continue
        found = channels if isinstance(channels, str) else _absorber(
            node, channels, constant_array(node.inputs[1]).ndim, outputs)
        if isinstance(found, str):
            logger.debug("depthwise: skip %s: %s", node.name, found)
            skipped.append((node.name, found))
            continue
        absorber, adds = found
        sites.append(Site(node.name, node.inputs[0].name, absorber.name,
                          tuple(a.name for a in adds)))
    return sites, skipped


def channel_ranges(model: Model, names: list[str], data: Dataset
                   ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Min and max per channel (axis 1) of each named tensor over the calibration data."""
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def on_batch(_: int, activations: dict[str, np.ndarray]) -> None:
        for name, value in activations.items():
            value = np.asarray(value, np.float32)
            flat = np.moveaxis(value, 1, 0).reshape(value.shape[1], -1)
            low, high = flat.min(axis=1), flat.max(axis=1)
            if name in found:
                low, high = np.minimum(found[name][0], low), np.maximum(found[name][1], high)
            found[name] = (low, high)

    calibration.stream_activations(model, names, data, on_batch)
    return found


def scales(low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """``r_c = max(hi_c / H, lo_c / L)`` with ``[L, H]`` the range of every channel together
    (0 included), clamped to ``SCALE_RANGE``; 1 for a channel that never moved or is not
    finite (left as it is)."""
    low, high = np.asarray(low, np.float64), np.asarray(high, np.float64)
    usable = np.isfinite(low) & np.isfinite(high) & ((high > 0) | (low < 0))
    if not usable.any():
        return np.ones(low.shape, np.float64)
    top, bottom = max(high[usable].max(), 0.0), min(low[usable].min(), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(top > 0, np.maximum(high, 0.0) / top, 0.0)
        down = np.where(bottom < 0, np.minimum(low, 0.0) / bottom, 0.0)
    r = np.where(usable, np.maximum(up, down), 1.0)
    return np.clip(r, *SCALE_RANGE)


def _replace(graph: gs.Graph, node: gs.Node, slot: int, values: np.ndarray, tag: str) -> None:
    """A new constant in ``node``'s input ``slot`` (the old one may be shared or memory-mapped)."""
    name = node.inputs[slot].name or f"{node.name}_{slot}"
    node.inputs[slot] = gs.Constant(unique_name(graph, f"{name}_{tag}"),
                                    np.ascontiguousarray(values, np.float32))


def _scale_elementwise(graph: gs.Graph, node: gs.Node, inverse: np.ndarray, rank: int) -> None:
    position = 1 - _constant_side(node, inverse.size, rank)[0]
    values = _per_channel(constant_array(node.inputs[position]), inverse.size, rank)
    shaped = (values.astype(np.float64) * inverse).reshape(-1, *(1,) * (rank - 2))
    _replace(graph, node, position, shaped, "dw_equalized")


def apply(graph: gs.Graph, sites: list[Site],
          ranges: dict[str, tuple[np.ndarray, np.ndarray]]) -> list[str]:
    """Equalize each site's input in place (``ranges``: its per-channel min and max); returns
    the depthwise Convs equalized."""
    nodes = {n.name: n for n in graph.nodes}
    done = []
    for site in sites:
        if site.input not in ranges:
            continue
        conv = nodes[site.conv]
        weight = np.asarray(constant_array(conv.inputs[1]), np.float64)
        rank, r = weight.ndim, scales(*ranges[site.input])
        inverse = 1.0 / r
        per_row = np.repeat(r, weight.shape[0] // r.size).reshape(-1, *(1,) * (rank - 1))
        _replace(graph, conv, 1, weight * per_row, "dw_equalized")
        for name in site.adds:
            _scale_elementwise(graph, nodes[name], inverse, rank)
        absorber = nodes[site.absorber]
        if absorber.op == "Mul":
            _scale_elementwise(graph, absorber, inverse, rank)
        elif absorber.op == "Conv":
            w = np.asarray(constant_array(absorber.inputs[1]), np.float64)
            _replace(graph, absorber, 1, w * inverse.reshape(-1, *(1,) * (w.ndim - 1)),
                     "dw_equalized")
            if len(absorber.inputs) > 2 and absorber.inputs[2].name:
                bias = np.asarray(constant_array(absorber.inputs[2]), np.float64)
                _replace(graph, absorber, 2, bias * inverse, "dw_equalized")
        else:  # BatchNormalization: y = scale * x_hat + shift
            for slot in (1, 2):
                values = np.asarray(constant_array(absorber.inputs[slot]), np.float64)
                _replace(graph, absorber, slot, values * inverse, "dw_equalized")
        done.append(site.conv)
    return done


def summary(sites: list[Site], skipped: list[tuple[str, str]]) -> str:
    """One line: how many depthwise inputs are equalized, refusals counted by reason."""
    reasons: dict[str, int] = {}
    for _, why in skipped:
        reasons[why] = reasons.get(why, 0) + 1
    refused = "; ".join(f"{n} x {why}" for why, n in sorted(reasons.items(), key=lambda x: -x[1]))
    return (f"depthwise inputs: {len(sites)} equalized into their Conv's per-channel weights"
            + (f"; skipped {len(skipped)}: {refused}" if skipped else ""))


def run(model: Model, planned: set[str], data: Dataset, notes: list[str]) -> Model:
    """Equalize the depthwise inputs among the ``planned`` Convs of ``model`` into a new model
    (``model`` itself when there is none), measured on ``data``. What was found is the plan's
    note (``summary``); ``notes`` gets what the data said (how far the quietest channels moved)."""
    graph = import_graph(model)
    sites, _ = find_sites(graph, planned)
    if not sites:
        return model
    ranges = channel_ranges(model, [s.input for s in sites], data)
    gains = [float(1.0 / scales(*r).min()) for r in ranges.values()]
    done = apply(graph, sites, ranges)
    notes.append(f"depthwise inputs equalized on {len(done)} Convs: the quietest channel of "
                 f"each scaled up {np.median(gains):.1f}x in the median, at most "
                 f"{max(gains):.1f}x")
    logger.debug("depthwise: equalized %s", done)
    return export_model(tidy(graph), like=model)
