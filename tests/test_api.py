"""api.compress's gates: the default fidelity floor and the 'never bigger' verdict (#17)."""

from __future__ import annotations

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
