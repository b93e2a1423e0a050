"""Routing, auxiliary losses and sort-based expert dispatch (dropless and fixed-capacity)."""

import copy
import math

import pytest
import torch
from torch import nn

from nexus.models.moe import (MoEFeedForward, dispatch_experts, expert_capacity, load_balance_loss, plan_dispatch,
                              router_z_loss, top_k_routing)


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


def _skewed_routing(n, k, n_experts, seed):
    """k distinct experts per token, drawn with a skewed preference (loads differ, some may be 0)."""
    g = torch.Generator().manual_seed(seed)
    preference = torch.arange(n_experts, 0, -1, dtype=torch.float).pow(2).expand(n, n_experts)
    return torch.multinomial(preference, k, replacement=False, generator=g), torch.rand(n, k, generator=g)


@pytest.mark.parametrize("n, k, n_experts", [(11, 2, 4), (1, 1, 3), (16, 3, 5), (7, 4, 4)], ids=str)
def test_capacity_n_dispatch_equals_dropless_forward_and_gradients(n, k, n_experts):
    torch.manual_seed(n + k)
    modules = [nn.Linear(6, 5) for _ in range(n_experts)]  # with bias: an empty slot must not add it
    experts, w = _skewed_routing(n, k, n_experts, seed=n)
    x = torch.randn(n, 6)
    cotangent = torch.randn(n, 5)
    capacity = expert_capacity(n, k, n_experts, n_experts / k)
    assert capacity == n
    results = []
    for cap in (None, capacity):
        xi, wi = x.clone().requires_grad_(), w.clone().requires_grad_()
        out = dispatch_experts(xi, experts, wi, modules, 5, capacity=cap)
        params = [p for m in modules for p in m.parameters()]
        grads = torch.autograd.grad((out * cotangent).sum(), [xi, wi, *params], allow_unused=True)
        results.append((out, grads))
    (out_a, grads_a), (out_b, grads_b) = results
    torch.testing.assert_close(out_b, out_a)
    for i, (ga, gb) in enumerate(zip(grads_a, grads_b)):
        if ga is None:  # an expert nobody chose: no gradient either way
            assert gb is None or gb.abs().sum() == 0, i
        else:
            torch.testing.assert_close(gb, ga, msg=f"gradient {i}")


def test_capacity_drops_later_tokens_deterministically():
    # expert e doubles its input and adds e: out[n] = sum_j w[n, j] * (2 * x[n] + e)
    class Affine(nn.Module):
        def __init__(self, e):
            super().__init__()
            self.e = e

        def forward(self, rows):
            return 2 * rows + self.e

    modules = [Affine(e) for e in range(3)]
    x = torch.arange(1.0, 6.0)[:, None]  # tokens 0..4 hold 1..5
    experts = torch.tensor([[0, 1], [0, 2], [0, 1], [1, 2], [0, 1]])
    w = torch.full((5, 2), 0.5)
    # capacity 2: expert 0 is chosen by tokens 0, 1, 2, 4 -> keeps 0, 1; expert 1 by 0, 2, 3, 4 -> keeps
    # 0, 2; expert 2 by 1, 3 -> keeps both
    out = dispatch_experts(x, experts, w, modules, 1, capacity=2)
    expected = [
        0.5 * (2 * 1 + 0) + 0.5 * (2 * 1 + 1),  # token 0: both kept
        0.5 * (2 * 2 + 0) + 0.5 * (2 * 2 + 2),  # token 1: both kept
        0.0 + 0.5 * (2 * 3 + 1),  # token 2: expert 0 full
        0.0 + 0.5 * (2 * 4 + 2),  # token 3: expert 1 full
        0.0,  # token 4: both experts full
    ]
    assert out[:, 0].tolist() == expected
    plan = plan_dispatch(experts, w, 3, capacity=2)
    assert plan.token.tolist() == [0, 1, 0, 2, 1, 3] and plan.sizes == [2, 2, 2]
    assert plan.mask.tolist() == [True] * 6
    # capacity 3 leaves an empty slot in expert 2, which contributes exactly nothing
    plan3 = plan_dispatch(experts, w, 3, capacity=3)
    assert plan3.mask.tolist() == [True] * 3 + [True] * 3 + [True, True, False]
    assert plan3.weight[-1].item() == 0.0
    out3 = dispatch_experts(x, experts, w, modules, 1, capacity=3)
    # now token 2 keeps expert 0 and token 3 keeps expert 1; token 4 is fourth in both and still dropped
    assert out3[:, 0].tolist() == [expected[0], expected[1], 0.5 * 6 + 0.5 * 7, 0.5 * 9 + 0.5 * 10, 0.0]


def test_expert_capacity_formula_and_validation():
    assert expert_capacity(64, 2, 8, 1.25) == 20  # ceil(1.25 * 64 * 2 / 8)
    assert expert_capacity(10, 1, 4, 1.0) == 3  # ceil(2.5)
    assert expert_capacity(10, 2, 4, 100.0) == 10  # never above N
    assert expert_capacity(3, 1, 64, 0.01) == 1  # never below 1
    assert expert_capacity(12, 3, 4, 4 / 3) == 12  # capacity_factor = E / k keeps everything
    for bad in (0.0, -1.0, float("nan"), float("inf"), True, "1.0"):
        with pytest.raises(ValueError, match="capacity_factor"):
            expert_capacity(8, 2, 4, bad)
    with pytest.raises(ValueError, match="capacity"):
        plan_dispatch(torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), 2, capacity=0)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoEFeedForward(8, 8, n_experts=2, top_k=1, capacity_factor=0.0)


def test_capacity_dispatch_of_no_tokens():
    modules = [nn.Linear(4, 3) for _ in range(2)]
    empty = torch.zeros(0, 1, dtype=torch.long)
    out = dispatch_experts(torch.zeros(0, 4), empty, torch.zeros(0, 1), modules, 3, capacity=1)
    assert out.shape == (0, 3)


def test_moe_ffn_with_full_capacity_equals_dropless_with_gradients():
    torch.manual_seed(0)
    dropless = MoEFeedForward(16, 8, n_experts=4, top_k=2, n_shared_experts=1)
    capped = copy.deepcopy(dropless)
    capped.capacity_factor = 2.0  # E / k: C = N
    x = torch.randn(2, 9, 16)
    outs = []
    for moe in (dropless, capped):
        out, losses = moe(x)
        (out.square().mean() + losses.balance + losses.z).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0])
    for (name, a), b in zip(dropless.named_parameters(), capped.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_moe_ffn_low_capacity_drops_to_the_shared_expert():
    torch.manual_seed(0)
    moe = MoEFeedForward(8, 8, n_experts=2, top_k=1, n_shared_experts=1, capacity_factor=0.5)
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0  # every token with x[0] > 0 picks expert 0
    x = torch.randn(1, 12, 8)
    x[0, :, 0] = 1.0  # all 12 tokens choose expert 0; capacity ceil(0.5 * 12 / 2) = 3
    out, _ = moe(x)
    flat = x[0]
    p = moe.router(flat).softmax(-1)[:, 0]
    routed = torch.stack([p[n] * moe.experts[0](flat[n]) if n < 3 else torch.zeros(8) for n in range(12)])
    torch.testing.assert_close(out[0], routed + moe.shared(flat))


def test_capacity_dispatch_runs_fp8_swapped_experts_like_dropless():
    # the expert loop calls any module on a static block of rows: here FP8 Linear layers, whose
    # per-tensor amax the zeroed empty slots leave unchanged
    from nexus.training.mixed_precision.fp8 import FP8Linear, convert_to_fp8

    torch.manual_seed(0)
    dropless = convert_to_fp8(MoEFeedForward(32, 32, n_experts=4, top_k=2, n_shared_experts=0))
    capped = copy.deepcopy(dropless)
    capped.capacity_factor = 2.0
    assert isinstance(capped.experts[0].gate_proj, FP8Linear)
    x = torch.randn(1, 8, 32)
    torch.testing.assert_close(capped(x)[0], dropless(x)[0])
    capped.capacity_factor = 0.5  # some assignments dropped: still runs, output finite
    assert torch.isfinite(capped(x)[0]).all()
