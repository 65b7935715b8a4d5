"""clip-vit-b32: the Hugging Face CLIP architecture at ViT-B/32 size, seeded random weights.

``transformers.CLIPModel`` with the sizes of openai/clip-vit-base-patch32 (vision: 768 hidden,
12 layers, 12 heads, patch 32, image 224, MLP 3072; text: 512 hidden, 12 layers, 8 heads, MLP
2048, vocabulary 49408, 77 positions; projection 512; quick-GELU), built under
``torch.manual_seed(0)`` (no weights can come from a model hub here). transformers initializes
every bias to zero and every LayerNorm to (1, 0); real checkpoints have neither, and equal
tensors are what exporters merge across layers, so the biases and norms are then drawn, seeded,
around those values (biases N(0, 0.02²), norm scales N(1, 0.1²), norm shifts N(0, 0.02²)).

Exported once, with the [export] extra, to ``<cache>/clip-vit-b32/model.onnx`` (~605 MB):
inputs ``pixel_values`` float32 ``[batch, 3, 224, 224]``, ``input_ids`` and
``attention_mask`` int64 ``[batch, 77]``; outputs ``image_embeds`` and ``text_embeds``
``[batch, 512]``, L2-normalized, as ``CLIPModel`` returns them.

Text pooling: transformers pools CLIP's text at the first ``eos_token_id`` (its configs with
``eos_token_id == 2`` use the largest id instead). The model is configured with BOS 49406 and
EOS 49407 = vocabulary - 1, and the data puts EOS after the words, so both rules pick the same
position.

Data: batches of 4 image/text pairs. Images are smooth (a few random low-frequency waves and
soft blobs per channel, in [0, 1]), normalized with CLIP's mean and std. Texts are BOS, 4–40
word ids drawn from a Zipf-like law over the BPE range (256–49405), EOS, then padding (id 0) the
mask drops. Calibration and evaluation batches come from different seed streams.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from onnxcomp.calibration import Dataset
from onnxcomp.errors import UserError
from onnxcomp.zoo import exported

SEED = 0
BATCH = 4
IMAGE_SIZE = 224
POSITIONS = 77
VOCAB = 49408
BOS, EOS, PAD = 49406, 49407, 0
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
SOURCE = ("transformers CLIPModel at ViT-B/32 size, random weights under torch.manual_seed(0) "
          "(onnxcomp.zoo.clip_vit)")
_SPLITS = {"calib": 0, "eval": 1}


def _check_name(name: str) -> None:
    if name != "clip-vit-b32":
        raise UserError(f"{name!r} is not the CLIP ViT-B/32 zoo model")


def config():
    """The ``CLIPConfig`` at ViT-B/32 size."""
    from transformers import CLIPConfig

    text = {"vocab_size": VOCAB, "hidden_size": 512, "intermediate_size": 2048,
            "num_hidden_layers": 12, "num_attention_heads": 8,
            "max_position_embeddings": POSITIONS, "bos_token_id": BOS, "eos_token_id": EOS,
            "pad_token_id": PAD, "hidden_act": "quick_gelu"}
    vision = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
              "num_attention_heads": 12, "patch_size": 32, "image_size": IMAGE_SIZE,
              "num_channels": 3, "hidden_act": "quick_gelu"}
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=512)


def build_model(seed: int = SEED, model_config=None):
    """The seeded ``CLIPModel`` (eval mode, eager attention)."""
    import torch
    from transformers import CLIPModel

    torch.manual_seed(seed)
    model = CLIPModel._from_config(model_config or config(), attn_implementation="eager")
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.1)
                module.bias.normal_(0.0, 0.02)
            elif isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_(0.0, 0.02)
    return model.float().eval()


def fetch(name: str, folder: Path) -> Path:
    """``folder/model.onnx``, built and exported once (needs [export]; about 30 s, 3 GB RAM)."""
    _check_name(name)
    from onnxcomp import export

    return exported.export_once(
        name, folder, SOURCE, lambda: export.hf_module().prepare_clip_model(build_model()))


# ---------------------------------------------------------------------------------------------
# data


def smooth_images(rng: np.random.Generator, count: int, size: int = IMAGE_SIZE) -> np.ndarray:
    """float32 [count, 3, size, size] in [0, 1]: low-frequency waves plus soft blobs."""
    axis = np.linspace(0.0, 1.0, size, dtype=np.float32)
    y, x = np.meshgrid(axis, axis, indexing="ij")
    images = np.empty((count, 3, size, size), dtype=np.float32)
    for i in range(count):
        for c in range(3):
            plane = np.full((size, size), rng.uniform(0.2, 0.8), dtype=np.float32)
            for _ in range(3):
                fx, fy = rng.uniform(0.5, 4.0, size=2)
                phase = rng.uniform(0, 2 * np.pi)
                plane += rng.uniform(0.05, 0.25) * np.sin(2 * np.pi * (fx * x + fy * y) + phase)
            for _ in range(2):
                cx, cy = rng.uniform(0, 1, size=2)
                radius = rng.uniform(0.05, 0.3)
                plane += rng.uniform(-0.4, 0.4) * np.exp(
                    -((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius ** 2))
            images[i, c] = np.clip(plane, 0.0, 1.0)
    return images


def token_batch(rng: np.random.Generator, count: int) -> tuple[np.ndarray, np.ndarray]:
    """input_ids and attention_mask, int64 [count, 77]: BOS, words, EOS, padding."""
    ids = np.full((count, POSITIONS), PAD, dtype=np.int64)
    mask = np.zeros((count, POSITIONS), dtype=np.int64)
    ranks = np.arange(1, BOS - 256 + 1, dtype=np.float64)
    weights = 1.0 / ranks ** 1.1
    weights /= weights.sum()
    for row in range(count):
        words = int(rng.integers(4, 41))
        ids[row, 0] = BOS
        ids[row, 1:words + 1] = 256 + rng.choice(len(ranks), size=words, p=weights)
        ids[row, words + 1] = EOS
        mask[row, :words + 2] = 1
    return ids, mask


def make_batch(split: str, index: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([seed, 11, _SPLITS[split], index])
    pixels = (smooth_images(rng, BATCH) - MEAN[:, None, None]) / STD[:, None, None]
    ids, mask = token_batch(rng, BATCH)
    return {"pixel_values": pixels.astype(np.float32), "input_ids": ids,
            "attention_mask": mask}


def dataset(name: str, split: str, count: int, seed: int = 0) -> Dataset:
    _check_name(name)
    if split not in _SPLITS:
        raise UserError(f"unknown data split {split!r}: use calib or eval")
    return Dataset(f"clip-vit-b32:{split}:{count}", count,
                   lambda i: make_batch(split, i, seed))
