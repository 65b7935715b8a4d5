"""Where does int4 lose fidelity in a Llama-style decoder? One variant per row, same prompts.

Builds the generator's ``small`` preset (256 hidden, 4 layers; ``--init scaled|plain``), quantizes
it with ``quantize:int4`` under different settings (scale rule, block size, zero points, format)
and with groups of layers kept float, and reports the ``last_hidden_state`` cosine against float
(per prompt, averaged) in ONNX Runtime. It says which settings and which layers matter; the 1B
figures are in docs/scale.md (``benchmarks/scale.py``).

    python benchmarks/int4_sensitivity.py [--preset small] [--init scaled] [--prompts 8]
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

from onnxcomp import api, runtime
from onnxcomp.model import load
from onnxcomp.report import markdown_table
from onnxcomp.zoo import llama

# (label, --set overrides). Node names of the generator: layers.N.{q,k,v,attn,gate,up,down}.
VARIANTS = (
    ("int4 default (symmetric, block 32, mse scales, MatMulNBits)", []),
    ("scale rule max (max|w| / 7)", ["quantize.int4_scale=max"]),
    ("QDQ format (positive scales)", ["quantize.int4_format=qdq"]),
    ("zero points (asymmetric)", ["quantize.int4_symmetric=false"]),
    ("block 16", ["quantize.block_size=16"]),
    ("block 16 + zero points", ["quantize.block_size=16", "quantize.int4_symmetric=false"]),
    ("block 64", ["quantize.block_size=64"]),
    ("attention q, k float", ["quantize.exclude=['*.q','*.k']"]),
    ("attention v, o float", ["quantize.exclude=['*.v','*.attn']"]),
    ("all attention float", ["quantize.exclude=['*.q','*.k','*.v','*.attn']"]),
    ("MLP gate, up float", ["quantize.exclude=['*.gate','*.up']"]),
    ("MLP down float", ["quantize.exclude=['*.down']"]),
    ("all MLP float", ["quantize.exclude=['*.gate','*.up','*.down']"]),
)


def hidden_cosine(reference, candidate, data) -> float:
    ref_sess = runtime.session(reference, optimize=False)
    cand_sess = runtime.session(candidate, optimize=False)
    cosines = []
    for batch in data:
        a = runtime.run(ref_sess, batch)["last_hidden_state"].ravel().astype(np.float64)
        b = runtime.run(cand_sess, batch)["last_hidden_state"].ravel().astype(np.float64)
        cosines.append(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    return float(np.mean(cosines))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--init", choices=("scaled", "plain"), default="scaled")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--length", type=int, default=32)
    args = parser.parse_args(argv)
    config = dataclasses.replace(llama.PRESETS[args.preset], init=args.init)
    data = llama.prompts(config, args.prompts, length=args.length)
    with tempfile.TemporaryDirectory() as tmp:
        path = llama.build(Path(tmp) / "model.onnx", config)
        reference = load(path)
        rows = []
        for label, overrides in VARIANTS:
            result = api.compress(path, recipe="quantize:int4", overrides=overrides,
                                  validate=False, show_progress=False)
            rows.append([label, f"{result.model.weight_bytes() / reference.weight_bytes():.3f}",
                         f"{hidden_cosine(reference, result.model, data):.4f}"])
            print(f"{label}: {rows[-1][2]}", file=sys.stderr)
    print(f"{args.preset} preset ({config.hidden} hidden, {config.layers} layers, init "
          f"{args.init}), {args.prompts} prompts x {args.length} tokens")
    print(markdown_table(["variant", "weight bytes / float", "last_hidden_state cosine"], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
