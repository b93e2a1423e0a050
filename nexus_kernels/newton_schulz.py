"""Newton-Schulz orthogonalization: the polar factor U V^T of G = U S V^T, approximately.

Muon (Jordan et al., 2024, https://kellerjordan.github.io/posts/muon/) replaces each matrix update by
its nearest semi-orthogonal matrix. Newton-Schulz computes it with matmuls only: normalise
X0 = G / (||G||_F + eps) so every singular value is in [0, 1], transpose so rows <= cols, and iterate

    A = X X^T,    B = b A + c A^2,    X <- a X + B X

which maps each singular value s to p(s) = a s + b s^3 + c s^5. The default quintic
(a, b, c) = (3.4445, -4.7750, 2.0315) pushes every s in (0, 1] into about [0.68, 1.13] in five
steps (it trades exactness for speed). A per-iteration schedule such as Polar Express
(Amsel et al., 2025, arXiv:2505.16932) converges tighter in the same number of steps.

The Triton path runs three kernels per iteration: a symmetric X X^T that computes only the
blocks on or below the diagonal and mirrors them (half the FLOPs of a matmul), the same kernel
for B = b A + c A A^T (A is symmetric, so A^2 = A A^T) with the ``b A`` term fused, and a matmul
with the ``a X + B X`` epilogue fused. A 3D input (a stack of matrices) is one launch per kernel.
The kernels live in ``_newton_schulz_kernels`` (imported on the first launch: Triton is optional).

``orthogonalize`` calls the custom op ``torch.ops.nexus.orthogonalize``, which runs the reference or
the kernels per call; it is not differentiable (the output never requires grad).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from nexus_kernels._backend import register_op, select

__all__ = [
    "DEFAULT_COEFFS",
    "POLAR_EXPRESS_COEFFS",
    "orthogonalize",
    "orthogonalize_reference",
    "polar_express_coeffs",
]

Triple = tuple[float, float, float]
Coeffs = Union[Sequence[float], Sequence[Sequence[float]]]

DEFAULT_COEFFS: Triple = (3.4445, -4.7750, 2.0315)

# Polar Express degree-5 schedule (Amsel et al., 2025, Algorithm 1); after 8 steps it stays (1.875, -1.25, 0.375).
_POLAR_EXPRESS_RAW: tuple[Triple, ...] = (
    (8.28721201814563, -23.595886519098837, 17.300387312530933),
    (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
    (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
    (3.3184196573706015, -2.488488024314874, 0.51004894012372),
    (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
    (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
    (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
    (1.875, -1.25, 0.375),
)


def polar_express_coeffs(steps: int = 5, safety: float = 1.01) -> list[Triple]:
    """The first ``steps`` Polar Express triples, each scaled by the paper's safety factor.

    The safety factor (a / s, b / s^3, c / s^5) keeps bf16 round-off from pushing a singular
    value past the interval the polynomials were fitted on; the final (fixed-point) triple is
    left unscaled, as in the paper.

    Example::

        X = orthogonalize(G, coeffs=polar_express_coeffs(5))
    """
    if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if not safety >= 1.0:
        raise ValueError(f"safety must be >= 1, got {safety!r}")
    out = []
    for k in range(steps):
        a, b, c = _POLAR_EXPRESS_RAW[min(k, len(_POLAR_EXPRESS_RAW) - 1)]
        if k < len(_POLAR_EXPRESS_RAW) - 1:
            a, b, c = a / safety, b / safety**3, c / safety**5
        out.append((a, b, c))
    return out


POLAR_EXPRESS_COEFFS: tuple[Triple, ...] = tuple(polar_express_coeffs(5))


def _schedule(steps: int | None, coeffs: Coeffs) -> list[Triple]:
    """One (a, b, c) per iteration, from a single triple repeated or a per-iteration sequence."""
    try:
        items = list(coeffs)
    except TypeError:
        raise TypeError(f"coeffs must be an (a, b, c) triple or a sequence of triples, got {coeffs!r}") from None
    if len(items) == 3 and all(isinstance(v, (int, float)) for v in items):
        n = 5 if steps is None else steps
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"steps must be a positive int, got {steps!r}")
        return [tuple(float(v) for v in items)] * n  # type: ignore[list-item]
    schedule = []
    for k, triple in enumerate(items):
        try:
            values = [float(v) for v in triple]
        except TypeError:
            raise TypeError(f"coeffs[{k}] must be an (a, b, c) triple, got {triple!r}") from None
        if len(values) != 3:
            raise ValueError(f"coeffs[{k}] must have 3 values (a, b, c), got {len(values)}")
        schedule.append((values[0], values[1], values[2]))
    if not schedule:
        raise ValueError("coeffs is an empty schedule: give at least one (a, b, c) triple")
    if steps is not None and steps != len(schedule):
        raise ValueError(
            f"steps={steps} disagrees with the {len(schedule)}-step coeffs schedule: "
            "leave steps out (the schedule's length sets it) or pass a schedule of that length")
    for k, triple in enumerate(schedule):
        if not all(math.isfinite(v) for v in triple):
            raise ValueError(f"coeffs[{k}] = {triple} is not finite")
    return schedule


def _check(G: torch.Tensor, eps: float) -> None:
    if not isinstance(G, torch.Tensor):
        raise TypeError(f"G must be a torch.Tensor, got {type(G).__name__}")
    if G.dim() not in (2, 3):
        raise ValueError(f"G must be 2D (rows, cols) or 3D (batch, rows, cols), got shape {tuple(G.shape)}")
    if G.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"G must be float16, bfloat16, float32 or float64, got {G.dtype}")
    if not (eps >= 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")


def orthogonalize_reference(G: torch.Tensor, steps: int | None = None, coeffs: Coeffs = DEFAULT_COEFFS,
                            eps: float = 1e-7) -> torch.Tensor:
    """Plain-torch Newton-Schulz: the definition ``orthogonalize`` is tested against.

    Computes in float32 (float64 for a float64 ``G``) and returns ``G``'s dtype and shape.

    Example::

        G = torch.randn(64, 256)
        X = orthogonalize_reference(G)      # X @ X.T ~ I, singular values in about [0.68, 1.13]
    """
    _check(G, eps)
    schedule = _schedule(steps, coeffs)
    work = torch.float64 if G.dtype == torch.float64 else torch.float32
    X = G.to(work)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / (torch.linalg.matrix_norm(X, keepdim=True) + eps)
    for a, b, c in schedule:
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def orthogonalize(G: torch.Tensor, steps: int | None = None, coeffs: Coeffs = DEFAULT_COEFFS,
                  eps: float = 1e-7) -> torch.Tensor:
    """Newton-Schulz orthogonalization of a matrix or a stack of matrices.

    Args:
        G: ``(rows, cols)`` or ``(batch, rows, cols)``; float16, bfloat16, float32 or float64.
        steps: iterations; default 5 with a single triple. With a schedule of triples, its length
            sets the number of steps, and a different ``steps`` is an error.
        coeffs: one ``(a, b, c)`` used every step, or a sequence of per-step triples
            (e.g. ``polar_express_coeffs(5)``).
        eps: added to the Frobenius norm before dividing (a zero matrix maps to zero).

    Returns:
        Same shape and dtype as ``G``: for ``rows <= cols`` the rows are near-orthonormal
        (``X @ X.T ~ I``), otherwise the columns are. On a CUDA GPU a 16-bit input is
        iterated in bfloat16 with float32 accumulation; on CPU (interpreter) in float32.

    Example::

        G = torch.randn(8, 256, 1024, device="cuda", dtype=torch.bfloat16)
        X = orthogonalize(G)                # one launch per kernel for the stack of 8
    """
    _check(G, eps)
    schedule = _schedule(steps, coeffs)
    flat = [v for triple in schedule for v in triple]
    return _orthogonalize_op(G.detach(), flat, float(eps))


# ----------------------------------------------------------------------------------------------
# Launchers: the Triton kernels live in _newton_schulz_kernels, imported on the first launch
# ----------------------------------------------------------------------------------------------
# Largest interpreter block: big blocks mean few programs (each costs the interpreter ~0.1 s here);
# tests lower it to run the multi-tile and mirror-store paths on small matrices.
_INTERPRET_MAX_BLOCK = 128


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, (n - 1).bit_length())))


def _syrk(X: torch.Tensor, out: torch.Tensor, alpha: float, C: torch.Tensor | None, beta: float,
          interpret: bool) -> None:
    """out[b] = alpha X[b] X[b]^T + beta C[b] for X (batch, M, K)."""
    from nexus_kernels import _newton_schulz_kernels as kernels

    batch, M, K = X.shape
    acc = kernels.acc_type(X.dtype)
    c = C if C is not None else out
    args = (X, c, out, M, K, *X.stride(), *c.stride(), *out.stride(), alpha, beta)
    if interpret:
        block_m = _pow2(M, 16, _INTERPRET_MAX_BLOCK)
        tiles = -(-M // block_m)
        grid = (tiles * (tiles + 1) // 2, batch)
        kernels._syrk_kernel[grid](*args, HAS_C=C is not None, BLOCK_M=block_m,
                                   BLOCK_K=_pow2(K, 16, 2 * _INTERPRET_MAX_BLOCK),
                                   UPCAST=X.dtype not in (torch.float32, torch.float64), ACC=acc)
    else:
        def grid(meta):
            tiles = -(-M // meta["BLOCK_M"])
            return (tiles * (tiles + 1) // 2, batch)
        kernels._syrk_tuned[grid](*args, HAS_C=C is not None, UPCAST=False, ACC=acc)


def _update(Bm: torch.Tensor, X: torch.Tensor, out: torch.Tensor, a: float, interpret: bool) -> None:
    """out[b] = a X[b] + Bm[b] X[b]."""
    from nexus_kernels import _newton_schulz_kernels as kernels

    batch, M, K = X.shape
    acc = kernels.acc_type(X.dtype)
    args = (Bm, X, out, M, K, *Bm.stride(), *X.stride(), *out.stride(), a)
    if interpret:
        bm, bn = _pow2(M, 16, _INTERPRET_MAX_BLOCK), _pow2(K, 16, 2 * _INTERPRET_MAX_BLOCK)
        grid = (-(-M // bm) * -(-K // bn), batch)
        kernels._ns_update_kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=_pow2(M, 16, 2 * _INTERPRET_MAX_BLOCK),
                                        GROUP_M=8, UPCAST=X.dtype not in (torch.float32, torch.float64), ACC=acc)
    else:
        def grid(meta):
            return (-(-M // meta["BLOCK_M"]) * -(-K // meta["BLOCK_N"]), batch)
        kernels._ns_update_tuned[grid](*args, UPCAST=False, ACC=acc)


def _orthogonalize_kernels(G: torch.Tensor, flat_coeffs: list[float], eps: float) -> torch.Tensor:
    """Launcher: normalise in torch, then three kernel launches per iteration over the whole stack."""
    interpret = G.device.type != "cuda"
    if G.dtype in (torch.float32, torch.float64):
        work = G.dtype
    else:  # 16-bit: bf16 operands on GPU (fp32 accumulate); fp32 in the interpreter
        work = torch.bfloat16 if not interpret else torch.float32
    squeeze = G.dim() == 2
    X = G.unsqueeze(0) if squeeze else G
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    norm_dtype = torch.float64 if G.dtype == torch.float64 else torch.float32
    Xf = X.to(norm_dtype)
    X = (Xf / (torch.linalg.matrix_norm(Xf, keepdim=True) + eps)).to(work).contiguous()
    batch, M, K = X.shape
    A = torch.empty(batch, M, M, device=X.device, dtype=work)
    Bm = torch.empty_like(A)
    Y = torch.empty_like(X)
    for t in range(0, len(flat_coeffs), 3):
        a, b, c = flat_coeffs[t:t + 3]
        _syrk(X, A, 1.0, None, 0.0, interpret)
        _syrk(A, Bm, c, A, b, interpret)  # A symmetric: A A^T = A^2
        _update(Bm, X, Y, a, interpret)
        X, Y = Y, X
    if transposed:
        X = X.mT
    if squeeze:
        X = X[0]
    return X.to(G.dtype).contiguous()


def _orthogonalize_impl(G: torch.Tensor, flat_coeffs: list[float], eps: float) -> torch.Tensor:
    """The op: the reference or the kernels, as ``select`` says; ``flat_coeffs`` is a1, b1, c1, a2, ..."""
    if select(G) == "reference" or G.numel() == 0:
        schedule = [tuple(flat_coeffs[t:t + 3]) for t in range(0, len(flat_coeffs), 3)]
        return orthogonalize_reference(G, coeffs=schedule, eps=eps).contiguous()
    return _orthogonalize_kernels(G, flat_coeffs, eps)


# The output is a new contiguous tensor of G's shape and dtype on every path.
_orthogonalize_op = register_op("orthogonalize", _orthogonalize_impl,
                                lambda G, flat_coeffs, eps: G.new_empty(G.shape))
