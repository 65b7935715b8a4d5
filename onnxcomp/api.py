"""The Python API behind ``onnxcomp compress``: run a recipe, validate the result, report."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from onnxcomp import calibration
from onnxcomp.model import Model, load
from onnxcomp.pipeline import Context, Pipeline, Plan, Step, check_requirements, plan_step
from onnxcomp.recipe import apply_overrides, parse_recipe, with_cleanup
from onnxcomp.report import Report, progress

DEFAULT_RECIPE = "quantize:int8"
DEFAULT_EVAL_COUNT = 32


@dataclass
class CompressResult:
    model: Model
    report: Report
    passed: bool = True


def _as_model(model: Model | str | os.PathLike) -> Model:
    # Weights in external data stay on disk until a pass reads them (see model.load).
    return model if isinstance(model, Model) else load(model, load_weights=False)


def _model_facts(model: Model, path: str | os.PathLike | None = None) -> dict:
    facts = {"parameters": model.parameter_count(), "weight_bytes": model.weight_bytes()}
    if path is not None:
        facts["path"] = str(path)
    return facts


def evaluation_data(model: Model, eval_data, calib: calibration.Dataset | None,
                    notes: list[str]) -> calibration.Dataset:
    """Held-out data for the fidelity check: given, else the zoo's eval split, else random."""
    if eval_data is not None:
        return calibration.resolve(eval_data, model, split="eval")
    if calib is not None and calib.zoo_name:
        from onnxcomp import zoo

        data = zoo.dataset(calib.zoo_name, "eval", DEFAULT_EVAL_COUNT)
        calibration.check_dataset(data, model)
        return data
    if calib is not None:
        notes.append("fidelity measured on the calibration data (pass --eval for held-out data)")
        return calib
    notes.append("fidelity measured on random inputs (pass --eval for real data)")
    return calibration.random_data(model, 8)


def compress(model: Model | str | os.PathLike, recipe: str | Path | list[Step] | None = None,
             calib=None, eval_data=None, min_cosine: float | None = None,
             validate: bool = True, show_progress: bool = True,
             overrides: list[str] | None = None) -> CompressResult:
    """Compress ``model`` with ``recipe``; the input model object is left untouched.

    ``overrides``: ``PASS.FIELD=VALUE`` settings on top of the recipe."""
    source_path = None if isinstance(model, Model) else model
    original = _as_model(model)
    steps = apply_overrides(parse_recipe(recipe if recipe is not None else DEFAULT_RECIPE),
                            overrides)
    report = Report("compress")
    report.models["reference"] = _model_facts(original, source_path)
    data = calibration.resolve(calib, original) if calib is not None else None
    log = progress if show_progress else (lambda message: None)
    held_out = None
    if eval_data is not None or (data is not None and data.zoo_name):
        held_out = evaluation_data(original, eval_data, data, report.notes)
    ctx = Context(calibration=data, evaluation=held_out, teacher=original, progress=log)
    started = time.perf_counter()
    compressed, records = Pipeline(with_cleanup(steps)).run(original, ctx)
    report.passes = records
    report.models["candidate"] = _model_facts(compressed)
    report.models["seconds"] = time.perf_counter() - started
    passed = True
    for name in ctx.tuned_on_evaluation:
        report.notes.append(f"{name} chose its mixed precision on "
                            "the --eval data: a fidelity check on the same data is optimistic "
                            "(validate on other held-out data)")
    if validate:
        from onnxcomp.measure.validate import validate as run_validation

        eval_set = held_out or evaluation_data(original, eval_data, data, report.notes)
        log(f"validating on {eval_set.name} ({len(eval_set)} batches)")
        fidelity = run_validation(original, compressed, data=eval_set, min_cosine=min_cosine)
        report.fidelity = fidelity.fidelity
        passed = bool(report.fidelity.get("passed", True))
    return CompressResult(compressed, report, passed)


def dry_run(model: Model | str | os.PathLike, recipe=None, calib=None,
            overrides: list[str] | None = None) -> list[Plan]:
    """What each step would do, without changing anything: one Plan per step. Every step is
    planned on the cleaned-up input model (later steps would see earlier results)."""
    original = _as_model(model)
    steps = apply_overrides(parse_recipe(recipe if recipe is not None else DEFAULT_RECIPE),
                            overrides)
    data = calibration.resolve(calib, original) if calib is not None else None
    ctx = Context(calibration=data, teacher=original)
    for step in steps:
        check_requirements(step, ctx)
    current, _ = Pipeline(with_cleanup([])).run(original, ctx)  # as the real run starts
    return [plan_step(step, current, ctx) for step in steps]


def describe_dry_run(plans: list[Plan], steps_text: list[str] | None = None) -> list[str]:
    """The ``--dry-run`` text: each step's configuration, then its plan table."""
    return [(f"{steps_text[i]}\n" if steps_text else "") + plan.table()
            for i, plan in enumerate(plans)]
