"""Generation validation and timing of pipelines (onnxcomp/measure/generation.py)."""

from __future__ import annotations

import numpy as np
from pipeline_builders import toy_samples, write_toy_pipeline

from onnxcomp.measure.generation import bench_generation, peak_rss_mb


def test_peak_memory_is_the_childs_own_not_its_parents(tmp_path):
    folder = write_toy_pipeline(tmp_path / "p")
    ballast = np.ones(600 * 2**20 // 8)  # this process passes 600 MB; the child must not inherit
    peak = peak_rss_mb(folder, toy_samples(1)[0], [3, 4, 5], 1)
    assert 20 < peak < 400, peak
    del ballast


def test_bench_generation_times_every_pipeline_on_one_token_path(tmp_path):
    a = write_toy_pipeline(tmp_path / "a")
    b = write_toy_pipeline(tmp_path / "b", merged=True, separate=False)
    result = bench_generation([a, b], toy_samples(1)[0], new_tokens=5, runs=2, memory=False)
    timing = result["timing"]
    assert set(timing) == {"a", "b"}
    for row in timing.values():
        assert row["first_token_ms"] > 0 and row["tokens_per_s"] > 0
        assert row["per_token_ms_p90"] >= row["per_token_ms_p50"] > 0
    assert result["new_tokens"] == 5 and "cached decoder steps" in result["note"]
