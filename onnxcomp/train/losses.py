"""Distillation losses, chosen from what each teacher output looks like (overridable).

- ``kl``: probabilities (last axis in [0, 1] summing to 1, e.g. PP-OCR's CTC softmax) or logits
  (an output named like ``logits``): ``T² · KL(softmax(t/T) ‖ softmax(s/T))`` along the last
  axis, averaged over positions; probabilities enter as their logarithm (clamped at 1e-12).
- ``cosine``: embeddings and anything else: ``1 - cos(s, t)`` per sample plus the squared error
  relative to the teacher's energy, ``mean((s - t)²) / mean(t²)`` (so the loss has no units).
- ``mse``: that relative squared error alone.
- ``contrastive``: a dual encoder (two float [B, D] outputs of one width, image side first, as
  validation detects it): the image-text similarity matrices ``S = â b̂ᵀ / τ`` (τ = 0.07, CLIP's
  initial temperature, then divided by ``temperature``) of teacher and student are matched by
  KL along rows and along columns, plus ``cosine`` on each embedding and ``1 - cos`` of each
  embedding less the teacher's batch mean (the part that tells samples apart, where near-tied
  retrieval is decided), so cross-modal alignment is what training preserves. Needs batches of
  two or more pairs.
- Hint losses on named intermediate tensors: the relative squared error, one term each.

Each term is scale-free and about 0..1, so terms add without weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from onnxcomp.errors import UserError
from onnxcomp.measure.compare import dual_encoder_outputs

LOSSES = ("auto", "kl", "cosine", "contrastive", "mse")
CLIP_TAU = 0.07


@dataclass(frozen=True)
class Term:
    kind: str                  # kl | cosine | mse | contrastive
    outputs: tuple[str, ...]   # one output, or (image side, text side) for contrastive
    probabilities: bool = False

    def describe(self) -> str:
        what = "KL on log-probabilities" if self.probabilities and self.kind == "kl" else self.kind
        return f"{'/'.join(self.outputs)}: {what}"


def looks_like_probabilities(array: np.ndarray) -> bool:
    if array.ndim < 2 or array.shape[-1] < 2 or not np.issubdtype(array.dtype, np.floating):
        return False
    if array.min() < -1e-6 or array.max() > 1 + 1e-6:
        return False
    return bool(np.allclose(array.sum(axis=-1), 1.0, atol=1e-3))


def dual_encoder(outputs: Mapping[str, np.ndarray]) -> tuple[str, str] | None:
    """(image side, text side): the test validate uses, so training and validation agree."""
    return dual_encoder_outputs(dict(outputs))


def choose(outputs: Mapping[str, np.ndarray], loss: str = "auto") -> list[Term]:
    """The loss terms for the teacher's outputs (one batch of them); integer outputs are left
    out. ``loss`` other than ``auto`` applies that kind to every float output."""
    if loss not in LOSSES:
        raise UserError(f"loss must be one of {', '.join(LOSSES)}, got {loss!r}")
    floats = {n: a for n, a in outputs.items() if np.issubdtype(a.dtype, np.floating)}
    if not floats:
        raise UserError("the model has no float output to distill")
    pair = dual_encoder(floats)
    if loss == "contrastive" or (loss == "auto" and pair):
        if not pair:
            raise UserError("loss 'contrastive' needs a dual encoder: two float [batch, width] "
                            f"outputs of one width; this model has {', '.join(floats)}")
        return [Term("contrastive", pair)]
    terms = []
    for name, array in floats.items():
        probabilities = looks_like_probabilities(array)
        if loss == "auto":
            kind = "kl" if probabilities or "logit" in name.lower() else "cosine"
        else:
            kind = loss
        if kind == "kl" and (array.ndim < 1 or array.shape[-1] < 2):
            raise UserError(f"loss 'kl' needs class scores along the last axis; output {name!r} "
                            f"has shape {list(array.shape)}")
        terms.append(Term(kind, (name,), probabilities))
    return terms


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    energy = teacher.pow(2).mean().clamp_min(1e-12)
    return (student - teacher).pow(2).mean() / energy


def cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    s = student.reshape(student.shape[0], -1) if student.dim() >= 2 else student.reshape(1, -1)
    t = teacher.reshape(s.shape)
    return (1 - F.cosine_similarity(s, t, dim=1, eps=1e-12)).mean() + relative_mse(student, teacher)


def kl_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float,
            probabilities: bool) -> torch.Tensor:
    if probabilities:
        student, teacher = student.clamp_min(1e-12).log(), teacher.clamp_min(1e-12).log()
    classes = teacher.shape[-1]
    t = F.log_softmax(teacher.reshape(-1, classes) / temperature, dim=-1)
    s = F.log_softmax(student.reshape(-1, classes) / temperature, dim=-1)
    return (t.exp() * (t - s)).sum(dim=-1).mean() * temperature ** 2


def centered_cosine_loss(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - cos`` per sample of the embeddings less the teacher's batch mean: the part of each
    embedding that tells samples apart. A random-weight CLIP's embeddings share one direction
    (image-image cosine 0.84), so a text cosine of 0.99 can still leave the near-tied
    similarities retrieval turns on (0.03 apart) mostly unmatched; this term sees that error at
    its own scale, densely (every width, every sample), where the batch's similarity matrix
    gives a few noisy numbers."""
    mean = teacher.detach().mean(dim=0, keepdim=True)
    return (1 - F.cosine_similarity(student - mean, teacher - mean, dim=1, eps=1e-12)).mean()


def contrastive_loss(student: tuple[torch.Tensor, torch.Tensor],
                     teacher: tuple[torch.Tensor, torch.Tensor], temperature: float
                     ) -> torch.Tensor:
    """KL of the similarity softmaxes along rows and columns (τ = 0.07), ``cosine`` on each
    embedding and :func:`centered_cosine_loss` on each."""
    def similarity(a, b):
        return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T / CLIP_TAU

    s, t = similarity(*student), similarity(*teacher)
    rows = kl_loss(s, t, temperature, probabilities=False)
    cols = kl_loss(s.T, t.T, temperature, probabilities=False)
    embeddings = sum(cosine_loss(a, b) + centered_cosine_loss(a, b)
                     for a, b in zip(student, teacher, strict=True))
    return rows + cols + embeddings


def total(terms: list[Term], student: Mapping[str, torch.Tensor],
          teacher: Mapping[str, torch.Tensor], temperature: float,
          hints: tuple[str, ...] = ()) -> torch.Tensor:
    """The sum of the output terms and one relative-MSE term per hint tensor."""
    parts = []
    for term in terms:
        s = [student[n].float() for n in term.outputs]
        t = [teacher[n].float() for n in term.outputs]
        if term.kind == "contrastive":
            parts.append(contrastive_loss((s[0], s[1]), (t[0], t[1]), temperature))
        elif term.kind == "kl":
            parts.append(kl_loss(s[0], t[0], temperature, term.probabilities))
        elif term.kind == "cosine":
            parts.append(cosine_loss(s[0], t[0]))
        else:
            parts.append(relative_mse(s[0], t[0]))
    for name in hints:
        if student[name].shape != teacher[name].shape:
            raise UserError(f"hint tensor {name!r} has shape {list(student[name].shape)} in the "
                            f"student, {list(teacher[name].shape)} in the teacher")
        parts.append(relative_mse(student[name].float(), teacher[name].float()))
    return torch.stack(parts).sum()
