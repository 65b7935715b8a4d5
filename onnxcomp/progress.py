"""Progress for long work: one API, three renderings, all on stderr (stdout stays a clean table
or JSON).

    from onnxcomp import progress
    with progress.task("calibration", total=len(data), unit="batch") as bar:
        for batch in data:
            ...
            bar.advance()
    progress.message("quantize: 47 layers")        # a one-off line

- ``bar`` (stderr is a terminal): a tqdm bar per task with count, rate and ETA, redrawn in
  place; one-off lines are printed above the bars without breaking them.
- ``lines`` (stderr is a pipe or a file: CI logs): plain lines, no carriage returns: one when a
  task starts, one at most every ``interval`` seconds while it runs (count, percent, rate,
  ETA), one when it ends (count, time, rate).
- ``quiet``: nothing at all (``--quiet``).

The mode is chosen from the stream (``isatty()``; ``TERM=dumb`` counts as no terminal), unless
``quiet`` or ``mode`` say otherwise; the environment variable ``ONNXCOMP_PROGRESS`` (``bar``,
``lines`` or ``off``) overrides the automatic choice. Without tqdm the bar mode falls back to
lines.

Compatibility: a :class:`Progress` is a ``Callable[[str], None]`` (calling it prints a one-off
line), so it can be passed wherever a ``progress(message)`` callback is taken today, and
:func:`as_progress` turns any such callback (or None) into a Progress whose tasks report through
it as plain lines: code that receives a callback can still use ``task``.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any, TypeVar

MODES = ("bar", "lines", "quiet")
ENV = "ONNXCOMP_PROGRESS"
# Seconds between two progress lines of one task in lines mode.
LINE_INTERVAL = 5.0
T = TypeVar("T")


def _duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, rest = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {rest:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _rate(count: float, seconds: float, unit: str) -> str:
    if seconds <= 0 or count <= 0:
        return ""
    per_second = count / seconds
    if per_second >= 1:
        return f"{per_second:.3g} {unit}/s"
    return f"{seconds / count:.3g} s/{unit}"


def choose_mode(stream: IO[str], quiet: bool = False, mode: str | None = None) -> str:
    """``quiet`` wins, then an explicit ``mode``, then ``$ONNXCOMP_PROGRESS``, then the stream."""
    if quiet:
        return "quiet"
    if mode is not None:
        if mode not in MODES:
            raise ValueError(f"progress mode must be one of {', '.join(MODES)}, got {mode!r}")
        return mode
    env = os.environ.get(ENV, "").strip().lower()
    if env in ("off", "quiet", "none", "0"):
        return "quiet"
    if env in ("bar", "lines"):
        return env
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):  # closed or not a real stream
        tty = False
    return "bar" if tty and os.environ.get("TERM") != "dumb" else "lines"


class Task:
    """One long step: ``advance`` as work gets done; ``note`` shows what it is on now."""

    def __init__(self, owner: Progress, name: str, total: int | None, unit: str, depth: int):
        self.owner, self.name, self.total, self.unit, self.depth = owner, name, total, unit, depth
        self.done = 0
        self.text = ""
        self.started = owner.clock()
        self._last_line = self.started
        self._bar: Any = None

    def advance(self, count: int = 1) -> None:
        self.done += count
        self.owner._update(self, count)

    def set(self, done: int, total: int | None = None) -> None:
        """Jump to ``done`` (of ``total``): usable as a ``callback(done, total)``."""
        if total is not None and total != self.total:
            self.total = total
            if self._bar is not None:
                self._bar.total = total
        step, self.done = done - self.done, done
        self.owner._update(self, step)

    def note(self, text: str) -> None:
        """What the task is on now (a layer name): after the bar, or in the next line."""
        self.text = text
        if self._bar is not None:
            self._bar.set_postfix_str(text, refresh=False)

    def elapsed(self) -> float:
        return self.owner.clock() - self.started

    def status(self, final: bool = False) -> str:
        """The plain line for this task (lines mode)."""
        seconds = self.elapsed()
        count = f"{self.done}/{self.total}" if self.total else f"{self.done} {self.unit}"
        if final:
            parts = [f"{count} in {_duration(seconds)}"]
        else:
            parts = [count]
            if self.total:
                parts.append(f"{100.0 * self.done / self.total:.0f}%")
        rate = _rate(self.done, seconds, self.unit)
        if rate:
            parts.append(rate)
        if not final and self.total and self.done and self.done < self.total:
            parts.append("ETA " + _duration(seconds * (self.total - self.done) / self.done))
        line = f"{self.name}: " + ", ".join(parts)
        if self.text and not final:
            line += f" ({self.text})"
        return line


class Progress:
    """Where progress goes. ``stream``: default stderr; ``quiet``: print nothing; ``mode``:
    force ``bar``/``lines``/``quiet``; ``interval``: seconds between lines of one task in lines
    mode; ``sink``: in lines mode, hand each line to this callable instead of the stream (an old
    ``progress(message)`` callback); ``clock``: for tests."""

    def __init__(self, stream: IO[str] | None = None, *, quiet: bool = False,
                 mode: str | None = None, interval: float = LINE_INTERVAL,
                 sink: Callable[[str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        if interval < 0:
            raise ValueError(f"interval must be >= 0, got {interval}")
        self.stream = stream
        self.mode = choose_mode(self._stream(), quiet, "lines" if sink and not mode else mode)
        if self.mode == "bar" and not _has_tqdm():
            self.mode = "lines"
        self.interval = float(interval)
        self.sink = sink
        self.clock = clock
        self._lock = threading.RLock()
        self._open: list[Task] = []

    def _stream(self) -> IO[str]:
        return self.stream if self.stream is not None else sys.stderr

    @property
    def quiet(self) -> bool:
        return self.mode == "quiet"

    def _write(self, line: str) -> None:
        if self.sink is not None:
            self.sink(line)
            return
        stream = self._stream()
        if self.mode == "bar" and any(t._bar is not None for t in self._open):
            from tqdm import tqdm

            tqdm.write(line, file=stream)  # clears the bars, prints, redraws them
        else:
            stream.write(line + "\n")
        stream.flush()

    def message(self, text: str) -> None:
        """A one-off line (what is starting, a result worth seeing before the end)."""
        if self.quiet:
            return
        with self._lock:
            self._write(text)

    def __call__(self, text: str) -> None:  # the ``progress(message)`` callback of old
        self.message(text)

    @contextlib.contextmanager
    def task(self, name: str, total: int | None = None, unit: str = "it") -> Iterator[Task]:
        """A long step with ``total`` units (None: unknown); yields the :class:`Task`."""
        if total is not None and total < 0:
            raise ValueError(f"total must be >= 0, got {total}")
        with self._lock:
            task = Task(self, name, total, unit, depth=len(self._open))
            self._open.append(task)
            if self.mode == "bar":
                from tqdm import tqdm

                sized = _terminal_sized(self._stream())
                # A terminal that reports no size, or 0 rows (a fresh pty, some CI runners, `stty
                # cols 120` alone), made tqdm draw nothing at all: give it a size then.
                task._bar = tqdm(total=total, desc=name, unit=unit, file=self._stream(),
                                 leave=task.depth == 0, dynamic_ncols=sized,
                                 ncols=None if sized else 100, nrows=None if sized else 20,
                                 mininterval=0.1, position=task.depth)
            elif self.mode == "lines":
                self._write(task.status())
        failed = True
        try:
            yield task
            failed = False
        finally:
            with self._lock:
                if task._bar is not None:
                    task._bar.close()
                    task._bar = None
                elif self.mode == "lines" and not failed:  # an error says the rest itself
                    self._write(task.status(final=True))
                self._open.remove(task)

    def iterate(self, items: Iterable[T], name: str, total: int | None = None,
                unit: str = "it") -> Iterator[T]:
        """Yield ``items`` with a task advancing once per item."""
        if total is None and hasattr(items, "__len__"):
            total = len(items)  # type: ignore[arg-type]
        with self.task(name, total, unit) as task:
            for item in items:
                yield item
                task.advance()

    def _update(self, task: Task, step: int) -> None:
        if self.quiet:
            return
        if task._bar is not None:
            with self._lock:
                task._bar.update(step)
            return
        now = self.clock()
        if now - task._last_line >= self.interval and (task.total is None
                                                         or task.done < task.total):
            task._last_line = now
            with self._lock:
                self._write(task.status())


def _terminal_sized(stream: IO[str]) -> bool:
    """The terminal reports both a width and a height (tqdm draws nothing in 0 rows)."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (AttributeError, OSError, ValueError):
        return False
    return size.columns > 0 and size.lines > 0


def _has_tqdm() -> bool:
    try:
        import tqdm  # noqa: F401
    except ImportError:
        return False
    return True


def as_progress(progress: Progress | Callable[[str], None] | None) -> Progress:
    """A Progress from what callers pass today: a Progress (itself), :func:`message` (the
    process's Progress, :func:`current`), None (quiet), or a ``progress(message)`` callback
    (its lines, tasks included, go through the callback)."""
    if isinstance(progress, Progress):
        return progress
    if progress is message:  # the module's own one-off line (``report.progress``): the process's
        return current()
    if progress is None:
        return Progress(quiet=True)
    return Progress(sink=progress)


# --- the process-wide default, set once by the CLI ---------------------------------------------

_current: Progress | None = None


def current() -> Progress:
    """The process's Progress (stderr, mode chosen from it) unless :func:`configure` set one."""
    global _current
    if _current is None:
        _current = Progress()
    return _current


def configure(stream: IO[str] | None = None, *, quiet: bool = False, mode: str | None = None,
              interval: float = LINE_INTERVAL) -> Progress:
    """Set the process's Progress (the CLI does this once, from ``--quiet``)."""
    global _current
    _current = Progress(stream, quiet=quiet, mode=mode, interval=interval)
    return _current


def message(text: str) -> None:
    """A one-off line through the process's Progress (``report.progress`` is this function)."""
    current().message(text)


def task(name: str, total: int | None = None, unit: str = "it"
         ) -> contextlib.AbstractContextManager[Task]:
    return current().task(name, total, unit)
