"""FP4 (E2M1) linear layers: MXFP4 block scaling, stochastic rounding of gradients.

E2M1 holds {0, 0.5, 1, 1.5, 2, 3, 4, 6} with sign. With microscaling each block of ``block_size``
elements shares an E8M0 power-of-two scale (OCP MX v1.0, MXFP4); without it one float32 scale per
tensor (amax / 6). Weights and activations round to nearest; output gradients, whose rounding bias
would otherwise accumulate over steps, round stochastically (unbiased). GEMMs are emulated:
dequantize, fp32 matmul. See :mod:`nexus.training.mixed_precision.mxfp8` for the blocking rules.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

from torch import nn

from nexus.training.mixed_precision.fp8 import DEFAULT_SKIP
from nexus.training.mixed_precision.mxfp8 import MXLinearBase, MXSpec, _check_config, _convert

__all__ = ["FP4Config", "FP4Linear", "convert_to_fp4"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class FP4Config:
    """FP4 settings.

    use_microscaling: E8M0 scale per block of ``block_size`` (32 | 64) elements (MXFP4), else one
    float32 scale per tensor. stochastic_rounding: round output gradients stochastically.
    quantize_gradients: quantize output gradients to E2M1 in backward (else keep them fp32).
    Example: ``config = FP4Config(use_microscaling=True, block_size=32)``
             ``layer = FP4Linear(768, 3072, config=config)``
    """

    use_microscaling: bool = True
    block_size: int = 32
    stochastic_rounding: bool = True
    quantize_gradients: bool = True

    def __post_init__(self) -> None:
        _check_config(self, ("use_microscaling", "stochastic_rounding", "quantize_gradients"))

    @property
    def spec(self) -> MXSpec:
        return MXSpec(
            forward_elem="e2m1",
            backward_elem="e2m1",
            block_size=self.block_size if self.use_microscaling else None,
            gradient_rounding="stochastic" if self.stochastic_rounding else "nearest",
            quantize_gradients=self.quantize_gradients,
        )


class FP4Linear(MXLinearBase):
    """``nn.Linear`` with E2M1 weights, activations and gradients (fp32 master weights).

    x: [..., in_features] float -> [..., out_features] same dtype. ``pack_weights()`` stores two
    codes per byte plus scales (about 1/8 of the float32 bytes).
    Example: ``layer = FP4Linear(768, 3072, config=FP4Config(use_microscaling=True, block_size=32))``
             ``y = layer(torch.randn(4, 768))``
    """

    config_class = FP4Config


def convert_to_fp4(
    model: nn.Module,
    config: FP4Config | None = None,
    *,
    skip: Iterable[str] = DEFAULT_SKIP,
    filter_fn: Callable[[str, nn.Linear], bool] | None = None,
) -> nn.Module:
    """Swap ``nn.Linear`` layers for :class:`FP4Linear` in place, keeping the weight Parameters.

    Layers named in ``skip`` (the output head by default) or rejected by ``filter_fn(name, linear)`` stay.
    Example: ``model = convert_to_fp4(model, FP4Config())``
             ``isinstance(model.fc1, FP4Linear)``
    """
    return _convert(model, FP4Linear, config, skip, filter_fn)
