"""Lion: EvoLved Sign Momentum (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

Per parameter, with gradient g, momentum m, learning rate lr and decoupled weight decay wd::

    c = beta1 * m + (1 - beta1) * g          # interpolation used for the update direction
    p = p * (1 - lr * wd) - lr * sign(c)     # every coordinate moves by exactly lr (plus decay)
    m = beta2 * m + (1 - beta2) * g          # momentum tracked with the slower beta2

One state tensor per parameter (half of AdamW's). Lion wants an lr 3-10x smaller and a
weight decay 3-10x larger than AdamW's.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import Tensor

from nexus.training.optimizers._checks import check_betas, check_lr, check_non_negative, closure_loss, reject_sparse

__all__ = ["Lion", "lion_update", "lion_update_foreach"]


def lion_update(param: Tensor, grad: Tensor, exp_avg: Tensor, *, lr: float, beta1: float,
                beta2: float, weight_decay: float) -> None:
    """One Lion step on one tensor, in place on ``param`` and ``exp_avg``.

    Args:
        param, grad, exp_avg: tensors of one shape and dtype (any float dtype).
        lr, beta1, beta2, weight_decay: the paper's hyperparameters.

    Example::
        p, g, m = torch.zeros(3), torch.tensor([1., -2., 0.]), torch.zeros(3)
        lion_update(p, g, m, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)  # p == [-0.1, 0.1, 0]
    """
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
    direction = exp_avg.lerp(grad, 1.0 - beta1).sign_()
    param.add_(direction, alpha=-lr)
    exp_avg.lerp_(grad, 1.0 - beta2)


def lion_update_foreach(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], *,
                        lr: float, beta1: float, beta2: float, weight_decay: float) -> None:
    """:func:`lion_update` on lists of tensors with ``torch._foreach_*`` (one launch per op).

    Args:
        params, grads, exp_avgs: equal-length lists; entry i of each shares shape, dtype, device.

    Example::
        ps, gs, ms = [torch.zeros(3)], [torch.ones(3)], [torch.zeros(3)]
        lion_update_foreach(ps, gs, ms, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    """
    if not params:
        return
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    directions = torch._foreach_lerp(exp_avgs, grads, 1.0 - beta1)
    torch._foreach_sign_(directions)
    torch._foreach_add_(params, directions, alpha=-lr)
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta2)


class Lion(torch.optim.Optimizer):
    """Lion optimizer (sign of interpolated momentum, decoupled weight decay).

    Args:
        params: iterable of tensors or param-group dicts.
        lr: step size (every coordinate moves by exactly ``lr`` before decay). Default 1e-4.
        betas: (beta1, beta2): interpolation for the update, momentum decay. Default (0.9, 0.99).
        weight_decay: decoupled, multiplied by ``lr`` as in the paper. Default 0.
        foreach: use the ``torch._foreach_*`` path; ``None`` picks it when all params are on CUDA.

    State per parameter: ``exp_avg`` (same shape and dtype as the parameter).

    Example::
        optimizer = Lion(model.parameters(), lr=1e-4, weight_decay=1.0)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.9, 0.99),
                 weight_decay: float = 0.0, *, foreach: bool | None = None) -> None:
        check_lr("Lion", lr)
        check_betas("Lion", betas)
        check_non_negative("Lion", "weight_decay", weight_decay)
        defaults = dict(lr=lr, betas=tuple(betas), weight_decay=weight_decay, foreach=foreach)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Apply one update to every parameter that has a gradient; returns ``closure()``'s loss."""
        loss = closure_loss(closure)
        for group in self.param_groups:
            params, grads, exp_avgs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                reject_sparse("Lion", p.grad)
                state = self.state[p]
                if not state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
            beta1, beta2 = group["betas"]
            hyper = dict(lr=group["lr"], beta1=beta1, beta2=beta2, weight_decay=group["weight_decay"])
            foreach = group["foreach"]
            if foreach is None:
                foreach = bool(params) and all(p.is_cuda for p in params)
            if foreach:
                lion_update_foreach(params, grads, exp_avgs, **hyper)
            else:
                for p, g, m in zip(params, grads, exp_avgs):
                    lion_update(p, g, m, **hyper)
        return loss
