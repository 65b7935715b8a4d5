"""The quantize pass: plan/placement, calibration statistics against numpy, int8 static/dynamic
and int4 numerics in ONNX Runtime, the integer kernels ONNX Runtime really picks, refusals."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import calibration, runtime
from onnxcomp.errors import OnnxcompError
from onnxcomp.graph import export_model, import_graph, tidy
from onnxcomp.model import Model
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import calib as quantize_calib
from onnxcomp.passes.quantize import int4 as quantize_int4
from onnxcomp.passes.quantize import int8 as quantize_int8
from onnxcomp.passes.quantize import smooth as quantize_smooth
from onnxcomp.pipeline import Context


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def conv_mlp(opset: int = 13, constant_nodes: bool = False) -> Model:
    """x[1,3,8,8] -> Conv+bias -> Relu -> Conv -> Reshape -> MatMul -> Add -> Gemm(transB)."""
    rng = np.random.default_rng(0)
    weights = {
        "W1": rng.standard_normal((8, 3, 3, 3)).astype(np.float32) * 0.3,
        "b1": rng.standard_normal(8).astype(np.float32),
        "W2": rng.standard_normal((8, 8, 3, 3)).astype(np.float32) * 0.2,
        "M": rng.standard_normal((64, 16)).astype(np.float32) * 0.1,
        "mb": rng.standard_normal(16).astype(np.float32) * 0.1,
        "G": rng.standard_normal((10, 16)).astype(np.float32) * 0.2,
        "gb": rng.standard_normal(10).astype(np.float32) * 0.1,
    }
    shapes = {"shp": np.array([1, 8, 64], np.int64), "shp2": np.array([8, 16], np.int64)}
    nodes = [
        helper.make_node("Conv", ["x", "W1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "W2"], ["c2"], pads=[1, 1, 1, 1], name="conv2"),
        helper.make_node("Reshape", ["c2", "shp"], ["rs"], name="reshape"),
        helper.make_node("MatMul", ["rs", "M"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "mb"], ["mma"], name="mm_bias"),
        helper.make_node("Reshape", ["mma", "shp2"], ["mm2d"], name="reshape2"),
        helper.make_node("Gemm", ["mm2d", "G", "gb"], ["y"], transB=1, name="gemm"),
    ]
    initializers = [_init(k, v) for k, v in shapes.items()]
    if constant_nodes:
        nodes = [helper.make_node("Constant", [], [k], value=_init(k, v), name=f"const_{k}")
                 for k, v in weights.items()] + nodes
    else:
        initializers += [_init(k, v) for k, v in weights.items()]
    graph = helper.make_graph(nodes, "conv_mlp",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 10])],
                              initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    onnx.checker.check_model(model)
    return Model(model)


def matmul_model(k: int = 72, n: int = 24, ln: bool = False) -> Model:
    """x[2,5,K] (-> LayerNorm) -> MatMul W[K,N] -> y, and a second MatMul on the same input."""
    rng = np.random.default_rng(1)
    inits = [_init("W", rng.standard_normal((k, n)).astype(np.float32) * 0.2),
             _init("W2", rng.standard_normal((k, n)).astype(np.float32) * 0.2)]
    nodes, source = [], "x"
    if ln:
        inits += [_init("gamma", (1 + rng.random(k)).astype(np.float32)),
                  _init("beta", rng.standard_normal(k).astype(np.float32) * 0.1)]
        nodes.append(helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"],
                                      axis=-1, name="ln"))
        source = "h"
    nodes += [helper.make_node("MatMul", [source, "W"], ["y"], name="mm1"),
              helper.make_node("MatMul", [source, "W2"], ["y2"], name="mm2")]
    graph = helper.make_graph(
        nodes, "mm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, n]),
         helper.make_tensor_value_info("y2", TensorProto.FLOAT, [2, 5, n])], inits)
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def data_for(model: Model, count: int = 4, scale: float = 1.0) -> calibration.Dataset:
    base = calibration.random_data(model, count)
    return calibration.from_batches(
        [{k: (v * scale).astype(v.dtype) for k, v in batch.items()} for batch in base])


def ops(model: Model) -> list[str]:
    return [n.op_type for n in model.graph.node]


def optimized_ops(model: Model, tmp_path) -> list[str]:
    path = tmp_path / "optimized.onnx"
    runtime.session(model, optimize=True, optimized_model_path=str(path))
    return [n.op_type for n in onnx.load(str(path)).graph.node]


def rel_l2(ref: np.ndarray, cand: np.ndarray) -> float:
    return float(np.linalg.norm(ref - cand) / np.linalg.norm(ref))


# --- config -------------------------------------------------------------------------------------

def test_config_validates_itself():
    assert quantize.Config.from_short("int4").mode == "int4"
    assert quantize.Config.from_short(None).mode == "int8"
    assert quantize.Config(mode="int8-dynamic").ops == ("MatMul", "Gemm")
    assert quantize.Config(exclude=["a*", "Gemm"]).exclude == ("a*", "Gemm")  # TOML lists
    for bad in ({"mode": "int3"}, {"calibration": "magic"}, {"block_size": 48},
                {"int4_format": "gguf"}, {"min_cosine": 2.0}, {"smoothquant_alpha": 1.5},
                {"percentile": 20.0}, {"activation_dtype": "int16"}, {"output_qdq": "some"}):
        with pytest.raises(ValueError):
            quantize.Config(**bad)
    with pytest.raises(ValueError):
        quantize.Config.from_short("fp8")


# --- int8 static --------------------------------------------------------------------------------

def test_int8_static_structure_and_weights(tmp_path):
    model = conv_mlp()
    result, record = quantize.run(model, quantize.Config(), Context(calibration=data_for(model)))
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
        if node.op_type == "DequantizeLinear" and inits.get(node.input[0], np.zeros(1)).dtype == np.int8:
            q, scale = inits[node.input[0]], inits[node.input[1]]
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
    result, record = quantize.run(model, quantize.Config(calibration="minmax"),
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
    result, _ = quantize.run(model, quantize.Config(), Context(calibration=data_for(model)))
    kernels = optimized_ops(result, tmp_path)
    assert kernels.count("QLinearConv") == 2
    integer_matmuls = [k for k in kernels if k in ("QLinearMatMul", "MatMulIntegerToFloat")]
    assert len(integer_matmuls) == 2
    assert not {"Conv", "MatMul", "Gemm", "FusedConv", "FusedMatMul"} & set(kernels)


def test_int8_static_needs_calibration_and_matching_data():
    model = conv_mlp()
    with pytest.raises(OnnxcompError, match="calibration data"):
        quantize.run(model, quantize.Config(), Context())
    wrong = calibration.from_batches([{"x": np.zeros((1, 3, 9, 9), np.float32)}])
    with pytest.raises(OnnxcompError):
        quantize.run(model, quantize.Config(), Context(calibration=wrong))


def test_refuses_already_quantized_model():
    model = conv_mlp()
    ctx = Context(calibration=data_for(model))
    result, _ = quantize.run(model, quantize.Config(), ctx)
    for mode in quantize.MODES:
        with pytest.raises(OnnxcompError, match="already quantized"):
            quantize.run(result, quantize.Config(mode=mode), ctx)


def test_nothing_to_quantize_is_not_modified():
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    result, record = quantize.run(model, quantize.Config(), Context(calibration=data_for(model)))
    assert not record.modified and result is model
    assert any("nothing to quantize" in note for note in record.notes)


def test_exclude_and_skip_reasons():
    model = conv_mlp()
    config = quantize.Config(exclude=("conv2", "Gemm"), output_qdq="none")
    result, record = quantize.run(model, config, Context(calibration=data_for(model)))
    assert sorted(record.touched) == ["conv1", "mm"]
    reasons = dict(record.skipped)
    assert "excluded" in reasons["conv2"] and "excluded" in reasons["gemm"]
    assert ops(result).count("Gemm") == 1


def test_opset12_constant_weights_are_upgraded_and_lifted():
    model = conv_mlp(opset=12, constant_nodes=True)
    result, record = quantize.run(model, quantize.Config(), Context(calibration=data_for(model)))
    assert result.opset() == 13
    assert any("opset from 12 to 13" in note for note in record.notes)
    assert any("lifted" in note for note in record.notes)
    assert ops(result).count("QuantizeLinear") == 6
    runtime.session(result)  # ONNX Runtime loads per-channel DQ at opset 13


def test_subgraph_weights_are_noted():
    inner = helper.make_graph(
        [helper.make_node("MatMul", ["x", "Wi"], ["yi"], name="inner_mm")], "body", [],
        [helper.make_tensor_value_info("yi", TensorProto.FLOAT, [1, 4])],
        [_init("Wi", np.ones((4, 4), np.float32))])
    graph = helper.make_graph(
        [helper.make_node("If", ["cond"], ["y"], then_branch=inner, else_branch=inner, name="if")],
        "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
              helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    _, record = quantize.run(model, quantize.Config(mode="int8-dynamic"), Context())
    assert not record.modified
    assert any("If/Loop" in note for note in record.notes)


# --- activation x activation MatMuls (attention) ------------------------------------------------

def attention_block(d: int = 32, s: int = 6) -> Model:
    """x[2,S,D] -> q/k/v projections -> MatMul(q, k^T) -> Softmax -> MatMul(., v) -> out_proj:
    two activation x activation MatMuls (``scores``, ``context``) among four weighted ones."""
    rng = np.random.default_rng(9)
    weights = {k: (rng.standard_normal((d, d)) / np.sqrt(d)).astype(np.float32)
               for k in ("Wq", "Wk", "Wv", "Wo")}
    nodes = [helper.make_node("MatMul", ["x", "Wq"], ["q"], name="q_proj"),
             helper.make_node("MatMul", ["x", "Wk"], ["k"], name="k_proj"),
             helper.make_node("MatMul", ["x", "Wv"], ["v"], name="v_proj"),
             helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 2, 1], name="k_t"),
             helper.make_node("MatMul", ["q", "kt"], ["scores"], name="scores"),
             helper.make_node("Softmax", ["scores"], ["probs"], axis=-1, name="softmax"),
             helper.make_node("MatMul", ["probs", "v"], ["context"], name="context"),
             helper.make_node("MatMul", ["context", "Wo"], ["y"], name="out_proj")]
    graph = helper.make_graph(
        nodes, "attention", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, s, d])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, s, d])],
        [_init(k, v) for k, v in weights.items()])
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


FLOAT_MATMULS = {"MatMul", "FusedMatMul"}


def test_activation_matmuls_become_qlinearmatmul(tmp_path):
    model = attention_block()
    data = data_for(model, 6)
    plain, record = quantize.run(model, quantize.Config(), Context(calibration=data))
    assert "activation_matmuls = false" in dict(record.skipped)["scores"]
    assert sum(k in FLOAT_MATMULS for k in optimized_ops(plain, tmp_path)) == 2
    config = quantize.Config(activation_matmuls=True)
    result, record = quantize.run(model, config, Context(calibration=data))
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
    result, record = quantize.run(model, quantize.Config(activation_matmuls=True),
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
    result, record = quantize.run(model, quantize.Config(), Context(calibration=data))
    assert not record.modified and result is model  # the default leaves it float
    result, record = quantize.run(model, quantize.Config(activation_matmuls=True),
                                  Context(calibration=data))
    assert record.touched == ["mm"] and ops(result).count("QuantizeLinear") == 2  # a and b
    # y is a graph output (no pair after it): a float-output integer kernel
    assert optimized_ops(result, tmp_path) == ["QuantizeLinear"] * 2 + ["MatMulIntegerToFloat"]
    for mode in ("int8-dynamic", "int4"):  # weight-only modes: nothing to put there
        _, record = quantize.run(attention_block(), quantize.Config(
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
    result, _ = quantize.run(model, quantize.Config(), Context(calibration=data_for(model)))
    floats = [numpy_helper.to_array(t) for t in result.graph.initializer
              if t.data_type == TensorProto.FLOAT]
    assert all(np.all((np.abs(v) >= np.finfo(np.float32).tiny) | (v == 0)) for v in floats
               if v.size and v.ndim <= 1)


# --- calibration statistics against numpy -------------------------------------------------------

def _batches():
    rng = np.random.default_rng(5)
    # growing ranges force the histogram to double its range twice
    return [rng.standard_normal(4000).astype(np.float32) * s + 0.3 for s in (0.5, 1.0, 2.5)]


def _stats(batches):
    stats = quantize_calib.TensorStats()
    for batch in batches:
        stats.update(batch)
    return stats


def test_streamed_histogram_equals_numpy_and_minmax_scale():
    batches = _batches()
    stats = _stats(batches)
    everything = np.concatenate(batches)
    assert stats.minimum == everything.min() and stats.maximum == everything.max()
    expected, _ = np.histogram(everything, bins=stats.bins, range=(-stats.bound, stats.bound))
    # rebinning by range doubling is exact up to values sitting on an edge
    assert np.abs(stats.counts - expected).sum() <= 4
    low, high = quantize_calib.tensor_range(stats, "minmax")
    scale, zp = quantize_calib.quant_params(low, high)
    assert scale == pytest.approx((everything.max() - everything.min()) / 255, rel=1e-6)
    assert zp == round(-everything.min() / scale)


def test_percentile_matches_numpy_within_a_bin():
    batches = _batches()
    stats = _stats(batches)
    everything = np.concatenate(batches)
    width = 2 * stats.bound / stats.bins
    low, high = quantize_calib.tensor_range(stats, "percentile", 99.0)
    assert abs(high - np.percentile(everything, 99.0)) <= width
    assert abs(low - np.percentile(everything, 1.0)) <= width


def _reference_kl_threshold(counts, bound, levels):
    """Straightforward TensorRT entropy calibration, written independently with loops."""
    width = bound / len(counts)
    last = max(i for i, c in enumerate(counts) if c) + 1
    best, best_kl = last, None
    for i in range(levels, last + 1):
        p = [float(c) for c in counts[:i]]
        p[-1] += float(sum(counts[i:]))
        edges = [int(j * i / levels) for j in range(levels + 1)]
        # array_split-style chunks: the first i % levels chunks are one longer
        sizes = [i // levels + (1 if j < i % levels else 0) for j in range(levels)]
        q, start = [0.0] * i, 0
        for size in sizes:
            chunk = range(start, start + size)
            nonzero = [j for j in chunk if counts[j] != 0]
            total = sum(float(counts[j]) for j in chunk)
            for j in nonzero:
                q[j] = total / len(nonzero)
            start += size
        del edges
        ps, qs = sum(p), sum(q)
        kl = 0.0
        for pj, qj in zip(p, q):
            if pj > 0:
                kl += (pj / ps) * np.log((pj / ps) / (qj / qs if qj > 0 else 1e-12))
        if best_kl is None or kl < best_kl:
            best, best_kl = i, kl
    return best * width


def test_entropy_threshold_matches_reference():
    rng = np.random.default_rng(2)
    values = np.abs(rng.laplace(size=20000)).astype(np.float32)
    counts, _ = np.histogram(values, bins=300, range=(0, values.max()))
    ours = quantize_calib.entropy_threshold(counts, float(values.max()), levels=32)
    assert ours == pytest.approx(_reference_kl_threshold(list(counts), float(values.max()), 32))
    assert ours < values.max()  # Laplace tails are clipped


def test_mse_range_minimizes_error_on_the_data():
    rng = np.random.default_rng(3)
    values = rng.laplace(size=20000).astype(np.float32)
    stats = _stats([values])
    low, high = quantize_calib.tensor_range(stats, "mse")

    def raw_mse(lo, hi):
        scale, zp = quantize_calib.quant_params(lo, hi)
        q = np.clip(np.round(values / scale) + zp, 0, 255)
        return float(np.mean(((q - zp) * scale - values) ** 2))

    best = min(raw_mse(c * values.min(), c * values.max()) for c in quantize_calib.MSE_GRID)
    assert raw_mse(low, high) <= best * 1.05
    assert raw_mse(low, high) < raw_mse(values.min(), values.max())


@pytest.mark.parametrize("method", quantize_calib.METHODS)
def test_every_calibration_method_runs(method):
    model = conv_mlp()
    _, record = quantize.run(model, quantize.Config(calibration=method),
                             Context(calibration=data_for(model)))
    # entropy clips the Gaussian test data hardest; every method stays close to float
    assert record.details["output_cosine"]["y"] > 0.95


# --- int8 dynamic -------------------------------------------------------------------------------

def test_int8_dynamic_fuses_and_matches(tmp_path):
    model = matmul_model()
    result, record = quantize.run(model, quantize.Config(mode="int8-dynamic"),
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
    result, record = quantize.run(model, config, Context())
    assert ops(result).count("ConvInteger") == 2
    assert any("Conv" in note and "slower" in note for note in record.notes)
    batch = next(iter(data_for(model)))
    assert rel_l2(runtime.run_model(model, batch)["y"], runtime.run_model(result, batch)["y"]) < 0.05


# --- int4 ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("symmetric", [True, False])
def test_matmulnbits_packing_is_exact(symmetric):
    model = matmul_model(k=72, n=24)  # K not a multiple of the block: padded
    config = quantize.Config(mode="int4", block_size=32, int4_symmetric=symmetric,
                             int4_scale="max")
    result, _ = quantize.run(model, config, Context())
    assert ops(result).count("MatMulNBits") == 2
    weight = numpy_helper.to_array(model.graph.initializer[0])
    blocks = quantize_int4.quantize_blocks(weight, 32, symmetric, "max")
    dequantized = blocks.dequantize()
    step = np.repeat(blocks.scales.T, 32, axis=0)[:72]
    assert np.all(np.abs(dequantized - weight) <= step / 2 + 1e-6)
    x = next(iter(data_for(model)))["x"]
    ours = x.astype(np.float64) @ dequantized.astype(np.float64)
    ort_y = runtime.run_model(result, {"x": x})["y"]
    np.testing.assert_allclose(ort_y, ours, rtol=1e-5, atol=1e-5)  # float rounding only
    # and against the float model: |x| . step/2 bounds the error of every output element
    bound = np.abs(x) @ (step / 2)
    float_y = runtime.run_model(model, {"x": x})["y"]
    assert np.all(np.abs(ort_y - float_y) <= bound + 1e-4)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("int4_format", ["matmulnbits", "qdq"])
def test_int4_mse_scales_beat_max_and_run_exactly(symmetric, int4_format):
    model = matmul_model(k=72, n=24)
    weight = numpy_helper.to_array(model.graph.initializer[0])
    positive = int4_format == "qdq"
    searched = quantize_int4.quantize_blocks(weight, 32, symmetric, "mse", positive=positive)
    plain = quantize_int4.quantize_blocks(weight, 32, symmetric, "max")
    # Never worse than the max rule, block by block (it is one of the candidates) ...
    def block_errors(blocks):
        error = np.square(blocks.dequantize() - weight)
        padded = np.zeros((96, weight.shape[1]))
        padded[:72] = error
        return padded.reshape(3, 32, -1).sum(axis=1)
    assert np.all(block_errors(searched) <= block_errors(plain) * (1 + 1e-5) + 1e-9)
    # ... and better overall on Gaussian weights (the reason it is the default): measured on a
    # 2048 x 512 Gaussian weight, 0.71x the squared error symmetric (signed scales), 0.80x with
    # positive scales, 0.96x asymmetric.
    ratio = block_errors(searched).sum() / block_errors(plain).sum()
    assert ratio < (0.9 if symmetric else 0.99)
    if positive:
        assert np.all(searched.scales > 0)
    config = quantize.Config(mode="int4", int4_symmetric=symmetric, int4_format=int4_format)
    result, _ = quantize.run(model, config, Context())
    x = next(iter(data_for(model)))["x"]
    want = x.astype(np.float64) @ searched.dequantize().astype(np.float64)
    np.testing.assert_allclose(runtime.run_model(result, {"x": x})["y"], want,
                               rtol=1e-5, atol=1e-5)


def test_int4_qdq_form_equals_matmulnbits(tmp_path):
    model = matmul_model(k=64, n=16)
    # The max rule gives both forms the same (positive) scales.
    nbits, _ = quantize.run(model, quantize.Config(mode="int4", int4_scale="max"), Context())
    qdq, record = quantize.run(model, quantize.Config(mode="int4", int4_format="qdq",
                                                      int4_scale="max"), Context())
    assert qdq.opset() == 21 and any("21" in note for note in record.notes)
    types = {t.name: t.data_type for t in qdq.graph.initializer}
    assert sum(1 for t in types.values() if t == TensorProto.INT4) == 2
    batch = next(iter(data_for(model)))
    np.testing.assert_allclose(runtime.run_model(qdq, batch)["y"],
                               runtime.run_model(nbits, batch)["y"], rtol=1e-5, atol=1e-5)
    assert optimized_ops(qdq, tmp_path).count("MatMulNBits") == 2
    assert nbits.weight_bytes() < 0.2 * model.weight_bytes()


# --- mixed precision, SmoothQuant ---------------------------------------------------------------

def test_min_cosine_keeps_worst_layers_float():
    model = conv_mlp()
    data = data_for(model)
    _, plain = quantize.run(model, quantize.Config(), Context(calibration=data))
    target = (1 + plain.details["output_cosine"]["y"]) / 2  # halfway to perfect
    _, record = quantize.run(model, quantize.Config(min_cosine=target),
                                  Context(calibration=data))
    kept = record.details["kept_float"]
    # Layers return to float in order of their own harm: the output cosine with only that
    # layer quantized, lowest first, measured for every quantized layer.
    sensitivity = record.details["sensitivity"]
    alone = [entry["output_cosine_alone"] for entry in sensitivity]
    assert alone == sorted(alone) and len(sensitivity) == len(plain.touched)
    assert kept and kept == [entry["node"] for entry in sensitivity[:len(kept)]]
    assert record.details["output_cosine_after"] >= target
    assert set(kept).isdisjoint(record.touched)
    assert any("kept float" in reason for _, reason in record.skipped)


def test_smoothquant_is_exact_in_float():
    model = matmul_model(ln=True)
    graph = import_graph(model)
    sites = quantize_smooth.find_sites(graph, {"mm1", "mm2"})
    assert len(sites) == 1 and set(sites[0].matmuls) == {"mm1", "mm2"}
    rng = np.random.default_rng(4)
    absmax = {sites[0].output: rng.random(72) * 10 + 0.1}
    quantize_smooth.apply(graph, sites, absmax, 0.5)
    smoothed = export_model(tidy(graph), like=model)
    batch = next(iter(data_for(model)))
    diff = runtime.max_abs_difference(model, smoothed, batch)
    assert max(diff.values()) < 1e-4
    _, record = quantize.run(model, quantize.Config(smoothquant_alpha=0.5),
                                  Context(calibration=data_for(model)))
    assert any("smoothquant" in note and "1 Layer" in note for note in record.notes)
    assert record.details["output_cosine"]["y"] > 0.99


def test_pipeline_recipe_form():
    from onnxcomp.recipe import parse_recipe

    (step,) = parse_recipe("quantize:int8-dynamic")
    assert dataclasses.asdict(step.config)["mode"] == "int8-dynamic"


@pytest.mark.zoo
def test_ppocr_rec_int8_keeps_recognition(tmp_path):
    zoo = pytest.importorskip("onnxcomp.zoo.ppocr")
    del zoo
    from onnxcomp import zoo as zoo_index
    from onnxcomp.model import load

    model = load(zoo_index.fetch("ppocr-rec"))
    data = zoo_index.dataset("ppocr-rec", "calib", 4)
    result, record = quantize.run(model, quantize.Config(), Context(calibration=data))
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
    result, record = quantize.run(model, quantize.Config(activation_matmuls=True),
                                  Context(calibration=data))
    # the 4 attention MatMuls (scores and context of both blocks) join the 9 weighted ones,
    # as in ONNX Runtime's own static quantization of this model
    kernels = optimized_ops(result, tmp_path)
    assert kernels.count("QLinearMatMul") == 13 and not FLOAT_MATMULS & set(kernels)
    assert record.details["output_cosine"]["softmax_11.tmp_0"] > 0.9


def test_near_zero_activation_ranges_get_a_normal_scale():
    scale, zero_point = quantize_calib.quant_params(0.0, 1e-39)
    assert scale == 1.0 and zero_point == 0
    scale, _ = quantize_calib.quant_params(-1.0, 1.0)
    assert abs(scale - 2.0 / 255) < 1e-9
