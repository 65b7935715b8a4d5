"""Idempotence of every pass on the shared builders' graphs (the plain, parametrized companion of
test_properties.py): run a pass, run it again on its own output, and check what that pass
promises for a second run.

- cleanup, lowrank (energy rule): nothing more to do (modified False, the model handed back);
- quantize (every mode): refuses a model it already quantized (UserError), or, when the first
  run found nothing to quantize, finds nothing again;
- prune: its ratio is a share of the channels left, so a second run cuts again by design; what
  holds is determinism (same input, same output) and ``ratio=0`` doing nothing;
- distill (after prune): a second run keeps a re-fit only if the outputs get closer to the
  teacher on the calibration data, and never changes the graph's structure.
"""

from __future__ import annotations

import builders
import numpy as np
import onnx
import pytest

from onnxcomp import calibration, runtime
from onnxcomp.errors import UserError
from onnxcomp.measure.compare import per_sample_cosine
from onnxcomp.model import Model
from onnxcomp.passes import PASSES
from onnxcomp.pipeline import Context

GRAPHS = sorted(builders.ALL)


def _data(model: Model) -> calibration.Dataset:
    return calibration.random_data(model, 8, seed=1, batch=4)


def _config(name: str, short: str | None = None, **overrides):
    config = PASSES[name].config_type.from_short(short)
    return type(config)(**{**vars(config), **overrides}) if overrides else config


def _run(name: str, model: Model, config, ctx: Context | None = None):
    ctx = ctx or Context(calibration=_data(model), teacher=model)
    return PASSES[name].run(model, config, ctx)


def _bytes(model: Model) -> bytes:
    return model.proto.SerializeToString(deterministic=True)


def _valid(model: Model) -> None:
    onnx.checker.check_model(model.proto)
    runtime.session(model, optimize=False)


def _mean_cosine(reference: Model, candidate: Model, data: calibration.Dataset) -> float:
    ref, cand = runtime.session(reference), runtime.session(candidate)
    values = []
    for batch in data:
        a, b = runtime.run(ref, batch), runtime.run(cand, batch)
        values.extend(float(per_sample_cosine(a[n], b[n]).mean()) for n in a)
    return float(np.mean(values))


@pytest.mark.parametrize("graph", GRAPHS)
def test_cleanup_twice_changes_nothing_more(graph):
    once, _ = _run("cleanup", builders.ALL[graph](), _config("cleanup"))
    twice, record = _run("cleanup", once, _config("cleanup"))
    assert not record.modified and twice is once


@pytest.mark.parametrize("mode", ["int8", "int8-dynamic", "int4"])
@pytest.mark.parametrize("graph", GRAPHS)
def test_quantize_refuses_its_own_output(graph, mode):
    model = builders.ALL[graph]()
    once, record = _run("quantize", model, _config("quantize", mode))
    _valid(once)
    if record.modified:
        with pytest.raises(UserError, match="already quantized"):
            _run("quantize", once, _config("quantize", mode))
    else:  # nothing this mode quantizes (e.g. int4 on a conv net): nothing the second time
        twice, again = _run("quantize", once, _config("quantize", mode))
        assert not again.modified and twice is once


@pytest.mark.parametrize("graph", GRAPHS)
def test_lowrank_twice_changes_nothing_more(graph):
    # min_params=0: the builders' weights are below the default floor (1024), so that the
    # first run factors something and the second run meets factors.
    # The rule alone (no per-layer error limit): this checks that factors are not factored again.
    config = _config("lowrank", min_params=0, max_layer_error=None)
    once, _ = _run("lowrank", builders.ALL[graph](), config)
    _valid(once)
    twice, again = _run("lowrank", once, config)
    assert not again.modified, f"second lowrank factored {again.touched}"
    assert twice is once


def test_lowrank_does_not_factor_its_own_factors():
    # Found by test_properties.py: the energy rule can keep fewer components than a factor's
    # full rank (A, 12x2, of the factored 12x4 head here), and a factor of rank 1 is cheaper.
    model = builders.chain([builders.Layer("relu"), builders.Layer("matmul", 12)], 4, 4, seed=0)
    # The rule alone (no per-layer error limit): this checks that factors are not factored again.
    config = _config("lowrank", min_params=0, max_layer_error=None)
    once, record = _run("lowrank", model, config)
    assert record.modified
    _, again = _run("lowrank", once, config)
    assert not again.modified, f"second lowrank factored {again.touched}"


@pytest.mark.parametrize("graph", GRAPHS)
def test_prune_is_deterministic_and_ratio_zero_does_nothing(graph):
    model = builders.ALL[graph]()
    data = _data(model)
    first, _ = _run("prune", model, _config("prune", "0.3"), Context(calibration=data))
    second, _ = _run("prune", model, _config("prune", "0.3"), Context(calibration=data))
    assert _bytes(first) == _bytes(second)
    _valid(first)
    nothing, zero = _run("prune", first, _config("prune", "0"))
    assert not zero.modified and nothing is first
    # A second prune:0.3 cuts 30% of what is left (by design), and the result is still valid.
    again, second_record = _run("prune", first, _config("prune", "0.3"))
    _valid(again)
    assert second_record.params_after <= second_record.params_before


@pytest.mark.parametrize("graph", GRAPHS)
def test_distill_twice_never_gets_worse(graph):
    teacher = builders.ALL[graph]()
    data = _data(teacher)
    ctx = Context(calibration=data, teacher=teacher)
    pruned, _ = _run("prune", teacher, _config("prune", "0.3"), ctx)
    once, _ = _run("distill", pruned, _config("distill"), ctx)
    twice, second = _run("distill", once, _config("distill"), ctx)
    if not second.modified:
        assert twice is once
        return
    _valid(twice)
    assert [n.op_type for n in twice.graph.node] == [n.op_type for n in once.graph.node]
    assert _mean_cosine(teacher, twice, data) >= _mean_cosine(teacher, once, data) - 1e-6
