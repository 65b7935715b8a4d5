"""prune's configuration: how much of each group to cut, ranked how."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from onnxcomp.pipeline import option

IMPORTANCE = ("auto", "l1", "l2", "activation")
RANKING = ("local", "global")
SCOPES = ("heads", "ffn", "conv")


def _check_ratio(name: str, value: Any) -> None:
    if value is None and name != "ratio":
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {value!r}")


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


@dataclass(frozen=True)
class Config:
    """``ratio`` of each group's channels is removed; ``heads``/``ffn``/``conv`` override it per
    kind of group. Validated here (``ValueError`` naming the bad value)."""

    ratio: float = option(0.3, "share of each group's channels to remove, in [0, 1)")
    heads: float | None = option(None, "ratio for attention-head groups (none: ratio)")
    ffn: float | None = option(None, "ratio for FFN-neuron groups (none: ratio)")
    conv: float | None = option(None, "ratio for conv-channel groups (none: ratio)")
    importance: str = option("auto", "channel scores: auto (activation with calibration data, "
                                     "else l2), l1, l2, activation (Wanda-style, needs data)")
    ranking: str = option("local", "local: ratio of every group; global: ratio of each scope, "
                                   "channels ranked across its groups")
    min_channels: int = option(1, "channels every group keeps at least")
    multiple: int = option(1, "round each group's kept count up to a multiple (8 suits ONNX "
                              "Runtime's blocked NCHWc conv kernels); heads are not rounded")
    sparsity: float = option(0.0, "unstructured magnitude pruning of the remaining Conv/MatMul/"
                                  "Gemm weights (zeros, no speed-up; 0 = off)")

    def __post_init__(self) -> None:
        for name in ("ratio", *SCOPES, "sparsity"):
            _check_ratio(name, getattr(self, name))
        if self.importance not in IMPORTANCE:
            raise ValueError(f"importance must be one of {IMPORTANCE}, got {self.importance!r}")
        if self.ranking not in RANKING:
            raise ValueError(f"ranking must be one of {RANKING}, got {self.ranking!r}")
        _check_count("min_channels", self.min_channels)
        _check_count("multiple", self.multiple)

    @classmethod
    def from_short(cls, arg: str | None) -> Config:
        """``prune`` / ``prune:0.3`` (the ratio)."""
        if arg in (None, ""):
            return cls()
        try:
            ratio = float(arg)
        except ValueError:
            raise ValueError(f"prune takes a ratio such as 0.3, got {arg!r}") from None
        return cls(ratio=ratio)

    def ratio_for(self, kind: str) -> float:
        scoped = getattr(self, kind) if kind in SCOPES else None
        return self.ratio if scoped is None else scoped


def needs_calibration(config: Config) -> str | bool:
    """Activation importance reads calibration activations (``auto`` only uses them if given)."""
    return "importance = activation" if config.importance == "activation" else False
