"""Incremental decoding with a KV cache: the same logits as full forwards, position by position."""

import pytest
import torch

from nexus.models.moe import KVCache, MoEConfig, MoETransformer
from nexus.models.moe.attention import GroupedQueryAttention, LayerKVCache

CAUSAL = dict(vocab_size=61, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_ff=16, d_ff_dense=24,
              max_seq_len=32, n_experts=4, moe_top_k=2, n_shared_experts=1, moe_layer_interval=2,
              use_mod=False, use_mamba=False, n_pred_tokens=2)


def _model(**overrides):
    torch.manual_seed(0)
    return MoETransformer(MoEConfig(**{**CAUSAL, **overrides})).eval()


@pytest.mark.parametrize("chunks", [(5, 1, 1, 1, 1), (3, 4, 1, 2)], ids=["prompt-then-tokens", "uneven-chunks"])
def test_cached_logits_equal_full_forward(chunks):
    model = _model()
    ids = torch.randint(0, 61, (3, sum(chunks)), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(ids).logits
        cache, start, pieces = KVCache(), 0, []
        for n in chunks:
            out = model(ids[:, start:start + n], cache=cache)
            assert out.mtp_logits == ()
            pieces.append(out.logits)
            start += n
            assert cache.length == start
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, atol=1e-5, rtol=1e-5)
    # the cache holds the keys of every token in each layer: [B, Hkv, T, head_dim]
    assert cache.layers[0].k.shape == (3, 2, sum(chunks), 8)


def test_cached_greedy_decode_matches_recomputation():
    model = _model()
    prompt = torch.randint(0, 61, (2, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        seq, cache = prompt, KVCache()
        logits = model(prompt, cache=cache).logits[:, -1]
        for _ in range(6):
            reference = model(seq).logits[:, -1]  # recomputed from scratch
            torch.testing.assert_close(logits, reference, atol=1e-5, rtol=1e-5)
            nxt = logits.argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
            logits = model(nxt, cache=cache).logits[:, -1]


def test_attention_layer_cache_gqa():
    torch.manual_seed(3)
    attn = GroupedQueryAttention(32, n_heads=4, n_kv_heads=1)
    x = torch.randn(2, 7, 32)
    full = attn(x, torch.arange(7))
    cache = LayerKVCache()
    first = attn(x[:, :4], torch.arange(4), cache)
    rest = [attn(x[:, i:i + 1], torch.arange(i, i + 1), cache) for i in range(4, 7)]
    torch.testing.assert_close(torch.cat([first, *rest], dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("field,value", [("use_mod", True), ("use_mamba", True), ("moe_capacity_factor", 1.25)])
def test_non_causal_models_refuse_the_cache(field, value):
    extra = {"mamba_layer_interval": 3, "mamba_head_dim": 16, "mamba_d_state": 4} if field == "use_mamba" else {}
    model = _model(**{field: value, **extra})
    with pytest.raises(ValueError, match=field):
        model(torch.zeros(1, 3, dtype=torch.long), cache=KVCache())


def test_cache_past_max_seq_len_is_refused():
    model = _model(max_seq_len=8)
    cache = KVCache()
    model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
