"""One trial, run in a worker process: compress with the trial's recipe, validate on the
held-out data, time the result against the float model, return the metrics.

What every worker needs is one ``Shared`` payload, sent once per worker (the process pool's
initializer) or put once into Ray's object store: the float model's bytes and the calibration
and evaluation batches as plain arrays (a zoo generator or a folder need not exist on a remote
node). The worker keeps what it builds from it (the loaded model, the float model written to a
temporary file for timing, the datasets) for every later trial with the same payload.

Latency is a ratio: the float model and the candidate are timed interleaved in the same worker
(``measure.bench``), so trials timed on different workers or nodes are comparable. The ratio is
the median of ``repeats`` such interleaved measurements (each with its own sessions): one
measurement on a loaded machine put a cleanup-only model at 0.852 of float where three others
gave 0.98-0.99, and the sampler follows such an outlier. ``retime`` times several finished
candidates side by side with the float model, for the final choice. A trial that fails
returns its error as data (a recipe the model refuses is a finding, not a crash).
"""

from __future__ import annotations

import os
import queue
import socket
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from onnxcomp import calibration
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import Model, serialized_size
from onnxcomp.search import goals

MAX_INLINE_MODEL = 2**31 - 2**24  # protobuf's limit, less headroom


@dataclass
class Batches:
    """A data set as plain arrays (picklable; what travels to workers)."""

    name: str
    batches: list[dict[str, np.ndarray]]
    labels: list[Any] | None = None
    zoo_name: str | None = None

    @classmethod
    def of(cls, dataset: calibration.Dataset) -> Batches:
        labels = list(dataset.labels) if dataset.labels is not None else None
        return cls(dataset.name, [dict(b) for b in dataset], labels, dataset.zoo_name)

    def dataset(self) -> calibration.Dataset:
        data = calibration.from_batches(self.batches, self.name, self.labels)
        data.zoo_name = self.zoo_name
        return data


@dataclass
class Shared:
    """What every trial of one search shares; ``key`` tells a worker it has it already."""

    key: str
    model_bytes: bytes
    calib: Batches | None
    evaluation: Batches
    threads: int = 1
    runs: int = 30
    min_seconds: float = 1.0
    provider: str = "cpu"
    cpus: list[list[int]] = field(default_factory=list)  # per-worker core sets (local pool)
    repeats: int = 3  # interleaved latency measurements per trial (the ratio is their median)


@dataclass
class Job:
    number: int
    params: dict[str, Any]
    recipe: list[tuple[str, dict[str, Any]]]


_STATE: dict[str, Any] = {}


def init_worker(shared: Shared, slots: Any = None) -> None:
    """Process-pool initializer: pin this worker to its own cores (so that timing trials do
    not share them) and build the shared state once."""
    if slots is not None and hasattr(os, "sched_setaffinity"):
        try:
            cores = slots.get_nowait()
        except queue.Empty:  # more workers than core sets: leave this one unpinned
            cores = None
        if cores:
            try:
                os.sched_setaffinity(0, set(cores))
            except OSError:
                pass
    _state(shared)


def _state(shared: Shared) -> dict[str, Any]:
    if _STATE.get("key") == shared.key:
        return _STATE
    import onnx

    _STATE.clear()
    folder = tempfile.mkdtemp(prefix="onnxcomp-search-")
    float_path = os.path.join(folder, "float.onnx")
    with open(float_path, "wb") as handle:
        handle.write(shared.model_bytes)
    _STATE.update(key=shared.key, model=Model(onnx.load_from_string(shared.model_bytes)),
                  float_path=float_path,
                  calib=shared.calib.dataset() if shared.calib is not None else None,
                  evaluation=shared.evaluation.dataset())
    return _STATE


def steps_of(recipe: list[tuple[str, dict[str, Any]]]):
    """The recipe ``[(pass, {field: value})]`` as pipeline Steps (coerced like a TOML file)."""
    from onnxcomp import passes
    from onnxcomp.pipeline import Step
    from onnxcomp.recipe import config_from_table

    return [Step(passes.get(name), config_from_table(name, dict(table)))
            for name, table in recipe]


def recipe_text(recipe: list[tuple[str, dict[str, Any]]]) -> str:
    """The recipe as a TOML file, to rerun the trial with ``onnxcomp compress --recipe``."""
    lines = []
    for name, table in recipe:
        lines += ["[[pass]]", f'name = "{name}"']
        for key, value in table.items():
            lines.append(f"{key} = {_toml(value)}")
        lines.append("")
    return "\n".join(lines)


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def _where() -> str:
    try:
        import ray

        if ray.is_initialized():
            return ray.get_runtime_context().get_node_id()
    except (ImportError, RuntimeError):  # not under Ray
        return socket.gethostname()
    return socket.gethostname()


def run_trial(shared: Shared, job: Job) -> dict[str, Any]:
    """Compress, validate and time one recipe; the result is plain data (see the module doc)."""
    from onnxcomp.api import compress
    from onnxcomp.measure.bench import bench

    started = time.perf_counter()
    result: dict[str, Any] = {"number": job.number, "node": _where(), "pid": os.getpid()}
    try:
        state = _state(shared)
        compressed = compress(state["model"], steps_of(job.recipe), calib=state["calib"],
                              eval_data=state["evaluation"], validate=True, show_progress=False)
        result["compress_seconds"] = time.perf_counter() - started
        ratios, report = [], None
        for _ in range(max(1, shared.repeats)):
            report = bench([state["float_path"], compressed.model],
                           names=["float", "candidate"], providers=[shared.provider],
                           threads=[shared.threads], runs=shared.runs,
                           min_seconds=shared.min_seconds, memory=False,
                           data=state["evaluation"], progress=None)
            rows = {row["model"]: row for row in report.bench["results"]}
            ratios.append(rows["candidate"]["p50_ms"] / rows["float"]["p50_ms"])
        infos = {info["name"]: info for info in report.bench["models"]}
        metrics = goals.fidelity_metrics(compressed.report.fidelity)
        metrics["latency"] = float(np.median(ratios))
        metrics["size"] = infos["candidate"]["bytes"] / infos["float"]["bytes"]
        metrics["params"] = infos["candidate"]["params"] / infos["float"]["params"]
        result.update(ok=True, metrics=metrics,
                      reference=goals.reference_metrics(compressed.report.fidelity),
                      p50_ms={"float": rows["float"]["p50_ms"],
                              "candidate": rows["candidate"]["p50_ms"]},
                      latency_samples=[round(r, 4) for r in ratios],
                      report=compressed.report.to_dict(), bench=report.bench)
        proto = compressed.model.proto
        if serialized_size(proto) < MAX_INLINE_MODEL:
            result["model_bytes"] = proto.SerializeToString()
    except OnnxcompError as exc:
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}")
    except Exception as exc:  # noqa: BLE001  our bug: kept with its traceback, search goes on
        result.update(ok=False, error=f"{type(exc).__name__}: {exc}",
                      traceback=traceback.format_exc(limit=8))
    result["seconds"] = time.perf_counter() - started
    return result


def retime(shared: Shared, paths: dict[int, str], repeats: int = 5) -> dict[int, dict[str, Any]]:
    """Time the float model and every candidate (trial number -> model file) side by side:
    one interleaved ``bench`` of all of them, ``repeats`` times; per candidate the median of
    its ratios to the float model, and the ratios themselves. Runs in one process, so every
    candidate meets the same machine state."""
    from onnxcomp.measure.bench import bench

    state = _state(shared)
    numbers = sorted(paths)
    names = ["float", *(f"trial-{n}" for n in numbers)]
    samples: dict[int, list[float]] = {n: [] for n in numbers}
    p50: dict[int, list[float]] = {n: [] for n in numbers}
    for _ in range(max(1, repeats)):
        report = bench([state["float_path"], *(paths[n] for n in numbers)], names=names,
                       providers=[shared.provider], threads=[shared.threads], runs=shared.runs,
                       min_seconds=shared.min_seconds, memory=False, data=state["evaluation"],
                       progress=None)
        rows = {row["model"]: row for row in report.bench["results"]}
        for n in numbers:
            samples[n].append(rows[f"trial-{n}"]["p50_ms"] / rows["float"]["p50_ms"])
            p50[n].append(rows[f"trial-{n}"]["p50_ms"])
    return {n: {"latency": float(np.median(samples[n])),
                "samples": [round(r, 4) for r in samples[n]],
                "p50_ms": float(np.median(p50[n]))} for n in numbers}
