"""The CLI contract on a corpus of hostile and edge-case inputs (``corpus.py``).

For every case, ``onnxcomp inspect MODEL`` and ``onnxcomp compress MODEL -o OUT --recipe
quantize:int8-dynamic --no-validate`` must either exit 0 (compress: a model that passes onnx's
checker and loads in ONNX Runtime) or exit 1/2 with exactly one line on stderr and nothing
written; never exit 3, a traceback, a crash or a hang, and never a changed input file (every file
of the case's folder is hashed before and after). Cases marked ``refuse`` must be refused,
``ok`` must succeed.

The default run takes all cases (about 8 s); ``ONNXCOMP_HOSTILE_ALL=0`` runs only the ``fast``
subset (about 50 cases) (figures in docs/reliability.md). The jobs run in one subprocess (``runner.py``),
restarted after a crash or a hang so that one bad case cannot take the rest down.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import corpus

REPO = HERE.parents[1]
# All 249 cases run by default (about 8 s); ONNXCOMP_HOSTILE_ALL=0 keeps the fast subset.
ALL = os.environ.get("ONNXCOMP_HOSTILE_ALL", "1") != "0"
JOB_SECONDS = int(os.environ.get("ONNXCOMP_HOSTILE_SECONDS", "60"))
RECIPE = "quantize:int8-dynamic"

_ROOT = Path(tempfile.mkdtemp(prefix="onnxcomp-hostile-"))
atexit.register(shutil.rmtree, _ROOT, True)
CASES = [c for c in corpus.build(_ROOT) if ALL or c.fast]
COMMANDS = ("inspect", "compress")
# Refused correctly but only after the run's progress lines (several stderr lines), until the CLI
# checks outputs and the input first (docs/reliability.md, "wiring"); strict: remove an entry
# once it passes.
def _argv(case: corpus.Case, command: str) -> list[str]:
    if command == "inspect":
        return ["inspect", case.model]
    return ["compress", case.model, "-o", case.output, "--recipe", RECIPE, "--no-validate"]


def _folder(case: corpus.Case) -> Path:
    return _ROOT / "cases" / case.name


def fingerprint(folder: Path) -> dict[str, str]:
    """Every entry under ``folder`` (not following symlinks): a hash for regular files, the
    kind for the rest."""
    seen = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            seen[str(path)] = "symlink:" + os.readlink(path)
        elif path.is_file():
            seen[str(path)] = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            seen[str(path)] = "dir" if path.is_dir() else "special"
    return seen


def run_jobs(jobs: list[dict], seconds: int) -> dict[str, dict]:
    """Run ``jobs`` through runner.py; a job that started and never finished is a crash (the
    process died) or a hang (it outlived ``seconds`` + 15 s and was killed)."""
    results: dict[str, dict] = {}
    pending = list(jobs)
    env = {k: v for k, v in os.environ.items() if k != "ONNXCOMP_DEBUG"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    while pending:
        jobs_file = _ROOT / "jobs.json"
        out_file = _ROOT / "results.jsonl"
        jobs_file.write_text(json.dumps(pending))
        out_file.write_text("")
        process = subprocess.Popen(
            [sys.executable, str(HERE / "runner.py"), str(jobs_file), str(out_file),
             str(seconds)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            cwd=str(_ROOT))
        current, since = None, time.monotonic()
        while True:
            events = [json.loads(line) for line in out_file.read_text().splitlines() if line]
            for event in events:
                if event["event"] == "done":
                    results[event["id"]] = event
            started = [e["id"] for e in events if e["event"] == "start"]
            last = started[-1] if started else None
            if last != current:
                current, since = last, time.monotonic()
            finished = process.poll() is not None
            if finished or time.monotonic() - since > seconds + 15:
                break
            time.sleep(0.05)
        if not finished:
            process.kill()
        process.wait()
        stderr = process.stderr.read().decode("utf-8", "replace")
        if current is not None and current not in results:
            results[current] = {"id": current, "event": "done", "rc": process.returncode,
                                "stderr": stderr[-2000:], "traceback": "",
                                "hang": not finished, "crash": finished, "valid": None}
        pending = [job for job in pending if job["id"] not in results]
        if finished and process.returncode == 0:
            break
    return results


@pytest.fixture(scope="module")
def outcome() -> dict:
    before = {case.name: fingerprint(_folder(case)) for case in CASES}
    jobs = []
    for case in CASES:
        if case.output.startswith(str(_ROOT / "outs")):
            Path(case.output).parent.mkdir(parents=True, exist_ok=True)
        for command in COMMANDS:
            jobs.append({"id": f"{case.name}/{command}", "argv": _argv(case, command),
                         "model": case.model,
                         "output": case.output if command == "compress" else None})
    results = run_jobs(jobs, JOB_SECONDS)
    after = {case.name: fingerprint(_folder(case)) for case in CASES}
    return {"before": before, "after": after, "results": results}


def classify(result: dict) -> str:
    """One word per job: ok, refused, or the violation."""
    if result.get("hang"):
        return "hang"
    if result.get("crash"):
        return "crash"
    if result["traceback"] or "Traceback" in result["stderr"]:
        return "traceback"
    if result["rc"] == 0:
        return "ok" if not result.get("valid") else "invalid-output"
    if result["rc"] in (1, 2):
        lines = [line for line in result["stderr"].splitlines() if line.strip()]
        return "refused" if len(lines) == 1 else "several-lines"
    return f"exit-{result['rc']}"


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_the_cli_contract_holds(outcome, case, command, request):
    result = outcome["results"][f"{case.name}/{command}"]
    verdict = classify(result)
    detail = f"{case.family} {case.name} {command}: {verdict}: rc={result['rc']} " \
             f"stderr={result['stderr'][-600:]!r} {result['traceback'][-600:]}"
    assert verdict in ("ok", "refused"), detail
    expect = case.expect
    if command == "inspect" and case.family in ("overlap", "output-path"):
        expect = "ok"  # the output is compress's: inspect reads a valid model
    if expect == "refuse":
        assert verdict == "refused", detail
    if expect == "ok":
        assert verdict == "ok", detail
    output = Path(case.output)
    compressed = outcome["results"][f"{case.name}/compress"]
    written = {str(output), str(output) + ".data"} if compressed["rc"] == 0 else set()
    before, after = outcome["before"][case.name], outcome["after"][case.name]
    assert {k: v for k, v in after.items() if k not in written} == before, \
        f"{case.name}: the input folder changed"
    if command == "compress" and verdict == "refused" and output.parent.parent == _ROOT / "outs":
        assert not any(output.parent.iterdir()), f"{case.name}: a refusal left files behind"
