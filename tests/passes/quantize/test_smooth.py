"""SmoothQuant scale migration: float-exact in ONNX Runtime, and through the pass."""

from __future__ import annotations

import builders
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


def test_a_layer_norm_output_others_read_is_smoothed_through_a_mul():
    """Post-LN transformers (MiniLM): the residual Add reads LN(x) too, so 1/s cannot go into
    gamma/beta; the MatMuls read LN(x) * (1/s) through one Mul, the Add still reads LN(x)."""
    from onnx import TensorProto, helper

    from onnxcomp.model import Model

    base = matmul_model(ln=True).proto
    graph = base.graph
    graph.node.append(helper.make_node("Add", ["h", "x"], ["r"], name="residual"))
    graph.output.append(helper.make_tensor_value_info("r", TensorProto.FLOAT, [2, 5, 72]))
    model = Model(base)
    gs_graph = import_graph(model)
    sites = quantize_smooth.find_sites(gs_graph, {"mm1", "mm2"})
    assert len(sites) == 1 and sites[0].shared
    absmax = {sites[0].output: np.random.default_rng(4).random(72) * 10 + 0.1}
    assert quantize_smooth.apply(gs_graph, sites, absmax, 0.5) == ["ln"]
    smoothed = export_model(tidy(gs_graph), like=model)
    ops = [n.op_type for n in smoothed.proto.graph.node]
    assert ops.count("Mul") == 1
    norm = next(n for n in smoothed.proto.graph.node if n.op_type == "LayerNormalization")
    assert list(norm.input[1:]) == ["gamma", "beta"]  # untouched: the Add reads LN(x)
    batch = next(iter(data_for(model)))
    diff = runtime.max_abs_difference(model, smoothed, batch)
    assert max(diff.values()) < 1e-4


def _outlier_ln_model():
    """``matmul_model(ln=True)`` with three LayerNorm channels 40x the others (the few large
    channels of a transformer's normalized activations)."""
    from onnx import numpy_helper

    model = matmul_model(ln=True)
    for tensor in model.proto.graph.initializer:
        if tensor.name == "gamma":
            gamma = numpy_helper.to_array(tensor).copy()
            gamma[:3] *= 40
            tensor.CopyFrom(numpy_helper.from_array(gamma, "gamma"))
    return model


def _rel_error(reference, candidate, data) -> float:
    from quantize_graphs import rel_l2

    batch = next(iter(data))
    want, got = (runtime.run_model(m, batch, optimize=True) for m in (reference, candidate))
    return max(rel_l2(want[k], got[k]) for k in want)


def test_int8_dynamic_smooths_by_default_with_calibration_data_and_is_more_faithful():
    model = _outlier_ln_model()
    data = data_for(model, count=8)
    smoothed, record = run(model, quantize.Config(mode="int8-dynamic"), Context(calibration=data))
    assert any(note.startswith("smoothquant (alpha auto: ") and "on 1 LayerNormalization" in
               note for note in record.notes)
    plain, off = run(model, quantize.Config(mode="int8-dynamic", dynamic_smoothquant=False),
                     Context(calibration=data))
    assert not any("smoothquant" in note.lower() for note in off.notes)
    held_out = data_for(model, count=1, scale=1.5)
    assert _rel_error(model, smoothed, held_out) < 0.5 * _rel_error(model, plain, held_out)


def test_static_int8_smooths_transformers_by_default_and_is_more_faithful():
    model = _outlier_ln_model()
    data = data_for(model, count=8)
    smoothed, record = run(model, quantize.Config(), Context(calibration=data))
    assert any(note.startswith("smoothquant (alpha auto: ") for note in record.notes)
    plain, off = run(model, quantize.Config(static_smoothquant=False), Context(calibration=data))
    assert not any("smoothquant" in note.lower() for note in off.notes)
    held_out = data_for(model, count=1, scale=1.5)
    assert _rel_error(model, smoothed, held_out) < _rel_error(model, plain, held_out)
    # No LayerNormalization-fed MatMul (a conv net, a plain MLP): nothing done, nothing said.
    _, conv = run(builders.conv_net(), quantize.Config(),
                  Context(calibration=data_for(builders.conv_net())))
    assert not any("smoothquant" in note.lower() for note in conv.notes)


def test_int8_dynamic_without_calibration_says_smoothquant_was_not_applied():
    model = _outlier_ln_model()
    assert not quantize.PASS.capabilities.needs_calibration(quantize.Config(mode="int8-dynamic"))
    _, record = run(model, quantize.Config(mode="int8-dynamic"), Context())
    assert any("needs calibration data (--calib): not applied" in n for n in record.notes)
    # Nothing for it to act on: no note either way.
    _, plain = run(matmul_model(), quantize.Config(mode="int8-dynamic"), Context())
    assert not any("smoothquant" in note.lower() for note in plain.notes)
    _, with_data = run(matmul_model(), quantize.Config(mode="int8-dynamic"),
                       Context(calibration=data_for(matmul_model())))
    assert not any("smoothquant" in note.lower() for note in with_data.notes)


def test_smoothing_every_matmul_input_goes_through_one_mul_and_is_exact_in_float():
    """``smoothquant_inputs = "all"``: a MatMul input that is no LayerNormalization output (a
    GELU output before an FFN down-projection) is smoothed through one Mul for all its
    MatMul readers; float-exact."""
    model = matmul_model()  # x -> MatMul W, x -> MatMul W2: no LayerNormalization
    graph = import_graph(model)
    assert quantize_smooth.find_sites(graph, {"mm1", "mm2"}) == []
    (site,) = quantize_smooth.find_sites(graph, {"mm1", "mm2"}, "all")
    assert site.output == "x" and set(site.matmuls) == {"mm1", "mm2"} and site.shared
    absmax = {"x": np.random.default_rng(4).random(72) * 10 + 0.1}
    quantize_smooth.apply(graph, [site], absmax, 0.5)
    smoothed = export_model(tidy(graph), like=model)
    assert [n.op_type for n in smoothed.proto.graph.node].count("Mul") == 1
    batch = next(iter(data_for(model)))
    assert max(runtime.max_abs_difference(model, smoothed, batch).values()) < 1e-4
    _, record = run(model, quantize.Config(smoothquant_alpha=0.5, smoothquant_inputs="all"),
                    Context(calibration=data_for(model)))
    assert any(note.startswith("smoothquant (alpha 0.5) on 0 LayerNormalization outputs and 1 "
                               "other MatMul inputs") for note in record.notes)


def test_all_inputs_smooth_the_layer_norm_output_and_the_rest_once_each():
    model = _outlier_ln_model()
    _, record = run(model, quantize.Config(mode="int8-dynamic", smoothquant_alpha=0.5,
                                           smoothquant_inputs="all"),
                    Context(calibration=data_for(model)))
    # The LN output is the only MatMul input: folded into gamma/beta, nothing else to smooth.
    assert any(note == "smoothquant (alpha 0.5) on 1 LayerNormalization outputs"
               for note in record.notes)


def test_auto_alpha_picks_the_grid_point_with_the_least_quantized_error():
    rng = np.random.default_rng(7)
    rows = rng.standard_normal((512, 64)).astype(np.float32)
    rows[:, :3] *= 60  # a transformer's few large channels
    weights = [rng.standard_normal((64, 32)).astype(np.float32) * 0.1]
    absmax = np.abs(rows).max(axis=0).astype(np.float64)
    alpha, errors = quantize_smooth.choose_alpha(rows, absmax, weights)
    assert set(errors) == {None, *quantize_smooth.ALPHA_GRID}  # None: unsmoothed
    assert errors[alpha] == min(errors.values())
    # Unsmoothed (every scale 1), the outlier channels take the activation range.
    x = rows.astype(np.float64)
    plain = quantize_smooth._fake_quant_rows(x) @ quantize_smooth._fake_quant_columns(
        weights[0].astype(np.float64))
    want = x @ weights[0]
    plain_error = float(np.linalg.norm(want - plain) / np.linalg.norm(want))
    assert errors[alpha] < 0.5 * plain_error


def test_auto_alpha_through_the_pass_says_what_it_chose_and_beats_no_smoothing():
    model = _outlier_ln_model()
    data = data_for(model, count=8)
    auto, record = run(model, quantize.Config(mode="int8-dynamic", smoothquant_alpha="auto"),
                       Context(calibration=data))
    assert any(note.startswith("smoothquant (alpha auto: ") for note in record.notes)
    plain, _ = run(model, quantize.Config(mode="int8-dynamic", dynamic_smoothquant=False),
                   Context(calibration=data))
    held_out = data_for(model, count=1, scale=1.5)
    assert _rel_error(model, auto, held_out) < 0.5 * _rel_error(model, plain, held_out)
    with pytest.raises(ValueError, match="auto"):
        quantize.Config(smoothquant_alpha="sometimes")


def test_auto_alpha_leaves_a_tensor_alone_when_smoothing_does_not_pay():
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((256, 16)).astype(np.float32)
    weights = [np.ones((16, 8), np.float32)]  # every row alike: nothing to rebalance
    absmax = np.ones(16)  # and every channel alike
    alpha, errors = quantize_smooth.choose_alpha(rows, absmax, weights)
    assert alpha is None and min(errors.values()) > (1 - quantize_smooth.MIN_GAIN) * errors[None]


def test_auto_alpha_on_a_model_whose_weights_stay_on_disk_matches_the_eager_run(tmp_path,
                                                                               monkeypatch):
    """A model whose weights stay on disk streams its rows a segment at a time; the alphas
    come out the same as when the whole model is in memory."""
    import onnx

    from onnxcomp import api

    eager = _outlier_ln_model()
    path = tmp_path / "ln.onnx"
    on_disk = onnx.ModelProto()
    on_disk.CopyFrom(eager.proto)  # onnx.save moves the weights of the proto it is given out
    onnx.save(on_disk, str(path), save_as_external_data=True, location="ln.onnx.data",
              size_threshold=0)
    data = data_for(eager, count=4)
    from onnxcomp import calibration

    streamed, stream = [], calibration.stream_activations

    def spy(model, names, data, on_batch, progress=None, per_segment=None):
        if "_auto_alphas" in on_batch.__qualname__:  # the rows the alphas are chosen on
            streamed.append(per_segment)
        return stream(model, names, data, on_batch, progress, per_segment)

    monkeypatch.setattr(calibration, "stream_activations", spy)
    sets = ["quantize.smoothquant_alpha=auto", "quantize.smoothquant_inputs=all"]
    notes = []
    for model in (path, eager):
        result = api.compress(model, recipe="quantize:int8-dynamic", calib=data, overrides=sets,
                              validate=False, show_progress=False)
        notes.append([n for record in result.report.passes for n in record.notes
                      if n.startswith("smoothquant")])
    assert result.model is not None and notes[0] and notes[0] == notes[1]
    assert len(streamed) == 2 and streamed[0] is not None and streamed[1] is None
