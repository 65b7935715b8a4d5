"""prune: dependency groups, real cuts, exactness against a model with the same channels zeroed."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import pytest

from onnxcomp import calibration, runtime
from onnxcomp.model import Model
from onnxcomp.passes import prune
from onnxcomp.pipeline import Context
from onnxcomp.recipe import parse_recipe
from tests import prune_graphs as pg

EXACT = 1e-4  # float32 sums reordered by the cut; the bound


def _feeds(model: Model, seed: int = 0) -> dict[str, np.ndarray]:
    return calibration.random_data(model, 1, seed=seed).make_batch(0)


def _exact(model: Model, config: prune.Config, ctx: Context | None = None, seeds=(0, 1)):
    """Prune, and compare with the original whose pruned channels were zeroed."""
    the_plan = prune.plan(model, config, ctx)
    assert the_plan.removed, "the plan removes nothing: the test would prove nothing"
    pruned, _ = prune.apply(model, the_plan)
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


def test_conv_net_groups_cover_concat_split_depthwise_residual_se():
    groups = prune.analyze_model(pg.conv_net())
    prunable = [g for g in groups if g.prunable]
    nodes = {n for g in prunable for n in g.nodes}
    # conv1 and conv2 are coupled by the residual Add, with BN and the depthwise conv
    residual = next(g for g in prunable if "conv1" in g.nodes)
    assert {"conv1", "bn1", "conv2", "dw3", "bn3", "conv4"} <= set(residual.nodes)
    assert {"conv4", "conv5", "se1", "se2", "conv6", "up7"} <= nodes
    assert all(g.kind == "conv" for g in prunable)
    blocked = [g for g in groups if not g.prunable]
    assert all("graph input/output" in g.reason for g in blocked)


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


def test_transformer_decomposed_layernorm_and_scopes():
    model = pg.transformer(layer_norm_op=False, share_biases=False)
    the_plan, _ = _exact(model, prune.Config(ratio=0.0, heads=0.5))
    assert {g.kind for g in the_plan.groups if g.id in the_plan.removed} == {"heads"}
    # the residual stream is tied to the LayerNorm statistics and graph output: kept
    residual = [g for g in the_plan.groups if "l0.o_bias" in g.nodes]
    assert residual and not any(g.prunable for g in residual)


def test_global_ranking_and_activation_importance_are_exact():
    model = pg.transformer(share_biases=False)
    ctx = Context(calibration=calibration.random_data(model, 2))
    _exact(model, prune.Config(ratio=0.3, ranking="global"), ctx)
    the_plan, _ = _exact(model, prune.Config(ratio=0.3, importance="activation"), ctx)
    assert the_plan.importance == "activation"


def test_unfollowable_group_left_alone():
    model = pg.unfollowable()
    ctx = Context()
    pruned, record = prune.run(model, prune.Config(ratio=0.5), ctx)
    assert record.modified
    assert any("CumSum" in reason for _, reason in record.skipped)
    shapes = _weight_shapes(pruned)
    assert shapes["conv1.w"] == (6, 3, 3, 3)  # before the unknown op: untouched
    assert shapes["conv2.w"] == (4, 6, 3, 3) and shapes["conv3.w"] == (2, 4, 1, 1)
    feeds = _feeds(model)
    assert np.isfinite(runtime.run_model(pruned, feeds)["y"]).all()


def test_record_and_details_for_distill():
    model = pg.transformer()
    pruned, record = prune.run(model, prune.Config(ratio=0.5), Context())
    assert record.modified and record.params_after < record.params_before
    assert record.bytes_after < record.bytes_before
    groups = record.details["groups"]
    ffn = next(g for g in groups if g["kind"] == "ffn")
    assert len(ffn["kept"]) == 16 and ffn["consumers"] == [{"node": "l0.fc2", "output": "l0.fc2"}]
    heads = next(g for g in groups if g["kind"] == "heads")
    assert heads["consumers"][0]["node"] == "l0.o"
    sess = runtime.session(pruned)  # ORT with its own optimizations accepts it too
    assert sess.run(None, _feeds(model))[0].shape == (1, 6, 16)


def test_nothing_prunable_is_a_note_not_an_error():
    model = pg.single_conv()
    result, record = prune.run(model, prune.Config(ratio=0.5), Context())
    assert result is model and not record.modified
    assert any("nothing to prune" in note for note in record.notes)
    _, record = prune.run(pg.conv_net(), prune.Config(ratio=0.3, heads=0.5), Context())
    assert "heads: nothing to prune" in record.notes


def test_ratio_zero_is_identity():
    model = pg.conv_net()
    result, record = prune.run(model, prune.Config(ratio=0.0), Context())
    assert result is model and not record.modified
    assert record.params_after == record.params_before


def test_min_channels_and_rounding():
    the_plan = prune.plan(pg.conv_net(), prune.Config(ratio=0.3))
    for g in the_plan.groups:
        if g.prunable:
            assert len(the_plan.removed.get(g.id, [])) == int(0.3 * g.size)


def test_sparsity_zeroes_weights_without_resizing():
    model = pg.transformer()
    pruned, record = prune.run(model, prune.Config(ratio=0.0, sparsity=0.5), Context())
    assert record.modified
    w = next(onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name == "l0.q.w")
    assert w.shape == (16, 16) and 0.45 < (w == 0).mean() < 0.55


def test_config_validation_and_recipe():
    assert prune.Config.from_short("0.3").ratio == 0.3
    assert prune.Config.from_short(None) == prune.Config()
    for bad in ("1.0", "-0.1", "x"):
        with pytest.raises(ValueError):
            prune.Config.from_short(bad)
    with pytest.raises(ValueError):
        prune.Config(ffn=1.5)
    with pytest.raises(ValueError):
        prune.Config(importance="random")
    with pytest.raises(ValueError):
        prune.Config(ranking="globl")
    assert dataclasses.is_dataclass(prune.Config)
    step = parse_recipe("prune:0.25")[0]
    assert step.config.ratio == 0.25


def test_prunable_groups_summary():
    summaries = prune.prunable_groups(pg.transformer())
    assert {s.kind for s in summaries} == {"heads", "ffn"}
    assert all(s.prunable and s.size for s in summaries)


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["ppocr-det", "ppocr-rec"])
def test_ppocr_conv_channels_exact(name):
    pytest.importorskip("onnxcomp.zoo.ppocr")
    from onnxcomp import zoo
    from onnxcomp.model import load

    model = load(zoo.fetch(name))
    the_plan = prune.plan(model, prune.Config(ratio=0.3))
    assert sum(1 for g in the_plan.groups if g.prunable and g.kind == "conv") >= 10
    pruned, _ = prune.apply(model, the_plan)
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
    the_plan = prune.plan(model, prune.Config(ratio=0.5))
    kinds = {g.kind for g in the_plan.groups if g.id in the_plan.removed}
    assert {"heads", "ffn"} <= kinds
    pruned, _ = prune.apply(model, the_plan)
    zeroed = prune.zero_out(model, the_plan)
    batch = zoo.dataset("tiny-clip", "eval", 1).make_batch(0)
    ref, got = runtime.run_model(zeroed, batch), runtime.run_model(pruned, batch)
    for key in ref:
        assert np.abs(ref[key] - got[key]).max() < EXACT * max(1, np.abs(ref[key]).max())
