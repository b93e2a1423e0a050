"""Grouped-query attention (GQA, Ainslie et al. 2023) with rotary embeddings.

The attention core is a swappable callable (``GroupedQueryAttention.core``) with the signature of
:func:`sdpa_core`, so a ring/context-parallel kernel can replace it without touching projections.
:func:`nexus_core` is the other built-in core (``MoEConfig.attention_impl = "nexus"``): Nexus's
blockwise FlashAttention-2 kernels through :class:`BlockAttentionFunction` (the Triton kernel on a
GPU, the torch reference on CPU).

Incremental decoding: given a :class:`LayerKVCache`, the layer appends the new keys/values to it and
lets the new queries (the last positions) attend to every cached key up to their own position.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nexus.models.moe.rotary import apply_rotary, rotary_cos_sin
from nexus_kernels.attention import block_attention_backward, block_attention_forward

AttentionCore = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], torch.Tensor]


def sdpa_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention of grouped heads through ``scaled_dot_product_attention``.

    Shapes: q [B, H, T, D]; k, v [B, Hkv, T, D] with H % Hkv == 0 -> [B, H, T, D].

    Example:
        >>> q, kv = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
        >>> sdpa_core(q, kv, kv).shape
        torch.Size([1, 4, 6, 8])
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # each kv head serves `groups` consecutive query heads
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)


class BlockAttentionFunction(torch.autograd.Function):
    """Autograd of ``nexus_kernels.attention``: forward keeps (out, lse), backward recomputes the scores
    tile by tile from them (FlashAttention-2: no S x S matrix is saved or built on the kernel path).

    ``apply(q, k, v, causal, softmax_scale)``: q [B, Hq, S, D], k, v [B, Hkv, S, D] (Hq % Hkv == 0),
    one float dtype -> out [B, Hq, S, D] in that dtype; gradients come back in the inputs' dtypes.
    """

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool,
                softmax_scale: float | None) -> torch.Tensor:
        out, lse = block_attention_forward(q, k, v, causal=causal, softmax_scale=softmax_scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal, ctx.softmax_scale = causal, softmax_scale
        return out

    @staticmethod
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = block_attention_backward(dout, q, k, v, out, lse, causal=ctx.causal,
                                              softmax_scale=ctx.softmax_scale)
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None


def block_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True,
                    softmax_scale: float | None = None) -> torch.Tensor:
    """Differentiable blockwise attention (grouped heads read in place, never repeated).

    Shapes: q [B, H, T, D]; k, v [B, Hkv, T, D] with H % Hkv == 0 -> [B, H, T, D], q's dtype.

    Example:
        >>> q, kv = torch.randn(1, 4, 6, 8, requires_grad=True), torch.randn(1, 2, 6, 8)
        >>> block_attention(q, kv, kv).sum().backward()
    """
    return BlockAttentionFunction.apply(q, k, v, causal, softmax_scale)


def nexus_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0) -> torch.Tensor:
    """:func:`sdpa_core`'s contract (causal, grouped heads) on Nexus's blockwise attention kernels.

    Shapes: q [B, H, T, D]; k, v [B, Hkv, T, D] with H % Hkv == 0 -> [B, H, T, D]. No attention
    dropout (``dropout_p`` must be 0).

    Example:
        >>> q, kv = torch.randn(1, 4, 6, 8), torch.randn(1, 2, 6, 8)
        >>> torch.testing.assert_close(nexus_core(q, kv, kv), sdpa_core(q, kv, kv))
    """
    if dropout_p:
        raise ValueError(f"attention_impl='nexus' has no attention dropout (dropout_p={dropout_p}); "
                         "set the model's dropout to 0 or use attention_impl='sdpa'")
    return block_attention(q, k, v, causal=True)


ATTENTION_CORES: dict[str, AttentionCore] = {"sdpa": sdpa_core, "nexus": nexus_core}


class LayerKVCache:
    """Keys and values [B, Hkv, S, D] that one attention layer has seen, for incremental decoding.

    Grows by concatenation (simple; fine for the short samples of RLHF rollouts).
    """

    def __init__(self) -> None:
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add k, v [B, Hkv, t, D]; return every key and value so far, [B, Hkv, S + t, D]."""
        if self.k is not None:
            k, v = torch.cat([self.k, k], dim=2), torch.cat([self.v, v], dim=2)
        self.k, self.v = k, v
        return k, v


class KVCache:
    """One :class:`LayerKVCache` per trunk layer and the number of tokens already decoded.

    Pass it to :meth:`nexus.models.moe.MoETransformer.forward` (``cache=``): the prompt once, then
    one token at a time; ``length`` is advanced by the model.

    Example:
        >>> cache = KVCache()
        >>> logits = model(prompt, cache=cache).logits[:, -1]  # cache.length == prompt.shape[1]
        >>> logits = model(next_token[:, None], cache=cache).logits[:, -1]
    """

    def __init__(self) -> None:
        self.length = 0
        self.layers: dict[int, LayerKVCache] = {}

    def layer(self, index: int) -> LayerKVCache:
        return self.layers.setdefault(index, LayerKVCache())


def cached_attention_core(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal attention of the last ``t`` positions over all ``S`` keys (query i sits at S - t + i).

    Shapes: q [B, H, t, D]; k, v [B, Hkv, S, D] with S >= t -> [B, H, t, D].
    """
    t, s = q.shape[2], k.shape[2]
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    if t == 1:  # the one new token sees every key: no mask needed
        return F.scaled_dot_product_attention(q, k, v)
    query_pos = torch.arange(s - t, s, device=q.device)
    mask = torch.arange(s, device=q.device)[None, :] <= query_pos[:, None]  # True: may attend
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with ``n_kv_heads`` key/value heads shared by ``n_heads`` query heads.

    Shapes: x [B, T, d_model], positions [T] or [B, T] -> [B, T, d_model], dtype of x. With
    ``cache`` (a :class:`LayerKVCache`), x holds only the new tokens at ``positions`` and attends to
    the cached ones too (inference: no dropout, the plain core).

    Example:
        >>> attn = GroupedQueryAttention(64, n_heads=4, n_kv_heads=2)
        >>> attn(torch.randn(2, 5, 64), torch.arange(5)).shape
        torch.Size([2, 5, 64])
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, rope_theta: float = 10000.0,
                 dropout: float = 0.0, core: AttentionCore = sdpa_core) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.rope_theta = rope_theta
        self.dropout = dropout
        self.core = core
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerKVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        # heads from the projection width, not the config: under tensor parallel a rank holds a slice
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta, dtype=q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            k, v = cache.append(k, v)
            out = cached_attention_core(q, k, v)
        else:
            out = self.core(q, k, v, self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
