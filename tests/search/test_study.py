"""The study loop's guards against a misleading search: a parameter set already measured is
told its stored result instead of running again (counted apart, said in the progress, and the
search ends when the sampler proposes nothing new); the chosen model and the front are taken
on the re-timed latency where the search re-timed candidates."""

from __future__ import annotations

import builders
import pytest

from onnxcomp.search import executors, search, study
from onnxcomp.search import space as space_mod
from onnxcomp.search.study import RETIMED, Finished

pytest.importorskip("optuna", reason="search needs optuna (the [search] extra)")

ARGS = {"calib": "random:4", "eval_data": "random:4", "constraints": ["cosine>=0.99"],
        "objectives": "latency"}


class Counting:
    """Fake trials in this process (metrics from the parameters only), counting what ran."""

    name = "counting"
    slots = 1

    def __init__(self):
        self.ran: list[dict] = []

    def run(self, jobs):
        for index, job in enumerate(jobs):
            self.ran.append(dict(job.params))
            quantized = job.params.get("quantize.mode", "none") != "none"
            yield index, {"number": job.number, "ok": True, "node": "here",
                          "metrics": {"latency": 1.0 - 0.3 * quantized, "size": 1.0,
                                      "params": 1.0, "cosine": 1.0 - 0.001 * quantized}}

    def close(self):
        pass


@pytest.fixture
def counting(monkeypatch):
    executor = Counting()
    monkeypatch.setattr(executors, "make", lambda *args, **kwargs: executor)
    return executor


def two_point_space() -> dict:
    """Every dimension of the MLP's space pinned except quantize.mode = none | int8."""
    derived = space_mod.derive(builders.mlp(), calibration=True, torch_available=False)
    dims = {d.name: {"fixed": d.choices[0] if d.choices else d.low}
            for d in derived.dimensions if d.name != "quantize.mode"}
    dims["quantize.mode"] = {"choices": ["none", "int8"]}
    dims["prune.use"] = {"fixed": False}
    dims["distill.use"] = {"fixed": False}
    return {"dimensions": dims}


def test_a_measured_parameter_set_is_not_run_again(tmp_path, counting, monkeypatch):
    monkeypatch.setattr(study, "MAX_REPEATS_IN_A_ROW", 4)
    said: list[str] = []
    result = search(builders.mlp(), n_trials=5, out_dir=tmp_path, seed=0,
                    space=two_point_space(), progress=said.append, **ARGS)
    # two parameter sets exist: each ran once, then the sampler only repeated them
    assert sorted(p["quantize.mode"] for p in counting.ran) == ["int8", "none"]
    assert len(result.trials) == 2  # the summaries list measured trials only
    assert any("stopped at 2 trials" in note for note in result.notes)
    repeats = [m for m in said if "not run again" in m]
    assert len(repeats) >= 4
    optuna = pytest.importorskip("optuna")
    loaded = optuna.load_study(study_name=study.STUDY_NAME,
                               storage=f"sqlite:///{tmp_path / 'study.db'}")
    copies = [t for t in loaded.trials if "duplicate_of" in t.user_attrs]
    assert len(copies) == len(repeats)
    for copy in copies:  # the sampler was told the stored result of the same parameters
        original = loaded.trials[copy.user_attrs["duplicate_of"]]
        assert copy.params == original.params and copy.values == original.values
        assert copy.user_attrs["constraints"] == original.user_attrs["constraints"]
    assert study.finished_count(loaded) == 2
    # run again: nothing new is run, the repeats are not counted as trials
    more = search(builders.mlp(), n_trials=5, out_dir=tmp_path, seed=0,
                  space=two_point_space(), progress=said.append, **ARGS)
    assert len(counting.ran) == 2 and len(more.trials) == 2


def test_repeats_do_not_use_up_the_trial_budget(tmp_path, counting):
    # the MLP's full space has many points: 6 trials are 6 distinct measured parameter sets
    result = search(builders.mlp(), n_trials=6, out_dir=tmp_path, seed=4, **ARGS)
    keys = [study.params_key(p) for p in counting.ran]
    assert len(counting.ran) == 6 and len(set(keys)) == 6
    assert len(result.trials) == 6


def finished(number, latency, retimed=None, fixed=None, feasible=True, size=1.0):
    metrics = {"latency": latency, "size": size}
    if retimed is not None:
        metrics[RETIMED] = retimed
    return Finished(number, "COMPLETE", {}, metrics, [-1.0 if feasible else 1.0],
                    fixed_recipe=fixed)


def test_retime_candidates_are_the_fastest_feasible_and_every_feasible_fixed_recipe():
    trials = [finished(0, 0.74, fixed="quantize:int8"), finished(1, 0.99, fixed="quantize:int4"),
              finished(2, 0.70, fixed="prune:0.3", feasible=False), finished(3, 0.60),
              finished(4, 0.72), finished(5, 0.80), finished(6, 0.50, feasible=False)]
    chosen = study.retime_candidates(trials, ("latency",), 2)
    assert [t.number for t in chosen] == [0, 1, 3, 4]
    assert study.retime_candidates(trials, ("size",), 2) == []
    assert study.retime_candidates(trials, ("latency",), 0) == []


def test_the_choice_and_the_front_use_the_re_timed_latency():
    # trial 3 looked fastest in the search (one noisy figure); re-timed side by side it is not
    trials = [finished(0, 0.74, retimed=0.73, fixed="quantize:int8"),
              finished(3, 0.60, retimed=0.80), finished(4, 0.72, retimed=0.71),
              finished(5, 0.90)]
    assert study.best(trials, ("latency",)).number == 4
    assert study.best([finished(5, 0.9), finished(6, 0.8)], ("latency",)).number == 6
    assert study.best(trials, ("size", "latency")).number == 3  # size first: latency breaks ties
    front = study.pareto_front(trials, ("latency",))
    assert [t.number for t in front] == [4]


def test_params_key_ignores_the_order_of_the_parameters():
    assert study.params_key({"a": 1, "b": None}) == study.params_key({"b": None, "a": 1})
    assert study.params_key({"a": 0.1}) != study.params_key({"a": 0.15})


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_a_sigterm_whose_raise_python_swallowed_is_raised_at_the_next_check():
    # A signal handler that raises while a weakref callback or __del__ runs has its exception
    # printed and dropped by Python (seen in CI: inside SQLAlchemy's state cleanup). The
    # termination must still stop the search at the next check, not be lost.
    import gc
    import os
    import signal

    class KilledInDel:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(1000):  # let the handler run here, inside __del__
                pass

    with study.sigterm_raises():
        holder = KilledInDel()
        del holder
        gc.collect()
        with pytest.raises(study.Interrupted):
            study.raise_if_terminated()
        study.raise_if_terminated()  # raised once, then cleared


def test_a_sigterm_during_bookkeeping_is_raised_when_it_ends():
    import os
    import signal

    with study.sigterm_raises(), pytest.raises(study.Interrupted), study._bookkeeping():
        os.kill(os.getpid(), signal.SIGTERM)
        for _ in range(1000):
            pass
        finished = True
    assert finished
