"""Cross-layer equalization (data-free quantization, Nagel et al. 2019): a float rewrite.

For a chain ``y = W2 * f(W1 * x + b1) + b2`` of two Convs with ``f`` positively homogeneous per
channel (``f(x / s) = f(x) / s`` for ``s > 0``: Relu, LeakyRelu, PRelu, Clip with no upper bound
and a lower bound of 0, or no activation at all), output channel ``i`` of the first conv is divided
by ``s_i`` (its weights and bias) and every weight that reads input channel ``i`` of the second
is multiplied by ``s_i``:
    ``(W2 diag(s)) * f((W1 * x + b1) / s) = W2 * f(W1 * x + b1)``
exactly in real arithmetic (float32 rounding aside: the tests check ~1e-5 in ONNX Runtime).
With ``r1_i`` the max |weight| of output channel ``i`` of W1 and ``r2_i`` the max |weight| that
reads input channel ``i`` of W2, ``s_i = sqrt(r1_i * r2_i) / r2_i`` gives both the same range
``sqrt(r1_i * r2_i)``, so per-tensor and per-input-channel weight quantization loses less. PRelu
slopes are per channel and commute with ``s``: they stay as they are.
Grouped and depthwise second convs are handled (channel ``i`` is column ``i % (C / g)`` of the
rows of group ``i // (C / g)``); chains share convs, so the sweep repeats (``SWEEPS``).

Skipped, with the reason: activations that are not homogeneous (HardSwish, Sigmoid, Clip with an
upper bound such as Relu6, ...), a conv output also read elsewhere (a residual, a graph output),
weights or biases that are not constants or that other nodes read too, convs not among the
planned sites, BatchNormalization left between (fold it first). Limits: Conv -> Conv only (not
MatMul chains); bias absorption (moving the activation's high bias into the next layer) is not
done; scales are clamped to ``SCALE_RANGE``.

Measured (``benchmarks/quantize_ablation.py``): PP-OCRv4 rec has 2 such chains among 38 convs,
det 14 among 62 (PP-LCNet's blocks are HardSwish-activated); equalizing them moved rec static
int8 by +3.1 points of line accuracy on the zoo eval and +0.0 on the hard lines, det's map
cosine by +0.0003: off by default.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp.graph import constant_array, export_model, import_graph, readers, tidy, unique_name
from onnxcomp.model import Model

logger = logging.getLogger(__name__)

HOMOGENEOUS = ("Relu", "LeakyRelu", "PRelu", "Identity")
# Scales are kept in this range: a dead channel (max |w| ~1e-40, PP-OCR has such) must not
# blow the other side of the chain up to float32's limits.
SCALE_RANGE = (1e-3, 1e3)
SWEEPS = 32  # enough to converge: each sweep moves the shared convs less (geometric)


@dataclass(frozen=True)
class Chain:
    first: str  # Conv
    activation: str | None  # the homogeneous node between (None: the convs are adjacent)
    second: str  # Conv


def _only_reader(tensor: gs.Tensor, graph_outputs: set[str]) -> gs.Node | None:
    users = list(tensor.outputs)
    if len(users) != 1 or tensor.name in graph_outputs or readers(tensor) != 1:
        return None
    return users[0]


def _homogeneous(node: gs.Node) -> str | None:
    """None when ``node`` is positively homogeneous per channel, else why not."""
    if node.op in ("Relu", "LeakyRelu", "Identity"):
        return None
    if node.op == "PRelu":
        slope = constant_array(node.inputs[1])
        return None if slope is not None else "PRelu slope is not a constant"
    if node.op == "Clip":
        low = constant_array(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name \
            else node.attrs.get("min")
        high = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if high is not None or "max" in node.attrs:
            return "Clip with an upper bound is not scale-invariant"
        return None if low is not None and float(np.asarray(low)) == 0.0 else \
            "Clip with a lower bound other than 0 is not scale-invariant"
    return f"{node.op} is not positively homogeneous"


def _ops_after(node: gs.Node, outputs: set[str], count: int = 4) -> str:
    """The next ``count`` ops along single readers (``Mul -> Add -> Clip``): a HardSwish or an
    affine step written out as elementwise ops reads better as its ops than as its first."""
    ops = []
    while len(ops) < count:
        user = _only_reader(node.outputs[0], outputs) if node.outputs else None
        if user is None:
            break
        ops.append(user.op)
        node = user
    return " -> ".join(ops)


def _conv_weights(node: gs.Node) -> str | None:
    if len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return "weight is not a constant"
    if readers(node.inputs[1]) != 1:
        return "weight is read by another node too"
    bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
    if bias is not None and (not isinstance(bias, gs.Constant) or readers(bias) != 1):
        return "bias is not a constant of its own"
    return None


def find_chains(graph: gs.Graph, planned: set[str]) -> tuple[list[Chain], list[tuple[str, str]]]:
    """Conv -> [homogeneous activation] -> Conv chains among the ``planned`` convs, and the
    convs whose output chain was refused, with the reason; pure."""
    chains, skipped = [], []
    outputs = {t.name for t in graph.outputs}
    for node in graph.nodes:
        if node.op != "Conv" or node.name not in planned:
            continue

        def skip(why: str, name: str = node.name) -> None:
            logger.debug("equalize: skip %s: %s", name, why)
            skipped.append((name, why))

        why = _conv_weights(node)
        if why:
            skip(why)
            continue
        nxt = _only_reader(node.outputs[0], outputs)
        if nxt is None:
            skip("output read by several nodes or a graph output")
            continue
        activation = None
        if nxt.op != "Conv":
            why = _homogeneous(nxt)
            if why:
                skip(f"followed by {_ops_after(node, outputs, 2)}: {why}")
                continue
            activation, nxt = nxt, _only_reader(nxt.outputs[0], outputs)
            if nxt is None:
                skip(f"{activation.op} output read by several nodes or a graph output")
                continue
        if nxt.op != "Conv" or nxt.inputs[0] is not (activation or node).outputs[0]:
            skip(f"next layer is {nxt.op}, not a Conv")
            continue
        if nxt.name not in planned:
            skip("next Conv is not quantized")
            continue
        why = _conv_weights(nxt)
        if why:
            skip(f"next Conv: {why}")
            continue
        chains.append(Chain(node.name, activation.name if activation else None, nxt.name))
    return chains, skipped


def _second_view(w2: np.ndarray, channels: int, group: int) -> np.ndarray:
    """W2 [M, C/g, ...] as [C, M/g, ...]: every weight that reads input channel i, in row i."""
    per_group = channels // group
    rows = w2.shape[0] // group
    view = w2.reshape(group, rows, per_group, *w2.shape[2:])
    view = np.moveaxis(view, 2, 1)  # [g, C/g, M/g, ...]
    return view.reshape(channels, rows, *w2.shape[2:])


def _from_second_view(view: np.ndarray, shape: tuple[int, ...], group: int) -> np.ndarray:
    channels, rows = view.shape[0], view.shape[1]
    per_group = channels // group
    grouped = view.reshape(group, per_group, rows, *view.shape[2:])
    return np.moveaxis(grouped, 2, 1).reshape(shape)


def scales(w1: np.ndarray, w2: np.ndarray, group: int) -> np.ndarray:
    """``s_i = sqrt(r1_i * r2_i) / r2_i``, clamped to ``SCALE_RANGE`` (1 where a range is 0)."""
    channels = w1.shape[0]
    r1 = np.abs(w1).reshape(channels, -1).max(axis=1).astype(np.float64)
    r2 = np.abs(_second_view(w2, channels, group)).reshape(channels, -1).max(axis=1)
    r2 = r2.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = np.sqrt(r1 * r2) / r2
    s = np.where(np.isfinite(s) & (s > 0), s, 1.0)
    return np.clip(s, *SCALE_RANGE)


def _equalize(graph: gs.Graph, first: gs.Node, second: gs.Node) -> float:
    """Equalize one pair in place; returns the largest relative change of a scale from 1."""
    w1 = np.asarray(first.inputs[1].values, np.float32)
    w2 = np.asarray(second.inputs[1].values, np.float32)
    group = int(second.attrs.get("group", 1))
    if w2.shape[1] * group != w1.shape[0]:
        raise ValueError(f"{second.name}: {w2.shape[1]} x {group} input channels, "
                         f"{first.name} gives {w1.shape[0]}")
    s = scales(w1, w2, group)
    shape = (-1,) + (1,) * (w1.ndim - 1)
    first.inputs[1].values = (w1 / s.reshape(shape)).astype(np.float32)
    if len(first.inputs) > 2 and first.inputs[2].name:
        first.inputs[2].values = (np.asarray(first.inputs[2].values, np.float64) / s
                                  ).astype(np.float32)
    view = _second_view(w2, w1.shape[0], group).astype(np.float64)
    view = view * s.reshape((-1,) + (1,) * (view.ndim - 1))
    second.inputs[1].values = _from_second_view(view, w2.shape, group).astype(np.float32)
    return float(np.max(np.abs(np.log(s)))) if s.size else 0.0


def apply(graph: gs.Graph, chains: list[Chain]) -> int:
    """Equalize every chain, ``SWEEPS`` times over (a conv in two chains moves twice); returns
    the chains equalized. Weight constants are replaced by copies first (the imported graph's
    arrays may be memory maps of the caller's model)."""
    nodes = {n.name: n for n in graph.nodes}
    for name in dict.fromkeys(n for c in chains for n in (c.first, c.second)):
        node = nodes[name]
        for slot in (1, 2):
            if len(node.inputs) > slot and isinstance(node.inputs[slot], gs.Constant):
                node.inputs[slot] = gs.Constant(
                    unique_name(graph, f"{node.inputs[slot].name}_equalized"),
                    np.array(node.inputs[slot].values, np.float32))
    for _ in range(SWEEPS):
        moved = max((_equalize(graph, nodes[c.first], nodes[c.second]) for c in chains),
                    default=0.0)
        if moved < 1e-4:
            break
    return len(chains)


def summary(chains: list[Chain], skipped: list[tuple[str, str]], nodes: dict[str, gs.Node]
            ) -> str:
    """One line: chains by activation op, and refused convs by reason (counted)."""
    kinds: dict[str, int] = {}
    for chain in chains:
        op = nodes[chain.activation].op if chain.activation else "none"
        kinds[op] = kinds.get(op, 0) + 1
    reasons: dict[str, int] = {}
    for _, why in skipped:
        reasons[why] = reasons.get(why, 0) + 1
    found = ", ".join(f"{n} x {op}" for op, n in sorted(kinds.items())) or "none"
    refused = "; ".join(f"{n} x {why}" for why, n in sorted(reasons.items(), key=lambda x: -x[1]))
    return f"equalize: {len(chains)} Conv chains ({found})" + (
        f"; skipped {len(skipped)}: {refused}" if skipped else "")


def run(model: Model, planned: set[str], notes: list[str]) -> Model:
    """Equalize the chains among the ``planned`` convs of ``model`` into a new model (``model``
    itself when there is no chain); the summary goes to ``notes``."""
    graph = import_graph(model)
    chains, skipped = find_chains(graph, planned)
    notes.append(summary(chains, skipped, {n.name: n for n in graph.nodes}))
    if not chains:
        return model
    apply(graph, chains)
    return export_model(tidy(graph), like=model)
