"""Progress output in its three modes: a bar on a terminal (a real pseudo-terminal), plain lines
on a pipe, nothing when quiet; and the old ``progress(message)`` callback still works."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from onnxcomp import progress
from onnxcomp.progress import Progress, as_progress, choose_mode

ROOT = Path(__file__).resolve().parents[1]

# A script doing what a long step does: a message, a task with a note, a message inside it.
SCRIPT = textwrap.dedent("""
    import time
    from onnxcomp import progress
    progress.configure(interval=0.0)
    progress.message("starting work")
    with progress.task("calibration", total=5, unit="batch") as bar:
        for i in range(5):
            time.sleep(0.05)
            bar.note(f"layer {i}")
            bar.advance()
            if i == 2:
                progress.message("halfway message")
    progress.message("done")
""")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop(progress.ENV, None)
    env["TERM"] = "xterm"
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH")
                                     else "")
    return env


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize("size", [(30, 120), None, (0, 120)],
                         ids=["sized", "no-size", "columns-only"])
def test_tty_gets_a_bar_with_rate_and_eta(size):
    pytest.importorskip("tqdm")
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    if size:  # a terminal window; a fresh pty reports 0 x 0, `stty cols 120` alone 0 rows
        # (tqdm then drew nothing)
        import fcntl
        import struct
        import termios

        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", *size, 0, 0))
    try:
        child = subprocess.Popen([sys.executable, "-c", SCRIPT], stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL, stderr=slave, env=_env())
        os.close(slave)
        chunks = []
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        assert child.wait(timeout=60) == 0
    finally:
        os.close(master)
    text = b"".join(chunks).decode("utf-8", "replace")
    assert "\r" in text, text  # redrawn in place
    assert "calibration" in text
    assert "5/5" in text and "100%" in text
    assert "batch/s" in text or "s/batch" in text  # the rate
    assert "<" in text  # tqdm's "elapsed<remaining" (the ETA)
    for line in ("starting work", "halfway message", "done"):
        assert line in text


def test_pipe_gets_plain_lines():
    done = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                          env=_env(), timeout=60, check=True)
    text = done.stderr
    assert "\r" not in text and "\x1b" not in text, text  # no redraws, no escape codes
    lines = text.splitlines()
    assert lines[0] == "starting work"
    assert lines[1] == "calibration: 0/5, 0%"
    assert any(line.startswith("calibration: 3/5, 60%") and "ETA" in line and "(layer 2)" in line
               for line in lines), lines
    assert "halfway message" in lines
    assert lines[-2].startswith("calibration: 5/5 in ") and "batch/s" in lines[-2]
    assert lines[-1] == "done"
    assert done.stdout == ""


def test_lines_are_periodic_with_eta():
    clock, out = FakeClock(), io.StringIO()
    bar_owner = Progress(out, mode="lines", interval=5.0, clock=clock)
    with bar_owner.task("validate", total=10, unit="batch") as task:
        for _ in range(10):
            clock.now += 1.0
            task.advance()
    lines = out.getvalue().splitlines()
    # start, after 5 s (5/10) and after 10 s would be the end: the end line instead
    assert lines == ["validate: 0/10, 0%",
                     "validate: 5/10, 50%, 1 batch/s, ETA 5.0 s",
                     "validate: 10/10 in 10 s, 1 batch/s"]


def test_unknown_total_and_slow_rate():
    clock, out = FakeClock(), io.StringIO()
    owner = Progress(out, mode="lines", interval=0.0, clock=clock)
    with owner.task("search", unit="trial") as task:
        clock.now += 120.0
        task.advance()
    assert out.getvalue().splitlines() == ["search: 0 trial",
                                           "search: 1 trial, 120 s/trial",
                                           "search: 1 trial in 2 min 00 s, 120 s/trial"]


def test_set_works_as_a_done_total_callback():
    clock, out = FakeClock(), io.StringIO()
    owner = Progress(out, mode="lines", interval=0.0, clock=clock)
    with owner.task("segments") as task:
        callback = task.set
        clock.now = 2.0
        callback(1, 4)
    assert task.total == 4
    assert "segments: 1/4, 25%" in out.getvalue()


def test_quiet_prints_nothing(capsys):
    owner = Progress(quiet=True)
    owner.message("hidden")
    with owner.task("work", total=3) as task:
        task.advance(3)
    captured = capsys.readouterr()
    assert captured.err == "" and captured.out == ""


def test_mode_choice(monkeypatch):
    monkeypatch.delenv(progress.ENV, raising=False)
    assert choose_mode(io.StringIO()) == "lines"
    assert choose_mode(io.StringIO(), quiet=True) == "quiet"
    assert choose_mode(io.StringIO(), mode="bar") == "bar"
    monkeypatch.setenv(progress.ENV, "off")
    assert choose_mode(io.StringIO()) == "quiet"
    monkeypatch.setenv(progress.ENV, "bar")
    assert choose_mode(io.StringIO()) == "bar"
    with pytest.raises(ValueError, match="progress mode"):
        choose_mode(io.StringIO(), mode="fancy")


def test_bar_falls_back_to_lines_without_tqdm(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tqdm(name, *args, **kwargs):
        if name == "tqdm" or name.startswith("tqdm."):
            raise ImportError("no tqdm here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tqdm)
    assert Progress(io.StringIO(), mode="bar").mode == "lines"


def test_a_callback_keeps_working():
    seen: list[str] = []
    owner = as_progress(seen.append)
    owner("one-off")  # a Progress is itself a progress(message) callback
    with owner.task("calibration", total=2) as task:
        task.advance(2)
    assert seen[0] == "one-off"
    assert seen[1] == "calibration: 0/2, 0%"
    assert seen[-1].startswith("calibration: 2/2 in ")
    assert as_progress(None).quiet
    assert as_progress(owner) is owner


def test_iterate_and_module_defaults():
    out = io.StringIO()
    progress.configure(out, mode="lines", interval=0.0)
    try:
        assert list(progress.current().iterate([1, 2, 3], "items")) == [1, 2, 3]
        progress.message("after")
    finally:
        progress.configure(quiet=True)
    lines = out.getvalue().splitlines()
    assert lines[0] == "items: 0/3, 0%" and lines[-2].startswith("items: 3/3 in ")
    assert lines[-1] == "after"


def test_bad_arguments():
    with pytest.raises(ValueError, match="interval"):
        Progress(io.StringIO(), interval=-1)
    with pytest.raises(ValueError, match="total"), \
            Progress(io.StringIO(), mode="lines").task("x", total=-1):
        pass


def test_report_progress_is_the_process_progress(capsys, monkeypatch):
    """``report.progress`` (what measurers default to) is the process's Progress, bars
    included: not an old callback wrapped into lines."""
    from onnxcomp.report import progress as report_progress

    monkeypatch.setattr(progress, "_current", None)  # restored after the test

    configured = progress.configure(quiet=True)
    assert as_progress(report_progress) is configured
    report_progress("nothing: quiet")
    configured = progress.configure(mode="lines")
    assert as_progress(report_progress) is configured
    report_progress("a line")
    assert capsys.readouterr().err == "a line\n"


def test_a_task_that_fails_prints_no_final_line():
    """The error says what happened; a "3/5 in 1 s" line before it would read as success."""
    lines: list[str] = []
    bar = Progress(sink=lines.append)
    with pytest.raises(RuntimeError), bar.task("validate", total=5, unit="batch") as task:
        task.advance()
        raise RuntimeError("boom")
    assert lines == ["validate: 0/5, 0%"]
