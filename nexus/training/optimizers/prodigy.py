"""Prodigy: an expeditiously adaptive parameter-free learner (Mishchenko & Defazio 2023, arXiv:2306.06101).

Adam whose step size is lr * d_k, with d_k an estimate of the distance D = ||x0 - x*|| that
only grows (Algorithm 4 of the paper, beta3 = sqrt(beta2) by default). Step k (from 0), by
default (``variant="prodigyopt"``, the equations of the reference code ``prodigyopt``, which
users switch from)::

    lam     = lr (times sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1)) with use_bias_correction)
    r       = beta3 * r + (1 - beta3) * lam * d_k^2 * <g, x0 - x>   (summed over all tensors)
    s       = beta3 * s + (1 - beta3) * lam * d_k^2 * g             (one per tensor)
    d_hat   = d_coef * r / ||s||_1          (||.||_1 summed over all tensors)
    d_max   = max(d_max, d_hat)
    d_{k+1} = max(d_k, min(d_max, d_k * growth_rate))    (growth_rate = inf while d_k == d0)
    m       = beta1 * m + (1 - beta1) * d_k * g
    v       = beta2 * v + (1 - beta2) * d_k^2 * g^2
    x       = x - lam * d_k * m / (sqrt(v) + d_{k+1} * eps)

and a step whose ||s||_1 is 0 (no gradient yet) changes nothing: no move, no decay, k unchanged.
``variant="paper"`` is Algorithm 4 as printed: ``d_k * eps`` in the denominator, growth_rate
bounding every step (the first move off d0 too), and a step taken even when ||s||_1 is 0. The two
drift apart while d grows by orders of magnitude (d_{k+1} * eps against d_k * eps), the more so
the smaller the gradients: with the defaults, over 40 float64 steps on a noisy quadratic, the
parameters differ by 5e-6 (relative) with gradients ~1 and by 3e-3 with gradients ~1e-3.

``d`` is one number shared by the whole model (as in the paper); every param group holds a copy
in ``group["d"]``. Each group's own ``lr`` scales its share of r and s, which reduces to
prodigyopt when all groups use the same lr (prodigyopt refuses any other mix but 0). A group with
lr 0 is frozen and estimates nothing (prodigyopt still applies its weight decay). Other
differences from prodigyopt that do not change the result: prodigyopt scales r and s by
d_k / d0 instead of (1 - beta3), which cancels in d_hat, and it adds coupled weight decay to
``p.grad`` in place where this class leaves ``p.grad`` untouched. Against prodigyopt 1.1.2 the
default agrees to float64 round-off over 40 steps (relative 1e-15; 1e-11 when growth_rate holds
on to the first d_hat, computed from x0 - x after one tiny step).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
import torch.distributed as dist
from torch import Tensor

from nexus.training.optimizers._checks import (
    check_betas, check_lr, check_non_negative, closure_loss, reject_low_precision_params, reject_sparse,
)

__all__ = ["Prodigy", "prodigy_accumulate", "prodigy_accumulate_foreach", "prodigy_update",
           "prodigy_update_foreach", "prodigy_next_d"]

VARIANTS = ("prodigyopt", "paper")


def _accumulation_dtype(t: Tensor) -> torch.dtype:
    # Sums over millions of bf16 products lose the D estimate; accumulate in fp32 at least.
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def prodigy_accumulate(param: Tensor, grad: Tensor, p0: Tensor, s: Tensor, exp_avg: Tensor,
                       exp_avg_sq: Tensor, *, lam: float, d: float, beta1: float, beta2: float,
                       beta3: float, safeguard_warmup: bool = False) -> tuple[Tensor, Tensor]:
    """Moments and D-estimate terms for one tensor; updates ``s``, ``exp_avg``, ``exp_avg_sq``.

    Args:
        param, grad, p0, s, exp_avg, exp_avg_sq: one shape, float dtype (p0: initial param).
        lam: this step's lr (bias correction included); d: current D estimate.
        safeguard_warmup: ``s`` accumulates ``d^2 * g`` without ``lam`` (the paper's remedy for
            warm-up schedules that start lam near 0).

    Returns:
        (r_increment, s_l1): 0-dim tensors, ``(1 - beta3) * lam * d^2 * <g, x0 - x>`` and
        ``||s||_1`` after the update, for :func:`prodigy_next_d`.

    Example::
        r_inc, s_l1 = prodigy_accumulate(p, g, p0, s, m, v, lam=1.0, d=1e-6, beta1=0.9,
                                         beta2=0.999, beta3=0.999 ** 0.5)
    """
    scale = (1.0 - beta3) * d * d
    acc = _accumulation_dtype(param)
    r_increment = (grad * (p0 - param)).sum(dtype=acc) * (scale * lam)
    s.mul_(beta3).add_(grad, alpha=scale if safeguard_warmup else scale * lam)
    exp_avg.mul_(beta1).add_(grad, alpha=d * (1.0 - beta1))
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=d * d * (1.0 - beta2))
    return r_increment, s.abs().sum(dtype=acc)


def prodigy_accumulate_foreach(params: list[Tensor], grads: list[Tensor], p0s: list[Tensor],
                               ss: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
                               lam: float, d: float, beta1: float, beta2: float, beta3: float,
                               safeguard_warmup: bool = False) -> tuple[Tensor, Tensor]:
    """:func:`prodigy_accumulate` on lists with ``torch._foreach_*``; returns the summed terms.

    Args:
        params, grads, p0s, ss, exp_avgs, exp_avg_sqs: equal-length lists of same-shape entries.

    Example::
        r_inc, s_l1 = prodigy_accumulate_foreach(ps, gs, p0s, ss, ms, vs, lam=1.0, d=1e-6,
                                                 beta1=0.9, beta2=0.999, beta3=0.999 ** 0.5)
    """
    scale = (1.0 - beta3) * d * d
    acc = _accumulation_dtype(params[0])
    diffs = torch._foreach_sub(p0s, params)
    torch._foreach_mul_(diffs, grads)
    r_increment = torch.stack([t.sum(dtype=acc) for t in diffs]).sum() * (scale * lam)
    torch._foreach_mul_(ss, beta3)
    torch._foreach_add_(ss, grads, alpha=scale if safeguard_warmup else scale * lam)
    torch._foreach_mul_(exp_avgs, beta1)
    torch._foreach_add_(exp_avgs, grads, alpha=d * (1.0 - beta1))
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=d * d * (1.0 - beta2))
    s_l1 = torch.stack(torch._foreach_norm(ss, 1, dtype=acc)).sum()
    return r_increment, s_l1


def prodigy_next_d(d: float, d_max: float, numerator: float, denominator: float, *, d_coef: float,
                   growth_rate: float) -> tuple[float, float, float]:
    """Next D estimate from ``r`` (numerator) and ``||s||_1`` (denominator).

    Returns:
        (d, d_max, d_hat): ``d_hat = d_coef * r / ||s||_1``, ``d_max = max(d_max, d_hat)``,
        ``d = min(d_max, d * growth_rate)`` (never below the current ``d``).

    Example::
        prodigy_next_d(1e-6, 1e-6, 3e-6, 1.0, d_coef=1.0, growth_rate=math.inf)  # (3e-6, 3e-6, 3e-6)
    """
    if denominator == 0.0:
        return d, d_max, d
    d_hat = d_coef * numerator / denominator
    d_max = max(d_max, d_hat)
    return max(d, min(d_max, d * growth_rate)), d_max, d_hat


def prodigy_update(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, *, lam: float, d: float,
                   eps: float, weight_decay: float, eps_d: float | None = None) -> None:
    """Adam-style step with step size ``lam * d`` and decoupled decay, in place on ``param``.

    ``param -= lam * d * exp_avg / (sqrt(exp_avg_sq) + eps_d * eps)``, after
    ``param *= 1 - weight_decay * lam * d``. All tensors one shape and float dtype.

    Args:
        d: this step's D estimate d_k (scales the step and the decay).
        eps_d: the d that scales ``eps``: d_{k+1} in prodigyopt, d_k (``None``, the default) in
            the paper.

    Example::
        prodigy_update(p, m, v, lam=1.0, d=1e-6, eps=1e-8, weight_decay=0.0, eps_d=2e-6)
    """
    if weight_decay != 0.0:
        param.mul_(1.0 - weight_decay * lam * d)
    denom = exp_avg_sq.sqrt().add_((d if eps_d is None else eps_d) * eps)
    param.addcdiv_(exp_avg, denom, value=-lam * d)


def prodigy_update_foreach(params: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor], *,
                           lam: float, d: float, eps: float, weight_decay: float,
                           eps_d: float | None = None) -> None:
    """:func:`prodigy_update` on lists with ``torch._foreach_*``.

    Example::
        prodigy_update_foreach([p], [m], [v], lam=1.0, d=1e-6, eps=1e-8, weight_decay=0.0, eps_d=2e-6)
    """
    if not params:
        return
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - weight_decay * lam * d)
    denoms = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_add_(denoms, (d if eps_d is None else eps_d) * eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, value=-lam * d)


class Prodigy(torch.optim.Optimizer):
    """Prodigy optimizer: Adam with a learned, non-decreasing step-size scale ``d``.

    Args:
        params: iterable of tensors or param-group dicts.
        lr: multiplier on the learned step size; leave at 1.0 (use it for schedules). Default 1.
        betas: Adam's (beta1, beta2). Default (0.9, 0.999).
        beta3: decay of the D-estimate sums; ``None`` means sqrt(beta2). Default None.
        d0: initial D estimate. Default 1e-6.
        d_coef: multiplier on d_hat (larger: bigger steps). Default 1.
        weight_decay: AdamW-style decoupled (``decouple=True``) or added to the gradient. Default 0.
        growth_rate: bound on d's growth per step (d <= d * growth_rate). Default inf.
        eps: Adam's epsilon, scaled by d. Default 1e-8.
        decouple: decoupled weight decay (AdamW) if True, L2 added to the gradient if False.
        use_bias_correction: Adam bias correction folded into lam. Default False (the paper).
        safeguard_warmup: drop lam from ``s`` (for warm-up schedules). Default False.
        sharded_params: each rank holds a shard of the parameters (FSDP, ZeRO): sum r and
            ||s||_1 over ranks (only when ``torch.distributed`` is initialised). Default False.
        foreach: use the ``torch._foreach_*`` path; ``None`` picks it when all params are on CUDA.
        variant: ``"prodigyopt"`` (default): the reference code's equations, eps scaled by the
            updated d; ``"paper"``: Algorithm 4 as printed (see the module docstring).

    Group entries: ``d``, ``d_max``, ``d_hat``, ``d_numerator`` (r), ``k`` (steps taken).
    State per parameter: ``p0``, ``s``, ``exp_avg``, ``exp_avg_sq`` (parameter's shape, dtype).

    Example::
        optimizer = Prodigy(model.parameters(), lr=1.0, weight_decay=0.01)
        loss.backward(); optimizer.step(); print(optimizer.param_groups[0]["d"])
    """

    def __init__(self, params: Iterable, lr: float = 1.0, betas: tuple[float, float] = (0.9, 0.999),
                 beta3: float | None = None, d0: float = 1e-6, d_coef: float = 1.0,
                 weight_decay: float = 0.0, growth_rate: float = math.inf, *, eps: float = 1e-8,
                 decouple: bool = True, use_bias_correction: bool = False,
                 safeguard_warmup: bool = False, sharded_params: bool = False,
                 foreach: bool | None = None, variant: str = "prodigyopt") -> None:
        check_lr("Prodigy", lr)
        check_betas("Prodigy", betas)
        if beta3 is not None and not 0.0 <= beta3 < 1.0:
            raise ValueError(f"Prodigy: invalid beta3={beta3!r}, expected None or 0 <= beta3 < 1")
        if not d0 > 0.0:
            raise ValueError(f"Prodigy: invalid d0={d0!r}, expected d0 > 0")
        if not d_coef > 0.0:
            raise ValueError(f"Prodigy: invalid d_coef={d_coef!r}, expected d_coef > 0")
        check_non_negative("Prodigy", "weight_decay", weight_decay)
        if not growth_rate >= 1.0:
            raise ValueError(f"Prodigy: invalid growth_rate={growth_rate!r}, expected >= 1")
        if not eps >= 0.0:
            raise ValueError(f"Prodigy: invalid eps={eps!r}, expected eps >= 0")
        if variant not in VARIANTS:
            raise ValueError(f"Prodigy: invalid variant={variant!r}, expected one of {VARIANTS}")
        defaults = dict(lr=lr, betas=tuple(betas), beta3=beta3, d0=d0, d_coef=d_coef,
                        weight_decay=weight_decay, growth_rate=growth_rate, eps=eps,
                        decouple=decouple, use_bias_correction=use_bias_correction,
                        safeguard_warmup=safeguard_warmup, foreach=foreach,
                        d=d0, d_max=d0, d_hat=0.0, d_numerator=0.0, k=0)
        super().__init__(params, defaults)
        reject_low_precision_params("Prodigy", self.param_groups)
        self.sharded_params = sharded_params
        self.variant = variant

    def _lam(self, group: dict) -> float:
        beta1, beta2 = group["betas"]
        if not group["use_bias_correction"]:
            return group["lr"]
        k = group["k"] + 1
        return group["lr"] * math.sqrt(1.0 - beta2 ** k) / (1.0 - beta1 ** k)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One Prodigy step: accumulate the D-estimate, grow ``d`` to d_{k+1}, move every parameter by d_k."""
        loss = closure_loss(closure)
        # d, d_max and r are global: every group holds the same copy (the first one is read).
        first = self.param_groups[0]
        d, d_max = first["d"], first["d_max"]
        numerator = torch.zeros((), dtype=torch.float64)
        denominator = torch.zeros((), dtype=torch.float64)
        work = []
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            beta3 = group["beta3"] if group["beta3"] is not None else math.sqrt(beta2)
            lam = self._lam(group)
            params, grads, p0s, ss, exp_avgs, exp_avg_sqs = [], [], [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                reject_sparse("Prodigy", p.grad)
                state = self.state[p]
                if not state:
                    state["p0"] = p.detach().clone(memory_format=torch.preserve_format)
                    for key in ("s", "exp_avg", "exp_avg_sq"):
                        state[key] = torch.zeros_like(p, memory_format=torch.preserve_format)
                grad = p.grad
                if group["weight_decay"] != 0.0 and not group["decouple"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                params.append(p)
                grads.append(grad)
                p0s.append(state["p0"])
                ss.append(state["s"])
                exp_avgs.append(state["exp_avg"])
                exp_avg_sqs.append(state["exp_avg_sq"])
            if group["lr"] == 0.0 or not params:
                continue
            foreach = group["foreach"]
            if foreach is None:
                foreach = all(p.is_cuda for p in params)
            hyper = dict(lam=lam, d=d, beta1=beta1, beta2=beta2, beta3=beta3,
                         safeguard_warmup=group["safeguard_warmup"])
            if foreach:
                r_inc, s_l1 = prodigy_accumulate_foreach(params, grads, p0s, ss, exp_avgs,
                                                         exp_avg_sqs, **hyper)
                numerator += r_inc.to(device="cpu", dtype=torch.float64)
                denominator += s_l1.to(device="cpu", dtype=torch.float64)
            else:
                for p, g, p0, s, m, v in zip(params, grads, p0s, ss, exp_avgs, exp_avg_sqs):
                    r_inc, s_l1 = prodigy_accumulate(p, g, p0, s, m, v, **hyper)
                    numerator += r_inc.to(device="cpu", dtype=torch.float64)
                    denominator += s_l1.to(device="cpu", dtype=torch.float64)
            work.append((group, lam, foreach, params, exp_avgs, exp_avg_sqs))
        sharded = self.sharded_params and dist.is_initialized()
        if sharded:
            totals = torch.stack([numerator, denominator])
            if dist.get_backend() == "nccl":
                totals = totals.cuda()
            dist.all_reduce(totals)
            numerator, denominator = totals.cpu().unbind()
        # A rank without local gradients still takes the shared d when sharded, so d stays one number.
        if not work and not sharded:
            return loss
        prodigyopt = self.variant == "prodigyopt"
        if prodigyopt and denominator.item() == 0.0:
            return loss  # prodigyopt: no gradient signal yet, so nothing moves and k stays
        beta3_first = first["beta3"] if first["beta3"] is not None else math.sqrt(first["betas"][1])
        r = first["d_numerator"] * beta3_first + numerator.item()
        # prodigyopt lets the first move off d0 go straight to d_hat; growth_rate bounds the rest.
        growth_rate = math.inf if prodigyopt and d == first["d0"] else first["growth_rate"]
        new_d, new_d_max, d_hat = prodigy_next_d(d, d_max, r, denominator.item(),
                                                 d_coef=first["d_coef"], growth_rate=growth_rate)
        # Parameters move with the d they accumulated with (d_k); eps is scaled by d_{k+1} in prodigyopt.
        for group, lam, foreach, params, exp_avgs, exp_avg_sqs in work:
            hyper = dict(lam=lam, d=d, eps=group["eps"], eps_d=new_d if prodigyopt else d,
                         weight_decay=group["weight_decay"] if group["decouple"] else 0.0)
            if foreach:
                prodigy_update_foreach(params, exp_avgs, exp_avg_sqs, **hyper)
            else:
                for p, m, v in zip(params, exp_avgs, exp_avg_sqs):
                    prodigy_update(p, m, v, **hyper)
        for group in self.param_groups:
            group.update(d=new_d, d_max=new_d_max, d_hat=d_hat, d_numerator=r, k=group["k"] + 1)
        return loss
