"""Fidelity of a compressed model: the reference (teacher) and the candidate run side by side.

Both models run in ONNX Runtime (CPU, default graph optimizations) on the same inputs, one batch
at a time; only running sums are kept per output (plus one small embedding row per sample for the
retrieval metric), so memory does not grow with the data set.

Metrics per output (``a`` = reference, ``b`` = candidate, both read as float64):
- ``cosine_mean`` / ``cosine_min``: cosine similarity per sample, each sample flattened. A sample
  is one index along axis 0 for outputs of rank >= 2; an output of rank 0 or 1 is one sample per
  batch. Two zero vectors count as cosine 1, one zero vector against a non-zero one as 0.
- ``rel_l2``: ``||a - b|| / ||a||`` over all the data (inf when the reference is all zeros and the
  candidate is not).
- ``max_abs``: ``max |a - b|``.
- Class scores (float, rank >= 2, last axis >= 2, e.g. ``[N, T, C]`` logits or probabilities),
  over every position of the leading axes (each of the N*T time steps):
  ``top1_agreement`` = the fraction of positions where the candidate's argmax equals the
  reference's argmax; ``top5_agreement`` = the fraction where the candidate's argmax is among the
  reference's top 5 classes (top min(5, C)). Ties resolve to the lowest class index.
- Dual encoders (exactly two outputs, both float ``[batch, d]`` with the same ``d``): retrieval
  agreement over all samples, see :func:`retrieval_metrics`. Those two outputs get no top-k.
- Task metric: for zoo data (``ppocr-rec:eval:64``) the zoo's task metric, for both models;
  where the zoo model says which examples changed (``task_changes``: for ppocr-rec the lines
  whose text the candidate reads differently, with their images), ``task["changed"]``.

Kept for the HTML report (:mod:`onnxcomp.report_html`): each output's per-sample cosines
(``per_sample_cosine``, the first ``PER_SAMPLE_LIMIT``, rounded to 6 decimals) and, for dual
encoders, both models' similarity matrices on the first pairs (``retrieval["similarity"]``).

``min_cosine`` gates on each output's ``cosine_mean``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from onnxcomp import calibration, report_data, runtime
from onnxcomp.calibration import Dataset
from onnxcomp.errors import InvalidOutput, OnnxcompError, UserError
from onnxcomp.measure.compare import dual_encoder_outputs, per_sample_cosine
from onnxcomp.model import Model, load
from onnxcomp.progress import Progress, as_progress
from onnxcomp.report import Report
from onnxcomp.report import progress as default_progress

DEFAULT_COUNT = 8
TOP_K = 5
# Rows of the similarity matrix computed at a time (bounds memory for large evaluation sets).
RETRIEVAL_BLOCK = 1024
# Per-sample cosines kept per output for the report's histogram (the sums cover every sample).
PER_SAMPLE_LIMIT = 10_000


# ---------------------------------------------------------------------------------------------
# Metrics on arrays (pure numpy; the tests check them against direct computations)


def looks_like_class_scores(array: np.ndarray) -> bool:
    return (np.issubdtype(array.dtype, np.floating) and array.ndim >= 2
            and array.shape[-1] >= 2)


def topk_hits(reference: np.ndarray, candidate: np.ndarray, k: int = TOP_K
              ) -> tuple[int, int, int]:
    """(positions, top-1 matches, candidate-top-1-in-reference-top-k) along the last axis."""
    classes = reference.shape[-1]
    ref = reference.reshape(-1, classes)
    cand_top1 = np.argmax(candidate.reshape(-1, classes), axis=-1)
    ref_top1 = np.argmax(ref, axis=-1)
    k = min(k, classes)
    ref_topk = np.argpartition(ref, classes - k, axis=-1)[:, classes - k:]
    in_topk = (ref_topk == cand_top1[:, None]).any(axis=-1)
    return ref.shape[0], int(np.sum(cand_top1 == ref_top1)), int(np.sum(in_topk))


def _normalize(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.maximum(norms, 1e-12)


def retrieval_metrics(ref_a: np.ndarray, ref_b: np.ndarray, cand_a: np.ndarray,
                      cand_b: np.ndarray, block: int = RETRIEVAL_BLOCK) -> dict[str, Any]:
    """Cross-modal retrieval agreement of a dual encoder (``a`` = image side, ``b`` = text side).

    ``S = normalize(a) @ normalize(b).T`` for each model. ``a_to_b_agreement``: the fraction of
    rows whose argmax is the same in both models; ``b_to_a_agreement`` likewise on columns;
    ``mean_abs_sim_diff`` / ``max_abs_sim_diff``: over all entries of ``|S_ref - S_cand|``;
    ``recall@1`` of each model against the diagonal (pair i, i is the true match; only when
    both sides have the same count). Computed by blocks of rows, never the whole matrix at once.
    """
    ra, rb, ca, cb = (_normalize(x) for x in (ref_a, ref_b, cand_a, cand_b))
    rows, cols = ra.shape[0], rb.shape[0]
    row_agree = 0
    ref_row_hits = cand_row_hits = 0
    abs_sum, abs_max = 0.0, 0.0
    col_best = {"ref": (np.full(cols, -np.inf), np.zeros(cols, dtype=np.int64)),
                "cand": (np.full(cols, -np.inf), np.zeros(cols, dtype=np.int64))}
    for start in range(0, rows, block):
        stop = min(rows, start + block)
        s_ref = ra[start:stop] @ rb.T
        s_cand = ca[start:stop] @ cb.T
        diff = np.abs(s_ref - s_cand)
        abs_sum += float(diff.sum())
        abs_max = max(abs_max, float(diff.max()))
        ref_arg, cand_arg = s_ref.argmax(axis=1), s_cand.argmax(axis=1)
        row_agree += int(np.sum(ref_arg == cand_arg))
        index = np.arange(start, stop)
        ref_row_hits += int(np.sum(ref_arg == index))
        cand_row_hits += int(np.sum(cand_arg == index))
        for key, s in (("ref", s_ref), ("cand", s_cand)):
            best, arg = col_best[key]
            block_arg = s.argmax(axis=0)
            block_best = s[block_arg, np.arange(cols)]
            better = block_best > best  # strict: ties keep the earlier (lower) row, as argmax
            best[better] = block_best[better]
            arg[better] = block_arg[better] + start
    ref_col, cand_col = col_best["ref"][1], col_best["cand"][1]
    result: dict[str, Any] = {
        "samples": rows if rows == cols else [rows, cols],
        "a_to_b_agreement": row_agree / rows,
        "b_to_a_agreement": float(np.mean(ref_col == cand_col)),
        "mean_abs_sim_diff": abs_sum / (rows * cols),
        "max_abs_sim_diff": abs_max,
    }
    if rows == cols:
        diagonal = np.arange(cols)
        result["recall@1"] = {
            "a_to_b": {"reference": ref_row_hits / rows, "candidate": cand_row_hits / rows},
            "b_to_a": {"reference": float(np.mean(ref_col == diagonal)),
                       "candidate": float(np.mean(cand_col == diagonal))},
        }
    return result


@dataclass
class OutputStats:
    """Running sums for one output; ``add`` one batch at a time, ``summary`` at the end."""

    name: str
    shape: list[int] | None = None
    dtype: str = ""
    samples: int = 0
    cosine_sum: float = 0.0
    cosine_min: float = 1.0
    diff_sq: float = 0.0
    ref_sq: float = 0.0
    max_abs: float = 0.0
    class_scores: bool | None = None
    positions: int = 0
    top1: int = 0
    topk: int = 0
    notes: list[str] = field(default_factory=list)
    per_sample: list[float] = field(default_factory=list)

    def add(self, reference: np.ndarray, candidate: np.ndarray, topk: bool = True) -> None:
        if self.shape is None:
            self.shape, self.dtype = list(reference.shape), str(reference.dtype)
            self.class_scores = topk and looks_like_class_scores(reference)
        if reference.size:
            cosine = per_sample_cosine(reference, candidate)
            self.samples += cosine.size
            self.cosine_sum += float(cosine.sum())
            self.cosine_min = min(self.cosine_min, float(cosine.min()))
            room = PER_SAMPLE_LIMIT - len(self.per_sample)
            if room > 0:
                self.per_sample.extend(round(float(c), 6) for c in cosine.ravel()[:room])
            a = reference.astype(np.float64, copy=False)
            d = a - candidate.astype(np.float64, copy=False)
            self.diff_sq += float(np.vdot(d, d))
            self.ref_sq += float(np.vdot(a, a))
            self.max_abs = max(self.max_abs, float(np.max(np.abs(d))))
            if self.class_scores:
                positions, top1, topk_hit = topk_hits(reference, candidate)
                self.positions += positions
                self.top1 += top1
                self.topk += topk_hit

    def summary(self, min_cosine: float | None) -> dict[str, Any]:
        if self.ref_sq > 0:
            rel_l2 = float(np.sqrt(self.diff_sq / self.ref_sq))
        else:
            rel_l2 = 0.0 if self.diff_sq == 0 else float("inf")
        result: dict[str, Any] = {
            "shape": self.shape,
            "dtype": self.dtype,
            "samples": self.samples,
            "cosine_mean": self.cosine_sum / self.samples if self.samples else 1.0,
            "cosine_min": self.cosine_min,
            "rel_l2": rel_l2,
            "max_abs": self.max_abs,
            "per_sample_cosine": list(self.per_sample),
        }
        if self.class_scores and self.positions:
            result["positions"] = self.positions
            result["top1_agreement"] = self.top1 / self.positions
            result["top5_agreement"] = self.topk / self.positions
        if min_cosine is not None:
            result["passed"] = bool(result["cosine_mean"] >= min_cosine)
        return result


# ---------------------------------------------------------------------------------------------
# Models, signatures, data


def _open(model: Model | str | os.PathLike, role: str) -> tuple[Model, Any, str]:
    """(Model for signatures, what ORT loads, label). Paths are checked but their weights are
    left on disk: ONNX Runtime reads them itself, so a large model is not held twice."""
    if isinstance(model, Model):
        label = str(model.source) if model.source else f"<in-memory {role}>"
        return model, model, label
    if not isinstance(model, (str, os.PathLike)):
        raise UserError(f"{role}: expected a path or an onnxcomp Model, got {type(model)}")
    loaded = load(model, load_weights=False)
    return loaded, str(Path(model)), str(model)


def _signature(model: Model) -> dict[str, tuple[int, int | None]]:
    result = {}
    for value_info in calibration.graph_inputs(model):
        tensor_type = value_info.type.tensor_type
        rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
        result[value_info.name] = (tensor_type.elem_type, rank)
    return result


def check_compatible(reference: Model, candidate: Model) -> None:
    """Same input names, dtypes and ranks, and the same output names, or one clear error."""
    ref_sig, cand_sig = _signature(reference), _signature(candidate)
    if set(ref_sig) != set(cand_sig):
        raise UserError(
            f"the models' inputs differ: reference {sorted(ref_sig)}, candidate {sorted(cand_sig)}"
        )
    for name, (ref_type, ref_rank) in ref_sig.items():
        cand_type, cand_rank = cand_sig[name]
        if ref_type != cand_type:
            ref_name = onnx.TensorProto.DataType.Name(ref_type)
            cand_name = onnx.TensorProto.DataType.Name(cand_type)
            raise UserError(
                f"input {name!r} is {ref_name} in the reference but {cand_name} in the candidate"
            )
        if ref_rank is not None and cand_rank is not None and ref_rank != cand_rank:
            raise UserError(
                f"input {name!r} has rank {ref_rank} in the reference but {cand_rank} in the "
                "candidate"
            )
    ref_out = [o.name for o in reference.graph.output]
    cand_out = [o.name for o in candidate.graph.output]
    if set(ref_out) != set(cand_out):
        raise UserError(
            f"the models' outputs differ: reference {ref_out}, candidate {cand_out}"
        )


def resolve_data(data: Any, reference: Model, candidate: Model, count: int | None = None,
                 batch_dims: dict[str, int] | None = None) -> Dataset:
    """The evaluation data: ``data`` as calibration.resolve takes it (default ``random:8``,
    zoo names default to the ``eval`` split), cut to ``count`` batches, checked against both
    models. ``batch_dims`` sizes named dynamic input dims of random inputs (``{"batch": 4}``)."""
    if count is not None and count <= 0:
        raise UserError(f"count must be positive, got {count}")
    dataset = calibration.resolve(data, reference, default_count=count or DEFAULT_COUNT,
                                  split="eval", dims=batch_dims)
    if count is not None and count < dataset.count:
        zoo_name = dataset.zoo_name
        dataset = dataset.take(count)
        dataset.zoo_name = zoo_name
    try:
        calibration.check_batch(dataset.make_batch(0), candidate,
                                where=f"{dataset.name} batch 0")
    except OnnxcompError as exc:
        raise UserError(f"candidate: {exc}") from None
    return dataset


# ---------------------------------------------------------------------------------------------
# validate


def validate(reference: Model | str | os.PathLike, candidate: Model | str | os.PathLike,
             data: Any = None, count: int | None = None, min_cosine: float | None = None,
             batch_dims: dict[str, int] | None = None,
             progress: Progress | Callable[[str], None] | None = default_progress,
             ours: bool = False) -> Report:
    """Run both models on the same data and measure how closely the candidate follows.

    ``data``: anything :func:`onnxcomp.calibration.resolve` accepts (default ``random:8``);
    ``count``: at most this many batches; ``min_cosine``: gate on every output's mean cosine
    (``report.fidelity["passed"]``); ``batch_dims``: sizes of named dynamic input dims for
    random inputs; ``progress``: where the progress goes (default: the process's
    :mod:`onnxcomp.progress`; a ``progress(message)`` callable; None: silent).

    Both models are the user's (``UserError`` naming the file ONNX Runtime refuses, or the data
    the reference cannot run on), unless ``ours``: the candidate is a model onnxcomp produced
    (``compress``), and its failing where the reference runs is ``InvalidOutput``.
    """
    if min_cosine is not None and not -1.0 <= float(min_cosine) <= 1.0:
        raise UserError(f"min_cosine must be within [-1, 1], got {min_cosine}")
    ref_model, ref_source, ref_label = _open(reference, "reference")
    cand_model, cand_source, cand_label = _open(candidate, "candidate")
    try:
        check_compatible(ref_model, cand_model)
    except UserError as exc:
        if ours:
            raise InvalidOutput(f"the compressed model's signature changed: {exc}") from exc
        raise
    dataset = resolve_data(data, ref_model, cand_model, count, batch_dims)
    ref_sess = _session(ref_source, f"reference {ref_label}")
    cand_sess = _session(cand_source, f"candidate {cand_label}", ours)
    flag = "--eval" if ours else "--data"
    output_names = [o.name for o in ref_sess.get_outputs()]

    metric = None
    if dataset.zoo_name:
        from onnxcomp import zoo

        metric = zoo.task_metric(dataset.zoo_name)
    kept_ref: list[dict[str, np.ndarray]] = []
    kept_cand: list[dict[str, np.ndarray]] = []

    stats = {name: OutputStats(name) for name in output_names}
    dual: tuple[str, str] | None = None
    rows: dict[str, list[np.ndarray]] = {}
    with as_progress(progress).task("validate", total=len(dataset), unit="batch") as task:
        for index, batch in enumerate(dataset):
            if index:
                calibration.check_batch(batch, ref_model, where=f"{dataset.name} batch {index}")
            where = f"{dataset.name} batch {index}"
            try:
                ref_out = runtime.run(ref_sess, batch, output_names)
            except MemoryError:
                raise
            except Exception as exc:  # ONNX Runtime's errors: the data does not fit the model
                raise UserError(f"the reference {ref_label} cannot run on {where} (check "
                                f"{flag}): {_first_line(exc)}") from exc
            try:
                cand_out = runtime.run(cand_sess, batch, output_names)
            except MemoryError:
                raise
            except Exception as exc:
                if ours:
                    raise InvalidOutput(f"the compressed model fails on {where}, where the "
                                        f"reference runs: {_first_line(exc)}") from exc
                raise UserError(f"the candidate {cand_label} cannot run on {where}, where the "
                                f"reference runs: {_first_line(exc)}") from exc
            if index == 0:
                dual = dual_encoder_outputs(ref_out)
                if dual:
                    rows = {f"{side}:{name}": [] for side in ("ref", "cand") for name in dual}
            for name in output_names:
                a, b = ref_out[name], cand_out[name]
                if a.shape != b.shape:
                    raise UserError(
                        f"output {name!r} has shape {list(a.shape)} in the reference but "
                        f"{list(b.shape)} in the candidate (batch {index})"
                    )
                stats[name].add(a, b, topk=not (dual and name in dual))
            if dual:
                for name in dual:
                    rows[f"ref:{name}"].append(np.asarray(ref_out[name], dtype=np.float32))
                    rows[f"cand:{name}"].append(np.asarray(cand_out[name], dtype=np.float32))
            if metric is not None:
                kept_ref.append(ref_out)
                kept_cand.append(cand_out)
            task.advance()

    outputs = {name: stats[name].summary(min_cosine) for name in output_names}
    fidelity: dict[str, Any] = {
        "reference": ref_label,
        "candidate": cand_label,
        "data": dataset.name,
        "batches": len(dataset),
        "min_cosine": min_cosine,
        "gate_metric": "cosine_mean",
        "outputs": outputs,
        "retrieval": None,
        "task": None,
    }
    if min_cosine is not None:  # no gate, no verdict (callers read a missing key as passed)
        fidelity["passed"] = all(o["passed"] for o in outputs.values())
    if dual:
        a, b = dual
        matrices = [np.concatenate(rows[f"{side}:{name}"]) for side in ("ref", "cand")
                    for name in (a, b)]
        retrieval = retrieval_metrics(*matrices)
        fidelity["retrieval"] = {"a": a, "b": b, **retrieval,
                                 "similarity": report_data.similarity_sample(*matrices)}
    if metric is not None:
        fidelity["task"] = _task_scores(metric, ref_model, cand_model, kept_ref, kept_cand,
                                        dataset)

    report = Report(command="validate")
    report.models = {role: {"path": label, "breakdown": report_data.model_breakdown(model)}
                     for role, label, model in (("reference", ref_label, ref_model),
                                                ("candidate", cand_label, cand_model))}
    report.fidelity = fidelity
    if dataset.name.startswith("random:"):
        report.notes.append("inputs are random draws from the input signature: fidelity on "
                            "real data (--data) can differ")
    return report


def _session(source: Model | str, who: str, ours: bool = False):
    try:
        return runtime.session(source)
    except UserError as exc:
        if ours:  # a model onnxcomp produced
            raise InvalidOutput(f"{who}: {exc}") from exc
        raise UserError(f"{who}: {exc}") from None


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def _task_scores(metric: Callable, ref_model: Model, cand_model: Model,
                 ref_outputs: list[dict[str, np.ndarray]],
                 cand_outputs: list[dict[str, np.ndarray]], dataset: Dataset
                 ) -> dict[str, Any] | None:
    labels = list(dataset.labels) if dataset.labels is not None else None
    ref_scores = metric(ref_model, ref_outputs, labels)
    cand_scores = metric(cand_model, cand_outputs, labels)
    if not ref_scores:
        return None
    from onnxcomp import zoo

    # Which examples the candidate gets differently (ppocr-rec: the lines it reads differently,
    # with their images), where the zoo model can say; for the report's pictures.
    changes = getattr(zoo.entry(dataset.zoo_name).implementation(), "task_changes", None)
    changed = changes(dataset.zoo_name, ref_model, cand_model, ref_outputs, cand_outputs,
                      labels, dataset.name) if changes is not None else None
    delta = {}
    for key, ref_value in ref_scores.items():
        cand_value = cand_scores.get(key)
        if isinstance(ref_value, (int, float)) and isinstance(cand_value, (int, float)):
            delta[key] = float(cand_value) - float(ref_value)
    task = {"name": dataset.zoo_name, "reference": dict(ref_scores),
            "candidate": dict(cand_scores), "delta": delta}
    if changed is not None:
        task["changed"] = changed
    return task
