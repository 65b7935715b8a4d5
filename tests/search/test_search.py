"""End-to-end searches on the tiny MLP: a Pareto front, resume after an interruption (trials
counted once), reproducibility with a seed, and the Ray executor where ray imports."""

from __future__ import annotations

import importlib.util
import json

import builders
import pytest

from onnxcomp.errors import UserError
from onnxcomp.search import executors, search, study
from onnxcomp.search.trial import run_trial

pytest.importorskip("optuna", reason="search needs optuna (the [search] extra)")

FAST = {"runs": 3, "min_seconds": 0.0, "progress": lambda message: None}
# an unpruned MLP keeps cosine 1, int8 keeps ~0.99: a constraint some trials miss
ARGS = {"calib": "random:4", "eval_data": "random:4", "constraints": ["cosine>=0.99"],
        "objectives": "latency,size"}


class Inline:
    """Trials in this process, one at a time (fast; the real pools are tested below)."""

    name = "inline"
    slots = 1

    def __init__(self, shared, stop_after=None, fake=False):
        self.shared, self.stop_after, self.ran, self.fake = shared, stop_after, 0, fake

    def run(self, jobs):
        for index, job in enumerate(jobs):
            if self.stop_after is not None and self.ran >= self.stop_after:
                raise KeyboardInterrupt
            self.ran += 1
            yield index, fake_trial(job) if self.fake else run_trial(self.shared, job)

    def close(self):
        pass


@pytest.fixture
def inline(monkeypatch):
    made = {}

    def make(kind, shared, workers, cpus, address=None, provider="cpu"):
        made["executor"] = Inline(shared, made.get("stop_after"), made.get("fake", False))
        return made["executor"]

    monkeypatch.setattr(executors, "make", make)
    return made


def fake_trial(job):
    """Metrics that depend on the parameters only (no timing noise)."""
    ratio = job.params.get("prune.ratio", 0.0)
    quantized = job.params.get("quantize.mode", "none") != "none"
    return {"number": job.number, "ok": True, "node": "here",
            "metrics": {"latency": 1.0 - ratio - 0.2 * quantized, "size": 1.0 - 0.7 * quantized,
                        "params": 1.0, "cosine": 1.0 - ratio / 10 - 0.005 * quantized}}


def params_of(out_dir):
    data = json.loads((out_dir / "pareto.json").read_text())
    return [t["params"] for t in data["trials"]]


def test_local_pool_search_writes_a_front(tmp_path):
    result = search(builders.mlp(), n_trials=3, out_dir=tmp_path, executor="local", workers=1,
                    seed=3, **ARGS, **FAST)
    assert len(result.trials) == 3
    assert result.front and all(t.feasible for t in result.front)
    assert result.best is not None and result.best.number in {t.number for t in result.front}
    for name in ("pareto.md", "pareto.json", "best.onnx", "best.json", "study.db"):
        assert (tmp_path / name).exists(), name
    assert "Pareto front" in result.table()
    # latency is an objective: the fastest feasible trials were re-timed side by side at the
    # end, and the choice was made on those figures
    assert "latency_retimed" in result.best.metrics
    assert "re-timed side by side" in (tmp_path / "pareto.md").read_text()
    for t in result.trials:
        assert (tmp_path / "trials" / f"{t.number:04d}" / "report.json").exists()
        kept = t.number in {f.number for f in result.front} or "latency_retimed" in t.metrics
        assert (tmp_path / "trials" / f"{t.number:04d}" / "model.onnx").exists() == kept


def test_interrupted_search_resumes_and_counts_trials_once(tmp_path, inline):
    inline["stop_after"] = 2
    with pytest.raises(KeyboardInterrupt):
        search(builders.mlp(), n_trials=4, out_dir=tmp_path, seed=5, **ARGS, **FAST)
    inline["stop_after"] = None
    result = search(builders.mlp(), n_trials=4, out_dir=tmp_path, seed=5, **ARGS, **FAST)
    assert inline["executor"].ran == 2  # only the two trials not done before
    assert len(result.trials) == 4
    optuna = pytest.importorskip("optuna")
    loaded = optuna.load_study(study_name=study.STUDY_NAME,
                               storage=f"sqlite:///{tmp_path / 'study.db'}")
    cut = [t for t in loaded.trials if t.state.name == "FAIL" and "error" not in t.user_attrs]
    assert len(cut) == 1  # the trial the interruption cut off ran again with its parameters
    retry = [t for t in loaded.trials if t.user_attrs.get("retry_of") == cut[0].number]
    assert len(retry) == 1 and retry[0].params == cut[0].params
    # a finished search run again does nothing more
    search(builders.mlp(), n_trials=4, out_dir=tmp_path, seed=5, **ARGS, **FAST)
    assert inline["executor"].ran == 0


def test_a_trial_left_running_by_a_dead_process_is_requeued(tmp_path, inline):
    search(builders.mlp(), n_trials=1, out_dir=tmp_path, seed=2, **ARGS, **FAST)
    optuna = pytest.importorskip("optuna")
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    loaded = optuna.load_study(study_name=study.STUDY_NAME, storage=storage)
    orphan = loaded.ask()
    choices = loaded.trials[0].distributions["quantize.mode"].choices
    orphan.suggest_categorical("quantize.mode", list(choices))
    orphan_mode = orphan.params["quantize.mode"]
    result = search(builders.mlp(), n_trials=2, out_dir=tmp_path, seed=2, **ARGS, **FAST)
    assert len(result.trials) == 2
    assert result.trials[-1].params["quantize.mode"] == orphan_mode


def test_same_seed_same_trials(tmp_path, inline):
    # Past the random start-up trials the sampler reads the measured latencies, which are
    # noisy: the whole sequence is reproducible where the measurements are (fake trials).
    inline["fake"] = True
    first = search(builders.mlp(), n_trials=8, out_dir=tmp_path / "a", seed=11, **ARGS, **FAST)
    second = search(builders.mlp(), n_trials=8, out_dir=tmp_path / "b", seed=11, **ARGS, **FAST)
    assert [t.params for t in first.trials] == [t.params for t in second.trials]
    assert params_of(tmp_path / "a") == params_of(tmp_path / "b")
    other = search(builders.mlp(), n_trials=8, out_dir=tmp_path / "c", seed=12, **ARGS, **FAST)
    assert [t.params for t in other.trials] != [t.params for t in first.trials]


def test_another_search_in_the_same_folder_is_refused(tmp_path, inline):
    search(builders.mlp(), n_trials=1, out_dir=tmp_path, **ARGS, **FAST)
    with pytest.raises(UserError, match="other objectives"):
        search(builders.mlp(), n_trials=1, out_dir=tmp_path, **{**ARGS, "objectives": "size"},
               **FAST)


def test_bad_arguments_are_user_errors(tmp_path):
    for bad in ({"n_trials": 0}, {"constraints": ["cosine>>1"]}, {"objectives": "speed"},
                {"constraints": ["line_accuracy>=0.9"]}, {"sampler": "grid"}):
        with pytest.raises(UserError):
            search(builders.mlp(), out_dir=tmp_path, **{**ARGS, **bad}, **FAST)


@pytest.mark.slow  # starts Ray: ~20 s on this machine
@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed")
def test_ray_executor_proposes_the_same_trials_as_the_local_one(tmp_path, inline, monkeypatch):
    import ray

    local = search(builders.mlp(), n_trials=2, out_dir=tmp_path / "local", seed=7, **ARGS,
                   **FAST)
    monkeypatch.undo()  # the real executors from here
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        remote = search(builders.mlp(), n_trials=2, out_dir=tmp_path / "ray", seed=7,
                        executor="ray", **ARGS, **FAST)
    finally:
        ray.shutdown()
    assert [t.params for t in remote.trials] == [t.params for t in local.trials]
    reports = [json.loads((tmp_path / "ray" / "trials" / f"{t.number:04d}" /
                           "report.json").read_text()) for t in remote.trials]
    assert all(len(r["node"]) > 20 for r in reports)  # a Ray node id, not a host name


def test_fixed_recipes_run_first_and_once(tmp_path, inline):
    inline["fake"] = True
    fixed = ["quantize:int8-dynamic", "prune:0.2"]
    result = search(builders.mlp(), n_trials=4, out_dir=tmp_path, seed=1, enqueue=fixed,
                    **ARGS, **FAST)
    assert [t.fixed_recipe for t in result.trials] == [*fixed, None, None]
    assert result.trials[0].params["quantize.mode"] == "int8-dynamic"
    assert result.trials[1].params["prune.ratio"] == 0.2
    assert result.trials[1].params["quantize.mode"] == "none"
    more = search(builders.mlp(), n_trials=6, out_dir=tmp_path, seed=1, enqueue=fixed,
                  **ARGS, **FAST)  # resumed: the fixed recipes are not queued again
    assert [t.fixed_recipe for t in more.trials].count("prune:0.2") == 1
    assert len(more.trials) == 6
    with pytest.raises(UserError, match="not in the search space"):
        search(builders.mlp(), n_trials=1, out_dir=tmp_path / "x", enqueue=["lowrank:0.9"],
               **ARGS, **FAST)


def test_progress_after_a_resume_names_the_best_of_the_whole_study(tmp_path, inline):
    inline["fake"] = True
    search(builders.mlp(), n_trials=4, out_dir=tmp_path, seed=1,
           enqueue=["quantize:int8-dynamic"], **ARGS, **FAST)  # trial 0 is the best here
    said = []
    result = search(builders.mlp(), n_trials=5, out_dir=tmp_path, seed=1, **ARGS,
                    **{**FAST, "progress": said.append})
    last = [m for m in said if m.startswith("search: trial ") and "(5/5)" in m]
    assert last and f"best: trial {result.best.number}," in last[0]
