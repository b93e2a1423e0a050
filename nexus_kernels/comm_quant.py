"""Blockwise quantize+pack / unpack+dequantize into one contiguous byte buffer per row, for collectives.

ZeRO++ (Wang et al., 2023) sends weights (qwZ) and gradients (qgZ) as quantized blocks. Each row
of ``x`` [rows, n] becomes one self-contained ``uint8`` row of ``packed_nbytes(n, fmt, block_size)``
bytes, so a 2-D buffer can be split along dim 0 for all-to-all / all-gather and each piece
unpacked on its own.

Row layout (``nb = ceil(n / block_size)`` blocks; the last block is zero-padded)::

    [ payload of block 0 | block 1 | ... | block nb-1 ][ scale 0 | scale 1 | ... | scale nb-1 ]
      nb * block_size * bits / 8 bytes                   nb * 4 bytes

- payload: ``block_size`` bytes per block for int8 and fp8, ``block_size / 2`` for int4; padding
  elements (column >= n) are stored as code 0.
- scale: one float32 per block as its 4 raw bytes, little-endian (on a little-endian machine this
  is ``scales.view(torch.uint8)``: ``buf[..., -4 * nb:].view(torch.float32)`` reads them back).
  Every offset in a row is a multiple of 4 bytes.

Formats (``amax`` = max |x| over the block, read as float32; every division is the correctly
rounded float32 quotient; "RNE" = round half to even):

=====  ===============  ========================================================  ============
fmt    scale            element code                                             bytes/elem
=====  ===============  ========================================================  ============
int8   amax / 127       q = RNE(clamp(x / scale, -127, 127)), int8 two's complement  1
int4   amax / 7         q = RNE(clamp(x / scale, -7, 7)), 4-bit two's complement,   1/2
                        two per byte, even element index in the low nibble
fp8    amax / 448       E4M3 code of x / scale, RNE, saturating to +-448            1
                        (``nexus_kernels.cast``'s rounding)
=====  ===============  ========================================================  ============

Dequantized value: ``float32(q) * scale`` (one float32 multiply), then converted to ``dtype``.

- A block with amax == 0 (all zeros, -0 included), or whose scale underflows to 0 (amax below
  ~127 * 2**-150), gets scale 0 and payload 0: it dequantizes to exact (+)zeros.
- A block holding inf or NaN gets scale NaN (bits 0x7FC00000) and payload 0: the whole block
  dequantizes to NaN, so a receiver never sees a non-finite input as finite numbers.
- Error bound (finite blocks): |x_hat - x| <= amax / (2 * qmax) for int8 (qmax 127) and int4
  (qmax 7), up to float32 rounding of the scale and of the product (relative 2**-22) and an
  absolute 64 * 2**-149 where the scale is a float32 subnormal. fp8: |x_hat - x| <= 2**-4 * |x|
  + 2**-10 * scale (E4M3's half ulp, relative in the normal range, absolute in the subnormal
  range), likewise up to float32 rounding.

``stochastic=True`` rounds each element to one of its two neighbours with probability given by
the distance (resolved to 2**-30), so E[x_hat] == x within the clamp range: int codes take
``floor(y) + 1`` when ``(rand >> 2) + floor(f * 2**30) >= 2**30``, with ``f = y - floor(y)``
rounded to float32 (exact except for y in (-1, 0), where the rounding biases the probability by
less than 2**-24); fp8 uses the casts' stochastic rule. ``rand`` is the 32-bit random stream of
``nexus_kernels.cast`` indexed by the flat element index ``row * n + col`` of ``x``, so the Triton
kernel and the reference return the same bytes for the same seed.

``quantize_pack`` / ``unpack_dequantize`` call the custom ops ``torch.ops.nexus.quantize_pack`` /
``unpack_dequantize``, which pick the Triton kernel (``_comm_quant_kernels``, imported on first
launch; one pass per tile of blocks: load, amax, scale, quantize, pack, store) or the reference per
call. Neither is differentiable (outputs never require grad).
"""
from __future__ import annotations

import dataclasses

import torch

from nexus_kernels._backend import register_op, select
from nexus_kernels.cast import (
    INPUT_DTYPES,
    OUTPUT_DTYPES,
    SR_BITS,
    decode_constexprs,
    decode_fp_bits_reference,
    random_bits_reference,
    round_constexprs,
    round_to_codes_reference,
    seed_key,
    seed_tensor,
)
from nexus_kernels.formats import E4M3

__all__ = [
    "quantize_pack",
    "unpack_dequantize",
    "packed_nbytes",
    "quantize_pack_reference",
    "unpack_dequantize_reference",
    "COMM_FORMATS",
    "BLOCK_SIZES",
]

COMM_FORMATS = ("int8", "int4", "fp8")
BLOCK_SIZES = (32, 64, 128, 256)
SCALE_BYTES = 4


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One format's constants: ``qmax`` (largest |code value|), ``bits`` per element."""

    name: str
    qmax: float
    bits: int

    @property
    def is_int(self) -> bool:
        return self.name != "fp8"


_SPECS = {"int8": _Spec("int8", 127.0, 8), "int4": _Spec("int4", 7.0, 4), "fp8": _Spec("fp8", E4M3.max_normal, 8)}


def _check_format(fmt: str, block_size: int) -> _Spec:
    if not isinstance(fmt, str) or fmt not in _SPECS:
        raise ValueError(f"fmt={fmt!r} is not a comm format; expected one of {', '.join(COMM_FORMATS)}")
    if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
        raise ValueError(f"block_size={block_size!r} is not supported; expected one of {BLOCK_SIZES}")
    return _SPECS[fmt]


def _check_n(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")


def _num_blocks(n: int, block_size: int) -> int:
    return (n + block_size - 1) // block_size


def _payload_bytes(spec: _Spec, block_size: int) -> int:
    """Payload bytes of one block."""
    return block_size * spec.bits // 8


def packed_nbytes(n: int, fmt: str = "int8", block_size: int = 128) -> int:
    """Bytes of one packed row of ``n`` elements: ceil(n / block_size) * (payload + 4).

    >>> packed_nbytes(1000, "int8", 128), packed_nbytes(1000, "int4", 128)
    (1056, 544)
    """
    spec = _check_format(fmt, block_size)
    _check_n(n)
    return _num_blocks(n, block_size) * (_payload_bytes(spec, block_size) + SCALE_BYTES)


# ----------------------------------------------------------------------------------------------
# Reference: plain torch
# ----------------------------------------------------------------------------------------------
def _scale_to_bytes(scale: torch.Tensor) -> torch.Tensor:
    """float32 [..., nb] -> uint8 [..., nb * 4], little-endian, built with shifts (any host order)."""
    bits = scale.contiguous().view(torch.int32).long() & 0xFFFFFFFF
    parts = torch.stack([(bits >> (8 * i)) & 0xFF for i in range(SCALE_BYTES)], dim=-1)
    return parts.to(torch.uint8).reshape(*scale.shape[:-1], scale.shape[-1] * SCALE_BYTES)


def _bytes_to_scale(raw: torch.Tensor) -> torch.Tensor:
    """uint8 [..., nb * 4] little-endian -> float32 [..., nb]."""
    parts = raw.long().reshape(*raw.shape[:-1], raw.shape[-1] // SCALE_BYTES, SCALE_BYTES)
    bits = sum(parts[..., i] << (8 * i) for i in range(SCALE_BYTES))
    bits = torch.where(bits >= 2**31, bits - 2**32, bits)  # as int32 two's complement
    return bits.to(torch.int32).view(torch.float32)


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(1, -1) if t.dim() == 1 else t


def quantize_pack_reference(x: torch.Tensor, fmt: str = "int8", block_size: int = 128, stochastic: bool = False,
                            seed: int | torch.Tensor | None = None) -> torch.Tensor:
    """Reference for ``quantize_pack`` (same arguments, same bytes)."""
    spec = _check_format(fmt, block_size)
    x2 = _as_rows(x)
    rows, n = x2.shape
    nb = _num_blocks(n, block_size)
    blocks = torch.nn.functional.pad(x2.float(), (0, nb * block_size - n)).reshape(rows, nb, block_size)
    # amax as the integer max of |float32 bits|: NaN and inf bits sort above every finite value.
    abs_bits = blocks.view(torch.int32) & 0x7FFFFFFF
    amax_bits = abs_bits.amax(-1) if blocks.numel() else abs_bits.new_zeros(rows, nb)
    finite = amax_bits < 0x7F800000
    amax = amax_bits.view(torch.float32)
    # A tensor divisor: torch turns division by a CPU scalar into a reciprocal multiply on CUDA.
    scale = amax / torch.full_like(amax, spec.qmax)
    scale = torch.where(finite, scale, torch.full_like(scale, float("nan")))
    ok = finite & (scale > 0)
    y = blocks / torch.where(ok, scale, torch.ones_like(scale))[..., None]
    y = torch.where(ok[..., None], y, torch.zeros_like(y))
    rand = None
    if stochastic:
        col = torch.arange(nb * block_size, dtype=torch.int64, device=x.device)
        row = torch.arange(rows, dtype=torch.int64, device=x.device)
        index = (row[:, None] * n + col[None, :]).reshape(rows, nb, block_size)
        rand = random_bits_reference(seed_key(seed_tensor(seed, x.device)), index)
    if spec.is_int:
        y = y.clamp(-spec.qmax, spec.qmax)
        if stochastic:
            lo = torch.floor(y)
            # y - lo in float32 (exact unless -1 < y < 0), then its first SR_BITS bits
            frac30 = torch.floor((y - lo).double() * 2.0**SR_BITS).long()
            q = lo.long() + ((rand >> (32 - SR_BITS)) + frac30 >= 2**SR_BITS).long()
        else:
            q = torch.round(y).long()  # torch.round is round-half-to-even
        codes = q & ((1 << spec.bits) - 1)
    else:
        codes = round_to_codes_reference(y, E4M3, rounding="stochastic" if stochastic else "nearest", rand=rand,
                                         saturate=True)
    codes = torch.where(ok[..., None], codes, torch.zeros_like(codes)).reshape(rows, nb * block_size)
    if spec.bits == 4:
        codes = codes[:, 0::2] | (codes[:, 1::2] << 4)  # block_size is even: pairs never straddle blocks
    out = torch.cat([codes.to(torch.uint8), _scale_to_bytes(scale)], dim=1)
    return out.reshape(-1) if x.dim() == 1 else out


def unpack_dequantize_reference(buf: torch.Tensor, n: int, fmt: str = "int8", block_size: int = 128,
                                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Reference for ``unpack_dequantize`` (same arguments, same values)."""
    spec = _check_format(fmt, block_size)
    b2 = _as_rows(buf)
    rows = b2.shape[0]
    nb = _num_blocks(n, block_size)
    payload_len = nb * _payload_bytes(spec, block_size)
    payload = b2[:, :payload_len].long()
    scale = _bytes_to_scale(b2[:, payload_len:])
    if spec.bits == 4:
        nibbles = torch.stack((payload & 0xF, payload >> 4), dim=-1).reshape(rows, nb * block_size)
        values = ((nibbles ^ 0x8) - 0x8).float()
    elif spec.is_int:
        values = ((payload ^ 0x80) - 0x80).float()
    else:
        values = decode_fp_bits_reference(payload, E4M3, torch.float64).float()  # exact: E4M3 fits float32
    out = (values.reshape(rows, nb, block_size) * scale[..., None]).reshape(rows, nb * block_size)[:, :n]
    out = out.to(dtype)
    return out.reshape(-1) if buf.dim() == 1 else out


# ----------------------------------------------------------------------------------------------
# Launchers: the Triton kernels live in _comm_quant_kernels, imported on the first launch
# ----------------------------------------------------------------------------------------------
def _blocks_per_program(backend: str, block_size: int) -> int:
    # The interpreter pays per program: ~16k elements each; on a GPU ~4k elements per program.
    return (16384 if backend == "interpret" else 4096) // block_size


def _format_constexprs(spec: _Spec) -> dict:
    return dict(QMAX=spec.qmax, IS_INT=spec.is_int, BITS=spec.bits)


def _pack_launch(x: torch.Tensor, spec: _Spec, block_size: int, stochastic: bool, seed: torch.Tensor | None,
                 backend: str) -> torch.Tensor:
    """Kernel path of ``quantize_pack``: ``x`` [rows, n] contiguous; ``seed`` 0-d int64 (stochastic only)."""
    rows, n = x.shape
    nb = _num_blocks(n, block_size)
    row_bytes = nb * (_payload_bytes(spec, block_size) + SCALE_BYTES)
    out = torch.empty(rows, row_bytes, dtype=torch.uint8, device=x.device)
    n_blocks = rows * nb
    if n_blocks == 0:
        return out
    from nexus_kernels import _comm_quant_kernels

    blocks = _blocks_per_program(backend, block_size)
    # Without stochastic rounding the seed is never read: x stands in for its pointer.
    _comm_quant_kernels._quantize_pack_kernel[(-(-n_blocks // blocks),)](
        x, out, n_blocks, n, nb, row_bytes, seed if stochastic else x, **_format_constexprs(spec),
        **round_constexprs(E4M3, saturate=True), STOCHASTIC=stochastic, BLOCK_SIZE=block_size, BLOCKS=blocks,
        num_warps=4)
    return out


def _unpack_launch(buf: torch.Tensor, n: int, spec: _Spec, block_size: int, dtype: torch.dtype,
                   backend: str) -> torch.Tensor:
    rows, row_bytes = buf.shape
    nb = _num_blocks(n, block_size)
    out = torch.empty(rows, n, dtype=dtype, device=buf.device)
    n_blocks = rows * nb
    if n_blocks == 0:
        return out
    from nexus_kernels import _comm_quant_kernels

    blocks = _blocks_per_program(backend, block_size)
    dec = decode_constexprs(E4M3)
    _comm_quant_kernels._unpack_dequantize_kernel[(-(-n_blocks // blocks),)](
        buf, out, n_blocks, n, nb, row_bytes, IS_INT=spec.is_int, BITS=spec.bits, EXP_BITS=dec["EXP_BITS"],
        MAN_BITS=dec["MAN_BITS"], BIAS=dec["BIAS"], NAN_CODE=dec["NAN_CODE"], OUT_BF16=dtype == torch.bfloat16,
        BLOCK_SIZE=block_size, BLOCKS=blocks, num_warps=4)
    return out


# ----------------------------------------------------------------------------------------------
# Custom ops: 2-D in and out; the path is chosen inside, per call
# ----------------------------------------------------------------------------------------------
def _quantize_pack_impl(x: torch.Tensor, fmt: str, block_size: int, stochastic: bool,
                        seed: torch.Tensor | None) -> torch.Tensor:
    spec = _check_format(fmt, block_size)
    if stochastic and seed is None:
        raise ValueError("stochastic rounding needs a seed tensor (quantize_pack draws one)")
    backend = select(x)
    if backend == "reference":
        return quantize_pack_reference(x, fmt, block_size, stochastic, seed).contiguous()
    return _pack_launch(x.contiguous(), spec, block_size, stochastic, seed, backend)


def _quantize_pack_fake(x, fmt, block_size, stochastic, seed):
    spec = _check_format(fmt, block_size)
    # n may be symbolic here: the formula of packed_nbytes without its int check
    row_bytes = _num_blocks(x.shape[1], block_size) * (_payload_bytes(spec, block_size) + SCALE_BYTES)
    return x.new_empty(x.shape[0], row_bytes, dtype=torch.uint8)


def _unpack_dequantize_impl(buf: torch.Tensor, n: int, fmt: str, block_size: int,
                            dtype: torch.dtype) -> torch.Tensor:
    spec = _check_format(fmt, block_size)
    backend = select(buf)
    if backend == "reference":
        return unpack_dequantize_reference(buf, n, fmt, block_size, dtype).contiguous()
    return _unpack_launch(buf.contiguous(), n, spec, block_size, dtype, backend)


quantize_pack_op = register_op("quantize_pack", _quantize_pack_impl, _quantize_pack_fake)
unpack_dequantize_op = register_op(
    "unpack_dequantize", _unpack_dequantize_impl,
    lambda buf, n, fmt, block_size, dtype: buf.new_empty(buf.shape[0], n, dtype=dtype))


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def quantize_pack(x: torch.Tensor, fmt: str = "int8", block_size: int = 128, *, stochastic: bool = False,
                  seed: int | torch.Tensor | None = None) -> torch.Tensor:
    """Quantize each row of ``x`` in blocks of ``block_size`` and pack payload + float32 scales into bytes.

    Args: ``x`` [n] or [rows, n] float32/bfloat16/float16 (any n >= 0); ``fmt`` "int8" | "int4" |
    "fp8" (E4M3); ``block_size`` 32 | 64 | 128 | 256; ``stochastic`` unbiased stochastic rounding
    instead of round-half-to-even; ``seed`` for it: an int in [0, 2**64), a one-element integer
    tensor, or None (drawn from torch's generator).
    Returns: contiguous uint8 [packed_nbytes(n)] or [rows, packed_nbytes(n)] (layout: module docstring).

    >>> buf = quantize_pack(torch.randn(4, 1000), "int4", 128)     # uint8 [4, 544]
    >>> unpack_dequantize(buf, 1000, "int4", 128).shape
    torch.Size([4, 1000])
    """
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f"x has dtype {x.dtype}; expected one of float32, bfloat16, float16")
    if x.dim() not in (1, 2):
        raise ValueError(f"x must be 1-D [n] or 2-D [rows, n], got {x.dim()}-D shape {tuple(x.shape)}")
    _check_format(fmt, block_size)
    if not isinstance(stochastic, bool):
        raise ValueError(f"stochastic must be a bool, got {stochastic!r}")
    seed = seed_tensor(seed, x.device) if stochastic else None
    out = quantize_pack_op(_as_rows(x.detach()).contiguous(), fmt, block_size, stochastic, seed)
    return out.reshape(-1) if x.dim() == 1 else out


def unpack_dequantize(buf: torch.Tensor, n: int, fmt: str = "int8", block_size: int = 128,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack bytes from ``quantize_pack`` and dequantize: code value times its block's float32 scale.

    Args: ``buf`` uint8 [packed_nbytes(n)] or [rows, packed_nbytes(n)] (rows may be any slice of a
    packed buffer along dim 0); ``n`` the row length given to ``quantize_pack``; ``fmt``,
    ``block_size`` as given to it; ``dtype`` float32/bfloat16/float16/float64.
    Returns: [n] or [rows, n] ``dtype``; blocks with a NaN scale are NaN, blocks with scale 0 are 0.

    >>> buf = quantize_pack(torch.randn(65), "fp8", 64)             # uint8 [264]
    >>> unpack_dequantize(buf, 65, "fp8", 64, torch.bfloat16).shape
    torch.Size([65])
    """
    if not isinstance(buf, torch.Tensor):
        raise ValueError(f"buf must be a torch.Tensor, got {type(buf).__name__}")
    if buf.dtype != torch.uint8:
        raise ValueError(f"buf has dtype {buf.dtype}; expected torch.uint8 (from quantize_pack)")
    if buf.dim() not in (1, 2):
        raise ValueError(f"buf must be 1-D or 2-D, got {buf.dim()}-D shape {tuple(buf.shape)}")
    _check_n(n)
    expected = packed_nbytes(n, fmt, block_size)
    if buf.shape[-1] != expected:
        raise ValueError(f"buf.shape[-1]={buf.shape[-1]} but n={n} with fmt={fmt!r}, block_size={block_size} "
                         f"packs to {expected} bytes per row")
    if dtype not in OUTPUT_DTYPES:
        raise ValueError(f"dtype={dtype} is not supported; expected one of float32, bfloat16, float16, float64")
    out = unpack_dequantize_op(_as_rows(buf).contiguous(), n, fmt, block_size, dtype)
    return out.reshape(-1) if buf.dim() == 1 else out
