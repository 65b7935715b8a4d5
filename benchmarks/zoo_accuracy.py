"""The zoo's float baselines: what the uncompressed models score on the zoo's own eval data.

- ppocr-rec: line and character accuracy on ``--lines`` rendered eval lines (greedy CTC);
- ppocr-det: text recall / background cleanliness / boxes found on ``--pages`` eval pages;
- tiny-clip: spread of the embeddings (mean pairwise cosine of different inputs) on eval pairs.

ONNX Runtime, CPU, default optimizations, 1 thread.

    python benchmarks/zoo_accuracy.py [--lines 500] [--pages 16] [--pairs 8] [--json F]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from onnxcomp import model as model_io
from onnxcomp import runtime, zoo
from onnxcomp.report import environment, markdown_table


def _run(name: str, split_count: int) -> tuple[object, list[dict], object, float]:
    path = zoo.fetch(name)
    sess = runtime.session(path, threads=1)
    data = zoo.dataset(name, "eval", split_count)
    started = time.perf_counter()
    outputs = [runtime.run(sess, batch) for batch in data]
    return model_io.load(path), outputs, data, time.perf_counter() - started


def _spread(embeddings: np.ndarray) -> float:
    cosine = embeddings @ embeddings.T
    upper = np.triu_indices(len(embeddings), 1)
    return float(cosine[upper].mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lines", type=int, default=500)
    parser.add_argument("--pages", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=8, help="batches of 8 tiny-clip pairs")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    results: dict[str, dict] = {}
    for name, count in (("ppocr-rec", args.lines), ("ppocr-det", args.pages)):
        model, outputs, data, seconds = _run(name, count)
        scores = zoo.task_metric(name)(model, outputs, data.labels)
        results[name] = {"data": data.name, "seconds": round(seconds, 2), **scores}

    model, outputs, data, seconds = _run("tiny-clip", args.pairs)
    image = np.concatenate([o["image_embeds"] for o in outputs])
    text = np.concatenate([o["text_embeds"] for o in outputs])
    results["tiny-clip"] = {"data": data.name, "seconds": round(seconds, 2),
                            "image_mean_pairwise_cosine": _spread(image),
                            "text_mean_pairwise_cosine": _spread(text)}

    rows = []
    for name, values in results.items():
        for key, value in values.items():
            if key not in ("data", "seconds"):
                rows.append([name, values["data"], key, f"{value:.4f}"])
    print(markdown_table(["model", "data", "metric", "float value"], rows))
    if args.json:
        args.json.write_text(json.dumps({"environment": environment(), "results": results},
                                        indent=2))


if __name__ == "__main__":
    main()
