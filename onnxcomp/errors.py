"""The project's exceptions: the CLI turns these into one line on stderr and exit code 2."""

from __future__ import annotations


class OnnxcompError(Exception):
    """A user mistake or an input we refuse: bad path, bad recipe, mismatched data."""


class UnsafeModelError(OnnxcompError):
    """The model points outside its folder (external data) or is otherwise not safe to load."""
