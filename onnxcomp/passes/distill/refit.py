"""distill, closed form (``method = "refit"``): re-fit the layers earlier passes changed to the
teacher's activations.

For each layer earlier passes changed (``ctx.changes()``), in graph order, the student's
inputs X and the teacher's output Y there are streamed over the calibration data (float64 Gram
matrices) and ridge least squares is solved on the student as already repaired (sequential, as
OBC/GPTQ):  [W; b] = (XᵀX + λI)⁻¹ XᵀY,  λ = ridge · trace(XᵀX) / K.  ``repair = "refit"``:
MatMul, Gemm, 1×1 Conv weights and bias (a k×k Conv: bias only); ``"bias"`` (quantize): the mean
output error per channel goes into the bias (Conv, Gemm C, or the Add after a MatMul, also
through Q/DQ). Layers inside If/Loop/Scan bodies are fitted the same way on the values their
body received, paired run by run with the teacher's body (``bodies``). Gone layers, missing
teacher tensors, other ops or shapes are skipped with the reason.
A fit raising its own layer's error is undone; the whole repair is undone if the outputs'
cosine to the teacher (lowest over outputs, calibration data) dropped.
"""

from __future__ import annotations

import logging
from itertools import islice

import numpy as np

from onnxcomp import runtime, subgraphs
from onnxcomp.calibration import with_outputs
from onnxcomp.errors import UserError
from onnxcomp.measure.compare import compare
from onnxcomp.model import Model
from onnxcomp.passes.distill import bodies
from onnxcomp.passes.distill.config import NAME, Config
from onnxcomp.passes.distill.layer import Layer
from onnxcomp.pipeline import SKIP, Applied, Context, LayerChange, Plan, PlanRow

logger = logging.getLogger(__name__)


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


def _rows(array: np.ndarray, channel_axis: int) -> np.ndarray:
    """[..., C] or [B, C, H, W] → [samples, C] in float64."""
    if channel_axis != -1:
        array = np.moveaxis(array, channel_axis, -1)
    return array.reshape(-1, array.shape[-1]).astype(np.float64)


def _fit_site(student: Model, teacher_session, site: LayerChange, layer: Layer, ctx: Context,
              config: Config) -> dict | str:
    """Stream X (student input) and Y (teacher output) over the calibration data, then solve;
    edits the layer's tensors in ``student.proto``. Returns the fit's figures, or why it was
    skipped."""
    x_name, y_name = layer.node.input[0], layer.node.output[0]
    student_session = runtime.session(with_outputs(student, [x_name, y_name]), optimize=False)

    def triples():
        for batch in islice(ctx.calibration, config.max_batches):
            got = runtime.run(student_session, batch, [x_name, y_name])
            want = runtime.run(teacher_session, batch, [site.teacher_output])
            yield got[x_name], got[y_name], want[site.teacher_output]

    return fit(triples(), site, layer, config)


def fit(triples, site: LayerChange, layer: Layer, config: Config) -> dict | str:
    """Accumulate ``(student input, student output, teacher output)`` arrays, one triple per
    batch (or body run), and solve: ridge least squares of weights and bias (a re-fit) or the
    mean error into the bias (a bias correction). Edits ``layer``'s tensors."""
    axis = 1 if layer.op == "Conv" else -1
    refit = site.repair == "refit" and layer.kn is not None
    intercept = layer.bias_name is not None
    xtx = xty = mean_error = None
    count, err, energy = 0, 0.0, 0.0
    for x_value, y_value, teacher_value in triples:
        want = _teacher_view(teacher_value, site, axis)
        if want.shape != y_value.shape:
            return (f"teacher tensor {site.teacher_output} has shape {list(want.shape)}, "
                    f"the student's {list(y_value.shape)}")
        y_t, y_s = _rows(want, axis), _rows(y_value, axis)
        err += float(np.sum((y_t - y_s) ** 2))
        energy += float(np.sum(y_t ** 2))
        diff = (y_t - y_s).sum(axis=0)
        mean_error = diff if mean_error is None else mean_error + diff
        count += y_t.shape[0]
        if refit:
            x = _rows(x_value, axis)
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
    """The repairs in graph order (a body's layers at their owner node's place), skips with
    the reason; payload: ``(LayerChange, bodies.Where | None)`` pairs to re-fit."""
    result = Plan(NAME, config, payload=[])
    wanted = sites(ctx.changes())
    if not wanted:
        result.notes.append("nothing to repair: no earlier pass recorded compressed layers "
                            "(put distill after prune/lowrank/quantize in the recipe)")
        return result
    nodes = {n.name: n for n in model.graph.node if n.name}
    order = {subgraphs.node_key(n, i): i for i, n in enumerate(model.graph.node)}
    teacher_names = {o for n in (ctx.teacher.graph.node if ctx.teacher else []) for o in n.output}
    located = []
    for site in wanted:
        node = nodes.get(site.node)
        if node is not None:
            located.append(((order[site.node], 0), site, None))
            continue
        where = bodies.locate(model, ctx.teacher, site) if ctx.teacher is not None else \
            "node no longer in the graph"
        place = len(order) if isinstance(where, str) else order.get(where.key[0], len(order))
        located.append(((place, 1), site, where))
    located.sort(key=lambda item: item[0])
    for _, site, where in located:
        if isinstance(where, str):
            result.rows.append(PlanRow(site.node, SKIP, where))
            continue
        if where is None and site.teacher_output not in teacher_names:
            result.rows.append(PlanRow(site.node, SKIP,
                                       f"teacher has no tensor {site.teacher_output!r}"))
            continue
        need_weight = site.repair == "refit"
        if where is None:
            layer = Layer.open(model.proto, nodes[site.node], need_weight=need_weight)
        else:
            opened = bodies.body_layer(model, where.key, site.node, need_weight)
            layer = opened if isinstance(opened, str) else opened[1]
        refusal = layer if isinstance(layer, str) else layer.refusal(site.repair, config)
        if refusal is not None:
            result.rows.append(PlanRow(site.node, SKIP, refusal))
            continue
        kept = site.teacher_channels
        why = f"changed by {site.pass_name}" + (f"; {len(kept)} teacher channels kept" if kept
                                                  is not None else "")
        if where is not None:
            why += f"; inside body {'/'.join(where.key)}"
        result.rows.append(PlanRow(site.node, layer.action(site.repair, site.teacher_output),
                                   why))
        result.payload.append((site, where))
    return result


def apply(model: Model, plan_: Plan, ctx: Context) -> Applied:
    """The fits, site by site on one copy of the model; then the output-cosine safeguard."""
    config: Config = plan_.config
    repairs: list[tuple[LayerChange, bodies.Where | None]] = plan_.payload
    applied = Applied(model, modified=False)
    if not repairs:
        return applied
    if len(ctx.calibration) == 0:
        raise UserError("distill: the calibration data has no batches")
    student = model.copy()
    top = sorted({s.teacher_output for s, where in repairs if where is None})
    teacher_session = runtime.session(with_outputs(ctx.teacher, top), optimize=False) \
        if top else None
    inside = [where for _, where in repairs if where is not None]
    teacher_bodies = bodies.record_teacher(ctx.teacher, inside, ctx, config) if inside else None
    layers = []
    for index, (site, where) in enumerate(repairs, start=1):
        ctx.progress(f"  distill {index}/{len(repairs)}: {site.node}")
        if where is not None:
            result = bodies.fit_site(student, teacher_bodies, site, where, ctx, config, fit)
        else:
            node = next(n for n in student.graph.node if n.name == site.node)
            layer = Layer(student.proto, node)  # the plan checked that it is repairable
            saved = layer.snapshot()
            result = _fit_site(student, teacher_session, site, layer, ctx, config)
            if not isinstance(result, str) and \
                    result["rel_error_after"] > result["rel_error_before"]:
                # Worse on its own calibration data (an under-determined, regularized fit can
                # be).
                layer.restore(saved)
                result.update(reverted=True, rel_error_after=result["rel_error_before"])
        if isinstance(result, str):
            applied.skipped.append((site.node, result))
            continue
        if where is not None:
            result["body"] = "/".join(where.key)
        if not result.get("reverted"):
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
