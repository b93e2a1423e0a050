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
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from nexus_kernels._backend import select

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
    path = select(G)
    if path == "reference" or G.numel() == 0:
        return orthogonalize_reference(G, coeffs=schedule, eps=eps)
    flat = [v for triple in schedule for v in triple]
    return _orthogonalize_op(G, flat, float(eps))


# ----------------------------------------------------------------------------------------------
# Triton kernels: defined only where Triton imports; the reference path never needs it
# ----------------------------------------------------------------------------------------------



try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the reference path still works
    triton = None

if triton is not None:

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


# Largest interpreter block: big blocks mean few programs (each costs the interpreter ~0.1 s here);
# tests lower it to run the multi-tile and mirror-store paths on small matrices.
_INTERPRET_MAX_BLOCK = 128


def _pow2(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, 1 << max(0, (n - 1).bit_length())))


def _syrk(X: torch.Tensor, out: torch.Tensor, alpha: float, C: torch.Tensor | None, beta: float,
          interpret: bool) -> None:
    """out[b] = alpha X[b] X[b]^T + beta C[b] for X (batch, M, K)."""
    batch, M, K = X.shape
    acc = tl.float64 if X.dtype == torch.float64 else tl.float32
    c = C if C is not None else out
    args = (X, c, out, M, K, *X.stride(), *c.stride(), *out.stride(), alpha, beta)
    if interpret:
        block_m = _pow2(M, 16, _INTERPRET_MAX_BLOCK)
        tiles = -(-M // block_m)
        grid = (tiles * (tiles + 1) // 2, batch)
        _syrk_kernel[grid](*args, HAS_C=C is not None, BLOCK_M=block_m, BLOCK_K=_pow2(K, 16, 2 * _INTERPRET_MAX_BLOCK),
                        UPCAST=X.dtype not in (torch.float32, torch.float64), ACC=acc)
    else:
        def grid(meta):
            tiles = -(-M // meta["BLOCK_M"])
            return (tiles * (tiles + 1) // 2, batch)
        _syrk_tuned[grid](*args, HAS_C=C is not None, UPCAST=False, ACC=acc)


def _update(Bm: torch.Tensor, X: torch.Tensor, out: torch.Tensor, a: float, interpret: bool) -> None:
    """out[b] = a X[b] + Bm[b] X[b]."""
    batch, M, K = X.shape
    acc = tl.float64 if X.dtype == torch.float64 else tl.float32
    args = (Bm, X, out, M, K, *Bm.stride(), *X.stride(), *out.stride(), a)
    if interpret:
        bm, bn = _pow2(M, 16, _INTERPRET_MAX_BLOCK), _pow2(K, 16, 2 * _INTERPRET_MAX_BLOCK)
        grid = (-(-M // bm) * -(-K // bn), batch)
        _ns_update_kernel[grid](*args, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=_pow2(M, 16, 2 * _INTERPRET_MAX_BLOCK), GROUP_M=8,
                          UPCAST=X.dtype not in (torch.float32, torch.float64), ACC=acc)
    else:
        def grid(meta):
            return (-(-M // meta["BLOCK_M"]) * -(-K // meta["BLOCK_N"]), batch)
        _ns_update_tuned[grid](*args, UPCAST=False, ACC=acc)


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


def _register_op():
    """Expose the kernel path as a torch.library custom op so torch.compile traces through it."""
    try:
        op = torch.library.custom_op("nexus_kernels::orthogonalize", mutates_args=())(_orthogonalize_kernels)
    except (AttributeError, RuntimeError):  # torch without custom_op, or the name already registered
        return _orthogonalize_kernels

    @op.register_fake
    def _(G, flat_coeffs, eps):
        return torch.empty(G.shape, dtype=G.dtype, device=G.device)  # the kernel's output is contiguous

    return op


_orthogonalize_op = _register_op()
