"""runtime's checks of our own output: onnx.checker (full or structural) and a session load."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
from conftest import make_mlp

from onnxcomp import runtime
from onnxcomp.errors import InvalidOutput, UserError
from onnxcomp.model import load
from onnxcomp.zoo.llama import PRESETS, build

BACKEND_DATA = Path(onnx.__file__).parent / "backend" / "test" / "data"


def test_the_structural_check_without_weights_agrees_with_onnx_checker():
    # The skeleton (every tensor a one-element placeholder) passes or fails as the model does.
    models = sorted(BACKEND_DATA.rglob("*.onnx"))
    assert len(models) > 100
    disagree = []
    for path in models:
        proto = onnx.load(str(path))
        before = proto.SerializeToString()
        verdicts = []
        for candidate in (proto, runtime._skeleton(proto)):
            try:
                onnx.checker.check_model(candidate)
                verdicts.append(True)
            except onnx.checker.ValidationError:
                verdicts.append(False)
        assert proto.SerializeToString() == before
        if verdicts[0] != verdicts[1]:
            disagree.append(path.parent.name)
    assert not disagree


def test_a_lazy_model_is_checked_from_anywhere_without_reading_its_weights(tmp_path,
                                                                          monkeypatch):
    path = build(tmp_path / "src" / "tiny.onnx", PRESETS["tiny"])
    lazy = load(path, load_weights=False)
    monkeypatch.chdir(tmp_path)  # external data is not looked up in the working directory
    monkeypatch.setattr(onnx.external_data_helper, "load_external_data_for_model",
                        lambda *a, **k: pytest.fail("weights read in"))
    assert not runtime.fits_full_check(lazy)
    runtime.check_onnx(lazy, "the lazy model")
    runtime.check_loads(lazy, "the lazy model")
    assert lazy.lazy
    broken = lazy.copy()
    broken.graph.node[1].input[0] = "missing"
    with pytest.raises(InvalidOutput, match="the broken model is not a valid ONNX model"):
        runtime.check_onnx(broken, "the broken model")


def test_our_output_gets_the_full_check_and_a_session():
    model = make_mlp()
    runtime.check_onnx(model, "m")
    runtime.check_loads(model, "m")
    # The full check infers shapes: a declared output shape that contradicts them fails it,
    # while the structural check does not look.
    wrong = model.copy()
    wrong.graph.output[0].type.tensor_type.shape.dim[1].dim_value = 5
    runtime.check_onnx(wrong, "m", full=False)
    with pytest.raises(InvalidOutput, match="m is not a valid ONNX model"):
        runtime.check_onnx(wrong, "m")
    refused = model.copy()
    next(n for n in refused.graph.node if n.op_type == "Relu").domain = "com.example"
    refused.proto.opset_import.append(onnx.helper.make_opsetid("com.example", 1))
    runtime.check_onnx(refused, "m")
    with pytest.raises(InvalidOutput, match="ONNX Runtime refuses m"):
        runtime.check_loads(refused, "m")
    # The same model given by the user is the user's error.
    with pytest.raises(UserError, match="ONNX Runtime could not load the model"):
        runtime.session(refused)


def test_a_model_that_crashes_onnx_runtimes_optimizer_is_refused_not_a_crash():
    """Found by fuzzing: ONNX Runtime 1.32 segfaults optimizing a LayerNormalization whose
    optional bias is omitted (valid ONNX). The child-process probe turns that into a UserError;
    without it this test process would die. Where ONNX Runtime is fixed, the session opens."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from onnxcomp import runtime
    from onnxcomp.errors import UserError
    from onnxcomp.model import Model

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8])
    gamma = numpy_helper.from_array(np.ones(8, np.float32), "g")
    w = numpy_helper.from_array(np.eye(8, dtype=np.float32), "w")
    nodes = [helper.make_node("LayerNormalization", ["x", "g", ""], ["n"], name="ln", axis=-1),
             helper.make_node("MatMul", ["n", "w"], ["y"], name="mm")]
    graph = helper.make_graph(nodes, "ln_no_bias", [x], [y], [gamma, w])
    model = Model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    try:
        runtime.session(model)
    except UserError as exc:
        assert "crashed" in str(exc)


def test_reports_name_the_cpu_and_its_int8_dot_product():
    """Int8 figures depend on VNNI (without it, u8 x s8 pair sums saturate): reports say which."""
    from onnxcomp.report import cpu

    intel = "model name\t: Intel Xeon\nflags\t\t: fpu avx2 avx512f avx512_vnni\n"
    assert cpu(intel) == {"cpu": "Intel Xeon", "int8_dot_product": "avx512-vnni"}
    amd = "model name\t: AMD EPYC\nflags\t\t: fpu sse4_2 avx avx2\n"
    assert cpu(amd) == {"cpu": "AMD EPYC", "int8_dot_product": "avx2 (no vnni)"}
    assert cpu("processor\t: 0\n") == {}


def test_a_large_in_memory_model_reaches_onnx_runtime_through_one_file(monkeypatch, tmp_path):
    """Above FILE_SESSION_BYTES the model goes through a temporary file (ONNX Runtime held two
    copies of the weights when given bytes); one file, not external data, under the protobuf
    limit; the outputs are the same as from bytes."""
    import numpy as np

    model = make_mlp()
    model.source = tmp_path
    feeds = {"x": np.linspace(-1, 1, 16, dtype=np.float32).reshape(2, 8)}
    from_bytes = runtime.run(runtime.session(model, optimize=False), feeds)
    saved: list[tuple[Path, bool]] = []
    real_save = runtime.save_for_session

    def spy(model_, folder):
        path = real_save(model_, folder)
        saved.append((path, (path.parent / (path.name + ".data")).exists()))
        return path

    monkeypatch.setattr(runtime, "FILE_SESSION_BYTES", 0)
    monkeypatch.setattr(runtime, "save_for_session", spy)
    from_file = runtime.run(runtime.session(model, optimize=False), feeds)
    assert len(saved) == 1 and saved[0][1] is False   # one self-contained file
    assert not saved[0][0].exists()                   # the temporary folder is gone
    assert model.source == tmp_path                   # and the model is not "from" there
    assert all(np.array_equal(from_bytes[k], from_file[k]) for k in from_bytes)


def test_freeing_memory_collects_reference_cycles():
    """Graph-surgeon graphs are cycles (nodes <-> tensors): release_free_memory(collect=True)
    collects them before trimming the heap, else their copies of the weights outlive the pass
    (the pipeline asks for it after each step on a large model)."""
    import gc
    import weakref

    class Node:
        pass

    gc.disable()
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a
        alive = weakref.ref(a)
        del a, b
        assert alive() is not None        # only a cycle collection frees it
        runtime.release_free_memory()     # (by default not: a full collection is slow)
        assert alive() is not None
        runtime.release_free_memory(collect=True)
        assert alive() is None
    finally:
        gc.enable()


def test_no_room_for_the_temporary_file_falls_back_to_bytes(monkeypatch):
    import numpy as np

    model = make_mlp()
    feeds = {"x": np.ones((1, 8), np.float32)}
    expected = runtime.run(runtime.session(model, optimize=False), feeds)

    def disk_full(model_, folder):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runtime, "FILE_SESSION_BYTES", 0)
    monkeypatch.setattr(runtime, "save_for_session", disk_full)
    got = runtime.run(runtime.session(model, optimize=False), feeds)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)
