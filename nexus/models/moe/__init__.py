"""The MoE transformer: GQA, MoE feed-forward, routing Mamba, mixture of depths, multi-token heads.

Example:
    >>> from nexus.models.moe import MoEConfig, MoETransformer, TINY_CONFIG
    >>> out = MoETransformer(MoEConfig(**TINY_CONFIG))(torch.randint(0, 4096, (2, 16)))
"""

from nexus.models.moe.attention import (GroupedQueryAttention, KVCache, LayerKVCache, block_attention, nexus_core,
                                        sdpa_core)
from nexus.models.moe.config import FIVE_B_CONFIG, TINY_CONFIG, LayerSpec, MoEConfig
from nexus.models.moe.mamba import RoutingMamba, ssd_scan, ssd_scan_reference
from nexus.models.moe.mod import MixtureOfDepths, mod_capacity
from nexus.models.moe.model import MoEOutput, MoETransformer, MTPHead, TransformerBlock
from nexus.models.moe.moe import (DispatchPlan, MoEFeedForward, RouterLosses, SwiGLU, dispatch_experts,
                                  expert_capacity, load_balance_loss, plan_dispatch, router_z_loss, run_experts,
                                  top_k_routing)
from nexus.models.moe.norm import RMSNorm

__all__ = [
    "FIVE_B_CONFIG", "TINY_CONFIG", "DispatchPlan", "GroupedQueryAttention", "KVCache", "LayerKVCache", "LayerSpec",
    "MixtureOfDepths",
    "MoEConfig", "MoEFeedForward", "MoEOutput", "MoETransformer", "MTPHead", "RMSNorm", "RouterLosses",
    "RoutingMamba", "SwiGLU", "TransformerBlock", "dispatch_experts", "expert_capacity", "load_balance_loss",
    "mod_capacity", "plan_dispatch", "router_z_loss", "run_experts", "sdpa_core", "ssd_scan", "ssd_scan_reference",
    "top_k_routing", "block_attention", "nexus_core",
]
