"""lowrank's configuration: one rank rule, where factoring pays, which layers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from onnxcomp.pipeline import option

DEFAULT_ENERGY = 0.9
# Per-layer error limit: see docs/lowrank.md ("Per-layer error limit") for the measurement.
DEFAULT_MAX_LAYER_ERROR = 0.2
SUPPORTED_OPS = ("MatMul", "Gemm", "Conv")
RANK_MODES = ("energy", "rank", "rank_ratio", "param_budget")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


@dataclass(frozen=True)
class Config:
    """At most one rank rule (``energy``, ``rank``, ``rank_ratio``, ``param_budget``); none
    given means ``energy`` 0.9, so ``--set lowrank.rank=32`` picks another rule."""

    energy: float | None = option(None, "kept spectral energy per layer, in (0, 1] (the rule "
                                        f"when none is given, at {DEFAULT_ENERGY})")
    rank: int | None = option(None, "the same rank for every layer")
    rank_ratio: float | None = option(None, "rank as a share of min(K, N), in (0, 1]")
    param_budget: float | None = option(None, "share of the factorable parameters to keep, in "
                                              "(0, 1]; ranks allocated greedily across layers")
    min_saving: float = option(0.1, "factor only where it saves at least this share of the "
                                    "layer's parameters, in [0, 1)")
    min_params: int = option(1024, "smaller weights are left alone (they don't pay for the "
                                   "extra node)")
    activation_aware: bool | None = option(None, "whiten by the calibration activations' "
                                                 "covariance (none: when data is present)")
    # The ridge keeps L^{-T} bounded in input directions the calibration data barely excites
    # (and so generalises beyond that data).
    damping: float = option(0.01, "ridge added to the covariance's eigenvalues, relative to "
                                  "their mean")
    max_layer_error: float | None = option(
        DEFAULT_MAX_LAYER_ERROR, "largest relative error of one layer's own output (on the "
        "calibration data; of its weight without data): a layer over it gets a higher rank, "
        "or is skipped when that rank saves nothing (none: no limit)")
    op_types: tuple[str, ...] = option(SUPPORTED_OPS, "ops to factor: MatMul, Gemm, Conv (1x1)")
    exclude: tuple[str, ...] = option((), "fnmatch patterns of node names left alone")

    def __post_init__(self) -> None:
        for name in ("op_types", "exclude"):  # a Python caller's single name or list
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, str) else tuple(value))
        chosen = [m for m in RANK_MODES if getattr(self, m) is not None]
        if len(chosen) > 1:
            raise ValueError(f"give one of energy, rank, rank_ratio, param_budget; "
                             f"got {', '.join(chosen)}")
        for name in ("energy", "rank_ratio", "param_budget"):
            value = getattr(self, name)
            if value is not None and (not _is_number(value) or not 0 < value <= 1):
                raise ValueError(f"{name} must be in (0, 1], got {value!r}")
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool)
                                      or self.rank < 1):
            raise ValueError(f"rank must be a positive integer, got {self.rank!r}")
        if not _is_number(self.min_saving) or not 0 <= self.min_saving < 1:
            raise ValueError(f"min_saving must be in [0, 1), got {self.min_saving!r}")
        if self.max_layer_error is not None and (not _is_number(self.max_layer_error)
                                                 or not 0 < self.max_layer_error <= 1):
            raise ValueError(f"max_layer_error must be in (0, 1] or none, "
                             f"got {self.max_layer_error!r}")
        for name in ("min_params", "damping"):
            value = getattr(self, name)
            if not _is_number(value) or value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if self.activation_aware not in (None, True, False):
            raise ValueError(f"activation_aware must be true/false, "
                             f"got {self.activation_aware!r}")
        bad = [op for op in self.op_types if op not in SUPPORTED_OPS]
        if bad or not self.op_types:
            raise ValueError(f"op_types must be among {', '.join(SUPPORTED_OPS)}, "
                             f"got {list(self.op_types)!r}")

    @property
    def mode(self) -> str:
        """The rank rule in force."""
        return next((m for m in RANK_MODES if getattr(self, m) is not None), "energy")

    @property
    def value(self) -> float | int:
        """The rule's value (``DEFAULT_ENERGY`` when no rule was given)."""
        value = getattr(self, self.mode)
        return DEFAULT_ENERGY if value is None else value

    @classmethod
    def from_short(cls, arg: str | None) -> Config:
        """``lowrank`` / ``lowrank:0.9`` (energy) / ``lowrank:rank=32`` / ``lowrank:rank_ratio=0.25``
        / ``lowrank:param_budget=0.5``."""
        if arg is None or not arg.strip():
            return cls()
        key, sep, value = arg.strip().partition("=")
        if not sep:
            key, value = "energy", key
        key = {"ratio": "rank_ratio", "budget": "param_budget"}.get(key.strip(), key.strip())
        if key not in RANK_MODES:
            raise ValueError(f"unknown option {key!r} in {arg!r}; use energy, rank, "
                             "rank_ratio or param_budget")
        try:
            number = int(value) if key == "rank" else float(value)
        except ValueError:
            raise ValueError(f"{key} needs a number, got {value.strip()!r}") from None
        return cls(**{key: number})


def needs_calibration(config: Config) -> str | bool:
    """Asked-for whitening needs data (``None`` only whitens when data is there)."""
    return "activation_aware = true" if config.activation_aware is True else False
