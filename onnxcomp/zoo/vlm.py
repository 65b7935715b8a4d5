"""smolvlm-small: a LLaVA-style image-to-text pipeline at real shapes, seeded random weights.

The weights are random (no model hub is reachable here): the architecture and every tensor's
shape are real, so size, latency and what a compression pass can reach are those of the real
model, but the text it generates means nothing.

- Vision encoder: a ViT at DeiT-Tiny's shape (224x224 images, 16x16 patches by a strided conv,
  a class token, learned positions, 12 pre-LayerNorm blocks of 3-head attention and a GELU MLP
  of 768, final LayerNorm). Its ``image_features`` are the 196 patch tokens (the class token is
  dropped, as LLaVA does).
- Projector: LLaVA-1.5's ``mlp2x_gelu`` (Linear -> GELU -> Linear, 192 -> 576 -> 576): the
  ``image_embeds`` the decoder reads as a prefix.
- Decoder: Llama at SmolLM2-135M's shape (hidden 576, 30 layers, 9 query heads sharing 3
  key/value heads, head size 64, SwiGLU MLP of 1536, RMSNorm, rotary positions with theta
  100000, vocabulary 49152, the output projection tied to the token embeddings).

About 140 M parameters in all (SmolVLM-like). Weights are N(0, 0.02²); norm scales and biases
are drawn around their usual values so no two tensors are equal (exporters merge equal tensors).
With ``init="scaled"`` (the default) the decoder's attention output projections start at std
0.02 / sqrt(2 * layers) (GPT-2's rule for residual branches): random attention is nearly uniform,
so at full strength the 30 layers' context averages swamp each position and greedy decoding
repeats one image-dependent token; scaled down, they shift the stream a little (the output
still depends on the image) while each position's MLP maps its token to a different next one,
and greedy decoding gives varied tokens (``init="plain"``: one token repeated 16 times, seen
on one image of each split).

Exported (TorchScript exporter, opset 17) once into ``<cache>/smolvlm-small/`` in Optimum's
multi-file layout with ``parts.json`` (see ``onnxcomp.parts``):

- ``vision_encoder.onnx``: ``pixel_values`` float32 [batch, 3, 224, 224] -> ``image_features``
  [batch, 196, 192];
- ``projector.onnx``: ``image_features`` -> ``image_embeds`` [batch, 196, 576];
- ``decoder_model.onnx``: ``input_ids`` int64 [batch, sequence] and ``image_embeds``; the graph
  puts the image embeddings before the token embeddings; ``logits`` [batch, sequence, 49152]
  for the token positions only and ``present.{i}.key/value`` [batch, 3, 196 + sequence, 64];
- ``decoder_with_past_model.onnx``: ``input_ids`` and ``past_key_values.{i}.key/value``
  [batch, 3, past, 64] -> ``logits`` and ``present.{i}.key/value``; positions continue from
  the past length, computed inside the graph;
- ``decoder_model_merged.onnx``: both decoders in one file (``onnxcomp.parts.merge_decoders``).

The two decoder files hold the decoder's weights under the same initializer names, byte for byte
(Optimum's tied layout); inside each, the token embedding is one tensor, read by the lookup and,
through a ``Transpose``, by the output projection.

Data: ``pixel_values`` float32 [1, 3, 224, 224], normalized with CLIP's mean and std (LLaVA-1.5's
preprocessing), of synthesized images. ``calib`` and ``eval``: linear colour gradients with
random filled shapes, from different seed streams. ``heldout``: other image families (rendered
text lines on paper, multi-scale noise textures, photo-like blurred colour blobs), so held-out
data is not what calibration saw.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
import time
import types
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onnxcomp.calibration import Dataset
from onnxcomp.errors import UserError


@dataclass(frozen=True)
class VisionConfig:
    image_size: int = 224
    patch: int = 16
    dim: int = 192
    layers: int = 12
    heads: int = 3
    mlp: int = 768
    eps: float = 1e-6

    def __post_init__(self) -> None:
        if self.image_size % self.patch or self.dim % self.heads:
            raise ValueError("image_size must divide by patch, dim by heads")

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2


@dataclass(frozen=True)
class TextConfig:
    hidden: int = 576
    layers: int = 30
    heads: int = 9
    kv_heads: int = 3
    intermediate: int = 1536
    vocab: int = 49152
    rope_theta: float = 100000.0
    eps: float = 1e-5
    # Std of the projection weights (the embedding table stays at 0.02). The test preset's
    # two narrow layers need larger weights than 0.02 to move the next token off the echo of
    # the current one (tied embeddings make echoing the input the default answer).
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError("hidden must divide by heads, heads by kv_heads")
        if (self.hidden // self.heads) % 2:
            raise ValueError("head size must be even for rotary embeddings")

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class VlmConfig:
    vision: VisionConfig = VisionConfig()
    text: TextConfig = TextConfig()
    seed: int = 0
    init: str = "scaled"  # or "plain": every weight N(0, 0.02²)
    # The decoder prompt when a sample brings none (BOS, then a few fixed ids), and the end id.
    start_ids: tuple[int, ...] = (1, 28, 57, 97, 13)
    eos_id: int = 2
    max_new_tokens: int = 16

    def __post_init__(self) -> None:
        if self.init not in ("scaled", "plain"):
            raise ValueError(f"init must be scaled or plain, got {self.init!r}")
        if not self.start_ids or max(self.start_ids + (self.eos_id,)) >= self.text.vocab:
            raise ValueError("start_ids and eos_id must be ids below the vocabulary size")


PRESETS = {
    "small": VlmConfig(),
    "test": VlmConfig(VisionConfig(image_size=32, patch=8, dim=32, layers=2, heads=2, mlp=64),
                      TextConfig(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128,
                                 vocab=256, init_std=0.16)),
}
ZOO_NAMES = {"smolvlm-small": "small"}
SOURCE = ("ViT (DeiT-Tiny shape) + LLaVA-1.5 projector + Llama (SmolLM2-135M shape), random "
          "weights, built in code (onnxcomp.zoo.vlm)")
OPSET = 17
PARTS_FILE = "parts.json"
RECORD_FILE = "parts.build.json"
FILES = {"vision_encoder": "vision_encoder.onnx", "projector": "projector.onnx",
         "decoder": "decoder_model.onnx", "decoder_with_past": "decoder_with_past_model.onnx",
         "decoder_merged": "decoder_model_merged.onnx"}
ROLES = {"vision_encoder": "encoder", "projector": "encoder", "decoder": "decoder",
         "decoder_with_past": "decoder-with-past", "decoder_merged": "decoder-merged"}
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)


def _config_for(name: str) -> VlmConfig:
    if name not in ZOO_NAMES:
        raise UserError(f"{name!r} is not a vision-language zoo model; known: "
                        f"{', '.join(ZOO_NAMES)}")
    return PRESETS[ZOO_NAMES[name]]


def parameter_count(config: VlmConfig) -> int:
    v, t = config.vision, config.text
    vision = (3 * v.patch ** 2 * v.dim + v.dim + v.dim * (v.patches + 2)
              + v.layers * (4 * v.dim * v.dim + 4 * v.dim + 2 * v.dim * v.mlp + v.mlp + v.dim
                            + 4 * v.dim) + 2 * v.dim)
    projector = v.dim * t.hidden + t.hidden * t.hidden + 2 * t.hidden
    kv = t.kv_heads * t.head_dim
    decoder = (t.vocab * t.hidden + t.hidden + t.layers * (
        2 * t.hidden * t.hidden + 2 * t.hidden * kv + 3 * t.hidden * t.intermediate
        + 2 * t.hidden))
    return vision + projector + decoder


# ---------------------------------------------------------------------------------------------
# the PyTorch modules (torch is imported here only)


@functools.cache
def _torch_classes() -> types.SimpleNamespace:
    import torch
    from torch import nn

    class Linear(nn.Module):
        """``x @ weight (+ bias)`` with the weight stored [in, out], so that the exporter keeps
        the parameter as the MatMul's initializer under its own name (an [out, in] weight
        would be transposed and constant-folded into an anonymous ``onnx::MatMul_N``)."""

        def __init__(self, fan_in: int, fan_out: int, bias: bool, std: float = 0.02):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(fan_in, fan_out) * std)
            self.bias = nn.Parameter(torch.randn(fan_out) * 0.02) if bias else None

        def forward(self, x):
            y = torch.matmul(x, self.weight)
            return y if self.bias is None else y + self.bias

    class LayerNorm(nn.Module):
        def __init__(self, dim: int, eps: float):
            super().__init__()
            self.weight = nn.Parameter(1.0 + 0.1 * torch.randn(dim))
            self.bias = nn.Parameter(0.02 * torch.randn(dim))
            self.dim, self.eps = dim, eps

        def forward(self, x):
            return nn.functional.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)

    class RMSNorm(nn.Module):
        def __init__(self, dim: int, eps: float):
            super().__init__()
            self.weight = nn.Parameter(1.0 + 0.02 * torch.randn(dim))
            self.eps = eps

        def forward(self, x):
            scale = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
            return x * scale * self.weight

    # Reshapes spelled with the traced sizes, so batch and sequence stay dynamic in the graph.
    def split_heads(x, heads: int, head_dim: int):
        return x.reshape(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)

    def merge_heads(x):  # [B, H, S, D] -> [B, S, H * D]
        return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], x.shape[1] * x.shape[3])

    def repeat_kv(x, groups: int):  # [B, KV, T, D] -> [B, KV * groups, T, D], each head kept
        if groups == 1:
            return x
        b, kv, length, dim = x.shape
        return x.unsqueeze(2).expand(b, kv, groups, length, dim).reshape(b, kv * groups,
                                                                         length, dim)

    class VisionBlock(nn.Module):
        def __init__(self, v: VisionConfig):
            super().__init__()
            self.heads, self.head_dim = v.heads, v.dim // v.heads
            self.norm1, self.norm2 = LayerNorm(v.dim, v.eps), LayerNorm(v.dim, v.eps)
            self.q, self.k, self.v, self.o = (Linear(v.dim, v.dim, True) for _ in range(4))
            self.fc1, self.fc2 = Linear(v.dim, v.mlp, True), Linear(v.mlp, v.dim, True)

        def forward(self, x):
            h = self.norm1(x)
            q, k, v = (split_heads(t(h), self.heads, self.head_dim)
                       for t in (self.q, self.k, self.v))
            scores = torch.matmul(q, k.transpose(-1, -2)) * self.head_dim ** -0.5
            context = merge_heads(torch.matmul(scores.softmax(-1), v))
            x = x + self.o(context)
            return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))

    class VisionEncoder(nn.Module):
        """pixel_values [B, 3, S, S] -> the patch tokens [B, patches, dim] after the final
        LayerNorm."""

        def __init__(self, v: VisionConfig):
            super().__init__()
            self.patch_embed = nn.Conv2d(3, v.dim, v.patch, stride=v.patch)
            with torch.no_grad():
                self.patch_embed.weight.normal_(0.0, 0.02)
                self.patch_embed.bias.normal_(0.0, 0.02)
            self.cls_token = nn.Parameter(torch.randn(1, 1, v.dim) * 0.02)
            self.positions = nn.Parameter(torch.randn(1, v.patches + 1, v.dim) * 0.02)
            self.blocks = nn.ModuleList(VisionBlock(v) for _ in range(v.layers))
            self.norm = LayerNorm(v.dim, v.eps)

        def forward(self, pixel_values):
            x = self.patch_embed(pixel_values)
            x = x.reshape(x.shape[0], x.shape[1], x.shape[2] * x.shape[3]).transpose(1, 2)
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat([cls, x], dim=1) + self.positions
            for block in self.blocks:
                x = block(x)
            return (self.norm(x)[:, 1:],)  # a tuple, as every exported part returns

    class Projector(nn.Module):
        def __init__(self, config: VlmConfig):
            super().__init__()
            self.linear_1 = Linear(config.vision.dim, config.text.hidden, True)
            self.linear_2 = Linear(config.text.hidden, config.text.hidden, True)

        def forward(self, image_features):
            return (self.linear_2(nn.functional.gelu(self.linear_1(image_features))),)

    def rotate_half(x):
        half = x.shape[-1] // 2
        return torch.cat([-x[..., half:], x[..., :half]], dim=-1)

    class DecoderLayer(nn.Module):
        def __init__(self, t: TextConfig, attention_out_std: float):
            super().__init__()
            self.t = t
            kv, std = t.kv_heads * t.head_dim, t.init_std
            self.input_norm, self.post_norm = RMSNorm(t.hidden, t.eps), RMSNorm(t.hidden, t.eps)
            self.q_proj = Linear(t.hidden, t.hidden, False, std)
            self.k_proj = Linear(t.hidden, kv, False, std)
            self.v_proj = Linear(t.hidden, kv, False, std)
            self.o_proj = Linear(t.hidden, t.hidden, False, attention_out_std)
            self.gate_proj = Linear(t.hidden, t.intermediate, False, std)
            self.up_proj = Linear(t.hidden, t.intermediate, False, std)
            self.down_proj = Linear(t.intermediate, t.hidden, False, std)

        def forward(self, x, cos, sin, mask, past):
            t = self.t
            h = self.input_norm(x)
            q = split_heads(self.q_proj(h), t.heads, t.head_dim)
            k = split_heads(self.k_proj(h), t.kv_heads, t.head_dim)
            v = split_heads(self.v_proj(h), t.kv_heads, t.head_dim)
            q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
            if past is not None:
                k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
            present = (k, v)
            groups = t.heads // t.kv_heads  # grouped-query attention: repeat each kv head
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
            scores = torch.matmul(q, k.transpose(-1, -2)) * t.head_dim ** -0.5 + mask
            x = x + self.o_proj(merge_heads(torch.matmul(scores.softmax(-1), v)))
            h = self.post_norm(x)
            x = x + self.down_proj(nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))
            return x, present

    class Decoder(nn.Module):
        """The Llama decoder over embeddings, with or without a key/value cache."""

        def __init__(self, config: VlmConfig):
            super().__init__()
            t = self.t = config.text
            out_std = t.init_std / np.sqrt(2 * t.layers) if config.init == "scaled" \
                else t.init_std
            self.embed_tokens = nn.Parameter(torch.randn(t.vocab, t.hidden) * 0.02)
            self.layers = nn.ModuleList(DecoderLayer(t, out_std) for _ in range(t.layers))
            self.norm = RMSNorm(t.hidden, t.eps)
            inv_freq = 1.0 / t.rope_theta ** (torch.arange(0, t.head_dim, 2).float()
                                              / t.head_dim)
            self.register_buffer("inv_freq", inv_freq, persistent=False)

        def embed(self, input_ids):
            return nn.functional.embedding(input_ids, self.embed_tokens)

        def forward(self, x, new_tokens: int, past):
            """x: [B, S, hidden] (S new positions after the past), past: a (key, value) per
            layer or None -> logits for the last ``new_tokens`` positions, presents."""
            seq = x.shape[1]
            past_len = past[0][0].shape[2] if past is not None else 0
            positions = torch.arange(seq, device=x.device) + past_len
            keys = torch.arange(seq, device=x.device) + past_len  # the new keys' positions
            if past is not None:
                keys = torch.cat([torch.arange(past_len, device=x.device), keys])
            blocked = keys.unsqueeze(0) > positions.unsqueeze(1)  # [S, past + S]
            mask = blocked.float() * -1e9
            angles = positions.float().unsqueeze(1) * self.inv_freq.unsqueeze(0)
            angles = torch.cat([angles, angles], dim=-1)  # [S, head_dim]
            cos, sin = angles.cos(), angles.sin()
            presents = []
            for i, layer in enumerate(self.layers):
                x, present = layer(x, cos, sin, mask, None if past is None else past[i])
                presents.extend(present)
            x = self.norm(x[:, x.shape[1] - new_tokens:])
            # Tied: the output projection is the embedding table, transposed.
            return (torch.matmul(x, self.embed_tokens.t()), *presents)

    class DecoderNoPast(nn.Module):
        """(input_ids, image_embeds) -> logits of the token positions, presents (image +
        tokens)."""

        def __init__(self, decoder: Decoder):
            super().__init__()
            self.model = decoder

        def forward(self, input_ids, image_embeds):
            x = torch.cat([image_embeds, self.model.embed(input_ids)], dim=1)
            return self.model(x, input_ids.shape[1], None)

    class DecoderWithPast(nn.Module):
        """(input_ids, key_0, value_0, key_1, ...) -> logits, presents."""

        def __init__(self, decoder: Decoder):
            super().__init__()
            self.model = decoder

        def forward(self, input_ids, *past):
            pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
            return self.model(self.model.embed(input_ids), input_ids.shape[1], pairs)

    return types.SimpleNamespace(torch=torch, VisionEncoder=VisionEncoder, Projector=Projector,
                                 Decoder=Decoder, DecoderNoPast=DecoderNoPast,
                                 DecoderWithPast=DecoderWithPast)


def build_modules(config: VlmConfig) -> dict:
    """The seeded PyTorch modules (eval mode): ``vision_encoder``, ``projector``,
    ``decoder`` (no past) and ``decoder_with_past``, the last two sharing one ``Decoder``."""
    classes = _torch_classes()
    classes.torch.manual_seed(config.seed)
    vision = classes.VisionEncoder(config.vision).eval()
    projector = classes.Projector(config).eval()
    decoder = classes.Decoder(config).eval()
    return {"vision_encoder": vision, "projector": projector,
            "decoder": classes.DecoderNoPast(decoder).eval(),
            "decoder_with_past": classes.DecoderWithPast(decoder).eval()}


# ---------------------------------------------------------------------------------------------
# export into the multi-file layout


def kv_names(config: VlmConfig, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kind}" for i in range(config.text.layers)
            for kind in ("key", "value")]


def _exportables(config: VlmConfig, modules: dict) -> dict:
    """The four parts as :class:`onnxcomp.export.Exportable`, with check inputs of other sizes
    than the export example (batch and sequence lengths)."""
    from onnxcomp.export import Exportable

    torch = _torch_classes().torch
    v, t = config.vision, config.text
    gen = torch.Generator().manual_seed(config.seed + 1)

    def pixels(batch):
        return torch.randn(batch, 3, v.image_size, v.image_size, generator=gen)

    def features(batch):
        return torch.randn(batch, v.patches, v.dim, generator=gen)

    def embeds(batch):
        return torch.randn(batch, v.patches, t.hidden, generator=gen) * 0.5

    def ids(batch, seq):
        return torch.randint(0, t.vocab, (batch, seq), generator=gen)

    def past(batch, length):
        return tuple(torch.randn(batch, t.kv_heads, length, t.head_dim, generator=gen)
                     for _ in range(2 * t.layers))

    kv_axes = {0: "batch", 2: "past_sequence"}
    present_axes = {0: "batch", 2: "present_sequence"}
    presents = kv_names(config, "present")
    pasts = kv_names(config, "past_key_values")
    tag = {"onnxcomp.zoo.config": json.dumps(dataclasses.asdict(config))}
    return {
        "vision_encoder": Exportable(
            modules["vision_encoder"], (pixels(2),), ("pixel_values",), ("image_features",),
            {"pixel_values": {0: "batch"}, "image_features": {0: "batch"}},
            "ViT vision encoder", [(pixels(1),), (pixels(3),)], dict(tag)),
        "projector": Exportable(
            modules["projector"], (features(2),), ("image_features",), ("image_embeds",),
            {"image_features": {0: "batch"}, "image_embeds": {0: "batch"}},
            "LLaVA-1.5 projector", [(features(1),), (features(3),)], dict(tag)),
        "decoder": Exportable(
            modules["decoder"], (ids(2, 5), embeds(2)), ("input_ids", "image_embeds"),
            ("logits", *presents),
            {"input_ids": {0: "batch", 1: "sequence"}, "image_embeds": {0: "batch"},
             "logits": {0: "batch", 1: "sequence"}, **{n: present_axes for n in presents}},
            "Llama decoder (image prefix, no past)",
            [(ids(1, 1), embeds(1)), (ids(1, 7), embeds(1)), (ids(3, 4), embeds(3))], dict(tag)),
        "decoder_with_past": Exportable(
            modules["decoder_with_past"], (ids(2, 3), *past(2, 6)), ("input_ids", *pasts),
            ("logits", *presents),
            {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"},
             **{n: kv_axes for n in pasts}, **{n: present_axes for n in presents}},
            "Llama decoder (with past)",
            [(ids(1, 1), *past(1, 9)), (ids(1, 4), *past(1, 1)), (ids(3, 1), *past(3, 20))],
            dict(tag)),
    }


def _tie_output_projection(path: Path, target: Path, embed_name: str) -> None:
    """The exporter folds ``Transpose(embed_tokens)`` into a second, anonymous copy of the
    embedding table; put the Transpose back so the file holds the table once."""
    import onnx

    from onnxcomp import model as model_io

    loaded = model_io.load(path)
    graph = loaded.proto.graph
    inits = {t.name: t for t in graph.initializer}
    table = model_io.tensor_array(inits[embed_name])
    for tensor in list(graph.initializer):
        if tensor.name == embed_name or list(tensor.dims) != list(table.shape[::-1]):
            continue
        if np.array_equal(model_io.tensor_array(tensor), table.T):
            graph.initializer.remove(tensor)
            graph.node.insert(0, onnx.helper.make_node(
                "Transpose", [embed_name], [tensor.name], name="lm_head.transpose",
                perm=[1, 0]))
    model_io.save(loaded, target)


def build(folder: str | os.PathLike, config: VlmConfig = PRESETS["small"], name: str = "",
          progress=None) -> Path:
    """Export the pipeline into ``folder`` (``parts.json`` + the ONNX parts) and return it.

    Everything is written into a temporary folder inside ``folder`` and moved into place only
    when every part exported and matched PyTorch; ``parts.json`` comes last, after a record of
    every file's size (``parts.build.json``), so an interrupted build leaves nothing that
    :func:`finished` accepts. Needs the [export] extra."""
    from onnxcomp import export, parts
    from onnxcomp import model as model_io
    from onnxcomp.report import write_json_atomic

    export.require_torch()
    say = progress or (lambda message: None)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=".onnxcomp-vlm-", dir=folder))
    try:
        with model_io.terminate_cleanly():
            modules = build_modules(config)
            seconds = {}
            for part, prepared in _exportables(config, modules).items():
                if name:
                    prepared.metadata["onnxcomp.zoo.name"] = name
                prepared.metadata["onnxcomp.zoo.part"] = part
                began = time.perf_counter()
                say(f"exporting {part}")
                target = staging / FILES[part]
                raw = target.with_name("raw." + target.name) if part.startswith("decoder") \
                    else target
                result = export.export_prepared(prepared, raw, opset=OPSET, source=SOURCE)
                if not result.ok:
                    raise UserError(f"{part}: the export differs from PyTorch by "
                                    f"{result.max_abs_error:.2e}")
                if raw != target:
                    _tie_output_projection(raw, target, "model.embed_tokens")
                    raw.unlink()
                seconds[part] = time.perf_counter() - began
            began = time.perf_counter()
            say("merging the decoders")
            merged = parts.merge_decoders(
                model_io.load(staging / FILES["decoder"]).proto,
                model_io.load(staging / FILES["decoder_with_past"]).proto)
            tags = {"onnxcomp.export.source": SOURCE, "onnxcomp.zoo.part": "decoder_merged",
                    "onnxcomp.zoo.config": json.dumps(dataclasses.asdict(config)),
                    **({"onnxcomp.zoo.name": name} if name else {})}
            kept = [p for p in merged.metadata_props if p.key not in tags]  # merge copied them
            del merged.metadata_props[:]
            merged.metadata_props.extend(kept)
            for key, value in tags.items():
                merged.metadata_props.add(key=key, value=value)
            model_io.save(merged, staging / FILES["decoder_merged"])
            seconds["decoder_merged"] = time.perf_counter() - began
            manifest = parts_manifest(config)
            sizes = {file.name: file.stat().st_size for file in sorted(staging.iterdir())}
            record = {"source": SOURCE, "config": dataclasses.asdict(config),
                      "parameters": parameter_count(config), "file_bytes": sizes,
                      "seconds": seconds, "total_seconds": time.perf_counter() - started}
            (folder / PARTS_FILE).unlink(missing_ok=True)  # an old pipeline is no more finished
            for file in sizes:
                os.replace(staging / file, folder / file)
            write_json_atomic(record, folder / RECORD_FILE)
            write_json_atomic(manifest, folder / PARTS_FILE)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def parts_manifest(config: VlmConfig) -> dict:
    """The ``parts.json`` content (format ``onnxcomp-parts/1``)."""
    return {
        "format": "onnxcomp-parts/1",
        "task": "image-to-text",
        "parts": [{"name": part, "file": FILES[part], "role": ROLES[part]} for part in FILES],
        "generation": {"start_ids": list(config.start_ids), "eos_id": config.eos_id,
                       "max_new_tokens": config.max_new_tokens},
    }


def finished(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` holds a complete build: ``parts.json``, and every file of the build
    record at its recorded size."""
    folder = Path(folder)
    try:
        record = json.loads((folder / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    if not (folder / PARTS_FILE).is_file():
        return False
    sizes = record.get("file_bytes") or {}
    return bool(sizes) and all((folder / file).is_file()
                               and (folder / file).stat().st_size == size
                               for file, size in sizes.items())


def fetch(name: str, folder: Path) -> Path:
    """The pipeline folder (holding ``parts.json``), built once into ``folder`` (needs the
    [export] extra the first time; about 1.64 GB of files: each decoder file holds the
    decoder's ~540 MB of weights)."""
    config = _config_for(name)
    if not finished(folder):
        build(folder, config, name=name)
    return Path(folder)


# ---------------------------------------------------------------------------------------------
# data

SPLITS = {"calib": 0, "eval": 1, "heldout": 2}


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    axis = np.linspace(0.0, 1.0, size, dtype=np.float32)
    return np.meshgrid(axis, axis, indexing="ij")


def gradient_shapes(rng: np.random.Generator, size: int) -> np.ndarray:
    """float32 [size, size, 3] in [0, 1]: a linear colour gradient under 2-6 filled shapes
    (rectangles, ellipses, triangles) of random colours (the calib and eval family)."""
    from PIL import Image, ImageDraw

    y, x = _grid(size)
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x + np.sin(angle) * y)
    ramp = (ramp - ramp.min()) / max(float(np.ptp(ramp)), 1e-6)
    start, end = rng.uniform(0, 1, size=(2, 3)).astype(np.float32)
    base = start + ramp[..., None] * (end - start)
    image = Image.fromarray((base * 255).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(2, 7))):
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        x0, y0 = rng.uniform(-0.1, 0.9, size=2) * size
        w, h = rng.uniform(0.1, 0.5, size=2) * size
        kind = int(rng.integers(3))
        if kind == 0:
            draw.rectangle([x0, y0, x0 + w, y0 + h], fill=colour)
        elif kind == 1:
            draw.ellipse([x0, y0, x0 + w, y0 + h], fill=colour)
        else:
            points = [tuple(p) for p in (rng.uniform(0, 1, size=(3, 2)) * size)]
            draw.polygon(points, fill=colour)
    return np.asarray(image, dtype=np.float32) / 255.0


def text_image(rng: np.random.Generator, size: int) -> np.ndarray:
    """2-5 rendered text lines (onnxcomp.zoo.text_render) pasted on paper, [size, size, 3]."""
    from onnxcomp.zoo import text_render

    paper = rng.uniform(0.75, 1.0, size=3).astype(np.float32)
    image = np.ones((size, size, 3), np.float32) * paper
    top = int(rng.integers(0, max(size // 8, 1)))
    for _ in range(int(rng.integers(2, 6))):
        style = text_render.random_style(rng, (max(size // 16, 6), max(size // 7, 8)))
        line = text_render.render_line(text_render.random_text(rng), style, rng)
        line = line[: size - top, :size].astype(np.float32) / 255.0
        if line.shape[0] <= 0:
            break
        left = int(rng.integers(0, max(size - line.shape[1], 0) + 1))
        image[top:top + line.shape[0], left:left + line.shape[1]] = line
        top += line.shape[0] + int(rng.integers(0, max(size // 20, 1) + 1))
        if top >= size:
            break
    return image


def noise_texture(rng: np.random.Generator, size: int) -> np.ndarray:
    """Multi-scale value noise (octaves of upsampled random grids), tinted, [size, size, 3]."""
    from PIL import Image

    plane = np.zeros((size, size), np.float32)
    for octave in range(1, 6):
        cells = 2 ** octave
        small = rng.uniform(-1, 1, size=(cells, cells)).astype(np.float32)
        up = Image.fromarray(small, mode="F").resize((size, size), Image.BICUBIC)
        plane += np.asarray(up) * 0.6 ** octave
    plane = (plane - plane.min()) / max(float(np.ptp(plane)), 1e-6)
    low, high = rng.uniform(0, 1, size=(2, 3)).astype(np.float32)
    return np.clip(low + plane[..., None] * (high - low), 0.0, 1.0)


def blurred_blobs(rng: np.random.Generator, size: int) -> np.ndarray:
    """Photo-like: many overlapping soft colour blobs, then a Gaussian blur, [size, size, 3]."""
    from PIL import Image, ImageFilter

    y, x = _grid(size)
    image = np.broadcast_to(rng.uniform(0, 1, size=3).astype(np.float32),
                            (size, size, 3)).copy()
    for _ in range(int(rng.integers(8, 20))):
        cx, cy = rng.uniform(0, 1, size=2)
        radius = rng.uniform(0.03, 0.25)
        weight = np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius ** 2))[..., None]
        image = image * (1 - weight) + weight * rng.uniform(0, 1, size=3).astype(np.float32)
    blurred = Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0) * size / 224))
    return np.asarray(blurred, dtype=np.float32) / 255.0


FAMILIES = {"calib": (gradient_shapes,), "eval": (gradient_shapes,),
            "heldout": (text_image, noise_texture, blurred_blobs)}


def make_batch(config: VlmConfig, split: str, index: int, seed: int = 0
               ) -> dict[str, np.ndarray]:
    """``{"pixel_values": float32 [1, 3, S, S]}``, normalized with CLIP's mean and std."""
    rng = np.random.default_rng([seed, 22, SPLITS[split], index])
    families = FAMILIES[split]
    image = families[index % len(families)](rng, config.vision.image_size)
    pixels = (image.transpose(2, 0, 1) - MEAN[:, None, None]) / STD[:, None, None]
    return {"pixel_values": pixels[None].astype(np.float32)}


def data(config: VlmConfig, split: str, count: int, seed: int = 0, name: str = "vlm"
         ) -> Dataset:
    if split not in SPLITS:
        raise UserError(f"unknown data split {split!r}: use {', '.join(SPLITS)}")
    return Dataset(f"{name}:{split}:{count}", count,
                   lambda i: make_batch(config, split, i, seed))


def dataset(name: str, split: str, count: int, seed: int = 0) -> Dataset:
    return data(_config_for(name), split, count, seed, name)
