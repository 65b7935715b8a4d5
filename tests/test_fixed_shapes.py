"""compress --shape: dynamic input dims fixed in the result, the .ort file of ort-mobile built from
the fixed model, every user mistake one line and exit 2 with nothing written."""

from __future__ import annotations

import json

import builders
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import api, fixed_shapes, runtime, targets
from onnxcomp.cli import main
from onnxcomp.errors import UserError
from onnxcomp.model import Model


def _dynamic_conv() -> Model:
    """x[n, 3, h, w] -> Conv 3x3 -> Relu -> GlobalAveragePool -> y[n, 4, 1, 1]."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalAveragePool", ["r"], ["y"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, "h", "w"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4, 1, 1])], [w])
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


def _dims(value: onnx.ValueInfoProto) -> list:
    return [d.dim_value if d.HasField("dim_value") else d.dim_param
            for d in value.type.tensor_type.shape.dim]


def test_fixed_inputs_and_inferred_outputs_compute_the_same():
    model = _dynamic_conv()
    fixed, notes = fixed_shapes.fix(model, {"x": [1, 3, 32, 48]})
    assert _dims(fixed.graph.input[0]) == [1, 3, 32, 48]
    assert _dims(fixed.graph.output[0]) == [1, 4, 1, 1]
    assert _dims(model.graph.input[0]) == ["n", 3, "h", "w"]  # the input model is untouched
    assert notes == ["input x fixed to shape [1, 3, 32, 48]"]
    x = np.random.default_rng(1).standard_normal((1, 3, 32, 48)).astype(np.float32)
    want = runtime.session(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(runtime.session(fixed).run(None, {"x": x})[0], want, rtol=1e-6)


@pytest.mark.parametrize("shapes, words", [
    ({"nope": [1, 3, 8, 8]}, r"not an input of the model \(inputs: x\)"),
    ({"x": [1, 3, 8]}, "Rank mismatch"),
    ({"x": [1, 5, 8, 8]}, "replace existing fixed size of 3"),
    ({"x": [0, 3, 8, 8]}, "at least 1"),
])
def test_bad_shapes_are_user_errors(shapes, words):
    with pytest.raises(UserError, match=words):
        fixed_shapes.fix(_dynamic_conv(), shapes)


def test_compress_fixes_shapes_after_validating_on_the_datas_own(tmp_path):
    result = api.compress(_dynamic_conv(), recipe="quantize:int8", calib="random:4",
                          show_progress=False, shapes={"x": [1, 3, 16, 16]})
    assert _dims(result.model.graph.input[0]) == [1, 3, 16, 16]
    assert result.report.models["candidate"]["input_shapes"] == {"x": [1, 3, 16, 16]}
    assert any("fixed to shape" in note for note in result.report.notes)
    assert result.report.fidelity["outputs"]["y"]["cosine_mean"] > 0.99


def test_cli_shape_with_ort_mobile_writes_a_static_ort_file(tmp_path, capsys):
    import onnxruntime as ort

    path, out = tmp_path / "m.onnx", tmp_path / "small.onnx"
    _dynamic_conv().save(path)
    rc = main(["--quiet", "compress", str(path), "-o", str(out), "--target", "ort-mobile",
               "--calib", "random:4", "--shape", "x=1,3,24,24", "--json"])
    assert rc == 0, capsys.readouterr().err
    report = json.loads(capsys.readouterr().out)
    assert report["models"]["candidate"]["input_shapes"] == {"x": [1, 3, 24, 24]}
    assert _dims(onnx.load(out).graph.input[0]) == [1, 3, 24, 24]
    ort_path, _ = targets.ort_paths(out)
    shape = ort.InferenceSession(str(ort_path), providers=["CPUExecutionProvider"]
                                 ).get_inputs()[0].shape
    assert shape == [1, 3, 24, 24]


@pytest.mark.parametrize("value, words", [
    ("x=1,3,a,8", "bad --shape"),
    ("y=1,4,1,1", "not an input"),
    ("x=1,3,8", "Rank mismatch"),
])
def test_cli_bad_shape_is_one_line_exit_2_nothing_written(tmp_path, capsys, value, words):
    path, out = tmp_path / "m.onnx", tmp_path / "o.onnx"
    _dynamic_conv().save(path)
    rc = main(["--quiet", "compress", str(path), "-o", str(out), "--calib", "random:4",
               "--shape", value])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and words in err[0], err
    assert not out.exists()


def test_a_static_model_keeps_its_shapes():
    model = builders.conv_net()
    fixed, _ = fixed_shapes.fix(model, {"x": [1, 3, 16, 16]})
    assert fixed.proto.graph.input[0] == model.proto.graph.input[0]


def test_a_bad_shape_is_refused_before_any_work(monkeypatch):
    from onnxcomp import pipeline

    def no_work(*args, **kwargs):
        raise AssertionError("the pipeline ran before the --shape check")

    monkeypatch.setattr(pipeline.Pipeline, "run", no_work)
    with pytest.raises(UserError, match="not an input"):
        api.compress(_dynamic_conv(), recipe="quantize:int8", calib="random:4",
                     show_progress=False, shapes={"nope": [1, 3, 8, 8]})
