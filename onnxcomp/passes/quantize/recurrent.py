"""Recurrent layers (LSTM, GRU, RNN): their input and recurrence weights ``W``, ``R`` as int8.

Each planned layer's ``W`` ``[D, G*H, I]`` and ``R`` ``[D, G*H, H]`` (``G`` gates: LSTM 4, GRU 3,
RNN 1; ``D`` directions) become ``q = clip(round(W / s), -127, 127)`` with one scale per
direction and gate row, ``s[d, r] = max_i |W[d, r, i]| / 127`` (symmetric, zero point 0), so
``|W - s q| <= s / 2`` element-wise. Two forms:
- ``int8-dynamic`` on an LSTM ONNX Runtime's ``com.microsoft.DynamicQuantizeLSTM`` computes
  exactly as the ONNX LSTM (no ``layout`` = 1, the op has no such attribute; float32): that op,
  with ``W``, ``R`` transposed to ``[D, I, 4H]`` / ``[D, H, 4H]`` and scales ``[D, 4H]``, as ONNX
  Runtime's own quantizer writes it. The kernel quantizes ``X`` and the hidden state to uint8 at
  run time, per step. ONNX Runtime only (a contrib op).
- everything else (static ``int8``, ``int4``, GRU, RNN, an LSTM the contrib op can't take):
  weight-only, ``Mul(Cast(q), s)`` feeding the float layer (``s`` as ``[D, G*H, 1]``). The file
  shrinks ~4x for these weights; the compute stays float. Not ``DequantizeLinear``: ONNX Runtime
  never constant-folds a DequantizeLinear (it keeps them for its QDQ fusions, and no LSTM/GRU
  kernel takes one), so it would dequantize on every run (fw-silero-v6, 1 thread, interleaved:
  1.25x the float model's time per call); Cast -> Mul of constants is folded when the session
  loads (0.98x: the float layer's speed), at any opset, with no per-axis scale. ``int4`` keeps
  recurrent weights at 8 bits: 4-bit blocks of 32 measured 0.919 worst output cosine on
  silero-vad against 0.988 for int8 rows (fw-silero-v6 0.992 against 0.9999).
Weights computed from constants (PyTorch exports inside If bodies reorder the gates with
Slice/Concat/Unsqueeze of the trained tensor) are folded first; a weight computed from anything
else is skipped, with the reason. Equal weights (by value) are quantized once and shared: one
int8 constant, one Cast -> Mul per scope that reads it. Peepholes and biases stay float.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxcomp.graph import (
    constant_array,
    graph_nodes,
    import_graph,
    nested_nodes,
    producer,
    unique_name,
)
from onnxcomp.model import Model
from onnxcomp.passes.quantize.config import Config
from onnxcomp.passes.quantize.int8 import symmetric_int8
from onnxcomp.passes.quantize.match import QuantPlan, Site, excluded, extreme_outliers

logger = logging.getLogger(__name__)

OPS = ("LSTM", "GRU", "RNN")
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DYNAMIC_OP = "DynamicQuantizeLSTM"
MS_DOMAIN = "com.microsoft"
# Ops folded when a recurrent weight is computed from constants (value-preserving data movement).
_FOLDABLE = ("Identity", "Cast", "Unsqueeze", "Squeeze", "Reshape", "Transpose", "Concat",
             "Gather", "Slice")
_FOLD_DEPTH = 16


def calibrated(quant_plan: QuantPlan) -> QuantPlan:
    """``quant_plan`` without the recurrent sites, which read no calibration statistics (so
    those inside If/Loop bodies need no tensors the statistics could not reach)."""
    return quant_plan.without({s.node for s in quant_plan.sites if s.op in OPS}, "recurrent")


def is_dynamic(site: Site) -> bool:
    """Planned as ``DynamicQuantizeLSTM`` (its activations quantized at run time), not
    weight-only."""
    return site.op == "LSTM" and bool(site.activation_inputs)


def action(site: Site) -> str:
    """The plan row's action for a recurrent site."""
    if is_dynamic(site):
        return f"int8-dynamic {DYNAMIC_OP} (W, R per gate row)"
    return f"int8 weight-only W, R per gate row (Cast -> Mul; float {site.op} compute)"


def extend(model: Model, config: Config, quant_plan: QuantPlan) -> None:
    """Add the recurrent sites of ``model`` (a prepared one) to ``quant_plan``, with the skipped
    ones and notes; ``model`` is not changed."""
    if config.op_types is not None and not set(OPS) & set(config.op_types):
        return
    graph = import_graph(model)
    owners = {id(inner): owner.name for inner, owner in nested_nodes(graph)}
    seen = {s.node for s in quant_plan.sites}
    sites, fallbacks = [], []
    for node, _ in graph_nodes(graph):
        if node.op not in OPS or (config.op_types is not None and node.op not in config.op_types):
            continue
        found = _match(node, config, owners.get(id(node)), seen)
        if isinstance(found, str):
            logger.debug("quantize: skip %s: %s", node.name, found)
            quant_plan.skipped.append((node.name or node.outputs[0].name, found))
            continue
        site, why_not_dynamic = found
        seen.add(site.node)
        sites.append(site)
        if why_not_dynamic:
            fallbacks.append(f"{site.node} ({why_not_dynamic})")
    if not sites:
        return
    quant_plan.sites += sites
    dynamic = sum(1 for s in sites if is_dynamic(s))
    layers = f"{len(sites)} recurrent layer{'s' if len(sites) > 1 else ''}"
    note = (f"{layers} ({', '.join(sorted({s.op for s in sites}))}): W and R stored int8, one "
            "scale per direction and gate row")
    if dynamic:
        note += (f"; {dynamic} as com.microsoft.{DYNAMIC_OP} (ONNX Runtime only; input and "
                 "hidden state quantized at run time, per step)")
    if len(sites) > dynamic:
        note += (f"; {len(sites) - dynamic} weight-only (int8 -> Cast -> Mul, folded by "
                 "ONNX Runtime at load: the file shrinks, the compute stays float)")
    if config.mode == "int4":
        note += ("; int4 keeps recurrent weights at 8 bits (4-bit blocks: worst output cosine "
                 "0.92 on silero-vad, against 0.99 at 8 bits)")
    quant_plan.notes.append(note)
    if fallbacks:
        quant_plan.notes.append(f"weight-only, not {DYNAMIC_OP}: {'; '.join(fallbacks)}")


def _match(node: gs.Node, config: Config, owner: str | None, seen: set[str]
           ) -> tuple[Site, str | None] | str:
    """The site for one recurrent node and why it is not ``DynamicQuantizeLSTM`` (None: it is,
    or the mode is not int8-dynamic), or why it is skipped."""
    if not node.name or node.name in seen:
        return "node has no unique name (run cleanup, which names it)"
    reason = excluded(node, config.exclude)
    if reason:
        return reason
    if len(node.inputs) < 3:
        return f"{node.op} without W and R inputs"
    gates = GATES[node.op]
    weights = []
    for slot, label in ((1, "W"), (2, "R")):
        value = weight_value(node.inputs[slot])
        if isinstance(value, str):
            return f"{label} {value}"
        if value.dtype != np.float32:
            return f"{label} is {value.dtype}, not float32 (kept float)"
        hidden = node.attrs.get("hidden_size")
        if value.ndim != 3 or value.shape[1] % gates or (
                hidden is not None and value.shape[1] != gates * int(hidden)):
            return f"{label} has shape {list(value.shape)}, not [directions, {gates}*hidden, k]"
        problem = extreme_outliers(value)
        if problem:
            return f"{label}: {problem}"
        weights.append(value)
    why_not = None
    if config.mode == "int8-dynamic":
        why_not = _not_dynamic(node)
    dynamic = config.mode == "int8-dynamic" and why_not is None
    output = next((t.name for t in node.outputs if t.name), node.name)
    site = Site(node.name, node.op, (0,) if dynamic else (), 1, node.inputs[1].name or None, 1,
                output, owner=owner)
    return site, why_not


def _not_dynamic(node: gs.Node) -> str | None:
    """Why ONNX Runtime's DynamicQuantizeLSTM can't compute ``node`` as the LSTM does."""
    if node.op != "LSTM":
        return f"ONNX Runtime has no dynamic int8 {node.op}"
    if int(node.attrs.get("layout", 0)):
        return "layout = 1, which the contrib op lacks"
    if node.inputs[0].dtype not in (None, np.float32):
        return f"input is {node.inputs[0].dtype}"
    return None


def weight_value(tensor: gs.Tensor) -> np.ndarray | str:
    """A recurrent weight's value: a constant, or folded from constants through value-moving ops
    (Slice/Concat/Unsqueeze/...); else why it is not a constant."""
    value = _fold(tensor, 0)
    if isinstance(value, str):
        return value
    if not np.issubdtype(value.dtype, np.floating):
        return f"is {value.dtype}, not float"
    return value


def _fold(tensor: gs.Tensor, depth: int) -> np.ndarray | str:
    value = constant_array(tensor)
    if value is not None:
        return value
    node = producer(tensor)
    if node is None:
        return "is not a constant (a graph input)"
    if node.op not in _FOLDABLE:
        return f"is computed by {node.op} (only constants moved by {'/'.join(_FOLDABLE)} fold)"
    if depth >= _FOLD_DEPTH:
        return "is computed through too many ops to fold"
    args: list[np.ndarray | None] = []
    for item in node.inputs:
        if not item.name:
            args.append(None)
            continue
        value = _fold(item, depth + 1)
        if isinstance(value, str):
            return value
        args.append(value)
    try:
        return _evaluate(node, args)
    except (ValueError, IndexError, TypeError, KeyError) as exc:
        return f"could not be folded ({node.op} {node.name}: {exc})"


def _axes(node: gs.Node, args: list, position: int) -> list[int] | None:
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(args) > position and args[position] is not None:
        return [int(a) for a in np.asarray(args[position]).reshape(-1)]
    return None


def _evaluate(node: gs.Node, args: list) -> np.ndarray:
    """One value-moving op on constant inputs, as ONNX defines it (opset 1-21 forms)."""
    data, attrs = np.asarray(args[0]), node.attrs
    if node.op == "Identity":
        return data
    if node.op == "Cast":
        return data.astype(onnx.helper.tensor_dtype_to_np_dtype(int(attrs["to"])))
    if node.op == "Unsqueeze":
        axes = _axes(node, args, 1)
        rank = data.ndim + len(axes)
        for axis in sorted(a % rank for a in axes):
            data = np.expand_dims(data, axis)
        return data
    if node.op == "Squeeze":
        axes = _axes(node, args, 1)
        return np.squeeze(data, axis=None if axes is None else tuple(axes))
    if node.op == "Reshape":
        shape = [int(s) for s in np.asarray(args[1]).reshape(-1)]
        if not int(attrs.get("allowzero", 0)):
            shape = [data.shape[i] if s == 0 else s for i, s in enumerate(shape)]
        return data.reshape(shape)
    if node.op == "Transpose":
        perm = attrs.get("perm")
        return np.transpose(data, None if perm is None else [int(p) for p in perm])
    if node.op == "Concat":
        return np.concatenate([np.asarray(a) for a in args], axis=int(attrs["axis"]))
    if node.op == "Gather":
        return np.take(data, np.asarray(args[1]), axis=int(attrs.get("axis", 0)))
    # Slice: opset >= 10 takes inputs, earlier ones attributes.
    if "starts" in attrs:
        starts, ends = list(attrs["starts"]), list(attrs["ends"])
        axes, steps = attrs.get("axes", list(range(len(starts)))), [1] * len(starts)
    else:
        starts = [int(v) for v in np.asarray(args[1]).reshape(-1)]
        ends = [int(v) for v in np.asarray(args[2]).reshape(-1)]
        axes = _axes(node, args, 3) or list(range(len(starts)))
        steps = ([int(v) for v in np.asarray(args[4]).reshape(-1)]
                 if len(args) > 4 and args[4] is not None else [1] * len(starts))
    index = [slice(None)] * data.ndim
    for start, end, axis, step in zip(starts, ends, axes, steps):
        index[int(axis) % data.ndim] = slice(int(start), int(end), int(step))
    return data[tuple(index)]


# --- the rewrite (called by rewrite.rewrite, on its graph) ---------------------------------------


class _Made:
    """Quantized weights by value, and the dequantized outputs by (value, scope): a weight
    read by several layers (or scopes) is quantized once."""

    def __init__(self) -> None:
        self.weights: dict[tuple, tuple] = {}
        self.dequantized: dict[tuple, gs.Variable] = {}


def _key(value: np.ndarray, form: str) -> tuple:
    digest = hashlib.sha1(np.ascontiguousarray(value).tobytes()).hexdigest()
    return form, value.shape, str(value.dtype), digest


def rewrite(nodes: dict[str, gs.Node], holders: dict[str, gs.Graph], sites: list[Site]) -> None:
    """Rewrite the recurrent ``sites`` in place (``nodes``: by name, bodies included;
    ``holders``: node name -> the graph or body that holds it), each weight quantized once."""
    made = _Made()
    for site in sites:
        node, scope = nodes[site.node], holders[site.node]
        weights = [weight_value(node.inputs[slot]) for slot in (1, 2)]
        if any(isinstance(w, str) for w in weights):  # the plan checked that they fold
            raise TypeError(f"{site.node}: planned recurrent weights are not constants")
        if is_dynamic(site):
            _dynamic(scope, node, weights, made)
        else:
            for slot, value in zip((1, 2), weights):
                node.inputs[slot] = _weight_only(scope, node.inputs[slot].name or node.name,
                                                 value, made)


def _quantized_rows(value: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """int8 ``[D, G*H, K]`` and scales ``[D, G*H]``: one per direction and gate row."""
    q, scale = symmetric_int8(value.reshape(-1, value.shape[-1]), axis=0)
    return q.reshape(value.shape), scale.reshape(value.shape[:-1])


def _weight_only(scope: gs.Graph, base: str, value: np.ndarray, made: _Made) -> gs.Variable:
    """``Mul(Cast(q), s)`` in ``scope``: one int8 constant per value, one pair per scope."""
    key = _key(value, "rows")
    if key not in made.weights:
        q, scale = _quantized_rows(value)
        made.weights[key] = (gs.Constant(unique_name(scope, f"{base}_int8"), q),
                             gs.Constant(unique_name(scope, f"{base}_scale"), scale[..., None]))
    scoped = (key, id(scope))
    if scoped not in made.dequantized:
        q, scale = made.weights[key]
        cast = gs.Variable(unique_name(scope, f"{base}_int8_float"), dtype=np.float32,
                           shape=list(value.shape))
        out = gs.Variable(unique_name(scope, f"{base}_int8_weight"), dtype=np.float32,
                          shape=list(value.shape))
        scope.nodes.append(gs.Node("Cast", unique_name(scope, f"{base}_cast"),
                                   attrs={"to": onnx.TensorProto.FLOAT}, inputs=[q],
                                   outputs=[cast]))
        scope.nodes.append(gs.Node("Mul", unique_name(scope, f"{base}_rescale"),
                                   inputs=[cast, scale], outputs=[out]))
        made.dequantized[scoped] = out
    return made.dequantized[scoped]


def _dynamic(scope: gs.Graph, node: gs.Node, weights: list[np.ndarray], made: _Made) -> None:
    """LSTM -> com.microsoft.DynamicQuantizeLSTM, same name and outputs."""
    constants = []
    for value, label in zip(weights, ("W", "R")):
        key = _key(value, "transposed")
        if key not in made.weights:
            q, scale = _quantized_rows(value)
            base = node.inputs[1 if label == "W" else 2].name or f"{node.name}_{label}"
            transposed = np.ascontiguousarray(q.transpose(0, 2, 1))
            made.weights[key] = (
                gs.Constant(unique_name(scope, f"{base}_int8_t"), transposed),
                gs.Constant(unique_name(scope, f"{base}_scale"), scale),
                gs.Constant(unique_name(scope, f"{base}_zero_point"),
                            np.zeros_like(scale, np.int8)))
        constants.append(made.weights[key])
    (w, w_scale, w_zero), (r, r_scale, r_zero) = constants
    inputs = list(node.inputs) + [gs.Variable.empty() for _ in range(8 - len(node.inputs))]
    inputs[1], inputs[2] = w, r
    node.inputs.clear()
    node.inputs.extend(inputs[:8] + [w_scale, w_zero, r_scale, r_zero])
    node.op, node.domain = DYNAMIC_OP, MS_DOMAIN
    for output in node.outputs:
        # onnx's shape inference does not know the contrib op: typed outputs keep the checker's
        # inference going past it (inside an If body it fails on an untyped input otherwise).
        if output.name and output.dtype is None:
            output.dtype = np.float32
    node.attrs = {k: v for k, v in node.attrs.items() if k != "layout"}
