"""Where trials run: a local process pool, or Ray (one machine or a cluster), one interface.

An executor takes a batch of ``trial.Job`` and yields ``(index, result)`` as each finishes;
``slots`` is how many trials it runs at once. Both send the ``Shared`` payload (float model,
calibration and evaluation arrays) once: the pool through its initializer (once per worker
process), Ray through one ``ray.put`` (workers read it from their node's object store).

Timing trials must not share cores. The local pool pins each worker process to its own
``cpus_per_trial`` cores (``sched_setaffinity``, Linux), so at most ``cores // cpus_per_trial``
workers run; Ray gives each trial task ``num_cpus=cpus_per_trial`` (and ``num_gpus`` for a GPU
provider), so its scheduler never places more trials on a node than it has cores for them.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Protocol

from onnxcomp.errors import UserError
from onnxcomp.search.trial import Job, Shared, init_worker, retime, run_trial


class Executor(Protocol):
    slots: int
    name: str

    def run(self, jobs: list[Job]) -> Iterator[tuple[int, dict[str, Any]]]: ...

    def close(self) -> None: ...


def available_cores() -> list[int]:
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


class LocalExecutor:
    """A pool of ``workers`` spawned processes, each pinned to ``cpus_per_trial`` cores."""

    name = "local"

    def __init__(self, shared: Shared, workers: int | None = None, cpus_per_trial: int = 1):
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        cores = available_cores()
        fit = max(1, len(cores) // max(1, cpus_per_trial))
        self.slots = fit if workers is None else int(workers)
        if self.slots < 1:
            raise UserError(f"workers must be at least 1, got {workers}")
        context = multiprocessing.get_context("spawn")  # no forked ONNX Runtime thread pools
        queue = context.Queue()
        if self.slots <= fit:  # enough cores for each worker to have its own
            for i in range(self.slots):
                queue.put(cores[i * cpus_per_trial:(i + 1) * cpus_per_trial])
        self._pool = ProcessPoolExecutor(self.slots, mp_context=context,
                                         initializer=init_worker, initargs=(shared, queue))
        self._shared = shared

    def run(self, jobs: list[Job]) -> Iterator[tuple[int, dict[str, Any]]]:
        from concurrent.futures import as_completed

        futures = {self._pool.submit(run_trial, self._shared, job): i
                   for i, job in enumerate(jobs)}
        for future in as_completed(futures):
            index = futures[future]
            try:
                yield index, future.result()
            except Exception as exc:  # noqa: BLE001  the worker process died (killed, OOM)
                yield index, {"number": jobs[index].number, "ok": False,
                              "error": f"worker failed: {type(exc).__name__}: {exc}"}

    def close(self) -> None:
        processes = list((getattr(self._pool, "_processes", None) or {}).values())
        self._pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:  # a trial still running (interrupted search): stop it
            if process.is_alive():
                process.terminate()


def _ray_trial(shared: Shared, job: Job) -> dict[str, Any]:
    return run_trial(shared, job)


class RayExecutor:
    """Trials as Ray tasks: ``ray.init()`` on this machine, or ``address`` for a cluster."""

    name = "ray"

    def __init__(self, shared: Shared, workers: int | None = None, cpus_per_trial: int = 1,
                 gpus_per_trial: float = 0.0, address: str | None = None,
                 init_options: dict[str, Any] | None = None):
        try:
            import ray
        except ImportError:
            raise UserError("the ray executor needs ray: pip install 'onnxcomp[search]'") from None
        self._ray = ray
        self._owns = not ray.is_initialized()
        if self._owns:
            options = {"include_dashboard": False, "log_to_driver": False,
                       "ignore_reinit_error": True, **(init_options or {})}
            if address:
                options["address"] = address
            try:
                ray.init(**options)
            except ConnectionError as exc:
                raise UserError(f"cannot reach the Ray cluster at {address!r}: {exc}") from None
        total = ray.cluster_resources().get("CPU", 1)
        fit = max(1, int(total // max(1, cpus_per_trial)))
        self.slots = fit if workers is None else int(workers)
        self._shared_ref = ray.put(shared)  # once: every trial reads it from the object store
        self._remote = ray.remote(_ray_trial).options(
            num_cpus=cpus_per_trial, num_gpus=gpus_per_trial, max_retries=0)

    def run(self, jobs: list[Job]) -> Iterator[tuple[int, dict[str, Any]]]:
        ray = self._ray
        pending = {self._remote.remote(self._shared_ref, job): i for i, job in enumerate(jobs)}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(done[0])
            try:
                yield index, ray.get(done[0])
            except Exception as exc:  # noqa: BLE001  the task's worker died
                yield index, {"number": jobs[index].number, "ok": False,
                              "error": f"ray task failed: {type(exc).__name__}: {exc}"}

    def close(self) -> None:
        if self._owns:
            self._ray.shutdown()


def retime_here(shared: Shared, paths: dict[int, str], cpus_per_trial: int = 1,
                repeats: int = 5) -> dict[int, dict[str, Any]]:
    """``trial.retime`` in one fresh worker process on this machine, pinned to its own
    ``cpus_per_trial`` cores like a trial (the candidates' files are here, whatever executor ran
    the trials; for a GPU provider this machine needs the GPU)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    queue.put(available_cores()[:max(1, cpus_per_trial)])
    with ProcessPoolExecutor(1, mp_context=context, initializer=init_worker,
                             initargs=(shared, queue)) as pool:
        return pool.submit(retime, shared, paths, repeats).result()


def make(kind: str | None, shared: Shared, workers: int | None, cpus_per_trial: int,
         address: str | None = None, provider: str = "cpu") -> Executor:
    """``local``, ``ray``, or None: Ray where an address is given, else the local pool."""
    if kind not in (None, "local", "ray"):
        raise UserError(f"unknown executor {kind!r}: use local or ray")
    if kind is None:
        kind = "ray" if address else "local"
    if kind == "local":
        if address:
            raise UserError("--ray-address needs --executor ray")
        return LocalExecutor(shared, workers, cpus_per_trial)
    gpus = 1.0 if provider.lower() in ("cuda", "tensorrt") else 0.0
    return RayExecutor(shared, workers, cpus_per_trial, gpus, address)
