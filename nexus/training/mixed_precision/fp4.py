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
from nexus.training.mixed_precision.mxfp8 import BLOCK_SIZES, MXLinearBase, MXSpec, _convert

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
        if self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {self.block_size!r}")
        for name in ("use_microscaling", "stochastic_rounding", "quantize_gradients"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

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

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        config: FP4Config | None = None,
        device=None,
        dtype=None,
    ) -> None:
        config = config if config is not None else FP4Config()
        if not isinstance(config, FP4Config):
            raise ValueError(f"config must be an FP4Config, got {type(config).__name__}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.config = config
        self.spec = config.spec


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
    config = config if config is not None else FP4Config()

    def make_layer(lin: nn.Linear) -> FP4Linear:
        return FP4Linear(lin.in_features, lin.out_features, bias=lin.bias is not None, config=config, device="meta")

    return _convert(model, make_layer, skip, filter_fn)
