"""Casts from float32/bfloat16/float16 to E4M3, E5M2 and E2M1: round-to-nearest-even or stochastic.

Three public functions share one rounding rule:

- ``cast_to_fp(x, fmt)``: values of ``x``'s dtype that are exactly representable in ``fmt``;
- ``cast_to_fp_bits(x, fmt)``: the ``fmt`` codes as ``uint8`` (E2M1: one code per byte, low 4 bits);
- ``decode_fp_bits(codes, fmt)``: codes back to floats.

Rounding (of the value ``x`` read exactly as float32):

- ``"nearest"``: round to nearest, ties to even mantissa. Matches ``x.to(torch.float8_e4m3fn)`` and
  ``x.to(torch.float8_e5m2)`` bit for bit on every float32 whose rounded magnitude is <= max normal.
- ``"stochastic"``: with ``lo <= |x| <= hi`` the two neighbours, returns ``hi`` with probability
  ``(|x| - lo) / (hi - lo)``, so ``E[result] == x``. The probability is resolved to 2**-30 of the
  gap (values that fall below 2**-30 of it round down). Random bits are a counter-based hash of
  ``(seed, flat element index)`` (murmur3's 32-bit finaliser, applied twice), computed identically
  in the Triton kernel and the torch reference, so both return the same bits for the same seed.
  ``seed`` is an int in [0, 2**64) or a one-element integer tensor (its 64 bits, two's complement;
  a tensor seed drawn on the device needs no host sync and keeps ``torch.compile`` graphs whole).
  ``seed=None`` draws one with ``torch.randint`` on ``x``'s device (reproducible under
  ``torch.manual_seed``). The same seed on the same shape gives the same rounding: vary the seed
  per step.

Overflow (``|x|`` above max normal after rounding for ``"nearest"``; ``|x|`` above max normal for
``"stochastic"``), including +-inf:

- ``saturate=True`` (default): +-max normal (448, 57344, 6). This is what
  ``x.to(torch.float8_e4m3fn)`` does.
- ``saturate=False``: NaN for E4M3 (it has no inf), +-inf for E5M2 (as ``x.to(torch.float8_e5m2)``).
  E2M1 has neither inf nor NaN, so ``saturate=False`` with E2M1 raises ``ValueError``.

NaN stays NaN with its sign: code ``0x7F | sign`` for E4M3 and E5M2, and NaN in ``cast_to_fp``'s
float output for every format. E2M1 has no NaN code: ``cast_to_fp_bits`` writes +-6 (the
saturated value, keeping the sign) for NaN inputs; MX blocks mark NaN through their scale instead.
-0 keeps its sign (code 0x80, or 0x8 for E2M1), as do values that round to zero.

Float64, integer and complex inputs raise ``TypeError``; non-contiguous inputs are copied to a
contiguous layout first. The casts are not differentiable: outputs never require grad.

Each public function checks its arguments, turns ``seed`` into an int64 tensor, and calls its custom
op (``torch.ops.nexus.cast_to_fp_bits``, ``cast_to_fp``, ``decode_fp_bits``), which runs the
reference or the Triton kernel (``_cast_kernels``, imported on first launch) as ``select`` says.
"""
from __future__ import annotations

import torch

from nexus_kernels._backend import register_op, select
from nexus_kernels.formats import E8M0, FORMATS, FloatFormat, get_format

__all__ = [
    "cast_to_fp",
    "cast_to_fp_bits",
    "decode_fp_bits",
    "cast_to_fp_reference",
    "cast_to_fp_bits_reference",
    "decode_fp_bits_reference",
]

INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
OUTPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
ROUNDINGS = ("nearest", "stochastic")
_MASK32 = 0xFFFFFFFF
# Stochastic rounding resolves the rounding probability to this many bits (kernel and reference alike).
SR_BITS = 30


# ----------------------------------------------------------------------------------------------
# Input checks and seeds (shared with mx.py)
# ----------------------------------------------------------------------------------------------
def _check_float_input(x: torch.Tensor, what: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{what} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise TypeError(f"{what} has dtype {x.dtype}; expected one of float32, bfloat16, float16")


def _check_output_dtype(dtype: torch.dtype) -> None:
    if dtype not in OUTPUT_DTYPES:
        raise TypeError(f"dtype={dtype} is not supported; expected one of float32, bfloat16, float16, float64")


def _check_element_format(fmt: str | FloatFormat) -> FloatFormat:
    fmt = get_format(fmt)
    if fmt is E8M0 or not fmt.signed:
        raise ValueError(f"cannot cast to {fmt.name}: it is a scale format (use to_mx); expected e4m3, e5m2 or e2m1")
    return fmt


def _check_rounding(rounding: str, saturate: bool, fmt: FloatFormat) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding={rounding!r}; expected one of {', '.join(ROUNDINGS)}")
    if not saturate and not fmt.has_inf and fmt.nan_code is None:
        raise ValueError(f"saturate=False needs an inf or NaN code, and {fmt.name} has neither; use saturate=True")


def _op_format(fmt: FloatFormat) -> str:
    """The name a custom op takes for ``fmt``; the kernels and ops know the library's formats only."""
    if FORMATS.get(fmt.name) != fmt:
        raise ValueError(f"format {fmt.name!r} is not one of the library's formats ({', '.join(FORMATS)}); "
                         "the casts support those only")
    return fmt.name


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)


def seed_tensor(seed: int | torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """``seed`` as a 0-d int64 tensor on ``device`` (ints >= 2**63 wrap to their two's complement).

    ``None`` draws one with ``torch.randint`` on ``device`` (no host sync; ``torch.manual_seed``
    makes it repeatable). A tensor seed must hold one integer.
    """
    if seed is None:
        return torch.randint(0, 2**62, (), dtype=torch.int64, device=device)
    if isinstance(seed, torch.Tensor):
        if seed.dtype not in _INT_DTYPES:
            raise TypeError(f"a seed tensor must have an integer dtype, got {seed.dtype}")
        if seed.numel() != 1:
            raise ValueError(f"a seed tensor must hold one value, got shape {tuple(seed.shape)}")
        return seed.detach().to(device=device, dtype=torch.int64).reshape(())
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int, a one-element integer tensor or None, got {type(seed).__name__}")
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return torch.tensor(seed - 2**64 if seed >= 2**63 else seed, dtype=torch.int64, device=device)


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # (h * c) mod 2**32 without int64 overflow: split c into 16-bit halves.
    return (h * (c & 0xFFFF) + (((h * (c >> 16)) & 0xFFFF) << 16)) & _MASK32


def _fmix32_reference(h: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding values in [0, 2**32)."""
    h = h ^ (h >> 16)
    h = _mul32(h, 0x85EBCA6B)
    h = h ^ (h >> 13)
    h = _mul32(h, 0xC2B2AE35)
    return h ^ (h >> 16)


def seed_key(seed: torch.Tensor) -> torch.Tensor:
    """32-bit hash key (0-d int64 in [0, 2**32)) of an int64 seed tensor from ``seed_tensor``."""
    lo = seed & _MASK32
    hi = (seed >> 32) & _MASK32  # arithmetic shift, then the mask: the seed's high 32 bits
    return _fmix32_reference(lo ^ _fmix32_reference(hi ^ 0x9E3779B9))


def random_bits_reference(key: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Uniform 32-bit random numbers (int64 in [0, 2**32)) for flat element indices ``index`` (int64)."""
    lo = index & _MASK32
    hi = index >> 32
    return _fmix32_reference(_fmix32_reference(lo ^ key) ^ hi)


# ----------------------------------------------------------------------------------------------
# Reference: plain torch, float64 arithmetic on exact values
# ----------------------------------------------------------------------------------------------
def floor_log2(y: torch.Tensor) -> torch.Tensor:
    """floor(log2(y)) of float64 ``y`` >= 0 as float64 (-inf for 0), exact even where log2 is not."""
    e = torch.floor(torch.log2(y))
    e = torch.where(torch.isfinite(e) & (torch.exp2(e) > y), e - 1, e)
    return torch.where(torch.isfinite(e) & (torch.exp2(e + 1) <= y), e + 1, e)


def round_to_codes_reference(
    x: torch.Tensor,
    fmt: FloatFormat,
    *,
    scale_exp: torch.Tensor | int = 0,
    rounding: str = "nearest",
    rand: torch.Tensor | None = None,
    saturate: bool = True,
) -> torch.Tensor:
    """Codes (int64) of ``x / 2**scale_exp`` rounded to ``fmt``; ``rand``: 32-bit random ints for SR.

    ``x`` is read as float32 and the division by a power of two is done exactly in float64.
    """
    x64 = x.float().double()
    sign = torch.signbit(x64)
    y = x64.abs() * torch.pow(2.0, -torch.as_tensor(scale_exp, dtype=torch.float64))
    is_nan = torch.isnan(y)
    finite = torch.isfinite(y)
    y = torch.where(finite, y, torch.zeros_like(y))
    # Exponent of the quantum: floor(log2|y|) for normals, emin in the subnormal range and for 0.
    e = floor_log2(y).clamp(min=fmt.emin)
    units = y * torch.exp2(fmt.man_bits - e)
    if rounding == "nearest":
        q = torch.round(units)  # torch.round is round-half-to-even
        overflow = ~finite
    else:
        # Probability resolved to 2**-SR_BITS of the gap, then up iff frac + rand/2**32 >= 1.
        units = torch.floor(units * 2.0**SR_BITS) / 2.0**SR_BITS
        q = torch.floor(units + rand.double() / 2.0**32)
        overflow = ~finite | (y > fmt.max_normal)
    # Mantissa carries into the exponent field naturally: q == 2**(man+1) is the next binade.
    code = ((e - fmt.emin) * 2**fmt.man_bits + q).long()
    overflow = overflow | (code > fmt.max_code)
    overflow_code = fmt.max_code if saturate else (fmt.inf_code if fmt.has_inf else fmt.nan_code)
    code = torch.where(overflow, torch.full_like(code, overflow_code), code)
    nan_code = fmt.nan_code if fmt.nan_code is not None else fmt.max_code
    code = torch.where(is_nan, torch.full_like(code, nan_code), code)
    return code | (sign.long() * fmt.sign_bit)


def decode_fp_bits_reference(codes: torch.Tensor, fmt: str | FloatFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference for ``decode_fp_bits``: the value of each code, in float64, converted to ``dtype``."""
    fmt = get_format(fmt)
    c = codes.long() & ((1 << fmt.bits) - 1)
    mag = c & ((1 << (fmt.exp_bits + fmt.man_bits)) - 1)
    biased = (mag >> fmt.man_bits).double()
    man = (mag & ((1 << fmt.man_bits) - 1)).double()
    normal = (1.0 + man / 2**fmt.man_bits) * torch.pow(2.0, biased - fmt.bias)
    if fmt.man_bits > 0:
        subnormal = man * 2.0 ** (fmt.emin - fmt.man_bits)
        value = torch.where(biased == 0, subnormal, normal)
    else:
        value = normal  # E8M0: code 0 is 2**-127, no subnormals
    if fmt.has_inf:
        top = biased == (1 << fmt.exp_bits) - 1
        value = torch.where(top & (man == 0), torch.full_like(value, float("inf")), value)
        value = torch.where(top & (man != 0), torch.full_like(value, float("nan")), value)
    elif fmt.nan_code is not None:
        value = torch.where(mag == fmt.nan_code, torch.full_like(value, float("nan")), value)
    if fmt.signed:
        value = torch.where((c & fmt.sign_bit) != 0, -value, value)
    return value.to(dtype)


def cast_to_fp_bits_reference(x, fmt, rounding="nearest", seed=None, saturate=True) -> torch.Tensor:
    """Reference for ``cast_to_fp_bits`` (same arguments, same result)."""
    fmt = get_format(fmt)
    rand = None
    if rounding == "stochastic":
        index = torch.arange(x.numel(), dtype=torch.int64, device=x.device).view(x.shape)
        rand = random_bits_reference(seed_key(seed_tensor(seed, x.device)), index)
    codes = round_to_codes_reference(x, fmt, rounding=rounding, rand=rand, saturate=saturate)
    return codes.to(torch.uint8)


def cast_to_fp_reference(x, fmt, rounding="nearest", seed=None, saturate=True) -> torch.Tensor:
    """Reference for ``cast_to_fp`` (same arguments, same result)."""
    fmt = get_format(fmt)
    codes = cast_to_fp_bits_reference(x, fmt, rounding, seed, saturate)
    value = decode_fp_bits_reference(codes, fmt, torch.float64)
    value = torch.where(torch.isnan(x), torch.full_like(value, float("nan")), value)
    return value.to(x.dtype)


# ----------------------------------------------------------------------------------------------
# Launchers: the Triton kernels live in _cast_kernels, imported on the first launch
# ----------------------------------------------------------------------------------------------
def round_constexprs(fmt: FloatFormat, saturate: bool) -> dict:
    """Compile-time constants of ``_round_to_code_tl`` for ``fmt``."""
    overflow = fmt.max_code if saturate else (fmt.inf_code if fmt.has_inf else fmt.nan_code)
    max_sig = ((1 << fmt.man_bits) | (fmt.max_code & ((1 << fmt.man_bits) - 1))) << (23 - fmt.man_bits)
    return dict(MAN_BITS=fmt.man_bits, EMIN=fmt.emin, EMAX=fmt.emax, MAX_CODE=fmt.max_code, MAX_SIG=max_sig,
                OVERFLOW_CODE=overflow, NAN_CODE=fmt.nan_code if fmt.nan_code is not None else fmt.max_code,
                SIGN_SHIFT=fmt.exp_bits + fmt.man_bits, SR_RES=SR_BITS)


def decode_constexprs(fmt: FloatFormat) -> dict:
    """Compile-time constants of ``_decode_code_tl`` for ``fmt``."""
    return dict(EXP_BITS=fmt.exp_bits, MAN_BITS=fmt.man_bits, BIAS=fmt.bias, SIGNED=fmt.signed,
                HAS_INF=fmt.has_inf, NAN_CODE=fmt.nan_code if fmt.nan_code is not None else -1)


def _block_for(backend: str) -> int:
    # The interpreter pays per program: few large programs; on a GPU 1024 elements per program.
    return 16384 if backend == "interpret" else 1024


def _cast_launch(x: torch.Tensor, fmt: FloatFormat, rounding: str, seed: torch.Tensor | None, saturate: bool,
                 out_codes: bool, backend: str) -> torch.Tensor:
    """Kernel path of the casts: ``x`` contiguous; ``seed`` 0-d int64 on x's device (stochastic only)."""
    out = torch.empty(x.shape, dtype=torch.uint8 if out_codes else x.dtype, device=x.device)
    n = x.numel()
    if n == 0:
        return out
    from nexus_kernels import _cast_kernels

    stochastic = rounding == "stochastic"
    block = _block_for(backend)
    dec = decode_constexprs(fmt)
    # Without stochastic rounding the seed is never read: x stands in for its pointer.
    _cast_kernels._cast_kernel[(-(-n // block),)](
        x, out, n, seed if stochastic else x, **round_constexprs(fmt, saturate), EXP_BITS=fmt.exp_bits,
        BIAS=fmt.bias, HAS_INF=fmt.has_inf, DEC_NAN_CODE=dec["NAN_CODE"], STOCHASTIC=stochastic,
        OUT_CODES=out_codes, OUT_BF16=out.dtype == torch.bfloat16, BLOCK=block, num_warps=4)
    return out


def _decode_launch(codes: torch.Tensor, fmt: FloatFormat, dtype: torch.dtype, backend: str) -> torch.Tensor:
    out = torch.empty(codes.shape, dtype=dtype, device=codes.device)
    n = codes.numel()
    if n == 0:
        return out
    from nexus_kernels import _cast_kernels

    block = _block_for(backend)
    _cast_kernels._decode_kernel[(-(-n // block),)](
        codes, out, n, **decode_constexprs(fmt), OUT_BF16=dtype == torch.bfloat16, BLOCK=block, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------
# Custom ops: the path is chosen inside, per call; fake implementations give shapes and dtypes
# ----------------------------------------------------------------------------------------------
def _cast_impl(x: torch.Tensor, fmt: str, rounding: str, seed: torch.Tensor | None, saturate: bool,
               out_codes: bool) -> torch.Tensor:
    fmt = get_format(fmt)
    if rounding == "stochastic" and seed is None:
        raise ValueError("stochastic rounding needs a seed tensor (the public functions draw one)")
    backend = select(x)
    if backend == "reference":
        reference = cast_to_fp_bits_reference if out_codes else cast_to_fp_reference
        return reference(x, fmt, rounding, seed, saturate).contiguous()
    return _cast_launch(x.contiguous(), fmt, rounding, seed, saturate, out_codes, backend)


def _cast_to_fp_bits_impl(x: torch.Tensor, fmt: str, rounding: str, seed: torch.Tensor | None,
                          saturate: bool) -> torch.Tensor:
    return _cast_impl(x, fmt, rounding, seed, saturate, out_codes=True)


def _cast_to_fp_impl(x: torch.Tensor, fmt: str, rounding: str, seed: torch.Tensor | None,
                     saturate: bool) -> torch.Tensor:
    return _cast_impl(x, fmt, rounding, seed, saturate, out_codes=False)


def _decode_fp_bits_impl(codes: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    backend = select(codes)
    if backend == "reference":
        return decode_fp_bits_reference(codes, fmt, dtype).contiguous()
    return _decode_launch(codes.contiguous(), get_format(fmt), dtype, backend)


cast_to_fp_bits_op = register_op(
    "cast_to_fp_bits", _cast_to_fp_bits_impl,
    lambda x, fmt, rounding, seed, saturate: x.new_empty(x.shape, dtype=torch.uint8))
cast_to_fp_op = register_op(
    "cast_to_fp", _cast_to_fp_impl, lambda x, fmt, rounding, seed, saturate: x.new_empty(x.shape))
decode_fp_bits_op = register_op(
    "decode_fp_bits", _decode_fp_bits_impl, lambda codes, fmt, dtype: codes.new_empty(codes.shape, dtype=dtype))


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _op_seed(x: torch.Tensor, rounding: str, seed: int | torch.Tensor | None) -> torch.Tensor | None:
    """The op's seed argument: an int64 tensor on x's device for stochastic rounding, else None."""
    return seed_tensor(seed, x.device) if rounding == "stochastic" else None


def cast_to_fp_bits(x: torch.Tensor, fmt: str | FloatFormat, rounding: str = "nearest",
                    seed: int | torch.Tensor | None = None, saturate: bool = True) -> torch.Tensor:
    """Round ``x`` to ``fmt`` and return the codes.

    Args: ``x`` [...] float32/bfloat16/float16; ``fmt`` "e4m3" | "e5m2" | "e2m1" or a FloatFormat;
    ``rounding`` "nearest" | "stochastic"; ``seed`` for stochastic rounding (ignored for nearest): an
    int in [0, 2**64), a one-element integer tensor, or None (drawn from torch's generator);
    ``saturate`` clamp overflow to +-max normal (see the module docstring for the other choice).
    Returns: uint8 [...], same shape; E2M1 codes sit in the low 4 bits (sign = bit 3), unpacked.

    >>> cast_to_fp_bits(torch.tensor([1.0, -448.0, 1e6]), "e4m3")
    tensor([ 56, 254, 126], dtype=torch.uint8)
    """
    _check_float_input(x)
    fmt = _check_element_format(fmt)
    _check_rounding(rounding, saturate, fmt)
    seed = _op_seed(x, rounding, seed)
    return cast_to_fp_bits_op(x.detach().contiguous(), _op_format(fmt), rounding, seed, saturate)


def cast_to_fp(x: torch.Tensor, fmt: str | FloatFormat, rounding: str = "nearest",
               seed: int | torch.Tensor | None = None, saturate: bool = True) -> torch.Tensor:
    """Round ``x`` to the values of ``fmt``, returned in ``x``'s dtype (fake quantisation).

    Args as ``cast_to_fp_bits``. Returns: [...] of ``x.dtype``, every value exactly representable in
    ``fmt`` (or NaN where ``x`` is NaN, or +-inf / NaN on overflow with ``saturate=False``).

    >>> cast_to_fp(torch.tensor([0.3, 5.0, 100.0]), "e2m1")
    tensor([0.5000, 4.0000, 6.0000])
    """
    _check_float_input(x)
    fmt = _check_element_format(fmt)
    _check_rounding(rounding, saturate, fmt)
    seed = _op_seed(x, rounding, seed)
    return cast_to_fp_op(x.detach().contiguous(), _op_format(fmt), rounding, seed, saturate)


def decode_fp_bits(codes: torch.Tensor, fmt: str | FloatFormat, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Values of ``fmt`` codes.

    Args: ``codes`` [...] uint8 (E2M1: the low 4 bits are read, the high 4 ignored); ``fmt`` any of
    e4m3/e5m2/e2m1/e8m0; ``dtype`` float32/bfloat16/float16/float64.
    Returns: [...] ``dtype``; NaN codes give NaN, E5M2's inf codes give +-inf.

    >>> decode_fp_bits(torch.tensor([56, 254], dtype=torch.uint8), "e4m3")
    tensor([   1., -448.])
    """
    if not isinstance(codes, torch.Tensor):
        raise TypeError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if codes.dtype != torch.uint8:
        raise TypeError(f"codes have dtype {codes.dtype}; expected torch.uint8")
    fmt = get_format(fmt)
    _check_output_dtype(dtype)
    return decode_fp_bits_op(codes.contiguous(), _op_format(fmt), dtype)
