"""The full MoE transformer: shapes, gradients, causality, aux loss and parameter counts."""

import pytest
import torch
import torch.nn.functional as F

from nexus.models.moe import FIVE_B_CONFIG, TINY_CONFIG, MoEConfig, MoEOutput, MoETransformer

SMALL = dict(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=16, d_ff_dense=24,
             max_seq_len=32, n_experts=4, moe_top_k=2, n_shared_experts=1, moe_layer_interval=1,
             use_mod=True, mod_capacity_factor=0.5, mod_layer_interval=2, use_mamba=True,
             mamba_layer_interval=2, mamba_d_state=4, mamba_expand=2, mamba_head_dim=16,
             mamba_chunk_size=8, rom_n_experts=2, rom_top_k=1, n_pred_tokens=3)


def _model(seed=0, **overrides):
    torch.manual_seed(seed)
    return MoETransformer(MoEConfig(**{**SMALL, **overrides}))


def test_output_shapes_and_metrics():
    model = _model()
    ids = torch.randint(0, 97, (2, 12))
    out = model(ids)
    assert isinstance(out, MoEOutput)
    assert out.logits.shape == (2, 12, 97) and out.logits.dtype == torch.float32
    assert len(out.mtp_logits) == 2 and all(m.shape == (2, 12, 97) for m in out.mtp_logits)
    assert out.aux_loss.dim() == 0 and out.aux_loss.item() > 0
    assert set(out.aux_metrics) == {"moe_balance_loss", "moe_z_loss", "rom_balance_loss", "rom_z_loss",
                                    "mod_fraction"}
    # router metrics stay on the device (the caller reads them when it logs); mod_fraction is shape-derived
    for name in ("moe_balance_loss", "moe_z_loss", "rom_balance_loss", "rom_z_loss"):
        v = out.aux_metrics[name]
        assert isinstance(v, torch.Tensor) and v.dim() == 0 and v.dtype == torch.float32, name
        assert not v.requires_grad and v.device == ids.device and float(v) > 0, name
    assert isinstance(out.aux_metrics["mod_fraction"], float)
    assert out.aux_metrics["mod_fraction"] == pytest.approx(6 / 12)
    assert out.metrics is out.aux_metrics  # what the Trainer reads


def test_aux_loss_is_weighted_sum_over_moe_and_rom_layers():
    model = _model(balance_loss_weight=0.0, router_z_loss_weight=0.0)
    assert model(torch.randint(0, 97, (1, 8))).aux_loss.item() == 0.0
    model = _model(balance_loss_weight=1.0, router_z_loss_weight=0.0)
    out = model(torch.randint(0, 97, (1, 8)))
    # 4 MoE layers and 2 RoM layers, metrics hold per-kind means
    m = out.aux_metrics
    expected = 4 * float(m["moe_balance_loss"]) + 2 * float(m["rom_balance_loss"])
    assert out.aux_loss.item() == pytest.approx(expected, rel=1e-5)


def test_features_off_give_plain_transformer_and_zero_aux():
    model = _model(use_moe=False, use_mod=False, use_mamba=False, n_pred_tokens=1)
    out = model(torch.randint(0, 97, (2, 5)))
    assert out.mtp_logits == () and out.aux_metrics == {}
    assert out.aux_loss.dim() == 0 and out.aux_loss.item() == 0.0
    assert model.num_parameters(active=True) == model.num_parameters()


def test_gradients_reach_every_parameter():
    model = _model()
    ids = torch.randint(0, 97, (4, 32))
    out = model(ids)
    loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
    for k, logits in enumerate(out.mtp_logits, start=1):
        loss = loss + F.cross_entropy(logits[:, : -1 - k].flatten(0, 1), ids[:, 1 + k:].flatten())
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_full_capacity_model_equals_dropless_model_forward_and_gradients():
    # moe_capacity_factor = E / k for MoE (4 / 2) and RoM (2 / 1): C = N, nothing dropped
    dropless, capped = _model(), _model(moe_capacity_factor=2.0)
    capped.load_state_dict(dropless.state_dict())
    ids = torch.randint(0, 97, (2, 16))
    outs = []
    for model in (dropless, capped):
        out = model(ids)
        loss = F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()) + out.aux_loss
        (loss + sum(m.square().mean() for m in out.mtp_logits)).backward()
        outs.append(out)
    torch.testing.assert_close(outs[1].logits, outs[0].logits)
    torch.testing.assert_close(outs[1].aux_loss, outs[0].aux_loss)
    for (name, a), b in zip(dropless.named_parameters(), capped.parameters()):
        torch.testing.assert_close(b.grad, a.grad, msg=name)


def test_low_capacity_model_differs_and_trains():
    dropless, capped = _model(), _model(moe_capacity_factor=0.5)
    capped.load_state_dict(dropless.state_dict())
    ids = torch.randint(0, 97, (2, 16))
    out = capped(ids)
    assert not torch.allclose(out.logits, dropless(ids).logits)  # assignments were dropped
    F.cross_entropy(out.logits.flatten(0, 1), ids.flatten()).backward()
    assert all(torch.isfinite(p.grad).all() for p in capped.parameters() if p.grad is not None)


def test_causal_with_mod_off():
    model = _model(use_mod=False).eval()
    ids = torch.randint(0, 97, (2, 16))
    changed = ids.clone()
    changed[:, 9] = (ids[:, 9] + 1) % 97
    a, b = model(ids), model(changed)
    for x, y in zip((a.logits, *a.mtp_logits), (b.logits, *b.mtp_logits)):
        torch.testing.assert_close(x[:, :9], y[:, :9])
        assert not torch.allclose(x[:, 9:], y[:, 9:])


def test_tied_embeddings_share_one_tensor():
    model = _model(tie_embeddings=True)
    assert model.lm_head.weight is model.embed_tokens.weight
    untied = _model(tie_embeddings=False)
    assert untied.num_parameters() - model.num_parameters() == 97 * 32


def test_too_long_input_raises():
    with pytest.raises(ValueError, match="max_seq_len"):
        _model()(torch.zeros(1, 33, dtype=torch.long))


def _hand_count(c: MoEConfig) -> tuple[int, int]:
    d, kv = c.d_model, c.n_kv_heads * c.head_dim
    attn = 2 * d * d + 2 * d * kv
    dense = 3 * d * c.dense_hidden
    expert = 3 * d * c.d_ff
    di, n = c.mamba_d_inner, c.mamba_d_state
    heads = di // c.mamba_head_dim
    rom_expert = d * 2 * di + di * d
    rom_shared = d * c.rom_n_experts + d * (2 * n + heads) + (di + 2 * n) * (c.mamba_d_conv + 1) + 3 * heads + di
    total = active = 2 * c.vocab_size * d + d  # embedding, lm_head, final norm
    for i in range(c.n_layers):
        spec = c.layer_spec(i)
        total += 2 * d + (d if spec.mod else 0)
        active += 2 * d + (d if spec.mod else 0)
        if spec.mixer == "rom":
            total += rom_shared + c.rom_n_experts * rom_expert
            active += rom_shared + c.rom_top_k * rom_expert
        else:
            total, active = total + attn, active + attn
        if spec.ffn == "moe":
            shared = d * c.n_experts + c.n_shared_experts * expert
            total += shared + c.n_experts * expert
            active += shared + c.moe_top_k * expert
        else:
            total, active = total + dense, active + dense
    mtp = (c.n_pred_tokens - 1) * (attn + dense + 3 * d)
    return total + mtp, active + mtp


@pytest.mark.parametrize("overrides", [{}, dict(moe_layer_interval=2, mod_layer_interval=1, n_shared_experts=0),
                                       dict(use_mamba=False, use_mod=False)], ids=["all", "sparse-moe", "no-rom"])
def test_num_parameters_matches_hand_count(overrides):
    model = _model(**overrides)
    total, active = _hand_count(model.config)
    assert model.num_parameters() == total
    assert model.num_parameters(active=True) == active
    assert total == sum(p.numel() for p in model.parameters())


def test_five_b_config_counts_on_meta_without_allocating():
    with torch.device("meta"):
        model = MoETransformer(MoEConfig(**FIVE_B_CONFIG))
    assert all(p.is_meta for p in model.parameters())
    total, active = model.num_parameters(), model.num_parameters(active=True)
    assert 4.8e9 <= total <= 5.2e9, total
    assert 1.5e9 <= active <= 2.0e9, active
    assert (total, active) == _hand_count(model.config)


def test_tiny_config_trains_a_step():
    torch.manual_seed(0)
    model = MoETransformer(MoEConfig(**TINY_CONFIG))
    ids = torch.randint(0, 4096, (2, 32))
    losses = []
    for _ in range(3):  # same batch: plain SGD must lower the loss
        out = model(ids)
        loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()) + out.aux_loss
        model.zero_grad()
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:  # the MTP head is outside this loss
                    p -= 0.05 * p.grad
        losses.append(loss.item())
    assert losses[0] > losses[1] > losses[2]


def test_meta_build_then_materialise_and_init():
    with torch.device("meta"):
        model = MoETransformer(MoEConfig(**SMALL))
    model.to_empty(device="cpu")
    model.init_weights()
    emb = model.embed_tokens.weight
    assert abs(emb.std().item() - 0.02) < 0.004
    rom = model.layers[1].block.mixer
    assert torch.all(-rom.A_log.exp() <= -1.0 + 1e-6) and torch.all(rom.D == 1.0)
    out = model(torch.randint(0, 97, (1, 8)))
    assert torch.isfinite(out.logits).all()


def test_residual_output_projections_use_depth_scaled_init():
    model = _model(n_layers=8, mamba_layer_interval=8, mod_layer_interval=8, init_std=0.05)
    std_o = torch.cat([model.layers[i].mixer.o_proj.weight.flatten() for i in range(6)]).std().item()
    std_q = torch.cat([model.layers[i].mixer.q_proj.weight.flatten() for i in range(6)]).std().item()
    assert std_q == pytest.approx(0.05, rel=0.05)
    assert std_o == pytest.approx(0.05 / 4.0, rel=0.05)  # 1 / sqrt(2 * 8)


def test_dropout_only_in_training_mode():
    model = _model(dropout=0.5, use_mod=False)
    ids = torch.randint(0, 97, (1, 8))
    model.eval()
    torch.testing.assert_close(model(ids).logits, model(ids).logits)
    model.train()
    assert not torch.allclose(model(ids).logits, model(ids).logits)


def test_bfloat16_model_forward_runs_every_feature():
    torch.manual_seed(0)
    cfg = MoEConfig(**{**TINY_CONFIG, "vocab_size": 64, "max_seq_len": 16})
    model = MoETransformer(cfg).to(torch.bfloat16)
    out = model(torch.randint(0, 64, (1, 12)))
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.logits.float()).all()
