"""RLHF: a reward model from preference pairs, PPO with a KL penalty to a frozen reference, and DPO.

Functional API first (pure functions of tensors, the papers' equations), then the models, sampling,
the config and the three algorithms, each a ``step(batch) -> metrics`` that the Trainer runs through
``trainer.with_rlhf(RLHFConfig(...))``.

- :func:`reward_model_loss`: Bradley-Terry, ``-log sigmoid(r_chosen - r_rejected)`` (Ouyang et al.
  2022, eq. 1), mean over pairs.
- :func:`compute_gae`: generalized advantage estimation (Schulman et al. 2016):
  ``delta_t = r_t + gamma V_{t+1} - V_t``, ``A_t = delta_t + gamma lam A_{t+1}``, returns ``A + V``.
- :func:`ppo_policy_loss`, :func:`ppo_value_loss`: PPO's clipped surrogate and clipped value loss
  (Schulman et al. 2017), means over every (unmasked) token of the batch.
- :func:`dpo_loss`: DPO (Rafailov et al. 2023) ``-log sigmoid(beta * ((pi_c - pi_r) - (ref_c - ref_r)))``
  on sequence log-probs, with the IPO (Azar et al. 2023), hinge (SLiC, Zhao et al. 2023) and
  KTO-pair (Ethayarajh et al. 2024, paired form) variants through ``loss_type``.

PPO (Ziegler et al. 2019, Ouyang et al. 2022): sample responses from the policy (a KV cache when the
model supports one), score them with the reward model, give every response token the reward
``-kl_coef * (log pi - log pi_ref)`` and the last one the score too, estimate advantages with GAE
from a separate critic, and take clipped policy and value steps for ``ppo_epochs``. DPO trains on
preference pairs offline, against a frozen copy of the starting policy.

Memory: no step keeps a tensor of a previous step (graphs, caches and metrics are released or
detached), so memory stays flat over steps (TRL's DPO grew until it ran out after ~300, trl #1087).

Example::

    config = RLHFConfig(method="ppo", reward_model_path="rm.pt", kl_coef=0.1, gamma=0.99, lam=0.95)
    trainer = Trainer(model, optimizer, train_loader=prompt_loader, max_steps=200).with_rlhf(config)
    trainer.train()
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from nexus.training.trainer import NonFiniteLossError, TrainerCallback

__all__ = [
    "DPO", "DPO_LOSS_TYPES", "PPO", "RLHF_METHODS", "RLHFConfig", "RLHFTraining", "RewardModel", "RewardModeling",
    "Rollout",
    "compute_gae", "dpo_loss", "generate", "masked_mean", "policy_logits", "ppo_policy_loss", "ppo_value_loss",
    "reward_model_loss", "sequence_logprobs", "supports_kv_cache", "token_logprobs", "whiten",
]

RLHF_METHODS = ("ppo", "dpo", "reward")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "kto_pair")
_REWARD_MODEL_FORMAT = "nexus-reward-model-v1"


# ---- losses and estimators (pure functions) ------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is nonzero (all of them without a mask); 0-dim.

    Shapes: x [...]; mask broadcastable to x (bool or 0/1 float).
    """
    if mask is None:
        return x.mean()
    mask = mask.to(x.dtype).expand_as(x)
    return (x * mask).sum() / mask.sum().clamp(min=1.0)


def whiten(x: torch.Tensor, mask: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / std`` over the unmasked positions (variance unbiased as in TRL); masked positions -> 0."""
    mean = masked_mean(x, mask)
    centered = x - mean
    if mask is None:
        var = centered.pow(2).sum() / max(x.numel() - 1, 1)
        return centered * torch.rsqrt(var + eps)
    m = mask.to(x.dtype).expand_as(x)
    n = m.sum()
    var = (centered.pow(2) * m).sum() / (n - 1).clamp(min=1.0)
    return centered * torch.rsqrt(var + eps) * m


def reward_model_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                      margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """Bradley-Terry preference loss ``mean(-log sigmoid(r_c - r_r - margin))``.

    Shapes: chosen_rewards, rejected_rewards [B] (any float dtype; computed in fp32 at least);
    margin: None, a float or [B] (Llama 2's preference-strength margin) -> 0-dim.

    Example:
        >>> reward_model_loss(torch.tensor([2.0]), torch.tensor([0.0]))  # -log sigmoid(2)
        tensor(0.1269)
    """
    _check_same_shape(("chosen_rewards", chosen_rewards), ("rejected_rewards", rejected_rewards))
    diff = _wide(chosen_rewards) - _wide(rejected_rewards)
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             reference_chosen_logps: torch.Tensor, reference_rejected_logps: torch.Tensor,
             beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0) -> torch.Tensor:
    """Direct preference optimisation loss on sequence log-probabilities, mean over pairs.

    With ``h = (pi_c - pi_r) - (ref_c - ref_r)`` (log-ratios of chosen over rejected):
    - ``sigmoid`` (DPO): ``-(1 - ls) log sigmoid(beta h) - ls log sigmoid(-beta h)`` (ls: label
      smoothing, conservative DPO; 0 gives the paper's loss);
    - ``ipo``: ``(h - 1 / (2 beta))^2``;
    - ``hinge``: ``relu(1 - beta h)``;
    - ``kto_pair``: with ``z_c = pi_c - ref_c``, ``z_r = pi_r - ref_r`` and the batch KL estimates
      ``kl_c = max(0, mean z_c)``, ``kl_r = max(0, mean z_r)`` (no gradient through them), the mean
      of ``1 - sigmoid(beta (z_c - kl_r))`` and ``1 - sigmoid(beta (kl_c - z_r))``.

    Shapes: four [B] tensors (the sum of token log-probs of each response, as TRL takes them) -> 0-dim.

    Example:
        >>> dpo_loss(torch.tensor([-1.0]), torch.tensor([-3.0]), torch.tensor([-2.0]), torch.tensor([-2.0]), beta=0.5)
        tensor(0.3133)
    """
    names = ("policy_chosen_logps", "policy_rejected_logps", "reference_chosen_logps", "reference_rejected_logps")
    tensors = (policy_chosen_logps, policy_rejected_logps, reference_chosen_logps, reference_rejected_logps)
    _check_same_shape(*zip(names, tensors))
    if not (isinstance(beta, (int, float)) and beta > 0 and math.isfinite(beta)):
        raise ValueError(f"beta must be a finite float > 0, got {beta!r}")
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {loss_type!r}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"label_smoothing must be in [0, 0.5), got {label_smoothing!r}")
    pc, pr, rc, rr = (_wide(t) for t in tensors)
    chosen_ratio, rejected_ratio = pc - rc, pr - rr
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)).pow(2)
    elif loss_type == "hinge":
        losses = F.relu(1 - beta * h)
    else:  # kto_pair: the KL reference points are batch estimates, not trained through
        kl_c = chosen_ratio.detach().mean().clamp(min=0)
        kl_r = rejected_ratio.detach().mean().clamp(min=0)
        losses = torch.cat([1 - torch.sigmoid(beta * (chosen_ratio - kl_r)),
                            1 - torch.sigmoid(beta * (kl_c - rejected_ratio))])
    return losses.mean()


def compute_gae(rewards: torch.Tensor, values: torch.Tensor, gamma: float, lam: float,
                last_value: torch.Tensor | float = 0.0, mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation over the last (time) dimension; returns (advantages, returns).

    ``delta_t = r_t + gamma V_{t+1} - V_t`` with ``V_T = last_value`` (0: the episode ended),
    ``A_t = delta_t + gamma lam A_{t+1}``, ``returns_t = A_t + V_t``. With ``mask`` (1 on real steps,
    a prefix of each row: right padding), the step after a row's last real one counts as terminal
    (value 0) and padded steps get advantage and return 0.

    Shapes: rewards, values [..., T] (fp32 or wider); last_value a float or [...]; mask [..., T]
    -> advantages, returns [..., T], no gradient (computed under ``no_grad``).

    Example:
        >>> adv, ret = compute_gae(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]), gamma=1.0, lam=1.0)
        >>> adv  # returns-to-go [1, 1] minus values
        tensor([0.5000, 0.5000])
    """
    _check_same_shape(("rewards", rewards), ("values", values))
    for name, v in (("gamma", gamma), ("lam", lam)):
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {v!r}")
    with torch.no_grad():
        dtype = torch.promote_types(rewards.dtype, torch.float32)
        rewards, values = rewards.to(dtype), values.to(dtype)
        if mask is None:
            mask = torch.ones_like(rewards)
        else:
            _check_same_shape(("rewards", rewards), ("mask", mask))
            mask = mask.to(dtype)
        values, rewards = values * mask, rewards * mask
        next_value = torch.as_tensor(last_value, dtype=dtype, device=rewards.device).expand(rewards.shape[:-1])
        gae = torch.zeros_like(next_value)
        advantages = torch.empty_like(rewards)
        for t in reversed(range(rewards.shape[-1])):
            delta = rewards[..., t] + gamma * next_value - values[..., t]
            gae = (delta + gamma * lam * gae) * mask[..., t]
            advantages[..., t] = gae
            next_value = values[..., t]
        return advantages, advantages + values


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    clip_eps: float = 0.2, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PPO's clipped surrogate, mean over (unmasked) tokens:
    ``max(-A * ratio, -A * clip(ratio, 1 - eps, 1 + eps))`` with ``ratio = exp(logprobs - old_logprobs)``.

    Shapes: logprobs (with gradient), old_logprobs, advantages, mask: the same shape, e.g. [B, T] -> 0-dim.

    Example:
        >>> ppo_policy_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([2.0]))  # ratio 1: -A
        tensor(-2.)
    """
    _check_same_shape(("logprobs", logprobs), ("old_logprobs", old_logprobs), ("advantages", advantages))
    _check_eps("clip_eps", clip_eps)
    ratio = torch.exp(_wide(logprobs) - _wide(old_logprobs).detach())
    adv = _wide(advantages).detach()
    losses = torch.maximum(-adv * ratio, -adv * ratio.clamp(1 - clip_eps, 1 + clip_eps))
    return masked_mean(losses, mask)


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
                   clip_eps: float = 0.2, mask: torch.Tensor | None = None) -> torch.Tensor:
    """PPO's clipped value loss, mean over (unmasked) tokens:
    ``0.5 * max((V - R)^2, (clip(V, V_old - eps, V_old + eps) - R)^2)``.

    Shapes: values (with gradient), old_values, returns, mask: the same shape, e.g. [B, T] -> 0-dim.

    Example:
        >>> ppo_value_loss(torch.tensor([1.0]), torch.tensor([1.0]), torch.tensor([3.0]))  # 0.5 * 2^2
        tensor(2.)
    """
    _check_same_shape(("values", values), ("old_values", old_values), ("returns", returns))
    _check_eps("clip_eps", clip_eps)
    v, old, ret = _wide(values), _wide(old_values).detach(), _wide(returns).detach()
    clipped = old + (v - old).clamp(-clip_eps, clip_eps)
    return 0.5 * masked_mean(torch.maximum((v - ret).pow(2), (clipped - ret).pow(2)), mask)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[token]`` per position, in fp32 at least, without materialising the log-softmax.

    Shapes: logits [B, T, V]; tokens [B, T] int64 -> [B, T] fp32 (fp64 for fp64 logits).
    """
    b, t, v = logits.shape
    return -F.cross_entropy(_wide(logits.reshape(b * t, v)), tokens.reshape(b * t), reduction="none").view(b, t)


def sequence_logprobs(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probs of the tokens ``mask`` selects, each predicted from the logits one position before.

    Shapes: logits [B, T, V] (the model's output on input_ids); input_ids [B, T]; mask [B, T] (1 on the
    response tokens to score; mask[:, 0] is ignored: nothing predicts the first token) -> [B] fp32 (or fp64).
    """
    lp = token_logprobs(logits[:, :-1], input_ids[:, 1:])
    return (lp * mask[:, 1:].to(lp.dtype)).sum(-1)


# ---- models ---------------------------------------------------------------------------------------


def policy_logits(output: Any) -> torch.Tensor:
    """The logits [B, T, V] of a policy's output: the tensor itself or its ``.logits``."""
    if isinstance(output, torch.Tensor):
        return output
    logits = getattr(output, "logits", None)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"a policy must return logits or an object with .logits, got {type(output).__name__}")
    return logits


def _aux_loss(output: Any) -> torch.Tensor | None:
    aux = getattr(output, "aux_loss", None)
    return aux if isinstance(aux, torch.Tensor) else None


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def supports_kv_cache(model: nn.Module) -> bool:
    """Whether ``model`` decodes incrementally with :class:`nexus.models.moe.KVCache`: an MoE transformer
    without RoM or MoD layers and with dropless experts."""
    from nexus.models.moe import MoETransformer

    model = _unwrap(model)
    if not isinstance(model, MoETransformer):
        return False
    c = model.config
    return not (c.use_mamba or c.use_mod or (c.use_moe and c.moe_capacity_factor is not None))


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with ``requires_grad=False``: the reference policy."""
    ref = copy.deepcopy(_unwrap(model)).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


class RewardModel(nn.Module):
    """A transformer backbone and a scalar head: a reward (one score per sequence) or a critic (one per token).

    ``backbone``: a :class:`nexus.models.moe.MoETransformer` (its trunk's final hidden states,
    d_model wide, feed the head; its LM heads go unused), or any module mapping input_ids [B, T]
    to features [B, T, H] (a tensor, or an output with ``.last_hidden_state`` or ``.logits``);
    ``hidden_size`` H is then read from one probe forward unless given.

    Shapes: forward(input_ids [B, T] int64, attention_mask [B, T] or None) -> [B] fp32, the score at
    each row's last position where the mask is nonzero (right padding; the last position without a
    mask); token_scores(input_ids) -> [B, T] fp32.

    Example:
        >>> rm = RewardModel(MoETransformer(MoEConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4,
        ...                  n_kv_heads=2, d_ff=32, use_mod=False, use_mamba=False, n_pred_tokens=1)))
        >>> rm(torch.randint(0, 64, (2, 6))).shape
        torch.Size([2])
    """

    def __init__(self, backbone: nn.Module, hidden_size: int | None = None) -> None:
        super().__init__()
        from nexus.models.moe import MoETransformer

        self.backbone = backbone
        self._moe = isinstance(backbone, MoETransformer)
        if hidden_size is None:
            if self._moe:
                hidden_size = backbone.config.d_model
            else:
                param = next(backbone.parameters(), None)
                device = param.device if param is not None else None
                with torch.no_grad():
                    hidden_size = self._features(torch.zeros(1, 1, dtype=torch.long, device=device)).shape[-1]
        if not isinstance(hidden_size, int) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.hidden_size = hidden_size
        self.head = nn.Linear(hidden_size, 1)
        nn.init.normal_(self.head.weight, std=1.0 / math.sqrt(hidden_size + 1))
        nn.init.zeros_(self.head.bias)

    def _features(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self._moe:
            from nexus.models.moe.model import run_layers

            m = self.backbone
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)
            h = m.dropout(m.embed_tokens(input_ids))
            return m.norm(run_layers(m.layers, h, positions)[0])
        out = self.backbone(input_ids)
        if isinstance(out, torch.Tensor):
            return out
        for name in ("last_hidden_state", "logits"):
            if isinstance(getattr(out, name, None), torch.Tensor):
                return getattr(out, name)
        raise TypeError(f"a RewardModel backbone must return features, got {type(out).__name__}")

    def token_scores(self, input_ids: torch.Tensor) -> torch.Tensor:
        """A scalar per position, [B, T] fp32 (a critic's values)."""
        return self.head(self._features(input_ids)).squeeze(-1).float()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.token_scores(input_ids)
        if attention_mask is None:
            return scores[:, -1]
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} != input_ids shape "
                             f"{tuple(input_ids.shape)}")
        present = attention_mask != 0
        if not bool(present.any(dim=1).all()):
            raise ValueError("attention_mask has a row with no token to score")
        # the last nonzero position of each row: argmax of the reversed mask counts back from the end
        last = input_ids.shape[1] - 1 - present.flip(1).int().argmax(dim=1)
        return scores.gather(1, last[:, None]).squeeze(1)

    def save(self, path: str | Path) -> None:
        """Write the weights, and the backbone's MoE config when it has one (so :meth:`load` can rebuild it)."""
        from nexus.training import checkpoint as ckpt

        config = ckpt.plain_data(self.backbone.config) if self._moe else None
        torch.save({"format": _REWARD_MODEL_FORMAT, "backbone_config": config, "hidden_size": self.hidden_size,
                    "state_dict": self.state_dict()}, str(path))

    @classmethod
    def load(cls, path: str | Path, backbone: nn.Module | None = None, map_location: Any = "cpu") -> RewardModel:
        """Read what :meth:`save` wrote; a non-MoE backbone must be given (its weights are then loaded)."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"reward model file {path} does not exist")
        state = torch.load(str(path), map_location=map_location, weights_only=True)
        if not isinstance(state, dict) or state.get("format") != _REWARD_MODEL_FORMAT:
            raise ValueError(f"{path} is not a reward model written by RewardModel.save")
        if backbone is None:
            if state["backbone_config"] is None:
                raise ValueError(f"{path} holds a reward model on a custom backbone: pass backbone= to load it")
            from nexus.models.moe import MoEConfig, MoETransformer

            backbone = MoETransformer(MoEConfig(**state["backbone_config"]))
        model = cls(backbone, hidden_size=state["hidden_size"])
        model.load_state_dict(state["state_dict"])
        return model


# ---- sampling -------------------------------------------------------------------------------------


@torch.no_grad()
def generate(policy: nn.Module, prompts: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, eos_token_id: int | None = None, pad_token_id: int = 0,
             generator: torch.Generator | None = None, use_cache: bool | None = None,
             output_logits: bool = False):
    """Sample ``max_new_tokens`` after each prompt, one token at a time (eval mode, no gradient).

    ``use_cache``: None uses a KV cache when :func:`supports_kv_cache` (one forward of one token per
    step), True requires one, False recomputes the whole prefix every step (any causal ``nn.Module``
    returning logits). ``temperature`` 0 is greedy. After a row's ``eos_token_id`` (kept, in the mask)
    its tokens are ``pad_token_id`` and out of the mask; sampling stops early when every row is done.

    Shapes: prompts [B, P] int64 (same length; no padding) -> (sequences [B, P + N] int64,
    response_mask [B, N] fp32), N = max_new_tokens, plus the step logits [B, N, V] fp32 (before
    temperature) when ``output_logits``.

    Example:
        >>> seq, mask = generate(model, torch.randint(0, 64, (4, 3)), 8, generator=torch.Generator().manual_seed(0))
    """
    if prompts.dim() != 2 or prompts.dtype != torch.long or prompts.shape[1] == 0:
        raise ValueError(f"prompts must be int64 [B, P] with P >= 1, got {prompts.dtype} {tuple(prompts.shape)}")
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise ValueError(f"temperature must be >= 0, got {temperature!r}")
    cached = supports_kv_cache(policy) if use_cache is None else use_cache
    if cached and not supports_kv_cache(policy):
        raise ValueError("use_cache=True needs an MoETransformer without RoM or MoD layers and with dropless experts")
    from nexus.models.moe import KVCache

    was_training = policy.training
    policy.eval()
    b = prompts.shape[0]
    tokens = [prompts]
    done = torch.zeros(b, dtype=torch.bool, device=prompts.device)
    masks, step_logits = [], []
    cache = KVCache() if cached else None
    try:
        new = prompts
        for _ in range(max_new_tokens):
            if cached:
                logits = policy_logits(policy(new, cache=cache))[:, -1].float()
            else:
                logits = policy_logits(policy(torch.cat(tokens, dim=1)))[:, -1].float()
            if output_logits:
                step_logits.append(logits)
            nxt = _sample(logits, temperature, top_k, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            masks.append((~done).float())
            if eos_token_id is not None:
                done = done | (nxt == eos_token_id)
            new = nxt[:, None]
            tokens.append(new)
            if eos_token_id is not None and bool(done.all()):
                break
    finally:
        policy.train(was_training)
    missing = max_new_tokens - len(masks)  # stopped early: pad the rest
    seq = torch.cat(tokens + [prompts.new_full((b, missing), pad_token_id)], dim=1)
    mask = torch.stack(masks + [done.new_zeros(b).float()] * missing, dim=1)
    if output_logits:
        return seq, mask, torch.stack(step_logits, dim=1)
    return seq, mask


def _sample(logits: torch.Tensor, temperature: float, top_k: int | None,
            generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = logits.softmax(-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(1).to(probs.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


# ---- config ---------------------------------------------------------------------------------------


@dataclasses.dataclass(kw_only=True)
class RLHFConfig:
    """Settings of :meth:`nexus.training.trainer.Trainer.with_rlhf`; a bad value raises ``ValueError``
    naming the field.

    method: "ppo" (online, needs a reward: ``reward_model_path`` or a ``reward=`` given to with_rlhf),
    "dpo" (offline preference pairs) or "reward" (train the Trainer's :class:`RewardModel` on pairs).

    Example:
        >>> RLHFConfig(reward_model_path="rm.pt", kl_coef=0.1, gamma=0.99, lam=0.95)
    """

    method: str = "ppo"
    reward_model_path: str | None = None
    # PPO
    kl_coef: float = 0.1  # per-token penalty -kl_coef * (log pi - log pi_ref)
    gamma: float = 0.99
    lam: float = 0.95
    clip_eps: float = 0.2  # policy ratio clip
    value_clip_eps: float = 0.2  # critic value clip around the rollout's values
    vf_coef: float = 0.1  # weight of the value loss (the critic has its own parameters and optimizer)
    value_lr: float | None = None  # critic learning rate; None: the policy optimizer's
    ppo_epochs: int = 4  # passes over each rollout
    num_mini_batches: int = 1  # optimizer steps per pass
    whiten_advantages: bool = True
    max_new_tokens: int = 32
    temperature: float = 1.0
    eos_token_id: int | None = None
    pad_token_id: int = 0
    use_cache: bool | None = None  # None: a KV cache when the policy supports one
    seed: int = 0  # sampling and mini-batch order
    # DPO
    beta: float = 0.1
    dpo_loss_type: str = "sigmoid"
    label_smoothing: float = 0.0

    def __post_init__(self) -> None:
        if self.method not in RLHF_METHODS:
            raise ValueError(f"method must be one of {', '.join(RLHF_METHODS)}, got {self.method!r}")
        if self.reward_model_path is not None and not isinstance(self.reward_model_path, (str, Path)):
            raise ValueError(f"reward_model_path must be a path or None, got {self.reward_model_path!r}")
        for name in ("kl_coef", "vf_coef"):
            v = getattr(self, name)
            if not (_is_number(v) and 0 <= v < math.inf):
                raise ValueError(f"{name} must be a finite float >= 0, got {v!r}")
        for name in ("gamma", "lam"):
            v = getattr(self, name)
            if not (_is_number(v) and 0 <= v <= 1):
                raise ValueError(f"{name} must be in [0, 1], got {v!r}")
        for name in ("clip_eps", "value_clip_eps", "beta"):
            v = getattr(self, name)
            if not (_is_number(v) and 0 < v < math.inf):
                raise ValueError(f"{name} must be a finite float > 0, got {v!r}")
        if self.value_lr is not None and not (_is_number(self.value_lr) and 0 < self.value_lr < math.inf):
            raise ValueError(f"value_lr must be a finite float > 0 or None, got {self.value_lr!r}")
        if not (_is_number(self.temperature) and 0 < self.temperature < math.inf):
            raise ValueError(f"temperature must be a finite float > 0, got {self.temperature!r}")
        for name in ("ppo_epochs", "num_mini_batches", "max_new_tokens"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("eos_token_id", "pad_token_id", "seed"):
            v = getattr(self, name)
            if not (v is None and name == "eos_token_id") and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                raise ValueError(f"{name} must be an int >= 0, got {v!r}")
        if self.dpo_loss_type not in DPO_LOSS_TYPES:
            raise ValueError(f"dpo_loss_type must be one of {', '.join(DPO_LOSS_TYPES)}, got {self.dpo_loss_type!r}")
        if not (_is_number(self.label_smoothing) and 0 <= self.label_smoothing < 0.5):
            raise ValueError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing!r}")


# ---- algorithms -----------------------------------------------------------------------------------


class Rollout(NamedTuple):
    """One PPO batch of experience. sequences [B, P + N] int64; prompt_len P; mask, logprobs,
    ref_logprobs, values, advantages, returns [B, N] fp32 (response tokens); scores [B] fp32."""

    sequences: torch.Tensor
    prompt_len: int
    mask: torch.Tensor
    logprobs: torch.Tensor
    ref_logprobs: torch.Tensor
    values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    scores: torch.Tensor


RewardFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class _Algorithm:
    """What the three methods share: the policy's optimizer step with clipping, autocast, metrics."""

    def __init__(self, policy: nn.Module, config: RLHFConfig, optimizer: torch.optim.Optimizer | None,
                 max_grad_norm: float | None, autocast: Callable[[], Any] | None, lr: float = 1e-5) -> None:
        if not isinstance(config, RLHFConfig):
            raise TypeError(f"config must be an RLHFConfig, got {type(config).__name__}")
        self.policy = policy
        self.config = config
        self.optimizer = optimizer or torch.optim.AdamW(policy.parameters(), lr=lr)
        self.max_grad_norm = max_grad_norm
        self.autocast = autocast or contextlib.nullcontext

    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        raise NotImplementedError

    def step(self, *batches: Any) -> dict[str, torch.Tensor]:
        """One optimizer step on the mean of ``self.loss`` over the micro-batches given (gradient
        accumulation: one backward each, so memory is that of one), in train mode; returns the
        detached mean metrics and ``grad_norm``."""
        if not batches:
            raise ValueError("step needs at least one batch")
        was_training = self.policy.training
        self.policy.train()
        try:
            self.optimizer.zero_grad(set_to_none=True)
            metrics: dict[str, torch.Tensor] = {}
            for batch in batches:
                loss, parts = self.loss(batch)
                (loss / len(batches)).backward()
                for k, v in parts.items():
                    metrics[k] = metrics.get(k, 0.0) + v / len(batches)
            metrics["grad_norm"] = self._clip(self.policy.parameters()).detach()
            self.optimizer.step()
        finally:  # no gradient outlives the step
            self.optimizer.zero_grad(set_to_none=True)
            self.policy.train(was_training)
        return metrics

    def _clip(self, params) -> torch.Tensor:
        params = [p for p in params if p.grad is not None]
        if not params:
            return torch.zeros(())
        return torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm if self.max_grad_norm else float("inf"))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class PPO(_Algorithm):
    """PPO with a frozen reference, a per-token KL penalty, GAE and a separate critic.

    ``reward``: a callable ``(sequences [B, T] int64, attention_mask [B, T]) -> scores [B]`` (a
    :class:`RewardModel` is one), or None to load ``config.reward_model_path``. ``reference``: a
    frozen copy of the policy when None. ``critic``: a :class:`RewardModel` whose per-token scores
    are the values; None builds one on a copy of the policy (a copy of an MoE model's trunk, or a
    generic policy's logits as features). The policy, reference and critic run in eval mode (no
    dropout), so the first update's ratio is exactly 1. Memory: the policy, the reference and the
    critic are three models (plus the reward model), all on the policy's device.

    ``step(prompts [B, P] int64)``: one rollout, then ``ppo_epochs`` passes of ``num_mini_batches``
    optimizer steps; returns detached metrics (scores, KL, losses, clip fraction, ...).

    Example:
        >>> ppo = PPO(policy, RLHFConfig(max_new_tokens=16), reward=lambda seq, mask: (seq == 7).sum(-1).float())
        >>> metrics = ppo.step(torch.randint(0, 64, (32, 4)))
    """

    def __init__(self, policy: nn.Module, config: RLHFConfig, *, reward: RewardFn | None = None,
                 reference: nn.Module | None = None, critic: RewardModel | None = None,
                 optimizer: torch.optim.Optimizer | None = None,
                 critic_optimizer: torch.optim.Optimizer | None = None, max_grad_norm: float | None = 1.0,
                 autocast: Callable[[], Any] | None = None, lr: float = 1e-5) -> None:
        super().__init__(policy, config, optimizer, max_grad_norm, autocast, lr)
        if reward is None:
            if config.reward_model_path is None:
                raise ValueError("PPO needs a reward: set RLHFConfig.reward_model_path or pass reward=")
            device = next(policy.parameters()).device
            reward = RewardModel.load(config.reward_model_path).to(device).eval()
            for p in reward.parameters():
                p.requires_grad_(False)
        self.reward = reward
        self.reference = reference if reference is not None else frozen_copy(policy)
        if critic is None:
            critic = RewardModel(copy.deepcopy(_unwrap(policy)))
            critic.to(next(policy.parameters()).device)
        self.critic = critic
        value_lr = config.value_lr or self.optimizer.param_groups[0]["lr"]
        self.critic_optimizer = critic_optimizer or torch.optim.AdamW(critic.parameters(), lr=value_lr)
        self.generator = torch.Generator().manual_seed(config.seed)  # on CPU: same draws on any device

    def _response(self, model: nn.Module, sequences: torch.Tensor, p: int) -> tuple[torch.Tensor, Any]:
        """Log-probs [B, N] of the response tokens (at the sampling temperature) and the raw output."""
        out = model(sequences)
        logits = policy_logits(out)[:, p - 1:-1]
        if self.config.temperature != 1.0:
            logits = logits / self.config.temperature
        return token_logprobs(logits, sequences[:, p:]), out

    @torch.no_grad()
    def rollout(self, prompts: torch.Tensor) -> Rollout:
        """Sample responses and score them; advantages by GAE on the KL-penalised token rewards."""
        c = self.config
        seq, mask = generate(self.policy, prompts, c.max_new_tokens, temperature=c.temperature,
                             eos_token_id=c.eos_token_id, pad_token_id=c.pad_token_id,
                             generator=self.generator, use_cache=c.use_cache)
        p = prompts.shape[1]
        modes = [(m, m.training) for m in (self.policy, self.critic)]
        try:
            for m, _ in modes:
                m.eval()
            with self.autocast():
                logprobs, _ = self._response(self.policy, seq, p)
                ref_logprobs, _ = self._response(self.reference, seq, p)
                values = self.critic.token_scores(seq)[:, p - 1:-1].float()
                attention = torch.cat([torch.ones_like(prompts, dtype=mask.dtype), mask], dim=1)
                scores = torch.as_tensor(self.reward(seq, attention), device=seq.device).float().reshape(-1)
        finally:
            for m, mode in modes:
                m.train(mode)
        if scores.shape[0] != seq.shape[0]:
            raise ValueError(f"the reward returned {scores.shape[0]} scores for {seq.shape[0]} sequences")
        rewards = -c.kl_coef * (logprobs - ref_logprobs) * mask
        last = (mask.sum(1).long() - 1).clamp(min=0)  # the score goes on each response's last token
        rewards = rewards.scatter_add(1, last[:, None], scores[:, None])
        advantages, returns = compute_gae(rewards, values, c.gamma, c.lam, mask=mask)
        if c.whiten_advantages:
            advantages = whiten(advantages, mask)
        return Rollout(seq, p, mask, logprobs, ref_logprobs, values, advantages, returns, scores)

    def update(self, r: Rollout) -> dict[str, torch.Tensor]:
        """``ppo_epochs`` passes of clipped policy and value steps over the rollout; mean metrics."""
        c = self.config
        b = r.sequences.shape[0]
        if c.num_mini_batches > b:
            raise ValueError(f"num_mini_batches ({c.num_mini_batches}) > batch size ({b})")
        modes = [(m, m.training) for m in (self.policy, self.critic)]
        sums: dict[str, torch.Tensor] = {}
        n = 0
        try:
            for m, _ in modes:
                m.eval()
            for _ in range(c.ppo_epochs):
                order = torch.randperm(b, generator=self.generator).to(r.sequences.device)
                for idx in order.chunk(c.num_mini_batches):
                    mask = r.mask[idx]
                    with self.autocast():
                        logprobs, out = self._response(self.policy, r.sequences[idx], r.prompt_len)
                        values = self.critic.token_scores(r.sequences[idx])[:, r.prompt_len - 1:-1].float()
                    pg_loss = ppo_policy_loss(logprobs, r.logprobs[idx], r.advantages[idx], c.clip_eps, mask)
                    vf_loss = ppo_value_loss(values, r.values[idx], r.returns[idx], c.value_clip_eps, mask)
                    loss = pg_loss + c.vf_coef * vf_loss
                    aux = _aux_loss(out)
                    if aux is not None:
                        loss = loss + aux
                    self.optimizer.zero_grad(set_to_none=True)
                    self.critic_optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    grad_norm = self._clip(self.policy.parameters())
                    self._clip(self.critic.parameters())
                    self.optimizer.step()
                    self.critic_optimizer.step()
                    with torch.no_grad():
                        ratio = torch.exp(logprobs - r.logprobs[idx])
                        clipped = ((ratio - 1).abs() > c.clip_eps).float()
                        step = {"loss": loss, "policy_loss": pg_loss, "value_loss": vf_loss, "grad_norm": grad_norm,
                                "clip_fraction": masked_mean(clipped, mask),
                                "approx_kl": masked_mean(0.5 * (logprobs - r.logprobs[idx]).pow(2), mask)}
                    for k, v in step.items():
                        sums[k] = sums.get(k, 0.0) + v.detach().float()
                    n += 1
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.critic_optimizer.zero_grad(set_to_none=True)
            for m, mode in modes:
                m.train(mode)
        return {k: v / n for k, v in sums.items()}

    def step(self, prompts: torch.Tensor) -> dict[str, torch.Tensor]:
        """One rollout and its updates. Metrics: ``score`` (mean reward-model score), ``kl`` (mean over
        sequences of the summed per-token log pi - log pi_ref at sampling), ``response_length``,
        ``loss``, ``policy_loss``, ``value_loss``, ``grad_norm``, ``clip_fraction``, ``approx_kl``."""
        r = self.rollout(prompts)
        metrics = self.update(r)
        metrics.update(score=r.scores.mean(), kl=((r.logprobs - r.ref_logprobs) * r.mask).sum(1).mean(),
                       response_length=r.mask.sum(1).mean())
        return metrics

    def state_dict(self) -> dict:
        return {"critic": self.critic.state_dict(), "critic_optimizer": self.critic_optimizer.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.critic.load_state_dict(state["critic"])
        self.critic_optimizer.load_state_dict(state["critic_optimizer"])
        self.generator.set_state(state["generator"])


def _pair_batch(batch: Mapping[str, torch.Tensor], device: torch.device | None = None):
    """chosen and rejected stacked into one [2B, T] batch (right-padded to one length) and their masks."""
    keys = ("chosen_ids", "chosen_mask", "rejected_ids", "rejected_mask")
    if not isinstance(batch, Mapping) or any(k not in batch for k in keys):
        raise ValueError(f"a preference batch is a mapping with {', '.join(keys)} "
                         f"(each [B, T]; masks 1 on the response tokens to score), got "
                         f"{sorted(batch) if isinstance(batch, Mapping) else type(batch).__name__}")
    ids_c, mask_c, ids_r, mask_r = (torch.as_tensor(batch[k]) for k in keys)
    for name, ids, mask in (("chosen", ids_c, mask_c), ("rejected", ids_r, mask_r)):
        if ids.dim() != 2 or ids.shape != mask.shape:
            raise ValueError(f"{name}_ids and {name}_mask must be [B, T] of one shape, got "
                             f"{tuple(ids.shape)} and {tuple(mask.shape)}")
    if ids_c.shape[0] != ids_r.shape[0]:
        raise ValueError(f"chosen and rejected batch sizes differ: {ids_c.shape[0]} != {ids_r.shape[0]}")
    t = max(ids_c.shape[1], ids_r.shape[1])
    pad = lambda x: F.pad(x, (0, t - x.shape[1]))  # noqa: E731  masked out, so the pad id does not matter
    ids = torch.cat([pad(ids_c), pad(ids_r)]).long()
    mask = torch.cat([pad(mask_c), pad(mask_r)]).float()
    if device is not None:
        ids, mask = ids.to(device, non_blocking=True), mask.to(device, non_blocking=True)
    return ids, mask


class DPO(_Algorithm):
    """Direct preference optimisation of ``policy`` against a frozen ``reference`` (a copy of the
    policy when None).

    ``step(batch)``: a mapping with ``chosen_ids``, ``chosen_mask``, ``rejected_ids``,
    ``rejected_mask`` ([B, T] each; masks 1 on the response tokens, the prompt and padding 0);
    optional ``reference_chosen_logps`` / ``reference_rejected_logps`` [B] skip the reference
    forward. Chosen and rejected go through one forward. Returns detached metrics: ``loss``,
    ``reward_chosen`` / ``reward_rejected`` (beta * policy-reference log-ratio), ``margin``,
    ``accuracy`` (fraction of pairs with a positive margin), ``grad_norm``.

    Example:
        >>> dpo = DPO(policy, RLHFConfig(method="dpo", beta=0.1))
        >>> metrics = dpo.step({"chosen_ids": c, "chosen_mask": cm, "rejected_ids": r, "rejected_mask": rm})
    """

    def __init__(self, policy: nn.Module, config: RLHFConfig, *, reference: nn.Module | None = None,
                 optimizer: torch.optim.Optimizer | None = None, max_grad_norm: float | None = 1.0,
                 autocast: Callable[[], Any] | None = None, lr: float = 1e-5) -> None:
        super().__init__(policy, config, optimizer, max_grad_norm, autocast, lr)
        self.reference = reference if reference is not None else frozen_copy(policy)

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The DPO loss (with the policy's aux loss, if any) and detached metrics."""
        device = next(self.policy.parameters()).device
        ids, mask = _pair_batch(batch, device)
        b = ids.shape[0] // 2
        with self.autocast():
            out = self.policy(ids)
            logps = sequence_logprobs(policy_logits(out), ids, mask)
            if "reference_chosen_logps" in batch and "reference_rejected_logps" in batch:
                ref = torch.cat([torch.as_tensor(batch["reference_chosen_logps"]),
                                 torch.as_tensor(batch["reference_rejected_logps"])]).to(device).float()
            else:
                with torch.no_grad():
                    ref = sequence_logprobs(policy_logits(self.reference(ids)), ids, mask)
        c = self.config
        loss = dpo_loss(logps[:b], logps[b:], ref[:b], ref[b:], beta=c.beta, loss_type=c.dpo_loss_type,
                        label_smoothing=c.label_smoothing)
        aux = _aux_loss(out)
        total = loss + aux if aux is not None else loss
        with torch.no_grad():
            rewards = c.beta * (logps - ref)
            margin = rewards[:b] - rewards[b:]
            metrics = {"loss": total.detach(), "dpo_loss": loss.detach(), "reward_chosen": rewards[:b].mean(),
                       "reward_rejected": rewards[b:].mean(), "margin": margin.mean(),
                       "accuracy": (margin > 0).float().mean()}
        return total, metrics


class RewardModeling(_Algorithm):
    """Train a :class:`RewardModel` on preference pairs with :func:`reward_model_loss`.

    ``step(batch)``: the batch of :class:`DPO` (the masks mark the tokens of each sequence; the score
    is read at its last marked one) -> detached ``loss``, ``accuracy`` (chosen scored above
    rejected), ``margin``, ``grad_norm``.

    Example:
        >>> rm = RewardModel(backbone); trainer = RewardModeling(rm, RLHFConfig(method="reward"), lr=1e-4)
        >>> metrics = trainer.step(pairs)
    """

    def __init__(self, model: RewardModel, config: RLHFConfig, *, optimizer: torch.optim.Optimizer | None = None,
                 max_grad_norm: float | None = 1.0, autocast: Callable[[], Any] | None = None,
                 lr: float = 1e-5) -> None:
        if not isinstance(_unwrap(model), RewardModel):
            raise TypeError(f"method 'reward' trains a RewardModel, got {type(_unwrap(model)).__name__}")
        super().__init__(model, config, optimizer, max_grad_norm, autocast, lr)

    def loss(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        device = next(self.policy.parameters()).device
        ids, mask = _pair_batch(batch, device)
        b = ids.shape[0] // 2
        with self.autocast():
            scores = self.policy(ids, mask).float()
        loss = reward_model_loss(scores[:b], scores[b:])
        with torch.no_grad():
            margin = scores[:b] - scores[b:]
            metrics = {"loss": loss.detach(), "accuracy": (margin > 0).float().mean(), "margin": margin.mean()}
        return loss, metrics


# ---- on the Trainer ---------------------------------------------------------------------------------


class RLHFTraining(TrainerCallback):
    """What ``trainer.with_rlhf(config)`` installs: the method's step in place of the next-token step,
    on the Trainer's loop, optimizer, schedule, clipping, autocast, logging and checkpoints.

    Batches from ``train_loader``: prompts [B, P] int64 for PPO (one rollout and its updates per
    Trainer step), preference mappings for DPO and "reward" (see :class:`DPO`). ``val_loader``, when
    given, holds the same kind of batch: DPO / "reward" report ``val_loss`` and ``val_accuracy``
    on it, PPO the greedy responses' ``val_score`` and ``val_kl`` (``val_loss`` = -val_score, so
    the best checkpoint is the best-scored one). It is a callback, so its state goes into the
    Trainer's checkpoints: the reference weights (a resume must not take the resumed policy as its
    reference), and PPO's critic, critic optimizer and sampling generator.

    One process only for now (no data, tensor or pipeline parallelism), and no fp16 loss scaling.
    """

    def __init__(self, trainer: Any, config: RLHFConfig, *, reward: RewardFn | None = None,
                 reference: nn.Module | None = None, critic: RewardModel | None = None) -> None:
        if not isinstance(config, RLHFConfig):
            raise TypeError(f"with_rlhf takes an RLHFConfig, got {type(config).__name__}")
        if trainer.parallel.world_size > 1 or trainer.pipeline is not None or trainer.sharded:
            raise NotImplementedError("with_rlhf runs on one process for now (no data, tensor or pipeline parallelism)")
        if trainer.scaler:
            raise ValueError(f"with_rlhf does not support fp16 loss scaling: precision {trainer.args.precision!r}; "
                             "use fp32 or bf16")
        if config.method == "ppo" and trainer.args.gradient_accumulation_steps != 1:
            raise ValueError(f"with_rlhf PPO takes gradient_accumulation_steps 1, got "
                             f"{trainer.args.gradient_accumulation_steps}: num_mini_batches splits each rollout")
        self.config = config
        kwargs = dict(optimizer=trainer.optimizer, max_grad_norm=trainer.args.max_grad_norm,
                      autocast=trainer._autocast)
        model = trainer.model
        if config.method == "ppo":
            self.algorithm: _Algorithm = PPO(model, config, reward=reward, reference=reference, critic=critic, **kwargs)
        elif config.method == "dpo":
            self.algorithm = DPO(model, config, reference=reference, **kwargs)
        else:
            self.algorithm = RewardModeling(model, config, **kwargs)

    def train_step(self, trainer: Any) -> dict:
        """One Trainer step: the method's step, the schedule, the step and token counts; the metrics the
        loop expects (``loss``, ``lm_loss`` (here the method's loss), ``grad_norm``, ``lr``, ``tokens``)."""
        if isinstance(self.algorithm, PPO):
            prompts = trainer._next_batch()
            if isinstance(prompts, (list, tuple)) and len(prompts) == 1:  # a TensorDataset of prompts yields (prompts,)
                prompts = prompts[0]
            if not isinstance(prompts, torch.Tensor):
                raise TypeError(f"PPO's batches are prompts [B, P] int64, got {type(prompts).__name__}")
            prompts = prompts.to(trainer.device, non_blocking=True)
            tokens = prompts.shape[0] * (prompts.shape[1] + self.config.max_new_tokens)
            metrics = self.algorithm.step(prompts)
        else:  # the micro-batches of one optimizer step
            batches = [trainer._next_batch() for _ in range(trainer.args.gradient_accumulation_steps)]
            tokens = sum(int(torch.as_tensor(b[k]).numel()) for b in batches for k in ("chosen_ids", "rejected_ids")
                         if isinstance(b, Mapping) and k in b)
            metrics = self.algorithm.step(*batches)
        loss = float(metrics["loss"])  # the step's one host read, for the NaN stop
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"{self.config.method} loss is {loss} at step {trainer.step + 1}")
        if trainer.lr_scheduler is not None:
            trainer.lr_scheduler.step()
        trainer.step += 1
        trainer.tokens_seen += tokens
        return {**metrics, "loss": loss, "lm_loss": loss, "grad_norm": metrics["grad_norm"],
                "lr": trainer.optimizer.param_groups[0]["lr"], "tokens": tokens}

    @torch.no_grad()
    def evaluate(self, trainer: Any) -> dict:
        """Validation metrics over up to ``eval_batches`` batches of ``val_loader`` (see the class docstring)."""
        limit = getattr(trainer.args, "eval_batches", None)
        sums: dict[str, float] = {}
        count = 0
        algo = self.algorithm
        was_training = algo.policy.training
        algo.policy.eval()
        devices = [trainer.device] if trainer.device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=devices):  # evaluating must not move the training RNG streams
                for i, batch in enumerate(trainer.val_loader):
                    if limit is not None and i >= limit:
                        break
                    if isinstance(batch, (list, tuple)) and len(batch) == 1:
                        batch = batch[0]
                    if isinstance(algo, PPO):
                        m = self._evaluate_ppo(batch.to(trainer.device))
                    else:
                        _, m = algo.loss(batch)
                        m = {"val_loss": m["loss"], "val_accuracy": m["accuracy"]}
                    for k, v in m.items():
                        sums[k] = sums.get(k, 0.0) + float(v)
                    count += 1
        finally:
            algo.policy.train(was_training)
        if count == 0:
            raise ValueError("the validation loader yielded no batches")
        return {k: v / count for k, v in sums.items()}

    def _evaluate_ppo(self, prompts: torch.Tensor) -> dict:
        algo, c = self.algorithm, self.config
        seq, mask = generate(algo.policy, prompts, c.max_new_tokens, temperature=0.0, eos_token_id=c.eos_token_id,
                             pad_token_id=c.pad_token_id, use_cache=c.use_cache)
        p = prompts.shape[1]
        with algo.autocast():
            logprobs, _ = algo._response(algo.policy, seq, p)
            ref_logprobs, _ = algo._response(algo.reference, seq, p)
            attention = torch.cat([torch.ones_like(prompts, dtype=mask.dtype), mask], dim=1)
            score = torch.as_tensor(algo.reward(seq, attention)).float().mean()
        kl = ((logprobs - ref_logprobs) * mask).sum(1).mean()
        return {"val_loss": -score, "val_score": score, "val_kl": kl}

    def state_dict(self) -> dict:
        reference = getattr(self.algorithm, "reference", None)
        return {"method": self.config.method, "algorithm": self.algorithm.state_dict(),
                "reference": reference.state_dict() if reference is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if state["method"] != self.config.method:
            raise ValueError(f"the checkpoint holds an RLHF {state['method']!r} run, this run is {self.config.method!r}")
        self.algorithm.load_state_dict(state["algorithm"])
        if state["reference"] is not None:
            self.algorithm.reference.load_state_dict(state["reference"])


# ---- input checks ---------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _wide(t: torch.Tensor) -> torch.Tensor:
    """fp32 at least: log-ratios of long sequences lose digits in half precision."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_same_shape(*named: tuple[str, torch.Tensor]) -> None:
    first_name, first = named[0]
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point() and name != "mask":
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
        if t.shape != first.shape:
            raise ValueError(f"{name} shape {tuple(t.shape)} != {first_name} shape {tuple(first.shape)}")


def _check_eps(name: str, value: float) -> None:
    if not (_is_number(value) and 0 < value < math.inf):
        raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
