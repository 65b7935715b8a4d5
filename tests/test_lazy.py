"""Weights left on disk (``load(path, load_weights=False)``) through passes, sessions and saves."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import external_data_helper, numpy_helper

from onnxcomp import api, runtime, segments
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import load
from onnxcomp.zoo.llama import PRESETS, build, prompts

TINY = PRESETS["tiny"]


@pytest.fixture()
def llama(tmp_path):
    return build(tmp_path / "src" / "tiny.onnx", TINY)


def on_disk(model) -> set[str]:
    return {t.name for t in model.graph.initializer
            if external_data_helper.uses_external_data(t)}


def outputs(model_or_path, batch):
    return runtime.run(runtime.session(model_or_path, optimize=False), batch)


def test_lazy_load_reads_nothing_and_runs_in_onnx_runtime(llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be read relative to the working directory
    lazy = load(llama, load_weights=False)
    assert lazy.lazy and len(on_disk(lazy)) > 10
    assert not any(t.HasField("raw_data") for t in lazy.graph.initializer
                   if t.name in on_disk(lazy))
    assert lazy.weight_bytes() == load(llama).weight_bytes()
    batch = prompts(TINY, 1).make_batch(0)
    want = outputs(str(llama), batch)
    got = outputs(lazy, batch)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_saving_a_lazy_model_copies_its_weights_exactly_and_leaves_it_lazy(llama, tmp_path):
    lazy = load(llama, load_weights=False)
    before = lazy.proto.SerializeToString()
    out = lazy.save(tmp_path / "copy" / "tiny.onnx")
    # The in-memory model still points at its own files, unchanged.
    assert lazy.proto.SerializeToString() == before
    eager, copied = load(llama), load(out)
    for a, b in zip(eager.graph.initializer, copied.graph.initializer):
        assert a.name == b.name
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    # Large tensors start on page boundaries (ONNX Runtime can map them).
    for tensor in load(out, load_weights=False).graph.initializer:
        info = external_data_helper.ExternalDataInfo(tensor) if tensor.external_data else None
        if info and info.length >= 1 << 20:
            assert info.offset % 4096 == 0


def test_a_lazy_model_is_not_saved_over_the_file_it_reads(llama):
    lazy = load(llama, load_weights=False)
    with pytest.raises(OnnxcompError, match="reads its weights from this file"):
        lazy.save(llama)


def test_eager_save_round_trip_keeps_the_model_whole(tmp_path, llama):
    eager = load(llama)
    before = eager.proto.SerializeToString()
    out = eager.save(tmp_path / "e" / "tiny.onnx", external_data=True)
    assert eager.proto.SerializeToString() == before  # weights read back, nothing lost
    assert on_disk(load(out, load_weights=False))


@pytest.mark.parametrize("recipe", ["quantize:int4", "quantize:int8-dynamic"])
def test_quantize_works_on_weights_left_on_disk(llama, tmp_path, monkeypatch, recipe):
    monkeypatch.chdir(tmp_path)
    eager = api.compress(load(llama), recipe=recipe, validate=False, show_progress=False).model
    lazy = api.compress(llama, recipe=recipe, validate=False, show_progress=False).model
    assert not eager.lazy and lazy.lazy
    # Weights the pass did not rewrite stay references to the source file, not copies.
    untouched = on_disk(lazy)
    assert "cos_table" in untouched
    originals = {t.name for t in load(llama, load_weights=False).graph.initializer}
    assert untouched <= originals
    assert not any(t.name.endswith(("q_proj", "down_proj")) for t in lazy.graph.initializer)
    batch = prompts(TINY, 2).make_batch(1)
    want, got = outputs(eager, batch), outputs(lazy, batch)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    saved = lazy.save(tmp_path / "out" / "q.onnx")
    again = outputs(str(saved), batch)
    for name in want:
        np.testing.assert_array_equal(again[name], want[name])


def test_passes_that_need_every_weight_get_them_read_in(llama, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = api.compress(llama, recipe="lowrank:rank_ratio=0.5", validate=False,
                          show_progress=False)
    eager = api.compress(load(llama), recipe="lowrank:rank_ratio=0.5", validate=False,
                         show_progress=False)
    batch = prompts(TINY, 1).make_batch(0)
    want, got = outputs(eager.model, batch), outputs(result.model, batch)
    for name in want:
        np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_inspect_of_a_lazy_model_reads_from_its_folder(llama, tmp_path, monkeypatch):
    from onnxcomp.inspection import inspect_model

    monkeypatch.chdir(tmp_path)
    info = inspect_model(str(llama))
    assert info["parameters"] == load(llama).parameter_count()
    prune = info["plans"]["prune"]
    cut = [row for row in prune["rows"] if row["action"] != "skip"]
    assert len(cut) == TINY.layers and all("ffn" in row["node"] for row in cut)  # one per layer


def test_inspect_of_a_lazy_model_reads_no_weight_into_memory(llama, monkeypatch):
    # Weights are only mapped from the folder (one layer at a time); lowrank's plan, which
    # would decompose every one of them, is not asked.
    from onnxcomp.inspection import inspect_model
    from onnxcomp.model import Model

    def refuse(self):
        raise AssertionError("inspect read every weight in")

    monkeypatch.setattr(Model, "materialize", refuse)
    monkeypatch.setattr(external_data_helper, "load_external_data_for_model", refuse)
    info = inspect_model(str(llama))
    assert "on disk" in info["plans"]["lowrank"]["not_planned"]
    assert info["plans"]["quantize:int4"]["to_change"] > 0


def test_a_lazy_model_saved_as_one_file_has_its_weights_inside(llama, tmp_path):
    lazy = load(llama, load_weights=False)
    out = lazy.save(tmp_path / "one" / "tiny.onnx", external_data=False)
    assert not (tmp_path / "one" / "tiny.onnx.data").exists()
    assert lazy.lazy  # the model in memory is unchanged
    batch = prompts(TINY, 1).make_batch(0)
    want, got = outputs(str(llama), batch), outputs(str(out), batch)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_an_opset_upgrade_of_a_lazy_model_works_from_another_directory(llama, tmp_path,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = api.compress(llama, recipe="quantize:int4", overrides=["quantize.int4_format=qdq"],
                          validate=False, show_progress=False)
    assert result.model.opset() == 21 and result.model.lazy
    batch = prompts(TINY, 1).make_batch(0)
    got = outputs(result.model, batch)["last_hidden_state"]
    want = outputs(str(llama), batch)["last_hidden_state"]
    assert float(np.sum(got * want) / np.linalg.norm(got) / np.linalg.norm(want)) > 0.9


def test_static_int8_calibrates_a_lazy_model_a_segment_at_a_time(llama, tmp_path, monkeypatch):
    # Eager: one ONNX Runtime run of the whole model per batch; lazy (weights on disk): the
    # histograms are collected segment by segment. Same ranges, so the same model.
    monkeypatch.chdir(tmp_path)
    calls = []
    iterate = segments.iterate
    monkeypatch.setattr(segments, "iterate", lambda *a: calls.append(a[3]) or iterate(*a))
    calib = prompts(TINY, 3, length=12, seed=4)
    eager = api.compress(load(llama), recipe="quantize:int8", calib=calib, validate=False,
                         show_progress=False).model
    assert not calls  # the eager model ran whole
    lazy = api.compress(llama, recipe="quantize:int8", calib=calib, validate=False,
                        show_progress=False).model
    assert lazy.lazy and calls  # calibration and the SQNR check went segment by segment
    batch = prompts(TINY, 2).make_batch(1)
    want, got = outputs(eager, batch), outputs(lazy, batch)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])

