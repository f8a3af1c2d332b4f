"""How a model holds its weights in memory (its resident formats), decided once per model.

`weights: native` keeps the checkpoint's precision: FP8 linears as e4m3 + 128x128 block scales, routed experts
as packed MXFP4 (or FP8) + scales, BF16 tensors in bfloat16 (computed in the model dtype). `dequantized` (the
reference, and what unquantized checkpoints load as) holds every weight in the model dtype.
Norm weights and the F32 tensors (mHC, attention sinks, ape, router bias) are float32 in both modes.

Modules read the formats while they are built: `Transformer(..., weights=formats)` builds inside
`building(formats)`, and `Linear`, `Embedding`, `Gate` and `RoutedExperts` call `current()`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch

from engine.model.config import WEIGHT_MODES  # noqa: F401  (re-exported; torch-free home)

SCALE_DTYPES = {"F8_E8M0": torch.float8_e8m0fnu, "F32": torch.float32}


@dataclass(frozen=True)
class WeightFormats:
    """linears: the checkpoint's FP8 linears, "dense" (model dtype) or "fp8". experts: routed experts, "dense",
    "fp4" or "fp8". bf16: keep the checkpoint's BF16 tensors in bfloat16. *_scale: safetensors dtype of the
    scales ("F8_E8M0" or "F32")."""

    linears: str = "dense"
    experts: str = "dense"
    bf16: bool = False
    linear_scale: str = "F8_E8M0"
    expert_scale: str = "F8_E8M0"

    def __post_init__(self) -> None:
        if self.linears not in ("dense", "fp8"):
            raise ValueError(f"linears format {self.linears!r}: must be 'dense' or 'fp8'")
        if self.experts not in ("dense", "fp4", "fp8"):
            raise ValueError(f"experts format {self.experts!r}: must be 'dense', 'fp4' or 'fp8'")
        for key in ("linear_scale", "expert_scale"):
            if getattr(self, key) not in SCALE_DTYPES:
                raise ValueError(f"{key} {getattr(self, key)!r}: must be one of {sorted(SCALE_DTYPES)}")

    @property
    def is_dense(self) -> bool:
        return self.linears == "dense" and self.experts == "dense" and not self.bf16

    @classmethod
    def native_for(cls, expert_dtype: str, fp8_linears: bool = True) -> WeightFormats:
        """The native formats of a quantized checkpoint of this kind (E8M0 scales, as published)."""
        return cls(linears="fp8" if fp8_linears else "dense", experts=expert_dtype, bf16=True)


DENSE = WeightFormats()
_current: ContextVar[WeightFormats] = ContextVar("megaserve_weight_formats", default=DENSE)


def current() -> WeightFormats:
    """The formats of the model being built (DENSE outside `building`)."""
    return _current.get()


@contextlib.contextmanager
def building(formats: WeightFormats) -> Iterator[None]:
    token = _current.set(formats)
    try:
        yield
    finally:
        _current.reset(token)


def check_mode(mode: str) -> str:
    if mode not in WEIGHT_MODES:
        raise ValueError(f"weights mode {mode!r}: must be one of {WEIGHT_MODES}")
    return mode
