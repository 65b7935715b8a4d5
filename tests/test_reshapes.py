"""Reshape targets built from the input's own dims become constants (onnxcomp.reshapes, through
cleanup): the Shape -> Gather -> Unsqueeze -> Concat arithmetic goes, the outputs stay the same
at other batch and sequence sizes, and targets that are not provably the input's dims stay."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import reshapes, runtime
from onnxcomp.model import Model
from onnxcomp.passes import cleanup
from onnxcomp.pipeline import Context
from onnxcomp.recipe import parse_recipe, with_cleanup
from onnxcomp.reshapes import static_targets

SHAPE_OPS = {"Shape", "Gather", "Unsqueeze", "Concat"}


def _dim(shape_of: str, index: int, prefix: str, nodes: list) -> str:
    n = helper.make_node
    nodes += [n("Shape", [shape_of], [f"{prefix}_shape"]),
              n("Gather", [f"{prefix}_shape", f"i{index}"], [f"{prefix}_dim"], axis=0),
              n("Unsqueeze", [f"{prefix}_dim", "axes0"], [f"{prefix}_part"])]
    return f"{prefix}_part"


def attention(split_from: str = "x", split_index: tuple[int, int] = (0, 1),
              allowzero: int = 0, other_dims: tuple[str, str] = ("o", "t")) -> Model:
    """x[batch, seq, 16] -> MatMul -> Reshape to [B, S, -1, 8] with B, S read from Shape(h)
    -> Transpose -> scores (+ mask[mb, 1, 1, ms], a broadcast) -> Softmax -> context ->
    Transpose -> Reshape to [B, S, 16] -> y. ``split_from``: the tensor the split target's dims
    are read from (``y_other``: an input with dims of other names)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 16)) * 0.3).astype(np.float32),
                                     "w"),
             numpy_helper.from_array(np.array(0, np.int64), "i0"),
             numpy_helper.from_array(np.array(1, np.int64), "i1"),
             numpy_helper.from_array(np.array([0], np.int64), "axes0"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus1"),
             numpy_helper.from_array(np.array([8], np.int64), "eight"),
             numpy_helper.from_array(np.array([16], np.int64), "sixteen")]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w"], ["h"], name="proj")]
    b = _dim(split_from, split_index[0], "sb", nodes)
    s = _dim(split_from, split_index[1], "ss", nodes)
    nodes += [n("Concat", [b, s, "minus1", "eight"], ["split_shape"], axis=0),
              n("Reshape", ["h", "split_shape"], ["heads"], name="split", allowzero=allowzero),
              n("Transpose", ["heads"], ["q"], perm=[0, 2, 1, 3]),
              n("Transpose", ["heads"], ["kt"], perm=[0, 2, 3, 1]),
              n("MatMul", ["q", "kt"], ["scores"]),
              n("Add", ["scores", "mask"], ["masked"]),
              n("Softmax", ["masked"], ["probs"], axis=-1),
              n("MatMul", ["probs", "q"], ["context"]),
              n("Transpose", ["context"], ["merged_heads"], perm=[0, 2, 1, 3])]
    mb = _dim("x", 0, "mb", nodes)
    ms = _dim("x", 1, "ms", nodes)
    nodes += [n("Concat", [mb, ms, "sixteen"], ["merge_shape"], axis=0),
              n("Reshape", ["merged_heads", "merge_shape"], ["y"], name="merge")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", 16]),
              helper.make_tensor_value_info("mask", TensorProto.FLOAT, ["mb", 1, 1, "ms"])]
    if split_from == "y_other":
        inputs.append(helper.make_tensor_value_info("y_other", TensorProto.FLOAT,
                                                    [*other_dims, 16]))
    for i, node in enumerate(nodes):  # named, so cleanup's only change is the targets
        node.name = node.name or f"{node.op_type}_{i}"
    graph = helper.make_graph(nodes, "attention", inputs,
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT,
                                                             ["batch", "seq", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return Model(model)


def feeds(batch: int, seq: int, other: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(batch * 10 + seq)
    result = {"x": rng.standard_normal((batch, seq, 16)).astype(np.float32),
              "mask": rng.standard_normal((batch, 1, 1, seq)).astype(np.float32)}
    if other:
        result["y_other"] = result["x"].copy()
    return result


def outputs(model: Model, feed: dict[str, np.ndarray]) -> np.ndarray:
    return runtime.session(model, optimize=False).run(None, feed)[0]


def test_both_targets_become_constant_and_the_outputs_stay():
    model = attention()
    assert static_targets(model.proto) == {"heads": [0, 0, -1, 8], "y": [0, 0, 16]}
    result, record = cleanup.PASS.run(model, cleanup.Config(), Context())
    assert record.modified and sorted(record.touched) == ["merge", "split"]
    assert not SHAPE_OPS & {node.op_type for node in result.graph.node}
    for batch, seq in ((1, 3), (2, 5), (3, 1)):
        feed = feeds(batch, seq)
        np.testing.assert_array_equal(outputs(result, feed), outputs(model, feed))
    again, second = cleanup.PASS.run(result, cleanup.Config(), Context())
    assert not second.modified and again is result


def test_the_merge_target_needs_the_broadcast_join(monkeypatch):
    # The mask's dims have names of their own ("mb", "ms"): the scores + mask broadcast joins
    # them with the activations', which is what proves the merge Reshape's dims.
    plan = cleanup.PASS.plan(attention(), cleanup.Config(), Context())
    rows = {row.node: row.action for row in plan.rows}
    assert rows == {"heads": "constant Reshape target", "y": "constant Reshape target"}
    monkeypatch.setattr(reshapes._Symbols, "_join", lambda self, dims: None)
    assert static_targets(attention().proto) == {"heads": [0, 0, -1, 8]}


@pytest.mark.parametrize("model", [
    attention(split_from="y_other"),        # dims read from an unrelated input
    attention(split_index=(1, 0)),           # dim 1 at position 0
    attention(allowzero=1),                  # 0 would mean a zero-sized dim
], ids=["other-input", "swapped", "allowzero"])
def test_targets_that_are_not_the_inputs_dims_stay(model):
    assert "heads" not in static_targets(model.proto)


def test_off_and_in_the_pipeline_only_last():
    model = attention()
    result, _ = cleanup.PASS.run(model, cleanup.Config(static_reshapes=False), Context())
    assert SHAPE_OPS <= {node.op_type for node in result.graph.node}
    steps = with_cleanup(parse_recipe("quantize:int8-dynamic"))
    assert [s.config.static_reshapes for s in steps if s.name == "cleanup"] == [False, True]
