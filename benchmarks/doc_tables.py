"""Writing a benchmark's tables into its docs page, between the page's markers.

Benchmarks run as scripts (``python benchmarks/NAME.py``), so their own folder is on the path
and they import this as ``from doc_tables import write_between``."""

from __future__ import annotations

from pathlib import Path


def write_between(path: Path, begin: str, end: str, text: str,
                  heading: str | None = None) -> None:
    """Replace what stands between ``begin`` and ``end`` in ``path`` with ``text``. Without the
    markers: with ``heading``, a new section (that heading and the markers) is appended (a
    missing file is created); without one, the run stops naming the missing markers."""
    doc = path.read_text(encoding="utf-8") if path.exists() else ""
    if begin not in doc or end not in doc:
        if heading is None:
            raise SystemExit(f"{path}: no {begin} … {end} markers to write the table between")
        doc += f"\n{heading}\n\n{begin}\n{end}\n" if heading else f"{begin}\n{end}\n"
    head, rest = doc.split(begin, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{rest.split(end, 1)[1]}", encoding="utf-8")
