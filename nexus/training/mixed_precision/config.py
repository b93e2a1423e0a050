"""Mixed-precision settings: autocast dtype and loss scaling, and ``apply_precision`` for the trainer."""
from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterable

import torch
from torch import nn

from nexus.training.mixed_precision.fp4 import FP4Config, convert_to_fp4
from nexus.training.mixed_precision.fp8 import DEFAULT_SKIP, FP8Format, convert_to_fp8
from nexus.training.mixed_precision.mxfp8 import MXFP8Config, convert_to_mxfp8

__all__ = ["AUTOCAST_DTYPES", "LOSS_SCALING", "PRECISIONS", "MixedPrecisionConfig", "apply_precision"]

AUTOCAST_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
LOSS_SCALING = ("auto", "dynamic", "static", "none")
PRECISIONS = ("fp32", "bf16", "fp16", "fp8", "mxfp8", "fp4")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MixedPrecisionConfig:
    """Autocast compute dtype and loss-scaling policy.

    dtype: "fp32" | "bf16" | "fp16". loss_scaling: "auto" (dynamic for fp16, none otherwise),
    "dynamic", "static" (fixed ``init_scale``, e.g. 128.0) or "none". The growth/backoff settings
    are those of ``torch.amp.GradScaler``.
    Example: ``cfg = MixedPrecisionConfig(dtype="fp16", loss_scaling="static", init_scale=128.0)``
             ``with cfg.autocast("cpu"): y = model(x)``
    """

    dtype: str = "fp32"
    loss_scaling: str = "auto"
    init_scale: float = 2.0**16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000

    def __post_init__(self) -> None:
        if self.dtype not in AUTOCAST_DTYPES:
            raise ValueError(f"dtype must be one of {tuple(AUTOCAST_DTYPES)}, got {self.dtype!r}")
        if self.loss_scaling not in LOSS_SCALING:
            raise ValueError(f"loss_scaling must be one of {LOSS_SCALING}, got {self.loss_scaling!r}")
        if not self.init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale}")
        if not self.growth_factor > 1.0:
            raise ValueError(f"growth_factor must be > 1, got {self.growth_factor}")
        if not 0.0 < self.backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {self.backoff_factor}")
        if self.growth_interval < 1:
            raise ValueError(f"growth_interval must be >= 1, got {self.growth_interval}")

    @property
    def torch_dtype(self) -> torch.dtype:
        return AUTOCAST_DTYPES[self.dtype]

    @property
    def resolved_loss_scaling(self) -> str:
        """"dynamic", "static" or "none" ("auto" resolved by dtype)."""
        if self.loss_scaling == "auto":
            return "dynamic" if self.dtype == "fp16" else "none"
        return self.loss_scaling

    def autocast(self, device_type: str = "cuda"):
        """``torch.autocast`` for this dtype; a no-op context for fp32."""
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=device_type, dtype=self.torch_dtype)


def apply_precision(model: nn.Module, precision: str, *, skip: Iterable[str] = DEFAULT_SKIP) -> nn.Module:
    """Prepare ``model`` for training at ``precision``; returns it (Linear layers swapped in place).

    "fp8" -> FP8Linear (HYBRID, delayed scaling), "mxfp8" -> MXFP8Linear, "fp4" -> FP4Linear, each
    skipping the output head (modules named in ``skip``: lm_head/output/head). "fp32"/"bf16"/"fp16"
    leave the model alone (use ``MixedPrecisionConfig(dtype=...).autocast()`` around the forward).
    Example: ``model = apply_precision(model, "mxfp8")``
             ``apply_precision(model, "bf16") is model``
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "fp8":
        return convert_to_fp8(model, fp8_format=FP8Format.HYBRID, skip=skip)
    if precision == "mxfp8":
        return convert_to_mxfp8(model, MXFP8Config(), skip=skip)
    if precision == "fp4":
        return convert_to_fp4(model, FP4Config(), skip=skip)
    return model
