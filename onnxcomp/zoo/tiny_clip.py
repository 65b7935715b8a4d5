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
matrices, small biases, LayerNorm gains near 1, so activations stay near unit scale.

The towers are random, but the two embeddings are *aligned* in closed form (no training): the
builder runs both towers (ONNX Runtime, one thread, no graph optimization) on a fixed set of
pairs from the data generator's ``fit`` split (disjoint from ``calib`` and ``eval``), centres the
pooled features by moving their mean into the final LayerNorms' biases, and sets
``visual_projection`` / ``text_projection`` to the top ``embed_dim`` directions of a ridge-
regularized canonical correlation analysis (CCA) of the two feature sets, each direction weighted
by its canonical correlation. A pair's image and text then map to nearby unit vectors, so
cross-modal recall@1 is far above chance and retrieval agreement after compression means
something. The same arguments give the same bytes on one machine.
"""

from __future__ import annotations

import colorsys
import json
import os
import tempfile
import zlib
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp.calibration import Dataset
from onnxcomp.errors import UserError

OPSET = 17
IR_VERSION = 8
# CLIP's image normalization, applied to the generated images.
IMAGE_MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
IMAGE_STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
BATCH = 8
# Gains on the N(0, 1/fan_in) init of the q/k projections and of the residual branches' output
# projections. Gain 2 on q/k made the text tower's pooled token attend to one word, so CCA could
# not read the caption from it (recall@1 0.19 with gains 2 / 2 against 0.6 with 1 / 1).
QK_GAIN = 1.0
OUT_GAIN = 1.0
# Build recipe version: bump whenever build() or the data generator changes what it produces;
# fetch() rebuilds a cached model whose recorded recipe differs.
RECIPE = "3"
# Alignment: pairs of the ``fit`` split the projections are fitted on, and the CCA ridge (a
# fraction of the mean feature variance added to each covariance's diagonal).
FIT_PAIRS = 2048
CCA_RIDGE = 0.1


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
    """The aligned tiny-clip graph with seeded weights (``mlp`` defaults to 4 x ``width``)."""
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
    _align(model, config, seed)
    helper.set_model_props(model, {"tiny_clip_config": json.dumps(asdict(config),
                                                                  sort_keys=True),
                                   "seed": str(seed), "tiny_clip_recipe": RECIPE})
    onnx.checker.check_model(model)
    return model


# ---------------------------------------------------------------------------------------------
# closed-form alignment of the two towers

_POOLED = {"image": ("vision.pool/Gather", "vision.post_layernorm.bias", "visual_projection.weight"),
           "text": ("text.pool/Gather", "text.final_layer_norm.bias", "text_projection.weight")}


def pooled_features(model: onnx.ModelProto, feeds: dict[str, np.ndarray]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Both towers' pooled features (before the projections), one ORT thread, no optimization."""
    import onnxruntime as ort

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    names = [_POOLED["image"][0], _POOLED["text"][0]]
    for name in names:
        probe.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(probe.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    image, text = session.run(names, feeds)
    return image, text


def _inverse_sqrt(covariance: np.ndarray) -> np.ndarray:
    ridge = CCA_RIDGE * np.trace(covariance) / len(covariance)
    values, vectors = np.linalg.eigh(covariance + ridge * np.eye(len(covariance)))
    return (vectors / np.sqrt(values)) @ vectors.T


def cca(image: np.ndarray, text: np.ndarray, k: int
        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Ridge CCA of centred features: projections [w, k'] per side and the correlations [k'].

    Whiten each side, SVD of the whitened cross-covariance, keep the top ``k' = min(k, w)``
    directions, each scaled by its canonical correlation (weaker directions count less)."""
    n = len(image)
    w_image = _inverse_sqrt(image.T @ image / n)
    w_text = _inverse_sqrt(text.T @ text / n)
    u, s, vt = np.linalg.svd(w_image @ (image.T @ text / n) @ w_text)
    k = min(k, len(s))
    return w_image @ u[:, :k] * s[:k], w_text @ vt[:k].T * s[:k], s[:k]


def _align(model: onnx.ModelProto, config: TinyClipConfig, seed: int) -> None:
    """Centre the pooled features and fit both projections by CCA on the ``fit`` split."""
    chunk = 256
    features: dict[str, list[np.ndarray]] = {"image": [], "text": []}
    for index in range(FIT_PAIRS // chunk):
        feeds, _ = make_pairs(seed, "fit", index, batch=chunk, config=config)
        image, text = pooled_features(model, feeds)
        features["image"].append(image.astype(np.float64))
        features["text"].append(text.astype(np.float64))
    pooled = {side: np.concatenate(rows) for side, rows in features.items()}
    means = {side: rows.mean(axis=0) for side, rows in pooled.items()}
    fitted = dict(zip(("image", "text"),
                      cca(pooled["image"] - means["image"], pooled["text"] - means["text"],
                          config.embed_dim)[:2]))
    initializers = {tensor.name: tensor for tensor in model.graph.initializer}
    for side, (_, bias_name, weight_name) in _POOLED.items():
        # Only the pooled token leaves the final LayerNorm, so its bias centres the features.
        bias = numpy_helper.to_array(initializers[bias_name]).astype(np.float64) - means[side]
        initializers[bias_name].CopyFrom(numpy_helper.from_array(bias.astype(np.float32),
                                                                 bias_name))
        weight = numpy_helper.to_array(initializers[weight_name]).copy()
        projection = fitted[side]
        # Same scale as the random init (the output is normalized, only directions matter).
        projection = projection * (config.width ** -0.5 / projection.std())
        weight[:, :projection.shape[1]] = projection
        initializers[weight_name].CopyFrom(numpy_helper.from_array(weight.astype(np.float32),
                                                                   weight_name))


def _recorded(path: Path) -> dict[str, str] | None:
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception:  # noqa: BLE001 - any unreadable file is rebuilt
        return None
    return {prop.key: prop.value for prop in model.metadata_props}


def fetch(name: str, folder: Path) -> Path:
    """Build the default tiny-clip into ``folder/model.onnx``.

    A cached file is kept when it records this recipe version, the default config and seed 0;
    otherwise (older recipe, other build, unreadable file) it is rebuilt."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "model.onnx"
    expected = {"tiny_clip_recipe": RECIPE, "seed": "0",
                "tiny_clip_config": json.dumps(asdict(_default_config()), sort_keys=True)}
    if target.is_file():
        recorded = _recorded(target)
        if recorded is not None and all(recorded.get(k) == v for k, v in expected.items()):
            return target
    data = build().SerializeToString()
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


def _default_config() -> TinyClipConfig:
    return TinyClipConfig(mlp=4 * TinyClipConfig().width)


# ---------------------------------------------------------------------------------------------
# data: related image + text pairs
#
# A pair is described by five factors the image shows and the caption names: hue (8), stripe
# orientation (4), stripe frequency (2), brightness (4) and saturation (3). The first three make
# the pair's topic (64 topics, the labels); brightness and saturation vary per pair, so most
# pairs in a batch of 64 differ in at least one factor and exact-pair retrieval is well posed
# (a pair whose five factors repeat elsewhere in the set is ambiguous by construction).
# Per-sample nuisance: hue jitter, stripe phase and frequency jitter, a random blob, pixel
# noise; for the text, one of two synonyms per factor word, two of four stop words, word order.

TOPICS = 64
FACTORS = (8, 4, 2, 4, 3)  # hue, orientation, frequency, brightness, saturation
FREQUENCIES = (1.5, 4.0)  # stripe cycles per image
STRIPE_AMPLITUDE = 0.35
SYNONYMS = 2
STOP_WORDS = 4
STOPS_PER_CAPTION = 2
PAD = 0
_SPLITS = {"calib": 0, "eval": 1, "fit": 2}
_SPLIT_TRIES = 64


def topic_factors(topic: int) -> tuple[int, int, int]:
    """A topic's hue, orientation and frequency indices."""
    return topic // 8, (topic // 2) % 4, topic % 2


@lru_cache(maxsize=8)
def _words(vocab: int) -> tuple[list[np.ndarray], np.ndarray]:
    """The fixed caption vocabulary: per factor [levels, synonyms] token ids, and stop words.

    Ids in [1, vocab - 1): 0 is padding and ``vocab - 1`` the end token the text tower pools."""
    needed = SYNONYMS * sum(FACTORS) + STOP_WORDS
    rng = np.random.default_rng(2_000_003)
    if vocab - 2 >= needed:
        ids = rng.permutation(np.arange(1, vocab - 1))[:needed]
    else:  # a toy vocabulary: words share ids
        ids = rng.integers(1, max(2, vocab - 1), size=needed)
    tables, start = [], 0
    for levels in FACTORS:
        tables.append(ids[start:start + levels * SYNONYMS].reshape(levels, SYNONYMS))
        start += levels * SYNONYMS
    return tables, ids[start:]


def pair_image(rng: np.random.Generator, factors: np.ndarray, size: int = 32) -> np.ndarray:
    """A smooth image [3, size, size] in [0, 1]: tinted oriented stripes plus a random blob."""
    hue, orientation, frequency, brightness, saturation = (int(f) for f in factors)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64) / size
    h = ((hue + rng.normal(0, 0.1)) / FACTORS[0]) % 1.0
    colour = np.array(colorsys.hsv_to_rgb(h, 0.35 + 0.3 * saturation, 0.35 + 0.2 * brightness))
    angle = np.pi * orientation / FACTORS[1] + rng.normal(0, 0.05)
    cycles = FREQUENCIES[frequency] * rng.uniform(0.9, 1.1)
    wave = np.sin(2 * np.pi * cycles * (np.cos(angle) * xx + np.sin(angle) * yy)
                  + rng.uniform(0, 2 * np.pi))
    image = colour[:, None, None] * (1 + STRIPE_AMPLITUDE * wave[None])
    cy, cx = rng.uniform(0.2, 0.8, size=2)
    radius = rng.uniform(0.08, 0.2)
    blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (2 * radius ** 2))
    image += 0.3 * blob[None] * (rng.uniform(0, 1, size=(3, 1, 1)) - 0.5)
    image += rng.normal(0, 0.02, size=image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32)


def pair_tokens(rng: np.random.Generator, factors: np.ndarray, config: TinyClipConfig,
                split: int) -> np.ndarray:
    """A caption: one word per factor and stop words, shuffled, then padding, then the end token.

    Each caption belongs to one split (its crc32 modulo 3), so the splits never share one (for
    a toy vocabulary or length, after a bounded number of redraws the last draw is kept)."""
    tables, stops = _words(config.vocab)
    length = config.seq_len
    for _ in range(_SPLIT_TRIES):
        words = [tables[i][int(f), rng.integers(SYNONYMS)] for i, f in enumerate(factors)]
        words += list(rng.choice(stops, size=STOPS_PER_CAPTION))
        words = [words[i] for i in rng.permutation(len(words))][:length - 1]
        ids = np.full(length, PAD, dtype=np.int64)
        ids[:len(words)] = words
        ids[-1] = config.vocab - 1
        if zlib.crc32(ids.tobytes()) % len(_SPLITS) == split:
            break
    return ids


def _batch_rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), _SPLITS[split], int(index)])


def make_pairs(seed: int, split: str, index: int, batch: int = BATCH,
               config: TinyClipConfig | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """One batch of pairs and their topics (``split``: calib, eval, or fit for the alignment)."""
    config = config or TinyClipConfig()
    rng = _batch_rng(seed, split, index)
    topics = rng.integers(0, TOPICS, size=batch)
    factors = np.array([topic_factors(int(t)) + (int(rng.integers(FACTORS[3])),
                                                 int(rng.integers(FACTORS[4])))
                        for t in topics])
    images = np.stack([pair_image(rng, f, config.image_size) for f in factors])
    pixels = (images - IMAGE_MEAN[None, :, None, None]) / IMAGE_STD[None, :, None, None]
    ids = np.stack([pair_tokens(rng, f, config, _SPLITS[split]) for f in factors])
    return {"input_ids": ids, "pixel_values": pixels.astype(np.float32)}, topics


def dataset(name: str, split: str, count: int, seed: int = 0) -> Dataset:
    """``count`` batches of 8 related (image, text) pairs; labels: the pairs' topic ids."""
    if split not in ("calib", "eval"):
        raise UserError(f"unknown data split {split!r}: use calib or eval")
    if count <= 0:
        raise UserError(f"the data count must be positive, got {count}")

    def make(i: int) -> dict[str, np.ndarray]:
        if not 0 <= i < count:
            raise IndexError(i)
        return make_pairs(seed, split, i)[0]

    # The topics are the generator's first draw, so the labels cost no rendering.
    labels = [_batch_rng(seed, split, i).integers(0, TOPICS, size=BATCH).tolist()
              for i in range(count)]
    return Dataset(f"{name}:{split}:{count}", count, make, labels)
