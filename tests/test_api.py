"""api.compress's gates: the default fidelity floor and the 'never bigger' and 'never slower'
verdicts (#17)."""

from __future__ import annotations

import json

import builders

from onnxcomp import api
from onnxcomp.cli import main
from onnxcomp.recipe import parse_recipe
from onnxcomp.report import Report


def test_the_floor_depends_on_what_the_recipe_does():
    assert api.fidelity_floor(parse_recipe("quantize:int8")) == 0.95
    assert api.fidelity_floor(parse_recipe("quantize:int4,distill")) == 0.95
    assert api.fidelity_floor(parse_recipe("prune:0.3,distill")) == 0.90
    assert api.fidelity_floor(parse_recipe("lowrank:0.9")) == 0.90


def test_below_the_floor_is_exit_1_with_one_line_the_report_and_no_model(tmp_path, capsys):
    path, out, report = tmp_path / "m.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    builders.mlp().save(path)
    # Cutting 90 % of the hidden neurons of a random MLP: its output cosine is far below 0.90.
    rc = main(["--quiet", "compress", str(path), "-o", str(out), "--recipe", "prune:0.9",
               "--calib", "random:8", "--report", str(report)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1
    assert len(err) == 1 and "below the fidelity floor" in err[0]
    assert report.is_file() and not out.exists()
    assert not list(tmp_path.glob("out*"))


def test_an_explicit_min_cosine_replaces_the_floor(tmp_path, capsys):
    path, out = tmp_path / "m.onnx", tmp_path / "out.onnx"
    builders.mlp().save(path)
    rc = main(["--quiet", "compress", str(path), "-o", str(out), "--recipe", "prune:0.9",
               "--calib", "random:8", "--min-cosine", "0.0"])
    assert rc == 0 and out.is_file()


def test_weights_that_grew_are_a_not_worth_it_verdict():
    small = builders.mlp()
    grown = builders.mlp()
    extra = grown.proto.graph.initializer.add()
    extra.CopyFrom(grown.proto.graph.initializer[0])
    extra.name = "unused_copy"
    report = Report("compress")
    api._never_bigger(small, grown, parse_recipe("quantize:int8"), report)
    assert report.verdicts and report.verdicts[0].startswith("not worth it")
    quiet = Report("compress")
    api._never_bigger(small, grown, parse_recipe("cleanup"), quiet)  # nothing compressing
    assert not quiet.verdicts


def _fake_bench(ratio: float, calls: list):
    """A stand-in for measure.bench.bench: the result ``ratio`` times the input's p50."""
    def bench(models, **kwargs):
        calls.append(kwargs)
        report = Report("bench")
        report.bench = {"results": [
            {"model_index": 0, "p50_ms": 2.0, "latency_ratio": 1.0},
            {"model_index": 1, "p50_ms": 2.0 * ratio, "latency_ratio": ratio}]}
        return report
    return bench


def test_a_result_slower_than_its_input_is_a_not_worth_it_verdict(monkeypatch):
    from onnxcomp import calibration, progress, targets
    from onnxcomp.measure import bench as bench_module

    model = builders.mlp()
    data = calibration.random_data(model, 2)
    log = progress.Progress(quiet=True)
    cpu = targets.get("ort-cpu")
    for ratio, recipe, expect_timed, expect_verdict in [
            (1.5, "quantize:int8", True, True), (1.02, "quantize:int8", True, False),
            (0.6, "prune:0.3", True, False), (1.5, "quantize:int8-dynamic", True, True),
            (1.5, "quantize:int4", False, False),  # a size mode: not held to float speed
            (1.5, "quantize:fp16", False, False), (1.5, "cleanup", False, False)]:
        calls: list = []
        monkeypatch.setattr(bench_module, "bench", _fake_bench(ratio, calls))
        report = Report("compress")
        api.never_slower(model, model, parse_recipe(recipe), cpu, data, report, log)
        assert bool(calls) == expect_timed, recipe
        assert bool(report.verdicts) == expect_verdict, (recipe, ratio)
        if expect_verdict:
            assert report.verdicts[0].startswith("not worth it: the result is slower")
            assert calls[0]["threads"] == [1] and calls[0]["data"] is data
    # A target without its device here: said in the notes, nothing timed.
    calls = []
    monkeypatch.setattr(bench_module, "bench", _fake_bench(1.5, calls))
    report = Report("compress")
    api.never_slower(model, model, parse_recipe("quantize:int8"), targets.get("tensorrt"),
                     data, report, log)
    assert not calls and not report.verdicts
    assert any("speed not checked" in note for note in report.notes)


def test_the_cli_times_the_result_unless_told_not_to(tmp_path):
    path = tmp_path / "m.onnx"
    builders.mlp().save(path)
    for extra, timed in [([], True), (["--no-speed-check"], False)]:
        report = tmp_path / f"r{len(extra)}.json"
        rc = main(["--quiet", "compress", str(path), "-o", str(tmp_path / f"o{len(extra)}.onnx"),
                   "--recipe", "quantize:int8", "--calib", "random:4", "--report", str(report),
                   *extra])
        assert rc == 0
        bench = json.loads(report.read_text())["bench"]
        if timed:  # both models really ran in ONNX Runtime, interleaved
            assert [r["model"] for r in bench["results"]] == ["input", "result"]
            assert all(r["p50_ms"] > 0 and r["runs"] >= 10 for r in bench["results"])
        else:
            assert bench is None


def test_a_compressing_pass_that_found_nothing_is_a_verdict(tmp_path, capsys):
    path = tmp_path / "conv.onnx"
    builders.conv_net().save(path)
    rc = main(["--quiet", "compress", str(path), "-o", str(tmp_path / "o.onnx"), "--recipe",
               "quantize:int8-dynamic", "--calib", "random:2", "--report",
               str(tmp_path / "r.json")])
    assert rc == 0
    verdicts = json.loads((tmp_path / "r.json").read_text())["verdicts"]
    assert verdicts and verdicts[0].startswith("nothing done: quantize: nothing to quantize")
    assert "use quantize:int8" in verdicts[0]
    assert "nothing done" in capsys.readouterr().err
