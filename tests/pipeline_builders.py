"""A toy generative pipeline built with ``onnx.helper``: an encoder and a decoder with a
key/value cache, in Optimum's multi-file layout (see onnxcomp/parts.py).

The decoder is small but keeps the semantics the generation loop relies on: the first-step
decoder (``decoder_model.onnx``) reads ``input_ids`` and the encoder output and returns
``logits`` and the caches ``present.0.key`` (one entry per token) and ``present.0.encoder.key``
(the encoder context); the with-past decoder appends one token's key to ``past_key_values.0.key``
and reads the context back from ``past_key_values.0.encoder.key`` without re-outputting it, as
Whisper's does. Each token's logits depend on the mean key over the whole prefix, so a broken
cache changes the tokens. Both decoder files hold the same weights under the same names.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
from builders import IR_VERSION, tensor
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _model(nodes, inputs, outputs, weights: dict[str, np.ndarray], name: str) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, name, inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model, full_check=True)
    return model


def toy_weights(dim: int = 64, vocab: int = 128, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "encoder.proj": (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32),
        "embed": rng.standard_normal((vocab, dim)).astype(np.float32),
        "key.weight": (rng.standard_normal((dim, dim)) / np.sqrt(dim)).astype(np.float32),
        "lm_head": (rng.standard_normal((dim, vocab)) / np.sqrt(dim)).astype(np.float32),
    }


def toy_parts(dim: int = 64, vocab: int = 128, seed: int = 0
              ) -> dict[str, onnx.ModelProto]:
    """{"encoder", "decoder", "decoder_with_past"} models."""
    w = toy_weights(dim, vocab, seed)
    node = helper.make_node
    encoder = _model(
        [node("MatMul", ["input_features", "encoder.proj"], ["projected"], name="enc/proj"),
         node("Tanh", ["projected"], ["last_hidden_state"], name="enc/tanh")],
        [tensor("input_features", ["batch", "frames", dim])],
        [tensor("last_hidden_state", ["batch", "frames", dim])],
        {"encoder.proj": w["encoder.proj"]}, "toy_encoder")

    decoder_weights = {k: w[k] for k in ("embed", "key.weight", "lm_head")}
    decoder_weights["axis1"] = np.array([1], np.int64)
    tail = [  # from the key cache [B,1,S,D] and the context [B,1,D]: logits of each token
        node("ReduceMean", ["present.0.key"], ["memory4"], axes=[2], keepdims=0, name="mem"),
        node("Add", ["hidden", "memory4"], ["with_memory"], name="add_mem"),
        node("Add", ["with_memory", "context"], ["mixed"], name="add_ctx"),
        node("MatMul", ["mixed", "lm_head"], ["logits"], name="lm_head_matmul"),
    ]
    head = [
        node("Gather", ["embed", "input_ids"], ["hidden"], name="embed_tokens"),
        node("MatMul", ["hidden", "key.weight"], ["keys"], name="key_proj"),
        node("Unsqueeze", ["keys", "axis1"], ["new_keys"], name="heads"),
    ]
    decoder = _model(
        head + [
            node("ReduceMean", ["encoder_hidden_states"], ["context"], axes=[1], keepdims=1,
                 name="context"),
            node("Unsqueeze", ["context", "axis1"], ["present.0.encoder.key"], name="ctx_cache"),
            node("Identity", ["new_keys"], ["present.0.key"], name="key_cache"),
        ] + tail,
        [tensor("input_ids", ["batch", "sequence"], TensorProto.INT64),
         tensor("encoder_hidden_states", ["batch", "frames", dim])],
        [tensor("logits", ["batch", "sequence", vocab]),
         tensor("present.0.key", ["batch", 1, "sequence", dim]),
         tensor("present.0.encoder.key", ["batch", 1, 1, dim])],
        decoder_weights, "toy_decoder")
    with_past = _model(
        head + [
            node("Squeeze", ["past_key_values.0.encoder.key", "axis1"], ["context"],
                 name="ctx_read"),
            node("Concat", ["past_key_values.0.key", "new_keys"], ["present.0.key"], axis=2,
                 name="key_cache"),
        ] + tail,
        [tensor("input_ids", ["batch", "sequence"], TensorProto.INT64),
         tensor("past_key_values.0.key", ["batch", 1, "past_sequence", dim]),
         tensor("past_key_values.0.encoder.key", ["batch", 1, 1, dim])],
        [tensor("logits", ["batch", "sequence", vocab]),
         tensor("present.0.key", ["batch", 1, "total_sequence", dim])],
        decoder_weights, "toy_decoder_with_past")
    return {"encoder": encoder, "decoder": decoder, "decoder_with_past": with_past}


FILES = {"encoder": "encoder_model.onnx", "decoder": "decoder_model.onnx",
         "decoder_with_past": "decoder_with_past_model.onnx",
         "decoder_merged": "decoder_model_merged.onnx"}
ROLES = {"encoder": "encoder", "decoder": "decoder", "decoder_with_past": "decoder-with-past",
         "decoder_merged": "decoder-merged"}


def write_toy_pipeline(folder: str | Path, merged: bool = False, separate: bool = True,
                       dim: int = 64, vocab: int = 128, seed: int = 0,
                       max_new_tokens: int = 8) -> Path:
    """A pipeline folder with parts.json; ``merged`` adds decoder_model_merged.onnx."""
    from onnxcomp.parts import merge_decoders

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    models = toy_parts(dim, vocab, seed)
    if merged:
        models["decoder_merged"] = merge_decoders(models["decoder"], models["decoder_with_past"])
    if not separate:
        del models["decoder"], models["decoder_with_past"]
    for name, model in models.items():
        onnx.save(model, str(folder / FILES[name]))
    manifest = {
        "format": "onnxcomp-parts/1", "task": "toy-to-text",
        "parts": [{"name": n, "file": FILES[n], "role": ROLES[n]} for n in models],
        "generation": {"start_ids": [1, 2], "eos_id": 0, "max_new_tokens": max_new_tokens},
    }
    (folder / "parts.json").write_text(json.dumps(manifest, indent=2))
    return folder


def toy_samples(count: int = 4, frames: int = 6, dim: int = 64, seed: int = 5
                ) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"input_features": rng.standard_normal((1, frames, dim)).astype(np.float32)}
            for _ in range(count)]
