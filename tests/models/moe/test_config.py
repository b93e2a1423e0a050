"""MoEConfig validation and the layer layout rule."""

import pytest

from nexus.models.moe import FIVE_B_CONFIG, TINY_CONFIG, MoEConfig

SMALL = dict(vocab_size=64, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=16, max_seq_len=16,
             n_experts=4, moe_top_k=2, mamba_head_dim=16, n_pred_tokens=2)


@pytest.mark.parametrize(
    "overrides, field",
    [
        (dict(moe_top_k=5), "moe_top_k"),
        (dict(d_model=30), "d_model"),
        (dict(n_kv_heads=3), "n_heads"),
        (dict(d_model=0), "d_model"),
        (dict(n_layers=-1), "n_layers"),
        (dict(d_ff=0), "d_ff"),
        (dict(vocab_size=0), "vocab_size"),
        (dict(n_experts=0), "n_experts"),
        (dict(mod_capacity_factor=0.0), "mod_capacity_factor"),
        (dict(mod_capacity_factor=1.5), "mod_capacity_factor"),
        (dict(dropout=1.0), "dropout"),
        (dict(rom_top_k=5, rom_n_experts=4), "rom_top_k"),
        (dict(n_shared_experts=-1), "n_shared_experts"),
        (dict(mamba_head_dim=48), "mamba_head_dim"),
        (dict(n_pred_tokens=0), "n_pred_tokens"),
        (dict(init_std=0.0), "init_std"),
        (dict(norm_eps=-1e-6), "norm_eps"),
        (dict(balance_loss_weight=-0.1), "balance_loss_weight"),
        (dict(moe_layer_interval=5), "moe_layer_interval"),
        (dict(n_heads=32, n_kv_heads=32), "head_dim"),
        (dict(d_ff_dense=0), "d_ff_dense"),
        (dict(n_layers=2.5), "n_layers"),
        (dict(moe_capacity_factor=0.0), "moe_capacity_factor"),
        (dict(moe_capacity_factor=-1.0), "moe_capacity_factor"),
        (dict(moe_capacity_factor=float("inf")), "moe_capacity_factor"),
        (dict(moe_capacity_factor=float("nan")), "moe_capacity_factor"),
        (dict(moe_capacity_factor=True), "moe_capacity_factor"),
    ],
    ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()),
)
def test_invalid_field_raises_value_error_naming_it(overrides, field):
    with pytest.raises(ValueError, match=field):
        MoEConfig(**{**SMALL, **overrides})


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        MoEConfig(64)  # type: ignore[misc]


def test_layer_spec_follows_intervals():
    cfg = MoEConfig(**{**SMALL, "n_layers": 8, "moe_layer_interval": 2, "mod_layer_interval": 2,
                       "mamba_layer_interval": 4})
    specs = [cfg.layer_spec(i) for i in range(8)]
    assert [s.mixer for s in specs] == ["attention"] * 3 + ["rom"] + ["attention"] * 3 + ["rom"]
    assert [s.ffn for s in specs] == ["dense", "moe"] * 4
    assert [s.mod for s in specs] == [False, True] * 4


def test_switches_turn_features_off_in_every_layer():
    cfg = MoEConfig(**{**SMALL, "use_moe": False, "use_mod": False, "use_mamba": False})
    specs = [cfg.layer_spec(i) for i in range(cfg.n_layers)]
    assert all(s.mixer == "attention" and s.ffn == "dense" and not s.mod for s in specs)


def test_shipped_configs_are_valid_and_keep_seed_names():
    five_b = MoEConfig(**FIVE_B_CONFIG)
    assert (five_b.d_model, five_b.n_layers, five_b.n_experts, five_b.moe_top_k) == (2048, 32, 16, 2)
    assert (five_b.mod_capacity_factor, five_b.n_pred_tokens, five_b.vocab_size) == (0.75, 4, 50257)
    assert five_b.use_moe and five_b.use_mod and five_b.use_mamba
    tiny = MoEConfig(**TINY_CONFIG)
    specs = [tiny.layer_spec(i) for i in range(tiny.n_layers)]
    assert tiny.vocab_size == 4096 and tiny.n_layers == 4 and tiny.n_pred_tokens == 2
    assert any(s.mod for s in specs) and any(s.mixer == "rom" for s in specs) and any(s.ffn == "moe" for s in specs)
