"""Test models shared by the multi-process tests: the tiny MoE configuration with every feature on,
and routing tied to the token id, so that a rank fed only one half of the vocabulary leaves some
experts idle while its peers use them (what must not hang DDP or FSDP2)."""
import pytest
import torch

from nexus.models.moe import MoEFeedForward, MoETransformer, RoutingMamba

# MoE, MoD, routing Mamba and 2-token prediction on; the load-balance loss off, since it depends on
# how a batch is split across ranks (a product of two batch means), which would blur every comparison
MOE_CONFIG = dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32, d_ff_dense=32,
                  max_seq_len=32, use_moe=True, n_experts=4, moe_top_k=2, n_shared_experts=1, moe_layer_interval=1,
                  use_mod=True, mod_capacity_factor=0.5, mod_layer_interval=2, use_mamba=True, mamba_layer_interval=2,
                  mamba_d_state=8, mamba_expand=2, mamba_head_dim=16, mamba_chunk_size=8, rom_n_experts=2, rom_top_k=1,
                  n_pred_tokens=2, balance_loss_weight=0.0, router_z_loss_weight=1e-3)


def spawns(test):
    """The marks of a test that reads a module's spawn of Gloo ranks (through its fixtures)."""
    return pytest.mark.slow(pytest.mark.distributed(test))


def steer_experts(model: MoETransformer, half: int, *, rom: bool = True) -> MoETransformer:
    """Token ids < ``half`` get +4 on embedding dim 0, the others -4; dim 0 dominates the residual stream
    through every layer (the layers add ~0.02-sized outputs), so after RMSNorm x[0] is about +-5.6.
    MoE expert 3 (and, with ``rom``, RoM expert 1) gets a router weight of 2 on dim 0: first choice for
    the low half, last choice for the high half (MoE top-2 of 4, RoM top-1 of 2). Returns ``model``."""
    with torch.no_grad():
        model.embed_tokens.weight[:half, 0] = 4.0
        model.embed_tokens.weight[half:, 0] = -4.0
        for module in model.modules():
            if isinstance(module, MoEFeedForward):
                module.router.weight[3] = 0.0
                module.router.weight[3, 0] = 2.0
            elif rom and isinstance(module, RoutingMamba):
                module.router.weight[1] = 0.0
                module.router.weight[1, 0] = 2.0
    return model


def zero_fill_missing_grads(model: torch.nn.Module) -> None:
    """What FSDP2 does for a parameter no rank used in a step (see fsdp2.py): a zero gradient, not None,
    so a one-process reference run steps (and decays) the same parameters."""
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
