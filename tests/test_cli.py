from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import make_mlp

from onnxcomp.cli import main


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxcomp.cli", *args], capture_output=True,
                          text=True, timeout=300)


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
    import json

    assert not json.loads(report.read_text()).get("fidelity")
    # A fidelity gate needs the check: asking for both is a usage error, and nothing is written.
    other = tmp_path / "other.onnx"
    assert main(["compress", str(path), "-o", str(other), "--no-validate",
                 "--min-cosine", "0.9"]) == 2
    assert "--no-validate" in capsys.readouterr().err
    assert not other.exists()
