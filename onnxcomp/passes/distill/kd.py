"""distill by training (``method = "kd"``): plan and apply. torch (the ``[train]`` extra) is
imported inside the functions only, so the pass registry loads without it.

Plan (pure, reads no weight values): one row per layer whose float weights would train (the
node reading them, how many tensors and values), QAT rows for quantized weights (their float
shadow trains, the scales stay), and a SKIP row per op the twin can't run (apply then refuses
the model, naming them). The student is the model as the earlier steps left it: after
``prune,distill`` that is the refit result, so ``prune,distill,distill:kd`` trains on from the
closed-form repair (every float weight of the student trains, not only the layers named by
``ctx.changes()``: a pruned layer's neighbours compensate too). Apply:
``onnxcomp.train.kd.train``; the trained model is kept only if the evaluation cosine (held out
when ``--eval`` data is given, else the calibration data, with that caveat) went up; only
initializer (and Constant weight) values change, the graph does not.
"""

from __future__ import annotations

import math

import numpy as np
import onnx

from onnxcomp import calibration
from onnxcomp.calibration import Dataset
from onnxcomp.errors import UserError
from onnxcomp.model import Model
from onnxcomp.passes.distill.config import NAME, Config
from onnxcomp.pipeline import SKIP, Applied, Context, Plan, PlanRow

_QUANT_OPS = ("QuantizeLinear", "DequantizeLinear", "MatMulNBits")
_INT_TYPES = {onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8",
              onnx.TensorProto.INT4: "int4", onnx.TensorProto.UINT4: "uint4",
              onnx.TensorProto.INT32: "int32", onnx.TensorProto.INT16: "int16"}


def options(config: Config):
    """The training options (``onnxcomp.train.kd.Options``) of a ``distill`` Config."""
    from onnxcomp.train import kd

    return kd.Options(steps=config.steps, batch=config.batch, lr=config.lr,
                      temperature=config.temperature, loss=config.loss,
                      hint_tensors=tuple(config.hint_tensors), max_minutes=config.max_minutes,
                      seed=config.seed, checkpoint_dir=config.checkpoint_dir,
                      device=config.device, eval_every=config.eval_every,
                      eval_batches=config.eval_batches, patience=config.patience)


def _stored(model: Model) -> dict[str, onnx.TensorProto]:
    tensors = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attribute in node.attribute:
                if attribute.name == "value":
                    tensors.setdefault(node.output[0], attribute.t)
    return tensors


def _size(tensor: onnx.TensorProto) -> int:
    return int(np.prod(tensor.dims)) if len(tensor.dims) else 1


def _rows(model: Model) -> list[PlanRow]:
    """A row per node reading weights that would train (each weight counted at its first
    reader): float weights of 2+ values, and integer weights behind a DequantizeLinear or
    MatMulNBits (QAT). Scales and zero points of Q/DQ/MatMulNBits are never trained, nor
    BatchNormalization's running statistics (as the twin)."""
    from onnxcomp.train.ops_common import FLOAT_TYPES

    tensors = _stored(model)
    frozen = {name for node in model.graph.node if node.op_type in _QUANT_OPS
              for name in node.input[1:4]}
    frozen |= {name for node in model.graph.node if node.op_type == "BatchNormalization"
               for name in node.input[3:5]}
    seen: set[str] = set()
    rows = []
    for node in model.graph.node:
        floats, shadows = [], []
        for index, name in enumerate(node.input):
            tensor = tensors.get(name)
            if tensor is None or name in seen or name in frozen:
                continue
            quantized = tensor.data_type in _INT_TYPES and (
                (node.op_type == "DequantizeLinear" and index == 0)
                or (node.op_type == "MatMulNBits" and index == 1))
            if quantized:
                shadows.append(tensor)
            elif tensor.data_type in FLOAT_TYPES and _size(tensor) > 1:
                floats.append(tensor)
            else:
                continue
            seen.add(name)
        label = node.name or node.output[0]
        if floats:
            rows.append(PlanRow(label, f"train {len(floats)} weight(s), "
                                f"{sum(map(_size, floats)):,} values",
                                ", ".join(t.name for t in floats)))
        for tensor in shadows:
            kind = _INT_TYPES[tensor.data_type] if node.op_type != "MatMulNBits" else \
                f"{next((a.i for a in node.attribute if a.name == 'bits'), 4)}-bit"
            rows.append(PlanRow(label, f"QAT {kind}: float shadow of {tensor.name}, "
                                f"{_size(tensor):,} stored values, fixed scales",
                                "re-quantized into the same initializer after training"))
    return rows


def plan(model: Model, config: Config, ctx: Context) -> Plan:
    """The kd plan: SKIP rows for ops the twin lacks, then the weights that would train."""
    from onnxcomp.train.twin import unsupported_ops

    result = Plan(NAME, config, payload={"changed": bool(ctx.changes())})
    for op in unsupported_ops(model):
        result.rows.append(PlanRow(op, SKIP, "the twin can't run this op: kd refuses the model"))
    result.rows += _rows(model)
    if not ctx.changes():
        result.notes.append("nothing to distill: no earlier pass changed the model (put "
                            "distill:kd after prune/lowrank/quantize in the recipe)")
    if config.train_data is not None:
        result.notes.append(f"kd: trains on {config.train_data} (distill.train_data), not on "
                            "the calibration data")
        zoo_split = calibration.zoo_source(config.train_data)
        if zoo_split and (zoo_split[1] or "calib") not in ("calib", "train"):
            result.notes.append(f"kd: {config.train_data} is a held-out split of the zoo: "
                                "figures measured on it after training are not held out")
    held_out = ctx.evaluation is not None and len(ctx.evaluation) > 0
    result.notes.append(f"kd: {config.steps} steps of {config.batch or 'one data batch'} "
                        f"samples, lr {config.lr:g}, loss {config.loss}; kept only if the "
                        + ("held-out" if held_out else "calibration-data (no --eval data: "
                                                        "optimistic)")
                        + " output cosine rises")
    return result


def training_source(config: Config, ctx: Context) -> Dataset:
    """The data kd trains on before ``train_batches`` cuts or grows it: ``train_data`` resolved
    and checked against the teacher (a UserError for a bad source, and for the very split
    ``--eval`` scores: training on it would make the held-out figures meaningless), else the
    calibration data."""
    if config.train_data is None:
        return ctx.calibration
    source = calibration.zoo_source(config.train_data)
    held_out = ctx.evaluation
    if source and held_out is not None and held_out.zoo_name == source[0] \
            and held_out.name.split(":")[1:2] == [source[1] or "calib"]:
        raise UserError(f"distill.train_data = {config.train_data!r} is the split --eval "
                        f"scores ({held_out.name}): kd would train on its held-out data")
    return calibration.resolve(config.train_data, ctx.teacher)


def training_data(source: Dataset, count: int | None, notes: list[str]) -> Dataset:
    """What kd trains on: ``source`` (the calibration data or ``train_data``), or ``count``
    batches of it (a zoo generator draws more: the same split), said in ``notes``."""
    if count is None or count == len(source):
        return source
    if count < len(source):
        return source.take(count)
    if source.grow is None:
        notes.append(f"kd: train_batches = {count}, but {source.name} has {len(source)} "
                     f"batches and cannot draw more (a folder's own; a zoo generator can): "
                     f"trained on those")
        return source
    grown = source.grow(count)
    notes.append(f"kd: trained on {len(grown)} batches of {grown.name} (the earlier passes "
                 f"planned on {len(source)})")
    return grown


def _changed_tensors(before: Model, after: Model) -> set[str]:
    old, new = _stored(before), _stored(after)
    return {name for name, tensor in new.items()
            if tensor.SerializeToString() != old[name].SerializeToString()}


def apply(model: Model, plan_: Plan, ctx: Context) -> Applied:
    """Train (``onnxcomp.train.kd.train``); keep the result only if the evaluation cosine rose."""
    from onnxcomp.train import kd
    from onnxcomp.train.twin import unsupported_ops

    config: Config = plan_.config
    applied = Applied(model, modified=False)
    if not plan_.payload["changed"]:
        return applied
    missing = unsupported_ops(model)
    if missing:
        raise UserError(f"distill kd: the twin can't run op(s) {', '.join(missing)}; use "
                        "distill (refit) for this model")
    data = training_data(training_source(config, ctx), config.train_batches, applied.notes)
    result = kd.train(ctx.teacher, model, data, options(config),
                      evaluation=ctx.evaluation, progress=ctx.progress)
    where = "held-out" if result.held_out else "calibration-data (optimistic: no --eval data)"
    applied.details["kd"] = {
        "cosine_before": result.before, "cosine_after": result.after, "held_out":
        result.held_out, "steps": result.steps, "best_step": result.best_step,
        "seconds": round(result.seconds, 2), "stopped": result.stopped, "losses": result.terms,
        "loss_first": result.losses[0] if result.losses else None,
        "loss_last": result.losses[-1] if result.losses else None,
        "qat_weights": result.qat_weights, "qat_activations": result.qat_activations,
        "resumed_from": result.resumed_from, "evaluations": result.evaluations,
        "lr_peak": result.lr_peak, "train_data": data.name, "train_batches": len(data)}
    applied.notes += result.notes
    if result.qat_weights or result.qat_activations:
        applied.notes.append(f"QAT: {result.qat_weights} quantized weight(s) trained as float "
                             f"shadows, {result.qat_activations} activation quantizer(s) with "
                             "the STE, scales as calibrated")
    figures = (f"{where} output cosine {result.before:.5f} -> {result.after:.5f}, "
               f"{result.steps} steps in {result.seconds:.1f} s (stopped: {result.stopped})")
    if not result.trained or not (result.after > result.before) or math.isnan(result.after):
        if result.stopped != "nan loss":
            applied.notes.append(f"kd kept the input: no gain ({figures})")
        return applied
    changed = _changed_tensors(model, result.model)
    applied.touched = [n.name or n.output[0] for n in result.model.graph.node
                       if changed & set(n.input)
                       or (n.op_type == "Constant" and changed & set(n.output))]
    applied.notes.append(f"kd: {figures}; best at step {result.best_step}")
    applied.model, applied.modified = result.model, bool(changed)
    return applied
