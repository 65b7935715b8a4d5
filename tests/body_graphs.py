"""Tiny graphs with weights inside If / Loop / Scan bodies (tests of ``onnxcomp.subgraphs``,
static int8 in bodies and cleanup's loop-invariant rewrite), built with ``onnx.helper``.

- ``if_convs``: a Conv, then an If whose branches each compute Relu -> Conv (own weight) -> Tanh
  on the outer Conv's output, so the branch Conv reads a tensor that exists only in its branch;
- ``nested_if_convs``: an If whose then-branch holds another If, a Conv in each innermost branch;
- ``loop_matmul``: a Loop (trip count 3) whose body computes ``h = Tanh(h @ W)``; with
  ``carried_weight`` W is a Loop-carried value the body passes through unchanged (as
  Paddle2ONNX writes a decoder's weights), else the body reads the outer initializer;
- ``scan_matmul``: a Scan over a sequence, state ``s = Tanh(s @ W + x_t)``.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.model import Model

IR_VERSION = 8
CHANNELS, LENGTH, DIM = 4, 32, 16


def _value(name: str, shape, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _init(name: str, rng: np.random.Generator, shape, scale: float) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _model(graph: onnx.GraphProto, opset: int = 17) -> Model:
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    return Model(proto)


def _conv_branch(prefix: str, source: str, rng: np.random.Generator) -> onnx.GraphProto:
    """Relu(source) -> Conv(own weight, bias) -> Tanh -> branch output ``{prefix}_out`` (the
    Tanh gives the Conv's output a consumer inside the branch, where its output QDQ goes)."""
    inits = [_init(f"{prefix}.w", rng, (CHANNELS, CHANNELS, 3), 0.3),
             _init(f"{prefix}.b", rng, (CHANNELS,), 0.1)]
    nodes = [helper.make_node("Relu", [source], [f"{prefix}_a"], name=f"{prefix}_relu"),
             helper.make_node("Conv", [f"{prefix}_a", f"{prefix}.w", f"{prefix}.b"],
                              [f"{prefix}_c"], name=f"{prefix}_conv", pads=[1, 1]),
             helper.make_node("Tanh", [f"{prefix}_c"], [f"{prefix}_out"], name=f"{prefix}_tanh")]
    return helper.make_graph(nodes, prefix, [], [_value(f"{prefix}_out", None)], inits)


def if_convs(seed: int = 0) -> Model:
    rng = np.random.default_rng(seed)
    nodes = [helper.make_node("Conv", ["x", "top.w"], ["t"], name="top_conv", pads=[1, 1]),
             helper.make_node("If", ["cond"], ["y"], name="if",
                              then_branch=_conv_branch("then", "t", rng),
                              else_branch=_conv_branch("else", "t", rng))]
    graph = helper.make_graph(
        nodes, "if_convs", [_value("x", [1, CHANNELS, LENGTH]), _value("cond", [], TensorProto.BOOL)],
        [_value("y", [1, CHANNELS, LENGTH])], [_init("top.w", rng, (CHANNELS, CHANNELS, 3), 0.3)])
    return _model(graph)


def nested_if_convs(seed: int = 0) -> Model:
    rng = np.random.default_rng(seed)
    inner = helper.make_node("If", ["c2"], ["outer_then_out"], name="inner_if",
                             then_branch=_conv_branch("inner_then", "x", rng),
                             else_branch=_conv_branch("inner_else", "x", rng))
    outer_then = helper.make_graph([inner], "outer_then", [], [_value("outer_then_out", None)])
    node = helper.make_node("If", ["c1"], ["y"], name="outer_if", then_branch=outer_then,
                            else_branch=_conv_branch("outer_else", "x", rng))
    graph = helper.make_graph(
        [node], "nested_if_convs",
        [_value("x", [1, CHANNELS, LENGTH]), _value("c1", [], TensorProto.BOOL),
         _value("c2", [], TensorProto.BOOL)], [_value("y", [1, CHANNELS, LENGTH])])
    return _model(graph)


def loop_matmul(carried_weight: bool = True, weight_output: bool = False, trips: int = 3,
                seed: int = 0) -> Model:
    """``weight_output``: the carried W's final value is a graph output too."""
    rng = np.random.default_rng(seed)
    weight = "w_in" if carried_weight else "W"
    body_nodes = [helper.make_node("MatMul", ["h_in", weight], ["hw"], name="body_mm"),
                  helper.make_node("Tanh", ["hw"], ["h_out"], name="body_tanh"),
                  helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")]
    body_inputs = [_value("i", [], TensorProto.INT64), _value("cond_in", [], TensorProto.BOOL),
                   _value("h_in", None)]
    body_outputs = [_value("cond_out", [], TensorProto.BOOL), _value("h_out", None)]
    loop_inputs = ["M", "keep_going", "x"]
    loop_outputs = ["y"]
    if carried_weight:
        body_inputs.append(_value("w_in", None))
        body_outputs.append(_value("w_in", None))  # passed through unchanged
        loop_inputs.append("W")
        loop_outputs.append("w_final")
    body = helper.make_graph(body_nodes, "body", body_inputs, body_outputs)
    inits = [_init("W", rng, (DIM, DIM), 1.0 / np.sqrt(DIM)),
             numpy_helper.from_array(np.array(trips, np.int64), "M"),
             numpy_helper.from_array(np.array(True), "keep_going")]
    outputs = [_value("y", ["batch", DIM])]
    if weight_output:
        outputs.append(_value("w_final", [DIM, DIM]))
    graph = helper.make_graph([helper.make_node("Loop", loop_inputs, loop_outputs, name="loop",
                                                body=body)],
                              "loop_matmul", [_value("x", ["batch", DIM])], outputs, inits)
    return _model(graph)


def scan_matmul(steps: int = 5, reverse: bool = False, seed: int = 0) -> Model:
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["s_in", "W"], ["sw"], name="scan_mm"),
         helper.make_node("Add", ["sw", "x_t"], ["pre"], name="scan_add"),
         helper.make_node("Tanh", ["pre"], ["s_out"], name="scan_tanh"),
         helper.make_node("Identity", ["s_out"], ["scanned"], name="scan_copy")],
        "scan_body", [_value("s_in", [1, DIM]), _value("x_t", [1, DIM])],
        [_value("s_out", [1, DIM]), _value("scanned", [1, DIM])])
    node = helper.make_node("Scan", ["s0", "seq"], ["s_final", "all"], name="scan", body=body,
                            num_scan_inputs=1, scan_input_directions=[int(reverse)])
    graph = helper.make_graph([node], "scan_matmul",
                              [_value("s0", [1, DIM]), _value("seq", [steps, 1, DIM])],
                              [_value("s_final", [1, DIM]), _value("all", [steps, 1, DIM])],
                              [_init("W", rng, (DIM, DIM), 1.0 / np.sqrt(DIM))])
    return _model(graph)


def loop_with_if(trips: int = 3, seed: int = 0) -> Model:
    """A Loop whose body holds an If (on the outer input ``flag``): each branch computes
    ``Tanh(Relu(h) @ W_branch)``, so the branch MatMul reads a tensor of the nested branch."""
    rng = np.random.default_rng(seed)

    def branch(prefix: str) -> onnx.GraphProto:
        nodes = [helper.make_node("Relu", ["h_in"], [f"{prefix}_a"], name=f"{prefix}_relu"),
                 helper.make_node("MatMul", [f"{prefix}_a", f"{prefix}.w"], [f"{prefix}_m"],
                                  name=f"{prefix}_mm"),
                 helper.make_node("Tanh", [f"{prefix}_m"], [f"{prefix}_out"],
                                  name=f"{prefix}_tanh")]
        return helper.make_graph(nodes, prefix, [], [_value(f"{prefix}_out", None)],
                                 [_init(f"{prefix}.w", rng, (DIM, DIM), 1.0 / np.sqrt(DIM))])

    body = helper.make_graph(
        [helper.make_node("If", ["flag"], ["h_out"], name="body_if",
                          then_branch=branch("then"), else_branch=branch("else")),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body", [_value("i", [], TensorProto.INT64), _value("cond_in", [], TensorProto.BOOL),
                 _value("h_in", None)],
        [_value("cond_out", [], TensorProto.BOOL), _value("h_out", None)])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "", "x"], ["y"], name="loop", body=body)],
        "loop_with_if", [_value("x", ["batch", DIM]), _value("flag", [], TensorProto.BOOL)],
        [_value("y", ["batch", DIM])], [numpy_helper.from_array(np.array(trips, np.int64), "M")])
    return _model(graph)
