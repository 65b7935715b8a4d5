"""Latency-aware mixed precision (latency.py): per-layer savings from ONNX Runtime's profiler, the
harm-per-millisecond order, and layers slower in int8 returned to float."""

from __future__ import annotations

import builders
import numpy as np
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import calibration
from onnxcomp.model import Model
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import latency
from onnxcomp.passes.quantize.match import Site
from onnxcomp.pipeline import Context


def _site(node: str, output: str, output_qdq: str | None = None) -> Site:
    return Site(node=node, op="Conv", weight_input=1, weight_name=f"{node}.w", axis=0,
                activation_inputs=(0,), output=output, output_qdq=output_qdq)


def test_the_order_is_slower_first_then_harm_per_millisecond_then_unmeasured():
    # (node, output cosine with only it quantized): b is the most harmful, but saves 10x the
    # time c saves for 3x its harm: per millisecond c costs more fidelity, so c goes first.
    harm = [("b", 0.97), ("c", 0.99), ("a", 0.999), ("d", 0.95), ("e", 0.98)]
    savings = {"a": -0.2, "b": 1.0, "c": 0.1, "d": None, "e": -0.01}
    order = [node for node, _, _ in latency.ranking(harm, savings)]
    assert order == ["a", "e", "c", "b", "d"]


def test_savings_are_attributed_by_onnx_runtime_names():
    # Profiles as ONNX Runtime names them: a float Conv renamed after its output (NCHWc) or its
    # fused Relu's output; the QLinearConv as <node>_token_N; Q/DQ after their tensors.
    float_profile = {"conv1_out_nchwc": 2.0, "relu2_out_nchwc": 1.0, "conv3": 0.5}
    int8_profile = {"conv1_token_4": 0.5, "x_Q": 0.2, "conv2_token_7": 0.9, "conv1_out_Q": 0.4,
                    "conv2_out_DQ": 0.05, "conv2_out_DQ/duplicated": 0.05}
    sites = [_site("conv1", "conv1_out"), _site("conv2", "conv2_out", "conv2_out"),
             _site("conv3", "conv3_out")]
    inputs_of = {"conv1": ["x"], "conv2": ["conv1_out"], "conv3": ["x"]}
    names = {"conv1": ["conv1", "conv1_out_nchwc"],
             "conv2": ["conv2", "conv2_out_nchwc", "relu2_out_nchwc"],
             "conv3": ["conv3", "conv3_out_nchwc"]}
    saved = latency.site_savings(float_profile, int8_profile, sites, inputs_of, names)
    assert saved["conv1"] == 2.0 - (0.5 + 0.2 / 2)  # x's Q shared with conv3
    assert abs(saved["conv2"] - (1.0 - (0.9 + 0.4 + 0.1))) < 1e-12  # slower in int8
    assert saved["conv3"] is None  # no QLinearConv of that name in the int8 profile


def _wide_and_narrow() -> Model:
    """x -> wide Conv (64 -> 64, 3x3, 32x32: its int8 kernel saves time) and, beside it, a
    narrow 1x1 Conv (64 -> 2 channels, whose Q/DQ cost more than its kernel)."""
    rng = np.random.default_rng(0)
    weights = {"Ww": rng.standard_normal((64, 64, 3, 3)).astype(np.float32) * 0.05,
               "Wn": rng.standard_normal((2, 64, 1, 1)).astype(np.float32) * 0.1}
    nodes = [helper.make_node("Conv", ["x", "Ww"], ["wide"], pads=[1, 1, 1, 1], name="wide"),
             helper.make_node("Conv", ["x", "Wn"], ["narrow"], name="narrow")]
    graph = helper.make_graph(
        nodes, "wide_and_narrow",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64, 32, 32])],
        [helper.make_tensor_value_info("wide", TensorProto.FLOAT, [1, 64, 32, 32]),
         helper.make_tensor_value_info("narrow", TensorProto.FLOAT, [1, 2, 32, 32])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()])
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))


def test_the_profiles_name_every_site_of_a_real_model():
    model = builders.conv_net()
    data = calibration.random_data(model, 2)
    planned = quantize.plan(model, quantize.Config(), Context(calibration=data))
    prepared, sites = planned.payload.prepared, planned.payload.sites.sites
    quantized, _ = quantize.PASS.run(model, quantize.Config(), Context(calibration=data))
    feeds = data.make_batch(0)
    nodes = {n.name: n for n in prepared.graph.node}
    saved = latency.site_savings(
        latency.profile_ms(prepared, feeds), latency.profile_ms(quantized, feeds), sites,
        {s.node: [nodes[s.node].input[i] for i in s.activation_inputs] for s in sites},
        latency.float_names(prepared, sites))
    assert set(saved) == {s.node for s in sites}
    assert all(v is not None for v in saved.values()), saved


def test_keep_float_by_latency_records_savings_and_the_harm_cost_ranking():
    model = _wide_and_narrow()
    data = calibration.random_data(model, 2)
    config = quantize.Config(keep_float_by="latency", min_cosine=0.999999)
    result, record = quantize.PASS.run(model, config, Context(calibration=data))
    details = record.details
    assert {row["node"] for row in details["latency_saved_ms"]} == {"wide", "narrow"}
    # Whatever this machine measured, the layers slower in int8 are the ones kept float first
    slower = {row["node"] for row in details["latency_saved_ms"]
              if row["saved_ms"] is not None and row["saved_ms"] < 0}
    skipped = {node for node, why in record.skipped if why.startswith("slower in int8")}
    assert skipped == slower
    if "harm_cost_ranking" in details:  # min_cosine still unmet after them: the ranked rest
        ranked = [row["node"] for row in details["harm_cost_ranking"]]
        assert set(ranked) == {"wide", "narrow"} - slower
    off = quantize.PASS.run(model, quantize.Config(), Context(calibration=data))[1]
    assert "latency_saved_ms" not in off.details
    assert result.proto.graph.output[0].name == "wide"
