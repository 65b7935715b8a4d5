"""distill: teacher-guided repair of the layers earlier passes compressed.

Two methods, chosen by ``Config.method``:

- ``refit`` (modules ``refit``, ``layer``): closed form, layer by layer: ridge least squares
  of each changed MatMul/Gemm/1×1 Conv on the student's inputs against the teacher's output
  there, or a bias correction (k×k Conv, quantized layers); numpy only.
- ``kd`` (module ``kd``): knowledge distillation by training the differentiable twin of the
  student on the teacher's outputs (``onnxcomp.train``, torch from the ``[train]`` extra), with
  fake quantization (QAT) when the student is quantized. Only weight values change.

Both read the earlier passes' ``LayerChange`` records (``ctx.changes()``) and do nothing without
them; both keep their result only if the outputs got closer to the teacher. ``distill`` may run
twice (``prune:0.3,distill,distill:kd``): kd then trains on from the refit result.
"""

from __future__ import annotations

from onnxcomp.model import Model
from onnxcomp.passes.distill import refit
from onnxcomp.passes.distill.config import NAME, Config
from onnxcomp.passes.distill.refit import ridge_solve, sites
from onnxcomp.pipeline import Applied, Capabilities, Context, PassSpec, Plan

__all__ = ["NAME", "PASS", "Config", "apply", "plan", "ridge_solve", "sites"]


def plan(model: Model, config: Config, ctx: Context) -> Plan:
    """The repairs (refit: one row per changed layer; kd: the weights that would train)."""
    if config.method == "kd":
        from onnxcomp.passes.distill import kd  # imports torch lazily; the Pipeline checked it

        return kd.plan(model, config, ctx)
    return refit.plan(model, config, ctx)


def apply(model: Model, plan_: Plan, ctx: Context) -> Applied:
    """The planned repair on a copy of ``model``; the input back when it did not help."""
    if plan_.config.method == "kd":
        from onnxcomp.passes.distill import kd

        return kd.apply(model, plan_, ctx)
    return refit.apply(model, plan_, ctx)


PASS = PassSpec(
    NAME, Config, plan, apply,
    Capabilities(needs_calibration=lambda config: True, needs_teacher=True,
                 needs_torch=lambda config: config.method == "kd",
                 notes="repairs the layers earlier passes changed (their LayerChange records): "
                       "put it after prune, lowrank or quantize"),
    summary="re-fit changed layers to the teacher's activations in closed form (least squares, "
            "bias correction), or train on the teacher's outputs (kd, QAT when quantized)")
