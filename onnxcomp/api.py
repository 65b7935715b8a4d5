"""The Python API behind ``onnxcomp compress``: run a recipe, check and validate the result,
report.

Our output is checked whatever the caller asks (``validate=False`` included): each step's
result by onnx's structural check, so that a broken graph is blamed on the pass that made it,
and the final model by onnx.checker (the full check where its size allows) and an ONNX Runtime
session (CPU, optimizations off). A refusal is ``InvalidOutput`` (exit 3, nothing written);
the user's own model failing the same check is the user's (``UserError``), not ours.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path

from onnxcomp import calibration, progress, report_data, runtime, targets
from onnxcomp.errors import InvalidOutput, UserError
from onnxcomp.model import Model, load
from onnxcomp.passes import lower
from onnxcomp.pipeline import (
    Applied,
    Context,
    PassRecord,
    Pipeline,
    Plan,
    Step,
    check_requirements,
    plan_step,
)
from onnxcomp.recipe import apply_overrides, parse_recipe, recipe_target, with_cleanup
from onnxcomp.report import Report

DEFAULT_RECIPE = "quantize:int8"
DEFAULT_EVAL_COUNT = 32


@dataclass
class CompressResult:
    model: Model
    report: Report
    passed: bool = True
    # No --min-cosine was given and an output fell below the default floor (FIDELITY_FLOOR).
    below_floor: bool = False


# Without --min-cosine, compress still gates on fidelity: an output whose mean cosine falls
# below this floor makes the run exit 1 with the report written and no model (as a missed
# --min-cosine does: nothing that looks like a result). Recipes
# that only quantize (and fuse/distill) are held to 0.95: int8 that keeps less is broken (a
# PicoDet detector at 0.67 shipped with exit 0 before this); recipes that prune or factor remove
# capacity by design and are held to 0.90 (prune:0.3 alone on PP-OCRv4 rec: 0.54; with distill
# 0.91). Set --min-cosine to choose another gate.
FIDELITY_FLOOR = {"quantize": 0.95, "destructive": 0.90}
_DESTRUCTIVE = {"prune", "lowrank"}


def fidelity_floor(steps: list[Step]) -> float:
    return FIDELITY_FLOOR["destructive" if _DESTRUCTIVE & {s.name for s in steps}
                          else "quantize"]


def _as_model(model: Model | str | os.PathLike) -> Model:
    # Weights in external data stay on disk until a pass reads them (see model.load).
    return model if isinstance(model, Model) else load(model, load_weights=False)


def _model_facts(model: Model, path: str | os.PathLike | None = None) -> dict:
    # The breakdown reads shapes only: a model whose weights stay on disk is not read.
    facts = {"parameters": model.parameter_count(), "weight_bytes": model.weight_bytes(),
             "breakdown": report_data.model_breakdown(model)}
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
             overrides: list[str] | None = None,
             target: str | targets.Target | None = None,
             speed_check: bool = False,
             shapes: dict[str, list[int]] | None = None) -> CompressResult:
    """Compress ``model`` with ``recipe``; the input model object is left untouched.

    ``overrides``: ``PASS.FIELD=VALUE`` settings on top of the recipe. ``target``: the
    deployment target (``onnxcomp.targets``, default ``ort-cpu``): its quantize defaults go on
    before ``overrides``, a quantize mode it does not support is a ``UserError``, and the
    result also gets the target's check (OpenVINO compiles it; TensorRT/QNN rules as notes).
    User mistakes (recipe, overrides, data, a mode the target does not support) raise
    ``UserError``; a result that onnx's checker or ONNX Runtime refuses raises
    ``InvalidOutput`` (see the module docstring), with or without ``validate``.
    ``show_progress``: progress through the process's :mod:`onnxcomp.progress` (bars on a
    terminal, lines elsewhere; ``progress.configure`` sets it), else nothing; the passes get it
    as ``ctx.progress``. ``speed_check``: when the recipe is meant to make the model faster
    (int8 quantization, prune, lowrank) and validation runs, time the input and the result
    side by side on the target's runtime (1 thread, a short interleaved run on the held-out
    data's first batch) and add a "not worth it" verdict when the result is slower
    (:func:`never_slower`; the CLI's default, ``--no-speed-check`` turns it off).
    ``shapes``: input name -> sizes, fixed in the result after validation (which runs on the
    held-out data's own shapes), for runtimes that take static shapes only
    (:mod:`onnxcomp.fixed_shapes`)."""
    source_path = None if isinstance(model, Model) else model
    original = _as_model(model)
    # A broken input is the user's (exit 2), found before any work; the ORT load comes with
    # the data check below (a second session here would double the cost on big models).
    runtime.check_input(original, session=False)
    chosen = targets.get(recipe_target(recipe, target))  # --target wins over the recipe's
    steps = target_steps(recipe, overrides, chosen)
    if shapes:  # a bad --shape is found before the work, not after it
        from onnxcomp import fixed_shapes

        fixed_shapes.check(original, shapes)
    report = Report("compress")
    report.environment["target"] = chosen.name
    report.models["reference"] = _model_facts(original, source_path)
    data = calibration.resolve(calib, original) if calib is not None else None
    log = progress.current() if show_progress else progress.Progress(quiet=True)
    held_out = None
    if eval_data is not None or (data is not None and data.zoo_name):
        held_out = evaluation_data(original, eval_data, data, report.notes)
    for dataset, flag in ((data, "--calib"), (held_out, "--eval")):
        if dataset is not None:
            check_data_runs(original, dataset, flag)
    ctx = Context(calibration=data, evaluation=held_out, teacher=original, progress=log)
    started = time.perf_counter()
    pipeline = with_cleanup(steps)
    if _structurally_valid(original):  # else a pass would be blamed for the input's flaw
        pipeline = [_checked(step) for step in pipeline]
    compressed, records = Pipeline(pipeline).run(original, ctx)
    log("checking the result (onnx.checker, ONNX Runtime)")
    check_result(original, compressed, records, report.notes)
    if any(record.modified for record in records):
        check_target(compressed, chosen, report.notes)
    report.passes = records
    report.models["candidate"] = _model_facts(compressed)
    report.models["seconds"] = time.perf_counter() - started
    passed = True
    for name in ctx.tuned_on_evaluation:
        report.notes.append(f"{name} chose its mixed precision on "
                            "the --eval data: a fidelity check on the same data is optimistic "
                            "(validate on other held-out data)")
    _never_bigger(original, compressed, steps, report)
    _nothing_done(records, report)
    below_floor = False
    if validate:
        from onnxcomp.measure.validate import validate as run_validation

        eval_set = held_out or evaluation_data(original, eval_data, data, report.notes)
        log(f"validating on {eval_set.name} ({len(eval_set)} batches)")
        fidelity = run_validation(original, compressed, data=eval_set, min_cosine=min_cosine,
                                  ours=True, progress=log)
        report.fidelity = fidelity.fidelity
        passed = bool(report.fidelity.get("passed", True))
        if min_cosine is None:
            below_floor = _below_floor(report, fidelity_floor(steps))
        if speed_check and passed and not below_floor \
                and any(record.modified for record in records):
            never_slower(original, compressed, steps, chosen, eval_set, report, log)
    if shapes:
        from onnxcomp import fixed_shapes

        compressed, fixed = fixed_shapes.fix(compressed, shapes)
        report.notes.extend(fixed)
        report.models["candidate"]["input_shapes"] = {k: list(v) for k, v in shapes.items()}
    if any(record.modified for record in records):
        structural_findings(compressed, chosen, report.notes)  # on the shapes as delivered
    return CompressResult(compressed, report, passed, below_floor)


_COMPRESSING = {"quantize", "prune", "lowrank"}


def _nothing_done(records: list[PassRecord], report: Report) -> None:
    """A compressing pass that found nothing to act on says so as a verdict (and so on stderr),
    with its own hint (e.g. int8-dynamic on a conv net: use quantize:int8)."""
    for record in records:
        said = next((n for n in record.notes if n.startswith("nothing to ")), None)
        if record.name in _COMPRESSING and not record.modified and said:
            report.verdicts.append(f"nothing done: {record.name}: {said}")


def _never_bigger(original: Model, compressed: Model, steps: list[Step], report: Report) -> None:
    """A compressing recipe whose weights grew is not worth it: said in the verdicts."""
    if not _COMPRESSING & {s.name for s in steps}:
        return
    before, after = original.weight_bytes(), compressed.weight_bytes()
    if after > before:
        report.verdicts.append(f"not worth it: the weights grew from {before} to {after} bytes "
                               f"({after / max(before, 1):.2f}x the input)")


# Recipes meant to make the model faster, not only smaller: int4 (MatMulNBits) and fp16/bf16 are
# size modes on a CPU (docs/quantize.md, docs/targets.md), so they are not held to float speed.
_FAST_QUANTIZE_MODES = {"int8", "int8-dynamic"}
# A result slower than its input by more than this p50 ratio gets the verdict: a short
# interleaved run on a busy 2-core machine moved ratios of identical models by up to ~4 %.
SLOWER_THAN_INPUT = 1.05
SPEED_CHECK_RUNS, SPEED_CHECK_SECONDS = 10, 0.5


def meant_faster(steps: list[Step]) -> bool:
    return any(s.name in _DESTRUCTIVE
               or (s.name == "quantize" and s.config.mode in _FAST_QUANTIZE_MODES)
               for s in steps)


def never_slower(original: Model, compressed: Model, steps: list[Step], target: targets.Target,
                 data: calibration.Dataset, report: Report, log) -> None:
    """Time ``original`` and ``compressed`` interleaved on ``target``'s runtime (1 thread, the
    first batch of ``data``) when the recipe is meant to be faster; the timing goes into
    ``report.bench`` and a result slower than its input by more than ``SLOWER_THAN_INPUT``
    gets a "not worth it" verdict. Where it cannot time (weights left on disk, a target
    without its device or runtime here) it says so in the notes instead."""
    if not meant_faster(steps):
        return
    if original.lazy or compressed.lazy:
        report.notes.append("speed not checked: the weights stay on disk (a large model); "
                            "time it with onnxcomp bench")
        return
    if target.check == "structural":
        report.notes.append(f"speed not checked: target {target.name} runs on its own device "
                            "(time it there with onnxcomp bench --providers)")
        return
    if target.runtime == "openvino":
        from onnxcomp import runtime_openvino

        if not runtime_openvino.available():
            report.notes.append("speed not checked: OpenVINO is not installed "
                                "(pip install 'onnxcomp[openvino]')")
            return
    from onnxcomp.measure.bench import bench

    log(f"speed check: input and result interleaved on {target.runtime}, 1 thread")
    timing = bench([original, compressed], providers=["cpu"], threads=[1],
                   runs=SPEED_CHECK_RUNS, warmup=2, data=data, names=["input", "result"],
                   memory=False, min_seconds=SPEED_CHECK_SECONDS, progress=None,
                   runtimes=(target.runtime,))
    report.bench = timing.bench
    rows = [r for r in timing.bench["results"] if r["model_index"] == 1]
    if not rows:
        return
    ratio, before = rows[0]["latency_ratio"], timing.bench["results"][0]["p50_ms"]
    if ratio > SLOWER_THAN_INPUT:
        static = any(s.name == "quantize" and s.config.mode == "int8"
                     and s.config.keep_float_by != "latency" for s in steps)
        hint = "; --set quantize.keep_float_by=latency keeps slower layers float" if static else ""
        report.verdicts.append(
            f"not worth it: the result is slower than its input on {target.name} "
            f"({rows[0]['p50_ms']:.3g} ms against {before:.3g} ms p50 at 1 thread, "
            f"{ratio:.2f}x; a short check: confirm with onnxcomp bench{hint})")


def _below_floor(report: Report, floor: float) -> bool:
    """The worst output's mean cosine against the default floor; a verdict when below."""
    outputs = (report.fidelity or {}).get("outputs", {})
    worst = min(((o["cosine_mean"], name) for name, o in outputs.items()
                 if o.get("cosine_mean") is not None), default=None)
    if worst is None or worst[0] >= floor:
        return False
    report.verdicts.append(f"below the fidelity floor: output {worst[1]!r} mean cosine "
                           f"{worst[0]:.4f} < {floor} (the default gate without --min-cosine; "
                           "set --min-cosine to choose another)")
    return True


def check_data_runs(model: Model, data: calibration.Dataset, flag: str) -> None:
    """The user's model must run on the first batch of the user's data: a ``UserError`` now
    rather than a pass failing on it (exit 3) halfway through. Skipped for a model whose
    weights stay on disk (a session would read them all; the passes run it by segments)."""
    if model.lazy:
        return
    sess = runtime.session(model, optimize=False)
    try:
        runtime.run(sess, data.make_batch(0))
    except MemoryError:
        raise
    except Exception as exc:  # ONNX Runtime's errors: the data does not fit the model
        lines = str(exc).strip().splitlines() or [type(exc).__name__]
        raise UserError(f"the model cannot run on {data.name} batch 0 (check {flag}): "
                        f"{lines[0]}") from exc


def _structurally_valid(model: Model) -> bool:
    try:
        runtime.check_structure(model, "the input model")
    except InvalidOutput:
        return False
    return True


def _checked(step: Step) -> Step:
    """``step`` with its result checked structurally whenever it changed the model, so that an
    invalid graph is blamed on the pass that made it rather than found at the end."""
    spec = step.spec

    def apply(model: Model, plan: Plan, ctx: Context) -> Applied:
        applied = spec.apply(model, plan, ctx)
        if applied.modified:
            runtime.check_structure(applied.model, f"the model pass {spec.name!r} produced")
        return applied

    return Step(dataclasses.replace(spec, apply=apply), step.config)


def check_result(original: Model, compressed: Model, records: list[PassRecord],
                 notes: list[str]) -> None:
    """The compressed model must pass onnx.checker and load in ONNX Runtime, else
    ``InvalidOutput`` naming the passes that changed it. Where the input model has the same
    flaw (it fails onnx's full check too, or ONNX Runtime refuses it too), the flaw is the
    input's: the output gets the structural check only, or the user a ``UserError``."""
    changed = list(dict.fromkeys(record.name for record in records if record.modified))
    if not changed:
        return  # the output is the input
    what = f"the compressed model (changed by {', '.join(changed)})"
    try:
        runtime.check_onnx(compressed, what)
    except InvalidOutput:
        if not runtime.fails_full_check(original):
            raise
        notes.append("the input model fails onnx's full check itself: the result was "
                     "checked structurally")
        runtime.check_onnx(compressed, what, full=False)
    try:
        runtime.check_loads(compressed, what)
    except InvalidOutput:
        try:
            runtime.session(original, optimize=False)
        except UserError as exc:  # ONNX Runtime refuses the user's model too
            raise UserError(f"the input model: {exc}") from None
        raise


def target_steps(recipe, overrides: list[str] | None, target: targets.Target) -> list[Step]:
    """The recipe's steps with ``target``'s quantize defaults applied before ``overrides``
    (only where the recipe has a quantize step), and its modes checked."""
    steps = parse_recipe(recipe if recipe is not None else DEFAULT_RECIPE)
    modes = [s.config.mode for s in steps if s.name == "quantize"]
    implied = targets.quantize_overrides(target, None, modes) if modes else []
    if any(s.name == lower.NAME for s in steps) and not target.lowers:
        raise lower.refuse_for(target.name, target.runtime)
    if target.lowers and "int8" in modes and all(s.name != lower.NAME for s in steps):
        # Last, after distill too: QAT trains the QDQ graph, which lowering then rewrites.
        steps.append(Step(lower.PASS, lower.PASS.default_config()))
    steps = apply_overrides(steps, [*implied, *(overrides or [])])
    targets.check_modes(target, [s.config.mode for s in steps if s.name == "quantize"])
    return steps


def check_target(model: Model, target: targets.Target, notes: list[str]) -> None:
    """The target's own check of a model onnxcomp produced: OpenVINO must compile it (when
    installed; ``InvalidOutput`` if it refuses); an opset below the target's is said too.
    Structural targets' findings come after the input shapes are fixed
    (``structural_findings``)."""
    if model.opset() < target.min_opset:
        notes.append(f"target {target.name}: opset {model.opset()} is below the "
                     f"{target.min_opset} it needs")
    if target.check == "openvino":
        from onnxcomp import runtime_openvino

        if not runtime_openvino.available():
            notes.append("target openvino: not compiled by OpenVINO here (it is not installed: "
                         "pip install 'onnxcomp[openvino]')")
        else:
            runtime_openvino.check_compiles(model, "the compressed model")
            notes.append("target openvino: compiled by OpenVINO's CPU plugin; the fidelity "
                         "here is measured in ONNX Runtime, and OpenVINO can differ (check it "
                         "there: docs/targets.md)")


def structural_findings(model: Model, target: targets.Target, notes: list[str]) -> None:
    """A structurally checked target's documented rules, as notes on the delivered model."""
    if target.check != "structural":
        return
    findings = [] if model.lazy else targets.placement_findings(model.proto, target)
    notes.append(f"target {target.name}: checked structurally only (not run here)")
    notes.extend(f"target {target.name}: {finding}" for finding in findings)
    notes.extend(f"target {target.name}: not implemented: {item}" for item in target.missing)


def dry_run(model: Model | str | os.PathLike, recipe=None, calib=None,
            overrides: list[str] | None = None,
            target: str | targets.Target | None = None) -> list[Plan]:
    """What each step would do, without changing anything: one Plan per step. Every step is
    planned on the cleaned-up input model (later steps would see earlier results)."""
    original = _as_model(model)
    runtime.check_input(original, session=False)
    steps = target_steps(recipe, overrides, targets.get(recipe_target(recipe, target)))
    data = calibration.resolve(calib, original) if calib is not None else None
    ctx = Context(calibration=data, teacher=original)
    for step in steps:
        check_requirements(step, ctx)
    if data is not None:
        check_data_runs(original, data, "--calib")
    current, _ = Pipeline(with_cleanup([])).run(original, ctx)  # as the real run starts
    plans = [plan_step(step, current, ctx) for step in steps]
    for plan in plans[1:]:
        plan.notes.append("planned on the cleaned-up input: a dry run does not apply the "
                          "earlier steps, so this step will see their result, not this model")
    return plans
