"""Host syncs in the model's forward and backward: none with a fixed expert capacity.

On a GPU every read of a device value on the host (``.item()``, ``.tolist()``, ``bool(t)``, ...)
stalls the stream until the queued kernels finish. This counts the Python-level reads during one
training forward+backward of a model with every feature on.
"""

import pytest
import torch
import torch.nn.functional as F

from nexus.models.moe import MoEConfig, MoETransformer

# every feature on, in more than one layer: MoE in every layer, RoM in 2 of 4, MoD in 2 of 4, 2 MTP heads
ALL_ON = dict(vocab_size=61, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=16, d_ff_dense=24,
              max_seq_len=32, use_moe=True, n_experts=4, moe_top_k=2, n_shared_experts=1, moe_layer_interval=1,
              use_mod=True, mod_capacity_factor=0.5, mod_layer_interval=2, use_mamba=True, mamba_layer_interval=2,
              mamba_d_state=4, mamba_expand=2, mamba_head_dim=16, mamba_chunk_size=8, rom_n_experts=2,
              rom_top_k=1, n_pred_tokens=3)

# each reads a tensor's value on the host
SYNCING = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")


@pytest.fixture
def host_reads(monkeypatch):
    """A list that records (method name) for every Tensor host read made while the test runs."""
    calls: list[str] = []
    for name in SYNCING:
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, __original=original, __name=name, **kwargs):
            calls.append(__name)
            return __original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return calls


def _train_step(model: MoETransformer, ids: torch.Tensor) -> None:
    out = model(ids)
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
    for k, logits in enumerate(out.mtp_logits, start=1):
        loss = loss + F.cross_entropy(logits[:, : -1 - k].flatten(0, 1), ids[:, 1 + k:].flatten())
    loss.backward()


def _model(**overrides) -> MoETransformer:
    torch.manual_seed(0)
    model = MoETransformer(MoEConfig(**{**ALL_ON, **overrides}))
    specs = [model.config.layer_spec(i) for i in range(model.config.n_layers)]
    assert sum(s.ffn == "moe" for s in specs) == 4 and sum(s.mixer == "rom" for s in specs) == 2
    assert sum(s.mod for s in specs) == 2 and model.config.n_pred_tokens == 3
    return model


def test_the_counter_sees_host_reads(host_reads):
    t = torch.ones(3)
    t.sum().item(), t.tolist(), bool(t[0]), int(t[0]), float(t[0]), t.cpu()
    assert host_reads == ["item", "tolist", "__bool__", "__int__", "__float__", "cpu"]


def test_fixed_capacity_forward_backward_makes_no_host_sync(host_reads):
    model = _model(moe_capacity_factor=1.25)
    ids = torch.randint(0, 61, (2, 16))
    host_reads.clear()
    _train_step(model, ids)
    assert host_reads == []


def test_dropless_forward_backward_reads_counts_once_per_routed_layer(host_reads):
    # the dropless dispatch reads its per-expert counts: one read per MoE layer (4) and per RoM
    # layer (2: its in and out projections share one plan), and nothing else
    model = _model()
    ids = torch.randint(0, 61, (2, 16))
    host_reads.clear()
    _train_step(model, ids)
    assert host_reads == ["tolist"] * 6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's sync detector needs a CUDA device")
def test_fixed_capacity_step_makes_no_cuda_sync_at_all():
    # also catches syncs inside ATen ops (bincount, nonzero, boolean indexing) that no Python hook sees
    model = _model(moe_capacity_factor=1.25).cuda()
    ids = torch.randint(0, 61, (2, 16), device="cuda")
    _train_step(model, ids)  # warm-up: lazy CUDA/cuBLAS initialisation may sync once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _train_step(model, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
