"""Grouped-query attention, rotary embeddings, RMSNorm."""

import pytest
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


# ---- attention_impl: "nexus" (nexus_kernels' blockwise attention) against "sdpa" ---------------------

_NEXUS_MODEL = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=16, d_ff_dense=24,
                    max_seq_len=32, n_experts=4, moe_top_k=2, moe_layer_interval=2, use_mod=True,
                    mod_capacity_factor=0.5, mod_layer_interval=2, use_mamba=False, n_pred_tokens=2)


def _loss_and_grads(model, ids):
    import torch.nn.functional as F

    out = model(ids)
    loss = F.cross_entropy(out.logits[:, :-1].reshape(-1, 97), ids[:, 1:].reshape(-1))
    loss = loss + F.cross_entropy(out.mtp_logits[0][:, :-2].reshape(-1, 97), ids[:, 2:].reshape(-1)) + out.aux_loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("path", ["reference", "interpret"])
def test_model_with_nexus_attention_equals_sdpa(path):
    """Same weights, same batch: loss and every gradient of the MoE model (GQA, MoD, MoE, an MTP head)
    with attention_impl='nexus' equal the SDPA model's; on CPU 'nexus' runs the torch reference, or the
    Triton kernel in the interpreter."""
    from nexus.models.moe import MoEConfig, MoETransformer, nexus_core
    from nexus_kernels import forced

    torch.manual_seed(0)
    sdpa = MoETransformer(MoEConfig(**_NEXUS_MODEL))
    nexus = MoETransformer(MoEConfig(**_NEXUS_MODEL, attention_impl="nexus"))
    nexus.load_state_dict(sdpa.state_dict())
    cores = [m.core for m in nexus.modules() if isinstance(m, GroupedQueryAttention)]
    assert len(cores) == 3 and all(c is nexus_core for c in cores)  # 2 trunk layers + the MTP head's block
    ids = torch.randint(0, 97, (2, 21), generator=torch.Generator().manual_seed(1))
    want_loss, want = _loss_and_grads(sdpa, ids)
    with forced(path):
        loss, grads = _loss_and_grads(nexus, ids)
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
    assert grads.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(grads[name], want[name], atol=1e-5, rtol=1e-4, msg=lambda m: f"{name}: {m}")


def test_block_attention_gradcheck_float64():
    from nexus.models.moe import block_attention

    g = torch.Generator().manual_seed(2)
    q = torch.randn(1, 2, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    k = torch.randn(1, 1, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    v = torch.randn(1, 1, 4, 3, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: block_attention(*t, causal=True), (q, k, v))
    assert torch.autograd.gradcheck(lambda *t: block_attention(*t, causal=False, softmax_scale=0.7), (q, k, v))


def test_attention_impl_is_validated_and_read_from_the_run_file():
    from nexus.config import config_from_dict
    from nexus.models.moe import MoEConfig, nexus_core

    with pytest.raises(ValueError, match="attention_impl must be 'sdpa' or 'nexus', got 'flash'"):
        MoEConfig(**_NEXUS_MODEL, attention_impl="flash")
    with pytest.raises(ValueError, match="attention_impl='nexus' has no attention dropout"):
        MoEConfig(**_NEXUS_MODEL, attention_impl="nexus", dropout=0.1)
    with pytest.raises(ValueError, match="no attention dropout"):
        nexus_core(torch.randn(1, 2, 3, 8), torch.randn(1, 1, 3, 8), torch.randn(1, 1, 3, 8), 0.1)
    run = config_from_dict({"model": {**_NEXUS_MODEL, "vocab_size": 512, "attention_impl": "nexus"},
                            "data": {"data_dir": "unused", "vocab_size": 512}, "training": {"seq_len": 16}})
    assert run.model.attention_impl == "nexus"
    assert MoEConfig(**_NEXUS_MODEL).attention_impl == "sdpa"


def test_block_attention_compiles_in_one_graph():
    """The kernels are torch.library ops: torch.compile traces forward and backward without graph breaks."""
    from nexus.models.moe import block_attention

    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 4, 19, 16, generator=g, requires_grad=True)
    k = torch.randn(2, 2, 19, 16, generator=g, requires_grad=True)
    v = torch.randn(2, 2, 19, 16, generator=g, requires_grad=True)
    compiled = torch.compile(lambda *t: block_attention(*t).square().sum(), backend="aot_eager", fullgraph=True)
    loss = compiled(q, k, v)
    grads = torch.autograd.grad(loss, (q, k, v))
    want_loss = sdpa_core(q, k, v).square().sum()
    want = torch.autograd.grad(want_loss, (q, k, v))
    torch.testing.assert_close(loss, want_loss)
    for got, expect in zip(grads, want):
        torch.testing.assert_close(got, expect, atol=1e-5, rtol=1e-5)
