"""Fixed input shapes for runtimes that need them (``compress --shape NAME=D,D,D``).

ONNX Runtime Mobile's NNAPI and CoreML providers and QNN's HTP take static shapes only; a model
exported with dynamic axes (batch, sequence, image width) is given concrete sizes here, after
compression and validation (which ran on the held-out data's own shapes). The edit is ONNX
Runtime's own tool (``onnxruntime.tools.onnx_model_utils``): ``make_input_shape_fixed`` sets the
input's dims and replaces each symbolic dim it fixes everywhere in the graph,
``fix_output_shapes`` writes the outputs' shapes where shape inference can tell them. The
result is checked: it loads in ONNX Runtime and computes the same outputs as before the edit on
random inputs of the given shapes (``InvalidOutput`` if not).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx

from onnxcomp import shape_inference
from onnxcomp.errors import InvalidOutput, UserError
from onnxcomp.model import Model


def check(model: Model, shapes: Mapping[str, Sequence[int]]) -> None:
    """The ``UserError`` that ``fix`` would raise for these shapes, found before any work: the
    edit tried on a graph holding the model's inputs alone."""
    _fix_inputs(model, shapes, onnx.helper.make_graph([], "inputs", list(model.graph.input),
                                                      []))


def fix(model: Model, shapes: Mapping[str, Sequence[int]]) -> tuple[Model, list[str]]:
    """A copy of ``model`` whose named inputs have the given shapes, and one note per input.
    A name that is not a graph input, a size below 1, a rank that differs or a static size
    that differs from the given one is a ``UserError``."""
    from onnxruntime.tools.onnx_model_utils import fix_output_shapes

    fixed = model.copy()
    notes = _fix_inputs(model, shapes, fixed.graph)
    if not model.lazy:  # shape inference reads the weights' shapes from the proto
        fixed = _static_value_info(fixed)
        fix_output_shapes(fixed.proto)
    check_same(model, fixed)
    return fixed, notes


# ONNX Runtime contrib ops whose output has its first input's type and shape (what onnx's own
# shape inference cannot say for them).
SHAPE_PRESERVING_CONTRIB = ("Gelu", "FastGelu", "QuickGelu", "BiasGelu")


def _static_value_info(model: Model) -> Model:
    """The intermediate shapes recomputed from the fixed inputs. Declared shapes with a
    symbolic dim are dropped first (the earlier passes' inference left names such as
    ``unk__0`` that ``make_input_shape_fixed`` does not know, and inference keeps them); then
    onnx's shape inference runs again, and the outputs of shape-preserving contrib ops (a fused
    Gelu), which it cannot follow, are declared with their input's type and shape (static or
    not: the types after them matter too) until nothing more is learned."""
    graph = model.graph
    static = [v for v in graph.value_info if _is_static(v)]
    del graph.value_info[:]
    graph.value_info.extend(static)
    contrib = [n for n in graph.node
               if n.domain == "com.microsoft" and n.op_type in SHAPE_PRESERVING_CONTRIB]
    for _ in range(len(contrib) + 1):
        try:
            inferred = shape_inference.inferred(model.proto)
        except Exception:  # noqa: BLE001 - runtimes infer the shapes themselves anyway
            return model
        known = {v.name: v for v in (*inferred.value_info, *inferred.input)}
        declared = {v.name for v in graph.value_info}
        learned = [(node.output[0], known[node.input[0]]) for node in contrib
                   if node.output[0] not in declared and node.input[0] in known]
        for name, source in learned:
            value = onnx.ValueInfoProto()
            value.CopyFrom(source)
            value.name = name
            graph.value_info.append(value)
        if not learned:
            break
    return model


def _is_static(value: onnx.ValueInfoProto) -> bool:
    shape = value.type.tensor_type.shape
    return value.type.tensor_type.HasField("shape") and all(
        d.HasField("dim_value") for d in shape.dim)


def _fix_inputs(model: Model, shapes: Mapping[str, Sequence[int]],
                graph: onnx.GraphProto) -> list[str]:
    from onnxruntime.tools.onnx_model_utils import make_input_shape_fixed

    initializers = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in initializers]
    notes = []
    for name, dims in shapes.items():
        if name not in inputs:
            raise UserError(f"--shape {name}: not an input of the model (inputs: "
                            f"{', '.join(inputs)})")
        if not dims or any(int(d) < 1 for d in dims):
            raise UserError(f"--shape {name}: sizes must be at least 1, got {list(dims)}")
        try:
            make_input_shape_fixed(graph, name, [int(d) for d in dims])
        except ValueError as exc:  # rank or a static size differs
            raise UserError(f"--shape {name}={','.join(map(str, dims))}: {exc}") from None
        notes.append(f"input {name} fixed to shape {list(map(int, dims))}")
    return notes


def check_same(before: Model, after: Model) -> None:
    """``after`` loads in ONNX Runtime and gives ``before``'s outputs on one random batch of
    its input shapes (dims left dynamic: the random data's defaults)."""
    from onnxcomp import calibration, runtime

    feeds = calibration.random_data(after, 1).make_batch(0)  # the fixed inputs' shapes
    try:
        fixed = runtime.session(after)
    except Exception as exc:  # ONNX Runtime refusing our edit is our bug, said as such
        raise InvalidOutput(f"the model with fixed input shapes does not load in ONNX Runtime: "
                            f"{str(exc).strip().splitlines()[0]}") from exc
    want = runtime.session(before).run(None, feeds)
    for got, expected in zip(fixed.run(None, feeds), want):
        got, expected = np.asarray(got), np.asarray(expected)
        if got.shape != expected.shape or (np.issubdtype(got.dtype, np.number) and not
                                           np.allclose(got, expected, rtol=1e-4, atol=1e-5)):
            raise InvalidOutput("the model with fixed input shapes computes other outputs "
                                "than before the edit")
