"""CTranslate2's Whisper checkpoints (``model.bin``), read without CTranslate2.

:func:`read` parses the binary format (version 6, spec ``WhisperSpec``): name -> array, aliases
resolved. :func:`load_whisper` copies those variables into onnxcomp.zoo.whisper's PyTorch model:
CTranslate2 fuses q/k/v (self-attention ``linear_0``) and the cross-attention k/v (``linear_1``)
with zero key biases, and stores Linear weights ``[out, in]``; they are split and transposed
here, float16 becomes float32. Checked against CTranslate2 4.8.5 itself on openai/whisper-tiny.en
(Systran's faster-whisper conversion): encoder output within 2.8e-5 (of 12.4), same greedy tokens.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np

from onnxcomp.errors import UserError

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


def read(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The variables of a CTranslate2 ``model.bin`` (binary format 6, spec ``WhisperSpec``):
    name -> array, aliases resolved. Layout: version, spec name, revision, then per variable
    its name, rank, dims, dtype and bytes (little-endian), then the aliases."""
    path = Path(path)
    data = memoryview(path.read_bytes())
    pos = 0

    def take(size: int) -> memoryview:
        nonlocal pos
        if pos + size > len(data):
            raise UserError(f"{path}: truncated CTranslate2 model")
        pos += size
        return data[pos - size:pos]

    def number(fmt: str) -> int:
        return struct.unpack("<" + fmt, take(struct.calcsize(fmt)))[0]

    def string() -> str:
        return bytes(take(number("H"))).rstrip(b"\0").decode("utf-8")

    version = number("I")
    if version != 6:
        raise UserError(f"{path}: CTranslate2 binary version {version}; this reads version 6")
    spec = string()
    if spec != "WhisperSpec":
        raise UserError(f"{path}: a CTranslate2 {spec}, not a WhisperSpec model")
    number("I")  # spec revision
    variables: dict[str, np.ndarray] = {}
    for _ in range(number("I")):
        name = string()
        dims = [number("I") for _ in range(number("B"))]
        dtype = _DTYPES.get(number("B"))
        raw = take(number("I"))
        if dtype is None or len(raw) != int(np.prod(dims)) * np.dtype(dtype).itemsize:
            raise UserError(f"{path}: variable {name!r} has an unknown type or a wrong size")
        variables[name] = np.frombuffer(raw, dtype).reshape(dims)
    for _ in range(number("I")):
        alias, target = string(), string()
        if target not in variables:
            raise UserError(f"{path}: alias {alias!r} names no variable ({target!r})")
        variables[alias] = variables[target]
    return variables


def load_whisper(model, variables: dict[str, np.ndarray]):
    """Copy CTranslate2 Whisper variables (from :func:`read`) into ``model``, an
    onnxcomp.zoo.whisper model (``build_model``): all of its parameters, shapes checked. Returns
    the model."""
    import torch

    config = model.config  # a onnxcomp.zoo.whisper.WhisperConfig
    d = config.d_model
    state: dict[str, np.ndarray] = {}

    def get(name: str) -> np.ndarray:
        if name not in variables:
            raise UserError(f"the CTranslate2 Whisper model has no variable {name!r}")
        return np.asarray(variables[name], dtype=np.float32)

    def norm(ours: str, theirs: str) -> None:
        state[f"{ours}.weight"], state[f"{ours}.bias"] = get(f"{theirs}/gamma"), get(
            f"{theirs}/beta")

    def linear(ours: str, weight: np.ndarray, bias: np.ndarray | None) -> None:
        state[f"{ours}.weight"] = weight.T
        if bias is not None:
            state[f"{ours}.bias"] = bias

    def no_key_bias(bias: np.ndarray, name: str) -> None:
        if np.any(bias):
            raise UserError(f"{name}: a key bias; Whisper's key projections have none")

    def attention(ours: str, theirs: str, cross: bool) -> None:
        if cross:
            linear(f"{ours}.q_proj", get(f"{theirs}/linear_0/weight"),
                   get(f"{theirs}/linear_0/bias"))
            kv, kv_bias = get(f"{theirs}/linear_1/weight"), get(f"{theirs}/linear_1/bias")
            no_key_bias(kv_bias[:d], theirs)
            linear(f"{ours}.k_proj", kv[:d], None)
            linear(f"{ours}.v_proj", kv[d:], kv_bias[d:])
            out = "linear_2"
        else:
            qkv, qkv_bias = get(f"{theirs}/linear_0/weight"), get(f"{theirs}/linear_0/bias")
            no_key_bias(qkv_bias[d:2 * d], theirs)
            linear(f"{ours}.q_proj", qkv[:d], qkv_bias[:d])
            linear(f"{ours}.k_proj", qkv[d:2 * d], None)
            linear(f"{ours}.v_proj", qkv[2 * d:], qkv_bias[2 * d:])
            out = "linear_1"
        linear(f"{ours}.out_proj", get(f"{theirs}/{out}/weight"), get(f"{theirs}/{out}/bias"))

    def block(ours: str, theirs: str, cross: bool) -> None:
        norm(f"{ours}.self_attn_layer_norm", f"{theirs}/self_attention/layer_norm")
        attention(f"{ours}.self_attn", f"{theirs}/self_attention", False)
        if cross:
            norm(f"{ours}.encoder_attn_layer_norm", f"{theirs}/attention/layer_norm")
            attention(f"{ours}.encoder_attn", f"{theirs}/attention", True)
        norm(f"{ours}.final_layer_norm", f"{theirs}/ffn/layer_norm")
        for index, fc in enumerate(("fc1", "fc2")):
            linear(f"{ours}.mlp.{fc}", get(f"{theirs}/ffn/linear_{index}/weight"),
                   get(f"{theirs}/ffn/linear_{index}/bias"))

    for side, layers in (("encoder", config.encoder_layers), ("decoder", config.decoder_layers)):
        heads = variables.get(f"{side}/num_heads")
        if heads is not None and int(np.asarray(heads).ravel()[0]) != config.heads:
            raise UserError(f"the CTranslate2 {side} has {int(np.asarray(heads).ravel()[0])} "
                            f"heads, the preset {config.heads}")
        for i in range(layers):
            block(f"{side}.layers.{i}", f"{side}/layer_{i}", side == "decoder")
        norm(f"{side}.layer_norm", f"{side}/layer_norm")
    for conv in ("conv1", "conv2"):
        state[f"encoder.{conv}.weight"] = get(f"encoder/{conv}/weight")
        state[f"encoder.{conv}.bias"] = get(f"encoder/{conv}/bias")
    state["encoder.embed_positions"] = get("encoder/position_encodings/encodings")
    state["decoder.embed_tokens.weight"] = get("decoder/embeddings/weight")
    state["decoder.embed_positions.weight"] = get("decoder/position_encodings/encodings")
    try:
        model.load_state_dict({k: torch.from_numpy(np.array(v, np.float32))  # a copy
                               for k, v in state.items()}, strict=True)
    except RuntimeError as exc:  # torch lists each mismatch on a line of its own
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise UserError("the CTranslate2 Whisper weights do not fit the preset: "
                        + lines[min(1, len(lines) - 1)]) from None
    return model

