"""How well tiny-clip's CCA-aligned towers retrieve their own pairs (float model).

For the default build and the larger variant (``width=256, layers=4, heads=8``): build time, and
on the eval split (batches of 8 pairs) recall@1 image -> text and text -> image
(``onnxcomp.validate.retrieval_metrics``, pair i's match is text i), topic@1 (the retrieved
text has the query's topic), mean cosine of true pairs and of all other pairs, and the mean
pairwise cosine within each modality.

    python benchmarks/tiny_clip_alignment.py [--batches 8 16] [--json F]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from onnxcomp import runtime, zoo
from onnxcomp.measure.validate import retrieval_metrics
from onnxcomp.model import Model
from onnxcomp.report import write_json_atomic
from onnxcomp.zoo import tiny_clip

VARIANTS = {"default": {}, "large": {"width": 256, "layers": 4, "heads": 8}}


def measure(model: Model, batches: int) -> dict:
    data = zoo.dataset("tiny-clip", "eval", batches)
    outs = [runtime.run_model(model, b) for b in data]
    image = np.concatenate([o["image_embeds"] for o in outs])
    text = np.concatenate([o["text_embeds"] for o in outs])
    recall = retrieval_metrics(image, text, image, text)["recall@1"]
    similarity = image @ text.T
    labels = np.concatenate(data.labels)
    upper = np.triu_indices(len(image), 1)
    return {
        "pairs": len(image),
        "chance": 1 / len(image),
        "recall@1_image_to_text": recall["a_to_b"]["reference"],
        "recall@1_text_to_image": recall["b_to_a"]["reference"],
        "topic@1_image_to_text": float(np.mean(labels[similarity.argmax(1)] == labels)),
        "paired_cosine": float(np.diag(similarity).mean()),
        "unpaired_cosine": float(similarity[~np.eye(len(image), dtype=bool)].mean()),
        "image_pairwise_cosine": float((image @ image.T)[upper].mean()),
        "text_pairwise_cosine": float((text @ text.T)[upper].mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 16])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS))
    parser.add_argument("--json")
    args = parser.parse_args()
    results = {}
    for name in args.variants:
        start = time.perf_counter()
        model = Model(tiny_clip.build(**VARIANTS[name]))
        seconds = time.perf_counter() - start
        results[name] = {"build_seconds": round(seconds, 2), "arguments": VARIANTS[name],
                         "eval": [measure(model, b) for b in args.batches]}
        for row in results[name]["eval"]:
            print(f"{name}: build {seconds:.1f} s, {row['pairs']} pairs: recall@1 "
                  f"i->t {row['recall@1_image_to_text']:.3f} t->i "
                  f"{row['recall@1_text_to_image']:.3f} (chance {row['chance']:.3f}), topic@1 "
                  f"{row['topic@1_image_to_text']:.3f}, cosine paired "
                  f"{row['paired_cosine']:.3f} / unpaired {row['unpaired_cosine']:.3f}, "
                  f"pairwise image {row['image_pairwise_cosine']:.3f} / text "
                  f"{row['text_pairwise_cosine']:.3f}")
    if args.json:
        write_json_atomic(results, args.json)


if __name__ == "__main__":
    main()
