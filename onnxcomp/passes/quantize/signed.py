"""Feature maps in signed int8 for OpenVINO: the QDQ pairs between a Conv and the elementwise
ops after it, laid out the way OpenVINO's CPU plugin fuses them.

OpenVINO's low-precision transformations fold a FakeQuantize into the Conv that produces its
input (the Conv then writes int8, a quarter of the bytes) only when that FakeQuantize is the
Conv output's one reader, and run Add / Multiply / ReduceMean / Interpolate in i8 when their
inputs come through FakeQuantize. A conv net's feature-map QDQ pairs (``conv_adds``: residual
and pyramid Adds, squeeze-excitation Muls, Concats, Resizes) leave four things in the way:
- a squeeze-excitation block reads the Conv output twice, through the QDQ pair (the gating Mul)
  and directly (GlobalAveragePool): two readers, so no fold. Here every pooling reader of a
  quantized tensor reads the pair's DequantizeLinear instead (the mean of the values the Mul
  multiplies; one pair per tensor).
- a feature-pyramid level's sum reaches the next level through a nearest Resize, which read
  it as float (the pair was after the Resize): the Interpolate ran f32 and the Add wrote f32.
  The Resize now reads a pair: the one already on its input, or a copy of the pair after it
  (exact: nearest resizing copies values, so both sides share one grid).
- a Conv output before its activation is signed: as uint8 with a zero point OpenVINO executed
  the pair as a standalone f32 FakeQuantize. Pairs that no Conv, ConvTranspose, MatMul or Gemm
  reads and whose range crosses zero become symmetric int8 (zero point 0, scale ``max(-low,
  high) / 127``), which OpenVINO folds. Pairs a Conv reads stay uint8: their zero point is
  what the u8 x i8 kernels take, and signed inputs there measured no faster.
- a tensor computed only to be concatenated (the pyramid's finest level, an Add, goes straight
  into the Concat) carried its own pair and then the Concat's: OpenVINO moves the Concat's
  FakeQuantize onto each input, so that Add executed two requantizations in a row (666 us
  against NNCF's 317 us at 2 threads on PP-OCRv4 det). The Concat now reads such a tensor
  unrounded and its output pair rounds it once; inputs that come through a nearest Resize keep
  their pair (the Resize runs in 8 bits between the two copies of one grid).
Measured on PP-OCRv4 det, ``--target openvino`` (docs/targets.md): 20 Convs wrote f32 before, 11
after, and the six Interpolates run in 8 bits; one interleaved run: 0.509x -> 0.472x OpenVINO
float latency at 1 thread without the Resize pairs, 0.468x with them (NNCF's IR 0.476x in that
run), output map cosine in OpenVINO .9953 -> .9946; the Concat rule then 0.453x -> 0.447x at 1
thread and 0.489x -> 0.486x at 2 (200 rounds, NNCF's IR 0.440x / 0.476x). ONNX Runtime's CPU
kernels want uint8 feature maps (QLinearAdd and friends), so the ``ort-cpu`` target leaves this
off.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from onnxcomp.graph import scalar_constant, unique_name

_POOLING = ("GlobalAveragePool", "ReduceMean")
_INTEGER_READERS = ("Conv", "ConvTranspose", "MatMul", "Gemm")


def activation_pairs(graph: gs.Graph, zero_point_dtype: type = np.uint8
                     ) -> list[tuple[gs.Node, list[gs.Node]]]:
    """(QuantizeLinear, its DequantizeLinears) of every activation pair with a scalar zero
    point of ``zero_point_dtype`` (uint8: what the static rewrite wrote for feature maps)."""
    pairs = []
    for node in graph.nodes:
        if node.op != "QuantizeLinear" or isinstance(node.inputs[0], gs.Constant):
            continue
        if len(node.inputs) < 3 or scalar_constant(node.inputs[1]) is None:
            continue
        zero_point = scalar_constant(node.inputs[2])
        if zero_point is None or zero_point.dtype != zero_point_dtype:
            continue
        readers = list(node.outputs[0].outputs)
        if readers and all(r.op == "DequantizeLinear" for r in readers):
            pairs.append((node, readers))
    return pairs


def _nearest_resize(node: gs.Node) -> bool:
    return node.op == "Resize" and node.attrs.get("mode", "nearest") == "nearest"


def _pair_before_resizes(graph: gs.Graph) -> int:
    """A nearest Resize whose input carries no pair but whose output's one reader is a pair's
    QuantizeLinear gets a copy of that pair on its input: exact (nearest resizing copies
    values, so quantizing before or after it is the same), and OpenVINO then runs the
    Interpolate in i8 and folds the pair into the op that wrote its input. (Where only Convs
    read the pair after the Resize, it stays uint8 while the copy, read by the Resize, may turn
    signed in ``rewrite``: then the two grids differ by one more rounding, within a step.)"""
    added = 0
    for node in list(graph.nodes):
        if not _nearest_resize(node) or len(node.outputs[0].outputs) != 1:
            continue
        source, after = node.inputs[0], node.outputs[0].outputs[0]
        if after.op != "QuantizeLinear" or len(after.inputs) < 3:
            continue
        if any(r.op == "QuantizeLinear" for r in source.outputs):
            continue  # a pair is there: the loop in ``rewrite`` points the Resize at it
        name = source.name
        quantized = gs.Variable(unique_name(graph, f"{name}_resize_quantized"),
                                dtype=after.outputs[0].dtype)
        decoded = gs.Variable(unique_name(graph, f"{name}_resize_dequantized"),
                              dtype=np.float32)
        params = list(after.inputs[1:3])
        graph.nodes.append(gs.Node("QuantizeLinear", unique_name(graph, f"{name}_resize_Q"),
                                   inputs=[source, *params], outputs=[quantized]))
        graph.nodes.append(gs.Node("DequantizeLinear", unique_name(graph, f"{name}_resize_DQ"),
                                   inputs=[quantized, *params], outputs=[decoded]))
        node.inputs[0] = decoded
        added += 1
    if added:
        graph.toposort()
    return added


def _concatenated_only(quantize: gs.Node, dequantizes: list[gs.Node]) -> gs.Node | None:
    """The Concat that is the one reader of this pair when the pair is redundant for OpenVINO:
    the Concat's output goes into a pair of its own (OpenVINO moves that pair's FakeQuantize onto
    every Concat input), and the tensor is not a nearest Resize's output (those pairs share
    their grid with the copy before the Resize). None otherwise."""
    readers = [r for dq in dequantizes for r in dq.outputs[0].outputs]
    if len(readers) != 1 or readers[0].op != "Concat":
        return None
    concat, source = readers[0], quantize.inputs[0]
    after = concat.outputs[0].outputs
    if not after or any(r.op != "QuantizeLinear" for r in after):
        return None
    if source.inputs and _nearest_resize(source.inputs[0]):
        return None
    return concat


def _drop_pairs_before_concats(graph: gs.Graph) -> int:
    """The Concat reads the tensor itself where its pair only fed the Concat (see the module
    docstring): one rounding instead of two, and one FakeQuantize fewer for OpenVINO."""
    dropped = 0
    for quantize, dequantizes in activation_pairs(graph, np.int8) + activation_pairs(graph):
        concat = _concatenated_only(quantize, dequantizes)
        if concat is None:
            continue
        decoded = {dq.outputs[0].name for dq in dequantizes}
        for index, tensor in enumerate(concat.inputs):
            if tensor.name in decoded:
                concat.inputs[index] = quantize.inputs[0]
        for node in (quantize, *dequantizes):
            node.outputs.clear()
        dropped += 1
    if dropped:
        graph.cleanup()
    return dropped


def rewrite(graph: gs.Graph) -> dict[str, int]:
    """Pairs before nearest Resizes, pooling and Resize readers onto the pairs'
    DequantizeLinear, then signed pairs no integer kernel reads to symmetric int8, then pairs
    only a quantized Concat reads taken out. Returns the counts ``{"resize_pairs": k,
    "rewired": n, "signed": m, "concat_inputs": c}``."""
    counts = {"resize_pairs": _pair_before_resizes(graph), "rewired": 0, "signed": 0}
    for quantize, dequantizes in activation_pairs(graph):
        source, decoded = quantize.inputs[0], dequantizes[0].outputs[0]
        for reader in list(source.outputs):
            if reader.op in _POOLING or _nearest_resize(reader):
                for index, tensor in enumerate(reader.inputs):
                    if tensor is source:
                        reader.inputs[index] = decoded
                counts["rewired"] += 1
    for quantize, dequantizes in activation_pairs(graph):
        readers = [r for dq in dequantizes for r in dq.outputs[0].outputs]
        if not readers or all(r.op in _INTEGER_READERS for r in readers):
            continue
        if uint8_range(quantize)[0] >= 0:
            continue
        to_symmetric(graph, quantize, dequantizes)
        counts["signed"] += 1
    counts["concat_inputs"] = _drop_pairs_before_concats(graph)
    return counts


def uint8_range(quantize: gs.Node) -> tuple[float, float]:
    """The float range ``[low, high]`` a uint8 pair's scale and zero point cover."""
    scale = float(scalar_constant(quantize.inputs[1]))
    zero_point = int(scalar_constant(quantize.inputs[2]))
    return -zero_point * scale, (255 - zero_point) * scale


def to_symmetric(graph: gs.Graph, quantize: gs.Node, dequantizes: list[gs.Node]) -> None:
    """One uint8 pair as symmetric int8 covering the same range: zero point 0, scale
    ``max(-low, high) / 127`` (a one-signed range keeps 128 of its 256 levels)."""
    low, high = uint8_range(quantize)
    name = quantize.outputs[0].name
    new_scale = gs.Constant(unique_name(graph, f"{name}_signed_scale"),
                            np.asarray(max(-low, high) / 127, np.float32))
    new_zero = gs.Constant(unique_name(graph, f"{name}_signed_zero_point"),
                           np.asarray(0, np.int8))
    for node in [quantize, *dequantizes]:
        node.inputs[1], node.inputs[2] = new_scale, new_zero
    quantize.outputs[0].dtype = np.int8
