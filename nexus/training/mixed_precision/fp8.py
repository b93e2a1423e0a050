"""FP8 linear layers with per-tensor delayed scaling (Micikevicius et al., 2022; Transformer Engine).

Each of the three GEMM operands (input, weight, output gradient) gets one float32 scale per tensor,
``scale = fp8_max / amax / 2**margin``, where ``amax`` comes from a rolling history of the amaxes of
previous steps ("delayed scaling"), so the scale is known before the tensor is cast. The matmul runs
in ``torch._scaled_mm`` (fp8 inputs, fp32 accumulation), on CPU too; where it cannot run (CUDA
shapes not multiples of 16, E5M2 x E5M2 on CUDA, devices without fp8 GEMMs) the same numerics are
emulated: dequantize the fp8 operands and matmul in fp32.

Data parallelism (DDP, FSDP2): each rank sees its own slice of the batch, so its input and
gradient amaxes differ. Left alone, the ranks' histories and scales would diverge and the ranks
would quantize with different scales. Instead each amax is all-reduced (MAX) over the
data-parallel group where it is computed (training mode): every rank then holds the same
histories and scales, those of one process on the whole batch (its amax is the max over the
slices), and each rank's quantized operands are bit-identical to that process's rows. The group
is the default one unless :func:`set_amax_reduction` names another (under pipeline parallelism it
must: the ranks of one stage, not the whole world). Under FSDP2 the forward sees the all-gathered
weight as a plain tensor; a DTensor weight (tensor parallelism) is refused.
"""
from __future__ import annotations

import enum
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "FP8Format",
    "FP8Linear",
    "convert_to_fp8",
    "fp8_linear",
    "quantize_fp8",
    "replace_linears",
    "set_amax_reduction",
]


class FP8Format(enum.Enum):
    """Which FP8 formats the forward and backward GEMMs use.

    E4M3: everything E4M3 (more precision, max 448). E5M2: everything E5M2 (more range, max 57344).
    HYBRID: E4M3 for inputs and weights, E5M2 for output gradients (the usual training recipe).
    """

    E4M3 = "e4m3"
    E5M2 = "e5m2"
    HYBRID = "hybrid"

    @property
    def forward_dtype(self) -> torch.dtype:
        return torch.float8_e5m2 if self is FP8Format.E5M2 else torch.float8_e4m3fn

    @property
    def backward_dtype(self) -> torch.dtype:
        return torch.float8_e4m3fn if self is FP8Format.E4M3 else torch.float8_e5m2


AMAX_ALGOS = ("max", "most_recent")


def _fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


def _scale_from_history(
    history: torch.Tensor | None, current_amax: torch.Tensor, fp8_dtype: torch.dtype, margin: int, algo: str
) -> torch.Tensor:
    """float32 scalar scale from the amax history; falls back to the current amax when the history is empty."""
    if history is None:
        amax = current_amax
    else:
        past = history.max() if algo == "max" else history[0]
        # An all-zero history means no step has been recorded yet: scale just in time.
        amax = torch.where(past > 0, past, current_amax)
    amax = amax.float()
    scale = _fp8_max(fp8_dtype) / amax / (2.0**margin)
    # A zero (or non-finite) amax gives no information: keep unit scale.
    return torch.where(torch.isfinite(scale) & (amax > 0), scale, torch.ones_like(scale))


def reduce_amax_(amax: torch.Tensor, group=None) -> torch.Tensor:
    """All-reduce (MAX) ``amax`` in place over ``group`` (None: the default group) when torch.distributed
    is initialized; a single process returns it unchanged. amax: float32 tensor of any shape.

    Example: ``amaxes = reduce_amax_(torch.stack([x.abs().amax(), w.abs().amax()]).float())``
    """
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(amax, op=dist.ReduceOp.MAX, group=group)
    return amax


def check_not_dtensor(layer: str, weight: torch.Tensor) -> None:
    """Refuse a DTensor weight: FSDP2 hands the forward a gathered plain tensor; a DTensor means tensor
    parallelism, whose sharded GEMM operands would each need their own scales."""
    if dist.is_available():
        from torch.distributed.tensor import DTensor

        if isinstance(weight, DTensor):
            raise ValueError(f"{layer}: the weight is a DTensor ({weight.placements}): low-precision layers "
                             "do not support tensor parallelism; convert only layers that tensor parallelism "
                             "leaves whole (FSDP2 alone gathers weights to plain tensors and is supported)")


def _record_amax(history: torch.Tensor, amax: torch.Tensor) -> None:
    """Roll ``history`` by one and write ``amax`` at index 0 (in place)."""
    history.copy_(torch.roll(history, 1))
    history[0] = amax.to(history.dtype)


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """Saturating cast of ``x * scale`` to ``fp8_dtype`` (NaN stays NaN).

    x: any float tensor; scale: float32 scalar tensor; returns ``fp8_dtype`` of x's shape.
    Example: ``q = quantize_fp8(torch.randn(4, 16), torch.tensor(8.0), torch.float8_e4m3fn)``
             ``q.float() / 8.0`` is x rounded to E4M3.
    """
    limit = _fp8_max(fp8_dtype)
    return (x.float() * scale).clamp(-limit, limit).to(fp8_dtype)


def _scaled_mm_runs(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether torch._scaled_mm accepts ``a @ b`` (both fp8) on their device."""
    if a.device.type == "cpu":
        return True
    if a.device.type != "cuda":
        return False
    if torch.cuda.get_device_capability(a.device) < (8, 9):
        return False
    if a.dtype == torch.float8_e5m2 and b.dtype == torch.float8_e5m2:
        return False
    return all(d % 16 == 0 for d in (a.shape[0], a.shape[1], b.shape[1]))


def _fp8_matmul(
    a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor, out_dtype: torch.dtype
) -> torch.Tensor:
    """(a / a_scale) @ (b / b_scale) with fp32 accumulation; a [M, K], b [K, N] fp8, scales float32 scalars."""
    if a.shape[0] == 0 or b.shape[1] == 0 or a.shape[1] == 0:
        return torch.zeros(a.shape[0], b.shape[1], dtype=out_dtype, device=a.device)
    if _scaled_mm_runs(a, b):
        # _scaled_mm wants a row-major and b column-major.
        return torch._scaled_mm(
            a.contiguous(),
            b.t().contiguous().t(),
            scale_a=a_scale.reciprocal(),
            scale_b=b_scale.reciprocal(),
            out_dtype=out_dtype,
        )
    with torch.autocast(a.device.type, enabled=False):  # the emulation must stay fp32 under autocast
        out = (a.float() / a_scale) @ (b.float() / b_scale)
    return out.to(out_dtype)


class _FP8LinearFunction(torch.autograd.Function):
    """y = x @ W^T + b with x, W cast to the forward fp8 format and dy cast to the backward format.

    ``reduce_group``: False (no amax reduction) or the group to all-reduce the amaxes over (None: the
    default group); reduced only where they are recorded (``update``) or used just in time (no history)."""

    @staticmethod
    def forward(ctx, x, weight, bias, fp8_format, histories, margin, algo, update, reduce_group):
        fwd, bwd = fp8_format.forward_dtype, fp8_format.backward_dtype
        hx, hw, hg = histories if histories is not None else (None, None, None)
        x2 = x.reshape(-1, x.shape[-1])
        amax_x, amax_w = x2.detach().abs().amax() if x2.numel() else x2.new_zeros(()), weight.detach().abs().amax()
        reduce = reduce_group is not False and (update or histories is None)
        if reduce:  # one collective for both (float32 holds any 16-bit amax exactly)
            amax_x, amax_w = reduce_amax_(torch.stack([amax_x.float(), amax_w.float()]), reduce_group).unbind()
        sx = _scale_from_history(hx, amax_x, fwd, margin, algo)
        sw = _scale_from_history(hw, amax_w, fwd, margin, algo)
        xq, wq = quantize_fp8(x2, sx, fwd), quantize_fp8(weight, sw, fwd)
        if update and histories is not None:
            _record_amax(hx, amax_x)
            _record_amax(hw, amax_w)
        out_dtype = x.dtype if x.dtype in (torch.float32, torch.bfloat16, torch.float16) else torch.float32
        y = _fp8_matmul(xq, sx, wq.t(), sw, out_dtype)
        if bias is not None:
            y = y + bias.to(out_dtype)
        ctx.save_for_backward(xq, wq, sx, sw)
        ctx.meta = (bwd, hg, margin, algo, update, x.shape, x.dtype, weight.dtype, bias is not None,
                    reduce_group if reduce else False)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, dy):
        xq, wq, sx, sw = ctx.saved_tensors
        bwd, hg, margin, algo, update, x_shape, x_dtype, w_dtype, has_bias, reduce_group = ctx.meta
        dy2 = dy.reshape(-1, dy.shape[-1])
        amax_g = dy2.abs().amax() if dy2.numel() else dy2.new_zeros(())
        if reduce_group is not False:
            amax_g = reduce_amax_(amax_g.float().reshape(1), reduce_group)[0]
        sg = _scale_from_history(hg, amax_g, bwd, margin, algo)
        gq = quantize_fp8(dy2, sg, bwd)
        if update and hg is not None:
            _record_amax(hg, amax_g)
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = _fp8_matmul(gq, sg, wq, sw, torch.float32).to(x_dtype).reshape(x_shape)
        if ctx.needs_input_grad[1]:
            dw = _fp8_matmul(gq.t(), sg, xq, sx, torch.float32).to(w_dtype)
        if has_bias and ctx.needs_input_grad[2]:
            db = dy2.float().sum(0).to(w_dtype)
        return dx, dw, db, None, None, None, None, None, None


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    fp8_format: FP8Format = FP8Format.HYBRID,
    amax_histories: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    margin: int = 0,
    amax_compute_algo: str = "max",
    update_history: bool = True,
    reduce_amax: bool = False,
    amax_group=None,
) -> torch.Tensor:
    """FP8 linear ``x @ weight.T + bias`` with per-tensor scaling; differentiable.

    x: [..., K] float; weight: [N, K] (a plain tensor, not a DTensor); bias: [N] or None; returns
    [..., N] in x's dtype (fp32 for other dtypes). ``amax_histories`` = (input, weight, grad_output)
    float32 [L] buffers for delayed scaling, updated in place when ``update_history``; None scales each
    tensor by its current amax. ``reduce_amax`` (FP8Linear turns it on): under torch.distributed,
    all-reduce (MAX) each amax that is recorded or used just in time over ``amax_group`` (a
    ProcessGroup; None: the default group), so that data-parallel ranks share scales (module docstring).
    Example: ``y = fp8_linear(torch.randn(8, 64), torch.randn(32, 64), fp8_format=FP8Format.E4M3)``
             ``y.shape == (8, 32)``
    """
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features but weight expects {weight.shape[1]}")
    if not isinstance(fp8_format, FP8Format):
        raise ValueError(f"fp8_format must be an FP8Format, got {fp8_format!r}")
    if amax_compute_algo not in AMAX_ALGOS:
        raise ValueError(f"amax_compute_algo must be one of {AMAX_ALGOS}, got {amax_compute_algo!r}")
    check_not_dtensor("fp8_linear", weight)
    reduce_group = amax_group if reduce_amax and dist.is_available() and dist.is_initialized() else False
    return _FP8LinearFunction.apply(
        x, weight, bias, fp8_format, amax_histories, margin, amax_compute_algo, update_history, reduce_group
    )


class FP8Linear(nn.Linear):
    """``nn.Linear`` whose GEMMs run in FP8 with per-tensor delayed scaling.

    Parameters stay in their dtype (fp32 master weights); each forward casts input and weight to the
    forward format, each backward casts the output gradient to the backward format. Buffers
    ``amax_history_{input,weight,grad_output}`` [amax_history_len] hold the past amaxes (newest first);
    they update in training mode only, with each amax all-reduced (MAX) over ``amax_group`` (None: the
    default group) under torch.distributed while ``reduce_amax`` (see :func:`set_amax_reduction`).
    Example: ``layer = FP8Linear(768, 3072, fp8_format=FP8Format.HYBRID)``
             ``y = layer(torch.randn(4, 768))  # [4, 3072] float32``
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        fp8_format: FP8Format = FP8Format.E4M3,
        bias: bool = True,
        *,
        amax_history_len: int = 16,
        amax_compute_algo: str = "max",
        margin: int = 0,
        device=None,
        dtype=None,
    ) -> None:
        if not isinstance(fp8_format, FP8Format):
            raise ValueError(f"fp8_format must be an FP8Format, got {fp8_format!r}")
        if amax_history_len < 1:
            raise ValueError(f"amax_history_len must be >= 1, got {amax_history_len}")
        if amax_compute_algo not in AMAX_ALGOS:
            raise ValueError(f"amax_compute_algo must be one of {AMAX_ALGOS}, got {amax_compute_algo!r}")
        if margin < 0:
            raise ValueError(f"margin must be >= 0, got {margin}")
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.fp8_format = fp8_format
        self.amax_history_len = amax_history_len
        self.amax_compute_algo = amax_compute_algo
        self.margin = margin
        self.reduce_amax = True
        self.amax_group = None
        for name in ("input", "weight", "grad_output"):
            self.register_buffer(
                f"amax_history_{name}", torch.zeros(amax_history_len, dtype=torch.float32, device=device)
            )

    @property
    def amax_histories(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (self.amax_history_input, self.amax_history_weight, self.amax_history_grad_output)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(
            x,
            self.weight,
            self.bias,
            fp8_format=self.fp8_format,
            amax_histories=self.amax_histories,
            margin=self.margin,
            amax_compute_algo=self.amax_compute_algo,
            update_history=self.training,
            reduce_amax=self.reduce_amax,
            amax_group=self.amax_group,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, fp8_format={self.fp8_format.name}, amax_history_len={self.amax_history_len}"


def set_amax_reduction(model: nn.Module, group=None, *, enabled: bool = True) -> nn.Module:
    """Choose where the low-precision layers of ``model`` all-reduce their amaxes; returns ``model``.

    group: None (the default group), a ``ProcessGroup``, or a 1-D ``DeviceMesh``: the ranks that hold
    the same layers and see different data (data-parallel, and tensor/context-parallel ranks of one
    pipeline stage). enabled=False: no reduction (each rank keeps its own scales). Applies to
    :class:`FP8Linear` (delayed-scaling histories) and to MX/FP4 layers with per-tensor scales.
    Example: ``set_amax_reduction(model, mesh["dp_shard"])``
             ``set_amax_reduction(model, enabled=False)``
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"set_amax_reduction: enabled must be a bool, got {enabled!r}")
    if group is not None and dist.is_available():
        from torch.distributed.device_mesh import DeviceMesh

        if isinstance(group, DeviceMesh):
            if group.ndim != 1:
                raise ValueError(f"set_amax_reduction: a {group.ndim}-D DeviceMesh spans several groups; pass a "
                                 "1-D mesh (e.g. mesh['dp_shard'], or mesh[dims]._flatten()) or its ProcessGroup")
            group = group.get_group()
        elif not isinstance(group, dist.ProcessGroup):
            raise TypeError(f"set_amax_reduction: group must be None, a ProcessGroup or a 1-D DeviceMesh, "
                            f"got {type(group).__name__}")
    for module in model.modules():
        if hasattr(module, "amax_group") and hasattr(module, "reduce_amax"):
            module.amax_group = group
            module.reduce_amax = enabled
    return model


DEFAULT_SKIP = ("lm_head", "output", "head")


def _skipped(name: str, skip: Iterable[str]) -> bool:
    """Whether the module at qualified ``name`` matches ``skip`` (its full name or its last component)."""
    leaf = name.rsplit(".", 1)[-1]
    return any(s == name or s == leaf for s in skip)


def replace_linears(
    model: nn.Module,
    make: Callable[[nn.Linear], nn.Module],
    *,
    skip: Iterable[str] = DEFAULT_SKIP,
    filter_fn: Callable[[str, nn.Linear], bool] | None = None,
) -> nn.Module:
    """Replace every plain ``nn.Linear`` in ``model`` (in place) by ``make(linear)``; returns ``model``.

    A Linear is kept when its qualified name or last name component is in ``skip``, or when
    ``filter_fn(name, linear)`` is False. Subclasses of nn.Linear (already converted) are kept.
    Example: ``replace_linears(model, lambda l: FP8Linear(l.in_features, l.out_features))``
             ``replace_linears(model, make, skip=("lm_head",))``
    """
    skip = tuple(skip)
    targets = [
        (name, mod)
        for name, mod in model.named_modules()
        if type(mod) is nn.Linear and not _skipped(name, skip) and (filter_fn is None or filter_fn(name, mod))
    ]
    if type(model) is nn.Linear and any(name == "" for name, _ in targets):
        raise ValueError("replace_linears swaps children in place; pass a model containing the Linear")
    for name, mod in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make(mod))
    return model


def _adopt_parameters(new: nn.Linear, old: nn.Linear) -> nn.Linear:
    """Give ``new`` the very Parameter objects of ``old`` (keeps optimizer references and tying)."""
    new.weight = old.weight
    new.bias = old.bias
    new.train(old.training)
    return new


def convert_to_fp8(
    model: nn.Module,
    fp8_format: FP8Format = FP8Format.HYBRID,
    *,
    skip: Iterable[str] = DEFAULT_SKIP,
    filter_fn: Callable[[str, nn.Linear], bool] | None = None,
    amax_history_len: int = 16,
    amax_compute_algo: str = "max",
    margin: int = 0,
) -> nn.Module:
    """Swap ``nn.Linear`` layers of ``model`` for :class:`FP8Linear` in place, keeping the weights.

    Skipped: layers named in ``skip`` (the output head by default), layers whose in/out features are
    not multiples of 16 (FP8 GEMM shape rule), and layers for which ``filter_fn(name, linear)`` is False.
    Example: ``model = convert_to_fp8(model, fp8_format=FP8Format.E4M3)``
             ``isinstance(model.fc1, FP8Linear)``
    """

    def wanted(name: str, lin: nn.Linear) -> bool:
        dims_ok = lin.in_features % 16 == 0 and lin.out_features % 16 == 0
        return dims_ok and (filter_fn is None or filter_fn(name, lin))

    def make(lin: nn.Linear) -> FP8Linear:
        new = FP8Linear(
            lin.in_features,
            lin.out_features,
            fp8_format=fp8_format,
            bias=lin.bias is not None,
            amax_history_len=amax_history_len,
            amax_compute_algo=amax_compute_algo,
            margin=margin,
            device="meta",
        )
        new.to_empty(device=lin.weight.device)
        for buf in new.amax_histories:
            buf.zero_()
        return _adopt_parameters(new, lin)

    return replace_linears(model, make, skip=skip, filter_fn=wanted)
