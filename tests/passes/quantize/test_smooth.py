"""SmoothQuant scale migration: float-exact in ONNX Runtime, and through the pass."""

from __future__ import annotations

import numpy as np
import pytest
from quantize_graphs import data_for, matmul_model

from onnxcomp import runtime
from onnxcomp.errors import UserError
from onnxcomp.graph import export_model, import_graph, tidy
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import smooth as quantize_smooth
from onnxcomp.pipeline import Context

run = quantize.PASS.run


def test_smoothquant_is_exact_in_float():
    model = matmul_model(ln=True)
    graph = import_graph(model)
    sites = quantize_smooth.find_sites(graph, {"mm1", "mm2"})
    assert len(sites) == 1 and set(sites[0].matmuls) == {"mm1", "mm2"}
    rng = np.random.default_rng(4)
    absmax = {sites[0].output: rng.random(72) * 10 + 0.1}
    quantize_smooth.apply(graph, sites, absmax, 0.5)
    smoothed = export_model(tidy(graph), like=model)
    batch = next(iter(data_for(model)))
    diff = runtime.max_abs_difference(model, smoothed, batch)
    assert max(diff.values()) < 1e-4
    _, record = run(model, quantize.Config(smoothquant_alpha=0.5),
                    Context(calibration=data_for(model)))
    assert any("smoothquant" in note and "1 Layer" in note for note in record.notes)
    assert record.details["output_cosine"]["y"] > 0.99


def test_smoothquant_needs_calibration_data_in_every_mode():
    config = quantize.Config(mode="int8-dynamic", smoothquant_alpha=0.5)
    assert quantize.PASS.capabilities.needs_calibration(config)
    with pytest.raises(UserError, match="needs calibration data"):
        run(matmul_model(ln=True), config, Context())


def test_no_layer_norm_is_noted():
    model = matmul_model()
    _, record = run(model, quantize.Config(smoothquant_alpha=0.5),
                    Context(calibration=data_for(model)))
    assert any("no MatMul reads a LayerNormalization" in note for note in record.notes)
