"""Triton kernels of ``nexus_kernels.soap``: the fused Kronecker-factor EMA and a strided matmul.

Imported only by the launchers in ``soap.py`` when a kernel runs (Triton is optional); the maths
and the paper are documented there.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


def acc_type(dtype: torch.dtype):
    """Accumulator type for a statistics / accumulation dtype: float64 for float64, else float32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.jit
def _gram_ema_block(z_ptr, s_row, s_red, rows, red, out_ptr, so_m, so_n, pid, beta,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ACC: tl.constexpr):
    """Block (i, j), j <= i, of out <- beta out + (1 - beta) Z Z^T, stored at (i, j) and (j, i)."""
    i = ((tl.sqrt((8 * pid + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int32)
    i = tl.where(i * (i + 1) // 2 > pid, i - 1, i)
    i = tl.where((i + 1) * (i + 2) // 2 <= pid, i + 1, i)
    j = pid - i * (i + 1) // 2
    rm = (i * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (j * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    a_ptrs = z_ptr + rm[:, None] * s_row + rk[None, :] * s_red
    b_ptrs = z_ptr + rn[:, None] * s_row + rk[None, :] * s_red
    acc = tl.zeros((BLOCK_M, BLOCK_M), dtype=ACC)
    for k in range(0, (red + BLOCK_K - 1) // BLOCK_K):
        kmask = rk[None, :] < red - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < rows) & kmask, other=0.0).to(ACC)
        b = tl.load(b_ptrs, mask=(rn[:, None] < rows) & kmask, other=0.0).to(ACC)
        acc = tl.dot(a, tl.trans(b), acc, input_precision="ieee", out_dtype=ACC)
        a_ptrs += BLOCK_K * s_red
        b_ptrs += BLOCK_K * s_red
    mask = (rm[:, None] < rows) & (rn[None, :] < rows)
    ptrs = out_ptr + rm[:, None] * so_m + rn[None, :] * so_n
    old = tl.load(ptrs, mask=mask, other=0.0)
    new = beta * old + (1.0 - beta) * acc
    tl.store(ptrs, new, mask=mask)
    if i != j:  # (j, i) is never read by another program, so the in-place mirror is safe
        tl.store(out_ptr + rn[:, None] * so_m + rm[None, :] * so_n, tl.trans(new),
                 mask=(rn[:, None] < rows) & (rm[None, :] < rows))

@triton.jit
def _precond_ema_kernel(g_ptr, l_ptr, r_ptr, m, n, sgm, sgn, slm, sln, srm, srn, n_left, beta,
                        BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, ACC_L: tl.constexpr,
                        ACC_R: tl.constexpr):
    """Programs [0, n_left) update L from G G^T; the rest update R from G^T G."""
    pid = tl.program_id(0)
    if pid < n_left:
        _gram_ema_block(g_ptr, sgm, sgn, m, n, l_ptr, slm, sln, pid, beta, BLOCK_M, BLOCK_K, ACC_L)
    else:
        _gram_ema_block(g_ptr, sgn, sgm, n, m, r_ptr, srm, srn, pid - n_left, beta, BLOCK_M, BLOCK_K, ACC_R)

@triton.jit
def _matmul_kernel(a_ptr, b_ptr, c_ptr, M, N, K, sam, sak, sbk, sbn, scm, scn,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   ACC: tl.constexpr):
    """C = A B with arbitrary strides (transposed operands are free); operands upcast to ACC."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rm = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    rn = (pid_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    rk = tl.arange(0, BLOCK_K).to(tl.int64)
    a_ptrs = a_ptr + rm[:, None] * sam + rk[None, :] * sak
    b_ptrs = b_ptr + rk[:, None] * sbk + rn[None, :] * sbn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for k in range(0, (K + BLOCK_K - 1) // BLOCK_K):
        left = K - k * BLOCK_K
        a = tl.load(a_ptrs, mask=(rm[:, None] < M) & (rk[None, :] < left), other=0.0).to(ACC)
        b = tl.load(b_ptrs, mask=(rk[:, None] < left) & (rn[None, :] < N), other=0.0).to(ACC)
        acc = tl.dot(a, b, acc, input_precision="ieee", out_dtype=ACC)
        a_ptrs += BLOCK_K * sak
        b_ptrs += BLOCK_K * sbk
    tl.store(c_ptr + rm[:, None] * scm + rn[None, :] * scn, acc.to(c_ptr.dtype.element_ty),
             mask=(rm[:, None] < M) & (rn[None, :] < N))
