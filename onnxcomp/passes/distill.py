"""distill: teacher-guided repair of compressed layers, in closed form (``refit``) or by
training (``kd``: ``onnxcomp.train.kd_pass``, torch from the ``[train]`` extra).

Refit: for each layer earlier passes changed (``ctx.changes()``), in graph order, the student's
inputs X and the teacher's output Y there are streamed over the calibration data (float64 Gram
matrices) and ridge least squares is solved on the student as already repaired (sequential, as
OBC/GPTQ):  [W; b] = (XᵀX + λI)⁻¹ XᵀY,  λ = ridge · trace(XᵀX) / K.  ``repair = "refit"``:
MatMul, Gemm, 1×1 Conv weights and bias (a k×k Conv: bias only); ``"bias"`` (quantize): the mean
output error per channel goes into the bias (Conv, Gemm C, or the Add after a MatMul, also
through Q/DQ). Gone layers, missing teacher tensors, other ops or shapes are skipped with the
reason. A fit raising its own layer's error is undone; the whole repair is undone if the
outputs' cosine to the teacher (lowest over outputs, calibration data) dropped.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from itertools import islice

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp import runtime
from onnxcomp.calibration import with_outputs
from onnxcomp.errors import UserError
from onnxcomp.measure.compare import compare
from onnxcomp.model import Model
from onnxcomp.pipeline import (
    SKIP,
    Applied,
    Capabilities,
    Context,
    LayerChange,
    PassSpec,
    Plan,
    PlanRow,
    option,
)

NAME = "distill"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    method: str = option("refit", "refit: closed form per layer | kd: train on the teacher")
    ridge: float = option(1e-3, "refit: ridge λ, relative to trace(XᵀX)/K (0: least squares)")
    max_batches: int | None = option(None, "refit: calibration batches used (none: all)")
    bias_correction: bool = option(True, "refit: bias-correct layers not re-fitted (k×k, int8)")
    steps: int = option(300, "kd: optimizer steps")
    batch: int = option(16, "kd: samples per step, gradients accumulated (0: a data batch)")
    lr: float = option(1e-3, "kd: peak AdamW learning rate (warm-up, then cosine decay)")
    temperature: float = option(1.0, "kd: softmax temperature of the KL/contrastive losses")
    loss: str = option("auto", "kd: auto (by output kind) | kl | cosine | contrastive | mse")
    hint_tensors: tuple[str, ...] = option((), "kd: intermediate tensors matched by rel. MSE")
    max_minutes: float | None = option(None, "kd: stop training after this many minutes")
    seed: int = option(0, "kd: seed of the data order and of torch")
    checkpoint_dir: str | None = option(None, "kd: checkpoint folder (resumed from if it fits)")
    device: str = option("cpu", "kd: cpu | cuda")

    def __post_init__(self) -> None:
        losses = ("auto", "kl", "cosine", "contrastive", "mse")
        for ok, name, wanted in (
                (self.method in ("refit", "kd"), "method", "refit or kd"),
                (self.ridge >= 0, "ridge", ">= 0"), (self.batch >= 0, "batch", ">= 0"),
                (self.max_batches is None or self.max_batches > 0, "max_batches", "positive"),
                (self.steps > 0, "steps", "positive"), (self.lr > 0, "lr", "positive"),
                (self.temperature > 0, "temperature", "> 0"),
                (self.loss in losses, "loss", " | ".join(losses)),
                (self.max_minutes is None or self.max_minutes > 0, "max_minutes", "positive"),
                (self.device in ("cpu", "cuda"), "device", "cpu or cuda")):
            if not ok:
                raise ValueError(f"{name} must be {wanted}, got {getattr(self, name)!r}")

    @classmethod
    def from_short(cls, arg: str | None) -> Config:
        if arg in (None, "", "kd", "refit"):
            return cls(method=arg or "refit")
        try:
            return cls(ridge=float(arg))
        except ValueError:
            raise ValueError(f"distill takes kd, refit or a ridge value, got {arg!r}") from None


def sites(changes: list[LayerChange]) -> list[LayerChange]:
    """One repair per node from the earlier passes' changes, in order: a later change to a node
    replaces an earlier one, except that a bias-only change never replaces a re-fit."""
    chosen: dict[str, LayerChange] = {}
    for change in changes:
        if change.repair == "bias" and change.node in chosen:
            continue
        chosen[change.node] = change
    return list(chosen.values())


def ridge_solve(xtx: np.ndarray, xty: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_W ||X W - Y||² + λ||W||² from the accumulated Gram matrices (float64)."""
    k = xtx.shape[0]
    scale = float(np.trace(xtx)) / max(k, 1)
    lam = ridge * scale if scale > 0 else ridge
    return np.linalg.solve(xtx + lam * np.eye(k), xty)


class _Layer:
    """A student layer's weight/bias in a uniform [K, N] view, and how to write them back."""

    @classmethod
    def open(cls, proto: onnx.ModelProto, node: onnx.NodeProto,
             need_weight: bool) -> _Layer | str:
        """The layer, or why it cannot be repaired."""
        if node.op_type not in ("Conv", "MatMul", "Gemm"):
            return f"op {node.op_type} is not re-fitted"
        if node.op_type == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            return "Gemm with transA"
        layer = cls(proto, node)
        if layer.weight_name not in layer.inits and need_weight:
            return "its weight is not a float initializer"
        return layer

    def __init__(self, proto: onnx.ModelProto, node: onnx.NodeProto):
        self.proto, self.node = proto, node
        self.inits = {t.name: t for t in proto.graph.initializer}
        self.op = node.op_type
        self.trans_b = self.op == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        self.weight_name = node.input[1] if len(node.input) > 1 else None
        self.kn = None
        if self.weight_name in self.inits:
            weight = numpy_helper.to_array(self.inits[self.weight_name])
            self.weight_shape, self.dtype = weight.shape, weight.dtype
            if self.op == "Conv":
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                if weight.shape[2:] == (1,) * (weight.ndim - 2) and group == 1:
                    self.kn = weight.reshape(weight.shape[0], -1).T
            elif weight.ndim == 2:
                self.kn = weight.T if self.trans_b else weight
        self.bias_name, self.bias_add = self._find_bias()

    def _find_bias(self) -> tuple[str | None, onnx.NodeProto | None]:
        if self.op in ("Conv", "Gemm") and len(self.node.input) > 2 and \
                self.node.input[2] in self.inits:
            return self.node.input[2], None
        if self.op == "MatMul":
            out = self.node.output[0]
            users = [n for n in self.proto.graph.node if out in n.input]
            # A quantized output (MatMul → QuantizeLinear → DequantizeLinear → Add) still ends
            # in the bias Add: look through the pair.
            for op in ("QuantizeLinear", "DequantizeLinear"):
                if len(users) == 1 and users[0].op_type == op:
                    out = users[0].output[0]
                    users = [n for n in self.proto.graph.node if out in n.input]
            if len(users) == 1 and users[0].op_type == "Add":
                other = [i for i in users[0].input if i != out]
                if other and other[0] in self.inits:
                    bias = numpy_helper.to_array(self.inits[other[0]])
                    if bias.ndim == 1:
                        return other[0], users[0]
        return None, None

    def refusal(self, repair: str, config: Config) -> str | None:
        """Why neither a re-fit nor a bias correction applies, or None."""
        if repair == "refit" and self.kn is not None:
            return None
        if self.bias_name is None:
            return "nothing to re-fit: the weight is not refittable and there is no bias"
        if not config.bias_correction:
            return "only a bias correction applies and bias_correction = false"
        return None

    def action(self, repair: str, teacher_output: str) -> str:
        if repair == "refit" and self.kn is not None:
            what = "weights+bias" if self.bias_name is not None else "weights"
            return f"refit {what} to teacher tensor {teacher_output}"
        return f"bias correction to teacher tensor {teacher_output}"

    def bias(self) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[self.bias_name]) if self.bias_name else None

    def snapshot(self) -> dict[str, onnx.TensorProto]:
        saved = {}
        for name in (self.weight_name, self.bias_name):
            if name in self.inits:
                saved[name] = onnx.TensorProto()
                saved[name].CopyFrom(self.inits[name])
        return saved

    def restore(self, saved: dict[str, onnx.TensorProto]) -> None:
        for name, tensor in saved.items():
            self.inits[name].CopyFrom(tensor)

    def set_weight(self, kn: np.ndarray) -> None:
        value = kn.T.reshape(self.weight_shape) if self.op == "Conv" else (
            kn.T if self.trans_b else kn)
        self._replace("weight", value.astype(self.dtype))

    def set_bias(self, bias: np.ndarray) -> None:
        dtype = numpy_helper.to_array(self.inits[self.bias_name]).dtype
        self._replace("bias", bias.astype(dtype))

    def _replace(self, which: str, value: np.ndarray) -> None:
        name = self.weight_name if which == "weight" else self.bias_name
        users = sum(name in n.input for n in self.proto.graph.node)
        if users > 1:  # a shared tensor: this layer gets its own copy, the others keep theirs
            new_name = f"{name}__distill_{self.node.name or self.node.output[0]}"
            tensor = numpy_helper.from_array(value, new_name)
            self.proto.graph.initializer.append(tensor)
            self.inits[new_name] = self.proto.graph.initializer[-1]
            holder = self.bias_add if (which == "bias" and self.bias_add is not None) else self.node
            for i, item in enumerate(holder.input):
                if item == name:
                    holder.input[i] = new_name
            setattr(self, f"{which}_name", new_name)
            return
        self.inits[name].CopyFrom(numpy_helper.from_array(value, name))


def _rows(array: np.ndarray, channel_axis: int) -> np.ndarray:
    """[..., C] or [B, C, H, W] → [samples, C] in float64."""
    if channel_axis != -1:
        array = np.moveaxis(array, channel_axis, -1)
    return array.reshape(-1, array.shape[-1]).astype(np.float64)


def _fit_site(student: Model, teacher_session, site: LayerChange, layer: _Layer, ctx: Context,
              config: Config) -> dict | str:
    """Stream X (student input) and Y (teacher output), then solve; edits student.proto.
    Returns the fit's figures, or why it was skipped."""
    x_name, y_name = layer.node.input[0], layer.node.output[0]
    student_session = runtime.session(with_outputs(student, [x_name, y_name]), optimize=False)
    axis = 1 if layer.op == "Conv" else -1
    refit = site.repair == "refit" and layer.kn is not None
    intercept = layer.bias_name is not None
    xtx = xty = mean_error = None
    count, err, energy = 0, 0.0, 0.0
    for batch in islice(ctx.calibration, config.max_batches):
        got = runtime.run(student_session, batch, [x_name, y_name])
        want = _teacher_view(runtime.run(teacher_session, batch, [site.teacher_output])
                             [site.teacher_output], site, axis)
        if want.shape != got[y_name].shape:
            return (f"teacher tensor {site.teacher_output} has shape {list(want.shape)}, "
                    f"the student's {list(got[y_name].shape)}")
        y_t, y_s = _rows(want, axis), _rows(got[y_name], axis)
        err += float(np.sum((y_t - y_s) ** 2))
        energy += float(np.sum(y_t ** 2))
        diff = (y_t - y_s).sum(axis=0)
        mean_error = diff if mean_error is None else mean_error + diff
        count += y_t.shape[0]
        if refit:
            x = _rows(got[x_name], axis)
            if intercept:
                x = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
            xtx = x.T @ x if xtx is None else xtx + x.T @ x
            xty = x.T @ y_t if xty is None else xty + x.T @ y_t
    if count == 0:
        return "no calibration samples"
    result: dict = {"node": site.node, "source": site.pass_name, "samples": count,
                    "rel_error_before": float(np.sqrt(err / max(energy, 1e-30)))}
    if refit:
        k = layer.kn.shape[0]
        if count < k + 1:
            result["warning"] = (f"{count} samples for {k} inputs: under-determined, held up by "
                                 "the ridge term; use more calibration data")
            logger.warning("distill %s: %s", site.node, result["warning"])
        solution = ridge_solve(xtx, xty, config.ridge)
        # ||Y - X W||² from the Gram matrices: no second pass over the data.
        residual = energy - 2 * float(np.sum(solution * xty)) + float(
            np.sum(solution * (xtx @ solution)))
        result["rel_error_after"] = float(np.sqrt(max(residual, 0.0) / max(energy, 1e-30)))
        layer.set_weight(solution[:k])
        if intercept:
            # A bias in a following Add sits after the matched tensor: the intercept adds to it.
            base = layer.bias() if layer.bias_add is not None else 0.0
            layer.set_bias(solution[k] + base)
        result["fit"] = "weights" + (" + bias" if intercept else "")
    else:  # the plan checked that a bias correction applies
        shift = mean_error / count
        layer.set_bias(layer.bias() + shift)
        # Removing the mean error lowers the squared error by count·||mean||², exactly.
        residual = err - count * float(np.sum(shift ** 2))
        result["rel_error_after"] = float(np.sqrt(max(residual, 0.0) / max(energy, 1e-30)))
        result["fit"] = "bias correction"
    return result


def _teacher_view(value: np.ndarray, site: LayerChange, axis: int) -> np.ndarray:
    if site.teacher_channels is None:
        return value
    return np.take(value, list(site.teacher_channels), axis=axis)


def _output_cosine(candidate: Model, ctx: Context, config: Config) -> float:
    """Lowest (over outputs) mean per-sample cosine of ``candidate`` to the teacher."""
    batches = config.max_batches or len(ctx.calibration)
    return compare(ctx.teacher, candidate, [], ctx.calibration, batches).min_cosine


def plan(model: Model, config: Config, ctx: Context) -> Plan:
    """The repairs in graph order, skips with the reason; payload: the ``LayerChange``s to
    re-fit. ``kd``: the trainable weights by layer (``onnxcomp.train.kd_pass``)."""
    if config.method == "kd":
        from onnxcomp.train import kd_pass  # torch: the Pipeline checked it is installed
        return kd_pass.plan(model, config, ctx)
    result = Plan(NAME, config, payload=[])
    wanted = sites(ctx.changes())
    if not wanted:
        result.notes.append("nothing to repair: no earlier pass recorded compressed layers "
                            "(put distill after prune/lowrank/quantize in the recipe)")
        return result
    nodes = {n.name: n for n in model.graph.node if n.name}
    order = {n.name: i for i, n in enumerate(model.graph.node)}
    wanted.sort(key=lambda s: order.get(s.node, len(order)))
    teacher_names = {o for n in (ctx.teacher.graph.node if ctx.teacher else []) for o in n.output}
    for site in wanted:
        node = nodes.get(site.node)
        if node is None:
            result.rows.append(PlanRow(site.node, SKIP, "node no longer in the graph"))
            continue
        if site.teacher_output not in teacher_names:
            result.rows.append(PlanRow(site.node, SKIP,
                                       f"teacher has no tensor {site.teacher_output!r}"))
            continue
        layer = _Layer.open(model.proto, node, need_weight=site.repair == "refit")
        refusal = layer if isinstance(layer, str) else layer.refusal(site.repair, config)
        if refusal is not None:
            result.rows.append(PlanRow(site.node, SKIP, refusal))
            continue
        kept = site.teacher_channels
        why = f"changed by {site.pass_name}" + (f"; {len(kept)} teacher channels kept" if kept
                                                  is not None else "")
        result.rows.append(PlanRow(site.node, layer.action(site.repair, site.teacher_output),
                                   why))
        result.payload.append(site)
    return result


def apply(model: Model, plan_: Plan, ctx: Context) -> Applied:
    """The fits, site by site on one copy of the model; then the output-cosine safeguard."""
    config: Config = plan_.config
    if config.method == "kd":
        from onnxcomp.train import kd_pass
        return kd_pass.apply(model, plan_, ctx)
    repairs: list[LayerChange] = plan_.payload
    applied = Applied(model, modified=False)
    if not repairs:
        return applied
    if len(ctx.calibration) == 0:
        raise UserError("distill: the calibration data has no batches")
    student = model.copy()
    teacher_session = runtime.session(
        with_outputs(ctx.teacher, sorted({s.teacher_output for s in repairs})), optimize=False)
    layers = []
    for index, site in enumerate(repairs, start=1):
        ctx.progress(f"  distill {index}/{len(repairs)}: {site.node}")
        node = next(n for n in student.graph.node if n.name == site.node)
        layer = _Layer(student.proto, node)  # the plan checked that it is repairable
        saved = layer.snapshot()
        result = _fit_site(student, teacher_session, site, layer, ctx, config)
        if isinstance(result, str):
            applied.skipped.append((site.node, result))
            continue
        before = result["rel_error_before"]
        if result["rel_error_after"] > before:
            # Worse on its own calibration data (an under-determined, regularized fit can be).
            layer.restore(saved)
            result.update(reverted=True, rel_error_after=before)
        else:
            applied.touched.append(site.node)
        if "warning" in result:
            applied.notes.append(f"{site.node}: {result['warning']}")
        layers.append(result)
    applied.details["layers"] = layers
    if not applied.touched:
        return applied
    # Each fit lowers its own layer's error, but that need not carry to the outputs (seen with
    # bias correction on MiniLM int8). Keep the repair only if the outputs got closer too.
    before, after = (_output_cosine(candidate, ctx, config) for candidate in (model, student))
    applied.details["output_cosine"] = {"before": before, "after": after}
    if after < before:
        applied.touched = []
        applied.notes.append(f"undone: the layer fits lowered the output cosine on the "
                             f"calibration data ({before:.5f} -> {after:.5f})")
        return applied
    gained = [(r["rel_error_before"], r["rel_error_after"]) for r in layers
              if not r.get("reverted")]
    applied.notes.append(f"re-fitted {len(applied.touched)} layer(s); mean relative output "
                         f"error {np.mean([g[0] for g in gained]):.4f} -> "
                         f"{np.mean([g[1] for g in gained]):.4f} on the calibration data")
    applied.model, applied.modified = student, True
    return applied


PASS = PassSpec(
    NAME, Config, plan, apply,
    Capabilities(needs_calibration=lambda config: True, needs_teacher=True,
                 needs_torch=lambda config: config.method == "kd",
                 notes="repairs the layers earlier passes changed (their LayerChange records): "
                       "put it after prune, lowrank or quantize"),
    summary="re-fit changed layers to the teacher's activations in closed form (least squares, "
            "bias correction), or train on the teacher's outputs (kd, QAT when quantized)")
