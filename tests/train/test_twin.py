"""The twin: equal to ONNX Runtime, weights as parameters, write-back that changes only weight
values."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")

from train.twin_graphs import matmul_nbits, small_cnn, with_ops

from onnxcomp import runtime, zoo
from onnxcomp.errors import UserError
from onnxcomp.model import Model, load
from onnxcomp.train import Twin, unsupported_ops
from onnxcomp.train.twin import FLOAT_TYPES

# The bar: the twin's outputs equal ONNX Runtime's (CPU, no graph optimizations) within
# a relative error of 1e-4 of the output's largest magnitude.
MAX_RELATIVE_ERROR = 1e-4


def relative_errors(twin: Twin, model: Model, feeds: dict) -> dict[str, float]:
    reference = runtime.run_model(model, feeds)
    with torch.no_grad():
        got = twin(feeds)
    return {name: float(np.abs(got[name].numpy().astype(np.float64) - ref).max()
                        / max(float(np.abs(ref).max()), 1e-12))
            for name, ref in reference.items()}


def float_weights(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    """Every float tensor stored in the graph: initializers and Constant-node values."""
    tensors = [t for t in proto.graph.initializer if t.data_type in FLOAT_TYPES]
    for node in proto.graph.node:
        if node.op_type == "Constant":
            tensors += [a.t for a in node.attribute
                        if a.name == "value" and a.t.data_type in FLOAT_TYPES]
    return tensors


def without_weight_values(proto: onnx.ModelProto) -> bytes:
    """The model's bytes with every float weight's values blanked (names, types, dims kept)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    for tensor in float_weights(copy):
        for field in ("raw_data", "float_data", "double_data", "int32_data"):
            copy_field = getattr(tensor, field)
            if field == "raw_data":
                tensor.raw_data = b""
            else:
                del copy_field[:]
    return copy.SerializeToString(deterministic=True)


def one_step(twin: Twin, feeds: dict, lr: float = 1e-2) -> None:
    optimizer = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=lr)
    loss = sum((out.float() ** 2).mean() for out in twin(feeds).values())
    loss.backward()
    optimizer.step()


@pytest.fixture
def cnn() -> Model:
    return small_cnn()


@pytest.fixture
def cnn_feeds() -> dict:
    return {"x": np.random.default_rng(1).standard_normal((2, 3, 8, 8)).astype(np.float32)}


# --- forward equals ONNX Runtime -----------------------------------------------------------------


def test_small_graph_matches_onnx_runtime(cnn, cnn_feeds):
    errors = relative_errors(Twin(cnn), cnn, cnn_feeds)
    assert max(errors.values()) <= 1e-6, errors


def test_tiny_clip_matches_onnx_runtime():
    model = load(zoo.fetch("tiny-clip"))
    feeds = next(iter(zoo.dataset("tiny-clip", "eval", 4)))
    errors = relative_errors(Twin(model), model, feeds)
    assert max(errors.values()) <= MAX_RELATIVE_ERROR, errors


def _small_zoo_feeds(name: str) -> dict:
    feeds = next(iter(zoo.dataset(name, "eval", 1)))
    if name == "ppocr-det":  # 640x640 -> 160x160 (a multiple of 32, text still visible)
        feeds = {"x": np.ascontiguousarray(feeds["x"][:, :, ::4, ::4])}
    return feeds


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["ppocr-rec", "ppocr-det", "minilm"])
def test_zoo_model_matches_onnx_runtime(name):
    model = load(zoo.fetch(name))
    errors = relative_errors(Twin(model), model, _small_zoo_feeds(name))
    assert max(errors.values()) <= MAX_RELATIVE_ERROR, errors


def test_matmul_nbits_matches_onnx_runtime():
    a = {"A": np.random.default_rng(2).standard_normal((2, 40)).astype(np.float32)}
    for zero_points in (True, False):
        model = matmul_nbits(zero_points=zero_points)
        errors = relative_errors(Twin(model), model, a)
        assert max(errors.values()) <= 1e-5, (zero_points, errors)


def test_intermediate_tensors_by_name(cnn, cnn_feeds):
    twin = Twin(cnn, extra_outputs=["r"])
    out = twin(cnn_feeds)
    assert set(out) == {"y", "r"} and tuple(out["r"].shape) == (2, 4, 8, 8)
    reference = runtime.run(runtime.session(cnn, optimize=False), cnn_feeds)["y"]
    np.testing.assert_allclose(twin.run(cnn_feeds, ["y"])["y"].detach().numpy(), reference,
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(UserError, match="no tensor named 'nope'"):
        twin.run(cnn_feeds, ["nope"])


# --- parameters ----------------------------------------------------------------------------------


def _elements(tensors) -> int:
    return sum(int(np.prod(t.dims)) if len(t.dims) else 1 for t in tensors)


@pytest.mark.parametrize("source", ["small", "tiny-clip"])
def test_every_float_weight_is_a_parameter_and_trains(source):
    model = small_cnn() if source == "small" else load(zoo.fetch("tiny-clip"))
    weights = float_weights(model.proto)
    twin = Twin(model)
    assert sum(p.numel() for p in twin.parameters()) == _elements(weights)
    # Default: everything of 2+ elements trains; one-element formula constants stay frozen.
    trainable = sum(p.numel() for p in twin.parameters() if p.requires_grad)
    assert trainable == _elements(t for t in weights if _elements([t]) > 1)
    everything = Twin(model, trainable={t.name or "" for t in weights} | {
        n.output[0] for n in model.graph.node if n.op_type == "Constant"} & {
        name for name, _ in twin.named_weights()})
    assert sum(p.numel() for p in everything.parameters() if p.requires_grad) == _elements(weights)
    assert not list(twin.buffers()) or all(not b.is_floating_point() for b in twin.buffers())


def test_constant_node_weights_are_parameters_keyed_by_onnx_name(cnn):
    twin = Twin(cnn)
    assert twin.parameter("conv.weight").shape == (4, 3, 3, 3)
    assert twin.parameter("conv.weight").requires_grad
    assert not twin.parameter("out.scale").requires_grad
    key = next(k for k in twin.weights if twin.onnx_name(k) == "fc.weight")
    assert "." not in key


def test_gradients_reach_every_trainable_weight(cnn, cnn_feeds):
    twin = Twin(cnn)
    sum(out.sum() for out in twin(cnn_feeds).values()).backward()
    missing = [name for name, p in twin.named_weights() if p.requires_grad and p.grad is None]
    assert not missing


def _conv_bn(variance: float) -> Model:
    """x[B,2,4,4] -> Conv(2->2, 1x1) -> BatchNormalization (channel 0's variance given) -> y."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in (
        ("w", rng.standard_normal((2, 2, 1, 1))), ("gamma", np.ones(2)), ("beta", np.zeros(2)),
        ("mean", np.zeros(2)), ("var", np.array([variance, 1.0])))]
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"]),
         helper.make_node("BatchNormalization", ["c", "gamma", "beta", "mean", "var"], ["y"])],
        "conv_bn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 2, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 2, 4, 4])], inits)
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_batchnorm_statistics_stay_frozen_so_a_tiny_variance_never_goes_negative():
    # PP-OCR rec's first BatchNormalization holds a variance of 1.1e-4: with the statistics
    # trainable, AdamW (steps of ~lr each) pushed it below zero within five steps and
    # sqrt(var + eps) made the QAT loss NaN.
    model = _conv_bn(1e-4)
    twin = Twin(model)
    assert {n for n, p in twin.named_weights() if p.requires_grad} == {"w", "gamma", "beta"}
    optimizer = torch.optim.AdamW([p for p in twin.parameters() if p.requires_grad], lr=1e-3)
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 2, 4, 4)).astype(np.float32)}
    for _ in range(10):
        optimizer.zero_grad()
        out = twin(feeds)["y"]
        assert torch.isfinite(out).all()
        # Larger outputs want a smaller variance: with it trainable this made it -9e-4 in one
        # step and every output NaN from the second.
        (-out[:, 0].abs().mean()).backward()
        optimizer.step()
    assert float(twin.parameter("var")[0]) == pytest.approx(1e-4)
    # Named explicitly, they still train (the caller's choice).
    assert Twin(model, trainable={"var"}).parameter("var").requires_grad


def test_trainable_names_are_checked(cnn):
    only = Twin(cnn, trainable={"fc.weight"})
    assert [n for n, p in only.named_weights() if p.requires_grad] == ["fc.weight"]
    with pytest.raises(UserError, match="flat_shape"):
        Twin(cnn, trainable={"flat_shape"})


# --- write-back ----------------------------------------------------------------------------------


@pytest.mark.parametrize("source", ["small", "tiny-clip"])
def test_untrained_write_back_is_bit_identical(source):
    model = small_cnn() if source == "small" else load(zoo.fetch("tiny-clip"))
    written = Twin(model).write_back(model)
    assert written.proto.SerializeToString() == model.proto.SerializeToString()
    assert written.proto is not model.proto


@pytest.mark.zoo
def test_untrained_write_back_of_constant_node_weights_is_bit_identical():
    model = load(zoo.fetch("ppocr-rec"))
    assert Twin(model).write_back(model).proto.SerializeToString() == \
        model.proto.SerializeToString()


def test_one_step_changes_only_weight_values(cnn, cnn_feeds):
    twin = Twin(cnn)
    one_step(twin, cnn_feeds)
    written = twin.write_back(cnn)
    assert without_weight_values(written.proto) == without_weight_values(cnn.proto)
    before, after = float_weights(cnn.proto), float_weights(written.proto)
    assert [(t.name, t.data_type, list(t.dims)) for t in before] == \
        [(t.name, t.data_type, list(t.dims)) for t in after]
    changed = {t.name for t, u in zip(before, after)
               if t.SerializeToString() != u.SerializeToString()}
    assert changed == {name for name, p in twin.named_weights() if p.requires_grad}
    # Each tensor keeps its storage field (typed float_data stays typed).
    typed = next(t for t in after if t.name == "fc.weight")
    assert len(typed.float_data) == 256 * 5 and not typed.raw_data
    # The written model computes what the trained twin computes.
    errors = relative_errors(twin, written, cnn_feeds)
    assert max(errors.values()) <= 1e-6, errors
    onnx.checker.check_model(written.proto)


def test_one_step_on_tiny_clip_changes_only_initializer_values():
    model = load(zoo.fetch("tiny-clip"))
    feeds = next(iter(zoo.dataset("tiny-clip", "eval", 2)))
    twin = Twin(model)
    one_step(twin, feeds)
    written = twin.write_back(model)
    assert without_weight_values(written.proto) == without_weight_values(model.proto)
    assert [t.name for t in written.graph.initializer] == [t.name for t in model.graph.initializer]
    assert max(relative_errors(twin, written, feeds).values()) <= MAX_RELATIVE_ERROR


def test_write_back_refuses_another_model(cnn):
    with pytest.raises(UserError, match="not the model of this twin"):
        Twin(cnn).write_back(with_ops("Relu"))


# --- refusals ------------------------------------------------------------------------------------


def test_unsupported_ops_are_named_before_anything_runs():
    model = with_ops("Relu", "LSTM", "Det")
    assert unsupported_ops(model) == ["Det", "LSTM"]
    assert unsupported_ops(small_cnn()) == []
    with pytest.raises(UserError, match="unsupported op\\(s\\) Det, LSTM"):
        Twin(model)


def test_bad_feeds_are_user_errors(cnn, cnn_feeds):
    twin = Twin(cnn)
    with pytest.raises(UserError, match="missing input 'x'"):
        twin({})
    with pytest.raises(UserError, match="float64"):
        twin(x=cnn_feeds["x"].astype(np.float64))
    with pytest.raises(UserError, match="shape"):
        twin(x=cnn_feeds["x"][:, :2])
    with pytest.raises(UserError, match="no input named 'z'"):
        twin(cnn_feeds, z=cnn_feeds["x"])


def test_weights_still_on_disk_are_read_and_written_back(cnn, cnn_feeds, tmp_path):
    cnn.save(tmp_path / "m.onnx", external_data=True)
    lazy = load(tmp_path / "m.onnx", load_weights=False)
    assert lazy.lazy
    twin = Twin(lazy)
    assert twin.write_back(lazy).proto.SerializeToString() == lazy.proto.SerializeToString()
    one_step(twin, cnn_feeds)
    written = twin.write_back(lazy)
    assert not written.lazy  # changed weights come back inline; save moves them out again
    assert max(relative_errors(twin, written, cnn_feeds).values()) <= 1e-6
