"""``u8s8_overflow``: static int8 layers whose uint8 x int8 pair sums overflow int16 get uint8
weights with zero point 128 (``u8s8_remedy = u8u8``; the widened scales: test_widen.py). The rewrite is exact (same dequantized weights), ONNX Runtime still
fuses the layer into QLinearConv, a layer without overflowing pairs is left alone, and the
activations the check multiplies are the ones a Conv reads (checked against the convolution)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from quantize_graphs import bright_images as _bright_images
from quantize_graphs import dense_matmul, x86_without_vnni
from quantize_graphs import saturating_conv as _conv_model
from quantize_graphs import weight_dtypes as _dtypes
from quantize_graphs import weight_values as _weights

from onnxcomp import calibration, runtime
from onnxcomp.model import Model
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import overflow, pairsums
from onnxcomp.pipeline import Context


@pytest.fixture(scope="module")
def bright():
    # Every weight positive: every pair of neighbours along the reduction can overflow.
    weight = np.random.default_rng(1).uniform(0.5, 1.0, (4, 3, 3, 3))
    model, data = _conv_model(weight), _bright_images(3)
    # The uint8 remedy (test_widen.py has the default, widened scales).
    results = {choice: quantize.PASS.run(model.copy(), quantize.Config(
        mode="int8", u8s8_overflow=choice, u8s8_remedy="u8u8"), Context(calibration=data))
        for choice in ("auto", "none", "all")}
    return model, data, results


def test_an_overflowing_layer_gets_uint8_weights_with_the_same_values(bright):
    _, _, results = bright
    moved, record = results["auto"]
    plain, plain_record = results["none"]
    assert _dtypes(moved) == {TensorProto.UINT8, TensorProto.INT8}  # the head stays int8
    assert _dtypes(plain) == {TensorProto.INT8}
    note = next(n for n in record.notes if n.startswith("u8s8_overflow:"))
    assert note.endswith(": conv") and "1 layers' weights stored as uint8" in note
    [found] = record.details["u8s8_overflow"]  # the head has no risky pair: not listed
    assert found["node"] == "conv" and found["per_output"] >= overflow.RATE_LIMIT
    assert found["error_power"] >= overflow.HARM_LIMIT  # read from the layer's output
    assert found["worst_pair_sum"] > 1
    assert not any(n.startswith("u8s8_overflow:") for n in plain_record.notes)
    # Exact: the same dequantized weights, the same graph but for the weight's initializers.
    assert [w.tolist() for w in _weights(moved).values()] == \
           [w.tolist() for w in _weights(plain).values()]
    assert [n.op_type for n in moved.graph.node] == [n.op_type for n in plain.graph.node]
    # Idempotent: only the head is left to check, and it has nothing to move.
    assert [site.node for site in overflow.sites(moved.graph)] == ["head"]


def test_the_moved_layer_still_runs_as_an_integer_conv_and_matches_the_qdq_math(bright, tmp_path):
    model, data, results = bright
    moved = results["auto"][0]
    path = tmp_path / "optimized.onnx"
    runtime.session(moved, optimized_model_path=str(path))
    # The head's output has no pair (a model output): it runs float. The moved layer is fused
    # (ONNX Runtime's NHWC QLinearConv here, whose im2col order the check also covers).
    uint8_weight = next(t.name for t in moved.graph.initializer if t.name.endswith("_u8"))
    assert any(n.op_type == "QLinearConv" and uint8_weight in n.input
               for n in onnx.load(str(path)).graph.node)
    for batch in data:
        exact = runtime.run_model(moved, batch)["y"]       # QDQ math, optimizations off
        kernels = runtime.run_model(moved, batch, optimize=True)["y"]
        reference = runtime.run_model(model, batch)["y"]
        # The integer kernel (u8 x u8: no saturation on any x86 CPU) against its emulation:
        # the output requantization's rounding only.
        assert np.linalg.norm(kernels - exact) <= 0.02 * np.linalg.norm(exact)
        # As close to float as the emulation (the u8 x s8 kernel of the unmoved layer, on a
        # CPU without VNNI, is not: its pair sums saturate).
        assert np.linalg.norm(kernels - reference) <= \
            1.2 * np.linalg.norm(exact - reference) + 0.01 * np.linalg.norm(reference)


def test_all_moves_every_layer_and_none_leaves_them(bright):
    _, _, results = bright
    assert _dtypes(results["all"][0]) == {TensorProto.UINT8}  # the head too
    assert "every layer" in next(n for n in results["all"][1].notes
                                 if n.startswith("u8s8_overflow:"))
    assert "u8s8_overflow" not in results["none"][1].details


def test_a_layer_without_risky_pairs_is_left_int8():
    # One input channel, signs alternating over the 3x3 taps: no two neighbours share a sign.
    weight = np.where(np.arange(9).reshape(1, 1, 3, 3) % 2, -1.0, 1.0) * np.ones((2, 1, 3, 3))
    model = _conv_model(weight)
    result, record = quantize.PASS.run(model, quantize.Config(mode="int8"),
                                       Context(calibration=_bright_images(1)))
    assert _dtypes(result) == {TensorProto.INT8}
    assert not any(n.startswith("u8s8_overflow:") for n in record.notes)
    assert record.details.get("u8s8_overflow", []) == []


@pytest.mark.parametrize("order", ["nchw", "nhwc"])
def test_the_checked_activations_are_the_ones_the_conv_multiplies(order):
    """Summing column(k) * w[k] over the reduction gives the integer convolution itself."""
    rng = np.random.default_rng(2)
    values = rng.integers(0, 256, (2, 4, 9, 7)).astype(np.uint8)
    weight = rng.integers(-127, 128, (2, 2, 3, 2))  # group 2: two input channels, one output
    attrs = (("group", 2), ("kernel_shape", [3, 2]), ("strides", [2, 1]),
             ("dilations", [1, 2]), ("pads", [1, 0, 2, 1]))
    zero = 7
    site = overflow.Site("c", "Conv", "a", zero, "wd", "w", attrs, 2)
    padded = np.pad(values.astype(np.int64), [(0, 0), (0, 0), (1, 2), (0, 1)],
                    constant_values=zero)
    for group in range(2):
        w = weight[group:group + 1]
        flat = w.reshape(1, -1) if order == "nchw" else np.moveaxis(w, 1, -1).reshape(1, -1)
        total = sum(pairsums._column(site, order, group, k, values).astype(np.int64) * flat[0, k]
                    for k in range(flat.shape[1]))
        # The convolution of this group's two channels with w, by hand.
        x = padded[:, 2 * group:2 * group + 2]
        out_h = (x.shape[2] - 2 * 1 - 1) // 2 + 1
        out_w = (x.shape[3] - 1 * 2 - 1) // 1 + 1
        expected = np.zeros((2, out_h, out_w), np.int64)
        for c in range(2):
            for dy in range(3):
                for dx in range(2):
                    expected += w[0, c, dy, dx] * x[:, c, dy:dy + 2 * (out_h - 1) + 1:2,
                                                    2 * dx:2 * dx + out_w]
        assert total.tolist() == expected.reshape(-1).tolist()


def test_the_config_checks_the_choice():
    with pytest.raises(ValueError, match="u8s8_overflow"):
        quantize.Config(u8s8_overflow="sometimes")


@pytest.mark.skipif(not x86_without_vnni(), reason="needs an x86 CPU without VNNI, where "
                                                    "ONNX Runtime's u8 x s8 kernels saturate")
def test_without_vnni_the_int8_weights_saturate_and_the_uint8_ones_do_not(bright):
    """What the option is for, on a CPU that has the problem: the same layer with int8 weights
    runs far from its own QDQ math in ONNX Runtime's kernel (45 % measured on an AMD EPYC)."""
    _, data, results = bright
    batch = data.make_batch(0)
    for choice, limit in (("none", None), ("auto", 0.02)):
        model = results[choice][0]
        exact = runtime.run_model(model, batch)["y"]
        kernels = runtime.run_model(model, batch, optimize=True)["y"]
        off = np.linalg.norm(kernels - exact) / np.linalg.norm(exact)
        assert off <= limit if limit else off > 0.1


def test_without_data_the_expected_rate_is_that_of_uniform_uint8_inputs():
    """The data-free estimate against a brute-force count over every pair of uint8 inputs."""
    weights = np.array([[127, 127, 100, 40, -90, -80]], np.int8)  # one output channel
    site = overflow.Site("m", "MatMulInteger", "a", 0, "y#1", "w", (), 1)
    finding = overflow.Finding()
    pairsums.assume_uniform(site, pairsums.pair_plans(site, weights.T), finding)
    a = np.arange(256)
    expected = sum(float(np.mean(np.abs(a[:, None] * int(w1) + a[None, :] * int(w2))
                                 > pairsums.INT16_MAX))
                   for w1, w2 in ((127, 127), (100, 40), (-90, -80)))
    assert finding.assumed and finding.rate == pytest.approx(expected, rel=1e-12)
    assert finding.rate > 0.5  # (127, 127) alone overflows for about half of the inputs


def test_int8_dynamic_without_data_moves_weights_dense_at_the_top_of_the_range():
    """No calibration data: a MatMul whose weights sit near +-127 is moved on the uniform
    assumption, and the pass says the inputs were assumed."""
    rng = np.random.default_rng(4)
    model = dense_matmul(rng)
    result, record = quantize.PASS.run(model, quantize.Config(mode="int8-dynamic"), Context())
    assert any("uniform uint8 inputs assumed (no calibration data)" in n for n in record.notes)
    [found] = record.details["u8s8_overflow"]
    assert found["inputs"] == "assumed uniform" and found["per_output"] >= overflow.RATE_LIMIT
    matmul = next(n for n in result.graph.node if n.op_type == "MatMulInteger")
    inits = {t.name: numpy_helper.to_array(t) for t in result.graph.initializer}
    assert inits[matmul.input[1]].dtype == np.uint8 and inits[matmul.input[3]] == 128
    x = {"x": rng.uniform(-1, 1, (4, 32)).astype(np.float32)}
    got = runtime.run_model(result, x, optimize=True)["y"]
    want = runtime.run_model(model, x)["y"]
    assert np.linalg.norm(got - want) <= 0.02 * np.linalg.norm(want)


@pytest.mark.parametrize("bias_shape", [[4], [1, 4], [2, 4], []])
def test_a_gemm_bias_of_any_broadcast_shape_is_taken_out_of_the_accumulator(bias_shape):
    rng = np.random.default_rng(5)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "c"], ["y"], name="gemm", transB=1)], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        [numpy_helper.from_array(rng.uniform(0.5, 1, (4, 8)).astype(np.float32), "w"),
         numpy_helper.from_array(rng.standard_normal(bias_shape).astype(np.float32), "c")])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    data = calibration.from_batches([{"x": rng.uniform(0, 1, (2, 8)).astype(np.float32)}
                                     for _ in range(4)])
    _, record = quantize.PASS.run(model, quantize.Config(), Context(calibration=data))
    [found] = record.details["u8s8_overflow"]  # positive weights, inputs near the top: overflow
    assert found["node"] == "gemm" and found["error_power"] > 0
