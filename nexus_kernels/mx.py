"""MX block scaling (OCP Microscaling Formats v1.0): ``to_mx`` / ``from_mx``.

``x`` [..., K] is split into blocks of ``block_size`` (32 or 64) consecutive elements along the
last dim. Each block gets one shared E8M0 scale and its elements are cast to E4M3, E5M2 or E2M1:

    scale_exp = clamp(floor(log2(amax)) - emax(elem), -127, 127)      (emax: 8, 15, 2)
    element   = cast(x / 2**scale_exp)                                (RNE or stochastic, saturating)

- An all-zero block (amax == 0) gets the smallest scale, 2**-127 (code 0x00).
- A block holding NaN or +-inf gets scale code 0xFF, the E8M0 NaN: ``from_mx`` decodes the whole
  block to NaN. (Its element codes are those of a cast with scale 2**(128 - emax).)
- Scaled elements can exceed max normal (amax / 2**scale_exp < 2**(emax + 1)); they saturate to
  +-max normal, as in the spec.
- E2M1 elements are packed two per byte, the even index in the low nibble.
- K need not divide ``block_size``: the last block is padded with zeros internally (padding
  never changes amax) and the padding is dropped on return.
- Non-contiguous inputs are copied to a contiguous layout first.

Stochastic rounding uses the random stream of ``nexus_kernels.cast`` indexed by the flat element
index of ``x``, so the Triton kernel and the reference return the same bits for the same seed
(an int, a one-element integer tensor, or None: see ``nexus_kernels.cast``).

The Triton kernel (``_mx_kernels``, imported on first launch) does one pass per block: load,
integer amax of |bits|, scale, cast, pack, store. ``to_mx`` and ``from_mx`` call the custom ops
``torch.ops.nexus.to_mx`` / ``from_mx``, which pick the kernel or the reference per call; neither
is differentiable (outputs never require grad).
"""
from __future__ import annotations

import torch

from nexus_kernels._backend import register_op, select
from nexus_kernels.cast import (
    _check_float_input,
    _check_output_dtype,
    _op_format,
    decode_constexprs,
    decode_fp_bits_reference,
    floor_log2,
    random_bits_reference,
    round_constexprs,
    round_to_codes_reference,
    seed_key,
    seed_tensor,
)
from nexus_kernels.formats import E2M1, E8M0, FloatFormat, get_format

__all__ = ["to_mx", "from_mx", "to_mx_reference", "from_mx_reference", "BLOCK_SIZES", "ELEMENT_FORMATS"]

BLOCK_SIZES = (32, 64)
ELEMENT_FORMATS = ("e4m3", "e5m2", "e2m1")


def _check_mx_args(elem: str | FloatFormat, block_size: int) -> FloatFormat:
    fmt = get_format(elem)
    if fmt.name not in ELEMENT_FORMATS:
        raise ValueError(f"elem={fmt.name!r} is not an MX element format; expected one of {', '.join(ELEMENT_FORMATS)}")
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size={block_size!r} is not supported; expected one of {BLOCK_SIZES}")
    return fmt


def _num_blocks(k: int, block_size: int) -> int:
    return (k + block_size - 1) // block_size


# ----------------------------------------------------------------------------------------------
# Reference: plain torch
# ----------------------------------------------------------------------------------------------
def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """[..., K] codes < 16 -> [..., ceil(K/2)] uint8, even index in the low nibble."""
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return ((codes[..., 0::2] & 0xF) | ((codes[..., 1::2] & 0xF) << 4)).to(torch.uint8)


def _unpack_nibbles(packed: torch.Tensor, size: int) -> torch.Tensor:
    """[..., ceil(size/2)] uint8 -> [..., size] uint8 codes (low nibble first)."""
    p = packed.long()
    codes = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(*packed.shape[:-1], 2 * packed.shape[-1])
    return codes[..., :size].to(torch.uint8)


def to_mx_reference(x: torch.Tensor, elem: str | FloatFormat = "e4m3", block_size: int = 32,
                    rounding: str = "nearest", seed: int | torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``to_mx`` (same arguments, same result), in float64 on exact values."""
    fmt = get_format(elem)
    k = x.shape[-1]
    nb = _num_blocks(k, block_size)
    x32 = x.float()
    padded = torch.nn.functional.pad(x32, (0, nb * block_size - k))
    blocks = padded.reshape(*x.shape[:-1], nb, block_size).double()
    amax = blocks.abs().amax(dim=-1) if blocks.numel() else blocks.new_zeros(blocks.shape[:-1])
    finite = torch.isfinite(amax)
    # floor(log2(0)) = -inf clamps to the smallest scale; non-finite blocks are marked below.
    scale_exp = torch.clamp(floor_log2(torch.where(finite, amax, torch.zeros_like(amax))) - fmt.emax, -127, 127)
    scale_exp = torch.where(finite, scale_exp, torch.full_like(scale_exp, 128 - fmt.emax))
    scales = torch.where(finite, scale_exp + 127, torch.full_like(scale_exp, E8M0.nan_code)).to(torch.uint8)
    rand = None
    if rounding == "stochastic":
        col = torch.arange(nb * block_size, dtype=torch.int64, device=x.device)
        row = torch.arange(x32.numel() // k if k else 0, dtype=torch.int64, device=x.device)
        index = (row[:, None] * k + col[None, :]).reshape(*x.shape[:-1], nb, block_size)
        rand = random_bits_reference(seed_key(seed_tensor(seed, x.device)), index)
    codes = round_to_codes_reference(blocks, fmt, scale_exp=scale_exp[..., None], rounding=rounding, rand=rand,
                                     saturate=True)
    codes = codes.reshape(*x.shape[:-1], nb * block_size)[..., :k]
    elements = _pack_nibbles(codes) if fmt is E2M1 else codes.to(torch.uint8)
    return elements, scales


def from_mx_reference(elements: torch.Tensor, scales: torch.Tensor, elem: str | FloatFormat = "e4m3",
                      block_size: int = 32, dtype: torch.dtype = torch.float32, size: int | None = None) -> torch.Tensor:
    """Reference for ``from_mx`` (same arguments, same result)."""
    fmt = get_format(elem)
    k = _resolve_size(elements, fmt, size)
    codes = _unpack_nibbles(elements, k) if fmt is E2M1 else elements
    nb = scales.shape[-1]
    values = decode_fp_bits_reference(codes, fmt, torch.float64)
    values = torch.nn.functional.pad(values, (0, nb * block_size - k)).reshape(*codes.shape[:-1], nb, block_size)
    scale = decode_fp_bits_reference(scales, E8M0, torch.float32)
    # Same order of roundings as the kernel: exact element in float32, times the float32 scale.
    out = values.float() * scale[..., None]
    return out.reshape(*codes.shape[:-1], nb * block_size)[..., :k].to(dtype)


# ----------------------------------------------------------------------------------------------
# Launchers: the Triton kernels live in _mx_kernels, imported on the first launch
# ----------------------------------------------------------------------------------------------
def _blocks_per_program(backend: str, block_size: int) -> int:
    # The interpreter pays per program: ~16k elements each; on a GPU ~2k elements per program.
    return (16384 if backend == "interpret" else 2048) // block_size


def _to_mx_launch(x: torch.Tensor, fmt: FloatFormat, block_size: int, rounding: str, seed: torch.Tensor | None,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel path of ``to_mx``: ``x`` contiguous; ``seed`` 0-d int64 on x's device (stochastic only)."""
    k = x.shape[-1]
    nb = _num_blocks(k, block_size)
    lead = x.shape[:-1]
    packed = fmt is E2M1
    elements = torch.empty(*lead, (k + 1) // 2 if packed else k, dtype=torch.uint8, device=x.device)
    scales = torch.empty(*lead, nb, dtype=torch.uint8, device=x.device)
    n_blocks = scales.numel()
    if n_blocks == 0:
        return elements, scales
    from nexus_kernels import _mx_kernels

    stochastic = rounding == "stochastic"
    blocks = _blocks_per_program(backend, block_size)
    # Without stochastic rounding the seed is never read: x stands in for its pointer.
    _mx_kernels._to_mx_kernel[(-(-n_blocks // blocks),)](
        x, elements, scales, n_blocks, k, nb, seed if stochastic else x, **round_constexprs(fmt, saturate=True),
        STOCHASTIC=stochastic, PACKED=packed, BLOCK_SIZE=block_size, BLOCKS=blocks, num_warps=4)
    return elements, scales


def _from_mx_launch(elements: torch.Tensor, scales: torch.Tensor, fmt: FloatFormat, block_size: int,
                    dtype: torch.dtype, k: int, backend: str) -> torch.Tensor:
    out = torch.empty(*scales.shape[:-1], k, dtype=dtype, device=elements.device)
    n_blocks = scales.numel()
    if n_blocks == 0 or k == 0:
        return out
    from nexus_kernels import _mx_kernels

    blocks = _blocks_per_program(backend, block_size)
    _mx_kernels._from_mx_kernel[(-(-n_blocks // blocks),)](
        elements, scales, out, n_blocks, k, scales.shape[-1], **decode_constexprs(fmt), PACKED=fmt is E2M1,
        OUT_BF16=dtype == torch.bfloat16, BLOCK_SIZE=block_size, BLOCKS=blocks, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------
# Custom ops: the path is chosen inside, per call; fake implementations give shapes and dtypes
# ----------------------------------------------------------------------------------------------
def _to_mx_impl(x: torch.Tensor, elem: str, block_size: int, rounding: str,
              seed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    fmt = get_format(elem)
    if rounding == "stochastic" and seed is None:
        raise ValueError("stochastic rounding needs a seed tensor (to_mx draws one)")
    backend = select(x)
    if backend == "reference":
        elements, scales = to_mx_reference(x, fmt, block_size, rounding, seed)
        return elements.contiguous(), scales.contiguous()
    return _to_mx_launch(x.contiguous(), fmt, block_size, rounding, seed, backend)


def _to_mx_fake(x, elem, block_size, rounding, seed):
    k = x.shape[-1]
    width = (k + 1) // 2 if elem == "e2m1" else k
    return (x.new_empty(*x.shape[:-1], width, dtype=torch.uint8),
            x.new_empty(*x.shape[:-1], _num_blocks(k, block_size), dtype=torch.uint8))


def _from_mx_impl(elements: torch.Tensor, scales: torch.Tensor, elem: str, block_size: int, dtype: torch.dtype,
                size: int) -> torch.Tensor:
    fmt = get_format(elem)
    backend = select(elements, scales)
    if backend == "reference":
        return from_mx_reference(elements, scales, fmt, block_size, dtype, size).contiguous()
    return _from_mx_launch(elements.contiguous(), scales.contiguous(), fmt, block_size, dtype, size, backend)


to_mx_op = register_op("to_mx", _to_mx_impl, _to_mx_fake)
from_mx_op = register_op(
    "from_mx", _from_mx_impl,
    lambda elements, scales, elem, block_size, dtype, size: scales.new_empty(*scales.shape[:-1], size, dtype=dtype))


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _resolve_size(elements: torch.Tensor, fmt: FloatFormat, size: int | None) -> int:
    width = elements.shape[-1]
    if size is None:
        return 2 * width if fmt is E2M1 else width
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise ValueError(f"size must be a non-negative int, got {size!r}")
    expected = (size + 1) // 2 if fmt is E2M1 else size
    if expected != width:
        raise ValueError(f"size={size} needs elements.shape[-1] == {expected} for {fmt.name}, got {width}")
    return size


def to_mx(x: torch.Tensor, elem: str | FloatFormat = "e4m3", block_size: int = 32, rounding: str = "nearest",
          seed: int | torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantise ``x`` to MX: shared E8M0 scale per ``block_size`` elements of the last dim.

    Args: ``x`` [..., K] float32/bfloat16/float16 (any leading shape, any K); ``elem`` "e4m3" |
    "e5m2" | "e2m1"; ``block_size`` 32 | 64; ``rounding`` "nearest" | "stochastic"; ``seed`` for
    stochastic rounding: an int in [0, 2**64), a one-element integer tensor, or None (drawn from
    torch's generator).
    Returns: ``(elements, scales)``: uint8 [..., K] codes ([..., ceil(K/2)] for E2M1, two per byte,
    even index in the low nibble) and uint8 E8M0 codes [..., ceil(K / block_size)].

    >>> elements, scales = to_mx(torch.randn(4, 96), "e4m3")
    >>> x_hat = from_mx(elements, scales, "e4m3")          # [4, 96] float32
    """
    _check_float_input(x)
    fmt = _check_mx_args(elem, block_size)
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding={rounding!r}; expected one of nearest, stochastic")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (blocks run along the last dim)")
    seed = seed_tensor(seed, x.device) if rounding == "stochastic" else None
    return to_mx_op(x.detach().contiguous(), _op_format(fmt), block_size, rounding, seed)


def from_mx(elements: torch.Tensor, scales: torch.Tensor, elem: str | FloatFormat = "e4m3", block_size: int = 32,
            dtype: torch.dtype = torch.float32, size: int | None = None) -> torch.Tensor:
    """Dequantise MX ``(elements, scales)`` from ``to_mx``: element value times 2**(scale - 127).

    Args: ``elements`` uint8 [..., K] ([..., ceil(K/2)] packed for E2M1); ``scales`` uint8
    [..., ceil(K / block_size)]; ``elem``, ``block_size`` as given to ``to_mx``; ``dtype``
    float32/bfloat16/float16/float64; ``size`` the original K (needed for E2M1 with odd K;
    default: K, or 2 * packed width for E2M1).
    Returns: [..., K] ``dtype``; blocks with scale 0xFF are NaN.

    >>> elements, scales = to_mx(torch.randn(3, 65), "e2m1")
    >>> from_mx(elements, scales, "e2m1", size=65).shape
    torch.Size([3, 65])
    """
    for name, t in (("elements", elements), ("scales", scales)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype != torch.uint8:
            raise TypeError(f"{name} have dtype {t.dtype}; expected torch.uint8")
    fmt = _check_mx_args(elem, block_size)
    _check_output_dtype(dtype)
    if elements.dim() == 0 or elements.shape[:-1] != scales.shape[:-1]:
        raise ValueError(f"elements {tuple(elements.shape)} and scales {tuple(scales.shape)} must share leading dims")
    k = _resolve_size(elements, fmt, size)
    if scales.shape[-1] != _num_blocks(k, block_size):
        raise ValueError(f"scales.shape[-1]={scales.shape[-1]} but K={k} with block_size={block_size} needs "
                         f"{_num_blocks(k, block_size)} scales")
    return from_mx_op(elements.contiguous(), scales.contiguous(), _op_format(fmt), block_size, dtype, k)
