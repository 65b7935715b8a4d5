"""Every exception onnxcomp raises on purpose, and the exit code the CLI gives each.

- ``UserError`` (exit 2): a user mistake or an input we refuse (bad path, bad recipe, data that
  does not fit the model, an unsafe model). Raised wherever it is found, deep in a pass or at the
  CLI edge; the CLI prints its message as one line.
- ``TargetMissed`` (exit 1): the result missed a stated target (``--min-cosine``); the report is
  still written, the model is not.
- ``OurBug`` (exit 3): onnxcomp did something wrong: a pass raised on a graph it should have handled
  or skipped (``PassFailed``), or a model we produced is refused by onnx's checker or ONNX Runtime
  (``InvalidOutput``). Nothing is written; the message asks for a report.

``OnnxcompError`` is the common base (catch it to catch everything onnxcomp raises on purpose).
"""

from __future__ import annotations


class OnnxcompError(Exception):
    """Base of every onnxcomp exception; on its own it means a user error (exit 2)."""

    exit_code = 2


class UserError(OnnxcompError):
    """A user mistake or an input we refuse: bad path, bad recipe, mismatched data."""

    exit_code = 2


class UnsafeModelError(UserError):
    """The model points outside its folder (external data) or is otherwise not safe to load."""


class TargetMissed(OnnxcompError):
    """A stated target (e.g. ``--min-cosine``) was missed; the report is still written."""

    exit_code = 1


class OurBug(OnnxcompError):
    """onnxcomp itself went wrong; the input was fine. Exit 3, nothing written."""

    exit_code = 3


class PassFailed(OurBug):
    """A pass raised on a graph it should have handled or skipped, named with its context."""


class InvalidOutput(OurBug):
    """A model onnxcomp produced is refused by onnx's checker or by ONNX Runtime."""
