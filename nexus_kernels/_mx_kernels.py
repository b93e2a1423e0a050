"""Triton kernels of ``nexus_kernels.mx``: one pass per tile of MX blocks.

Imported only by the launchers in ``mx.py`` when a kernel runs (Triton is optional). The
quantisation rules are documented in ``mx.py``; its reference computes the same bits.
"""
from __future__ import annotations

import triton
import triton.language as tl

from nexus_kernels._cast_kernels import (
    _decode_code_tl,
    _random_bits_tl,
    _round_to_code_tl,
    _seed_key_tl,
    _store_float_tl,
)


@triton.jit
def _mx_scale_tl(amax_bits, EMAX: tl.constexpr):
    """(scale code, scale exponent) from the float32 bits of a block's amax (integer max of |bits|)."""
    e32 = amax_bits >> 23
    code = tl.minimum(tl.maximum(e32 - EMAX, 0), 254)
    return tl.where(amax_bits >= 0x7F800000, 255, code), code - 127


@triton.jit
def _to_mx_kernel(x_ptr, elem_ptr, scale_ptr, n_blocks, K, NB, seed_ptr, MAN_BITS: tl.constexpr, EMIN: tl.constexpr,
                  EMAX: tl.constexpr, MAX_CODE: tl.constexpr, MAX_SIG: tl.constexpr, OVERFLOW_CODE: tl.constexpr,
                  NAN_CODE: tl.constexpr, SIGN_SHIFT: tl.constexpr, SR_RES: tl.constexpr,
                  STOCHASTIC: tl.constexpr, PACKED: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCKS: tl.constexpr):
    """One program quantises BLOCKS MX blocks; ``seed_ptr``: int64 seed (read only when STOCHASTIC)."""
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    blk_ok = blk < n_blocks
    row = blk // NB
    j = blk % NB
    if STOCHASTIC:
        key = _seed_key_tl(seed_ptr)
    else:
        key = 0
    if PACKED:
        HALF: tl.constexpr = BLOCK_SIZE // 2
        i = tl.arange(0, HALF)
        col = j[:, None] * BLOCK_SIZE + 2 * i[None, :]
        idx = row[:, None] * K + col
        x_even = tl.load(x_ptr + idx, mask=blk_ok[:, None] & (col < K), other=0.0).to(tl.float32)
        x_odd = tl.load(x_ptr + idx + 1, mask=blk_ok[:, None] & (col + 1 < K), other=0.0).to(tl.float32)
        b_even = x_even.to(tl.int32, bitcast=True)
        b_odd = x_odd.to(tl.int32, bitcast=True)
        amax = tl.maximum(tl.max(b_even & 0x7FFFFFFF, axis=1), tl.max(b_odd & 0x7FFFFFFF, axis=1))
        scale_code, scale_exp = _mx_scale_tl(amax, EMAX)
        if STOCHASTIC:
            r_even = _random_bits_tl(key, idx)
            r_odd = _random_bits_tl(key, idx + 1)
        else:
            r_even = 0
            r_odd = 0
        c_even = _round_to_code_tl(b_even, scale_exp[:, None], r_even, MAN_BITS, EMIN, EMAX, MAX_CODE, MAX_SIG,
                                   OVERFLOW_CODE, NAN_CODE, SIGN_SHIFT, STOCHASTIC, SR_RES)
        c_odd = _round_to_code_tl(b_odd, scale_exp[:, None], r_odd, MAN_BITS, EMIN, EMAX, MAX_CODE, MAX_SIG,
                                  OVERFLOW_CODE, NAN_CODE, SIGN_SHIFT, STOCHASTIC, SR_RES)
        c_odd = tl.where(col + 1 < K, c_odd, 0)  # a padded odd slot packs as code 0, like the reference
        packed = (c_even & 0xF) | ((c_odd & 0xF) << 4)
        K_HALF = (K + 1) // 2
        pcol = j[:, None] * HALF + i[None, :]
        tl.store(elem_ptr + row[:, None] * K_HALF + pcol, packed.to(tl.uint8), mask=blk_ok[:, None] & (pcol < K_HALF))
    else:
        i = tl.arange(0, BLOCK_SIZE)
        col = j[:, None] * BLOCK_SIZE + i[None, :]
        idx = row[:, None] * K + col
        mask = blk_ok[:, None] & (col < K)
        bits = tl.load(x_ptr + idx, mask=mask, other=0.0).to(tl.float32).to(tl.int32, bitcast=True)
        amax = tl.max(bits & 0x7FFFFFFF, axis=1)
        scale_code, scale_exp = _mx_scale_tl(amax, EMAX)
        if STOCHASTIC:
            rand = _random_bits_tl(key, idx)
        else:
            rand = 0
        code = _round_to_code_tl(bits, scale_exp[:, None], rand, MAN_BITS, EMIN, EMAX, MAX_CODE, MAX_SIG,
                                 OVERFLOW_CODE, NAN_CODE, SIGN_SHIFT, STOCHASTIC, SR_RES)
        tl.store(elem_ptr + idx, code.to(tl.uint8), mask=mask)
    tl.store(scale_ptr + blk, scale_code.to(tl.uint8), mask=blk_ok)


@triton.jit
def _from_mx_kernel(elem_ptr, scale_ptr, out_ptr, n_blocks, K, NB, EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr,
                    BIAS: tl.constexpr, SIGNED: tl.constexpr, HAS_INF: tl.constexpr, NAN_CODE: tl.constexpr,
                    PACKED: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCKS: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    blk_ok = blk < n_blocks
    row = blk // NB
    j = blk % NB
    s = tl.load(scale_ptr + blk, mask=blk_ok, other=127).to(tl.int32)
    # E8M0 -> float32 bits: 2**(s-127); code 0 is the subnormal 2**-127; 0xFF is NaN.
    s_bits = tl.where(s == 0, 0x00400000, s << 23)
    scale = tl.where(s == 255, 0x7FC00000, s_bits).to(tl.float32, bitcast=True)
    if PACKED:
        HALF: tl.constexpr = BLOCK_SIZE // 2
        i = tl.arange(0, HALF)
        K_HALF = (K + 1) // 2
        pcol = j[:, None] * HALF + i[None, :]
        byte = tl.load(elem_ptr + row[:, None] * K_HALF + pcol, mask=blk_ok[:, None] & (pcol < K_HALF),
                       other=0).to(tl.int32)
        v_even = _decode_code_tl(byte & 0xF, EXP_BITS, MAN_BITS, BIAS, SIGNED, HAS_INF, NAN_CODE) * scale[:, None]
        v_odd = _decode_code_tl(byte >> 4, EXP_BITS, MAN_BITS, BIAS, SIGNED, HAS_INF, NAN_CODE) * scale[:, None]
        col = 2 * pcol
        idx = row[:, None] * K + col
        _store_float_tl(out_ptr + idx, v_even, blk_ok[:, None] & (col < K), OUT_BF16)
        _store_float_tl(out_ptr + idx + 1, v_odd, blk_ok[:, None] & (col + 1 < K), OUT_BF16)
    else:
        i = tl.arange(0, BLOCK_SIZE)
        col = j[:, None] * BLOCK_SIZE + i[None, :]
        idx = row[:, None] * K + col
        mask = blk_ok[:, None] & (col < K)
        code = tl.load(elem_ptr + idx, mask=mask, other=0).to(tl.int32)
        value = _decode_code_tl(code, EXP_BITS, MAN_BITS, BIAS, SIGNED, HAS_INF, NAN_CODE) * scale[:, None]
        _store_float_tl(out_ptr + idx, value, mask, OUT_BF16)
