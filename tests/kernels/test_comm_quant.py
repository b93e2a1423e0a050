"""comm_quant: Triton kernel (interpreted) vs torch reference vs an oracle written in numpy from the spec.

The oracle packs block by block in plain numpy: float32 amax and scale, ``np.rint`` (round half to
even) on float32 ``x / scale``, torch's own ``float8_e4m3fn`` cast for fp8, nibbles by hand and the
scale as ``np.float32(...).tobytes()`` in little-endian order. Dequantized values are held to the
formats' error bounds written in the module docstring.
"""
import math

import numpy as np
import pytest
import torch

import nexus_kernels
from nexus_kernels import forced, select
from nexus_kernels.comm_quant import (
    BLOCK_SIZES,
    COMM_FORMATS,
    packed_nbytes,
    quantize_pack,
    quantize_pack_reference,
    unpack_dequantize,
    unpack_dequantize_reference,
)
from tests.kernels.paths import assert_same_nan_aware, both_paths

QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}
BITS = {"int8": 8, "int4": 4, "fp8": 8}
NS = [0, 1, 63, 64, 65, 127, 129, 1000]
OPS = torch.ops.nexus


def test_conftest_runs_the_kernels_in_the_interpreter():
    assert select(torch.zeros(1)) == "interpret"


# ------------------------------------------------------------------------------------------------
# Oracle and helpers
# ------------------------------------------------------------------------------------------------
def oracle_pack(x, fmt, bs):
    """uint8 [rows, packed bytes] of x [rows, n] (or [n]), one block at a time in numpy."""
    x2 = x.float().reshape(x.shape[0] if x.dim() == 2 else 1, x.shape[-1]).numpy()
    rows, n = x2.shape
    qmax = np.float32(QMAX[fmt])
    out = []
    for r in range(rows):
        payload, scales = b"", b""
        for start in range(0, n, bs):
            blk = np.zeros(bs, np.float32)
            seg = x2[r, start:start + bs]
            blk[:len(seg)] = seg
            codes = np.zeros(bs, np.uint8)
            if not np.isfinite(blk).all():
                scale = np.float32(np.nan)
            else:
                scale = np.float32(np.abs(blk).max()) / qmax
                if scale > 0:
                    y = blk / scale
                    if fmt == "fp8":
                        codes = torch.from_numpy(np.clip(y, -qmax, qmax)).to(torch.float8_e4m3fn).view(torch.uint8)
                        codes = codes.numpy()
                    else:
                        q = np.rint(np.clip(y, -qmax, qmax)).astype(np.int64)
                        codes = (q & ((1 << BITS[fmt]) - 1)).astype(np.uint8)
            if fmt == "int4":
                codes = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
            payload += codes.tobytes()
            scales += np.array([scale], dtype="<f4").tobytes()
        out.append(np.frombuffer(payload + scales, dtype=np.uint8))
    if n == 0:
        return torch.zeros(rows, 0, dtype=torch.uint8)
    return torch.from_numpy(np.stack(out))


def oracle_scales(x, fmt, bs):
    """float32 [rows, nb]: amax / qmax per block, NaN for blocks holding inf or NaN."""
    x2 = x.float().reshape(x.shape[0] if x.dim() == 2 else 1, x.shape[-1])
    nb = math.ceil(x2.shape[1] / bs)
    blocks = torch.nn.functional.pad(x2, (0, nb * bs - x2.shape[1])).reshape(x2.shape[0], nb, bs)
    amax = blocks.abs().amax(-1)
    return torch.where(torch.isfinite(amax), amax / QMAX[fmt], torch.full_like(amax, float("nan")))


def random_input(rows, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, generator=g)
    # Each row at its own magnitude, 2**-40 .. 2**40 (2**-40 puts float32 subnormals in the blocks).
    return x * torch.pow(2.0, torch.randint(-40, 41, (rows, 1), generator=g).float())


def edge_input(bs):
    """[12, 2 * bs]: one kind of block per row and half-row."""
    x = torch.zeros(12, 2 * bs)
    x[1, :bs] = -0.0                                       # -0 only
    x[1, bs:] = 3.0                                        # all equal
    x[2] = torch.linspace(-1, 1, 2 * bs) * 1e-40           # float32 subnormals only
    x[3] = torch.linspace(-1, 1, 2 * bs) * 3.3e38          # near float32 max
    x[4] = torch.randn(2 * bs)
    x[4, 3] = float("nan")                                 # NaN in the first block only
    x[5] = torch.randn(2 * bs)
    x[5, bs + 1] = float("inf")                            # inf in the second block
    x[6] = torch.randn(2 * bs)
    x[6, 0] = -float("inf")
    x[6, bs:] = float("nan")
    x[7, 5] = -2.5                                         # a single nonzero
    x[7, bs + 7] = 1e-45                                   # a single smallest subnormal: scale underflows to 0
    # Ties: amax == qmax makes the scale 1, so x / scale is x itself (int4: block 0, int8: block 1).
    x[8, :bs] = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 6.5, -6.5] * (bs // 8))
    x[8, 0] = 7.0
    x[8, bs:] = torch.tensor([126.5, -125.5, 3.5, 100.5] * (bs // 4))
    x[8, bs] = -127.0
    x[9, :bs] = torch.tensor([448.0, 9.0, 11.0, -13.0, 17.0, 0.0009765625 * 3, 240.0, 416.0] * (bs // 8))  # E4M3 ties
    x[9, bs:] = torch.randn(bs) * 2.0**-130                # scale a float32 subnormal
    x[10] = torch.tensor([1.0, -1.0] * bs) * 2.0**-126     # smallest normal float32
    x[11] = torch.randn(2 * bs)
    x[11, :bs] *= 1e-30                                    # blocks of very different magnitude in one row
    return x


# ------------------------------------------------------------------------------------------------
# Sizes and layout
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", COMM_FORMATS)
def test_packed_nbytes_formula_and_buffer_sizes(fmt):
    for bs in BLOCK_SIZES:
        for n in NS + [2**20]:
            nb = math.ceil(n / bs)
            assert packed_nbytes(n, fmt, bs) == nb * (bs * BITS[fmt] // 8 + 4)
    for n in (0, 1, 65, 1000):
        buf = quantize_pack(torch.randn(3, n), fmt, 64)
        assert buf.dtype == torch.uint8 and buf.is_contiguous() and buf.shape == (3, packed_nbytes(n, fmt, 64))
        assert quantize_pack(torch.randn(n), fmt, 64).shape == (packed_nbytes(n, fmt, 64),)
    # Against float32 bytes: int8/fp8 are 1/4 plus one 4-byte scale per block, int4 1/8 plus the scales.
    n = 2**20
    ratio = packed_nbytes(n, fmt, 128) / (4 * n)
    assert ratio == pytest.approx(BITS[fmt] / 32 + 4 / (4 * 128))
    assert ratio <= {"int8": 0.258, "int4": 0.133, "fp8": 0.258}[fmt]


@pytest.mark.parametrize("fmt", COMM_FORMATS)
def test_layout_payload_then_little_endian_float32_scales(fmt):
    x = random_input(3, 200, seed=11)
    bs = 64
    buf = quantize_pack(x, fmt, bs)
    nb = 4
    scales = buf[:, -4 * nb:].contiguous().view(torch.float32)     # the documented read-back
    assert torch.equal(scales, oracle_scales(x, fmt, bs))
    first = buf[:, :bs * BITS[fmt] // 8]                            # block 0's payload comes first
    y = x[:, :bs] / scales[:, :1]
    if fmt == "int8":
        assert torch.equal(first.view(torch.int8).float(), torch.round(y))
    elif fmt == "int4":
        assert torch.equal(((first.long() & 0xF) ^ 8) - 8, torch.round(y[:, 0::2]).long())
        assert torch.equal(((first.long() >> 4) ^ 8) - 8, torch.round(y[:, 1::2]).long())
    else:
        assert torch.equal(first, y.to(torch.float8_e4m3fn).view(torch.uint8))


def test_rows_are_self_contained_and_splittable():
    x = random_input(5, 333, seed=3)
    for fmt in COMM_FORMATS:
        buf = quantize_pack(x, fmt, 128)
        whole = unpack_dequantize(buf, 333, fmt, 128)
        assert torch.equal(unpack_dequantize(buf[1:3], 333, fmt, 128), whole[1:3])
        assert torch.equal(unpack_dequantize(buf[4], 333, fmt, 128), whole[4])
        assert torch.equal(quantize_pack(x[2], fmt, 128), buf[2])
        # the packed rows of a flattened tensor are those of its slices
        assert torch.equal(quantize_pack(x[3:], fmt, 128), buf[3:])


# ------------------------------------------------------------------------------------------------
# Kernel == reference == oracle
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", BLOCK_SIZES)
@pytest.mark.parametrize("fmt", COMM_FORMATS)
def test_pack_matches_reference_and_oracle(fmt, bs):
    for n in NS:
        for rows in (1, 3):
            x = random_input(rows, n, seed=n * 7 + rows + bs)
            kernel, reference = both_paths(quantize_pack, x, fmt, bs)
            assert torch.equal(kernel, reference), (n, rows)
            assert torch.equal(kernel, oracle_pack(x, fmt, bs)), (n, rows)
            yk, yr = both_paths(unpack_dequantize, kernel, n, fmt, bs)
            assert torch.equal(yk, yr), (n, rows)
            assert yk.shape == (rows, n) and yk.dtype == torch.float32


@pytest.mark.parametrize("fmt", COMM_FORMATS)
@pytest.mark.parametrize("bs", [32, 64])
def test_edge_blocks(fmt, bs):
    x = edge_input(bs)
    kernel, reference = both_paths(quantize_pack, x, fmt, bs)
    assert torch.equal(kernel, reference)
    assert torch.equal(kernel, oracle_pack(x, fmt, bs))
    yk, yr = both_paths(unpack_dequantize, kernel, 2 * bs, fmt, bs)
    assert_same_nan_aware(yk, yr)
    scales = kernel[:, -8:].contiguous().view(torch.float32)
    payload = kernel[:, :-8].reshape(12, 2, -1)
    y = yk.reshape(12, 2, bs)
    # amax == 0 (zeros, -0) and an underflowing scale: scale 0, payload 0, exact +0 out
    for r, b in ((0, 0), (0, 1), (1, 0), (7, 1)):
        assert scales[r, b].item() == 0 and not payload[r, b].any()
        assert torch.equal(y[r, b], torch.zeros(bs)) and not torch.signbit(y[r, b]).any()
    # inf / NaN: the block's scale is NaN and the whole block dequantizes to NaN; its neighbours are finite
    for r, b in ((4, 0), (5, 1), (6, 0), (6, 1)):
        assert math.isnan(scales[r, b].item()) and not payload[r, b].any()
        assert torch.isnan(y[r, b]).all()
    assert torch.isfinite(y[4, 1]).all() and torch.isfinite(y[5, 0]).all()
    assert (y[1, 1] == 3.0).all()                                   # all-equal blocks round-trip exactly
    assert y[7, 0, 5].item() == -2.5 and (y[7, 0].count_nonzero() == 1)
    assert torch.isfinite(y[3]).all() and y[3].abs().max() > 3e38  # no overflow near float32 max
    if fmt != "fp8":
        ties = y[8, 0] if fmt == "int4" else y[8, 1]
        xs = x[8, :bs] if fmt == "int4" else x[8, bs:]
        # scale 1 (amax == qmax): half-way values go to the even neighbour
        assert torch.equal(ties, torch.round(xs).clamp(-QMAX[fmt], QMAX[fmt]))
    else:
        assert torch.equal(y[9, 0], x[9, :bs].to(torch.float8_e4m3fn).float())  # scale 1: plain RNE cast


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("fmt", COMM_FORMATS)
def test_half_precision_inputs(fmt, dtype):
    x = (torch.randn(3, 300) * torch.logspace(-3, 3, 300)).to(dtype)
    x[0, 0] = float("inf")
    kernel, reference = both_paths(quantize_pack, x, fmt, 64)
    assert torch.equal(kernel, reference)
    assert torch.equal(kernel, oracle_pack(x.float(), fmt, 64))


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # numpy, on float16's designed inf
@pytest.mark.parametrize("fmt", COMM_FORMATS)
def test_unpack_every_code_to_every_dtype(fmt):
    """Arbitrary payload bytes with finite, zero, subnormal and NaN scales: kernel == reference == numpy."""
    g = torch.Generator().manual_seed(4)
    bs, n, rows = 64, 64 * 5 - 3, 4
    nb = 5
    width = nb * bs * BITS[fmt] // 8
    payload = torch.randint(0, 256, (rows, width), generator=g).to(torch.uint8)
    if fmt == "fp8":
        payload[(payload & 0x7F) == 0x7F] = 0x11  # the E4M3 NaN code is never packed
    scales = torch.randn(rows, nb, generator=g).abs() * torch.pow(2.0, torch.randint(-20, 20, (rows, nb), generator=g))
    scales[0, 1] = 0.0
    scales[1, 2] = float("nan")
    scales[2, 3] = 2.0**-140
    buf = torch.cat([payload, scales.view(torch.uint8).reshape(rows, -1)], dim=1)
    if fmt == "int8":
        values = payload.view(torch.int8).float()
    elif fmt == "int4":
        p = payload.long()
        values = (((torch.stack((p & 0xF, p >> 4), -1).reshape(rows, -1)) ^ 8) - 8).float()
    else:
        values = payload.view(torch.float8_e4m3fn).float()
    expected32 = (values.reshape(rows, nb, bs) * scales[..., None]).reshape(rows, -1)[:, :n]
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        yk, yr = both_paths(unpack_dequantize, buf, n, fmt, bs, dtype)
        assert_same_nan_aware(yk, yr)
        assert_same_nan_aware(yk, expected32.to(dtype))


# ------------------------------------------------------------------------------------------------
# Error bounds
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", COMM_FORMATS)
def test_dequantize_error_within_the_format_bound(fmt):
    x = random_input(64, 1000, seed=8)
    x[0, :300] = torch.randn(300) * 2.0**-135                    # scales that are float32 subnormals
    x[1] = (torch.rand(1000) * 2 - 1) * 3.4e38                  # up to float32 max
    bs = 128
    y = unpack_dequantize(quantize_pack(x, fmt, bs), 1000, fmt, bs, torch.float64)
    xd = x.double()
    nb = math.ceil(1000 / bs)
    err = torch.nn.functional.pad((y - xd).abs(), (0, nb * bs - 1000)).reshape(64, nb, bs)
    amax = torch.nn.functional.pad(xd.abs(), (0, nb * bs - 1000)).reshape(64, nb, bs).amax(-1, keepdim=True)
    slack = 2.0**-22
    if fmt == "fp8":
        scale = amax / 448
        a = torch.nn.functional.pad(xd.abs(), (0, nb * bs - 1000)).reshape(64, nb, bs)
        bound = (2.0**-4 * a + 2.0**-10 * scale) * (1 + slack) + 64 * 2.0**-149
    else:
        bound = amax / (2 * QMAX[fmt]) * (1 + slack) + 64 * 2.0**-149
    assert (err <= bound).all(), (err / bound).max()
    # The bound is reached, not just respected: the quantizer uses its whole grid.
    normal = amax > 2.0**-100
    assert (err / bound)[normal.expand_as(err)].max() > 0.9


def test_saturation_edge_amax_element_takes_the_largest_code():
    """x / scale at the block's amax lands on qmax up to the scale's rounding: never past it (no E4M3 NaN
    code 0x7F, no int wrap-around), and the amax element comes back within the bound."""
    x = random_input(256, 128, seed=13)
    for fmt in COMM_FORMATS:
        kernel, reference = both_paths(quantize_pack, x, fmt, 128)
        assert torch.equal(kernel, reference)
        arg = x.abs().argmax(1)
        sign = torch.signbit(x[torch.arange(256), arg])
        payload = kernel[:, :128 * BITS[fmt] // 8].long()
        if fmt == "int4":
            codes = torch.where(arg % 2 == 0, payload[torch.arange(256), arg // 2] & 0xF,
                                payload[torch.arange(256), arg // 2] >> 4)
            top = torch.where(sign, 0x9, 0x7)                     # -7, 7 as nibbles
        else:
            codes = payload[torch.arange(256), arg]
            top = torch.where(sign, 0x81, 0x7F) if fmt == "int8" else torch.where(sign, 0xFE, 0x7E)
        assert torch.equal(codes, top), fmt


@pytest.mark.parametrize("fmt", COMM_FORMATS)
def test_round_trip_snr(fmt):
    x = random_input(32, 1024, seed=9)
    y = unpack_dequantize(quantize_pack(x, fmt, 128), 1024, fmt, 128, torch.float64)
    # Per-row SNR (rows live at different magnitudes): uniform quantization error of a step
    # amax/qmax against Gaussian data gives ~41 dB for int8, ~17 dB for int4; E4M3 ~31 dB.
    snr = 10 * torch.log10(x.double().pow(2).sum(1) / (y - x.double()).pow(2).sum(1))
    assert snr.min() >= {"int8": 38.0, "int4": 15.0, "fp8": 29.0}[fmt], snr.min()


# ------------------------------------------------------------------------------------------------
# Stochastic rounding
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", COMM_FORMATS)
def test_stochastic_kernel_equals_reference_and_is_unbiased(fmt):
    row = random_input(1, 64, seed=12)[0]
    x = row.repeat(2000, 1)  # identical rows: same scales, independent random bits per element
    kernel, reference = both_paths(quantize_pack, x, fmt, 64, stochastic=True, seed=21)
    assert torch.equal(kernel, reference)
    y = unpack_dequantize(kernel, 64, fmt, 64, torch.float64)
    lo, hi = y.min(0).values, y.max(0).values
    assert ((y == lo) | (y == hi)).all()                        # one of the two neighbours
    xd = row.double()
    assert ((xd >= lo) & (xd <= hi)).all()
    nearest = unpack_dequantize(quantize_pack(row, fmt, 64), 64, fmt, 64, torch.float64)
    assert ((nearest == lo) | (nearest == hi)).all()
    gap = (hi - lo).clamp(min=1e-300)
    p = (xd - lo) / gap
    sigma = torch.sqrt(p * (1 - p) / x.shape[0]).clamp(min=1.0 / x.shape[0])
    assert ((y.mean(0) - xd).abs() / gap <= 5 * sigma).all()   # unbiased within sampling error
    assert torch.equal(quantize_pack(x, fmt, 64, stochastic=True, seed=21), kernel)
    assert not torch.equal(quantize_pack(x, fmt, 64, stochastic=True, seed=22), kernel)
    seed_t = torch.tensor(21, dtype=torch.int64)
    assert torch.equal(quantize_pack(x, fmt, 64, stochastic=True, seed=seed_t), kernel)


def test_stochastic_edge_blocks_match_reference():
    x = edge_input(64)
    x[2] = -x[2].abs()                                          # negative subnormals: floor below zero
    for fmt in COMM_FORMATS:
        kernel, reference = both_paths(quantize_pack, x, fmt, 64, stochastic=True, seed=5)
        assert torch.equal(kernel, reference), fmt
        scales = kernel[:, -8:].contiguous().view(torch.float32)
        assert_same_nan_aware(scales, oracle_scales(x, fmt, 64))  # scales never depend on the rounding
        y = unpack_dequantize(kernel, 128, fmt, 64)
        assert (y[2] <= 0).all() and torch.isnan(y[4, :64]).all() and not y[0].any()


# ------------------------------------------------------------------------------------------------
# Ops, API details, bad inputs
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("path", ["reference", "interpret"])
def test_opcheck(path):
    seed = torch.tensor(2**63 + 99 - 2**64, dtype=torch.int64)
    x = torch.randn(3, 77) * 8
    with forced(path):
        for fmt in COMM_FORMATS:
            torch.library.opcheck(OPS.quantize_pack, (x, fmt, 64, False, None))
            torch.library.opcheck(OPS.quantize_pack, (x.bfloat16(), fmt, 32, True, seed))
            buf = quantize_pack(x, fmt, 64)
            torch.library.opcheck(OPS.unpack_dequantize, (buf, 77, fmt, 64, torch.bfloat16))


def test_public_api_exports_and_no_grad():
    assert nexus_kernels.quantize_pack is quantize_pack and nexus_kernels.COMM_FORMATS == ("int8", "int4", "fp8")
    x = torch.randn(2, 100, requires_grad=True)
    buf = quantize_pack(x, "int8")
    y = unpack_dequantize(buf, 100)
    assert not buf.requires_grad and not y.requires_grad


def test_non_contiguous_input():
    x = torch.randn(200, 3).t()  # [3, 200], strided
    for fmt in COMM_FORMATS:
        assert torch.equal(quantize_pack(x, fmt, 64), quantize_pack(x.contiguous(), fmt, 64))


def test_reference_functions_take_the_public_arguments():
    x = random_input(2, 150, seed=2)
    for fmt in COMM_FORMATS:
        buf = quantize_pack_reference(x, fmt, 64)
        assert torch.equal(buf, quantize_pack(x, fmt, 64))
        assert torch.equal(unpack_dequantize_reference(buf, 150, fmt, 64, torch.float16),
                           unpack_dequantize(buf, 150, fmt, 64, torch.float16))
        assert torch.equal(quantize_pack_reference(x[0], fmt, 64), buf[0])


@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 5)], ids=str)
def test_empty(shape):
    for fmt in COMM_FORMATS:
        (bk, br) = both_paths(quantize_pack, torch.zeros(shape), fmt, 64)
        assert bk.shape == br.shape == (*shape[:-1], packed_nbytes(shape[-1], fmt, 64))
        yk, yr = both_paths(unpack_dequantize, bk, shape[-1], fmt, 64)
        assert yk.shape == yr.shape == shape


def test_bad_inputs():
    x = torch.randn(4, 100)
    with pytest.raises(ValueError, match="fmt='int2'"):
        quantize_pack(x, "int2")
    with pytest.raises(ValueError, match="fmt='e4m3'"):
        packed_nbytes(10, "e4m3")
    for bs in (16, 48, 512, True):
        with pytest.raises(ValueError, match=f"block_size={bs!r}"):
            quantize_pack(x, "int8", bs)
    for dtype in (torch.float64, torch.int32):
        with pytest.raises(ValueError, match=str(dtype)):
            quantize_pack(x.to(dtype), "int8")
    with pytest.raises(ValueError, match="3-D"):
        quantize_pack(torch.randn(2, 3, 4), "int8")
    with pytest.raises(ValueError, match="0-D"):
        quantize_pack(torch.tensor(1.0), "int8")
    with pytest.raises(ValueError, match="stochastic"):
        quantize_pack(x, "int8", stochastic=1)
    buf = quantize_pack(x, "int4", 64)
    with pytest.raises(ValueError, match="buf.shape"):
        unpack_dequantize(buf, 129, "int4", 64)  # 3 blocks; the buffer holds 2
    with pytest.raises(ValueError, match="torch.int8"):
        unpack_dequantize(buf.view(torch.int8), 100, "int4", 64)
    with pytest.raises(ValueError, match="3-D"):
        unpack_dequantize(buf.reshape(2, 2, -1), 100, "int4", 64)
    with pytest.raises(ValueError, match="n must be"):
        unpack_dequantize(buf, -1, "int4", 64)
    with pytest.raises(ValueError, match="dtype=torch.int32"):
        unpack_dequantize(buf, 100, "int4", 64, torch.int32)
    with pytest.raises(ValueError, match="needs a seed tensor"):
        OPS.quantize_pack(x, "int8", 64, True, None)
