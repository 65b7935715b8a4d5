"""Compressing a pipeline of parts: per-part recipes, tied weights compressed once,
validation by generation, atomic folder output (onnxcomp/parts_compress.py, cli_parts.py)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from pipeline_builders import toy_samples, write_toy_pipeline

from onnxcomp import calibration
from onnxcomp.errors import UserError
from onnxcomp.measure.generation import validate_generation
from onnxcomp.parts import generate, open_parts, tied_tensors
from onnxcomp.parts_compress import compress_parts, group_recipes, write_parts


def _data(seed: int, count: int = 3):
    return calibration.from_batches(toy_samples(count, seed=seed), name=f"toy{seed}")


def _compress(folder, out, recipe, **kwargs):
    result = compress_parts(folder, recipe, calib=_data(1), eval_data=_data(2), **kwargs)
    write_parts(open_parts(folder), result, out)
    return result, open_parts(out)


def _initializers(model: onnx.ModelProto) -> dict[str, bytes]:
    return {t.name: numpy_helper.to_array(t).tobytes() for t in model.graph.initializer}


def test_cleanup_round_trips_exactly(tmp_path):
    folder = write_toy_pipeline(tmp_path / "in", merged=True)
    result, out = _compress(folder, tmp_path / "out", "cleanup")
    reference = open_parts(folder)
    agreement = result.report.generation["agreement"]
    assert agreement["exact_sequence"] == 1.0 and agreement["logits_cosine_min"] > 0.999999
    for sample in toy_samples(3, seed=9):
        for merged in (False, True):
            a = generate(reference, sample, merged=merged)
            b = generate(out, sample, merged=merged)
            assert a.tokens == b.tokens
            np.testing.assert_array_equal(np.array(a.logits), np.array(b.logits))
    for part in reference.manifest.parts:
        assert _initializers(out.model(part.name)) == _initializers(reference.model(part.name))


@pytest.mark.parametrize("recipe", ["quantize:int4", "quantize:int8-dynamic"])
def test_tied_weights_are_compressed_once_and_stay_tied(tmp_path, recipe):
    folder = write_toy_pipeline(tmp_path / "in", merged=True)
    _, out = _compress(folder, tmp_path / "out", recipe)
    files = {p.name: out.model(p.name) for p in out.manifest.parts}
    decoders = ("decoder", "decoder_with_past")
    # every weight the two decoder files hold is byte-identical under the same name
    first, later = (_initializers(files[d]) for d in decoders)
    shared = set(first) & set(later)
    assert {"lm_head", "key.weight"} & shared == set()  # the float weights are gone ...
    assert all(first[n] == later[n] for n in shared)
    quantized = [n for n in shared if "int4" in n or "quantized" in n or "int8" in n]
    assert len(quantized) >= 2  # ... replaced by one quantized copy each, read by both files
    tied = tied_tensors(files, min_bytes=256)
    assert all({m[0] for m in t.members} >= set(decoders) for t in tied
               if t.members[0][0] in decoders)
    # the merged file stores each quantized weight once and runs both branches on it
    merged = files["decoder_merged"]
    names = [t.name for t in merged.graph.initializer]
    assert len(names) == len(set(names)) and set(quantized) <= set(names)
    for branch in (a.g for a in merged.graph.node[0].attribute):
        assert not branch.initializer
        ops = {n.op_type for n in branch.node}
        assert ops & {"MatMulNBits", "DynamicQuantizeLinear", "MatMulInteger",
                      "DequantizeLinear"}, ops
    # and the files still agree with each other
    for sample in toy_samples(2, seed=4):
        stepped = generate(out, sample)
        assert generate(out, sample, merged=True).tokens == stepped.tokens


def test_generation_agreement_is_one_for_a_copy_and_drops_for_a_perturbed_candidate(tmp_path):
    folder = write_toy_pipeline(tmp_path / "in")
    same = validate_generation(open_parts(folder), open_parts(folder), toy_samples(3, seed=3))
    assert same["agreement"]["exact_sequence"] == 1.0
    assert same["agreement"]["token_error_rate"] == 0.0
    assert same["agreement"]["forced_top1"] == 1.0
    perturbed = write_toy_pipeline(tmp_path / "other", seed=0)
    for name in ("decoder_model.onnx", "decoder_with_past_model.onnx"):
        model = onnx.load(str(perturbed / name))
        for tensor in model.graph.initializer:
            if tensor.name == "lm_head":
                values = numpy_helper.to_array(tensor)
                noise = np.random.default_rng(0).standard_normal(values.shape) * 0.5
                tensor.CopyFrom(numpy_helper.from_array(
                    (values + noise * values.std()).astype(np.float32), "lm_head"))
        onnx.save(model, str(perturbed / name))
    worse = validate_generation(open_parts(folder), open_parts(perturbed),
                                toy_samples(3, seed=3))["agreement"]
    assert worse["exact_sequence"] < 1.0 and worse["token_error_rate"] > 0.0
    assert worse["logits_cosine_mean"] < 0.99 and worse["forced_top1"] < 1.0


def test_per_part_recipes_and_groups(tmp_path):
    folder = write_toy_pipeline(tmp_path / "in", merged=True)
    manifest = open_parts(folder).manifest
    chosen = group_recipes(manifest, "quantize:int8-dynamic",
                           {"encoder": "float", "decoder_with_past": "quantize:int4"})
    assert chosen == {"encoder": None, "decoder": "quantize:int4"}
    with pytest.raises(UserError, match="one group"):
        group_recipes(manifest, None, {"decoder": "quantize:int4",
                                       "decoder_merged": "quantize:int8-dynamic"})
    with pytest.raises(UserError, match="no part or group named 'nope'"):
        group_recipes(manifest, None, {"nope": "quantize:int4"})
    result, out = _compress(folder, tmp_path / "out", "quantize:int4",
                            per_part={"encoder": "float"})
    assert (out.folder / "encoder_model.onnx").read_bytes() == (
        folder / "encoder_model.onnx").read_bytes()
    assert result.report.models["groups"]["encoder"]["recipe"] == "float"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "onnxcomp.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=300, check=False)


def _npz_folder(path, seed):
    path.mkdir()
    for i, sample in enumerate(toy_samples(3, seed=seed)):
        np.savez(path / f"{i}.npz", **sample)
    return path


def test_cli_compress_validate_bench_a_pipeline(tmp_path):
    folder = write_toy_pipeline(tmp_path / "in", merged=True)
    calib, held_out = _npz_folder(tmp_path / "calib", 1), _npz_folder(tmp_path / "eval", 2)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    run = _cli("compress", folder, "-o", tmp_path / "out", "--recipe", "quantize:int4",
               "--part", "encoder=quantize:int8-dynamic", "--calib", calib, "--eval", held_out,
               "--report", tmp_path / "r.json", "--quiet")
    assert run.returncode == 0, run.stderr
    assert "exact_sequence" in run.stdout and (tmp_path / "r.json").exists()
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before  # input untouched
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(before)
    run = _cli("validate", folder, tmp_path / "out", "--data", held_out, "--quiet")
    assert run.returncode == 0 and "logits_cosine_mean" in run.stdout, run.stderr
    run = _cli("bench", folder, tmp_path / "out", "--data", held_out / "0.npz", "--runs", "2",
               "--new-tokens", "4", "--no-memory", "--quiet")
    assert run.returncode == 0 and "tokens/s" in run.stdout, run.stderr


@pytest.mark.parametrize("setup, args, message", [
    (lambda f: (f / "decoder_model.onnx").unlink(), [], "is missing"),
    (lambda f: None, ["--part", "x=quantize:int4"], "no part or group named 'x'"),
    (lambda f: None, ["--dry-run"], "--dry-run plans one file"),
    (lambda f: (f / "parts.json").write_text("{"), [], "not a readable JSON manifest"),
])
def test_cli_pipeline_mistakes_are_one_line_exit_2(tmp_path, setup, args, message):
    folder = write_toy_pipeline(tmp_path / "in")
    setup(folder)
    run = _cli("compress", folder, "-o", tmp_path / "out", "--recipe", "quantize:int4",
               "--calib", _npz_folder(tmp_path / "calib", 1), *args)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and run.stderr.strip().count("\n") == 0
    assert not (tmp_path / "out").exists()


def test_mismatched_tensor_names_between_parts_are_refused(tmp_path):
    folder = write_toy_pipeline(tmp_path / "in")
    model = onnx.load(str(folder / "encoder_model.onnx"))
    model.graph.output[0].name = "hidden"
    model.graph.node[-1].output[0] = "hidden"
    onnx.save(model, str(folder / "encoder_model.onnx"))
    run = _cli("compress", folder, "-o", tmp_path / "out", "--recipe", "quantize:int4",
               "--calib", _npz_folder(tmp_path / "calib", 1))
    assert run.returncode == 2 and "encoder_hidden_states" in run.stderr, run.stderr
    assert run.stderr.strip().count("\n") == 0 and not (tmp_path / "out").exists()


def test_a_pipeline_below_the_fidelity_floor_writes_nothing(tmp_path):
    folder = write_toy_pipeline(tmp_path / "in")
    calib = _npz_folder(tmp_path / "calib", 1)
    run = _cli("compress", folder, "-o", tmp_path / "out", "--recipe", "lowrank",
               "--set", "lowrank.energy=0.05", "--set", "lowrank.max_layer_error=1",
               "--calib", calib)
    assert run.returncode == 1, run.stderr
    assert "nothing written" in run.stderr and not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".onnxcomp")]


def test_cli_inspect_lists_parts_and_shared_tensors(tmp_path):
    folder = write_toy_pipeline(tmp_path / "in", merged=True)
    run = _cli("inspect", folder, "--json")
    assert run.returncode == 0, run.stderr
    import json

    info = json.loads(run.stdout)
    assert [p["role"] for p in info["parts"]] == ["encoder", "decoder", "decoder-with-past",
                                                  "decoder-merged"]
    assert info["tied_tensors"]["count"] == 3
    assert info["groups"]["decoder"] == ["decoder", "decoder_with_past", "decoder_merged"]


@pytest.mark.parametrize("merged_only", [False, True])
def test_static_int8_decoders_are_calibrated_on_both_paths_and_stay_tied(tmp_path, merged_only):
    folder = write_toy_pipeline(tmp_path / "in", merged=True, separate=not merged_only)
    result, out = _compress(folder, tmp_path / "out", "quantize:int8")
    files = {p.name: out.model(p.name) for p in out.manifest.parts}
    merged = files["decoder_merged"]
    branch_ops = [{n.op_type for n in a.g.node} for a in merged.graph.node[0].attribute]
    assert all("QuantizeLinear" in ops and "DequantizeLinear" in ops for ops in branch_ops)
    names = [t.name for t in merged.graph.initializer]
    assert len(names) == len(set(names))
    if not merged_only:
        first, later = (_initializers(files[d]) for d in ("decoder", "decoder_with_past"))
        quantized = [n for n in set(first) & set(later) if n.endswith("_int8")]
        assert quantized and all(first[n] == later[n] for n in quantized)
    assert result.report.generation["agreement"]["logits_cosine_mean"] > 0.99
    for sample in toy_samples(2, seed=4):
        assert generate(out, sample, merged=True).tokens == generate(
            out, sample, merged=merged_only and None).tokens


def test_word_error_rates_with_a_token_decoder(tmp_path):
    from onnxcomp.measure.generation import word_error_rate

    assert word_error_rate(["Hello, world!"], ["hello world"]) == 0.0
    assert word_error_rate(["a b c d"], ["a x c"]) == 0.5
    folder = write_toy_pipeline(tmp_path / "in")
    data = calibration.from_batches(toy_samples(3, seed=3), name="toy",
                                    labels=[["w1 w2"]] * 3)
    result = validate_generation(open_parts(folder), open_parts(folder), data,
                                 decode=lambda tokens: " ".join(f"w{t}" for t in tokens))
    agreement = result["agreement"]
    assert agreement["wer_candidate_vs_reference"] == 0.0
    assert agreement["wer_reference_vs_truth"] == agreement["wer_candidate_vs_truth"] > 0
    assert result["samples"][0]["reference_text"].startswith("w")


def test_a_toml_recipe_sets_each_part(tmp_path):
    folder = write_toy_pipeline(tmp_path / "in")
    recipe = tmp_path / "pipeline.toml"
    recipe.write_text('[[pass]]\nname = "quantize"\nmode = "int8-dynamic"\n\n'
                      '[parts.encoder]\nrecipe = "float"\n\n'
                      '[[parts.decoder.pass]]\nname = "quantize"\nmode = "int4"\n'
                      'block_size = 16\n')
    run = _cli("compress", folder, "-o", tmp_path / "out", "--recipe", recipe,
               "--calib", _npz_folder(tmp_path / "calib", 1), "--quiet")
    assert run.returncode == 0, run.stderr
    out = open_parts(tmp_path / "out")
    assert (out.folder / "encoder_model.onnx").read_bytes() == (
        folder / "encoder_model.onnx").read_bytes()
    nbits = [n for n in out.model("decoder").graph.node if n.op_type == "MatMulNBits"]
    assert nbits and all(a.i == 16 for n in nbits for a in n.attribute if a.name == "block_size")
    bad = tmp_path / "bad.toml"
    bad.write_text('[parts.encoder]\nrecipe = "quantize:int4"\n[[parts.encoder.pass]]\n'
                   'name = "quantize"\n')
    run = _cli("compress", folder, "-o", tmp_path / "out2", "--recipe", bad,
               "--calib", tmp_path / "calib")
    assert run.returncode == 2 and "either recipe" in run.stderr
    assert run.stderr.strip().count("\n") == 0 and not (tmp_path / "out2").exists()


def test_int4_mixed_decoder_files_share_weights_by_name_and_the_merged_file_stores_them_once(
        tmp_path):
    folder = write_toy_pipeline(tmp_path / "in", merged=True)
    result = compress_parts(folder, "quantize:int4", calib=_data(1), eval_data=_data(2),
                            overrides=["quantize.min_cosine=0.99999", "quantize.block_size=16"],
                            validate=False)
    first, later = (result.models[d].proto for d in ("decoder", "decoder_with_past"))
    eight_bit = [t.name for t in first.graph.initializer if t.name.endswith("_B_int8")]
    assert eight_bit, "the target needs 8-bit weights"
    assert not [n for n in eight_bit if n.startswith(("first/", "with_past/"))]
    assert set(eight_bit) <= {t.name for t in later.graph.initializer}
    merged = result.models["decoder_merged"].proto
    merged_bytes = sum(t.ByteSize() for t in merged.graph.initializer)
    assert merged_bytes <= 1.05 * sum(t.ByteSize() for t in first.graph.initializer)


def test_an_optimum_merged_decoder_that_returns_an_empty_cross_cache_keeps_the_old_one(tmp_path):
    """Optimum fills the outputs the with-past path lacks with empty tensors; the loop must keep
    the cross-attention past it had (else later steps read a zero-length cache)."""
    folder = write_toy_pipeline(tmp_path / "in", merged=True)
    path = folder / "decoder_model_merged.onnx"
    merged = onnx.load(str(path))
    then_branch = next(a.g for a in merged.graph.node[0].attribute if a.name == "then_branch")
    for node in then_branch.node:
        if node.op_type == "Identity" and node.input[0] == "past_key_values.0.encoder.key":
            node.op_type = "Slice"  # [B, 1, 1, D] -> [B, 1, 0, D]
            del node.input[1:]
            node.input.extend(["zero_i", "zero_i", "axis2_i"])
            for value in then_branch.output:
                if value.name == node.output[0]:
                    value.type.tensor_type.shape.dim[2].dim_param = "empty"
    for value in merged.graph.output:
        if value.name == "present.0.encoder.key":
            value.type.tensor_type.shape.dim[2].dim_param = "cross_sequence"
    then_branch.initializer.extend([numpy_helper.from_array(np.array([0], np.int64), "zero_i"),
                                    numpy_helper.from_array(np.array([2], np.int64), "axis2_i")])
    onnx.checker.check_model(merged, full_check=True)
    onnx.save(merged, str(path))
    parts = open_parts(folder)
    for sample in toy_samples(2, seed=8):
        assert generate(parts, sample, merged=True).tokens == generate(
            parts, sample, merged=False).tokens


def test_external_data_of_a_part_in_a_subfolder_is_copied_beside_it(tmp_path):
    folder = write_toy_pipeline(tmp_path / "in")
    (folder / "onnx").mkdir()
    encoder = onnx.load(str(folder / "encoder_model.onnx"))
    onnx.save(encoder, str(folder / "onnx" / "encoder_model.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="encoder_model.onnx_data",
              size_threshold=0)
    (folder / "encoder_model.onnx").unlink()
    manifest = json.loads((folder / "parts.json").read_text())
    manifest["parts"][0]["file"] = "onnx/encoder_model.onnx"
    (folder / "parts.json").write_text(json.dumps(manifest))
    result = compress_parts(folder, "quantize:int4", per_part={"encoder": "float"},
                            calib=_data(1), validate=False)
    out = write_parts(open_parts(folder), result, tmp_path / "out")
    assert (out / "onnx" / "encoder_model.onnx_data").is_file()
    assert generate(open_parts(out), toy_samples(1)[0]).tokens
    sizes = result.report.models["reference"]["parts"]
    assert sizes["encoder"] > (folder / "onnx" / "encoder_model.onnx").stat().st_size


def test_pipeline_report_paths_may_not_be_input_files_and_validate_flags_are_checked(tmp_path):
    folder = write_toy_pipeline(tmp_path / "in")
    calib = _npz_folder(tmp_path / "calib", 1)
    before = (folder / "parts.json").read_bytes()
    run = _cli("compress", folder, "-o", tmp_path / "out", "--recipe", "quantize:int4",
               "--calib", calib, "--report", folder / "parts.json")
    assert run.returncode == 2 and (folder / "parts.json").read_bytes() == before, run.stderr
    for args, message in ((["--min-cosine", "0.9"], "--min-cosine"),
                          (["--count", "-1"], "--count")):
        run = _cli("validate", folder, folder, "--data", calib, *args)
        assert run.returncode == 2 and message in run.stderr, run.stderr
