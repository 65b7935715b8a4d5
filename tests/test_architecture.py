"""The layout rules of docs/architecture.md, checked on the source (ast) and on the registry.

- no import cycles among onnxcomp modules, lazy imports inside functions included (a submodule
  importing its own parent package is not a cycle: the parent is already being imported);
- nothing duck-types a pass module (``hasattr``/``getattr`` on it): capabilities are data;
- every module under onnxcomp/passes/ stays under ``MAX_PASS_LINES`` lines;
- passes never import the measurers (measure.validate, measure.bench) or the report
  (measure.compare, the one numeric comparison, is allowed);
- every registry entry is a full ``PassSpec`` (a new pass is one module plus one registry line);
- optional dependencies are imported lazily, inside functions.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest

import onnxcomp
from onnxcomp.pipeline import Capabilities, PassSpec

# The source checks below read files only; a registry that fails to import fails its own test.
try:
    from onnxcomp.passes import PASSES
    REGISTRY_ERROR: Exception | None = None
except Exception as exc:  # noqa: BLE001 - reported by test_the_registry_imports
    PASSES, REGISTRY_ERROR = {}, exc

PACKAGE = Path(onnxcomp.__file__).parent
MAX_PASS_LINES = 400
OPTIONAL_DEPS = ("torch", "transformers", "onnxruntime.transformers", "matplotlib", "sympy",
                 "ray", "optuna", "openvino")
# Modules (or whole packages: the [train] and [search] extras) that exist to wrap an optional
# dependency: they may import it at module level, but must themselves only be imported lazily.
OPTIONAL_WRAPPERS = ("onnxcomp.export.hf", "onnxcomp.export.callable", "onnxcomp.train",
                     "onnxcomp.search")
FORBIDDEN_IN_PASSES = ("onnxcomp.measure.validate", "onnxcomp.measure.bench", "onnxcomp.report")


# --- the import graph ----------------------------------------------------------------------------


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _trees() -> dict[str, ast.Module]:
    return {name: ast.parse(path.read_text(encoding="utf-8"), str(path))
            for name, path in MODULES.items()}


TREES = _trees()


def _package_of(module: str) -> str:
    return module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]


def _imported_names(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The dotted names an import statement asks for (relative imports resolved); for
    ``from X import y`` both ``X`` and ``X.y`` (y may be a submodule)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    base = node.module or ""
    if node.level:
        package = _package_of(module).split(".")
        anchor = ".".join(package[:len(package) - node.level + 1])
        base = f"{anchor}.{base}" if base else anchor
    # "*" resolves to the module itself
    return [base] + [f"{base}.{alias.name}" for alias in node.names]


def _resolve(name: str) -> str | None:
    """The onnxcomp module a dotted name lands in (``X.y`` with y a function -> X)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, lazy: bool = True) -> list[tuple[str, int, bool]]:
    """(imported name, line, at module level) for every import in ``module``; with ``lazy``
    also those inside functions."""
    found = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                found.extend((name, child.lineno, top) for name in _imported_names(module, child))
            # Class bodies run at import time; function bodies only when called.
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                   ast.Lambda))
            visit(child, inner)

    visit(TREES[module], True)
    return [entry for entry in found if lazy or entry[2]]


def _edges() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = {name: set() for name in MODULES}
    for module in MODULES:
        for name, _, _ in _imports(module):
            target = _resolve(name)
            # Importing one's own ancestor package is not a cycle (it is already importing).
            if target and target != module and not module.startswith(target + "."):
                edges[module].add(target)
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def test_the_cycle_finder_finds_cycles():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_even_through_lazy_imports():
    edges = _edges()
    assert edges["onnxcomp.passes"], "the import graph came out empty: the scan is broken"
    cycles = _cycles(edges)
    detail = []
    for component in cycles:
        members = set(component)
        for module in component:
            for name, line, _ in _imports(module):
                target = _resolve(name)
                if target in members and target != module and not module.startswith(target + "."):
                    detail.append(f"{MODULES[module].relative_to(PACKAGE.parent)}:{line} "
                                  f"imports {target}")
    assert not cycles, "import cycles:\n" + "\n".join(sorted(set(detail)))


# --- no duck typing on pass modules --------------------------------------------------------------

PASS_PACKAGE = "onnxcomp.passes"
# Names that hold a pass module by convention where the binding is not an import.
MODULE_NAMES = ("module",)


def _pass_module_names(module: str) -> set[str]:
    """Local names bound to onnxcomp.passes or a module under it, anywhere in ``module``; in a
    module that imports any of them, also the conventional ``MODULE_NAMES``."""
    names: set[str] = set()
    for node in ast.walk(TREES[module]):
        if isinstance(node, ast.Import):
            for alias in node.names:
                target = _resolve(alias.name)
                if target and target.startswith(PASS_PACKAGE):
                    # without "as", the module is reached by its dotted name
                    names.add(alias.asname or alias.name)
        elif isinstance(node, ast.ImportFrom):
            for alias, full in zip(node.names, _imported_names(module, node)[1:]):
                if full in MODULES and full.startswith(PASS_PACKAGE):
                    names.add(alias.asname or alias.name)
    return names | set(MODULE_NAMES) if names else names


def _subject(call: ast.Call) -> str | None:
    """The source of the first argument of a call (``prune``, ``step.module()``...)."""
    return ast.unparse(call.args[0]) if call.args else None


def _duck_typing(module: str) -> list[str]:
    names = _pass_module_names(module)
    found = []
    for node in ast.walk(TREES[module]):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                and node.func.id in ("hasattr", "getattr") and node.args):
            continue
        subject = _subject(node)
        first = node.args[0]
        on_module = (
            (isinstance(first, ast.Name) and first.id in names)
            or (isinstance(first, ast.Attribute) and ast.unparse(first) in names)
            # step.module(), spec.module(): a call that hands out a module
            or (isinstance(first, ast.Call) and ast.unparse(first.func).endswith("module"))
        )
        if on_module:
            where = MODULES[module].relative_to(PACKAGE.parent)
            found.append(f"{where}:{node.lineno} {node.func.id}({subject}, ...)")
    return found


def test_the_duck_typing_scan_sees_the_patterns():
    source = ("from onnxcomp.passes import prune\nimport onnxcomp.passes.lowrank as lr\n"
              "def f(step, module):\n"
              "    return (hasattr(prune, 'PASS'), getattr(lr, 'NAME'), getattr(module, 'X'),\n"
              "            hasattr(step.module(), 'run'), getattr(step.config, 'mode'))\n")
    TREES["onnxcomp.__probe__"] = ast.parse(source)
    MODULES["onnxcomp.__probe__"] = PACKAGE / "__probe__.py"
    try:
        found = _duck_typing("onnxcomp.__probe__")
    finally:
        del TREES["onnxcomp.__probe__"], MODULES["onnxcomp.__probe__"]
    assert [f.split(" ", 1)[1] for f in found] == [
        "hasattr(prune, ...)", "getattr(lr, ...)", "getattr(module, ...)",
        "hasattr(step.module(), ...)"]


def test_no_hasattr_or_getattr_on_pass_modules():
    found = [hit for module in MODULES for hit in _duck_typing(module)]
    assert not found, ("capabilities are data (PassSpec/Capabilities), not attributes probed "
                       "on modules:\n" + "\n".join(found))


# --- sizes and dependencies of the passes --------------------------------------------------------


def _pass_files() -> list[Path]:
    return sorted((PACKAGE / "passes").rglob("*.py"))


def test_pass_modules_stay_small():
    long = {str(path.relative_to(PACKAGE.parent)): lines for path in _pass_files()
            if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_PASS_LINES}
    assert not long, (f"pass modules over {MAX_PASS_LINES} lines (split them into modules "
                      f"named for what they do): {long}")


def test_passes_never_import_the_measurers_or_the_report():
    found = set()
    for module, path in MODULES.items():
        if not module.startswith(PASS_PACKAGE):
            continue
        for name, line, _ in _imports(module):
            target = _resolve(name)
            if target in FORBIDDEN_IN_PASSES:
                found.add(f"{path.relative_to(PACKAGE.parent)}:{line} "
                          f"imports {target}")
    assert not found, ("passes import measure.validate/bench or report:\n"
                       + "\n".join(sorted(found)))


# --- the registry --------------------------------------------------------------------------------

COERCIBLE = (bool, int, float, str)


def _coercible(annotation: typing.Any) -> bool:
    """Whether recipe.coerce can convert --set/TOML values to this declared type."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return all(arg is type(None) or _coercible(arg) for arg in typing.get_args(annotation))
    if origin is typing.Literal:
        return True
    if origin in (tuple, list):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return all(_coercible(a) for a in args)
    return annotation in COERCIBLE


def test_the_registry_imports():
    assert REGISTRY_ERROR is None, f"onnxcomp.passes does not import: {REGISTRY_ERROR!r}"
    assert "cleanup" in PASSES


@pytest.mark.parametrize("name", sorted(PASSES))
def test_every_registry_entry_is_a_full_pass_spec(name):
    import test_pipeline  # the per-field description check lives there; extended here

    spec = PASSES[name]
    assert isinstance(spec, PassSpec) and spec.name == name
    assert isinstance(spec.capabilities, Capabilities)
    assert callable(spec.plan) and callable(spec.apply)
    assert spec.summary, f"{name}: PassSpec has no summary (shown by --help-pass and docs)"
    config = spec.config_type
    assert dataclasses.is_dataclass(config), f"{name}: Config is not a dataclass"
    assert config.__dataclass_params__.frozen, f"{name}: Config is not frozen"
    assert isinstance(vars(config).get("from_short"), classmethod), \
        f"{name}: Config has no from_short classmethod"
    assert isinstance(config.from_short(None), config)
    hints = typing.get_type_hints(config)
    wrong = {f.name: f.type for f in dataclasses.fields(config) if not _coercible(hints[f.name])}
    assert not wrong, f"{name}: fields with types recipe.coerce cannot convert: {wrong}"
    test_pipeline.test_every_config_field_is_described(name)


def _pass_modules() -> dict[str, str]:
    """Each pass module or package right under onnxcomp/passes/ (module name -> import path)."""
    found = {}
    for path in sorted((PACKAGE / "passes").iterdir()):
        if path.name.startswith("_"):
            continue
        if path.suffix == ".py" or (path / "__init__.py").is_file():
            stem = path.stem if path.suffix == ".py" else path.name
            found[stem] = f"{PASS_PACKAGE}.{stem}"
    return found


@pytest.mark.parametrize("stem", sorted(_pass_modules()))
def test_a_pass_is_one_module_with_a_pass_spec_in_the_registry(stem):
    module = importlib.import_module(_pass_modules()[stem])
    spec = vars(module).get("PASS")
    assert isinstance(spec, PassSpec), f"{module.__name__} defines no PASS = PassSpec(...)"
    assert PASSES.get(spec.name) is spec, \
        f"{module.__name__}.PASS is not the registry's entry for {spec.name!r} (still wrapped?)"


# --- optional dependencies -----------------------------------------------------------------------


def _is_optional(name: str) -> bool:
    return any(name == dep or name.startswith(dep + ".") for dep in OPTIONAL_DEPS)


def _is_wrapper(module: str | None) -> bool:
    return module is not None and any(module == w or module.startswith(w + ".")
                                      for w in OPTIONAL_WRAPPERS)


def test_optional_dependencies_are_imported_lazily():
    found = []
    for module, path in MODULES.items():
        if _is_wrapper(module):
            continue
        for name, line, _ in _imports(module, lazy=False):
            target = _resolve(name)
            if _is_optional(name) or _is_wrapper(target):
                found.append(f"{path.relative_to(PACKAGE.parent)}:{line} "
                             f"imports {target or name} at module level")
    assert not found, "\n".join(found)


def test_importing_every_core_module_loads_no_optional_dependency():
    """The same rule, observed: import every onnxcomp module except the optional wrappers in a
    fresh interpreter and look at sys.modules."""
    core = sorted(m for m in MODULES if not _is_wrapper(m))
    script = ("import importlib, sys\n"
              f"for name in {core!r}:\n"
              "    importlib.import_module(name)\n"
              f"deps = {OPTIONAL_DEPS!r}\n"
              "print(sorted({d for m in sys.modules for d in deps"
              " if m == d or m.startswith(d + '.')}))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]", f"loaded optional modules: {result.stdout.strip()}"
