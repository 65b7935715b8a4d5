"""Golden dry-run plans for the zoo models: what each pass would do, node by node, is a reviewed
text file (tests/golden/<model>__<recipe>.txt), so a change in a pass's decisions shows in review.

Each plan is computed the way ``onnxcomp compress --dry-run`` computes it: on the cleaned-up model
(cleanup lifts PP-OCR's Constant-node weights first), without calibration data, rendered with
``Plan.table()``.

Regenerate after an intended change, then review the diff::

    UPDATE_GOLDEN=1 python -m pytest -q -m zoo tests/test_golden_plans.py
    python tests/test_golden_plans.py --update          # the same, without pytest

A plan with no rows (ppocr-det has no MatMul for int4) is a golden file too: its notes say why.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from onnxcomp import zoo
from onnxcomp.model import Model, load
from onnxcomp.pipeline import Context, Pipeline, Plan, plan_step
from onnxcomp.recipe import parse_recipe, with_cleanup

GOLDEN = Path(__file__).parent / "golden"
MODELS = ("ppocr-rec", "ppocr-det", "tiny-clip", "minilm")
# minilm is exported with torch on first fetch (minutes): used only when already in the cache.
CACHED_ONLY = ("minilm",)
RECIPES = ("quantize:int8", "quantize:int4", "prune:0.3", "lowrank:0.9")


def golden_path(model: str, recipe: str) -> Path:
    return GOLDEN / f"{model}__{recipe.replace(':', '-')}.txt"


def available(name: str) -> bool:
    return name not in CACHED_ONLY or (zoo.cache_dir() / name / "model.onnx").is_file()


_CLEANED: dict[str, Model] = {}


def cleaned(name: str) -> Model:
    """The zoo model as every pipeline starts: after cleanup."""
    if name not in _CLEANED:
        model = load(zoo.fetch(name))
        _CLEANED[name], _ = Pipeline(with_cleanup([])).run(model, Context(teacher=model))
    return _CLEANED[name]


def render(name: str, recipe: str) -> Plan:
    (step,) = parse_recipe(recipe)
    model = cleaned(name)
    return plan_step(step, model, Context(teacher=model))


def text(plan: Plan) -> str:
    return plan.table() + "\n"


def update(name: str, recipe: str) -> str:
    """Write the golden file; say what was done."""
    plan = render(name, recipe)
    path = golden_path(name, recipe)
    GOLDEN.mkdir(exist_ok=True)
    path.write_text(text(plan), encoding="utf-8")
    return f"wrote {path.name} ({len(plan.rows)} rows)"


@pytest.mark.zoo
@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("name", MODELS)
def test_dry_run_plan_matches_the_golden_file(name, recipe):
    if not available(name):
        pytest.skip(f"{name} is not in the zoo cache (fetching it exports with torch)")
    if os.environ.get("UPDATE_GOLDEN"):
        update(name, recipe)
        return
    path = golden_path(name, recipe)
    plan = render(name, recipe)
    assert path.is_file(), (f"no golden file {path.relative_to(Path(__file__).parent.parent)}: "
                            "generate it with UPDATE_GOLDEN=1 and review it")
    expected = path.read_text(encoding="utf-8")
    actual = text(plan)
    assert actual == expected, (f"the {recipe} plan of {name} changed; if intended, regenerate "
                                "with UPDATE_GOLDEN=1 and review the diff")


def main(argv: list[str]) -> int:
    if argv[1:] != ["--update"]:
        print(__doc__)
        return 2
    for name in MODELS:
        if not available(name):
            print(f"{name}: not in the zoo cache, skipped")
            continue
        for recipe in RECIPES:
            print(f"{name} {recipe}: {update(name, recipe)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
