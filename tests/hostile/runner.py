"""Run ``onnxcomp.cli.main`` on a list of jobs in this process, one after the other, and append
one JSON line per event to a results file: ``{"id", "event": "start"}`` before a job and
``{"id", "event": "done", "rc", "stderr", "traceback", "valid", "seconds"}`` after it.

Used by ``test_hostile.py``, which starts it in a subprocess: a crash or a hang native code does
not return from is seen there (a job started and never done) and the rest run in a new process.
Each job has ``signal.alarm`` as a first guard against hangs (Python-level blocking, e.g. opening
a FIFO). stdout and stderr are captured at the file-descriptor level, so ONNX Runtime's own logs
count as stderr lines too.

Usage: ``python runner.py JOBS.json RESULTS.jsonl SECONDS``
"""

from __future__ import annotations

import io
import json
import os
import signal
import sys
import tempfile
import time
import traceback
from contextlib import redirect_stdout
from pathlib import Path


class Hang(BaseException):
    """Raised by the alarm: a BaseException so that ``except Exception`` cannot swallow it."""


def _alarm(signum, frame):
    raise Hang()


def _valid_output(path: str) -> str:
    """'' when ``path`` passes onnx's checker and loads in ONNX Runtime, else why not."""
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(path)
        ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return ""


def _faithful(model: str, output: str) -> str:
    """'' when the output runs wherever the input runs (same random feeds, dynamic dims 2) with
    the same output names and shapes, finite where the input's are, and a cosine >= 0.9."""
    import numpy as np
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    try:
        reference = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        feeds = {}
        for arg in reference.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else 2 for d in arg.shape]
            kind = arg.type[len("tensor("):-1]
            dtype = {"float": np.float32, "float16": np.float16, "double": np.float64,
                     "int64": np.int64, "int32": np.int32, "bool": np.bool_}.get(kind)
            if dtype is None:
                return ""
            feeds[arg.name] = rng.standard_normal(shape).astype(dtype)
        expected = reference.run(None, feeds)
    except Exception:  # noqa: BLE001  the input itself does not run on these feeds
        return ""
    try:
        got = ort.InferenceSession(output, providers=["CPUExecutionProvider"]).run(None, feeds)
    except Exception as exc:  # noqa: BLE001
        return f"the output does not run: {str(exc).splitlines()[0] if str(exc) else exc}"
    for a, b in zip(expected, got):
        a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
        if a.shape != b.shape:
            return f"output shape {b.shape} differs from {a.shape}"
        if np.isfinite(a).all() and not np.isfinite(b).all():
            return "non-finite outputs"
        norm = np.linalg.norm(a) * np.linalg.norm(b)
        if norm and float(a @ b / norm) < 0.9:
            return f"cosine {float(a @ b / norm):.3f}"
    return ""


def wire(cli) -> None:
    """ONNXCOMP_HOSTILE_WIRED=1: the checks the CLI should make first (see docs/reliability.md),
    patched in to measure the corpus as it will be once they are wired."""
    from onnxcomp import model as model_module
    from onnxcomp import runtime

    compress, inspect = cli.cmd_compress, cli.cmd_inspect

    def cmd_compress(args):
        if args.model and args.output:
            model_module.check_output_paths([args.output, args.report],
                                            model_module.files_read(args.model))
            runtime.check_input(model_module.load(args.model, load_weights=False))
        return compress(args)

    def cmd_inspect(args):
        runtime.check_input(model_module.load(args.model, load_weights=False), session=False)
        return inspect(args)

    cli.cmd_compress, cli.cmd_inspect = cmd_compress, cmd_inspect


def run_job(job: dict, seconds: int) -> dict:
    from onnxcomp import cli

    if os.environ.get("ONNXCOMP_HOSTILE_WIRED") and not getattr(cli, "_hostile_wired", False):
        wire(cli)
        cli._hostile_wired = True

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as err:
        os.dup2(err.fileno(), 2)
        started = time.perf_counter()
        rc, trace, hang = None, "", False
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(seconds)
        try:
            with redirect_stdout(io.StringIO()):
                rc = cli.main(job["argv"])
        except Hang:
            hang = True
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:  # noqa: BLE001  what main let through is the finding
            trace = traceback.format_exc()
        finally:
            signal.alarm(0)
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
        err.seek(0)
        stderr = err.read().decode("utf-8", "replace")
    result = {"id": job["id"], "event": "done", "rc": rc, "stderr": stderr, "traceback": trace,
              "hang": hang, "seconds": time.perf_counter() - started, "valid": None}
    if rc == 0 and job.get("output") and Path(job["output"]).exists():
        result["valid"] = _valid_output(job["output"]) or _faithful(job["model"], job["output"])
    return result


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    seconds = int(sys.argv[3])
    with open(sys.argv[2], "a") as results:
        for job in jobs:
            results.write(json.dumps({"id": job["id"], "event": "start"}) + "\n")
            results.flush()
            results.write(json.dumps(run_job(job, seconds)) + "\n")
            results.flush()


if __name__ == "__main__":
    main()
