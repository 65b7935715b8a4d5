"""int4 mixed precision: 8-bit MatMulNBits blocks for the most sensitive layer groups."""

from __future__ import annotations

import numpy as np
import pytest
from quantize_graphs import matmul_model

from onnxcomp import runtime
from onnxcomp.measure.validate import validate
from onnxcomp.model import load
from onnxcomp.passes import quantize
from onnxcomp.passes.quantize import int4 as quantize_int4
from onnxcomp.passes.quantize import mixed as quantize_mixed
from onnxcomp.pipeline import Context
from onnxcomp.zoo.llama import PRESETS, build, prompts

run = quantize.PASS.run


def test_8bit_blocks_run_exactly_in_onnx_runtime():
    model = matmul_model(k=72, n=24)
    int4, _ = run(model, quantize.Config(mode="int4"), Context())
    weight = quantize_mixed.float_weight(model, "mm1")
    before = int4.proto.SerializeToString()
    upgraded = int4.copy()
    undo = quantize_mixed.upgrade(upgraded, ["mm1"], lambda name: weight)
    node = next(n for n in upgraded.graph.node if n.name == "mm1")
    assert {a.name: a.i for a in node.attribute}["bits"] == 8
    blocks = quantize_int4.quantize_blocks8(weight, 32)
    restored = blocks.dequantize()
    assert np.abs(restored - weight).max() <= np.abs(weight).max() / 127 / 2 + 1e-6
    x = np.random.default_rng(1).standard_normal((2, 5, 72)).astype(np.float32)
    got = runtime.run(runtime.session(upgraded, optimize=False), {"x": x})["y"]
    np.testing.assert_allclose(got, x @ restored, rtol=1e-4, atol=1e-4)
    # 8-bit is far closer to float than 4-bit, at about twice the weight bytes.
    want = runtime.run(runtime.session(model, optimize=False), {"x": x})["y"]
    four = runtime.run(runtime.session(int4, optimize=False), {"x": x})["y"]
    assert np.abs(got - want).max() < 0.1 * np.abs(four - want).max()
    assert quantize_mixed.added_bytes(int4, ["mm1"]) == 24 * 3 * 32 // 2
    # A trial is undone exactly.
    quantize_mixed.restore(upgraded, undo)
    assert upgraded.proto.SerializeToString() == before


def test_groups_are_layer_roles():
    grouped = quantize_mixed.groups(["layers.0.q", "layers.1.q", "layers.10.down", "lm_head"])
    assert grouped == {"layers.#.q": ["layers.0.q", "layers.1.q"],
                       "layers.#.down": ["layers.10.down"], "lm_head": ["lm_head"]}
    scores = [quantize_mixed.GroupScore("a", ["a"], 0.9, 0.01, 1_000_000),
              quantize_mixed.GroupScore("b", ["b"], 0.9, 0.01, 100_000),
              quantize_mixed.GroupScore("c", ["c"], 0.9, -0.01, 1)]
    assert [s.group for s in quantize_mixed.order(scores)] == ["b", "a", "c"]
    assert quantize_mixed.first_guess(quantize_mixed.order(scores), 0.90, 0.915) == 2


@pytest.fixture(scope="module")
def small_llama(tmp_path_factory):
    return build(tmp_path_factory.mktemp("llama") / "small.onnx", PRESETS["small"])


def test_min_cosine_raises_sensitive_groups_to_8_bits(small_llama, tmp_path):
    model = load(small_llama, load_weights=False)
    calib = prompts(PRESETS["small"], 8, length=24, seed=5)
    plain, plain_record = run(model, quantize.Config(mode="int4"),
                                       Context(calibration=calib))
    before = plain_record.details["output_cosine"]
    target = round((1 + min(before.values())) / 2, 4)  # halfway to float
    mixed, record = run(model, quantize.Config(mode="int4", min_cosine=target),
                                 Context(calibration=calib))
    bits = {n.name: {a.name: a.i for a in n.attribute}["bits"] for n in mixed.graph.node
            if n.op_type == "MatMulNBits"}
    eight = sorted(n for n, b in bits.items() if b == 8)
    assert eight and sorted(record.details["int8_layers"]) == eight
    assert len(bits) == len(plain_record.touched) - 1  # every MatMul but the embedding Gather
    # Whole groups move: every layer of a chosen role, none of the others.
    chosen = {quantize_mixed.role(n) for n in eight}
    assert all((quantize_mixed.role(n) in chosen) == (b == 8) for n, b in bits.items())
    assert len(record.details["mixed_groups"]) == len(quantize_mixed.groups(list(bits)))
    # The target is met, as ONNX Runtime measures it on the same data, and the file stays far
    # below float.
    path = mixed.save(tmp_path / "mixed.onnx")
    report = validate(small_llama, path, data=calib, progress=None)
    assert min(o["cosine_mean"] for o in report.fidelity["outputs"].values()) >= target
    assert record.details["output_cosine_after"] >= target
    assert plain.weight_bytes() < mixed.weight_bytes() < 0.35 * load(small_llama).weight_bytes()


def test_min_cosine_already_met_changes_nothing(small_llama):
    model = load(small_llama, load_weights=False)
    calib = prompts(PRESETS["small"], 4, length=16, seed=5)
    result, record = run(model, quantize.Config(mode="int4", min_cosine=0.5),
                                  Context(calibration=calib))
    assert "int8_layers" not in record.details and "mixed_groups" not in record.details
    assert all({a.name: a.i for a in n.attribute}["bits"] == 4 for n in result.graph.node
               if n.op_type == "MatMulNBits")


def test_a_failed_upgrade_leaves_the_model_as_it_was():
    model = matmul_model(k=72, n=24)
    int4, _ = run(model, quantize.Config(mode="int4"), Context())
    before = int4.proto.SerializeToString()

    def weight_of(name):
        if name == "mm2":
            raise RuntimeError("weight unreadable")
        return quantize_mixed.float_weight(model, name)

    with pytest.raises(RuntimeError):
        quantize_mixed.upgrade(int4, ["mm1", "mm2"], weight_of)
    assert int4.proto.SerializeToString() == before


def test_a_weight_shared_by_two_paths_is_raised_once_for_both():
    """Side-by-side decoder paths (onnxcomp/decoders.py) share weights: one role per layer, one
    8-bit copy, and both readers switch to it."""
    from pipeline_builders import toy_parts

    from onnxcomp import calibration
    from onnxcomp.decoders import side_by_side
    from onnxcomp.model import Model
    from onnxcomp.passes import quantize
    from onnxcomp.passes.quantize.mixed import role
    from onnxcomp.pipeline import Context

    assert role("first//layers.3/fc1/MatMul") == role("with_past//layers.5/fc1/MatMul")
    parts = toy_parts()
    both = Model(side_by_side(parts["decoder"], parts["decoder_with_past"]))
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(4):
        hidden = rng.standard_normal((1, 5, 64)).astype(np.float32)
        batches.append({"first/input_ids": rng.integers(0, 128, (1, 3)),
                        "first/encoder_hidden_states": hidden,
                        "with_past/input_ids": rng.integers(0, 128, (1, 1)),
                        "with_past/past_key_values.0.key": rng.standard_normal(
                            (1, 1, 3, 64)).astype(np.float32),
                        "with_past/past_key_values.0.encoder.key": rng.standard_normal(
                            (1, 1, 1, 64)).astype(np.float32)})
    data = calibration.from_batches(batches)
    result, _ = quantize.PASS.run(both, quantize.Config(mode="int4", min_cosine=0.99999,
                                                             block_size=16),
                                       Context(calibration=data))
    nbits = [n for n in result.graph.node if n.op_type == "MatMulNBits"]
    raised = [n for n in nbits if any(a.name == "bits" and a.i == 8 for a in n.attribute)]
    assert raised, "the target needs some 8-bit layers"
    for node in nbits:  # each path reads the same tensors as its twin on the other path
        twin = next(n for n in nbits if n is not node and role(n.name) == role(node.name))
        assert list(twin.input[1:]) == list(node.input[1:])
    names = [t.name for t in result.graph.initializer]
    assert len(names) == len(set(names))
    assert len({n.input[1] for n in raised}) == len(raised) // 2
