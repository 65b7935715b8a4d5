"""Scale: a ~1-billion-parameter decoder through inspect, int4, int8-dynamic and validate.

Builds the Llama-style generator's ``1b`` preset (TinyLlama-1.1B's shape, seeded random weights,
~4.4 GB of float32 in external data) unless it is already in ``--workdir``, then runs each step as
the user would, through the ``onnxcomp`` command line, each in a fresh process:

    onnxcomp inspect MODEL
    onnxcomp compress MODEL -o int4.onnx --recipe quantize:int4 --no-validate
    onnxcomp compress MODEL -o int8dyn.onnx --recipe quantize:int8-dynamic --no-validate
    onnxcomp validate MODEL int4.onnx --data PROMPTS     (and the same for int8dyn.onnx)

    onnxcomp compress MODEL -o int4mixed.onnx --recipe quantize:int4 --no-validate \
        --calib CALIB --eval TUNE --set quantize.int4_method=gptq --set quantize.min_cosine=0.985
    onnxcomp validate MODEL int4mixed.onnx --data PROMPTS

(``int4-mixed``: GPTQ error compensation fitted on ``--calib-prompts`` prompts, its statistics
collected one decoder block at a time, then the layer groups the output is most sensitive to
raised to 8 bits until the cosine on 16 tuning prompts reaches ``--mixed-target``; calibration,
tuning and evaluation prompts are three disjoint seeded sets) and, asked
for with ``--steps``, ``int4-gptq`` (GPTQ alone) and its ``validate-int4-gptq``,

and records each step's wall time and peak resident memory (the child's own ``VmHWM``, read when
it ends), the peak as a multiple of the float model's size, and the output size. Fidelity: the
validate reports of ``last_hidden_state`` (per-prompt cosine, mean and worst) and the logits'
top-1 agreement, on ``--prompts`` random token sequences of ``--length`` tokens.

    python benchmarks/scale.py [--preset 1b] [--init scaled|plain] [--workdir DIR]
                               [--prompts 8] [--length 32] [--steps inspect,int4,...] [--json F]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

# The child that runs one onnxcomp command and reports its peak memory (VmHWM) and the stack at
# each new high of its resident size (benchmarks/ is on the path when this runs as a script).
from memory import CHILD

ROOT = Path(__file__).resolve().parent.parent
STEPS = ("inspect", "int4", "int8-dynamic", "int4-mixed", "validate-int4",
         "validate-int8-dynamic", "validate-int4-mixed")
EXTRA_STEPS = ("int4-gptq", "validate-int4-gptq")
TARGET_PEAK = 1.5  # x the float model's size, for int4 (the target)
TARGET_COSINE = 0.98
# Presets beyond the zoo generator's own: Llama-2-7B's shape (multi-head attention, 6.74 billion
# parameters, ~27 GB of float32), larger than this machine's 24 GB of memory.
EXTRA_PRESETS = {"7b": {"hidden": 4096, "layers": 32, "heads": 32, "kv_heads": 32,
                        "intermediate": 11008, "vocab": 32000, "max_positions": 4096}}


def files_size(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def run_step(argv: list[str], log: Path, tree: Path = ROOT) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        result_path = Path(handle.name)
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(result_path), *argv],
                              stdout=out, stderr=subprocess.STDOUT, cwd=tree, check=False)
    result = json.loads(result_path.read_text()) if result_path.stat().st_size else {}
    result_path.unlink()
    result["wall_seconds"] = time.perf_counter() - started
    if proc.returncode or result.get("exit"):
        raise SystemExit(f"step {' '.join(argv)} failed (exit {proc.returncode}); see {log}")
    return result


def preset_config(preset: str):
    """The generator's configuration for ``preset`` (the zoo's presets, then EXTRA_PRESETS)."""
    from onnxcomp.zoo import llama

    if preset in EXTRA_PRESETS:
        return llama.LlamaConfig(**EXTRA_PRESETS[preset])
    return llama.PRESETS[preset]


def build_model(workdir: Path, preset: str, init: str) -> tuple[Path, dict]:
    from onnxcomp.zoo import llama

    config = dataclasses.replace(preset_config(preset), init=init)
    path = workdir / f"llama-{preset}-{init}.onnx"
    if path.exists():
        return path, {"built": False, "config": dataclasses.asdict(config)}
    print(f"building {path} ({config.parameter_count():,} parameters) ...", file=sys.stderr)
    started = time.perf_counter()
    # Built in a folder of its own, then moved (data first): an interrupted build is not taken
    # for a finished one. The data file's name, which the model refers to, stays the same.
    partial = workdir / "partial" / path.name
    llama.build(partial, config)
    partial.with_name(partial.name + ".data").rename(path.with_name(path.name + ".data"))
    partial.rename(path)
    return path, {"built": True, "seconds": time.perf_counter() - started,
                  "config": dataclasses.asdict(config)}


def write_prompts(folder: Path, preset: str, count: int, length: int, seed: int = 1) -> Path:
    from onnxcomp.zoo import llama

    folder.mkdir(parents=True, exist_ok=True)
    data = llama.prompts(preset_config(preset), count, length=length, seed=seed)
    for i in range(count):
        np.savez(folder / f"prompt_{i:03d}.npz", **data.make_batch(i))
    return folder


def fidelity(report_path: Path) -> dict:
    outputs = json.loads(report_path.read_text())["fidelity"]["outputs"]
    hidden, logits = outputs["last_hidden_state"], outputs["logits"]
    return {"hidden_cosine_mean": hidden["cosine_mean"], "hidden_cosine_min": hidden["cosine_min"],
            "hidden_rel_l2": hidden["rel_l2"], "logits_cosine_mean": logits["cosine_mean"],
            "top1_agreement": logits.get("top1_agreement")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="1b")
    parser.add_argument("--init", choices=("scaled", "plain"), default="scaled")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "onnxcomp-scale")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    parser.add_argument("--steps", default=",".join(STEPS),
                        help=f"comma-separated, from {', '.join(STEPS + EXTRA_STEPS)}")
    parser.add_argument("--calib-prompts", type=int, default=64,
                        help="calibration prompts for int4-gptq/-mixed (of --calib-length tokens)")
    parser.add_argument("--mixed-target", type=float, default=0.985,
                        help="int4-mixed: min_cosine on the calibration prompts")
    parser.add_argument("--calib-length", type=int, default=128)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="folder holding the onnxcomp package the steps run (its working "
                             "directory comes first on the child's path); default this checkout")
    args = parser.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = set(steps) - set(STEPS + EXTRA_STEPS)
    if unknown:
        parser.error(f"unknown steps {sorted(unknown)}; known: {', '.join(STEPS + EXTRA_STEPS)}")
    args.workdir.mkdir(parents=True, exist_ok=True)
    model, build = build_model(args.workdir, args.preset, args.init)
    float_bytes = files_size(model)
    prompts = write_prompts(args.workdir / f"prompts-{args.prompts}x{args.length}", args.preset,
                            args.prompts, args.length)
    outputs = {"int4": args.workdir / f"{model.stem}.int4.onnx",
               "int8-dynamic": args.workdir / f"{model.stem}.int8dyn.onnx",
               "int4-gptq": args.workdir / f"{model.stem}.int4gptq.onnx",
               "int4-mixed": args.workdir / f"{model.stem}.int4mixed.onnx"}
    rows = []
    for step in steps:
        log = args.workdir / f"{model.stem}.{step}.log"
        print(f"{step} ...", file=sys.stderr)
        row = {"step": step}
        if step == "inspect":
            row.update(run_step(["inspect", str(model)], log, args.tree))
        elif step in outputs:
            target = outputs[step]
            extra = []
            if step in ("int4-gptq", "int4-mixed"):
                calib = write_prompts(args.workdir / f"calib-{args.calib_prompts}x"
                                      f"{args.calib_length}", args.preset, args.calib_prompts,
                                      args.calib_length, seed=11)
                extra = ["--calib", str(calib), "--set", "quantize.int4_method=gptq"]
            if step == "int4-mixed":
                # The layer choice is scored on held-out prompts of its own (GPTQ scores too
                # well on the prompts it was fitted to), not on the final evaluation prompts.
                tune = write_prompts(args.workdir / f"tune-16x{args.length}", args.preset, 16,
                                     args.length, seed=21)
                extra += ["--eval", str(tune), "--set", f"quantize.min_cosine={args.mixed_target}"]
            mode = step.removesuffix("-gptq").removesuffix("-mixed")
            row.update(run_step(["compress", str(model), "-o", str(target), "--recipe",
                                 f"quantize:{mode}", "--no-validate",
                                 "--report", str(log.with_suffix(".json")), *extra], log, args.tree))
            row["output_bytes"] = files_size(target)
        else:
            mode = step.removeprefix("validate-")
            report = log.with_suffix(".json")
            row.update(run_step(["validate", str(model), str(outputs[mode]), "--data",
                                 str(prompts), "--report", str(report)], log, args.tree))
            row.update(fidelity(report))
        row["peak_over_float"] = row["peak_bytes"] / float_bytes
        rows.append(row)
        print(f"  {row['seconds']:.1f} s, peak {row['peak_bytes'] / 2**30:.2f} GiB "
              f"({row['peak_over_float']:.2f}x float)", file=sys.stderr)

    print(f"model: {model.name}, {build['config']['hidden']} hidden x {build['config']['layers']} "
          f"layers, init {args.init}, float {float_bytes / 2**30:.2f} GiB on disk; "
          f"{args.prompts} prompts x {args.length} tokens; {os.cpu_count()} cores")
    print("| step | seconds | peak RSS GiB | peak / float size | output GiB | hidden cosine mean "
          "(min) | logits top-1 agreement |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        out = f"{row['output_bytes'] / 2**30:.3f}" if "output_bytes" in row else "-"
        cos = (f"{row['hidden_cosine_mean']:.4f} ({row['hidden_cosine_min']:.4f})"
               if "hidden_cosine_mean" in row else "-")
        top1 = f"{row['top1_agreement']:.3f}" if row.get("top1_agreement") is not None else "-"
        print(f"| {row['step']} | {row['seconds']:.1f} | {row['peak_bytes'] / 2**30:.2f} | "
              f"{row['peak_over_float']:.2f} | {out} | {cos} | {top1} |")
    for variant in ("int4", "int4-gptq", "int4-mixed"):
        made = next((r for r in rows if r["step"] == variant), None)
        checked = next((r for r in rows if r["step"] == f"validate-{variant}"), None)
        if made:
            print(f"{variant} peak {made['peak_over_float']:.2f}x float (target <= "
                  f"{TARGET_PEAK}): {'met' if made['peak_over_float'] <= TARGET_PEAK else 'MISSED'}")
        if checked:
            cos = checked["hidden_cosine_mean"]
            print(f"{variant} last_hidden_state cosine {cos:.4f} (target >= {TARGET_COSINE}): "
                  f"{'met' if cos >= TARGET_COSINE else 'MISSED'}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), "float_bytes": float_bytes,
                                         "build": build, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
