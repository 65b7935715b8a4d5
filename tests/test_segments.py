"""Running a model a segment at a time: the same values as the whole model, cuts between blocks,
bounded state for GPTQ's statistics."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import calibration, segments
from onnxcomp.model import Model, load
from onnxcomp.passes.quantize import gptq as quantize_gptq
from onnxcomp.zoo.llama import PRESETS, build, prompts


def _weight_inputs(model: Model) -> list[str]:
    weights = {t.name for t in model.graph.initializer}
    return list(dict.fromkeys(n.input[0] for n in model.graph.node
                              if n.op_type == "MatMul" and n.input[1] in weights))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Model:
    path = build(tmp_path_factory.mktemp("llama") / "tiny.onnx", PRESETS["tiny"])
    return load(path, load_weights=False)


def _whole(model: Model, names: list[str], data) -> list[dict[str, np.ndarray]]:
    got: list = []
    calibration.stream_activations(model, names, data, lambda _, values: got.append(values))
    return got


def _check_segments_equal_whole(model: Model, names: list[str], data, per_segment: int) -> None:
    want = _whole(model, names, data)
    got: list[dict] = [{} for _ in range(len(data))]
    for _, values in segments.iterate(model, names, data, per_segment):
        for i, batch in enumerate(values):
            got[i].update(batch)
    for i in range(len(data)):
        for name in names:
            np.testing.assert_array_equal(got[i][name], want[i][name])


@pytest.mark.parametrize("per_segment", [1, 3, 4, 1000])
def test_segments_give_the_whole_models_values(tiny_llama, per_segment):
    names = _weight_inputs(tiny_llama)
    data = prompts(PRESETS["tiny"], 3, length=12)
    want = _whole(tiny_llama, names, data)
    got: list[dict] = [{} for _ in range(len(data))]
    seen = []
    for segment, values in segments.iterate(tiny_llama, names, data, per_segment):
        assert len(segment.names) <= per_segment
        seen += segment.names
        for i, batch in enumerate(values):
            got[i].update(batch)
    assert sorted(seen) == sorted(names)  # each requested tensor comes from exactly one segment
    for i in range(len(data)):
        for name in names:
            np.testing.assert_array_equal(got[i][name], want[i][name])


def test_cuts_fall_between_decoder_blocks(tiny_llama):
    names = _weight_inputs(tiny_llama)
    plan = segments.plan(tiny_llama, names, 4)  # four weight inputs per block
    layers = PRESETS["tiny"].layers
    assert len(plan) == layers + 1  # one per block, then the final norm's output (lm head)
    for segment in plan[1:-1]:
        # Only the residual stream and the tensors every block shares cross a block boundary.
        block = [n for n in segment.inputs if n.startswith("layers.")]
        assert len(block) == 1 and len(segment.inputs) <= 4, segment.inputs
    assert plan[0].inputs == ("input_ids",)
    assert len(plan[-1].inputs) == 1  # the head reads the final norm's output alone


def test_unread_values_still_flow_and_unknown_names_are_refused(tiny_llama):
    names = _weight_inputs(tiny_llama)
    data = prompts(PRESETS["tiny"], 2, length=8)
    last = None
    for segment, values in segments.iterate(tiny_llama, names, data, 4):
        if segment is not None and segment.end == len(tiny_llama.graph.node):
            last = list(values)  # only the last segment's values are read
    want = _whole(tiny_llama, names[-1:], data)
    np.testing.assert_array_equal(last[1][names[-1]], want[1][names[-1]])
    with pytest.raises(ValueError, match="not a tensor computed by the graph"):
        segments.plan(tiny_llama, ["no_such_tensor"], 2)


def test_constant_nodes_and_graph_inputs():
    # y = (x @ W1) * c + x @ W2, with c a Constant node read in the second segment and x both
    # requested and read again after the cut.
    rng = np.random.default_rng(0)
    w1, w2 = (numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), n)
              for n in ("W1", "W2"))
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Constant", [], ["c"], name="const",
                              value=numpy_helper.from_array(np.float32(2.0).reshape(()))),
             helper.make_node("Mul", ["r", "c"], ["m"], name="mul"),
             helper.make_node("MatMul", ["m", "W2"], ["h2"], name="mm2"),
             helper.make_node("Add", ["h2", "x"], ["y"], name="add")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [w1, w2])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    onnx.checker.check_model(model.proto)
    data = calibration.from_batches([{"x": rng.standard_normal((2, 4)).astype(np.float32)}
                                     for _ in range(2)])
    names = ["x", "m"]
    plan = segments.plan(model, names, 1)
    assert len(plan) == 2 and "x" in plan[1].inputs  # x is still needed by the last Add
    _check_segments_equal_whole(model, names, data, 1)


def test_gptq_statistics_a_segment_at_a_time(tiny_llama):
    names = _weight_inputs(tiny_llama)
    data = prompts(PRESETS["tiny"], 3, length=10)
    want, counts = {}, {}
    for batch in _whole(tiny_llama, names, data):
        for name, value in batch.items():
            rows = value.reshape(-1, value.shape[-1]).astype(np.float64)
            want[name] = want.get(name, 0) + rows.T @ rows
            counts[name] = counts.get(name, 0) + rows.shape[0]
    for name, h in want.items():
        k = h.shape[0]
        # shrunk toward isotropic by SHRINK * K / rows of the mean diagonal (30 rows here)
        h[np.diag_indices(k)] += quantize_gptq.SHRINK * k / counts[name] * np.mean(np.diag(h))
    uses = {name: 1 for name in names}
    hessians = quantize_gptq.Hessians(tiny_llama, names, data, uses, per_segment=4)
    first = hessians.get(names[0])
    np.testing.assert_allclose(first, want[names[0]], rtol=1e-10)
    # Only the first segment's statistics exist so far, and a read one is dropped.
    assert set(hessians._ready) == set(names[1:4])
    for name in names[1:]:
        np.testing.assert_allclose(hessians.get(name), want[name], rtol=1e-10)
        assert len(hessians._ready) <= 3
    assert not hessians._ready


def test_weight_budget_splits_segments_and_extract_cuts_another_model(tiny_llama):
    names = [o.name for o in tiny_llama.graph.output]
    whole = segments.plan(tiny_llama, names, 16, max_weight_bytes=None)
    small = segments.plan(tiny_llama, names, 16, max_weight_bytes=64 << 10)
    assert len(small) > len(whole)
    sizes = {t.name: np.prod(t.dims) * 4 for t in tiny_llama.graph.initializer}
    for segment in small:
        reads = {n for node in tiny_llama.graph.node[segment.start:segment.end]
                 for n in segments.node_reads(node)}
        single = max((sizes.get(n, 0) for n in reads), default=0)
        assert sum(sizes.get(n, 0) for n in reads) <= max(64 << 10, 2 * single)


def test_compare_by_segment_equals_the_whole_model_comparison(tiny_llama, monkeypatch):
    from onnxcomp.measure import compare as quantize_eval
    from onnxcomp.passes import quantize
    from onnxcomp.pipeline import Context

    monkeypatch.setattr(quantize_eval, "SEGMENT_TENSORS", 2)  # many segments, even for tiny

    data = prompts(PRESETS["tiny"], 3, length=10)
    int4, record = quantize.PASS.run(tiny_llama, quantize.Config(mode="int4"), Context())
    tensors = [change.teacher_output for change in record.changes]
    eager = load(tiny_llama.source / "tiny.onnx")
    assert len(segments.plan(tiny_llama, tensors, 2)) > 5
    want = quantize_eval.compare(eager, int4, tensors, data, 3)
    got = quantize_eval.compare(tiny_llama, int4, tensors, data, 3)  # lazy: by segment
    assert got.cosine.keys() == want.cosine.keys()
    for name, value in want.cosine.items():
        assert got.cosine[name] == pytest.approx(value, abs=1e-9)
    for name, value in want.sqnr.items():
        assert got.sqnr[name] == pytest.approx(value, abs=1e-6)
    reference = quantize_eval.Reference(tiny_llama, data, 3)
    assert reference.min_cosine(int4) == pytest.approx(want.min_cosine, abs=1e-9)


def test_if_subgraphs_stay_whole_and_their_inner_tensors_are_not_outer_reads():
    rng = np.random.default_rng(2)
    then_branch = helper.make_graph(
        [helper.make_node("Add", ["x", "x"], ["t"]), helper.make_node("Identity", ["t"], ["o1"])],
        "then", [], [helper.make_tensor_value_info("o1", TensorProto.FLOAT, [2, 4])])
    else_branch = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["o2"])], "else", [],
        [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [2, 4])])
    weight = numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
             helper.make_node("ReduceSum", ["h"], ["s"], keepdims=0, name="sum"),
             helper.make_node("Greater", ["s", "zero"], ["c"], name="gt"),
             helper.make_node("If", ["c"], ["b"], then_branch=then_branch,
                              else_branch=else_branch, name="if"),
             helper.make_node("MatMul", ["b", "W"], ["y"], name="mm2")]
    zero = numpy_helper.from_array(np.float32(0.0).reshape(()), "zero")
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [weight, zero])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert segments.node_reads(model.graph.node[3]) == ["c", "x"]  # not the branch's own "t"
    data = calibration.from_batches([{"x": rng.standard_normal((2, 4)).astype(np.float32)}
                                     for _ in range(3)])
    names = ["h", "b"]
    _check_segments_equal_whole(model, names, data, 1)
    part = segments.extract(model, ["x", "c"], ["b"], {"x": 1, "c": 9})
    assert [n.op_type for n in part.graph.node] == ["If"]


@pytest.mark.parametrize("per_segment", [None, 4])
def test_one_batch_of_activations_alive_at_a_time(tiny_llama, per_segment, monkeypatch):
    """Streaming: when ONNX Runtime starts on a batch, the activations handed out for the
    previous one are gone (but for boundary tensors a later segment still reads), whole or a
    segment at a time; else the peak holds two batches."""
    import weakref

    from onnxcomp import runtime

    names = [n.output[0] for n in tiny_llama.graph.node if n.op_type == "MatMul"]
    carried = {n for s in segments.plan(tiny_llama, names, 4) for n in s.outputs}
    data = prompts(PRESETS["tiny"], 3, length=12)
    handed: list[weakref.ref] = []
    runs = []
    real_run = runtime.run

    def run(sess, feeds, outputs=None):
        runs.append(sum(ref() is not None for ref in handed))
        return real_run(sess, feeds, outputs)

    def on_batch(_: int, values: dict[str, np.ndarray]) -> None:
        handed[:] = [weakref.ref(v) for n, v in values.items() if n not in carried]

    monkeypatch.setattr(runtime, "run", run)
    calibration.stream_activations(tiny_llama, names, data, on_batch, per_segment=per_segment)
    assert len(runs) >= len(data) and handed
    assert runs == [0] * len(runs), "a run started with the last batch's activations alive"
