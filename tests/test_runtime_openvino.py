"""OpenVINO behind onnxcomp.runtime_openvino: outputs against ONNX Runtime, the runtime
precisions that justify the openvino target, and one clear line when OpenVINO is missing."""

from __future__ import annotations

import sys

import builders
import numpy as np
import onnxruntime as ort_module
import pytest

from onnxcomp import api, runtime, runtime_openvino
from onnxcomp.cli import main
from onnxcomp.errors import UserError

# Every test here runs again in CI's second environment, .venv-ov (onnxruntime-openvino, whose
# onnxruntime module has the OpenVINO execution provider; .ci/run), selected by this mark.
pytestmark = pytest.mark.openvino

needs_openvino = pytest.mark.skipif(not runtime_openvino.available(),
                                    reason="openvino is not installed (pip install "
                                           "'onnxcomp[openvino]')")
needs_ep = pytest.mark.skipif(
    "OpenVINOExecutionProvider" not in ort_module.get_available_providers(),
    reason="the OpenVINO execution provider is not installed (onnxruntime-openvino replaces "
           "onnxruntime: its own venv, .venv-ov, built by .ci/run)")


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
    Convolution runs in u8 and no Convert is executed; ort-cpu's extra output QDQ (the Conv
    output before its HardSwish) costs an extra executed op (on PP-OCRv4 rec, Converts and
    Eltwise ops: docs/targets.md)."""
    model = builders.conv_hardswish_net()
    layouts = {}
    for target in ("ort-cpu", "openvino"):
        # The layouts alone: the openvino target's bias correction gives the bias-less Conv a
        # bias, which OpenVINO executes as one more Reshape (as it does for every Conv bias);
        # int8 weights in both (ort-cpu's u8s8_overflow stores an overflowing layer's weight as
        # uint8, which OpenVINO runs in f32: the openvino target sets it to none).
        result = api.compress(model, recipe="quantize:int8", calib="random:4", validate=False,
                              show_progress=False, target=target,
                              overrides=["quantize.bias_correction=none",
                                         "quantize.u8s8_overflow=none"])
        compiled = runtime_openvino.compile_model(result.model, threads=1, precision="f32")
        layouts[target] = runtime_openvino.precision_summary(compiled)
    convs = sum(1 for n in model.proto.graph.node if n.op_type == "Conv")
    ov, cpu = layouts["openvino"], layouts["ort-cpu"]
    assert ov["compute"] == {"Convolution int8": convs}
    assert not any(kind.startswith("Convert") for kind in ov["glue"])
    assert cpu["compute"] == {"Convolution int8": convs}
    assert ov["executed"] < cpu["executed"]


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


@needs_ep
def test_the_openvino_ep_matches_the_cpu_ep_in_fp32():
    model = builders.conv_net()
    feeds = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16)).astype(np.float32)}
    cpu = runtime.run(runtime.session(model, threads=1), feeds)
    ep = runtime.session(model, provider="openvino", threads=1)
    assert ep.get_providers()[0] == "OpenVINOExecutionProvider"
    np.testing.assert_allclose(runtime.run(ep, feeds)["y"], cpu["y"], rtol=1e-4, atol=1e-4)


@needs_ep
def test_bench_through_the_openvino_ep(tmp_path):
    """``bench --providers openvino,cpu`` times the float model and the openvino-target int8
    model through the EP and through the CPU EP, at 1 and 2 threads."""
    from onnxcomp.measure.bench import bench

    model = builders.conv_net()
    paths = [tmp_path / "float.onnx", tmp_path / "int8.onnx"]
    model.save(paths[0])
    api.compress(model, recipe="quantize:int8", calib="random:4", validate=False,
                 show_progress=False, target="openvino").model.save(paths[1])
    report = bench([str(p) for p in paths], providers=["openvino", "cpu"], threads=[1, 2],
                   runs=3, warmup=1, memory=False, min_seconds=0, progress=None)
    rows = report.bench["results"]
    assert {(r["provider"], r["threads"]) for r in rows} == {
        (provider, threads) for provider in ("OpenVINOExecutionProvider", "CPUExecutionProvider")
        for threads in (1, 2)}
    assert len(rows) == 8 and all(r["p50_ms"] > 0 for r in rows)


@pytest.mark.skipif("OpenVINOExecutionProvider" in ort_module.get_available_providers(),
                    reason="the OpenVINO execution provider is installed here")
def test_a_missing_openvino_ep_is_one_clear_line(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    builders.mlp().save(path)
    rc = main(["--quiet", "bench", str(path), "--providers", "openvino", "--runs", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "onnxruntime-openvino" in err[0], err
