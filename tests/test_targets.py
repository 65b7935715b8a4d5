"""Deployment targets: each target's placement rules on tiny graphs, the CPU default unchanged,
refusals as one line (exit 2), the user's --set over the target's defaults, structural checks."""

from __future__ import annotations

import builders
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import api, targets
from onnxcomp.cli import main
from onnxcomp.errors import UserError
from onnxcomp.model import Model
from onnxcomp.passes.quantize import constants as quantize_constants
from onnxcomp.recipe import apply_overrides, parse_recipe


def _compress(model, target=None, overrides=None, recipe="quantize:int8"):
    return api.compress(model, recipe=recipe, calib="random:4", validate=False,
                        show_progress=False, target=target, overrides=overrides)


def _ops(model: Model) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in model.proto.graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_every_target_is_consistent_data():
    assert set(targets.TARGETS) == {"ort-cpu", "openvino", "tensorrt", "qnn", "ort-mobile"}
    assert targets.get(None).name == targets.DEFAULT == "ort-cpu"
    assert targets.TARGETS["ort-cpu"].overrides == ()  # today's defaults, exactly
    for target in targets.TARGETS.values():
        assert target.runtime in ("onnxruntime", "openvino")
        assert target.modes and target.rules
        for mode, why in target.refused:
            assert mode not in target.modes and why
        # Each target's overrides are valid quantize options for each mode it supports.
        for mode in target.modes:
            implied = targets.quantize_overrides(target, None, [mode])
            steps = apply_overrides(parse_recipe(f"quantize:{mode}"), implied)
            assert steps[0].config.mode == mode
        assert targets.describe(target)[0].startswith(target.name)


def test_ort_cpu_is_todays_default_byte_for_byte():
    model = builders.conv_net()
    default = _compress(model).model
    explicit = _compress(model, target="ort-cpu").model
    assert default.proto.SerializeToString() == explicit.proto.SerializeToString()


def _conv_output_pairs(model: Model) -> int:
    """QuantizeLinear nodes reading a Conv's output."""
    graph = model.proto.graph
    convs = {o for n in graph.node if n.op_type == "Conv" for o in n.output}
    return sum(1 for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in convs)


def test_openvino_places_no_output_qdq_for_its_own_sake():
    model = builders.conv_hardswish_net()
    cpu = _compress(model, target="ort-cpu")
    ov = _compress(model, target="openvino")
    # ort-cpu quantizes the Conv output before its activation (QLinearConv's output); openvino
    # does not (its CPU plugin executes such a pair as Convert + Eltwise).
    assert _conv_output_pairs(cpu.model) == 1
    assert _conv_output_pairs(ov.model) == 0
    plan = api.dry_run(model, "quantize:int8", "random:4", target="openvino")[0]
    assert not any("output QDQ" in row.action for row in plan.rows)
    assert ov.report.environment["target"] == "openvino"
    # On a conv net's feature maps (the residual Add, the Concat) both targets place QDQ.
    net = builders.conv_net()
    for target in ("ort-cpu", "openvino"):
        rows = api.dry_run(net, "quantize:int8", "random:4", target=target)[0].rows
        assert sum("activation inputs" in row.action for row in rows) == 2


def _upsampler(opset: int = 13) -> Model:
    """Conv -> HardSwish written out (x * Clip(x + 3, 0, 6) / 6) -> ConvTranspose: the
    PP-OCRv4 det pattern the openvino target's int8 placement is about."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.standard_normal((8, 4, 2, 2)).astype(np.float32), "wt"),
             numpy_helper.from_array(np.float32(3), "three"),
             numpy_helper.from_array(np.float32(0), "zero"),
             numpy_helper.from_array(np.float32(6), "six")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["c", "three"], ["a"], name="add"),
             helper.make_node("Clip", ["a", "zero", "six"], ["k"], name="clip"),
             helper.make_node("Mul", ["c", "k"], ["m"], name="mul"),
             helper.make_node("Div", ["m", "six"], ["h"], name="div"),
             helper.make_node("ConvTranspose", ["h", "wt"], ["y"], name="up", strides=[2, 2])]
    graph = helper.make_graph(nodes, "up", [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [1, 3, 8, 8])], [helper.make_tensor_value_info(
            "y", TensorProto.FLOAT, [1, 4, 16, 16])], inits)
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def test_openvino_quantizes_conv_transpose_and_writes_hardswish_at_opset_14():
    model = _upsampler()
    ov = _compress(model, target="openvino")
    ops = _ops(ov.model)
    assert ov.model.opset() == 14 and ops.get("HardSwish") == 1 and "HardSigmoid" not in ops
    (up,) = [n for n in ov.model.proto.graph.node if n.op_type == "ConvTranspose"]
    producers = {o: n for n in ov.model.proto.graph.node for o in n.output}
    assert [producers[name].op_type for name in up.input[:2]] == ["DequantizeLinear"] * 2
    weight_dq = producers[up.input[1]]
    assert helper.get_attribute_value(weight_dq.attribute[0]) == 1  # output channels: axis 1
    assert ops["QuantizeLinear"] == 2  # the two inputs, no output QDQ
    # ort-cpu leaves ConvTranspose float; it raises the opset to 14 for the HardSwish too.
    cpu = _compress(model)
    cpu_nodes = cpu.model.proto.graph.node
    cpu_producers = {o: n for n in cpu_nodes for o in n.output}
    (cpu_up,) = [n for n in cpu_nodes if n.op_type == "ConvTranspose"]
    assert cpu_up.input[1] not in cpu_producers and cpu.model.opset() == 14
    # int8-dynamic and int4 do not take the int8 placement (no ConvInteger for Conv there).
    dynamic = _compress(model, target="openvino", recipe="quantize:int8-dynamic").model
    assert "ConvInteger" not in _ops(dynamic)


def test_the_users_set_wins_over_the_target():
    model = builders.conv_net()
    cpu = _compress(model).model
    back = _compress(model, target="openvino", overrides=[
        "quantize.output_qdq=conv", "quantize.op_types=Conv,MatMul,Gemm",
        "quantize.min_opset=none", "quantize.bias_correction=none",
        "quantize.smoothquant_alpha=none", "quantize.conv_adds=true",
        "quantize.signed_feature_maps=false", "quantize.u8s8_overflow=auto"]).model
    assert cpu.proto.SerializeToString() == back.proto.SerializeToString()


def test_a_toml_recipes_target_key_is_the_flag_and_the_flag_wins(tmp_path, capsys):
    model = builders.conv_net()
    recipe = tmp_path / "ov.toml"
    recipe.write_text('target = "openvino"\n[[pass]]\nname = "quantize"\nmode = "int8"\n')
    by_key = _compress(model, recipe=recipe)
    assert by_key.report.environment["target"] == "openvino"
    by_flag = _compress(model, target="openvino")
    assert by_key.model.proto.SerializeToString() == by_flag.model.proto.SerializeToString()
    flag_wins = _compress(model, recipe=recipe, target="ort-cpu").model
    assert flag_wins.proto.SerializeToString() == _compress(model).model.proto.SerializeToString()
    plan = api.dry_run(model, recipe, "random:4")[0]
    assert not any("output QDQ" in row.action for row in plan.rows)
    path = tmp_path / "m.onnx"
    model.save(path)
    recipe.write_text('target = "npu"\n[[pass]]\nname = "quantize"\n')
    rc = main(["--quiet", "compress", str(path), "-o", str(tmp_path / "o.onnx"),
               "--calib", "random:4", "--recipe", str(recipe)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "unknown target 'npu'" in err[0], err


def test_a_recipe_without_quantize_takes_any_target():
    steps = api.target_steps("cleanup", None, targets.get("tensorrt"))
    assert [s.name for s in steps] == ["cleanup"]


@pytest.mark.parametrize("target, mode, words", [
    ("tensorrt", "int8-dynamic", "no dynamic"),
    ("qnn", "int8-dynamic", "static quantization"),
    ("qnn", "int4", "LPBQ"),
])
def test_a_mode_the_target_does_not_support_is_refused(target, mode, words):
    with pytest.raises(UserError, match=words):
        api.target_steps(f"quantize:{mode}", None, targets.get(target))


def test_cli_refusals_are_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    builders.mlp().save(path)
    for flags, words in ((["--target", "nope"], "unknown target 'nope'"),
                         (["--target", "tensorrt", "--recipe", "quantize:int8-dynamic"],
                          "does not support quantize mode 'int8-dynamic'"),
                         (["--target", "qnn", "--recipe", "quantize:int4"], "int4")):
        rc = main(["--quiet", "compress", str(path), "-o", str(tmp_path / "o.onnx"),
                   "--calib", "random:4", *flags])
        err = capsys.readouterr().err.strip().splitlines()
        assert rc == 2 and len(err) == 1 and words in err[0], (flags, err)
    assert not (tmp_path / "o.onnx").exists()


def test_tensorrt_int4_is_blockwise_dequantize_linear():
    result = _compress(builders.mlp(), target="tensorrt", recipe="quantize:int4")
    ops = _ops(result.model)
    assert "MatMulNBits" not in ops and ops.get("DequantizeLinear", 0) >= 1
    assert result.model.opset() >= 21
    assert any("checked structurally" in note for note in result.report.notes)
    assert not any("symmetric int8 activations" in note for note in result.report.notes)


def _activation_zero_points(model: Model) -> list[np.ndarray]:
    inits = {t.name: numpy_helper.to_array(t) for t in model.proto.graph.initializer}
    return [inits[n.input[2]] for n in model.proto.graph.node
            if n.op_type == "QuantizeLinear" and n.input[0] not in inits]


def test_tensorrt_int8_is_symmetric_int8_activations_with_residual_adds_quantized():
    import onnxruntime as ort

    model = builders.conv_net()
    result = _compress(model, target="tensorrt")
    zero_points = _activation_zero_points(result.model)
    assert zero_points and all(z.dtype == np.int8 and z.shape == () and z == 0
                               for z in zero_points)
    graph = result.model.proto.graph
    producers = {o: n for n in graph.node for o in n.output}
    residual = next(n for n in graph.node if n.op_type == "Add")
    assert all(producers[i].op_type == "DequantizeLinear" for i in residual.input)
    # Weights stay int8 per channel (no uint8 u8s8 remedy), biases float, no contrib ops.
    inits = {t.name: t for t in graph.initializer}
    weights = [inits[n.input[0]] for n in graph.node
               if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert weights and all(w.data_type == TensorProto.INT8 for w in weights)
    assert all(n.domain in ("", "ai.onnx") for n in graph.node)
    assert targets.placement_findings(result.model.proto, "tensorrt") == []
    assert any("structurally" in note for note in result.report.notes)
    pass_notes = "\n".join(n for r in result.report.passes for n in r.notes)
    assert "activation QDQ pairs in symmetric int8" in pass_notes
    # The same Q/DQ math in ONNX Runtime stays close to float.
    x = np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    want = ort.InferenceSession(model.proto.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = ort.InferenceSession(result.model.proto.SerializeToString(), options,
                               providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    cosine = float(np.dot(want.ravel(), got.ravel())
                   / np.linalg.norm(want) / np.linalg.norm(got))
    assert cosine > 0.99, cosine


def test_qnn_quantizes_outputs_activation_matmuls_and_constants():
    model = builders.attention_block()
    result = _compress(model, target="qnn")
    plan = api.dry_run(model, "quantize:int8", "random:4", target="qnn")[0]
    actions = [row.action for row in plan.rows if row.action != "skip"]
    assert any("activation x activation" in a for a in actions)
    notes = "\n".join(result.report.notes)
    # Rank-2 int8 weights run as QNN FullyConnected (per channel): no finding; the constants
    # the quantized ops read are behind DequantizeLinear too, and the output is a DQ's.
    assert "int8 weights" not in notes and "float constant" not in notes
    assert "graph output" not in notes and "not implemented: not measured" in notes
    graph = result.model.proto.graph
    producers = {o: n for n in graph.node for o in n.output}
    assert all(producers[o.name].op_type == "DequantizeLinear" for o in graph.output)
    assert quantize_constants.float_data_inputs(graph) == []
    pass_notes = "\n".join(n for record in result.report.passes for n in record.notes)
    assert "constant_inputs:" in pass_notes


def _residual_qdq(zero: int, dtype=TensorProto.UINT8) -> onnx.ModelProto:
    """x -> Q -> DQ -> Conv -> Add(x) -> y: a residual Add with one quantized input."""
    w = numpy_helper.from_array(np.ones((3, 3, 1, 1), np.float32), "w")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = helper.make_tensor("z", dtype, [], [zero])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
             helper.make_node("Conv", ["dq", "w"], ["c"]),
             helper.make_node("Add", ["c", "x"], ["y"]),
             helper.make_node("Erf", ["y"], ["out"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 3, 4, 4])],
        [w, scale, zp])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_tensorrt_rules_found_structurally():
    findings = targets.placement_findings(_residual_qdq(128), targets.get("tensorrt"))
    text = "\n".join(findings)
    assert "uint8" in text and "non-zero zero points" in text and "residual Add" in text
    clean = targets.placement_findings(_residual_qdq(0, TensorProto.INT8), "tensorrt")
    assert not any("zero points" in f or "of type" in f for f in clean)


def test_qnn_rules_found_structurally():
    findings = "\n".join(targets.placement_findings(_residual_qdq(128), "qnn"))
    assert "Erf x1" in findings  # not in the QNN EP's supported list
    assert "dynamic dimensions" in findings
    assert "Add x1" in findings  # reads float activations: outside HTP's quantized graph


def test_ort_mobile_writes_an_ort_file_that_loads_and_matches(tmp_path, capsys):
    from onnxcomp.errors import InvalidOutput
    from onnxcomp.measure.bench import bench

    path, out = tmp_path / "m.onnx", tmp_path / "small.onnx"
    builders.conv_net().save(path)
    rc = main(["--quiet", "compress", str(path), "-o", str(out), "--target", "ort-mobile",
               "--calib", "random:4", "--json"])
    assert rc == 0, capsys.readouterr().err
    report = __import__("json").loads(capsys.readouterr().out)
    ort_path, config = targets.ort_paths(out)
    assert report["models"]["candidate"]["ort_path"] == str(ort_path)
    assert ort_path.is_file() and config.is_file()
    assert "QuantizeLinear" in config.read_text() or "Conv" in config.read_text()
    assert targets.check_ort(out, ort_path) < 1e-3
    timed = bench([out, ort_path], runs=2, warmup=0, memory=False, min_seconds=0,
                  progress=None)
    assert [r["model"] for r in timed.bench["results"]] == ["small", "small#2"]
    assert timed.bench["models"][1]["bytes"] == ort_path.stat().st_size
    # An .ort file that does not match the ONNX model beside it is refused.
    other = tmp_path / "other.onnx"
    builders.conv_net(seed=1).save(other)
    with pytest.raises(InvalidOutput, match="differ"):
        targets.check_ort(other, ort_path)
    # Without the ONNX model beside it, bench says what it needs.
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "small.ort").write_bytes(ort_path.read_bytes())
    with pytest.raises(UserError, match="small.onnx is missing"):
        bench([alone / "small.ort"], runs=1, memory=False, progress=None)
