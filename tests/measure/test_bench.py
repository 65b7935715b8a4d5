"""bench: keys, orderings, ratios, sizes and errors on tiny in-memory models (runs=5)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxcomp import calibration
from onnxcomp.errors import OnnxcompError
from onnxcomp.measure.bench import bench, model_size, parameter_count, percentiles
from onnxcomp.model import Model
from onnxcomp.report import bench_table


def mlp(hidden: int = 64) -> Model:
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((32, hidden)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(np.zeros(hidden, np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, 10)).astype(np.float32), "w2")
    shape = numpy_helper.from_array(np.array([-1, 10], np.int64), "shape")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]),
         helper.make_node("Add", ["h", "b1"], ["hb"]),
         helper.make_node("Relu", ["hb"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["o"]),
         helper.make_node("Reshape", ["o", "shape"], ["y"])],
        "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 10])], [w1, b1, w2, shape])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.checker.check_model(proto)
    return Model(proto)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("bench") / "mlp.onnx"
    mlp().save(path)
    return path


def test_percentiles_match_numpy():
    times = [0.003, 0.001, 0.002, 0.010, 0.004]
    stats = percentiles(times)
    ms = np.array(times) * 1000
    assert stats["p50_ms"] == pytest.approx(np.median(ms))
    assert stats["p90_ms"] == pytest.approx(np.percentile(ms, 90))
    assert stats["p99_ms"] == pytest.approx(np.percentile(ms, 99))
    assert stats["min_ms"] == pytest.approx(1.0)


def test_same_model_twice(model_path):
    report = bench([model_path, model_path], threads=(1, 2), batch=3, runs=5, warmup=1,
                   min_seconds=0, progress=None)
    data = report.bench
    assert [m["name"] for m in data["models"]] == ["mlp", "mlp#2"]
    assert [r["model_index"] for r in data["results"]] == [0, 1, 0, 1]
    assert len(data["results"]) == 4  # 2 models x 2 thread counts
    for row in data["results"]:
        for key in ("p50_ms", "p90_ms", "p99_ms", "mean_ms", "min_ms", "throughput",
                    "latency_ratio", "speedup"):
            assert row[key] > 0, key
        assert row["p50_ms"] <= row["p90_ms"] <= row["p99_ms"]
        assert row["throughput"] == pytest.approx(3 / (row["p50_ms"] / 1000))
        assert row["provider"] == "CPUExecutionProvider" and row["runs"] == 5
    first, second = data["results"][0], data["results"][1]
    assert first["latency_ratio"] == 1.0
    assert 0.1 < second["latency_ratio"] < 10  # same model: only noise apart
    assert [m["size_ratio"] for m in data["models"]] == [1.0, 1.0]
    assert data["models"][0]["params"] == data["models"][1]["params"] == 32 * 64 + 64 + 64 * 10
    assert data["batch"] == 3
    memory = data["memory"]
    assert len(memory) == 2
    for row in memory:
        assert row["peak_rss_mb"] > 10 and row["peak_rss_mb"] >= row["session_peak_mb"] >= 0
    table = bench_table(data)
    assert "mlp#2" in table and "p50 ms" in table
    assert "p50 ms" in report.table()


def test_in_memory_models_sizes_and_data(model_path):
    small, big = mlp(16), mlp(256)
    batches = [{"x": np.ones((2, 32), np.float32)}]
    report = bench([small, big], runs=5, warmup=0, data=calibration.from_batches(batches),
                   names=["small", "big"], memory=False, min_seconds=0, progress=None)
    data = report.bench
    assert [m["name"] for m in data["models"]] == ["small", "big"]
    assert data["batch"] == 2 and data["memory"] == []
    sizes = [m["bytes"] for m in data["models"]]
    assert data["models"][1]["size_ratio"] == pytest.approx(sizes[1] / sizes[0])
    assert sizes[1] > 10 * 256 * 4  # really the bigger file
    assert parameter_count(small) == 32 * 16 + 16 + 16 * 10


def test_min_seconds_extends_short_runs(model_path):
    report = bench([model_path, model_path], runs=5, warmup=0, memory=False, min_seconds=0.2,
                   progress=None)
    rows = report.bench["results"]
    assert report.bench["spinning"] is True
    assert rows[0]["runs"] == rows[1]["runs"] > 5  # a ~10 us model needs many rounds for 0.2 s
    assert "at least 5" in bench_table(report.bench)


def test_without_spinning(model_path):
    report = bench([model_path], threads=2, runs=5, warmup=1, memory=False, min_seconds=0,
                   spinning=False, progress=None)
    assert report.bench["spinning"] is False and report.bench["results"][0]["p50_ms"] > 0


def test_memory_peak_is_the_childs_own(model_path):
    """The child's peak must not inherit this process's size (ru_maxrss does across exec)."""
    from onnxcomp.measure.bench import measure_memory

    ballast = np.ones(300 * 2**20 // 8)  # this process grows by 300 MB
    measured = measure_memory(model_path, "cpu", 1, {"x": np.ones((1, 32), np.float32)})
    assert ballast.sum() > 0
    assert 10 < measured["peak_rss_mb"] < 250
    assert 0 <= measured["session_peak_mb"] < measured["peak_rss_mb"]


def test_model_size_counts_external_data(tmp_path):
    model = mlp(256)
    path = tmp_path / "ext.onnx"
    model.save(path, external_data=True)
    data_file = tmp_path / "ext.onnx.data"
    assert data_file.exists()
    assert model_size(path) == path.stat().st_size + data_file.stat().st_size


def test_bad_arguments(model_path):
    with pytest.raises(OnnxcompError, match="unknown provider 'foo'"):
        bench([model_path], providers=["foo"], runs=5, progress=None)
    with pytest.raises(OnnxcompError, match="provider 'cuda'.*not available"):
        bench([model_path], providers=["cuda"], runs=5, progress=None)
    with pytest.raises(OnnxcompError, match="threads must be positive"):
        bench([model_path], threads=[0], runs=5, progress=None)
    with pytest.raises(OnnxcompError, match="names"):
        bench([model_path, model_path], names=["a"], runs=5, progress=None)
    with pytest.raises(OnnxcompError, match="no such file"):
        bench([model_path.parent / "missing.onnx"], runs=5, progress=None)


def test_tradeoff_plot(tmp_path, model_path):
    pytest.importorskip("matplotlib")
    from onnxcomp.report import plot_tradeoff

    report = bench([model_path, mlp(256)], runs=5, warmup=0, memory=False, min_seconds=0,
                   progress=None)
    names = [m["name"] for m in report.bench["models"]]
    out = plot_tradeoff(report.bench, tmp_path / "plot.png", fidelity={names[1]: 0.9991})
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.zoo
def test_ppocr_rec_with_zoo_data():
    from onnxcomp import zoo

    path = zoo.fetch("ppocr-rec")
    report = bench([path], runs=5, warmup=1, data="ppocr-rec:eval:1", memory=False,
                   min_seconds=0, progress=None)
    (row,) = report.bench["results"]
    assert row["p50_ms"] > 0 and report.bench["models"][0]["params"] > 1_000_000


def test_a_model_that_cannot_run_on_the_inputs_is_named(tmp_path, model_path):
    # Valid, but Reshape [-1, 3] of [N, 8] runs only where 8 * N divides by 3.
    graph = helper.make_graph(
        [helper.make_node("Reshape", ["x", "shape"], ["y"])], "cut",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])],
        [numpy_helper.from_array(np.array([-1, 3], np.int64), "shape")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    path = tmp_path / "cut.onnx"
    Model(proto).save(path)
    with pytest.raises(OnnxcompError, match=rf"{path} cannot run on the bench inputs \(check "
                                            r"--data and --batch\)"):
        bench([path], runs=1, memory=False, min_seconds=0, progress=None)
    report = bench([path], batch=3, runs=1, memory=False, min_seconds=0, progress=None)
    assert report.bench["results"][0]["runs"] == 1


def test_timings_are_kept_for_the_report(model_path):
    from onnxcomp.measure.bench import kept_times

    assert kept_times([0.001, 0.00123456789]) == [1.0, 1.2346]
    thinned = kept_times(np.arange(5000) / 1e6, limit=1000)
    assert len(thinned) == 1000 and thinned[0] == 0.0 and thinned[-1] == pytest.approx(4.999)
    report = bench([model_path, model_path], runs=7, memory=False, min_seconds=0,
                   progress=None)
    for result in report.bench["results"]:
        assert len(result["times_ms"]) == result["runs"] == 7
        assert min(result["times_ms"]) == pytest.approx(result["min_ms"], abs=1e-4)


def test_a_progress_task_per_provider_and_threads(model_path):
    lines = []
    bench([model_path], threads=[1, 2], runs=3, memory=False, min_seconds=0,
          progress=lines.append)
    starts = [line for line in lines if line.endswith("0/3, 0%")]
    assert starts == ["bench cpu, 1 thread(s), 1 model(s): 0/3, 0%",
                      "bench cpu, 2 thread(s), 1 model(s): 0/3, 0%"]
    assert any(line.startswith("bench cpu, 2 thread(s), 1 model(s): 3/3 in") for line in lines)


# ---------------------------------------------------------------------------------------------
# Runtimes (OpenVINO's own API), the OpenVINO EP's missing package, --shape

def _has_openvino() -> bool:
    from onnxcomp import runtime_openvino

    return runtime_openvino.available()


@pytest.mark.skipif(not _has_openvino(), reason="openvino is not installed "
                    "(pip install 'onnxcomp[openvino]')")
def test_openvino_and_onnx_runtime_interleaved(model_path):
    report = bench([model_path, mlp(128)], runs=5, warmup=1, memory=False, min_seconds=0,
                   progress=None, runtimes="onnxruntime,openvino:f32")
    rows = report.bench["results"]
    assert [(r["runtime"], r["model_index"]) for r in rows] == [
        ("onnxruntime", 0), ("onnxruntime", 1), ("openvino", 0), ("openvino", 1)]
    assert rows[0]["vs_first"] == 1.0 and rows[2]["latency_ratio"] == 1.0
    assert rows[2]["provider"] == "OpenVINO CPU" and rows[2]["runs"] == 5
    assert report.environment["runtimes"] == ["onnxruntime", "openvino"]
    assert report.environment["openvino_precision"] == "f32"
    only = bench([model_path], runs=3, memory=True, min_seconds=0, progress=None,
                 runtimes=["openvino"])
    assert only.bench["memory"] == [] and "ONNX Runtime only" in " ".join(only.notes)
    assert "p50 ms" in only.table()


def test_unknown_runtime_and_missing_openvino_ep(model_path):
    import onnxruntime as ort

    with pytest.raises(OnnxcompError, match="unknown runtime 'tvm'"):
        bench([model_path], runs=1, progress=None, runtimes="tvm")
    with pytest.raises(OnnxcompError, match="precision must be"):
        bench([model_path], runs=1, progress=None, runtimes="openvino:int3")
    if "OpenVINOExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(OnnxcompError, match="onnxruntime-openvino.*own virtual env"):
            bench([model_path], providers=["openvino"], runs=1, progress=None)


def test_shapes_set_the_random_inputs(model_path):
    report = bench([model_path], runs=1, warmup=0, memory=False, min_seconds=0, progress=None,
                   shapes={"x": [5, 32]})
    assert report.bench["batch"] == 5
    for shapes, words in (({"nope": [1, 32]}, "no input 'nope'"),
                          ({"x": [1, 32, 1]}, "3 dims given"),
                          ({"x": [1, 31]}, "axis 1 is fixed at 32")):
        with pytest.raises(OnnxcompError, match=words):
            bench([model_path], runs=1, memory=False, progress=None, shapes=shapes)
    with pytest.raises(OnnxcompError, match="not with --data"):
        bench([model_path], runs=1, progress=None, shapes={"x": [1, 32]}, data="random:1")


def test_models_with_the_same_inputs_are_timed_on_the_same_feeds():
    """Drawn per model, random data once fitted a quantized PP-OCR rec narrower than its float
    original (0.09x "latency"): models with the same input signature share the first's feeds."""
    from builders import conv_net, mlp

    from onnxcomp.measure.bench import _shared_feeds

    a, b, other = conv_net(), conv_net(seed=1), mlp()
    feeds = _shared_feeds([a, b, other], None, 1, None)
    assert feeds[0] is feeds[1]
    assert set(feeds[2]) == {i.name for i in other.graph.input}


def test_round_orders_are_seeded_balanced_and_never_repeat_a_runner():
    from itertools import islice, pairwise

    from onnxcomp.measure.bench import _round_orders

    rounds = list(islice(_round_orders(4), 2000))
    assert rounds[:50] == list(islice(_round_orders(4), 50))  # seeded: reruns time alike
    assert all(sorted(order) == [0, 1, 2, 3] for order in rounds)
    sequence = [i for order in rounds for i in order]
    assert all(a != b for a, b in pairwise(sequence))
    # every runner follows each other runner about equally often: no seat is favoured
    follows = np.zeros((4, 4))
    for before, after in pairwise(sequence):
        follows[after, before] += 1
    off_diagonal = follows[~np.eye(4, dtype=bool)]
    assert off_diagonal.min() > 0.85 * off_diagonal.mean()
    # the first runner (the float reference) is not always the one a round opens with
    assert 0.15 < np.mean([order[0] == 0 for order in rounds]) < 0.35
    assert list(islice(_round_orders(1), 3)) == [[0], [0], [0]]


def test_sessions_without_spinning_keep_the_providers_options(monkeypatch):
    """--no-spinning builds its own session options: the OpenVINO EP must still get its thread
    count and FP32 (it ran on every core at its default precision before)."""
    import onnxruntime as ort

    from onnxcomp.measure import bench as bench_module

    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["OpenVINOExecutionProvider", "CPUExecutionProvider"])
    seen = {}

    class Session:
        def __init__(self, path, options, providers):
            seen.update(options=options, providers=providers)

    monkeypatch.setattr(ort, "InferenceSession", Session)
    bench_module._session_without_spinning("m.onnx", "OpenVINOExecutionProvider", 1)
    assert seen["providers"] == [
        ("OpenVINOExecutionProvider",
         {"device_type": "CPU", "precision": "FP32", "num_of_threads": "1"}),
        "CPUExecutionProvider"]
    assert seen["options"].intra_op_num_threads == 1
    assert seen["options"].get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_time_runners_follows_the_orders_it_is_given():
    from onnxcomp.measure.bench import _time_runners

    calls = []

    class Runner:
        def __init__(self, index):
            self.index = index

        def first_run(self):
            pass

        def __call__(self):
            calls.append(self.index)

    runners = [Runner(i) for i in range(3)]
    times = _time_runners(runners, 2, 0, orders=iter([[2, 0, 1], [1, 2, 0]]))
    assert calls == [2, 0, 1, 1, 2, 0] and [len(t) for t in times] == [2, 2, 2]
