"""What a search leaves in OUT_DIR: each trial's report, recipe and model as it finishes; at
the end the Pareto front (``pareto.md``, ``pareto.json``, ``pareto.png`` where matplotlib is
installed) and the chosen model (``best.onnx`` with ``best.json``). Models of trials off the
final front are removed (a later trial can only push trials off the front, never back on),
unless ``keep_models``. Every model is written with ``onnxcomp.model.save`` (atomic)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

from onnxcomp.model import Model, load, save
from onnxcomp.report import markdown_table, write_json_atomic
from onnxcomp.search.study import Finished
from onnxcomp.search.trial import recipe_text

METRIC_ORDER = ("latency", "latency_retimed", "size", "params", "cosine", "top1", "line_accuracy",
                "char_accuracy")


def trial_dir(out_dir: Path, number: int) -> Path:
    return out_dir / "trials" / f"{number:04d}"


def write_trial(out_dir: Path, finished: Finished, result: dict[str, Any],
                recipe: list[tuple[str, dict[str, Any]]]) -> None:
    folder = trial_dir(out_dir, finished.number)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "recipe.toml").write_text(recipe_text(recipe), encoding="utf-8")
    data = {key: value for key, value in result.items() if key != "model_bytes"}
    data.update(params=finished.params, violations=finished.violations,
                feasible=finished.feasible, recipe=[[n, t] for n, t in recipe])
    write_json_atomic(data, folder / "report.json")
    if result.get("model_bytes"):
        import onnx

        save(Model(onnx.load_from_string(result["model_bytes"])), folder / "model.onnx")


def _columns(trials: list[Finished], objectives: tuple[str, ...],
             constraint_metrics: list[str]) -> list[str]:
    present = {k for t in trials for k in t.metrics}
    wanted = [*objectives, *constraint_metrics, *METRIC_ORDER]
    return [m for m in dict.fromkeys(wanted) if m in present]


SHORT_FIELDS = {"quantize": "mode", "prune": "ratio", "lowrank": "energy"}


def recipe_of(finished: Finished, recipes: dict[int, list]) -> str:
    """The short form (``prune:0.1,quantize:int8``), each pass followed by the values that
    differ from its defaults (``quantize:int8 (output_qdq=conv-only)``)."""
    parts = []
    for name, table in recipes.get(finished.number, []):
        short = table.get(SHORT_FIELDS.get(name, ""))
        text = f"{name}:{short}" if short is not None else name
        changed = _non_default(name, table)
        parts.append(f"{text} ({', '.join(changed)})" if changed else text)
    return ",".join(parts) or "(float)"


def _non_default(name: str, table: dict[str, Any]) -> list[str]:
    from onnxcomp import passes

    try:
        defaults = passes.get(name).config_type()
    except Exception:  # noqa: BLE001  an unknown pass or a config without defaults: plain
        return []
    shown = []
    for key, value in table.items():
        default = getattr(defaults, key, None)
        if key == SHORT_FIELDS.get(name) or (list(default) if isinstance(default, tuple)
                                             else default) == value:
            continue
        shown.append(f"{key}={','.join(map(str, value)) if isinstance(value, list) else value}")
    return shown


def front_table(front: list[Finished], objectives: tuple[str, ...], constraint_metrics: list[str],
                recipes: dict[int, list], best: Finished | None) -> str:
    columns = _columns(front, objectives, constraint_metrics)
    rows = [[f"{t.number}{' *' if best and t.number == best.number else ''}",
             recipe_of(t, recipes), *(t.metrics.get(c) for c in columns)] for t in front]
    return markdown_table(["trial", "recipe", *columns], rows)


def write_summary(out_dir: Path, trials: list[Finished], front: list[Finished],
                  best: Finished | None, objectives: tuple[str, ...],
                  constraints: list[str], constraint_metrics: list[str],
                  reference: dict[str, float], recipes: dict[int, list], space: dict,
                  keep_models: bool = False, constraint_rows: list[dict] | None = None,
                  html: Path | None = None, keep: set[int] | None = None) -> str:
    """The front table and files (see the module docstring); ``keep``: trial numbers whose
    models stay even off the front (the re-timed candidates)."""
    table = front_table(front, objectives, constraint_metrics, recipes, best)
    lines = [(f"# search: {len(trials)} trials, {sum(t.feasible for t in trials)} feasible, "
              f"{len(front)} on the Pareto front"),
             "", (f"objectives (ratios to the float model, lower is better): "
                  f"{', '.join(objectives)}"),
             f"constraints: {', '.join(constraints) or 'none'}", "", table, ""]
    retimed = sorted((t for t in trials if "latency_retimed" in t.metrics),
                     key=lambda t: t.metrics["latency_retimed"])
    if retimed:
        lines += ["re-timed side by side at the end (latency_retimed: the choice is made on it):",
                  "", markdown_table(
                      ["trial", "recipe", "fixed recipe", "latency (search)", "latency_retimed"],
                      [[t.number, recipe_of(t, recipes), t.fixed_recipe or "",
                        t.metrics.get("latency"), t.metrics["latency_retimed"]]
                       for t in retimed]), ""]
    lines.append(f"chosen (*): trial {best.number}, {recipe_of(best, recipes)}" if best
                 else "no trial met every constraint")
    text = "\n".join(lines) + "\n"
    (out_dir / "pareto.md").write_text(text, encoding="utf-8")
    write_json_atomic({
        "objectives": list(objectives), "constraints": constraints, "reference": reference,
        "space": space, "front": [t.number for t in front],
        "best": best.number if best else None,
        "trials": [{"number": t.number, "state": t.state, "feasible": t.feasible,
                    "params": t.params, "metrics": t.metrics, "violations": t.violations,
                    "error": t.error, "recipe": recipes.get(t.number)} for t in trials],
    }, out_dir / "pareto.json")
    if best is not None:
        source = trial_dir(out_dir, best.number) / "model.onnx"
        if source.exists():
            save(load(source), out_dir / "best.onnx")
            shutil.copyfile(trial_dir(out_dir, best.number) / "report.json",
                            out_dir / "best.json")
    if not keep_models:
        on_front = {t.number for t in front} | set(keep or ())
        for finished in trials:
            if finished.number not in on_front:
                (trial_dir(out_dir, finished.number) / "model.onnx").unlink(missing_ok=True)
    drawn = plot(out_dir / "pareto.png", trials, front, objectives, constraint_metrics)
    page = search_report(trials, front, best, objectives, constraint_metrics, recipes,
                         constraint_rows or [{"text": c} for c in constraints], drawn,
                         out_dir / "best.onnx" if best is not None
                         and (out_dir / "best.onnx").is_file() else None)
    from onnxcomp.report_html import render_html

    for target in dict.fromkeys([out_dir / "pareto.html", *([Path(html)] if html else [])]):
        render_html(page, target, title=f"onnxcomp search: {out_dir.name}")
    return text


def search_report(trials: list[Finished], front: list[Finished], best: Finished | None,
                  objectives: tuple[str, ...], constraint_metrics: list[str],
                  recipes: dict[int, list], constraint_rows: list[dict],
                  png: Path | None, best_path: Path | None) -> dict[str, Any]:
    """The report dict ``report_html`` renders as its search section (the plot inline as a PNG
    data URI: the page stays one self-contained file)."""
    import base64

    columns = _columns(trials, objectives, constraint_metrics)

    def entry(t: Finished) -> dict[str, Any]:
        return {"trial": t.number, "recipe": recipe_of(t, recipes), "state": t.state,
                "feasible": t.feasible, "metrics": dict(t.metrics)}

    uri = None
    if png is not None and Path(png).is_file():
        uri = "data:image/png;base64," + base64.b64encode(Path(png).read_bytes()).decode()
    return {"command": "search", "search": {
        "objectives": list(objectives), "columns": columns, "constraints": constraint_rows,
        "n_trials": len(trials), "n_feasible": sum(t.feasible for t in trials),
        "front": [entry(t) for t in front],
        "best": None if best is None else {**entry(best), "path": str(best_path or "")},
        "fixed": [entry(t) for t in trials if t.fixed_recipe],
        "trials": [entry(t) for t in trials], "plot": uri}}


def plot(path: Path, trials: list[Finished], front: list[Finished],
         objectives: tuple[str, ...], constraint_metrics: list[str]) -> Path | None:
    """Size vs latency (or the two first objectives), colour = the first constraint's metric
    (fidelity); the front joined by a line. Skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if len(objectives) > 1:
        axes = list(objectives[:2])
    else:  # one objective: against size, or against latency when size is the objective
        axes = [objectives[0], "latency" if objectives[0] == "size" else "size"]
    done = [t for t in trials if t.state == "COMPLETE" and all(a in t.metrics for a in axes)]
    if not done:
        return None
    colour = next((m for m in constraint_metrics if all(m in t.metrics for t in done)), None)
    figure, ax = plt.subplots(figsize=(6, 4.5))
    xs = [t.metrics[axes[0]] for t in done]
    ys = [t.metrics[axes[1]] for t in done]
    cs = [t.metrics[colour] for t in done] if colour else None
    points = ax.scatter(xs, ys, c=cs, cmap="viridis",
                        marker="o", edgecolors=["k" if t.feasible else "r" for t in done])
    if colour:
        figure.colorbar(points, label=colour)
    retimed = [t for t in done if "latency_retimed" in t.metrics]
    if retimed and axes[0] == "latency":  # the figures the choice was made on
        ax.scatter([t.metrics["latency_retimed"] for t in retimed],
                   [t.metrics[axes[1]] for t in retimed], marker="x", c="k",
                   label="re-timed side by side")
    if front:
        def at(t: Finished, axis: str) -> float:  # the front is on the re-timed figures
            if axis == "latency" and "latency_retimed" in t.metrics:
                return t.metrics["latency_retimed"]
            return t.metrics[axis]

        ax.plot([at(t, axes[0]) for t in front], [at(t, axes[1]) for t in front],
                "k--", lw=1, label="Pareto front")
    if front or (retimed and axes[0] == "latency"):
        ax.legend()
    ax.set_xlabel(f"{axes[0]} (ratio to float)")
    ax.set_ylabel(f"{axes[1]} (ratio to float)")
    ax.set_title("search trials (red edge: misses a constraint)")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path
