"""The passes, by recipe name. Explicit: adding a pass is one module (or package) that defines
``PASS = PassSpec(...)`` and one line in the tuple below. No import-time registration."""

from __future__ import annotations

from onnxcomp.errors import UserError
from onnxcomp.passes import cleanup, distill, fuse, lower, lowrank, prune, quantize
from onnxcomp.pipeline import PassSpec

PASSES: dict[str, PassSpec] = {
    spec.name: spec
    for spec in (
        cleanup.PASS,
        quantize.PASS,
        prune.PASS,
        lowrank.PASS,
        distill.PASS,
        fuse.PASS,
        lower.PASS,
    )
}


def get(name: str) -> PassSpec:
    """The pass called ``name`` in recipes, or a UserError listing the known ones."""
    if name not in PASSES:
        raise UserError(f"unknown pass {name!r}; known: {', '.join(PASSES)}")
    return PASSES[name]
