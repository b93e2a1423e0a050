"""Mixture-of-experts feed-forward: SwiGLU experts, top-k softmax routing, shared experts.

Routing: p = softmax(x W_r) over E experts; each token goes to its top-k experts with weights
p_topk / sum(p_topk). Dispatch sorts the (token, expert) pairs by expert so every expert runs one
dense matmul on exactly the tokens routed to it; no capacity limit, so no token is dropped and
the layer stays causal.

Auxiliary losses (summed over layers by the model):
- load balance (Switch Transformer / GShard): E * sum_i f_i P_i, with f_i the fraction of the N*k
  token->expert assignments that chose expert i and P_i the mean router probability of expert i.
  It equals 1 for perfectly uniform routing and grows as routing concentrates (up to E).
- router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(router logits)^2.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class RouterLosses(NamedTuple):
    """Un-weighted auxiliary losses of one router (0-dim fp32 tensors)."""

    balance: torch.Tensor
    z: torch.Tensor


class Routing(NamedTuple):
    """Top-k routing decision. weights, experts: [N, k]; probs: [N, E] full softmax."""

    weights: torch.Tensor
    experts: torch.Tensor
    probs: torch.Tensor


class SwiGLU(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)) (Shazeer 2020).

    Shapes: x [..., d_model] -> [..., d_model].

    Example:
        >>> ffn = SwiGLU(64, 128)
        >>> ffn(torch.randn(3, 64)).shape
        torch.Size([3, 64])
    """

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def top_k_routing(logits: torch.Tensor, k: int) -> Routing:
    """Softmax router probabilities and the top-k weights: renormalised for k > 1, raw for k = 1.

    Shapes: logits [N, E] -> weights [N, k] (dtype of logits), experts [N, k] int64, probs [N, E] fp32.

    Example:
        >>> r = top_k_routing(torch.randn(5, 4), k=2)
        >>> r.weights.sum(-1)  # each row sums to 1 (k > 1)
    """
    probs = logits.float().softmax(dim=-1)
    top_p, experts = probs.topk(k, dim=-1)
    # renormalise only over k > 1 choices: with k = 1 the weight would be exactly 1 and the task loss
    # would send the router no gradient (Switch keeps the raw probability)
    weights = top_p / top_p.sum(dim=-1, keepdim=True) if top_p.shape[-1] > 1 else top_p
    return Routing(weights.to(logits.dtype), experts, probs)


def load_balance_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch/GShard load-balancing loss E * sum_i f_i P_i.

    Shapes: probs [N, E] router softmax; experts [N, k] chosen expert ids -> 0-dim fp32.
    f_i counts assignments (not tokens), normalised by N*k, so uniform routing gives exactly 1.

    Example:
        >>> probs = torch.full((4, 2), 0.5); experts = torch.tensor([[0], [1], [0], [1]])
        >>> load_balance_loss(probs, experts)  # tensor(1.)
    """
    n_experts = probs.shape[-1]
    counts = torch.zeros(n_experts, device=probs.device, dtype=torch.float32)
    counts.index_add_(0, experts.reshape(-1), torch.ones(experts.numel(), device=probs.device))
    f = counts / experts.numel()  # not differentiable, as in Switch: gradients flow through P
    p = probs.float().mean(dim=0)
    return n_experts * (f * p).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: mean_n logsumexp(logits_n)^2, keeps router logits small.

    Shapes: logits [N, E] -> 0-dim fp32.

    Example:
        >>> router_z_loss(torch.zeros(3, 4))  # log(4)^2
        tensor(1.9218)
    """
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def dispatch_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                     modules: Sequence[nn.Module], out_dim: int) -> torch.Tensor:
    """Weighted sum of the chosen experts' outputs, running each expert only on its tokens.

    Shapes: x [N, D_in]; experts, weights [N, k]; ``modules[e]`` maps [n_e, D_in] -> [n_e, out_dim]
    -> [N, out_dim] with out[n] = sum_j weights[n, j] * modules[experts[n, j]](x[n]).

    Example:
        >>> experts = [nn.Linear(4, 3), nn.Linear(4, 3)]
        >>> dispatch_experts(torch.randn(5, 4), torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1), experts, 3).shape
        torch.Size([5, 3])
    """
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)  # groups assignments by expert
    token = order // k
    counts = torch.bincount(flat, minlength=len(modules)).tolist()
    chunks = x[token].split(counts)
    outs = [module(chunk) for module, chunk, c in zip(modules, chunks, counts) if c > 0]
    if not outs:
        return x.new_zeros(n, out_dim)
    routed = torch.cat(outs) * weights.reshape(-1)[order, None].to(x.dtype)
    return x.new_zeros(n, out_dim).index_add(0, token, routed)


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts plus always-on shared experts.

    Shapes: x [B, T, d_model] -> (out [B, T, d_model], RouterLosses).
    The ``n_shared_experts`` shared experts are stored as one SwiGLU of hidden
    ``n_shared_experts * d_ff`` (the same function and parameter count as their sum).

    Example:
        >>> moe = MoEFeedForward(64, 128, n_experts=4, top_k=2, n_shared_experts=1)
        >>> out, losses = moe(torch.randn(2, 5, 64))
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int, n_shared_experts: int = 0) -> None:
        super().__init__()
        self.d_model, self.top_k = d_model, top_k
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d_model, d_ff) for _ in range(n_experts))
        self.shared = SwiGLU(d_model, n_shared_experts * d_ff) if n_shared_experts > 0 else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterLosses]:
        shape = x.shape
        flat = x.reshape(-1, self.d_model)
        logits = self.router(flat)
        routing = top_k_routing(logits, self.top_k)
        out = dispatch_experts(flat, routing.experts, routing.weights, self.experts, self.d_model)
        if self.shared is not None:
            out = out + self.shared(flat)
        losses = RouterLosses(load_balance_loss(routing.probs, routing.experts), router_z_loss(logits))
        return out.view(shape), losses
