"""The vision-language zoo pipeline (onnxcomp.zoo.vlm): export to the multi-file layout, each
part against PyTorch, the key/value cache path against the full prefix, tied weights, the
manifest, the data. Fast tests build the tiny ``test`` preset; the real-size one is marked zoo."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import onnx
import pytest

from onnxcomp import parts, runtime, zoo
from onnxcomp.errors import UserError
from onnxcomp.zoo import vlm

torch = pytest.importorskip("torch")

CONFIG = vlm.PRESETS["test"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    folder = vlm.build(tmp_path_factory.mktemp("vlm") / "pipeline", CONFIG, name="vlm-test")
    return folder, vlm.build_modules(CONFIG)


def _session(folder, part):
    return runtime.session(folder / vlm.FILES[part], provider="cpu", optimize=False)


def _relative_error(got, expected) -> float:
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape
    return float(np.max(np.abs(got - expected)) / max(np.max(np.abs(expected)), 1e-12))


def _torch_run(module, *args):
    with torch.no_grad():
        return [t.numpy() for t in module(*(torch.from_numpy(np.asarray(a)) for a in args))]


def _image_embeds(modules, pixels):
    with torch.no_grad():
        features = modules["vision_encoder"](torch.from_numpy(pixels))[0]
        return modules["projector"](features)[0].numpy()


# ---------------------------------------------------------------------------------------------
# the export


def test_layout_and_manifest(built):
    folder, _ = built
    assert vlm.finished(folder)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging left
    manifest = json.loads((folder / "parts.json").read_text())
    assert manifest == vlm.parts_manifest(CONFIG)
    assert [(p["name"], p["file"], p["role"]) for p in manifest["parts"]] == [
        ("vision_encoder", "vision_encoder.onnx", "encoder"),
        ("projector", "projector.onnx", "encoder"),
        ("decoder", "decoder_model.onnx", "decoder"),
        ("decoder_with_past", "decoder_with_past_model.onnx", "decoder-with-past"),
        ("decoder_merged", "decoder_model_merged.onnx", "decoder-merged")]
    assert manifest["generation"] == {"start_ids": list(CONFIG.start_ids), "eos_id": 2,
                                      "max_new_tokens": 16}
    loaded = parts.load_manifest(folder)  # the lead's reader accepts it
    assert [p.name for p in loaded.parts] == list(vlm.FILES)
    opened = parts.open_parts(folder)
    opened.check_connections(["pixel_values"])
    for part in vlm.FILES:
        model = onnx.load(folder / vlm.FILES[part])
        onnx.checker.check_model(model)
        meta = {p.key: p.value for p in model.metadata_props}
        assert meta["onnxcomp.zoo.part"] == part and meta["onnxcomp.zoo.name"] == "vlm-test"
        assert json.loads(meta["onnxcomp.zoo.config"])["text"]["vocab"] == 256
        if part != "decoder_merged":
            assert model.opset_import[0].version == vlm.OPSET


def _dims(value):
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


def test_declared_shapes_fix_heads_and_head_size(built):
    folder, _ = built
    t = CONFIG.text
    decoder = onnx.load(folder / vlm.FILES["decoder"]).graph
    inputs = {i.name: _dims(i) for i in decoder.input}
    assert inputs == {"input_ids": ["batch", "sequence"],
                      "image_embeds": ["batch", CONFIG.vision.patches, t.hidden]}
    outputs = {o.name: _dims(o) for o in decoder.output}
    assert outputs["logits"] == ["batch", "sequence", t.vocab]
    assert len(outputs) == 1 + 2 * t.layers
    assert outputs["present.1.value"] == ["batch", t.kv_heads, "present_sequence", t.head_dim]
    with_past = onnx.load(folder / vlm.FILES["decoder_with_past"]).graph
    inputs = {i.name: _dims(i) for i in with_past.input}
    assert list(inputs) == ["input_ids"] + vlm.kv_names(CONFIG, "past_key_values")
    assert inputs["past_key_values.0.key"] == ["batch", t.kv_heads, "past_sequence", t.head_dim]
    assert [o.name for o in with_past.output] == [o.name for o in decoder.output]


def test_encoder_parts_match_torch(built):
    folder, modules = built
    rng = np.random.default_rng(3)
    for batch in (1, 2):
        pixels = rng.standard_normal((batch, 3, 32, 32)).astype(np.float32)
        got = runtime.run(_session(folder, "vision_encoder"), {"pixel_values": pixels})
        expected = _torch_run(modules["vision_encoder"], pixels)[0]
        assert got["image_features"].shape == (batch, CONFIG.vision.patches, CONFIG.vision.dim)
        assert _relative_error(got["image_features"], expected) < 1e-4
        features = expected
        got = runtime.run(_session(folder, "projector"), {"image_features": features})
        expected = _torch_run(modules["projector"], features)[0]
        assert _relative_error(got["image_embeds"], expected) < 1e-4


def test_decoders_match_torch(built):
    folder, modules = built
    rng = np.random.default_rng(4)
    t = CONFIG.text
    names = ["logits"] + vlm.kv_names(CONFIG, "present")
    for batch, seq, past_len in ((1, 5, 3), (2, 1, 8)):
        ids = rng.integers(0, t.vocab, (batch, seq)).astype(np.int64)
        embeds = rng.standard_normal((batch, CONFIG.vision.patches, t.hidden)).astype(np.float32)
        got = runtime.run(_session(folder, "decoder"), {"input_ids": ids, "image_embeds": embeds})
        expected = _torch_run(modules["decoder"], ids, embeds)
        assert got["logits"].shape == (batch, seq, t.vocab)
        assert got["present.0.key"].shape == (batch, t.kv_heads, CONFIG.vision.patches + seq,
                                              t.head_dim)
        for name, value in zip(names, expected):
            assert _relative_error(got[name], value) < 1e-4, name
        past = [rng.standard_normal((batch, t.kv_heads, past_len, t.head_dim)).astype(np.float32)
                for _ in range(2 * t.layers)]
        feeds = {"input_ids": ids, **dict(zip(vlm.kv_names(CONFIG, "past_key_values"), past))}
        got = runtime.run(_session(folder, "decoder_with_past"), feeds)
        expected = _torch_run(modules["decoder_with_past"], ids, *past)
        assert got["present.0.value"].shape[2] == past_len + seq
        for name, value in zip(names, expected):
            assert _relative_error(got[name], value) < 1e-4, name


def test_cache_path_equals_the_whole_prefix(built):
    """decoder on a prefix, then decoder_with_past token by token, gives the logits (and the
    greedy token) of the decoder run on the whole prefix at once."""
    folder, modules = built
    decoder, with_past = _session(folder, "decoder"), _session(folder, "decoder_with_past")
    pixels = vlm.make_batch(CONFIG, "eval", 0)["pixel_values"]
    embeds = _image_embeds(modules, pixels)
    ids = np.array([CONFIG.start_ids], np.int64)
    out = runtime.run(decoder, {"input_ids": ids, "image_embeds": embeds})
    for _ in range(4):
        token = int(np.argmax(out["logits"][0, -1]))
        past = {"past_key_values." + k[len("present."):]: v for k, v in out.items()
                if k.startswith("present.")}
        out = runtime.run(with_past, {"input_ids": np.array([[token]], np.int64), **past})
        ids = np.concatenate([ids, [[token]]], axis=1)
        whole = runtime.run(decoder, {"input_ids": ids, "image_embeds": embeds})
        assert _relative_error(out["logits"][0, -1], whole["logits"][0, -1]) < 1e-4
        assert np.argmax(out["logits"][0, -1]) == np.argmax(whole["logits"][0, -1])
        for name in ("present.0.key", "present.1.value"):
            assert _relative_error(out[name], whole[name]) < 1e-4


def _torch_greedy(modules, pixels, steps):
    with torch.no_grad():
        embeds = torch.from_numpy(_image_embeds(modules, pixels))
        out = modules["decoder"](torch.tensor([CONFIG.start_ids]), embeds)
        tokens = []
        for _ in range(steps):
            token = int(out[0][0, -1].argmax())
            tokens.append(token)
            if token == CONFIG.eos_id:
                break
            out = modules["decoder_with_past"](torch.tensor([[token]]), *out[1:])
    return tokens


@pytest.mark.parametrize("merged", [False, True])
def test_generation_loop_matches_torch(built, merged):
    folder, modules = built
    opened = parts.open_parts(folder, optimize=False)
    produced = set()
    for split, index in (("calib", 0), ("heldout", 1)):
        sample = vlm.make_batch(CONFIG, split, index)
        generation = parts.generate(opened, sample, merged=merged)
        assert generation.tokens == _torch_greedy(modules, sample["pixel_values"], 16)
        produced |= set(generation.tokens)
    assert len(produced) > 3  # not one repeated token


def test_decoder_weights_are_tied_across_files(built):
    folder, _ = built
    models = {p: onnx.load(folder / vlm.FILES[p]) for p in ("decoder", "decoder_with_past")}
    weights = [{t.name: t for t in m.graph.initializer if t.name.startswith("model.")}
               for m in models.values()]
    assert set(weights[0]) == set(weights[1])
    expected = {"model.embed_tokens", "model.norm.weight"} | {
        f"model.layers.{i}.{name}.weight" for i in range(CONFIG.text.layers)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                     "down_proj", "input_norm", "post_norm")}
    assert set(weights[0]) == expected
    for name in expected:
        assert weights[0][name].SerializeToString() == weights[1][name].SerializeToString(), name
    # The embedding table is held once per file: the output projection reads its Transpose.
    for model in models.values():
        table = [t for t in model.graph.initializer if list(t.dims) == [CONFIG.text.vocab,
                                                                        CONFIG.text.hidden]
                 or list(t.dims) == [CONFIG.text.hidden, CONFIG.text.vocab]]
        assert [t.name for t in table] == ["model.embed_tokens"]
    tied = parts.tied_tensors(models)
    tied_names = {name for entry in tied for _, name in entry.members}
    assert "model.embed_tokens" in tied_names and "model.layers.1.down_proj.weight" in tied_names


def test_parameter_count_matches_the_modules(built):
    _, modules = built
    counted = sum(p.numel() for part in ("vision_encoder", "projector", "decoder")
                  for p in modules[part].parameters())
    assert counted == vlm.parameter_count(CONFIG)
    assert 135e6 < vlm.parameter_count(vlm.PRESETS["small"]) < 145e6


# ---------------------------------------------------------------------------------------------
# the cache: built once, an interrupted build leaves nothing finished


def test_interrupted_build_leaves_nothing_finished(tmp_path, monkeypatch):
    def fail(decoder, with_past):
        raise KeyboardInterrupt

    monkeypatch.setattr(parts, "merge_decoders", fail)
    with pytest.raises(KeyboardInterrupt):
        vlm.build(tmp_path / "p", CONFIG)
    assert not vlm.finished(tmp_path / "p")
    assert list((tmp_path / "p").iterdir()) == []


def test_fetch_builds_once_and_rebuilds_a_damaged_folder(tmp_path, monkeypatch):
    calls = []
    real_build = vlm.build
    monkeypatch.setitem(vlm.ZOO_NAMES, "vlm-test", "test")

    def counting_build(*args, **kwargs):
        calls.append(args)
        return real_build(*args, **kwargs)

    monkeypatch.setattr(vlm, "build", counting_build)
    folder = vlm.fetch("vlm-test", tmp_path)
    assert folder == tmp_path and vlm.finished(folder) and len(calls) == 1
    assert vlm.fetch("vlm-test", tmp_path) == folder and len(calls) == 1
    with open(folder / vlm.FILES["projector"], "ab") as handle:  # a truncated/changed part
        handle.write(b"\0")
    assert not vlm.finished(folder)
    vlm.fetch("vlm-test", tmp_path)
    assert len(calls) == 2 and vlm.finished(folder)
    (folder / "parts.json").unlink()
    assert not vlm.finished(folder)


def test_zoo_entry_and_unknown_names():
    entry = zoo.entry("smolvlm-small")
    assert entry.implementation() is vlm
    assert "heldout" in entry.splits
    with pytest.raises(UserError):
        vlm.dataset("clip-vit-b32", "calib", 1)
    with pytest.raises(UserError):
        vlm.dataset("smolvlm-small", "train", 1)


# ---------------------------------------------------------------------------------------------
# data


def test_datasets_are_deterministic_and_splits_differ():
    data = {split: vlm.data(CONFIG, split, 6) for split in vlm.SPLITS}
    for split, source in data.items():
        batches = list(source)
        again = list(vlm.data(CONFIG, split, 6))
        assert len(batches) == 6
        for a, b in zip(batches, again):
            assert list(a) == ["pixel_values"]
            assert a["pixel_values"].shape == (1, 3, 32, 32)
            assert a["pixel_values"].dtype == np.float32
            np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
        assert not np.array_equal(batches[0]["pixel_values"], batches[1]["pixel_values"])
    firsts = {split: source.make_batch(0)["pixel_values"] for split, source in data.items()}
    assert not np.array_equal(firsts["calib"], firsts["eval"])
    assert not np.array_equal(firsts["calib"], firsts["heldout"])
    other_seed = vlm.data(CONFIG, "calib", 1, seed=1).make_batch(0)["pixel_values"]
    assert not np.array_equal(firsts["calib"], other_seed)


def test_images_are_normalized_like_clip():
    pixels = np.concatenate([vlm.make_batch(vlm.PRESETS["small"], split, i)["pixel_values"]
                             for split in vlm.SPLITS for i in range(3)])
    assert pixels.shape == (9, 3, 224, 224)
    low = (0.0 - vlm.MEAN) / vlm.STD
    high = (1.0 - vlm.MEAN) / vlm.STD
    per_channel = pixels.transpose(1, 0, 2, 3).reshape(3, -1)
    assert np.all(per_channel.min(axis=1) >= low - 1e-5)
    assert np.all(per_channel.max(axis=1) <= high + 1e-5)
    assert 0.2 < pixels.std() < 3.0


def test_heldout_families_differ_from_calibration():
    """Held-out images come from other families: e.g. rendered text has far more fine edges
    than the calibration's gradients with flat shapes."""
    def edges(image):
        return float(np.mean(np.abs(np.diff(image, axis=1))))  # along the width

    rng = np.random.default_rng(0)
    calib = [edges(vlm.gradient_shapes(rng, 224)) for _ in range(4)]
    text = [edges(vlm.text_image(rng, 224)) for _ in range(4)]
    noise = [vlm.noise_texture(rng, 224) for _ in range(2)]
    blobs = [vlm.blurred_blobs(rng, 224) for _ in range(2)]
    assert min(text) > max(calib)
    for image in noise + blobs:
        assert image.shape == (224, 224, 3) and 0.0 <= image.min() and image.max() <= 1.0
    assert [f.__name__ for f in vlm.FAMILIES["heldout"]] == ["text_image", "noise_texture",
                                                              "blurred_blobs"]
    assert set(vlm.FAMILIES["heldout"]).isdisjoint(vlm.FAMILIES["calib"])


def test_config_validation():
    with pytest.raises(ValueError):
        vlm.VlmConfig(init="other")
    with pytest.raises(ValueError):
        vlm.TextConfig(hidden=65, heads=5, kv_heads=5)
    with pytest.raises(ValueError):
        vlm.VisionConfig(image_size=30, patch=8)
    with pytest.raises(ValueError):
        vlm.VlmConfig(text=vlm.TextConfig(vocab=8))  # start ids past the vocabulary


# ---------------------------------------------------------------------------------------------
# the real-size preset


@pytest.mark.zoo
def test_small_preset_fetch_and_generate():
    started = time.perf_counter()
    folder = zoo.fetch("smolvlm-small")
    seconds = time.perf_counter() - started
    assert vlm.finished(folder)
    sizes = {f: os.path.getsize(folder / f) for f in vlm.FILES.values()}
    print(f"smolvlm-small: fetch {seconds:.1f} s, files {sizes}")
    record = json.loads((folder / vlm.RECORD_FILE).read_text())
    assert 135e6 < record["parameters"] < 145e6
    opened = parts.open_parts(folder, optimize=False)
    sample = zoo.dataset("smolvlm-small", "heldout", 1).make_batch(0)
    generation = parts.generate(opened, sample, max_new_tokens=6)
    assert len(generation.tokens) == 6 and len(set(generation.tokens)) > 1
    # The cached files against freshly built PyTorch modules: the same greedy tokens and
    # first-step logits.
    small = vlm.PRESETS["small"]
    modules = vlm.build_modules(small)
    with torch.no_grad():
        features = modules["vision_encoder"](torch.from_numpy(sample["pixel_values"]))[0]
        embeds = modules["projector"](features)[0]
        out = modules["decoder"](torch.tensor([small.start_ids]), embeds)
        tokens = []
        for _ in range(6):
            tokens.append(int(out[0][0, -1].argmax()))
            out = modules["decoder_with_past"](torch.tensor([[tokens[-1]]]), *out[1:])
    assert generation.tokens == tokens
    first = parts.generate(opened, sample, max_new_tokens=1).logits[0]
    with torch.no_grad():
        reference = modules["decoder"](torch.tensor([small.start_ids]), embeds)[0][0, -1]
    assert _relative_error(first, reference.numpy()) < 1e-4
    session = opened.session("decoder")
    shapes = {i.name: i.shape for i in session.get_inputs()}
    assert shapes["image_embeds"][1:] == [196, 576]
    past = {i.name: i.shape for i in opened.session("decoder_with_past").get_inputs()}
    assert past["past_key_values.29.value"][1] == 3 and past["past_key_values.29.value"][3] == 64
