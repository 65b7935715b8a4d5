"""distill with method = "kd" through the pass (plan rows, apply, the recipe forms); the training
loop itself is tested in tests/train."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_mlp

from onnxcomp import calibration
from onnxcomp.errors import UserError
from onnxcomp.measure.compare import compare
from onnxcomp.model import Model
from onnxcomp.passes import distill
from onnxcomp.pipeline import Context, LayerChange, PassRecord, Pipeline, Step
from onnxcomp.recipe import parse_recipe

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


# Short runs (one data batch of 32 a step): the loop's convergence is tested in tests/train.
KD = distill.Config(method="kd", steps=60, batch=0)


def _changed(*changes: LayerChange, name: str = "lowrank") -> PassRecord:
    return PassRecord(name, modified=True, changes=list(changes))


def _kd_setup():
    pytest.importorskip("torch")
    teacher = make_mlp()
    data = calibration.random_data(teacher, 8, dims={"batch": 32}, seed=1)
    held_out = calibration.random_data(teacher, 3, dims={"batch": 32}, seed=2)
    ctx = Context(calibration=data, evaluation=held_out, teacher=teacher)
    return teacher, ctx


def _blanked(model: Model) -> bytes:
    proto = model.copy().proto
    for tensor in proto.graph.initializer:
        tensor.ClearField("raw_data")
        tensor.ClearField("float_data")
    return proto.SerializeToString()


def test_kd_trains_only_initializer_values_and_reports_the_gain():
    teacher, ctx = _kd_setup()
    steps = parse_recipe("prune:0.5") + [Step(distill.PASS, KD)]
    out, records = Pipeline(steps).run(teacher, ctx)
    pruned_model, _ = Pipeline(parse_recipe("prune:0.5")).run(teacher, Context(
        calibration=ctx.calibration, teacher=teacher))
    kd_record = records[-1]
    figures = kd_record.details["kd"]
    assert figures["held_out"] and figures["seconds"] > 0
    assert kd_record.modified and figures["cosine_after"] > figures["cosine_before"]
    assert any("held-out output cosine" in note for note in kd_record.notes)
    assert _blanked(out) == _blanked(pruned_model)  # graph unchanged, only values
    assert set(kd_record.touched) <= {n.name for n in out.graph.node}


def test_kd_with_nothing_changed_before_does_nothing():
    teacher, ctx = _kd_setup()
    out, record = distill.PASS.run(teacher, distill.Config(method="kd", steps=5), ctx)
    assert not record.modified and out is teacher
    assert any("nothing to distill" in note for note in record.notes)


def test_kd_dry_run_lists_trainable_layers_and_refuses_unsupported_ops_at_apply():
    teacher, ctx = _kd_setup()
    ctx.records.append(_changed(LayerChange("fc2", "prune", "y")))
    before = teacher.proto.SerializeToString()
    plan = distill.PASS.plan(teacher, distill.Config(method="kd"), ctx)
    assert teacher.proto.SerializeToString() == before
    assert [r.node for r in plan.actions()] == ["fc1", "fc1_bias", "fc2"]
    assert "train 1 weight(s), 128 values" in plan.actions()[0].action
    odd = teacher.copy()
    odd.graph.node[2].op_type = "NotAnOp"  # the Relu
    plan = distill.PASS.plan(odd, distill.Config(method="kd"), ctx)
    assert ("NotAnOp", "skip") in [(r.node, r.action) for r in plan.rows]
    with pytest.raises(UserError, match="NotAnOp"):
        distill.PASS.apply(odd, plan, ctx)


def test_kd_after_refit_trains_on_from_the_refit_result():
    # prune, distill (refit), distill:kd: the second distill step sees the earlier passes'
    # changes (prune's; refit adds none) and trains every float weight of the refit student.
    teacher, ctx = _kd_setup()
    steps = parse_recipe("prune:0.5,distill") + [Step(distill.PASS, KD)]
    out, records = Pipeline(steps).run(teacher, ctx)
    refit_record, kd_record = records[-2], records[-1]
    assert [r.name for r in records] == ["prune", "distill", "distill"]
    assert refit_record.modified and "output_cosine" in refit_record.details
    figures = kd_record.details["kd"]
    # kd starts where refit ended: its input is the refit model, scored on the held-out data.
    refit_only, _ = Pipeline(parse_recipe("prune:0.5,distill")).run(teacher, Context(
        calibration=ctx.calibration, evaluation=ctx.evaluation, teacher=teacher))
    start = compare(teacher, refit_only, [], ctx.evaluation, len(ctx.evaluation)).min_cosine
    assert figures["cosine_before"] == pytest.approx(start, abs=1e-4)
    if kd_record.modified:
        assert figures["cosine_after"] > figures["cosine_before"]
    else:  # no gain on the held-out data: the refit result is kept as it was
        assert out.proto.SerializeToString() == refit_only.proto.SerializeToString()


def test_the_evaluation_schedule_is_set_from_the_recipe():
    """eval_every / eval_batches / patience reach the training loop (``--set distill.patience=6``)."""
    from onnxcomp.passes.distill import kd as distill_kd
    from onnxcomp.recipe import config_from_table

    config = config_from_table("distill", {"method": "kd", "eval_every": "25",
                                           "eval_batches": "64", "patience": "6"})
    options = distill_kd.options(config)
    assert (options.eval_every, options.eval_batches, options.patience) == (25, 64, 6)
    with pytest.raises(ValueError, match="patience"):
        distill.Config(patience=0)


def _recording(data: calibration.Dataset, read: set[int]) -> calibration.Dataset:
    """``data`` whose batches say which indices were made, growable like a zoo generator's."""
    base = data.make_batch

    def make(index: int):
        read.add(index)
        return base(index % len(data))

    return calibration.Dataset(data.name, data.count, make,
                               grow=lambda more: _recording(calibration.Dataset(
                                   f"{data.name}+", more, base), read))


def test_train_batches_draws_more_from_a_growable_source_than_the_earlier_passes_read():
    teacher, ctx = _kd_setup()
    read: set[int] = set()
    ctx.calibration = _recording(ctx.calibration, read)  # 8 batches
    ctx.records.append(_changed(LayerChange("fc2", "prune", "y")))
    config = distill.Config(method="kd", steps=30, batch=0, train_batches=24)
    _, record = distill.PASS.run(teacher, config, ctx)
    assert max(read) >= 8 and len(read) > 8  # batches past the calibration set
    assert any("kd: trained on 24 batches" in n and "planned on 8" in n for n in record.notes)


def test_train_batches_says_when_the_source_cannot_grow():
    notes: list[str] = []
    data = calibration.from_batches([{"x": 0}] * 4, name="folder")
    assert distill.kd.training_data(data, 10, notes) is data
    assert "cannot draw more" in notes[0] and "has 4 batches" in notes[0]
    assert len(distill.kd.training_data(data, 2, [])) == 2
    assert distill.kd.training_data(data, None, []) is data
    with pytest.raises(ValueError, match="train_batches"):
        distill.Config(train_batches=0)


def test_zoo_sources_grow_into_the_same_split():
    from onnxcomp import zoo

    small = zoo.dataset("tiny-clip", "calib", 2)
    grown = small.grow(5)
    assert len(grown) == 5 and grown.zoo_name == "tiny-clip"
    for index in range(2):  # the first batches are the calibration set's
        for name, value in small.make_batch(index).items():
            assert (grown.make_batch(index)[name] == value).all()


def test_train_data_is_what_kd_trains_on_and_never_the_split_eval_scores(tmp_path):
    teacher, ctx = _kd_setup()
    folder = tmp_path / "train"
    folder.mkdir()
    for index in range(5):
        batch = calibration.random_data(teacher, 1, dims={"batch": 32}, seed=10 + index)
        np.savez(folder / f"{index}.npz", **batch.make_batch(0))
    config = distill.Config(method="kd", steps=20, batch=0, train_data=str(folder))
    source = distill.kd.training_source(config, ctx)
    assert len(source) == 5 and source is not ctx.calibration
    plan = distill.PASS.plan(teacher, config, ctx)
    assert any("trains on" in note and str(folder) in note for note in plan.notes)
    ctx.records.append(_changed(LayerChange("fc2", "prune", "y")))
    _, record = distill.PASS.run(teacher, config, ctx)
    assert record.details["kd"]["train_batches"] == 5
    assert record.details["kd"]["train_data"] == source.name
    with pytest.raises(UserError, match="neither a folder"):
        distill.kd.training_source(distill.Config(method="kd", train_data="nowhere"), ctx)
    with pytest.raises(ValueError, match="train_data"):
        distill.Config(method="kd", train_data=" ")


def test_train_data_refuses_the_evaluation_split_and_notes_other_held_out_splits():
    from onnxcomp import zoo

    teacher = make_mlp()
    ctx = Context(calibration=None, evaluation=zoo.dataset("ppocr-rec", "eval", 2),
                  teacher=teacher)
    with pytest.raises(UserError, match="the split --eval scores"):
        distill.kd.training_source(distill.Config(method="kd", train_data="ppocr-rec:eval:8"),
                                   ctx)
    plan = distill.PASS.plan(teacher, distill.Config(method="kd", train_data="ppocr-rec:hard:8"),
                             ctx)
    assert any("held-out split" in note for note in plan.notes)
