"""Triton kernels of ``nexus_kernels.comm_quant``: one pass per tile of blocks.

Imported only by the launchers in ``comm_quant.py`` when a kernel runs (Triton is optional). The
layout and the rounding rules are documented in ``comm_quant.py``; its reference computes the
same bytes. Rounding is done on exact values (``div_rn`` is the correctly rounded float32
quotient; the rest is integer arithmetic or exact float32 steps), so the kernel does not depend on
the device's rounding of float -> int casts or on the interpreter's float -> fp8 cast.
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
def _block_scale_tl(amax_bits, QMAX: tl.constexpr):
    """(scale float32, scale bits int32, ok) from the int32 max of |bits| of each block.

    scale = amax / QMAX (correctly rounded); NaN (bits 0x7FC00000) where amax is inf or NaN;
    ``ok``: finite and > 0 (a zero scale, amax == 0 or underflowed, quantizes everything to 0).
    """
    finite = amax_bits < 0x7F800000
    amax = amax_bits.to(tl.float32, bitcast=True)
    scale = tl.math.div_rn(amax, tl.full(amax.shape, QMAX, tl.float32))
    s_bits = tl.where(finite, scale.to(tl.int32, bitcast=True), 0x7FC00000)
    return s_bits.to(tl.float32, bitcast=True), s_bits, finite & (scale > 0)


@triton.jit
def _quantize_tl(x, scale, ok, rand, QMAX: tl.constexpr, IS_INT: tl.constexpr, BITS: tl.constexpr,
                 MAN_BITS: tl.constexpr, EMIN: tl.constexpr, EMAX: tl.constexpr, MAX_CODE: tl.constexpr,
                 MAX_SIG: tl.constexpr, OVERFLOW_CODE: tl.constexpr, NAN_CODE: tl.constexpr,
                 SIGN_SHIFT: tl.constexpr, SR_RES: tl.constexpr, STOCHASTIC: tl.constexpr):
    """Codes (int32, low BITS bits) of float32 ``x`` [B, E] in blocks with ``scale``/``ok`` [B, 1]."""
    y = tl.math.div_rn(x, tl.where(ok, scale, 1.0))
    y = tl.where(ok, y, 0.0)
    if IS_INT:
        y = tl.minimum(tl.maximum(y, -QMAX), QMAX)
        if STOCHASTIC:
            # floor from the truncation (tl.math.floor lowers to an ftz instruction on NVIDIA GPUs)
            t = y.to(tl.int32)
            lo = t - (t.to(tl.float32) > y).to(tl.int32)
            frac = ((y - lo.to(tl.float32)) * (1 << SR_RES)).to(tl.int32)  # float32 y - lo, as the reference
            up = ((rand >> (32 - SR_RES)).to(tl.int32) + frac) >= (1 << SR_RES)
            q = lo + up.to(tl.int32)
        else:
            # Round half to even on exact values: t = trunc(y), r = y - t in (-1, 1) exactly.
            t = y.to(tl.int32)
            r = tl.abs(y - t.to(tl.float32))
            away = (r > 0.5) | ((r == 0.5) & ((t & 1) == 1))
            q = t + tl.where(away, tl.where(y < 0, -1, 1), 0)
        code = q & ((1 << BITS) - 1)
    else:
        code = _round_to_code_tl(y.to(tl.int32, bitcast=True), 0, rand, MAN_BITS, EMIN, EMAX, MAX_CODE, MAX_SIG,
                                 OVERFLOW_CODE, NAN_CODE, SIGN_SHIFT, STOCHASTIC, SR_RES)
    return tl.where(ok, code, 0)


@triton.jit
def _quantize_pack_kernel(x_ptr, out_ptr, n_blocks, N, NB, ROW_BYTES, seed_ptr, QMAX: tl.constexpr,
                          IS_INT: tl.constexpr, BITS: tl.constexpr, MAN_BITS: tl.constexpr, EMIN: tl.constexpr,
                          EMAX: tl.constexpr, MAX_CODE: tl.constexpr, MAX_SIG: tl.constexpr,
                          OVERFLOW_CODE: tl.constexpr, NAN_CODE: tl.constexpr, SIGN_SHIFT: tl.constexpr,
                          SR_RES: tl.constexpr, STOCHASTIC: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          BLOCKS: tl.constexpr):
    """One program quantizes and packs BLOCKS blocks of ``x`` [rows, N] into ``out`` [rows, ROW_BYTES].

    ``seed_ptr``: int64 seed (read only when STOCHASTIC). Block ``blk`` is (row, j) = divmod(blk, NB).
    """
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    blk_ok = blk < n_blocks
    row = blk // NB
    j = blk % NB
    PAYLOAD: tl.constexpr = BLOCK_SIZE * BITS // 8
    i = tl.arange(0, BLOCK_SIZE)
    col = j[:, None] * BLOCK_SIZE + i[None, :]
    idx = row[:, None] * N + col
    x = tl.load(x_ptr + idx, mask=blk_ok[:, None] & (col < N), other=0.0).to(tl.float32)
    amax = tl.max(x.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=1)
    scale, s_bits, ok = _block_scale_tl(amax, QMAX)
    if STOCHASTIC:
        rand = _random_bits_tl(_seed_key_tl(seed_ptr), idx)
    else:
        rand = 0
    # Padding columns (col >= N) hold x = 0, i.e. code 0: whole blocks are stored.
    code = _quantize_tl(x, scale[:, None], ok[:, None], rand, QMAX, IS_INT, BITS, MAN_BITS, EMIN, EMAX, MAX_CODE,
                        MAX_SIG, OVERFLOW_CODE, NAN_CODE, SIGN_SHIFT, SR_RES, STOCHASTIC)
    if BITS == 4:
        # Pairs (2p, 2p + 1) of each block side by side, the even one into the low nibble.
        c_even, c_odd = tl.split(tl.reshape(code, (BLOCKS, BLOCK_SIZE // 2, 2)))
        code = c_even | (c_odd << 4)
        i = tl.arange(0, BLOCK_SIZE // 2)
    dst = row[:, None] * ROW_BYTES + j[:, None] * PAYLOAD + i[None, :]
    tl.store(out_ptr + dst, code.to(tl.uint8), mask=blk_ok[:, None])
    # The float32 scale as 4 little-endian bytes after the row's payload (4-byte aligned offsets).
    k = tl.arange(0, 4)
    s_dst = row * ROW_BYTES + NB * PAYLOAD + 4 * j
    s_byte = (s_bits[:, None] >> (8 * k[None, :])) & 0xFF
    tl.store(out_ptr + s_dst[:, None] + k[None, :], s_byte.to(tl.uint8), mask=blk_ok[:, None])


@triton.jit
def _unpack_dequantize_kernel(buf_ptr, out_ptr, n_blocks, N, NB, ROW_BYTES, IS_INT: tl.constexpr,
                              BITS: tl.constexpr, EXP_BITS: tl.constexpr, MAN_BITS: tl.constexpr, BIAS: tl.constexpr,
                              NAN_CODE: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                              BLOCKS: tl.constexpr):
    """One program unpacks BLOCKS blocks of ``buf`` [rows, ROW_BYTES] into ``out`` [rows, N]."""
    blk = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
    blk_ok = blk < n_blocks
    row = blk // NB
    j = blk % NB
    PAYLOAD: tl.constexpr = BLOCK_SIZE * BITS // 8
    s_src = buf_ptr + row * ROW_BYTES + NB * PAYLOAD + 4 * j
    s_bits = tl.load(s_src, mask=blk_ok, other=0).to(tl.int32)
    s_bits = s_bits | (tl.load(s_src + 1, mask=blk_ok, other=0).to(tl.int32) << 8)
    s_bits = s_bits | (tl.load(s_src + 2, mask=blk_ok, other=0).to(tl.int32) << 16)
    s_bits = s_bits | (tl.load(s_src + 3, mask=blk_ok, other=0).to(tl.int32) << 24)
    scale = s_bits.to(tl.float32, bitcast=True)[:, None]
    if BITS == 4:
        i = tl.arange(0, BLOCK_SIZE // 2)
        byte = tl.load(buf_ptr + row[:, None] * ROW_BYTES + j[:, None] * PAYLOAD + i[None, :], mask=blk_ok[:, None],
                       other=0).to(tl.int32)
        # Sign-extend each nibble; low nibble = even element, interleaved back into block order.
        value = tl.reshape(tl.join(((byte & 0xF) ^ 0x8) - 0x8, ((byte >> 4) ^ 0x8) - 0x8), (BLOCKS, BLOCK_SIZE))
        value = value.to(tl.float32)
    else:
        i = tl.arange(0, BLOCK_SIZE)
        code = tl.load(buf_ptr + row[:, None] * ROW_BYTES + j[:, None] * PAYLOAD + i[None, :], mask=blk_ok[:, None],
                       other=0).to(tl.int32)
        if IS_INT:
            value = ((code ^ 0x80) - 0x80).to(tl.float32)
        else:
            value = _decode_code_tl(code, EXP_BITS, MAN_BITS, BIAS, True, False, NAN_CODE)
    col = j[:, None] * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)[None, :]
    _store_float_tl(out_ptr + row[:, None] * N + col, value * scale, blk_ok[:, None] & (col < N), OUT_BF16)
