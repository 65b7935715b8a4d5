from __future__ import annotations

import json
import subprocess
import sys
import tempfile

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from conftest import make_mlp

from onnxcomp import passes
from onnxcomp.cli import main


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxcomp.cli", *args], capture_output=True,
                          text=True, timeout=300, check=False)


def test_missing_model_is_one_line_and_exit_2():
    result = _cli("inspect", "/nonexistent/model.onnx")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "no such file" in result.stderr
    assert "Traceback" not in result.stderr


def test_compress_refuses_to_overwrite_its_input(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    make_mlp().save(path)
    before = path.read_bytes()
    assert main(["compress", str(path), "-o", str(path), "--recipe", "cleanup"]) == 2
    assert "refusing" in capsys.readouterr().err
    assert path.read_bytes() == before


@pytest.mark.parametrize("args, message", [
    (["--recipe", "nonsense:1"], "unknown pass"),
    (["--recipe", "cleanup", "--calib", "no-such-source"], "data source"),
])
def test_compress_bad_input_writes_nothing(tmp_path, capsys, args, message):
    path = tmp_path / "m.onnx"
    make_mlp().save(path)
    out = tmp_path / "out.onnx"
    assert main(["compress", str(path), "-o", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_bad_shape_flag(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    make_mlp().save(path)
    assert main(["inspect", str(path), "--shape", "x=a,b"]) == 2
    assert "bad --shape" in capsys.readouterr().err


def test_zoo_list_and_unknown_fetch(capsys):
    assert main(["zoo", "list"]) == 0
    assert "ppocr-rec" in capsys.readouterr().out
    assert main(["zoo", "fetch", "no-such-model"]) == 2
    assert "unknown zoo model" in capsys.readouterr().err


def test_compress_no_validate_writes_the_model_without_a_fidelity_check(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    make_mlp().save(path)
    out = tmp_path / "out.onnx"
    report = tmp_path / "r.json"
    assert main(["compress", str(path), "-o", str(out), "--recipe", "quantize:int8-dynamic",
                 "--no-validate", "--report", str(report)]) == 0
    assert out.exists()
    assert not json.loads(report.read_text()).get("fidelity")
    # A fidelity gate needs the check: asking for both is a usage error, and nothing is written.
    other = tmp_path / "other.onnx"
    assert main(["compress", str(path), "-o", str(other), "--no-validate",
                 "--min-cosine", "0.9"]) == 2
    assert "--no-validate" in capsys.readouterr().err
    assert not other.exists()


# --- errors at the edges: a user mistake is exit 2 and one line; our bug is exit 3 -------------


def _model(tmp_path) -> str:
    path = tmp_path / "m.onnx"
    make_mlp().save(path)
    return str(path)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err and err.startswith("onnxcomp: error: ")
    return err


def _last_line_error(capsys) -> str:
    """After progress lines ("[1/3] cleanup"), the error: one line, the last."""
    lines = capsys.readouterr().err.splitlines()
    errors = [line for line in lines if line.startswith("onnxcomp:")]
    assert errors == lines[-1:] and not any("Traceback" in line for line in lines), lines
    return errors[0]


def _toml(tmp_path, text: str) -> str:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return str(path)


USER_MISTAKES = {
    "bad --set value": (["--recipe", "prune", "--set", "prune.ratio=lots"], "prune.ratio"),
    "--set out of range": (["--recipe", "prune", "--set", "prune.ratio=1.5"], "ratio"),
    "--set unknown field": (["--recipe", "prune", "--set", "prune.nope=1"], "unknown option"),
    "--set malformed": (["--recipe", "prune", "--set", "prune"], "bad --set"),
    "--set of a pass not in the recipe": (["--recipe", "prune", "--set", "lowrank.rank=2"],
                                          "no 'lowrank' step"),
    "bad TOML value": (["--recipe", "TOML:[[pass]]\nname = \"prune\"\nratio = \"lots\"\n"],
                       "prune.ratio"),
    "TOML Config ValueError": (["--recipe", "TOML:[[pass]]\nname = \"prune\"\nratio = 2.0\n"],
                               "ratio"),
    "bad TOML": (["--recipe", "TOML:[[pass]\n"], "invalid TOML"),
    "short-form Config ValueError": (["--recipe", "quantize:int3"], "int3"),
    "unknown pass": (["--recipe", "nonsense"], "unknown pass"),
    "int8 without calibration": (["--recipe", "quantize:int8"], "calibration"),
    "activation importance without calibration": (
        ["--recipe", "prune", "--set", "prune.importance=activation"], "calibration"),
    "unknown data source": (["--recipe", "prune", "--calib", "no-such-source"], "data source"),
    "data that does not fit": (["--recipe", "quantize:int8", "--calib", "DATA:x=4,5"], "x"),
}


@pytest.mark.parametrize("args, message", USER_MISTAKES.values(), ids=USER_MISTAKES.keys())
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_user_mistakes_are_exit_2_with_one_line(tmp_path, capsys, args, message, dry_run):
    model = _model(tmp_path)
    args = list(args)
    if args[1].startswith("TOML:"):
        args[1] = _toml(tmp_path, args[1][len("TOML:"):])
    if "--calib" in args and args[args.index("--calib") + 1].startswith("DATA:"):
        name, _, dims = args[args.index("--calib") + 1][len("DATA:"):].partition("=")
        folder = tmp_path / "calib"
        folder.mkdir()
        shape = [int(d) for d in dims.split(",")]
        np.savez(folder / "b0.npz", **{name: np.zeros(shape, np.float32)})
        args[args.index("--calib") + 1] = str(folder)
    before = sorted(p.name for p in tmp_path.iterdir())
    out = tmp_path / "out.onnx"
    code = main(["compress", model, "-o", str(out), *args, *(["--dry-run"] if dry_run else [])])
    assert code == 2
    assert message in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_data_the_model_cannot_run_on_is_exit_2_before_any_pass(tmp_path, capsys, dry_run):
    # Valid, but Reshape [-1, 3] of [N, 8] runs only where 8 * N divides by 3: random:2 has
    # N = 1. The user's data, not a pass, is at fault: exit 2, not 3.
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Reshape", ["x", "shape"], ["y"])], "cut",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [None, 3])],
        [onnx.numpy_helper.from_array(np.array([-1, 3], np.int64), "shape")])
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = tmp_path / "cut.onnx"
    onnx.save(proto, str(path))
    out = tmp_path / "out.onnx"
    assert main(["compress", str(path), "-o", str(out), "--recipe", "quantize:int8", "--calib",
                 "random:2", *(["--dry-run"] if dry_run else [])]) == 2
    assert "cannot run on random:2 batch 0 (check --calib)" in _one_line_error(capsys)
    assert not out.exists()


@pytest.mark.parametrize("argv, message", [
    (["compress", "/nonexistent/m.onnx", "-o", "OUT"], "no such file"),
    (["inspect", "/nonexistent/m.onnx"], "no such file"),
    (["validate", "/nonexistent/a.onnx", "/nonexistent/b.onnx"], "no such file"),
    (["bench", "/nonexistent/m.onnx"], "no such file"),
    (["compress", "--help-pass", "nonsense"], "unknown pass"),
    (["compress"], "MODEL"),
    (["compress", "m.onnx", "-o", "OUT", "--min-cosine", "high"], "invalid float value"),
    (["bench", "m.onnx", "--batch"], "expected one argument"),
    (["shrink", "m.onnx"], "invalid choice"),
])
def test_missing_files_bad_flags_and_unknown_names_are_exit_2_with_one_line(
        tmp_path, capsys, argv, message):
    argv = [str(tmp_path / "out.onnx") if a == "OUT" else a for a in argv]
    assert main(argv) == 2
    assert message in _one_line_error(capsys)


def test_help_pass_prints_every_field_with_its_description(capsys):
    from onnxcomp.pipeline import config_help

    assert main(["compress", "--help-pass", "prune"]) == 0
    out = capsys.readouterr().out
    for field in config_help(passes.get("prune").config_type):
        assert field.name in out and field.help and field.help in out


def _broken_pass(monkeypatch, break_model) -> None:
    """A copy of cleanup whose apply hands back ``break_model(model)``, as pass 'broken'."""
    import dataclasses

    cleanup = passes.get("cleanup")

    def apply(model, plan, ctx):
        applied = cleanup.apply(model, plan, ctx)
        applied.model, applied.modified = break_model(applied.model.copy()), True
        return applied

    monkeypatch.setitem(passes.PASSES, "broken",
                        dataclasses.replace(cleanup, name="broken", apply=apply))


def _dangling_input(model):
    model.graph.node[0].input[0] = "no_such_tensor"
    return model


def _ort_refuses(model):
    # Valid for onnx's checker (an op from a domain it does not know), unknown to ONNX Runtime.
    node = next(n for n in model.graph.node if n.op_type == "Relu")
    node.domain = "com.example"
    model.proto.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    return model


@pytest.mark.parametrize("break_model, message", [
    (_dangling_input, "pass 'broken' produced"),
    (_ort_refuses, "ONNX Runtime refuses the compressed model (changed by cleanup, broken)"),
])
@pytest.mark.parametrize("validate", [True, False], ids=["validate", "no-validate"])
def test_our_invalid_output_is_exit_3_and_writes_nothing(tmp_path, capsys, monkeypatch,
                                                         break_model, message, validate):
    _broken_pass(monkeypatch, break_model)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))  # where temp folders go
    (tmp_path / "tmp").mkdir()
    model = _model(tmp_path)
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    code = main(["compress", model, "-o", str(out), "--recipe", "broken", "--report",
                 str(report), *([] if validate else ["--no-validate"])])
    assert code == 3
    error = _last_line_error(capsys)
    assert "internal error" in error and "please report" in error and message in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "tmp"]
    assert not any((tmp_path / "tmp").iterdir())  # no temporary folder left behind


def test_our_invalid_output_raises_from_the_api(monkeypatch):
    from onnxcomp import api
    from onnxcomp.errors import InvalidOutput

    _broken_pass(monkeypatch, _dangling_input)
    with pytest.raises(InvalidOutput, match="pass 'broken'"):
        api.compress(make_mlp(), recipe="broken", validate=False, show_progress=False)


def test_an_input_model_with_its_own_flaw_is_not_blamed_on_us(tmp_path, capsys):
    # ONNX Runtime refuses the user's model: that is a user error (2), even after compressing.
    model = _ort_refuses(make_mlp())
    path = tmp_path / "m.onnx"
    model.save(path)
    out = tmp_path / "out.onnx"
    assert main(["compress", str(path), "-o", str(out), "--recipe", "quantize:int4",
                 "--no-validate"]) == 2
    assert "error: the input model: ONNX Runtime could not load" in _last_line_error(capsys)
    assert not out.exists()


def test_dry_run_prints_each_plan_and_json_its_rows(tmp_path, capsys):
    model = _model(tmp_path)
    out = tmp_path / "out.onnx"
    argv = ["compress", model, "-o", str(out), "--recipe", "quantize:int4,prune", "--dry-run"]
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "| node" in text and "quantize: 2 to change" in text and "prune: 1 to change" in text
    assert main([*argv, "--json"]) == 0
    plans = json.loads(capsys.readouterr().out)
    assert [p["pass"] for p in plans] == ["quantize", "prune"]
    quantize = [r for r in plans[0]["rows"] if r["action"] != "skip"]
    assert sorted(r["node"] for r in quantize) == ["fc1", "fc2"]
    assert not out.exists()


# --- the HTML report, the report command, --quiet (#19) ----------------------------------------


def _compress_tiny_clip(folder, *extra: str) -> tuple[int, str, str]:
    """``compress`` of the zoo's tiny-clip (built in code, a few seconds) with an HTML page."""
    from onnxcomp import zoo

    out = folder / "tc.onnx"
    return main(["compress", str(zoo.fetch("tiny-clip")), "-o", str(out), "--recipe",
                 "quantize:int8", "--calib", "tiny-clip:16", "--report",
                 str(folder / "report.json"), "--html", str(folder / "report.html"), *extra])


def test_compress_writes_the_html_page_and_report_rerenders_it(tmp_path, capsys):
    import re

    assert _compress_tiny_clip(tmp_path) == 0
    capsys.readouterr()
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    data = json.loads((tmp_path / "report.json").read_text())
    # what the measurers now keep for the page
    assert data["models"]["reference"]["breakdown"]["bytes"] > \
        data["models"]["candidate"]["breakdown"]["bytes"]
    assert len(data["fidelity"]["outputs"]["image_embeds"]["per_sample_cosine"]) == 256
    assert np.asarray(data["fidelity"]["retrieval"]["similarity"]["reference"]).shape == (24, 24)
    headings = re.findall(r"<h2>([^<]*)</h2>", page)
    for heading in ("Summary", "Passes", "Per-layer quantization harm (quantize)",
                    "Parameters and bytes by op type and dtype", "Fidelity per output"):
        assert heading in headings
    assert (tmp_path / "report.json").stat().st_mode & 0o044  # shareable, as the page
    # an old report re-rendered: the same sections
    again = tmp_path / "sub" / "again.html"
    assert main(["report", str(tmp_path / "report.json"), "--html", str(again)]) == 0
    assert capsys.readouterr().out.strip() == str(again)
    assert re.findall(r"<h2>([^<]*)</h2>", again.read_text(encoding="utf-8")) == headings


def test_compress_writes_the_page_even_when_the_target_is_missed(tmp_path, capsys):
    assert _compress_tiny_clip(tmp_path, "--min-cosine", "0.99999") == 1
    assert "target missed" in capsys.readouterr().err
    assert not (tmp_path / "tc.onnx").exists()
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "FAILED: every output" in page and "was not written" in page


def test_validate_and_bench_write_the_page(tmp_path, capsys):
    model = _model(tmp_path)
    html = tmp_path / "v.html"
    assert main(["validate", model, model, "--data", "random:2", "--html", str(html)]) == 0
    assert "Fidelity per output" in html.read_text(encoding="utf-8")
    html = tmp_path / "b.html"
    report = tmp_path / "b.json"
    assert main(["bench", model, "--runs", "3", "--min-seconds", "0", "--no-memory",
                 "--report", str(report), "--html", str(html)]) == 0
    assert "Latency</h2>" in html.read_text(encoding="utf-8")
    result = json.loads(report.read_text())["bench"]["results"][0]
    assert len(result["times_ms"]) == result["runs"] >= 3


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    ("{not json", "not JSON"),
    ("[1, 2]", "not an onnxcomp report (a JSON list"),
    ('{"bench": {"results": [{"model": "m"}]}}', "not an onnxcomp report this version can draw"),
])
def test_report_command_refuses_what_is_not_a_report(tmp_path, capsys, content, message):
    source = tmp_path / "r.json"
    if content is not None:
        source.write_text(content)
    html = tmp_path / "r.html"
    assert main(["report", str(source), "--html", str(html)]) == 2
    assert message in _one_line_error(capsys)
    assert not html.exists()


def _a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    return str(tmp_path / "file.txt" / "r.html")


@pytest.mark.parametrize("argv, message", [
    (["--html", "FILE_PARENT"], "--html"),
    (["--html", "FOLDER"], "is a folder"),
    (["--report", "FILE_PARENT"], "--report"),
    (["--report", "FOLDER"], "is a folder"),
    (["--report", "SAME", "--html", "SAME"], "name the same file"),
])
@pytest.mark.parametrize("command", ["compress", "validate", "bench"])
def test_an_output_path_that_cannot_be_written_fails_before_any_work(
        tmp_path, capsys, monkeypatch, argv, message, command):
    from onnxcomp import api
    from onnxcomp.measure import bench, validate

    def no_work(*args, **kwargs):
        raise AssertionError("the work started before the output paths were checked")

    for module, name in ((api, "compress"), (validate, "validate"), (bench, "bench")):
        monkeypatch.setattr(module, name, no_work)
    model = _model(tmp_path)
    (tmp_path / "folder").mkdir()
    paths = {"FILE_PARENT": _a_file(tmp_path), "FOLDER": str(tmp_path / "folder"),
             "SAME": str(tmp_path / "same.out")}
    argv = [paths.get(a, a) for a in argv]
    before = sorted(p.name for p in tmp_path.iterdir())
    base = {"compress": ["compress", model, "-o", str(tmp_path / "out.onnx"), "--recipe",
                         "cleanup"],
            "validate": ["validate", model, model],
            "bench": ["bench", model]}[command]
    assert main([*base, *argv]) == 2
    assert message in _one_line_error(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


@pytest.mark.parametrize("where", ["before", "after"])
def test_quiet_silences_progress(tmp_path, capsys, where):
    model = _model(tmp_path)
    # --no-speed-check: int8 of this tiny graph is slower than float, and that verdict is a
    # warning on stderr that --quiet keeps (warnings are not progress).
    argv = ["compress", model, "-o", str(tmp_path / "out.onnx"), "--recipe", "quantize:int8",
            "--calib", "random:2", "--no-speed-check"]
    assert main(argv) == 0
    loud = capsys.readouterr()
    # cleanup, quantize, lower (the ort-cpu target's, after static int8), cleanup
    assert "[1/4] cleanup" in loud.err and "validate: 2/2" in loud.err
    quiet = ["--quiet", *argv] if where == "before" else [*argv, "--quiet"]
    assert main(quiet) == 0
    silent = capsys.readouterr()
    assert silent.err == "" and "| quantize" in silent.out  # the results still print


def test_quiet_in_a_real_process_and_progress_as_lines_on_a_pipe(tmp_path):
    model = _model(tmp_path)
    argv = ["bench", model, "--runs", "3", "--min-seconds", "0", "--no-memory"]
    loud = _cli(*argv)
    assert loud.returncode == 0, loud.stderr
    assert "bench cpu, 1 thread(s), 1 model(s): 0/3" in loud.stderr
    assert "\r" not in loud.stderr  # a pipe gets plain lines
    quiet = _cli("--quiet", *argv)
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert "| model" in quiet.stdout


def test_minus_one_input_dims_are_dynamic(tmp_path):
    """paddle2onnx writes -1 for a dynamic dimension (rapidocr's direction classifier); ONNX
    Runtime reads it so, and so does onnxcomp. Other negative sizes stay refused."""
    rng = np.random.default_rng(0)
    weight = onnx.numpy_helper.from_array(rng.standard_normal((8, 3, 3, 3)).astype(np.float32),
                                          "w")
    for dims, code in (([-1, 3, 48, -1], 0), ([-8, 3, 48, 64], 2)):
        graph = onnx.helper.make_graph(
            [onnx.helper.make_node("Conv", ["x", "w"], ["y"], name="c", pads=[1, 1, 1, 1])], "g",
            [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, dims)],
            [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [-1, 8, 48, -1])],
            [weight])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 13)])
        model.ir_version = 8
        path = tmp_path / f"m{code}.onnx"
        onnx.save(model, str(path))
        result = _cli("compress", str(path), "-o", str(tmp_path / f"out{code}.onnx"),
                      "--recipe", "quantize:int8", "--calib", "random:4", "--quiet")
        assert result.returncode == code, result.stderr
