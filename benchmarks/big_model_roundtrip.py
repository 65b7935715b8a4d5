"""Round-trip a synthetic model with more than 2 GiB of weights through onnxcomp.load/save.

Builds a chain of MatMuls whose float32 weights add up to ~2.25 GiB, saves it with
``onnxcomp.save`` (which must switch to external data by itself), loads it back with
``onnxcomp.load`` from another working directory, runs both in ONNX Runtime on the same input
and compares. Reports wall time and peak resident memory (ru_maxrss) of each step.

    python benchmarks/big_model_roundtrip.py [--out docs/big_model_roundtrip.md]
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import onnxcomp
from onnxcomp import runtime

SIDE = 8192          # each weight is SIDE x SIDE float32 = 256 MiB
LAYERS = 9           # 9 x 256 MiB = 2.25 GiB


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 / 1024


def build() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    nodes, inits = [], []
    previous = "x"
    for i in range(LAYERS):
        # Scaled so activations stay O(1) through the chain.
        weight = (rng.standard_normal((SIDE, SIDE), dtype=np.float32) / np.sqrt(SIDE)).astype(np.float32)
        inits.append(numpy_helper.from_array(weight, f"w{i}"))
        del weight
        out = "y" if i == LAYERS - 1 else f"h{i}"
        nodes.append(helper.make_node("MatMul", [previous, f"w{i}"], [out], name=f"mm{i}"))
        previous = out
    graph = helper.make_graph(nodes, "big",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, SIDE])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, SIDE])],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None, help="write a Markdown result here")
    args = parser.parse_args()
    rows = []
    x = {"x": np.random.default_rng(1).standard_normal((1, SIDE)).astype(np.float32)}
    with tempfile.TemporaryDirectory(prefix="onnxcomp-big-") as tmp:
        started = time.perf_counter()
        model = onnxcomp.Model(build())
        weight_gib = model.weight_bytes() / 2**30
        rows.append(("build in memory", time.perf_counter() - started, peak_rss_gib()))

        started = time.perf_counter()
        path = onnxcomp.save(model, Path(tmp) / "big.onnx")
        rows.append(("onnxcomp.save", time.perf_counter() - started, peak_rss_gib()))
        data_file = Path(tmp) / "big.onnx.data"
        assert data_file.is_file(), "expected external data"
        model_file_mib = path.stat().st_size / 2**20
        data_gib = data_file.stat().st_size / 2**30

        started = time.perf_counter()
        reference = runtime.run(runtime.session(str(path)), x)["y"]
        rows.append(("ORT session + run from path", time.perf_counter() - started, peak_rss_gib()))
        del model

        cwd = os.getcwd()
        os.chdir(tempfile.gettempdir())
        try:
            started = time.perf_counter()
            again = onnxcomp.load(path)
            rows.append(("onnxcomp.load (other cwd)", time.perf_counter() - started, peak_rss_gib()))
        finally:
            os.chdir(cwd)
        started = time.perf_counter()
        result = runtime.run(runtime.session(again), x)["y"]
        rows.append(("ORT run of the loaded model", time.perf_counter() - started, peak_rss_gib()))
        difference = float(np.max(np.abs(result - reference)))

    lines = [
        f"Synthetic model: {LAYERS} MatMuls of {SIDE}x{SIDE} float32, {weight_gib:.2f} GiB of weights.",
        f"Saved as {model_file_mib:.3f} MiB .onnx + {data_gib:.2f} GiB external data; "
        f"max |difference| after the round trip: {difference:g}.",
        "",
        "| step | seconds | peak RSS so far (GiB) |",
        "|---|---|---|",
        *[f"| {name} | {seconds:.1f} | {rss:.2f} |" for name, seconds, rss in rows],
    ]
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if difference == 0.0 else 1


if __name__ == "__main__":
    sys.exit(main())
