"""Static int8 inside If / Loop / Scan bodies: calibrated on each body run alone
(``onnxcomp.subgraphs``), QDQ placed in the body of the node it quantizes (where ONNX Runtime
fuses it), and the sites of a branch the calibration data never ran kept float, said so."""

from __future__ import annotations

import body_graphs
import numpy as np
import onnx
import pytest

from onnxcomp import calibration, runtime
from onnxcomp.errors import UserError
from onnxcomp.model import Model
from onnxcomp.passes import cleanup, quantize
from onnxcomp.pipeline import Context


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _conv_batches(count: int, **conditions) -> calibration.Dataset:
    rng = np.random.default_rng(7)
    shape = (1, body_graphs.CHANNELS, body_graphs.LENGTH)
    return calibration.from_batches(
        [{"x": rng.standard_normal(shape).astype(np.float32),
          **{k: np.array(v) for k, v in conditions.items()}} for _ in range(count)])


def _branch(model, node_name: str, attribute: str) -> onnx.GraphProto:
    def walk(graph):
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.GRAPH:
                    if node.name == node_name and attr.name == attribute:
                        return attr.g
                    found = walk(attr.g)
                    if found is not None:
                        return found
        return None
    return walk(model.graph)


def _ops(graph: onnx.GraphProto) -> list[str]:
    return [n.op_type for n in graph.node]


def test_the_taken_branch_is_calibrated_and_quantized_the_other_kept_float_with_why():
    model = body_graphs.if_convs()
    data = _conv_batches(4, cond=True)
    out, record = quantize.PASS.run(model, quantize.Config(), Context(calibration=data))
    assert sorted(record.touched) == ["then_conv", "top_conv"]
    skipped = dict(record.skipped)
    assert skipped["else_conv"] == ("inside if/else_branch: never ran on the calibration data "
                                    "(kept float)")
    then, other = _branch(out, "if", "then_branch"), _branch(out, "if", "else_branch")
    # The pair on the branch-internal activation and the weight's DQ sit in the branch itself.
    assert _ops(then).count("QuantizeLinear") >= 1 and _ops(then).count("DequantizeLinear") >= 2
    assert "QuantizeLinear" not in _ops(other)
    onnx.checker.check_model(out.proto, full_check=True)
    runtime.session(out)
    feeds = dict(next(iter(_conv_batches(1, cond=True))))
    ref, got = runtime.run_model(model, feeds)["y"], runtime.run_model(out, feeds)["y"]
    assert _cosine(ref, got) > 0.999
    # The untaken branch is float: only the outer Conv's (quantized) output reaches it.
    feeds["cond"] = np.array(False)
    assert _cosine(runtime.run_model(model, feeds)["y"],
                   runtime.run_model(out, feeds)["y"]) > 0.999


def test_onnx_runtime_fuses_the_branch_conv_into_qlinearconv(tmp_path):
    model = body_graphs.if_convs()
    out, _ = quantize.PASS.run(model, quantize.Config(),
                               Context(calibration=_conv_batches(4, cond=True)))
    path = tmp_path / "optimized.onnx"
    runtime.session(out, optimize=True, optimized_model_path=str(path))
    optimized = onnx.load(str(path))
    assert "QLinearConv" in _ops(_branch(optimized, "if", "then_branch"))
    assert "QLinearConv" not in _ops(_branch(optimized, "if", "else_branch"))


def test_both_branches_are_quantized_when_the_data_runs_both():
    model = body_graphs.if_convs()
    rows = list(_conv_batches(2, cond=True)) + list(_conv_batches(2, cond=False))
    out, record = quantize.PASS.run(model, quantize.Config(),
                                    Context(calibration=calibration.from_batches(rows)))
    assert sorted(record.touched) == ["else_conv", "then_conv", "top_conv"]
    assert not record.skipped
    assert "QuantizeLinear" in _ops(_branch(out, "if", "else_branch"))


def test_nested_branches_are_calibrated_through_their_enclosing_branch():
    model = body_graphs.nested_if_convs()
    out, record = quantize.PASS.run(model, quantize.Config(),
                                    Context(calibration=_conv_batches(3, c1=True, c2=False)))
    assert record.touched == ["inner_else_conv"]
    skipped = dict(record.skipped)
    assert skipped["inner_then_conv"] == ("inside outer_if/then_branch/inner_if/then_branch: "
                                          "never ran on the calibration data (kept float)")
    assert "never ran" in skipped["outer_else_conv"]
    assert "QuantizeLinear" in _ops(_branch(out, "inner_if", "else_branch"))
    for c1, c2 in ((True, False), (True, True), (False, True)):
        feeds = dict(next(iter(_conv_batches(1, c1=c1, c2=c2))))
        assert _cosine(runtime.run_model(model, feeds)["y"],
                       runtime.run_model(out, feeds)["y"]) > 0.999


@pytest.mark.parametrize("kind", ["loop", "scan"])
def test_a_loop_or_scan_body_is_calibrated_iteration_by_iteration(kind):
    if kind == "loop":  # cleanup first: the carried weight becomes an outer read
        model, _ = cleanup.PASS.run(body_graphs.loop_matmul(), cleanup.Config(), Context())
        rng = np.random.default_rng(0)
        rows = [{"x": rng.standard_normal((2, body_graphs.DIM)).astype(np.float32)}
                for _ in range(4)]
        site, holder, output = "body_mm", ("loop", "body"), "y"
    else:
        model = body_graphs.scan_matmul()
        rng = np.random.default_rng(0)
        rows = [{"s0": np.zeros((1, body_graphs.DIM), np.float32),
                 "seq": rng.standard_normal((5, 1, body_graphs.DIM)).astype(np.float32)}
                for _ in range(4)]
        site, holder, output = "scan_mm", ("scan", "body"), "s_final"
    data = calibration.from_batches(rows)
    out, record = quantize.PASS.run(model, quantize.Config(), Context(calibration=data))
    assert record.touched == [site]
    assert "QuantizeLinear" in _ops(_branch(out, *holder))
    onnx.checker.check_model(out.proto, full_check=True)
    assert _cosine(runtime.run_model(model, rows[0])[output],
                   runtime.run_model(out, rows[0])[output]) > 0.999


def test_a_body_without_weights_leaves_nothing_to_do():
    model = body_graphs.loop_matmul(carried_weight=True)  # before cleanup: no weight in sight
    rng = np.random.default_rng(0)
    data = calibration.from_batches(
        [{"x": rng.standard_normal((2, body_graphs.DIM)).astype(np.float32)}])
    out, record = quantize.PASS.run(model, quantize.Config(), Context(calibration=data))
    assert not record.modified and out is model


def test_the_result_is_deterministic_and_not_quantized_twice():
    model = body_graphs.if_convs()
    data = _conv_batches(3, cond=True)
    first, _ = quantize.PASS.run(model, quantize.Config(), Context(calibration=data))
    second, _ = quantize.PASS.run(model, quantize.Config(), Context(calibration=data))
    assert first.proto.SerializeToString() == second.proto.SerializeToString()
    with pytest.raises(UserError, match="already quantized"):
        quantize.PASS.run(first, quantize.Config(), Context(calibration=data))


def test_a_name_sibling_branches_reuse_is_not_calibrated():
    """Sibling branches may legally reuse a name: its statistics would mix two tensors."""
    model = body_graphs.if_convs()
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    for attr in proto.graph.node[1].attribute:
        for node in attr.g.node:  # both branches call their Relu output "a"
            node.input[:] = ["a" if n.endswith("_a") else n for n in node.input]
            node.output[:] = ["a" if n.endswith("_a") else n for n in node.output]
    reused = Model(proto)
    plan = quantize.PASS.plan(reused, quantize.Config(),
                              Context(calibration=_conv_batches(2, cond=True)))
    rows = {row.node: row for row in plan.rows}
    assert rows["then_conv"].action == "skip" and "sibling bodies reuse" in rows[
        "then_conv"].reason


def test_an_if_inside_a_loop_is_calibrated_on_every_iteration():
    model = body_graphs.loop_with_if()
    rng = np.random.default_rng(0)
    rows = [{"x": rng.standard_normal((2, body_graphs.DIM)).astype(np.float32),
             "flag": np.array(False)} for _ in range(4)]
    out, record = quantize.PASS.run(model, quantize.Config(),
                                    Context(calibration=calibration.from_batches(rows)))
    assert record.touched == ["else_mm"]
    assert dict(record.skipped)["then_mm"] == ("inside loop/body/body_if/then_branch: never ran "
                                               "on the calibration data (kept float)")
    assert "QuantizeLinear" in _ops(_branch(out, "body_if", "else_branch"))
    assert _cosine(runtime.run_model(model, rows[0])["y"],
                   runtime.run_model(out, rows[0])["y"]) > 0.999


def test_body_tensors_get_the_statistics_their_values_have():
    """``calib.collect_scoped``: a branch-internal tensor's min/max are those of the values the
    branch computed; a tensor of the untaken branch is missing, with why."""
    from onnxcomp.passes.quantize import calib

    model = body_graphs.if_convs()
    data = _conv_batches(3, cond=True)
    stats, missing = calib.collect_scoped(model, ["t", "then_a", "then_c", "else_a"], data)
    outer = calibration.with_outputs(model, ["t"])
    t = [runtime.run_model(outer, batch)["t"] for batch in data]
    assert stats["t"].maximum == pytest.approx(max(float(v.max()) for v in t))
    assert stats["then_a"].minimum == 0.0  # Relu(t), computed inside the branch
    assert stats["then_a"].maximum == pytest.approx(max(float(v.max()) for v in t))
    assert np.isfinite(stats["then_c"].minimum) and "else_a" not in stats
    assert missing == {"else_a": "never ran on the calibration data"}
