"""Recipes: the short form, TOML files, ``--set`` overrides, all coerced by one helper.

A recipe is a short string (``prune:0.3,lowrank:0.9,distill,quantize:int8``) or a TOML file::

    [[pass]]
    name = "quantize"
    mode = "int8"
    calibration = "percentile"

Every value, whether from TOML or from ``--set PASS.FIELD=VALUE``, goes through ``coerce``:
it turns the value into the type the Config field declares (``int`` refuses ``32.0`` and
``true``; ``tuple[str, ...]`` splits ``a,b`` on commas; ``X | None`` takes ``none``), so every
pass reads its fields the same way and a wrong type is one clear line, not a traceback.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

from onnxcomp import passes, targets
from onnxcomp.errors import UserError
from onnxcomp.pipeline import Step, config_help

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    import tomli as tomllib

MAX_STEPS = 64
MAX_RECIPE_BYTES = 1 << 20


def _field_types(config_type: type) -> dict[str, Any]:
    return typing.get_type_hints(config_type)


def _union_args(annotation: Any) -> tuple[Any, ...] | None:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return typing.get_args(annotation)
    return None


def coerce(annotation: Any, value: Any, where: str) -> Any:
    """``value`` (a TOML value or the text of a ``--set``) as the declared type, or UserError."""
    options = _union_args(annotation)
    if options is not None:
        if type(None) in options and (value is None or (isinstance(value, str)
                                                         and value.strip().lower() in ("none", ""))):
            return None
        errors = []
        for option in (o for o in options if o is not type(None)):
            try:
                return coerce(option, value, where)
            except UserError as exc:
                errors.append(str(exc))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise UserError(f"{where}: expected one of {', '.join(map(str, choices))}, "
                            f"got {value!r}")
        return value
    if origin in (tuple, list):
        args = typing.get_args(annotation)
        item_type = args[0] if args else str
        if isinstance(value, str):
            items = [part.strip() for part in value.split(",") if part.strip()]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        else:
            raise UserError(f"{where}: expected a list, got {value!r}")
        result = [coerce(item_type, item, where) for item in items]
        return tuple(result) if origin is tuple else result
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in ("true", "false", "yes", "no",
                                                                 "1", "0", "on", "off"):
            return value.strip().lower() in ("true", "yes", "1", "on")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value.strip())
            except ValueError:
                pass
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value) if isinstance(value, (int, float, str)) else None
        except ValueError:
            number = None
        if number is None or not math.isfinite(number):
            raise UserError(f"{where}: expected a finite number, got {value!r}")
        return number
    if annotation is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"{where}: expected a string, got {value!r}")
    return value


def config_from_table(name: str, table: dict[str, Any], base: Any = None) -> Any:
    """A pass's Config from a TOML table or overrides (on top of ``base`` when given)."""
    spec = passes.get(name)
    config_type = spec.config_type
    types_ = _field_types(config_type)
    known = set(types_)
    unknown = sorted(set(table) - known)
    if unknown:
        raise UserError(f"pass {name!r}: unknown option(s) {', '.join(map(str, unknown))}; "
                        f"known: {', '.join(sorted(known))}")
    values = {} if base is None else {f.name: getattr(base, f.name)
                                      for f in dataclasses.fields(base)}
    for key, value in table.items():
        values[key] = coerce(types_[key], value, f"{name}.{key}")
    try:
        return config_type(**values)
    except (TypeError, ValueError) as exc:
        raise UserError(f"pass {name!r}: {exc}") from None


def _load_toml(path: Path) -> dict:
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise UserError(f"recipe file {path}: larger than {MAX_RECIPE_BYTES} bytes")
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise UserError(f"recipe file {path}: not UTF-8 text") from None
    except OSError as exc:
        raise UserError(f"recipe file {path}: {exc.strerror or exc}") from None
    try:
        return tomllib.loads(text)
    except (tomllib.TOMLDecodeError, RecursionError) as exc:
        raise UserError(f"recipe file {path}: invalid TOML ({exc})") from None


def _steps_from_tables(tables, where: str) -> list[Step]:
    if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
        raise UserError(f"{where}: 'pass' must be an array of tables ([[pass]])")
    if len(tables) > MAX_STEPS:
        raise UserError(f"{where}: more than {MAX_STEPS} steps")
    steps = []
    for table in tables:
        table = dict(table)
        name = table.pop("name", None)
        if not isinstance(name, str) or not name:
            raise UserError(f"{where}: every [[pass]] needs a name (a string)")
        steps.append(Step(passes.get(name), config_from_table(name, table)))
    if not steps:
        raise UserError(f"{where}: no [[pass]] tables")
    return steps


def _steps_from_toml(path: Path) -> list[Step]:
    document = _load_toml(path)
    unknown = sorted(set(document) - {"pass", "target"})
    if unknown:
        hint = " (a [parts.NAME] recipe is for a pipeline folder)" if "parts" in unknown else ""
        raise UserError(f"recipe file {path}: unknown top-level key(s) {', '.join(unknown)}; "
                        f"expected [[pass]] tables{hint}")
    _toml_target(document, path)
    return _steps_from_tables(document.get("pass", []), f"recipe file {path}")


def _toml_target(document: dict, path: Path) -> str | None:
    """The recipe file's top-level ``target = "NAME"``, checked against the known targets."""
    name = document.get("target")
    if name is None:
        return None
    if not isinstance(name, str) or name.strip().lower() not in targets.TARGETS:
        raise UserError(f"recipe file {path}: unknown target {name!r}; known: "
                        f"{', '.join(targets.TARGETS)}")
    return name.strip().lower()


def recipe_target(recipe: str | Path | list[Step] | None,
                  flag: str | targets.Target | None = None) -> str | targets.Target | None:
    """The deployment target for a run: ``flag`` (``--target``, ``api.compress(target=)``)
    when given, else the TOML recipe's top-level ``target`` key, else None (the default)."""
    if flag is not None or recipe is None or isinstance(recipe, list):
        return flag
    text = str(recipe).strip()
    if not (text.endswith(".toml") or Path(text).is_file()) or not Path(text).is_file():
        return None  # the short form (a missing file is parse_recipe's error)
    return _toml_target(_load_toml(Path(text)), Path(text))


def parts_recipe(path: str | Path) -> tuple[list[Step] | None, dict[str, list[Step] | str]]:
    """A pipeline recipe file: ``[[pass]]`` tables for every part (optional) and ``[parts.NAME]``
    tables for one part or the decoder group, each with ``recipe = "short form"`` (``"float"``
    leaves it as it is) or its own ``[[parts.NAME.pass]]`` tables. Returns (the default steps or
    None, part -> steps or ``"float"``)."""
    path = Path(path)
    document = _load_toml(path)
    unknown = sorted(set(document) - {"pass", "parts"})
    if unknown:
        raise UserError(f"recipe file {path}: unknown top-level key(s) {', '.join(unknown)}; "
                        "expected [[pass]] and [parts.NAME] tables")
    default = (_steps_from_tables(document["pass"], f"recipe file {path}")
               if "pass" in document else None)
    per_part: dict[str, list[Step] | str] = {}
    tables = document.get("parts", {})
    if not isinstance(tables, dict):
        raise UserError(f"recipe file {path}: 'parts' must be tables [parts.NAME]")
    for name, table in tables.items():
        where = f"recipe file {path}, [parts.{name}]"
        if not isinstance(table, dict) or set(table) - {"recipe", "pass"} or len(table) != 1:
            raise UserError(f"{where}: give either recipe = \"...\" or [[parts.{name}.pass]]")
        if "recipe" in table:
            if not isinstance(table["recipe"], str):
                raise UserError(f"{where}: recipe must be a string")
            text = table["recipe"].strip()
            per_part[name] = "float" if text.lower() in ("float", "none") else parse_recipe(text)
        else:
            per_part[name] = _steps_from_tables(table["pass"], where)
    return default, per_part


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
            raise UserError(f"recipe file {path} does not exist or is not a regular file")
        return _steps_from_toml(path)
    parts = text.split(",")
    if len(parts) > MAX_STEPS:
        raise UserError(f"recipe {text[:60]!r}...: more than {MAX_STEPS} steps")
    steps = []
    for part in parts:
        part = part.strip()
        if not part:
            raise UserError(f"recipe {text!r}: empty step")
        name, _, arg = part.partition(":")
        spec = passes.get(name.strip())
        try:
            config = spec.config_type.from_short(arg.strip() or None)
        except (TypeError, ValueError) as exc:
            raise UserError(f"recipe step {part!r}: {exc}") from None
        steps.append(Step(spec, config))
    return steps


def apply_overrides(steps: list[Step], overrides: list[str] | None) -> list[Step]:
    """``PASS.FIELD=VALUE`` settings (the CLI's ``--set``) applied to every step of that pass."""
    steps = list(steps)
    for override in overrides or []:
        key, sep, text = override.partition("=")
        name, dot, field_name = key.strip().partition(".")
        if not sep or not dot or not field_name:
            raise UserError(f"bad --set {override!r}: expected PASS.FIELD=VALUE")
        matching = [i for i, step in enumerate(steps) if step.name == name]
        if not matching:
            raise UserError(f"--set {override!r}: the recipe has no {name!r} step")
        for i in matching:
            steps[i] = Step(steps[i].spec,
                            config_from_table(name, {field_name: _option_value(text.strip())},
                                              base=steps[i].config))
    return steps


def _option_value(text: str) -> Any:
    """A TOML literal (number, bool, list, quoted string) when the text is one, else the text;
    ``coerce`` then turns it into the field's type."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except (tomllib.TOMLDecodeError, RecursionError):
        return text


def with_cleanup(steps: list[Step]) -> list[Step]:
    """The steps a pipeline really runs: cleanup first (it lifts Constant-node weights so every
    pass sees initializers) and, after any other step, last. The first leaves the exporter's
    Reshape targets as they are (``static_reshapes = false``: passes see the shape arithmetic
    they were written against); the last makes them constant where it can."""
    cleanup = passes.get("cleanup")
    first = Step(cleanup, dataclasses.replace(cleanup.default_config(), static_reshapes=False))
    return [first, *steps, Step(cleanup, cleanup.default_config())] if steps else [first]


def describe_pass(name: str) -> str:
    """``--help-pass NAME``: the pass's summary and every field with type, default and help."""
    from onnxcomp.report import markdown_table

    spec = passes.get(name)
    def cell(text: str) -> str:  # a "|" inside a cell (X | None, a | b) would split the row
        return str(text).replace("|", "\\|")

    rows = [[f.name, cell(f.type), cell(repr(f.default)), cell(f.help)]
            for f in config_help(spec.config_type)]
    caps = spec.capabilities
    facts = [f"reads weights lazily: {'yes' if caps.lazy_weights else 'no'}",
             f"needs the teacher: {'yes' if caps.needs_teacher else 'no'}"]
    if caps.notes:
        facts.append(caps.notes)
    head = f"{name}: {spec.summary}" if spec.summary else name
    return "\n".join([head, "", markdown_table(["field", "type", "default", "description"], rows),
                      "", "; ".join(facts)])
