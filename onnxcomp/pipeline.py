"""Passes, their records, recipes, and the Pipeline that runs them.

A pass is a module under ``onnxcomp/passes/`` with:
- ``NAME``: its recipe name;
- ``Config``: a frozen dataclass that validates itself, with ``from_short(arg)`` for the short
  recipe form (``quantize:int8`` → ``Config.from_short("int8")``);
- ``run(model, config, ctx) -> (model, PassRecord)``: a pure function; the input model is not
  modified.

Recipes are a short string (``prune:0.3,lowrank:0.9,distill,quantize:int8``) or a TOML file::

    [[pass]]
    name = "quantize"
    mode = "int8"
    calibration = "percentile"
"""

from __future__ import annotations

import dataclasses
import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from onnxcomp.calibration import Dataset
from onnxcomp.errors import OnnxcompError
from onnxcomp.model import Model

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

# Recipe name → module. Explicit, no import-time registration.
PASS_MODULES = {
    "cleanup": "onnxcomp.passes.cleanup",
    "quantize": "onnxcomp.passes.quantize",
    "prune": "onnxcomp.passes.prune",
    "lowrank": "onnxcomp.passes.lowrank",
    "distill": "onnxcomp.passes.distill",
    "fuse": "onnxcomp.passes.fuse",
}


@dataclass
class PassRecord:
    """Exactly what a pass did: the nodes it touched, sizes before/after, what it skipped and why."""

    name: str
    modified: bool = False
    touched: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    params_before: int = 0
    params_after: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)
    # Pass-specific data that later passes (distill) or the report use, e.g. per-layer errors
    # or the map from compressed nodes to the teacher's tensors.
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Context:
    """What passes share: calibration data, the teacher (uncompressed model), earlier records."""

    calibration: Dataset | None = None
    # Held-out data, when given: what fidelity decisions inside a pass are measured on (a
    # method fitted to the calibration data scores too well on it).
    evaluation: Dataset | None = None
    teacher: Model | None = None
    records: list[PassRecord] = field(default_factory=list)
    progress: Callable[[str], None] = lambda message: None
    cache: dict[str, Any] = field(default_factory=dict)


class Pass(Protocol):
    NAME: str

    def run(self, model: Model, config: Any, ctx: Context) -> tuple[Model, PassRecord]: ...


@dataclass(frozen=True)
class Step:
    name: str
    config: Any

    def module(self):
        return pass_module(self.name)

    def describe(self) -> str:
        values = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}"
                           for f in dataclasses.fields(self.config))
        return f"{self.name}({values})"


def pass_module(name: str):
    if name not in PASS_MODULES:
        raise OnnxcompError(f"unknown pass {name!r}; known: {', '.join(PASS_MODULES)}")
    try:
        return importlib.import_module(PASS_MODULES[name])
    except ModuleNotFoundError as exc:
        if exc.name == PASS_MODULES[name]:
            raise OnnxcompError(f"pass {name!r} is not available in this version") from None
        raise


def _config_from_table(name: str, table: dict[str, Any]):
    config_type = pass_module(name).Config
    known = {f.name for f in dataclasses.fields(config_type)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise OnnxcompError(
            f"pass {name!r}: unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    try:
        return config_type(**table)
    except (TypeError, ValueError) as exc:
        raise OnnxcompError(f"pass {name!r}: {exc}") from None


def parse_recipe(recipe: str | Path | list[Step] | None) -> list[Step]:
    """A recipe as a list of Steps: from a TOML file, the short form, or already parsed."""
    if recipe is None:
        return []
    if isinstance(recipe, list):
        return recipe
    text = str(recipe).strip()
    if text.endswith(".toml") or Path(text).is_file():
        path = Path(text)
        if not path.is_file():
            raise OnnxcompError(f"recipe file {path} does not exist")
        try:
            document = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise OnnxcompError(f"recipe file {path}: invalid TOML ({exc})") from None
        steps = []
        for table in document.get("pass", []):
            table = dict(table)
            name = table.pop("name", None)
            if not name:
                raise OnnxcompError(f"recipe file {path}: every [[pass]] needs a name")
            steps.append(Step(name, _config_from_table(name, table)))
        if not steps:
            raise OnnxcompError(f"recipe file {path}: no [[pass]] tables")
        return steps
    steps = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            raise OnnxcompError(f"recipe {text!r}: empty step")
        name, _, arg = part.partition(":")
        config_type = pass_module(name.strip()).Config
        try:
            config = config_type.from_short(arg.strip() or None)
        except (TypeError, ValueError) as exc:
            raise OnnxcompError(f"recipe step {part!r}: {exc}") from None
        steps.append(Step(name.strip(), config))
    return steps


def _option_value(text: str):
    """A TOML value (number, bool, list, quoted string); anything else is a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(steps: list[Step], overrides: list[str] | None) -> list[Step]:
    """``PASS.FIELD=VALUE`` settings (the CLI's ``--set``) applied to every step of that pass."""
    steps = list(steps)
    for override in overrides or []:
        key, sep, text = override.partition("=")
        name, dot, field_name = key.strip().partition(".")
        if not sep or not dot or not field_name:
            raise OnnxcompError(f"bad --set {override!r}: expected PASS.FIELD=VALUE")
        matching = [i for i, step in enumerate(steps) if step.name == name]
        if not matching:
            raise OnnxcompError(f"--set {override!r}: the recipe has no {name!r} step")
        for i in matching:
            table = {f.name: getattr(steps[i].config, f.name)
                     for f in dataclasses.fields(steps[i].config)}
            if field_name not in table:
                raise OnnxcompError(f"--set {override!r}: pass {name!r} has no option "
                                    f"{field_name!r}; known: {', '.join(sorted(table))}")
            table[field_name] = _option_value(text.strip())
            steps[i] = Step(name, _config_from_table(name, table))
    return steps


class PassFailed(RuntimeError):
    """A pass raised on a graph it should have handled or skipped: a bug, named with its context."""


class Pipeline:
    """Run steps in order. A cleanup pass runs first (it lifts Constant-node weights so every pass
    sees initializers) and after the last step."""

    def __init__(self, steps: list[Step], cleanup: bool = True):
        self.steps = list(steps)
        if cleanup:
            cleanup_config = pass_module("cleanup").Config()
            self.steps = [Step("cleanup", cleanup_config), *self.steps]
            if len(steps) > 0:
                self.steps.append(Step("cleanup", cleanup_config))

    def run(self, model: Model, ctx: Context) -> tuple[Model, list[PassRecord]]:
        records: list[PassRecord] = []
        done: list[str] = []
        for index, step in enumerate(self.steps, start=1):
            ctx.progress(f"[{index}/{len(self.steps)}] {step.name}")
            started = time.perf_counter()
            module = step.module()
            if model.lazy and not getattr(module, "LAZY_WEIGHTS", False):
                # This pass reads weights straight from the protobuf: give it all of them.
                ctx.progress(f"{step.name}: reading all {model.lazy_bytes() / 2**20:.0f} MiB of "
                             "weights into memory (this pass does not read them lazily)")
                model = model.copy()
                model.materialize()
            try:
                model, record = module.run(model, step.config, ctx)
            except OnnxcompError:
                raise
            except Exception as exc:
                raise PassFailed(
                    f"pass {step.name!r} failed (after {', '.join(done) or 'nothing'}): {exc}"
                ) from exc
            record.seconds = time.perf_counter() - started
            records.append(record)
            ctx.records.append(record)
            done.append(step.name)
        return model, records
