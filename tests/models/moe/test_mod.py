"""Mixture of depths: capacity, skipping, router gradients and the top-k causality caveat."""

import torch
from torch import nn

from nexus.models.moe import MixtureOfDepths, mod_capacity


class _Recorder(nn.Module):
    """A block that records what it was given and adds a learnable offset."""

    def __init__(self, d):
        super().__init__()
        self.proj = nn.Linear(d, d)
        self.seen = []

    def forward(self, x, positions):
        self.seen.append((x.detach().clone(), positions.clone()))
        return x + self.proj(x), []


def test_capacity_formula():
    assert mod_capacity(128, 0.75) == 96
    assert mod_capacity(10, 0.75) == 7
    assert mod_capacity(3, 0.1) == 1
    assert mod_capacity(8, 1.0) == 8


def test_exactly_k_tokens_per_sequence_go_through_the_block_and_others_skip():
    torch.manual_seed(0)
    block = _Recorder(8)
    mod = MixtureOfDepths(block, 8, capacity_factor=0.5)
    x = torch.randn(3, 10, 8)
    out, _, selected = mod(x, torch.arange(10))
    seen_x, seen_pos = block.seen[0]
    assert seen_x.shape == (3, 5, 8) and selected.shape == (3, 5)
    scores = mod.router(x).squeeze(-1)
    for b in range(3):
        expected = sorted(scores[b].topk(5).indices.tolist())
        assert selected[b].tolist() == expected
        assert seen_pos[b].tolist() == expected  # original positions, ascending
        skipped = [i for i in range(10) if i not in expected]
        torch.testing.assert_close(out[b, skipped], x[b, skipped])
        gate = torch.sigmoid(scores[b, expected])[:, None]
        sel = x[b, expected]
        torch.testing.assert_close(out[b, expected], sel + gate * block.proj(sel))


def test_router_receives_gradient_through_the_scaling():
    torch.manual_seed(0)
    mod = MixtureOfDepths(_Recorder(8), 8, capacity_factor=0.25)
    out, _, _ = mod(torch.randn(2, 8, 8), torch.arange(8))
    out.square().sum().backward()
    assert mod.router.weight.grad.abs().sum() > 0
    assert mod.block.proj.weight.grad.abs().sum() > 0


def test_top_k_over_the_sequence_is_not_causal():
    # the documented caveat: a later token with a high router score evicts an earlier one
    torch.manual_seed(0)
    mod = MixtureOfDepths(_Recorder(4), 4, capacity_factor=0.5)
    with torch.no_grad():
        mod.router.weight.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0]]))
    x = torch.randn(1, 4, 4)
    x[0, :, 0] = torch.tensor([3.0, 2.0, 1.0, 0.0])  # tokens 0 and 1 are selected
    early = mod(x, torch.arange(4))[0][0, 1]
    x2 = x.clone()
    x2[0, 3, 0] = 10.0  # change only the last token
    assert not torch.allclose(mod(x2, torch.arange(4))[0][0, 1], early)
