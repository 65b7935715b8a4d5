"""Half precision: ``fp16`` (weights and compute) and ``bf16`` (weights stored in bfloat16).

- ``fp16``: every float tensor becomes float16 except around the ops kept in float32, with
  float32 model inputs and outputs (Casts at the edges). The rewrite is ONNX Runtime's own
  converter (``onnxruntime.transformers.float16``, shipped in the onnxruntime wheel, torch-free);
  this module chooses what stays float32:
  * ``KEEP_FLOAT``: ops whose float16 result overflows or loses what matters: normalizations,
    softmax, reductions, exp/log/pow/sqrt/reciprocal/erf, and the converter's own list (ops
    without float16 definitions such as TopK/Range/CumSum);
  * ``exclude`` (node names, op types, patterns), as for every quantize mode;
  * with ``min_cosine``: automatic mixed precision. Each float16 node's own harm is measured on
    the calibration data (the relative error of its output against float32, minus the largest
    error among its inputs: what the node adds), and the fewest most harmful nodes are kept
    float32 (bisection) until the model's output cosine meets the target.
  ONNX Runtime's CPU provider has few float16 kernels and runs the rest through Casts it inserts
  itself: expect 0.5x size and float32-like speed there; the speed is the GPU's, or OpenVINO's.
- ``bf16``: every float32 initializer of at least ``MIN_ELEMENTS`` values is stored as bfloat16
  (round to nearest even) and Cast to float32 where it is read; compute stays float32, so every
  runtime runs it (OpenVINO computes in bf16 natively on CPUs with AVX-512-BF16 when asked).
Limits: fp16 leaves weights inside If/Loop bodies to the converter (which converts subgraphs);
bf16 converts initializers of the main graph only.
"""

from __future__ import annotations

import fnmatch
import logging

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import shape_inference
from onnxcomp.model import Model

logger = logging.getLogger(__name__)

KEEP_FLOAT = (
    "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "BatchNormalization", "InstanceNormalization",
    "GroupNormalization", "LpNormalization", "Softmax", "LogSoftmax", "ReduceMean", "ReduceSum",
    "ReduceSumSquare", "ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceProd",
    "Exp", "Log", "Pow", "Sqrt", "Reciprocal",
)
MIN_ELEMENTS = 16
FLOAT_TYPES = (TensorProto.FLOAT,)


def _matches(node: onnx.NodeProto, patterns: tuple[str, ...]) -> bool:
    return any(node.name == p or node.op_type == p or fnmatch.fnmatchcase(node.name, p)
               for p in patterns)


def kept_float(model: onnx.ModelProto, exclude: tuple[str, ...]) -> dict[str, str]:
    """node name -> why it stays float32 under fp16 (the default keep list and ``exclude``)."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST

    out = {}
    for node in model.graph.node:
        if node.op_type in KEEP_FLOAT:
            out[node.name] = f"{node.op_type} kept float32 (overflow/precision in float16)"
        elif node.op_type in DEFAULT_OP_BLOCK_LIST:
            out[node.name] = f"{node.op_type} has no float16 definition in the converter"
        elif exclude and _matches(node, exclude):
            out[node.name] = "excluded"
    return out


def to_fp16(model: Model, keep_nodes: set[str]) -> Model:
    """The fp16 model, nodes in ``keep_nodes`` (and the converter's own list) in float32."""
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    # Node names must be unique for node_block_list (cleanup names every node).
    converted = convert_float_to_float16(
        proto, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST),
        node_block_list=sorted(keep_nodes), force_fp16_initializers=False,
        disable_shape_infer=False)
    # The converter leaves its shape inference behind as value_info (about 1 % of a small
    # model's file, tiny-clip's 12 KB); runtimes infer types themselves, so it is not kept.
    del converted.graph.value_info[:]
    # The converter appends the input Casts after the nodes that read them: sort the graph.
    from onnxcomp.graph import export_model, import_proto, tidy

    result = Model(converted, model.source)
    return export_model(tidy(import_proto(converted, model.source)), like=result)


def _to_bfloat16_bits(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    rounded[nan] = 0x7FC0
    return rounded


def bf16_tensor(name: str, values: np.ndarray) -> TensorProto:
    return helper.make_tensor(name, TensorProto.BFLOAT16, values.shape,
                              vals=_to_bfloat16_bits(values).tobytes(), raw=True)


def to_bf16(model: Model, exclude: tuple[str, ...] = ()) -> tuple[Model, list[str]]:
    """Weights of at least MIN_ELEMENTS values stored as bfloat16, each Cast to float32 once."""
    proto = onnx.ModelProto()
    proto.CopyFrom(model.proto)
    graph = proto.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    converted = []
    casts = []
    kept = []
    for tensor in graph.initializer:
        if tensor.data_type not in FLOAT_TYPES or int(np.prod(tensor.dims)) < MIN_ELEMENTS:
            kept.append(tensor)
            continue
        if exclude and any(_matches(n, exclude) for n in readers.get(tensor.name, [])):
            kept.append(tensor)
            continue
        stored = f"{tensor.name}_bf16"
        # The Cast is named like the weight it writes (nodes and tensors have separate names).
        cast = helper.make_node("Cast", [stored], [tensor.name], to=TensorProto.FLOAT,
                                name=tensor.name)
        # Two bytes saved a value; a small weight whose Cast costs more stays float32 (the
        # 64-value normalization weights of a small model: the file would not shrink).
        if 2 * int(np.prod(tensor.dims)) <= cast.ByteSize() + len(stored) - len(tensor.name):
            kept.append(tensor)
            continue
        kept.append(bf16_tensor(stored, numpy_helper.to_array(tensor)))
        casts.append(cast)
        converted.append(tensor.name)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return Model(proto, model.source), converted


def _noise(sqnr_db: float) -> float:
    return 0.0 if sqnr_db == float("inf") else float(10.0 ** (-sqnr_db / 10.0))


def node_harm(model: Model, half: Model, candidates: list[onnx.NodeProto], data,
              batches: int) -> list[tuple[str, float]]:
    """(node, relative noise it adds in float16), most harmful first: the noise power of its
    output against float32 minus the largest noise among its inputs."""
    from onnxcomp.measure import compare

    produced = {o for n in candidates for o in n.output if o}
    inputs = {i for n in candidates for i in n.input if i in produced}
    result = compare.compare(model, half, sorted(produced | inputs), data, batches)
    noise = {name: _noise(db) for name, db in result.sqnr.items()}
    harm = []
    for node in candidates:
        out = max((noise.get(o, 0.0) for o in node.output if o), default=0.0)
        came_in = max((noise.get(i, 0.0) for i in node.input if i in noise), default=0.0)
        harm.append((node.name, out - came_in))
    return sorted(harm, key=lambda item: -item[1])


def fp16_to_target(model: Model, keep: dict[str, str], min_cosine: float | None, data,
                   progress, batches: int = 8) -> tuple[Model, dict]:
    """fp16 with ``keep`` in float32; below ``min_cosine`` the most harmful float16 nodes
    (node_harm) also stay float32, the fewest that meet it (doubling, then bisection)."""
    from onnxcomp.measure import compare

    half = to_fp16(model, set(keep))
    details: dict = {"kept_float": sorted(keep)}
    if data is None:
        return half, details
    cosine = compare.compare(model, half, [], data, batches).min_cosine
    details["output_cosine"] = cosine
    if min_cosine is None or cosine >= min_cosine:
        return half, details
    float_outputs = _float_tensors(model)
    candidates = [n for n in model.graph.node if n.name not in keep
                  and any(o in float_outputs for o in n.output)]
    ranking = node_harm(model, half, candidates, data, batches)
    details["harm"] = [{"node": n, "noise_added": round(h, 8)} for n, h in ranking[:50]]
    best, best_cosine, low, high = half, cosine, 0, len(ranking)
    count = min(1, len(ranking))
    while ranking:  # doubling until met, then bisection between the last two counts
        trial = to_fp16(model, set(keep) | {n for n, _ in ranking[:count]})
        trial_cosine = compare.compare(model, trial, [], data, batches).min_cosine
        progress(f"quantize fp16: {count} more nodes float32, cosine {trial_cosine:.6f}")
        if trial_cosine >= min_cosine:
            best, best_cosine, high = trial, trial_cosine, count
            break
        low = count
        if count >= len(ranking):
            break
        count = min(count * 2, len(ranking))
    while high - low > 1 and best_cosine >= min_cosine:
        middle = (low + high) // 2
        trial = to_fp16(model, set(keep) | {n for n, _ in ranking[:middle]})
        trial_cosine = compare.compare(model, trial, [], data, batches).min_cosine
        if trial_cosine >= min_cosine:
            best, best_cosine, high = trial, trial_cosine, middle
        else:
            low = middle
    extra = [n for n, _ in ranking[:high]] if best_cosine >= min_cosine else []
    details.update(kept_float=sorted(set(keep) | set(extra)), mixed_extra_float=extra,
                   output_cosine=best_cosine, output_cosine_before=cosine)
    return best, details


def _float_tensors(model: Model) -> set[str]:
    inferred = shape_inference.inferred(model.proto)
    values = list(inferred.value_info) + list(inferred.output)
    return {v.name for v in values if v.type.tensor_type.elem_type == TensorProto.FLOAT}


# --- the pass's plan and apply for mode fp16 / bf16 ---------------------------------------

def plan(model: Model, config, notes: list[str]):
    """Rows: every float node and whether it goes to half precision or stays float32.
    ``model`` is the prepared copy (Constant weights lifted, opset raised); it travels in the
    payload."""
    from onnxcomp.pipeline import SKIP, Plan, PlanRow

    rows = []
    if config.mode == "fp16":
        keep = kept_float(model.proto, tuple(config.exclude))
        float_tensors = _float_tensors(model)
        for node in model.graph.node:
            if node.name in keep:
                rows.append(PlanRow(node.name, SKIP, keep[node.name]))
            elif any(o in float_tensors for o in node.output):
                rows.append(PlanRow(node.name, "fp16", node.op_type))
        payload = (model, keep)
        notes.append("fp16: inputs and outputs stay float32 (Casts at the edges); ONNX "
                     "Runtime's CPU provider runs most float16 ops through Casts: expect 0.5x "
                     "size, not speed, there")
    else:
        readers: dict[str, list[str]] = {}
        for node in model.graph.node:
            for name in node.input:
                readers.setdefault(name, []).append(node.name)
        for tensor in model.graph.initializer:
            if tensor.data_type in FLOAT_TYPES and int(np.prod(tensor.dims)) >= MIN_ELEMENTS:
                rows.append(PlanRow(tensor.name, "bf16 storage",
                                    f"read by {', '.join(readers.get(tensor.name, [])[:3])}"))
        payload = (model, {})
        notes.append("bf16: weights stored as bfloat16 and Cast to float32 where read; compute "
                     "stays float32 (every runtime runs it)")
    return Plan("quantize", config, rows=rows, notes=notes, payload=payload)


def apply(model: Model, plan_, ctx):
    from onnxcomp.pipeline import Applied

    config = plan_.config
    applied = Applied(model, modified=False)
    if not any(row.action != "skip" for row in plan_.rows):
        return applied
    prepared, keep = plan_.payload
    if config.mode == "bf16":
        result, converted = to_bf16(prepared, tuple(config.exclude))
        applied.touched = converted
    else:
        data = ctx.evaluation or ctx.calibration
        result, details = fp16_to_target(prepared, keep, config.min_cosine, data,
                                         ctx.progress)
        applied.details.update(details)
        extra = details.get("mixed_extra_float", [])
        applied.skipped = [(n, f"kept float32 to meet min_cosine {config.min_cosine}")
                           for n in extra]
        applied.touched = [row.node for row in plan_.rows
                           if row.action == "fp16" and row.node not in set(extra)]
        if "output_cosine" in details:
            applied.notes.append(f"fp16 output cosine {details['output_cosine']:.6f}"
                                 + (f" with {len(extra)} more nodes float32 (target "
                                    f"{config.min_cosine})" if extra else ""))
        if config.min_cosine is not None and details.get("output_cosine", 1.0) < \
                config.min_cosine:
            applied.notes.append(f"min_cosine {config.min_cosine} not reached even with every "
                                 "float16 node float32")
    applied.model, applied.modified = result, True
    return applied
