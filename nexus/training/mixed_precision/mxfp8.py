"""MXFP8 linear layers: OCP Microscaling (MX v1.0) block-scaled FP8 for weights, activations and gradients.

Every GEMM operand is MX-quantized along its reduction dimension, in blocks of ``block_size``
elements sharing one E8M0 power-of-two scale: y = x W^T reduces over K (x, W blocked along K),
dx = dy W over N (dy, W blocked along N), dW = dy^T x over tokens (dy, x blocked along tokens).
Forward operands use E4M3, output gradients E5M2. The GEMM itself is emulated on every device:
dequantize the MX operands, then an fp32 matmul (exact products, fp32 accumulation), which is
what MX hardware computes up to accumulation order.

Data parallelism (DDP, FSDP2): block scales are computed per block of the operand being cast, so
nothing needs to agree across ranks for blocks along K or N (one row each) or for the weight
(FSDP2 gathers it whole before forward; a DTensor weight, from tensor parallelism, is refused).
dW's blocks run along the tokens: they match one process on the whole batch when each rank's
token count is a multiple of ``block_size`` (rank slices then start on block boundaries); otherwise
the blocks are cut differently, an equally valid MX rounding. Per-tensor scaling (``block_size``
None, FP4 without microscaling) uses the tensor's amax: in training it is all-reduced (MAX) over
the layer's ``amax_group`` (see ``fp8.set_amax_reduction``), so every rank scales as one process
on the whole batch. Stochastic rounding seeds are offset by the global rank, so data-parallel
ranks (which draw the same seeds from identically seeded generators) round independently.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

import nexus_kernels
from nexus_kernels.formats import get_format
from nexus.training.mixed_precision.fp8 import (
    DEFAULT_SKIP,
    _adopt_parameters,
    check_not_dtensor,
    reduce_amax_,
    replace_linears,
)

__all__ = [
    "MXFP8Config",
    "MXFP8Linear",
    "MXLinearBase",
    "MXSpec",
    "convert_to_mxfp8",
    "mx_linear",
    "mx_quantize_dequantize",
]

BLOCK_SIZES = (32, 64)


def _check_config(config, flags: tuple[str, ...]) -> None:
    """Validate an MX layer config: ``block_size`` in BLOCK_SIZES and each field in ``flags`` a bool."""
    if config.block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size must be one of {BLOCK_SIZES}, got {config.block_size!r}")
    for name in flags:
        if not isinstance(getattr(config, name), bool):
            raise ValueError(f"{name} must be a bool, got {getattr(config, name)!r}")


# Added per global rank to stochastic-rounding seeds (odd, ~2**32 / golden ratio): distinct hash keys per rank.
_RANK_SEED_STRIDE = 0x9E3779B1


def _fresh_seed(device: torch.device) -> torch.Tensor:
    """A 0-d int64 seed drawn on ``device`` from torch's generator (``torch.manual_seed`` makes runs
    repeatable); a tensor, so neither a host sync nor a graph break under ``torch.compile``. Under
    torch.distributed it is offset by the global rank: ranks seeded alike still round independently."""
    seed = torch.randint(0, 2**62, (), dtype=torch.int64, device=device)
    if dist.is_available() and dist.is_initialized():
        seed = seed + dist.get_rank() * _RANK_SEED_STRIDE
    return seed


def mx_quantize_dequantize(
    x: torch.Tensor,
    elem: str,
    block_size: int | None = 32,
    *,
    dim: int = -1,
    rounding: str = "nearest",
    seed: int | torch.Tensor | None = None,
    amax: torch.Tensor | None = None,
) -> torch.Tensor:
    """Round ``x`` to the values an MX tensor (blocks along ``dim``) can hold; same shape and dtype.

    elem: "e4m3" | "e5m2" | "e2m1". block_size None means one float32 scale for the whole tensor
    (amax / element max) instead of E8M0 block scales; ``amax`` (a float32 scalar, block_size None
    only) overrides x's own amax, e.g. the max over data-parallel ranks. rounding: "nearest" (OCP MX exactly) or
    "stochastic": unbiased, E[result] = x. The OCP scale maps a block's amax into
    [2**emax, 2**(emax+1)), above max_normal for some blocks, and saturation there would bias the
    rounding; so stochastic rounding also multiplies each block by max_normal / 2**(emax+1)
    (3/4 for E2M1) before the cast and divides after (Tseng et al., 2025, "Training LLMs with
    MXFP4"), a factor that hardware folds into the GEMM output scale. seed (stochastic only): an int,
    a one-element integer tensor (no host sync, no graph break under torch.compile) or None (drawn).
    Example: ``xq = mx_quantize_dequantize(torch.randn(4, 64), "e4m3", 32)``
             ``xs = mx_quantize_dequantize(g, "e2m1", 32, rounding="stochastic", seed=0)``
    """
    if amax is not None and block_size is not None:
        raise ValueError(f"amax applies to per-tensor scaling (block_size None), not to blocks of {block_size}")
    if x.numel() == 0:
        return x.clone()
    fmt = get_format(elem)
    moved = x.movedim(dim, -1).contiguous()
    if block_size is None:
        amax = moved.detach().abs().amax().float() if amax is None else amax.detach().float().reshape(())
        scale = torch.where(amax > 0, amax / fmt.max_normal, torch.ones_like(amax))
        q = nexus_kernels.cast_to_fp(moved.float() / scale, elem, rounding=rounding, seed=seed) * scale
    elif rounding == "stochastic":
        _, scales = nexus_kernels.to_mx(moved, elem=elem, block_size=block_size)
        k = moved.shape[-1]
        block_scale = torch.exp2(scales.float() - 127.0).repeat_interleave(block_size, dim=-1)[..., :k]
        shrink = fmt.max_normal / 2.0 ** (fmt.emax + 1)
        v = moved.float() / block_scale * shrink
        q = nexus_kernels.cast_to_fp(v, elem, rounding="stochastic", seed=seed) * (block_scale / shrink)
    else:
        elements, scales = nexus_kernels.to_mx(moved, elem=elem, block_size=block_size, rounding=rounding, seed=seed)
        q = nexus_kernels.from_mx(
            elements, scales, elem, block_size=block_size, dtype=torch.float32, size=moved.shape[-1]
        )
    return q.to(x.dtype).movedim(-1, dim)


@dataclasses.dataclass(frozen=True)
class MXSpec:
    """Formats of one block-scaled linear: forward element format, gradient format, block, rounding."""

    forward_elem: str
    backward_elem: str
    block_size: int | None
    gradient_rounding: str = "nearest"
    quantize_gradients: bool = True

    def __post_init__(self) -> None:
        for name in ("forward_elem", "backward_elem"):
            if getattr(self, name) not in ("e4m3", "e5m2", "e2m1"):
                raise ValueError(f"{name} must be one of e4m3, e5m2, e2m1, got {getattr(self, name)!r}")
        if self.block_size is not None and self.block_size not in BLOCK_SIZES:
            raise ValueError(f"block_size must be one of {BLOCK_SIZES} or None, got {self.block_size!r}")
        if self.gradient_rounding not in ("nearest", "stochastic"):
            raise ValueError(f"gradient_rounding must be nearest or stochastic, got {self.gradient_rounding!r}")


class _MXLinearFunction(torch.autograd.Function):
    """y = Q(x) Q(W)^T + b; backward with Q along each GEMM's reduction dimension (see module doc).

    ``reduce_group``: False, or the group (None: default) over which per-tensor amaxes are all-reduced."""

    @staticmethod
    def forward(ctx, x, weight, bias, spec, weight_is_quantized, reduce_group):
        x2 = x.reshape(-1, x.shape[-1])
        amax_x = amax_w = None
        if spec.block_size is None and reduce_group is not False:  # one scale per tensor: the global one
            amax_x = x2.detach().abs().amax().float() if x2.numel() else x2.new_zeros((), dtype=torch.float32)
            amax_x, amax_w = reduce_amax_(torch.stack([amax_x, weight.detach().abs().amax().float()]),
                                          reduce_group).unbind()
        xq = mx_quantize_dequantize(x2, spec.forward_elem, spec.block_size, amax=amax_x).float()
        # A packed weight is already on the MX grid (re-quantizing would return it unchanged).
        wq = (weight.float() if weight_is_quantized
              else mx_quantize_dequantize(weight, spec.forward_elem, spec.block_size, amax=amax_w).float())
        y = xq @ wq.t()
        if bias is not None:
            y = y + bias.float()
        ctx.save_for_backward(x2, weight)
        ctx.spec, ctx.x_shape, ctx.has_bias = spec, x.shape, bias is not None
        ctx.amaxes, ctx.reduce_group = (amax_x, amax_w), reduce_group
        return y.to(x.dtype).reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        x2, weight = ctx.saved_tensors
        spec = ctx.spec
        amax_x, amax_w = ctx.amaxes
        dy2 = dy.reshape(-1, dy.shape[-1]).float()
        fwd, bwd, bs = spec.forward_elem, spec.backward_elem, spec.block_size
        amax_g = None
        if bs is None and ctx.reduce_group is not False and spec.quantize_gradients:
            amax_g = reduce_amax_(dy2.abs().amax().reshape(1) if dy2.numel() else dy2.new_zeros(1),
                                  ctx.reduce_group)[0]

        def grad_q(t: torch.Tensor, dim: int) -> torch.Tensor:
            if not spec.quantize_gradients:
                return t
            seed = _fresh_seed(t.device) if spec.gradient_rounding == "stochastic" else None
            return mx_quantize_dequantize(t, bwd, bs, dim=dim, rounding=spec.gradient_rounding, seed=seed,
                                          amax=amax_g)

        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            # dx = dy @ W reduces over N: dy blocked along its last dim, W along dim 0.
            w_n = mx_quantize_dequantize(weight, fwd, bs, dim=0, amax=amax_w).float()
            dx = (grad_q(dy2, -1) @ w_n).to(x2.dtype).reshape(ctx.x_shape)
        if ctx.needs_input_grad[1]:
            # dW = dy^T @ x reduces over tokens: both blocked along dim 0.
            x_m = mx_quantize_dequantize(x2, fwd, bs, dim=0, amax=amax_x).float()
            dw = (grad_q(dy2, 0).t() @ x_m).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(weight.dtype)
        return dx, dw, db, None, None, None


def mx_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    spec: MXSpec,
    *,
    weight_is_quantized: bool = False,
    reduce_amax: bool = False,
    amax_group=None,
) -> torch.Tensor:
    """Block-scaled low-precision linear ``x @ weight.T + bias``, differentiable (emulated GEMM).

    x: [..., K] float; weight: [N, K] (a plain tensor, not a DTensor); bias: [N] or None; returns
    [..., N] in x's dtype. ``weight_is_quantized``: the weight already holds MX values blocked along K
    (skips one cast). ``reduce_amax`` (per-tensor scaling only): under torch.distributed, all-reduce
    (MAX) the amaxes of x, the weight and dy over ``amax_group`` (None: the default group).
    Example: ``y = mx_linear(torch.randn(8, 64), torch.randn(32, 64), None, MXSpec("e4m3", "e5m2", 32))``
             ``y.shape == (8, 32)``
    """
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects {weight.shape[1]}")
    check_not_dtensor("mx_linear", weight)
    reduce_group = amax_group if reduce_amax and dist.is_available() and dist.is_initialized() else False
    return _MXLinearFunction.apply(x, weight, bias, spec, weight_is_quantized, reduce_group)


class MXLinearBase(nn.Linear):
    """Shared machinery of MXFP8Linear and FP4Linear: config checking, the forward call, packed weights.

    ``pack_weights()`` replaces the float weight by buffers ``weight_elements`` (uint8 codes, FP4
    two per byte) and ``weight_scales`` (uint8 E8M0, or one float32 scale without microscaling):
    the layer is then frozen (the input still gets gradients) and its ``state_dict`` is small.
    ``unpack_weights()`` restores a trainable float weight holding the quantized values.
    With per-tensor scaling (block_size None) training forwards all-reduce their amaxes over
    ``amax_group`` while ``reduce_amax`` (see ``fp8.set_amax_reduction``; module docstring).
    """

    spec: MXSpec
    config_class: type  # each subclass names its config dataclass (it must have a ``spec`` property)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        config=None,
        device=None,
        dtype=None,
    ) -> None:
        config_class = type(self).config_class
        config = config if config is not None else config_class()
        if not isinstance(config, config_class):
            raise ValueError(f"config must be an {config_class.__name__}, got {type(config).__name__}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.config = config
        self.spec = config.spec
        self.reduce_amax = True
        self.amax_group = None

    @property
    def packed(self) -> bool:
        return "weight_elements" in self._buffers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # eval forwards keep their own scales: a rank evaluating alone must not wait for its peers
        reduce = dict(reduce_amax=self.reduce_amax and self.training, amax_group=self.amax_group)
        if self.packed:
            return mx_linear(x, self.dequantized_weight(), self.bias, self.spec, weight_is_quantized=True, **reduce)
        return mx_linear(x, self.weight, self.bias, self.spec, **reduce)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight as the forward GEMM sees it: [out_features, in_features] ``dtype``."""
        if not self.packed:
            return mx_quantize_dequantize(self.weight.detach(), self.spec.forward_elem, self.spec.block_size).to(dtype)
        elem, bs = self.spec.forward_elem, self.spec.block_size
        codes, scales = self.weight_elements, self.weight_scales
        if bs is not None:
            return nexus_kernels.from_mx(codes, scales, elem, block_size=bs, dtype=dtype, size=self.in_features)
        if elem == "e2m1":
            codes = torch.stack([codes & 0xF, codes >> 4], dim=-1).flatten(-2)[..., : self.in_features]
        return (nexus_kernels.decode_fp_bits(codes, elem, torch.float32) * scales).to(dtype)

    @torch.no_grad()
    def pack_weights(self) -> MXLinearBase:
        """Store the weight as MX codes + scales (frozen); returns self."""
        if self.packed:
            return self
        w = self.weight.detach().float()
        elem, bs = self.spec.forward_elem, self.spec.block_size
        if bs is not None:
            codes, scales = nexus_kernels.to_mx(w, elem=elem, block_size=bs)
        else:
            amax = w.abs().amax()
            scales = torch.where(amax > 0, amax / get_format(elem).max_normal, torch.ones_like(amax)).reshape(1)
            codes = nexus_kernels.cast_to_fp_bits(w / scales, elem)
            if elem == "e2m1":
                # Two 4-bit codes per byte, low nibble first; pad an odd row with a zero code.
                if codes.shape[-1] % 2:
                    codes = torch.nn.functional.pad(codes, (0, 1))
                codes = codes[..., 0::2] | (codes[..., 1::2] << 4)
        del self.weight
        self.register_buffer("weight_elements", codes.contiguous())
        self.register_buffer("weight_scales", scales.contiguous())
        return self

    @torch.no_grad()
    def unpack_weights(self) -> MXLinearBase:
        """Turn packed codes back into a trainable float32 weight Parameter; returns self."""
        if not self.packed:
            return self
        w = self.dequantized_weight(torch.float32)
        del self.weight_elements
        del self.weight_scales
        self.weight = nn.Parameter(w)
        return self

    def extra_repr(self) -> str:
        s = self.spec
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"elem={s.forward_elem}/{s.backward_elem}, block_size={s.block_size}, packed={self.packed}"
        )


@dataclasses.dataclass(frozen=True, kw_only=True)
class MXFP8Config:
    """MXFP8 settings.

    block_size: 32 | 64 elements per shared E8M0 scale. e4m3_forward: E4M3 for weights and
    activations (else E5M2); gradients always E5M2. quantize_gradients: MX-quantize output gradients
    in backward. stochastic_rounding: round gradients stochastically (unbiased) instead of RNE.
    Example: ``config = MXFP8Config(block_size=32, e4m3_forward=True)``
             ``layer = MXFP8Linear(768, 3072, config=config)``
    """

    block_size: int = 32
    e4m3_forward: bool = True
    quantize_gradients: bool = True
    stochastic_rounding: bool = False

    def __post_init__(self) -> None:
        _check_config(self, ("e4m3_forward", "quantize_gradients", "stochastic_rounding"))

    @property
    def spec(self) -> MXSpec:
        return MXSpec(
            forward_elem="e4m3" if self.e4m3_forward else "e5m2",
            backward_elem="e5m2",
            block_size=self.block_size,
            gradient_rounding="stochastic" if self.stochastic_rounding else "nearest",
            quantize_gradients=self.quantize_gradients,
        )


class MXFP8Linear(MXLinearBase):
    """``nn.Linear`` with MXFP8 weights, activations and gradients (fp32 master weights).

    x: [..., in_features] float -> [..., out_features] same dtype.
    Example: ``layer = MXFP8Linear(768, 3072, config=MXFP8Config(block_size=32))``
             ``y = layer(torch.randn(4, 768))``
    """

    config_class = MXFP8Config


def _convert(model, layer_class, config, skip, filter_fn):
    """replace_linears with ``layer_class`` layers (one shared ``config``, default if None) built on
    meta that adopt the old Parameters."""
    config = config if config is not None else layer_class.config_class()

    def make_layer(lin: nn.Linear) -> MXLinearBase:
        new = layer_class(lin.in_features, lin.out_features, bias=lin.bias is not None, config=config, device="meta")
        return _adopt_parameters(new, lin)

    return replace_linears(model, make_layer, skip=skip, filter_fn=filter_fn)


def convert_to_mxfp8(
    model: nn.Module,
    config: MXFP8Config | None = None,
    *,
    skip: Iterable[str] = DEFAULT_SKIP,
    filter_fn: Callable[[str, nn.Linear], bool] | None = None,
) -> nn.Module:
    """Swap ``nn.Linear`` layers for :class:`MXFP8Linear` in place, keeping the weight Parameters.

    Layers named in ``skip`` (the output head by default) or rejected by ``filter_fn(name, linear)`` stay.
    Example: ``model = convert_to_mxfp8(model, MXFP8Config(block_size=32))``
             ``isinstance(model.fc1, MXFP8Linear)``
    """
    return _convert(model, MXFP8Linear, config, skip, filter_fn)
