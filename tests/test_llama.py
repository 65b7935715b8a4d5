"""The Llama-style generator (scale tests) and models with external data through compression."""

from __future__ import annotations

import numpy as np
import onnx

import onnxcomp
from onnxcomp import api, runtime
from onnxcomp.zoo.llama import PRESETS, build, prompts


def test_generator_streams_weights_to_external_data_and_is_causal(tmp_path):
    path = build(tmp_path / "tiny.onnx", PRESETS["tiny"])
    on_disk = onnx.load(str(path), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in on_disk.graph.initializer)
    onnx.checker.check_model(str(path))
    sess = runtime.session(str(path))
    batch = prompts(PRESETS["tiny"], 1).make_batch(0)
    first = runtime.run(sess, batch)["last_hidden_state"]
    changed = {"input_ids": batch["input_ids"].copy()}
    changed["input_ids"][0, -1] = (changed["input_ids"][0, -1] + 1) % PRESETS["tiny"].vocab
    second = runtime.run(sess, changed)["last_hidden_state"]
    # A later token never changes earlier positions (causal mask), and changes its own.
    np.testing.assert_array_equal(first[0, :-1], second[0, :-1])
    assert np.abs(first[0, -1] - second[0, -1]).max() > 1e-3


def test_compressed_model_keeps_external_data_and_loads_elsewhere(tmp_path, monkeypatch):
    path = build(tmp_path / "src" / "tiny.onnx", PRESETS["tiny"])
    result = api.compress(path, recipe="quantize:int4", eval_data=prompts(PRESETS["tiny"], 2),
                          show_progress=False)
    out = result.model.save(tmp_path / "out" / "tiny.int4.onnx")
    assert (tmp_path / "out" / "tiny.int4.onnx.data").is_file()
    on_disk = onnx.load(str(out), load_external_data=False)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in on_disk.graph.initializer)
    assert "MatMulNBits" in {n.op_type for n in on_disk.graph.node}
    monkeypatch.chdir(tmp_path)
    sess = runtime.session(str(out.resolve()))
    got = runtime.run(sess, prompts(PRESETS["tiny"], 1).make_batch(0))["last_hidden_state"]
    want = runtime.run_model(onnxcomp.load(path), prompts(PRESETS["tiny"], 1).make_batch(0))
    cosine = float(np.sum(got * want["last_hidden_state"]) /
                   np.linalg.norm(got) / np.linalg.norm(want["last_hidden_state"]))
    assert cosine > 0.9
