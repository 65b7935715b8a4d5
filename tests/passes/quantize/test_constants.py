"""What completes QNN's fully quantized graph: the constants quantized ops read
(``constant_inputs``), GELU as one Gelu (``fuse_gelu``), graph outputs written by a
DequantizeLinear, QNN's fixed 16-bit Sigmoid parameters; numerically close to float in ONNX
Runtime, and the structural check finds nothing left."""

from __future__ import annotations

import builders
import numpy as np
import onnx
import pytest
from builders import GraphBuilder, tensor
from onnx import TensorProto, numpy_helper

from onnxcomp import api, runtime, targets
from onnxcomp.model import Model
from onnxcomp.passes.quantize import constants, gelu
from onnxcomp.passes.quantize.config import Config


def _qnn(model, *overrides):
    return api.compress(model, recipe="quantize:int8", calib="random:8", validate=False,
                        show_progress=False, target="qnn", overrides=list(overrides)).model


def _gelu_net(seed: int = 0) -> Model:
    """x[1,4,16] -> MatMul -> GELU written with Erf -> MatMul -> y: what PyTorch exports."""
    b = GraphBuilder(seed)
    h = b.linear("x", 16, 32, "fc1")
    scaled = b.node("Div", [h, b.const("sqrt2", np.array(np.sqrt(2), np.float32))], "div")
    erf = b.node("Erf", [scaled], "erf")
    plus = b.node("Add", [erf, b.const("one", np.array(1, np.float32))], "plus_one")
    times = b.node("Mul", [h, plus], "times_x")
    g = b.node("Mul", [times, b.const("half", np.array(0.5, np.float32))], "half_of")
    b.node("MatMul", [g, b.weight("fc2.w", (32, 8), 0.2)], "fc2", outputs=["y"])
    return b.model([tensor("x", [1, 4, 16])], [tensor("y", [1, 4, 8])], 17, "gelu_net")


def _norm_net(seed: int = 0) -> Model:
    """x[1,6,16] -> Add(constant) -> LayerNormalization(scale, bias) -> Mul(constant) ->
    MatMul -> Sigmoid -> y: constants that are not Conv/MatMul weights, a Sigmoid output."""
    b = GraphBuilder(seed)
    shifted = b.node("Add", ["x", b.weight("shift", (16,), 0.5)], "shift_add")
    normed = b.layer_norm(shifted, 16, "ln")
    scaled = b.node("Mul", [normed, b.weight("gain", (16,), 1.0)], "gain_mul")
    b.node("Sigmoid", [b.linear(scaled, 16, 16, "fc")], "gate", outputs=["y"])
    return b.model([tensor("x", [1, 6, 16])], [tensor("y", [1, 6, 16])], 17, "norm_net")


def _cosine(reference: Model, candidate: Model, seed: int = 0) -> float:
    x = {i.name: np.random.default_rng(seed).standard_normal(
        [d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
        for i in reference.graph.input}
    want = runtime.session(reference, optimize=False).run(None, x)[0].ravel()
    got = runtime.session(candidate, optimize=False).run(None, x)[0].ravel()
    return float(want @ got / np.linalg.norm(want) / np.linalg.norm(got))


def _dequantizers(model: Model) -> dict[str, tuple[np.ndarray, float, np.ndarray]]:
    """DequantizeLinear of a stored constant, by its output: (values, scale, zero point)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    found = {}
    for node in model.graph.node:
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            found[node.output[0]] = (inits[node.input[0]], float(inits[node.input[1]].ravel()[0]),
                                     inits[node.input[2]])
    return found


@pytest.mark.parametrize("dtype", ["uint8", "uint16"])
def test_constants_are_quantized_by_their_role(dtype):
    model = _norm_net()
    result = _qnn(model, f"quantize.activation_dtype={dtype}")
    graph = result.proto.graph
    assert constants.float_data_inputs(graph) == []
    assert targets.placement_findings(result.proto, "qnn") == []
    nodes = {n.name: n for n in graph.node}
    dqs = _dequantizers(result)
    originals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    wide = np.uint16 if dtype == "uint16" else np.uint8
    # An Add / Mul operand: the activation type, the float value within half a step.
    for node, name in (("shift_add", "shift"), ("gain_mul", "gain")):
        q, scale, zero = dqs[nodes[node].input[1]]
        assert q.dtype == wide
        back = (q.astype(np.float64) - zero.astype(np.float64)) * scale
        assert np.max(np.abs(back - originals[name])) <= scale / 2 + 1e-7
    # The normalization's scale in 8 bits beside 16-bit activations; its bias int32 at
    # s_x * s_w, zero point 0.
    ln = nodes["ln"]
    q_w, s_w, _ = dqs[ln.input[1]]
    q_b, s_b, z_b = dqs[ln.input[2]]
    assert q_w.dtype == np.uint8 and q_b.dtype == np.int32 and int(z_b) == 0
    x_dq = next(n for n in graph.node if n.output[0] == ln.input[0])
    s_x = float(numpy_helper.to_array(next(t for t in graph.initializer
                                           if t.name == x_dq.input[1])))
    assert s_b == pytest.approx(s_x * s_w, rel=1e-6)
    assert np.max(np.abs(q_b * s_b - originals["ln.b"])) <= s_b / 2 + 1e-7
    assert _cosine(model, result) > (0.999 if dtype == "uint16" else 0.99)


def test_the_sigmoid_output_takes_qnn_fixed_16_bit_parameters_and_is_the_dq_output():
    result = _qnn(_norm_net(), "quantize.activation_dtype=uint16")
    graph = result.proto.graph
    producers = {o: n for n in graph.node for o in n.output}
    out = producers["y"]
    assert out.op_type == "DequantizeLinear"  # the output keeps its name, written by a DQ
    quantize = producers[out.input[0]]
    assert producers[quantize.input[0]].op_type == "Sigmoid"
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    assert float(inits[quantize.input[1]]) == pytest.approx(1 / 65536, rel=1e-7)
    assert int(inits[quantize.input[2]]) == 0 and inits[quantize.input[2]].dtype == np.uint16


def test_the_structural_check_names_what_is_left():
    plain = api.compress(_norm_net(), recipe="quantize:int8", calib="random:8", validate=False,
                         show_progress=False,
                         overrides=["quantize.every_op=true", "quantize.output_qdq=none"]).model
    findings = "\n".join(targets.placement_findings(plain.proto, "qnn"))
    assert "float constant(s) read as data" in findings and "shift_add <- shift" in findings
    assert "graph output(s) y" in findings
    assert "Erf (HTP has none)" in "\n".join(
        targets.placement_findings(_gelu_net().proto, "qnn"))
    # A 16-bit Sigmoid output at a calibrated scale, not QNN's 1/65536.
    scale = numpy_helper.from_array(np.array(1 / 65535, np.float32), "s")
    zero = numpy_helper.from_array(np.array(0, np.uint16), "z")
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Sigmoid", ["x"], ["g"], name="gate"),
         onnx.helper.make_node("QuantizeLinear", ["g", "s", "z"], ["q"], name="q"),
         onnx.helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"], name="dq")],
        "g", [tensor("x", [1, 4])], [tensor("y", [1, 4])], [scale, zero])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)])
    assert any("16-bit Sigmoid output(s) not at QNN's fixed scale" in f
               for f in targets.placement_findings(proto, "qnn"))


def test_constant_inputs_needs_every_op():
    with pytest.raises(ValueError, match="constant_inputs needs every_op"):
        Config(mode="int8", constant_inputs=True)
    assert Config(mode="int8", constant_inputs=True, every_op=True).constant_inputs


def test_gelu_fusion_is_exact_and_keeps_the_types_after_it():
    model = _gelu_net()
    fused, count = gelu.fuse(model)
    assert count == 1 and model.proto.graph.node  # the input is not changed
    assert sum(n.op_type == "Erf" for n in model.graph.node) == 1
    ops = [(n.domain, n.op_type) for n in fused.graph.node]
    assert ("com.microsoft", "Gelu") in ops and ("", "Erf") not in ops
    x = {"x": np.random.default_rng(1).standard_normal((1, 4, 16)).astype(np.float32)}
    want = runtime.session(model, optimize=False).run(None, x)[0]
    got = runtime.session(fused, optimize=False).run(None, x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    inferred = onnx.shape_inference.infer_shapes(fused.proto)
    typed = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    gelu_out = next(n.output[0] for n in fused.graph.node if n.op_type == "Gelu")
    assert typed[gelu_out] == TensorProto.FLOAT
    assert gelu.fuse(fused) == (fused, 0)  # nothing left to fuse: the same model back


def test_qnn_fuses_gelu_and_quantizes_around_it():
    model = _gelu_net()
    result = _qnn(model)
    assert not any(n.op_type == "Erf" for n in result.graph.node)
    producers = {o: n for n in result.graph.node for o in n.output}
    node = next(n for n in result.graph.node if n.op_type == "Gelu")
    assert producers[node.input[0]].op_type == "DequantizeLinear"
    # The MatMul after it reads a pair: its type survived the fusion.
    fc2 = next(n for n in result.graph.node if n.name == "fc2")
    assert producers[fc2.input[0]].op_type == "DequantizeLinear"
    assert targets.placement_findings(result.proto, "qnn") == []
    assert _cosine(model, result) > 0.99


def test_static_shapes_fold_shape_arithmetic_away_from_the_findings():
    """A Shape of a dynamic input is a CPU op for QNN; fixed, ONNX Runtime folds it at load."""
    b = GraphBuilder(0)
    shape = b.node("Shape", ["x"], "shape_of_x")
    flat = b.node("Reshape", [b.linear("x", 8, 8, "fc"), shape], "back")
    b.node("Relu", [flat], "act", outputs=["y"])
    model = b.model([tensor("x", ["n", 8])], [tensor("y", ["n", 8])], 17, "shape_net")
    dynamic = api.compress(model, recipe="quantize:int8", calib="random:4", validate=False,
                           show_progress=False, target="qnn")
    fixed = api.compress(model, recipe="quantize:int8", calib="random:4", validate=False,
                         show_progress=False, target="qnn", shapes={"x": [2, 8]})
    said = "\n".join(dynamic.report.notes)
    assert "Shape x1" in said and "dynamic dimensions" in said
    said = "\n".join(fixed.report.notes)
    assert "Shape" not in said and "dynamic dimensions" not in said
    assert "shape_of_x" in targets.folded_at_load(fixed.model.proto)


def test_fixed_shapes_replace_stale_symbolic_shapes_through_a_gelu():
    fused, _ = gelu.fuse(_gelu_net())
    proto = fused.proto
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "batch"
    for value in proto.graph.value_info:  # what an earlier inference left: a made-up name
        value.type.tensor_type.shape.dim[0].dim_param = "unk__0"
    from onnxcomp import fixed_shapes

    fixed, _ = fixed_shapes.fix(Model(proto), {"x": [3, 4, 16]})
    inferred = onnx.shape_inference.infer_shapes(fixed.proto)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in inferred.graph.value_info}
    gelu_out = next(n.output[0] for n in fixed.graph.node if n.op_type == "Gelu")
    assert shapes[gelu_out] == [3, 4, 32]
    assert [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim] == \
        [3, 4, 8]


def test_conv_nets_and_attention_have_nothing_left_for_qnn():
    for model in (builders.conv_net(), builders.attention_block()):
        result = _qnn(model)
        assert targets.placement_findings(result.proto, "qnn") == []
        assert constants.float_data_inputs(result.proto.graph) == []


def _lcnet_block(seed: int = 2) -> Model:
    """Conv -> HardSwish -> Mul(a) -> Add(b) -> depthwise Conv -> pointwise Conv: PP-LCNet's
    block, where depthwise equalization moves its factors into ``a`` and ``b``."""
    b = GraphBuilder(seed)
    h = b.node("HardSwish", [b.conv("x", 3, 8, 3, "c1")], "act")
    h = b.node("Mul", [h, b.const("a", np.array(1.1, np.float32))], "affine_mul")
    h = b.node("Add", [h, b.const("b", np.array(-0.2, np.float32))], "affine_add")
    h = b.conv(h, 8, 8, 3, "dw", group=8)
    b.node("Conv", [h, b.weight("pw.w", (4, 8, 1, 1), 0.3)], "pw", outputs=["y"])
    return b.model([tensor("x", [1, 3, 8, 8])], [tensor("y", [1, 4, 8, 8])], 14, "lcnet_block")


def test_qnn_leaves_depthwise_equalization_off_and_says_why():
    """Its per-channel factors would land in the affine constants, stored per tensor under
    constant_inputs (PP-OCRv4 det's spread 700x: map cosine .915 with it, .990 without)."""
    model = _lcnet_block()
    result = api.compress(model, recipe="quantize:int8", calib="random:8", validate=False,
                          show_progress=False, target="qnn")
    notes = "\n".join(n for record in result.report.passes for n in record.notes)
    assert "depthwise_equalize: not applied with constant_inputs" in notes
    names = {t.name for t in result.model.graph.initializer}
    assert not any("dw_equalized" in name for name in names)
    plain = api.compress(model, recipe="quantize:int8", calib="random:8", validate=False,
                         show_progress=False)
    assert any("dw_equalized" in t.name for t in plain.model.graph.initializer)
    assert constants.float_data_inputs(result.model.proto.graph) == []
    assert _cosine(model, result.model) > 0.99


def test_a_constant_with_inf_stays_float_and_is_listed():
    b = GraphBuilder(3)
    h = b.linear("x", 8, 8, "fc")
    mask = np.zeros((1, 8), np.float32)
    mask[0, 5:] = -np.inf
    b.node("Softmax", [b.node("Add", [h, b.const("mask", mask)], "masked")], "soft",
           outputs=["y"], axis=-1)
    model = b.model([tensor("x", [1, 8])], [tensor("y", [1, 8])], 17, "inf_mask")
    result = _qnn(model)
    assert ("masked", "mask") in constants.float_data_inputs(result.proto.graph)
    x = {"x": np.random.default_rng(0).standard_normal((1, 8)).astype(np.float32)}
    got = runtime.session(result, optimize=False).run(None, x)[0]
    assert np.all(got[0, 5:] == 0) and np.isfinite(got).all()
