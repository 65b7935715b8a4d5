"""The CLI contract on hostile pipeline folders (parts.json + ONNX parts).

For every case, ``onnxcomp inspect DIR`` and ``onnxcomp compress DIR -o OUT --recipe
quantize:int8-dynamic --calib NPZ`` must exit 0, or 1/2 with exactly one line on stderr and
nothing written; never exit 3, a traceback or a hang, and never a changed input file.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from pipeline_builders import toy_samples, write_toy_pipeline


def _manifest(folder: Path, change) -> None:
    data = json.loads((folder / "parts.json").read_text())
    change(data)
    (folder / "parts.json").write_text(json.dumps(data))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _rename_encoder_output(folder: Path) -> None:
    model = onnx.load(str(folder / "encoder_model.onnx"))
    model.graph.output[0].name = "other"
    model.graph.node[-1].output[0] = "other"
    onnx.save(model, str(folder / "encoder_model.onnx"))


def _external_escape(folder: Path) -> None:
    model = onnx.load(str(folder / "encoder_model.onnx"))
    tensor = model.graph.initializer[0]
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    tensor.external_data.add(key="location", value="../../etc/passwd")
    onnx.save(model, str(folder / "encoder_model.onnx"))


def _symbolic_heads(folder: Path) -> None:
    model = onnx.load(str(folder / "decoder_model_merged.onnx"))
    for value in model.graph.input:
        if value.name == "past_key_values.0.key":
            value.type.tensor_type.shape.dim[1].dim_param = "heads"
    onnx.save(model, str(folder / "decoder_model_merged.onnx"))


CASES = {
    "manifest-not-json": lambda f: (f / "parts.json").write_text("{nope"),
    "manifest-a-list": lambda f: (f / "parts.json").write_text("[1, 2]"),
    "manifest-binary": lambda f: (f / "parts.json").write_bytes(os.urandom(512)),
    "manifest-deep-json": lambda f: (f / "parts.json").write_text("[" * 100000 + "]" * 100000),
    "part-is-a-folder": lambda f: (f / "decoder_model.onnx").unlink() or (
        f / "decoder_model.onnx").mkdir(),
    "part-is-a-fifo": lambda f: (f / "decoder_model.onnx").unlink() or os.mkfifo(
        f / "decoder_model.onnx"),
    "part-truncated": lambda f: _truncate(f / "decoder_with_past_model.onnx"),
    "part-not-onnx": lambda f: (f / "encoder_model.onnx").write_text("hello"),
    "part-empty": lambda f: (f / "encoder_model.onnx").write_bytes(b""),
    "part-path-escapes": lambda f: _manifest(f, lambda m: m["parts"][0].update(
        file="/etc/passwd")),
    "part-symlink-escapes": lambda f: (f / "encoder_model.onnx").unlink() or (
        f / "encoder_model.onnx").symlink_to("/etc/hostname"),
    "external-data-escapes": _external_escape,
    "names-do-not-connect": _rename_encoder_output,
    "start-id-out-of-vocab": lambda f: _manifest(f, lambda m: m["generation"].update(
        start_ids=[10**9])),
    "absurd-new-tokens": lambda f: _manifest(f, lambda m: m["generation"].update(
        max_new_tokens=10**12)),
    "negative-eos": lambda f: _manifest(f, lambda m: m["generation"].update(eos_id=-1)),
    "role-twice": lambda f: _manifest(f, lambda m: m["parts"].append(
        {"name": "again", "file": "decoder_model_merged.onnx", "role": "decoder"})),
    "merged-symbolic-heads": _symbolic_heads,
    "feeds-not-strings": lambda f: _manifest(f, lambda m: m.update(feeds={"decoder.x": 3})),
}


def _hashes(folder: Path) -> dict[str, str]:
    out = {}
    for path in sorted(folder.rglob("*")):
        if path.is_file() and not path.is_symlink() and not path.is_fifo():
            out[str(path.relative_to(folder))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _run(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "onnxcomp.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=120, check=False)


@pytest.fixture(scope="module")
def calib(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("calib") / "sample.npz"
    np.savez(path, **toy_samples(1, seed=1)[0])
    return path


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_pipeline_folders_keep_the_contract(name, tmp_path, calib):
    folder = write_toy_pipeline(tmp_path / "in", merged=True, max_new_tokens=4)
    CASES[name](folder)
    before = _hashes(folder)
    for args in (["inspect", folder],
                 ["compress", "--quiet", folder, "-o", tmp_path / "out", "--recipe",
                  "quantize:int8-dynamic", "--calib", calib]):
        result = _run(*args)
        assert result.returncode in (0, 1, 2), (name, args[0], result.stderr)
        assert "Traceback" not in result.stderr, (name, result.stderr)
        if result.returncode:
            assert result.stderr.strip().count("\n") == 0, (name, result.stderr)
            assert not (tmp_path / "out").exists(), name
    assert _hashes(folder) == before, name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxcomp")], name
