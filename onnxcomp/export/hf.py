"""Hugging Face model folders (and in-memory ``transformers`` models) → :class:`Exportable`.

Architectures, by ``model_type`` in ``config.json``:

- BERT-like encoders (``ENCODER_TYPES``): inputs ``input_ids``, ``attention_mask`` and, where
  the model has more than one token type, ``token_type_ids``: int64 ``[batch, sequence]``.
  Outputs ``last_hidden_state`` ``[batch, sequence, hidden]`` and ``pooler_output``
  ``[batch, hidden]`` when the folder holds trained pooler weights.
  A sentence-transformers folder (``modules.json``: Transformer, Pooling, optionally Normalize)
  gives ``token_embeddings`` and ``sentence_embedding`` instead, computed as
  sentence-transformers does: mean over the tokens the mask keeps (or CLS, or max, as its
  ``Pooling`` config says), then L2-normalized when ``Normalize`` is listed.
- ``clip`` (``CLIPModel``): inputs ``pixel_values`` float32 ``[batch, 3, S, S]``,
  ``input_ids`` and ``attention_mask`` int64 ``[batch, P]`` with P the text position count (77;
  fixed, CLIP tokenizers always pad to it). Outputs ``image_embeds`` and ``text_embeds``,
  L2-normalized, as ``CLIPModel`` returns them.

Models are loaded from local files only, never with remote code, with
``attn_implementation="eager"``: attention exports as MatMul → scale → Add(mask) → Softmax →
MatMul, the pattern ONNX Runtime's fusions and our passes recognize. The SDPA path scales q and
k separately and adds IsNaN/Where guards; ONNX Runtime's BERT fusion then found none of
MiniLM's 6 attention blocks (``benchmarks/export.py --compare-exporters``). Weights the folder lacks would be random: that is an
error, except for an unused pooler.
"""

from __future__ import annotations

import inspect
import json
import logging
from pathlib import Path

import torch
import transformers

from onnxcomp.errors import UserError
from onnxcomp.export.base import Exportable

ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "electra", "distilbert", "mpnet", "albert")
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls",
                 "pooling_mode_max_tokens": "max"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")
CHECK_SEED = 1234


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not readable JSON ({exc})") from None


def prepare_folder(folder: Path) -> Exportable:
    """An Exportable for a local Hugging Face (or sentence-transformers) model folder."""
    folder = Path(folder)
    pooling, normalize, model_folder = None, False, folder
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        pooling, normalize, model_folder = _sentence_transformers(folder, modules_file)
    config_file = model_folder / "config.json"
    if not config_file.is_file():
        raise UserError(f"{folder}: not a Hugging Face model folder (no config.json)")
    config = _read_json(config_file)
    if not isinstance(config, dict):
        raise UserError(f"{config_file}: not a model configuration (a JSON object)")
    model_type = config.get("model_type")
    architectures = config.get("architectures") or [model_type or "unknown"]
    if model_type not in ENCODER_TYPES and model_type != "clip":
        raise UserError(
            f"{folder}: unsupported architecture {architectures[0]} (model_type "
            f"{model_type!r}); supported: BERT-like encoders ({', '.join(ENCODER_TYPES)}) "
            "and CLIPModel")
    if not any((model_folder / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"{model_folder}: no weights (expected one of "
                            f"{', '.join(WEIGHT_FILES)})")
    model = _load(model_folder, model_type)
    if model_type == "clip":
        prepared = prepare_clip_model(model)
    else:
        prepared = prepare_encoder_model(model, pooling=pooling, normalize=normalize)
    if pooling:
        st_config = model_folder / "sentence_bert_config.json"
        if st_config.is_file():
            max_length = _read_json(st_config).get("max_seq_length")
            if max_length:
                prepared.metadata["onnxcomp.export.max_seq_length"] = str(max_length)
    return prepared


def _sentence_transformers(folder: Path, modules_file: Path) -> tuple[str | None, bool, Path]:
    modules = _read_json(modules_file)
    pooling, normalize, model_folder = None, False, folder
    for module in modules if isinstance(modules, list) else []:
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        path = folder / module.get("path", "")
        if not path.resolve().is_relative_to(folder.resolve()):
            raise UserError(f"{modules_file}: module path {module.get('path')!r} leaves "
                                "the folder")
        if kind == "Transformer":
            model_folder = path
        elif kind == "Pooling":
            settings = _read_json(path / "config.json")
            modes = [mode for key, mode in POOLING_MODES.items() if settings.get(key)]
            others = [key for key, value in settings.items()
                      if key.startswith("pooling_mode") and value and key not in POOLING_MODES]
            if len(modes) != 1 or others:
                raise UserError(f"{path}: unsupported pooling {modes + others}; supported: "
                                    "exactly one of mean, cls, max")
            pooling = modes[0]
        elif kind == "Normalize":
            normalize = True
        else:
            raise UserError(f"{modules_file}: unsupported sentence-transformers module "
                                f"{module.get('type')!r} (supported: Transformer, Pooling, "
                                "Normalize)")
    return pooling, normalize, model_folder


def _load(folder: Path, model_type: str):
    model_class = transformers.CLIPModel if model_type == "clip" else transformers.AutoModel
    progress_bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # the library prints nothing itself
    try:
        model, info = model_class.from_pretrained(
            str(folder), local_files_only=True, trust_remote_code=False,
            attn_implementation="eager", output_loading_info=True)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{folder}: transformers could not load the model: {first}") \
            from exc
    finally:
        if progress_bars:
            transformers.utils.logging.enable_progress_bar()
    missing = [key for key in info.get("missing_keys", ())
               if not key.startswith("pooler.") and "position_ids" not in key]
    if missing:
        shown = ", ".join(sorted(missing)[:5])
        raise UserError(f"{folder}: {len(missing)} weights missing from the folder "
                            f"(e.g. {shown}); they would be random")
    if any(key.startswith("pooler.") for key in info.get("missing_keys", ())):
        model.pooler = None  # untrained: not worth an output
    logging.getLogger(__name__).debug("loaded %s from %s", type(model).__name__, folder)
    return model.float().eval()


# ---------------------------------------------------------------------------------------------
# encoders


class EncoderWrapper(torch.nn.Module):
    """(input_ids, attention_mask[, token_type_ids]) → a tuple of tensors, pooled if asked."""

    def __init__(self, model, token_types: bool, pooling: str | None, normalize: bool) -> None:
        super().__init__()
        self.model = model
        self.token_types = token_types
        self.pooling = pooling
        self.normalize = normalize
        self.pooler = getattr(model, "pooler", None) is not None

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        extra = {"token_type_ids": token_type_ids} if self.token_types else {}
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, **extra)
        hidden = out.last_hidden_state
        if self.pooling is None:
            return (hidden, out.pooler_output) if self.pooler else (hidden,)
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        if self.pooling == "cls":
            sentence = hidden[:, 0]
        elif self.pooling == "max":
            sentence = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
        else:
            sentence = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)
        if self.normalize:
            sentence = torch.nn.functional.normalize(sentence, p=2, dim=1)
        return hidden, sentence


def _token_batch(generator: torch.Generator, batch: int, length: int, vocab: int,
                 padded_from: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(1, max(vocab, 2), (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.int64)
    if padded_from is not None and batch > 1:
        mask[-1, padded_from:] = 0
        ids[-1, padded_from:] = 0
    return ids, mask


def prepare_encoder_model(model, pooling: str | None = None, normalize: bool = False
                          ) -> Exportable:
    """An Exportable for a loaded BERT-like encoder (``pooling``: None, mean, cls or max)."""
    if pooling not in (None, "mean", "cls", "max"):
        raise ValueError(f"pooling must be None, mean, cls or max, got {pooling!r}")
    config = model.config
    accepts = inspect.signature(model.forward).parameters
    token_types = "token_type_ids" in accepts and getattr(config, "type_vocab_size", 0) > 1
    wrapper = EncoderWrapper(model, token_types, pooling, normalize).eval()
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if token_types else [])
    if pooling:
        outputs = ["token_embeddings", "sentence_embedding"]
    else:
        outputs = ["last_hidden_state"] + (["pooler_output"] if wrapper.pooler else [])
    # RoBERTa-style positions start after the padding index: leave room for it.
    longest = max(4, int(getattr(config, "max_position_embeddings", 512)) - 2)
    vocab = int(config.vocab_size)
    generator = torch.Generator().manual_seed(CHECK_SEED)

    def inputs(batch: int, length: int, padded_from: int | None = None) -> tuple:
        length = min(length, longest)
        ids, mask = _token_batch(generator, batch, length, vocab,
                                 min(padded_from, length - 1) if padded_from else None)
        return (ids, mask, torch.zeros_like(ids)) if token_types else (ids, mask)

    axes = {name: {0: "batch", 1: "sequence"} for name in names + outputs[:1]}
    if len(outputs) > 1:
        axes[outputs[1]] = {0: "batch"}
    architecture = type(model).__name__
    metadata = {}
    if pooling:
        architecture += f" + {pooling} pooling" + (" + L2 normalize" if normalize else "")
        metadata = {"onnxcomp.export.pooling": pooling,
                    "onnxcomp.export.normalize": str(normalize).lower()}
    return Exportable(wrapper, inputs(2, 16), tuple(names), tuple(outputs), axes, architecture,
                      check_inputs=[inputs(3, 11), inputs(1, 37), inputs(2, 9, padded_from=5)],
                      metadata=metadata)


# ---------------------------------------------------------------------------------------------
# CLIP


class ClipWrapper(torch.nn.Module):
    """(pixel_values, input_ids, attention_mask) → (image_embeds, text_embeds), normalized."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values, input_ids, attention_mask):
        out = self.model(pixel_values=pixel_values, input_ids=input_ids,
                         attention_mask=attention_mask)
        return out.image_embeds, out.text_embeds


def clip_eos_id(text_config) -> int:
    """The token CLIP's text tower pools at: with the legacy ``eos_token_id == 2`` configs
    transformers pools at the largest id (argmax), so the end token must be vocab - 1."""
    eos = int(getattr(text_config, "eos_token_id", 2) or 2)
    vocab = int(text_config.vocab_size)
    if eos == 2:
        return vocab - 1
    if not 0 < eos < vocab:
        raise UserError(f"CLIP text config: eos_token_id {eos} is outside the vocabulary "
                            f"of {vocab} tokens")
    return eos


def clip_text_batch(generator: torch.Generator, batch: int, text_config,
                    lengths: list[int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids laid out as CLIP's tokenizer does: BOS, words, EOS, then padding (id 0) that
    the mask drops. Word ids avoid BOS/EOS, so both pooling rules find the EOS position."""
    positions = int(text_config.max_position_embeddings)
    vocab = int(text_config.vocab_size)
    eos = clip_eos_id(text_config)
    bos = int(getattr(text_config, "bos_token_id", eos - 1) or eos - 1)
    ids = torch.randint(1, max(2, min(vocab - 2, eos - 1)), (batch, positions),
                        generator=generator)
    if lengths is None:
        lengths = torch.randint(3, positions - 1, (batch,), generator=generator).tolist()
    mask = torch.zeros(batch, positions, dtype=torch.int64)
    for row, length in enumerate(lengths):
        end = min(int(length), positions - 1)
        ids[row, 0] = bos
        ids[row, end] = eos
        ids[row, end + 1:] = 0
        mask[row, :end + 1] = 1
    return ids, mask


def prepare_clip_model(model) -> Exportable:
    """An Exportable for a loaded ``CLIPModel``."""
    vision, text = model.config.vision_config, model.config.text_config
    size, channels = int(vision.image_size), int(getattr(vision, "num_channels", 3))
    generator = torch.Generator().manual_seed(CHECK_SEED)

    def inputs(batch: int) -> tuple:
        pixels = torch.randn(batch, channels, size, size, generator=generator)
        return (pixels, *clip_text_batch(generator, batch, text))

    names = ("pixel_values", "input_ids", "attention_mask")
    outputs = ("image_embeds", "text_embeds")
    axes = {name: {0: "batch"} for name in names + outputs}
    return Exportable(ClipWrapper(model).eval(), inputs(2), names, outputs, axes,
                      type(model).__name__, check_inputs=[inputs(3), inputs(1)],
                      metadata={"onnxcomp.export.text_eos_id": str(clip_eos_id(text))})
