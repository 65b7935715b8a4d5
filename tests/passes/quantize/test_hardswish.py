"""HardSwish on uint8 (``integer_hardswish``, ``hardswish.py``): between two quantized Convs it
runs as QLinearAdd + QLinearMul in ONNX Runtime, about as faithfully as the float HardSwish."""

from __future__ import annotations

import builders
import numpy as np
import pytest
from quantize_graphs import data_for, optimized_ops

from onnxcomp import runtime
from onnxcomp.model import Model
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import hardswish
from onnxcomp.pipeline import Context

run = quantize.PASS.run


def _net(feeds_float_op: bool = False) -> Model:
    """x -> Conv -> HardSwish -> Conv -> y (opset 14); ``feeds_float_op``: the HardSwish output
    goes through a per-channel Mul (a float op) before the second Conv."""
    b = builders.GraphBuilder(seed=7)
    act = b.node("HardSwish", [b.conv("x", 3, 8, 3, "c1")], "hs")
    if feeds_float_op:
        act = b.node("Mul", [act, b.weight("scale", (1, 8, 1, 1), 1.0, positive=True)], "step")
    b.node("Conv", [act, b.weight("c2.w", (4, 8, 1, 1), 0.3)], "c2", outputs=["y"])
    return b.model([builders.tensor("x", [1, 3, 10, 10])],
                   [builders.tensor("y", [1, 4, 10, 10])], 14, "hardswish_net")


def _error(model: Model, result: Model, data) -> float:
    return float(np.mean([np.mean((runtime.run_model(model, batch)["y"]
                                   - runtime.run_model(result, batch)["y"]) ** 2)
                          for batch in data]))


def test_a_hardswish_between_quantized_convs_runs_as_qlinearadd_and_qlinearmul(tmp_path):
    model = _net()
    data = data_for(model, 8)
    on, record = run(model, quantize.Config(), Context(calibration=data))
    assert any(n.startswith("1 HardSwish run on uint8") for n in record.notes)
    assert hardswish.count(on.proto.graph) == 1
    kernels = optimized_ops(on, tmp_path)
    assert kernels.count("QLinearAdd") == 1 and kernels.count("QLinearMul") == 1
    assert not {"HardSwish", "HardSigmoid", "Mul", "Add"} & set(kernels)
    off, off_record = run(model, quantize.Config(integer_hardswish=False),
                          Context(calibration=data))
    assert not any("HardSwish run on uint8" in n for n in off_record.notes)
    assert "HardSwish" in [n.op_type for n in off.proto.graph.node]
    assert not {"QLinearAdd", "QLinearMul"} & set(optimized_ops(off, tmp_path))
    # t = clip(x/6 + 1/2, 0, 1) rounded to 1/255 is the one added rounding: the error against
    # float stays about the float HardSwish's.
    assert _error(model, on, data) <= 1.25 * _error(model, off, data)
    reference = runtime.run_model(model, next(iter(data)))["y"].ravel()
    got = runtime.run_model(on, next(iter(data)))["y"].ravel()
    assert float(reference @ got / np.linalg.norm(reference) / np.linalg.norm(got)) > 0.995


def test_the_uint8_form_equals_hardswish_on_every_uint8_level():
    """The rewrite alone, on a DequantizeLinear -> HardSwish -> QuantizeLinear graph with a fine
    output step: every one of the 256 input levels comes out as HardSwish of it, within the
    1/255 rounding of t (|x| / 510) and half the output step."""
    import onnx
    import onnx_graphsurgeon as gs
    from onnx import helper, numpy_helper

    scale, zero_point, out_scale, out_zp = 0.05, 100, 0.04, 10
    nodes = [helper.make_node("DequantizeLinear", ["q", "s", "z"], ["x"], name="dq"),
             helper.make_node("HardSwish", ["x"], ["h"], name="hs"),
             helper.make_node("QuantizeLinear", ["h", "os", "oz"], ["hq"], name="q_out"),
             helper.make_node("DequantizeLinear", ["hq", "os", "oz"], ["y"], name="dq_out")]
    inits = [numpy_helper.from_array(np.asarray(v, t), n) for n, v, t in (
        ("s", scale, np.float32), ("z", zero_point, np.uint8), ("os", out_scale, np.float32),
        ("oz", out_zp, np.uint8))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(
        "q", onnx.TensorProto.UINT8, [256])], [helper.make_tensor_value_info(
        "y", onnx.TensorProto.FLOAT, [256])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    imported = gs.import_onnx(proto)
    assert hardswish.rewrite(imported) == 1
    rewritten = gs.export_onnx(imported.cleanup().toposort())
    rewritten.ir_version = proto.ir_version
    levels = np.arange(256, dtype=np.uint8)
    x = (levels.astype(np.float64) - zero_point) * scale
    exact = x * np.clip(x + 3, 0, 6) / 6
    for optimize in (False, True):  # the QDQ graph as written, and ONNX Runtime's kernels
        got = runtime.run_model(Model(rewritten), {"q": levels}, optimize=optimize)["y"]
        assert np.all(np.abs(got - exact) <= np.abs(x) / 510 + out_scale / 2 + 1e-6)


def test_a_hardswish_that_feeds_a_float_op_is_left_alone(tmp_path):
    model = _net(feeds_float_op=True)
    data = data_for(model, 4)
    result, record = run(model, quantize.Config(), Context(calibration=data))
    assert hardswish.count(result.proto.graph) == 0
    assert not any("HardSwish run on uint8" in n for n in record.notes)
    assert "HardSwish" in [n.op_type for n in result.proto.graph.node]


def test_integer_hardswish_is_a_boolean():
    with pytest.raises(ValueError, match="integer_hardswish must be true or false"):
        quantize.Config(integer_hardswish=1)
