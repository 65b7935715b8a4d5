"""int8 embedding tables (Gather, every mode): structure, the saved file, numerics in ONNX
Runtime, skips and their reasons."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from quantize_graphs import D, V, gather_model, ids_batches, init, int8_tables

from onnxcomp import calibration, runtime
from onnxcomp.model import Model, load
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import gather as quantize_gather
from onnxcomp.pipeline import Context

run = quantize.PASS.run


@pytest.mark.parametrize("mode", quantize.INTEGER_MODES)
def test_gather_table_is_int8_in_every_mode(mode, tmp_path):
    model = gather_model()
    data = ids_batches(model)
    result, record = run(model, quantize.Config(mode=mode), Context(calibration=data))
    assert "emb_gather" in record.touched and record.modified
    assert any("Gather emb_gather" in line for line in record.details["plan"])
    assert record.bytes_after < record.bytes_before
    # The saved file holds the table as int8 [V, D] and no float table any more.
    path = tmp_path / "q.onnx"
    result.save(path)
    saved = onnx.load(str(path))
    tables = {k: v for k, v in int8_tables(saved).items() if v.shape == (V, D)}
    assert len(tables) == 1
    assert not any(t.data_type == TensorProto.FLOAT and list(t.dims) == [V, D]
                   for t in saved.graph.initializer)
    # Only the gathered rows are dequantized: no DequantizeLinear reads the table.
    (name,) = tables
    readers = [n.op_type for n in saved.graph.node if name in n.input]
    assert readers == ["Gather"]
    onnx.checker.check_model(saved)


def test_gather_output_within_half_a_step_in_ort():
    model = gather_model()
    result, _ = run(model, quantize.Config(mode="int8-dynamic"), Context())
    table = numpy_helper.to_array(model.graph.initializer[0])
    _, scales = quantize_gather.quantize_table(table)
    for batch in ids_batches(model):
        step = scales.reshape(-1)[batch["ids"]][..., None]  # per row scale, gathered
        for optimize in (False, True):
            ref = runtime.run_model(model, batch)["emb"]
            got = runtime.run_model(result, batch, optimize=optimize)["emb"]
            assert np.all(np.abs(got - ref) <= step / 2 + 1e-7)
    # and the error is not trivially zero: the table really was rounded
    assert np.abs(got - ref).max() > 0


def test_gather_exclude_by_name_and_op_type():
    model = gather_model()
    for pattern in ("emb_gather", "Gather", "emb_*"):
        result, record = run(model, quantize.Config(mode="int8-dynamic",
                                                             exclude=(pattern,)), Context())
        assert "emb_gather" not in record.touched
        assert "excluded" in dict(record.skipped)["emb_gather"]
        assert not any(v.shape == (V, D) for v in int8_tables(result.proto).values())
        assert "proj" in record.touched or pattern == "emb_*"


def test_table_tied_through_transpose_is_quantized_with_its_lm_head():
    """Gather(table) and MatMul(x, Transpose(table)) (SmolLM/Llama exports): the lm_head reads
    the transpose as a constant, both are quantized, no float table is left; int8-dynamic
    stores one int8 matrix."""
    model = gather_model(tied=True)
    result, record = run(model, quantize.Config(mode="int8-dynamic"), Context())
    assert {"emb_gather", "lm_head"} <= set(record.touched)
    floats = [t for t in result.graph.initializer
              if t.data_type == TensorProto.FLOAT and len(t.dims) == 2 and D in t.dims]
    assert not floats
    int8_matrices = [t for t in result.graph.initializer
                     if t.data_type == TensorProto.INT8 and len(t.dims) == 2 and V in t.dims]
    assert len(int8_matrices) == 1
    for batch in ids_batches(model):
        want = runtime.run_model(model, batch)["logits"]
        got = runtime.run_model(result, batch)["logits"]
        cosine = float((want * got).sum() / np.linalg.norm(want) / np.linalg.norm(got))
        assert cosine > 0.99, cosine


def test_shared_table_with_a_float_reader_is_skipped_with_reason(caplog):
    model = gather_model(tied=True)
    with caplog.at_level("DEBUG", logger="onnxcomp.passes.quantize.gather"):
        result, record = run(model, quantize.Config(mode="int8-dynamic", exclude=("lm_head",)),
                             Context())
    reason = dict(record.skipped)["emb_gather"]
    assert "shared with Transpose" in reason and "tied" in reason
    assert "emb_gather" in caplog.text and "shared" in caplog.text
    assert "emb_gather" not in record.touched
    inits = {t.name: t for t in result.graph.initializer}
    assert inits["table"].data_type == TensorProto.FLOAT  # still there, float, once
    batch = next(iter(ids_batches(model)))
    np.testing.assert_array_equal(runtime.run_model(result, batch)["emb"],
                                  runtime.run_model(model, batch)["emb"])


def test_gathers_sharing_a_table_share_one_int8_copy():
    model = gather_model(second_gather=True)
    result, record = run(model, quantize.Config(mode="int8-dynamic"), Context())
    assert {"emb_gather", "emb_gather2"} <= set(record.touched)
    assert len([v for v in int8_tables(result.proto).values() if v.shape == (V, D)]) == 1
    batch = next(iter(ids_batches(model)))
    ref, got = runtime.run_model(model, batch), runtime.run_model(result, batch)
    assert np.abs(got["emb2"] - ref["emb2"]).max() < 0.02
    # excluding one of them keeps the shared table float for both (an int8 copy would be extra)
    _, record = run(model, quantize.Config(mode="int8-dynamic",
                                                    exclude=("emb_gather2",)), Context())
    assert "emb_gather" not in record.touched
    assert "shared with Gather 'emb_gather2'" in dict(record.skipped)["emb_gather"]


def test_no_large_gather_table_changes_nothing_and_is_idempotent():
    small = gather_model(small=True)
    config = quantize.Config(mode="int8-dynamic", op_types=("Conv",))  # no MatMul either
    result, record = run(small, config, Context())
    assert not record.modified and result is small
    assert "emb_gather" not in dict(record.skipped)  # small tables are not worth a record line
    # A quantized table is int8: a second run finds nothing left to do.
    once, first = run(gather_model(), config, Context())
    assert first.touched == ["emb_gather"]
    twice, second = run(once, config, Context())
    assert not second.modified and twice is once


def test_embeddings_switch_and_validation():
    model = gather_model()
    _, record = run(model, quantize.Config(mode="int4", embeddings=False), Context())
    assert "emb_gather" not in record.touched and record.touched == ["proj"]
    with pytest.raises(ValueError):
        quantize.Config(embeddings="yes")
    with pytest.raises(ValueError):
        quantize.Config(attention=1)


def test_float16_table_stays_float16():
    table = np.random.default_rng(0).standard_normal((V, D)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="g")], "g16",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [4])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT16, [4, D])],
        [init("table", table)])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    result, record = run(model, quantize.Config(mode="int8-dynamic"), Context())
    assert record.touched == ["g"]
    ids = {"ids": np.array([0, 5, V - 1, -1], np.int64)}
    ref, got = runtime.run_model(model, ids)["emb"], runtime.run_model(result, ids)["emb"]
    assert got.dtype == np.float16
    step = np.abs(table.astype(np.float32)).max(axis=1)[ids["ids"]][:, None] / 127
    # half a step, plus float16 rounding of the scale and of the product
    assert np.all(np.abs(got.astype(np.float32) - ref) <= step / 2 + 2e-3 * np.abs(ref) + 1e-3)


def test_dead_rows_get_scale_one_not_a_subnormal_one():
    # A row of subnormal values (a never-trained token) would give a subnormal row scale, which
    # the CPU multiplies on its slow path; it is stored as zeros with scale 1 instead.
    table = np.random.default_rng(1).standard_normal((V, D)).astype(np.float32)
    table[5] = np.float32(4e-40)
    table[6] = 0.0
    q, scales = quantize_gather.quantize_table(table)
    assert scales[5, 0] == 1.0 and scales[6, 0] == 1.0 and not q[[5, 6]].any()
    assert np.all(scales >= np.finfo(np.float32).tiny)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="g")], "dead",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, [3])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [3, D])], [init("table", table)])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    result, record = run(model, quantize.Config(mode="int8-dynamic"), Context())
    assert record.touched == ["g"]
    ids = {"ids": np.array([5, 6, 7], np.int64)}
    got, ref = runtime.run_model(result, ids)["emb"], runtime.run_model(model, ids)["emb"]
    assert not got[:2].any()  # the dead rows come back as zeros (|error| = 4e-40)
    assert np.all(np.abs(got[2] - ref[2]) <= scales[7, 0] / 2 + 1e-7)


def _gemm_tied_model() -> Model:
    """Gather(table) -> Relu -> Gemm(transB=1) on the same table: a tied lm_head (Whisper's)."""
    rng = np.random.default_rng(11)
    table = rng.standard_normal((V, D)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["emb"], name="emb_gather"),
         helper.make_node("Relu", ["emb"], ["hidden"], name="act"),
         helper.make_node("Gemm", ["hidden", "table"], ["logits"], transB=1, name="lm_head")],
        "tied", [helper.make_tensor_value_info("ids", TensorProto.INT64, [6])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [6, V])], [init("table", table)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return Model(model)


@pytest.mark.parametrize("mode", quantize.INTEGER_MODES)
def test_table_tied_to_a_quantized_lm_head_is_quantized_and_stored_once(mode, tmp_path):
    model = _gemm_tied_model()
    rng = np.random.default_rng(2)
    data = calibration.from_batches([{"ids": rng.integers(0, V, (6,)).astype(np.int64)}
                                     for _ in range(4)])
    result, record = run(model, quantize.Config(mode=mode), Context(calibration=data))
    assert {"emb_gather", "lm_head"} <= set(record.touched)
    kinds = {t.name: t.data_type for t in result.graph.initializer}
    assert TensorProto.FLOAT not in {kinds[n] for n in kinds if n.startswith("table")
                                     and "scale" not in n}  # no float table left
    int8_matrices = [t for t in result.graph.initializer
                     if t.data_type == TensorProto.INT8 and len(t.dims) == 2]
    assert len(int8_matrices) == 1  # int8 modes: the lm_head reads Transpose(int8 table)
    path = tmp_path / "q.onnx"
    result.save(path)
    # int8 modes: one int8 copy (0.25x) + two scale vectors of V rows (0.35x at this size);
    # int4: int8 rows + the 4-bit lm_head. A second int8 copy would make 0.5x.
    assert path.stat().st_size < (0.5 if mode == "int4" else 0.37) * model.proto.ByteSize()
    for batch in data:
        want = runtime.run_model(model, batch)["logits"]
        got = runtime.run_model(load(path), batch, optimize=True)["logits"]
        cosine = float((want * got).sum() / np.linalg.norm(want) / np.linalg.norm(got))
        assert cosine > 0.99, cosine


def test_transposed_int8_copies_are_shared_only_when_equal():
    from onnxcomp.passes.quantize.rewrite import share_transposed_int8

    a = np.arange(12, dtype=np.int8).reshape(3, 4)
    graph = helper.make_graph([helper.make_node("Gather", ["a", "i"], ["g"]),
                               helper.make_node("MatMul", ["x", "b"], ["y"]),
                               helper.make_node("MatMul", ["x", "c"], ["z"])], "g", [], [],
                              [numpy_helper.from_array(a, "a"),
                               numpy_helper.from_array(a.T.copy(), "b"),
                               numpy_helper.from_array((a.T + 1).astype(np.int8), "c")])
    assert share_transposed_int8(graph) == 1
    assert sorted(t.name for t in graph.initializer) == ["a", "c"]
    assert graph.node[0].op_type == "Transpose" and list(graph.node[0].output) == ["b"]


def test_the_shared_int8_matrix_survives_the_final_cleanup():
    """compress ends with cleanup, which folds small constant subgraphs: the Transpose that
    reads the tied int8 table must stay a Transpose (else the second copy is written back)."""
    from onnxcomp import api

    model = gather_model(tied=True)
    result = api.compress(model, recipe="quantize:int8-dynamic", calib=ids_batches(model),
                          show_progress=False)
    int8_matrices = [t for t in result.model.graph.initializer
                     if t.data_type == TensorProto.INT8 and len(t.dims) == 2 and V in t.dims]
    assert len(int8_matrices) == 1
