"""Triton kernels of ``nexus_kernels.attention``: FlashAttention-2 forward, and backward as two
kernels (dK/dV per key tile, dQ per query tile), with their launchers.

Imported only by the launchers in ``attention.py`` when a kernel runs (Triton is optional); the maths
and the masking rule are documented there. Scores are kept in base 2 (``qk_scale = scale * log2 e``,
``exp2``), as in FlashAttention-2 (Dao 2023, arXiv:2307.08691, Algorithms 1 and 2).

Masking, in a block's local indices: key j is inside the sequence iff ``j < n_keys`` (the launcher
folds Sk and ``seq_len`` into ``n_keys``) and, when causal, visible to query i iff ``j <= i + diag``
(``diag = q_offset - k_offset``). Each program splits its loop into the tiles that need no mask and
the tiles that cross the diagonal or ``n_keys``; tiles wholly masked are never visited.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _dot(a, b, acc):
    """acc + a @ b; full-precision products for fp32 operands (not TF32)."""
    if a.dtype == tl.float32:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _fwd_inner(acc, m_i, l_i, q, k_base, v_base, skn, skd, svn, svd, offs_m, offs_d, start, end, n_keys, diag,
               qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, EVEN_D: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """Online softmax over key tiles [start, end): running max m_i (base 2), sum l_i, unnormalised acc."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        kt_ptrs = k_base + cols[None, :].to(tl.int64) * skn + offs_d[:, None] * skd  # K^T tile [BLOCK_D, BLOCK_N]
        v_ptrs = v_base + cols[:, None].to(tl.int64) * svn + offs_d[None, :] * svd
        if MASKED:
            kt = tl.load(kt_ptrs, mask=(cols[None, :] < n_keys) & (offs_d[:, None] < HEAD_DIM), other=0.0)
            v = tl.load(v_ptrs, mask=(cols[:, None] < n_keys) & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif EVEN_D:
            kt = tl.load(kt_ptrs)
            v = tl.load(v_ptrs)
        else:
            kt = tl.load(kt_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        if UPCAST:  # the interpreter's low-precision tl.dot is wrong: multiply in fp32 there
            kt = kt.to(tl.float32)
            v = v.to(tl.float32)
        s = _dot(q, kt, tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32)) * qk_scale
        if MASKED:
            ok = cols[None, :] < n_keys
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + diag)
            s = tl.where(ok, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet stays at 0
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = _dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def _key_ranges(start_m, n_keys, diag, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key tiles of query tile [start_m, start_m + BLOCK_M): [0, full) need no mask, [full, hi) do."""
    hi = n_keys
    full = n_keys
    if CAUSAL:
        hi = tl.minimum(hi, start_m + BLOCK_M + diag)   # last row's last visible key, + 1
        full = tl.minimum(full, start_m + diag + 1)     # first row's last visible key, + 1
    hi = tl.maximum(hi, 0)
    full = tl.maximum(tl.minimum(full, hi), 0) // BLOCK_N * BLOCK_N
    return full, hi


@triton.jit
def _attn_fwd_kernel(q_ptr, k_ptr, v_ptr, o_ptr, lse_ptr,
                     sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, som, sod,
                     Sq, n_keys, diag, qk_scale, HQ, GROUPS,
                     CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """out, lse of one query tile of one (batch, query head): FlashAttention-2 Algorithm 1."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    hk = h // GROUPS  # GQA: the kv head of this query head, read in place
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m[:, None].to(tl.int64)
    q = tl.load(q_ptr + b * sqb + h * sqh + rows * sqm + offs_d[None, :] * sqd,
                mask=(offs_m[:, None] < Sq) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    full, hi = _key_ranges(start_m, n_keys, diag, CAUSAL, BLOCK_M, BLOCK_N)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, skn, skd, svn, svd, offs_m, offs_d, 0, full,
                               n_keys, diag, qk_scale, False, CAUSAL, HEAD_DIM == BLOCK_D, HEAD_DIM, BLOCK_N, UPCAST)
    acc, m_i, l_i = _fwd_inner(acc, m_i, l_i, q, k_base, v_base, skn, skd, svn, svd, offs_m, offs_d, full, hi,
                               n_keys, diag, qk_scale, True, CAUSAL, HEAD_DIM == BLOCK_D, HEAD_DIM, BLOCK_N, UPCAST)
    visible = l_i > 0.0
    out = acc / tl.where(visible, l_i, 1.0)[:, None]  # a row with no visible key: acc = 0 -> out = 0
    lse = tl.where(visible, (m_i + tl.math.log2(tl.where(visible, l_i, 1.0))) * 0.6931471805599453, float("-inf"))
    row_ok = offs_m < Sq
    tl.store(o_ptr + b * sob + h * soh + rows * som + offs_d[None, :] * sod, out.to(o_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(lse_ptr + bh.to(tl.int64) * Sq + offs_m, lse, mask=row_ok)


@triton.jit
def _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, sqm, sqd, sdm, sdd, offs_n, offs_d,
                    start, end, Sq, n_keys, diag, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, UPCAST: tl.constexpr):
    """dV += P^T dO and dK += dS^T Q (unscaled) over query tiles [start, end), transposed scores [N, M]."""
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        rows = offs_m.to(tl.int64)
        row_ok = offs_m < Sq
        dmask = offs_d < HEAD_DIM
        qt = tl.load(q_base + rows[None, :] * sqm + offs_d[:, None] * sqd,
                     mask=row_ok[None, :] & dmask[:, None], other=0.0)            # Q^T [BLOCK_D, BLOCK_M]
        do = tl.load(do_base + rows[:, None] * sdm + offs_d[None, :] * sdd,
                     mask=row_ok[:, None] & dmask[None, :], other=0.0)            # dO [BLOCK_M, BLOCK_D]
        # lse = -inf (no visible key) or a padding row: +inf makes P = 0 there, never NaN
        lse = tl.load(lse_base + offs_m, mask=row_ok, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        if UPCAST:
            qt = qt.to(tl.float32)
            do = do.to(tl.float32)
        st = _dot(k, qt, tl.zeros((k.shape[0], BLOCK_M), dtype=tl.float32))
        pt = tl.math.exp2(st * qk_scale - lse[None, :])
        if MASKED:
            ok = offs_n[:, None] < n_keys
            if CAUSAL:
                ok = ok & (offs_n[:, None] <= offs_m[None, :] + diag)
            pt = tl.where(ok, pt, 0.0)
        dv = _dot(pt.to(do.dtype), do, dv)
        dpt = _dot(v, tl.trans(do), tl.zeros((k.shape[0], BLOCK_M), dtype=tl.float32))
        dst = pt * (dpt - delta[None, :])
        dk = _dot(dst.to(qt.dtype), tl.trans(qt), dk)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                          sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                          Sq, Sk, n_keys, diag, qk_scale, sm_scale, HKV, GROUPS,
                          CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """dK, dV (float32, contiguous [B, Hkv, Sk, D]) of one key tile of one kv head, summed over its
    GROUPS query heads: FlashAttention-2 Algorithm 2's outer loop over key tiles, without atomics."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = (bh // HKV).to(tl.int64)
    hk = (bh % HKV).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    cols = offs_n[:, None].to(tl.int64)
    kv_mask = (offs_n[:, None] < Sk) & (offs_d[None, :] < HEAD_DIM)
    k = tl.load(k_ptr + b * skb + hk * skh + cols * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(v_ptr + b * svb + hk * svh + cols * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    end = (Sq + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    lo = 0
    mid = 0  # query tiles [lo, mid) cross the diagonal or n_keys and are masked; [mid, end) are not
    if CAUSAL:
        lo = tl.minimum(tl.maximum(start_n - diag, 0) // BLOCK_M * BLOCK_M, end)  # first row seeing the first key
        mid = tl.minimum(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), end)        # first row seeing the last key
        mid = tl.maximum((mid + BLOCK_M - 1) // BLOCK_M * BLOCK_M, lo)
        mid = tl.minimum(mid, end)
    mid = tl.where(start_n + BLOCK_N > n_keys, end, mid)  # the tile reaches past the sequence: all masked
    lo = tl.where(start_n >= n_keys, end, lo)              # the whole tile is padding: nothing to do
    for g in range(0, GROUPS):
        h = hk * GROUPS + g
        q_base = q_ptr + b * sqb + h * sqh
        do_base = do_ptr + b * sdb + h * sdh
        row0 = (b * HKV * GROUPS + h) * Sq
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_ptr + row0, delta_ptr + row0, sqm, sqd, sdm,
                                 sdd, offs_n, offs_d, lo, mid, Sq, n_keys, diag, qk_scale, True, CAUSAL, HEAD_DIM,
                                 BLOCK_M, UPCAST)
        dk, dv = _bwd_dkdv_inner(dk, dv, k, v, q_base, do_base, lse_ptr + row0, delta_ptr + row0, sqm, sqd, sdm,
                                 sdd, offs_n, offs_d, tl.maximum(mid, lo), end, Sq, n_keys, diag, qk_scale, False,
                                 CAUSAL, HEAD_DIM, BLOCK_M, UPCAST)
    out = (b * HKV + hk) * Sk * HEAD_DIM + cols * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptr + out, dk * sm_scale, mask=kv_mask)
    tl.store(dv_ptr + out, dv, mask=kv_mask)


@triton.jit
def _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, offs_m, offs_d, start, end, n_keys,
                  diag, qk_scale, MASKED: tl.constexpr, CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr,
                  BLOCK_N: tl.constexpr, UPCAST: tl.constexpr):
    """dQ += dS K (unscaled) over key tiles [start, end)."""
    offs_n = tl.arange(0, BLOCK_N)
    for start_n in range(start, end, BLOCK_N):
        cols = start_n + offs_n
        col_ok = cols < n_keys
        dmask = offs_d < HEAD_DIM
        kt = tl.load(k_base + cols[None, :].to(tl.int64) * skn + offs_d[:, None] * skd,
                     mask=col_ok[None, :] & dmask[:, None], other=0.0)             # K^T [BLOCK_D, BLOCK_N]
        vt = tl.load(v_base + cols[None, :].to(tl.int64) * svn + offs_d[:, None] * svd,
                     mask=col_ok[None, :] & dmask[:, None], other=0.0)             # V^T [BLOCK_D, BLOCK_N]
        if UPCAST:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = _dot(q, kt, tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32))
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            ok = col_ok[None, :]
            if CAUSAL:
                ok = ok & (cols[None, :] <= offs_m[:, None] + diag)
            p = tl.where(ok, p, 0.0)
        dp = _dot(do, vt, tl.zeros((q.shape[0], BLOCK_N), dtype=tl.float32))
        ds = p * (dp - delta[:, None])
        dq = _dot(ds.to(kt.dtype), tl.trans(kt), dq)
    return dq


@triton.jit
def _attn_bwd_dq_kernel(q_ptr, k_ptr, v_ptr, do_ptr, lse_ptr, delta_ptr, dq_ptr,
                        sqb, sqh, sqm, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sdb, sdh, sdm, sdd,
                        Sq, n_keys, diag, qk_scale, sm_scale, HQ, GROUPS,
                        CAUSAL: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, UPCAST: tl.constexpr):
    """dQ (float32, contiguous [B, Hq, Sq, D]) of one query tile: FlashAttention-2's dQ loop."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = (bh // HQ).to(tl.int64)
    h = (bh % HQ).to(tl.int64)
    hk = h // GROUPS
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_m[:, None].to(tl.int64)
    row_ok = offs_m < Sq
    mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + b * sqb + h * sqh + rows * sqm + offs_d[None, :] * sqd, mask=mask, other=0.0)
    do = tl.load(do_ptr + b * sdb + h * sdh + rows * sdm + offs_d[None, :] * sdd, mask=mask, other=0.0)
    if UPCAST:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    row0 = bh.to(tl.int64) * Sq
    lse = tl.load(lse_ptr + row0 + offs_m, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634  # P = 0, never NaN
    delta = tl.load(delta_ptr + row0 + offs_m, mask=row_ok, other=0.0)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    full, hi = _key_ranges(start_m, n_keys, diag, CAUSAL, BLOCK_M, BLOCK_N)
    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, offs_m, offs_d, 0, full, n_keys,
                       diag, qk_scale, False, CAUSAL, HEAD_DIM, BLOCK_N, UPCAST)
    dq = _bwd_dq_inner(dq, q, do, lse, delta, k_base, v_base, skn, skd, svn, svd, offs_m, offs_d, full, hi, n_keys,
                       diag, qk_scale, True, CAUSAL, HEAD_DIM, BLOCK_N, UPCAST)
    tl.store(dq_ptr + row0 * HEAD_DIM + rows * HEAD_DIM + offs_d[None, :], dq * sm_scale, mask=mask)


# ----------------------------------------------------------------------------------------------
# Launch configurations and launchers
# ----------------------------------------------------------------------------------------------
def head_block(d: int) -> int:
    """Head dim padded to a power of two >= 16 (tl.dot's smallest K)."""
    return max(16, 1 << (d - 1).bit_length())


def gpu_config(kind: str, block_d: int, dtype: torch.dtype) -> dict:
    """Tiles, warps and stages on a GPU for ``kind`` in fwd | dkdv | dq (FlashAttention-2 / Triton
    tutorial choices for Hopper). fp32 operands (full-precision FMA products, no tensor cores: a
    correctness path) take small tiles and two stages."""
    wide = block_d > 128
    if dtype == torch.float32:
        m, n = {"fwd": (64, 32), "dkdv": (32, 64), "dq": (64, 32)}[kind]
        return dict(BLOCK_M=m, BLOCK_N=n, num_warps=4, num_stages=2)
    if kind == "fwd":
        cfg = dict(BLOCK_M=64 if wide else 128, BLOCK_N=32 if wide else 64, num_warps=8 if block_d >= 128 else 4,
                   num_stages=3)
    elif kind == "dkdv":
        cfg = dict(BLOCK_M=16 if wide else 32, BLOCK_N=64 if wide else 128, num_warps=4 if wide else 8,
                   num_stages=3)
    elif kind == "dq":
        cfg = dict(BLOCK_M=64 if wide else 128, BLOCK_N=16 if wide else 32, num_warps=4 if wide else 8,
                   num_stages=3)
    else:
        raise ValueError(f"kind={kind!r}; expected fwd, dkdv or dq")
    return cfg


def _launch_config(kind: str, block_d: int, dtype: torch.dtype, interpret: bool, blocks: tuple[int, int]) -> dict:
    if interpret:
        return dict(BLOCK_M=blocks[0], BLOCK_N=blocks[1])
    return gpu_config(kind, block_d, dtype)


def forward(q, k, v, *, causal: bool, diag: int, n_keys: int, scale: float, interpret: bool,
            blocks: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """out [B, Hq, Sq, D] (q's dtype) and lse [B, Hq, Sq] float32 for any strides of q, k, v."""
    B, HQ, Sq, D = q.shape
    HKV = k.shape[1]
    out = torch.empty(B, HQ, Sq, D, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, HQ, Sq, dtype=torch.float32, device=q.device)
    block_d = head_block(D)
    cfg = _launch_config("fwd", block_d, q.dtype, interpret, blocks)
    grid = (triton.cdiv(Sq, cfg["BLOCK_M"]), B * HQ)
    _attn_fwd_kernel[grid](q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(), *out.stride(),
                           Sq, n_keys, diag, scale * LOG2E, HQ, HQ // HKV,
                           CAUSAL=causal, HEAD_DIM=D, BLOCK_D=block_d, UPCAST=interpret and q.dtype != torch.float32,
                           **cfg)
    return out, lse


def backward(dout, q, k, v, lse, delta, *, causal: bool, diag: int, n_keys: int, scale: float, interpret: bool,
             blocks: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq [B, Hq, Sq, D], dk, dv [B, Hkv, Sk, D], float32; lse and delta contiguous [B, Hq, Sq] float32."""
    B, HQ, Sq, D = q.shape
    HKV, Sk = k.shape[1], k.shape[2]
    dout = dout.to(q.dtype)  # the matmuls take one operand dtype
    dq = torch.empty(B, HQ, Sq, D, dtype=torch.float32, device=q.device)
    dk = torch.empty(B, HKV, Sk, D, dtype=torch.float32, device=q.device)
    dv = torch.empty_like(dk)
    block_d = head_block(D)
    upcast = interpret and q.dtype != torch.float32
    strides = (*q.stride(), *k.stride(), *v.stride(), *dout.stride())
    cfg = _launch_config("dkdv", block_d, q.dtype, interpret, blocks)
    _attn_bwd_dkdv_kernel[(triton.cdiv(Sk, cfg["BLOCK_N"]), B * HKV)](
        q, k, v, dout, lse, delta, dk, dv, *strides, Sq, Sk, n_keys, diag, scale * LOG2E, scale, HKV, HQ // HKV,
        CAUSAL=causal, HEAD_DIM=D, BLOCK_D=block_d, UPCAST=upcast, **cfg)
    cfg = _launch_config("dq", block_d, q.dtype, interpret, blocks)
    _attn_bwd_dq_kernel[(triton.cdiv(Sq, cfg["BLOCK_M"]), B * HQ)](
        q, k, v, dout, lse, delta, dq, *strides, Sq, n_keys, diag, scale * LOG2E, scale, HQ, HQ // HKV,
        CAUSAL=causal, HEAD_DIM=D, BLOCK_D=block_d, UPCAST=upcast, **cfg)
    return dq, dk, dv
