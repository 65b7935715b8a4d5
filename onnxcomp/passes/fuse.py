"""fuse: transformer fusions for ONNX Runtime targets (Attention, SkipLayerNormalization, Gelu,
BiasGelu, LayerNormalization from its decomposed form, …) through
``onnxruntime.transformers.optimizer``, the maintained successor of ``onnxruntime-tools``.

The fused graph uses ONNX Runtime's contrib ops (domain ``com.microsoft``): it runs in ONNX Runtime
only, which the record says. Fusion is exact up to float rounding. Measured on this machine: on a
float transformer alone it does not always pay (DESIGN.md: MiniLM FP32 got slightly slower), so it
is never in a default recipe; put it before ``quantize`` where a benchmark shows it helps.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass

from onnxcomp.errors import OnnxcompError
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

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, "
                             f"got {self.model_type!r}")
        if self.num_heads < 0 or self.hidden_size < 0:
            raise ValueError("num_heads and hidden_size must be >= 0 (0 = detect)")

    @classmethod
    def from_short(cls, arg: str | None) -> Config:
        return cls(model_type=arg) if arg else cls()


def _ops(model: Model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def run(model: Model, config: Config, ctx: Context) -> tuple[Model, PassRecord]:
    record = PassRecord(NAME, params_before=model.parameter_count(),
                        bytes_before=model.weight_bytes())
    try:
        from onnxruntime.transformers import optimizer
    except ImportError as exc:
        raise OnnxcompError(f"fuse needs onnxruntime.transformers, which failed to import "
                            f"({exc}); on some versions it needs torch: pip install "
                            "'onnxcomp[export]'") from None
    before = _ops(model)
    optimized = optimizer.optimize_model(model.copy().proto, model_type=config.model_type,
                                         num_heads=config.num_heads,
                                         hidden_size=config.hidden_size, opt_level=0)
    fused = Model(optimized.model, model.source, model.external_data)
    after = _ops(fused)
    gained = {op: after[op] - before.get(op, 0) for op in after if after[op] > before.get(op, 0)}
    record.modified = before != after
    record.params_after, record.bytes_after = fused.parameter_count(), fused.weight_bytes()
    if not record.modified:
        record.notes.append(f"no {config.model_type} fusion pattern matched")
        return model, record
    record.touched = [n.name for n in fused.graph.node if n.domain == "com.microsoft"]
    record.details = {"ops_before": dict(before), "ops_after": dict(after), "fused": gained}
    record.notes.append("fused " + ", ".join(f"{count} {op}" for op, count in gained.items())
                        + "; the graph now needs ONNX Runtime (com.microsoft ops)")
    return fused, record
