"""Routing, auxiliary losses and sort-based expert dispatch."""

import math

import pytest
import torch
from torch import nn

from nexus.models.moe import (MoEFeedForward, dispatch_experts, load_balance_loss, router_z_loss,
                              top_k_routing)


def test_balance_loss_matches_formula_on_hand_example():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.1, 0.8, 0.1], [0.5, 0.25, 0.25]])
    experts = torch.tensor([[0], [0], [1], [0]])
    # f = (3/4, 1/4, 0), P = mean rows = (0.475, 0.3875, 0.1375)
    expected = 3 * (0.75 * 0.475 + 0.25 * 0.3875 + 0.0 * 0.1375)
    assert load_balance_loss(probs, experts).item() == pytest.approx(expected, rel=1e-6)


def test_balance_loss_counts_top_k_assignments():
    probs = torch.full((2, 4), 0.25)
    experts = torch.tensor([[0, 1], [0, 2]])  # f = (2/4, 1/4, 1/4, 0)
    assert load_balance_loss(probs, experts).item() == pytest.approx(4 * 0.25 * 1.0, rel=1e-6)


def test_balance_loss_is_one_for_uniform_routing_and_larger_when_concentrated():
    uniform = load_balance_loss(torch.full((8, 4), 0.25), torch.arange(8).remainder(4)[:, None])
    assert uniform.item() == pytest.approx(1.0)
    skewed_probs = torch.tensor([[0.7, 0.1, 0.1, 0.1]]).repeat(8, 1)
    collapsed = load_balance_loss(skewed_probs, torch.zeros(8, 1, dtype=torch.long))
    assert collapsed.item() == pytest.approx(4 * 0.7)
    torch.manual_seed(0)
    for _ in range(20):  # argmax routing of any random router never beats uniform
        probs = torch.randn(16, 4).mul(3).softmax(-1)
        assert load_balance_loss(probs, probs.argmax(-1, keepdim=True)).item() >= 1.0 - 1e-6


def test_z_loss_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    lse = [math.log(math.exp(1) + math.exp(2) + math.exp(3)), math.log(3.0)]
    expected = (lse[0] ** 2 + lse[1] ** 2) / 2
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-6)


def test_top_k_routing_picks_largest_and_renormalises():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]])
    r = top_k_routing(logits, 2)
    assert r.experts.tolist() == [[1, 3]]
    p = logits.softmax(-1)[0]
    assert torch.allclose(r.weights, torch.stack([p[1], p[3]])[None] / (p[1] + p[3]))
    assert torch.allclose(r.probs, logits.softmax(-1))


def test_dispatch_equals_per_token_loop():
    torch.manual_seed(0)
    modules = [nn.Linear(6, 5) for _ in range(4)]
    x = torch.randn(11, 6)
    experts = torch.randint(0, 4, (11, 2))
    experts[:, 1] = (experts[:, 0] + 1) % 4  # distinct experts per token
    experts[:, :] = torch.where(experts == 3, 2, experts)  # expert 3 gets no tokens at all
    weights = torch.rand(11, 2)
    out = dispatch_experts(x, experts, weights, modules, 5)
    expected = torch.stack([sum(weights[n, j] * modules[experts[n, j]](x[n]) for j in range(2)) for n in range(11)])
    torch.testing.assert_close(out, expected)


def test_moe_ffn_equals_dense_oracle_and_grads_reach_all_parts():
    torch.manual_seed(0)
    moe = MoEFeedForward(16, 8, n_experts=4, top_k=2, n_shared_experts=1)
    x = torch.randn(2, 32, 16, requires_grad=True)
    out, losses = moe(x)
    flat = x.reshape(-1, 16)
    probs = moe.router(flat).softmax(-1)
    top_p, top_i = probs.topk(2, -1)
    top_p = top_p / top_p.sum(-1, keepdim=True)
    expected = torch.stack([
        sum(top_p[n, j] * moe.experts[top_i[n, j]](flat[n]) for j in range(2)) + moe.shared(flat[n])
        for n in range(flat.shape[0])
    ]).view(2, 32, 16)
    torch.testing.assert_close(out, expected)
    assert losses.balance.dim() == 0 and losses.z.dim() == 0
    (out.square().mean() + losses.balance + losses.z).backward()
    for name, p in moe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("top_k", [1, 2])
def test_moe_router_gets_gradient_from_task_loss_alone(top_k):
    torch.manual_seed(1)
    moe = MoEFeedForward(8, 8, n_experts=3, top_k=top_k, n_shared_experts=0)
    out, _ = moe(torch.randn(1, 10, 8))
    out.square().sum().backward()
    assert moe.router.weight.grad.abs().sum() > 1e-3  # real signal, not rounding noise
    assert moe.shared is None
