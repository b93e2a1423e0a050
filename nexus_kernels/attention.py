"""Blockwise attention (FlashAttention-2, Dao 2023, arXiv:2307.08691): ``(out, lse)`` of a block of
queries against a block of keys, its backward, and the exact merge of partial results.

Shapes: ``q`` [B, Hq, Sq, D]; ``k``, ``v`` [B, Hkv, Sk, D] with Hq % Hkv == 0 (grouped-query
attention: query head h reads kv head h // (Hq / Hkv); the kernel never repeats K/V in memory);
``out`` [B, Hq, Sq, D] in q's dtype; ``lse`` [B, Hq, Sq] float32 (float64 for float64 inputs),
natural log.

Masking is in GLOBAL positions, so a block can sit anywhere in a longer sequence (ring attention):
query i is at ``q_offset + i``, key j at ``k_offset + j``. Key j is allowed for query i iff

    (not causal or k_offset + j <= q_offset + i)  and  (seq_len is None or k_offset + j < seq_len)

(``seq_len``: keys at or past it are padding). With s_ij = scale * q_i . k_j over allowed keys:

    lse_i = log sum_j exp(s_ij),    out_i = sum_j exp(s_ij - lse_i) v_j

A row with no allowed key has out = 0 and lse = -inf (never NaN). Backward, given the FINAL
``out`` and ``lse`` of these queries (over every key block, as ring attention passes them):

    P = exp(S - lse),  dV = P^T dO,  dP = dO V^T,  delta = rowsum(dO * out),  dS = P * (dP - delta),
    dQ = scale dS K,   dK = scale dS^T Q          (dK, dV summed over the query heads of a group)

returned in float32 (float64 for float64 inputs). Partial results over disjoint key sets merge exactly (``merge_attention``):

    lse = log(exp(lse_a) + exp(lse_b)),   out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b

computed shifted by max(lse_a, lse_b), so it never overflows, and two -inf rows merge to (0, -inf).

The Triton kernels (``_attention_kernels``, imported on the first launch) keep Q, K, V tiles in
SRAM with an online softmax (no S x S matrix in memory), skip key tiles that the causal diagonal
or ``seq_len`` mask entirely, and apply the mask only on the tiles that cross it. fp16/bf16 inputs
run bf16/fp16 tensor-core matmuls with fp32 accumulation; fp32 inputs (CPU, interpreter) full
fp32. Head dims 64 and 128 are native; other D <= 256 are padded to the next power of two inside
the kernel (masked loads). float64 inputs take the reference path. The functions call the custom
ops ``torch.ops.nexus.block_attention_forward`` / ``block_attention_backward`` /
``merge_attention``, which pick the kernel or the reference per call; none is differentiable
(autograd lives in ``nexus``: ``nexus.models.moe.attention.BlockAttentionFunction``).
"""
from __future__ import annotations

import math

import torch

from nexus_kernels._backend import register_op, select

__all__ = [
    "block_attention_forward",
    "block_attention_backward",
    "merge_attention",
    "block_attention_forward_reference",
    "block_attention_backward_reference",
    "merge_attention_reference",
    "MAX_KERNEL_HEAD_DIM",
]

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_KERNEL_HEAD_DIM = 256


# ----------------------------------------------------------------------------------------------
# Reference: plain torch, float32 (float64 for float64 inputs) inside: the specification
# ----------------------------------------------------------------------------------------------
def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    # float32 as the contract says; float64 inputs keep float64 so that float64 checks stay exact
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _allowed(sq: int, sk: int, causal: bool, q_offset: int, k_offset: int, seq_len: int | None,
             device: torch.device) -> torch.Tensor:
    """[Sq, Sk] bool: key j is visible to query i (global positions)."""
    q_pos = q_offset + torch.arange(sq, device=device)[:, None]
    k_pos = k_offset + torch.arange(sk, device=device)[None, :]
    allowed = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if causal:
        allowed &= k_pos <= q_pos
    if seq_len is not None:
        allowed &= k_pos < seq_len
    return allowed


def _grouped(q: torch.Tensor, hkv: int) -> torch.Tensor:
    """[B, Hq, S, D] -> [B, Hkv, G, S, D]: query head h = kv head h // G, member h % G."""
    b, hq, s, d = q.shape
    return q.reshape(b, hkv, hq // hkv, s, d)


def _scores(q: torch.Tensor, k: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, Hkv, G, Sq, Sk] scaled scores, -inf where masked."""
    s = torch.einsum("bhgqd,bhkd->bhgqk", q, k) * scale
    return s.masked_fill(~allowed, float("-inf"))


def _probs(s: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """exp(s - lse) with 0 for masked entries and rows whose lse is -inf."""
    finite = torch.isfinite(lse)[..., None]
    return torch.where(finite, torch.exp(s - torch.where(finite, lse[..., None], 0.0)), 0.0)


def block_attention_forward_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                                      q_offset: int = 0, k_offset: int = 0, softmax_scale: float | None = None,
                                      seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``block_attention_forward`` (same arguments and results), materialising S x S."""
    _check_qkv(q, k, v)
    scale = _scale(softmax_scale, q.shape[-1])
    work = _work_dtype(q)
    hkv = k.shape[1]
    allowed = _allowed(q.shape[2], k.shape[2], causal, q_offset, k_offset, seq_len, q.device)
    s = _scores(_grouped(q.to(work), hkv), k.to(work), allowed, scale)
    lse = torch.logsumexp(s, dim=-1)  # -inf for a row with no allowed key
    out = torch.einsum("bhgqk,bhkd->bhgqd", _probs(s, lse), v.to(work))
    return out.reshape(q.shape).to(q.dtype), lse.reshape(q.shape[:3]).to(_lse_dtype(q))


def block_attention_backward_reference(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                       out: torch.Tensor, lse: torch.Tensor, causal: bool = False,
                                       q_offset: int = 0, k_offset: int = 0, softmax_scale: float | None = None,
                                       seq_len: int | None = None
                                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for ``block_attention_backward``: dq [B, Hq, Sq, D], dk, dv [B, Hkv, Sk, D], float32
    (float64 for float64 inputs)."""
    _check_qkv(q, k, v)
    _check_grad_inputs(dout, q, out, lse)
    scale = _scale(softmax_scale, q.shape[-1])
    work = _work_dtype(q)
    hkv = k.shape[1]
    qg, kw, vw = _grouped(q.to(work), hkv), k.to(work), v.to(work)
    do, o = _grouped(dout.to(work), hkv), _grouped(out.to(work), hkv)
    lse_g = lse.to(work).reshape(*qg.shape[:4])
    allowed = _allowed(q.shape[2], k.shape[2], causal, q_offset, k_offset, seq_len, q.device)
    p = _probs(_scores(qg, kw, allowed, scale), lse_g)
    dv = torch.einsum("bhgqk,bhgqd->bhkd", p, do)
    dp = torch.einsum("bhgqd,bhkd->bhgqk", do, vw)
    delta = (do * o).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.einsum("bhgqk,bhkd->bhgqd", ds, kw) * scale
    dk = torch.einsum("bhgqk,bhgqd->bhkd", ds, qg) * scale
    return dq.reshape(q.shape), dk, dv


def merge_attention_reference(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                              ) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference for ``merge_attention``: out [B, H, S, D], lse [B, H, S], float32 (float64 if any input is)."""
    _check_merge(out_a, lse_a, out_b, lse_b)
    work = torch.float64 if torch.float64 in (out_a.dtype, out_b.dtype, lse_a.dtype, lse_b.dtype) else torch.float32
    la, lb = lse_a.to(work), lse_b.to(work)
    m = torch.maximum(la, lb)
    m = torch.where(torch.isfinite(m), m, 0.0)  # both -inf: any finite shift gives weights 0, 0
    wa, wb = torch.exp(la - m), torch.exp(lb - m)
    total = wa + wb
    lse = m + torch.log(total)  # log(0) = -inf for a row masked in both
    safe = torch.where(total > 0, total, 1.0)
    out = (wa / safe)[..., None] * out_a.to(work) + (wb / safe)[..., None] * out_b.to(work)
    return out.to(work), lse.to(work)


# ----------------------------------------------------------------------------------------------
# Argument checks (shared by the public functions and the references)
# ----------------------------------------------------------------------------------------------
def _check_tensor(name: str, t, dims: int) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != dims:
        raise ValueError(f"{name} must be {dims}-D, got shape {tuple(t.shape)}")
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} has dtype {t.dtype}; expected float16, bfloat16, float32 or float64")


def _check_lse(name: str, t, shape: tuple, dims: str) -> None:
    """A log-sum-exp [``dims``] of ``shape`` in float32 (or float64)."""
    if not isinstance(t, torch.Tensor) or t.shape != shape:
        got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name} must be a tensor of shape {tuple(shape)} {dims}, got {got}")
    if t.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be float32 (or float64), got {t.dtype}")


def _check_one_device(label: str, *tensors) -> None:
    devices = {t.device for t in tensors}
    if len(devices) > 1:
        raise ValueError(f"{label} are on different devices: {sorted(map(str, devices))}")


def _check_qkv(q, k, v) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t, 4)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must have the same shape [B, Hkv, Sk, D]")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must share batch (dim 0) and head dim (dim 3)")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1]:
        raise ValueError(f"query heads Hq={q.shape[1]} must be a multiple of kv heads Hkv={k.shape[1]}")
    if q.shape[3] == 0:
        raise ValueError("head dim D must be positive")
    _check_one_device("q, k, v", q, k, v)


def _check_grad_inputs(dout, q, out, lse) -> None:
    for name, t in (("dout", dout), ("out", out)):
        _check_tensor(name, t, 4)
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
    _check_lse("lse", lse, q.shape[:3], "[B, Hq, Sq]")
    _check_one_device("dout, q, out, lse", dout, q, out, lse)


def _check_merge(out_a, lse_a, out_b, lse_b) -> None:
    for name, t in (("out_a", out_a), ("out_b", out_b)):
        _check_tensor(name, t, 4)
    if out_a.shape != out_b.shape:
        raise ValueError(f"out_a {tuple(out_a.shape)} and out_b {tuple(out_b.shape)} must have the same shape")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        _check_lse(name, t, out_a.shape[:3], "[B, H, S]")
    _check_one_device("merge inputs", out_a, lse_a, out_b, lse_b)


def _scale(softmax_scale: float | None, d: int) -> float:
    if softmax_scale is None:
        return 1.0 / math.sqrt(d)
    if isinstance(softmax_scale, bool) or not isinstance(softmax_scale, (int, float)) \
            or not math.isfinite(softmax_scale) or softmax_scale <= 0:
        raise ValueError(f"softmax_scale must be a finite float > 0 or None, got {softmax_scale!r}")
    return float(softmax_scale)


def _check_positions(causal, q_offset, k_offset, seq_len) -> None:
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {causal!r}")
    for name, value in (("q_offset", q_offset), ("k_offset", k_offset)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0 (a global position), got {value!r}")
    if seq_len is not None and (isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 0):
        raise ValueError(f"seq_len must be an int >= 0 or None, got {seq_len!r}")


# ----------------------------------------------------------------------------------------------
# Launchers: the Triton kernels live in _attention_kernels, imported on the first launch
# ----------------------------------------------------------------------------------------------
# Interpreter tiles: big tiles mean few programs (each costs the interpreter ~1.7 ms); tests lower
# them to run the multi-tile, diagonal and tile-skipping paths on small sequences.
_INTERPRET_BLOCK_M = 64
_INTERPRET_BLOCK_N = 64


def _head_block(d: int) -> int:
    """Head dim padded to a power of two >= 16 (tl.dot's smallest K)."""
    return max(16, 1 << (d - 1).bit_length())


def _key_limit(sk: int, k_offset: int, seq_len: int | None) -> int:
    """Keys j < limit are inside the sequence (seq_len masks keys at global positions >= seq_len)."""
    if seq_len is None:
        return sk
    return max(0, min(sk, seq_len - k_offset))


def _check_kernel_head_dim(d: int) -> None:
    if d > MAX_KERNEL_HEAD_DIM:
        raise ValueError(f"head dim D={d} > {MAX_KERNEL_HEAD_DIM}: the attention kernel keeps a Q tile of "
                         f"[BLOCK_M, D] in SRAM; use NEXUS_BACKEND=reference for larger heads")


def _forward_launch(q, k, v, causal, q_offset, k_offset, scale, seq_len, backend):
    from nexus_kernels import _attention_kernels as kernels

    return kernels.forward(q, k, v, causal=causal, diag=q_offset - k_offset,
                           n_keys=_key_limit(k.shape[2], k_offset, seq_len), scale=scale,
                           interpret=backend == "interpret",
                           blocks=(_INTERPRET_BLOCK_M, _INTERPRET_BLOCK_N))


def _backward_launch(dout, q, k, v, out, lse, causal, q_offset, k_offset, scale, seq_len, backend):
    from nexus_kernels import _attention_kernels as kernels

    # delta_i = dO_i . O_i: one memory-bound pass, left to torch
    delta = (dout.float() * out.float()).sum(-1)
    return kernels.backward(dout, q, k, v, lse.float().contiguous(), delta.contiguous(), causal=causal,
                            diag=q_offset - k_offset, n_keys=_key_limit(k.shape[2], k_offset, seq_len),
                            scale=scale, interpret=backend == "interpret",
                            blocks=(_INTERPRET_BLOCK_M, _INTERPRET_BLOCK_N))


# ----------------------------------------------------------------------------------------------
# Custom ops: the path is chosen inside, per call; fake implementations give shapes and dtypes
# ----------------------------------------------------------------------------------------------
def _use_reference(backend: str, q: torch.Tensor) -> bool:
    return backend == "reference" or q.dtype == torch.float64 or q.numel() == 0


def _forward_impl(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, q_offset: int, k_offset: int,
                  softmax_scale: float, seq_len: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    backend = select(q, k, v)
    if _use_reference(backend, q) or k.shape[2] == 0:
        out, lse = block_attention_forward_reference(q, k, v, causal, q_offset, k_offset, softmax_scale, seq_len)
        return out.contiguous(), lse.contiguous()
    _check_kernel_head_dim(q.shape[-1])
    return _forward_launch(q, k, v, causal, q_offset, k_offset, softmax_scale, seq_len, backend)


def _forward_fake(q, k, v, causal, q_offset, k_offset, softmax_scale, seq_len):
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(q.shape[:3], dtype=_lse_dtype(q))


def _backward_impl(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, causal: bool, q_offset: int, k_offset: int, softmax_scale: float,
                   seq_len: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    backend = select(dout, q, k, v, out, lse)
    if _use_reference(backend, q) or k.shape[2] == 0:
        grads = block_attention_backward_reference(dout, q, k, v, out, lse, causal, q_offset, k_offset,
                                                   softmax_scale, seq_len)
        return tuple(g.contiguous() for g in grads)
    _check_kernel_head_dim(q.shape[-1])
    return _backward_launch(dout, q, k, v, out, lse, causal, q_offset, k_offset, softmax_scale, seq_len, backend)


def _backward_fake(dout, q, k, v, out, lse, causal, q_offset, k_offset, softmax_scale, seq_len):
    like = dict(dtype=_work_dtype(q), memory_format=torch.contiguous_format)
    return torch.empty_like(q, **like), torch.empty_like(k, **like), torch.empty_like(v, **like)


def _merge_impl(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
    # elementwise and memory-bound: the torch formula is the implementation on every device
    out, lse = merge_attention_reference(out_a, lse_a, out_b, lse_b)
    return out.contiguous(), lse.contiguous()


def _merge_fake(out_a, lse_a, out_b, lse_b):
    work = torch.float64 if torch.float64 in (out_a.dtype, out_b.dtype, lse_a.dtype, lse_b.dtype) else torch.float32
    return (torch.empty_like(out_a, dtype=work, memory_format=torch.contiguous_format),
            torch.empty_like(lse_a, dtype=work, memory_format=torch.contiguous_format))


block_attention_forward_op = register_op("block_attention_forward", _forward_impl, _forward_fake)
block_attention_backward_op = register_op("block_attention_backward", _backward_impl, _backward_fake)
merge_attention_op = register_op("merge_attention", _merge_impl, _merge_fake)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def block_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = False,
                            q_offset: int = 0, k_offset: int = 0, softmax_scale: float | None = None,
                            seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of a block of queries over a block of keys, with its log-sum-exp.

    Args:
        q: [B, Hq, Sq, D]; k, v: [B, Hkv, Sk, D], Hq % Hkv == 0; one dtype: float16, bfloat16,
            float32 (float64: reference path).
        causal: key j visible to query i only if ``k_offset + j <= q_offset + i``.
        q_offset, k_offset: global position of the first query / key of the block.
        softmax_scale: default 1 / sqrt(D).
        seq_len: keys at global positions >= seq_len are padding (masked); None: no padding.

    Returns:
        ``(out, lse)``: out [B, Hq, Sq, D] in q's dtype; lse [B, Hq, Sq] float32 (float64 for
        float64 inputs; natural log);
        rows with no visible key give out = 0, lse = -inf.

    >>> q, k, v = torch.randn(1, 4, 100, 64), torch.randn(1, 2, 80, 64), torch.randn(1, 2, 80, 64)
    >>> out, lse = block_attention_forward(q, k, v, causal=True, q_offset=80)   # keys 0..79 precede
    """
    _check_qkv(q, k, v)
    _check_positions(causal, q_offset, k_offset, seq_len)
    scale = _scale(softmax_scale, q.shape[-1])
    return block_attention_forward_op(q.detach(), k.detach(), v.detach(), causal, q_offset, k_offset, scale, seq_len)


def block_attention_backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             out: torch.Tensor, lse: torch.Tensor, causal: bool = False, q_offset: int = 0,
                             k_offset: int = 0, softmax_scale: float | None = None, seq_len: int | None = None
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of attention for a block of queries and a block of keys.

    Args:
        dout: [B, Hq, Sq, D] gradient of the output; q, k, v, causal, offsets, softmax_scale and
            seq_len as for ``block_attention_forward``.
        out, lse: [B, Hq, Sq, D] and [B, Hq, Sq] float32: the FINAL output and log-sum-exp of these
            queries (merged over every key block); with this block's own they give ordinary attention.

    Returns:
        ``(dq, dk, dv)`` float32 (float64 for float64 inputs): dq [B, Hq, Sq, D] (this key block's
        share), dk, dv [B, Hkv, Sk, D] (summed over the query heads of each group).

    >>> out, lse = block_attention_forward(q, k, v, causal=True)
    >>> dq, dk, dv = block_attention_backward(torch.ones_like(out), q, k, v, out, lse, causal=True)
    """
    _check_qkv(q, k, v)
    _check_grad_inputs(dout, q, out, lse)
    _check_positions(causal, q_offset, k_offset, seq_len)
    scale = _scale(softmax_scale, q.shape[-1])
    return block_attention_backward_op(dout.detach(), q.detach(), k.detach(), v.detach(), out.detach(),
                                       lse.detach(), causal, q_offset, k_offset, scale, seq_len)


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Combine the attention of the same queries over two disjoint key sets, exactly.

    Args: out_a, out_b [B, H, S, D] (any float dtype); lse_a, lse_b [B, H, S] float32.
    Returns: ``(out, lse)`` float32 [B, H, S, D] and [B, H, S] (float64 if any input is float64);
    max-shifted, so it never overflows;
    a row with lse = -inf on both sides gives out = 0, lse = -inf.

    >>> out_a, lse_a = block_attention_forward(q, k[:, :, :64], v[:, :, :64])
    >>> out_b, lse_b = block_attention_forward(q, k[:, :, 64:], v[:, :, 64:], k_offset=64)
    >>> out, lse = merge_attention(out_a, lse_a, out_b, lse_b)   # == attention over all keys
    """
    _check_merge(out_a, lse_a, out_b, lse_b)
    return merge_attention_op(out_a.detach(), lse_a.detach(), out_b.detach(), lse_b.detach())
