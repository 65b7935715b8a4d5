"""LSTM/GRU/RNN weights in the quantize pass (issue #17): int8-dynamic turns an LSTM into ONNX
Runtime's DynamicQuantizeLSTM; every other case stores W and R as int8 rows behind Cast -> Mul
(folded by ONNX Runtime at load: float compute). Checked structurally and in ONNX Runtime against the float
model, with shared weights, weights computed inside If bodies, and the negatives."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import calibration, runtime
from onnxcomp.errors import UserError
from onnxcomp.graph import import_graph, proto_scopes
from onnxcomp.model import Model
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import recurrent
from onnxcomp.pipeline import SKIP, Context

run = quantize.PASS.run
SEQ, BATCH, INPUT, HIDDEN = 7, 3, 6, 8


def _weights(op: str, directions: int, rng: np.random.Generator, bias: bool, tag: str = ""
             ) -> list[onnx.TensorProto]:
    gates = recurrent.GATES[op]
    # Rows of different magnitude, as trained gates have: per-row scales matter.
    row_scale = rng.uniform(0.1, 1.0, (directions, gates * HIDDEN, 1)).astype(np.float32)
    w = rng.standard_normal((directions, gates * HIDDEN, INPUT)).astype(np.float32) * row_scale
    r = rng.standard_normal((directions, gates * HIDDEN, HIDDEN)).astype(np.float32) * row_scale
    tensors = [numpy_helper.from_array(w, f"W{tag}"), numpy_helper.from_array(r, f"R{tag}")]
    if bias:
        b = rng.standard_normal((directions, 2 * gates * HIDDEN)).astype(np.float32) * 0.1
        tensors.append(numpy_helper.from_array(b, f"B{tag}"))
    return tensors


def _out(name: str, rank: int) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT,
                                         [f"{name}_{i}" for i in range(rank)])


def _model(nodes, inits, inputs, outputs, opset: int = 17) -> Model:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]))


def rnn_model(op: str = "LSTM", direction: str = "forward", bias: bool = True,
              lengths: bool = False, layout: int = 0, opset: int = 17, seed: int = 0) -> Model:
    """x -> one LSTM/GRU/RNN layer -> Y and Y_h (graph outputs)."""
    rng = np.random.default_rng(seed)
    directions = 2 if direction == "bidirectional" else 1
    inits = _weights(op, directions, rng, bias)
    inputs = [helper.make_tensor_value_info(
        "x", TensorProto.FLOAT, [BATCH, SEQ, INPUT] if layout else [SEQ, BATCH, INPUT])]
    names = ["x", "W", "R", "B" if bias else ""]
    if lengths:
        inputs.append(helper.make_tensor_value_info("lens", TensorProto.INT32, [BATCH]))
        names.append("lens")
    attrs = {"hidden_size": HIDDEN, "direction": direction}
    if layout:
        attrs["layout"] = layout
    node = helper.make_node(op, names, ["y", "y_h"], name="rnn", **attrs)
    outputs = [_out("y", 4), _out("y_h", 3)]
    return _model([node], inits, inputs, outputs, opset)


def _feeds(model: Model, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in model.graph.input:
        dims = [d.dim_value for d in value.type.tensor_type.shape.dim]
        if value.type.tensor_type.elem_type == TensorProto.INT32:
            feeds[value.name] = np.array([SEQ, SEQ - 2, 3][:dims[0]], np.int32)
        elif value.type.tensor_type.elem_type == TensorProto.BOOL:
            continue
        else:
            feeds[value.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _ops(model: Model) -> list[str]:
    return [n.op_type for body, _ in proto_scopes(model.graph) for n in body.node]


def _initializers(model: Model) -> list[onnx.TensorProto]:
    return [t for body, _ in proto_scopes(model.graph) for t in body.initializer]


def _int8_weights(model: Model) -> list[onnx.TensorProto]:
    """The 8-bit initializers that hold weights (not zero points): int8, or uint8 + 128 where
    the u8s8_overflow check moved them."""
    return [t for t in _initializers(model)
            if t.data_type in (TensorProto.INT8, TensorProto.UINT8)
            and "zero_point" not in t.name and "zp128" not in t.name]


def _float_matrices(model: Model) -> list[str]:
    """Float initializers shaped like a W or R (their last dim the input or hidden size)."""
    return [t.name for t in _initializers(model) if t.data_type == TensorProto.FLOAT
            and len(t.dims) >= 2 and t.dims[-1] in (INPUT, HIDDEN)]


def _row_dequantized(w: np.ndarray) -> np.ndarray:
    """The weight as the rewrite stores it: int8, one symmetric scale per direction and row."""
    scale = np.abs(w).max(axis=-1, keepdims=True) / 127
    return np.clip(np.round(w / scale), -127, 127) * scale


def _with_weights(model: Model, transform) -> Model:
    """``model`` with every float W/R initializer replaced by ``transform(values)``."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    for body, _ in proto_scopes(proto.graph):
        for i, tensor in enumerate(body.initializer):
            if tensor.name[:1] in ("W", "R") and tensor.data_type == TensorProto.FLOAT:
                values = transform(numpy_helper.to_array(tensor))
                body.initializer[i].CopyFrom(numpy_helper.from_array(values, tensor.name))
    return Model(proto)


def _max_error(a: Model, b: Model, feeds: dict) -> float:
    left, right = runtime.run_model(a, feeds), runtime.run_model(b, feeds)
    return max(float(np.abs(left[k] - right[k]).max()) for k in left)


CASES = [{"direction": "forward"}, {"direction": "bidirectional"}, {"direction": "reverse"},
         {"bias": False}, {"lengths": True}, {"direction": "bidirectional", "lengths": True}]


@pytest.mark.parametrize("case", CASES)
def test_int8_dynamic_lstm_becomes_dynamic_quantize_lstm_and_stays_close(case):
    model = rnn_model(**case)
    out, record = run(model, quantize.Config(mode="int8-dynamic"), Context())
    assert record.touched == ["rnn"]
    onnx.checker.check_model(out.proto)
    ops = _ops(out)
    assert "DynamicQuantizeLSTM" in ops and "LSTM" not in ops
    node = next(n for n in out.graph.node if n.op_type == "DynamicQuantizeLSTM")
    assert node.domain == "com.microsoft" and node.name == "rnn"
    kinds = {t.name: t.data_type for t in _initializers(out)}
    weights = {kinds[node.input[1]], kinds[node.input[2]]}
    # int8, or uint8 with zero point 128 (same levels) where the weights' pairs can overflow
    # ONNX Runtime's u8 x s8 kernel on x86 CPUs without VNNI (u8s8_overflow)
    assert weights in ({TensorProto.INT8}, {TensorProto.UINT8})
    if weights == {TensorProto.UINT8}:
        zeros = {t.name: numpy_helper.to_array(t) for t in _initializers(out)}
        assert np.all(zeros[node.input[9]] == 128) and np.all(zeros[node.input[11]] == 128)
    assert TensorProto.FLOAT not in {kinds.get("W"), kinds.get("R")}  # no float copy left
    # Against float with the same int8 weights, what is left is the kernel's run-time uint8
    # quantization of X and h at each step: one step of 1/255 of their range (<= ~0.01 for
    # inputs in +-3 and h in (-1, 1)), compounded over 7 steps. Measured max 0.015.
    feeds = _feeds(model)
    assert _max_error(_with_weights(model, _row_dequantized), out, feeds) < 0.04
    # Against the float model.
    assert _max_error(model, out, feeds) < 0.05  # the weights' rounding on top: max 0.016


# An eligible LSTM under int8-dynamic becomes DynamicQuantizeLSTM (tested above).
WEIGHT_ONLY = [(mode, op, case) for mode in ("int8", "int4", "int8-dynamic")
               for op, case in (("LSTM", {}), ("GRU", {"direction": "bidirectional"}),
                                ("GRU", {"lengths": True, "bias": False}), ("RNN", {}))
               if (mode, op) != ("int8-dynamic", "LSTM")]


@pytest.mark.parametrize("mode, op, case", WEIGHT_ONLY)
def test_weight_only_is_float_compute_on_dequantized_int8_rows(mode, op, case):
    """Static int8, int4, GRU and RNN: W and R stored int8 behind Cast -> Mul; the float layer
    then computes exactly as it would on the dequantized weights (1e-5: only float summation
    order differs)."""
    model = rnn_model(op, **case)
    ctx = Context(calibration=calibration.from_batches([_feeds(model, seed) for seed in (2, 3)]))
    out, record = run(model, quantize.Config(mode=mode), ctx)
    assert record.touched == ["rnn"]
    onnx.checker.check_model(out.proto)
    ops = _ops(out)
    assert op in ops and ops.count("Cast") == ops.count("Mul") == 2
    assert "DynamicQuantizeLSTM" not in ops and "DequantizeLinear" not in ops
    assert not _float_matrices(out)  # W and R are int8 now, one byte an element
    w_r = sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.name in ("W", "R"))
    assert sum(int(np.prod(t.dims)) for t in _int8_weights(out)) == w_r
    feeds = _feeds(model)
    assert _max_error(_with_weights(model, _row_dequantized), out, feeds) < 1e-5


def test_a_batch_first_lstm_is_weight_only_under_int8_dynamic():
    """DynamicQuantizeLSTM has no layout attribute: a layout-1 LSTM keeps its float compute
    (ONNX Runtime's CPU LSTM refuses layout 1 too, so this is checked structurally)."""
    model = rnn_model(layout=1)
    out, record = run(model, quantize.Config(mode="int8-dynamic"), Context())
    assert record.touched == ["rnn"]
    onnx.checker.check_model(out.proto)
    assert "LSTM" in _ops(out) and _ops(out).count("Cast") == 2
    assert any("not DynamicQuantizeLSTM: rnn (layout = 1, which the contrib op lacks)" in note
               for note in record.notes)


def test_plan_rows_and_notes_say_what_each_layer_gets():
    model = rnn_model()
    before = model.proto.SerializeToString()
    dynamic = quantize.PASS.plan(model, quantize.Config(mode="int8-dynamic"), Context())
    assert model.proto.SerializeToString() == before  # the dry run is pure
    assert [(r.node, r.action) for r in dynamic.rows] == [
        ("rnn", "int8-dynamic DynamicQuantizeLSTM (W, R per gate row)")]
    assert any("DynamicQuantizeLSTM (ONNX Runtime only" in note for note in dynamic.notes)
    four = quantize.PASS.plan(model, quantize.Config(mode="int4"), Context())
    assert four.rows[0].action.startswith("int8 weight-only W, R per gate row")
    assert any("int4 keeps recurrent weights at 8 bits" in note for note in four.notes)
    assert any("the compute stays float" in note for note in four.notes)


@pytest.mark.parametrize("op, mode", [("GRU", "int4"), ("LSTM", "int8-dynamic")])
def test_old_opsets_need_no_upgrade_for_recurrent_weights(op, mode):
    """Cast -> Mul and the contrib op take any opset (from 7, LSTM's first version); what the
    mode raises it to for its other ops (10, 11) is enough."""
    model = rnn_model(op, opset=7)
    out, record = run(model, quantize.Config(mode=mode), Context())
    assert record.touched == ["rnn"] and out.opset() <= 11
    onnx.checker.check_model(out.proto)
    assert _max_error(_with_weights(model, _row_dequantized), out, _feeds(model)) < 0.04


def test_onnx_runtime_folds_the_weight_only_form_into_a_plain_float_layer(tmp_path):
    """No per-run dequantization: the optimized session graph is the float one."""
    import onnxruntime as ort

    out, _ = run(rnn_model("GRU"), quantize.Config(mode="int4"), Context())
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(out.proto.SerializeToString(), options,
                         providers=["CPUExecutionProvider"])
    assert [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node] == ["GRU"]


def test_static_int8_with_a_matmul_after_the_lstm():
    """The LSTM is weight-only; the MatMul reading its output gets its QDQ pairs as usual."""
    model = rnn_model()
    head = numpy_helper.from_array(
        np.random.default_rng(5).standard_normal((HIDDEN, 4)).astype(np.float32), "head")
    proto = model.proto
    proto.graph.initializer.append(head)
    proto.graph.node.append(helper.make_node("MatMul", ["y", "head"], ["z"], name="mm"))
    proto.graph.output.append(_out("z", 4))
    data = calibration.from_batches([_feeds(model, seed) for seed in range(2, 6)])
    out, record = run(model, quantize.Config(), Context(calibration=data))
    assert sorted(record.touched) == ["mm", "rnn"]
    assert _ops(out).count("DequantizeLinear") == 2  # the MatMul's input and weight
    assert _ops(out).count("Cast") == 2  # the LSTM's W and R
    # The LSTM's output measured like any site's (44 dB here; the MatMul after it 39 dB).
    assert {row["node"] for row in record.details["sqnr"]} == {"mm", "rnn"}
    # z reaches 1.8; its uint8 input and output steps are ~1/100 of that (measured max 0.024).
    assert _max_error(model, out, _feeds(model)) < 0.06


def _two_lstms_sharing() -> Model:
    """Two LSTM layers reading the same W and R (and B): a model that ties its layers."""
    rng = np.random.default_rng(0)
    inits = _weights("LSTM", 1, rng, True)
    proj = numpy_helper.from_array(np.eye(HIDDEN, INPUT, dtype=np.float32), "proj")
    nodes = [helper.make_node("LSTM", ["x", "W", "R", "B"], ["y1"], name="first",
                              hidden_size=HIDDEN),
             helper.make_node("Squeeze", ["y1", "axis1"], ["s1"], name="squeeze"),
             helper.make_node("MatMul", ["s1", "proj"], ["p1"], name="to_input"),
             helper.make_node("LSTM", ["p1", "W", "R", "B"], ["y", "y_h"], name="second",
                              hidden_size=HIDDEN)]
    inits += [proj, numpy_helper.from_array(np.array([1], np.int64), "axis1")]
    return _model(nodes, inits,
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQ, BATCH, INPUT])],
                  [_out("y", 4), _out("y_h", 3)])


@pytest.mark.parametrize("mode", ["int8-dynamic", "int4"])
def test_a_shared_recurrent_weight_is_quantized_once(mode):
    model = _two_lstms_sharing()
    out, record = run(model, quantize.Config(mode=mode, op_types=("LSTM",)), Context())
    assert sorted(record.touched) == ["first", "second"]
    assert len(_int8_weights(out)) == 2  # one W, one R, read by both layers
    if mode == "int4":
        assert _ops(out).count("Cast") == 2  # one per weight, in one scope
    assert _max_error(model, out, _feeds(model)) < 0.02  # measured 0.004 / 0.006


def _if_model(computed: bool) -> Model:
    """An If whose two branches each run an LSTM on the outer x. ``computed``: each branch
    builds W and R from the outer trained tensors with Slice/Concat/Unsqueeze (PyTorch's gate
    reorder, as silero-vad's exports write it) instead of reading constants."""
    rng = np.random.default_rng(3)
    w, r, b = (numpy_helper.to_array(t) for t in _weights("LSTM", 1, rng, True))
    outer = [numpy_helper.from_array(w[0], "W_trained"), numpy_helper.from_array(r[0], "R_trained"),
             numpy_helper.from_array(b, "B")]

    def branch(tag: str) -> onnx.GraphProto:
        nodes, inits = [], []
        names = []
        for label in ("W", "R"):
            if not computed:
                names.append(f"{label}_trained_3d")
                continue
            parts = []
            for k, (start, end) in enumerate(((0, HIDDEN), (3 * HIDDEN, 4 * HIDDEN),
                                              (HIDDEN, 3 * HIDDEN))):
                s, e = f"{tag}{label}_s{k}", f"{tag}{label}_e{k}"
                inits += [numpy_helper.from_array(np.array([start], np.int64), s),
                          numpy_helper.from_array(np.array([end], np.int64), e)]
                nodes.append(helper.make_node("Slice", [f"{label}_trained", s, e, "zero"],
                                              [f"{tag}{label}_p{k}"], name=f"{tag}{label}_sl{k}"))
                parts.append(f"{tag}{label}_p{k}")
            nodes += [helper.make_node("Concat", parts, [f"{tag}{label}_c"], axis=0,
                                       name=f"{tag}{label}_cat"),
                      helper.make_node("Unsqueeze", [f"{tag}{label}_c", "zero"],
                                       [f"{tag}{label}_3d"], name=f"{tag}{label}_unsq")]
            names.append(f"{tag}{label}_3d")
        nodes.append(helper.make_node("LSTM", ["x", *names, "B"], [f"{tag}y", f"{tag}h"],
                                      name=f"{tag}lstm", hidden_size=HIDDEN))
        nodes.append(helper.make_node("Identity", [f"{tag}h"], [f"{tag}out"], name=f"{tag}id"))
        return helper.make_graph(nodes, tag, [], [_out(f"{tag}out", 3)], inits)

    outer += [numpy_helper.from_array(np.array([0], np.int64), "zero")]
    if not computed:
        outer += [numpy_helper.from_array(w, "W_trained_3d"), numpy_helper.from_array(r, "R_trained_3d")]
    node = helper.make_node("If", ["cond"], ["h"], name="if", then_branch=branch("then_"),
                            else_branch=branch("else_"))
    return _model([node], outer,
                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [SEQ, BATCH, INPUT]),
                   helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                  [_out("h", 3)])


@pytest.mark.parametrize("computed", [False, True])
@pytest.mark.parametrize("mode", ["int8-dynamic", "int4", "int8"])
def test_lstms_inside_if_branches_are_quantized_once_and_run_for_both_conditions(mode, computed):
    model = _if_model(computed)
    feeds = _feeds(model)
    ctx = Context(calibration=calibration.from_batches([{**feeds, "cond": np.array(True)}]))
    out, record = run(model, quantize.Config(mode=mode), ctx)
    assert sorted(record.touched) == ["else_lstm", "then_lstm"]
    onnx.checker.check_model(out.proto)
    kernel = "DynamicQuantizeLSTM" if mode == "int8-dynamic" else "Cast"
    for attr in next(n for n in out.graph.node if n.op_type == "If").attribute:
        assert kernel in [n.op_type for n in attr.g.node]  # both branches quantized
    assert len(_int8_weights(out)) == 2  # W and R once: both branches read the same values
    assert not _float_matrices(out)  # the float W and R (and what they were computed from) gone
    bound = 0.01 if mode == "int8-dynamic" else 0.006  # measured 0.0034 / 0.002
    for cond in (True, False):
        both = {**feeds, "cond": np.array(cond)}
        assert _max_error(model, out, both) < bound


@pytest.mark.parametrize("mode", ["int8-dynamic", "int4"])
def test_the_same_model_twice_and_a_second_run_changes_nothing(mode):
    model = rnn_model(direction="bidirectional")
    once, first = run(model, quantize.Config(mode=mode), Context())
    again, second = run(model, quantize.Config(mode=mode), Context())
    assert once.proto.SerializeToString() == again.proto.SerializeToString()
    assert first.touched == second.touched == ["rnn"]
    if mode == "int8-dynamic":  # a quantized op: quantizing again is a user mistake
        with pytest.raises(UserError, match="already quantized"):
            run(once, quantize.Config(mode=mode), Context())
        return
    # Weight-only: the layer's weights are computed (Cast -> Mul) now, so nothing is left.
    twice, third = run(once, quantize.Config(mode=mode), Context())
    assert not third.modified and twice is once
    assert dict(third.skipped)["rnn"].startswith("W is computed by Mul")


def test_nothing_to_do_weights_from_inputs_excluded_or_op_types_without_them():
    # W fed at run time: skipped with the reason, the model returned as it was.
    proto = rnn_model().proto
    w = next(t for t in proto.graph.initializer if t.name == "W")
    proto.graph.input.append(helper.make_tensor_value_info("W", TensorProto.FLOAT, list(w.dims)))
    proto.graph.initializer.remove(w)
    model = Model(proto)
    out, record = run(model, quantize.Config(mode="int8-dynamic"), Context())
    assert not record.modified and out is model
    assert dict(record.skipped)["rnn"] == "W is not a constant (a graph input)"
    assert any(note.startswith("nothing to quantize") for note in record.notes)
    for config in (quantize.Config(mode="int4", exclude=("LSTM",)),
                   quantize.Config(mode="int4", op_types=("MatMul",))):
        plain = rnn_model()
        out, record = run(plain, config, Context())
        assert not record.modified and out is plain


def test_conv_only_model_says_which_mode_would_quantize_it():
    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    node = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    model = _model([node], [weight],
                   [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                   [_out("y", 4)])
    for mode in ("int8-dynamic", "int4"):
        _, record = run(model, quantize.Config(mode=mode), Context())
        note = next(n for n in record.notes if n.startswith("nothing to quantize"))
        assert "quantizes MatMul/Gemm/LSTM/GRU/RNN weights only" in note
        assert "this model's compute is Conv (1): use quantize:int8" in note
    assert SKIP == "skip"


def test_fold_reads_the_value_moving_ops_like_onnx():
    """The folder against ONNX Runtime on a chain of every op it folds."""
    data = np.arange(2 * 6 * 4, dtype=np.float32).reshape(2, 6, 4)
    consts = {"data": data, "starts": np.array([1], np.int64), "ends": np.array([5], np.int64),
              "axes": np.array([1], np.int64), "steps": np.array([2], np.int64),
              "shape": np.array([0, -1], np.int64), "idx": np.array([1, 0], np.int64),
              "zero": np.array([0], np.int64)}
    nodes = [helper.make_node("Slice", ["data", "starts", "ends", "axes", "steps"], ["a"]),
             helper.make_node("Transpose", ["a"], ["b"], perm=[0, 2, 1]),
             helper.make_node("Reshape", ["b", "shape"], ["c"]),
             helper.make_node("Gather", ["c", "idx"], ["d"], axis=0),
             helper.make_node("Concat", ["d", "d"], ["e"], axis=1),
             helper.make_node("Unsqueeze", ["e", "zero"], ["f"]),
             helper.make_node("Squeeze", ["f", "zero"], ["g"]),
             helper.make_node("Cast", ["g"], ["h"], to=TensorProto.FLOAT),
             helper.make_node("Identity", ["h"], ["y"])]
    for i, node in enumerate(nodes):
        node.name = f"n{i}"
    model = _model(nodes, [numpy_helper.from_array(v, k) for k, v in consts.items()], [],
                   [_out("y", 2)])
    expected = runtime.run_model(model, {})["y"]
    graph = import_graph(model)
    folded = recurrent.weight_value(graph.outputs[0])
    np.testing.assert_array_equal(folded, expected)
