from __future__ import annotations

import dataclasses
import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import make_mlp
from onnx import numpy_helper

from onnxcomp import passes
from onnxcomp.cli import main
from onnxcomp.inspection import format_inspection, inspect_model

BACKEND_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


def _independent_parameter_count(proto: onnx.ModelProto) -> int:
    """Counted another way: decode every stored tensor to numpy and sum the sizes, except
    int64 tensors (shapes and indices: not parameters, by the one count's definition)."""
    total = 0

    def size(tensor: onnx.TensorProto) -> int:
        array = numpy_helper.to_array(tensor)
        return 0 if array.dtype == np.int64 else array.size

    def visit(graph):
        nonlocal total
        for tensor in graph.initializer:
            total += size(tensor)
        for node in graph.node:
            for attr in node.attribute:
                if attr.type == onnx.AttributeProto.TENSOR:
                    total += size(attr.t)
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
    # What the passes would do is their own plan: both MatMuls quantized, one FFN group cut.
    assert info["plans"]["quantize:int8"]["to_change"] == 2
    assert info["plans"]["quantize:int4"]["to_change"] == 2
    assert info["plans"]["prune"]["to_change"] == 1
    assert "Constant nodes" in info["warnings"][0]
    text = format_inspection(info)
    assert "MatMul" in text and "quantize:int8" in text


def test_inspect_asks_each_pass_plan_on_the_cleaned_up_model(monkeypatch):
    model = make_mlp(weights_as_constant_nodes=True)
    before = model.proto.SerializeToString()
    asked = {}
    for name in ("quantize", "prune", "lowrank"):
        spec = passes.PASSES[name]

        def plan(m, config, ctx, spec=spec):
            asked.setdefault(spec.name, []).append(
                (config, Counter(n.op_type for n in m.graph.node)))
            return spec.plan(m, config, ctx)

        monkeypatch.setitem(passes.PASSES, name, dataclasses.replace(spec, plan=plan))
    info = inspect_model(model, shapes={"x": [2, 8]})
    assert model.proto.SerializeToString() == before  # no plan touches the model
    assert [c.mode for c, _ in asked["quantize"]] == ["int8", "int4"]
    assert set(asked) == {"quantize", "prune", "lowrank"}
    for _, ops in (call for calls in asked.values() for call in calls):
        assert "Constant" not in ops and "Identity" not in ops  # cleanup ran first
    for entry in info["plans"].values():
        assert entry["to_change"] == sum(r["action"] != "skip" for r in entry["rows"])
        assert entry["skipped"] == sum(r["action"] == "skip" for r in entry["rows"])


def test_one_failing_plan_does_not_fail_inspect(monkeypatch):
    def broken(model, config, ctx):
        raise RuntimeError("boom")

    spec = passes.PASSES["prune"]
    monkeypatch.setitem(passes.PASSES, "prune", dataclasses.replace(spec, plan=broken))
    info = inspect_model(make_mlp())
    assert "PassFailed" in info["plans"]["prune"]["not_planned"]
    assert "boom" in info["plans"]["prune"]["not_planned"]
    assert info["plans"]["quantize:int8"]["to_change"] == 2
    assert "prune: PassFailed" in format_inspection(info)


def test_lowrank_plan_is_not_asked_of_large_models(monkeypatch):
    from onnxcomp import inspection

    # The two SVDs cost 8*16*8 + 16*4*4 = 1280 multiply-adds.
    monkeypatch.setattr(inspection, "LOWRANK_PLAN_WORK", 1280)
    assert "rows" in inspect_model(make_mlp())["plans"]["lowrank"]
    monkeypatch.setattr(inspection, "LOWRANK_PLAN_WORK", 1279)
    info = inspect_model(make_mlp())
    assert "rows" not in info["plans"]["lowrank"]
    assert "1.3e+03 multiply-adds" in info["plans"]["lowrank"]["not_planned"]
    assert "--dry-run --recipe lowrank" in format_inspection(info)


def _backend_models():
    return sorted(BACKEND_DATA.rglob("*.onnx"))


def test_backend_test_models_all_inspect_with_exact_parameter_counts():
    models = _backend_models()
    assert len(models) > 100, "the onnx package should ship its backend test models"
    failures = []
    for path in models:
        try:
            info = inspect_model(path)
        except Exception as exc:  # noqa: BLE001  collect all, report together
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
    # --json carries every plan row: node, action, reason.
    rows = info["plans"]["quantize:int8"]["rows"]
    assert sorted(r["node"] for r in rows if r["action"] != "skip") == ["fc1", "fc2"]
    assert all(set(r) == {"node", "action", "reason"} for r in rows)


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
