"""int4 mixed precision: the layer groups the model output is most sensitive to go to 8 bits.

Used by ``quantize`` (int4, MatMulNBits; ``fidelity.py``) when the model output cosine on
calibration data is below ``min_cosine``. Keeping layers float (what the int8 modes do) would
leave a large model's file several times bigger; 8-bit blocks (``int4.quantize_blocks8``,
MatMulNBits ``bits = 8``, same block size) are near-lossless at twice the 4-bit size.

- Layers are grouped by *role*: the node name with every run of digits replaced by ``#``
  (``layers.7.v`` -> ``layers.#.v``), so a 22-block decoder has 8 groups, not 156 layers, to
  try; a model without numbered blocks gets one group per layer.
- Each group is scored by the model output cosine with *that group at 8 bits and everything else
  at 4* (the int4 model is the baseline, so the gain is measured where it will be used, errors
  of the other layers included), divided by the bytes it adds.
- Groups are raised in that order: the fewest that meet the target are found by bisection over
  how many (the predicted gains, added up, only bound the search: measured one at a time they
  add up to less than their joint effect).
Upgrading rewrites the chosen MatMulNBits nodes of the int4 model in place from the float
weights (trials on a copy that is dropped after scoring), so the 4-bit layers (GPTQ ones
included) are never recomputed. A zero-point input of an asymmetric 4-bit node is
dropped from the node (8-bit blocks are symmetric); the unused tensor goes at the pipeline's
cleanup, and ``added_bytes`` does not count it as saved.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp import runtime
from onnxcomp.calibration import Dataset
from onnxcomp.decoders import FIRST, LATER
from onnxcomp.errors import UserError
from onnxcomp.measure import compare
from onnxcomp.model import Model, tensor_values
from onnxcomp.passes.quantize.int4 import nbits_weight, quantize_blocks8


def role(node_name: str) -> str:
    # The two paths of a decoder pipeline compressed side by side (onnxcomp/decoders.py) hold
    # the same layers: one role, so one 8-bit trial raises a shared weight for both.
    for prefix in (f"{FIRST}/", f"{LATER}/"):
        if node_name.startswith(prefix):
            node_name = node_name[len(prefix):]
            break
    return re.sub(r"\d+", "#", node_name)


def groups(node_names: list[str]) -> dict[str, list[str]]:
    grouped: dict[str, list[str]] = {}
    for name in node_names:
        grouped.setdefault(role(name), []).append(name)
    return grouped


def added_bytes(model: Model, nodes: list[str]) -> int:
    """Bytes that 8-bit blocks add over 4-bit ones for these MatMulNBits nodes of ``model``."""
    wanted = set(nodes)
    total = 0
    counted: set[str] = set()  # a weight shared by several nodes is stored (and raised) once
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and node.name in wanted and node.input[1] not in counted:
            counted.add(node.input[1])
            attrs = {a.name: a.i for a in node.attribute}
            blocks = -(-attrs["K"] // attrs["block_size"])
            total += attrs["N"] * blocks * attrs["block_size"] // 2
    return total


def upgradable(node: onnx.NodeProto, readers: dict[str, list[onnx.NodeProto]],
               stored: set[str]) -> bool:
    """A 4-bit MatMulNBits with inputs (A, B, scales[, zero_points]), B and scales stored
    initializers that only 4-bit MatMulNBits nodes with the same weight inputs read (a shared
    weight is upgraded for all its readers at once)."""
    attrs = {a.name: a.i for a in node.attribute}
    weights = tuple(node.input[1:])
    return (node.op_type == "MatMulNBits" and attrs.get("bits") == 4 and len(node.input) <= 4
            and all(name in stored for name in node.input[1:3])
            and all(r.op_type == "MatMulNBits" and tuple(r.input[1:]) == weights
                    for name in weights if name for r in readers.get(name, [])))


def upgrade(model: Model, nodes: list[str], weight_of: Callable[[str], np.ndarray]) -> list:
    """Rewrite the named 4-bit MatMulNBits nodes of ``model`` as 8-bit ones *in place*, quantized
    from ``weight_of(node name)`` (the float ``[K, N]`` weight); returns what ``restore`` needs
    to undo it (trials run it on a copy, ``_score``; the final choice on the model itself). All
    weights are quantized before the graph is touched, so a failure leaves the model as it was.
    Nodes that share a tensor with another node (or carry inputs beyond the zero points) are
    left at 4 bits: the undo list names the nodes that changed."""
    graph = model.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    wanted = set(nodes)
    stored = {t.name for t in graph.initializer}
    # One new weight per shared (B, scales[, zero points]), for every node that reads it.
    by_weights: dict[tuple, list[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.name in wanted and upgradable(node, readers, stored):
            by_weights.setdefault(tuple(node.input[1:]), [])
    for node in graph.node:
        if tuple(node.input[1:]) in by_weights and node.op_type == "MatMulNBits":
            by_weights[tuple(node.input[1:])].append(node)
    new = []
    for group in by_weights.values():
        first = group[0]
        block_size = next(a.i for a in first.attribute if a.name == "block_size")
        blocks = quantize_blocks8(weight_of(first.name), block_size)
        new.append((group, numpy_helper.from_array(nbits_weight(blocks), f"{first.name}_B_int8"),
                    numpy_helper.from_array(blocks.scales.reshape(-1),
                                            f"{first.name}_scales8")))
    slots = {t.name: i for i, t in enumerate(graph.initializer)}
    undo = []
    for group, weight, scales in new:
        old_inputs = list(group[0].input[1:])
        saved = []
        for name, tensor in zip(old_inputs[:2], (weight, scales)):
            kept = onnx.TensorProto()
            kept.CopyFrom(graph.initializer[slots[name]])
            saved.append((slots[name], kept))
            graph.initializer[slots[name]].CopyFrom(tensor)
        for node in group:
            before = list(node.input)
            del node.input[1:]
            node.input.extend([weight.name, scales.name])
            next(a for a in node.attribute if a.name == "bits").i = 8
            undo.append((node, before, saved if node is group[0] else []))
    return undo


def restore(model: Model, undo: list) -> None:
    """Put back what ``upgrade`` replaced."""
    for node, old_inputs, saved in reversed(undo):
        for slot, kept in saved:
            model.graph.initializer[slot].CopyFrom(kept)
        del node.input[:]
        node.input.extend(old_inputs)
        next(a for a in node.attribute if a.name == "bits").i = 4


@dataclass
class GroupScore:
    group: str
    layers: list[str]
    cosine: float  # model output cosine with this group at 8 bits, the rest at 4
    gain: float  # over the all-4-bit model
    added_bytes: int

    @property
    def gain_per_mb(self) -> float:
        return self.gain / max(self.added_bytes / 1e6, 1e-9)


def order(scores: list[GroupScore]) -> list[GroupScore]:
    """Most cosine per added byte first; groups that do not help last."""
    return sorted(scores, key=lambda s: (s.gain <= 0, -s.gain_per_mb))


def first_guess(ranked: list[GroupScore], baseline: float, target: float) -> int:
    """How many groups, in ``ranked`` order, are predicted (gains added) to reach ``target``."""
    total = baseline
    for count, score in enumerate(ranked, start=1):
        total += max(score.gain, 0.0)
        if total >= target:
            return count
    return len(ranked)


def float_weight(model: Model, node_name: str) -> np.ndarray:
    """A MatMul/Gemm node's weight as float ``[K, N]``, read from disk if it is there (a copy:
    the map is released at once)."""
    node = next(n for n in model.graph.node if n.name == node_name)
    producers = {o: n for n in model.graph.node for o in n.output}
    initializers = {t.name: t for t in model.graph.initializer}
    name = node.input[1]
    while name not in initializers and name in producers and producers[name].op_type == "Identity":
        name = producers[name].input[0]  # tied weights come through Identity nodes
    tensor = initializers.get(name)
    if tensor is None:
        raise UserError(f"{node_name}: its weight {node.input[1]!r} is not an initializer")
    weight = tensor_values(tensor, model.source).astype(np.float32)
    if node.op_type == "Gemm":
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        weight = (weight.T if attrs.get("transB", 0) else weight) * float(attrs.get("alpha", 1.0))
    return weight


def _score(model: Model, layers: list[str], weight_of: Callable[[str], np.ndarray],
           reference: compare.Reference, batches: int | None) -> float:
    """Output cosine of ``model`` with ``layers`` at 8 bits, on a copy: protobuf keeps replaced
    tensor bytes in the message's arena until the message dies, so trials on the model itself
    would pile up every trial's tensors (measured: 2 GB more after eight on the 1B decoder)."""
    trial = model.copy()
    upgrade(trial, layers, weight_of)
    try:
        return reference.min_cosine(trial, batches)
    finally:
        del trial
        runtime.release_free_memory()


@dataclass
class Found:
    ranked: list[GroupScore]
    groups: list[str]  # raised to 8 bits, in order
    layers: list[str]
    cosine: float  # model output cosine with them at 8 bits (all batches)


def search(reference_model: Model, model: Model, layers: list[str], target: float,
           baseline: float, data: Dataset, progress: Callable[[str], None], batches: int,
           trial_batches: int) -> Found:
    """Raise groups of ``layers`` of the int4 ``model`` to 8 bits (in place) until its output
    cosine against ``reference_model`` on ``data`` reaches ``target``."""
    grouped = groups(layers)
    reference = compare.Reference(reference_model, data, batches)
    base = reference.min_cosine(model, trial_batches)

    def weight_of(name: str) -> np.ndarray:
        return float_weight(reference_model, name)

    scores = []
    for index, (group, members) in enumerate(grouped.items(), start=1):
        cosine = _score(model, members, weight_of, reference, trial_batches)
        scores.append(GroupScore(group, members, cosine, cosine - base,
                                 added_bytes(model, members)))
        progress(f"quantize: 8-bit trial {index}/{len(grouped)} {group}: cosine "
                 f"{base:.5f} -> {cosine:.5f}")
    ranked = order(scores)
    # The fewest groups, in ranked order, that meet the target: a bisection (the cosine grows
    # with each group raised). Gains measured one group at a time add up to less than their
    # joint effect (1B decoder: 7 groups predicted, 5 enough), so they only bound the search.
    measured: dict[int, float] = {}

    def cosine_with(count: int) -> float:
        if count not in measured:
            measured[count] = _score(model, [n for s in ranked[:count] for n in s.layers],
                                     weight_of, reference, None)
            progress(f"quantize: {count} groups at 8 bits, cosine {measured[count]:.5f}")
        return measured[count]

    low, high = 1, max(1, first_guess(ranked, baseline, target))
    while high < len(ranked) and cosine_with(high) < target:
        low, high = high + 1, len(ranked)
    while low < high:
        middle = (low + high) // 2
        if cosine_with(middle) >= target:
            high = middle
        else:
            low = middle + 1
    done = upgrade(model, [n for s in ranked[:high] for n in s.layers], weight_of)
    return Found(ranked, [s.group for s in ranked[:high]], [node.name for node, _, _ in done],
                 cosine_with(high))
