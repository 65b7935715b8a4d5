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

The plan (``--dry-run``) is a scan by op pattern, without importing ONNX Runtime's optimizer: the
heads and hidden size (``detect_heads``), then one row per candidate — a LayerNormalization
after a residual Add (→ SkipLayerNormalization), a decomposed LayerNorm (→ LayerNormalization),
a Softmax between two activation MatMuls (→ Attention), an Erf-form Gelu (→ Gelu, or BiasGelu
after a bias Add), the embedding Gathers (→ EmbedLayerNormalization, when on). ONNX Runtime's
fusions for the model type decide what really fuses; the record gives the real counts.
"""

from __future__ import annotations

import importlib.util
import logging
import math
from collections import Counter, defaultdict
from dataclasses import dataclass

import onnx
from onnx import numpy_helper

from onnxcomp.errors import UserError
from onnxcomp.model import Model
from onnxcomp.pipeline import SKIP, Applied, Capabilities, Context, PassSpec, Plan, PlanRow, option

NAME = "fuse"
logger = logging.getLogger(__name__)
MODEL_TYPES = ("bert", "bart", "gpt2", "t5", "vit", "clip", "swin", "unet", "vae", "phi")


@dataclass(frozen=True)
class Config:
    model_type: str = option("bert", "ONNX Runtime's fusion set: " + ", ".join(MODEL_TYPES))
    num_heads: int = option(0, "attention heads (0: detected from the graph)")
    hidden_size: int = option(0, "hidden size (0: detected from the graph)")
    embed_layer_norm: bool = option(False, "fuse the embeddings into EmbedLayerNormalization "
                                           "(false: plain Gathers, for quantize's int8 tables)")

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"model_type must be one of {', '.join(MODEL_TYPES)}, "
                             f"got {self.model_type!r}")
        if self.num_heads < 0 or self.hidden_size < 0:
            raise ValueError("num_heads and hidden_size must be >= 0 (0 = detect)")
        if not isinstance(self.embed_layer_norm, bool):  # the contract: ValueError names it
            raise ValueError(  # noqa: TRY004
                f"embed_layer_norm must be true or false, got {self.embed_layer_norm!r}")

    @classmethod
    def from_short(cls, arg: str | None) -> Config:
        return cls(model_type=arg) if arg else cls()


# Shape tensors are a handful of int64s: only tensors this small are read for their values.
_SMALL = 64


def _constants(model: Model) -> tuple[dict, dict]:
    """(values of the small constants, dims of every constant), initializers and Constant
    nodes alike: cheap, no large weight is converted."""
    values, dims = {}, {}
    tensors = [(t.name, t) for t in model.graph.initializer]
    tensors += [(n.output[0], n.attribute[0].t) for n in model.graph.node
                if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"]
    for name, tensor in tensors:
        dims[name] = tuple(tensor.dims)
        if math.prod(tensor.dims) <= _SMALL:
            values[name] = numpy_helper.to_array(tensor)
    return values, dims


def detect_heads(model: Model) -> tuple[int, int]:
    """(num_heads, hidden_size) from the Reshapes that split heads, ``[B, S, H, d]``: a constant
    shape, or a Concat whose last two parts are constants (exporters build the shape at run
    time from Shape ops); (0, 0) when there is none (ORT's optimizer then guesses)."""
    values, dims_of = _constants(model)
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
    matmul_inputs = {i for n in model.graph.node if n.op_type == "MatMul" for i in n.input}
    squares = Counter(d[0] for name, d in dims_of.items()
                      if len(d) == 2 and d[0] == d[1] and d[0] % head_size == 0
                      and name in matmul_inputs)
    if not squares:
        return 0, 0
    hidden = squares.most_common(1)[0][0]
    return hidden // head_size, hidden


# --- the plan: candidates by op pattern -------------------------------------------------------


@dataclass(frozen=True)
class FusePlan:
    """What ``apply`` hands ONNX Runtime's optimizer (the plan's payload)."""

    num_heads: int
    hidden_size: int
    candidates: dict[str, int]   # fused op -> candidate count


# Ops between the scores MatMul and the Softmax (scale, mask), and after it (to the MatMul by V).
_SCORE_OPS = {"Add", "Div", "Mul", "Where", "Cast", "Sub"}
_PROBS_OPS = {"Cast", "Dropout", "Identity"}


class _Graph:
    def __init__(self, model: Model):
        self.nodes = list(model.graph.node)
        self.producer = {out: n for n in self.nodes for out in n.output}
        self.users: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            for name in n.input:
                self.users[name].append(n)
        self.constants = {t.name for t in model.graph.initializer} | {
            n.output[0] for n in self.nodes if n.op_type == "Constant"}

    def made_by(self, tensor: str, op: str) -> onnx.NodeProto | None:
        node = self.producer.get(tensor)
        return node if node is not None and node.op_type == op else None

    def is_activation_matmul(self, node: onnx.NodeProto | None) -> bool:
        return node is not None and node.op_type == "MatMul" and \
            not any(i in self.constants for i in node.input)


def _name(node: onnx.NodeProto) -> str:
    return node.name or node.output[0]


def _layer_norm_row(g: _Graph, node: onnx.NodeProto) -> PlanRow | None:
    decomposed = node.op_type == "ReduceMean" and any(
        user.op_type == "Sub" and node.input[0] in user.input for user in g.users[node.output[0]])
    if node.op_type != "LayerNormalization" and not decomposed:
        return None
    residual = g.made_by(node.input[0], "Add")
    if residual is not None and not any(i in g.constants for i in residual.input):
        return PlanRow(_name(node), "fuse -> SkipLayerNormalization",
                       f"residual Add {_name(residual)} + LayerNorm")
    if decomposed:
        return PlanRow(_name(node), "fuse -> LayerNormalization", "decomposed LayerNorm")
    return PlanRow(_name(node), SKIP, "no residual Add before it: stays LayerNormalization")


def _attention_row(g: _Graph, node: onnx.NodeProto) -> PlanRow | None:
    if node.op_type != "Softmax":
        return None
    tensor, scores = node.input[0], None
    for _ in range(5):
        before = g.producer.get(tensor)
        if before is None or before.op_type not in _SCORE_OPS | {"MatMul"}:
            break
        if before.op_type == "MatMul":
            scores = before
            break
        tensor = next((i for i in before.input if i not in g.constants), "")
    frontier, probs = [node], None
    for _ in range(3):
        users = [u for n in frontier for u in g.users[n.output[0]]]
        probs = next((u for u in users if u.op_type == "MatMul"), None)
        frontier = [u for u in users if u.op_type in _PROBS_OPS]
        if probs is not None or not frontier:
            break
    if g.is_activation_matmul(scores) and g.is_activation_matmul(probs):
        return PlanRow(_name(node), "fuse -> Attention",
                       f"MatMul {_name(scores)} -> Softmax -> MatMul {_name(probs)}")
    return PlanRow(_name(node), SKIP, "Softmax not between two activation MatMuls")


def _gelu_row(g: _Graph, node: onnx.NodeProto) -> PlanRow | None:
    if node.op_type != "Erf":
        return None
    scaled = g.producer.get(node.input[0])
    if scaled is None or scaled.op_type not in ("Div", "Mul"):
        return PlanRow(_name(node), SKIP, "Erf not of x/sqrt(2): not a Gelu")
    x = next((i for i in scaled.input if i not in g.constants), "")
    bias = g.made_by(x, "Add")
    if bias is not None and any(i in g.constants for i in bias.input):
        return PlanRow(_name(node), "fuse -> BiasGelu", f"bias Add {_name(bias)} + Erf Gelu")
    return PlanRow(_name(node), "fuse -> Gelu", "Erf form")


def candidates(model: Model, config: Config) -> list[PlanRow]:
    """One row per fusion candidate found by op pattern (or a skip with why), in graph order."""
    g = _Graph(model)
    _, dims = _constants(model)
    rows = []
    for node in g.nodes:
        for match in (_layer_norm_row, _attention_row, _gelu_row):
            row = match(g, node)
            if row is not None:
                rows.append(row)
    tables = [n for n in g.nodes if n.op_type == "Gather" and n.input and
              len(dims.get(n.input[0], ())) == 2]
    if tables and config.embed_layer_norm:
        rows.extend(PlanRow(_name(n), "fuse -> EmbedLayerNormalization",
                            "embedding table Gather, where the model type has that fusion")
                    for n in tables)
    elif tables:
        rows.append(PlanRow(f"{len(tables)} embedding Gather(s)", SKIP,
                            "embed_layer_norm = false: the tables stay plain Gathers (for "
                            "quantize's int8 tables)"))
    return rows


def _missing_dependency() -> str | None:
    for module in ("onnxruntime.transformers", "sympy"):
        if importlib.util.find_spec(module) is None:
            return module
    return None


def plan(model: Model, config: Config, ctx: Context) -> Plan:
    """Heads and hidden size, and the fusion candidates by op pattern (pure; the optimizer is
    not imported)."""
    num_heads, hidden_size = config.num_heads, config.hidden_size
    where = "from the config"
    if not num_heads or not hidden_size:
        num_heads, hidden_size = detect_heads(model)
        where = "detected from the head-splitting Reshapes"
    rows = candidates(model, config)
    counts = Counter(row.action.removeprefix("fuse -> ") for row in rows if not row.skipped)
    result = Plan(NAME, config, rows=rows, payload=FusePlan(num_heads, hidden_size, dict(counts)))
    if num_heads and hidden_size:
        result.notes.append(f"model type {config.model_type}: {num_heads} heads, hidden size "
                            f"{hidden_size} ({where})")
    else:
        result.notes.append(f"model type {config.model_type}: heads and hidden size not found "
                            "in the graph (ONNX Runtime's optimizer guesses them)")
    if not counts:
        result.rows.append(PlanRow("(graph)", SKIP, "no LayerNorm, attention (MatMul -> Softmax "
                                                    "-> MatMul) or Erf-Gelu pattern to fuse"))
    else:
        result.notes.append("candidates by op pattern: " + ", ".join(
            f"{count} {op}" for op, count in counts.items()) + f"; ONNX Runtime's "
            f"{config.model_type} fusions decide what really fuses")
    missing = _missing_dependency()
    if missing:
        result.notes.append(f"{missing} is not installed: fuse will refuse to run "
                            "(pip install onnxruntime sympy)")
    return result


# --- apply: ONNX Runtime's optimizer ---------------------------------------------------------


def _ops(model: Model) -> Counter:
    return Counter(n.op_type for n in model.graph.node)


def apply(model: Model, plan_: Plan, ctx: Context) -> Applied:
    """``onnxruntime.transformers.optimizer`` at opt_level 0 with the plan's heads; only a new
    fused op counts as a change (its housekeeping alone, e.g. a dropped Identity, does not)."""
    config: Config = plan_.config
    fuse_plan: FusePlan = plan_.payload
    try:
        from onnxruntime.transformers import optimizer
        from onnxruntime.transformers.fusion_options import FusionOptions
    except ImportError as exc:
        raise UserError(f"fuse needs onnxruntime.transformers, which failed to import "
                        f"({exc}); on some versions it needs torch: pip install "
                        "'onnxcomp[export]'") from None
    before = _ops(model)
    # ONNX Runtime's per-model-type defaults, with only what the config overrides changed
    options = FusionOptions(config.model_type)
    embed_off = options.enable_embed_layer_norm and not config.embed_layer_norm
    if embed_off:
        options.enable_embed_layer_norm = False
    try:
        optimized = optimizer.optimize_model(model.copy().proto, model_type=config.model_type,
                                             num_heads=fuse_plan.num_heads,
                                             hidden_size=fuse_plan.hidden_size,
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
    if not gained:
        return Applied(model, modified=False,
                       notes=[f"no {config.model_type} fusion pattern matched"])
    applied = Applied(fused, modified=True,
                      touched=[n.name for n in fused.graph.node if n.domain == "com.microsoft"],
                      details={"ops_before": dict(before), "ops_after": dict(after),
                               "fused": gained})
    applied.notes.append("fused " + ", ".join(f"{count} {op}" for op, count in gained.items())
                         + "; the graph now needs ONNX Runtime (com.microsoft ops)")
    if embed_off:
        applied.notes.append("EmbedLayerNormalization fusion off (embed_layer_norm = false): "
                             "the embedding Gathers stay plain, for quantize's int8 tables")
    return applied


PASS = PassSpec(
    NAME, Config, plan, apply,
    Capabilities(notes="needs onnxruntime.transformers (and sympy); the result runs in ONNX "
                       "Runtime only (com.microsoft ops)"),
    summary="transformer fusions for ONNX Runtime (Attention, SkipLayerNormalization, Gelu) "
            "through onnxruntime.transformers.optimizer")
