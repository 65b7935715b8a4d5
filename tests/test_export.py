"""export: Hugging Face folders and module:callable sources → ONNX, checked against PyTorch.

The references here are computed independently of ``export.compare_with_torch``: the original
transformers model (not the export wrapper) on inputs of shapes the export never saw.
"""

from __future__ import annotations

import json
import sys
import textwrap

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.errors import OnnxcompError
from onnxcomp.export import export, split_shared_initializers
from onnxcomp.model import Model
from onnxcomp.runtime import run_model

TOL = 1e-4  # the export contract; float32 re-association differences are ~1e-6 here


def _ort(path, feeds):
    from onnxcomp.model import load

    return run_model(load(path), feeds)


# ---------------------------------------------------------------------------------------------
# no torch needed


def test_without_torch_the_error_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ImportError
    with pytest.raises(OnnxcompError, match=r"needs the \[export\] extra"):
        export(tmp_path, tmp_path / "out.onnx")


def test_zoo_export_without_torch_is_a_clear_error(monkeypatch, tmp_path):
    from onnxcomp import zoo

    monkeypatch.setenv("ONNXCOMP_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(OnnxcompError, match=r"\[export\] extra"):
        zoo.fetch("clip-vit-b32")


def test_split_shared_initializers_gives_each_layer_its_tensor():
    zeros = numpy_helper.from_array(np.zeros(4, np.float32), "bias")
    w = numpy_helper.from_array(np.eye(4, dtype=np.float32) * 2, "w")
    nodes = [
        helper.make_node("Identity", ["bias"], ["layer1.bias"]),
        helper.make_node("MatMul", ["x", "w"], ["m0"]),
        helper.make_node("Add", ["m0", "bias"], ["a0"]),
        helper.make_node("MatMul", ["a0", "w"], ["m1"]),
        helper.make_node("Add", ["m1", "layer1.bias"], ["a1"]),
        helper.make_node("Add", ["a1", "bias"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                         [2, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
                              [zeros, w])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    before = Model(proto)
    after = Model(onnx.ModelProto.FromString(proto.SerializeToString()))
    copies = split_shared_initializers(after.proto)
    assert copies == 2  # the Identity and the third reader of "bias"
    onnx.checker.check_model(after.proto)
    assert not [n for n in after.graph.node if n.op_type == "Identity"]
    readers: dict[str, int] = {}
    for node in after.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    inits = {t.name for t in after.graph.initializer}
    assert "layer1.bias" in inits
    assert all(readers[name] == 1 for name in inits if name != "w")  # 2-D tensors stay shared
    assert readers["w"] == 2
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 4)).astype(np.float32)}
    np.testing.assert_array_equal(run_model(before, feeds)["y"], run_model(after, feeds)["y"])
    assert split_shared_initializers(after.proto) == 0  # idempotent


# ---------------------------------------------------------------------------------------------
# Hugging Face folders

try:
    import torch
    import transformers
except ImportError:  # the [export] extra is not installed: these tests skip
    torch = transformers = None
needs_export = pytest.mark.skipif(torch is None, reason="needs the [export] extra (torch, "
                                  "transformers)")


def _tiny_bert(folder, seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=200, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=64)
    model = transformers.BertModel(config)
    model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    return _tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


def _bert_feeds(batch, length, seed=5, pad_last_from=None):
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 200, size=(batch, length)).astype(np.int64)
    mask = np.ones_like(ids)
    if pad_last_from is not None:
        mask[-1, pad_last_from:] = 0
        ids[-1, pad_last_from:] = 0
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


@needs_export
def test_tiny_bert_folder_matches_pytorch(tiny_bert, tmp_path):
    out = tmp_path / "bert.onnx"
    result = export(tiny_bert, out)
    assert result.ok and result.max_abs_error < TOL and result.min_cosine > 0.999999
    assert result.inputs == ("input_ids", "attention_mask", "token_type_ids")
    assert result.outputs == ("last_hidden_state", "pooler_output")
    proto = onnx.load(out)
    onnx.checker.check_model(proto)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(proto.graph.input) + list(proto.graph.output)}
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["last_hidden_state"] == ["batch", "sequence", 32]
    assert dims["pooler_output"] == ["batch", 32]
    ops = [n.op_type for n in proto.graph.node]
    # Linear layers as MatMul + Add: 6 per layer, plus the two attention MatMuls
    assert ops.count("MatMul") == 2 * 8 and "Identity" not in ops and "IsNaN" not in ops
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["onnxcomp.export.architecture"] == "BertModel"
    assert "dynamo=False" in meta["onnxcomp.export.exporter"]
    # independent reference: the transformers model itself, shapes the export never saw
    reference = transformers.BertModel.from_pretrained(tiny_bert).eval()
    for feeds in (_bert_feeds(4, 19), _bert_feeds(2, 7, pad_last_from=4)):
        with torch.no_grad():
            expected = reference(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        got = _ort(out, feeds)
        np.testing.assert_allclose(got["last_hidden_state"], expected.last_hidden_state.numpy(),
                                   atol=TOL, rtol=0)
        np.testing.assert_allclose(got["pooler_output"], expected.pooler_output.numpy(),
                                   atol=TOL, rtol=0)
    assert "within tolerance" in result.summary()
    json.dumps(result.to_dict())


@needs_export
def test_sentence_transformers_folder_pools_and_normalizes(tmp_path):
    folder = _tiny_bert(tmp_path / "st", seed=1)
    (folder / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling",
         "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize",
         "type": "sentence_transformers.models.Normalize"}]))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True,
         "pooling_mode_cls_token": False, "pooling_mode_max_tokens": False}))
    out = tmp_path / "st.onnx"
    result = export(folder, out)
    assert result.ok and result.outputs == ("token_embeddings", "sentence_embedding")
    feeds = _bert_feeds(3, 12, seed=9, pad_last_from=5)
    got = _ort(out, feeds)
    tokens, mask = got["token_embeddings"], feeds["attention_mask"][..., None]
    mean = (tokens * mask).sum(1) / mask.sum(1)
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(got["sentence_embedding"], expected, atol=1e-5)
    # padding must not change a sentence's embedding
    alone = {k: v[-1:, :5] for k, v in feeds.items()}
    np.testing.assert_allclose(_ort(out, alone)["sentence_embedding"][0],
                               got["sentence_embedding"][-1], atol=1e-5)


@needs_export
def test_not_a_model_folder(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(OnnxcompError, match="not a Hugging Face model folder"):
        export(tmp_path, tmp_path / "out.onnx")


@needs_export
def test_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(
        {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(OnnxcompError, match="unsupported architecture GPT2LMHeadModel"):
        export(tmp_path, tmp_path / "out.onnx")


@needs_export
def test_folder_without_weights(tmp_path):
    transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1,
                            num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path)
    with pytest.raises(OnnxcompError, match="no weights"):
        export(tmp_path, tmp_path / "out.onnx")


@needs_export
def test_bad_sources_and_opset(tmp_path, tiny_bert):
    with pytest.raises(OnnxcompError, match="no such folder"):
        export(tmp_path / "missing", tmp_path / "out.onnx")
    plain = tmp_path / "model.bin"
    plain.write_bytes(b"\0")
    with pytest.raises(OnnxcompError, match="a file"):
        export(plain, tmp_path / "out.onnx")
    with pytest.raises(OnnxcompError, match="opset"):
        export(tiny_bert, tmp_path / "out.onnx", opset=9)


# ---------------------------------------------------------------------------------------------
# module:callable

CALLABLE_SOURCE = '''
import torch


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = torch.nn.Linear(6, 16)
        self.fc2 = torch.nn.Linear(16, 3)

    def forward(self, features):
        return self.fc2(torch.relu(self.fc1(features)))


class TwoHeads(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.body = torch.nn.Linear(4, 8)

    def forward(self, image, scale):
        h = self.body(image) * scale
        return {"logits": h, "norm": h.norm(dim=-1)}


def make():
    torch.manual_seed(0)
    return Net(), (torch.randn(2, 6),)


def make_dict():
    torch.manual_seed(0)
    return TwoHeads(), {"image": torch.randn(3, 4), "scale": torch.tensor(2.0)}


def broken():
    raise ValueError("no weights for you")


def not_a_module():
    return "model", (torch.zeros(1),)
'''


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "user_model.py"
    path.write_text(textwrap.dedent(CALLABLE_SOURCE))
    return path


@needs_export
def test_callable_source_exports_with_dynamic_batch(user_file, tmp_path):
    out = tmp_path / "net.onnx"
    result = export(f"{user_file}:make", out)
    assert result.ok and result.inputs == ("features",) and result.outputs == ("output",)
    module = _load_user(user_file)
    torch.manual_seed(0)
    net = module.Net().eval()
    x = np.random.default_rng(3).standard_normal((5, 6)).astype(np.float32)  # batch 5, not 2
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_ort(out, {"features": x})["output"], expected, atol=TOL)


@needs_export
def test_callable_dict_inputs_and_outputs_are_named(user_file, tmp_path):
    result = export(f"{user_file}:make_dict", tmp_path / "heads.onnx")
    assert result.ok
    assert result.inputs == ("image", "scale") and result.outputs == ("logits", "norm")


def _load_user(path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("user_model_for_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@needs_export
def test_callable_errors_are_clear(user_file, tmp_path):
    out = tmp_path / "x.onnx"
    with pytest.raises(OnnxcompError, match="raised ValueError: no weights for you"):
        export(f"{user_file}:broken", out)
    with pytest.raises(OnnxcompError, match="must be a torch.nn.Module"):
        export(f"{user_file}:not_a_module", out)
    with pytest.raises(OnnxcompError, match="no callable named 'missing'"):
        export(f"{user_file}:missing", out)
    with pytest.raises(OnnxcompError, match="no such Python file"):
        export(f"{tmp_path / 'nope.py'}:make", out)
    with pytest.raises(OnnxcompError, match="cannot import module"):
        export("onnxcomp_no_such_module:make", out)
    assert not out.exists()


@needs_export
def test_a_mismatch_is_reported_not_hidden(tiny_bert, tmp_path):
    result = export(tiny_bert, tmp_path / "strict.onnx", tolerance=1e-12)
    assert not result.ok and "NOT within" in result.summary()


# ---------------------------------------------------------------------------------------------
# zoo models (real weights / real size)


@pytest.mark.zoo
@needs_export
def test_minilm_zoo_matches_pytorch_and_ranks_related_sentences():
    from onnxcomp import zoo
    from onnxcomp.zoo import minilm

    path = zoo.fetch("minilm")
    record = json.loads(path.with_suffix(".export.json").read_text())
    assert record["ok"] and record["max_abs_error"] < TOL
    hf = minilm.source_folder(path.parent)
    texts = ["A man is playing a guitar on stage.",
             "Someone performs a song with an acoustic guitar.",
             "The central bank raised interest rates again this quarter.",
             "Stocks fell after the bank announced higher rates."]
    tok = transformers.AutoTokenizer.from_pretrained(hf)
    batch = tok(texts, padding=True, return_tensors="np")  # padded: the mask must do its job
    feeds = {k: batch[k].astype(np.int64)
             for k in ("input_ids", "attention_mask", "token_type_ids")}
    got = _ort(path, feeds)
    reference = transformers.AutoModel.from_pretrained(hf).eval()
    with torch.no_grad():
        hidden = reference(**{k: torch.from_numpy(v) for k, v in feeds.items()}
                           ).last_hidden_state.numpy()
    mask = feeds["attention_mask"][..., None]
    mean = (hidden * mask).sum(1) / mask.sum(1)
    expected = mean / np.linalg.norm(mean, axis=1, keepdims=True)
    np.testing.assert_allclose(got["sentence_embedding"], expected, atol=TOL)
    kept = mask[..., 0].astype(bool)
    np.testing.assert_allclose(got["token_embeddings"][kept], hidden[kept], atol=TOL)
    e = got["sentence_embedding"]
    similarity = e @ e.T
    assert similarity[0, 1] > similarity[0, 2] + 0.2 and similarity[0, 1] > similarity[0, 3] + 0.2
    assert similarity[2, 3] > similarity[2, 0] + 0.2 and similarity[2, 3] > similarity[2, 1] + 0.2


@pytest.mark.zoo
@needs_export
def test_minilm_data_is_unpadded_and_splits_are_disjoint():
    from onnxcomp import zoo

    calib = zoo.dataset("minilm", "calib", 40)
    evaluation = zoo.dataset("minilm", "eval", 40)
    assert not set(calib.labels) & set(evaluation.labels)
    assert len(set(calib.labels)) == 40
    lengths = set()
    for batch in calib:
        ids = batch["input_ids"]
        assert ids.shape[0] == 1 and ids.dtype == np.int64
        assert ids[0, 0] == 101 and ids[0, -1] == 102  # [CLS] ... [SEP], nothing after
        assert batch["attention_mask"].all() and not batch["token_type_ids"].any()
        lengths.add(ids.shape[1])
    assert len(lengths) > 10  # varied lengths


@pytest.mark.zoo
@pytest.mark.slow
@needs_export
def test_clip_vit_b32_zoo_matches_pytorch():
    from onnxcomp import zoo
    from onnxcomp.zoo import clip_vit

    path = zoo.fetch("clip-vit-b32")
    proto = onnx.load(path, load_external_data=False)
    dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(proto.graph.input) + list(proto.graph.output)}
    assert dims == {"pixel_values": ["batch", 3, 224, 224], "input_ids": ["batch", 77],
                    "attention_mask": ["batch", 77], "image_embeds": ["batch", 512],
                    "text_embeds": ["batch", 512]}
    batch = zoo.dataset("clip-vit-b32", "eval", 1).make_batch(0)
    eos_positions = batch["attention_mask"].sum(1) - 1
    assert (batch["input_ids"][np.arange(4), eos_positions] == clip_vit.EOS).all()
    got = _ort(path, batch)
    model = clip_vit.build_model()
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(v) for k, v in batch.items()})
    np.testing.assert_allclose(got["image_embeds"], expected.image_embeds.numpy(), atol=TOL)
    np.testing.assert_allclose(got["text_embeds"], expected.text_embeds.numpy(), atol=TOL)
    np.testing.assert_allclose(np.linalg.norm(got["text_embeds"], axis=1), 1.0, atol=1e-5)
    calib = zoo.dataset("clip-vit-b32", "calib", 1).make_batch(0)
    assert not np.array_equal(calib["input_ids"], batch["input_ids"])


def test_importing_export_does_not_import_torch():
    import subprocess

    code = "import sys, onnxcomp.export, onnxcomp.zoo.minilm, onnxcomp.zoo.clip_vit; " \
           "print('torch' in sys.modules, 'transformers' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True)
    assert done.stdout.split() == ["False", "False"]
