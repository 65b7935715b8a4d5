"""distill: teacher-guided repair of compressed layers, in closed form.

The uncompressed model is the teacher. Earlier passes' records say which student layers were
compressed and which teacher tensor each one must reproduce (the records are the matching; names
are never guessed). For each such layer, in graph order, the student's real input activations X
and the teacher's output Y at the matching point are streamed over the calibration data, and the
layer is re-fitted by ridge-regularized least squares:

    [W; b] = (Xᵀ X + λ I)⁻¹ Xᵀ Y,   λ = ridge · trace(Xᵀ X) / K

accumulating Xᵀ X and Xᵀ Y in float64 batch by batch (memory K² + K·N, not the data set). Each fit
runs on the student as already repaired, so it also absorbs the errors of the layers before it
(sequential reconstruction, as in OBC/GPTQ-style methods).

What is re-fitted:
- lowrank: the second factor B given the first, A (MatMul, Gemm, or the second 1×1 Conv);
- prune: the layer that consumes the cut channels (MatMul/Gemm/1×1 Conv: all its weights; a k×k
  Conv: bias correction only);
- quantize: bias correction — the mean output error per channel is added to the layer's bias
  (Conv bias input, Gemm C, or the Add that follows a MatMul); weights stay as quantized.
Layers whose teacher tensor does not exist or whose shapes differ are skipped with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from onnxcomp import runtime
from onnxcomp.calibration import with_outputs
from onnxcomp.errors import UserError
from onnxcomp.model import Model
from onnxcomp.pipeline import Context, PassRecord

NAME = "distill"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Config:
    ridge: float = 1e-3
    max_batches: int | None = None
    bias_correction: bool = True

    def __post_init__(self) -> None:
        if not (self.ridge >= 0):
            raise ValueError(f"ridge must be >= 0, got {self.ridge}")
        if self.max_batches is not None and self.max_batches <= 0:
            raise ValueError(f"max_batches must be positive, got {self.max_batches}")

    @classmethod
    def from_short(cls, arg: str | None) -> Config:
        if arg in (None, ""):
            return cls()
        try:
            return cls(ridge=float(arg))
        except ValueError:
            raise ValueError(f"distill takes an optional ridge value, got {arg!r}") from None


@dataclass
class Site:
    """One student layer to repair and the teacher tensor it must reproduce."""

    node: str            # student node whose constant weight is re-fitted
    source: str          # the pass that compressed it
    mode: str            # "refit" (weights + bias) or "bias" (bias correction only)
    teacher_output: str  # tensor in the teacher to match
    # When the layer's own output channels were pruned too: the teacher's channels it kept.
    teacher_channels: list[int] | None = None


def sites_from_records(records: list[PassRecord]) -> list[Site]:
    """Turn earlier passes' records into repair sites. The last record about a node wins."""
    sites: dict[str, Site] = {}
    for record in records:
        if not record.modified:
            continue
        if record.name == "lowrank":
            for layer in record.details.get("layers", []):
                second = layer["nodes"][-1]
                sites[second] = Site(second, "lowrank", "refit", layer["output"])
        elif record.name == "prune":
            groups = record.details.get("groups", [])
            kept_out = {p["node"]: p.get("channels") for g in groups for p in g["producers"]}
            for group in groups:
                for entry in group["consumers"]:
                    sites[entry["node"]] = Site(entry["node"], "prune", "refit", entry["output"],
                                                kept_out.get(entry["node"]))
        elif record.name == "quantize":
            for entry in record.details.get("layers", []):
                if entry.get("node") and entry.get("output"):
                    sites.setdefault(entry["node"], Site(entry["node"], "quantize", "bias",
                                                         entry["output"]))
    return list(sites.values())


# --- the closed-form fit ---------------------------------------------------------------------


def ridge_solve(xtx: np.ndarray, xty: np.ndarray, ridge: float) -> np.ndarray:
    """argmin_W ||X W - Y||² + λ||W||² from the accumulated Gram matrices (float64)."""
    k = xtx.shape[0]
    scale = float(np.trace(xtx)) / max(k, 1)
    lam = ridge * scale if scale > 0 else ridge
    return np.linalg.solve(xtx + lam * np.eye(k), xty)


class _Layer:
    """A student layer's weight/bias in a uniform [K, N] view, and how to write them back."""

    def __init__(self, proto: onnx.ModelProto, node: onnx.NodeProto, need_weight: bool):
        self.proto, self.node = proto, node
        self.inits = {t.name: t for t in proto.graph.initializer}
        self.op = node.op_type
        if self.op not in ("Conv", "MatMul", "Gemm"):
            raise ValueError(f"op {self.op} is not re-fitted")
        if self.op == "Gemm" and any(a.name == "transA" and a.i for a in node.attribute):
            raise ValueError("Gemm with transA")
        self.trans_b = self.op == "Gemm" and any(a.name == "transB" and a.i for a in node.attribute)
        self.weight_name = node.input[1] if len(node.input) > 1 else None
        self.kn = None
        self.pointwise = False
        if self.weight_name in self.inits:
            weight = numpy_helper.to_array(self.inits[self.weight_name])
            self.weight_shape, self.dtype = weight.shape, weight.dtype
            if self.op == "Conv":
                group = next((a.i for a in node.attribute if a.name == "group"), 1)
                self.pointwise = weight.shape[2:] == (1,) * (weight.ndim - 2) and group == 1
                if self.pointwise:
                    self.kn = weight.reshape(weight.shape[0], -1).T
            elif weight.ndim == 2:
                self.pointwise = True
                self.kn = weight.T if self.trans_b else weight
        elif need_weight:
            raise ValueError("its weight is not a float initializer")
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

    def output_tensor(self) -> str:
        return self.node.output[0]

    def bias(self) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[self.bias_name]) if self.bias_name else None

    def snapshot(self) -> dict[str, onnx.TensorProto]:
        saved = {}
        for name in (self.weight_name, self.bias_name):
            if name in self.inits:
                copy = onnx.TensorProto()
                copy.CopyFrom(self.inits[name])
                saved[name] = copy
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


def _fit_site(student: Model, teacher_session, site: Site, layer: _Layer, ctx: Context,
              config: Config) -> dict:
    """Stream X (student input) and Y (teacher output), then solve; edits student.proto."""
    x_name, y_name = layer.node.input[0], layer.output_tensor()
    student_session = runtime.session(with_outputs(student, [x_name, y_name]), optimize=False)
    axis = 1 if layer.op == "Conv" else -1
    refit = site.mode == "refit" and layer.kn is not None
    intercept = layer.bias_name is not None
    xtx = xty = mean_error = None
    count = 0
    err = energy = 0.0
    for i, batch in enumerate(ctx.calibration):
        if config.max_batches and i >= config.max_batches:
            break
        got = runtime.run(student_session, batch, [x_name, y_name])
        want = _teacher_view(runtime.run(teacher_session, batch, [site.teacher_output])
                             [site.teacher_output], site, axis)
        if want.shape != got[y_name].shape:
            raise ValueError(f"teacher tensor {site.teacher_output} has shape {list(want.shape)},"
                             f" the student's {list(got[y_name].shape)}")
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
        raise ValueError("no calibration batches")
    result: dict = {"node": site.node, "source": site.source, "samples": count,
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
    elif intercept and config.bias_correction:
        shift = mean_error / count
        layer.set_bias(layer.bias() + shift)
        # Removing the mean error lowers the squared error by count·||mean||², exactly.
        residual = err - count * float(np.sum(shift ** 2))
        result["rel_error_after"] = float(np.sqrt(max(residual, 0.0) / max(energy, 1e-30)))
        result["fit"] = "bias correction"
    else:
        raise ValueError("nothing to re-fit: the weight is not refittable and there is no bias")
    return result


def _teacher_view(value: np.ndarray, site: Site, axis: int) -> np.ndarray:
    if site.teacher_channels is None:
        return value
    return np.take(value, site.teacher_channels, axis=axis)


def _output_cosine(candidate: Model, ctx: Context, config: Config) -> float:
    """Lowest (over outputs) mean per-sample cosine of ``candidate`` to the teacher."""
    from onnxcomp.measure.compare import per_sample_cosine

    sessions = [runtime.session(m, optimize=False) for m in (ctx.teacher, candidate)]
    names = [o.name for o in sessions[0].get_outputs()]
    sums: dict[str, float] = dict.fromkeys(names, 0.0)
    count = 0
    for i, batch in enumerate(ctx.calibration):
        if config.max_batches and i >= config.max_batches:
            break
        want, got = (runtime.run(sess, batch, names) for sess in sessions)
        for name in names:
            sums[name] += float(np.mean(per_sample_cosine(want[name], got[name])))
        count += 1
    return min(total / max(count, 1) for total in sums.values())


def run(model: Model, config: Config, ctx: Context) -> tuple[Model, PassRecord]:
    record = PassRecord(NAME, params_before=model.parameter_count(),
                        bytes_before=model.weight_bytes())
    record.params_after, record.bytes_after = record.params_before, record.bytes_before
    if ctx.teacher is None:
        raise UserError("distill needs the teacher (the uncompressed model)")
    if ctx.calibration is None:
        raise UserError("distill needs calibration data (--calib)")
    sites = sites_from_records(ctx.records)
    if not sites:
        record.notes.append("nothing to repair: no earlier pass recorded compressed layers "
                            "(put distill after prune/lowrank/quantize in the recipe)")
        return model, record
    student = model.copy()
    order = {n.name: i for i, n in enumerate(student.graph.node)}
    teacher_names = {o for n in ctx.teacher.graph.node for o in n.output}
    sites.sort(key=lambda s: order.get(s.node, len(order)))
    teacher_session = runtime.session(
        with_outputs(ctx.teacher, sorted({s.teacher_output for s in sites} & teacher_names)),
        optimize=False)
    layers = []
    for index, site in enumerate(sites, start=1):
        ctx.progress(f"  distill {index}/{len(sites)}: {site.node}")
        node = next((n for n in student.graph.node if n.name == site.node), None)
        if node is None:
            record.skipped.append((site.node, "node no longer in the graph"))
            continue
        if site.teacher_output not in teacher_names:
            record.skipped.append((site.node, f"teacher has no tensor {site.teacher_output!r}"))
            continue
        try:
            layer = _Layer(student.proto, node, need_weight=site.mode == "refit")
            saved = layer.snapshot()
            result = _fit_site(student, teacher_session, site, layer, ctx, config)
        except ValueError as exc:
            record.skipped.append((site.node, str(exc)))
            continue
        before = result["rel_error_before"]
        if result["rel_error_after"] > before:
            # Worse on its own calibration data (an under-determined, regularized fit can be):
            # undo it rather than ship it.
            layer.restore(saved)
            result["reverted"] = True
            result["rel_error_after"] = before
        else:
            record.touched.append(site.node)
        if "warning" in result:
            record.notes.append(f"{site.node}: {result['warning']}")
        layers.append(result)
    record.details["layers"] = layers
    record.modified = bool(record.touched)
    if not record.modified:
        return model, record
    # Each fit lowers its own layer's error, but that need not carry to the outputs (seen with
    # bias correction on MiniLM int8). Keep the repair only if the outputs got closer too.
    before, after = (_output_cosine(candidate, ctx, config) for candidate in (model, student))
    record.details["output_cosine"] = {"before": before, "after": after}
    if after < before:
        record.modified, record.touched = False, []
        record.params_after, record.bytes_after = record.params_before, record.bytes_before
        record.notes.append(f"undone: the layer fits lowered the output cosine on the "
                            f"calibration data ({before:.5f} -> {after:.5f})")
        return model, record
    record.params_after, record.bytes_after = student.parameter_count(), student.weight_bytes()
    gained = [(r["rel_error_before"], r["rel_error_after"]) for r in layers if not r.get("reverted")]
    record.notes.append(f"re-fitted {len(record.touched)} layer(s); mean relative output error "
                        f"{np.mean([g[0] for g in gained]):.4f} -> {np.mean([g[1] for g in gained]):.4f}"
                        " on the calibration data")
    return student, record
