"""Data sources (onnxcomp.calibration): every batch checked, bounded random data, hostile paths and
.npz files refused before they are read, random data sized so the model can take it."""

from __future__ import annotations

import os
import zipfile

import builders
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxcomp import calibration, runtime
from onnxcomp.errors import UserError
from onnxcomp.model import Model


def _mlp() -> Model:
    return builders.mlp()  # x[batch, 8] float -> y[batch, 4]


def _batch(rows: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((rows, 8)).astype(np.float32)}


# ---------------------------------------------------------------------------------------------
# every batch is checked


@pytest.mark.parametrize("bad, words", [
    ({"x": np.zeros((2, 8), np.float64)}, ["batch 2", "'x'", "float64"]),
    ({"x": np.zeros((2, 7), np.float32)}, ["batch 2", "'x'", "axis 1"]),
    ({"x": np.zeros((2, 8, 1), np.float32)}, ["batch 2", "'x'", "rank 3"]),
    ({"y": np.zeros((2, 8), np.float32)}, ["batch 2", "['y']"]),
    ({"x": np.full((2, 8), np.nan, np.float32)}, ["batch 2", "'x'", "NaN/Inf"]),
    ({"x": np.array([[np.inf] + [0] * 7], np.float32)}, ["batch 2", "'x'", "1 NaN/Inf"]),
])
def test_a_bad_later_batch_is_a_user_error_naming_it_and_the_input(bad, words):
    model = _mlp()
    data = calibration.resolve(calibration.from_batches([_batch(), _batch(seed=1), bad]), model)
    assert data.make_batch(1)["x"].shape == (2, 8)
    with pytest.raises(UserError) as caught:
        list(data)
    for word in words:
        assert word in str(caught.value)


def test_check_dataset_wraps_once_and_take_keeps_the_check():
    model = _mlp()
    data = calibration.from_batches([_batch(), {"x": np.zeros((2, 8), np.int64)}])
    calibration.check_dataset(data, model)
    wrapped = data.make_batch
    calibration.check_dataset(data, model)
    assert data.make_batch is wrapped  # idempotent: not checked twice per batch
    with pytest.raises(UserError, match="batch 1"):
        list(data.take(2))


def test_an_npz_folder_names_the_bad_file(tmp_path):
    for i in range(3):
        np.savez(tmp_path / f"b{i}.npz", **_batch(seed=i))
    np.savez(tmp_path / "b3.npz", x=np.zeros((2, 9), np.float32))
    data = calibration.resolve(str(tmp_path), _mlp())
    assert len(data) == 4
    with pytest.raises(UserError) as caught:
        list(data)
    assert "b3.npz" in str(caught.value) and "'x'" in str(caught.value)


def test_a_single_npz_file_is_one_batch(tmp_path):
    np.savez(tmp_path / "one.npz", **_batch())
    data = calibration.resolve(str(tmp_path / "one.npz"), _mlp())
    assert len(data) == 1 and data.make_batch(0)["x"].shape == (2, 8)


# ---------------------------------------------------------------------------------------------
# random:N


@pytest.mark.parametrize("spec", ["random:0", "random:-1", "random:1.5", "random:abc", "random:",
                                  "random:4097", "random:100000000", "random:1e3",
                                  "random:99999999999999999999"])
def test_bad_random_counts_are_refused(spec):
    with pytest.raises(UserError, match="random"):
        calibration.resolve(spec, _mlp())


def test_random_up_to_the_limit_is_lazy():
    data = calibration.resolve(f"random:{calibration.MAX_BATCHES}", _mlp())
    assert len(data) == calibration.MAX_BATCHES
    with pytest.raises(UserError, match="at most"):
        calibration.random_data(_mlp(), calibration.MAX_BATCHES + 1)
    with pytest.raises(UserError, match="count"):
        calibration.random_data(_mlp(), 0)


def test_zoo_counts_are_bounded_too():
    with pytest.raises(UserError, match="at most"):
        calibration.resolve("tiny-clip:calib:5000", _mlp())
    with pytest.raises(UserError, match="positive"):
        calibration.resolve("tiny-clip:0", _mlp())


def _single_input(value_info: onnx.ValueInfoProto, op: str = "Identity") -> Model:
    graph = helper.make_graph([helper.make_node(op, ["x"], ["y"])], "g", [value_info],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    return Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_huge_declared_dims_are_refused_before_allocating():
    model = _single_input(helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2**40]))
    with pytest.raises(UserError, match="MiB"):
        calibration.resolve("random:1", model)


def test_non_tensor_and_untyped_inputs_are_user_errors():
    sequence = helper.make_tensor_sequence_value_info("x", TensorProto.FLOAT, [2])
    with pytest.raises(UserError, match="sequence"):
        calibration.random_data(_single_input(sequence), 1)
    untyped = onnx.ValueInfoProto(name="x")
    with pytest.raises(UserError, match="no type"):
        calibration.random_data(_single_input(untyped), 1)
    undefined = helper.make_tensor_value_info("x", TensorProto.UNDEFINED, [2])
    with pytest.raises(UserError, match="element type"):
        calibration.random_data(_single_input(undefined), 1)


# ---------------------------------------------------------------------------------------------
# hostile paths and .npz files


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "calib.npz"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="FIFO"):
        calibration.resolve(str(fifo), _mlp())
    folder = tmp_path / "folder"
    folder.mkdir()
    np.savez(folder / "a.npz", **_batch())
    os.mkfifo(folder / "b.npz")
    with pytest.raises(UserError, match="FIFO"):
        calibration.resolve(str(folder), _mlp())


def test_devices_and_symlink_loops_are_refused(tmp_path):
    with pytest.raises(UserError, match="device"):
        calibration.resolve("/dev/null", _mlp())
    loop = tmp_path / "loop"
    os.symlink(loop, loop)
    with pytest.raises(UserError, match="symlink loop"):
        calibration.resolve(str(loop), _mlp())
    folder = tmp_path / "folder"
    folder.mkdir()
    os.symlink(folder / "x.npz", folder / "x.npz")
    with pytest.raises(UserError, match="symlink loop"):
        calibration.resolve(str(folder), _mlp())


def test_a_plain_file_is_not_a_data_source(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="is a file"):
        calibration.resolve(str(tmp_path / "notes.txt"), _mlp())


def test_pickled_objects_are_refused(tmp_path):
    np.savez(tmp_path / "p.npz", x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(UserError, match="Python objects"):
        calibration.resolve(str(tmp_path), _mlp())


def _npz_with_header(path, shape, payload: bytes = b"") -> None:
    header = {"descr": "<f4", "fortran_order": False, "shape": shape}
    with zipfile.ZipFile(path, "w") as archive, archive.open("x.npy", "w") as member:
        np.lib.format.write_array_header_1_0(member, header)
        member.write(payload)


def test_absurd_declared_sizes_are_refused_from_the_header(tmp_path):
    _npz_with_header(tmp_path / "huge.npz", (2**20, 2**20))
    with pytest.raises(UserError, match="MiB"):
        calibration.resolve(str(tmp_path / "huge.npz"), _mlp())


def test_truncated_and_garbage_npz_are_refused(tmp_path):
    _npz_with_header(tmp_path / "short.npz", (2, 8), b"\0" * 10)
    with pytest.raises(UserError, match="truncated"):
        calibration.resolve(str(tmp_path / "short.npz"), _mlp())
    (tmp_path / "junk.npz").write_bytes(os.urandom(200))
    with pytest.raises(UserError, match="not a readable .npz"):
        calibration.resolve(str(tmp_path / "junk.npz"), _mlp())
    with zipfile.ZipFile(tmp_path / "other.npz", "w") as archive:
        archive.writestr("x.txt", "not an array")
    with pytest.raises(UserError, match="not an .npy"):
        calibration.resolve(str(tmp_path / "other.npz"), _mlp())


# ---------------------------------------------------------------------------------------------
# random data that fits dynamic dims


def strided_skip_net(levels: int = 5, concat: bool = False) -> Model:
    return builders.strided_skip_net(levels, concat, seed=3)


@pytest.mark.parametrize("concat", [False, True])
def test_random_data_fits_strided_skip_connections(concat):
    model = strided_skip_net(concat=concat)
    assert calibration.stride_divisors(model) == {"x": [32, 32]}
    data = calibration.resolve("random:2", model)
    shape = data.make_batch(0)["x"].shape
    assert shape[2] % 32 == 0 and shape[3] % 32 == 0
    runtime.run_model(model, data.make_batch(1))  # the model takes it


def test_named_dims_are_kept_as_given():
    model = strided_skip_net(levels=2)
    data = calibration.random_data(model, 1, dims={"height": 8, "width": 12})
    assert data.make_batch(0)["x"].shape == (1, 3, 8, 12)


def _space_to_depth(block: int) -> Model:
    x = builders.tensor("x", [1, 2, "h", "w"])
    return Model(helper.make_model(
        helper.make_graph([helper.make_node("SpaceToDepth", ["x"], ["y"], blocksize=block)],
                          "s2d", [x], [builders.tensor("y", [1, None, None, None])]),
        opset_imports=[helper.make_opsetid("", 17)]))


def test_try_and_shrink_finds_a_size_the_graph_analysis_cannot_see():
    model = _space_to_depth(32)  # needs multiples of 32; no strides to read it from
    assert calibration.stride_divisors(model) == {}
    shape = calibration.random_data(model, 1).make_batch(0)["x"].shape
    assert shape[2] % 32 == 0 and shape[3] % 32 == 0


def test_no_size_that_runs_is_a_user_error_naming_the_flags():
    model = _space_to_depth(11)  # 11 divides none of the sizes tried
    with pytest.raises(UserError) as caught:
        calibration.resolve("random:1", model)
    message = str(caught.value)
    assert "--calib" in message and "--data" in message and "\n" not in message


def test_sequence_dims_keep_the_default_without_a_trial():
    model = builders.attention_block()
    shapes = calibration.fitting_shapes(model)
    assert shapes == {"x": [1, 6, 16]}
    free = _single_input(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "s"]))
    assert calibration.fitting_shapes(free) == {"x": [1, calibration.DEFAULT_DYNAMIC_DIM]}


@pytest.mark.zoo
def test_ppocr_det_random_data_fits_and_is_recognised_in_memory():
    from onnxcomp import zoo
    from onnxcomp.model import load

    model = load(zoo.fetch("ppocr-det"))
    assert calibration.zoo_name(model) == "ppocr-det"
    data = calibration.resolve("random:1", model)
    shape = data.make_batch(0)["x"].shape
    assert shape[2] % 32 == 0 and shape[3] % 32 == 0
    runtime.run_model(model, data.make_batch(0))
    anonymous = Model(model.proto)  # no source folder: recognised by sha256, else by trial
    assert calibration.zoo_name(anonymous) == "ppocr-det"
    edited = Model(onnx.ModelProto.FromString(model.proto.SerializeToString()))
    edited.graph.doc_string = "not the zoo file any more"
    assert calibration.zoo_name(edited) is None
    shape = calibration.random_data(edited, 1).make_batch(0)["x"].shape
    assert shape[2] % 32 == 0 and shape[3] % 32 == 0
    runtime.run_model(edited, calibration.random_data(edited, 1).make_batch(0))


@pytest.mark.zoo
def test_ppocr_det_validates_against_itself_from_the_cli(capsys):
    from onnxcomp import cli, zoo

    path = str(zoo.fetch("ppocr-det"))  # random:1 at 16x16 used to fail inside the model
    assert cli.main(["validate", path, path, "--count", "1"]) == 0
    assert capsys.readouterr().err.count("error") == 0


@pytest.mark.parametrize("constant_nodes", [False, True])
def test_a_dynamic_channel_axis_takes_the_first_convs_channels(constant_nodes):
    model = builders.conv_net(constant_nodes=constant_nodes)
    for i, dim in enumerate(model.graph.input[0].type.tensor_type.shape.dim):
        dim.dim_param = f"d{i}"  # every axis dynamic: [d0, d1, d2, d3]
    shape = calibration.random_data(model, 1).make_batch(0)["x"].shape
    assert shape[:2] == (1, 3)
    runtime.run_model(model, calibration.random_data(model, 1).make_batch(0))


def test_session_with_outputs_needs_no_copy_and_leaves_the_model_as_it_was():
    model = builders.mlp()
    before = model.proto.SerializeToString()
    names = [n.output[0] for n in model.graph.node][:-1]
    data = calibration.random_data(model, 2)
    sess = calibration.session_with_outputs(model, names)
    assert model.proto.SerializeToString() == before
    whole = runtime.session(calibration.with_outputs(model, names), optimize=False)
    for batch in data:
        got, want = runtime.run(sess, batch, names), runtime.run(whole, batch, names)
        for name in names:
            np.testing.assert_array_equal(got[name], want[name])
    with pytest.raises(UserError):  # ONNX Runtime refuses: the model is still put back
        calibration.session_with_outputs(model, ["no such tensor"])
    assert model.proto.SerializeToString() == before
