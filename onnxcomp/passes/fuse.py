"""fuse: transformer fusions for ONNX Runtime targets (Attention, SkipLayerNormalization, Gelu,
BiasGelu, LayerNormalization from its decomposed form, …) through
``onnxruntime.transformers.optimizer``, the maintained successor of ``onnxruntime-tools``.

The fused graph uses ONNX Runtime's contrib ops (domain ``com.microsoft``): it runs in ONNX Runtime
only, which the record says. Fusion is exact up to float rounding. Measured on this machine: on a
float transformer alone it does not always pay (DESIGN.md: MiniLM FP32 got slightly slower), so it
is never in a default recipe; put it before ``quantize`` where a benchmark shows it helps.

``embed_layer_norm`` (default false) decides ONNX Runtime's EmbedLayerNormalization fusion
(BERT's word + position + segment Gathers, their Adds and the first LayerNorm as one contrib op);
the other fusions run either way. Off by default, unlike ONNX Runtime, because ``quantize`` is what
``fuse`` is for here: the fused op reads its tables whole and in float, out of reach of quantize's
int8 Gather rewrite (all-MiniLM-L6-v2, fuse + int8-dynamic: 58.5 MB with the fusion, 22.9 MB
without), and on float MiniLM the fusion did not pay on this CPU (benchmarks/quantize_vs_ort.py,
9 tokens: 4.82 ms without vs 4.92 ms with at 1 thread; 25.2 ms either way at 128 tokens).
``true`` restores ONNX Runtime's default for the model type (which never fuses embeddings for
``clip``).
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

import onnx
from onnx import numpy_helper

from onnxcomp.errors import UserError
from onnxcomp.model import Model
from onnxcomp.pipeline import Context, PassRecord

NAME = "fuse"
logger = logging.getLogger(__name__)
MODEL_TYPES = ("bert", "bart", "gpt2", "t5", "vit", "clip", "swin", "unet", "vae", "phi")


@dataclass(frozen=True)
class Config:
    model_type: str = "bert"
    num_heads: int = 0      # 0: detected from the graph
    hidden_size: int = 0    # 0: detected from the graph
    # False: no EmbedLayerNormalization, so quantize can store the embedding tables as int8
    embed_layer_norm: bool = False

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, "
                             f"got {self.model_type!r}")
        if self.num_heads < 0 or self.hidden_size < 0:
            raise ValueError("num_heads and hidden_size must be >= 0 (0 = detect)")
        if not isinstance(self.embed_layer_norm, bool):
            raise ValueError(f"embed_layer_norm must be true or false, "
                             f"got {self.embed_layer_norm!r}")

    @classmethod
    def from_short(cls, arg: str | None) -> Config:
        return cls(model_type=arg) if arg else cls()


def detect_heads(model: Model) -> tuple[int, int]:
    """(num_heads, hidden_size) from the Reshapes that split heads, ``[B, S, H, d]``: a constant
    shape, or a Concat whose last two parts are constants (exporters build the shape at run
    time from Shape ops); (0, 0) when there is none (ORT's optimizer then guesses)."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    producers = {out: node for node in model.graph.node for out in node.output}
    seen: Counter = Counter()
    for node in model.graph.node:
        if node.op_type != "Reshape" or len(node.input) < 2:
            continue
        shape = node.input[1]
        if shape in values:
            dims = values[shape].reshape(-1).tolist()
        elif shape in producers and producers[shape].op_type == "Concat" and \
                all(part in values for part in producers[shape].input[-2:]):
            dims = [None, None, *(int(values[p].reshape(-1)[0])
                                  for p in producers[shape].input[-2:])]
        else:
            continue
        if len(dims) == 4 and dims[3] and dims[3] > 0 and dims[2] and \
                (dims[2] > 0 or dims[2] == -1):
            seen[(int(dims[2]), int(dims[3]))] += 1
    if not seen:
        return 0, 0
    heads, head_size = seen.most_common(1)[0][0]
    if heads > 0:
        return heads, heads * head_size
    # [B, S, -1, d]: the hidden size is that of the square q/k/v/output projections.
    squares = Counter(v.shape[0] for name, v in values.items()
                      if v.ndim == 2 and v.shape[0] == v.shape[1] and v.shape[0] % head_size == 0
                      and any(name in n.input for n in model.graph.node if n.op_type == "MatMul"))
    if not squares:
        return 0, 0
    hidden = squares.most_common(1)[0][0]
    return hidden // head_size, hidden


def _ops(model: Model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def run(model: Model, config: Config, ctx: Context) -> tuple[Model, PassRecord]:
    record = PassRecord(NAME, params_before=model.parameter_count(),
                        bytes_before=model.weight_bytes())
    try:
        from onnxruntime.transformers import optimizer
        from onnxruntime.transformers.fusion_options import FusionOptions
    except ImportError as exc:
        raise UserError(f"fuse needs onnxruntime.transformers, which failed to import "
                            f"({exc}); on some versions it needs torch: pip install "
                            "'onnxcomp[export]'") from None
    before = _ops(model)
    num_heads, hidden_size = config.num_heads, config.hidden_size
    if not num_heads or not hidden_size:
        num_heads, hidden_size = detect_heads(model)
    # ONNX Runtime's per-model-type defaults, with only what the config overrides changed
    options = FusionOptions(config.model_type)
    embed_off = options.enable_embed_layer_norm and not config.embed_layer_norm
    if embed_off:
        options.enable_embed_layer_norm = False
    try:
        optimized = optimizer.optimize_model(model.copy().proto, model_type=config.model_type,
                                             num_heads=num_heads, hidden_size=hidden_size,
                                             optimization_options=options, opt_level=0)
    except ImportError as exc:  # its symbolic shape inference imports sympy only when it runs
        raise UserError(f"fuse: onnxruntime.transformers could not run ({exc})") from None
    fused = Model(optimized.model, model.source, model.external_data)
    # The optimizer adds contrib ops without declaring their domain (ORT adds it only on save).
    if any(n.domain == "com.microsoft" for n in fused.graph.node) and \
            not any(o.domain == "com.microsoft" for o in fused.proto.opset_import):
        fused.proto.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
    after = _ops(fused)
    gained = {op: after[op] - before.get(op, 0) for op in after if after[op] > before.get(op, 0)}
    # Only fusions count: the optimizer's own housekeeping (dropping an Identity) alone is not
    # worth a graph that needs ONNX Runtime.
    record.modified = bool(gained)
    if not record.modified:
        record.params_after, record.bytes_after = record.params_before, record.bytes_before
        record.notes.append(f"no {config.model_type} fusion pattern matched")
        return model, record
    record.params_after, record.bytes_after = fused.parameter_count(), fused.weight_bytes()
    record.touched = [n.name for n in fused.graph.node if n.domain == "com.microsoft"]
    record.details = {"ops_before": dict(before), "ops_after": dict(after), "fused": gained}
    record.notes.append("fused " + ", ".join(f"{count} {op}" for op, count in gained.items())
                        + "; the graph now needs ONNX Runtime (com.microsoft ops)")
    if embed_off:
        record.notes.append("EmbedLayerNormalization fusion off (embed_layer_norm = false): the "
                            "embedding Gathers stay plain, for quantize's int8 tables")
    return fused, record
