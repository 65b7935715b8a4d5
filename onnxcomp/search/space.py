"""The search space, derived from what each pass's plan says it can do on this model.

A dimension is a recipe choice named ``PASS.FIELD`` (a field of that pass's Config) or
``PASS.use`` (whether the pass is in the recipe at all); ``quantize.mode`` has ``none`` for "no
quantization". Derivation (on the cleaned-up model, as a real run starts):

- ``quantize.mode``: the modes whose plan has rows to act on (``int8`` only with calibration
  data), plus ``none``; ``quantize.calibration`` and ``quantize.output_qdq`` (int8; the values
  that differ on this model, ``output_qdq_choices``), ``quantize.exclude`` (nothing, the
  first and last quantized layers, or one op type at a time where the plan quantizes several)
  and ``quantize.min_cosine`` (mixed precision: off, 0.99, 0.999 and every cosine bound of the
  constraints; with calibration data), ``quantize.keep_float_by`` (int8: ``harm`` or
  ``latency``, which also keeps the layers slower in int8 than float in float) and
  ``quantize.range_search`` (int8, with calibration data: loss-aware activation ranges);
- ``prune.use``/``ratio``/``ranking``: only where prune's plan has groups to cut;
- ``lowrank.use``/``energy``: only where lowrank's plan has layers it would factor;
- ``distill.use``: with calibration data (refit; add ``kd`` in TOML where torch is there);
- ``fuse.use``: where fuse's plan finds something and torch is importable.

A pass's other dimensions are sampled only when the pass is in the recipe (and a quantize
field named for one mode only when that mode is drawn), so Optuna's conditional search space
stays small. ``notes`` says why a dimension is absent. ``load_overrides`` narrows or extends
the space from TOML (see docs/search.md).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from onnxcomp import passes
from onnxcomp.errors import UserError
from onnxcomp.model import Model
from onnxcomp.pipeline import Context, Pipeline, Plan
from onnxcomp.recipe import coerce, with_cleanup

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

ORDER = ("prune", "lowrank", "distill", "fuse", "quantize")  # the recipe order of the passes
QUANTIZE_MODES = ("int8", "int8-dynamic", "int4")
CALIBRATIONS = ("minmax", "percentile", "entropy", "mse")
MIN_COSINES = (0.99, 0.999)
LOWRANK_ENERGIES = (0.9, 0.95, 0.99, 0.999, 0.9999)
# quantize fields that only mean something in some modes (sampled only then)
MODE_FIELDS = {"calibration": ("int8",), "percentile": ("int8",), "output_qdq": ("int8",),
               "activation_matmuls": ("int8",), "smoothquant_alpha": ("int8",),
               "min_cosine": ("int8", "int4"), "keep_float_by": ("int8",),
               "range_search": ("int8",),
               "block_size": ("int4",),
               "int4_format": ("int4",), "int4_symmetric": ("int4",), "int4_scale": ("int4",),
               "int4_method": ("int4",), "attention": ("int8-dynamic",)}
NONE = "none"


@dataclass(frozen=True)
class Dimension:
    """One choice: categorical (``choices``) or numeric (``low``..``high``, ``step``)."""

    name: str
    choices: tuple[Any, ...] | None = None
    low: float | None = None
    high: float | None = None
    step: float | None = None
    integer: bool = False

    @property
    def pass_name(self) -> str:
        return self.name.partition(".")[0]

    @property
    def field(self) -> str:
        return self.name.partition(".")[2]

    @property
    def gate(self) -> bool:
        return self.field == "use" or self.name == "quantize.mode"

    def suggest(self, trial: Any) -> Any:
        if self.choices is not None:
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high),
                                     step=int(self.step or 1))
        value = trial.suggest_float(self.name, self.low, self.high, step=self.step)
        return round(value, 12)  # a step of 0.05 gives 0.15000000000000002

    def describe(self) -> str:
        if self.choices is not None:
            return " | ".join("off" if c is None else str(c) for c in self.choices)
        step = f" step {self.step}" if self.step else ""
        return f"{self.low} .. {self.high}{step}"


@dataclass
class Space:
    """The dimensions, values pinned for every trial (``fixed``), the meaning of each
    ``quantize.exclude`` label, and why dimensions are absent (``notes``)."""

    dimensions: list[Dimension] = field(default_factory=list)
    fixed: dict[str, Any] = field(default_factory=dict)
    exclude_sets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def get(self, name: str) -> Dimension | None:
        return next((d for d in self.dimensions if d.name == name), None)

    def sample(self, trial: Any) -> dict[str, Any]:
        """Draw a trial's parameters; gates first, the rest only where they matter."""
        params: dict[str, Any] = {}
        for dim in [d for d in self.dimensions if d.gate]:
            params[dim.name] = dim.suggest(trial)
        for dim in [d for d in self.dimensions if not d.gate]:
            if self._active(dim, params):
                params[dim.name] = dim.suggest(trial)
        return params

    def _active(self, dim: Dimension, params: dict[str, Any]) -> bool:
        if not self._present(dim.pass_name, params):
            return False
        if dim.pass_name == "quantize" and dim.field in MODE_FIELDS:
            return self._value("quantize.mode", params) in MODE_FIELDS[dim.field]
        return True

    def _value(self, name: str, params: dict[str, Any]) -> Any:
        if name in params:
            return params[name]
        if name in self.fixed:
            return self.fixed[name]
        return passes.get("quantize").config_type().mode if name == "quantize.mode" else None

    def _present(self, pass_name: str, params: dict[str, Any]) -> bool:
        if pass_name == "quantize":
            mode_gated = "quantize.mode" in params or "quantize.mode" in self.fixed
            if mode_gated:
                return self._value("quantize.mode", params) != NONE
        gate = f"{pass_name}.use"
        if gate in params or gate in self.fixed:
            return bool(self._value(gate, params))
        # a pass with no gate is in the recipe when anything names it
        return any(n.partition(".")[0] == pass_name for n in (*params, *self.fixed))

    def recipe(self, params: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        """The trial's recipe as ``[(pass, {field: value})]`` in ``ORDER``."""
        steps = []
        names = [*ORDER, *sorted({n.partition(".")[0] for n in (*params, *self.fixed)}
                                 - set(ORDER))]
        for pass_name in names:
            if not self._present(pass_name, params):
                continue
            table: dict[str, Any] = {}
            for source in (self.fixed, params):
                for name, value in source.items():
                    owner, _, field_name = name.partition(".")
                    if owner != pass_name or field_name == "use":
                        continue
                    if name == "quantize.exclude" and isinstance(value, str):
                        value = self.exclude_sets.get(value, (value,) if value != NONE else ())
                    table[field_name] = list(value) if isinstance(value, tuple) else value
            steps.append((pass_name, table))
        return steps

    def params_for(self, recipe: str | list) -> dict[str, Any]:
        """The parameters that make this space's trial exactly ``recipe`` (a short-form or
        parsed recipe such as ``quantize:int8``): to enqueue a fixed recipe as a trial, so the
        search measures it side by side with what it finds. Every dimension the recipe leaves
        out takes the pass's default (or off); a value the space cannot express is a
        UserError."""
        from onnxcomp.recipe import parse_recipe

        steps = {step.spec.name: step.config for step in parse_recipe(recipe)}
        names = {d.pass_name for d in self.dimensions} | {n.partition(".")[0] for n in self.fixed}
        missing = sorted(set(steps) - names)
        if missing:
            raise UserError(f"recipe {recipe!r}: {', '.join(missing)} is not in the search space")
        params: dict[str, Any] = {}
        for dim in [d for d in self.dimensions if d.gate]:
            if dim.name == "quantize.mode":
                params[dim.name] = steps["quantize"].mode if "quantize" in steps else NONE
            else:
                params[dim.name] = dim.pass_name in steps
        for dim in [d for d in self.dimensions if not d.gate]:
            if not self._active(dim, params):
                continue
            value = getattr(steps[dim.pass_name], dim.field)
            if dim.name == "quantize.exclude":
                wanted = tuple(value or ())
                value = next((label for label, patterns in self.exclude_sets.items()
                              if tuple(patterns) == wanted), None)
            params[dim.name] = value
        for name, value in params.items():
            dim = self.get(name)
            fits = (value in dim.choices if dim.choices is not None
                    else value is not None and dim.low <= value <= dim.high)
            if not fits:
                raise UserError(f"recipe {recipe!r}: {name} = {value!r} is outside the search "
                                f"space ({dim.describe()})")
        return params

    def to_dict(self) -> dict[str, Any]:
        return {"dimensions": [dataclasses.asdict(d) for d in self.dimensions],
                "fixed": dict(self.fixed),
                "exclude_sets": {k: list(v) for k, v in self.exclude_sets.items()},
                "notes": list(self.notes)}

    def table(self) -> str:
        from onnxcomp.report import markdown_table

        rows = [[d.name, d.describe()] for d in self.dimensions]
        rows += [[name, f"fixed: {value}"] for name, value in self.fixed.items()]
        lines = [markdown_table(["dimension", "values"], rows)]
        lines += [f"- {note}" for note in self.notes]
        return "\n".join(lines)


def _plan(model: Model, name: str, ctx: Context, **values: Any) -> Plan:
    spec = passes.get(name)
    return spec.plan(model, spec.config_type(**values), ctx)


def _op_types(model: Model) -> dict[str, str]:
    # top-level nodes only: quantize's plan rows name those (subgraph bodies are rare here)
    return {node.name: node.op_type for node in model.graph.node}


def output_qdq_choices(op_types: set[str | None]) -> tuple[str, ...]:
    """The ``quantize.output_qdq`` values that make different int8 models here (default
    first): ``conv-only`` where Conv and weight MatMul/Gemm sites both exist (it drops the
    MatMuls' output QDQ: ppocr-rec 0.716x vs 0.740x float in docs/quantize.md), ``none``
    where there is no Conv (there it is what conv-only is). ``none`` with Convs is left out:
    Conv outputs need their QDQ to run as QLinearConv (ppocr-rec 1.40x float); ``all`` is
    left to TOML."""
    matmuls = bool(op_types & {"MatMul", "Gemm"})
    if "Conv" in op_types:
        return ("conv", "conv-only") if matmuls else ("conv",)
    return ("conv", "none") if matmuls else ("conv",)


def derive(model: Model, calibration: bool, constraint_cosines: tuple[float, ...] = (),
           torch_available: bool | None = None) -> Space:
    """The space for ``model``: see the module docstring. ``calibration``: whether the search
    has calibration data (int8 static, distill and mixed precision need it)."""
    if torch_available is None:
        torch_available = importlib.util.find_spec("torch") is not None
    ctx = Context(teacher=model)
    cleaned, _ = Pipeline(with_cleanup([])).run(model, ctx)
    space = Space()
    dims = space.dimensions
    op_of = _op_types(cleaned)

    modes, acting = [], {}
    for mode in QUANTIZE_MODES:
        if mode == "int8" and not calibration:
            space.notes.append("quantize int8 (static) left out: no calibration data")
            continue
        plan = _plan(cleaned, "quantize", ctx, mode=mode)
        if plan.actions():
            modes.append(mode)
            acting[mode] = [row.node for row in plan.actions()]
        else:
            space.notes.append(f"quantize {mode} left out: its plan quantizes nothing")
    if modes:
        dims.append(Dimension("quantize.mode", (NONE, *modes)))
        if "int8" in modes:
            dims.append(Dimension("quantize.calibration", CALIBRATIONS))
            qdq = output_qdq_choices({op_of.get(n) for n in acting["int8"]})
            if len(qdq) > 1:
                dims.append(Dimension("quantize.output_qdq", qdq))
        nodes = acting[modes[0]]
        space.exclude_sets[NONE] = ()
        if len(nodes) > 2:
            space.exclude_sets["first+last"] = (nodes[0], nodes[-1])
        kinds = sorted({op_of[n] for n in nodes if n in op_of})
        if len(kinds) > 1:
            for kind in kinds:
                space.exclude_sets[f"op:{kind}"] = (kind,)
        if len(space.exclude_sets) > 1:
            dims.append(Dimension("quantize.exclude", tuple(space.exclude_sets)))
        if calibration and ("int8" in modes or "int4" in modes):
            cosines = sorted({*MIN_COSINES, *(float(c) for c in constraint_cosines)})
            dims.append(Dimension("quantize.min_cosine", (None, *cosines)))
        if calibration and "int8" in modes:
            # which layers go back to float: by harm, or by harm per millisecond saved with the
            # layers slower in int8 always float (PP-OCRv4 det: faster and more faithful)
            dims.append(Dimension("quantize.keep_float_by", ("harm", "latency")))
            # activation ranges fitted to the model output on the calibration data (a fit to
            # its distribution: PP-OCRv4 det IoU and rec eval lines up, harder lines down)
            dims.append(Dimension("quantize.range_search", (False, True)))
    else:
        space.notes.append("quantize left out: no mode quantizes anything here")

    if _plan(cleaned, "prune", ctx).actions():
        dims += [Dimension("prune.use", (False, True)),
                 Dimension("prune.ratio", low=0.05, high=0.4, step=0.05),
                 Dimension("prune.ranking", ("local", "global"))]
    else:
        space.notes.append("prune left out: its plan finds no group it can cut")
    if _plan(cleaned, "lowrank", ctx, energy=min(LOWRANK_ENERGIES)).actions():
        dims += [Dimension("lowrank.use", (False, True)),
                 Dimension("lowrank.energy", LOWRANK_ENERGIES)]
    else:
        space.notes.append("lowrank left out: no layer where factoring saves parameters")
    if calibration and len(dims) > 0:
        dims.append(Dimension("distill.use", (False, True)))
    elif not calibration:
        space.notes.append("distill left out: it needs calibration data")
    if not torch_available:
        space.notes.append("fuse left out: onnxruntime.transformers' optimizer needs torch")
    elif _plan(cleaned, "fuse", ctx).actions():
        dims.append(Dimension("fuse.use", (False, True)))
    else:
        space.notes.append("fuse left out: no pattern to fuse")
    return space


# --- TOML overrides ---------------------------------------------------------------------------


def _field_type(name: str) -> Any:
    pass_name, dot, field_name = name.partition(".")
    if not dot or not field_name:
        raise UserError(f"search space: {name!r} is not PASS.FIELD")
    spec = passes.get(pass_name)
    if field_name == "use":
        return bool
    if name == "quantize.exclude":
        return str  # a label of exclude_sets, or one pattern
    types = typing.get_type_hints(spec.config_type)
    if field_name not in types:
        raise UserError(f"search space: pass {pass_name!r} has no field {field_name!r}; "
                        f"known: {', '.join(sorted(types))}")
    return types[field_name]


def _value(name: str, value: Any) -> Any:
    if name == "quantize.mode" and value == NONE:
        return NONE
    if name == "quantize.exclude" and isinstance(value, list):
        return ",".join(map(str, value)) or NONE
    annotation = _field_type(name)
    result = coerce(annotation, value, f"search space {name}")
    if not name.endswith(".use") and name != "quantize.exclude":
        pass_name, _, field_name = name.partition(".")
        try:  # the pass's own checks (ranges, known modes) on this one value
            passes.get(pass_name).config_type(**{field_name: result})
        except (TypeError, ValueError) as exc:
            raise UserError(f"search space {name}: {exc}") from None
    return tuple(result) if isinstance(result, list) else result


def apply_overrides(space: Space, document: dict[str, Any]) -> Space:
    """Narrow or extend ``space`` (see docs/search.md): ``[dimensions."PASS.FIELD"]`` with
    ``choices``, or ``low``/``high``/``step``, or ``fixed``; ``[fixed]`` pins values."""
    unknown = sorted(set(document) - {"dimensions", "fixed", "search"})
    if unknown:
        raise UserError(f"search space: unknown table(s) {', '.join(unknown)}; expected "
                        "[dimensions.\"PASS.FIELD\"], [fixed], [search]")
    dims = {d.name: d for d in space.dimensions}
    for name, table in (document.get("dimensions") or {}).items():
        if not isinstance(table, dict):
            raise UserError(f"search space: dimensions.{name!r} must be a table")
        extra = sorted(set(table) - {"choices", "low", "high", "step", "fixed"})
        if extra:
            raise UserError(f"search space {name}: unknown key(s) {', '.join(extra)}")
        annotation = _field_type(name)
        if "fixed" in table:
            dims.pop(name, None)
            space.fixed[name] = _value(name, table["fixed"])
        elif "choices" in table:
            choices = table["choices"]
            if not isinstance(choices, list) or not choices:
                raise UserError(f"search space {name}: choices must be a non-empty list")
            values = tuple(_value(name, c) for c in choices)
            if name == "quantize.exclude":
                for raw, label in zip(choices, values):
                    if label not in space.exclude_sets:
                        patterns = raw if isinstance(raw, list) else [raw]
                        space.exclude_sets[label] = tuple(str(p) for p in patterns)
            dims[name] = Dimension(name, values)
        elif "low" in table and "high" in table:
            integer = annotation is int or int in (typing.get_args(annotation) or ())
            low, high = (_value(name, table[k]) for k in ("low", "high"))
            if not low < high:
                raise UserError(f"search space {name}: low must be below high")
            step = table.get("step")
            if step is not None and (isinstance(step, bool) or not isinstance(step, (int, float))
                                     or step <= 0):
                raise UserError(f"search space {name}: step must be a positive number")
            dims[name] = Dimension(name, low=low, high=high, step=step, integer=integer)
        else:
            raise UserError(f"search space {name}: give choices, low and high, or fixed")
        if name in dims and name in space.fixed:
            del space.fixed[name]
    for name, value in (document.get("fixed") or {}).items():
        dims.pop(name, None)
        space.fixed[name] = _value(name, value)
    space.dimensions = list(dims.values())
    return space


def load_overrides(path: str | Path) -> dict[str, Any]:
    """The TOML document at ``path`` (a UserError when unreadable)."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise UserError(f"search space file {path}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise UserError(f"search space file {path}: invalid TOML ({exc})") from None
