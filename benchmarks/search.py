"""The measured searches of docs/search.md, each with the README's fixed recipes enqueued as
its first trials (so the chosen model and the fixed recipes are measured in the same run):

    python benchmarks/search.py ppocr-rec [--trials 40] [--out bench-search-ppocr-rec]
    python benchmarks/search.py ppocr-rec-points
    python benchmarks/search.py minilm [--trials 16]

- ``ppocr-rec``: 16 calibration lines, 128 held-out lines (so that ``float-0.01`` allows one
  line to read differently: with 32, one line was 3.1 points), ``line_accuracy>=float-0.01``,
  objective latency; fixed recipes quantize:int8, int8-dynamic, int4 and prune:0.3,distill;
  the latency of each trial is the median of 3 interleaved measurements and the 3 fastest
  feasible trials plus every feasible fixed recipe are re-timed side by side at the end.
  ``ppocr-rec-points``: the same space and data, 6 trials that are all fixed recipes: the
  README's three that can meet the bound, int8 with ``output_qdq = conv-only``, and prune
  0.05 / 0.1 + distill (refit) + that int8 (the region the 40 trials left untried).
  ``ppocr-rec-narrow``: the space narrowed to that region (no mixed precision, no lowrank,
  prune ratio 0.05 | 0.1 | 0.15 | 0.3), for a full search of it.
- ``minilm``: 16 calibration sentences, 32 held-out sentences, ``cosine>=0.995``, objective
  size; fixed recipes quantize:int8-dynamic (first) and quantize:int4.

Writes OUT/pareto.{md,json,png,html}, OUT/best.onnx, benchmarks/results/search_<model>.json
(every trial, the fixed recipes' rows, trials per hour) and docs/search_<model>_pareto.png.
Rerunning with the same --out resumes the search. ``--workers 2`` measures the 2-worker rate.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from pathlib import Path

from onnxcomp import zoo
from onnxcomp.search import search

ROOT = Path(__file__).resolve().parent.parent

SETUPS = {
    # fuse finds nothing useful in a CNN + 2 transformer blocks; lowrank only keeps ppocr-rec's
    # fidelity at energy 0.999+ (docs/lowrank.md), so the space is narrowed to what can pay.
    # prune.ratio reaches 0.3 so that the README's prune:0.3 is a point of the space.
    "ppocr-rec": {
        "calib": "ppocr-rec:calib:16", "eval_data": "ppocr-rec:eval:128",
        "constraints": ["line_accuracy>=float-0.01"], "objectives": "latency",
        "space": {"dimensions": {"fuse.use": {"fixed": False},
                                 "lowrank.energy": {"choices": [0.999, 0.9999]},
                                 "prune.ratio": {"low": 0.05, "high": 0.3, "step": 0.05}}},
        "enqueue": ["quantize:int8", "quantize:int8-dynamic", "quantize:int4",
                    "prune:0.3,distill"],
        "trials": 40, "runs": 30, "min_seconds": 1.0, "repeats": 3, "retime": 3},
    # size is the objective: timing is still measured (and reported) but with fewer runs.
    # int4_method extends the space: GPTQ is what brings MiniLM's 4-bit weights close to
    # int8-dynamic's fidelity (docs/quantize.md).
    "minilm": {
        "calib": "minilm:calib:16", "eval_data": "minilm:eval:32",
        "constraints": ["cosine>=0.995"], "objectives": "size",
        "space": {"dimensions": {"fuse.use": {"fixed": False},
                                 "quantize.int4_method": {"choices": ["rtn", "gptq"]}}},
        "enqueue": ["quantize:int8-dynamic", "quantize:int4"], "trials": 16, "runs": 10,
        "min_seconds": 0.3},
}
# The region the broad ppocr-rec searches left untried: plain int8 (no mixed precision; the
# output QDQ variants and calibration methods drawn), alone or after a small prune + distill.
SETUPS["ppocr-rec-narrow"] = {
    **SETUPS["ppocr-rec"], "zoo": "ppocr-rec",
    "space": {"dimensions": {"fuse.use": {"fixed": False}, "lowrank.use": {"fixed": False},
                             "quantize.mode": {"choices": ["none", "int8", "int8-dynamic", "int4"]},
                             "quantize.min_cosine": {"fixed": None},
                             "prune.ratio": {"choices": [0.05, 0.1, 0.15, 0.3]}}}}
# The points next to the README's int8 that a 40-trial search may not reach (fixed recipes
# only, measured and re-timed side by side with the README's recipes that meet the bound):
# int8 with conv-only output QDQ (docs/quantize.md: 0.716x vs 0.740x), and small prune ratios
# + refit before it.
SETUPS["ppocr-rec-points"] = {
    **SETUPS["ppocr-rec"], "zoo": "ppocr-rec", "trials": 6,
    "enqueue": ["quantize:int8", "quantize:int8-dynamic", "quantize:int4",
                [("quantize", {"mode": "int8", "output_qdq": "conv-only"})],
                [("prune", {"ratio": 0.05}), ("distill", {}),
                 ("quantize", {"mode": "int8", "output_qdq": "conv-only"})],
                [("prune", {"ratio": 0.1}), ("distill", {}),
                 ("quantize", {"mode": "int8", "output_qdq": "conv-only"})]]}
# The points the 16-trial MiniLM search did not reach: mixed precision aimed at the bound
# itself (0.995) from int4 and int8, next to int8-dynamic, as a search of fixed recipes only.
SETUPS["minilm-mixed"] = {
    **SETUPS["minilm"], "zoo": "minilm", "trials": 5,
    "enqueue": ["quantize:int8-dynamic",
                {"mode": "int4", "min_cosine": 0.995},
                {"mode": "int4", "min_cosine": 0.995, "int4_method": "gptq"},
                {"mode": "int8", "min_cosine": 0.995},
                {"mode": "int8", "min_cosine": 0.995, "calibration": "percentile"}]}


def recipe_files(enqueue: list, folder: Path) -> list[str]:
    """Short-form recipes as they are; a dict (quantize fields) as a one-pass TOML recipe, a
    list of (pass, fields) as a TOML recipe of those passes."""
    from onnxcomp.search.trial import recipe_text

    folder.mkdir(parents=True, exist_ok=True)
    result = []
    for index, item in enumerate(enqueue):
        if isinstance(item, str):
            result.append(item)
            continue
        path = folder / f"fixed-{index}.toml"
        steps = [("quantize", item)] if isinstance(item, dict) else list(item)
        path.write_text(recipe_text(steps), encoding="utf-8")
        result.append(str(path))
    return result


def _repeats(db: Path) -> list[dict]:
    """The proposals that repeated a measured parameter set (told its result, not run)."""
    import optuna

    from onnxcomp.search.study import STUDY_NAME

    study = optuna.load_study(study_name=STUDY_NAME, storage=f"sqlite:///{db}")
    return [{"trial": t.number, "duplicate_of": t.user_attrs["duplicate_of"]}
            for t in study.trials if "duplicate_of" in t.user_attrs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", choices=sorted(SETUPS))
    parser.add_argument("--trials", type=int)
    parser.add_argument("--out")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--executor", default="local")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-enqueue", action="store_true", help="no fixed recipes first")
    parser.add_argument("--results", help="results JSON (default benchmarks/results/"
                        "search_<model>.json; '-' for none)")
    args = parser.parse_args()
    setup = dict(SETUPS[args.model])
    trials = args.trials or setup.pop("trials")
    setup.pop("trials", None)
    enqueue = [] if args.no_enqueue else setup.pop("enqueue")
    setup.pop("enqueue", None)
    out = Path(args.out or f"bench-search-{args.model}")
    enqueue = recipe_files(enqueue, out / "fixed")
    before = len(list(out.glob("trials/*/report.json")))
    started = time.perf_counter()
    load_start = os.getloadavg()
    result = search(zoo.fetch(setup.pop("zoo", args.model)), n_trials=trials, out_dir=out,
                    executor=args.executor, workers=args.workers, seed=args.seed,
                    enqueue=enqueue, **setup)
    seconds = time.perf_counter() - started
    print(result.table())
    pareto = json.loads((out / "pareto.json").read_text())
    reports = [json.loads(p.read_text()) for p in sorted(out.glob("trials/*/report.json"))]
    durations = [round(r["seconds"], 1) for r in reports if r.get("seconds")]
    record = {
        "model": args.model, "trials": trials, "workers": args.workers,
        "executor": args.executor, "seed": args.seed, "enqueued": enqueue,
        "constraints": setup["constraints"], "objectives": setup["objectives"],
        "space": setup["space"], "wall_seconds_this_run": round(seconds, 1),
        "trials_per_hour_this_run": None, "load_average_start": load_start,
        "load_average": os.getloadavg(),
        "fixed_recipes": [
            {"recipe": t.fixed_recipe, "trial": t.number, "state": t.state,
             "feasible": t.feasible, "metrics": t.metrics, "error": t.error}
            for t in result.trials if t.fixed_recipe],
        "best": None if result.best is None else {
            "trial": result.best.number, "params": result.best.params,
            "metrics": result.best.metrics, "fixed_recipe": result.best.fixed_recipe},
        "front": [{"trial": t.number, "metrics": t.metrics} for t in result.front],
        "trial_seconds": durations,
        "repeats_not_run": _repeats(out / "study.db"),
        "retimed": {str(t.number): {"recipe": t.fixed_recipe, "latency": t.metrics["latency"],
                                    "latency_retimed": t.metrics["latency_retimed"]}
                    for t in result.trials if "latency_retimed" in t.metrics},
        "notes": result.notes,
        "nodes": sorted({str(r.get("node")) for r in reports}),
        "pareto": pareto,
    }
    ran = len(reports) - before
    if durations:
        record["trial_seconds_mean"] = sum(durations) / len(durations)
    done = len(result.trials)
    record["trials_this_run"] = ran
    record["trials_per_hour_this_run"] = round(ran / (seconds / 3600), 1)
    print(f"{done} trials in the study; this run: {seconds / 60:.1f} min, {args.workers} "
          f"worker(s), {record['trials_per_hour_this_run']} trials/hour")
    if args.results != "-":
        path = Path(args.results or ROOT / "benchmarks" / "results"
                    / f"search_{args.model.replace('-', '_')}.json")
        record["enqueued"] = [Path(e).read_text() if e.endswith(".toml") else e
                              for e in enqueue]
        path.write_text(json.dumps(record, indent=1, default=str) + "\n")
        print(f"wrote {path}")
    documented = ("ppocr-rec", "ppocr-rec-points", "ppocr-rec-narrow", "minilm")  # their plots
    if (out / "pareto.png").is_file() and args.results is None and args.model in documented:
        shutil.copyfile(out / "pareto.png", ROOT / "docs" / f"search_{args.model}_pareto.png")


if __name__ == "__main__":
    main()
