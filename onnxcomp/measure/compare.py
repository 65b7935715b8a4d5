"""The one numeric comparison of two models: used by quantize, distill and validate.

Streamed by batch over a dataset (a reference with weights on disk runs a segment at a time):

- Per-layer SQNR (dB) of each quantized node's output tensor: ``10 log10(sum ref^2 /
  sum (ref - q)^2)`` over all batches, the quantized model running end to end (errors of earlier
  layers included, as in deployment).
- Model output cosine: mean per-sample cosine per output (``per_sample_cosine``); the
  figure the automatic mixed precision compares with ``min_cosine`` is the lowest over outputs.
Both models run on the CPU with graph optimizations off, so the numbers describe the graph. A
reference whose weights are on disk (a large model) runs a segment at a time (``onnxcomp.segments``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice

import numpy as np

from onnxcomp import runtime, segments
from onnxcomp.calibration import Dataset, session_with_outputs
from onnxcomp.model import Model


def per_sample_cosine(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Cosine similarity per sample (axis 0 for rank >= 2, else the whole array is one sample)."""
    a, b = _samples(reference), _samples(candidate)
    dot = np.einsum("ij,ij->i", a, b)
    norm_a = np.sqrt(np.einsum("ij,ij->i", a, a))
    norm_b = np.sqrt(np.einsum("ij,ij->i", b, b))
    both_zero = (norm_a == 0) & (norm_b == 0)
    one_zero = (norm_a == 0) ^ (norm_b == 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        cosine = dot / (norm_a * norm_b)
    cosine = np.where(both_zero, 1.0, np.where(one_zero, 0.0, cosine))
    return np.clip(cosine, -1.0, 1.0)


def _samples(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array, dtype=np.float64)
    if array.ndim >= 2:
        return array.reshape(array.shape[0], -1)
    return array.reshape(1, -1)


def dual_encoder_outputs(outputs: dict[str, np.ndarray]) -> tuple[str, str] | None:
    """The (image-side, text-side) output names when the model looks like a dual encoder."""
    if len(outputs) != 2:
        return None
    names = list(outputs)
    arrays = [outputs[n] for n in names]
    if not all(np.issubdtype(a.dtype, np.floating) and a.ndim == 2 for a in arrays):
        return None
    if arrays[0].shape[1] != arrays[1].shape[1]:
        return None
    image_words = ("image", "img", "vision", "pixel")
    if any(w in names[1].lower() for w in image_words) and not any(
            w in names[0].lower() for w in image_words):
        names.reverse()
    return names[0], names[1]


# Requested tensors per segment when a large model is compared segment by segment.
SEGMENT_TENSORS = 16


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
    if signal <= 0 or not np.isfinite(noise):  # an overflowed candidate (fp16 inf) is -inf dB
        return float("-inf")
    return float(10.0 * np.log10(signal / noise))


class _Sums:
    def __init__(self, names: Sequence[str], outputs: Sequence[str]):
        self.outputs = list(outputs)
        self.signal = dict.fromkeys(names, 0.0)
        self.noise = dict.fromkeys(names, 0.0)
        self.cosine_sum = dict.fromkeys(outputs, 0.0)
        self.samples = dict.fromkeys(outputs, 0)

    def add(self, name: str, reference: np.ndarray, candidate: np.ndarray) -> None:
        if not np.issubdtype(np.asarray(reference).dtype, np.floating):
            return
        signal, noise = _energies(np.asarray(reference), np.asarray(candidate))
        self.signal[name] += signal
        self.noise[name] += noise
        if name in self.cosine_sum:
            cos = per_sample_cosine(np.asarray(reference, np.float64),
                                    np.asarray(candidate, np.float64))
            self.cosine_sum[name] += float(cos.sum())
            self.samples[name] += cos.size

    def result(self) -> Comparison:
        result = Comparison()
        result.sqnr = {n: sqnr_db(self.signal[n], self.noise[n]) for n in self.signal}
        result.cosine = {n: self.cosine_sum[n] / self.samples[n] for n in self.outputs
                         if self.samples[n]}
        return result


# Elements per float64 chunk in ``_energies``: 8 MiB each, whatever the tensor's size.
_CHUNK = 1 << 20


def _energies(reference: np.ndarray, candidate: np.ndarray) -> tuple[float, float]:
    """sum(r^2) and sum((r - c)^2) accumulated in float64 a chunk at a time: whole-tensor
    float64 copies of a detector's feature maps (163 MiB of float32 per batch on an 800x608
    PicoDet) cost five times that in temporaries, which set the peak of static int8."""
    ref, cand = reference.reshape(-1), candidate.reshape(-1)
    signal = noise = 0.0
    for start in range(0, ref.size, _CHUNK):
        r = ref[start:start + _CHUNK].astype(np.float64)
        c = cand[start:start + _CHUNK]
        with np.errstate(invalid="ignore"):  # -inf - -inf: a mask's equal infinities
            d = r - c
        d[r == c] = 0.0
        signal += float(r @ r)
        noise += float(d @ d)
    return signal, noise


def compare(reference: Model, candidate: Model, tensors: Sequence[str], data: Dataset,
            max_batches: int) -> Comparison:
    """``reference`` with weights on disk (a large model) is compared a segment at a time
    (``compare_by_segment``), so the float model is never whole in ONNX Runtime."""
    outputs = [o.name for o in reference.graph.output]
    tensors = [t for t in dict.fromkeys(tensors) if t not in outputs]
    if reference.lazy:
        return compare_by_segment(reference, candidate, outputs + tensors, data, max_batches)
    # Sessions built without a copy of either model (each copy holds every weight again).
    ref_sess = session_with_outputs(reference, tensors)
    cand_sess = session_with_outputs(candidate, tensors)
    names = outputs + tensors
    sums = _Sums(names, outputs)
    for batch in islice(iter(data), max_batches):
        ref = runtime.run(ref_sess, batch, names)
        cand = runtime.run(cand_sess, batch, names)
        for name in names:
            sums.add(name, ref[name], cand[name])
        # Every quantized tensor of both models for one batch (163 MiB each on a 800x608
        # detector): dropped before the next batch runs, or two batches' worth live at once.
        del ref, cand
    return sums.result()


def compare_by_segment(reference: Model, candidate: Model, names: Sequence[str], data: Dataset,
                       max_batches: int) -> Comparison:
    """``compare`` in lockstep, one segment of the reference at a time: the same part of the
    candidate (cut at the same boundary tensors, ``segments.extract``) runs on the candidate's
    own boundary values, so its errors still flow end to end. Memory: one segment of each."""
    outputs = [o.name for o in reference.graph.output]
    sums = _Sums(names, outputs)
    batches = list(islice(iter(data), max_batches))
    carried = [dict(batch) for batch in batches]
    for segment, values in segments.iterate(reference, names, batches, SEGMENT_TENSORS):
        wanted = list(dict.fromkeys(segment.outputs + segment.names))
        part = segments.extract(candidate, segment.inputs, wanted,
                                segments.dtypes_of(carried[0], segment.inputs))
        run_names = [n for n in wanted if n not in segment.inputs]
        sess = runtime.session(part, optimize=False) if run_names else None
        for i, ref in enumerate(values):
            feeds = {n: carried[i][n] for n in segment.inputs}
            got = runtime.run(sess, feeds, run_names) if sess else {}
            got.update(feeds)
            carried[i] = {n: got[n] for n in segment.outputs}
            for name in segment.names:
                sums.add(name, ref[name], got[name])
        del sess, part
    return sums.result()


class Reference:
    """The reference model's outputs on the first ``count`` batches, computed once, so that many
    candidates can be scored without holding the reference in ONNX Runtime (for a large model,
    the float weights are the bulk of the memory)."""

    def __init__(self, reference: Model, data: Dataset, count: int):
        self.outputs = [o.name for o in reference.graph.output]
        self.batches = list(islice(iter(data), count))
        self.values: list[dict[str, np.ndarray]] = [{} for _ in self.batches]
        if reference.lazy:  # weights on disk: a large model, run a segment at a time
            for _, values in segments.iterate(reference, self.outputs, self.batches,
                                              SEGMENT_TENSORS):
                for i, result in enumerate(values):
                    self._keep(i, result)
            return
        sess = runtime.session(reference, optimize=False)
        for i, batch in enumerate(self.batches):
            self._keep(i, runtime.run(sess, batch, self.outputs))

    def _keep(self, index: int, result: dict[str, np.ndarray]) -> None:
        self.values[index].update({name: value for name, value in result.items()
                                   if np.issubdtype(value.dtype, np.floating)})

    def min_cosine(self, candidate: Model | str | os.PathLike, count: int | None = None
                   ) -> float:
        """Lowest over outputs of the mean per-sample cosine, on the first ``count`` batches
        (``candidate``: a model or its file)."""
        sess = runtime.session(candidate, optimize=False)
        names = list(self.values[0]) if self.values else []
        sums = _Sums(names, names)
        for batch, ref in zip(self.batches[:count], self.values[:count]):
            got = runtime.run(sess, batch, names)
            for name in names:
                sums.add(name, ref[name], got[name])
        return sums.result().min_cosine
