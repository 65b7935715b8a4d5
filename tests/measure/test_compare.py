"""``measure.compare``: the one numeric comparison of two models on the same batches."""

from __future__ import annotations

import builders
import numpy as np
from onnx import numpy_helper

from onnxcomp import calibration, runtime
from onnxcomp.measure import compare as compare_mod
from onnxcomp.model import Model


def _scaled_copy(model: Model, factor: float) -> Model:
    """The same graph with its last weight scaled: outputs scale by ``factor``."""
    proto = model.proto.__class__()
    proto.CopyFrom(model.proto)
    last = proto.graph.initializer[-1]
    last.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(last) * factor, last.name))
    return Model(proto)


def test_a_model_against_itself_is_exact_and_against_a_perturbed_copy_as_computed():
    model = builders.mlp()
    data = calibration.random_data(model, 3, seed=1)
    same = compare_mod.compare(model, model, [], data, max_batches=3)
    assert same.min_cosine > 1 - 1e-6
    assert all(v == float("inf") for v in same.sqnr.values())

    other = _scaled_copy(model, 1.1)
    result = compare_mod.compare(model, other, ["h2"], data, max_batches=3)
    assert result.sqnr["h2"] == float("inf")  # before the scaled weight: the same values
    assert [o.name for o in model.graph.output] == ["y"]  # the tapped output was taken back
    name = model.graph.output[0].name
    signal = noise = 0.0
    for batch in data:
        a = runtime.run(runtime.session(model, optimize=False), batch, [name])[name]
        b = runtime.run(runtime.session(other, optimize=False), batch, [name])[name]
        a, b = a.astype(np.float64), b.astype(np.float64)
        signal += float(np.sum(a * a))
        noise += float(np.sum((a - b) ** 2))
    assert abs(result.sqnr[name] - 10 * np.log10(signal / noise)) < 1e-6


def test_energies_are_chunked_but_exact(monkeypatch):
    monkeypatch.setattr(compare_mod, "_CHUNK", 7)  # many chunks and a ragged last one
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 11)).astype(np.float32)
    b = (a + 0.1 * rng.standard_normal(a.shape)).astype(np.float32)
    signal, noise = compare_mod._energies(a, b)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert np.isclose(signal, np.sum(a64 * a64), rtol=1e-12)
    assert np.isclose(noise, np.sum((a64 - b64) ** 2), rtol=1e-12)
    b[0, 0] = np.inf  # an overflowed candidate: infinite noise, -inf dB
    assert compare_mod.sqnr_db(*compare_mod._energies(a, b)) == float("-inf")
