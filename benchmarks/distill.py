"""What distill buys: fidelity of compressed models without and with the repair step.

For each model and base recipe, compresses twice — ``RECIPE`` and ``RECIPE,distill`` (or with
distill before quantize) — calibrating on the zoo's calib split and measuring on its eval split
(disjoint), plus on the calibration data itself to show whether the gain generalizes.

    python benchmarks/distill.py [--models tiny-clip ppocr-rec] [--calib 32] [--eval 32]
                                 [--out docs/distill.md]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from onnxcomp import api, zoo
from onnxcomp.measure.validate import validate
from onnxcomp.report import markdown_table

RECIPES = {
    "tiny-clip": [("prune:0.3,lowrank:0.9", "prune:0.3,lowrank:0.9,distill"),
                  ("quantize:int8", "quantize:int8,distill")],
    "ppocr-rec": [("prune:0.3", "prune:0.3,distill"),
                  ("quantize:int8", "quantize:int8,distill")],
    "ppocr-det": [("prune:0.3", "prune:0.3,distill")],
    "minilm": [("prune:0.3,lowrank:0.9", "prune:0.3,lowrank:0.9,distill"),
               ("quantize:int8", "quantize:int8,distill")],
    "clip-vit-b32": [("quantize:int8", "quantize:int8,distill")],
}


def fidelity_row(fidelity: dict) -> dict:
    row = {f"cos {name}": round(v["cosine_mean"], 4) for name, v in fidelity["outputs"].items()}
    if fidelity.get("retrieval"):
        r = fidelity["retrieval"]
        row["retrieval i→t / t→i"] = f"{r['a_to_b_agreement']:.3f} / {r['b_to_a_agreement']:.3f}"
    if fidelity.get("task"):
        task = fidelity["task"]["candidate"]
        row.update({k: round(v, 4) for k, v in task.items()})
    return row


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["tiny-clip", "ppocr-rec"])
    parser.add_argument("--calib", type=int, default=32)
    parser.add_argument("--eval", type=int, default=32)
    parser.add_argument("--out", default="docs/distill.md")
    args = parser.parse_args()
    sections, raw = [], {}
    for name in args.models:
        path = zoo.fetch(name)
        calib = f"{name}:calib:{args.calib}"
        rows = []
        for base, repaired in RECIPES[name]:
            for recipe in (base, repaired):
                started = time.perf_counter()
                result = api.compress(path, recipe=recipe, calib=calib,
                                      eval_data=f"{name}:eval:{args.eval}", show_progress=False)
                seconds = time.perf_counter() - started
                on_calib = validate(path, result.model, data=calib, progress=None).fidelity
                held_out = fidelity_row(result.report.fidelity)
                rows.append({"recipe": recipe, "data": "eval (held out)", **held_out,
                             "seconds": round(seconds, 1)})
                rows.append({"recipe": recipe, "data": "calib", **fidelity_row(on_calib),
                             "seconds": ""})
                raw[f"{name}/{recipe}"] = {"eval": result.report.fidelity, "calib": on_calib,
                                           "passes": [r.__dict__ for r in result.report.passes
                                                      if r.name == "distill"]}
                print(name, recipe, held_out, flush=True)
        headers = list(dict.fromkeys(k for row in rows for k in row))
        sections.append(f"### {name}\n\n" + markdown_table(
            headers, [[row.get(h, "") for h in headers] for row in rows]))
    text = ("Measured by `python benchmarks/distill.py --models " + " ".join(args.models)
            + f" --calib {args.calib} --eval {args.eval}` (calibration and evaluation splits of "
            "the zoo generators are disjoint).\n\n" + "\n\n".join(sections) + "\n")
    Path(args.out).write_text(text)
    Path("benchmarks/results").mkdir(parents=True, exist_ok=True)
    Path("benchmarks/results/distill.json").write_text(json.dumps(raw, indent=1, default=str))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
