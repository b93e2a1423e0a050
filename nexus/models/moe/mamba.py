"""Routing Mamba (RoM): a Mamba-2 style selective state-space mixer whose projections are experts.

Selective scan (Mamba-2 / SSD, Dao & Gu 2024), per head h with state [P, N]:
    s_t = exp(dt_t * A_h) * s_{t-1} + dt_t * x_t B_t^T      (x_t [P], B_t [N], dt_t > 0, A_h < 0)
    y_t = s_t C_t + D_h * x_t
A is a scalar per head, so the scan over a chunk of Q steps is a masked [Q, Q] matmul and chunks
are chained by a short recurrence over chunk states (:func:`ssd_scan`); :func:`ssd_scan_reference`
is the step-by-step loop that defines it.

Routing (RoM, Zhan et al. 2025, "Routing Mamba"): one router per layer picks top-k of
``rom_n_experts`` per token; the same choice selects the expert input projection (to x and the
gate z) and the expert output projection, each combined with the routing weights. The conv,
B/C/dt projection, A, D and the gated norm are shared by all experts. Both projections run on one
dispatch plan (:func:`nexus.models.moe.moe.plan_dispatch`), dropless or fixed-capacity as in the MoE
layer: with a capacity, a dropped assignment of a token drops both its projections.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nexus.models.moe.moe import (RouterLosses, expert_capacity, load_balance_loss, plan_dispatch, router_z_loss,
                                  run_experts, top_k_routing)
from nexus.models.moe.norm import RMSNorm


def ssd_scan_reference(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
                       C: torch.Tensor) -> torch.Tensor:
    """The selective scan as a plain loop over time (the oracle for :func:`ssd_scan`).

    Shapes: x [b, L, H, P]; dt [b, L, H] (positive); A [H] (negative); B, C [b, L, N]
    -> y [b, L, H, P] (without the D skip term), dtype of x.

    Example:
        >>> x, dt = torch.randn(1, 6, 2, 4), torch.rand(1, 6, 2)
        >>> ssd_scan_reference(x, dt, -torch.ones(2), torch.randn(1, 6, 3), torch.randn(1, 6, 3)).shape
        torch.Size([1, 6, 2, 4])
    """
    b, length, h, p = x.shape
    state = x.new_zeros(b, h, p, B.shape[-1])
    ys = []
    for t in range(length):
        decay = torch.exp(dt[:, t] * A)[..., None, None]  # [b, H, 1, 1]
        inp = (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, None, None, :]  # [b, H, P, N]
        state = decay * state + inp
        ys.append((state * C[:, t, None, None, :]).sum(-1))
    return torch.stack(ys, dim=1)


def _segsum(a: torch.Tensor) -> torch.Tensor:
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for j <= i, -inf above the diagonal."""
    t = a.shape[-1]
    strict = torch.ones(t, t, dtype=torch.bool, device=a.device).tril(-1)
    cum = a[..., :, None].expand(*a.shape, t).masked_fill(~strict, 0).cumsum(dim=-2)
    return cum.masked_fill(~torch.ones(t, t, dtype=torch.bool, device=a.device).tril(), float("-inf"))


def ssd_scan(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
             chunk_size: int = 64) -> torch.Tensor:
    """Chunked selective scan: equal to :func:`ssd_scan_reference`, in O(L * chunk_size) matmuls.

    Shapes: x [b, L, H, P]; dt [b, L, H] (positive); A [H] (negative); B, C [b, L, N]
    -> y [b, L, H, P], dtype of x. L need not divide chunk_size (padded with no-op steps).

    Example:
        >>> x, dt = torch.randn(1, 6, 2, 4), torch.rand(1, 6, 2)
        >>> ssd_scan(x, dt, -torch.ones(2), torch.randn(1, 6, 3), torch.randn(1, 6, 3), chunk_size=4).shape
        torch.Size([1, 6, 2, 4])
    """
    dtype = x.dtype
    work = torch.promote_types(dtype, torch.float32)  # the decays need at least fp32; bf16 casts back
    x, dt, A, B, C = (v.to(work) for v in (x, dt, A, B, C))
    b, length, h, p = x.shape
    n = B.shape[-1]
    q = min(chunk_size, length)
    pad = (-length) % q
    if pad:  # dt = 0 steps keep the state and add nothing; they come last, so no output changes
        x, B, C = (F.pad(v, (0, 0) * (v.dim() - 2) + (0, pad)) for v in (x, B, C))
        dt = F.pad(dt, (0, 0, 0, pad))
    c = x.shape[1] // q
    xd = (x * dt[..., None]).view(b, c, q, h, p)
    a = (dt * A).view(b, c, q, h).permute(0, 3, 1, 2)  # [b, H, c, Q] log-decay per step
    Bc, Cc = B.view(b, c, q, n), C.view(b, c, q, n)
    a_cum = a.cumsum(dim=-1)

    # within a chunk: y_l = sum_{s<=l} (C_l . B_s) exp(a_{s+1} + ... + a_l) xd_s
    scores = torch.einsum("bcln,bcsn->bcls", Cc, Bc)[:, None] * torch.exp(_segsum(a))  # [b, H, c, Q, Q]
    y = torch.einsum("bhcls,bcshp->bclhp", scores, xd)

    # state at the end of each chunk from that chunk's own inputs
    decay_to_end = torch.exp(a_cum[..., -1:] - a_cum).permute(0, 2, 3, 1)[..., None]  # [b, c, Q, H, 1]
    chunk_states = torch.einsum("bcsn,bcshp->bchpn", Bc, xd * decay_to_end)
    # carry states across chunks: state entering chunk z = sum_{c<z} decay(c->z) chunk_states[c]
    chunk_states = torch.cat([chunk_states.new_zeros(b, 1, h, p, n), chunk_states], dim=1)
    chunk_decay = torch.exp(_segsum(F.pad(a_cum[..., -1], (1, 0))))  # [b, H, c+1, c+1]
    carried = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, chunk_states)[:, :-1]
    # contribution of the carried state, decayed to each step of the chunk
    y = y + torch.einsum("bcln,bchpn->bclhp", Cc, carried) * torch.exp(a_cum).permute(0, 2, 3, 1)[..., None]
    return y.reshape(b, c * q, h, p)[:, :length].to(dtype)


class RoutingMamba(nn.Module):
    """Routing-Mamba mixer (see module docstring).

    Shapes: x [B, T, d_model] -> (out [B, T, d_model], RouterLosses). Causal in T.
    ``capacity_factor``: None for the dropless expert dispatch (one host sync per forward), a float
    > 0 for the fixed-capacity one (no host sync), as in :class:`nexus.models.moe.MoEFeedForward`.

    Example:
        >>> rom = RoutingMamba(64, d_state=8, d_conv=4, expand=2, head_dim=16, n_experts=2, top_k=1)
        >>> out, losses = rom(torch.randn(2, 10, 64))
    """

    def __init__(self, d_model: int, d_state: int, d_conv: int, expand: int, head_dim: int,
                 n_experts: int, top_k: int, chunk_size: int = 64, norm_eps: float = 1e-6,
                 capacity_factor: float | None = None) -> None:
        super().__init__()
        if capacity_factor is not None:
            expert_capacity(1, top_k, n_experts, capacity_factor)  # validates it
        self.d_model, self.d_state, self.top_k, self.chunk_size = d_model, d_state, top_k, chunk_size
        self.capacity_factor = capacity_factor
        self.d_inner = expand * d_model
        self.head_dim = head_dim
        self.n_heads = self.d_inner // head_dim
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.in_experts = nn.ModuleList(nn.Linear(d_model, 2 * self.d_inner, bias=False) for _ in range(n_experts))
        self.bcdt_proj = nn.Linear(d_model, 2 * d_state + self.n_heads, bias=False)
        conv_channels = self.d_inner + 2 * d_state
        self.conv1d = nn.Conv1d(conv_channels, conv_channels, d_conv, groups=conv_channels, padding=d_conv - 1)
        self.A_log = nn.Parameter(torch.empty(self.n_heads))
        self.dt_bias = nn.Parameter(torch.empty(self.n_heads))
        self.D = nn.Parameter(torch.empty(self.n_heads))
        self.norm = RMSNorm(self.d_inner, norm_eps)
        self.out_experts = nn.ModuleList(nn.Linear(self.d_inner, d_model, bias=False) for _ in range(n_experts))
        self.reset_ssm_parameters()

    def reset_ssm_parameters(self) -> None:
        """Mamba init: A in -[1, 16], softplus(dt_bias) log-uniform in [1e-3, 1e-1], D = 1."""
        with torch.no_grad():
            self.A_log.copy_(torch.empty_like(self.A_log).uniform_(1.0, 16.0).log())
            dt = torch.exp(torch.empty_like(self.dt_bias).uniform_(math.log(1e-3), math.log(1e-1)))
            self.dt_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse of softplus
            self.D.fill_(1.0)
        self.conv1d.reset_parameters()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterLosses]:
        b, t, _ = x.shape
        flat = x.reshape(-1, self.d_model)
        logits = self.router(flat)
        routing = top_k_routing(logits, self.top_k)
        capacity = None if self.capacity_factor is None else expert_capacity(
            flat.shape[0], self.top_k, len(self.in_experts), self.capacity_factor)
        plan = plan_dispatch(routing.experts, routing.weights, len(self.in_experts), capacity)
        xz = run_experts(flat, plan, self.in_experts, 2 * self.d_inner)
        xin, z = xz.view(b, t, 2 * self.d_inner).split(self.d_inner, dim=-1)
        bm, cm, dt = self.bcdt_proj(x).split([self.d_state, self.d_state, self.n_heads], dim=-1)
        xbc = torch.cat([xin, bm, cm], dim=-1).transpose(1, 2)
        xbc = F.silu(self.conv1d(xbc)[..., :t]).transpose(1, 2)  # left padding only: causal conv
        xin, bm, cm = xbc.split([self.d_inner, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(dt + self.dt_bias)
        xh = xin.reshape(b, t, self.n_heads, self.head_dim)
        y = ssd_scan(xh, dt, -torch.exp(self.A_log.float()), bm, cm, self.chunk_size)
        y = (y + xh * self.D[:, None]).reshape(b, t, self.d_inner)
        y = self.norm(y * F.silu(z))
        out = run_experts(y.reshape(-1, self.d_inner), plan, self.out_experts, self.d_model)
        losses = RouterLosses(load_balance_loss(routing.probs, routing.experts), router_z_loss(logits))
        return out.view(b, t, self.d_model), losses
