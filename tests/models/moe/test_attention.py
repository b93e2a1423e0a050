"""Grouped-query attention, rotary embeddings, RMSNorm."""

import torch

from nexus.models.moe import GroupedQueryAttention, RMSNorm, sdpa_core
from nexus.models.moe.rotary import apply_rotary, rotary_cos_sin


def _naive_mha(x, wq, wk, wv, wo, n_heads, theta=10000.0):
    b, t, d = x.shape
    hd = d // n_heads
    q = (x @ wq.T).view(b, t, n_heads, hd).transpose(1, 2)
    k = (x @ wk.T).view(b, t, n_heads, hd).transpose(1, 2)
    v = (x @ wv.T).view(b, t, n_heads, hd).transpose(1, 2)
    cos, sin = rotary_cos_sin(torch.arange(t), hd, theta)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    scores = q @ k.transpose(-1, -2) / hd ** 0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = scores.softmax(-1) @ v
    return out.transpose(1, 2).reshape(b, t, d) @ wo.T


def test_gqa_equals_full_mha_with_repeated_kv_weights():
    torch.manual_seed(0)
    gqa = GroupedQueryAttention(32, n_heads=4, n_kv_heads=2)
    mha = GroupedQueryAttention(32, n_heads=4, n_kv_heads=4)
    hd = 8
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        for name in ("k_proj", "v_proj"):  # kv head j serves query heads 2j and 2j+1
            w = getattr(gqa, name).weight.view(2, hd, 32).repeat_interleave(2, dim=0).reshape(32, 32)
            getattr(mha, name).weight.copy_(w)
    x = torch.randn(2, 7, 32)
    pos = torch.arange(7)
    torch.testing.assert_close(gqa(x, pos), mha(x, pos))
    expected = _naive_mha(x, mha.q_proj.weight, mha.k_proj.weight, mha.v_proj.weight, mha.o_proj.weight, 4)
    torch.testing.assert_close(mha(x, pos), expected, atol=1e-5, rtol=1e-5)


def test_attention_is_causal_and_accepts_per_sequence_positions():
    torch.manual_seed(0)
    attn = GroupedQueryAttention(16, n_heads=2, n_kv_heads=1)
    x = torch.randn(1, 6, 16)
    y = x.clone()
    y[:, 4] += 1.0
    torch.testing.assert_close(attn(x, torch.arange(6))[:, :4], attn(y, torch.arange(6))[:, :4])
    pos = torch.tensor([[0, 2, 5, 7, 8, 9]])  # MoD hands a block gathered positions
    assert not torch.allclose(attn(x, pos), attn(x, torch.arange(6)))
    torch.testing.assert_close(attn(x, pos.expand(1, 6)), attn(x, pos[0]))


def test_rotary_scores_depend_only_on_relative_offset():
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)

    def score(i, j):
        cq, sq = rotary_cos_sin(torch.tensor([i]), 8)
        ck, sk = rotary_cos_sin(torch.tensor([j]), 8)
        return (apply_rotary(q, cq, sq) * apply_rotary(k, ck, sk)).sum()

    torch.testing.assert_close(score(5, 2), score(13, 10))
    assert not torch.allclose(score(5, 2), score(5, 3))


def test_rmsnorm_formula():
    norm = RMSNorm(4, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    x = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    rms = (x.square().mean() + 1e-6).sqrt()
    torch.testing.assert_close(norm(x), x / rms * norm.weight)


def test_attention_core_is_swappable():
    calls = []

    def recording_core(q, k, v, dropout_p):
        calls.append((q.shape, k.shape))
        return sdpa_core(q, k, v, dropout_p)

    torch.manual_seed(0)
    attn = GroupedQueryAttention(16, n_heads=4, n_kv_heads=2)
    x = torch.randn(2, 5, 16)
    expected = attn(x, torch.arange(5))
    attn.core = recording_core
    torch.testing.assert_close(attn(x, torch.arange(5)), expected)
    assert calls == [((2, 4, 5, 4), (2, 2, 5, 4))]
