"""Exact float rewrites ahead of int8 quantization: BatchNormalization and constant affine steps
folded into the Conv before them, HardSwish written as one op.

``BN(Conv(x, W, b)) = Conv(x, W', b')`` with, per output channel ``c``,
``k_c = scale_c / sqrt(var_c + eps)``, ``W'_c = k_c · W_c`` and ``b'_c = k_c · (b_c - mean_c) +
B_c``. ONNX Runtime does this itself when it optimizes a float model, so a float model never runs
its BatchNormalizations; a quantized one did: the Conv's output QDQ sits between the Conv and the
BatchNormalization, the fusion no longer matches, and each BatchNormalization runs as its own
float op between two integer kernels, with layout transposes around it. Measured on the PP-OCR
v2.0 direction classifier (paddle2onnx, 1 thread): its int8 result spent 0.69 of 5.5 ms per run
in BatchNormalization and 0.64 ms in Transpose, and ran 1.75x slower than float. Folding first
makes the weights that get quantized the ones that are computed (per-channel scales absorb ``k``).

The same holds for a constant scale and shift after a Conv (PP-LCNet's "learnable affine"
``Conv -> Mul(s) -> Add(a)``, scalars or per channel): ``W'_c = s_c · W_c``, ``b'_c = s_c · b_c
+ a_c``. And HardSwish exported as four ops, ``x · Clip(x + 3, 0, 6) / 6`` (paddle2onnx), becomes
``HardSwish(x)`` (opset 14) or ``x · HardSigmoid(x; 1/6, 1/2)`` (earlier opsets): one or two
float ops between integer kernels instead of four. Measured on PP-OCRv4 rec int8 (ONNX Runtime
profile, 1 thread): its 28 affine steps and 28 HardSwish were 13.6 ms of 26 ms per line in
Mul/Add/Div/Clip, the 38 QLinearConv 5.8 ms.

An affine step *before* a pointwise Conv (after an activation, where nothing can take it
backwards) folds forwards: ``Conv(s·x + a) = Conv'(x)`` with ``W'[o, i] = W[o, i] · s_i`` and
``b'_o = b_o + Σ_i W[o, i] · a_i``, exact for a 1x1 kernel without padding (a padded border
would read ``a`` where the original read 0, so larger kernels keep the step: there it is also
what ``depthwise.py`` equalizes through). The Conv's quantized input is then ``x`` rather than
``s·x + a``: the same uint8 resolution for a scalar ``s``.

Acts on ``Conv -> BatchNormalization`` where the Conv output feeds only that node and is not a
graph output, every weight and statistic is a constant, and the BatchNormalization is in
inference form (one output, ``training_mode`` 0). A Conv weight read by other nodes too gets a
folded copy of its own. Exact in real arithmetic; in float32 within a few ulps (tested).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp.graph import constant_array, consumers, producer, unique_name

logger = logging.getLogger(__name__)


def _foldable(bn: gs.Node, graph: gs.Graph) -> tuple[gs.Node, list[np.ndarray]] | str:
    if len(bn.outputs) != 1 or bn.attrs.get("training_mode", 0):
        return "training form (several outputs)"
    conv = producer(bn.inputs[0])
    if conv is None or conv.op != "Conv":
        return "not after a Conv"
    if len(consumers(conv.outputs[0])) != 1 or conv.outputs[0] in graph.outputs:
        return "the Conv output has other readers"
    values = [constant_array(t) for t in bn.inputs[1:5]]
    weight = constant_array(conv.inputs[1]) if len(conv.inputs) > 1 else None
    if weight is None or any(v is None for v in values) or len(bn.inputs) < 5:
        return "a weight or statistic is not a constant"
    if weight.dtype != np.float32 or any(v.dtype != np.float32 for v in values):
        return "not float32"
    return conv, values


def _replace_weights(graph: gs.Graph, conv: gs.Node, weight: np.ndarray, bias: np.ndarray,
                     tag: str) -> None:
    """Give ``conv`` a new constant weight and bias, named after the rewrite (``tag``); the old
    ones stay for any other reader."""
    conv.inputs[1] = gs.Constant(unique_name(graph, f"{conv.name}.W_{tag}"),
                                 weight.astype(np.float32))
    bias_constant = gs.Constant(unique_name(graph, f"{conv.name}.b_{tag}"),
                                bias.astype(np.float32))
    if len(conv.inputs) > 2:
        conv.inputs[2] = bias_constant
    else:
        conv.inputs.append(bias_constant)


def fold_batchnorms(graph: gs.Graph) -> list[str]:
    """Fold every foldable ``Conv -> BatchNormalization`` of ``graph`` (top level) in place;
    returns the folded BatchNormalization names."""
    folded = []
    for bn in [n for n in graph.nodes if n.op == "BatchNormalization"]:
        found = _foldable(bn, graph)
        if isinstance(found, str):
            logger.debug("quantize: BatchNormalization %s not folded: %s", bn.name, found)
            continue
        conv, (scale, shift, mean, var) = found
        weight = np.asarray(constant_array(conv.inputs[1]), np.float32)
        bias = constant_array(conv.inputs[2]) if len(conv.inputs) > 2 else None
        bias = np.zeros(weight.shape[0], np.float32) if bias is None else bias
        epsilon = float(bn.attrs.get("epsilon", 1e-5))
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            k = (scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + epsilon))
            new_weight = (weight * k.reshape(-1, *([1] * (weight.ndim - 1)))).astype(np.float32)
            new_bias = (k * (bias.astype(np.float64) - mean) + shift).astype(np.float32)
        if not _finite(new_weight, new_bias):
            logger.debug("quantize: BatchNormalization %s not folded: the folded weights "
                         "leave float32's range", bn.name)
            continue
        _replace_weights(graph, conv, new_weight, new_bias, "bn_folded")
        # The Conv now writes the BatchNormalization's output tensor; the BN is disconnected.
        out = bn.outputs[0]
        bn.outputs.clear()
        bn.inputs.clear()
        conv.outputs[0] = out
        folded.append(bn.name)
    if folded:
        graph.cleanup()
    return folded


def _per_channel(values: np.ndarray | None, channels: int, rank: int) -> np.ndarray | None:
    """``values`` as one float per channel (axis 1) when it broadcasts that way against an NC...
    tensor of ``rank`` dims (a scalar, ``[C, 1, ..]`` or ``[1, C, 1, ..]``); else None."""
    if values is None or values.dtype != np.float32:
        return None
    if values.size == 1 and values.ndim <= rank:
        return np.full(channels, float(values.ravel()[0]), np.float32)
    shape = tuple(values.shape)
    trailing = (1,) * (rank - 2)
    if shape in ((channels, *trailing), (1, channels, *trailing)):
        return values.reshape(channels)
    return None


def _other_constant(node: gs.Node, tensor: gs.Tensor) -> np.ndarray | None:
    if len(node.inputs) != 2:
        return None
    other = node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]
    return constant_array(other)


def _only_reader(tensor: gs.Tensor, graph: gs.Graph, op: str) -> gs.Node | None:
    readers = consumers(tensor)
    if len(readers) != 1 or readers[0].op != op or tensor in graph.outputs:
        return None
    return readers[0]


def _finite(*arrays: np.ndarray) -> bool:
    """A fold whose product overflows float32 (a hostile or broken model's huge scale) would
    store inf where the graph computed in steps: such a fold is not done."""
    return all(bool(np.isfinite(a).all()) for a in arrays)


def fold_affine(graph: gs.Graph) -> list[str]:
    """Fold ``Conv -> Mul(constant) [-> Add(constant)]`` (per channel or scalar) into the Conv
    in place; returns the folded Mul/Add names."""
    folded = []
    for conv in [n for n in graph.nodes if n.op == "Conv"]:
        weight = constant_array(conv.inputs[1]) if len(conv.inputs) > 1 else None
        if weight is None or weight.dtype != np.float32 or not conv.outputs:
            continue
        channels, rank = weight.shape[0], weight.ndim
        mul = _only_reader(conv.outputs[0], graph, "Mul")
        scale = None if mul is None else _per_channel(
            _other_constant(mul, conv.outputs[0]), channels, rank)
        if scale is None:
            continue
        bias = constant_array(conv.inputs[2]) if len(conv.inputs) > 2 else None
        bias = np.zeros(channels, np.float32) if bias is None else bias.astype(np.float32)
        with np.errstate(over="ignore", invalid="ignore"):
            new_weight = weight * scale.reshape(-1, *([1] * (rank - 1)))
            new_bias = bias * scale
        last, names = mul, [mul.name]
        add = _only_reader(mul.outputs[0], graph, "Add")
        shift = None if add is None else _per_channel(
            _other_constant(add, mul.outputs[0]), channels, rank)
        if shift is not None:
            with np.errstate(over="ignore", invalid="ignore"):
                new_bias = new_bias + shift
            last, names = add, [mul.name, add.name]
        if not _finite(new_weight, new_bias):
            logger.debug("quantize: %s not folded: the folded weights leave float32's range",
                         mul.name)
            continue
        _replace_weights(graph, conv, new_weight, new_bias, "affine_folded")
        out = last.outputs[0]
        for node in {id(mul): mul, id(last): last}.values():
            node.outputs.clear()
            node.inputs.clear()
        conv.outputs[0] = out
        folded.extend(names)
    if folded:
        graph.cleanup()
    return folded


def _pointwise(conv: gs.Node) -> np.ndarray | None:
    """The float32 weight of a group-1, 1x1, unpadded Conv with a constant weight; else None."""
    weight = constant_array(conv.inputs[1]) if len(conv.inputs) > 1 else None
    if (weight is None or weight.dtype != np.float32 or weight.ndim < 3
            or any(k != 1 for k in weight.shape[2:]) or conv.attrs.get("group", 1) != 1
            or any(conv.attrs.get("pads", [0])) or conv.attrs.get("auto_pad", "NOTSET")
            not in ("NOTSET", "VALID")):
        return None
    return weight


def fold_affine_forward(graph: gs.Graph) -> list[str]:
    """Fold ``Mul(constant) [-> Add(constant)] -> Conv`` (per input channel or scalar; every
    tensor between read once) into a pointwise Conv (``_pointwise``) in place; returns the
    folded Mul/Add names."""
    folded = []
    for conv in [n for n in graph.nodes if n.op == "Conv"]:
        weight = _pointwise(conv)
        step = producer(conv.inputs[0]) if conv.inputs else None
        if weight is None or step is None or step.op not in ("Mul", "Add"):
            continue
        if _only_reader(conv.inputs[0], graph, "Conv") is None:
            continue
        channels, rank = weight.shape[1], weight.ndim
        add = step if step.op == "Add" else None
        mul = step if step.op == "Mul" else None
        if add is not None and len(add.inputs) == 2:
            before = next((producer(t) for t in add.inputs if constant_array(t) is None), None)
            if (before is not None and before.op == "Mul" and _variable(before) is not None
                    and _only_reader(before.outputs[0], graph, "Add") is not None):
                mul = before
        source = _variable(mul if mul is not None else add)
        add_constant = None if add is None else _other_constant(
            add, mul.outputs[0] if mul is not None else source)
        mul_constant = None if mul is None else _other_constant(mul, source)
        shift = None if add is None else _per_channel(add_constant, channels, rank)
        scale = None if mul is None else _per_channel(mul_constant, channels, rank)
        if source is None or (add is not None and shift is None) or \
                (mul is not None and scale is None):
            continue
        if any(c is not None and c.size > 1 for c in (add_constant, mul_constant)) and not (
                source.shape is not None and len(source.shape) == rank
                and source.shape[1] == channels):
            # A per-channel constant could broadcast a narrower input up to the Conv's
            # channels; folded, the Conv would read the narrower tensor. Only a known width.
            continue
        if scale is None:
            scale = np.ones(channels, np.float32)
        bias = constant_array(conv.inputs[2]) if len(conv.inputs) > 2 else None
        bias = np.zeros(weight.shape[0], np.float64) if bias is None else bias.astype(np.float64)
        matrix = weight.reshape(weight.shape[0], channels).astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            if shift is not None:
                bias = bias + matrix @ shift.astype(np.float64)
            new_weight = weight * scale.reshape(1, channels, *([1] * (rank - 2)))
        if not _finite(new_weight, bias.astype(np.float32)):
            continue  # the fold would leave float32's range (see _finite)
        _replace_weights(graph, conv, new_weight, bias, "input_affine_folded")
        steps = [n for n in (mul, add) if n is not None]
        conv.inputs[0] = source
        for node in steps:
            node.outputs.clear()
            node.inputs.clear()
        folded.extend(n.name for n in steps)
    if folded:
        graph.cleanup()
    return folded


def _variable(node: gs.Node) -> gs.Tensor | None:
    """A binary node's one non-constant input (None: both or neither constant)."""
    found = [t for t in node.inputs if constant_array(t) is None]
    return found[0] if len(found) == 1 and len(node.inputs) == 2 else None


def _is_scalar(values: np.ndarray | None, value: float) -> bool:
    return (values is not None and values.size == 1
            and abs(float(values.ravel()[0]) - value) <= 1e-6 * max(1.0, abs(value)))


def _clip_bounds(clip: gs.Node) -> tuple[float, float] | None:
    if len(clip.inputs) >= 3:
        low, high = constant_array(clip.inputs[1]), constant_array(clip.inputs[2])
        if low is None or high is None or low.size != 1 or high.size != 1:
            return None
        return float(low.ravel()[0]), float(high.ravel()[0])
    if "min" in clip.attrs or "max" in clip.attrs:  # opset < 11
        return float(clip.attrs.get("min", -np.inf)), float(clip.attrs.get("max", np.inf))
    return None


def _hardswish_input(last: gs.Node, graph: gs.Graph) -> tuple[gs.Tensor, list[gs.Node]] | None:
    """``x`` when ``last`` ends ``x * Clip(x + 3, 0, 6) / 6`` (or ``* (1/6)``), with the
    nodes of the pattern; every inner tensor read once."""
    if last.op == "Div":
        if not _is_scalar(constant_array(last.inputs[1]), 6.0):
            return None
        product = last.inputs[0]
    elif last.op == "Mul":
        sixth = [i for i, t in enumerate(last.inputs) if _is_scalar(constant_array(t), 1 / 6)]
        if len(last.inputs) != 2 or not sixth:
            return None
        product = last.inputs[1 - sixth[0]]
    else:
        return None
    mul = product.inputs[0] if product.inputs else None
    if mul is None or mul.op != "Mul" or len(mul.inputs) != 2:
        return None
    if _only_reader(product, graph, last.op) is None:
        return None
    for x, clipped in (mul.inputs, mul.inputs[::-1]):
        clip = clipped.inputs[0] if clipped.inputs else None
        if clip is None or clip.op != "Clip" or _clip_bounds(clip) != (0.0, 6.0):
            continue
        if _only_reader(clipped, graph, "Mul") is None:
            continue
        shifted = clip.inputs[0]
        add = shifted.inputs[0] if shifted.inputs else None
        if (add is None or add.op != "Add" or len(add.inputs) != 2
                or _only_reader(shifted, graph, "Clip") is None):
            continue
        if x in add.inputs and _is_scalar(_other_constant(add, x), 3.0):
            return x, [add, clip, mul, last]
    return None


def count_hardswish(graph: gs.Graph) -> int:
    """How many ``x * Clip(x + 3, 0, 6) / 6`` patterns ``fuse_hardswish`` would rewrite."""
    return sum(_hardswish_input(n, graph) is not None
               for n in graph.nodes if n.op in ("Div", "Mul"))


def fuse_hardswish(graph: gs.Graph, opset: int) -> int:
    """Replace every ``x * Clip(x + 3, 0, 6) / 6`` by HardSwish(x) (opset >= 14) or
    ``x * HardSigmoid(x; 1/6, 1/2)``; returns how many."""
    count = 0
    for last in [n for n in graph.nodes if n.op in ("Div", "Mul")]:
        if not last.outputs or not last.inputs:
            continue  # disconnected by an earlier match
        found = _hardswish_input(last, graph)
        if found is None:
            continue
        x, nodes = found
        out = last.outputs[0]
        for node in nodes:
            node.outputs.clear()
            node.inputs.clear()
        base = nodes[-1].name or out.name
        if opset >= 14:
            graph.nodes.append(gs.Node("HardSwish", unique_name(graph, f"{base}.hardswish"),
                                       inputs=[x], outputs=[out]))
        else:
            gate = gs.Variable(unique_name(graph, f"{out.name}.hardsigmoid"), np.float32)
            graph.nodes.append(gs.Node("HardSigmoid", unique_name(graph, f"{base}.hardsigmoid"),
                                       attrs={"alpha": 1.0 / 6.0, "beta": 0.5},
                                       inputs=[x], outputs=[gate]))
            graph.nodes.append(gs.Node("Mul", unique_name(graph, f"{base}.hardswish"),
                                       inputs=[x, gate], outputs=[out]))
        count += 1
    if count:
        graph.cleanup().toposort()
    return count
