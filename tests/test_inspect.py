from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_mlp
from onnx import numpy_helper

from onnxcomp.cli import main
from onnxcomp.inspection import format_inspection, inspect_model

BACKEND_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


def _independent_parameter_count(proto: onnx.ModelProto) -> int:
    """Counted another way: decode every stored tensor to numpy and sum the sizes."""
    total = 0

    def visit(graph):
        nonlocal total
        for tensor in graph.initializer:
            total += numpy_helper.to_array(tensor).size
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    total += numpy_helper.to_array(attr.t).size
                elif attr.type == onnx.AttributeProto.GRAPH:
                    visit(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    for g in attr.graphs:
                        visit(g)

    visit(proto.graph)
    return total


def test_mlp_counts_and_flops():
    model = make_mlp(weights_as_constant_nodes=True)
    info = inspect_model(model, shapes={"x": [2, 8]})
    assert info["parameters"] == 8 * 16 + 16 + 16 * 4 == _independent_parameter_count(model.proto)
    # Two MatMuls: 2*B*K*N each.
    assert info["flops"] == 2 * 2 * 8 * 16 + 2 * 2 * 16 * 4
    assert info["ops"]["MatMul"] == 2
    assert info["candidates"]["quantize"]["int8"] == 2
    assert "Constant nodes" in info["warnings"][0]
    text = format_inspection(info)
    assert "MatMul" in text and "quantize" in text


def _backend_models():
    return sorted(BACKEND_DATA.rglob("*.onnx"))


def test_backend_test_models_all_inspect_with_exact_parameter_counts():
    models = _backend_models()
    assert len(models) > 100, "the onnx package should ship its backend test models"
    failures = []
    for path in models:
        try:
            info = inspect_model(path)
        except Exception as exc:  # collect all, report together
            failures.append(f"{path.parent.name}: {type(exc).__name__}: {exc}")
            continue
        expected = _independent_parameter_count(onnx.load(str(path)))
        if info["parameters"] != expected:
            failures.append(f"{path.parent.name}: {info['parameters']} != {expected}")
    assert not failures, "\n".join(failures[:20])


def test_cli_inspect_json(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    make_mlp().save(path)
    assert main(["inspect", str(path), "--json", "--shape", "x=4,8"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["flops"] == 2 * 4 * 8 * 16 + 2 * 4 * 16 * 4
    assert info["file_bytes"] == path.stat().st_size


@pytest.mark.zoo
@pytest.mark.parametrize("name, shape", [("ppocr-rec", [1, 3, 48, 320]),
                                         ("ppocr-det", [1, 3, 640, 640]), ("tiny-clip", None)])
def test_zoo_models_inspect(name, shape):
    from onnxcomp import zoo

    path = zoo.fetch(name)
    info = inspect_model(path, shapes={"x": shape} if shape else None)
    assert info["parameters"] == _independent_parameter_count(onnx.load(str(path)))
    assert info["flops"] > 0 and not info["flops_unknown_nodes"]
    assert np.isfinite(info["flops"])
