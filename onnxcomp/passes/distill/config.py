"""distill's configuration: the method (closed-form ``refit`` or ``kd`` training) and the
options of each."""

from __future__ import annotations

from dataclasses import dataclass

from onnxcomp.calibration import MAX_BATCHES
from onnxcomp.pipeline import option

NAME = "distill"


@dataclass(frozen=True)
class Config:
    method: str = option("refit", "refit: closed form per layer | kd: train on the teacher")
    ridge: float = option(1e-3, "refit: ridge λ, relative to trace(XᵀX)/K (0: least squares)")
    max_batches: int | None = option(None, "refit: calibration batches used (none: all)")
    bias_correction: bool = option(True, "refit: bias-correct layers not re-fitted (k×k, int8)")
    steps: int = option(300, "kd: optimizer steps")
    train_batches: int | None = option(None, "kd: batches to train on (none: the calibration "
                                             "data); a zoo generator draws this many, so "
                                             "earlier passes plan on --calib's few")
    train_data: str | None = option(None, "kd: data source to train on, as --calib takes it "
                                          "(a folder of .npz, ppocr-rec:train:4096); none: "
                                          "the calibration data")
    batch: int = option(16, "kd: samples per step, gradients accumulated (0: a data batch)")
    lr: float = option(1e-3, "kd: peak AdamW learning rate (warm-up, then cosine decay)")
    temperature: float = option(1.0, "kd: softmax temperature of the KL/contrastive losses")
    loss: str = option("auto", "kd: auto (by output kind) | kl | cosine | contrastive | mse")
    hint_tensors: tuple[str, ...] = option((), "kd: intermediate tensors matched by rel. MSE")
    max_minutes: float | None = option(None, "kd: stop training after this many minutes")
    seed: int = option(0, "kd: seed of the data order and of torch")
    checkpoint_dir: str | None = option(None, "kd: checkpoint folder (resumed from if it fits)")
    device: str = option("cpu", "kd: cpu | cuda")
    # On a CTC output the default 16-batch minimum cosine is coarse and three evaluations
    # without a gain stopped ppocr-rec QAT at 90 of 300 steps (docs/distill.md).
    eval_every: int = option(0, "kd: steps between evaluations (0: at each tenth of the "
                                   "budget, steps or max_minutes)")
    eval_batches: int = option(16, "kd: evaluation batches scored each time (held-out data)")
    patience: int = option(3, "kd: evaluations without a gain before the run stops")

    def __post_init__(self) -> None:
        losses = ("auto", "kl", "cosine", "contrastive", "mse")
        for ok, name, wanted in (
                (self.method in ("refit", "kd"), "method", "refit or kd"),
                (self.ridge >= 0, "ridge", ">= 0"), (self.batch >= 0, "batch", ">= 0"),
                (self.max_batches is None or self.max_batches > 0, "max_batches", "positive"),
                (self.train_batches is None or 0 < self.train_batches <= MAX_BATCHES,
                 "train_batches", f"in 1..{MAX_BATCHES}"),
                (self.train_data is None or bool(self.train_data.strip()), "train_data",
                 "a data source"),
                (self.steps > 0, "steps", "positive"), (self.lr > 0, "lr", "positive"),
                (self.temperature > 0, "temperature", "> 0"),
                (self.loss in losses, "loss", " | ".join(losses)),
                (self.max_minutes is None or self.max_minutes > 0, "max_minutes", "positive"),
                (self.device in ("cpu", "cuda"), "device", "cpu or cuda"),
                (self.eval_every >= 0, "eval_every", ">= 0"),
                (self.eval_batches > 0, "eval_batches", "positive"),
                (self.patience > 0, "patience", "positive")):
            if not ok:
                raise ValueError(f"{name} must be {wanted}, got {getattr(self, name)!r}")

    @classmethod
    def from_short(cls, arg: str | None) -> Config:
        if arg in (None, "", "kd", "refit"):
            return cls(method=arg or "refit")
        try:
            return cls(ridge=float(arg))
        except ValueError:
            raise ValueError(f"distill takes kd, refit or a ridge value, got {arg!r}") from None
