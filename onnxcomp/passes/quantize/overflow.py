"""int8 layers whose uint8 x int8 products overflow on x86 CPUs without VNNI, found on the
calibration data and fixed (``u8s8_overflow`` which layers, ``u8s8_remedy`` how).

ONNX Runtime's u8 x s8 integer kernels (QLinearConv, QLinearMatMul, MatMulIntegerToFloat) on an
AVX2 CPU without VNNI (AMD Zen 2/3, Intel cores before Cascade/Ice Lake) multiply with
``vpmaddubsw``: each pair of products along the reduction axis, ``a_k w_k + a_{k+1} w_{k+1}``
(``a`` uint8, ``w`` int8), is added into a signed 16-bit lane that saturates at +-32767 before
the pairs are summed in 32 bits. With VNNI (``vpdpbusd``) the products go straight into 32 bits.
A pair overflows only where two same-sign weights are large (``|w_k| + |w_{k+1}| >= 129``) and
both activations high; per-channel symmetric weights reach 127 in every channel, so the layer
that meets it is the one whose uint8 inputs are high often: an image model's first Conv.
Measured on an AMD EPYC (AVX2, no VNNI): PP-OCRv4 rec static int8 read 0.746 of the zoo eval
lines and 0.436 of the hard ones in ONNX Runtime, where the same QDQ model's math (optimizations
off) reads 0.914 / 0.815; its first Conv alone was the cause (docs/quantize.md).

Two remedies. ``u8u8`` stores such a layer's weight as ``q_u8 = q + 128`` with zero point 128
(per channel, the scale's shape): the DequantizeLinear gives the same floats, so the model
computes the same; ONNX Runtime then runs its u8 x u8 kernel, which widens to 16 bits before
multiplying (no saturation), still as QLinearConv (checked in the tests through the optimized
graph). u8 x u8 is slower (PP-OCRv4 rec with every layer so: 0.81x of float latency against 0.66x
on that CPU; det's 14 saturating layers: 0.90x against 0.75x). ``scale`` (``widen.py``) keeps
the int8 weight and its u8 x s8 kernel, widening the scale of the channels whose pairs can
overflow until none can: not exact, so ``auto`` (the default) keeps it only where the model's
output on the scoring data stays as close to float as with uint8 weights
(``fidelity.widening_keeps``), and only where calibration data can tell. Either way ``auto``
treats only what the calibration data says: the uint8 inputs of each layer are read (the
QDQ model in ONNX Runtime, optimizations off) on up to ``MAX_BATCHES`` batches, each pair of
weights that can overflow at all is summed on them in the reduction orders the kernels use
(``pairsums.py``), and the saturation's error power is set against the layer's accumulator, read
from its output on the same data; the layers with the most are moved until what stays sums to at
most ``HARM_LIMIT``. Depthwise Convs (one input channel per group) run a kernel that accumulates in
32 bits: not checked. int8-dynamic's MatMulInteger and QAttention weights are checked the same way
on the uint8 tensors DynamicQuantizeLinear makes of the calibration data. Where no data reaches a
layer's input (no calibration data, If/Loop bodies, DynamicQuantizeLSTM, a model whose weights stay
on disk) the count is the one expected with both uint8 inputs uniform on [0, 255], a layer moves at
``RATE_LIMIT`` overflows per output value, and the notes say so. ``all`` treats every int8 weight
of these ops; ``none`` leaves them (CPUs with VNNI, ARM: nothing saturates there).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxcomp import runtime
from onnxcomp.calibration import Dataset
from onnxcomp.graph import proto_scopes
from onnxcomp.model import Model, tensor_values
from onnxcomp.passes.quantize import pairsums, widen

CHOICES = ("auto", "all", "none")
REMEDIES = ("auto", "scale", "u8u8")
MAX_BATCHES = 8
# auto moves a layer when at least this share of its output values meets an overflowing pair
# sum. Measured on PP-OCRv4 rec (AVX2, no VNNI), output error against the QDQ math with every
# other layer u8 x u8: its first Conv (1.04 overflows per output) 0.12 -> 0.27 left u8 x s8, an
# SVTR MatMul (0.26) 0.120 -> 0.126, the next (0.0094) and every rarer one: no change.
RATE_LIMIT = 0.01
# Where the accumulator can be read (the layer's output on the data), auto moves the layers with
# the most saturation error power (against their accumulator's) until what stays sums to at
# most this (-30 dB, the order of int8 rounding noise). Measured on an AMD EPYC (AVX2, no VNNI;
# docs/quantize.md): PP-OCRv4 rec's first Conv 0.15 and an SVTR MatMul 0.09 lost the lines;
# MiniLM's 36 layers at 1e-4 to 1.4e-3 each cost 5 points of nearest-neighbour agreement
# together, which a per-layer -30 dB bar did not see. CPUs with VNNI never saturate: there the
# moved layers only cost u8 x u8's speed, so set none for those.
HARM_LIMIT = 1e-3


@dataclass(frozen=True)
class Site:
    node: str            # the Conv / MatMul / Gemm / MatMulInteger / QAttention / LSTM
    op: str
    activation: str      # the uint8 tensor it multiplies ("" where the op makes it inside)
    zero_point: int      # that tensor's zero point (a Conv pads with it; dynamic: unused)
    holder: str          # "output#slot": the node reading the int8 weight (a DequantizeLinear
                         # or the integer op itself) by its first output, and the weight's slot
    weight: str          # the int8 initializer
    attrs: tuple         # the node's attributes, (name, value) pairs
    channels: int        # output channels
    scope: int = 0       # the graph holding the node (0: the main graph; else an If/Loop body)
    # How to read the layer's accumulator from the data: ("float", output, bias, input scale,
    # weight scale, channel axis) for a QDQ layer (acc = (y - b) / (s_a s_w)), ("int", output,
    # channel axis) for MatMulInteger (its int32 output is it), () where it cannot be read.
    signal: tuple = ()


# Integer ops that read int8 weights themselves (int8-dynamic): (weight slot, zero point slot,
# the slot of the scale whose shape the zero point takes, or None for a scalar).
_INTEGER_OPS = {"MatMulInteger": ((1, 3, None),), "QAttention": ((1, 7, None),),
                "DynamicQuantizeLSTM": ((1, 9, 8), (2, 11, 10))}
# Their uint8 inputs are made inside the op: never read from the data.
_INSIDE = {"DynamicQuantizeLSTM"}


def sites(graph: onnx.GraphProto) -> list[Site]:
    """Every int8 weight a u8 x s8 kernel multiplies, in the main graph and in If/Loop bodies:
    static int8 Conv/MatMul/Gemm nodes reading a uint8 pair and an int8 weight, int8-dynamic's
    MatMulInteger / QAttention / DynamicQuantizeLSTM."""
    found = []
    inits: dict[str, onnx.TensorProto] = {}
    for scope, (body, _) in enumerate(proto_scopes(graph)):
        inits.update({t.name: t for t in body.initializer})  # outer names are seen in bodies
        producer = {o: n for n in body.node for o in n.output}
        for node in body.node:
            found += _node_sites(node, scope, inits, producer)
    return found


def _node_sites(node: onnx.NodeProto, scope: int, inits: dict, producer: dict) -> list[Site]:
    attrs = tuple((a.name, helper.get_attribute_value(a)) for a in node.attribute)
    name = node.name or node.output[0]
    if node.op_type in _INTEGER_OPS:
        found = []
        for slot, _, _ in _INTEGER_OPS[node.op_type]:
            weight = inits.get(node.input[slot]) if len(node.input) > slot else None
            if weight is None or weight.data_type != onnx.TensorProto.INT8 or \
                    len(weight.dims) not in (2, 3):
                continue
            label = name if slot == 1 else f"{name} (R)"
            activation = "" if node.op_type in _INSIDE else node.input[0]
            signal = ("int", node.output[0], -1) if node.op_type == "MatMulInteger" else ()
            found.append(Site(label, node.op_type, activation, 0, f"{node.output[0]}#{slot}",
                              node.input[slot], attrs, int(weight.dims[-1]), scope, signal))
        return found
    if node.op_type not in ("Conv", "MatMul", "Gemm") or len(node.input) < 2:
        return []
    act_dq, w_dq = producer.get(node.input[0]), producer.get(node.input[1])
    if act_dq is None or w_dq is None or act_dq.op_type != "DequantizeLinear" or \
            w_dq.op_type != "DequantizeLinear":
        return []
    q = producer.get(act_dq.input[0])
    if q is None or q.op_type != "QuantizeLinear" or len(q.input) < 3 or \
            q.input[2] not in inits or w_dq.input[0] not in inits:
        return []
    zero = inits[q.input[2]]
    if zero.data_type != onnx.TensorProto.UINT8 or \
            inits[w_dq.input[0]].data_type != onnx.TensorProto.INT8:
        return []
    dims = list(inits[w_dq.input[0]].dims)
    if node.op_type == "Conv" and "kernel_shape" not in dict(attrs):
        attrs += (("kernel_shape", dims[2:]),)  # optional in ONNX: the weight's shape
    channels = dims[0] if node.op_type == "Conv" or (
        node.op_type == "Gemm" and dict(attrs).get("transB", 0)) else dims[-1]
    bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else ""
    signal = ("float", node.output[0], bias, q.input[1], w_dq.input[1],
              1 if node.op_type == "Conv" else -1)
    return [Site(name, node.op_type, act_dq.input[0],
                 int(numpy_helper.to_array(zero).reshape(-1)[0]), f"{w_dq.output[0]}#0",
                 w_dq.input[0], attrs, channels, scope, signal)]


@dataclass
class Finding:
    pairs: int = 0          # weight pairs that can overflow at all
    overflows: float = 0.0  # pair sums past int16 on the data (assumed: the expected count)
    outputs: int = 0        # output values the data produced (positions x channels, sampled)
    worst: float = 0.0      # largest |pair sum| / 32767 seen
    assumed: bool = False   # no data reached it: uniform uint8 inputs assumed
    excess: float = 0.0     # sum of (|pair sum| - 32767)^2 over the overflows
    signal: float = 0.0     # sum of the accumulator's squares (zero points taken out)
    values: int = 0         # accumulator values summed there (0: not read)

    @property
    def rate(self) -> float:
        """Overflowing pair sums per output value."""
        return self.overflows / self.outputs if self.outputs else 0.0

    @property
    def harm(self) -> float | None:
        """The saturation's error power against the accumulator's, per output value (None
        where the accumulator could not be read: the rate decides there)."""
        if not self.values or not self.outputs or self.signal <= 0:
            return None
        return (self.excess / self.outputs) / (self.signal / self.values)



def find(model: Model, found_sites: list[Site], data: Dataset | None) -> dict[str, Finding]:
    """Each site's overflows: on up to ``MAX_BATCHES`` calibration batches where the data
    reaches its uint8 input (the main graph), else expected under uniform uint8 inputs (the
    widest a per-batch DynamicQuantizeLinear range spreads them)."""
    inits = {t.name: t for body, _ in proto_scopes(model.graph) for t in body.initializer}
    plans = {s.node: pairsums.pair_plans(s, tensor_values(inits[s.weight], model.source))
             for s in found_sites}
    findings = {s.node: Finding(pairs=sum(len(p[1]) for plan in plans[s.node] for p in plan))
                for s in found_sites}
    # Weights on disk (a large model): no whole-model session; the data-free count.
    measured = [s for s in found_sites if findings[s.node].pairs and data is not None
                and not model.lazy and s.scope == 0 and s.activation]
    for site in found_sites:
        if findings[site.node].pairs and site not in measured:
            pairsums.assume_uniform(site, plans[site.node], findings[site.node])
    if not measured:
        return findings
    types = {s.activation: onnx.TensorProto.UINT8 for s in measured}
    types.update({s.signal[1]: onnx.TensorProto.FLOAT if s.signal[0] == "float"
                  else onnx.TensorProto.INT32 for s in measured if s.signal})
    wanted = sorted(types)
    probe = model.copy()
    known = {o.name for o in probe.graph.output}
    probe.graph.output.extend(helper.make_tensor_value_info(n, types[n], None)
                              for n in wanted if n not in known)
    session = runtime.session(probe, optimize=False)
    for index in range(min(len(data), MAX_BATCHES)):
        values = dict(zip(wanted, session.run(wanted, data.make_batch(index))))
        for site in measured:
            finding = findings[site.node]
            pairsums.check(site, plans[site.node], values[site.activation], finding)
            if site.signal:
                accumulator = _accumulator(site, values[site.signal[1]], inits, model.source)
                finding.signal += float(np.sum(accumulator * accumulator))
                finding.values += accumulator.size
    return findings


def _accumulator(site: Site, output: np.ndarray, inits: dict, source) -> np.ndarray:
    """The layer's integer accumulator with the zero points taken out, from its output on the
    data: MatMulInteger's own int32 output, or ``(y - b) / (s_a s_w)`` of a QDQ layer."""
    if site.signal[0] == "int":
        return output.astype(np.float64)
    _, _, bias, act_scale, weight_scale, axis = site.signal
    shape = [1] * output.ndim
    shape[axis] = -1
    y = output.astype(np.float64)
    if bias:  # a Conv's [M] bias, or a Gemm's C (any shape broadcasting to the output)
        b = tensor_values(inits[bias], source).astype(np.float64)
        y = y - (b.reshape(shape) if b.size == y.shape[axis] else b)
    scale = float(tensor_values(inits[act_scale], source).reshape(-1)[0]) * \
        tensor_values(inits[weight_scale], source).astype(np.float64)
    return y / (scale.reshape(shape) if scale.ndim else scale)


def to_u8u8(model: Model, holders: set[str]) -> Model:
    """The int8 weights named by ``holders`` (``"output#slot"``: a DequantizeLinear or integer
    op by its first output, and the weight's input slot) as uint8 with zero point 128: the
    same values. One uint8 copy per weight however many nodes read it; an int8 initializer no
    node reads any more is dropped. Works in If/Loop bodies too."""
    result = model.copy()
    scopes = [body for body, _ in proto_scopes(result.graph)]
    owner = {t.name: body for body in scopes for t in body.initializer}
    taken = set(owner) | {o for body in scopes for n in body.node for o in n.output}
    made: dict[tuple, list[str]] = {}
    replaced: set[str] = set()
    for body in scopes:
        for node in body.node:
            for slot, zero_slot, scale_slot in _slots(node):
                if not node.output or f"{node.output[0]}#{slot}" not in holders:
                    continue
                weight = node.input[slot]
                # A DequantizeLinear's zero point has its scale's shape; MatMulInteger and
                # QAttention take a scalar; DynamicQuantizeLSTM its scale's [directions, 4H].
                shape = () if scale_slot is None else tuple(
                    int(d) for d in _find(owner, node.input[scale_slot]).dims)
                key = (weight, shape)
                if key not in made:
                    home = owner[weight]
                    q = tensor_values(_find(owner, weight), model.source).astype(np.int16)
                    made[key] = [_unique(f"{weight}_u8", taken), _unique(f"{weight}_zp128",
                                                                           taken)]
                    home.initializer.extend([
                        numpy_helper.from_array((q + 128).astype(np.uint8), made[key][0]),
                        numpy_helper.from_array(np.full(shape, 128, np.uint8), made[key][1])])
                    owner.update(dict.fromkeys(made[key], home))
                while len(node.input) <= zero_slot:
                    node.input.append("")
                replaced.update((weight, node.input[zero_slot]))
                node.input[slot], node.input[zero_slot] = made[key]
    read = {name for body in scopes for n in body.node for name in n.input} | {
        o.name for body in scopes for o in body.output}
    for body in scopes:
        kept = [t for t in body.initializer if t.name not in replaced or t.name in read]
        if len(kept) != len(body.initializer):
            del body.initializer[:]
            body.initializer.extend(kept)
    return result


def _slots(node: onnx.NodeProto) -> tuple:
    if node.op_type in _INTEGER_OPS:
        return _INTEGER_OPS[node.op_type]
    return ((0, 2, 1),) if node.op_type == "DequantizeLinear" else ()


def _over_budget(findings: dict[str, Finding]) -> set[str]:
    """The layers to move: where the accumulator was read, those with the most error power
    until what stays sums to at most ``HARM_LIMIT`` (the layers' relative noise powers add up
    at the output, as in a mixed-precision noise budget); elsewhere, those whose expected
    overflowing pair sums reach ``RATE_LIMIT`` per output value."""
    measured = sorted(((f.harm, n) for n, f in findings.items() if f.harm is not None),
                      reverse=True)
    left = sum(harm for harm, _ in measured)
    chosen = set()
    for harm, name in measured:
        if left <= HARM_LIMIT or harm <= 0:
            break
        chosen.add(name)
        left -= harm
    return chosen | {n for n, f in findings.items() if f.harm is None and f.rate >= RATE_LIMIT}


def _find(owner: dict, name: str) -> onnx.TensorProto:
    return next(t for t in owner[name].initializer if t.name == name)


def _unique(base: str, taken: set[str]) -> str:
    name, i = base, 1
    while name in taken:
        name, i = f"{base}_{i}", i + 1
    taken.add(name)
    return name


def run(model: Model, choice: str, data: Dataset | None, notes: list[str], details: dict,
        remedy: str = "u8u8", keeps: Callable[[Model, Model], tuple[bool, str]] | None = None
        ) -> Model:
    """``u8s8_overflow``: the chosen layers (``choice`` auto | all) given ``remedy``: widened
    scales (``widen.py``; ``auto``: kept where ``keeps(exact, widened)`` says so) or uint8
    weights; said in the notes and recorded per checked layer in ``details``."""
    found = sites(model.graph)
    if choice == "none" or not found:
        return model
    chosen = found if choice == "all" else _choose(model, found, data, notes, details)
    if not chosen:
        return model
    # auto widens only what it can check on data (keeps); without it, the exact remedy.
    scalable = [] if remedy == "u8u8" or (remedy == "auto" and keeps is None) else [
        s for s in chosen if not widen.widenable(s, model)]
    widened, factors = widen.widen(model, scalable) if scalable else (model, {})
    # Without a pair able to overflow (u8s8_overflow = all) a weight needs no remedy at all.
    chosen = [s for s in chosen if s not in scalable or factors[s.weight][0]]
    scalable = [s for s in scalable if factors[s.weight][0]]
    verdict = ""
    if scalable and remedy == "auto" and keeps is not None:
        # Against uint8 weights (int8-dynamic's MatMulInteger runs its u8 x s8 kernel even
        # with ONNX Runtime's optimizations off: the int8 model is not the exact one there).
        rest = {s.holder for s in chosen if s not in scalable}
        kept, verdict = keeps(to_u8u8(model, {s.holder for s in chosen}),
                              to_u8u8(widened, rest) if rest else widened)
        if not kept:
            scalable, widened, factors = [], model, {}
    rest = [s for s in chosen if s not in scalable]
    details["u8s8_remedy"] = {"scale": [{"node": s.node, "channels": factors[s.weight][0],
                                         "factor": round(factors[s.weight][1], 3)}
                                        for s in scalable],
                              "u8u8": [s.node for s in rest], "check": verdict}
    why = ("every layer (u8s8_overflow = all)" if choice == "all" else
           f"the most saturating uint8 x int8 pair sums on the calibration data, until the "
           f"error power left sums to at most {HARM_LIMIT:g} (where no data reaches a layer: "
           f"{RATE_LIMIT:.0%} of its output values expected to overflow)")
    if scalable:
        notes.append(f"u8s8_overflow: {len(scalable)} layers' int8 weight scales widened in the "
                     f"channels whose pairs can overflow (u8 x s8 kernels kept; at most one bit "
                     f"coarser there): {why}: {_names(scalable)}" +
                     (f"; {verdict}" if verdict else ""))
    if rest:
        reason = ("" if remedy == "u8u8" else "no calibration data to check widened scales "
                  "on" if keeps is None and remedy == "auto" else f"widening them lost fidelity "
                  f"({verdict})" if verdict and not scalable else "their weights cannot be "
                  "widened (QAttention, DynamicQuantizeLSTM, If/Loop bodies, shared weights)")
        notes.append(f"u8s8_overflow: {len(rest)} layers' weights stored as uint8 with zero "
                     f"point 128 (same values; ONNX Runtime's u8 x u8 kernels, which x86 CPUs "
                     f"without VNNI do not saturate): {why}" + (f"; {reason}" if reason else "")
                     + f": {_names(rest)}")
    return to_u8u8(widened, {s.holder for s in rest}) if rest else widened


def _names(chosen: list[Site]) -> str:
    return ", ".join(s.node for s in chosen[:4]) + (" ..." if len(chosen) > 4 else "")


def _choose(model: Model, found: list[Site], data: Dataset | None, notes: list[str],
            details: dict) -> list[Site]:
    """auto: the layers over the noise budget (every layer reading the same weight with them)."""
    findings = find(model, found, data)
    details["u8s8_overflow"] = [
        {"node": n, "risky_pairs": f.pairs, "overflows": round(f.overflows, 2),
         "per_output": float(f"{f.rate:.3g}"), "worst_pair_sum": round(f.worst, 3),
         "error_power": None if f.harm is None else float(f"{f.harm:.3g}"),
         "inputs": "assumed uniform" if f.assumed else "calibration data"}
        for n, f in findings.items() if f.pairs]
    # A weight several layers read is stored once: moved for all of them or none.
    over = _over_budget(findings)
    moved = {s.weight for s in found if s.node in over}
    chosen = [s for s in found if s.weight in moved]
    assumed = [s.node for s in chosen if findings[s.node].assumed]
    if assumed:
        where = ("no calibration data" if data is None else "weights on disk: no whole-model "
                 "session" if model.lazy else "calibration data cannot reach their inputs "
                 "(If/Loop bodies, LSTMs)")
        notes.append(f"u8s8_overflow: {len(assumed)} layers checked with uniform uint8 inputs "
                     f"assumed ({where}): pass --calib to check them on data, where fewer may "
                     f"need a remedy")
    return chosen
