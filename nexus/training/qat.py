"""Quantization-aware training (QAT) in plain PyTorch: observers, fake quantization, int8 conversion.

Fake quantization rounds a tensor to an integer grid and back, ``fq(x) = (clamp(round(x / s) + z,
qmin, qmax) - z) * s``, so the model trains against the rounding it will see when deployed; the
gradient passes straight through inside the grid and is zero where the value was clipped (the
"clipped straight-through estimator" of Bengio et al., 2013; Jacob et al., 2018). Observers track
the min/max that set the scale ``s`` and zero point ``z``, with the formulas of
``torch.ao.quantization`` (so either can check the other). ``prepare_qat`` swaps ``nn.Linear`` for
:class:`QATLinear` (fake-quantized weight and input); ``convert`` swaps those for
:class:`QuantizedLinear` (int8 weight codes + scales, int8 input codes, integer GEMM) whose outputs
equal the fake-quantized model's up to fp32 summation order.
"""
from __future__ import annotations

import dataclasses
import enum

import torch
from torch import nn

__all__ = [
    "FakeQuantize",
    "MinMaxObserver",
    "MovingAverageMinMaxObserver",
    "ObserverType",
    "QATConfig",
    "QATLinear",
    "QuantizationScheme",
    "QuantizedLinear",
    "calculate_qparams",
    "convert",
    "fake_quantize",
    "prepare_qat",
    "quant_range",
]

_EPS = torch.finfo(torch.float32).eps


class _NamedEnum(enum.Enum):
    """Also built from a member's name or alias as a string (``"MinMaxObserver"``, ``"MIN_MAX"``)."""

    @classmethod
    def _missing_(cls, value):
        return cls.__members__.get(value) if isinstance(value, str) else None


class ObserverType(_NamedEnum):
    """How an observer turns the values it sees into a min/max range. Seed 003's names are aliases:
    ``ObserverType.MinMaxObserver is ObserverType.MIN_MAX``."""

    MIN_MAX = "min_max"
    MOVING_AVERAGE_MIN_MAX = "moving_average_min_max"
    MinMaxObserver = "min_max"
    MovingAverageMinMaxObserver = "moving_average_min_max"


class QuantizationScheme(_NamedEnum):
    """One scale for the whole weight, or one per output channel (``PerTensor`` / ``PerChannel`` aliases)."""

    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PerTensor = "per_tensor"
    PerChannel = "per_channel"


def quant_range(bits: int) -> tuple[int, int]:
    """Signed integer range for ``bits`` (2..8): e.g. 8 -> (-128, 127)."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def calculate_qparams(
    min_val: torch.Tensor, max_val: torch.Tensor, *, qmin: int, qmax: int, symmetric: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (float32) and zero point (int32) for the range [min_val, max_val], which always includes 0.

    min_val, max_val: [] or [C] float; returns tensors of the same shape.
    Example: ``s, z = calculate_qparams(torch.tensor(-1.0), torch.tensor(3.0), qmin=-128, qmax=127, symmetric=False)``
             ``s == 4 / 255``
    """
    min_neg = torch.minimum(min_val, torch.zeros_like(min_val)).float()
    max_pos = torch.maximum(max_val, torch.zeros_like(max_val)).float()
    if symmetric:
        scale = torch.maximum(-min_neg, max_pos) / ((qmax - qmin) / 2)
        scale = torch.clamp(scale, min=_EPS)
        zero_point = torch.zeros_like(scale, dtype=torch.int32)
    else:
        scale = torch.clamp((max_pos - min_neg) / float(qmax - qmin), min=_EPS)
        zero_point = (qmin - torch.round(min_neg / scale)).clamp(qmin, qmax).to(torch.int32)
    return scale, zero_point


def _broadcast(t: torch.Tensor, ndim: int, axis: int | None) -> torch.Tensor:
    if axis is None or t.dim() == 0:
        return t
    shape = [1] * ndim
    shape[axis] = -1
    return t.reshape(shape)


def _quantize_codes(x, scale, zero_point, qmin, qmax, axis):
    """Unclamped integer-valued codes round(x / s) + z as float32 (the torch.ao rounding: x * (1/s), half to even)."""
    inv = _broadcast(1.0 / scale.float(), x.dim(), axis)
    return torch.round(x.float() * inv) + _broadcast(zero_point.float(), x.dim(), axis)


class _FakeQuantizeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, axis):
        q = _quantize_codes(x, scale, zero_point, qmin, qmax, axis)
        mask = (q >= qmin) & (q <= qmax)
        zp = _broadcast(zero_point.float(), x.dim(), axis)
        out = (q.clamp(qmin, qmax) - zp) * _broadcast(scale.float(), x.dim(), axis)
        ctx.save_for_backward(mask)
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        return grad * mask, None, None, None, None, None


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    qmin: int,
    qmax: int,
    axis: int | None = None,
) -> torch.Tensor:
    """Quantize-dequantize ``x`` on the grid (scale, zero_point); clipped straight-through gradient.

    x: any shape, float; scale/zero_point: [] (per tensor) or [x.shape[axis]] (per channel).
    Example: ``y = fake_quantize(x, torch.tensor(0.1), torch.tensor(0), -128, 127)``
             ``((y / 0.1).round() == y / 0.1).all()``
    """
    return _FakeQuantizeFunction.apply(x, scale, zero_point, qmin, qmax, axis)


class MinMaxObserver(nn.Module):
    """Running min and max of everything observed (``torch.ao.quantization.MinMaxObserver``), per tensor
    or per channel along ``ch_axis``, turned into qparams by :func:`calculate_qparams`.

    Example: ``obs = MinMaxObserver(bits=8, symmetric=False); obs(torch.randn(16, 8))``
             ``scale, zero_point = obs.calculate_qparams()``
    """

    def __init__(self, *, bits: int = 8, symmetric: bool = True, per_channel: bool = False, ch_axis: int = 0) -> None:
        super().__init__()
        self.qmin, self.qmax = quant_range(bits)
        self.bits, self.symmetric, self.per_channel, self.ch_axis = bits, symmetric, per_channel, ch_axis
        self.register_buffer("min_val", torch.empty(0))
        self.register_buffer("max_val", torch.empty(0))

    @property
    def initialized(self) -> bool:
        return self.min_val.numel() > 0

    def _current(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = x.detach().float()
        if not self.per_channel:
            return torch.aminmax(x)
        flat = x.movedim(self.ch_axis, 0).reshape(x.shape[self.ch_axis], -1)
        return torch.aminmax(flat, dim=1)

    def _combine(self, cur_min: torch.Tensor, cur_max: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.minimum(self.min_val, cur_min), torch.maximum(self.max_val, cur_max)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record ``x``'s range; returns ``x`` unchanged."""
        if x.numel() == 0:
            return x
        cur_min, cur_max = self._current(x)
        if self.initialized:
            cur_min, cur_max = self._combine(cur_min, cur_max)
        self.min_val, self.max_val = cur_min.clone(), cur_max.clone()
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale float32, zero_point int32), shape [] or [C]; unit scale before any observation."""
        if not self.initialized:
            return torch.tensor(1.0), torch.tensor(0, dtype=torch.int32)
        return calculate_qparams(self.min_val, self.max_val, qmin=self.qmin, qmax=self.qmax, symmetric=self.symmetric)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Ranges start empty and take their shape on first use; adopt the saved shape.
        for name in ("min_val", "max_val"):
            if prefix + name in state_dict:
                here = getattr(self, name).device  # the module's device, not the checkpoint's
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=here))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, symmetric={self.symmetric}, per_channel={self.per_channel}"


class MovingAverageMinMaxObserver(MinMaxObserver):
    """Exponential moving average of each batch's min and max (first batch taken as is).

    Example: ``obs = MovingAverageMinMaxObserver(averaging_constant=0.01, per_channel=True)``
             ``obs(torch.randn(16, 8)); scale, zero_point = obs.calculate_qparams()  # [16]``
    """

    def __init__(self, *, averaging_constant: float = 0.01, **kwargs) -> None:
        if not 0.0 < averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {averaging_constant}")
        super().__init__(**kwargs)
        self.averaging_constant = averaging_constant

    def _combine(self, cur_min, cur_max):
        c = self.averaging_constant
        return self.min_val + c * (cur_min - self.min_val), self.max_val + c * (cur_max - self.max_val)


class FakeQuantize(nn.Module):
    """Observer + fake quantization: in training mode records the input's range, then fake-quantizes.

    ``fake_quant_enabled=False`` only observes (calibration). In eval mode the range is frozen.
    Example: ``fq = FakeQuantize(MinMaxObserver(symmetric=True))``
             ``y = fq(torch.randn(4, 8))  # same shape, on the int8 grid``
    """

    def __init__(self, observer: MinMaxObserver, *, fake_quant_enabled: bool = True) -> None:
        super().__init__()
        self.observer = observer
        self.fake_quant_enabled = fake_quant_enabled
        self.observer_enabled = True

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.observer.calculate_qparams()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.observer_enabled:
            self.observer(x)
        if not self.fake_quant_enabled:
            return x
        scale, zero_point = self.qparams()
        axis = self.observer.ch_axis if self.observer.per_channel else None
        return fake_quantize(x, scale.to(x.device), zero_point.to(x.device), self.observer.qmin, self.observer.qmax, axis)


@dataclasses.dataclass(frozen=True, kw_only=True)
class QATConfig:
    """Quantization-aware training settings.

    observer_type: range tracking for weights and inputs. quantization_scheme: weight scales per
    tensor or per output channel (inputs are always per tensor). fake_quantize: False only observes
    (the forward stays float) so that ``convert`` can calibrate without training against rounding.
    Bits in 2..8 (codes stored as int8). skip: Linear names (full or last component) left float.
    Example: ``cfg = QATConfig(observer_type=ObserverType.MIN_MAX, quantization_scheme=QuantizationScheme.PER_CHANNEL)``
             ``model = prepare_qat(model, cfg)``
    """

    observer_type: ObserverType = ObserverType.MOVING_AVERAGE_MIN_MAX
    quantization_scheme: QuantizationScheme = QuantizationScheme.PER_CHANNEL
    fake_quantize: bool = True
    weight_bits: int = 8
    activation_bits: int = 8
    weight_symmetric: bool = True
    activation_symmetric: bool = False
    averaging_constant: float = 0.01
    skip: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, kind in (("observer_type", ObserverType), ("quantization_scheme", QuantizationScheme)):
            value = getattr(self, name)
            try:
                object.__setattr__(self, name, kind(value))  # accepts the enum or its string value
            except ValueError:
                raise ValueError(f"{name} must be one of {[k.value for k in kind]}, got {value!r}") from None
        for name in ("weight_bits", "activation_bits"):
            bits = getattr(self, name)
            if not isinstance(bits, int) or not 2 <= bits <= 8:
                raise ValueError(f"{name} must be an int in 2..8, got {bits!r}")
        for name in ("fake_quantize", "weight_symmetric", "activation_symmetric"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if not 0.0 < self.averaging_constant <= 1.0:
            raise ValueError(f"averaging_constant must be in (0, 1], got {self.averaging_constant}")
        object.__setattr__(self, "skip", tuple(self.skip))

    def make_observer(self, *, weight: bool) -> MinMaxObserver:
        kwargs = dict(
            bits=self.weight_bits if weight else self.activation_bits,
            symmetric=self.weight_symmetric if weight else self.activation_symmetric,
            per_channel=weight and self.quantization_scheme is QuantizationScheme.PER_CHANNEL,
            ch_axis=0,
        )
        if self.observer_type is ObserverType.MIN_MAX:
            return MinMaxObserver(**kwargs)
        return MovingAverageMinMaxObserver(averaging_constant=self.averaging_constant, **kwargs)


class QATLinear(nn.Linear):
    """``nn.Linear`` computing ``fq(x) @ fq(W)^T + b`` with observed, fake-quantized input and weight.

    x: [..., in_features] float -> [..., out_features].
    Example: ``layer = QATLinear(64, 32, config=QATConfig())``
             ``y = layer(torch.randn(8, 64))``
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, config: QATConfig,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.config = config
        self.weight_fake_quant = FakeQuantize(config.make_observer(weight=True), fake_quant_enabled=config.fake_quantize)
        self.input_fake_quant = FakeQuantize(config.make_observer(weight=False), fake_quant_enabled=config.fake_quantize)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(self.input_fake_quant(x), self.weight_fake_quant(self.weight), self.bias)


def _int8_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Exact int32 a @ b for int8 a [M, K], b [K, N]."""
    m, k = a.shape
    n = b.shape[1]
    if m == 0 or n == 0 or k == 0:
        return torch.zeros(m, n, dtype=torch.int32, device=a.device)
    if a.device.type == "cpu" or (a.device.type == "cuda" and m > 16 and k % 8 == 0 and n % 8 == 0):
        return torch._int_mm(a, b)
    # float64 holds every partial sum (< 2**53) exactly.
    return (a.double() @ b.double()).to(torch.int32)


class QuantizedLinear(nn.Module):
    """Inference linear on int8 codes: quantize x with the frozen input qparams, integer GEMM, rescale.

    Buffers: weight_int8 [N, K] int8, weight_scale / weight_zero_point [] or [N], input_scale /
    input_zero_point [], bias [N] float32 or None. x: [..., K] float -> [..., N] float32.
    Example: ``qlin = QuantizedLinear.from_qat(qat_linear)``
             ``y = qlin(torch.randn(8, qat_linear.in_features))``
    """

    def __init__(self, weight_int8, weight_scale, weight_zero_point, input_scale, input_zero_point, bias,
                 input_qrange: tuple[int, int]) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_int8.shape
        self.input_qmin, self.input_qmax = input_qrange
        self.register_buffer("weight_int8", weight_int8)
        self.register_buffer("weight_scale", weight_scale.float())
        self.register_buffer("weight_zero_point", weight_zero_point.to(torch.int32))
        self.register_buffer("input_scale", input_scale.float())
        self.register_buffer("input_zero_point", input_zero_point.to(torch.int32))
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())

    @classmethod
    @torch.no_grad()
    def from_qat(cls, layer: QATLinear) -> QuantizedLinear:
        """Freeze a trained QATLinear: its weight becomes int8 codes on its observed grid."""
        wfq = layer.weight_fake_quant
        w_scale, w_zp = wfq.qparams()
        obs = wfq.observer
        axis = 0 if obs.per_channel else None
        codes = _quantize_codes(layer.weight, w_scale, w_zp, obs.qmin, obs.qmax, axis).clamp(obs.qmin, obs.qmax)
        x_scale, x_zp = layer.input_fake_quant.qparams()
        iobs = layer.input_fake_quant.observer
        return cls(codes.to(torch.int8), w_scale, w_zp, x_scale, x_zp, layer.bias, (iobs.qmin, iobs.qmax))

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """int8 codes of ``x`` on the input grid, same shape."""
        q = _quantize_codes(x, self.input_scale, self.input_zero_point, self.input_qmin, self.input_qmax, None)
        return q.clamp(self.input_qmin, self.input_qmax).to(torch.int8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        qx = self.quantize_input(x.reshape(-1, self.in_features))
        qw = self.weight_int8
        zx, zw = self.input_zero_point, self.weight_zero_point
        # sum_k (qx - zx)(qw - zw) expanded so that the GEMM itself stays int8 x int8 -> int32.
        acc = _int8_matmul(qx, qw.t())
        acc = acc - zx * qw.sum(1, dtype=torch.int32) - zw * qx.sum(1, dtype=torch.int32, keepdim=True)
        acc = acc + self.in_features * zx * zw
        y = acc.float() * (self.input_scale * self.weight_scale)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def _swap(model: nn.Module, kind: type, make, skip: tuple[str, ...] = ()) -> nn.Module:
    targets = [
        (name, mod) for name, mod in model.named_modules()
        if type(mod) is kind and name and not any(s in (name, name.rsplit(".", 1)[-1]) for s in skip)
    ]
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(mod))
    return model


def prepare_qat(model: nn.Module, config: QATConfig | None = None) -> nn.Module:
    """Swap every ``nn.Linear`` (except ``config.skip``) for :class:`QATLinear` in place; returns model.

    The new layers share the original weight and bias Parameters, so existing optimizers keep working.
    Example: ``model = prepare_qat(model, QATConfig(observer_type=ObserverType.MIN_MAX))``
             ``loss = model(x).sum(); loss.backward()``
    """
    config = config if config is not None else QATConfig()
    if not isinstance(config, QATConfig):
        raise ValueError(f"config must be a QATConfig, got {type(config).__name__}")

    def make(lin: nn.Linear) -> QATLinear:
        new = QATLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, config=config, device="meta")
        new.to_empty(device=lin.weight.device)
        new.weight, new.bias = lin.weight, lin.bias
        new.train(lin.training)
        return new

    return _swap(model, nn.Linear, make, config.skip)


def convert(model: nn.Module) -> nn.Module:
    """Replace every :class:`QATLinear` by a :class:`QuantizedLinear` (int8) in place; returns model in eval mode.

    Example: ``qmodel = convert(prepare_qat(model))``
             ``qmodel(x)  # equals the fake-quantized model's output in eval mode``
    """
    return _swap(model, QATLinear, QuantizedLinear.from_qat).eval()
