"""every_op: a fully quantized graph (QNN HTP's partition), every op reading DequantizeLinear;
value-moving ops share their input's range; numerically close to float in ONNX Runtime."""

from __future__ import annotations

import builders
import numpy as np
from onnx import numpy_helper

from onnxcomp import api, runtime, targets
from onnxcomp.passes.quantize import every_op


def _compress(model, *overrides):
    return api.compress(model, recipe="quantize:int8", calib="random:8", validate=False,
                        show_progress=False, overrides=["quantize.every_op=true", *overrides])


def _float_readers(model) -> list[str]:
    """Ops (not Q/DQ) that read a non-constant input not written by a DequantizeLinear."""
    graph = model.proto.graph
    inits = {t.name for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    inputs = {i.name for i in graph.input}
    found = []
    for node in graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear", "Constant", "Shape"):
            continue
        for name in node.input:
            if not name or name in inits:
                continue
            source = producers.get(name)
            if node.op_type in ("Relu", "Clip") and source is not None and \
                    source.op_type in ("Conv", "MatMul", "Gemm"):
                continue  # fused into the op before it; its pair is after it
            if source is None and name in inputs or source is not None and \
                    source.op_type not in ("DequantizeLinear", "Constant", "Shape"):
                found.append(f"{node.op_type} {node.name} <- {name}")
    return found


def test_every_op_reads_dequantize_linear():
    plain = _compress(builders.attention_block(), "quantize.every_op=false").model
    assert any("LayerNormalization" in f for f in _float_readers(plain))
    assert _float_readers(_compress(builders.attention_block()).model) == []
    conv = _compress(builders.conv_net()).model
    assert _float_readers(conv) == []
    assert targets.placement_findings(conv.proto, "qnn") == []


def test_the_qnn_target_sets_it_and_its_int8_stays_close_to_float():
    model = builders.attention_block()
    result = api.compress(model, recipe="quantize:int8", calib="random:8", validate=False,
                          show_progress=False, target="qnn").model
    # The SmoothQuant Muls added after planning read a pair too.
    assert _float_readers(result) == []
    findings = "\n".join(targets.placement_findings(result.proto, "qnn"))
    assert "reading float activations" not in findings
    x = {i.name: np.random.default_rng(0).standard_normal(
        [d.dim_value or 1 for d in i.type.tensor_type.shape.dim]).astype(np.float32)
        for i in model.proto.graph.input}
    want = runtime.session(model, optimize=False).run(None, x)[0]
    got = runtime.session(result, optimize=False).run(None, x)[0]
    cosine = float(np.dot(want.ravel(), got.ravel()) / np.linalg.norm(want) / np.linalg.norm(got))
    assert cosine > 0.99, cosine


def test_value_moving_ops_share_their_inputs_range():
    result = _compress(builders.attention_block()).model
    graph = result.proto.graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    pair = {n.input[0]: (float(inits[n.input[1]]), int(inits[n.input[2]]))
            for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] not in inits}
    producers = {o: n for n in graph.node for o in n.output}
    shared = 0
    for node in graph.node:
        if node.op_type not in every_op.VALUE_PRESERVING or node.output[0] not in pair:
            continue
        source = producers.get(node.input[0])
        if source is not None and source.op_type == "DequantizeLinear":
            quantized = producers[source.input[0]].input[0]
            assert pair[node.output[0]] == pair[quantized], node.name
            shared += 1
    assert shared >= 2


def test_off_by_default_and_the_plan_says_what_it_adds():
    model = builders.attention_block()
    plain = api.dry_run(model, "quantize:int8", "random:4")[0]
    every = api.dry_run(model, "quantize:int8", "random:4",
                        overrides=["quantize.every_op=true"])[0]
    assert len(every.rows) >= len(plain.rows)
    actions = {row.node: row.action for row in every.rows}
    plain_nodes = {row.node for row in plain.rows if row.action != "skip"}
    norms = [n.name for n in model.proto.graph.node if n.op_type == "LayerNormalization"]
    assert norms and not set(norms) & plain_nodes
    assert all(actions.get(n, "skip") != "skip" for n in norms), actions


def test_an_activation_gather_beside_an_int8_table():
    """A Gather over activations (a text tower's pooling) becomes an activation site; the
    embedding table's Gather stays the int8 table rewrite."""
    from onnx import TensorProto, helper

    from onnxcomp.model import Model

    rng = np.random.default_rng(0)
    table = numpy_helper.from_array(rng.standard_normal((4096, 8)).astype(np.float32), "table")
    weight = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    index = numpy_helper.from_array(np.array(2, np.int64), "last")
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], name="embed"),
             helper.make_node("MatMul", ["emb", "w"], ["h"], name="proj"),
             helper.make_node("Gather", ["h", "last"], ["pooled"], name="pool", axis=1),
             helper.make_node("Relu", ["pooled"], ["y"], name="act")]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [table, weight, index])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    result = _compress(model).model
    ops = [n.op_type for n in result.proto.graph.node]
    assert ops.count("Gather") >= 3  # the int8 table's rows and scales, and the pooling
    readers = {i for n in result.proto.graph.node if n.name == "pool" for i in n.input}
    producers = {o: n.op_type for n in result.proto.graph.node for o in n.output}
    assert any(producers.get(name) == "DequantizeLinear" for name in readers)
    ids = np.array([[1, 5, 7]], np.int64)
    want = runtime.session(model, optimize=False).run(None, {"ids": ids})[0]
    got = runtime.session(result, optimize=False).run(None, {"ids": ids})[0]
    assert np.abs(got - want).max() < 0.1 * np.abs(want).max()


def test_a_mask_added_to_the_scores_stays_float():
    """scores + mask with -1e9 where masked: a pair over that range would leave no levels for
    the scores; the mask input stays float, said in a note, and the output follows float."""
    from onnx import TensorProto, helper

    from onnxcomp.model import Model

    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w")
    mask = np.triu(np.full((8, 8), -1e9, np.float32), 1)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["scores"], name="qk"),
             helper.make_node("Mul", ["m", "big"], ["mask"], name="scale_mask"),
             helper.make_node("Add", ["scores", "mask"], ["masked"], name="add_mask"),
             helper.make_node("Softmax", ["masked"], ["y"], name="softmax", axis=-1)]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8]),
                     helper.make_tensor_value_info("m", TensorProto.FLOAT, [8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8, 8])],
        [weight, numpy_helper.from_array(np.array(1.0, np.float32), "big")])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    from onnxcomp.calibration import from_batches

    batches = [{"x": rng.standard_normal((1, 8, 8)).astype(np.float32), "m": mask}
               for _ in range(4)]
    result = api.compress(model, recipe="quantize:int8", calib=from_batches(batches),
                          validate=False, show_progress=False,
                          overrides=["quantize.every_op=true"])
    notes = "\n".join(n for r in result.report.passes for n in r.notes)
    assert "(masks) left float" in notes and "mask" in notes
    producers = {o: n.op_type for n in result.model.proto.graph.node for o in n.output}
    add = next(n for n in result.model.proto.graph.node if n.name == "add_mask")
    assert producers[add.input[0]] == "DequantizeLinear"  # the scores are quantized
    assert producers[add.input[1]] != "DequantizeLinear"  # the mask is not
    feeds = batches[0]
    want = runtime.session(model, optimize=False).run(None, feeds)[0]
    got = runtime.session(result.model, optimize=False).run(None, feeds)[0]
    assert np.abs(got - want).max() < 0.1


def test_a_lossy_8_bit_graph_points_to_16_bit_activations():
    """h = x + offset, y = h - offset with large offsets: h's 8-bit step swamps x (16-bit's
    does not); the note names the uint16 option, and uint16 is the closer of the two."""
    from onnx import TensorProto, helper

    from onnxcomp.calibration import from_batches
    from onnxcomp.model import Model

    nodes = [helper.make_node("Add", ["x", "offset"], ["h"], name="shift"),
             helper.make_node("Sub", ["h", "offset"], ["y"], name="unshift")]
    value = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 64]) for n in "xy"]
    graph = helper.make_graph(nodes, "g", [value[0], helper.make_tensor_value_info(
        "offset", TensorProto.FLOAT, [1, 64])], [value[1]])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]))
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((1, 64)).astype(np.float32),
                "offset": rng.uniform(-500, 500, (1, 64)).astype(np.float32)} for _ in range(8)]
    cosines = {}
    for dtype in ("uint8", "uint16"):
        result = api.compress(model, recipe="quantize:int8", calib=from_batches(batches),
                              validate=False, show_progress=False,
                              overrides=["quantize.every_op=true", "quantize.op_types=Add",
                                         f"quantize.activation_dtype={dtype}"])
        record = next(r for r in result.report.passes if r.name == "quantize")
        cosines[dtype] = min(record.details["output_cosine"].values())
        hinted = any("activation_dtype=uint16" in n for n in record.notes)
        assert hinted == (dtype == "uint8"), (dtype, record.notes)
    assert cosines["uint8"] < 0.99 < cosines["uint16"], cosines
