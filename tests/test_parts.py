"""Pipelines of ONNX parts: the manifest, tied tensors, greedy generation (onnxcomp/parts.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from pipeline_builders import toy_samples, write_toy_pipeline

from onnxcomp.errors import UserError
from onnxcomp.measure.generation import consistency
from onnxcomp.parts import generate, is_parts, load_manifest, open_parts, tied_tensors


def test_manifest_is_read_and_parts_are_found(tmp_path):
    folder = write_toy_pipeline(tmp_path / "p", merged=True)
    assert is_parts(folder) and is_parts(folder / "parts.json") and not is_parts(tmp_path)
    manifest = load_manifest(folder)
    assert [p.role for p in manifest.parts] == ["encoder", "decoder", "decoder-with-past",
                                                "decoder-merged"]
    assert manifest.generation.start_ids == (1, 2)
    parts = open_parts(folder)
    assert parts.decoder_route() == ("decoder", "decoder_with_past")
    assert parts.decoder_route(merged=True) == ("decoder_merged", "decoder_merged")


def _edit(folder, change):
    manifest = json.loads((folder / "parts.json").read_text())
    change(manifest)
    (folder / "parts.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("change, message", [
    (lambda m: m["parts"][1].update(file="missing.onnx"), "is missing"),
    (lambda m: m["parts"][1].update(file="../decoder_model.onnx"), "inside the folder"),
    (lambda m: m["parts"][1].update(role="decoder-ish"), "has role"),
    (lambda m: m["parts"].pop(2), "needs a 'decoder' and a 'decoder-with-past'"),
    (lambda m: m.update(format="v2"), "format must be"),
    (lambda m: m["generation"].update(max_new_tokens=0), "max_new_tokens"),
    (lambda m: m["generation"].update(start_ids=["a"]), "start_ids"),
    (lambda m: m.update(feeds={"nobody.x": "encoder.y"}), "feeds key"),
    (lambda m: m["parts"].append(dict(m["parts"][0])), "unique"),
])
def test_bad_manifests_are_one_line_errors(tmp_path, change, message):
    folder = write_toy_pipeline(tmp_path / "p")
    _edit(folder, change)
    with pytest.raises(UserError, match=message) as info:
        load_manifest(folder)
    assert "\n" not in str(info.value)


def test_an_input_nobody_produces_is_named(tmp_path):
    folder = write_toy_pipeline(tmp_path / "p")
    parts = open_parts(folder)
    with pytest.raises(UserError, match="input 'input_features' of part 'encoder'"):
        parts.check_connections(["pixel_values"])
    _edit(folder, lambda m: m.update(feeds={"decoder.encoder_hidden_states": "encoder.nothing"}))
    with pytest.raises(UserError, match="was not produced"):
        generate(open_parts(folder), toy_samples(1)[0])


def test_generation_with_past_equals_the_full_prefix_and_the_merged_file(tmp_path):
    parts = open_parts(write_toy_pipeline(tmp_path / "p", merged=True, max_new_tokens=6))
    for sample in toy_samples(3):
        stepped = generate(parts, sample)
        assert len(stepped.tokens) == 6 and len(stepped.step_s) == 5
        assert generate(parts, sample, merged=True).tokens == stepped.tokens
        checks = consistency(parts, sample)
        assert checks["with_past_same_token"] and checks["merged_same_tokens"]
        assert checks["with_past_vs_full_prefix_max_abs"] < 1e-4


def test_forced_generation_follows_the_given_path(tmp_path):
    parts = open_parts(write_toy_pipeline(tmp_path / "p"))
    sample = toy_samples(1)[0]
    path = [5, 6, 7, 8]
    forced = generate(parts, sample, forced=path)
    assert forced.tokens == path and len(forced.logits) == 4
    free = generate(parts, sample)
    again = generate(parts, sample, forced=free.tokens)
    np.testing.assert_allclose(np.array(again.logits), np.array(free.logits), rtol=0, atol=1e-5)


def test_prompt_ids_in_a_sample_start_the_decoder(tmp_path):
    parts = open_parts(write_toy_pipeline(tmp_path / "p"))
    sample = toy_samples(1)[0]
    a = generate(parts, {**sample, "prompt_ids": np.array([[1, 2]], np.int64)})
    b = generate(parts, sample)
    c = generate(parts, {**sample, "prompt_ids": np.array([[9, 9, 9]], np.int64)})
    assert a.tokens == b.tokens and a.logits[0].tolist() != c.logits[0].tolist()


def test_tied_tensors_are_found_across_files(tmp_path):
    parts = open_parts(write_toy_pipeline(tmp_path / "p", merged=True))
    tied = tied_tensors({p.name: parts.model(p.name) for p in parts.manifest.parts})
    assert {t.members[0][1] for t in tied} == {"embed", "lm_head", "key.weight"}
    assert all({m[0] for m in t.members} == {"decoder", "decoder_with_past", "decoder_merged"}
               for t in tied)
    assert tied[0].nbytes >= tied[-1].nbytes


def test_part_files_that_escape_the_folder_are_refused(tmp_path):
    folder = write_toy_pipeline(tmp_path / "p")
    outside = tmp_path / "elsewhere.onnx"
    (folder / "decoder_model.onnx").rename(outside)
    (folder / "decoder_model.onnx").symlink_to(outside)
    with pytest.raises(UserError, match="links outside the folder"):
        load_manifest(folder)


def test_a_huge_manifest_is_refused_before_reading(tmp_path):
    folder = write_toy_pipeline(tmp_path / "p")
    with open(folder / "parts.json", "ab") as handle:
        handle.write(b" " * (2 << 20))
    with pytest.raises(UserError, match="is not a manifest"):
        load_manifest(folder)
