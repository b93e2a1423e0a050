"""Mixture of depths (Raposo et al. 2024): a router sends only k = capacity * T tokens per
sequence through a block; the others skip it on the residual stream.

For a selected token: out = x + sigmoid(r) * (block(x) - x), where r is its router logit, so the
router receives gradients through the scaling (the paper scales by r itself; sigmoid keeps the
scale in (0, 1)). Selected tokens keep their original order and positions, so attention among
them stays causal.

Causality caveat: top-k over the sequence lets a later token change whether an earlier token is
selected, so with MoD on, logits at position t can depend on tokens after t. This is fine for
teacher-forced training; for autoregressive inference the paper trains a causal predictor of the
router decision (or thresholds the router score per token). Use MoD-free models (or such a
predictor) where strict causality matters.
"""

from __future__ import annotations

import torch
from torch import nn


def mod_capacity(seq_len: int, capacity_factor: float) -> int:
    """Tokens per sequence that go through a MoD block: max(1, floor(capacity_factor * seq_len))."""
    return max(1, int(capacity_factor * seq_len))


class MixtureOfDepths(nn.Module):
    """Wraps a block ``f(x [B, k, D], positions [B, k]) -> (y [B, k, D], losses)``.

    Shapes: x [B, T, D], positions [T] -> (out [B, T, D], losses of the block, selected [B, k] int64
    token indices, sorted).

    Example:
        >>> mod = MixtureOfDepths(block, d_model=64, capacity_factor=0.5)
        >>> out, losses, selected = mod(torch.randn(2, 8, 64), torch.arange(8))  # selected: [2, 4]
    """

    def __init__(self, block: nn.Module, d_model: int, capacity_factor: float) -> None:
        super().__init__()
        self.block = block
        self.capacity_factor = capacity_factor
        self.router = nn.Linear(d_model, 1, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor):
        b, t, d = x.shape
        k = mod_capacity(t, self.capacity_factor)
        scores = self.router(x).squeeze(-1)  # [B, T]
        selected = scores.topk(k, dim=-1).indices.sort(dim=-1).values  # sorted: causal order kept
        gather = selected[..., None].expand(b, k, d)
        x_sel = x.gather(1, gather)
        y_sel, losses = self.block(x_sel, positions[selected])
        gate = torch.sigmoid(scores.gather(1, selected))[..., None].to(x.dtype)
        return x.scatter(1, gather, x_sel + gate * (y_sel - x_sel)), losses, selected
