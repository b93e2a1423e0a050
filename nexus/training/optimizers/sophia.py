"""Sophia: Second-order Clipped Stochastic Optimization (Liu et al. 2023, arXiv:2305.14342).

Per parameter, with gradient g, momentum m, diagonal Hessian EMA h, learning rate lr::

    m = beta1 * m + (1 - beta1) * g
    every update_period steps:  h = beta2 * h + (1 - beta2) * h_hat     (h_hat: estimator below)
    p = p * (1 - lr * weight_decay)
    p = p - lr * clip(m / max(rho * h, eps), -1, 1)

Estimators of the Hessian diagonal ``h_hat`` (``Sophia.update_hessian``):
- ``"gnb"`` (Gauss-Newton-Bartlett, Sophia-G): sample labels y ~ softmax(logits), take the
  gradient g_s of the mean cross-entropy on the sampled labels, h_hat = B * g_s * g_s with B
  the number of sampled rows (tokens).
- ``"hutchinson"`` (Sophia-H): u ~ Rademacher, h_hat = u * (H u), with H u a Hessian-vector
  product of the loss returned by a closure.

The official code writes ``rho * bs * h`` with ``h`` the EMA of g_s**2; here ``h`` already holds
the batch-size factor, as in the paper, so the two agree.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor

from nexus.training.optimizers._checks import (
    check_betas, check_int, check_lr, check_non_negative, closure_loss, reject_low_precision_params,
    reject_sparse,
)

__all__ = ["Sophia", "sophia_update", "sophia_update_foreach", "gnb_hessian_estimate",
           "hutchinson_hessian_estimate"]


def sophia_update(param: Tensor, grad: Tensor, exp_avg: Tensor, hessian: Tensor, *, lr: float,
                  beta1: float, rho: float, weight_decay: float, eps: float) -> None:
    """One Sophia step on one tensor, in place on ``param`` and ``exp_avg``.

    Args:
        param, grad, exp_avg, hessian: tensors of one shape and float dtype; ``hessian`` is the
            diagonal Hessian EMA (already updated for this step if it was due).
        lr, beta1, rho, weight_decay, eps: the paper's hyperparameters.

    Example::
        p, g, m, h = torch.zeros(2), torch.tensor([1., -1.]), torch.zeros(2), torch.tensor([100., 0.])
        sophia_update(p, g, m, h, lr=1., beta1=0.9, rho=0.04, weight_decay=0., eps=1e-12)  # [-0.025, 1]
    """
    exp_avg.lerp_(grad, 1.0 - beta1)
    if weight_decay != 0.0:
        param.mul_(1.0 - lr * weight_decay)
    ratio = exp_avg / (hessian * rho).clamp_(min=eps)
    param.add_(ratio.clamp_(-1.0, 1.0), alpha=-lr)


def sophia_update_foreach(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor],
                          hessians: list[Tensor], *, lr: float, beta1: float, rho: float,
                          weight_decay: float, eps: float) -> None:
    """:func:`sophia_update` on lists of tensors with ``torch._foreach_*``.

    Args:
        params, grads, exp_avgs, hessians: equal-length lists; entry i of each shares a shape.

    Example::
        ps, gs, ms, hs = [torch.zeros(2)], [torch.ones(2)], [torch.zeros(2)], [torch.ones(2)]
        sophia_update_foreach(ps, gs, ms, hs, lr=1e-3, beta1=0.9, rho=0.04, weight_decay=0., eps=1e-12)
    """
    if not params:
        return
    torch._foreach_lerp_(exp_avgs, grads, 1.0 - beta1)
    if weight_decay != 0.0:
        torch._foreach_mul_(params, 1.0 - lr * weight_decay)
    denoms = torch._foreach_mul(hessians, rho)
    torch._foreach_clamp_min_(denoms, eps)
    ratios = torch._foreach_div(exp_avgs, denoms)
    torch._foreach_clamp_min_(ratios, -1.0)
    torch._foreach_clamp_max_(ratios, 1.0)
    torch._foreach_add_(params, ratios, alpha=-lr)


def gnb_hessian_estimate(logits: Tensor, params: list[Tensor], *, retain_graph: bool = True,
                         generator: torch.Generator | None = None) -> list[Tensor]:
    """Gauss-Newton-Bartlett estimate of diag(H) for a softmax cross-entropy model.

    Args:
        logits: ``[..., V]`` float tensor still attached to the graph of ``params``.
        params: tensors to estimate for; a parameter the logits do not depend on gets zeros.
        retain_graph: keep the graph so that the caller's own loss can still backpropagate.
        generator: optional ``torch.Generator`` for the label sampling (on the logits' device).

    Returns:
        One tensor per parameter: ``B * g_s * g_s`` with ``B = logits.numel() // V`` and g_s the
        gradient of the mean cross-entropy against labels sampled from ``softmax(logits)``.

    Example::
        logits = model(x)                                   # [B, T, V]
        h_hat = gnb_hessian_estimate(logits, list(model.parameters()))
    """
    flat = logits.reshape(-1, logits.shape[-1])
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()  # softmax and the loss in fp32 at least; float64 stays float64
    with torch.no_grad():
        probs = torch.softmax(flat.detach(), dim=-1)
        labels = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    loss = F.cross_entropy(flat, labels, reduction="mean")
    grads = torch.autograd.grad(loss, params, retain_graph=retain_graph, allow_unused=True)
    rows = flat.shape[0]
    return [torch.zeros_like(p) if g is None else g * g * rows for p, g in zip(params, grads)]


def hutchinson_hessian_estimate(loss: Tensor, params: list[Tensor], *,
                                generator: torch.Generator | None = None) -> list[Tensor]:
    """Hutchinson estimate of diag(H): u * (H u) with u Rademacher (+-1 with equal chance).

    Args:
        loss: scalar tensor built with autograd from ``params`` (no ``backward`` called on it).
        params: tensors to estimate for; a parameter the loss does not depend on gets zeros.
        generator: optional ``torch.Generator`` for the Rademacher vectors (on the params' device).

    Example::
        loss = (w ** 2 * scale).sum()
        (h_hat,) = hutchinson_hessian_estimate(loss, [w])     # == 2 * scale, exact for diagonal H
    """
    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
    used = [i for i, g in enumerate(grads) if g is not None and g.requires_grad]
    vectors = [torch.randint(0, 2, params[i].shape, generator=generator, device=params[i].device)
               .to(params[i].dtype).mul_(2).sub_(1) for i in used]
    estimates = [torch.zeros_like(p) for p in params]
    if used:
        hvps = torch.autograd.grad([grads[i] for i in used], [params[i] for i in used],
                                   grad_outputs=vectors, allow_unused=True)
        for i, u, hv in zip(used, vectors, hvps):
            if hv is not None:
                estimates[i] = u * hv
    return estimates


class Sophia(torch.optim.Optimizer):
    """Sophia optimizer: momentum clipped by a diagonal Hessian EMA (Sophia-G or Sophia-H).

    Feed the Hessian with :meth:`update_hessian` (every ``update_period`` steps; see
    :attr:`hessian_due`) before :meth:`step`. ``step()`` on a parameter whose Hessian was never
    fed raises ``RuntimeError`` (the paper's h = 0 start would make early updates pure sign
    steps without saying so).

    Args:
        params: iterable of tensors or param-group dicts.
        lr: step size; the largest per-coordinate move is ``lr``. Default 1e-4.
        betas: (beta1, beta2): momentum and Hessian EMA decays. Default (0.965, 0.99).
        rho: clipping scale gamma of the paper. Default 0.04.
        weight_decay: decoupled, multiplied by ``lr``. Default 0.1.
        update_period: k, steps between Hessian updates. Default 10.
        estimator: ``"gnb"`` (feed ``logits=``) or ``"hutchinson"`` (feed ``closure=``).
        eps: floor of ``rho * h``. Default 1e-12.
        foreach: use the ``torch._foreach_*`` path; ``None`` picks it when all params are on CUDA.

    State per parameter: ``exp_avg``, ``hessian`` (parameter's shape and dtype), ``step`` and
    ``hessian_step`` (ints: steps taken, step count at the last Hessian update).

    Example::
        optimizer = Sophia(model.parameters(), lr=2e-4, rho=0.04, estimator="gnb")
        if optimizer.hessian_due: optimizer.update_hessian(logits=model(x))
    """

    def __init__(self, params: Iterable, lr: float = 1e-4, betas: tuple[float, float] = (0.965, 0.99),
                 rho: float = 0.04, weight_decay: float = 1e-1, update_period: int = 10,
                 estimator: str = "gnb", *, eps: float = 1e-12, foreach: bool | None = None) -> None:
        check_lr("Sophia", lr)
        check_betas("Sophia", betas)
        if not rho > 0.0:
            raise ValueError(f"Sophia: invalid rho={rho!r}, expected rho > 0")
        check_non_negative("Sophia", "weight_decay", weight_decay)
        check_int("Sophia", "update_period", update_period, 1)
        if estimator not in ("gnb", "hutchinson"):
            raise ValueError(f"Sophia: invalid estimator={estimator!r}, expected 'gnb' or 'hutchinson'")
        if not eps > 0.0:
            raise ValueError(f"Sophia: invalid eps={eps!r}, expected eps > 0")
        defaults = dict(lr=lr, betas=tuple(betas), rho=rho, weight_decay=weight_decay,
                        update_period=update_period, estimator=estimator, eps=eps, foreach=foreach)
        super().__init__(params, defaults)
        reject_low_precision_params("Sophia", self.param_groups)

    def _state(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["hessian_step"] = None
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    @property
    def hessian_due(self) -> bool:
        """True when some parameter has no Hessian yet or had its last update >= k steps ago."""
        for group in self.param_groups:
            for p in group["params"]:
                if not p.requires_grad:
                    continue
                state = self.state.get(p)
                if not state or state["hessian_step"] is None:
                    return True
                if state["step"] - state["hessian_step"] >= group["update_period"]:
                    return True
        return False

    @torch.no_grad()
    def update_hessian(self, logits: Tensor | None = None, *, closure: Callable[[], Tensor] | None = None,
                       retain_graph: bool = True, generator: torch.Generator | None = None) -> None:
        """Fold one estimate of diag(H) into every parameter's EMA: h = b2 * h + (1 - b2) * h_hat.

        Args:
            logits: ``[..., V]`` logits attached to the graph (``estimator="gnb"``). Call before
                ``loss.backward()`` on the same forward, or pass a separate forward's logits.
            closure: returns a scalar loss with its graph, without calling ``backward``
                (``estimator="hutchinson"``).
            retain_graph: (gnb) keep the graph for the caller's own backward.
            generator: optional ``torch.Generator`` for sampling labels / Rademacher vectors.

        Example::
            optimizer.update_hessian(logits=logits)                     # estimator="gnb"
            optimizer.update_hessian(closure=lambda: loss_fn(model(x)))  # estimator="hutchinson"
        """
        estimators = {group["estimator"] for group in self.param_groups}
        if len(estimators) != 1:
            raise ValueError(f"Sophia: param groups mix estimators {sorted(estimators)}; use one")
        groups = [(group, [p for p in group["params"] if p.requires_grad]) for group in self.param_groups]
        params = [p for _, ps in groups for p in ps]
        if not params:
            return
        if estimators == {"gnb"}:
            if logits is None:
                raise ValueError("Sophia(estimator='gnb').update_hessian needs logits=")
            with torch.enable_grad():
                estimates = gnb_hessian_estimate(logits, params, retain_graph=retain_graph,
                                                 generator=generator)
        else:
            if closure is None:
                raise ValueError("Sophia(estimator='hutchinson').update_hessian needs closure=")
            with torch.enable_grad():
                estimates = hutchinson_hessian_estimate(closure(), params, generator=generator)
        estimate_of = dict(zip(map(id, params), estimates))
        for group, ps in groups:
            beta2 = group["betas"][1]
            for p in ps:
                state = self._state(p)
                state["hessian"].lerp_(estimate_of[id(p)].to(p.dtype), 1.0 - beta2)
                state["hessian_step"] = state["step"]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """Apply one clipped update to every parameter that has a gradient; returns the loss."""
        loss = closure_loss(closure)
        for group in self.param_groups:
            params, grads, exp_avgs, hessians = [], [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                reject_sparse("Sophia", p.grad)
                state = self._state(p)
                if state["hessian_step"] is None:
                    raise RuntimeError(
                        "Sophia.step(): no Hessian estimate was ever fed for a parameter of shape "
                        f"{tuple(p.shape)}; call optimizer.update_hessian(logits=...) (gnb) or "
                        "update_hessian(closure=...) (hutchinson) before the first step")
                state["step"] += 1
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
                hessians.append(state["hessian"])
            beta1 = group["betas"][0]
            hyper = dict(lr=group["lr"], beta1=beta1, rho=group["rho"],
                         weight_decay=group["weight_decay"], eps=group["eps"])
            foreach = group["foreach"]
            if foreach is None:
                foreach = bool(params) and all(p.is_cuda for p in params)
            if foreach:
                sophia_update_foreach(params, grads, exp_avgs, hessians, **hyper)
            else:
                for p, g, m, h in zip(params, grads, exp_avgs, hessians):
                    sophia_update(p, g, m, h, **hyper)
        return loss
