"""Peak memory of each pass alone, per model: peak RSS as a multiple of the model's size.

Each cell is one ``onnxcomp compress MODEL -o OUT --recipe PASS --no-validate`` (calibration
data as the pass needs it) in a fresh child process. Its peak is the child's own ``VmHWM``,
read when it ends; a thread in the child samples ``VmRSS`` every 20 ms and keeps the onnxcomp
stack of the main thread each time the resident size reaches a new high, so the table says
*where* the peak happens. The issue's bar: no pass above ``max(3 x model size, 1 GiB)``.

Models: the zoo's ppocr-rec, ppocr-det, minilm, clip-vit-b32 (calibration: their zoo data
generators) and the breadth models layout-cdla and ddddocr (``random:8`` calibration and their
``eval`` folder, as ``benchmarks/breadth.py`` runs them). ``distill`` alone re-fits nothing, so
its row is ``prune:0.3,distill``; ``default`` is compress's default recipe (static int8).

    python benchmarks/memory.py [--models ppocr-rec,...] [--recipes cleanup,quantize:int8,...]
                                [--json benchmarks/results/memory.json] [--label before]
                                [--tree DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "onnxcomp"
ZOO = ("ppocr-rec", "ppocr-det", "minilm", "clip-vit-b32")
BREADTH = ("layout-cdla", "ddddocr")
RECIPES = ("cleanup", "quantize:int8", "quantize:int8-dynamic", "quantize:int4", "prune:0.3",
           "lowrank:0.9", "prune:0.3,distill", "default")
GiB = 2**30
FLOOR = 1 * GiB  # the bar: max(3 x the model's size, 1 GiB)
FACTOR = 3.0

# Runs one onnxcomp command in this child process, sampling its resident size; reports the
# peak (VmHWM) and the stack at each new high.
CHILD = r"""
import json, os, sys, threading, time, traceback
from onnxcomp.cli import main
PAGE = os.sysconf("SC_PAGE_SIZE")
main_id = threading.get_ident()
highs, done = [], threading.Event()
def sample():
    best, start = 0, time.perf_counter()
    while not done.wait(0.02):
        with open("/proc/self/statm") as handle:
            rss = int(handle.read().split()[1]) * PAGE
        if rss > best + (16 << 20):
            best = rss
            frame = sys._current_frames().get(main_id)
            stack = [f"{os.path.relpath(f.filename)}:{f.lineno} {f.name}"
                     for f in traceback.extract_stack(frame) if "onnxcomp" in f.filename]
            highs.append({"t": round(time.perf_counter() - start, 2), "rss": rss,
                          "stack": stack[-6:]})
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
code = main(sys.argv[2:])
seconds = time.perf_counter() - start
done.set()
peak = 0
for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
        peak = int(line.split()[1]) * 1024
json.dump({"exit": code, "seconds": seconds, "peak_bytes": peak, "highs": highs},
          open(sys.argv[1], "w"))
"""


def model_path(name: str) -> Path:
    if name in ZOO:
        from onnxcomp.zoo import fetch

        return Path(fetch(name))
    return CACHE / "breadth" / "models" / f"{name}.onnx"


def model_bytes(path: Path) -> int:
    total = path.stat().st_size
    data = path.with_name(path.name + ".data")
    return total + (data.stat().st_size if data.exists() else 0)


def data_args(name: str) -> list[str]:
    if name in ZOO:
        return ["--calib", name]
    return ["--calib", "random:8", "--eval", str(CACHE / "breadth" / "data" / name / "eval")]


def run_cell(model: Path, name: str, recipe: str, workdir: Path, tree: Path = ROOT) -> dict:
    out = workdir / f"{name}.{recipe.replace(':', '-').replace(',', '+')}.onnx"
    argv = ["--quiet", "compress", str(model), "-o", str(out), "--no-validate", *data_args(name)]
    if recipe != "default":
        argv += ["--recipe", recipe]
    result_path = workdir / "child.json"
    result_path.unlink(missing_ok=True)
    started = time.perf_counter()
    # The child imports onnxcomp from ``tree`` (its working directory comes first on its path).
    proc = subprocess.run([sys.executable, "-c", CHILD, str(result_path), *argv],
                          capture_output=True, text=True, cwd=tree, check=False)
    row = json.loads(result_path.read_text()) if result_path.exists() else {}
    row.update(model=name, recipe=recipe, wall_seconds=time.perf_counter() - started,
               returncode=proc.returncode, command="onnxcomp " + " ".join(argv))
    if proc.returncode or row.get("exit"):
        row["error"] = (proc.stderr or proc.stdout).strip().splitlines()[-1:]
    for path in (out, out.with_name(out.name + ".data")):
        path.unlink(missing_ok=True)
    return row


def where(row: dict) -> str:
    """The innermost onnxcomp frame at the last new high of resident memory."""
    highs = row.get("highs") or []
    if not highs or not highs[-1]["stack"]:
        return "-"
    return highs[-1]["stack"][-1].split(" ", 1)[1] + " (" + highs[-1]["stack"][-1].split()[0] + ")"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(ZOO + BREADTH))
    parser.add_argument("--recipes", default=";".join(RECIPES),
                        help="';'-separated recipes (a recipe may hold commas)")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--label", default="", help="recorded with the rows (e.g. before/after)")
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="folder holding the onnxcomp package to measure (e.g. a copy of "
                             "the tree before a change); default this checkout")
    parser.add_argument("--report", type=Path, default=None, metavar="JSON",
                        help="run nothing: print the table of a results file, one column per "
                             "label (before/after/...)")
    args = parser.parse_args(argv)
    if args.report:
        print(label_table(json.loads(args.report.read_text())["rows"]))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="onnxcomp-memory-") as tmp:
        for name in [m for m in args.models.split(",") if m]:
            model = model_path(name)
            size = model_bytes(model)
            for recipe in [r for r in args.recipes.split(";") if r]:
                row = run_cell(model, name, recipe, Path(tmp), args.tree)
                row["model_bytes"] = size
                row["label"] = args.label
                peak = row.get("peak_bytes", 0)
                row["peak_over_model"] = peak / size
                row["over_bar"] = peak > max(FACTOR * size, FLOOR)
                rows.append(row)
                status = "FAILED " + str(row.get("error")) if "error" in row else ""
                print(f"{name} {recipe}: {row.get('seconds', 0):.1f} s, peak "
                      f"{peak / GiB:.2f} GiB = {row['peak_over_model']:.1f}x "
                      f"{'OVER' if row['over_bar'] else 'ok'} at {where(row)} {status}",
                      file=sys.stderr, flush=True)
                if args.json:  # as it goes: a long run can be read (or cut short) midway
                    write_rows(args.json, rows)
    load = os.getloadavg()
    print(f"{os.cpu_count()} cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print("| model | MB | recipe | seconds | peak RSS GiB | peak / model | over "
          "max(3x, 1 GiB)? | last new high in |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['model_bytes'] / 1e6:.1f} | `{row['recipe']}` | "
              f"{row.get('seconds', 0):.1f} | {row.get('peak_bytes', 0) / GiB:.2f} | "
              f"{row['peak_over_model']:.1f} | {'**yes**' if row['over_bar'] else 'no'} | "
              f"{where(row)} |")
    if args.json:
        write_rows(args.json, rows)
    return 0


def label_table(rows: list[dict]) -> str:
    """Markdown: per model and recipe, peak RSS GiB (x model size) and seconds under each label,
    in the order the labels first appear."""
    labels = list(dict.fromkeys(r["label"] for r in rows))
    cells: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        cells.setdefault((row["model"], row["recipe"]), {})[row["label"]] = row
    head = " | ".join(f"{label}: peak GiB (x model), s" for label in labels)
    lines = [f"| model | MB | recipe | {head} |", "|---|---|---|" + "---|" * len(labels)]
    for (model, recipe), by_label in cells.items():
        size = next(iter(by_label.values()))["model_bytes"]
        shown = []
        for label in labels:
            row = by_label.get(label)
            if row is None or "peak_bytes" not in row:
                shown.append("-")
                continue
            over = "**" if row["over_bar"] else ""
            shown.append(f"{over}{row['peak_bytes'] / GiB:.2f} ({row['peak_over_model']:.1f}x)"
                         f"{over}, {row['seconds']:.0f}")
        lines.append(f"| {model} | {size / 1e6:.1f} | `{recipe}` | {' | '.join(shown)} |")
    return "\n".join(lines)


def write_rows(path: Path, rows: list[dict]) -> None:
    """Merge ``rows`` into the JSON file (a row replaces one of the same model, recipe, label)."""
    previous = json.loads(path.read_text()) if path.exists() else {"rows": []}
    fresh = {(r["model"], r["recipe"], r["label"]) for r in rows}
    previous["rows"] = [r for r in previous["rows"]
                        if (r["model"], r["recipe"], r.get("label")) not in fresh] + rows
    previous["load_average"] = os.getloadavg()
    path.write_text(json.dumps(previous, indent=1))


if __name__ == "__main__":
    sys.exit(main())
