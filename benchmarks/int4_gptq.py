"""int4 round-to-nearest vs GPTQ error compensation, same model, same calibration data.

For each model: ``quantize:int4`` with ``int4_method = rtn`` (the default; the MSE scale search)
and ``int4_method = gptq`` calibrated on the zoo's calib split, both as MatMulNBits (block 32,
symmetric), validated against float on the held-out eval split with ``onnxcomp.validate``
(mean per-sample cosine of every output; CLIP retrieval agreement where it applies), plus the
weight bytes and the quantization time (GPTQ's includes its calibration pass).

    python benchmarks/int4_gptq.py [--models minilm,tiny-clip,clip-vit-b32,llama-small]
                                   [--calib 64] [--eval 64]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from onnxcomp import api, zoo
from onnxcomp.measure.validate import validate
from onnxcomp.model import load
from onnxcomp.report import markdown_table
from onnxcomp.zoo import llama


def case(name: str, calib: int, evaluation: int, folder: Path):
    if name == "llama-small":
        config = llama.PRESETS["small"]
        path = llama.build(folder / "llama-small.onnx", config)
        return (path, llama.prompts(config, calib, length=64, seed=11),
                llama.prompts(config, evaluation, length=32, seed=1))
    return zoo.fetch(name), zoo.dataset(name, "calib", calib), zoo.dataset(name, "eval", evaluation)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,tiny-clip,clip-vit-b32,llama-small")
    parser.add_argument("--calib", type=int, default=64)
    parser.add_argument("--eval", type=int, default=64)
    args = parser.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            path, calib, evaluation = case(name, args.calib, args.eval, Path(tmp))
            reference = load(path)
            for method in ("rtn", "gptq"):
                print(f"{name} {method} ...", file=sys.stderr)
                started = time.perf_counter()
                result = api.compress(path, recipe="quantize:int4", calib=calib, validate=False,
                                      overrides=[f"quantize.int4_method={method}"],
                                      show_progress=False)
                seconds = time.perf_counter() - started
                fidelity = validate(reference, result.model, data=evaluation).fidelity
                outputs = fidelity["outputs"]
                cosines = ", ".join(f"{o}: {v['cosine_mean']:.4f}" for o, v in outputs.items()
                                    if "cosine_mean" in v)
                retrieval = fidelity.get("retrieval") or {}
                agree = (f"{retrieval['a_to_b_agreement']:.3f} / {retrieval['b_to_a_agreement']:.3f}"
                         if retrieval else None)
                rows.append([name, method, f"{result.model.weight_bytes() / 1e6:.2f}",
                             f"{seconds:.1f}", cosines,
                             agree or "-"])
    print(f"calibration {args.calib} batches (zoo calib split; llama: prompts of 64 tokens), "
          f"evaluation {args.eval} held-out batches")
    print(markdown_table(["model", "int4", "weight MB", "quantize s", "cosine (mean)",
                          "retrieval agreement a->b / b->a"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
