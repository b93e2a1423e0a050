"""Blockwise attention: Triton kernel (interpreter, float32) and torch reference (float64) against
``torch.nn.functional.scaled_dot_product_attention`` and autograd through it (float64), with the
mask written out here in global positions; lse against logsumexp of the scores.

Kernel tiles are lowered to 16 x 16 (``tiles16``) so that small sequences cross several tiles,
the causal diagonal and the end of the sequence; sequence lengths do not divide 16.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from nexus_kernels import attention as attn
from nexus_kernels import forced, select
from nexus_kernels.attention import (block_attention_backward, block_attention_backward_reference,
                                     block_attention_forward, block_attention_forward_reference, merge_attention)

# path -> input dtype, (atol, rtol) against the float64 oracle
PATHS = {"reference": (torch.float64, 1e-10, 1e-10), "interpret": (torch.float32, 2e-5, 2e-5)}


@pytest.fixture
def tiles16(monkeypatch):
    monkeypatch.setattr(attn, "_INTERPRET_BLOCK_M", 16)
    monkeypatch.setattr(attn, "_INTERPRET_BLOCK_N", 16)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def make_qkv(b, hq, hkv, sq, sk, d, dtype, seed=0, strided=False):
    g = gen(seed)
    if strided:  # [B, S, H, D] transposed to [B, H, S, D], as the model's projections hand them over
        q = torch.randn(b, sq, hq, d, generator=g, dtype=torch.float64).transpose(1, 2)
        k = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64).transpose(1, 2)
        v = torch.randn(b, sk, hkv, d, generator=g, dtype=torch.float64).transpose(1, 2)
    else:
        q, k, v = (torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
                   for h, s in ((hq, sq), (hkv, sk), (hkv, sk)))
    return q.to(dtype), k.to(dtype), v.to(dtype)


def visible(sq, sk, causal, q_offset, k_offset, seq_len):
    """[Sq, Sk] bool, written from the contract: key position <= query position, key position < seq_len."""
    qp = torch.arange(q_offset, q_offset + sq)[:, None]
    kp = torch.arange(k_offset, k_offset + sk)[None, :]
    mask = (kp <= qp) if causal else torch.ones(sq, sk, dtype=torch.bool)
    if seq_len is not None:
        mask = mask & (kp < seq_len)
    return mask


def oracle(q, k, v, dout, mask, scale=None):
    """float64 out, lse, dq, dk, dv from SDPA and autograd on the rows that see a key (others: 0, -inf, 0)."""
    q, k, v, dout = (t.detach().double() for t in (q, k, v, dout))
    groups = q.shape[1] // k.shape[1]
    rows = mask.any(-1)
    qr = q[:, :, rows].requires_grad_()
    kr, vr = k.clone().requires_grad_(), v.clone().requires_grad_()
    kk, vv = kr.repeat_interleave(groups, 1), vr.repeat_interleave(groups, 1)
    out_r = F.scaled_dot_product_attention(qr, kk, vv, attn_mask=mask[rows], scale=scale)
    dq_r, dk, dv = torch.autograd.grad(out_r, (qr, kr, vr), dout[:, :, rows])
    scores = (q @ kk.detach().transpose(-1, -2)) * (scale or 1 / math.sqrt(q.shape[-1]))
    lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), -1)
    out, dq = torch.zeros_like(q), torch.zeros_like(q)
    out[:, :, rows], dq[:, :, rows] = out_r.detach(), dq_r
    return out, lse, dq, dk, dv


def close(actual, expected, atol, rtol, what):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


# id -> (B, Hq, Hkv, Sq, Sk, D, causal, q_offset, k_offset, seq_len, softmax_scale, strided)
CASES = {
    "full_d64": (1, 2, 2, 40, 40, 64, False, 0, 0, None, None, False),
    "causal_gqa_d32_strided": (2, 4, 2, 37, 37, 32, True, 0, 0, None, None, True),
    "causal_offsets_mqa_d48": (1, 3, 1, 50, 37, 48, True, 30, 0, None, None, False),
    "causal_kv_after_some_queries": (1, 2, 1, 33, 45, 64, True, 10, 20, None, 0.3, False),
    "seq_len_padding": (1, 2, 2, 33, 45, 64, False, 0, 0, 29, None, False),
    "causal_seq_len_offsets_d128": (1, 2, 1, 21, 40, 128, True, 100, 70, 95, None, False),
}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_forward_lse_and_gradients_match_sdpa(case, path, tiles16):
    b, hq, hkv, sq, sk, d, causal, qo, ko, seq_len, scale, strided = case
    dtype, atol, rtol = PATHS[path]
    q, k, v = make_qkv(b, hq, hkv, sq, sk, d, dtype, seed=sq + sk, strided=strided)
    dout = torch.randn(b, hq, sq, d, generator=gen(1), dtype=torch.float64).to(dtype)
    mask = visible(sq, sk, causal, qo, ko, seq_len)
    want = oracle(q, k, v, dout, mask, scale)
    kw = dict(causal=causal, q_offset=qo, k_offset=ko, softmax_scale=scale, seq_len=seq_len)
    with forced(path):
        out, lse = block_attention_forward(q, k, v, **kw)
        grads = block_attention_backward(dout, q, k, v, out, lse, **kw)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and lse.shape == q.shape[:3]
    assert [g.dtype for g in grads] == [dtype] * 3 and [g.shape for g in grads] == [q.shape, k.shape, v.shape]
    close(out, want[0], atol, rtol, "out")
    rows = mask.any(-1)
    assert torch.all(lse[:, :, ~rows] == float("-inf")) and torch.all(out[:, :, ~rows] == 0)
    close(lse[:, :, rows], want[1][:, :, rows], atol, rtol, "lse")
    for name, got, expect in zip(("dq", "dk", "dv"), grads, want[2:]):
        close(got, expect, 10 * atol, 10 * rtol, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_kernel_16bit_inputs_accumulate_in_fp32(dtype, tiles16):
    q, k, v = make_qkv(1, 4, 2, 40, 40, 64, dtype, seed=3)
    dout = torch.randn(1, 4, 40, 64, generator=gen(4)).to(dtype)
    mask = visible(40, 40, True, 0, 0, None)
    want = oracle(q, k, v, dout, mask)  # on the rounded 16-bit inputs, in float64
    assert select(q) == "interpret"
    out, lse = block_attention_forward(q, k, v, causal=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    # out is rounded once to 16 bits; lse and gradients stay within float32 accumulation error
    eps = torch.finfo(dtype).eps
    close(out, want[0], eps, eps, "out")
    close(lse, want[1], 1e-5, 1e-5, "lse")
    grads = block_attention_backward(dout, q, k, v, out, lse, causal=True)
    # P is rounded to 16 bits before the P^T dO and dS matmuls, as in FlashAttention
    for name, got, expect in zip(("dq", "dk", "dv"), grads, want[2:]):
        assert got.dtype == torch.float32
        close(got, expect, 4 * eps, 4 * eps, name)


@pytest.mark.parametrize("path", PATHS)
def test_key_blocks_with_global_out_lse_give_full_attention(path, tiles16):
    """Ring attention's use: queries 40..79 against key blocks 0..39 and 40..79 (offsets), merged; each
    block's backward with the merged out/lse gives that block's slice of the full gradients."""
    dtype, atol, rtol = PATHS[path]
    q_all, k, v = make_qkv(1, 4, 2, 80, 80, 32, dtype, seed=5)
    q = q_all[:, :, 40:]
    dout = torch.randn(1, 4, 40, 32, generator=gen(6), dtype=torch.float64).to(dtype)
    want = oracle(q, k, v, dout, visible(40, 80, True, 40, 0, None))
    blocks = [(0, slice(0, 40)), (40, slice(40, 80))]
    with forced(path):
        parts = [block_attention_forward(q, k[:, :, s], v[:, :, s], causal=True, q_offset=40, k_offset=ko)
                 for ko, s in blocks]
        out, lse = merge_attention(*parts[0], *parts[1])
        grads = [block_attention_backward(dout, q, k[:, :, s], v[:, :, s], out.to(dtype), lse, causal=True,
                                          q_offset=40, k_offset=ko) for ko, s in blocks]
    close(out, want[0], atol, rtol, "merged out")
    close(lse, want[1], atol, rtol, "merged lse")
    close(grads[0][0] + grads[1][0], want[2], 10 * atol, 10 * rtol, "dq summed over key blocks")
    close(torch.cat([grads[0][1], grads[1][1]], 2), want[3], 10 * atol, 10 * rtol, "dk per key block")
    close(torch.cat([grads[0][2], grads[1][2]], 2), want[4], 10 * atol, 10 * rtol, "dv per key block")


@pytest.mark.parametrize("path", PATHS)
def test_fully_masked_block_gives_zeros_and_minus_inf_never_nan(path):
    dtype = PATHS[path][0]
    q, k, v = make_qkv(1, 2, 1, 20, 24, 32, dtype, seed=7)
    dout = torch.randn_like(q)
    with forced(path):
        for kw in (dict(causal=True, q_offset=0, k_offset=20),  # every key after every query
                   dict(seq_len=0), dict(seq_len=5, k_offset=5)):  # every key is padding
            out, lse = block_attention_forward(q, k, v, **kw)
            assert torch.all(out == 0) and torch.all(lse == float("-inf")), kw
            for g in block_attention_backward(dout, q, k, v, out, lse, **kw):
                assert torch.all(g == 0), kw


def test_kernel_never_reads_key_tiles_it_skips(tiles16):
    """Key tiles wholly above the causal diagonal, or wholly past seq_len, are never loaded: NaN there
    cannot reach the results (a loaded, masked tile would give 0 * NaN = NaN)."""
    q, k, v = make_qkv(1, 2, 1, 32, 64, 32, torch.float32, seed=8)
    dout = torch.randn_like(q)
    with forced("reference"):
        want_out, want_lse = block_attention_forward(q, k[:, :, :32], v[:, :, :32], causal=True)
        want = block_attention_backward(dout, q, k[:, :, :32], v[:, :, :32], want_out, want_lse, causal=True)
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, :, 32:] = float("nan")
    poisoned_v[:, :, 32:] = float("nan")
    for kw in (dict(causal=True), dict(causal=True, seq_len=32)):
        out, lse = block_attention_forward(q, poisoned_k, poisoned_v, **kw)
        close(out, want_out, 1e-6, 1e-6, f"out {kw}")
        close(lse, want_lse, 1e-6, 1e-6, f"lse {kw}")
        dq, dk, dv = block_attention_backward(dout, q, poisoned_k, poisoned_v, out, lse, **kw)
        close(dq, want[0], 1e-5, 1e-5, f"dq {kw}")
        assert torch.all(dk[:, :, 32:] == 0) and torch.all(dv[:, :, 32:] == 0)
        close(dk[:, :, :32], want[1], 1e-5, 1e-5, f"dk {kw}")
        close(dv[:, :, :32], want[2], 1e-5, 1e-5, f"dv {kw}")


def test_kernel_default_tiles_match_reference():
    """The interpreter's default 64-wide tiles (one tile per block here) against the reference."""
    q, k, v = make_qkv(2, 2, 2, 50, 50, 64, torch.float32, seed=9)
    dout = torch.randn_like(q)
    out, lse = block_attention_forward(q, k, v, causal=True)
    grads = block_attention_backward(dout, q, k, v, out, lse, causal=True)
    ref_out, ref_lse = block_attention_forward_reference(q.double(), k.double(), v.double(), causal=True)
    ref = block_attention_backward_reference(dout.double(), q.double(), k.double(), v.double(), ref_out, ref_lse,
                                             causal=True)
    close(out, ref_out, 2e-5, 2e-5, "out")
    close(lse, ref_lse, 2e-5, 2e-5, "lse")
    for name, got, expect in zip(("dq", "dk", "dv"), grads, ref):
        close(got, expect, 2e-4, 2e-4, name)


# ---- merge ---------------------------------------------------------------------------------------

def test_merge_two_halves_equals_the_whole_reference():
    q, k, v = make_qkv(2, 3, 3, 7, 20, 16, torch.float64, seed=10)
    with forced("reference"):
        whole = block_attention_forward(q, k, v)
        a = block_attention_forward(q, k[:, :, :9], v[:, :, :9])
        b = block_attention_forward(q, k[:, :, 9:], v[:, :, 9:], k_offset=9)
    out, lse = merge_attention(*a, *b)
    close(out, whole[0], 1e-12, 1e-12, "out")
    close(lse, whole[1], 1e-12, 1e-12, "lse")
    # order does not matter
    out2, lse2 = merge_attention(*b, *a)
    close(out2, out, 1e-12, 1e-12, "out swapped")


def test_merge_is_overflow_free_and_handles_masked_rows():
    out_a = torch.full((1, 1, 4, 2), 2.0, dtype=torch.bfloat16)
    out_b = torch.full((1, 1, 4, 2), -1.0)
    inf = float("inf")
    lse_a = torch.tensor([[[1000.0, -inf, -inf, 88.0]]])
    lse_b = torch.tensor([[[1000.0 + math.log(3.0), 5.0, -inf, 88.0]]])
    out, lse = merge_attention(out_a, lse_a, out_b, lse_b)
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert not out.isnan().any() and not lse.isnan().any()
    # row 0: weights about 1/4, 3/4 with exp(1000) far past float32; row 1: b alone; row 2: masked;
    # row 3: halves. Row 0's weight from the float32 lse as stored (its rounding moves it by ~1e-5)
    w = 1.0 / (1.0 + math.exp(float(lse_b[0, 0, 0].double() - lse_a[0, 0, 0].double())))
    torch.testing.assert_close(out[0, 0, :, 0], torch.tensor([2.0 * w - (1.0 - w), -1.0, 0.0, 0.5]))
    torch.testing.assert_close(lse[0, 0], torch.tensor([1000.0 + math.log(4.0), 5.0, -inf, 88.0 + math.log(2.0)]))


# ---- ops and arguments ---------------------------------------------------------------------------

@pytest.mark.parametrize("path", ["reference", "interpret"])
def test_opcheck(path):
    q, k, v = make_qkv(1, 2, 1, 9, 11, 16, torch.float32, seed=11)
    out, lse = block_attention_forward(q, k, v, causal=True, q_offset=3)
    ops = torch.ops.nexus
    cases = [(ops.block_attention_forward, (q, k, v, True, 3, 0, 0.25, 13)),
             (ops.block_attention_backward, (torch.randn_like(q), q, k, v, out, lse, True, 3, 0, 0.25, None)),
             (ops.merge_attention, (out, lse, out.bfloat16(), lse - 1.0))]
    with forced(path):
        for op, args in cases:
            torch.library.opcheck(op, args)


def test_bad_inputs_raise_clear_errors():
    q, k, v = make_qkv(1, 4, 2, 8, 8, 16, torch.float32)
    bad = [
        (dict(q=q[0]), ValueError, "q must be 4-D"),
        (dict(k=make_qkv(1, 4, 3, 8, 8, 16, torch.float32)[1], v=make_qkv(1, 4, 3, 8, 8, 16, torch.float32)[2]),
         ValueError, "multiple of kv heads"),
        (dict(v=v[:, :, :5]), ValueError, "same shape"),
        (dict(k=k[..., :8], v=v[..., :8]), ValueError, "head dim"),
        (dict(k=k.double()), TypeError, "share a dtype"),
        (dict(q=q.int()), TypeError, "dtype"),
        (dict(q_offset=-1), ValueError, "q_offset"),
        (dict(k_offset=1.5), ValueError, "k_offset"),
        (dict(seq_len=-3), ValueError, "seq_len"),
        (dict(softmax_scale=0.0), ValueError, "softmax_scale"),
        (dict(causal=1), TypeError, "causal"),
    ]
    for change, error, match in bad:
        args = dict(q=q, k=k, v=v)
        args.update(change)
        with pytest.raises(error, match=match):
            block_attention_forward(**args)
    out, lse = block_attention_forward(q, k, v)
    with pytest.raises(ValueError, match="lse must be a tensor of shape"):
        block_attention_backward(out, q, k, v, out, lse[:, :, :4])
    with pytest.raises(ValueError, match="dout must have q's shape"):
        block_attention_backward(out[:, :2], q, k, v, out, lse)
    with pytest.raises(ValueError, match="lse_b must be a tensor of shape"):
        merge_attention(out, lse, out, lse[0])
    wide = make_qkv(1, 1, 1, 4, 4, 264, torch.float32)
    with pytest.raises(ValueError, match="head dim D=264"):
        block_attention_forward(*wide)  # the interpreted kernel path
    with forced("reference"):
        assert block_attention_forward(*wide)[0].shape == (1, 1, 4, 264)
