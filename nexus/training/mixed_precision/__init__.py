"""FP8 / MXFP8 / FP4 layers, mixed-precision configuration and gradient scaling."""
from nexus.training.mixed_precision.config import (
    PRECISIONS,
    MixedPrecisionConfig,
    apply_precision,
)
from nexus.training.mixed_precision.fp4 import FP4Config, FP4Linear, convert_to_fp4
from nexus.training.mixed_precision.fp8 import FP8Format, FP8Linear, convert_to_fp8, fp8_linear, quantize_fp8
from nexus.training.mixed_precision.grad_scaler import GradScaler
from nexus.training.mixed_precision.mxfp8 import (
    MXFP8Config,
    MXFP8Linear,
    MXSpec,
    convert_to_mxfp8,
    mx_linear,
    mx_quantize_dequantize,
)

__all__ = [
    "PRECISIONS",
    "FP4Config",
    "FP4Linear",
    "FP8Format",
    "FP8Linear",
    "GradScaler",
    "MXFP8Config",
    "MXFP8Linear",
    "MXSpec",
    "MixedPrecisionConfig",
    "apply_precision",
    "convert_to_fp4",
    "convert_to_fp8",
    "convert_to_mxfp8",
    "fp8_linear",
    "mx_linear",
    "mx_quantize_dequantize",
    "quantize_fp8",
]
