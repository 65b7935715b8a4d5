"""prune's cut: exact against the same model with the cut channels zeroed, really smaller,
every shape constant updated, shared constants copied before they are cut."""

from __future__ import annotations

import numpy as np
import onnx
import prune_graphs as pg
import pytest

from onnxcomp import calibration, runtime
from onnxcomp.model import Model
from onnxcomp.passes import prune
from onnxcomp.passes.prune.cut import cut
from onnxcomp.pipeline import Context

EXACT = 1e-4  # float32 sums reordered by the cut; the bound


def _feeds(model: Model, seed: int = 0) -> dict[str, np.ndarray]:
    return calibration.random_data(model, 1, seed=seed).make_batch(0)


def _plan(model: Model, config: prune.Config, ctx: Context | None = None) -> prune.PrunePlan:
    return prune.PASS.plan(model, config, ctx or Context()).payload


def _exact(model: Model, config: prune.Config, ctx: Context | None = None, seeds=(0, 1)):
    """Prune, and compare with the original whose pruned channels were zeroed."""
    the_plan = _plan(model, config, ctx)
    assert the_plan.removed, "the plan removes nothing: the test would prove nothing"
    pruned, _ = cut(model, the_plan)
    onnx.checker.check_model(pruned.proto, full_check=True)
    zeroed = prune.zero_out(model, the_plan)
    for seed in seeds:
        feeds = _feeds(model, seed)
        ref, got, orig = (runtime.run_model(m, feeds) for m in (zeroed, pruned, model))
        for name in ref:
            assert np.abs(ref[name] - got[name]).max() < EXACT * max(1, np.abs(ref[name]).max())
            # zeroing changed the output, so the comparison above is not vacuous
            assert np.abs(ref[name] - orig[name]).max() > 1e-3
    return the_plan, pruned


def _weight_shapes(model: Model) -> dict[str, tuple]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


@pytest.mark.parametrize("constant_nodes", [False, True])
def test_conv_net_exact_and_smaller(constant_nodes):
    model = pg.conv_net(constant_nodes=constant_nodes)
    _, pruned = _exact(model, prune.Config(ratio=0.5))
    assert pruned.parameter_count() < 0.5 * model.parameter_count()
    shapes = _weight_shapes(pruned)
    assert shapes["conv1.w"][0] == 4 and shapes["conv2.w"][:2] == (4, 4)
    dw = next(n for n in pruned.graph.node if n.name == "dw3")
    assert next(a.i for a in dw.attribute if a.name == "group") == 4
    sizes = next(t for t in pruned.graph.initializer if t.name == "split4")
    assert list(onnx.numpy_helper.to_array(sizes)) == [1, 2]


def test_transformer_heads_and_ffn_exact_with_shared_initializers():
    model = pg.transformer(share_biases=True)
    the_plan, pruned = _exact(model, prune.Config(ratio=0.5))
    kinds = [g.kind for g in the_plan.groups if g.id in the_plan.removed]
    assert kinds.count("heads") == 2 and kinds.count("ffn") == 2
    shapes = _weight_shapes(pruned)
    assert shapes["l0.q.w"] == (16, 8) and shapes["l1.o.w"] == (8, 16)  # 2 of 4 heads left
    assert shapes["l0.fc1.w"] == (16, 16) and shapes["l0.fc2.w"] == (16, 16)
    # the shared bias was copied per layer, each cut with that layer's own neurons
    ffn_bias = [n.input[1] for n in pruned.graph.node if n.name.endswith("fc1_bias")]
    assert len(set(ffn_bias)) == 2
    reshapes = {n.name: n.input[1] for n in pruned.graph.node if n.op_type == "Reshape"}
    merged = next(t for t in pruned.graph.initializer if t.name == reshapes["l0.merge"])
    assert list(onnx.numpy_helper.to_array(merged)) == [0, 0, 8]


def test_transformer_decomposed_layernorm_heads_only():
    model = pg.transformer(layer_norm_op=False, share_biases=False)
    the_plan, _ = _exact(model, prune.Config(ratio=0.0, heads=0.5))
    assert {g.kind for g in the_plan.groups if g.id in the_plan.removed} == {"heads"}


def test_global_ranking_and_activation_importance_are_exact():
    model = pg.transformer(share_biases=False)
    ctx = Context(calibration=calibration.random_data(model, 2))
    _exact(model, prune.Config(ratio=0.3, ranking="global"), ctx)
    the_plan, _ = _exact(model, prune.Config(ratio=0.3, importance="activation"), ctx)
    assert the_plan.importance == "activation"


def test_min_channels_and_rounding():
    the_plan = _plan(pg.conv_net(), prune.Config(ratio=0.3))
    for g in the_plan.groups:
        if g.prunable:
            assert len(the_plan.removed.get(g.id, [])) == int(0.3 * g.size)


def test_multiple_rounds_the_kept_count_up():
    the_plan = _plan(pg.conv_net(), prune.Config(ratio=0.5, multiple=4))
    for g in the_plan.groups:
        if g.id in the_plan.removed:
            assert (g.size - len(the_plan.removed[g.id])) % 4 == 0


def test_cut_leaves_its_input_alone():
    model = pg.transformer()
    before = model.proto.SerializeToString()
    cut(model, _plan(model, prune.Config(ratio=0.5)))
    assert model.proto.SerializeToString() == before


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["ppocr-det", "ppocr-rec"])
def test_ppocr_conv_channels_exact(name):
    pytest.importorskip("onnxcomp.zoo.ppocr")
    from onnxcomp import zoo
    from onnxcomp.model import load

    model = load(zoo.fetch(name))
    the_plan = _plan(model, prune.Config(ratio=0.3))
    assert sum(1 for g in the_plan.groups if g.prunable and g.kind == "conv") >= 10
    pruned, _ = cut(model, the_plan)
    zeroed = prune.zero_out(model, the_plan)
    batch = zoo.dataset(name, "eval", 1).make_batch(0)
    ref, got = runtime.run_model(zeroed, batch), runtime.run_model(pruned, batch)
    for key in ref:
        assert np.abs(ref[key] - got[key]).max() < EXACT
    assert pruned.parameter_count() < 0.8 * model.parameter_count()


@pytest.mark.zoo
def test_tiny_clip_heads_and_ffn_exact():
    pytest.importorskip("onnxcomp.zoo.tiny_clip")
    from onnxcomp import zoo
    from onnxcomp.model import load

    model = load(zoo.fetch("tiny-clip"))
    the_plan = _plan(model, prune.Config(ratio=0.5))
    kinds = {g.kind for g in the_plan.groups if g.id in the_plan.removed}
    assert {"heads", "ffn"} <= kinds
    pruned, _ = cut(model, the_plan)
    zeroed = prune.zero_out(model, the_plan)
    batch = zoo.dataset("tiny-clip", "eval", 1).make_batch(0)
    ref, got = runtime.run_model(zeroed, batch), runtime.run_model(pruned, batch)
    for key in ref:
        assert np.abs(ref[key] - got[key]).max() < EXACT * max(1, np.abs(ref[key]).max())
