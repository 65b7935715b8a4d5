"""Tiny graphs with prunable (and factorable) chains inside If / Loop bodies, built with
``onnx.helper`` (tests of prune and lowrank inside bodies).

- ``if_conv_chain``: a Conv, then an If whose branches each compute Conv (C -> H) -> Relu -> Conv
  (H -> C) -> Tanh on the outer Conv's output: the hidden H channels live inside the branch, the
  C channels cross the boundary. ``outer_weights``: the branch weights are outer initializers
  each read by one branch (as the torch.export silero-vad writes them); ``shared``: both
  branches' first Conv read one outer weight.
- ``loop_mlp``: a Loop (3 trips) whose body computes ``h = Tanh(Relu(h @ W1 + b1) @ W2)``; the
  hidden width H is inside the body.
- ``if_matmuls``: an If whose branches compute ``Tanh(x @ W)`` with a K x N weight each (or one
  shared by both with ``shared``), for lowrank.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.model import Model

IR_VERSION = 8
C, H, L, D = 4, 8, 16, 16


def _value(name: str, shape, elem: int = TensorProto.FLOAT) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, elem, shape)


def _init(name: str, rng: np.random.Generator, shape, scale: float = 0.4) -> onnx.TensorProto:
    return numpy_helper.from_array((rng.standard_normal(shape) * scale).astype(np.float32), name)


def _model(graph: onnx.GraphProto) -> Model:
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = IR_VERSION
    onnx.checker.check_model(proto, full_check=True)
    return Model(proto)


def _chain(prefix: str, source: str, rng: np.random.Generator, first: str | None = None
           ) -> tuple[onnx.GraphProto, list[onnx.TensorProto]]:
    """The branch graph and its weights (``first``: the first Conv reads that weight)."""
    weights = [_init(f"{prefix}.w1", rng, (H, C, 3)), _init(f"{prefix}.b1", rng, (H,), 0.1),
               _init(f"{prefix}.w2", rng, (C, H, 3)), _init(f"{prefix}.b2", rng, (C,), 0.1)]
    w1 = first or f"{prefix}.w1"
    if first:
        weights = weights[1:]
    nodes = [helper.make_node("Conv", [source, w1, f"{prefix}.b1"], [f"{prefix}_h"],
                              name=f"{prefix}_conv1", pads=[1, 1]),
             helper.make_node("Relu", [f"{prefix}_h"], [f"{prefix}_r"], name=f"{prefix}_relu"),
             helper.make_node("Conv", [f"{prefix}_r", f"{prefix}.w2", f"{prefix}.b2"],
                              [f"{prefix}_c"], name=f"{prefix}_conv2", pads=[1, 1]),
             helper.make_node("Tanh", [f"{prefix}_c"], [f"{prefix}_out"], name=f"{prefix}_tanh")]
    return helper.make_graph(nodes, prefix, [], [_value(f"{prefix}_out", None)]), weights


def if_conv_chain(outer_weights: bool = False, shared: bool = False, seed: int = 0) -> Model:
    rng = np.random.default_rng(seed)
    first = "shared.w1" if shared else None
    outer = [_init("top.w", rng, (C, C, 3))]
    if shared:
        outer.append(_init("shared.w1", rng, (H, C, 3)))
    branches = {}
    for prefix in ("then", "else"):
        graph, weights = _chain(prefix, "t", rng, first)
        if outer_weights or shared:
            outer.extend(weights)
        else:
            graph.initializer.extend(weights)
        branches[prefix] = graph
    nodes = [helper.make_node("Conv", ["x", "top.w"], ["t"], name="top_conv", pads=[1, 1]),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branches["then"],
                              else_branch=branches["else"])]
    graph = helper.make_graph(
        nodes, "if_conv_chain", [_value("x", [1, C, L]), _value("cond", [], TensorProto.BOOL)],
        [_value("y", [1, C, L])], outer)
    return _model(graph)


def loop_mlp(trips: int = 3, seed: int = 0) -> Model:
    rng = np.random.default_rng(seed)
    body = helper.make_graph(
        [helper.make_node("MatMul", ["h_in", "W1"], ["u"], name="body_mm1"),
         helper.make_node("Add", ["u", "b1"], ["ub"], name="body_add"),
         helper.make_node("Relu", ["ub"], ["r"], name="body_relu"),
         helper.make_node("MatMul", ["r", "W2"], ["v"], name="body_mm2"),
         helper.make_node("Tanh", ["v"], ["h_out"], name="body_tanh"),
         helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body_cond")],
        "body", [_value("i", [], TensorProto.INT64), _value("cond_in", [], TensorProto.BOOL),
                 _value("h_in", [1, D])],
        [_value("cond_out", [], TensorProto.BOOL), _value("h_out", [1, D])],
        [_init("W1", rng, (D, H)), _init("b1", rng, (H,), 0.1), _init("W2", rng, (H, D))])
    graph = helper.make_graph(
        [helper.make_node("Loop", ["M", "", "x"], ["y"], name="loop", body=body)],
        "loop_mlp", [_value("x", [1, D])], [_value("y", [1, D])],
        [numpy_helper.from_array(np.array(trips, np.int64), "M")])
    return _model(graph)


def if_matmuls(k: int = 32, n: int = 32, shared: bool = False, seed: int = 0) -> Model:
    """Branch inputs are ``x`` scaled differently per branch (Mul by 1 / by 3), then MatMul by
    a low-effective-rank-input-sensitive weight; the outer input ``x`` has few strong
    directions, so whitening by the body's recorded values changes the factors."""
    rng = np.random.default_rng(seed)
    outer = []

    def branch(prefix: str, scale: float) -> onnx.GraphProto:
        w = "shared.w" if shared else f"{prefix}.w"
        inits = [numpy_helper.from_array(np.array(scale, np.float32), f"{prefix}.s")]
        if not shared:
            inits.append(_init(w, rng, (k, n), 1.0 / np.sqrt(k)))
        nodes = [helper.make_node("Mul", ["x", f"{prefix}.s"], [f"{prefix}_a"],
                                  name=f"{prefix}_mul"),
                 helper.make_node("MatMul", [f"{prefix}_a", w], [f"{prefix}_m"],
                                  name=f"{prefix}_mm"),
                 helper.make_node("Tanh", [f"{prefix}_m"], [f"{prefix}_out"],
                                  name=f"{prefix}_tanh")]
        return helper.make_graph(nodes, prefix, [], [_value(f"{prefix}_out", None)], inits)

    if shared:
        outer.append(_init("shared.w", rng, (k, n), 1.0 / np.sqrt(k)))
    node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then", 1.0),
                            else_branch=branch("else", 3.0))
    graph = helper.make_graph([node], "if_matmuls",
                              [_value("x", ["batch", k]), _value("cond", [], TensorProto.BOOL)],
                              [_value("y", ["batch", n])], outer)
    return _model(graph)


def nested_if_conv_chain(seed: int = 0) -> Model:
    """An If whose then-branch holds another If: the Conv chain of ``if_conv_chain`` in each
    innermost branch (``inner_then``, ``inner_else``), reading the outer input ``x``; the outer
    else-branch is ``Tanh(x)``."""
    rng = np.random.default_rng(seed)
    inner_then, w_then = _chain("inner_then", "x", rng)
    inner_else, w_else = _chain("inner_else", "x", rng)
    inner_then.initializer.extend(w_then)
    inner_else.initializer.extend(w_else)
    inner = helper.make_node("If", ["c2"], ["outer_then_out"], name="inner_if",
                             then_branch=inner_then, else_branch=inner_else)
    outer_then = helper.make_graph([inner], "outer_then", [], [_value("outer_then_out", None)])
    outer_else = helper.make_graph(
        [helper.make_node("Tanh", ["x"], ["outer_else_out"], name="outer_else_tanh")],
        "outer_else", [], [_value("outer_else_out", None)])
    node = helper.make_node("If", ["c1"], ["y"], name="outer_if", then_branch=outer_then,
                            else_branch=outer_else)
    graph = helper.make_graph(
        [node], "nested_if_conv_chain",
        [_value("x", [1, C, L]), _value("c1", [], TensorProto.BOOL),
         _value("c2", [], TensorProto.BOOL)], [_value("y", [1, C, L])])
    return _model(graph)


def weight_read_in_main_and_branch(seed: int = 0) -> Model:
    """Main graph: Conv(x, wa) (C -> H) -> Relu -> Conv(wb) (H -> C) = t; an If whose
    then-branch computes Tanh(Conv(t, wa)) (the main graph's weight ``wa`` again) and whose
    else-branch computes Tanh(Conv(t, wc)) with its own weight."""
    rng = np.random.default_rng(seed)

    def branch(prefix: str, weight: str) -> onnx.GraphProto:
        nodes = [helper.make_node("Conv", ["t", weight], [f"{prefix}_c"], name=f"{prefix}_conv",
                                  pads=[1, 1]),
                 helper.make_node("Tanh", [f"{prefix}_c"], [f"{prefix}_out"],
                                  name=f"{prefix}_tanh")]
        return helper.make_graph(nodes, prefix, [], [_value(f"{prefix}_out", None)])

    nodes = [helper.make_node("Conv", ["x", "wa"], ["h"], name="main_conv1", pads=[1, 1]),
             helper.make_node("Relu", ["h"], ["r"], name="main_relu"),
             helper.make_node("Conv", ["r", "wb"], ["t"], name="main_conv2", pads=[1, 1]),
             helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch("then", "wa"),
                              else_branch=branch("else", "wc"))]
    graph = helper.make_graph(
        nodes, "weight_read_in_main_and_branch",
        [_value("x", [1, C, L]), _value("cond", [], TensorProto.BOOL)], [_value("y", [1, H, L])],
        [_init("wa", rng, (H, C, 3)), _init("wb", rng, (C, H, 3)), _init("wc", rng, (H, C, 3))])
    return _model(graph)
