"""Test models whose expert routing depends on the token id, so that a rank fed only one half of the
vocabulary leaves some experts idle while its peers use them (what must not hang DDP or FSDP2)."""
import torch

from nexus.models.moe import MoEFeedForward, MoETransformer, RoutingMamba


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
