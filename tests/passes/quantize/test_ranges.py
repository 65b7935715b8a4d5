"""Loss-aware activation ranges (``range_search``): which scales may move, a range set too wide is
shrunk and the output error against float drops in ONNX Runtime, nothing but scale values
changes, refusals are said."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from builders import conv_net
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import calibration, runtime
from onnxcomp.model import Model
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import ranges
from onnxcomp.pipeline import Context


def _data(count: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    return calibration.from_batches(
        [{"x": rng.standard_normal((1, 3, 16, 16)).astype(np.float32)} for _ in range(count)])


def _error(reference: Model, candidate: Model, data) -> float:
    total = 0.0
    for batch in data:
        ref = next(iter(runtime.run_model(reference, batch).values())).astype(np.float64)
        out = next(iter(runtime.run_model(candidate, batch, optimize=True).values()))
        total += float(np.sum((out - ref) ** 2) / np.sum(ref ** 2))
    return total / len(data)


def _scalar(name: str, value, dtype) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype), name)


def test_only_scales_read_by_one_pair_alone_are_tunable():
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "s1", "z1"], ["xq"], name="q1"),
        helper.make_node("DequantizeLinear", ["xq", "s1", "z1"], ["xd"], name="dq1"),
        helper.make_node("Relu", ["xd"], ["r"], name="relu"),
        # Read back with another scale (as integer HardSwish's sixth): not tunable.
        helper.make_node("QuantizeLinear", ["r", "s2", "z2"], ["rq"], name="q2"),
        helper.make_node("DequantizeLinear", ["rq", "s2b", "z2"], ["rd"], name="dq2"),
        # Two pairs sharing one scale: not tunable.
        helper.make_node("QuantizeLinear", ["rd", "s3", "z3"], ["aq"], name="q3"),
        helper.make_node("DequantizeLinear", ["aq", "s3", "z3"], ["ad"], name="dq3"),
        helper.make_node("QuantizeLinear", ["xd", "s3", "z3"], ["bq"], name="q4"),
        helper.make_node("DequantizeLinear", ["bq", "s3", "z3"], ["bd"], name="dq4"),
        # A weight: its quantizer reads an initializer.
        helper.make_node("QuantizeLinear", ["w", "s5", "z5"], ["wq"], name="q5"),
        helper.make_node("DequantizeLinear", ["wq", "s5", "z5"], ["wd"], name="dq5"),
        helper.make_node("Add", ["ad", "bd"], ["t"], name="add"),
        helper.make_node("Add", ["t", "wd"], ["y"], name="add2"),
    ]
    inits = [_scalar(n, 0.1, np.float32) for n in ("s1", "s2", "s2b", "s3", "s5")]
    inits += [_scalar(n, 128, np.uint8) for n in ("z1", "z2", "z3", "z5")]
    inits.append(numpy_helper.from_array(np.ones(4, np.float32), "w"))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              inits)
    assert ranges.tunable_scales(graph) == ["s1"]
    # A body that reads s1 from the outer scope shares it.
    branch = helper.make_graph([helper.make_node("Identity", ["s1"], ["o"])], "b", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, [])])
    graph.node.append(helper.make_node("If", ["c"], ["u"], then_branch=branch,
                                       else_branch=branch))
    graph.input.append(helper.make_tensor_value_info("c", TensorProto.BOOL, []))
    assert ranges.tunable_scales(graph) == []


@pytest.fixture(scope="module")
def quantized():
    model, data = conv_net(), _data()
    result, _ = quantize.PASS.run(model.copy(), quantize.Config(mode="int8"),
                                  Context(calibration=data))
    return model, result, data


def test_a_range_set_too_wide_is_shrunk_and_the_output_error_drops(quantized):
    model, result, data = quantized
    scales = ranges.tunable_scales(result.graph)
    assert len(scales) >= 3
    widened = result.copy()
    target = scales[1]
    for t in widened.graph.initializer:
        if t.name == target:
            t.CopyFrom(_scalar(target, numpy_helper.to_array(t) * 4, np.float32))
    tuned, chosen, (before, after) = ranges.search(model, widened, data, lambda _: None)
    assert chosen[target] < 1  # the smallest factor tried brings it back towards calibration
    assert set(chosen.values()) <= set(ranges.FACTORS)
    assert after < before
    assert _error(model, tuned, data) < _error(model, widened, data)
    # Nothing but the chosen scales' values changed.
    assert [n.SerializeToString() for n in tuned.graph.node] == \
           [n.SerializeToString() for n in widened.graph.node]
    old = {t.name: t.SerializeToString() for t in widened.graph.initializer}
    new = {t.name: t.SerializeToString() for t in tuned.graph.initializer}
    assert old.keys() == new.keys()
    assert {name for name in old if old[name] != new[name]} == set(chosen)


def test_the_pass_searches_when_asked_and_keeps_integer_kernels(quantized):
    model, plain, data = quantized
    result, record = quantize.PASS.run(model.copy(),
                                       quantize.Config(mode="int8", range_search=True),
                                       Context(calibration=data))
    note = next(n for n in record.notes if n.startswith("range_search:"))
    assert "activation ranges rescaled" in note
    assert len(record.details["range_search"]) == int(note.split()[1])
    ops = [n.op_type for n in result.graph.node]
    assert ops == [n.op_type for n in plain.graph.node]
    # Accepted only where both halves of the scoring data gained: no worse on that data in
    # ONNX Runtime's fused graph (emulation and integer kernels differ by float rounding).
    assert _error(model, result, data) <= _error(model, plain, data) * 1.01


def test_other_modes_say_it_does_not_apply():
    model = conv_net()
    _, record = quantize.PASS.run(model, quantize.Config(mode="int8-dynamic", op_types=("Conv",),
                                                         range_search=True),
                                  Context(calibration=_data(2)))
    assert any(n.startswith("range_search: static int8 only") for n in record.notes)


def test_config_checks_the_flag():
    with pytest.raises(ValueError, match="range_search"):
        quantize.Config(range_search="yes")


def test_mixed_precision_after_the_search_says_the_ranges_are_not_kept(quantized):
    model, _, data = quantized
    _, record = quantize.PASS.run(model.copy(), quantize.Config(mode="int8", range_search=True,
                                                                min_cosine=0.999999),
                                  Context(calibration=data))
    assert record.details.get("kept_float")
    assert any("searched ranges are not in the result" in n for n in record.notes)
