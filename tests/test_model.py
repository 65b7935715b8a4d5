from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import external_data_helper

import onnxcomp
from onnxcomp import runtime
from onnxcomp.errors import OnnxcompError, UnsafeModelError
from onnxcomp.model import load, save


def test_round_trip_gives_identical_outputs(tmp_path, mlp, feeds):
    path = save(mlp, tmp_path / "m.onnx")
    again = load(path)
    assert runtime.max_abs_difference(mlp, again, feeds) == {"y": 0.0}


def test_external_data_round_trip_and_other_working_directory(tmp_path, mlp, feeds, monkeypatch):
    monkeypatch.setattr(onnxcomp.model, "EXTERNAL_DATA_THRESHOLD", 0)
    path = save(mlp, tmp_path / "ext" / "m.onnx", external_data=True)
    assert (tmp_path / "ext" / "m.onnx.data").is_file()
    on_disk = onnx.load(str(path), load_external_data=False)
    assert any(external_data_helper.uses_external_data(t) for t in on_disk.graph.initializer)
    # The caller's model keeps its weights after saving.
    assert runtime.max_abs_difference(mlp, load(path), feeds) == {"y": 0.0}
    monkeypatch.chdir(tmp_path)
    sess = runtime.session(str(path.resolve()))
    np.testing.assert_allclose(runtime.run(sess, feeds)["y"], runtime.run_model(mlp, feeds)["y"],
                               rtol=1e-6, atol=1e-6)


def _with_location(mlp, tmp_path, location: str):
    proto = mlp.copy().proto
    tensor = proto.graph.initializer[0]
    tensor.data_location = onnx.TensorProto.EXTERNAL
    del tensor.external_data[:]
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", location
    tensor.ClearField("raw_data")
    path = tmp_path / "evil" / "m.onnx"
    path.parent.mkdir()
    with open(path, "wb") as handle:
        handle.write(proto.SerializeToString())
    return path


@pytest.mark.parametrize("location", ["../secret.bin", "/etc/passwd", "sub/../../secret.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path, mlp, location):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 1024)
    with pytest.raises(UnsafeModelError):
        load(_with_location(mlp, tmp_path, location))


def test_symlink_escaping_the_folder_is_refused(tmp_path, mlp):
    (tmp_path / "secret.bin").write_bytes(b"\0" * 1024)
    path = _with_location(mlp, tmp_path, "link.bin")
    (path.parent / "link.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(UnsafeModelError):
        load(path)


def test_bad_files_give_clear_errors(tmp_path):
    with pytest.raises(OnnxcompError, match="no such file"):
        load(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not protobuf \xff\xfe" * 10)
    with pytest.raises(OnnxcompError, match="not"):
        load(garbage)
    with pytest.raises(OnnxcompError, match="folder"):
        load(tmp_path)


def test_save_is_atomic_and_leaves_no_temporary_files(tmp_path, mlp, monkeypatch):
    target = tmp_path / "out.onnx"
    save(mlp, target)
    before = target.read_bytes()

    def broken_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(onnx, "save_model", broken_save)
    with pytest.raises(OSError):
        save(onnxcomp.model.Model(mlp.copy().proto), target)
    assert target.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.onnx"]


def test_large_model_is_saved_with_external_data_automatically(tmp_path, mlp, monkeypatch):
    # The real limit is 2 GiB; lower the threshold so the decision is tested without 2 GiB of RAM.
    monkeypatch.setattr(onnxcomp.model, "PROTOBUF_SAFE_BYTES", 100)
    monkeypatch.setattr(onnxcomp.model, "EXTERNAL_DATA_THRESHOLD", 0)
    path = save(mlp, tmp_path / "big.onnx")
    assert (tmp_path / "big.onnx.data").is_file()
    assert load(path).weight_bytes() == mlp.weight_bytes()


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["ppocr-rec", "ppocr-det", "tiny-clip"])
def test_zoo_models_round_trip_bit_exact(tmp_path, name):
    from onnxcomp import zoo

    original = load(zoo.fetch(name))
    again = load(save(original, tmp_path / f"{name}.onnx"))
    batch = zoo.dataset(name, "eval", 1).make_batch(0)
    assert set(runtime.max_abs_difference(original, again, batch).values()) == {0.0}
