from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, external_data_helper, helper, numpy_helper

import onnxcomp
from onnxcomp import model as model_module
from onnxcomp import runtime
from onnxcomp.errors import OnnxcompError, UnsafeModelError, UserError
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

    def broken_write(proto, path):  # the disk fills up halfway through the file
        Path(path).write_bytes(proto.SerializeToString()[:10])
        raise OSError("disk full")

    monkeypatch.setattr(onnxcomp.model, "write_serialized", broken_write)
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


# ---------------------------------------------------------------------------- input checks (#16)



def _write(proto, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(proto.SerializeToString())
    return path


def _external(mlp, folder, data="m.onnx.data"):
    """The mlp with w1 in ``folder/data``; returns (model path, w1 tensor proto)."""
    proto = mlp.copy().proto
    w1 = next(t for t in proto.graph.initializer if t.name == "w1")
    raw = numpy_helper.to_array(w1).tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    (folder / data).write_bytes(raw)
    w1.ClearField("raw_data")
    w1.data_location = TensorProto.EXTERNAL
    for key, value in (("location", data), ("offset", "0"), ("length", str(len(raw)))):
        entry = w1.external_data.add()
        entry.key, entry.value = key, value
    return _write(proto, folder / "m.onnx"), w1


@pytest.mark.parametrize("kind", ["fifo", "loop", "device", "folder", "empty"])
def test_special_files_as_model_are_refused_before_opening(tmp_path, kind):
    path = tmp_path / "m.onnx"
    if kind == "fifo":
        os.mkfifo(path)  # opening it would block forever
    elif kind == "loop":
        path.symlink_to(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "folder":
        path.mkdir()
    else:
        path.write_bytes(b"")
    with pytest.raises(UserError, match="FIFO|loop|device|folder|empty"):
        load(path)


@pytest.mark.parametrize("field, value, match", [
    ("offset", "-4", "not a non-negative integer"),
    ("offset", "abc", "not a non-negative integer"),
    ("offset", "100000", "ends at byte"),
    ("length", "8", "does not match its dims"),
    ("location", "m.onnx", "the model file itself"),
])
def test_malformed_external_data_fields_are_one_clear_error(tmp_path, mlp, field, value, match):
    path, _ = _external(mlp, tmp_path / "ext")
    proto = onnx.load(str(path), load_external_data=False)
    tensor = next(t for t in proto.graph.initializer if t.name == "w1")
    next(e for e in tensor.external_data if e.key == field).value = value
    _write(proto, path)
    with pytest.raises(UserError, match=match):
        load(path, load_weights=False)


def test_raw_data_that_does_not_match_the_dims_is_refused(tmp_path, mlp):
    proto = mlp.copy().proto
    proto.graph.initializer[0].raw_data = b"\0" * 12
    with pytest.raises(UserError, match="stores 12 bytes of raw data"):
        load(_write(proto, tmp_path / "m.onnx"))


def test_absurd_dims_are_refused_with_a_memory_estimate(tmp_path, mlp):
    proto = mlp.copy().proto
    tensor = proto.graph.initializer[0]
    del tensor.dims[:]
    tensor.dims.extend([1 << 40, 16])
    with pytest.raises(UserError, match=r"TiB, more than this machine's memory"):
        load(_write(proto, tmp_path / "m.onnx"))


def _with_sparse_w1(mlp, indices):
    proto = mlp.copy().proto
    w1 = next(t for t in proto.graph.initializer if t.name == "w1")
    dense = numpy_helper.to_array(w1).copy()
    proto.graph.initializer.remove(w1)
    flat = np.asarray(indices, np.int64)
    values = dense.reshape(-1)[np.clip(flat, 0, dense.size - 1)]
    sparse = helper.make_sparse_tensor(numpy_helper.from_array(values, "w1"),
                                       numpy_helper.from_array(flat, "w1_i"), [8, 16])
    proto.graph.sparse_initializer.append(sparse)
    kept = np.zeros_like(dense).reshape(-1)
    kept[np.clip(flat, 0, dense.size - 1)] = values
    return proto, kept.reshape(dense.shape)


def test_a_small_sparse_initializer_is_densified_exactly(tmp_path, mlp, feeds):
    proto, dense = _with_sparse_w1(mlp, range(0, 128, 3))
    loaded = load(_write(proto, tmp_path / "m.onnx"))
    assert not loaded.graph.sparse_initializer
    w1 = next(t for t in loaded.graph.initializer if t.name == "w1")
    np.testing.assert_array_equal(numpy_helper.to_array(w1), dense)
    reference = mlp.copy()
    next(t for t in reference.graph.initializer if t.name == "w1").CopyFrom(
        numpy_helper.from_array(dense, "w1"))
    assert runtime.max_abs_difference(reference, loaded, feeds) == {"y": 0.0}


def test_a_sparse_initializer_with_an_index_out_of_range_is_refused(tmp_path, mlp):
    proto, _ = _with_sparse_w1(mlp, [1, 5000])
    with pytest.raises(UserError, match="outside dims"):
        load(_write(proto, tmp_path / "m.onnx"))


def _node(proto, name):
    return next(n for n in proto.graph.node if n.name == name)


def test_graph_flaws_are_named(tmp_path, mlp):
    cases = []
    cyclic = mlp.copy().proto
    _node(cyclic, "fc1").input[0] = "h3"
    cases.append((cyclic, "cycle through nodes 'fc1', 'fc1_bias', 'relu', 'noop'"))
    twice = mlp.copy().proto
    _node(twice, "noop").output[0] = "h2"
    cases.append((twice, "'h2' is produced twice"))
    undefined = mlp.copy().proto
    _node(undefined, "relu").input[0] = "nowhere"
    cases.append((undefined, "reads 'nowhere', which nothing defines"))
    for proto, match in cases:
        with pytest.raises(UserError, match=match):
            load(_write(proto, tmp_path / "m.onnx"))


def test_an_out_of_order_graph_is_sorted_in_memory(tmp_path, mlp, feeds):
    proto = mlp.copy().proto
    nodes = list(proto.graph.node)[::-1]
    del proto.graph.node[:]
    proto.graph.node.extend(nodes)
    loaded = load(_write(proto, tmp_path / "m.onnx"))
    assert [n.name for n in loaded.graph.node] == [n.name for n in mlp.graph.node]
    assert runtime.max_abs_difference(mlp, loaded, feeds) == {"y": 0.0}


@pytest.mark.parametrize("kind", ["sequence", "untyped"])
def test_inputs_onnxcomp_cannot_feed_are_refused_by_name(tmp_path, mlp, kind):
    proto = mlp.copy().proto
    if kind == "sequence":
        proto.graph.input[0].type.CopyFrom(helper.make_sequence_type_proto(
            helper.make_tensor_type_proto(TensorProto.FLOAT, [3, 8])))
    else:
        proto.graph.input[0].ClearField("type")
    with pytest.raises(UserError, match="input 'x'"):
        load(_write(proto, tmp_path / "m.onnx"))


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_nonfinite_weights_are_refused_by_name(tmp_path, mlp, value):
    proto = mlp.copy().proto
    w1 = next(t for t in proto.graph.initializer if t.name == "w1")
    values = numpy_helper.to_array(w1).copy()
    values[2, 3] = value
    w1.CopyFrom(numpy_helper.from_array(values, "w1"))
    with pytest.raises(UserError, match="tensor 'w1' contains (NaN|\\+-Inf)"):
        load(_write(proto, tmp_path / "m.onnx"))


def test_inf_outside_layer_weights_is_kept(tmp_path, mlp):
    proto = mlp.copy().proto
    proto.graph.initializer.append(numpy_helper.from_array(
        np.array([0.0, -np.inf] * 8, np.float32), "mask"))
    _node(proto, "relu").input[0] = "masked"
    proto.graph.node.insert(2, helper.make_node("Add", ["h1", "mask"], ["masked"], name="m"))
    loaded = load(_write(proto, tmp_path / "m.onnx"))
    assert any(t.name == "mask" for t in loaded.graph.initializer)


def test_zero_size_layer_weights_are_refused(tmp_path, mlp):
    proto = mlp.copy().proto
    w2 = next(t for t in proto.graph.initializer if t.name == "w2")
    w2.CopyFrom(numpy_helper.from_array(np.zeros((16, 0), np.float32), "w2"))
    with pytest.raises(UserError, match="weight 'w2' of node 'fc2' has no elements"):
        load(_write(proto, tmp_path / "m.onnx"))


def test_save_never_writes_a_file_the_input_reads(tmp_path, mlp):
    # The input keeps its weights in "w.onnx": saving a model as w.onnx would destroy them.
    path, _ = _external(mlp, tmp_path / "a", data="w.onnx")
    loaded = load(path)  # weights read in: nothing lazy any more
    before = (tmp_path / "a" / "w.onnx").read_bytes()
    with pytest.raises(UserError, match="which the input model reads"):
        save(loaded, tmp_path / "a" / "w.onnx")
    # -o b.onnx where the input reads b.onnx.data, weights in memory (as after prune).
    path, _ = _external(mlp, tmp_path / "b", data="b.onnx.data")
    loaded = load(path)
    with pytest.raises(UserError, match="which the input model reads"):
        save(loaded, tmp_path / "b" / "b.onnx", external_data=True)
    assert (tmp_path / "a" / "w.onnx").read_bytes() == before
    assert not list((tmp_path / "a").glob(".onnxcomp-*"))


def test_check_output_paths_compares_inodes_hard_links_included(tmp_path, mlp):
    path = save(mlp, tmp_path / "m.onnx")
    os.link(path, tmp_path / "h.onnx")
    reads = model_module.files_read(path)
    with pytest.raises(UserError, match="would overwrite"):
        model_module.check_output_paths([tmp_path / "h.onnx"], reads)
    model_module.check_output_paths([tmp_path / "other.onnx", None], reads)


@pytest.mark.parametrize("where", ["proc", "sys", "under-file", "folder", "fifo"])
def test_unusable_output_paths_are_refused_before_any_work(tmp_path, where):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "dir.onnx").mkdir()
    os.mkfifo(tmp_path / "pipe.onnx")
    target = {"proc": Path("/proc/self/out.onnx"), "sys": Path("/sys/out.onnx"),
              "under-file": tmp_path / "afile" / "out.onnx", "folder": tmp_path / "dir.onnx",
              "fifo": tmp_path / "pipe.onnx"}[where]
    with pytest.raises(UserError):
        model_module.check_output_path(target)


_SAVER = textwrap.dedent("""
    import signal
    import sys
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from onnxcomp.model import Model, save

    w = numpy_helper.from_array(np.ones((512, 2048), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 512])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2048])], [w])
    # As a process started from a terminal has them (a test runner under nohup, or in a
    # script's background, passes SIGHUP / SIGINT on ignored, and save keeps an ignored signal
    # ignored).
    signal.signal(signal.SIGHUP, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    save(Model(helper.make_model(graph)), sys.argv[1], external_data=True)
""")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_signal_during_save_leaves_nothing_behind(tmp_path, signum):
    marker = tmp_path / "paused"
    out = tmp_path / "out" / "m.onnx"
    env = dict(os.environ, ONNXCOMP_TEST_SAVE_PAUSE=str(marker),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    process = subprocess.Popen([sys.executable, "-c", _SAVER, str(out)], env=env,
                               stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline and process.poll() is None:
        time.sleep(0.02)
    assert marker.exists(), process.stderr.read().decode()
    staging = Path(marker.read_text())
    assert (staging / "m.onnx.data").stat().st_size >= 512 * 2048 * 4  # mid-save, data written
    process.send_signal(signum)
    rc = process.wait(timeout=60)
    assert rc != 0
    if signum != signal.SIGINT:
        assert rc == 128 + signum
    assert sorted(p.name for p in out.parent.iterdir()) == []


def test_check_input_adds_the_full_check_and_a_session(tmp_path, mlp):
    runtime.check_input(mlp)
    wrong = mlp.copy()
    next(n for n in wrong.graph.node if n.name == "fc1").input[0] = "w2"  # [16,4] @ [8,16]
    with pytest.raises(UserError, match="the input model is not a valid ONNX model"):
        runtime.check_input(wrong)
    with pytest.raises(UserError, match="not a valid ONNX model"):
        runtime.check_input(wrong, session=False)


def test_size_and_writing_a_weight_at_a_time_equal_protobufs(tmp_path):
    """serialized_size measures a weight at a time what ``ByteSize()`` measures by encoding
    the whole model (2.7 s and 1.2 GB on clip-vit-b32), and write_serialized writes what
    ``SerializeToString()`` gives, byte for byte, without holding it: also for weights in
    Constant nodes and subgraphs, model-local functions, metadata and an empty model."""
    import builders

    from onnxcomp.model import serialized_size, write_serialized

    models = [builders.mlp().proto, builders.mlp(weights_as_constant_nodes=True).proto,
              builders.if_graph().proto, builders.attention_block(dim=64, ffn=256).proto,
              onnx.ModelProto()]
    decorated = builders.mlp().proto
    helper.set_model_props(decorated, {"author": "x" * 300})
    decorated.functions.add().CopyFrom(helper.make_function(
        "local", "Twice", ["a"], ["b"], [helper.make_node("Add", ["a", "a"], ["b"])],
        [helper.make_opsetid("", 17)]))
    big = builders.mlp().proto
    big.graph.initializer[0].raw_data = bytes(300_000)  # a multi-byte length prefix
    for index, proto in enumerate([*models, decorated, big]):
        assert serialized_size(proto) == proto.ByteSize()
        write_serialized(proto, tmp_path / f"{index}.onnx")
        assert (tmp_path / f"{index}.onnx").read_bytes() == proto.SerializeToString()


def test_writing_a_protobuf_past_2_gb_is_refused(tmp_path, mlp, monkeypatch):
    """As SerializeToString refuses: such a file could not be read back."""
    from onnxcomp.model import write_serialized

    monkeypatch.setattr(onnxcomp.model, "_entry", lambda size: 2**31)
    with pytest.raises(ValueError, match="2 GB"):
        write_serialized(mlp.proto, tmp_path / "big.onnx")
    assert not (tmp_path / "big.onnx").exists()
