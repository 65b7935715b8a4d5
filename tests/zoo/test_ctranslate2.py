"""CTranslate2 Whisper checkpoints: the binary reader and the weight mapping into the model."""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest

from onnxcomp.errors import UserError
from onnxcomp.zoo import ctranslate2, whisper

torch = pytest.importorskip("torch")

TEST = whisper.PRESETS["test"]


def _ct2_bytes(variables: dict[str, np.ndarray], aliases: dict[str, str] | None = None,
               version: int = 6) -> bytes:
    """A CTranslate2 model.bin (the layout read_ctranslate2 documents)."""
    codes = {np.dtype(np.float32): 0, np.dtype(np.float16): 4, np.dtype(np.int32): 3}

    def string(text: str) -> bytes:
        raw = text.encode() + b"\0"
        return struct.pack("<H", len(raw)) + raw

    out = [struct.pack("<I", version), string("WhisperSpec"), struct.pack("<I", 3),
           struct.pack("<I", len(variables))]
    for name, array in variables.items():
        array = np.ascontiguousarray(array)
        out += [string(name), struct.pack("<B", array.ndim),
                b"".join(struct.pack("<I", d) for d in array.shape),
                struct.pack("<B", codes[array.dtype]), struct.pack("<I", array.nbytes),
                array.tobytes()]
    out.append(struct.pack("<I", len(aliases or {})))
    for alias, target in (aliases or {}).items():
        out += [string(alias), string(target)]
    return b"".join(out)


def _ct2_variables(model, dtype=np.float32) -> dict[str, np.ndarray]:
    """CTranslate2's WhisperSpec names and fused layouts for ``model``'s parameters (how its
    converter writes faster-whisper models: q/k/v and cross k/v fused, [out, in] weights)."""
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    out: dict[str, np.ndarray] = {}

    def lin(ours: str) -> tuple[np.ndarray, np.ndarray]:
        weight = state[f"{ours}.weight"].T
        bias = state.get(f"{ours}.bias", np.zeros(weight.shape[0], np.float32))
        return weight, bias

    def put(theirs: str, weight: np.ndarray, bias: np.ndarray) -> None:
        out[f"{theirs}/weight"], out[f"{theirs}/bias"] = weight, bias

    def norm(ours: str, theirs: str) -> None:
        out[f"{theirs}/gamma"], out[f"{theirs}/beta"] = (state[f"{ours}.weight"],
                                                         state[f"{ours}.bias"])

    for side in ("encoder", "decoder"):
        for i in range(len(getattr(model, side).layers)):
            ours, theirs = f"{side}.layers.{i}", f"{side}/layer_{i}"
            norm(f"{ours}.self_attn_layer_norm", f"{theirs}/self_attention/layer_norm")
            q, k, v = (lin(f"{ours}.self_attn.{x}_proj") for x in "qkv")
            put(f"{theirs}/self_attention/linear_0", np.concatenate([q[0], k[0], v[0]]),
                np.concatenate([q[1], k[1], v[1]]))
            put(f"{theirs}/self_attention/linear_1", *lin(f"{ours}.self_attn.out_proj"))
            if side == "decoder":
                norm(f"{ours}.encoder_attn_layer_norm", f"{theirs}/attention/layer_norm")
                put(f"{theirs}/attention/linear_0", *lin(f"{ours}.encoder_attn.q_proj"))
                k, v = (lin(f"{ours}.encoder_attn.{x}_proj") for x in "kv")
                put(f"{theirs}/attention/linear_1", np.concatenate([k[0], v[0]]),
                    np.concatenate([k[1], v[1]]))
                put(f"{theirs}/attention/linear_2", *lin(f"{ours}.encoder_attn.out_proj"))
            norm(f"{ours}.final_layer_norm", f"{theirs}/ffn/layer_norm")
            put(f"{theirs}/ffn/linear_0", *lin(f"{ours}.mlp.fc1"))
            put(f"{theirs}/ffn/linear_1", *lin(f"{ours}.mlp.fc2"))
        norm(f"{side}.layer_norm", f"{side}/layer_norm")
        out[f"{side}/num_heads"] = np.array(model.config.heads, np.int32)
    for conv in ("conv1", "conv2"):
        out[f"encoder/{conv}/weight"] = state[f"encoder.{conv}.weight"]
        out[f"encoder/{conv}/bias"] = state[f"encoder.{conv}.bias"]
    out["encoder/position_encodings/encodings"] = state["encoder.embed_positions"]
    out["decoder/embeddings/weight"] = state["decoder.embed_tokens.weight"]
    out["decoder/position_encodings/encodings"] = state["decoder.embed_positions.weight"]
    return {name: (a.astype(dtype) if a.dtype == np.float32 else a) for name, a in out.items()}


def _params(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("dtype, tolerance", [(np.float32, 0.0), (np.float16, 1e-3)])
def test_ctranslate2_weights_load_into_the_model(tmp_path, dtype, tolerance):
    source = whisper.build_model(TEST)
    path = tmp_path / "model.bin"
    variables = _ct2_variables(source, dtype)
    projection = {"decoder/projection/weight": "decoder/embeddings/weight"}
    path.write_bytes(_ct2_bytes(variables, projection))
    read = ctranslate2.read(path)
    assert read["decoder/projection/weight"] is read["decoder/embeddings/weight"]
    target = whisper.build_model(dataclasses.replace(TEST, seed=5))
    ctranslate2.load_whisper(target, read)
    expected, got = _params(source), _params(target)
    assert expected.keys() == got.keys()
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], atol=tolerance, rtol=tolerance,
                                   err_msg=name)


def test_bad_ctranslate2_files_are_one_line_errors(tmp_path):
    model = whisper.build_model(TEST)
    good = _ct2_variables(model)
    path = tmp_path / "model.bin"
    path.write_bytes(_ct2_bytes(good)[:-100])
    with pytest.raises(UserError, match="truncated"):
        ctranslate2.read(path)
    path.write_bytes(_ct2_bytes(good, version=5))
    with pytest.raises(UserError, match="version 5"):
        ctranslate2.read(path)
    path.write_bytes(_ct2_bytes(good, {"x": "missing"}))
    with pytest.raises(UserError, match="alias"):
        ctranslate2.read(path)
    key_bias = dict(good)
    key_bias["encoder/layer_0/self_attention/linear_0/bias"] = np.ones(3 * TEST.d_model,
                                                                       np.float32)
    with pytest.raises(UserError, match="key bias"):
        ctranslate2.load_whisper(model, key_bias)
    with pytest.raises(UserError, match="no variable"):
        ctranslate2.load_whisper(model, {k: v for k, v in good.items()
                                         if k != "decoder/layer_norm/gamma"})
    other = whisper.build_model(dataclasses.replace(TEST, vocab=600))
    with pytest.raises(UserError, match="do not fit"):
        ctranslate2.load_whisper(other, good)
