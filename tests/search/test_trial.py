"""One trial's latency is the median of repeated interleaved measurements, and ``retime``
times several candidates side by side (the bench itself is replaced by scripted timings:
what is tested is how the figures are combined, not the machine)."""

from __future__ import annotations

import types

import builders
import numpy as np
import pytest

from onnxcomp.measure import bench as bench_mod
from onnxcomp.search import trial as trial_mod
from onnxcomp.search.trial import Batches, Job, Shared


def shared(repeats: int) -> Shared:
    model = builders.mlp()
    data = Batches("random", [{"x": np.ones((1, 8), np.float32)}] * 2)
    return Shared(key=f"test-{repeats}", model_bytes=model.proto.SerializeToString(), calib=data,
                  evaluation=data, runs=2, min_seconds=0.0, repeats=repeats)


@pytest.fixture
def scripted(monkeypatch):
    """bench() returning the next scripted {name: p50_ms} per call; the calls are recorded."""
    script: list[dict[str, float]] = []
    calls: list[list[str]] = []

    def fake_bench(models, names=None, **kwargs):
        calls.append(list(names))
        p50 = script[len(calls) - 1]
        return types.SimpleNamespace(bench={
            "results": [{"model": n, "p50_ms": p50[n]} for n in names],
            "models": [{"name": n, "bytes": 100, "params": 10} for n in names]})

    monkeypatch.setattr(bench_mod, "bench", fake_bench)
    return script, calls


def test_trial_latency_is_the_median_of_repeated_measurements(scripted):
    script, calls = scripted
    # one outlier (0.5) among three measurements: the median ignores it
    script += [{"float": 10.0, "candidate": 9.0}, {"float": 10.0, "candidate": 5.0},
               {"float": 20.0, "candidate": 19.0}]
    job = Job(0, {"quantize.mode": "none"}, [])
    result = trial_mod.run_trial(shared(3), job)
    assert result["ok"], result.get("error")
    assert len(calls) == 3 and all(c == ["float", "candidate"] for c in calls)
    assert result["latency_samples"] == [0.9, 0.5, 0.95]
    assert result["metrics"]["latency"] == pytest.approx(0.9)


def test_one_measurement_when_repeats_is_one(scripted):
    script, calls = scripted
    script.append({"float": 10.0, "candidate": 5.0})
    result = trial_mod.run_trial(shared(1), Job(0, {}, []))
    assert len(calls) == 1 and result["metrics"]["latency"] == pytest.approx(0.5)


def test_retime_times_every_candidate_in_one_bench_per_repeat(scripted, tmp_path):
    script, calls = scripted
    script += [{"float": 10.0, "trial-3": 7.0, "trial-8": 8.0},
               {"float": 10.0, "trial-3": 9.0, "trial-8": 7.5},
               {"float": 10.0, "trial-3": 8.5, "trial-8": 7.0}]
    figures = trial_mod.retime(shared(1), {8: "b.onnx", 3: "a.onnx"}, repeats=3)
    assert calls == [["float", "trial-3", "trial-8"]] * 3  # side by side, float first
    assert figures[3]["samples"] == [0.7, 0.9, 0.85]
    assert figures[3]["latency"] == pytest.approx(0.85)
    assert figures[8]["latency"] == pytest.approx(0.75)
