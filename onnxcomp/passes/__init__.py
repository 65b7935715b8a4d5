"""The passes, by recipe name. Explicit: adding a pass is one module (or package) that defines
``PASS = PassSpec(...)`` and one line in ``PASSES`` below. No import-time registration."""

from __future__ import annotations

from onnxcomp.passes import cleanup, distill, fuse, lowrank, prune, quantize
from onnxcomp.pipeline import Applied, Capabilities, PassSpec, Plan


def _legacy(module, lazy: bool = False) -> PassSpec:
    """TEMPORARY during the move to plan/apply: wraps an old ``run`` module."""

    def plan(model, config, ctx):
        return Plan(module.NAME, config)

    def apply(model, plan_, ctx):
        result, record = module.run(model, plan_.config, ctx)
        return Applied(result, record.modified, record.touched, record.skipped, record.notes,
                       details=record.details)

    return PassSpec(module.NAME, module.Config, plan, apply,
                    Capabilities(lazy_weights=getattr(module, "LAZY_WEIGHTS", False)))


PASSES: dict[str, PassSpec] = {
    spec.name: spec
    for spec in (
        cleanup.PASS,
        quantize.PASS if hasattr(quantize, "PASS") else _legacy(quantize),
        prune.PASS if hasattr(prune, "PASS") else _legacy(prune),
        lowrank.PASS if hasattr(lowrank, "PASS") else _legacy(lowrank),
        distill.PASS if hasattr(distill, "PASS") else _legacy(distill),
        fuse.PASS if hasattr(fuse, "PASS") else _legacy(fuse),
    )
}


def get(name: str) -> PassSpec:
    from onnxcomp.errors import UserError

    if name not in PASSES:
        raise UserError(f"unknown pass {name!r}; known: {', '.join(PASSES)}")
    return PASSES[name]
