from __future__ import annotations

import importlib.util
import sys

import numpy as np
import onnx
import pytest
from conftest import make_mlp
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp import runtime, zoo
from onnxcomp.errors import UserError
from onnxcomp.model import Model
from onnxcomp.passes import fuse
from onnxcomp.pipeline import SKIP, Context

# The optimizer's symbolic shape inference needs sympy at run time; the plan needs neither.
needs_optimizer = pytest.mark.skipif(
    importlib.util.find_spec("onnxruntime.transformers") is None
    or importlib.util.find_spec("sympy") is None,
    reason="needs onnxruntime.transformers and sympy")


def _run(model: Model, config: fuse.Config):
    return fuse.PASS.run(model, config, Context())


def ffn_block(dim: int = 16, hidden: int = 32, seed: int = 0) -> Model:
    """x[B,S,dim] -> MatMul+bias -> Gelu (Erf form) -> MatMul+bias -> residual Add -> LayerNorm:
    a BERT feed-forward sublayer, what ONNX Runtime fuses to BiasGelu + SkipLayerNormalization."""
    rng = np.random.default_rng(seed)
    values = {"w1": rng.standard_normal((dim, hidden)), "b1": rng.standard_normal(hidden),
              "w2": rng.standard_normal((hidden, dim)), "b2": rng.standard_normal(dim),
              "gamma": rng.standard_normal(dim), "beta": rng.standard_normal(dim),
              "sqrt2": np.sqrt(2.0), "one": 1.0, "half": 0.5}
    inits = [numpy_helper.from_array(np.asarray(v, np.float32), k) for k, v in values.items()]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w1"], ["h0"], name="fc1"),
             n("Add", ["h0", "b1"], ["h1"], name="fc1_bias"),
             n("Div", ["h1", "sqrt2"], ["g0"], name="gelu_div"),
             n("Erf", ["g0"], ["g1"], name="gelu_erf"),
             n("Add", ["g1", "one"], ["g2"], name="gelu_add"),
             n("Mul", ["h1", "g2"], ["g3"], name="gelu_mul"),
             n("Mul", ["g3", "half"], ["g4"], name="gelu_half"),
             n("MatMul", ["g4", "w2"], ["h2"], name="fc2"),
             n("Add", ["h2", "b2"], ["h3"], name="fc2_bias"),
             n("Add", ["h3", "x"], ["r"], name="residual"),
             n("LayerNormalization", ["r", "gamma", "beta"], ["y"], name="ln", axis=-1,
               epsilon=1e-5)]
    io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["b", "s", dim])
          for name in ("x", "y")]
    model = helper.make_model(helper.make_graph(nodes, "ffn", io[:1], io[1:], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return Model(model)


def _feeds():
    return {"x": np.random.default_rng(1).standard_normal((2, 5, 16)).astype(np.float32)}


# --- structural, numerical, idempotent --------------------------------------------------------


@needs_optimizer
def test_ffn_fuses_to_bias_gelu_and_skip_layer_norm_and_stays_equal():
    model = ffn_block()
    fused, record = _run(model, fuse.Config("bert"))
    assert record.modified
    assert [n.op_type for n in fused.graph.node] == ["MatMul", "BiasGelu", "MatMul",
                                                      "SkipLayerNormalization"]
    assert record.details["fused"] == {"BiasGelu": 1, "SkipLayerNormalization": 1}
    assert sorted(record.touched) == sorted(n.name for n in fused.graph.node
                                            if n.domain == "com.microsoft")
    assert any(o.domain == "com.microsoft" for o in fused.proto.opset_import)
    # Exact up to float rounding (measured 5e-7).
    assert max(runtime.max_abs_difference(model, fused, _feeds()).values()) < 1e-5
    # The input model is untouched.
    assert "Erf" in [n.op_type for n in model.graph.node]


@needs_optimizer
def test_a_second_run_has_nothing_more_to_fuse():
    fused, _ = _run(ffn_block(), fuse.Config("bert"))
    again, second = _run(fused, fuse.Config("bert"))
    assert not second.modified and again is fused
    assert second.params_after == second.params_before


# --- negative -----------------------------------------------------------------------------------


@needs_optimizer
def test_nothing_to_fuse_is_a_note():
    model = make_mlp()
    out, record = _run(model, fuse.Config("bert"))
    assert out is model and not record.modified and not record.touched
    assert any("no bert fusion pattern matched" in note for note in record.notes)
    why = "no LayerNorm, attention (MatMul -> Softmax -> MatMul) or Erf-Gelu pattern to fuse"
    assert record.skipped == [("(graph)", why)]


def test_config_validates():
    with pytest.raises(ValueError, match="model_type"):
        fuse.Config("resnet")
    assert fuse.Config.from_short("vit").model_type == "vit"
    with pytest.raises(ValueError, match="embed_layer_norm"):
        fuse.Config("bert", embed_layer_norm="no")
    with pytest.raises(ValueError, match="num_heads"):
        fuse.Config(num_heads=-1)
    assert not fuse.Config().embed_layer_norm


def test_a_missing_optimizer_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime.transformers", None)  # import fails
    with pytest.raises(UserError, match="onnxruntime.transformers"):
        _run(ffn_block(), fuse.Config("bert"))


# --- the dry run -------------------------------------------------------------------------------


def test_dry_run_lists_the_candidates_without_mutating():
    model = ffn_block()
    before = model.proto.SerializeToString()
    plan = fuse.PASS.plan(model, fuse.Config("bert", num_heads=2, hidden_size=16), Context())
    assert model.proto.SerializeToString() == before
    assert [(r.node, r.action) for r in plan.rows] == [
        ("gelu_erf", "fuse -> BiasGelu"), ("ln", "fuse -> SkipLayerNormalization")]
    assert plan.payload == fuse.FusePlan(2, 16, {"BiasGelu": 1, "SkipLayerNormalization": 1})
    assert "2 heads, hidden size 16 (from the config)" in plan.notes[0]


def test_dry_run_of_an_attention_block(attention_block):
    plan = fuse.PASS.plan(attention_block, fuse.Config("bert"), Context())
    actions = {r.action for r in plan.rows}
    assert {"fuse -> Attention", "fuse -> SkipLayerNormalization"} <= actions
    assert plan.payload.num_heads and plan.payload.hidden_size  # detected from the Reshapes
    assert "detected" in plan.notes[0]


def test_dry_run_skips_say_why():
    model = make_mlp()
    (row,) = fuse.PASS.plan(model, fuse.Config("bert"), Context()).rows
    assert row.action == SKIP and "pattern" in row.reason


# --- real models ---------------------------------------------------------------------------------


@pytest.mark.zoo
@needs_optimizer
def test_tiny_clip_fuses_and_stays_numerically_equal():
    model = onnxcomp.load(zoo.fetch("tiny-clip"))
    assert fuse.detect_heads(model) == (4, 64)
    plan = fuse.PASS.plan(model, fuse.Config("clip"), Context())
    assert plan.payload.candidates == {"Attention": 4, "SkipLayerNormalization": 8,
                                       "BiasGelu": 4}
    fused, record = _run(model, fuse.Config("clip"))
    assert record.modified
    # Measured before the move to plan/apply: 8 SkipLayerNormalization, 2 Attention, 4 BiasGelu.
    assert record.details["fused"] == {"SkipLayerNormalization": 8, "Attention": 2,
                                       "BiasGelu": 4}
    batch = zoo.dataset("tiny-clip", "eval", 1).make_batch(0)
    assert max(runtime.max_abs_difference(model, fused, batch).values()) < 1e-4
    again, second = _run(fused, fuse.Config("clip"))
    assert not second.modified and again is fused


try:
    import torch
    import transformers
except ImportError:  # the [export] extra is not installed: the BERT tests skip
    torch = transformers = None


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT (random weights) exported by onnxcomp: the graph ORT's bert fusions match."""
    if torch is None:
        pytest.skip("needs the [export] extra (torch, transformers)")
    from onnxcomp.export import export

    folder = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64)
    transformers.BertModel(config).save_pretrained(folder / "hf")
    export(folder / "hf", folder / "bert.onnx")
    return onnxcomp.load(folder / "bert.onnx")


def _bert_feeds():
    rng = np.random.default_rng(5)
    ids = rng.integers(1, 200, size=(2, 11)).astype(np.int64)
    mask = np.ones_like(ids)
    mask[-1, 7:] = 0  # one padded sequence: the mask path is exercised too
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


@needs_optimizer
def test_embed_layer_norm_on_is_onnx_runtimes_default(tiny_bert):
    plan = fuse.PASS.plan(tiny_bert, fuse.Config("bert", embed_layer_norm=True), Context())
    assert any(r.action == "fuse -> EmbedLayerNormalization" for r in plan.rows)
    fused, _ = _run(tiny_bert, fuse.Config("bert", embed_layer_norm=True))
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("EmbedLayerNormalization") == 1 and ops.count("Attention") == 2
    assert max(runtime.max_abs_difference(tiny_bert, fused, _bert_feeds()).values()) < 1e-4


@needs_optimizer
def test_embed_layer_norm_off_keeps_the_table_gathers(tiny_bert):
    config = fuse.Config("bert")  # the default: off
    assert not config.embed_layer_norm
    plan = fuse.PASS.plan(tiny_bert, config, Context())
    assert plan.payload.num_heads == 4 and plan.payload.hidden_size == 32
    assert any(r.skipped and "embed_layer_norm = false" in r.reason for r in plan.rows)
    fused, record = _run(tiny_bert, config)
    assert record.modified
    ops = [n.op_type for n in fused.graph.node]
    # the other fusions still happen; only the embedding one is off
    assert "EmbedLayerNormalization" not in ops
    assert ops.count("Attention") == 2 and ops.count("SkipLayerNormalization") == 4
    # the word-embedding table [vocab, hidden] is still read by a plain Gather (quantize's target)
    tables = {i.name for i in fused.graph.initializer if list(i.dims) == [200, 32]}
    assert any(n.op_type == "Gather" and n.input[0] in tables for n in fused.graph.node)
    assert any("EmbedLayerNormalization fusion off" in note for note in record.notes)
    # exact up to float rounding (measured 7e-7), padded sequence included
    assert max(runtime.max_abs_difference(tiny_bert, fused, _bert_feeds()).values()) < 1e-4
    again, second = _run(fused, config)
    assert not second.modified and again is fused
