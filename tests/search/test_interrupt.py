"""A real interruption: a search in a subprocess killed with SIGTERM after its first completed
trial, then resumed: it finishes without redoing the completed trials."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna", reason="search needs optuna (the [search] extra)")

from onnxcomp.search import study

TESTS = Path(__file__).resolve().parent.parent
N_TRIALS = 4
# min_seconds makes each trial take a few seconds, so SIGTERM lands mid-search
SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    import builders
    from onnxcomp.search import search
    search(builders.mlp(), calib="random:4", eval_data="random:4",
           constraints=["cosine>=0.99"], objectives="latency,size", n_trials={n},
           out_dir={out!r}, executor="local", workers=1, seed=4, runs=3, min_seconds={wait},
           progress=print)
""")


def _run(out: Path, wait: float) -> subprocess.Popen:
    code = SCRIPT.format(tests=str(TESTS), n=N_TRIALS, out=str(out), wait=wait)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _trials(out: Path):
    return optuna.load_study(study_name=study.STUDY_NAME,
                             storage=f"sqlite:///{out / 'study.db'}").trials


def _measured(trial) -> bool:
    """Complete and run: a proposal repeating a measured parameter set is told the stored
    result (COMPLETE, ``duplicate_of``) without running, and does not count as a trial."""
    return trial.state.name == "COMPLETE" and "duplicate_of" not in trial.user_attrs


@pytest.mark.slow
def test_a_search_killed_with_sigterm_resumes_without_redoing_trials(tmp_path):
    first = tmp_path / "trials" / "0000" / "report.json"
    process = _run(tmp_path, wait=1.5)
    deadline = time.monotonic() + 120
    while not first.exists():
        assert process.poll() is None, process.communicate()[0]
        assert time.monotonic() < deadline, "no trial finished in 120 s"
        time.sleep(0.1)
    os.kill(process.pid, signal.SIGTERM)
    output = process.communicate(timeout=60)[0]
    assert process.returncode != 0, output  # stopped, not finished
    killed = _trials(tmp_path)
    done = {t.number: (t.params, t.values) for t in killed if _measured(t)}
    assert 1 <= len(done) < N_TRIALS, output
    assert not [t for t in killed if t.state.name == "RUNNING"]  # the cut trial was closed
    reports = {n: (tmp_path / "trials" / f"{n:04d}" / "report.json").stat().st_mtime_ns
               for n in done}

    resumed = _run(tmp_path, wait=0.0)
    output = resumed.communicate(timeout=300)[0]
    assert resumed.returncode == 0, output
    assert f"resuming, {len(done)} of {N_TRIALS} trials already done" in output
    final = _trials(tmp_path)
    assert len([t for t in final if _measured(t)]) == N_TRIALS
    for number, (params, values) in done.items():  # the completed trials were not run again
        assert (final[number].params, final[number].values) == (params, values)
        mtime = (tmp_path / "trials" / f"{number:04d}" / "report.json").stat().st_mtime_ns
        assert mtime == reports[number]
    retried = {t.user_attrs.get("retry_of") for t in final} - {None}
    assert not retried & set(done)  # only the cut-off trial was asked again
    assert json.loads((tmp_path / "pareto.json").read_text())["best"] is not None
