"""SOAP's matrix work: the Kronecker-factor EMA and the projections into and out of the eigenbasis.

SOAP (Vyas et al., 2024, "SOAP: Improving and Stabilizing Shampoo using Adam", arXiv:2409.11321)
keeps, for a gradient G of shape (m, n), Shampoo's two factors

    L <- beta L + (1 - beta) G G^T      (m, m)
    R <- beta R + (1 - beta) G^T G      (n, n)

and runs Adam on G' = QL^T G QR, where QL and QR are eigenvector bases of L and R; the Adam
direction is mapped back by QL D QR^T. ``update_preconditioners`` updates both factors in one
launch, computing only the blocks on or below each diagonal and mirroring them; ``project`` and
``project_back`` are two strided matmuls (transposes cost nothing). Either side may be None (the
identity), for a dimension too large to precondition.
"""
from __future__ import annotations

import torch

from nexus_kernels._backend import select

__all__ = [
    "project",
    "project_back",
    "project_back_reference",
    "project_reference",
    "update_preconditioners",
    "update_preconditioners_reference",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_matrix(name: str, t: torch.Tensor, size: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a float16, bfloat16, float32 or float64 tensor, got {t.dtype}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2D, got shape {tuple(t.shape)}")
    if size is not None and tuple(t.shape) != (size, size):
        raise ValueError(f"{name} must have shape ({size}, {size}), got {tuple(t.shape)}")


def _check_update(L, R, G, beta) -> None:
    _check_matrix("G", G)
    m, n = G.shape
    for name, S, size in (("L", L, m), ("R", R, n)):
        if S is None:
            continue
        _check_matrix(name, S, size)
        if S.dtype not in (torch.float32, torch.float64):
            raise TypeError(f"{name} holds running statistics and must be float32 or float64, got {S.dtype}")
        if S.device != G.device:
            raise ValueError(f"{name} is on {S.device} but G is on {G.device}")
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")


def update_preconditioners_reference(L: torch.Tensor | None, R: torch.Tensor | None, G: torch.Tensor,
                                     beta: float) -> None:
    """In place: ``L <- beta L + (1-beta) G G^T``, ``R <- beta R + (1-beta) G^T G`` (plain torch).

    Example::

        L, R, G = torch.zeros(64, 64), torch.zeros(32, 32), torch.randn(64, 32)
        update_preconditioners_reference(L, R, G, 0.95)
    """
    _check_update(L, R, G, beta)
    for S, transpose in ((L, False), (R, True)):
        if S is None:
            continue
        g = G.to(S.dtype)
        g = g.mT if transpose else g
        S.mul_(beta).add_(g @ g.mT, alpha=1.0 - beta)


def update_preconditioners(L: torch.Tensor | None, R: torch.Tensor | None, G: torch.Tensor,
                           beta: float) -> None:
    """Fused Shampoo-factor EMA, in place, in one launch over G.

    Args:
        L: ``(m, m)`` float32/float64 or None (left side not preconditioned).
        R: ``(n, n)`` float32/float64 or None (right side not preconditioned).
        G: ``(m, n)`` gradient, any float dtype (upcast to the statistics' dtype).
        beta: EMA factor in [0, 1].

    L and R must be symmetric (they are, if they started symmetric): only the blocks on and
    below the diagonal are computed and each is mirrored.

    Example::

        L, R, G = torch.zeros(64, 64), torch.zeros(32, 32), torch.randn(64, 32)
        update_preconditioners(L, R, G, 0.95)      # L ~ 0.05 G G^T, R ~ 0.05 G^T G
    """
    _check_update(L, R, G, beta)
    tensors = [t for t in (L, R, G) if t is not None]
    if (L is None and R is None) or G.numel() == 0:
        if G.numel() == 0:  # G G^T of an empty reduction is zero
            for S in (L, R):
                if S is not None:
                    S.mul_(beta)
        return
    if select(*tensors) == "reference":
        update_preconditioners_reference(L, R, G, beta)
        return
    _update_launch(L, R, G, float(beta))


def _check_project(G, QL, QR) -> None:
    _check_matrix("G", G)
    m, n = G.shape
    for name, Q, size in (("QL", QL, m), ("QR", QR, n)):
        if Q is not None:
            _check_matrix(name, Q, size)
            if Q.device != G.device:
                raise ValueError(f"{name} is on {Q.device} but G is on {G.device}")


def _acc_dtype(*tensors) -> torch.dtype:
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def project_reference(G: torch.Tensor, QL: torch.Tensor | None, QR: torch.Tensor | None) -> torch.Tensor:
    """``QL^T G QR`` in plain torch (float32, or float64 if any input is); returns G's dtype."""
    _check_project(G, QL, QR)
    acc = _acc_dtype(G, QL, QR)
    out = G.to(acc)
    if QL is not None:
        out = QL.to(acc).mT @ out
    if QR is not None:
        out = out @ QR.to(acc)
    return out.to(G.dtype)


def project_back_reference(G: torch.Tensor, QL: torch.Tensor | None, QR: torch.Tensor | None) -> torch.Tensor:
    """``QL G QR^T`` in plain torch (float32, or float64 if any input is); returns G's dtype."""
    _check_project(G, QL, QR)
    acc = _acc_dtype(G, QL, QR)
    out = G.to(acc)
    if QL is not None:
        out = QL.to(acc) @ out
    if QR is not None:
        out = out @ QR.to(acc).mT
    return out.to(G.dtype)


def project(G: torch.Tensor, QL: torch.Tensor | None, QR: torch.Tensor | None) -> torch.Tensor:
    """Rotate G into the eigenbasis: ``QL^T G QR`` (a None side is the identity).

    Args:
        G: ``(m, n)``; QL: ``(m, m)`` or None; QR: ``(n, n)`` or None. Any float dtypes.

    Returns:
        ``(m, n)`` in G's dtype, accumulated in float32 (float64 if any input is float64).

    Example::

        QL, QR = torch.linalg.qr(torch.randn(64, 64))[0], None
        Gp = project(torch.randn(64, 32), QL, QR)      # == QL.T @ G
    """
    _check_project(G, QL, QR)
    return _project(G, QL, QR, back=False)


def project_back(G: torch.Tensor, QL: torch.Tensor | None, QR: torch.Tensor | None) -> torch.Tensor:
    """Rotate back out of the eigenbasis: ``QL G QR^T`` (a None side is the identity).

    Shapes and dtypes as ``project``; ``project_back(project(G, QL, QR), QL, QR) == G`` for
    orthogonal QL, QR.

    Example::

        QL, QR = torch.linalg.qr(torch.randn(64, 64))[0], torch.linalg.qr(torch.randn(32, 32))[0]
        G2 = project_back(project(G, QL, QR), QL, QR)  # ~ G
    """
    _check_project(G, QL, QR)
    return _project(G, QL, QR, back=True)


def _project(G, QL, QR, back: bool) -> torch.Tensor:
    if QL is None and QR is None:
        return G.clone()
    tensors = [t for t in (G, QL, QR) if t is not None]
    if select(*tensors) == "reference" or G.numel() == 0:
        return (project_back_reference if back else project_reference)(G, QL, QR)
    acc = _acc_dtype(G, QL, QR)
    out = G
    if QL is not None:  # QL^T G or QL G: the transpose is a stride swap
        out = _matmul(QL if back else QL.mT, out, acc)
    if QR is not None:
        out = _matmul(out, QR.mT if back else QR, acc)
    return out.to(G.dtype)


# ----------------------------------------------------------------------------------------------
# Triton kernels: defined only where Triton imports; the reference path never needs it
# ----------------------------------------------------------------------------------------------

# Interpreter blocks: large, so each call is a handful of programs; tests lower it to cover tiling.
_INTERPRET_MAX_BLOCK = 128


try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the reference path still works
    triton = None

if triton is not None:

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



def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, (n - 1).bit_length())))


def _tl_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def _update_launch(L, R, G, beta: float) -> None:
    m, n = G.shape
    interpret = G.device.type != "cuda"
    if interpret:
        block_m = _pow2(max(m if L is not None else 1, n if R is not None else 1), 16, _INTERPRET_MAX_BLOCK)
        block_k = _pow2(max(m, n), 16, 2 * _INTERPRET_MAX_BLOCK)
        opts = {}
    else:  # statistics are a small part of a step: one fixed, safe tile
        block_m, block_k = 64, 32
        opts = {"num_warps": 4, "num_stages": 3}

    def tiles(size):
        t = -(-size // block_m)
        return t * (t + 1) // 2

    n_left = tiles(m) if L is not None else 0
    n_right = tiles(n) if R is not None else 0
    # an absent side gets the present one as a never-used stand-in pointer
    Lp = L if L is not None else R
    Rp = R if R is not None else L
    _precond_ema_kernel[(n_left + n_right,)](
        G, Lp, Rp, m, n, *G.stride(), *Lp.stride(), *Rp.stride(), n_left, beta,
        BLOCK_M=block_m, BLOCK_K=block_k, ACC_L=_tl_dtype(Lp.dtype), ACC_R=_tl_dtype(Rp.dtype), **opts)


def _matmul(A: torch.Tensor, B: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    M, K = A.shape
    N = B.shape[1]
    C = torch.empty(M, N, device=A.device, dtype=acc)
    if A.device.type != "cuda":
        bm, bn, bk = (_pow2(M, 16, _INTERPRET_MAX_BLOCK), _pow2(N, 16, _INTERPRET_MAX_BLOCK),
                      _pow2(K, 16, 2 * _INTERPRET_MAX_BLOCK))
        opts = {}
    else:
        bm, bn, bk = 64, 64, 32
        opts = {"num_warps": 4, "num_stages": 3}
    grid = (-(-M // bm), -(-N // bn))
    _matmul_kernel[grid](A, B, C, M, N, K, *A.stride(), *B.stride(), *C.stride(),
                         BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ACC=_tl_dtype(acc), **opts)
    return C
