"""prune as a pass: the plan (one row per group), apply through the Pipeline, negatives,
idempotence, the LayerChange hand-over to distill, configuration and recipes."""

from __future__ import annotations

import dataclasses

import numpy as np
import onnx
import prune_graphs as pg
import pytest

from onnxcomp import calibration, runtime
from onnxcomp.errors import UserError
from onnxcomp.passes import prune
from onnxcomp.pipeline import SKIP, Context
from onnxcomp.recipe import apply_overrides, parse_recipe

EXACT = 1e-4


def _feeds(model, seed: int = 0) -> dict[str, np.ndarray]:
    return calibration.random_data(model, 1, seed=seed).make_batch(0)


def _weight_shapes(model) -> dict[str, tuple]:
    return {t.name: tuple(t.dims) for t in model.graph.initializer}


# --- the plan -----------------------------------------------------------------------------------

def test_dry_run_one_row_per_group_and_no_mutation():
    model = pg.transformer()
    before = model.proto.SerializeToString()
    plan = prune.PASS.plan(model, prune.Config(ratio=0.5), Context())
    assert model.proto.SerializeToString() == before
    groups = plan.payload.groups
    assert len(plan.rows) == len(groups)
    for row, g in zip(plan.rows, groups):
        assert row.node == g.label()
        if not g.prunable:
            assert row.action == SKIP and row.reason == g.reason
    actions = [row.action for row in plan.actions()]
    assert actions.count("cut 2 of 4 heads") == 2
    assert actions.count("cut 16 of 32 neurons (ffn)") == 2
    assert "cut 2 of 4 heads" in plan.table()


def test_conv_rows_and_why_a_prunable_group_is_kept():
    plan = prune.PASS.plan(pg.conv_net(), prune.Config(ratio=0.3), Context())
    rows = {row.node: row for row in plan.rows}
    assert rows["group 0 (conv: conv1, bn1, conv2)"].action == "cut 2 of 8 channels (conv)"
    kept = rows["group 2 (conv: conv4, conv5)"]
    assert kept.action == SKIP and "removes none" in kept.reason
    only_heads = prune.PASS.plan(pg.conv_net(), prune.Config(ratio=0.0, heads=0.5), Context())
    assert not only_heads.actions() and "heads: nothing to prune" in only_heads.notes
    assert any(row.reason == "ratio for conv groups is 0" for row in only_heads.rows)


def test_sparsity_rows():
    plan = prune.PASS.plan(pg.transformer(layers=1), prune.Config(ratio=0.0, sparsity=0.5),
                           Context())
    sparse = [row.node for row in plan.actions()]
    assert sparse == ["l0.q", "l0.k", "l0.v", "l0.o", "l0.fc1", "l0.fc2"]


# --- apply through the Pipeline -----------------------------------------------------------------

def test_run_structure_and_numerics_against_the_zeroed_model():
    model = pg.conv_net()
    ctx = Context()
    pruned, record = prune.PASS.run(model, prune.Config(ratio=0.5), ctx)
    assert record.modified and record.params_after < record.params_before
    assert record.bytes_after < record.bytes_before
    assert {"conv1", "bn1", "conv2", "dw3", "split4"} <= set(record.touched)
    assert any("groups pruned" in note for note in record.notes)
    onnx.checker.check_model(pruned.proto, full_check=True)
    # numerically: the pruned model is the original with the same channels zeroed
    zeroed = prune.zero_out(model, prune.PASS.plan(model, prune.Config(ratio=0.5), ctx).payload)
    for seed in (0, 1):
        feeds = _feeds(model, seed)
        ref, got = runtime.run_model(zeroed, feeds), runtime.run_model(pruned, feeds)
        assert np.abs(ref["y"] - got["y"]).max() < EXACT * max(1, np.abs(ref["y"]).max())


def test_unfollowable_group_left_alone():
    model = pg.unfollowable()
    pruned, record = prune.PASS.run(model, prune.Config(ratio=0.5), Context())
    assert record.modified
    assert any("CumSum" in reason for _, reason in record.skipped)
    shapes = _weight_shapes(pruned)
    assert shapes["conv1.w"] == (6, 3, 3, 3)  # before the unknown op: untouched
    assert shapes["conv2.w"] == (4, 6, 3, 3) and shapes["conv3.w"] == (2, 4, 1, 1)
    assert np.isfinite(runtime.run_model(pruned, _feeds(model))["y"]).all()


def test_transformer_runs_in_ort_with_its_optimizations():
    model = pg.transformer()
    pruned, _ = prune.PASS.run(model, prune.Config(ratio=0.5), Context())
    sess = runtime.session(pruned)  # ORT with its own optimizations accepts it too
    assert sess.run(None, _feeds(model))[0].shape == (1, 6, 16)


def test_sparsity_zeroes_weights_without_resizing():
    model = pg.transformer()
    pruned, record = prune.PASS.run(model, prune.Config(ratio=0.0, sparsity=0.5), Context())
    assert record.modified
    w = next(onnx.numpy_helper.to_array(t) for t in pruned.graph.initializer if t.name == "l0.q.w")
    assert w.shape == (16, 16) and 0.45 < (w == 0).mean() < 0.55


# --- the hand-over to distill -------------------------------------------------------------------

def test_layer_changes_for_distill():
    model = pg.transformer()
    ctx = Context()
    _, record = prune.PASS.run(model, prune.Config(ratio=0.5), ctx)
    assert [(c.node, c.pass_name, c.teacher_output, c.repair, c.teacher_channels, c.nodes)
            for c in record.changes] == [
        ("l0.o", "prune", "l0.o", "refit", None, ()),
        ("l0.fc2", "prune", "l0.fc2", "refit", None, ()),
        ("l1.o", "prune", "l1.o", "refit", None, ()),
        ("l1.fc2", "prune", "l1.fc2", "refit", None, ())]
    assert ctx.changes() == record.changes
    # details are for the report only
    ffn = next(g for g in record.details["groups"] if g["kind"] == "ffn")
    assert len(ffn["kept"]) == 16 and ffn["consumers"] == [{"node": "l0.fc2", "output": "l0.fc2"}]


def test_a_layer_whose_own_outputs_were_cut_names_the_kept_teacher_channels():
    model = pg.conv_net()
    plan = prune.PASS.plan(model, prune.Config(ratio=0.5), Context())
    _, record = prune.PASS.run(model, prune.Config(ratio=0.5), Context())
    changes = {c.node: c for c in record.changes}
    # conv2 reads the residual channels and, through the Add, produces them too
    residual = next(g for g in plan.payload.groups if "conv2" in g.nodes and g.prunable)
    assert changes["conv2"].teacher_channels == tuple(plan.payload.kept(residual))
    assert changes["conv2"].teacher_output == "conv2"
    # the head's outputs (the graph output) are never cut
    assert changes["head"].teacher_channels is None and changes["head"].teacher_output == "y"
    assert set(changes) == {"conv2", "conv4", "conv5", "conv6", "head", "se1", "se2", "up7"}
    teacher = {o for n in model.graph.node for o in n.output}
    assert all(c.teacher_output in teacher and c.repair == "refit" for c in record.changes)


# --- negatives and idempotence ------------------------------------------------------------------

def test_nothing_prunable_is_a_note_not_an_error():
    model = pg.single_conv()
    result, record = prune.PASS.run(model, prune.Config(ratio=0.5), Context())
    assert result is model and not record.modified and not record.changes
    assert any("nothing to prune" in note for note in record.notes)
    _, record = prune.PASS.run(pg.conv_net(), prune.Config(ratio=0.3, heads=0.5), Context())
    assert "heads: nothing to prune" in record.notes


def test_ratio_zero_is_identity():
    model = pg.conv_net()
    result, record = prune.PASS.run(model, prune.Config(ratio=0.0), Context())
    assert result is model and not record.modified
    assert record.params_after == record.params_before


def test_sparsity_with_nothing_to_zero_is_not_a_change():
    model = pg.single_conv()  # 4x3x3x3 = 108 weights: 0.001 of them rounds to none
    result, record = prune.PASS.run(model, prune.Config(ratio=0.0, sparsity=0.001), Context())
    assert result is model and not record.modified


def test_pruned_to_the_floor_a_second_run_has_nothing_to_do():
    model = pg.conv_net()
    config = prune.Config(ratio=0.99)  # every group down to min_channels
    once, first = prune.PASS.run(model, config, Context())
    twice, second = prune.PASS.run(once, config, Context())
    assert first.modified and not second.modified and twice is once


def test_plan_is_deterministic():
    model = pg.transformer()
    config = prune.Config(ratio=0.3, ranking="global")
    first = prune.PASS.plan(model, config, Context())
    second = prune.PASS.plan(model, config, Context())
    assert first.payload.removed == second.payload.removed and first.rows == second.rows


# --- configuration ------------------------------------------------------------------------------

def test_config_validation_and_recipe():
    assert prune.Config.from_short("0.3").ratio == 0.3
    assert prune.Config.from_short(None) == prune.Config()
    for bad in ("1.0", "-0.1", "x"):
        with pytest.raises(ValueError):
            prune.Config.from_short(bad)
    with pytest.raises(ValueError, match="ffn"):
        prune.Config(ffn=1.5)
    with pytest.raises(ValueError, match="importance"):
        prune.Config(importance="random")
    with pytest.raises(ValueError, match="ranking"):
        prune.Config(ranking="globl")
    with pytest.raises(ValueError, match="multiple"):
        prune.Config(multiple=0)
    assert dataclasses.is_dataclass(prune.Config)
    step = parse_recipe("prune:0.25")[0]
    assert step.config.ratio == 0.25
    with pytest.raises(UserError, match="ratio"):
        parse_recipe("prune:1.5")
    [step] = apply_overrides(parse_recipe("prune:0.3"), ["prune.heads=0.25",
                                                         "prune.importance=l1"])
    assert (step.config.heads, step.config.importance) == (0.25, "l1")


def test_activation_importance_without_data_is_refused_before_any_work():
    with pytest.raises(UserError, match="calibration"):
        prune.PASS.run(pg.conv_net(), prune.Config(importance="activation"), Context())
    # auto falls back to weight norms without data
    plan = prune.PASS.plan(pg.conv_net(), prune.Config(), Context())
    assert plan.payload.importance == "l2"
