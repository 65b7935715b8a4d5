"""tiny-clip: a small CLIP-like dual encoder written with onnx.helper, seeded random weights.

Image tower: ``pixel_values`` [batch, 3, S, S] -> patch embedding (Conv, kernel = stride = P)
-> tokens + class token + position embedding -> LayerNormalization -> pre-LN transformer blocks
-> final LayerNormalization -> class token -> projection -> L2 normalization -> ``image_embeds``.
Text tower: ``input_ids`` [batch, L] int64 -> token embedding (Gather) + position embedding ->
pre-LN transformer blocks with a causal mask -> final LayerNormalization -> last token ->
projection -> L2 normalization -> ``text_embeds``.

Each block is spelled out the way PyTorch exporters write an unfused transformer, so the passes
meet the patterns they meet in real exports: Linear = MatMul with an [in, out] initializer then
Add of the bias; attention = separate q/k/v Linears, Reshape to heads, Transpose, MatMul, scale
Mul, (mask Add), Softmax, MatMul, Transpose, Reshape, output Linear, residual Add; MLP = Linear,
GELU written with Erf (``0.5 * x * (1 + erf(x / sqrt(2)))``), Linear, residual Add.

Weights are drawn from ``numpy.random.default_rng(seed)`` in a fixed order: N(0, 1/fan_in)
matrices (gain 2 on q/k and on the residual branches' output projections), small biases, LayerNorm gains near 1, so activations stay near unit scale and different
inputs give clearly different embeddings. The same arguments always give the same bytes.
"""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.calibration import Dataset
from onnxcomp.errors import OnnxcompError

OPSET = 17
IR_VERSION = 8
# CLIP's image normalization, applied to the generated images.
IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
BATCH = 8
# Gains on the N(0, 1/fan_in) init of the q/k projections (sharper attention) and of the residual
# branches' output projections (stronger branches). With gain 1 the untrained class token barely
# depends on the image: the image embeddings of 32 eval pairs had mean pairwise cosine 0.79; with
# 2 and 2 it is 0.57 (tests/test_zoo.py::test_tiny_clip_embeddings_are_spread guards this).
QK_GAIN = 2.0
OUT_GAIN = 2.0


@dataclass(frozen=True)
class TinyClipConfig:
    width: int = 64
    layers: int = 2
    heads: int = 4
    mlp: int = 256
    image_size: int = 32
    patch: int = 8
    vocab: int = 1000
    seq_len: int = 16
    embed_dim: int = 32

    def __post_init__(self) -> None:
        for field_name, value in asdict(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{field_name} must be a positive integer, got {value!r}")
        if self.width % self.heads:
            raise ValueError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch {self.patch}")
        if self.vocab < 2:
            raise ValueError(f"vocab must be at least 2, got {self.vocab}")

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2


class _Builder:
    """Collects nodes and initializers; weights come from one generator in call order."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []

    def const(self, name: str, value: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def normal(self, name: str, shape: tuple[int, ...], std: float) -> str:
        return self.const(name, (self.rng.standard_normal(shape) * std).astype(np.float32))

    def op(self, op_type: str, inputs: list[str], output: str, **attributes) -> str:
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output

    def linear(self, x: str, prefix: str, fan_in: int, fan_out: int, bias: bool = True,
               gain: float = 1.0) -> str:
        weight = self.normal(f"{prefix}.weight", (fan_in, fan_out), gain * fan_in ** -0.5)
        y = self.op("MatMul", [x, weight], f"{prefix}/MatMul")
        if not bias:
            return y
        b = self.normal(f"{prefix}.bias", (fan_out,), 0.02)
        return self.op("Add", [y, b], f"{prefix}/Add")

    def layer_norm(self, x: str, prefix: str, width: int) -> str:
        gamma = self.const(f"{prefix}.weight", (1.0 + 0.05 * self.rng.standard_normal(width))
                           .astype(np.float32))
        beta = self.normal(f"{prefix}.bias", (width,), 0.02)
        return self.op("LayerNormalization", [x, gamma, beta], f"{prefix}/LayerNormalization",
                       axis=-1, epsilon=1e-5)

    def block(self, x: str, prefix: str, config: TinyClipConfig, mask: str | None) -> str:
        width, heads = config.width, config.heads
        head_dim = width // heads
        h = self.layer_norm(x, f"{prefix}.ln_1", width)
        to_heads = self.const(f"{prefix}.attn.heads_shape",
                              np.array([0, 0, heads, head_dim], dtype=np.int64))
        split = {}
        for part, perm in (("q", [0, 2, 1, 3]), ("k", [0, 2, 3, 1]), ("v", [0, 2, 1, 3])):
            projected = self.linear(h, f"{prefix}.attn.{part}_proj", width, width,
                                    gain=QK_GAIN if part in "qk" else 1.0)
            shaped = self.op("Reshape", [projected, to_heads], f"{prefix}.attn.{part}/Reshape")
            split[part] = self.op("Transpose", [shaped], f"{prefix}.attn.{part}/Transpose",
                                  perm=perm)
        scores = self.op("MatMul", [split["q"], split["k"]], f"{prefix}.attn.scores/MatMul")
        scale = self.const(f"{prefix}.attn.scale", np.array(head_dim ** -0.5, dtype=np.float32))
        scores = self.op("Mul", [scores, scale], f"{prefix}.attn.scores/Mul")
        if mask is not None:
            scores = self.op("Add", [scores, mask], f"{prefix}.attn.scores/Add_mask")
        probs = self.op("Softmax", [scores], f"{prefix}.attn/Softmax", axis=-1)
        context = self.op("MatMul", [probs, split["v"]], f"{prefix}.attn.context/MatMul")
        context = self.op("Transpose", [context], f"{prefix}.attn.context/Transpose",
                          perm=[0, 2, 1, 3])
        merged_shape = self.const(f"{prefix}.attn.merged_shape",
                                  np.array([0, 0, width], dtype=np.int64))
        context = self.op("Reshape", [context, merged_shape], f"{prefix}.attn.context/Reshape")
        attended = self.linear(context, f"{prefix}.attn.out_proj", width, width, gain=OUT_GAIN)
        x = self.op("Add", [x, attended], f"{prefix}.attn/residual")

        h = self.layer_norm(x, f"{prefix}.ln_2", width)
        h = self.linear(h, f"{prefix}.mlp.fc1", width, config.mlp)
        h = self._gelu(h, f"{prefix}.mlp.gelu")
        h = self.linear(h, f"{prefix}.mlp.fc2", config.mlp, width, gain=OUT_GAIN)
        return self.op("Add", [x, h], f"{prefix}.mlp/residual")

    def _gelu(self, x: str, prefix: str) -> str:
        sqrt2 = self.const(f"{prefix}.sqrt2", np.array(np.sqrt(2.0), dtype=np.float32))
        one = self.const(f"{prefix}.one", np.array(1.0, dtype=np.float32))
        half = self.const(f"{prefix}.half", np.array(0.5, dtype=np.float32))
        scaled = self.op("Div", [x, sqrt2], f"{prefix}/Div")
        erf = self.op("Erf", [scaled], f"{prefix}/Erf")
        shifted = self.op("Add", [erf, one], f"{prefix}/Add")
        product = self.op("Mul", [x, shifted], f"{prefix}/Mul")
        return self.op("Mul", [product, half], f"{prefix}/Mul_half")

    def normalize(self, x: str, output: str) -> str:
        norm = self.op("ReduceL2", [x], f"{output}/ReduceL2", axes=[-1], keepdims=1)
        self.nodes.append(helper.make_node("Div", [x, norm], [output], name=f"{output}/Div"))
        return output


def _image_tower(b: _Builder, config: TinyClipConfig) -> None:
    width, patch = config.width, config.patch
    conv_w = b.normal("vision.patch_embed.weight", (width, 3, patch, patch),
                      (3 * patch * patch) ** -0.5)
    grid = b.op("Conv", ["pixel_values", conv_w], "vision.patch_embed/Conv",
                kernel_shape=[patch, patch], strides=[patch, patch])
    flat_shape = b.const("vision.flat_shape", np.array([0, width, -1], dtype=np.int64))
    tokens = b.op("Reshape", [grid, flat_shape], "vision.patch_embed/Reshape")
    tokens = b.op("Transpose", [tokens], "vision.patch_embed/Transpose", perm=[0, 2, 1])

    class_token = b.normal("vision.class_embedding", (1, 1, width), 0.1)
    batch = b.op("Shape", ["pixel_values"], "vision.batch/Shape", start=0, end=1)
    tail = b.const("vision.class_shape_tail", np.array([1, width], dtype=np.int64))
    class_shape = b.op("Concat", [batch, tail], "vision.class_shape/Concat", axis=0)
    classes = b.op("Expand", [class_token, class_shape], "vision.class_embedding/Expand")
    x = b.op("Concat", [classes, tokens], "vision.embeddings/Concat", axis=1)
    position = b.normal("vision.position_embedding", (config.patches + 1, width), 0.1)
    x = b.op("Add", [x, position], "vision.embeddings/Add_position")
    x = b.layer_norm(x, "vision.pre_layrnorm", width)
    for layer in range(config.layers):
        x = b.block(x, f"vision.layers.{layer}", config, mask=None)
    x = b.layer_norm(x, "vision.post_layernorm", width)
    first = b.const("vision.class_index", np.array(0, dtype=np.int64))
    pooled = b.op("Gather", [x, first], "vision.pool/Gather", axis=1)
    projected = b.linear(pooled, "visual_projection", width, config.embed_dim, bias=False)
    b.normalize(projected, "image_embeds")


def _text_tower(b: _Builder, config: TinyClipConfig) -> None:
    width, length = config.width, config.seq_len
    table = b.normal("text.token_embedding.weight", (config.vocab, width), 1.0)
    x = b.op("Gather", [table, "input_ids"], "text.token_embedding/Gather", axis=0)
    position = b.normal("text.position_embedding", (length, width), 0.1)
    x = b.op("Add", [x, position], "text.embeddings/Add_position")
    causal = np.triu(np.full((length, length), -1e4, dtype=np.float32), k=1)
    mask = b.const("text.causal_mask", causal)
    for layer in range(config.layers):
        x = b.block(x, f"text.layers.{layer}", config, mask=mask)
    x = b.layer_norm(x, "text.final_layer_norm", width)
    last = b.const("text.last_index", np.array(length - 1, dtype=np.int64))
    pooled = b.op("Gather", [x, last], "text.pool/Gather", axis=1)
    projected = b.linear(pooled, "text_projection", width, config.embed_dim, bias=False)
    b.normalize(projected, "text_embeds")


def build(seed: int = 0, width: int = 64, layers: int = 2, heads: int = 4, mlp: int | None = None,
          image_size: int = 32, patch: int = 8, vocab: int = 1000, seq_len: int = 16,
          embed_dim: int = 32) -> onnx.ModelProto:
    """The tiny-clip graph with seeded weights (``mlp`` defaults to 4 x ``width``)."""
    config = TinyClipConfig(width=width, layers=layers, heads=heads,
                            mlp=4 * width if mlp is None else mlp, image_size=image_size,
                            patch=patch, vocab=vocab, seq_len=seq_len, embed_dim=embed_dim)
    return build_from_config(config, seed)


def build_from_config(config: TinyClipConfig, seed: int = 0) -> onnx.ModelProto:
    b = _Builder(np.random.default_rng(seed))
    _image_tower(b, config)
    _text_tower(b, config)
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", config.seq_len]),
        helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT,
                                      ["batch", 3, config.image_size, config.image_size]),
    ]
    outputs = [
        helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT,
                                      ["batch", config.embed_dim]),
        helper.make_tensor_value_info("text_embeds", TensorProto.FLOAT,
                                      ["batch", config.embed_dim]),
    ]
    graph = helper.make_graph(b.nodes, "tiny_clip", inputs, outputs, b.initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="onnxcomp.zoo.tiny_clip")
    model.ir_version = IR_VERSION
    helper.set_model_props(model, {"tiny_clip_config": json.dumps(asdict(config),
                                                                  sort_keys=True),
                                   "seed": str(seed)})
    onnx.checker.check_model(model)
    return model


def fetch(name: str, folder: Path) -> Path:
    """Build the default tiny-clip into ``folder/model.onnx`` (kept when already identical)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.onnx"
    data = build().SerializeToString()
    if target.is_file() and target.read_bytes() == data:
        return target
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".build-", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
    return target


# ---------------------------------------------------------------------------------------------
# data: related image + text pairs

TOPICS = 64
_SPLITS = {"calib": 0, "eval": 1}


def _topic(topic: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A topic's colour (3), base frequencies (2) and key tokens (4)."""
    rng = np.random.default_rng([int(seed), 1_000_003, topic])
    colour = rng.uniform(0.1, 0.9, size=3)
    frequency = rng.uniform(0.5, 3.0, size=2)
    tokens = rng.integers(1, TinyClipConfig().vocab, size=4)
    return colour, frequency, tokens


def pair_image(rng: np.random.Generator, topic: int, seed: int, size: int = 32) -> np.ndarray:
    """A smooth image [3, size, size] in [0, 1]: sinusoids and blobs tinted by the topic."""
    colour, frequency, _ = _topic(topic, seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    image = np.zeros((3, size, size), dtype=np.float32)
    for _ in range(3):
        fx, fy = frequency * rng.uniform(0.6, 1.6, size=2)
        phase = rng.uniform(0, 2 * np.pi)
        wave = np.sin(2 * np.pi * (fx * xx + fy * yy) + phase)
        image += rng.uniform(0.1, 0.3) * wave[None] * rng.uniform(0.3, 1.0, size=(3, 1, 1))
    for _ in range(int(rng.integers(1, 4))):
        cx, cy = rng.uniform(0.1, 0.9, size=2)
        radius = rng.uniform(0.08, 0.3)
        blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius ** 2))
        tint = np.clip(colour + rng.normal(0, 0.15, size=3), 0, 1) - 0.5
        image += blob[None] * tint[:, None, None] * rng.uniform(0.5, 1.2)
    image += colour[:, None, None] * 0.6 + rng.normal(0, 0.02, size=image.shape)
    return np.clip(image, 0.0, 1.0)


def pair_tokens(rng: np.random.Generator, topic: int, seed: int, config: TinyClipConfig,
                split_bit: int) -> np.ndarray:
    """Token ids in [1, vocab): random words with the topic's key tokens repeated among them.

    Each sequence belongs to one split (a bit of its crc32), so the splits never share one."""
    _, _, keys = _topic(topic, seed)
    keys = keys % config.vocab
    keys[keys == 0] = 1
    while True:
        ids = rng.integers(1, config.vocab, size=config.seq_len)
        count = int(rng.integers(3, max(4, config.seq_len // 2)))
        positions = rng.choice(config.seq_len, size=min(count, config.seq_len), replace=False)
        ids[positions] = rng.choice(keys, size=positions.size)
        ids = ids.astype(np.int64)
        if zlib.crc32(ids.tobytes()) & 1 == split_bit:
            return ids


def _batch_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLITS[split], int(index)])


def make_pairs(seed: int, split: str, index: int, batch: int = BATCH,
               config: TinyClipConfig | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One batch of pairs and their topics."""
    config = config or TinyClipConfig()
    rng = _batch_rng(seed, split, index)
    topics = rng.integers(0, TOPICS, size=batch)
    images = np.stack([pair_image(rng, int(t), seed, config.image_size) for t in topics])
    pixels = (images - IMAGE_MEAN[None, :, None, None]) / IMAGE_STD[None, :, None, None]
    ids = np.stack([pair_tokens(rng, int(t), seed, config, _SPLITS[split]) for t in topics])
    return {"input_ids": ids, "pixel_values": pixels.astype(np.float32)}, topics


def dataset(name: str, split: str, count: int, seed: int = 0) -> Dataset:
    """``count`` batches of 8 related (image, text) pairs; labels: the pairs' topic ids."""
    if split not in _SPLITS:
        raise OnnxcompError(f"unknown data split {split!r}: use calib or eval")
    if count <= 0:
        raise OnnxcompError(f"the data count must be positive, got {count}")

    def make(i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < count:
            raise IndexError(i)
        return make_pairs(seed, split, i)[0]

    # The topics are the generator's first draw, so the labels cost no rendering.
    labels = [_batch_rng(seed, split, i).integers(0, TOPICS, size=BATCH).tolist()
              for i in range(count)]
    return Dataset(f"{name}:{split}:{count}", count, make, labels)
