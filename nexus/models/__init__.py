"""Models trained by Nexus."""

from nexus.models.moe import MoEConfig, MoEOutput, MoETransformer

__all__ = ["MoEConfig", "MoEOutput", "MoETransformer"]
