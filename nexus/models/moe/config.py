"""MoEConfig: every size and switch of the MoE transformer, validated when built.

Which layers get which feature (layer index ``i`` counts from 0):

- mixer: the routing-Mamba (RoM) mixer when ``use_mamba`` and ``(i + 1) % mamba_layer_interval == 0``,
  grouped-query attention otherwise (interval 4 -> layers 3, 7, 11, ... are RoM);
- feed-forward: the MoE layer when ``use_moe`` and ``(i + 1) % moe_layer_interval == 0``, a dense
  SwiGLU of hidden size ``d_ff_dense`` otherwise;
- mixture of depths: the whole block is routed when ``use_mod`` and ``(i + 1) % mod_layer_interval == 0``
  (interval 2 -> every other block, the first block always sees every token, as in the MoD paper).

Example:
    >>> cfg = MoEConfig(**TINY_CONFIG)
    >>> [cfg.layer_spec(i).mixer for i in range(cfg.n_layers)]
    ['attention', 'attention', 'attention', 'rom']
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Literal


@dataclass(frozen=True, kw_only=True)
class LayerSpec:
    """What one trunk layer is made of (see the module docstring for the interval rule)."""

    mixer: Literal["attention", "rom"]
    ffn: Literal["moe", "dense"]
    mod: bool


@dataclass(kw_only=True)
class MoEConfig:
    """Sizes and switches of :class:`nexus.models.moe.MoETransformer`.

    All fields are keyword-only; a bad value raises ``ValueError`` naming the field.

    Example:
        >>> cfg = MoEConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)
        >>> cfg.head_dim
        16
    """

    # trunk
    vocab_size: int = 50257
    d_model: int = 2048
    n_layers: int = 32
    n_heads: int = 16
    n_kv_heads: int = 4
    d_ff: int = 1024  # hidden size of one routed (or shared) SwiGLU expert
    d_ff_dense: int | None = None  # hidden size of dense SwiGLU layers and MTP heads; None -> d_ff
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    dropout: float = 0.0
    # attention core: "sdpa" (torch's scaled_dot_product_attention) or "nexus" (nexus_kernels' blockwise
    # FlashAttention-2 kernels: Triton on a GPU, torch reference on CPU; no attention dropout)
    attention_impl: str = "sdpa"
    tie_embeddings: bool = False
    init_std: float = 0.02
    # mixture of experts feed-forward
    use_moe: bool = True
    n_experts: int = 16
    moe_top_k: int = 2
    n_shared_experts: int = 1
    moe_layer_interval: int = 1
    balance_loss_weight: float = 0.01
    router_z_loss_weight: float = 0.001
    # expert dispatch of the MoE and RoM layers: None = dropless (exact, one host sync per routed layer
    # per forward); a float > 0 = fixed per-expert capacity ceil(f * tokens * top_k / n_experts), static
    # shapes and no host sync, assignments past it dropped (f >= n_experts / top_k drops nothing)
    moe_capacity_factor: float | None = None
    # mixture of depths
    use_mod: bool = True
    mod_capacity_factor: float = 0.75
    mod_layer_interval: int = 2
    # routing Mamba (RoM) mixer: Mamba-2 style selective scan with routed in/out projections
    use_mamba: bool = True
    mamba_layer_interval: int = 4
    mamba_d_state: int = 64
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mamba_head_dim: int = 64
    mamba_chunk_size: int = 64
    rom_n_experts: int = 4
    rom_top_k: int = 1
    # multi-token prediction: 1 = next token only; k > 1 adds k - 1 extra heads
    n_pred_tokens: int = 4

    def __post_init__(self) -> None:
        positive = (
            "vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "d_ff", "max_seq_len",
            "n_experts", "moe_top_k", "moe_layer_interval", "mod_layer_interval",
            "mamba_layer_interval", "mamba_d_state", "mamba_d_conv", "mamba_expand",
            "mamba_head_dim", "mamba_chunk_size", "rom_n_experts", "rom_top_k", "n_pred_tokens",
        )
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.d_ff_dense is not None and (not isinstance(self.d_ff_dense, int) or self.d_ff_dense <= 0):
            raise ValueError(f"d_ff_dense must be a positive int or None, got {self.d_ff_dense!r}")
        if not isinstance(self.n_shared_experts, int) or self.n_shared_experts < 0:
            raise ValueError(f"n_shared_experts must be an int >= 0, got {self.n_shared_experts!r}")
        for name in ("rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)!r}")
        for name in ("balance_loss_weight", "router_z_loss_weight"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)!r}")
        cf = self.moe_capacity_factor
        if cf is not None and (isinstance(cf, bool) or not isinstance(cf, (int, float)) or not 0.0 < cf < math.inf):
            raise ValueError(f"moe_capacity_factor must be a finite float > 0 or None, got {cf!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.attention_impl not in ("sdpa", "nexus"):
            raise ValueError(f"attention_impl must be 'sdpa' or 'nexus', got {self.attention_impl!r}")
        if self.attention_impl == "nexus" and self.dropout:
            raise ValueError(f"attention_impl='nexus' has no attention dropout: dropout must be 0, got {self.dropout!r}")
        if not 0.0 < self.mod_capacity_factor <= 1.0:
            raise ValueError(f"mod_capacity_factor must be in (0, 1], got {self.mod_capacity_factor!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be divisible by n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"n_heads: head_dim d_model / n_heads = {self.head_dim} must be even for rotary")
        if self.moe_top_k > self.n_experts:
            raise ValueError(f"moe_top_k ({self.moe_top_k}) must be <= n_experts ({self.n_experts})")
        if self.rom_top_k > self.rom_n_experts:
            raise ValueError(f"rom_top_k ({self.rom_top_k}) must be <= rom_n_experts ({self.rom_n_experts})")
        if self.use_mamba and (self.mamba_expand * self.d_model) % self.mamba_head_dim:
            raise ValueError(
                f"mamba_head_dim ({self.mamba_head_dim}) must divide mamba_expand * d_model "
                f"({self.mamba_expand * self.d_model})"
            )
        for flag, interval in (("use_moe", "moe_layer_interval"), ("use_mod", "mod_layer_interval"),
                               ("use_mamba", "mamba_layer_interval")):
            if getattr(self, flag) and getattr(self, interval) > self.n_layers:
                raise ValueError(f"{interval} ({getattr(self, interval)}) > n_layers: no layer would use it")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def dense_hidden(self) -> int:
        return self.d_ff if self.d_ff_dense is None else self.d_ff_dense

    @property
    def mamba_d_inner(self) -> int:
        return self.mamba_expand * self.d_model

    def layer_spec(self, i: int) -> LayerSpec:
        """Mixer, feed-forward and MoD choice of trunk layer ``i`` (0-based)."""
        if not 0 <= i < self.n_layers:
            raise ValueError(f"layer index {i} outside [0, {self.n_layers})")
        every = lambda interval: (i + 1) % interval == 0  # noqa: E731
        return LayerSpec(
            mixer="rom" if self.use_mamba and every(self.mamba_layer_interval) else "attention",
            ffn="moe" if self.use_moe and every(self.moe_layer_interval) else "dense",
            mod=self.use_mod and every(self.mod_layer_interval),
        )

    @classmethod
    def field_names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


# The 5B production model of seed 004 (d_model 2048, 32 layers, 16 experts top-2, MoD 0.75, 4 tokens).
# Sized to 5.03B total and 1.60B per-token active parameters (asserted on the meta device in
# tests/models/moe/test_model.py): 24 GQA + 8 RoM mixers, MoE in every layer (16 routed + 2
# shared experts of hidden 1024), MoD in every other layer, 3 MTP heads.
FIVE_B_CONFIG: dict = dict(
    vocab_size=50257,
    d_model=2048,
    n_layers=32,
    n_heads=16,
    n_kv_heads=4,
    d_ff=1024,
    d_ff_dense=5632,
    max_seq_len=2048,
    use_moe=True,
    n_experts=16,
    moe_top_k=2,
    n_shared_experts=2,
    moe_layer_interval=1,
    use_mod=True,
    mod_capacity_factor=0.75,
    mod_layer_interval=2,
    use_mamba=True,
    mamba_layer_interval=4,
    mamba_d_state=64,
    mamba_expand=2,
    mamba_head_dim=64,
    rom_n_experts=4,
    rom_top_k=1,
    n_pred_tokens=4,
)

# A model that trains on two CPU cores in fp32 (every feature on somewhere): 2.24M parameters,
# 1.94M active. Layers 0, 2: attention + dense; 1: MoD(attention + MoE); 3: MoD(RoM + MoE).
TINY_CONFIG: dict = dict(
    vocab_size=4096,
    d_model=128,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    d_ff=128,
    d_ff_dense=256,
    max_seq_len=256,
    use_moe=True,
    n_experts=4,
    moe_top_k=2,
    n_shared_experts=1,
    moe_layer_interval=2,
    use_mod=True,
    mod_capacity_factor=0.5,
    mod_layer_interval=2,
    use_mamba=True,
    mamba_layer_interval=4,
    mamba_d_state=16,
    mamba_expand=2,
    mamba_head_dim=32,
    mamba_chunk_size=32,
    rom_n_experts=2,
    rom_top_k=1,
    n_pred_tokens=2,
)
