"""Mixture-of-experts feed-forward: SwiGLU experts, top-k softmax routing, shared experts.

Routing: p = softmax(x W_r) over E experts; each token goes to its top-k experts with weights
p_topk / sum(p_topk) (the raw p for k = 1). Dispatch sorts the (token, expert) pairs by expert so
every expert runs one dense matmul on its tokens, in one of two modes (``capacity_factor``):
- None (default), dropless: each expert gets exactly its tokens; exact and compute-optimal, no
  token is dropped and the layer stays causal; the per-expert counts size the matmuls, so they are
  read to the host once per routing decision (one device sync per MoE layer per forward).
- a float, fixed capacity: each expert gets C = ceil(capacity_factor * N * k / E) slots (clamped to
  [1, N]); assignments past C are dropped, earlier tokens first in, so the token keeps only its
  shared experts and the residual for that choice. Every shape is static and nothing is read on the
  host (CUDA-graph and torch.compile friendly); capacity_factor >= E / k gives C = N, the dropless
  result. A drop depends only on earlier tokens of the flattened [B*T] order, so the layer stays
  causal, but a sequence's output can depend on the sequences before it in the batch.

Auxiliary losses (summed over layers by the model):
- load balance (Switch Transformer / GShard): E * sum_i f_i P_i, with f_i the fraction of the N*k
  token->expert assignments that chose expert i and P_i the mean router probability of expert i.
  It equals 1 for perfectly uniform routing and grows as routing concentrates (up to E).
- router z-loss (ST-MoE, Zoph et al. 2022): mean over tokens of logsumexp(router logits)^2.
"""

from __future__ import annotations

import math
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


def expert_capacity(n_tokens: int, top_k: int, n_experts: int, capacity_factor: float) -> int:
    """Slots per expert of a fixed-capacity dispatch: ceil(capacity_factor * N * k / E), clamped to [1, N].

    N is never exceeded because a token picks k distinct experts, so no expert can get more than N
    assignments: any capacity_factor >= E / k keeps every assignment (C = N).

    Example:
        >>> expert_capacity(n_tokens=64, top_k=2, n_experts=8, capacity_factor=1.25)
        20
    """
    if not (isinstance(capacity_factor, (int, float)) and not isinstance(capacity_factor, bool)
            and math.isfinite(capacity_factor) and capacity_factor > 0):
        raise ValueError(f"capacity_factor must be a finite float > 0, got {capacity_factor!r}")
    return min(max(1, math.ceil(capacity_factor * n_tokens * top_k / n_experts)), max(n_tokens, 1))


class DispatchPlan(NamedTuple):
    """Where the (token, expert) assignments of one routing decision go; build it once with
    :func:`plan_dispatch` and run any number of expert groups on it (RoM routes two by one choice).

    Slots are grouped by expert: expert e owns the ``sizes[e]`` consecutive slots after those of
    experts < e. token [M] int64: the token in each slot; weight [M]: its routing weight (dtype of
    the routing weights); sizes: host ints summing to M; mask [M] bool marks the slots that hold an
    assignment (None when all do: the dropless plan).
    """

    token: torch.Tensor
    weight: torch.Tensor
    sizes: list[int]
    mask: torch.Tensor | None


def plan_dispatch(experts: torch.Tensor, weights: torch.Tensor, n_experts: int,
                  capacity: int | None = None) -> DispatchPlan:
    """Group the N*k assignments by expert, in token order within an expert (a stable sort).

    Shapes: experts [N, k] int64 (distinct per row), weights [N, k] -> :class:`DispatchPlan`.

    ``capacity=None`` (dropless): every assignment gets a slot, M = N*k; each expert gets exactly its
    own tokens, which is exact and does no wasted compute, but the per-expert counts decide the
    chunk sizes, so they are read to the host: one device sync per plan.
    ``capacity=C``: every expert gets exactly C slots (M = E*C), filled by its assignments in token
    order; assignments ranked >= C within their expert are dropped (earlier tokens win), unfilled
    slots are masked. Every shape is static and nothing is read on the host. Ranks count earlier
    tokens of the flattened [B*T] order, so within a sequence a drop depends only on past tokens.

    Example:
        >>> plan = plan_dispatch(torch.tensor([[0], [0], [1]]), torch.ones(3, 1), n_experts=2, capacity=1)
        >>> plan.token.tolist(), plan.mask.tolist()  # token 1 lost expert 0's only slot to token 0
        ([0, 2], [True, True])
    """
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = flat.argsort(stable=True)  # assignment n*k + j, grouped by expert, token order kept
    # scatter_add, not bincount: CUDA bincount reads the max index back to size its output
    counts = torch.zeros(n_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    flat_weights = weights.reshape(-1)
    if capacity is None:
        return DispatchPlan(order // k, flat_weights.index_select(0, order), counts.tolist(), None)
    if not isinstance(capacity, int) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError(f"capacity must be a positive int or None, got {capacity!r}")
    if n == 0:
        empty = order.new_zeros(0)
        return DispatchPlan(empty, flat_weights[:0], [0] * n_experts, empty.bool())
    slot = torch.arange(capacity, device=flat.device)
    starts = counts.cumsum(0) - counts
    mask = (slot < counts[:, None]).reshape(-1)  # [E*C]: slot c of expert e is filled when c < count_e
    # slot (e, c) holds the assignment at position starts[e] + c of the sorted order; empty slots
    # are clamped onto a valid position and masked
    position = (starts[:, None] + slot).reshape(-1).clamp(max=n * k - 1)
    assignment = order.index_select(0, position)
    weight = flat_weights.index_select(0, assignment).masked_fill(~mask, 0)
    return DispatchPlan(assignment // k, weight, [capacity] * n_experts, mask)


def run_experts(x: torch.Tensor, plan: DispatchPlan, modules: Sequence[nn.Module], out_dim: int) -> torch.Tensor:
    """Run each expert on its slots of ``plan`` and add the weighted outputs back per token.

    Shapes: x [N, D_in]; ``modules[e]`` maps [n_e, D_in] -> [n_e, out_dim] (any module: the loop
    calls it on one contiguous block of rows) -> [N, out_dim], dtype of x, with
    out[n] = sum over the kept assignments (n, e) of weight * modules[e](x[n]). An empty or dropped
    slot contributes exactly zero (its input row is zeroed and its output masked). An expert with no
    slots still runs (on 0 rows), so every expert parameter is in the autograd graph with a zero gradient.
    """
    if len(plan.sizes) != len(modules):
        raise ValueError(f"plan has {len(plan.sizes)} experts but {len(modules)} modules were given")
    rows = x.index_select(0, plan.token)
    if plan.mask is not None:
        rows = rows.masked_fill(~plan.mask[:, None], 0)
    # every expert runs, an empty one on its 0 rows: its parameters then get a zero gradient instead of
    # none, so DDP's all-reduce (which waits for every parameter) never hangs on an idle expert
    outs = [module(chunk) for module, chunk in zip(modules, rows.split(plan.sizes))]
    out = x.new_zeros(x.shape[0], out_dim)
    if not outs:
        return out
    routed = torch.cat(outs) * plan.weight[:, None].to(x.dtype)
    if plan.mask is not None:  # 0 * an expert's output on a zero row could still be NaN
        routed = routed.masked_fill(~plan.mask[:, None], 0)
    return out.index_add(0, plan.token, routed)


def dispatch_experts(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor,
                     modules: Sequence[nn.Module], out_dim: int, capacity: int | None = None) -> torch.Tensor:
    """Weighted sum of the chosen experts' outputs, running each expert only on its tokens
    (:func:`plan_dispatch` then :func:`run_experts`).

    Shapes: x [N, D_in]; experts, weights [N, k]; ``modules[e]`` maps [n_e, D_in] -> [n_e, out_dim]
    -> [N, out_dim] with out[n] = sum_j weights[n, j] * modules[experts[n, j]](x[n]) over the
    assignments kept: all of them with ``capacity=None`` (one host read of the per-expert counts),
    the first ``capacity`` per expert in token order otherwise (no host read).

    Example:
        >>> experts = [nn.Linear(4, 3), nn.Linear(4, 3)]
        >>> dispatch_experts(torch.randn(5, 4), torch.zeros(5, 1, dtype=torch.long), torch.ones(5, 1), experts, 3).shape
        torch.Size([5, 3])
    """
    return run_experts(x, plan_dispatch(experts, weights, len(modules), capacity), modules, out_dim)


class MoEFeedForward(nn.Module):
    """Top-k routed SwiGLU experts plus always-on shared experts.

    Shapes: x [B, T, d_model] -> (out [B, T, d_model], RouterLosses).
    The ``n_shared_experts`` shared experts are stored as one SwiGLU of hidden
    ``n_shared_experts * d_ff`` (the same function and parameter count as their sum).
    ``capacity_factor``: None for the dropless dispatch (one host sync per forward), a float > 0 for
    the fixed-capacity one (no host sync; see the module docstring).

    Example:
        >>> moe = MoEFeedForward(64, 128, n_experts=4, top_k=2, n_shared_experts=1, capacity_factor=1.25)
        >>> out, losses = moe(torch.randn(2, 5, 64))
    """

    def __init__(self, d_model: int, d_ff: int, n_experts: int, top_k: int, n_shared_experts: int = 0,
                 capacity_factor: float | None = None) -> None:
        super().__init__()
        if capacity_factor is not None:
            expert_capacity(1, top_k, n_experts, capacity_factor)  # validates it
        self.d_model, self.top_k, self.capacity_factor = d_model, top_k, capacity_factor
        self.router = nn.Linear(d_model, n_experts, bias=False)
        self.experts = nn.ModuleList(SwiGLU(d_model, d_ff) for _ in range(n_experts))
        self.shared = SwiGLU(d_model, n_shared_experts * d_ff) if n_shared_experts > 0 else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, RouterLosses]:
        shape = x.shape
        flat = x.reshape(-1, self.d_model)
        logits = self.router(flat)
        routing = top_k_routing(logits, self.top_k)
        capacity = None if self.capacity_factor is None else expert_capacity(
            flat.shape[0], self.top_k, len(self.experts), self.capacity_factor)
        out = dispatch_experts(flat, routing.experts, routing.weights, self.experts, self.d_model, capacity)
        if self.shared is not None:
            out = out + self.shared(flat)
        losses = RouterLosses(load_balance_loss(routing.probs, routing.experts), router_z_loss(logits))
        return out.view(shape), losses
