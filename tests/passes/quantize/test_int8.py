"""int8 static (QDQ) and dynamic: structure and weights, numerics in ONNX Runtime, the integer
kernels ONNX Runtime really picks, activation x activation MatMuls, dead channels."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from quantize_graphs import (
    FLOAT_MATMULS,
    attention_block,
    conv_mlp,
    data_for,
    matmul_model,
    ops,
    optimized_ops,
    rel_l2,
)

from onnxcomp import runtime
from onnxcomp.model import Model
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import int8 as quantize_int8
from onnxcomp.pipeline import Context

run = quantize.PASS.run


def test_int8_static_structure_and_weights(tmp_path):
    model = conv_mlp()
    # u8s8_remedy = u8u8: the round-to-nearest grid kept (test_widen.py: widened scales)
    result, record = run(model, quantize.Config(u8s8_remedy="u8u8"),
                         Context(calibration=data_for(model)))
    assert record.modified and sorted(record.touched) == ["conv1", "conv2", "gemm", "mm"]
    counts = {op: ops(result).count(op) for op in set(ops(result))}
    # activations: x, r1 (conv2 input), rs (mm input), mm2d (gemm-as-matmul input), plus the
    # outputs of both MatMuls that feed a bias Add: one pair each
    assert counts["QuantizeLinear"] == 6
    assert counts["DequantizeLinear"] == 6 + 4  # + one per weight
    assert "Gemm" not in counts  # rewritten as MatMul + Add
    inits = {t.name: numpy_helper.to_array(t) for t in result.graph.initializer}
    originals = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    axes = {}
    for node in result.graph.node:
        stored = inits.get(node.input[0], np.zeros(1))
        if node.op_type == "DequantizeLinear" and stored.dtype in (np.int8, np.uint8) \
                and stored.ndim > 1:
            q, scale = inits[node.input[0]], inits[node.input[1]]
            if q.dtype == np.uint8:  # u8s8_overflow: the same int8 levels, stored + 128
                assert np.all(inits[node.input[2]] == 128)
                q = q.astype(np.int16) - 128
            axis = next(a.i for a in node.attribute if a.name == "axis")
            shape = [1] * q.ndim
            shape[axis] = -1
            dequantized = q.astype(np.float32) * scale.reshape(shape)
            source = node.input[0].rsplit("_int8", 1)[0]
            original = originals.get(source)
            if original is None:  # the Gemm's weight, transposed into the MatMul
                original = originals["G"].T
            assert np.all(np.abs(dequantized - original) <= scale.reshape(shape) / 2 + 1e-7)
            assert np.abs(q).max() == 127  # symmetric, full range
            axes[source] = axis
    assert axes["W1"] == 0 and axes["W2"] == 0 and axes["M"] == 1
    onnx.checker.check_model(result.proto)
    # The input model is untouched.
    assert "QuantizeLinear" not in ops(model)


def test_int8_static_numerics_in_ort():
    model = conv_mlp()
    data = data_for(model, 6)
    result, record = run(model, quantize.Config(calibration="minmax"),
                                  Context(calibration=data))
    # Each uint8/int8 rounding adds <= half a step (1/510 of the range for activations, 1/254 of
    # max|w| for weights); four layers of such noise stay a few percent of the output norm.
    for batch in data:
        ref = runtime.run_model(model, batch)["y"]
        cand = runtime.run_model(result, batch)["y"]
        assert rel_l2(ref, cand) < 0.03
    sqnr = record.details["sqnr"]
    assert [e["sqnr_db"] for e in sqnr] == sorted(e["sqnr_db"] for e in sqnr)
    assert {e["node"] for e in sqnr} == {"conv1", "conv2", "mm", "gemm"}
    assert all(e["sqnr_db"] > 20 for e in sqnr)
    assert record.details["output_cosine"]["y"] > 0.999


def test_int8_static_gives_integer_kernels_in_ort(tmp_path):
    model = conv_mlp()
    result, _ = run(model, quantize.Config(), Context(calibration=data_for(model)))
    kernels = optimized_ops(result, tmp_path)
    assert kernels.count("QLinearConv") == 2
    integer_matmuls = [k for k in kernels if k in ("QLinearMatMul", "MatMulIntegerToFloat")]
    assert len(integer_matmuls) == 2
    assert not {"Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul"} & set(kernels)


def test_activation_matmuls_become_qlinearmatmul(tmp_path):
    model = attention_block()
    data = data_for(model, 6)
    plain, record = run(model, quantize.Config(), Context(calibration=data))
    assert "activation_matmuls = false" in dict(record.skipped)["scores"]
    assert sum(k in FLOAT_MATMULS for k in optimized_ops(plain, tmp_path)) == 2
    config = quantize.Config(activation_matmuls=True)
    result, record = run(model, config, Context(calibration=data))
    assert set(record.touched) == {"q_proj", "k_proj", "v_proj", "scores", "context", "out_proj"}
    assert "  MatMul scores (activation x activation)" in record.details["plan"]
    producers = {o: n for n in result.graph.node for o in n.output}
    consumers = {i: n for n in result.graph.node for i in n.input}
    nodes = {n.name: n for n in result.graph.node}
    for name in ("scores", "context"):  # both inputs read through their own calibrated QDQ pair
        dequantized = [producers[i] for i in nodes[name].input]
        assert [n.op_type for n in dequantized] == ["DequantizeLinear"] * 2
        assert all(producers[n.input[0]].op_type == "QuantizeLinear" for n in dequantized)
    # the scores go into a Softmax: a Q after them, or ONNX Runtime keeps a float MatMul
    assert consumers["scores"].op_type == "QuantizeLinear"
    kernels = optimized_ops(result, tmp_path)
    # q/k/v projections and both attention MatMuls; out_proj feeds the graph output (float)
    assert kernels.count("QLinearMatMul") == 5 and kernels.count("MatMulIntegerToFloat") == 1
    assert not FLOAT_MATMULS & set(kernels)


def test_activation_matmuls_numerics_in_ort():
    model = attention_block()
    data = data_for(model, 6)
    result, record = run(model, quantize.Config(activation_matmuls=True),
                                  Context(calibration=data))
    for batch in data:
        as_written = runtime.run_model(result, batch)["y"]  # Q/DQ run as float reference ops
        kernels = runtime.run_model(result, batch, optimize=True)["y"]  # QLinearMatMul
        # ONNX Runtime's integer kernels compute what the QDQ graph says: float rounding only
        # (measured ~1e-7)
        assert rel_l2(as_written, kernels) < 1e-5
        # uint8/int8 half-step roundings on every MatMul input, the scores' output pair and
        # through the softmax: a few percent of the output norm (measured 0.02-0.05; the
        # default, with float attention, 0.06 on this random model)
        assert rel_l2(runtime.run_model(model, batch)["y"], kernels) < 0.08
    assert record.details["output_cosine"]["y"] > 0.995


def test_activation_matmul_alone_and_other_modes(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [3, 4]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, [4, 5])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    data = data_for(model)
    result, record = run(model, quantize.Config(), Context(calibration=data))
    assert not record.modified and result is model  # the default leaves it float
    result, record = run(model, quantize.Config(activation_matmuls=True),
                                  Context(calibration=data))
    assert record.touched == ["mm"] and ops(result).count("QuantizeLinear") == 2  # a and b
    # y is a graph output (no pair after it): a float-output integer kernel
    assert optimized_ops(result, tmp_path) == ["QuantizeLinear"] * 2 + ["MatMulIntegerToFloat"]
    for mode in ("int8-dynamic", "int4"):  # weight-only modes: nothing to put there
        _, record = run(attention_block(), quantize.Config(
            mode=mode, activation_matmuls=True), Context())
        assert f"{mode} quantizes weights only" in dict(record.skipped)["scores"]
        assert "scores" not in record.touched and "q_proj" in record.touched
    with pytest.raises(ValueError):
        quantize.Config(activation_matmuls="yes")


def test_dead_weight_channels_get_no_subnormal_scale():
    # Trained nets have dead channels (PP-OCRv4 rec: max |w| ~1e-40). A subnormal scale made
    # ONNX Runtime's QLinearConv 1.9x slower there; such a channel is stored as zeros, scale 1.
    weight = np.random.default_rng(0).standard_normal((6, 5)).astype(np.float32)
    weight[:, 1] = np.float32(3e-40)
    weight[:, 3] = 0.0
    weight[2, 4] = np.float32(1e-30)  # one tiny value in a live channel changes nothing
    q, scale = quantize_int8.symmetric_int8(weight, 1)
    assert scale[1] == 1.0 and scale[3] == 1.0 and not q[:, [1, 3]].any()
    assert np.all(scale >= np.finfo(np.float32).tiny)
    assert np.all(np.abs(quantize_int8.dequantize(q, scale, 1) - weight) <= scale / 2 + 1e-7)
    q, scale = quantize_int8.symmetric_int8(np.full((3, 3), 1e-39, np.float32), None)
    assert float(scale) == 1.0 and not q.any()
    # through the pass: a Conv with a dead output channel keeps every scale normal
    model = conv_mlp()
    inits = {t.name: t for t in model.graph.initializer}
    w1 = numpy_helper.to_array(inits["W1"]).copy()
    w1[3] = np.float32(2e-40)
    inits["W1"].CopyFrom(numpy_helper.from_array(w1, "W1"))
    result, _ = run(model, quantize.Config(), Context(calibration=data_for(model)))
    floats = [numpy_helper.to_array(t) for t in result.graph.initializer
              if t.data_type == TensorProto.FLOAT]
    assert all(np.all((np.abs(v) >= np.finfo(np.float32).tiny) | (v == 0)) for v in floats
               if v.size and v.ndim <= 1)


def test_int8_dynamic_fuses_and_matches(tmp_path):
    model = matmul_model()
    result, record = run(model, quantize.Config(mode="int8-dynamic"),
                                  Context(calibration=data_for(model)))
    assert sorted(record.touched) == ["mm1", "mm2"]
    assert ops(result).count("MatMulInteger") == 2
    kernels = optimized_ops(result, tmp_path)
    # one run-time quantization of the shared input, then integer MatMuls with float output
    fused = [k for k in kernels if k in ("DynamicQuantizeMatMul", "MatMulIntegerToFloat")]
    assert len(fused) == 2 and "MatMul" not in kernels and "MatMulInteger" not in kernels
    batch = next(iter(data_for(model)))
    ref, cand = runtime.run_model(model, batch), runtime.run_model(result, batch)
    assert rel_l2(ref["y"], cand["y"]) < 0.02  # one uint8 activation + int8 weight rounding
    assert result.weight_bytes() < 0.3 * model.weight_bytes()


def test_int8_dynamic_conv_is_warned():
    model = conv_mlp()
    config = quantize.Config(mode="int8-dynamic", op_types=("Conv",))
    result, record = run(model, config, Context())
    assert ops(result).count("ConvInteger") == 2
    assert any("Conv" in note and "slower" in note for note in record.notes)
    batch = next(iter(data_for(model)))
    assert rel_l2(runtime.run_model(model, batch)["y"], runtime.run_model(result, batch)["y"]) < 0.05


@pytest.mark.zoo
def test_ppocr_rec_int8_keeps_recognition(tmp_path):
    zoo = pytest.importorskip("onnxcomp.zoo.ppocr")
    del zoo
    from onnxcomp import zoo as zoo_index
    from onnxcomp.model import load

    model = load(zoo_index.fetch("ppocr-rec"))
    data = zoo_index.dataset("ppocr-rec", "calib", 4)
    result, record = run(model, quantize.Config(), Context(calibration=data))
    # static int8 on PP-OCR is lossy for every quantizer (ORT's own: char accuracy -2.6 points)
    assert record.details["output_cosine"]["softmax_11.tmp_0"] > 0.9
    assert result.weight_bytes() < 0.3 * model.weight_bytes()
    kernels = optimized_ops(result, tmp_path)
    assert kernels.count("QLinearConv") == 38 and "Conv" not in kernels


@pytest.mark.zoo
def test_ppocr_rec_activation_matmuls(tmp_path):
    pytest.importorskip("onnxcomp.zoo.ppocr")
    from onnxcomp import zoo as zoo_index
    from onnxcomp.model import load

    model = load(zoo_index.fetch("ppocr-rec"))
    data = zoo_index.dataset("ppocr-rec", "calib", 4)
    result, record = run(model, quantize.Config(activation_matmuls=True),
                                  Context(calibration=data))
    # the 4 attention MatMuls (scores and context of both blocks) join the 9 weighted ones,
    # as in ONNX Runtime's own static quantization of this model; the weighted ones feed bias
    # Adds on dynamic 3-D inputs (typed once the model is at opset 14), so they run as
    # MatMulIntegerToFloat without an output QDQ
    kernels = optimized_ops(result, tmp_path)
    assert kernels.count("QLinearMatMul") == 4 and kernels.count("MatMulIntegerToFloat") == 9
    assert not FLOAT_MATMULS & set(kernels)
    assert record.details["output_cosine"]["softmax_11.tmp_0"] > 0.9


def test_a_weight_with_absurd_outliers_stays_float_with_the_reason():
    """Found by fuzzing: a flipped exponent bit (1.4e37 in a 16x32 weight) made int8-dynamic
    round the rest of that channel to zero (cosine 0.78, exit 0). Such layers stay float."""
    from onnxcomp.passes.quantize.match import extreme_outliers

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((16, 32)).astype(np.float32)
    assert extreme_outliers(weight) is None
    weight[3, 5] = 1.4e37
    assert "too extreme" in extreme_outliers(weight)
    weight[3, 5] = np.inf
    assert "NaN or Inf" in extreme_outliers(weight)
    assert extreme_outliers(np.zeros((4, 4), np.float32)) is None


def test_conv_only_output_qdq_leaves_matmuls_feeding_a_bias_add_without_one():
    """output_qdq = conv-only: Conv outputs keep their QDQ, weight MatMuls get none (MiniLM:
    cosine 0.947 -> 0.994 at the same speed, docs/quantize.md)."""
    from builders import attention_block

    from onnxcomp import calibration

    model = attention_block()
    data = calibration.random_data(model, 4)
    plan = quantize.PASS.plan(model, quantize.Config(output_qdq="conv-only"),
                              Context(calibration=data))
    weight_matmuls = [s for s in plan.payload.sites.sites
                      if s.op == "MatMul" and s.weight_input is not None]
    assert weight_matmuls and not any(s.output_qdq for s in weight_matmuls)
    default = quantize.PASS.plan(model, quantize.Config(), Context(calibration=data))
    assert any(s.output_qdq for s in default.payload.sites.sites if s.op == "MatMul")
    result, record = quantize.PASS.run(model, quantize.Config(output_qdq="conv-only"),
                                       Context(calibration=data))
    assert record.modified
    for batch in data:
        want = runtime.run_model(model, batch)
        got = runtime.run_model(result, batch)
        for name in want:
            a, b = want[name].ravel(), got[name].ravel()
            assert float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) > 0.98


def _matmul_bias(shape) -> Model:
    """x (``shape``, last dim 72) -> MatMul W[72, 24] -> Add b -> y."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["m"], name="mm"),
         helper.make_node("Add", ["m", "b"], ["y"], name="add")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(rng.standard_normal((72, 24)).astype(np.float32), "W"),
         numpy_helper.from_array(rng.standard_normal(24).astype(np.float32), "b")])
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


@pytest.mark.parametrize("shape, needs_output_qdq", [
    ([10, 72], True), (["n", 72], True), ([2, 5, 72], True), (["b", "s", 72], False),
    ([1, "s", 72], False)])
def test_a_matmul_bias_gets_an_output_qdq_only_where_ort_would_fuse_a_float_gemm(
        tmp_path, shape, needs_output_qdq):
    """2-D inputs and fully static N-D ones: without a Q after the MatMul ONNX Runtime fuses
    MatMul + Add into a float Gemm, so the output QDQ stays; a dynamic batch or sequence
    dimension keeps the integer kernel without it (and its fidelity cost: MiniLM)."""
    from onnxcomp import calibration

    model = _matmul_bias(shape)
    data = calibration.random_data(model, 2, dims={"n": 10, "b": 2, "s": 5})
    result, _ = run(model, quantize.Config(), Context(calibration=data))
    quantizers = [n for n in result.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantizers) == (2 if needs_output_qdq else 1)
    kernels = optimized_ops(result, tmp_path)
    assert "Gemm" not in kernels and ({"QLinearMatMul", "MatMulIntegerToFloat"} & set(kernels))
    # And what the rule predicts: without the output QDQ, ORT makes it a float Gemm there.
    bare, _ = run(model, quantize.Config(output_qdq="conv-only"), Context(calibration=data))
    assert ("Gemm" in optimized_ops(bare, tmp_path)) == needs_output_qdq
