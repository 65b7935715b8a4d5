"""OpenVINO behind onnxcomp.runtime_openvino: outputs against ONNX Runtime, the runtime
precisions that justify the openvino target, and one clear line when OpenVINO is missing."""

from __future__ import annotations

import sys

import builders
import numpy as np
import pytest

from onnxcomp import api, runtime, runtime_openvino
from onnxcomp.cli import main
from onnxcomp.errors import UserError

needs_openvino = pytest.mark.skipif(not runtime_openvino.available(),
                                    reason="openvino is not installed (pip install "
                                           "'onnxcomp[openvino]')")


@needs_openvino
def test_outputs_match_onnx_runtime_in_f32():
    model = builders.conv_net()
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    ours = runtime_openvino.run(model, feeds, threads=1, precision="f32")
    ort = runtime.run_model(model, feeds)
    assert set(ours) == set(ort)
    np.testing.assert_allclose(ours["y"], ort["y"], rtol=1e-4, atol=1e-4)


@needs_openvino
def test_the_openvino_layout_runs_in_int8_without_glue():
    """What the openvino target rests on, on a tiny graph: with QDQ on Conv inputs only every
    Convolution runs in u8 and no Convert is executed; ort-cpu's extra output QDQ costs extra
    executed ops (here Reorders and quantize subgraphs; on PP-OCRv4 rec, Converts and
    Eltwise ops: docs/targets.md)."""
    model = builders.conv_net()
    layouts = {}
    for target in ("ort-cpu", "openvino"):
        result = api.compress(model, recipe="quantize:int8", calib="random:4", validate=False,
                              show_progress=False, target=target)
        compiled = runtime_openvino.compile_model(result.model, threads=1, precision="f32")
        layouts[target] = runtime_openvino.precision_summary(compiled)
    convs = sum(1 for n in model.proto.graph.node if n.op_type == "Conv")
    ov, cpu = layouts["openvino"], layouts["ort-cpu"]
    assert ov["compute"] == {"Convolution int8": convs}
    assert not any(kind.startswith("Convert") for kind in ov["glue"])
    assert cpu["compute"] == {"Convolution int8": convs}
    assert ov["executed"] < cpu["executed"]
    assert sum(ov["glue"].values()) < sum(cpu["glue"].values())


@needs_openvino
def test_the_openvino_target_is_compiled_by_openvino():
    result = api.compress(builders.mlp(), recipe="quantize:int8", calib="random:4",
                          validate=False, show_progress=False, target="openvino")
    assert any("compiled by OpenVINO" in note for note in result.report.notes)


def test_missing_openvino_is_one_clear_line(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino raises ImportError
    assert not runtime_openvino.available()
    with pytest.raises(UserError, match="OpenVINO is not installed"):
        runtime_openvino.compile_model(builders.mlp())
    path = tmp_path / "m.onnx"
    builders.mlp().save(path)
    rc = main(["--quiet", "bench", str(path), "--runtime", "openvino", "--runs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "pip install 'onnxcomp[openvino]'" in err[0]
    # compress --target openvino still works, and says it was not compiled by OpenVINO.
    result = api.compress(builders.mlp(), recipe="quantize:int8", calib="random:4",
                          validate=False, show_progress=False, target="openvino")
    assert any("not installed" in note for note in result.report.notes)
