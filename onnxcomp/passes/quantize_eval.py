"""Measuring a quantized model against the float one on calibration data, streamed by batch.

- Per-layer SQNR (dB) of each quantized node's output tensor: ``10 log10(sum ref^2 /
  sum (ref - q)^2)`` over all batches, the quantized model running end to end (errors of earlier
  layers included, as in deployment).
- Model output cosine: mean per-sample cosine per output (``validate.per_sample_cosine``); the
  figure the automatic mixed precision compares with ``min_cosine`` is the lowest over outputs.
Both models run on the CPU with graph optimizations off, so the numbers describe the graph.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from onnxcomp import runtime
from onnxcomp.calibration import Dataset, with_outputs
from onnxcomp.model import Model
from onnxcomp.validate import per_sample_cosine


@dataclass
class Comparison:
    sqnr: dict[str, float] = field(default_factory=dict)  # tensor -> dB
    cosine: dict[str, float] = field(default_factory=dict)  # graph output -> mean cosine

    @property
    def min_cosine(self) -> float:
        return min(self.cosine.values()) if self.cosine else 1.0


def sqnr_db(signal: float, noise: float) -> float:
    if noise <= 0:
        return float("inf")
    if signal <= 0:
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


def compare(reference: Model, candidate: Model, tensors: Sequence[str], data: Dataset,
            max_batches: int) -> Comparison:
    outputs = [o.name for o in reference.graph.output]
    tensors = [t for t in dict.fromkeys(tensors) if t not in outputs]
    ref_sess = runtime.session(with_outputs(reference, tensors), optimize=False)
    cand_sess = runtime.session(with_outputs(candidate, tensors), optimize=False)
    names = outputs + tensors
    signal = dict.fromkeys(names, 0.0)
    noise = dict.fromkeys(names, 0.0)
    cosine_sum = dict.fromkeys(outputs, 0.0)
    samples = dict.fromkeys(outputs, 0)
    for batch in islice(iter(data), max_batches):
        ref = runtime.run(ref_sess, batch, names)
        cand = runtime.run(cand_sess, batch, names)
        for name in names:
            a = np.asarray(ref[name], np.float64)
            if not np.issubdtype(np.asarray(ref[name]).dtype, np.floating):
                continue
            b = np.asarray(cand[name], np.float64)
            signal[name] += float(np.sum(a * a))
            noise[name] += float(np.sum((a - b) ** 2))
            if name in cosine_sum:
                cos = per_sample_cosine(a, b)
                cosine_sum[name] += float(cos.sum())
                samples[name] += cos.size
    result = Comparison()
    result.sqnr = {name: sqnr_db(signal[name], noise[name]) for name in names}
    result.cosine = {name: cosine_sum[name] / samples[name] for name in outputs if samples[name]}
    return result


class Reference:
    """The reference model's outputs on the first ``count`` batches, computed once, so that many
    candidates can be scored without holding the reference in ONNX Runtime (for a large model,
    the float weights are the bulk of the memory)."""

    def __init__(self, reference: Model, data: Dataset, count: int):
        sess = runtime.session(reference, optimize=False)
        self.outputs = [o.name for o in reference.graph.output]
        self.batches = list(islice(iter(data), count))
        self.values = []
        for batch in self.batches:
            result = runtime.run(sess, batch, self.outputs)
            self.values.append({name: value for name, value in result.items()
                                if np.issubdtype(value.dtype, np.floating)})
        del sess

    def min_cosine(self, candidate: Model, count: int | None = None) -> float:
        """Lowest over outputs of the mean per-sample cosine, on the first ``count`` batches."""
        sess = runtime.session(candidate, optimize=False)
        sums: dict[str, float] = {}
        samples: dict[str, int] = {}
        for batch, ref in zip(self.batches[:count], self.values[:count]):
            got = runtime.run(sess, batch, list(ref))
            for name, value in ref.items():
                cos = per_sample_cosine(np.asarray(value, np.float64),
                                        np.asarray(got[name], np.float64))
                sums[name] = sums.get(name, 0.0) + float(cos.sum())
                samples[name] = samples.get(name, 0) + cos.size
        return min((sums[n] / samples[n] for n in sums), default=1.0)
