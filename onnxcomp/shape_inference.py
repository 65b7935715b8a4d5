"""ONNX shape inference on a model's skeleton, so that the weights are never copied.

``onnx.shape_inference.infer_shapes(proto)`` serializes the model, parses it in C++, serializes
the result and parses it back: four transient copies of every weight (prune on clip-vit-b32,
577 MB of weights: 1.2 GB more resident at each of its two inferences). Inference reads nothing
of a large weight but its type and dims, so here each initializer over ``SMALL`` elements
becomes a graph input of its type and dims; small ones (shape-like constants that data
propagation reads: Reshape targets, Slice starts, pads) stay. The value_info inferred is the
same; only the skeleton is copied.
"""

from __future__ import annotations

import onnx
from onnx import helper

from onnxcomp.checks import element_count, model_shell

SMALL = 1024  # elements


def skeleton(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, set[str]]:
    """``proto`` with its large initializers as typed graph inputs (weights in Constant nodes
    and subgraphs stay as they are); and the names of those stand-in inputs."""
    copy = model_shell(proto, graph_skip=("initializer",))
    graph = copy.graph
    inputs = {i.name for i in graph.input}
    stand_ins: set[str] = set()
    for tensor in proto.graph.initializer:
        if element_count(tensor) <= SMALL and tensor.data_location != onnx.TensorProto.EXTERNAL:
            graph.initializer.add().CopyFrom(tensor)
        elif tensor.name not in inputs:  # (an old-IR model lists it among the inputs already)
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type,
                                                             list(tensor.dims)))
            stand_ins.add(tensor.name)
    return copy, stand_ins


def inferred(proto: onnx.ModelProto, data_prop: bool = False) -> onnx.GraphProto:
    """The graph of ``proto``'s inferred skeleton: its ``value_info`` and ``output`` carry what
    ONNX shape inference found (initializers and weights absent). Raises as onnx does."""
    shell, stand_ins = skeleton(proto)
    result = onnx.shape_inference.infer_shapes(shell, data_prop=data_prop).graph
    kept = [i for i in result.input if i.name not in stand_ins]
    del result.input[:]
    result.input.extend(kept)
    return result


def with_shapes(proto: onnx.ModelProto, data_prop: bool = False) -> onnx.ModelProto:
    """A copy of ``proto`` with what shape inference gives it (value_info, outputs, and the
    value_info of subgraphs, which live in the nodes), as ``onnx.shape_inference.infer_shapes``
    returns, at one copy of the weights."""
    graph = inferred(proto, data_prop)
    result = model_shell(proto, graph_skip=("node", "value_info", "output"))
    for field in ("node", "value_info", "output"):
        getattr(result.graph, field).extend(getattr(graph, field))
    return result
