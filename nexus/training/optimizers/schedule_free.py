"""Schedule-Free AdamW (Defazio et al. 2024, "The Road Less Scheduled", arXiv:2405.15682).

Three sequences: z (the base AdamW-like iterate), x (a weighted average of z, used for
evaluation) and y (where gradients are taken)::

    y_t     = (1 - beta1) * z_t + beta1 * x_t
    v       = beta2 * v + (1 - beta2) * g^2,         g = grad f(y_t)
    u       = g / (sqrt(v / (1 - beta2^t)) + eps) + weight_decay * y_t
    z_{t+1} = z_t - gamma_t * u
    x_{t+1} = (1 - c_{t+1}) * x_t + c_{t+1} * z_{t+1},  c_{t+1} = w_t / sum_{i<=t} w_i
    w_t     = t^r * (max_{i<=t} gamma_i)^weight_lr_power,  gamma_t = lr * min(1, t / warmup_steps)

The model's parameters hold y while training and x while evaluating: ``optimizer.train()`` and
``optimizer.eval()`` move them between the two (only x is worth saving for inference). The
state keeps z; x is never stored, since x = (y - (1 - beta1) z) / beta1. As in the reference
(facebookresearch/schedule_free), y is updated in place from y and z alone.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from nexus.training.optimizers._checks import (
    check_beta_count, check_int, check_lr, check_non_negative, closure_loss, reject_low_precision_params,
    reject_sparse,
)

__all__ = ["ScheduleFreeAdamW", "schedule_free_adamw_update", "schedule_free_adamw_update_foreach"]


def schedule_free_adamw_update(y: Tensor, grad: Tensor, z: Tensor, exp_avg_sq: Tensor, *, lr: float,
                               beta1: float, beta2: float, eps: float, weight_decay: float,
                               ckp1: float, bias_correction2: float) -> None:
    """One Schedule-Free AdamW step on one tensor, in place on ``y`` (the parameter), ``z``, ``v``.

    Args:
        y, grad, z, exp_avg_sq: one shape and float dtype; ``grad`` is taken at ``y``.
        lr: gamma_t (warm-up applied); ckp1: c_{t+1}; bias_correction2: 1 - beta2^t.

    Example::
        y, g, z, v = torch.zeros(2), torch.ones(2), torch.zeros(2), torch.zeros(2)
        schedule_free_adamw_update(y, g, z, v, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                                   weight_decay=0.0, ckp1=1.0, bias_correction2=0.001)
    """
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
    denom = exp_avg_sq.div(bias_correction2).sqrt_().add_(eps)
    u = grad.div(denom)
    if weight_decay != 0.0:
        u.add_(y, alpha=weight_decay)
    # y_{t+1} = (1-b1) z_{t+1} + b1 x_{t+1}, written with y_t, z_t and u only.
    y.lerp_(z, ckp1)
    y.add_(u, alpha=lr * (beta1 * (1.0 - ckp1) - 1.0))
    z.sub_(u, alpha=lr)


def schedule_free_adamw_update_foreach(ys: list[Tensor], grads: list[Tensor], zs: list[Tensor],
                                       exp_avg_sqs: list[Tensor], *, lr: float, beta1: float,
                                       beta2: float, eps: float, weight_decay: float, ckp1: float,
                                       bias_correction2: float) -> None:
    """:func:`schedule_free_adamw_update` on lists with ``torch._foreach_*``.

    Example::
        schedule_free_adamw_update_foreach([y], [g], [z], [v], lr=0.1, beta1=0.9, beta2=0.999,
                                           eps=1e-8, weight_decay=0.0, ckp1=1.0, bias_correction2=0.001)
    """
    if not ys:
        return
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)
    denoms = torch._foreach_div(exp_avg_sqs, bias_correction2)
    torch._foreach_sqrt_(denoms)
    torch._foreach_add_(denoms, eps)
    us = torch._foreach_div(grads, denoms)
    if weight_decay != 0.0:
        torch._foreach_add_(us, ys, alpha=weight_decay)
    torch._foreach_lerp_(ys, zs, ckp1)
    torch._foreach_add_(ys, us, alpha=lr * (beta1 * (1.0 - ckp1) - 1.0))
    torch._foreach_add_(zs, us, alpha=-lr)


class ScheduleFreeAdamW(torch.optim.Optimizer):
    """Schedule-Free AdamW: no learning-rate schedule, evaluate at the averaged iterate x.

    Call ``optimizer.train()`` before training steps and ``optimizer.eval()`` before evaluating
    or saving weights for inference (alongside ``model.train()`` / ``model.eval()``). The
    optimizer starts in train mode; ``step()`` in eval mode raises ``RuntimeError``.

    Args:
        params: iterable of tensors or param-group dicts.
        lr: gamma, the peak step size. Default 0.0025.
        betas: (beta1: interpolation between z and x, beta2: second-moment decay). Default (0.9, 0.999).
        warmup_steps: linear warm-up of gamma over this many steps. Default 0.
        weight_decay: decoupled, applied at y. Default 0.
        eps: Adam's epsilon. Default 1e-8.
        r: averaging weight power on the step count. Default 0.
        weight_lr_power: averaging weight power on the max lr so far. Default 2.
        foreach: use the ``torch._foreach_*`` path; ``None`` picks it when all params are on CUDA.

    Group entries: ``k`` (steps), ``train_mode``, ``weight_sum``, ``lr_max``, ``scheduled_lr``.
    State per parameter: ``z``, ``exp_avg_sq`` (parameter's shape and dtype).

    Example::
        optimizer = ScheduleFreeAdamW(model.parameters(), lr=0.0025, warmup_steps=100)
        optimizer.train(); loss.backward(); optimizer.step(); optimizer.eval()
    """

    def __init__(self, params: Iterable, lr: float = 0.0025, betas: tuple[float, float] = (0.9, 0.999),
                 warmup_steps: int = 0, weight_decay: float = 0.0, *, eps: float = 1e-8, r: float = 0.0,
                 weight_lr_power: float = 2.0, foreach: bool | None = None) -> None:
        check_lr("ScheduleFreeAdamW", lr)
        check_beta_count("ScheduleFreeAdamW", betas)
        if not 0.0 < betas[0] < 1.0:
            # beta1 = 0 would make x unrecoverable from y and z (x = (y - (1-b1) z) / b1).
            raise ValueError(f"ScheduleFreeAdamW: invalid betas[0]={betas[0]!r}, expected 0 < beta1 < 1")
        if not 0.0 <= betas[1] < 1.0:
            raise ValueError(f"ScheduleFreeAdamW: invalid betas[1]={betas[1]!r}, expected 0 <= beta2 < 1")
        check_int("ScheduleFreeAdamW", "warmup_steps", warmup_steps, 0)
        check_non_negative("ScheduleFreeAdamW", "weight_decay", weight_decay)
        if not eps >= 0.0:
            raise ValueError(f"ScheduleFreeAdamW: invalid eps={eps!r}, expected eps >= 0")
        if not r >= 0.0:
            raise ValueError(f"ScheduleFreeAdamW: invalid r={r!r}, expected r >= 0")
        check_non_negative("ScheduleFreeAdamW", "weight_lr_power", weight_lr_power)
        defaults = dict(lr=lr, betas=tuple(betas), warmup_steps=warmup_steps, weight_decay=weight_decay,
                        eps=eps, r=r, weight_lr_power=weight_lr_power, foreach=foreach, k=0,
                        train_mode=True, weight_sum=0.0, lr_max=-1.0, scheduled_lr=0.0)
        super().__init__(params, defaults)
        reject_low_precision_params("ScheduleFreeAdamW", self.param_groups)

    @torch.no_grad()
    def eval(self) -> None:
        """Set the parameters to x (the averaged iterate) for evaluation; no-op if already there."""
        for group in self.param_groups:
            if not group["train_mode"]:
                continue
            beta1 = group["betas"][0]
            for p in group["params"]:
                state = self.state[p]
                if "z" in state:
                    p.lerp_(state["z"], 1.0 - 1.0 / beta1)
            group["train_mode"] = False

    @torch.no_grad()
    def train(self) -> None:
        """Set the parameters back to y (where gradients are taken); no-op if already there."""
        for group in self.param_groups:
            if group["train_mode"]:
                continue
            beta1 = group["betas"][0]
            for p in group["params"]:
                state = self.state[p]
                if "z" in state:
                    p.lerp_(state["z"], 1.0 - beta1)
            group["train_mode"] = True

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One step from the gradients at y; raises ``RuntimeError`` in eval mode."""
        if not all(group["train_mode"] for group in self.param_groups):
            raise RuntimeError("ScheduleFreeAdamW.step() called in eval mode: the parameters hold "
                               "x, not y; call optimizer.train() before training steps")
        loss = closure_loss(closure)
        for group in self.param_groups:
            ys, grads, zs, exp_avg_sqs = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                reject_sparse("ScheduleFreeAdamW", p.grad)
                state = self.state[p]
                if not state:
                    state["z"] = p.detach().clone(memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                ys.append(p)
                grads.append(p.grad)
                zs.append(state["z"])
                exp_avg_sqs.append(state["exp_avg_sq"])
            beta1, beta2 = group["betas"]
            k = group["k"]
            warmup = group["warmup_steps"]
            lr = group["lr"] * ((k + 1) / warmup if k < warmup else 1.0)
            group["scheduled_lr"] = lr
            group["lr_max"] = lr_max = max(lr, group["lr_max"])
            weight = (k + 1) ** group["r"] * lr_max ** group["weight_lr_power"]
            group["weight_sum"] = weight_sum = group["weight_sum"] + weight
            ckp1 = weight / weight_sum if weight_sum != 0.0 else 0.0
            foreach = group["foreach"]
            if foreach is None:
                foreach = bool(ys) and all(p.is_cuda for p in ys)
            hyper = dict(lr=lr, beta1=beta1, beta2=beta2, eps=group["eps"],
                         weight_decay=group["weight_decay"], ckp1=ckp1,
                         bias_correction2=1.0 - beta2 ** (k + 1))
            if foreach:
                schedule_free_adamw_update_foreach(ys, grads, zs, exp_avg_sqs, **hyper)
            else:
                for y, g, z, v in zip(ys, grads, zs, exp_avg_sqs):
                    schedule_free_adamw_update(y, g, z, v, **hyper)
            group["k"] = k + 1
        return loss
