"""Merging two decoder files into one If graph and splitting it back (onnxcomp/decoders.py)."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper
from pipeline_builders import toy_parts, toy_samples

from onnxcomp.decoders import FLAG, merge_decoders, split_merged
from onnxcomp.errors import UserError


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"])


def _feeds(parts):
    encoder = _session(parts["encoder"])
    hidden = encoder.run(None, toy_samples(1)[0])[0]
    first = {"input_ids": np.array([[1, 2, 3]], np.int64), "encoder_hidden_states": hidden}
    out = dict(zip([o.name for o in parts["decoder"].graph.output],
                   _session(parts["decoder"]).run(None, first)))
    later = {"input_ids": np.array([[7]], np.int64),
             "past_key_values.0.key": out["present.0.key"],
             "past_key_values.0.encoder.key": out["present.0.encoder.key"]}
    return first, later, hidden


def test_merged_decoder_runs_both_paths_like_the_files():
    parts = toy_parts()
    merged = merge_decoders(parts["decoder"], parts["decoder_with_past"])
    onnx.checker.check_model(merged, full_check=True)
    first, later, hidden = _feeds(parts)
    session = _session(merged)
    empty = {"past_key_values.0.key": np.zeros((1, 1, 0, 64), np.float32),
             "past_key_values.0.encoder.key": np.zeros((1, 1, 1, 64), np.float32)}
    got_first = session.run(["logits"], {**empty, **first, FLAG: np.array([False])})[0]
    want_first = _session(parts["decoder"]).run(["logits"], first)[0]
    np.testing.assert_array_equal(got_first, want_first)
    got_later = session.run(["logits", "present.0.key", "present.0.encoder.key"],
                            {**later, "encoder_hidden_states": hidden, FLAG: np.array([True])})
    want_later = _session(parts["decoder_with_past"]).run(["logits", "present.0.key"], later)
    np.testing.assert_array_equal(got_later[0], want_later[0])
    np.testing.assert_array_equal(got_later[1], want_later[1])
    # the cross-attention cache the with-past file does not re-output is passed through
    np.testing.assert_array_equal(got_later[2], later["past_key_values.0.encoder.key"])


def test_merged_decoder_stores_each_shared_weight_once():
    parts = toy_parts()
    merged = merge_decoders(parts["decoder"], parts["decoder_with_past"])
    names = [t.name for t in merged.graph.initializer]
    assert sorted(names) == sorted({t.name for t in parts["decoder"].graph.initializer})
    size = sum(t.ByteSize() for t in merged.graph.initializer)
    assert size == sum(t.ByteSize() for t in parts["decoder"].graph.initializer)


def test_split_gives_back_the_files_exactly():
    parts = toy_parts()
    first_step, with_past = split_merged(merge_decoders(parts["decoder"],
                                                        parts["decoder_with_past"]))
    for original, back in ((parts["decoder"], first_step), (parts["decoder_with_past"], with_past)):
        onnx.checker.check_model(back, full_check=True)
        assert [i.name for i in back.graph.input] == [i.name for i in original.graph.input]
        assert [o.name for o in back.graph.output] == [o.name for o in original.graph.output]
        assert [n.name for n in back.graph.node] == [n.name for n in original.graph.node]
        assert {t.name: numpy_helper.to_array(t).tobytes() for t in back.graph.initializer} == {
            t.name: numpy_helper.to_array(t).tobytes() for t in original.graph.initializer}
    first, later, _ = _feeds(parts)
    np.testing.assert_array_equal(_session(first_step).run(None, first)[0],
                                  _session(parts["decoder"]).run(None, first)[0])
    np.testing.assert_array_equal(_session(with_past).run(None, later)[0],
                                  _session(parts["decoder_with_past"]).run(None, later)[0])


def test_weights_with_the_same_name_but_other_values_are_kept_apart():
    parts = toy_parts()
    with_past = parts["decoder_with_past"]
    for tensor in with_past.graph.initializer:
        if tensor.name == "lm_head":
            tensor.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(tensor) * 2, "lm_head"))
    merged = merge_decoders(parts["decoder"], with_past)
    assert {"lm_head", "with_past/lm_head"} <= {t.name for t in merged.graph.initializer}
    _, back = split_merged(merged)
    lm_head = {t.name: numpy_helper.to_array(t) for t in back.graph.initializer}["lm_head"]
    np.testing.assert_array_equal(lm_head, numpy_helper.to_array(
        next(t for t in with_past.graph.initializer if t.name == "lm_head")))


def test_merge_refuses_what_it_cannot_express():
    parts = toy_parts()
    decoder = parts["decoder"]
    del decoder.graph.output[2]  # the first step no longer makes the cross cache
    with pytest.raises(UserError, match="lacks"):
        merge_decoders(decoder, _drop_output_copy(parts["decoder_with_past"], keep_all=True,
                                                  extra="present.0.encoder.key"))
    lone = toy_parts()["decoder_with_past"]
    del lone.graph.output[1]
    first = toy_parts()["decoder"]
    with pytest.raises(UserError, match="no output 'present.0.key'"):
        merge_decoders(first, _rename_input(lone, "past_key_values.0.key", "cache"))


def _drop_output_copy(model, keep_all, extra):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.node.append(helper.make_node("Identity", ["past_key_values.0.encoder.key"],
                                            [extra], name="copy_out"))
    copy.graph.output.append(helper.make_tensor_value_info(extra, onnx.TensorProto.FLOAT, None))
    return copy


def _rename_input(model, old, new):
    for value in model.graph.input:
        if value.name == old:
            value.name = new
    for node in model.graph.node:
        node.input[:] = [new if n == old else n for n in node.input]
    return model


def test_split_refuses_a_model_without_the_flag_if():
    with pytest.raises(UserError, match="not a merged decoder"):
        split_merged(toy_parts()["decoder"])


def test_split_keeps_initializers_that_live_in_a_branch():
    parts = toy_parts()
    merged = merge_decoders(parts["decoder"], parts["decoder_with_past"])
    for attr in merged.graph.node[0].attribute:  # as a pass that lifts a branch constant does
        branch = attr.g
        axes = numpy_helper.from_array(np.array([1], np.int64), f"{attr.name}/axes_local")
        branch.initializer.append(axes)
        for node in branch.node:
            if node.op_type in ("Unsqueeze", "Squeeze"):
                node.input[1] = axes.name
    onnx.checker.check_model(merged, full_check=True)
    first_step, with_past = split_merged(merged)
    for model in (first_step, with_past):
        onnx.checker.check_model(model, full_check=True)
        assert any(t.name.endswith("axes_local") for t in model.graph.initializer)
    first, later, _ = _feeds(parts)
    np.testing.assert_array_equal(_session(first_step).run(None, first)[0],
                                  _session(parts["decoder"]).run(None, first)[0])
    np.testing.assert_array_equal(_session(with_past).run(None, later)[0],
                                  _session(parts["decoder_with_past"]).run(None, later)[0])


def test_side_by_side_runs_both_paths_and_splits_back_exactly():
    from onnxcomp.decoders import side_by_side, split_side_by_side

    parts = toy_parts()
    both = side_by_side(parts["decoder"], parts["decoder_with_past"])
    onnx.checker.check_model(both, full_check=True)
    assert sorted(t.name for t in both.graph.initializer) == sorted(
        t.name for t in parts["decoder"].graph.initializer)  # shared weights once
    first, later, _ = _feeds(parts)
    # the two paths have different lengths for the same symbolic "sequence": kept apart
    outputs = _session(both).run(["first/logits", "with_past/logits"],
                                 {**{f"first/{k}": v for k, v in first.items()},
                                  **{f"with_past/{k}": v for k, v in later.items()}})
    np.testing.assert_array_equal(outputs[0], _session(parts["decoder"]).run(["logits"], first)[0])
    np.testing.assert_array_equal(
        outputs[1], _session(parts["decoder_with_past"]).run(["logits"], later)[0])
    for original, back in zip((parts["decoder"], parts["decoder_with_past"]),
                              split_side_by_side(both)):
        onnx.checker.check_model(back, full_check=True)
        assert back.graph.input == original.graph.input
        assert back.graph.output == original.graph.output
        assert [n.name for n in back.graph.node] == [n.name for n in original.graph.node]
        assert _sorted_weights(back) == _sorted_weights(original)


def _sorted_weights(model):
    return sorted((t.name, numpy_helper.to_array(t).tobytes()) for t in model.graph.initializer)
