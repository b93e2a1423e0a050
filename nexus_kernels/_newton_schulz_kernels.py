"""Triton kernels of ``nexus_kernels.newton_schulz``: symmetric X X^T (+ beta C) and a X + B X.

Imported only by the launcher in ``newton_schulz.py`` when a kernel runs (Triton is optional);
the iteration, its maths and the paper are documented there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def acc_type(dtype: torch.dtype):
    """Accumulator type for a work dtype: float64 for float64, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _syrk_kernel(x_ptr, c_ptr, out_ptr, M, K,
                 sxb, sxm, sxk, scb, scm, scn, sob, som, son,
                 alpha, beta,
                 HAS_C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
                 UPCAST: tl.constexpr, ACC: tl.constexpr):
    """out = alpha X X^T (+ beta C): block (i, j) with j <= i computed once, stored at (i, j) and (j, i)."""
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    # linear index pid = i (i + 1) / 2 + j over the lower triangle; sqrt guess, then fix rounding
    i = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)
    i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
    j = pid - i * (i + 1) // 2
    x_ptr += batch * sxb
    out_ptr += batch * sob
    # int64 offsets: no overflow on big stacks (and no overflow checks in the interpreter)
    rm = (i * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (j * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    a_ptrs = x_ptr + rm[:, None] * sxm + rk[None, :] * sxk
    b_ptrs = x_ptr + rn[:, None] * sxm + rk[None, :] * sxk
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=ACC)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):  # not tl.cdiv: a nested jit call costs the interpreter
        kmask = rk[None, :] < K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & kmask, other=0.0)
        b = tl.load(b_ptrs, mask=(rn[:, None] < M) & kmask, other=0.0)
        if UPCAST:  # the interpreter's low-precision tl.dot is wrong: multiply in fp32 there
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        if a.dtype == tl.float32 or a.dtype == tl.float64:  # full precision, not TF32, for fp32 inputs
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=ACC, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(b), acc, out_dtype=ACC)
        a_ptrs += BLOCK_K * sxk
        b_ptrs += BLOCK_K * sxk
    acc = acc * alpha
    if HAS_C:
        c_ptr += batch * scb
        cmask = (rm[:, None] < M) & (rn[None, :] < M)
        c = tl.load(c_ptr + rm[:, None] * scm + rn[None, :] * scn, mask=cmask, other=0.0)
        acc += beta * c.to(ACC)
    out = acc.to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rm[:, None] * som + rn[None, :] * son, out,
             mask=(rm[:, None] < M) & (rn[None, :] < M))
    if i != j:
        tl.store(out_ptr + rn[:, None] * som + rm[None, :] * son, tl.trans(out),
                 mask=(rn[:, None] < M) & (rm[None, :] < M))

@triton.jit
def _ns_update_kernel(b_ptr, x_ptr, out_ptr, M, K,
                      sbb, sbm, sbn, sxb, sxm, sxk, sob, som, sok,
                      a_coef,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      GROUP_M: tl.constexpr, UPCAST: tl.constexpr, ACC: tl.constexpr):
    """out = a X + B X for B (M, M) and X (M, K); out must not alias X."""
    pid = tl.program_id(0)
    batch = tl.program_id(1).to(tl.int64)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (K + BLOCK_N - 1) // BLOCK_N
    # grouped order: GROUP_M row-blocks share column tiles of X while they are in L2
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_size
    pid_n = (pid % width) // group_size
    b_ptr += batch * sbb
    x_ptr += batch * sxb
    out_ptr += batch * sob
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    b_ptrs = b_ptr + rm[:, None] * sbm + rk[None, :] * sbn
    x_ptrs = x_ptr + rk[:, None] * sxm + rn[None, :] * sxk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(0, (M + BLOCK_K - 1) // BLOCK_K):
        left = M - k * BLOCK_K
        bm = tl.load(b_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < left), other=0.0)
        xk = tl.load(x_ptrs, mask=(rk[:, None] < left) & (rn[None, :] < K), other=0.0)
        if UPCAST:
            bm = bm.to(tl.float32)
            xk = xk.to(tl.float32)
        if bm.dtype == tl.float32 or bm.dtype == tl.float64:
            acc = tl.dot(bm, xk, acc, out_dtype=ACC, input_precision="ieee")
        else:
            acc = tl.dot(bm, xk, acc, out_dtype=ACC)
        b_ptrs += BLOCK_K * sbn
        x_ptrs += BLOCK_K * sxm
    mask = (rm[:, None] < M) & (rn[None, :] < K)
    x = tl.load(x_ptr + rm[:, None] * sxm + rn[None, :] * sxk, mask=mask, other=0.0)
    acc += a_coef * x.to(ACC)
    tl.store(out_ptr + rm[:, None] * som + rn[None, :] * sok, acc.to(out_ptr.dtype.element_ty), mask=mask)


syrk_configs = [
    triton.Config({"BLOCK_M": bm, "BLOCK_K": bk}, num_warps=w, num_stages=s)
    for bm, bk, w, s in [(128, 64, 8, 3), (128, 32, 8, 4), (64, 64, 4, 4), (64, 32, 4, 5), (128, 64, 4, 3)]
]
update_configs = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
    for bm, bn, bk, w, s in [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 32, 4, 4),
                             (64, 128, 64, 4, 4), (64, 64, 64, 4, 5)]
]
# keys: only HAS_C changes the generated code (tensor dtypes are added to the key by Triton)
_syrk_tuned = triton.autotune(syrk_configs, key=["HAS_C"])(_syrk_kernel)
_ns_update_tuned = triton.autotune(update_configs, key=[])(_ns_update_kernel)
