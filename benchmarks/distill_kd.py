"""distill by training (kd, QAT) beside the closed-form refit, on held-out zoo data.

For each model and base recipe, the rows: the base recipe, ``BASE,distill`` (refit),
``BASE,distill:kd`` (QAT after quantize) and ``BASE,distill,distill:kd`` (kd started from the
refit result), calibrating/training on the zoo's calib split and measuring on its eval split
(disjoint generator streams). Each row runs in its own process so its peak RSS is its own; the
kd rows get ``--minutes`` of training (``distill.max_minutes``) and ``--steps`` steps at most;
rows with quantize train at ``--qat-lr``. ``--recipes`` picks rows by recipe.

    python benchmarks/distill_kd.py [--models ppocr-rec tiny-clip minilm] [--calib 64]
                                    [--eval 16] [--eval-split eval] [--also-eval hard:128]
                                    [--minutes 3] [--steps 400] [--recipes R ...] [--out F]
                                    [--train-batches N] [--train-split calib]
                                    [--calib-split calib]
                                    [--set distill.FIELD=VALUE ...]

``--eval-split hard`` draws the held-out set from ppocr-rec's harder lines; ``--also-eval
hard:128`` scores every result on them as well, beside the eval split kd chose its checkpoint
on (so the hard figures are untouched by any choice). ``--train-split train`` trains kd on
ppocr-rec's wider training stream (``distill.train_data``: longer lines, more contrast, noise,
blur and width stretch, calibration faces only) instead of the calib split.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RECIPES = {
    "tiny-clip": ["prune:0.3,lowrank:0.9", "prune:0.3", "quantize:int8"],
    "clip-vit-b32": ["prune:0.3,lowrank:0.9"],
    "ppocr-rec": ["prune:0.3", "quantize:int8"],
    "ppocr-det": ["prune:0.3"],
    "minilm": ["prune:0.3,lowrank:0.9", "quantize:int8"],
}
REPAIRS = ("", ",distill", ",distill:kd", ",distill,distill:kd")


def scores(fidelity: dict, prefix: str = "") -> dict:
    """The row's figures from a validation's fidelity: output cosines, retrieval agreement,
    task metrics of the candidate and of float (each key after ``prefix``)."""
    out = {f"{prefix}cos {k}": round(v["cosine_mean"], 4) for k, v in fidelity["outputs"].items()}
    if fidelity.get("retrieval"):
        r = fidelity["retrieval"]
        out[f"{prefix}retrieval i→t / t→i"] = \
            f"{r['a_to_b_agreement']:.3f} / {r['b_to_a_agreement']:.3f}"
    if fidelity.get("task"):
        out.update({prefix + k: round(v, 4) for k, v in fidelity["task"]["candidate"].items()})
        out.update({f"{prefix}float {k}": round(v, 4)
                    for k, v in fidelity["task"]["reference"].items()})
    return out


def row(name: str, recipe: str, calib: int, eval_count: int, minutes: float, steps: int,
        batch: int, lr: float, threads: int = 0, eval_split: str = "eval",
        also_eval: str | None = None, train_batches: int | None = None,
        train_split: str = "calib", extra: tuple[str, ...] = (), calib_split: str = "calib"
        ) -> dict:
    """One recipe: compressed with calibration (and kd training) on the calib split, kd's
    checkpoint choice and the main figures on ``eval_split``; ``also_eval`` (``SPLIT:N``)
    scores the same result on a second held-out set that nothing chose anything on."""
    from onnxcomp import api, calibration, zoo

    if threads and "distill:kd" in recipe:
        import torch

        # On a loaded 2-core machine two torch threads waiting on each other were ~3x slower
        # a step than one (ppocr-rec kd: 26 steps in 7 minutes).
        torch.set_num_threads(threads)

    overrides = [f"distill.max_minutes={minutes}", f"distill.steps={steps}",
                 f"distill.batch={batch}", f"distill.lr={lr}"] if "distill:kd" in recipe else []
    if train_batches and "distill:kd" in recipe:  # prune/lowrank plan on --calib's batches
        overrides.append(f"distill.train_batches={train_batches}")
    if train_split != "calib" and "distill:kd" in recipe:
        overrides.append(f"distill.train_data={name}:{train_split}:{train_batches or calib}")
    if "distill:kd" in recipe:
        overrides += extra
    started = time.perf_counter()
    original = zoo.fetch(name)
    result = api.compress(original, recipe=recipe, calib=f"{name}:{calib_split}:{calib}",
                          eval_data=f"{name}:{eval_split}:{eval_count}", show_progress=False,
                          overrides=overrides)
    out = {"recipe": recipe, "seconds": round(time.perf_counter() - started, 1)}
    out.update(scores(result.report.fidelity))
    if also_eval:
        from onnxcomp.measure.validate import validate
        from onnxcomp.model import load

        data = calibration.resolve(f"{name}:{also_eval}", load(original), split="eval")
        out.update(scores(validate(original, result.model, data=data, progress=None,
                                   ours=True).fidelity, prefix=f"{also_eval} "))
    for record in result.report.passes:
        if record.name == "distill":
            # Two distill steps (refit, then kd): each one's time, not the last one's alone.
            kind = "kd" if record.details.get("kd") is not None else "refit"
            out[f"distill {kind} s"] = round(record.seconds, 1)
            kd = record.details.get("kd")
            if kd:
                out["kd steps"] = f"{kd['steps']} (best {kd['best_step']}, {kd['stopped']})"
                out["kd eval cos"] = f"{kd['cosine_before']:.4f} → {kd['cosine_after']:.4f}"
                out["kd train s"] = kd["seconds"]
                out["kd data"] = kd.get("train_data")
                out["kept"] = record.modified
    out["peak RSS MiB"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=list(RECIPES))
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=16)
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--qat-lr", type=float, default=1e-4)
    parser.add_argument("--recipes", nargs="*", help="only these recipes (default: every row)")
    parser.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
    parser.add_argument("--eval-split", default="eval",
                        help="the zoo split --eval draws (kd's checkpoint choice and the main "
                             "figures), e.g. hard for ppocr-rec's harder lines")
    parser.add_argument("--also-eval", metavar="SPLIT:N",
                        help="also score each result on this zoo split, e.g. hard:128 "
                             "(nothing is chosen on it)")
    parser.add_argument("--train-batches", type=int, default=0,
                        help="kd trains on this many batches of the calib split (distill."
                             "train_batches; 0: the --calib batches the other passes plan on)")
    parser.add_argument("--train-split", default="calib",
                        help="the zoo split kd trains on (distill.train_data), e.g. train for "
                             "ppocr-rec's wider stream; calib: the calibration split")
    parser.add_argument("--calib-split", default="calib",
                        help="the zoo split --calib draws (what prune, lowrank, refit and "
                             "quantize plan on), e.g. train for ppocr-rec's wider stream")
    parser.add_argument("--set", action="append", default=[], metavar="distill.FIELD=VALUE",
                        help="more distill overrides for the kd rows (e.g. distill.patience=6)")
    parser.add_argument("--out", default="benchmarks/results/distill_kd.json")
    parser.add_argument("--row", nargs=2, metavar=("MODEL", "RECIPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.row:
        lr = args.qat_lr if "quantize" in args.row[1] else args.lr
        print(json.dumps(row(*args.row, args.calib, args.eval, args.minutes, args.steps,
                             args.batch, lr, args.torch_threads, args.eval_split,
                             args.also_eval, args.train_batches or None,
                             args.train_split, tuple(args.set), args.calib_split)))
        return 0
    results = {}
    for name in args.models:
        rows = []
        for recipe in (base + repair for base in RECIPES[name] for repair in REPAIRS):
            if args.recipes and recipe not in args.recipes:
                continue
            command = [sys.executable, __file__, "--row", name, recipe, "--calib",
                       str(args.calib), "--eval", str(args.eval), "--minutes",
                       str(args.minutes), "--steps", str(args.steps), "--batch",
                       str(args.batch), "--lr", str(args.lr), "--qat-lr", str(args.qat_lr),
                       "--torch-threads", str(args.torch_threads),
                       "--eval-split", args.eval_split, "--train-batches",
                       str(args.train_batches), "--train-split", args.train_split]
            command += [f"--set={value}" for value in args.set]
            command += ["--calib-split", args.calib_split]
            if args.also_eval:
                command += ["--also-eval", args.also_eval]
            done = subprocess.run(command, capture_output=True, text=True, check=False)
            if done.returncode:
                rows.append({"recipe": recipe, "error": done.stderr.strip()[-300:]})
            else:
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(name, rows[-1], flush=True)
        results[name] = rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"args": vars(args), "rows": results}, indent=1))
    for name, rows in results.items():
        headers = list(dict.fromkeys(k for r in rows for k in r))
        print(f"\n### {name}\n\n| " + " | ".join(headers) + " |\n|" + "---|" * len(headers))
        for r in rows:
            print("| " + " | ".join(str(r.get(h, "")) for h in headers) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
