"""Grouped-query attention (GQA, Ainslie et al. 2023) with rotary embeddings.

The attention core is a swappable callable (``GroupedQueryAttention.core``) with the signature of
:func:`sdpa_core`, so a ring/context-parallel kernel can replace it without touching projections.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from nexus.models.moe.rotary import apply_rotary, rotary_cos_sin

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


class GroupedQueryAttention(nn.Module):
    """Causal self-attention with ``n_kv_heads`` key/value heads shared by ``n_heads`` query heads.

    Shapes: x [B, T, d_model], positions [T] or [B, T] -> [B, T, d_model], dtype of x.

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

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        # heads from the projection width, not the config: under tensor parallel a rank holds a slice
        q = self.q_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, t, -1, self.head_dim).transpose(1, 2)
        cos, sin = rotary_cos_sin(positions, self.head_dim, self.rope_theta, dtype=q.dtype)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        out = self.core(q, k, v, self.dropout if self.training else 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, -1))
