"""Rotary position embeddings (RoFormer), half-split layout, computed from explicit positions.

Positions are explicit (not 0..T-1) because mixture-of-depths hands a block a gathered subset of
tokens that must keep their original positions.
"""

from __future__ import annotations

import torch


def rotary_cos_sin(positions: torch.Tensor, head_dim: int, theta: float = 10000.0,
                   dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for ``positions``.

    Shapes: positions [T] or [B, T] (int) -> cos, sin [T, head_dim/2] or [B, 1, T, head_dim/2],
    ready to broadcast against q/k of shape [B, H, T, head_dim/2].

    Example:
        >>> cos, sin = rotary_cos_sin(torch.arange(8), head_dim=16)
        >>> cos.shape
        torch.Size([8, 8])
    """
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    angles = positions.float()[..., None] * inv_freq
    if positions.dim() == 2:
        angles = angles[:, None]  # broadcast over heads
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (x[..., i], x[..., i + D/2]) by the position angle.

    Shapes: x [B, H, T, D]; cos, sin from :func:`rotary_cos_sin` -> [B, H, T, D], dtype of x.

    Example:
        >>> cos, sin = rotary_cos_sin(torch.arange(4), head_dim=8)
        >>> apply_rotary(torch.randn(1, 2, 4, 8), cos, sin).shape
        torch.Size([1, 2, 4, 8])
    """
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
