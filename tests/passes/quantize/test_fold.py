"""BatchNormalization folded into the Conv before it, ahead of static int8 (fold.py)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import runtime
from onnxcomp.graph import export_model, import_graph
from onnxcomp.model import Model
from onnxcomp.passes.quantize import Config
from onnxcomp.passes.quantize import plan as quantize_plan
from onnxcomp.passes.quantize.fold import fold_batchnorms
from onnxcomp.pipeline import Context


def _bn_net(shared_weight: bool = False, training: bool = False, conv_bias: bool = True,
            seed: int = 0) -> Model:
    """x -> Conv(W[, b]) -> BN -> Relu -> Conv(W2) -> BN2 -> y; optionally W also read by a
    third Conv (a shared weight), or BN2 in training form."""
    rng = np.random.default_rng(seed)
    c = 6
    arrays = {
        "W": rng.standard_normal((c, 3, 3, 3)).astype(np.float32),
        "b": rng.standard_normal(c).astype(np.float32),
        "W2": rng.standard_normal((c, c, 1, 1)).astype(np.float32),
    }
    for tag in ("1", "2"):
        arrays[f"s{tag}"] = rng.uniform(0.5, 2, c).astype(np.float32)
        arrays[f"B{tag}"] = rng.standard_normal(c).astype(np.float32)
        arrays[f"m{tag}"] = rng.standard_normal(c).astype(np.float32)
        arrays[f"v{tag}"] = rng.uniform(0.1, 3, c).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"] if conv_bias else ["x", "W"], ["c1"],
                         pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("BatchNormalization", ["c1", "s1", "B1", "m1", "v1"], ["n1"],
                         epsilon=1e-3, name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], name="conv2"),
        helper.make_node("BatchNormalization", ["c2", "s2", "B2", "m2", "v2"], ["y"],
                         name="bn2", **({"training_mode": 1} if training else {})),
    ]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, 8, 8])]
    if shared_weight:
        nodes.append(helper.make_node("Conv", ["x", "W"], ["z"], pads=[1, 1, 1, 1],
                                      name="conv_shared"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 6, 8, 8]))
    graph = helper.make_graph(
        nodes, "bn_net", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 8])],
        outputs, [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    opset = 15 if training else 13
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _run(model: Model, x: np.ndarray) -> list[np.ndarray]:
    return list(runtime.run_model(model, {"x": x}).values())


def _folded(model: Model) -> tuple[Model, list[str]]:
    graph = import_graph(model)
    names = fold_batchnorms(graph)
    return export_model(graph, like=model), names


def test_folding_is_exact_in_onnx_runtime_and_removes_the_batchnorms():
    model = _bn_net()
    folded, names = _folded(model)
    assert names == ["bn1", "bn2"]
    assert [n.op_type for n in folded.proto.graph.node] == ["Conv", "Relu", "Conv"]
    onnx.checker.check_model(folded.proto, full_check=True)
    x = np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)
    (expected,), (actual,) = _run(model, x), _run(folded, x)
    # float32 rounding of W*k and of the bias: a few ulps of values of order 10
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-4)
    assert [o.name for o in folded.proto.graph.output] == ["y"]


def test_a_conv_without_bias_gets_one():
    model = _bn_net(conv_bias=False)
    folded, names = _folded(model)
    assert "bn1" in names
    conv = folded.proto.graph.node[0]
    assert len(conv.input) == 3
    x = np.random.default_rng(2).standard_normal((2, 3, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(_run(folded, x)[0], _run(model, x)[0], rtol=1e-5, atol=1e-4)


def test_a_shared_weight_keeps_its_other_reader_exact():
    model = _bn_net(shared_weight=True)
    folded, names = _folded(model)
    assert "bn1" in names
    inits = {t.name: numpy_helper.to_array(t) for t in folded.proto.graph.initializer}
    shared = next(n for n in folded.proto.graph.node if n.name == "conv_shared")
    np.testing.assert_array_equal(inits[shared.input[1]],
                                  numpy_helper.to_array(model.proto.graph.initializer[0]))
    x = np.random.default_rng(3).standard_normal((2, 3, 8, 8)).astype(np.float32)
    for a, b in zip(_run(folded, x), _run(model, x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)


def test_nothing_to_fold_changes_nothing():
    model = _bn_net(training=True)  # bn2 in training form; bn1 still folds
    _, names = _folded(model)
    assert names == ["bn1"]
    _, again = _folded(_folded(_bn_net())[0])  # idempotent: nothing left the second time
    assert again == []


def test_static_int8_folds_first_and_other_modes_do_not():
    model = _bn_net()
    planned = quantize_plan(model, Config(mode="int8"), Context())
    assert any(note.startswith("folded 2 BatchNormalization") for note in planned.notes)
    prepared = planned.payload.prepared
    assert "BatchNormalization" not in {n.op_type for n in prepared.proto.graph.node}
    dynamic = quantize_plan(model, Config(mode="int8-dynamic"), Context())
    assert not any("BatchNormalization" in note for note in dynamic.notes)
    kept = quantize_plan(model, Config(mode="int8", fold=False), Context())  # the ablation's off
    assert "BatchNormalization" in {n.op_type for n in kept.payload.prepared.proto.graph.node}


def _affine_hardswish_net(opset: int, divide: bool = True, extra_reader: bool = False) -> Model:
    """x -> Conv -> Mul(scalar s) -> Add(per-channel a) -> x * Clip(x + 3, 0, 6) / 6 -> y
    (paddle2onnx's learnable affine step and HardSwish); ``divide`` False writes ``* (1/6)``;
    ``extra_reader`` makes the Clip output a graph output too (the pattern must then stay)."""
    rng = np.random.default_rng(4)
    c = 5
    arrays = {"W": rng.standard_normal((c, 3, 3, 3)).astype(np.float32),
              "b": rng.standard_normal(c).astype(np.float32),
              "s": np.array([1.7], np.float32),
              "a": rng.standard_normal((1, c, 1, 1)).astype(np.float32),
              "three": np.array([3.0], np.float32), "zero": np.array(0.0, np.float32),
              "six": np.array(6.0, np.float32),
              "last": np.array([6.0] if divide else [1 / 6], np.float32)}
    nodes = [
        helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
        helper.make_node("Mul", ["s", "c"], ["m"], name="affine_mul"),
        helper.make_node("Add", ["m", "a"], ["h"], name="affine_add"),
        helper.make_node("Add", ["h", "three"], ["t"], name="hs_add"),
        helper.make_node("Clip", ["t", "zero", "six"], ["k"], name="hs_clip"),
        helper.make_node("Mul", ["h", "k"], ["p"], name="hs_mul"),
        helper.make_node("Div" if divide else "Mul", ["p", "last"], ["y"], name="hs_last"),
    ]
    shape = [2, c, 6, 6]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("k", TensorProto.FLOAT, shape))
    graph = helper.make_graph(
        nodes, "affine_hs", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 6])],
        outputs, [numpy_helper.from_array(v, k) for k, v in arrays.items()])
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def _rewritten(model: Model) -> tuple[Model, list[str], int]:
    from onnxcomp.passes.quantize.fold import fold_affine, fuse_hardswish

    graph = import_graph(model)
    affine = fold_affine(graph)
    count = fuse_hardswish(graph, model.opset())
    return export_model(graph, like=model), affine, count


def test_affine_steps_fold_and_hardswish_becomes_one_or_two_ops_exactly():
    x = np.random.default_rng(5).uniform(-4, 4, (2, 3, 6, 6)).astype(np.float32)
    for opset, divide, ops in [(13, True, ["Conv", "HardSigmoid", "Mul"]),
                               (13, False, ["Conv", "HardSigmoid", "Mul"]),
                               (14, True, ["Conv", "HardSwish"])]:
        model = _affine_hardswish_net(opset, divide)
        rewritten, affine, count = _rewritten(model)
        assert affine == ["affine_mul", "affine_add"] and count == 1
        assert sorted(n.op_type for n in rewritten.proto.graph.node) == sorted(ops)
        onnx.checker.check_model(rewritten.proto, full_check=True)
        np.testing.assert_allclose(_run(rewritten, x)[0], _run(model, x)[0],
                                   rtol=1e-5, atol=1e-5)
        assert _rewritten(rewritten)[1:] == ([], 0)  # idempotent


def test_a_hardswish_whose_inner_tensor_is_read_elsewhere_is_left_alone():
    model = _affine_hardswish_net(13, extra_reader=True)
    rewritten, affine, count = _rewritten(model)
    assert count == 0 and affine == ["affine_mul", "affine_add"]
    x = np.random.default_rng(6).uniform(-4, 4, (2, 3, 6, 6)).astype(np.float32)
    for a, b in zip(_run(rewritten, x), _run(model, x)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _forward_affine_net(kernel: int = 1, pads: int = 0, group: int = 1,
                        add_only: bool = False, extra_reader: bool = False) -> Model:
    """x -> Relu -> Mul(scalar s) -> Add(per-channel a) -> Conv(kernel, pads, group) -> y: the
    affine step after an activation, ahead of the next Conv (PP-LCNet's). ``add_only`` drops the
    Mul; ``extra_reader`` makes the Add output a graph output too."""
    rng = np.random.default_rng(7)
    c = 4
    arrays = {"W": rng.standard_normal((6, c // group, kernel, kernel)).astype(np.float32),
              "b": rng.standard_normal(6).astype(np.float32),
              "s": np.array([1.7], np.float32),
              "a": rng.standard_normal((1, c, 1, 1)).astype(np.float32)}
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu")]
    if add_only:
        nodes.append(helper.make_node("Add", ["a", "r"], ["h"], name="affine_add"))
    else:
        nodes += [helper.make_node("Mul", ["r", "s"], ["m"], name="affine_mul"),
                  helper.make_node("Add", ["m", "a"], ["h"], name="affine_add")]
    nodes.append(helper.make_node("Conv", ["h", "W", "b"], ["y"], pads=[pads] * 4, group=group,
                                  name="conv"))
    size = 6 + 2 * pads - kernel + 1
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 6, size, size])]
    if extra_reader:
        outputs.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [2, c, 6, 6]))
    graph = helper.make_graph(
        nodes, "forward", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, 6, 6])],
        outputs, [numpy_helper.from_array(v, k) for k, v in arrays.items()],
        # the per-channel shift folds only into a Conv whose input width is known
        value_info=[helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, c, 6, 6])])
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]))


def _forward(model: Model) -> tuple[Model, list[str]]:
    from onnxcomp.passes.quantize.fold import fold_affine_forward

    graph = import_graph(model)
    names = fold_affine_forward(graph)
    return export_model(graph, like=model), names


def test_an_affine_step_before_a_pointwise_conv_folds_into_it_exactly():
    x = np.random.default_rng(8).uniform(-3, 3, (2, 4, 6, 6)).astype(np.float32)
    for add_only, folded in [(False, ["affine_mul", "affine_add"]), (True, ["affine_add"])]:
        model = _forward_affine_net(add_only=add_only)
        rewritten, names = _forward(model)
        assert names == folded
        assert sorted(n.op_type for n in rewritten.proto.graph.node) == ["Conv", "Relu"]
        onnx.checker.check_model(rewritten.proto, full_check=True)
        np.testing.assert_allclose(_run(rewritten, x)[0], _run(model, x)[0],
                                   rtol=1e-5, atol=1e-5)
        assert _forward(rewritten)[1] == []  # idempotent


def test_a_padded_grouped_shared_or_widening_step_stays_before_its_conv():
    # A padded border would read the shift where the original read 0; a grouped Conv reads
    # each channel in its own group; a step read elsewhere must keep its value; a per-channel
    # constant on an input of unknown width might broadcast it wider than it is.
    unknown = _forward_affine_net()
    del unknown.proto.graph.value_info[:]
    for model in [_forward_affine_net(kernel=3, pads=1), _forward_affine_net(group=2),
                  _forward_affine_net(extra_reader=True), unknown]:
        rewritten, names = _forward(model)
        assert names == []
        assert rewritten.proto.graph.node[1].op_type == "Mul"


def test_static_int8_raises_the_opset_for_one_hardswish_op_and_folds_forwards():
    model = _affine_hardswish_net(13)
    planned = quantize_plan(model, Config(mode="int8"), Context())
    assert any("upgraded the opset from 13 to 14 (needed by HardSwish written as one op)" in n
               for n in planned.notes)
    ops = {n.op_type for n in planned.payload.prepared.proto.graph.node}
    assert "HardSwish" in ops and "HardSigmoid" not in ops
    unfolded = quantize_plan(model, Config(mode="int8", fold=False), Context())
    assert unfolded.payload.prepared.opset() == 13
    pointwise = quantize_plan(_forward_affine_net(), Config(mode="int8"), Context())
    assert any(n.startswith("folded 2 constant Mul/Add nodes before pointwise Convs")
               for n in pointwise.notes)


def test_a_fold_that_would_overflow_float32_is_not_done(recwarn):
    """A BatchNormalization scale of 1e38 over a variance near zero: W * k leaves float32's
    range. The graph computes it in steps (the same inf or not); the fold would store inf in
    the weights, so that BatchNormalization stays, quietly (no numpy warning)."""
    model = _bn_net()
    for tensor in model.proto.graph.initializer:
        if tensor.name in ("s1", "v1"):
            values = numpy_helper.to_array(tensor).copy()
            values[0] = 1e38 if tensor.name == "s1" else 0.0
            tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float32), tensor.name))
    folded, names = _folded(model)
    assert names == ["bn2"]
    assert "BatchNormalization" in [n.op_type for n in folded.proto.graph.node]
    weights = [numpy_helper.to_array(t) for t in folded.proto.graph.initializer]
    assert all(np.isfinite(w).all() for w in weights if w.dtype == np.float32)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]
