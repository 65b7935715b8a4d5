"""What a search writes: the HTML page (``OUT/pareto.html`` and ``--html FILE``), rendered by
``onnxcomp.report_html``: constraints, chosen model, Pareto plot and front, self-contained."""

from __future__ import annotations

import importlib.util
import re

import builders
import pytest

pytest.importorskip("optuna", reason="search needs optuna (the [search] extra)")

from onnxcomp import cli
from onnxcomp.model import save
from onnxcomp.report_html import html_page
from onnxcomp.search import executors


class Fake:
    """Trials in this process with parameter-only metrics (the real pools: test_search)."""

    name, slots = "fake", 1

    def run(self, jobs):
        for index, job in enumerate(jobs):
            quantized = job.params.get("quantize.mode", "none") != "none"
            ratio = job.params.get("prune.ratio", 0.0)
            yield index, {"number": job.number, "ok": True, "node": "here", "metrics": {
                "latency": 1.0 - ratio - 0.2 * quantized, "size": 1.0 - 0.7 * quantized,
                "params": 1.0, "cosine": 1.0 - ratio / 10 - 0.005 * quantized}}

    def close(self):
        pass


@pytest.fixture
def inline(monkeypatch):
    monkeypatch.setattr(executors, "make", lambda *a, **k: Fake())


def test_cli_search_writes_a_self_contained_html_page(tmp_path, inline, capsys):
    model = tmp_path / "mlp.onnx"
    save(builders.mlp(), model)
    page = tmp_path / "page.html"
    code = cli.main(["search", str(model), "--calib", "random:4", "--eval", "random:4",
                     "--constraint", "cosine>=0.99", "--objective", "latency,size",
                     "--trials", "4", "--seed", "2", "--enqueue", "quantize:int8-dynamic",
                     "--html", str(page), "-o", str(tmp_path / "out")])
    assert code == 0
    assert str(page) in capsys.readouterr().out
    for path in (page, tmp_path / "out" / "pareto.html"):
        text = path.read_text(encoding="utf-8")
        assert "<h2>Search</h2>" in text and "Pareto front" in text
        assert "cosine&gt;=0.99" in text  # the constraint, escaped
        assert "Chosen model" in text and "Trial " in text
        assert "Fixed recipes" in text and "int8-dynamic" in text
        # self-contained: no URL to anywhere, pictures only as data URIs
        assert not re.search(r"(src|href)=\"(?!data:)", text)
        assert "http://" not in text and "https://" not in text
        if importlib.util.find_spec("matplotlib") is not None:
            assert 'src="data:image/png;base64,' in text
    assert page.read_text() == (tmp_path / "out" / "pareto.html").read_text()


def test_search_page_escapes_and_survives_missing_parts():
    text = html_page({"command": "search", "search": {
        "objectives": ["size"], "columns": ["size"], "n_trials": 1, "n_feasible": 0,
        "constraints": [{"text": "cosine>=<b>0.99</b>", "bound": 0.99, "reference": 1.0}],
        "front": [], "best": None, "fixed": [],
        "trials": [{"trial": 0, "recipe": "<script>x</script>", "state": "FAIL"}],
        "plot": "https://example.com/x.png"}}, plots=False)
    assert "<script>" not in text and "&lt;script&gt;" in text
    assert "No trial met every constraint" in text
    assert "example.com" not in text  # a plot that is not a PNG data URI is left out
    assert "<h2>Summary</h2>" not in text  # a search page has no compress summary


def test_a_compress_report_page_is_unchanged_by_the_search_section():
    text = html_page({"command": "compress", "notes": ["n"]}, plots=False)
    assert "<h2>Summary</h2>" in text and "<h2>Search</h2>" not in text
