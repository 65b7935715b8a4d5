"""Per-layer SQNR and mixed precision for the int8 modes: the layers most harmful on their own
return to float until ``min_cosine`` is met; a choice tuned on --eval data says so."""

from __future__ import annotations

from quantize_graphs import conv_mlp, data_for

from onnxcomp.passes import quantize
from onnxcomp.pipeline import Context, LayerChange

run = quantize.PASS.run


def test_min_cosine_keeps_worst_layers_float():
    model = conv_mlp()
    data = data_for(model)
    _, plain = run(model, quantize.Config(), Context(calibration=data))
    target = (1 + plain.details["output_cosine"]["y"]) / 2  # halfway to perfect
    _, record = run(model, quantize.Config(min_cosine=target), Context(calibration=data))
    kept = record.details["kept_float"]
    # Layers return to float in order of their own harm: the output cosine with only that
    # layer quantized, lowest first, measured for every quantized layer.
    sensitivity = record.details["sensitivity"]
    alone = [entry["output_cosine_alone"] for entry in sensitivity]
    assert alone == sorted(alone) and len(sensitivity) == len(plain.touched)
    assert kept and kept == [entry["node"] for entry in sensitivity[:len(kept)]]
    assert record.details["output_cosine_after"] >= target
    assert set(kept).isdisjoint(record.touched)
    assert any("kept float" in reason for _, reason in record.skipped)
    # The layers kept float are no change handed to later passes.
    assert {c.node for c in record.changes} == set(record.touched)
    assert all(isinstance(c, LayerChange) for c in record.changes)


def test_a_choice_tuned_on_eval_data_is_flagged():
    model = conv_mlp()
    data, held_out = data_for(model), data_for(model, 3, scale=1.5)
    ctx = Context(calibration=data, evaluation=held_out)
    _, record = run(model, quantize.Config(min_cosine=0.999999), ctx)
    assert record.details["kept_float"] and ctx.tuned_on_evaluation == ["quantize"]
    ctx = Context(calibration=data, evaluation=held_out)
    run(model, quantize.Config(), ctx)  # no target: nothing tuned
    assert ctx.tuned_on_evaluation == []


def test_every_layer_float_is_not_a_modification():
    model = conv_mlp()
    ctx = Context(calibration=data_for(model))
    result, record = run(model, quantize.Config(min_cosine=1.0), ctx)
    assert not record.modified and result is model and not record.changes
    assert any("not reached" in note or "kept float" in note for note in record.notes)
