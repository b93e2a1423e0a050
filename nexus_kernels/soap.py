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

The kernels live in ``_soap_kernels`` (imported on the first launch: Triton is optional). The public
functions call the custom ops ``torch.ops.nexus.soap_update_preconditioners`` (mutates L and R),
``soap_project`` and ``soap_project_back``, which run the reference or the kernels per call; they
are not differentiable (outputs never require grad).
"""
from __future__ import annotations

import torch

from nexus_kernels._backend import register_op, select

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
    if (L is None and R is None) or G.numel() == 0:
        if G.numel() == 0:  # G G^T of an empty reduction is zero
            for S in (L, R):
                if S is not None:
                    S.mul_(beta)
        return
    _update_op(L, R, G.detach(), float(beta))


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
    QL = QL.detach() if QL is not None else None
    QR = QR.detach() if QR is not None else None
    return (_project_back_op if back else _project_op)(G.detach(), QL, QR)


def _project_impl(G: torch.Tensor, QL: torch.Tensor | None, QR: torch.Tensor | None, back: bool) -> torch.Tensor:
    """The ops' body: the reference or two strided kernel matmuls, as ``select`` says."""
    tensors = [t for t in (G, QL, QR) if t is not None]
    if select(*tensors) == "reference" or G.numel() == 0:
        return (project_back_reference if back else project_reference)(G, QL, QR).contiguous()
    acc = _acc_dtype(G, QL, QR)
    out = G
    if QL is not None:  # QL^T G or QL G: the transpose is a stride swap
        out = _matmul(QL if back else QL.mT, out, acc)
    if QR is not None:
        out = _matmul(out, QR.mT if back else QR, acc)
    return out.to(G.dtype)


# ----------------------------------------------------------------------------------------------
# Launchers: the Triton kernels live in _soap_kernels, imported on the first launch
# ----------------------------------------------------------------------------------------------

# Interpreter blocks: large, so each call is a handful of programs; tests lower it to cover tiling.
_INTERPRET_MAX_BLOCK = 128


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, (n - 1).bit_length())))


def _update_launch(L, R, G, beta: float) -> None:
    from nexus_kernels import _soap_kernels as kernels

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
    kernels._precond_ema_kernel[(n_left + n_right,)](
        G, Lp, Rp, m, n, *G.stride(), *Lp.stride(), *Rp.stride(), n_left, beta,
        BLOCK_M=block_m, BLOCK_K=block_k, ACC_L=kernels.acc_type(Lp.dtype), ACC_R=kernels.acc_type(Rp.dtype),
        **opts)


def _matmul(A: torch.Tensor, B: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    from nexus_kernels import _soap_kernels as kernels

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
    kernels._matmul_kernel[grid](A, B, C, M, N, K, *A.stride(), *B.stride(), *C.stride(),
                                 BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, ACC=kernels.acc_type(acc), **opts)
    return C


# ----------------------------------------------------------------------------------------------
# Custom ops: the path is chosen inside, per call
# ----------------------------------------------------------------------------------------------
def _update_impl(L: torch.Tensor | None, R: torch.Tensor | None, G: torch.Tensor, beta: float) -> None:
    if select(*[t for t in (L, R, G) if t is not None]) == "reference":
        update_preconditioners_reference(L, R, G, beta)
    else:
        _update_launch(L, R, G, beta)


def _project_op_impl(G: torch.Tensor, QL: torch.Tensor | None, QR: torch.Tensor | None) -> torch.Tensor:
    return _project_impl(G, QL, QR, back=False)


def _project_back_op_impl(G: torch.Tensor, QL: torch.Tensor | None, QR: torch.Tensor | None) -> torch.Tensor:
    return _project_impl(G, QL, QR, back=True)


_update_op = register_op("soap_update_preconditioners", _update_impl, lambda L, R, G, beta: None,
                         mutates_args=("L", "R"))
_project_op = register_op("soap_project", _project_op_impl, lambda G, QL, QR: G.new_empty(G.shape))
_project_back_op = register_op("soap_project_back", _project_back_op_impl, lambda G, QL, QR: G.new_empty(G.shape))
