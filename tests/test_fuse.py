from __future__ import annotations

import numpy as np
import pytest
from conftest import make_mlp

import onnxcomp
from onnxcomp import runtime, zoo
from onnxcomp.passes import fuse
from onnxcomp.pipeline import Context

pytest.importorskip("onnxruntime.transformers.optimizer")
pytest.importorskip("sympy")  # the optimizer's shape inference needs it at run time


@pytest.mark.zoo
def test_tiny_clip_fuses_and_stays_numerically_equal():
    model = onnxcomp.load(zoo.fetch("tiny-clip"))
    assert fuse.detect_heads(model) == (4, 64)
    fused, record = fuse.run(model, fuse.Config("clip"), Context())
    assert record.modified
    ops = {n.op_type for n in fused.graph.node}
    assert {"SkipLayerNormalization", "BiasGelu"} <= ops
    batch = zoo.dataset("tiny-clip", "eval", 1).make_batch(0)
    assert max(runtime.max_abs_difference(model, fused, batch).values()) < 1e-4
    again, second = fuse.run(fused, fuse.Config("clip"), Context())
    assert not second.modified and again is fused


def test_nothing_to_fuse_is_a_note():
    model = make_mlp()
    out, record = fuse.run(model, fuse.Config("bert"), Context())
    assert out is model and not record.modified
    assert "no bert fusion pattern matched" in record.notes[0]


def test_config_validates():
    with pytest.raises(ValueError, match="model_type"):
        fuse.Config("resnet")
    assert fuse.Config.from_short("vit").model_type == "vit"
    with pytest.raises(ValueError, match="embed_layer_norm"):
        fuse.Config("bert", embed_layer_norm="no")
    assert not fuse.Config().embed_layer_norm


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


def test_embed_layer_norm_on_is_onnx_runtimes_default(tiny_bert):
    fused, record = fuse.run(tiny_bert, fuse.Config("bert", embed_layer_norm=True), Context())
    ops = [n.op_type for n in fused.graph.node]
    assert ops.count("EmbedLayerNormalization") == 1 and ops.count("Attention") == 2
    assert max(runtime.max_abs_difference(tiny_bert, fused, _bert_feeds()).values()) < 1e-4


def test_embed_layer_norm_off_keeps_the_table_gathers(tiny_bert):
    config = fuse.Config("bert")  # the default: off
    assert not config.embed_layer_norm
    fused, record = fuse.run(tiny_bert, config, Context())
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
    again, second = fuse.run(fused, config, Context())
    assert not second.modified and again is fused
