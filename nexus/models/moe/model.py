"""MoETransformer: a decoder-only LM with GQA, MoE feed-forward, routing Mamba, mixture of depths
and multi-token prediction heads, each switchable in :class:`MoEConfig`.

Layout: embed_tokens -> n_layers pre-norm blocks (mixer then feed-forward, both residual; some
wrapped in mixture of depths) -> trunk hidden h.
  next-token logits  = lm_head(norm(h))
  extra head k (1..n_pred_tokens-1, predicting token t+1+k at position t) = lm_head(norm_k(block_k(h))),
  with block_k a dense attention block (Gloeckle et al. 2024: shared trunk, one layer per extra
  token, shared unembedding).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

from nexus.models.moe.attention import ATTENTION_CORES, GroupedQueryAttention, KVCache, LayerKVCache
from nexus.models.moe.config import LayerSpec, MoEConfig
from nexus.models.moe.mamba import RoutingMamba
from nexus.models.moe.mod import MixtureOfDepths
from nexus.models.moe.moe import MoEFeedForward, RouterLosses, SwiGLU
from nexus.models.moe.norm import RMSNorm


@dataclass
class MoEOutput:
    """What :meth:`MoETransformer.forward` returns.

    logits [B, T, V]: next-token logits. mtp_logits: n_pred_tokens - 1 tensors [B, T, V], entry
    k - 1 predicts token t + 1 + k at position t. aux_loss: 0-dim, already weighted
    (balance_loss_weight * sum of balance losses + router_z_loss_weight * sum of z-losses over all
    MoE and RoM layers; zero without routers).

    aux_metrics: for logging. ``moe_balance_loss``, ``moe_z_loss``, ``rom_balance_loss``,
    ``rom_z_loss`` (present when the model has such layers) are detached 0-dim fp32 tensors on the
    model's device, the mean over those layers: the forward never reads them to the host (that would
    stall a GPU stream every step), so the caller accumulates them and reads them once when it logs
    (``float(v)``). ``mod_fraction`` (with MoD on) is a Python float, fixed by the shapes.
    ``metrics`` is the same dict (the name the Trainer looks for on any model output).
    """

    logits: torch.Tensor
    mtp_logits: tuple[torch.Tensor, ...]
    aux_loss: torch.Tensor
    aux_metrics: dict[str, torch.Tensor | float] = field(default_factory=dict)

    @property
    def metrics(self) -> dict[str, torch.Tensor | float]:
        return self.aux_metrics


class TransformerBlock(nn.Module):
    """Pre-norm block: x + mixer(norm(x)), then + ffn(norm(.)).

    Shapes: x [B, T, d_model], positions [T] or [B, T] -> (x [B, T, d_model], list of RouterLosses).

    Example:
        >>> block = TransformerBlock(cfg, LayerSpec(mixer="attention", ffn="moe", mod=False))
        >>> y, losses = block(torch.randn(2, 8, cfg.d_model), torch.arange(8))
    """

    def __init__(self, config: MoEConfig, spec: LayerSpec) -> None:
        super().__init__()
        c = config
        self.spec = spec
        self.mixer_norm = RMSNorm(c.d_model, c.norm_eps)
        if spec.mixer == "rom":
            self.mixer = RoutingMamba(c.d_model, c.mamba_d_state, c.mamba_d_conv, c.mamba_expand,
                                      c.mamba_head_dim, c.rom_n_experts, c.rom_top_k, c.mamba_chunk_size, c.norm_eps,
                                      capacity_factor=c.moe_capacity_factor)
        else:
            self.mixer = GroupedQueryAttention(c.d_model, c.n_heads, c.n_kv_heads, c.rope_theta, c.dropout,
                                               core=ATTENTION_CORES[c.attention_impl])
        self.ffn_norm = RMSNorm(c.d_model, c.norm_eps)
        if spec.ffn == "moe":
            self.ffn = MoEFeedForward(c.d_model, c.d_ff, c.n_experts, c.moe_top_k, c.n_shared_experts,
                                      capacity_factor=c.moe_capacity_factor)
        else:
            self.ffn = SwiGLU(c.d_model, c.dense_hidden)
        self.dropout = nn.Dropout(c.dropout)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: LayerKVCache | None = None
                ) -> tuple[torch.Tensor, list[RouterLosses]]:
        losses: list[RouterLosses] = []
        if isinstance(self.mixer, RoutingMamba):
            if cache is not None:
                raise ValueError("incremental decoding (cache=) supports attention mixers only, not RoM (use_mamba)")
            mixed, rl = self.mixer(self.mixer_norm(x))
            losses.append(rl)
        else:
            mixed = self.mixer(self.mixer_norm(x), positions, cache) if cache is not None else \
                self.mixer(self.mixer_norm(x), positions)
        x = x + self.dropout(mixed)
        if isinstance(self.ffn, MoEFeedForward):
            ff, rl = self.ffn(self.ffn_norm(x))
            losses.append(rl)
        else:
            ff = self.ffn(self.ffn_norm(x))
        return x + self.dropout(ff), losses


def run_layers(layers: Iterable[nn.Module], h: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, list[RouterLosses], list[RouterLosses], list[float]]:
    """Run trunk layers (blocks or MoD-wrapped blocks) in order; shared by the model and its pipeline stages.

    Shapes: h [B, T, d_model], positions [T] -> (h [B, T, d_model], MoE router losses, RoM router
    losses, fraction of tokens each MoD layer processed), losses in layer order.
    """
    t = h.shape[1]
    moe_losses: list[RouterLosses] = []
    rom_losses: list[RouterLosses] = []
    mod_fractions: list[float] = []
    for layer in layers:
        if isinstance(layer, MixtureOfDepths):
            h, losses, selected = layer(h, positions)
            mod_fractions.append(selected.shape[1] / t)
            block = layer.block
        else:
            h, losses = layer(h, positions)
            block = layer
        # a block yields the RoM losses first (mixer), then the MoE losses (ffn)
        rom_losses.extend(losses[: int(block.spec.mixer == "rom")])
        moe_losses.extend(losses[int(block.spec.mixer == "rom"):])
    return h, moe_losses, rom_losses, mod_fractions


class MTPHead(nn.Module):
    """One extra multi-token-prediction head: a dense attention block and its own final norm.

    Shapes: h [B, T, d_model] trunk hidden, positions [T] -> [B, T, d_model] (feed to lm_head).
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.block = TransformerBlock(config, LayerSpec(mixer="attention", ffn="dense", mod=False))
        self.norm = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, h: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.norm(self.block(h, positions)[0])


class MoETransformer(nn.Module):
    """Decoder-only MoE language model (see module docstring for the layout).

    Shapes: input_ids [B, T] int64, T <= max_seq_len -> :class:`MoEOutput` (fp32 by default).

    Incremental decoding: ``forward(ids, cache=KVCache())`` with the prompt, then with each new
    token [B, 1] and the same cache, gives the logits a full forward would give at those positions
    (a model without RoM and MoD layers, with dropless experts: MoD's top-k over the sequence and
    fixed expert capacity both depend on later or other tokens). Extra MTP heads are not run then
    (``mtp_logits`` is empty).

    Example:
        >>> model = MoETransformer(MoEConfig(**TINY_CONFIG))
        >>> out = model(torch.randint(0, 4096, (2, 16)))  # out.logits: [2, 16, 4096]
    """

    def __init__(self, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        # explicit weight: skips Embedding's own init, which init_weights redoes anyway
        self.embed_tokens = nn.Embedding(c.vocab_size, c.d_model, _weight=torch.empty(c.vocab_size, c.d_model))
        layers = []
        for i in range(c.n_layers):
            spec = c.layer_spec(i)
            block = TransformerBlock(c, spec)
            layers.append(MixtureOfDepths(block, c.d_model, c.mod_capacity_factor) if spec.mod else block)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(c.d_model, c.norm_eps)
        self.mtp_heads = nn.ModuleList(MTPHead(c) for _ in range(c.n_pred_tokens - 1))
        self.lm_head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        if c.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.dropout = nn.Dropout(c.dropout)
        self.init_weights()

    def init_weights(self) -> None:
        """Normal(0, init_std) for projections and embeddings; residual output projections get
        init_std / sqrt(2 * n_layers) (GPT-2) so the residual stream does not grow with depth.
        Parameters on the meta device hold no data and are left alone (call again after to_empty)."""
        if any(p.is_meta for p in self.parameters()):  # meta normal_ is a slow python decomposition
            return
        std = self.config.init_std
        out_std = std / math.sqrt(2 * self.config.n_layers)
        out_names = ("o_proj", "down_proj", "out_experts")
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                is_out = any(part in out_names for part in name.split("."))
                nn.init.normal_(module.weight, mean=0.0, std=out_std if is_out else std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            elif isinstance(module, RMSNorm):
                module.reset_parameters()
            elif isinstance(module, RoutingMamba):
                module.reset_ssm_parameters()
        if self.config.tie_embeddings:  # the Linear loop above re-initialised the shared tensor
            nn.init.normal_(self.embed_tokens.weight, mean=0.0, std=std)

    def forward(self, input_ids: torch.Tensor, cache: KVCache | None = None,
                positions: torch.Tensor | None = None) -> MoEOutput:
        """``positions`` [T] int64: the tokens' positions in their sequences (rotary embeddings), default
        0..T-1; context parallelism passes the global positions of its slice."""
        b, t = input_ids.shape
        if cache is not None:
            return self._forward_cached(input_ids, cache)
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence length {t} > max_seq_len {self.config.max_seq_len}")
        if positions is None:
            positions = torch.arange(t, device=input_ids.device)
        elif positions.shape != (t,):
            raise ValueError(f"positions must be [T] = [{t}] (one per token), got shape {tuple(positions.shape)}")
        h = self.dropout(self.embed_tokens(input_ids))
        h, moe_losses, rom_losses, mod_fractions = run_layers(self.layers, h, positions)
        logits = self.lm_head(self.norm(h))
        mtp_logits = tuple(self.lm_head(head(h, positions)) for head in self.mtp_heads)
        return self._output(logits, mtp_logits, moe_losses, rom_losses, mod_fractions)

    def _forward_cached(self, input_ids: torch.Tensor, cache: KVCache) -> MoEOutput:
        """The new tokens ``input_ids`` [B, t] after the ``cache.length`` cached ones (see the class docstring)."""
        c = self.config
        for name, off in (("use_mamba", c.use_mamba), ("use_mod", c.use_mod),
                          ("moe_capacity_factor", c.use_moe and c.moe_capacity_factor is not None)):
            if off:
                raise ValueError(f"incremental decoding (cache=) needs a causal per-token model: {name}="
                                 f"{getattr(c, name)!r} is not supported")
        t = input_ids.shape[1]
        if cache.length + t > c.max_seq_len:
            raise ValueError(f"sequence length {cache.length + t} > max_seq_len {c.max_seq_len}")
        positions = torch.arange(cache.length, cache.length + t, device=input_ids.device)
        h = self.dropout(self.embed_tokens(input_ids))
        moe_losses: list[RouterLosses] = []
        for i, layer in enumerate(self.layers):
            h, losses = layer(h, positions, cache.layer(i))
            moe_losses.extend(losses)
        cache.length += t
        return self._output(self.lm_head(self.norm(h)), (), moe_losses, [], [])

    def _output(self, logits: torch.Tensor, mtp_logits: tuple[torch.Tensor, ...], moe_losses: list[RouterLosses],
                rom_losses: list[RouterLosses], mod_fractions: list[float]) -> MoEOutput:
        all_losses = moe_losses + rom_losses
        if all_losses:
            balance = torch.stack([rl.balance for rl in all_losses]).sum()
            z = torch.stack([rl.z for rl in all_losses]).sum()
            aux_loss = self.config.balance_loss_weight * balance + self.config.router_z_loss_weight * z
        else:
            aux_loss = logits.new_zeros((), dtype=torch.float32)
        return MoEOutput(logits, mtp_logits, aux_loss, self._metrics(moe_losses, rom_losses, mod_fractions))

    @staticmethod
    def _metrics(moe: list[RouterLosses], rom: list[RouterLosses],
                 mod_fractions: list[float]) -> dict[str, torch.Tensor | float]:
        metrics: dict[str, torch.Tensor | float] = {}
        with torch.no_grad():  # stays on the device: the caller reads it when it logs
            for prefix, group in (("moe", moe), ("rom", rom)):
                if group:
                    metrics[f"{prefix}_balance_loss"] = torch.stack([rl.balance for rl in group]).float().mean()
                    metrics[f"{prefix}_z_loss"] = torch.stack([rl.z for rl in group]).float().mean()
        if mod_fractions:
            metrics["mod_fraction"] = sum(mod_fractions) / len(mod_fractions)
        return metrics

    def num_parameters(self, active: bool = False) -> int:
        """Parameter count; ``active`` counts what one token uses: top_k of n_experts routed experts
        (and rom_top_k of rom_n_experts RoM projections), plus everything else (embeddings, shared
        experts, attention, MTP heads). MoD skips compute, not parameters, so it does not reduce it.
        Works on the meta device.

        Example:
            >>> with torch.device("meta"): model = MoETransformer(MoEConfig(**FIVE_B_CONFIG))
            >>> model.num_parameters(), model.num_parameters(active=True)
        """
        total = sum(p.numel() for p in self.parameters())
        if not active:
            return total
        inactive = 0
        for module in self.modules():
            if isinstance(module, MoEFeedForward):
                groups, k = [module.experts], module.top_k
            elif isinstance(module, RoutingMamba):
                groups, k = [module.in_experts, module.out_experts], module.top_k
            else:
                continue
            for experts in groups:
                per_expert = sum(p.numel() for p in experts[0].parameters())
                inactive += (len(experts) - k) * per_expert
        return total - inactive
