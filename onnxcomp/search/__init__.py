"""Recipe search: find the best compressed model for a stated target ([search] extra).

    from onnxcomp.search import search
    result = search("rec.onnx", calib="ppocr-rec:calib:32", eval_data="ppocr-rec:eval:64",
                    constraints=["line_accuracy>=float-0.01"], objectives="latency,size",
                    n_trials=40, out_dir="search-out")
    print(result.table())

The space comes from the passes' plans on this model (``space``), Optuna proposes recipes
(``study``), each trial compresses, validates and times in its own worker process (``trial``)
on a local process pool or Ray (``executors``), and the Pareto front, every trial's report and
the chosen model are written to ``out_dir`` (``output``). See docs/search.md.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxcomp.errors import UserError
from onnxcomp.model import serialized_size
from onnxcomp.search import goals
from onnxcomp.search.study import Finished

__all__ = ["SearchResult", "search"]


@dataclass
class SearchResult:
    out_dir: Path
    trials: list[Finished]
    front: list[Finished]
    best: Finished | None
    summary: str = ""
    space: Any = None
    notes: list[str] = field(default_factory=list)

    def table(self) -> str:
        return self.summary


def _default_executor() -> str:
    import importlib.util

    return "ray" if importlib.util.find_spec("ray") is not None else "local"


def search(model: str | os.PathLike | Any, calib: Any = None, eval_data: Any = None,
           constraints: list[str] | tuple[str, ...] = (), objectives: str | list[str] = "latency",
           n_trials: int = 20, out_dir: str | os.PathLike = "onnxcomp-search",
           space: str | os.PathLike | dict | None = None, executor: str | None = None,
           ray_address: str | None = None, workers: int | None = None, seed: int = 0,
           sampler: str = "tpe", threads: int = 1, provider: str = "cpu", runs: int = 30,
           min_seconds: float = 1.0, keep_models: bool = False,
           enqueue: list[str] | tuple[str, ...] = (), html: str | os.PathLike | None = None,
           progress: Any = None, repeats: int = 3, retime: int = 3) -> SearchResult:
    """Search recipes for ``model`` meeting ``constraints``, minimizing ``objectives``.

    ``calib``/``eval_data``: data sources as ``compress`` takes them (held-out ``eval_data`` is
    what the constraints are checked on; default: the zoo's eval split for zoo data).
    ``constraints``: e.g. ``["cosine>=0.99", "line_accuracy>=float-0.01"]`` (see
    ``goals``). ``objectives``: ``latency``, ``size``, ``params`` (ratios, minimized).
    ``space``: a TOML file (or its parsed dict) narrowing or extending the derived space.
    ``executor``: ``local`` or ``ray`` (default: ray where installed, else local);
    ``ray_address``: a cluster's address. ``workers``: trials at once (default: as many as
    there are cores for ``threads`` each). ``threads``: ONNX Runtime threads (and cores) per
    timing trial. ``enqueue``: fixed recipes (``quantize:int8``) run as the first trials, so
    the search measures them side by side with what it finds (queued once, on the first start).
    ``html``: also write the HTML page (always written as ``out_dir/pareto.html``).
    ``repeats``: interleaved latency measurements per trial (the ratio is their median).
    ``retime``: with latency among the objectives, the ``retime`` fastest feasible trials and
    every feasible fixed recipe are timed again side by side in one process at the end
    (``repeats`` + 2 times), and the chosen model is the fastest on those figures
    (``latency_retimed``; 0: no re-timing). A parameter set already measured is not run again.
    An ``out_dir`` holding an earlier search with the same settings resumes it.
    """
    from onnxcomp import calibration
    from onnxcomp.api import check_data_runs, evaluation_data
    from onnxcomp.model import Model, load
    from onnxcomp.report import progress as default_progress
    from onnxcomp.search import executors, output
    from onnxcomp.search import space as space_mod
    from onnxcomp.search import study as study_mod
    from onnxcomp.search.trial import Batches, Shared

    say = progress or default_progress
    if isinstance(n_trials, bool) or not isinstance(n_trials, int) or n_trials < 1:
        raise UserError(f"trials must be a positive whole number, got {n_trials!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise UserError(f"threads must be a positive whole number, got {threads!r}")
    for value, what in ((repeats, "repeats"), (retime, "retime")):
        if isinstance(value, bool) or not isinstance(value, int) or value < (what == "repeats"):
            raise UserError(f"{what} must be a whole number >= {int(what == 'repeats')}, "
                            f"got {value!r}")
    if sampler not in study_mod.SAMPLERS:
        raise UserError(f"unknown sampler {sampler!r}: use {' or '.join(study_mod.SAMPLERS)}")
    parsed = [goals.parse_constraint(c) for c in constraints]
    names = goals.parse_objectives(objectives)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out}: exists and is not a folder")
    executor = executor or _default_executor()

    original = model if isinstance(model, Model) else load(model)
    calib_set = calibration.resolve(calib, original) if calib is not None else None
    notes: list[str] = []
    eval_set = evaluation_data(original, eval_data, calib_set, notes)
    for dataset, flag in ((calib_set, "--calib"), (eval_set, "--eval")):
        if dataset is not None:
            check_data_runs(original, dataset, flag)
    for note in notes:
        say(f"search: {note}")

    say("search: measuring the float model on the held-out data")
    from onnxcomp.measure.validate import validate

    reference = goals.reference_metrics(
        validate(original, original, data=eval_set, progress=None).fidelity)
    goals.check_metrics(parsed, reference)

    say("search: deriving the search space from the passes' plans")
    cosines = tuple(c.bound(reference) for c in parsed if c.metric == "cosine" and c.at_least)
    derived = space_mod.derive(original, calib_set is not None, cosines)
    if space is not None:
        document = space if isinstance(space, dict) else space_mod.load_overrides(space)
        derived = space_mod.apply_overrides(derived, document)
    if not derived.dimensions:
        raise UserError("the search space is empty: no pass can act on this model "
                        f"({'; '.join(derived.notes)})")

    proto = original.proto
    if serialized_size(proto) >= 2**31 - 2**24:
        raise UserError("search sends the model to its workers inline: models over 2 GB are "
                        "not supported yet")
    model_bytes = proto.SerializeToString()
    shared = Shared(
        key=hashlib.sha256(model_bytes).hexdigest()[:16] + f"-{eval_set.name}-"
        f"{calib_set.name if calib_set else 'none'}",
        model_bytes=model_bytes, calib=Batches.of(calib_set) if calib_set else None,
        evaluation=Batches.of(eval_set), threads=threads, runs=runs,
        min_seconds=min_seconds, provider=provider, repeats=repeats)
    settings = study_mod.Settings(names, parsed, reference, n_trials, seed, sampler)

    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        study = study_mod.open_study(out / "study.db", settings, derived)
        study_mod.enqueue_fixed(study, derived, tuple(enqueue))
        done_before = study_mod.finished_count(study)
        if done_before:
            say(f"search: resuming, {done_before} of {n_trials} trials already done")
        recipes: dict[int, list] = {}
        earlier = study_mod.best(study_mod.summaries(study, settings), names)  # on resume
        best_so_far: list[Finished] = [earlier] if earlier is not None else []

        def on_result(finished: Finished, result: dict[str, Any]) -> None:
            recipe = _recipe_of(study, finished.number)
            output.write_trial(out, finished, result, recipe)
            count = study_mod.finished_count(study)
            if finished.state == "FAIL":
                say(f"search: trial {finished.number} ({count}/{n_trials}) failed: "
                    f"{finished.error}")
                return
            shown = ", ".join(f"{k} {finished.metrics[k]:.4g}" for k in
                              output._columns([finished], names, [c.metric for c in parsed]))
            if finished.feasible and (not best_so_far or
                                      study_mod.best([finished, best_so_far[0]], names)
                                      is finished):
                best_so_far[:] = [finished]
            best_text = (f"best: trial {best_so_far[0].number}, {names[0]} "
                         f"{best_so_far[0].metrics[names[0]]:.4g}" if best_so_far
                         else "none feasible yet")
            say(f"search: trial {finished.number} ({count}/{n_trials}): {shown}"
                f"{'' if finished.feasible else ' (misses a constraint)'}; {best_text}")

        repeated = [0]

        def on_repeat(finished: Finished) -> None:
            repeated[0] += 1
            say(f"search: trial {finished.number} repeats trial {finished.duplicate_of}'s "
                f"parameters: its measured result told to the sampler, not run again "
                f"({repeated[0]} repeat(s) this run)")

        pool = executors.make(executor, shared, workers, threads, ray_address, provider)
        say(f"search: {n_trials} trials on the {pool.name} executor, {pool.slots} at a time")
        try:
            with study_mod.sigterm_raises():
                study_mod.run(study, derived, settings, pool, on_result, on_repeat)
        finally:
            pool.close()
        if study_mod.repeats_in_a_row(study) >= study_mod.MAX_REPEATS_IN_A_ROW:
            notes.append(f"stopped at {study_mod.finished_count(study)} trials: the sampler "
                         f"proposed only measured parameter sets "
                         f"{study_mod.MAX_REPEATS_IN_A_ROW} times in a row")
            say(f"search: {notes[-1]}")
        trials = study_mod.summaries(study, settings)
        retimed = _retime(study, trials, names, retime, repeats + 2, out, shared, threads, say)
        for t in study.trials:
            if "recipe" in t.user_attrs:
                recipes[t.number] = t.user_attrs["recipe"]
        front = study_mod.pareto_front(trials, names)
        chosen = study_mod.best(trials, names)
        summary = output.write_summary(
            out, trials, front, chosen, names, [c.describe() for c in parsed],
            [c.metric for c in parsed], reference, recipes, derived.to_dict(), keep_models,
            [{"text": c.describe(), "bound": c.bound(reference),
              "reference": reference.get(c.metric)} for c in parsed],
            Path(html) if html else None, keep=set(retimed))
    return SearchResult(out, trials, front, chosen, summary, derived, notes)


def _retime(study: Any, trials: list[Finished], names: tuple[str, ...], top: int,
            repeats: int, out: Path, shared: Any, threads: int, say: Any) -> dict[int, dict]:
    """Re-time the candidates of ``study.retime_candidates`` side by side (their figures go
    into each trial's metrics as ``latency_retimed`` and into the study, so a search run
    again with nothing new to do reuses them). Returns {trial number: figures}."""
    from onnxcomp.search import executors, output
    from onnxcomp.search import study as study_mod

    candidates = study_mod.retime_candidates(trials, names, top)
    paths = {t.number: str(output.trial_dir(out, t.number) / "model.onnx") for t in candidates}
    paths = {n: p for n, p in paths.items() if os.path.isfile(p)}
    stored = {int(k): v for k, v in (study.user_attrs.get("retimed") or {}).items()}
    if paths and set(stored) != set(paths):
        listed = ", ".join(str(n) for n in sorted(paths))
        say(f"search: re-timing trials {listed} side by side with the float model")
        stored = executors.retime_here(shared, paths, threads, repeats)
        study.set_user_attr("retimed", {str(k): v for k, v in stored.items()})
    for t in trials:
        if t.number in stored:
            t.metrics[study_mod.RETIMED] = stored[t.number]["latency"]
    if stored:
        shown = ", ".join(f"trial {n} {v['latency']:.3f}" for n, v in sorted(
            stored.items(), key=lambda item: item[1]["latency"]))
        say(f"search: re-timed latency: {shown}")
    return stored


def _recipe_of(study: Any, number: int) -> list[tuple[str, dict]]:
    trial = study.trials[number]
    return [tuple(step) for step in trial.user_attrs.get("recipe", [])]


class _locked:
    """One search at a time per output folder (an flock on OUT_DIR/.lock)."""

    def __init__(self, folder: Path):
        self.path = folder / ".lock"

    def __enter__(self):
        self.handle = open(self.path, "a+")
        try:
            import fcntl

            fcntl.flock(self.handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except ImportError:  # not POSIX: no lock
            pass
        except OSError:
            self.handle.close()
            raise UserError(f"{self.path.parent}: another search is running there") from None
        return self

    def __exit__(self, *exc):
        self.handle.close()
        return False
