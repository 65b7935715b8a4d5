"""The pass contract, the records passes leave, and the Pipeline that enforces both.

A pass is a ``PassSpec``: its name, its frozen ``Config`` dataclass, its capabilities as data,
and two functions:

    plan(model, config, ctx) -> Plan        pure: what it would do, node by node, and why not
    apply(model, plan, ctx)  -> Applied     the only step that builds a new model

Every ``Plan`` renders as one table shape (node, action, reason): that is ``--dry-run`` and
``inspect``. The pass's own typed plan (quantization sites, pruning groups, ranks) travels in
``Plan.payload``; only that pass's ``apply`` reads it.

The Pipeline, not the pass, checks the capabilities (calibration data, the teacher, torch,
lazy weights), measures parameters, bytes and seconds around each step, fills the
``PassRecord`` and turns an unexpected exception into ``PassFailed`` naming the pass and those
before it. Passes hand each other typed data only: ``LayerChange`` (which layer a pass changed
and which teacher tensor it must still reproduce) is what distill and validation read.

Config fields carry a one-line description (``option(default, "help")``); ``config_help``
lists them for ``onnxcomp compress --help-pass NAME``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from onnxcomp import runtime
from onnxcomp.calibration import Dataset
from onnxcomp.errors import OnnxcompError, PassFailed, UserError
from onnxcomp.model import Model

# --- configuration fields ---------------------------------------------------------------------


def option(default: Any = dataclasses.MISSING, help: str = "", *,
           default_factory: Any = dataclasses.MISSING) -> Any:
    """A config field with its one-line description (shown by ``--help-pass``)."""
    return field(default=default, default_factory=default_factory, metadata={"help": help})


@dataclass(frozen=True)
class FieldHelp:
    name: str
    type: str
    default: Any
    help: str


def config_help(config_type: type) -> list[FieldHelp]:
    """Each field of a pass's Config: name, type, default and its description."""
    rows = []
    for f in dataclasses.fields(config_type):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        type_name = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        rows.append(FieldHelp(f.name, type_name, default, f.metadata.get("help", "")))
    return rows


# --- what a pass declares ---------------------------------------------------------------------


def _never(config: Any) -> bool:
    return False


@dataclass(frozen=True)
class Capabilities:
    """What a pass needs and can do, checked by the Pipeline before the pass runs."""

    # Reads weights one layer at a time through graph/model accessors, so a model whose weights
    # stay on disk stays there; otherwise the Pipeline reads all weights in first (and says so).
    lazy_weights: bool = False
    # Whether this configuration needs calibration data (a predicate: quantize int8 does, int4
    # round-to-nearest does not); a string result says what needs it, for the refusal.
    needs_calibration: Callable[[Any], bool | str] = _never
    # Needs the uncompressed model (the teacher) in the context.
    needs_teacher: bool = False
    # Whether this configuration needs torch (the [train] extra).
    needs_torch: Callable[[Any], bool] = _never
    # Accepts only models no earlier onnxcomp quantization has touched, etc.: free text for docs.
    notes: str = ""


@dataclass(frozen=True)
class PlanRow:
    """One line of a plan: a node (or group, or tensor), what the pass would do, and why."""

    node: str
    action: str   # e.g. "quantize int8 per-channel", "factor rank 64/384", "skip"
    reason: str = ""

    @property
    def skipped(self) -> bool:
        return self.action == "skip"


SKIP = "skip"


@dataclass
class Plan:
    """What a pass would do to a model. ``rows`` is the common, printable shape; ``payload`` is
    the pass's own typed plan, read only by that pass's ``apply``."""

    pass_name: str
    config: Any
    rows: list[PlanRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    payload: Any = None

    def actions(self) -> list[PlanRow]:
        return [row for row in self.rows if not row.skipped]

    def skipped(self) -> list[tuple[str, str]]:
        return [(row.node, row.reason) for row in self.rows if row.skipped]

    def table(self, limit: int | None = None) -> str:
        """The plan as a Markdown table (node | action | reason), then its notes."""
        from onnxcomp.report import markdown_table

        rows = self.rows if limit is None else self.rows[:limit]
        lines = [markdown_table(["node", "action", "reason"],
                                [[r.node, r.action, r.reason] for r in rows])] if rows else []
        if limit is not None and len(self.rows) > limit:
            lines.append(f"... {len(self.rows) - limit} more rows")
        counts = f"{len(self.actions())} to change, {len(self.skipped())} skipped"
        lines.append(f"{self.pass_name}: {counts}")
        lines.extend(f"- {note}" for note in self.notes)
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {"pass": self.pass_name,
                "rows": [dataclasses.asdict(row) for row in self.rows],
                "notes": list(self.notes)}


@dataclass(frozen=True)
class LayerChange:
    """A layer an earlier pass changed, and what in the teacher it must still reproduce.

    The typed hand-over between passes: distill re-fits these; validation can name them."""

    node: str                 # the student node whose weights were changed
    pass_name: str            # the pass that changed it
    teacher_output: str       # the teacher tensor this node's output corresponds to
    repair: str = "refit"     # what distill may do: "refit" (weights and bias) or "bias" only
    # When the node's own output channels were pruned: the teacher channels it kept, in order.
    teacher_channels: tuple[int, ...] | None = None
    # Nodes a pass inserted for this layer (lowrank: the two factors), in order.
    nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.repair not in ("refit", "bias"):
            raise ValueError(f"repair must be 'refit' or 'bias', got {self.repair!r}")


@dataclass
class Applied:
    """What ``apply`` hands back: the new model and exactly what changed."""

    model: Model
    modified: bool
    touched: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    changes: list[LayerChange] = field(default_factory=list)
    # Report-only facts (per-layer errors, chosen ranks). No other pass reads them.
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PassSpec:
    """A pass: name, configuration type, capabilities and its plan/apply functions."""

    name: str
    config_type: type
    plan: Callable[[Model, Any, Context], Plan]
    apply: Callable[[Model, Plan, Context], Applied]
    capabilities: Capabilities = Capabilities()
    summary: str = ""

    def default_config(self) -> Any:
        return self.config_type()

    def run(self, model: Model, config: Any, ctx: Context) -> tuple[Model, PassRecord]:
        """This pass alone, through the Pipeline (so its record is filled the same way)."""
        result, (record,) = Pipeline([Step(self, config)]).run(model, ctx)
        return result, record


# --- records and context ----------------------------------------------------------------------


@dataclass
class PassRecord:
    """Exactly what a pass did, filled by the Pipeline: nodes touched, sizes before/after, time,
    what was skipped and why, and the typed list of layers changed."""

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
    changes: list[LayerChange] = field(default_factory=list)
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
    # Names of passes that tuned a choice on ``evaluation`` (a later check on it is optimistic).
    tuned_on_evaluation: list[str] = field(default_factory=list)

    def changes(self) -> list[LayerChange]:
        """Every layer earlier passes changed, in order (a later change to a node wins)."""
        return [change for record in self.records if record.modified
                for change in record.changes]


# --- running steps ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    spec: PassSpec
    config: Any

    @property
    def name(self) -> str:
        return self.spec.name

    def describe(self) -> str:
        values = ", ".join(f"{f.name}={getattr(self.config, f.name)!r}"
                           for f in dataclasses.fields(self.config))
        return f"{self.name}({values})"


def check_requirements(step: Step, ctx: Context) -> None:
    """Refuse, as a user error, a step whose needs the context does not meet."""
    caps = step.spec.capabilities
    reason = caps.needs_calibration(step.config)
    if reason and ctx.calibration is None:
        what = reason if isinstance(reason, str) else _short(step)
        raise UserError(f"{step.name} ({what}) needs calibration data (--calib)")
    if caps.needs_teacher and ctx.teacher is None:
        raise UserError(f"{step.name} needs the teacher (the uncompressed model)")
    if caps.needs_torch(step.config) and importlib.util.find_spec("torch") is None:
        raise UserError(f"{step.name} ({_short(step)}) needs torch: "
                        "pip install 'onnxcomp[train]'")


def _short(step: Step) -> str:
    mode = getattr(step.config, "mode", None) or getattr(step.config, "method", None)
    return str(mode) if mode else "this configuration"


def plan_step(step: Step, model: Model, ctx: Context) -> Plan:
    """The step's plan on ``model``; an unexpected exception is our bug, named."""
    return _guarded(step, [], step.spec.plan, model, step.config, ctx)


def _guarded(step: Step, done: list[str], work: Callable[..., Any], *args: Any) -> Any:
    try:
        return work(*args)
    except OnnxcompError:
        raise
    except MemoryError:
        raise
    except Exception as exc:
        raise PassFailed(f"pass {step.name!r} failed (after {', '.join(done) or 'nothing'}): "
                         f"{type(exc).__name__}: {exc}") from exc


class Pipeline:
    """Run steps in order, each planned then applied, with the records filled here."""

    def __init__(self, steps: Iterable[Step]):
        self.steps = list(steps)

    def run(self, model: Model, ctx: Context) -> tuple[Model, list[PassRecord]]:
        for step in self.steps:
            check_requirements(step, ctx)
        records: list[PassRecord] = []
        done: list[str] = []
        for index, step in enumerate(self.steps, start=1):
            ctx.progress(f"[{index}/{len(self.steps)}] {step.name}")
            started = time.perf_counter()
            if model.lazy and not step.spec.capabilities.lazy_weights:
                ctx.progress(f"{step.name}: reading all {model.lazy_bytes() / 2**20:.0f} MiB of "
                             "weights into memory (this pass does not read them lazily)")
                model = model.copy()
                model.materialize()
            params_before, bytes_before = model.parameter_count(), model.weight_bytes()
            plan = _guarded(step, done, step.spec.plan, model, step.config, ctx)
            applied = _guarded(step, done, step.spec.apply, model, plan, ctx)
            result = applied.model if applied.modified else model
            record = PassRecord(
                step.name, modified=applied.modified, touched=list(applied.touched),
                skipped=plan.skipped() + list(applied.skipped),
                params_before=params_before, bytes_before=bytes_before,
                params_after=result.parameter_count() if applied.modified else params_before,
                bytes_after=result.weight_bytes() if applied.modified else bytes_before,
                notes=list(plan.notes) + list(applied.notes),
                changes=list(applied.changes), details=dict(applied.details))
            record.seconds = time.perf_counter() - started
            records.append(record)
            ctx.records.append(record)
            done.append(step.name)
            # Let go of this step's plan (its payload may hold a prepared copy of the model)
            # and what it applied before the next step runs: else both live on through it.
            model = result
            del plan, applied, result
            # And hand the freed heap back: glibc keeps it, so each step's copies of a large
            # model would otherwise stay resident through the next; for a large model collect
            # the graph-surgeon cycles first (CLIP ViT-B/32: 4.1 -> 1.4 GB resident).
            large = model.weight_bytes() > runtime.FILE_SESSION_BYTES
            runtime.release_free_memory(collect=large)
        return model, records
