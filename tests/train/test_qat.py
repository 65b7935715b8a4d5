"""Quantization-aware training (onnxcomp.train.qat): fake quantization with the STE on the
graph's own scales; after training the same integer initializers hold the re-quantized
weights, and ONNX Runtime still fuses the graph into its integer kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from onnx import numpy_helper
from quantize_graphs import conv_mlp, data_for, matmul_model, optimized_ops

from onnxcomp import calibration, runtime
from onnxcomp.passes import distill, quantize
from onnxcomp.pipeline import Context, Pipeline, Step
from onnxcomp.train import kd, qat
from onnxcomp.train.twin import Twin

INTEGER_KERNELS = {"QLinearConv", "QLinearMatMul", "MatMulInteger", "MatMulIntegerToFloat",
                   "MatMulNBits", "DynamicQuantizeMatMul"}


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _quantized(model, config):
    data = data_for(model, 8)
    ctx = Context(calibration=data, teacher=model)
    student, _ = Pipeline([Step(quantize.PASS, config)]).run(model, ctx)
    return student, data


def _inits(model):
    return {t.name: t for t in model.graph.initializer}


def _skeleton(model):
    proto = model.copy().proto
    for tensor in proto.graph.initializer:
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
        tensor.ClearField("int32_data")
    return proto.SerializeToString()


CASES = {"int8": (conv_mlp, quantize.Config()),
         "int4-nbits": (lambda: matmul_model(k=64, n=16),
                        quantize.Config(mode="int4", int4_format="matmulnbits"))}


@pytest.mark.parametrize("case", list(CASES))
def test_fake_quant_twin_equals_ort_and_untrained_write_back_is_identical(case):
    build, config = CASES[case]
    student, data = _quantized(build(), config)
    twin = Twin(student)
    state = qat.prepare(twin, student)
    assert state.sites
    batch = next(iter(data))
    got = twin(batch)
    want = runtime.run_model(student, batch)
    for name, value in want.items():
        assert np.max(np.abs(got[name].detach().numpy() - value)) <= 1e-5 * np.abs(value).max()
    back = state.write_back(student)
    assert back.proto.SerializeToString() == student.proto.SerializeToString()


def test_gradients_reach_the_shadows_not_the_scales():
    student, data = _quantized(conv_mlp(), quantize.Config())
    twin = Twin(student)
    state = qat.prepare(twin, student)
    out = twin(next(iter(data)))["y"]
    out.square().sum().backward()
    assert all(twin.shadows[s.key].grad is not None and twin.shadows[s.key].grad.abs().sum() > 0
               for s in state.sites)
    scales = [n.input[1] for n in student.graph.node if n.op_type == "DequantizeLinear"]
    assert all(not twin.parameter(s).requires_grad for s in scales if s in twin._keys)


@pytest.mark.parametrize("case", list(CASES))
def test_qat_keeps_integer_kernels_names_dtypes_and_shapes(case, tmp_path):
    build, config = CASES[case]
    teacher = build()
    student, data = _quantized(teacher, config)
    before_kernels = optimized_ops(student, tmp_path)
    result = kd.train(teacher, student, data, kd.Options(steps=20, lr=3e-3, batch=0,
                                                         eval_every=5, patience=99))
    trained = result.model if result.trained else None
    # Train for certain (the gain check aside): write the shadows after 20 steps.
    twin = Twin(student)
    state = qat.prepare(twin, student)
    with torch.no_grad():
        for site in state.sites:
            shadow = twin.shadows[site.key]
            shadow.add_(0.3 * shadow.abs().mean() * torch.randn_like(shadow))
    moved = state.write_back(student)
    for model in [m for m in (trained, moved) if m is not None]:
        assert _skeleton(model) == _skeleton(student)  # the graph did not change
        assert [(t.name, t.data_type, list(t.dims)) for t in model.graph.initializer] == \
            [(t.name, t.data_type, list(t.dims)) for t in student.graph.initializer]
        assert optimized_ops(model, tmp_path) == before_kernels
        assert INTEGER_KERNELS & set(before_kernels)
    changed = [s.weight for s in state.sites
               if not np.array_equal(numpy_helper.to_array(_inits(moved)[s.weight]),
                                     numpy_helper.to_array(_inits(student)[s.weight]))]
    assert changed == [s.weight for s in state.sites]
    # The written integers are what the fake-quantized twin computed.
    batch = next(iter(data))
    want = twin(batch)
    got = runtime.run_model(moved, batch)
    for name, value in got.items():
        assert np.max(np.abs(want[name].detach().numpy() - value)) <= 1e-4 * np.abs(value).max()


def test_quantize_then_distill_kd_through_the_pass(tmp_path):
    teacher = conv_mlp()
    data = data_for(teacher, 8)
    held_out = calibration.from_batches(list(data_for(teacher, 3, scale=1.1)))
    ctx = Context(calibration=data, evaluation=held_out, teacher=teacher)
    steps = [Step(quantize.PASS, quantize.Config()),
             Step(distill.PASS, distill.Config(method="kd", steps=30, batch=0))]
    out, (_, repaired) = Pipeline(steps).run(teacher, ctx)
    details = repaired.details["kd"]
    assert details["qat_weights"] == 4 and details["qat_activations"] >= 4
    if repaired.modified:
        assert details["cosine_after"] > details["cosine_before"]
    assert optimized_ops(out, tmp_path).count("QLinearConv") == 2


# --- zero and subnormal scales -----------------------------------------------------------------


def test_fake_quant_of_a_zero_or_subnormal_scale_is_finite():
    # The quantize pass stores a dead channel's subnormal scale as 0: w / 0 was 0/0 = NaN, and a
    # subnormal scale gave w / s = inf, then inf - inf = NaN inside the STE.
    value = torch.tensor([[0.0, 0.5], [0.3, -0.2], [1.0, 2.0]], requires_grad=True)
    scale = torch.tensor([[0.0], [1e-45], [0.1]])
    out = qat.fake_quant(value, scale, 0.0, -127, 127)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(value.grad).all()
    assert out[0].abs().sum() == 0 and value.grad[0].abs().sum() == 0  # dead channel stays dead
    assert torch.allclose(out[2], torch.tensor([1.0, 2.0]))


def test_a_zero_scale_channel_trains_finite_and_keeps_its_integers():
    student, data = _quantized(conv_mlp(), quantize.Config())
    dq = next(n for n in student.graph.node if n.op_type == "DequantizeLinear"
              and numpy_helper.to_array(_inits(student)[n.input[1]]).size > 1)
    scales = numpy_helper.to_array(_inits(student)[dq.input[1]]).copy()
    scales[0] = 0.0
    _inits(student)[dq.input[1]].CopyFrom(numpy_helper.from_array(scales, dq.input[1]))
    stored = numpy_helper.to_array(_inits(student)[dq.input[0]]).copy()
    twin = Twin(student)
    state = qat.prepare(twin, student)
    optimizer = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-2)
    for batch in list(data)[:3]:
        optimizer.zero_grad()
        out = twin(batch)["y"]
        out.square().mean().backward()
        assert torch.isfinite(out).all()
        assert all(torch.isfinite(p.grad).all() for p in twin.parameters() if p.grad is not None)
        optimizer.step()
    back = numpy_helper.to_array(_inits(state.write_back(student))[dq.input[0]])
    assert np.array_equal(back[0], stored[0])  # the dead channel's integers as stored
    assert not np.array_equal(back[1:], stored[1:])  # the others trained


@pytest.mark.parametrize("zero", [0, 1, 3, 128])
def test_fake_quant_rounds_ties_like_onnx_quantize_linear(zero):
    """ONNX adds the zero point after rounding half to even: with an odd zero point, rounding
    ``x / s + z`` instead would move every exact tie to the other integer."""
    from onnx import TensorProto, helper

    from onnxcomp.model import Model

    values = np.array([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 3.5, 0.25, 7.0], np.float32)
    graph = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], "qdq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [values.size])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [values.size])],
        [numpy_helper.from_array(np.array(1.0, np.float32), "s"),
         numpy_helper.from_array(np.array(zero, np.uint8), "z")])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    want = runtime.run_model(model, {"x": values})["y"]
    got = qat.fake_quant(torch.from_numpy(values), 1.0, float(zero), 0, 255).numpy()
    np.testing.assert_array_equal(got, want)
