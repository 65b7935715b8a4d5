"""The Optuna study behind ``onnxcomp search``: ask for recipes, run them, tell the results.

- The study lives in ``OUT_DIR/study.db`` (SQLite): a search run again with the same
  ``OUT_DIR`` resumes. Trials that finished (complete, or failed with an error) count once;
  trials cut off by an interruption (SIGTERM, Ctrl-C, a killed process) are marked failed
  without an error and their parameters queued again, so they run first on resume.
- Trials run in batches of the executor's width: ask ``slots`` trials, run them, tell all of
  them in trial order, ask the next batch. Waiting for the batch's slowest trial costs some
  worker time; in exchange the sampler sees the same history whatever order the workers finish
  in, so a seeded search proposes the same recipes on the local pool and on Ray. The sampler is
  re-seeded per batch from ``(seed, first trial number)``, so a resumed search does not replay
  the random draws of its first start.
- Multi-objective: every objective a minimized ratio to the float model; constraints reach
  Optuna as ``constraints_func`` values (``<= 0`` is met), so TPE / NSGA-II prefer feasible
  recipes. The Pareto front is computed here over complete, feasible trials.
- A parameter set already measured is not run again: the sampler gets the stored result (the
  trial carries ``duplicate_of``), the trial does not count towards ``n_trials`` and is left
  out of the summaries; ``MAX_REPEATS_IN_A_ROW`` such proposals in a row end the search (the
  sampler has nothing new to propose). Measured on MiniLM: TPE proposed one recipe four times
  in 16 trials.
- With latency among the objectives, the chosen model is picked on the re-timed figures
  (``latency_retimed``, see ``retime_candidates``) where the search re-timed any.
"""

from __future__ import annotations

import hashlib
import json
import math
import signal
import threading
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxcomp.errors import UserError
from onnxcomp.search import goals
from onnxcomp.search.space import Space
from onnxcomp.search.trial import Job

STUDY_NAME = "onnxcomp-search"
SAMPLERS = ("tpe", "nsga2")
MAX_REPEATS_IN_A_ROW = 25  # proposals of measured parameter sets in a row that end a search


class Interrupted(Exception):
    """SIGTERM during a search (turned into an exception so the study is left consistent)."""


@dataclass
class Settings:
    objectives: tuple[str, ...]
    constraints: list[goals.Constraint]
    reference: dict[str, float]
    n_trials: int
    seed: int = 0
    sampler: str = "tpe"


@dataclass
class Finished:
    """What the loop hands back per trial, for output and the front."""

    number: int
    state: str
    params: dict[str, Any]
    metrics: dict[str, float] = field(default_factory=dict)
    violations: list[float] = field(default_factory=list)
    error: str | None = None
    fixed_recipe: str | None = None  # the fixed recipe this trial was enqueued as, if any
    duplicate_of: int | None = None  # a repeat of an earlier trial's parameters (not run)

    @property
    def feasible(self) -> bool:
        return self.state == "COMPLETE" and all(v <= 0 for v in self.violations)


def _optuna():
    try:
        import optuna
    except ImportError:
        raise UserError("search needs optuna: pip install 'onnxcomp[search]'") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def _constraints_of(trial: Any) -> list[float]:
    return list(trial.user_attrs.get("constraints", [math.inf]))


def make_sampler(kind: str, seed: int, n_trials: int, constrained: bool):
    import warnings

    optuna = _optuna()
    func = _constraints_of if constrained else None
    with warnings.catch_warnings():  # "multivariate/group/constraints_func is experimental"
        warnings.simplefilter("ignore")
        if kind == "tpe":
            return optuna.samplers.TPESampler(
                seed=seed, multivariate=True, group=True, constraints_func=func,
                n_startup_trials=max(2, min(10, n_trials // 3)))
        if kind == "nsga2":
            return optuna.samplers.NSGAIISampler(
                seed=seed, constraints_func=func, population_size=max(4, min(20, n_trials // 3)))
    raise UserError(f"unknown sampler {kind!r}: use {' or '.join(SAMPLERS)}")


def batch_seed(seed: int, first: int) -> int:
    """The sampler's seed for the batch starting at trial ``first``: hashed, because numpy's
    generators seeded with neighbouring integers drew the same first choice (measured)."""
    digest = hashlib.sha256(f"{seed}:{first}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def open_study(path: Path, settings: Settings, space: Space):
    """The study in ``path`` (created or resumed); a different search there is a UserError."""
    optuna = _optuna()
    storage = f"sqlite:///{path}"
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME, load_if_exists=True,
                                directions=["minimize"] * len(settings.objectives))
    signature = {"objectives": list(settings.objectives),
                 "constraints": [c.describe() for c in settings.constraints],
                 "dimensions": space.to_dict()["dimensions"], "fixed": space.to_dict()["fixed"]}
    stored = study.user_attrs.get("signature")
    if stored is None:
        for key, value in signature.items():
            study.set_user_attr(key, value)
        study.set_user_attr("signature", signature)
        study.set_user_attr("reference", settings.reference)
    elif _plain(stored) != _plain(signature):
        changed = [k for k in signature if _plain(stored.get(k)) != _plain(signature[k])]
        raise UserError(f"{path.parent} holds a search with other {', '.join(changed)}: "
                        "use another output folder to start a new search")
    return study


def _plain(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str))


def enqueue_fixed(study: Any, space: Space, recipes: list[str] | tuple[str, ...]) -> int:
    """Queue each fixed recipe as one of the first trials (only on a study's first start, so a
    resumed search does not run them twice). Returns how many were queued."""
    if not recipes or study.trials or study.user_attrs.get("enqueued"):
        return 0
    queued = [(text, space.params_for(text)) for text in recipes]  # all checked before any
    for text, params in queued:
        study.enqueue_trial(params, user_attrs={"fixed_recipe": text})
    study.set_user_attr("enqueued", [text for text, _ in queued])
    return len(queued)


def finished_count(study: Any) -> int:
    """Trials that count towards ``n_trials``: complete, or failed with an error, and run
    (a repeat of a measured parameter set does not count)."""
    return sum(1 for t in study.trials if _measured(t))


def _measured(trial: Any) -> bool:
    from optuna.trial import TrialState

    if "duplicate_of" in trial.user_attrs:
        return False
    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL
                                                  and "error" in trial.user_attrs)


def params_key(params: dict[str, Any]) -> str:
    """A parameter set as one comparable string (the same recipe, the same key). Floats are
    rounded as ``Dimension.suggest`` rounds them: Optuna stores a stepped float's raw value
    (0.35000000000000003) while the trial ran with the rounded one."""
    return json.dumps({k: round(v, 12) if isinstance(v, float) else v
                       for k, v in sorted(params.items())}, default=str)


def measured_params(study: Any) -> dict[str, Any]:
    """The first measured trial of every parameter set in the study, by ``params_key``."""
    seen: dict[str, Any] = {}
    for trial in study.trials:
        if _measured(trial):
            seen.setdefault(params_key(trial.params), trial)
    return seen


def repeats_in_a_row(study: Any) -> int:
    """How many of the study's last trials were repeats of measured parameter sets."""
    count = 0
    for trial in reversed(study.trials):
        if "duplicate_of" not in trial.user_attrs:
            break
        count += 1
    return count


def requeue_interrupted(study: Any) -> int:
    """Trials left RUNNING by a dead process: failed (without an error, so they don't count)
    and their parameters queued again. Returns how many."""
    from optuna.trial import TrialState

    stale = [t for t in study.trials if t.state == TrialState.RUNNING]
    for trial in stale:
        _cut_off(study, trial)
    return len(stale)


# ``pending``: a SIGTERM arrived and has not been raised yet. It stays set until raised, so a
# raise that Python swallowed (the handler ran inside a weakref callback or ``__del__``, where
# exceptions are only printed) is raised again at the next check.
_DEFER = {"depth": 0, "pending": False}


@contextmanager
def sigterm_raises():
    """SIGTERM raises ``Interrupted`` in the main thread while the search runs (deferred to the
    end of a ``_bookkeeping`` section, so the study is never left half-told)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _DEFER["pending"] = True
        if not _DEFER["depth"]:
            raise Interrupted("terminated")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
        _DEFER.update(depth=0, pending=False)


@contextmanager
def _bookkeeping():
    """Asking and telling trials: a SIGTERM arriving here takes effect when it is done."""
    _DEFER["depth"] += 1
    try:
        yield
    finally:
        _DEFER["depth"] -= 1
    if not _DEFER["depth"]:
        raise_if_terminated()


def raise_if_terminated() -> None:
    """Raise ``Interrupted`` for a SIGTERM that arrived and has not been raised yet."""
    if _DEFER["pending"]:
        _DEFER["pending"] = False
        raise Interrupted("terminated")


def _cut_off(study: Any, trial: Any) -> None:
    """A trial the interruption cut off: failed without an error (not counted) and its
    parameters queued to run first on resume."""
    from optuna.trial import TrialState

    study.tell(trial.number, state=TrialState.FAIL)
    attrs = {"retry_of": trial.number}
    if "fixed_recipe" in trial.user_attrs:
        attrs["fixed_recipe"] = trial.user_attrs["fixed_recipe"]
    study.enqueue_trial(trial.params, user_attrs=attrs)


def run(study: Any, space: Space, settings: Settings, executor: Any,
        on_result: Callable[[Finished, dict[str, Any]], None],
        on_repeat: Callable[[Finished], None] | None = None) -> None:
    """Ask, run and tell until ``n_trials`` trials have finished (see the module docstring).
    A proposal of a measured parameter set is told its stored result instead of running
    (``on_repeat`` hears of it)."""
    requeue_interrupted(study)
    constrained = bool(settings.constraints)
    while True:
        remaining = settings.n_trials - finished_count(study)
        if remaining <= 0 or repeats_in_a_row(study) >= MAX_REPEATS_IN_A_ROW:
            return
        batch: list[tuple[Any, Job]] = []
        asked: list[Any] = []
        repeats: list[tuple[Any, int]] = []  # (trial, the trial whose parameters it repeats)
        results: dict[int, dict[str, Any]] = {}
        try:
            with _bookkeeping():
                first = len(study.trials)
                study.sampler = make_sampler(settings.sampler, batch_seed(settings.seed, first),
                                             settings.n_trials, constrained)
                seen = {key: t.number for key, t in measured_params(study).items()}
                in_a_row = repeats_in_a_row(study)
                while len(batch) < min(executor.slots, remaining):
                    if in_a_row >= MAX_REPEATS_IN_A_ROW:
                        break
                    trial = study.ask()
                    asked.append(trial)
                    params = space.sample(trial)
                    key = params_key(params)
                    if key in seen:  # measured (or running in this batch): not run again
                        in_a_row += 1
                        if seen[key] < first:  # told now, so the sampler's next ask sees it
                            _tell_repeat(study, trial, seen[key], on_repeat)
                            asked.pop()
                        else:  # repeats a trial of this batch: told after it
                            repeats.append((trial, seen[key]))
                        continue
                    in_a_row = 0
                    seen[key] = trial.number
                    recipe = space.recipe(params)
                    trial.set_user_attr("recipe", [[name, table] for name, table in recipe])
                    batch.append((trial, Job(trial.number, params, recipe)))
            if batch:
                for index, result in executor.run([job for _, job in batch]):
                    results[index] = result
                    raise_if_terminated()
        except (KeyboardInterrupt, Interrupted):
            from optuna.trial import TrialState

            _DEFER["pending"] = False  # this one is being raised

            with _bookkeeping():
                told = {batch[i][0].number for i in results}
                repeated = {trial.number for trial, _ in repeats}
                for trial in asked:
                    if trial.number not in told and trial.number not in repeated:
                        _cut_off(study, trial)  # not counted, asked again on resume
                for index in sorted(results):
                    _tell(study, batch[index][0], results[index], settings, on_result)
                for trial, original in repeats:
                    if original in told:
                        _tell_repeat(study, trial, original, on_repeat)
                    else:  # repeats a trial that was cut off: that one is asked again
                        study.tell(trial.number, state=TrialState.FAIL)
            raise
        with _bookkeeping():
            for index in range(len(batch)):  # in trial order: the sampler's history is the same
                _tell(study, batch[index][0], results[index], settings, on_result)
            for trial, original in repeats:
                _tell_repeat(study, trial, original, on_repeat)


def _tell_repeat(study: Any, trial: Any, original: int,
                 on_repeat: Callable[[Finished], None] | None) -> None:
    """Tell ``trial`` the stored result of trial ``original`` (same parameters), not run."""
    from optuna.trial import TrialState

    source = study.trials[original]
    trial.set_user_attr("duplicate_of", original)
    for key in ("recipe", "metrics", "constraints", "error"):
        if key in source.user_attrs:
            trial.set_user_attr(key, source.user_attrs[key])
    if source.state == TrialState.COMPLETE:
        study.tell(trial, list(source.values))
        state = "COMPLETE"
    else:
        study.tell(trial, state=TrialState.FAIL)
        state = "FAIL"
    if on_repeat is not None:
        on_repeat(Finished(trial.number, state, dict(trial.params),
                           dict(source.user_attrs.get("metrics", {})),
                           error=source.user_attrs.get("error"), duplicate_of=original))


def _tell(study: Any, trial: Any, result: dict[str, Any], settings: Settings,
          on_result: Callable[[Finished, dict[str, Any]], None]) -> None:
    from optuna.trial import TrialState

    for key in ("node", "seconds", "compress_seconds", "p50_ms"):
        if key in result:
            trial.set_user_attr(key, result[key])
    if not result.get("ok"):
        error = str(result.get("error", "unknown error"))[:2000]
        trial.set_user_attr("error", error)
        study.tell(trial, state=TrialState.FAIL)
        on_result(Finished(trial.number, "FAIL", dict(trial.params), error=error,
                           fixed_recipe=trial.user_attrs.get("fixed_recipe")), result)
        return
    metrics = result["metrics"]
    violations = goals.feasible(metrics, settings.constraints, settings.reference)
    trial.set_user_attr("metrics", metrics)
    trial.set_user_attr("constraints", [v if math.isfinite(v) else 1e9 for v in violations])
    values = [metrics[name] for name in settings.objectives]
    study.tell(trial, values)
    on_result(Finished(trial.number, "COMPLETE", dict(trial.params), metrics, violations,
                       fixed_recipe=trial.user_attrs.get("fixed_recipe")), result)


def summaries(study: Any, settings: Settings) -> list[Finished]:
    """Every finished trial of the study (this run's and earlier runs'), in trial order."""
    from optuna.trial import TrialState

    result = []
    for t in study.trials:
        if "duplicate_of" in t.user_attrs:  # a repeat, not run: its original is listed
            continue
        if t.state == TrialState.COMPLETE:
            metrics = dict(t.user_attrs.get("metrics", {}))
            result.append(Finished(t.number, "COMPLETE", dict(t.params), metrics,
                                   goals.feasible(metrics, settings.constraints,
                                                  settings.reference),
                                   fixed_recipe=t.user_attrs.get("fixed_recipe")))
        elif t.state == TrialState.FAIL and "error" in t.user_attrs:
            result.append(Finished(t.number, "FAIL", dict(t.params),
                                   error=t.user_attrs["error"],
                                   fixed_recipe=t.user_attrs.get("fixed_recipe")))
    return result


def pareto_front(trials: list[Finished], objectives: tuple[str, ...]) -> list[Finished]:
    """Feasible trials no other feasible trial beats on every objective (ties: both kept);
    latency is the re-timed figure where a trial has one (the figures the choice is made on)."""
    candidates = [t for t in trials if t.feasible]

    def value(t: Finished, objective: str) -> float:
        if objective == "latency" and RETIMED in t.metrics:
            return t.metrics[RETIMED]
        return t.metrics[objective]

    def dominates(a: Finished, b: Finished) -> bool:
        pairs = [(value(a, o), value(b, o)) for o in objectives]
        return all(x <= y for x, y in pairs) and any(x < y for x, y in pairs)

    front = [t for t in candidates if not any(dominates(o, t) for o in candidates)]
    return sorted(front, key=lambda t: tuple(value(t, o) for o in objectives))


def best(trials: list[Finished], objectives: tuple[str, ...]) -> Finished | None:
    """The chosen model: feasible, lowest first objective (then the next ones, then number).
    With latency first and re-timed trials (``latency_retimed``), among those, on the
    re-timed latency: the re-timed set holds the fastest feasible trials of the search."""
    feasible = [t for t in trials if t.feasible]
    if not feasible:
        return None
    if objectives[0] == "latency":
        retimed = [t for t in feasible if RETIMED in t.metrics]
        if retimed:
            return min(retimed, key=lambda t: (t.metrics[RETIMED],
                                               *(t.metrics[o] for o in objectives), t.number))
    return min(feasible, key=lambda t: (*(t.metrics[o] for o in objectives), t.number))


RETIMED = "latency_retimed"


def retime_candidates(trials: list[Finished], objectives: tuple[str, ...],
                      top: int) -> list[Finished]:
    """What the end of a latency search re-times side by side: the ``top`` feasible trials
    by measured latency, and every feasible fixed recipe (the search's figures are one
    measurement each; the choice between close candidates is made on one common timing)."""
    if "latency" not in objectives or top < 1:
        return []
    feasible = sorted((t for t in trials if t.feasible and "latency" in t.metrics),
                      key=lambda t: (t.metrics["latency"], t.number))
    chosen = feasible[:top] + [t for t in feasible[top:] if t.fixed_recipe]
    return sorted(chosen, key=lambda t: t.number)
