"""Latency, throughput, peak memory, size and parameter count, per provider and thread count.

How the timings are taken, so that two models can be compared fairly on a noisy machine:
- one ONNX Runtime session per model (default graph optimizations) for each provider x threads;
- warm-up runs, then timed runs *interleaved* in one process: round r runs every model once, in
  a seeded random order that never times a model straight after itself, so machine noise, clock
  changes and cache state hit all models alike (a fixed or palindromic order favoured the model
  that closed a round, measured in docs/bench_stability.md); at least ``runs`` rounds, and more
  until the rounds span ``min_seconds`` (1 s by default): 30 runs of a 0.2 ms model last 6 ms,
  short enough for one burst of another process to move the median;
- p50/p90/p99 over the timed runs (``numpy.percentile``, linear interpolation), throughput =
  batch / p50, and ratios against the first model (p50 ratio and file size ratio);
- the timings themselves, for the HTML report's distributions: ``times_ms`` (ms, 4 decimals, at
  most ``TIMES_KEPT`` evenly spaced over the run order).
- GPU providers (CUDA, TensorRT; DirectML) use I/O binding: inputs are copied to the device once
  and outputs stay on the device, so host/device copies are not timed.

Peak memory is measured apart from the timings, in a fresh child process per model (a
``python -c`` subprocess, so no state or cached allocator of this process leaks in): the child
reads its resident set size (``VmRSS``) after importing ONNX Runtime and loading the inputs, then
creates the session, runs it a few times and reads its peak resident size. ``peak_rss_mb`` is that
absolute peak and ``session_peak_mb`` the peak minus the resident size before the session was
created: the memory the model costs (weights, optimized graph, arenas, activations). Device
memory is not included. The peak is ``VmHWM`` from /proc/self/status, not
``getrusage(RUSAGE_SELF).ru_maxrss``: on Linux exec carries the parent's ru_maxrss over to the
child, so a child started from a process holding 160 MB reported a 160 MB peak whatever the model
(measured). ``ru_maxrss`` remains the fallback where /proc is missing.

Runtimes: ``runtimes=("openvino",)`` times the models through OpenVINO's own API
(``onnxcomp.runtime_openvino``: ``Core().compile_model(path, "CPU", {INFERENCE_NUM_THREADS,
...})``, one infer request per model) with the same method, table and JSON; each result row
says its ``runtime``. Several runtimes (``("onnxruntime", "openvino")``) are timed in one
interleaved loop per thread count, every model in every runtime each round, so their ratios
are side by side; ``latency_ratio`` is against the first model in the same runtime and
provider, ``vs_first`` against the very first model and runtime. Peak memory is measured for
ONNX Runtime only. ``openvino_precision`` sets OpenVINO's ``INFERENCE_PRECISION_HINT`` (None:
the plugin's default, bf16 on CPUs that have it). Missing runtimes and providers are one
``UserError`` line: OpenVINO not installed, or the OpenVINO execution provider, which needs
``onnxruntime-openvino`` in its own virtual environment (it replaces the ``onnxruntime``
module).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from onnx import external_data_helper

from onnxcomp import calibration, runtime
from onnxcomp.errors import UserError
from onnxcomp.model import Model, iter_tensors, load
from onnxcomp.progress import Progress, Task, as_progress
from onnxcomp.report import Report
from onnxcomp.report import progress as default_progress

MEMORY_RUNS = 3
# Timings kept per result in the report (``times_ms``); the percentiles use them all.
TIMES_KEPT = 1000
# OrtValue device names for providers whose inputs should live on the device.
DEVICE_OF_PROVIDER = {
    "CUDAExecutionProvider": "cuda",
    "TensorrtExecutionProvider": "cuda",
    "DmlExecutionProvider": "dml",
}


def percentiles(times_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/mean/min of run times given in seconds, in milliseconds."""
    ms = np.asarray(times_s, dtype=np.float64) * 1000.0
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {"p50_ms": float(p50), "p90_ms": float(p90), "p99_ms": float(p99),
            "mean_ms": float(ms.mean()), "min_ms": float(ms.min())}


def kept_times(times_s: Sequence[float], limit: int = TIMES_KEPT) -> list[float]:
    """Run times (seconds) as milliseconds rounded to 4 decimals, thinned to at most ``limit``
    evenly spaced over the run order (so a drift over the runs still shows)."""
    ms = np.asarray(times_s, dtype=np.float64) * 1000.0
    if ms.size > limit:
        ms = ms[np.linspace(0, ms.size - 1, limit).round().astype(np.int64)]
    return [round(float(t), 4) for t in ms]


def model_size(path: str | os.PathLike) -> int:
    """Bytes on disk: the .onnx file plus every external data file it references (once each);
    an .ort file's own size."""
    path = Path(path)
    if path.suffix.lower() == ".ort":
        return path.stat().st_size
    proto = load(path, load_weights=False).proto
    total = path.stat().st_size
    locations = set()
    for tensor in iter_tensors(proto):
        if external_data_helper.uses_external_data(tensor):
            locations.add(external_data_helper.ExternalDataInfo(tensor).location)
    for location in locations:
        total += (path.parent / location).stat().st_size
    return total


def parameter_count(model: Model) -> int:
    """``Model.parameter_count`` (the one count: 64-bit integer shape tensors excluded)."""
    return model.parameter_count()


class _Runner:
    """One session with its inputs ready; ``__call__`` runs it once (timed by the caller)."""

    def __init__(self, path: str, provider: str, threads: int | None,
                 feeds: dict[str, np.ndarray], spinning: bool = True):
        import onnxruntime as ort

        self.provider = runtime.resolve_provider(provider)
        self.path = path
        try:
            if spinning:
                self.session = runtime.session(path, provider=provider, threads=threads)
            else:
                self.session = _session_without_spinning(path, self.provider, threads)
        except UserError as exc:
            raise UserError(f"{path}: {exc}") from None
        if self.provider not in self.session.get_providers():
            # ORT falls back to the CPU when a provider's libraries fail to load: say so rather
            # than report CPU timings under the provider's name.
            raise UserError(f"provider {provider!r} could not be initialised for {path} "
                                f"(session providers: {', '.join(self.session.get_providers())})")
        self.feeds = feeds
        self.outputs = [o.name for o in self.session.get_outputs()]
        device = DEVICE_OF_PROVIDER.get(self.provider)
        self.binding = None
        if device:
            # Untested here (this machine has no GPU): inputs copied to the device once, outputs
            # bound to the device, so the timed run excludes host <-> device copies.
            binding = self.session.io_binding()
            for name, array in feeds.items():
                value = ort.OrtValue.ortvalue_from_numpy(array, device, 0)
                binding.bind_ortvalue_input(name, value)
            for name in self.outputs:
                binding.bind_output(name, device, 0)
            self.binding = binding

    def first_run(self) -> None:
        """Run once, a model that cannot run on the inputs being the user's error."""
        try:
            self()
        except MemoryError:
            raise
        except Exception as exc:  # ONNX Runtime's errors: the inputs do not fit the model
            lines = str(exc).strip().splitlines() or [type(exc).__name__]
            raise UserError(f"{self.path} cannot run on the bench inputs (check --data and "
                            f"--batch): {lines[0]}") from exc

    def __call__(self) -> None:
        if self.binding is not None:
            self.session.run_with_iobinding(self.binding)
            self.binding.synchronize_outputs()
        else:
            self.session.run(self.outputs, self.feeds)


def _session_without_spinning(path: str, provider: str, threads: int | None):
    import onnxruntime as ort

    options = runtime.session_options(threads, spinning=False)
    # the provider options too (the OpenVINO EP's thread count and precision): without them
    # the EP ran on every core at its default precision under a "1 thread" label
    providers = runtime.execution_providers(provider, threads)
    try:
        return ort.InferenceSession(path, options, providers=providers)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"ONNX Runtime could not load the model: {first}") from exc


def _feeds_for(model: Model, data: Any, batch: int,
               shapes: dict[str, Sequence[int]] | None = None) -> dict[str, np.ndarray]:
    if data is None:
        dims, shape_batch = _dims_for_shapes(model, shapes)
        dataset = calibration.random_data(model, 1, dims=dims, batch=shape_batch or batch)
    else:
        dataset = calibration.resolve(data, model, default_count=1, split="eval")
    return {k: np.ascontiguousarray(v) for k, v in dataset.make_batch(0).items()}


def _signature(model: Model) -> list[tuple[str, int]]:
    return [(i.name, i.type.tensor_type.elem_type) for i in calibration.graph_inputs(model)]


def _shared_feeds(models: list[Model], data: Any, batch: int,
                  shapes: dict[str, Sequence[int]] | None) -> list[dict[str, np.ndarray]]:
    """The inputs each model is timed on: the first model's for every model with the same
    input names and types, so a ratio compares the same work. (Drawn per model, random data
    fitted a quantized PP-OCR rec narrower than its float original, which the zoo's shapes
    fit: 0.09x "latency".)"""
    first = _feeds_for(models[0], data, batch, shapes)
    out = []
    for model in models:
        same = _signature(model) == _signature(models[0])
        out.append(first if same else _feeds_for(model, data, batch, shapes))
    return out


def _batch_size(feeds: dict[str, np.ndarray]) -> int:
    for array in feeds.values():
        if array.ndim:
            return int(array.shape[0])
    return 1


def _unique_names(paths: list[Path], names: Sequence[str] | None) -> list[str]:
    if names is not None:
        names = [str(n) for n in names]
        if len(names) != len(paths):
            raise UserError(f"got {len(names)} names for {len(paths)} models")
        if len(set(names)) != len(names):
            raise UserError(f"model names must be unique: {names}")
        return names
    result: list[str] = []
    for path in paths:
        base = path.stem
        name, n = base, 2
        while name in result:
            name, n = f"{base}#{n}", n + 1
        result.append(name)
    return result


def _as_int_list(values: Any, what: str) -> list[int]:
    if isinstance(values, (int, str)):
        values = [values]
    try:
        result = [int(v) for v in values]
    except (TypeError, ValueError):
        raise UserError(f"{what} must be whole numbers, got {values!r}") from None
    if not result or any(v < 1 for v in result):
        raise UserError(f"{what} must be positive, got {values!r}")
    return result


RUNTIMES = ("onnxruntime", "openvino")
_EP_MISSING = ("the OpenVINO execution provider is not in this onnxruntime installation: it "
               "needs the onnxruntime-openvino package, in its own virtual environment (it "
               "replaces the onnxruntime module); or time OpenVINO itself with --runtime "
               "openvino")


def resolve_runtimes(runtimes: str | Sequence[str]) -> tuple[list[str], str | None]:
    """``onnxruntime``/``ort``, ``openvino``/``ov`` (``openvino:f32``, ``openvino:bf16``: with
    that inference precision hint), comma-separated or a list: the runtimes and the OpenVINO
    precision named (None: not named). OpenVINO must be installed (else one ``UserError``)."""
    if isinstance(runtimes, str):
        runtimes = [r for r in runtimes.split(",") if r.strip()]
    aliases = {"ort": "onnxruntime", "onnxruntime": "onnxruntime", "ov": "openvino",
               "openvino": "openvino"}
    result, precision = [], None
    for name in runtimes:
        base, _, hint = str(name).strip().lower().partition(":")
        key = aliases.get(base)
        if key is None or (hint and key != "openvino"):
            raise UserError(f"unknown runtime {name!r}; known: {', '.join(RUNTIMES)} "
                            "(openvino:f32 or openvino:bf16 to set its precision)")
        if hint:
            if hint not in ("f32", "bf16", "f16"):
                raise UserError(f"runtime {name!r}: OpenVINO precision must be f32, bf16 or "
                                "f16")
            precision = hint
        if key not in result:
            result.append(key)
    if not result:
        raise UserError("bench needs at least one runtime")
    if "openvino" in result:
        from onnxcomp import runtime_openvino

        runtime_openvino.require()
    return result, precision


def _resolve_provider(name: str) -> str:
    """``runtime.resolve_provider``, with the OpenVINO EP's missing package named."""
    full = runtime.PROVIDERS.get(name.lower(), name)
    if full == "OpenVINOExecutionProvider":
        import onnxruntime as ort

        if full not in ort.get_available_providers():
            raise UserError(_EP_MISSING)
    return runtime.resolve_provider(name)


def _onnx_beside(path: Path, runtimes: list[str]) -> Path:
    """The ONNX file that gives an ``.ort`` file's input signature and parameter count (X.onnx
    beside X.ort: ``compress --target ort-mobile`` writes both); the path itself otherwise."""
    if path.suffix.lower() != ".ort":
        return path
    if "openvino" in runtimes:
        raise UserError(f"{path}: OpenVINO cannot read .ort files (time the .onnx file)")
    onnx_path = path.with_suffix(".onnx")
    if not onnx_path.is_file():
        raise UserError(f"{path}: bench reads the input signature of an .ort file from the "
                        f"ONNX model beside it, and {onnx_path.name} is missing")
    return onnx_path


def _dims_for_shapes(model: Model, shapes: dict[str, Sequence[int]] | None
                     ) -> tuple[dict[str, int], int | None]:
    """``--shape NAME=D,D`` as the symbolic dims random data takes (and the batch, axis 0);
    a shape that contradicts a fixed dim or names no input is a ``UserError``."""
    if not shapes:
        return {}, None
    inputs = {v.name: v for v in calibration.graph_inputs(model)}
    dims: dict[str, int] = {}
    batch = None
    for name, shape in shapes.items():
        if name not in inputs:
            raise UserError(f"--shape {name}: the model has no input {name!r} "
                            f"(inputs: {', '.join(inputs)})")
        declared = inputs[name].type.tensor_type.shape.dim
        if len(declared) != len(shape):
            raise UserError(f"--shape {name}: {len(shape)} dims given, the input has "
                            f"{len(declared)}")
        for axis, (dim, value) in enumerate(zip(declared, shape)):
            if dim.HasField("dim_value") and dim.dim_value != value:
                raise UserError(f"--shape {name}: axis {axis} is fixed at {dim.dim_value}, "
                                f"got {value}")
            if axis == 0:
                batch = int(value)
            elif dim.HasField("dim_param"):
                dims[dim.dim_param] = int(value)
    return dims, batch


def bench(models: Sequence[Model | str | os.PathLike], providers: Sequence[str] = ("cpu",),
          threads: Sequence[int] | int = (1,), batch: int = 1, runs: int = 30,
          warmup: int = 5, data: Any = None, names: Sequence[str] | None = None,
          memory: bool = True, min_seconds: float = 1.0, spinning: bool = True,
          progress: Progress | Callable[[str], None] | None = default_progress,
          runtimes: str | Sequence[str] = ("onnxruntime",),
          shapes: dict[str, Sequence[int]] | None = None,
          openvino_precision: str | None = None) -> Report:
    """Time the models side by side; see the module docstring for the method.

    ``models``: paths or Models (in-memory ones are saved to a temporary file first); the first
    is the baseline of the ratios. ``data``: None for random inputs with ``batch`` rows, or a
    data source (``calibration.resolve``), of which the first batch is used. ``memory``: also
    measure peak memory in a child process per model and provider. ``min_seconds``: after
    ``runs`` rounds, keep going until the timed rounds span at least this long, so that a
    sub-millisecond model is not timed within one short burst of machine noise. ``spinning``:
    ONNX Runtime's default lets idle intra-op threads spin-wait; False makes them sleep, which
    keeps interleaved multi-threaded sessions from stealing each other's (and other processes')
    cores on a busy machine, at some wake-up cost. ``progress``: where the progress goes
    (default: the process's :mod:`onnxcomp.progress`; a ``progress(message)`` callable; None:
    silent): a task per provider x threads, counting rounds. ``runtimes``: see the module
    docstring (OpenVINO runs on its CPU device whatever ``providers`` says). ``shapes``: input
    name -> shape for the random inputs (``--shape``; dynamic dims only).
    """
    if isinstance(models, (str, os.PathLike, Model)):
        models = [models]
    if not models:
        raise UserError("bench needs at least one model")
    if isinstance(providers, str):
        providers = [p for p in providers.split(",") if p]
    if not providers:
        raise UserError("bench needs at least one provider")
    thread_counts = _as_int_list(threads, "threads")
    batch = _as_int_list(batch, "batch")[0]
    runs = _as_int_list(runs, "runs")[0]
    if int(warmup) < 0:
        raise UserError(f"warmup must be >= 0, got {warmup}")
    if float(min_seconds) < 0:
        raise UserError(f"min_seconds must be >= 0, got {min_seconds}")
    if shapes and data is not None:
        raise UserError("--shape sets the random inputs' shapes: not with --data")
    engines_runtimes, named_precision = resolve_runtimes(runtimes)
    openvino_precision = openvino_precision or named_precision
    resolved = ({p: _resolve_provider(p) for p in providers}  # fails early on bad names
                if "onnxruntime" in engines_runtimes else {})
    engines = [("onnxruntime", p) for p in providers if "onnxruntime" in engines_runtimes]
    if "openvino" in engines_runtimes:
        engines.append(("openvino", "CPU"))
        resolved["CPU"] = "OpenVINO CPU"
    # One runtime: each provider timed on its own, as before; several: all in one loop.
    groups = [[e] for e in engines] if len(engines_runtimes) == 1 else [engines]
    bar = as_progress(progress)

    with tempfile.TemporaryDirectory(prefix="onnxcomp-bench-") as tmp:
        paths, loaded = [], []
        for index, model in enumerate(models):
            if isinstance(model, Model):
                path = Path(tmp) / f"model{index}.onnx"
                model.copy().save(path)
                loaded.append(model)
            else:
                path = Path(model)
                loaded.append(load(_onnx_beside(path, engines_runtimes), load_weights=False))
            paths.append(path)
        labels = _unique_names(paths, names)  # in-memory models are named model0, model1...
        feeds = _shared_feeds(loaded, data, batch, shapes)
        infos = []
        for label, path, model, model_feeds in zip(labels, paths, loaded, feeds):
            size = model_size(path)
            infos.append({"name": label,
                          "path": str(path) if not isinstance(model, Model) else "<in-memory>",
                          "bytes": size, "params": parameter_count(model),
                          "batch": _batch_size(model_feeds)})
        for info in infos:
            info["size_ratio"] = info["bytes"] / infos[0]["bytes"]

        results = []
        for group in groups:
            for count in thread_counts:
                what = ", ".join(p if r == "onnxruntime" else r for r, p in group)
                name = f"bench {what}, {count} thread(s), {len(paths)} model(s)"
                with bar.task(name, total=runs, unit="round") as task:
                    runners = [_make_runner(engine, str(path), count, model_feeds, spinning,
                                            openvino_precision)
                               for engine in group for path, model_feeds in zip(paths, feeds)]
                    times = _time_runners(runners, runs, int(warmup), float(min_seconds),
                                          task=task)
                first = None
                for e, (run_name, provider) in enumerate(group):
                    base = None
                    for index, info in enumerate(infos):
                        stats = percentiles(times[e * len(infos) + index])
                        base = base or stats["p50_ms"]
                        first = first or stats["p50_ms"]
                        results.append({
                            "model": info["name"], "model_index": index,
                            "runtime": run_name, "provider": resolved[provider],
                            "threads": count, "runs": len(times[e * len(infos) + index]),
                            **stats,
                            "throughput": info["batch"] / (stats["p50_ms"] / 1000.0),
                            "latency_ratio": stats["p50_ms"] / base,
                            "speedup": base / stats["p50_ms"],
                            "vs_first": stats["p50_ms"] / first,
                            "times_ms": kept_times(times[e * len(infos) + index]),
                        })
        memory_rows = []
        if memory:
            for provider in [p for r, p in engines if r == "onnxruntime"]:
                for info, path, model_feeds in zip(infos, paths, feeds):
                    bar.message(f"bench: peak memory of {info['name']} ({provider})")
                    measured = measure_memory(path, provider, thread_counts[0], model_feeds)
                    memory_rows.append({"model": info["name"], "provider": resolved[provider],
                                        "threads": thread_counts[0], **measured})

    report = Report(command="bench")
    report.environment["provider"] = ",".join(resolved.values())
    report.environment["runtimes"] = engines_runtimes
    if "openvino" in engines_runtimes:
        from onnxcomp import runtime_openvino

        report.environment["openvino"] = runtime_openvino.version()
        report.environment["openvino_precision"] = openvino_precision or "plugin default"
        if memory:
            report.notes.append("peak memory is measured for ONNX Runtime only")
    report.models = {info["name"]: {k: v for k, v in info.items() if k != "name"}
                     for info in infos}
    report.bench = {"batch": infos[0]["batch"], "runs": runs, "warmup": int(warmup),
                    "min_seconds": float(min_seconds), "spinning": bool(spinning),
                    "data": "random" if data is None else str(getattr(data, "name", data)),
                    "order": "interleaved, seeded random order per round",
                    "models": infos, "results": results, "memory": memory_rows}
    return report


def _make_runner(engine: tuple[str, str], path: str, threads: int,
                 feeds: dict[str, np.ndarray], spinning: bool, precision: str | None):
    """An ONNX Runtime session or an OpenVINO compiled model, ready to run ``feeds``."""
    name, provider = engine
    if name == "openvino":
        from onnxcomp import runtime_openvino

        return runtime_openvino.Runner(path, feeds, threads, provider, precision)
    return _Runner(path, provider, threads, feeds, spinning)


def _time_interleaved(paths: list[Path], provider: str, threads: int,
                      feeds: list[dict[str, np.ndarray]], runs: int, warmup: int,
                      min_seconds: float = 0.0, spinning: bool = True,
                      max_rounds: int = 1_000_000, task: Task | None = None
                      ) -> list[list[float]]:
    runners = [_Runner(str(p), provider, threads, f, spinning) for p, f in zip(paths, feeds)]
    return _time_runners(runners, runs, warmup, min_seconds, max_rounds, task)


def _time_runners(runners: list, runs: int, warmup: int, min_seconds: float = 0.0,
                  max_rounds: int = 1_000_000, task: Task | None = None,
                  orders: Iterator[list[int]] | None = None) -> list[list[float]]:
    """Warm-up, then interleaved timed rounds of runners (ONNX Runtime or OpenVINO): each
    runner's run times in seconds.

    Each round runs every runner once in a seeded random order, never the same runner twice in
    a row across rounds. A fixed or palindromic order is biased: a model that runs right after
    a bigger one finds the caches cold, the one that closes a round and opens the next finds
    them warm (measured 1-2 % between copies of one file, docs/bench_stability.md). ``orders``
    replaces that order (benchmarks/timing_order.py times the old one against it)."""
    for runner in runners:
        runner.first_run()
    for _ in range(warmup):
        for runner in runners:
            runner()
    times: list[list[float]] = [[] for _ in runners]
    orders = orders if orders is not None else _round_orders(len(runners))
    clock = time.perf_counter
    started = clock()
    r = 0
    shown = started
    while r < runs or (clock() - started < min_seconds and r < max_rounds):
        for i in next(orders):
            start = clock()
            runners[i]()
            times[i].append(clock() - start)
        r += 1
        now = clock()
        if task is not None and now - shown >= 0.1:  # between rounds, never inside a timing
            shown = now
            task.set(r, _rounds_expected(r, runs, now - started, min_seconds, max_rounds))
    if task is not None:
        task.set(r, r)
    return times


def _round_orders(count: int, seed: int = 0) -> Iterator[list[int]]:
    """Endless seeded random orders of ``count`` runners; a round never opens with the runner
    that closed the one before, so no runner is timed straight after itself."""
    rng = np.random.default_rng(seed)
    last = -1
    while True:
        order = [int(i) for i in rng.permutation(count)]
        if count > 1 and order[0] == last:
            order[0], order[1] = order[1], order[0]
        last = order[-1]
        yield order


def _rounds_expected(done: int, runs: int, elapsed: float, min_seconds: float,
                     max_rounds: int) -> int:
    """Rounds the timing will take: ``runs``, or more while the rounds span < ``min_seconds``
    (estimated from the rate so far), for the progress total."""
    if elapsed <= 0 or done <= 0:
        return runs
    by_time = int(np.ceil(min_seconds * done / elapsed))
    return max(runs, done, min(by_time, max_rounds))


# ---------------------------------------------------------------------------------------------
# Peak memory in a child process

_CHILD = """
import json, sys
from onnxcomp.measure.bench import _child_measure
print(json.dumps(_child_measure(*sys.argv[1:])))
"""


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _maxrss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024  # macOS: bytes, else KiB


def peak_bytes() -> int:
    # VmHWM is the high-water mark of this process's own address space. ru_maxrss is not usable
    # on Linux: exec carries the parent's peak over (a child started by a 160 MB process
    # reports at least 160 MB), so it is only the fallback where /proc is missing.
    peak = _proc_status_bytes("VmHWM")
    return peak if peak is not None else _maxrss_bytes()


def _child_measure(model_path: str, provider: str, threads: str, feeds_path: str
                   ) -> dict[str, Any]:
    with np.load(feeds_path, allow_pickle=False) as npz:
        feeds = {k: npz[k] for k in npz.files}
    before = _proc_status_bytes("VmRSS")
    before = before if before is not None else _maxrss_bytes()
    runner = _Runner(model_path, provider, int(threads), feeds)
    for _ in range(MEMORY_RUNS):
        runner()
    peak = peak_bytes()
    return {"rss_before_mb": before / 2**20, "peak_rss_mb": peak / 2**20,
            "session_peak_mb": max(0, peak - before) / 2**20}


def measure_memory(path: str | os.PathLike, provider: str, threads: int,
                   feeds: dict[str, np.ndarray]) -> dict[str, Any]:
    """Peak resident memory of a fresh process that loads and runs the model (see module doc)."""
    with tempfile.TemporaryDirectory(prefix="onnxcomp-mem-") as tmp:
        feeds_path = Path(tmp) / "feeds.npz"
        np.savez(feeds_path, **feeds)
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                    else "")
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(path), provider, str(threads), str(feeds_path)],
            capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise UserError(f"memory measurement of {path} failed: "
                            f"{lines[-1] if lines else done.returncode}")
    return json.loads(done.stdout.strip().splitlines()[-1])
