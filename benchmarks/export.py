"""Figures for docs/export.md: exporting the transformer zoo models.

For minilm (real all-MiniLM-L6-v2 weights) and clip-vit-b32 (ViT-B/32 size, seeded weights):
a fresh export into a temporary folder (not the cache), then
- export time (torch.onnx.export + tidy + save) and the whole time with loading/building,
- file size and parameter count,
- max abs error and cosine vs PyTorch (onnxcomp.export's own check, ORT CPU, no graph
  optimizations, on inputs of other shapes than the export example),
- float latency in ONNX Runtime, CPU, 1 thread, default graph optimizations, batch 1:
  minilm on 32 tokens of a data sentence, clip-vit-b32 on one image + one 77-token text;
  median and p90 over timed runs after warm-up.
With ``--compare-exporters``: MiniLM through both torch exporters (TorchScript ``dynamo=False``
with eager and with SDPA attention, and ``dynamo=True``, which needs onnxscript): time, opset,
node counts, max abs error, and how many Attention nodes ONNX Runtime's BERT fusion finds.

With ``--big``: a generated 538 M-parameter model (2.15 GB of float32 weights, past protobuf's
2 GiB) exported from a ``module:callable`` in a child process: time, files written (external
data) and the child's peak resident memory.

    python benchmarks/export.py [--compare-exporters] [--big] [--json FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from onnxcomp import export, runtime, zoo
from onnxcomp.model import opset_version
from onnxcomp.report import markdown_table, write_json_atomic


def _latency(path: Path, feeds: dict[str, np.ndarray], warmup: int, runs: int) -> dict:
    session = runtime.session(path, provider="cpu", threads=1, optimize=True)
    for _ in range(warmup):
        session.run(None, feeds)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feeds)
        times.append(time.perf_counter() - start)
    return {"p50_ms": float(np.median(times) * 1e3),
            "p90_ms": float(np.percentile(times, 90) * 1e3), "runs": runs}


def minilm_feeds() -> dict[str, np.ndarray]:
    """32 tokens: [CLS], word pieces of calibration sentences, [SEP]."""
    data = zoo.dataset("minilm", "calib", 16)
    pieces: list[int] = []
    for batch in data:
        pieces.extend(batch["input_ids"][0, 1:-1].tolist())
        if len(pieces) >= 30:
            break
    ids = np.asarray([[101, *pieces[:30], 102]], dtype=np.int64)
    return {"input_ids": ids, "attention_mask": np.ones_like(ids),
            "token_type_ids": np.zeros_like(ids)}


def clip_feeds() -> dict[str, np.ndarray]:
    batch = zoo.dataset("clip-vit-b32", "eval", 1).make_batch(0)
    return {name: value[:1] for name, value in batch.items()}


def make_minilm():
    from onnxcomp.zoo import minilm

    hf = minilm.source_folder(zoo.cache_dir() / "minilm")
    return export.hf_module().prepare_folder(hf), minilm.SOURCE


def make_clip():
    from onnxcomp.zoo import clip_vit

    return export.hf_module().prepare_clip_model(clip_vit.build_model()), clip_vit.SOURCE


def measure_zoo(name: str, make, feeds, scratch: Path, warmup: int, runs: int) -> dict:
    start = time.perf_counter()
    prepared, source = make()
    result = export.export_prepared(prepared, scratch / f"{name}.onnx", source=source)
    total = time.perf_counter() - start
    row = {"model": name, "export_s": result.seconds, "total_s": total,
           "file_mb": result.file_bytes / 1e6, "parameters_m": result.parameters / 1e6,
           "max_abs_error": result.max_abs_error, "min_cosine": result.min_cosine,
           "ok": result.ok, "checks": [vars(c) for c in result.checks]}
    row["latency"] = _latency(result.path, feeds(), warmup, runs)
    row["latency_input"] = {k: list(v.shape) for k, v in feeds().items()}
    return row


def _fused_attention(path: Path) -> int:
    """Attention nodes after ONNX Runtime's BERT fusion (what the fuse pass relies on)."""
    from onnxruntime.transformers import optimizer

    fused = optimizer.optimize_model(str(path), model_type="bert", num_heads=12, hidden_size=384,
                                     opt_level=0)
    return sum(node.op_type == "Attention" for node in fused.model.graph.node)


def compare_exporters(scratch: Path) -> list[dict]:
    """MiniLM through both torch exporters, with eager and SDPA attention."""
    import torch

    rows = []
    for dynamo, attention in ((False, "eager"), (False, "sdpa"), (True, "eager")):
        prepared, _ = make_minilm()
        prepared.module.model.set_attn_implementation(attention)
        label = f"dynamo={dynamo}, {attention} attention"
        path = scratch / f"minilm-{dynamo}-{attention}.onnx"
        start = time.perf_counter()
        try:
            if dynamo:
                batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
                shapes = {name: {0: batch, 1: seq} for name in prepared.input_names}
                program = torch.onnx.export(prepared.module, prepared.example, dynamo=True,
                                            input_names=list(prepared.input_names),
                                            output_names=list(prepared.output_names),
                                            dynamic_shapes=shapes, opset_version=17,
                                            verbose=False)
                program.save(str(path))
            else:
                torch.onnx.export(prepared.module, prepared.example, str(path), dynamo=False,
                                  input_names=list(prepared.input_names),
                                  output_names=list(prepared.output_names),
                                  dynamic_axes=prepared.dynamic_axes, opset_version=17)
        except Exception as exc:  # noqa: BLE001 - e.g. onnxscript missing for dynamo=True
            rows.append({"exporter": label, "error": str(exc).splitlines()[0]})
            continue
        seconds = time.perf_counter() - start
        proto = onnx.load(path)
        ops = collections.Counter(node.op_type for node in proto.graph.node)
        checks = export.compare_with_torch(prepared, path)
        rows.append({"exporter": label, "export_s": seconds, "opset": opset_version(proto),
                     "nodes": len(proto.graph.node), "MatMul": ops["MatMul"],
                     "Constant": ops["Constant"], "IsNaN": ops["IsNaN"],
                     "max_abs_error": max(c.max_abs_error for c in checks),
                     "ort_fused_attention": _fused_attention(path)})
    return rows


BIG_MODEL = """
import torch


class Big(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first = torch.nn.Linear(16384, 16384)
        self.second = torch.nn.Linear(16384, 16384)
        self.head = torch.nn.Linear(16384, 64)

    def forward(self, features):
        return self.head(torch.relu(self.second(torch.relu(self.first(features)))))


def make():
    torch.manual_seed(0)
    return Big(), (torch.randn(2, 16384),)
"""

BIG_CHILD = """
import json, resource, sys, time
from onnxcomp.export import export
result = export(sys.argv[1] + ":make", sys.argv[2])
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"export_s": result.seconds, "file_gb": result.file_bytes / 1e9,
                  "parameters_m": result.parameters / 1e6, "ok": result.ok,
                  "max_abs_error": result.max_abs_error, "peak_rss_gb": peak / 1e9}))
"""


def measure_big(scratch: Path) -> dict:
    import subprocess

    source = scratch / "big_model.py"
    source.write_text(BIG_MODEL)
    out = scratch / "big" / "big.onnx"
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", BIG_CHILD, str(source), str(out)],
                          capture_output=True, text=True, check=True)
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["total_s"] = time.perf_counter() - start
    row["files"] = {p.name: p.stat().st_size for p in sorted(out.parent.iterdir())}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default="benchmarks/results/export.json")
    parser.add_argument("--compare-exporters", action="store_true")
    parser.add_argument("--big", action="store_true")
    parser.add_argument("--runs", type=int, default=100)
    args = parser.parse_args()
    zoo.fetch("minilm")  # the checked source files (and a cached export)
    results: dict = {"environment": {"python": sys.version.split()[0],
                                     "onnxruntime": ort.__version__,
                                     "machine": platform.machine(),
                                     "cores": __import__("os").cpu_count()}}
    import torch
    import transformers

    results["environment"].update(torch=torch.__version__, transformers=transformers.__version__)
    with tempfile.TemporaryDirectory(prefix="onnxcomp-export-bench-") as tmp:
        scratch = Path(tmp)
        rows = [measure_zoo("minilm", make_minilm, minilm_feeds, scratch, 20, args.runs),
                measure_zoo("clip-vit-b32", make_clip, clip_feeds, scratch, 5,
                            max(10, args.runs // 4))]
        results["zoo"] = rows
        if args.compare_exporters:
            results["exporters"] = compare_exporters(scratch)
        if args.big:
            results["big"] = measure_big(scratch)
    table = markdown_table(
        ["model", "export s", "with load/build s", "file MB", "params M", "max abs err",
         "min cosine", "latency p50 ms (1 thread, batch 1)", "p90 ms"],
        [[r["model"], f"{r['export_s']:.1f}", f"{r['total_s']:.1f}", f"{r['file_mb']:.1f}",
          f"{r['parameters_m']:.1f}", f"{r['max_abs_error']:.1e}", f"{r['min_cosine']:.9f}",
          f"{r['latency']['p50_ms']:.1f}", f"{r['latency']['p90_ms']:.1f}"] for r in rows])
    print(table)
    if "exporters" in results:
        print()
        print(markdown_table(["MiniLM exporter", "export s", "opset", "nodes", "MatMul",
                              "Constant", "IsNaN", "max abs err", "ORT-fused Attention"],
                             [[r["exporter"], *(["error: " + r["error"]] + [""] * 7
                                                if "error" in r else
                                                [f"{r['export_s']:.1f}", r["opset"], r["nodes"],
                                                 r["MatMul"], r["Constant"], r["IsNaN"],
                                                 f"{r['max_abs_error']:.1e}",
                                                 r["ort_fused_attention"]])]
                              for r in results["exporters"]]))
    if "big" in results:
        print("\nbig model:", json.dumps(results["big"]))
    write_json_atomic(results, args.json)
    print(f"\nwritten {args.json}")
    print(json.dumps(results["environment"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
