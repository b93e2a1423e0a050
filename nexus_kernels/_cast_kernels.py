"""Triton kernels of ``nexus_kernels.cast``: integer bit arithmetic on float32 bits.

Imported only by the launchers in ``cast.py`` and ``_mx_kernels.py`` when a kernel runs, so that
``import nexus_kernels`` works where Triton is not installed. The rounding rule, the random
stream and the overflow/NaN handling are documented in ``cast.py``; ``cast.py``'s reference
computes the same bits.
"""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _fmix32_tl(h):
    h = h ^ (h >> 16)
    h = h * 0x85EBCA6B
    h = h ^ (h >> 13)
    h = h * 0xC2B2AE35
    return h ^ (h >> 16)


@triton.jit
def _seed_key_tl(seed_ptr):
    """32-bit hash key (uint32) of the int64 seed at ``seed_ptr``: same hash as ``cast.seed_key``."""
    seed = tl.load(seed_ptr)
    lo = (seed & 0xFFFFFFFF).to(tl.uint32)
    hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return _fmix32_tl(lo ^ _fmix32_tl(hi ^ 0x9E3779B9))


@triton.jit
def _random_bits_tl(key, index):
    """32-bit uniform ints (uint32) for int64 ``index``: same hash as ``random_bits_reference``."""
    lo = (index & 0xFFFFFFFF).to(tl.uint32)
    hi = (index >> 32).to(tl.uint32)
    return _fmix32_tl(_fmix32_tl(lo ^ key) ^ hi)


@triton.jit
def _round_to_code_tl(bits, scale_exp, rand, MAN_BITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr,
                      MAX_CODE: tl.constexpr, MAX_SIG: tl.constexpr, OVERFLOW_CODE: tl.constexpr,
                      NAN_CODE: tl.constexpr, SIGN_SHIFT: tl.constexpr, STOCHASTIC: tl.constexpr,
                      SR_RES: tl.constexpr):
    """Code (int32) of float32 ``bits`` / 2**scale_exp rounded to the format.

    The magnitude is sig * 2**(e - 23) with a 24-bit significand; rounding to the format's quantum
    2**(max(e, EMIN) - MAN_BITS) drops ``s`` low bits of ``sig``; RNE uses the dropped bits as
    guard + sticky, SR adds ``s`` random bits before truncating. The code is then
    ((max(e, EMIN) - EMIN) << MAN_BITS) + q, which carries into the exponent when q overflows.
    """
    sign = (bits >> 31) & 1
    a = bits & 0x7FFFFFFF
    e32 = a >> 23
    sig = tl.where(e32 > 0, (a & 0x7FFFFF) | 0x800000, a & 0x7FFFFF)
    e = tl.where(e32 > 0, e32 - 127, -126)
    # Normalise float32 subnormals (a scale of 2**-127 can lift them into range): 5-step clz.
    c = sig < (1 << 8)
    sig = tl.where(c, sig << 16, sig)
    e = tl.where(c, e - 16, e)
    c = sig < (1 << 16)
    sig = tl.where(c, sig << 8, sig)
    e = tl.where(c, e - 8, e)
    c = sig < (1 << 20)
    sig = tl.where(c, sig << 4, sig)
    e = tl.where(c, e - 4, e)
    c = sig < (1 << 22)
    sig = tl.where(c, sig << 2, sig)
    e = tl.where(c, e - 2, e)
    c = sig < (1 << 23)
    sig = tl.where(c, sig << 1, sig)
    e = tl.where(c, e - 1, e)
    e = e - scale_exp
    s = (23 - MAN_BITS) + tl.maximum(EMIN - e, 0)
    # Keep at most SR_RES dropped bits (shift amounts stay below 32; sig < 2**24 fits).
    extra = tl.minimum(tl.maximum(s - SR_RES, 0), 31)
    sig_s = sig >> extra
    s = tl.minimum(s, SR_RES)
    if STOCHASTIC:
        q = (sig_s + (rand >> (32 - s)).to(tl.int32)) >> s
    else:
        q = sig_s >> s
        rem = sig_s & ((1 << s) - 1)
        half = 1 << (s - 1)
        q = q + ((rem > half) | ((rem == half) & ((q & 1) == 1))).to(tl.int32)
    code = ((tl.maximum(e, EMIN) - EMIN) << MAN_BITS) + q
    overflow = (code > MAX_CODE) | (e32 == 255)
    if STOCHASTIC:
        # SR overflows when |x| itself exceeds max normal, so in-range inputs keep both neighbours.
        overflow = overflow | (e > EMAX) | ((e == EMAX) & (sig > MAX_SIG))
    code = tl.where(overflow, OVERFLOW_CODE, code)
    code = tl.where(a > 0x7F800000, NAN_CODE, code)
    return code | (sign << SIGN_SHIFT)


@triton.jit
def _decode_code_tl(code, EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr,
                    SIGNED: tl.constexpr, HAS_INF: tl.constexpr, NAN_CODE: tl.constexpr):
    """float32 value of int32 ``code``: built as float32 bits (normals) or m * 2**(emin - man) (subnormals)."""
    MAG_BITS: tl.constexpr = EXP_BITS + MAN_BITS
    mag = code & ((1 << MAG_BITS) - 1)
    biased = mag >> MAN_BITS
    man = mag & ((1 << MAN_BITS) - 1)
    normal_bits = ((biased - BIAS + 127) << 23) | (man << (23 - MAN_BITS))
    if MAN_BITS == 0:
        # E8M0: code 0 is 2**-127, a float32 subnormal.
        out_bits = tl.where(biased == 0, 0x00400000, normal_bits)
    else:
        sub = man.to(tl.float32) * (2.0 ** (1 - BIAS - MAN_BITS))
        out_bits = tl.where(biased == 0, sub.to(tl.int32, bitcast=True), normal_bits)
    if HAS_INF:
        top = biased == (1 << EXP_BITS) - 1
        out_bits = tl.where(top, tl.where(man == 0, 0x7F800000, 0x7FC00000), out_bits)
    elif NAN_CODE >= 0:
        out_bits = tl.where(mag == NAN_CODE, 0x7FC00000, out_bits)
    if SIGNED:
        out_bits = out_bits | (((code >> MAG_BITS) & 1) << 31)
    return out_bits.to(tl.float32, bitcast=True)


@triton.jit
def _store_float_tl(ptr, value, mask, OUT_BF16: tl.constexpr):
    """Store float32 ``value`` to ``ptr``'s dtype; bfloat16 rounds in integers (the interpreter's
    float32 -> bfloat16 cast is wrong on subnormals): RNE on the top 16 bits, NaN kept quiet."""
    if OUT_BF16:
        b = value.to(tl.uint32, bitcast=True)
        r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
        r = tl.where(value != value, (b >> 16) | 0x40, r)
        tl.store(ptr, r.to(tl.uint16).to(tl.bfloat16, bitcast=True), mask=mask)
    else:
        tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cast_kernel(x_ptr, out_ptr, n, seed_ptr, MAN_BITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr,
                 MAX_CODE: tl.constexpr, MAX_SIG: tl.constexpr, OVERFLOW_CODE: tl.constexpr,
                 NAN_CODE: tl.constexpr, SIGN_SHIFT: tl.constexpr, SR_RES: tl.constexpr, EXP_BITS: tl.constexpr,
                 BIAS: tl.constexpr, HAS_INF: tl.constexpr, DEC_NAN_CODE: tl.constexpr,
                 STOCHASTIC: tl.constexpr, OUT_CODES: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK: tl.constexpr):
    """Elementwise cast; ``seed_ptr``: int64 seed on the device (read only when STOCHASTIC)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    bits = x.to(tl.int32, bitcast=True)
    if STOCHASTIC:
        rand = _random_bits_tl(_seed_key_tl(seed_ptr), offs)
    else:
        rand = 0
    code = _round_to_code_tl(bits, 0, rand, MAN_BITS, EMIN, EMAX, MAX_CODE, MAX_SIG, OVERFLOW_CODE, NAN_CODE,
                             SIGN_SHIFT, STOCHASTIC, SR_RES)
    if OUT_CODES:
        tl.store(out_ptr + offs, code.to(tl.uint8), mask=mask)
    else:
        value = _decode_code_tl(code, EXP_BITS, MAN_BITS, BIAS, True, HAS_INF, DEC_NAN_CODE)
        value = tl.where(x != x, x, value)  # NaN stays NaN even where the format has no NaN code
        _store_float_tl(out_ptr + offs, value, mask, OUT_BF16)


@triton.jit
def _decode_kernel(code_ptr, out_ptr, n, EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr,
                   SIGNED: tl.constexpr, HAS_INF: tl.constexpr, NAN_CODE: tl.constexpr, OUT_BF16: tl.constexpr,
                   BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    code = tl.load(code_ptr + offs, mask=mask, other=0).to(tl.int32)
    code = code & ((1 << (EXP_BITS + MAN_BITS + SIGNED)) - 1)
    value = _decode_code_tl(code, EXP_BITS, MAN_BITS, BIAS, SIGNED, HAS_INF, NAN_CODE)
    _store_float_tl(out_ptr + offs, value, mask, OUT_BF16)
