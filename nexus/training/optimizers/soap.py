"""SOAP: Adam in the eigenbasis of Shampoo's preconditioner (Vyas et al., 2024, arXiv:2409.11321).

For a matrix parameter with gradient G (m, n), SOAP keeps Shampoo's factors
L <- b L + (1-b) G G^T and R <- b R + (1-b) G^T G, their eigenvector bases QL, QR, and runs Adam
on the rotated gradient G' = QL^T G QR::

    m <- b1 m + (1-b1) G'                 (first moment, stored in the eigenbasis)
    v <- b2 v + (1-b2) G'^2               (second moment, in the eigenbasis)
    W <- W - lr_t QL (m / (sqrt(v) + eps)) QR^T,   lr_t = lr sqrt(1-b2^t) / (1-b1^t)
    W <- W (1 - lr wd)                    (decoupled decay, after the update, as the paper's code)

Every ``precondition_frequency`` steps the bases are refreshed: the columns of Q are re-sorted
by the estimated eigenvalues diag(Q^T L Q) (descending), then one power iteration and a QR,
Q <- qr(L Q). Keeping both moments consistent with that change:
  - the second moment is permuted along the same axis with the same sort (it cannot be rotated);
  - the first moment is rotated exactly: m <- Qnew^T (Qold m Qold^T) Qnew, so it equals the
    original-space momentum projected into the new basis (sign flips from QR included).
The first basis comes from ``eigh`` of the first gradient's statistics; that first step only
builds the preconditioner and leaves the parameter unchanged, as in the authors' code.

A dimension larger than ``max_precond_dim`` is left unpreconditioned (identity on that side);
1D parameters, and matrices with both sides unpreconditioned, get plain Adam (from step one).
Parameters with more than two dims are treated as ``(shape[0], prod(rest))`` matrices.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable

import torch
from torch import Tensor

from nexus_kernels.soap import project, project_back, update_preconditioners
from nexus.training.optimizers._checks import (
    check_group_betas, check_group_int, check_group_lr, check_group_non_negative, closure_loss, reject_sparse,
)
from nexus.training.optimizers._state import load_state_keeping_dtypes

__all__ = ["SOAP", "initial_basis", "refresh_basis", "soap_direction"]


def initial_basis(S: Tensor) -> Tensor:
    """Eigenvectors of the symmetric ``S`` (n, n), columns ordered by descending eigenvalue.

    Computed in float32 (float64 for float64 ``S``), retried in float64 if ``eigh`` fails.

    Example::

        Q = initial_basis(G @ G.T)      # Q[:, 0] is the top left singular vector of G
    """
    work = torch.float64 if S.dtype == torch.float64 else torch.float32
    eye = torch.eye(S.shape[0], device=S.device, dtype=work)
    try:
        _, Q = torch.linalg.eigh(S.to(work) + 1e-30 * eye)
    except RuntimeError:  # eigh can fail to converge in float32 on near-singular input
        _, Q = torch.linalg.eigh(S.double() + 1e-30 * eye.double())
    return torch.flip(Q, dims=[1]).to(S.dtype)


def refresh_basis(S: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    """One power-iteration + QR refresh of the eigenbasis ``Q`` of ``S``.

    Returns ``(Q_new, order)``: ``order`` sorts the old columns by their estimated eigenvalue
    ``diag(Q^T S Q)`` descending; ``Q_new = qr(S Q[:, order])``. Moments indexed by Q's columns
    must be permuted by ``order``.

    Example::

        Q, order = refresh_basis(L, Q)
        exp_avg_sq = exp_avg_sq[order]      # for the left side (dim 0)
    """
    estimated = torch.einsum("ij,ik,kj->j", Q, S, Q)  # diag(Q^T S Q) without the full product
    order = torch.argsort(estimated, descending=True)
    Q_new, _ = torch.linalg.qr(S @ Q[:, order])
    return Q_new, order


def soap_direction(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, QL: Tensor | None, QR: Tensor | None,
                   *, betas: tuple[float, float], eps: float) -> Tensor:
    """Update both moments in place (eigenbasis) and return ``QL (m / (sqrt(v) + eps)) QR^T``.

    Args:
        grad: ``(m, n)`` gradient (float32/float64); exp_avg, exp_avg_sq: ``(m, n)`` eigenbasis
            moments; QL ``(m, m)`` / QR ``(n, n)`` or None (identity).

    Example::

        d = soap_direction(G, m, v, QL, QR, betas=(0.95, 0.95), eps=1e-8)
    """
    beta1, beta2 = betas
    rotated = project(grad, QL, QR)
    exp_avg.mul_(beta1).add_(rotated, alpha=1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(rotated, rotated, value=1.0 - beta2)
    return project_back(exp_avg / (exp_avg_sq.sqrt() + eps), QL, QR)


def _state_dtype(p: Tensor) -> torch.dtype:
    return torch.float64 if p.dtype == torch.float64 else torch.float32


def _as_matrix(t: Tensor) -> Tensor:
    return t if t.dim() == 2 else t.reshape(t.shape[0], -1)


class SOAP(torch.optim.Optimizer):
    """ShampoO with Adam in the Preconditioner's eigenbasis.

    Args:
        params: parameters or param groups.
        lr: learning rate.
        betas: Adam's (beta1, beta2).
        shampoo_beta: EMA factor of the L, R statistics; None uses ``betas[1]``.
        eps: added to sqrt(v).
        weight_decay: decoupled, ``W <- W (1 - lr wd)`` after the update.
        precondition_frequency: refresh the eigenbases every this many steps.
        max_precond_dim: a dimension larger than this gets no preconditioner (identity).
        correct_bias: Adam's bias correction of the step size.

    State per matrix parameter (float32, float64 for float64 parameters): ``exp_avg``,
    ``exp_avg_sq`` (eigenbasis, ``(m, n)``), ``L``/``QL`` ``(m, m)`` and ``R``/``QR`` ``(n, n)``
    for the preconditioned sides, ``step``.

    Example::

        optimizer = SOAP(model.parameters(), lr=1e-3, betas=(0.9, 0.999),
                         precondition_frequency=10, max_precond_dim=1024)
    """

    def __init__(self, params: Iterable, lr: float = 3e-3, betas: tuple[float, float] = (0.95, 0.95),
                 shampoo_beta: float | None = None, eps: float = 1e-8, weight_decay: float = 0.01,
                 precondition_frequency: int = 10, max_precond_dim: int = 1024, correct_bias: bool = True):
        defaults = dict(lr=lr, betas=tuple(betas), shampoo_beta=shampoo_beta, eps=eps, weight_decay=weight_decay,
                        precondition_frequency=precondition_frequency, max_precond_dim=max_precond_dim,
                        correct_bias=correct_bias)
        _validate(defaults, "SOAP")
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _validate(self.param_groups[-1], f"param group {len(self.param_groups) - 1}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One step for every parameter with a gradient; returns ``closure()``'s loss if given."""
        loss = closure_loss(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                reject_sparse("SOAP", p.grad)
                self._step_param(p, group)
        return loss

    def _step_param(self, p: Tensor, group: dict) -> None:
        state = self.state[p]
        beta1, beta2 = group["betas"]
        shampoo_beta = beta2 if group["shampoo_beta"] is None else group["shampoo_beta"]
        dtype = _state_dtype(p)
        grad = p.grad.to(dtype)
        matrix = p.dim() >= 2
        g = _as_matrix(grad) if matrix else grad.reshape(1, -1)
        m, n = g.shape
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros(m, n, device=p.device, dtype=dtype)
            state["exp_avg_sq"] = torch.zeros(m, n, device=p.device, dtype=dtype)
            if matrix and m <= group["max_precond_dim"]:
                state["L"] = torch.zeros(m, m, device=p.device, dtype=dtype)
            if matrix and n <= group["max_precond_dim"]:
                state["R"] = torch.zeros(n, n, device=p.device, dtype=dtype)
            if "L" in state or "R" in state:
                # first step: statistics and eigenbases only (the authors' code does the same)
                update_preconditioners(state.get("L"), state.get("R"), g, shampoo_beta)
                for side in ("L", "R"):
                    if side in state:
                        state["Q" + side] = initial_basis(state[side])
                return
        state["step"] += 1
        t = state["step"]
        QL, QR = state.get("QL"), state.get("QR")
        direction = soap_direction(g, state["exp_avg"], state["exp_avg_sq"], QL, QR,
                                   betas=(beta1, beta2), eps=group["eps"])
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size = step_size * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        p.add_(direction.reshape(p.shape).to(p.dtype), alpha=-step_size)
        if group["weight_decay"] != 0.0:
            p.mul_(1.0 - group["lr"] * group["weight_decay"])
        if "L" in state or "R" in state:
            update_preconditioners(state.get("L"), state.get("R"), g, shampoo_beta)
            if t % group["precondition_frequency"] == 0:
                self._refresh(state)

    @staticmethod
    def _refresh(state: dict) -> None:
        """New bases; permute v with the sort, rotate m exactly into the new basis."""
        QL_old, QR_old = state.get("QL"), state.get("QR")
        exp_avg_original = project_back(state["exp_avg"], QL_old, QR_old)
        for dim, side in ((0, "L"), (1, "R")):
            if side in state:
                Q, order = refresh_basis(state[side], state["Q" + side])
                state["Q" + side] = Q
                state["exp_avg_sq"] = state["exp_avg_sq"].index_select(dim, order)
        state["exp_avg"] = project(exp_avg_original, state.get("QL"), state.get("QR"))

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but state keeps its saved dtype (torch casts it to the parameter's)."""
        load_state_keeping_dtypes(self, state_dict)


def _validate(group: dict, where: str) -> None:
    check_group_lr(where, group["lr"])
    check_group_betas(where, group["betas"])
    shampoo_beta = group["shampoo_beta"]
    if shampoo_beta is not None and not 0.0 <= shampoo_beta < 1.0:
        raise ValueError(f"{where}: shampoo_beta must be None or in [0, 1), got {shampoo_beta!r}")
    check_group_non_negative(where, "eps", group["eps"])
    check_group_non_negative(where, "weight_decay", group["weight_decay"])
    check_group_int(where, "precondition_frequency", group["precondition_frequency"], 1)
    check_group_int(where, "max_precond_dim", group["max_precond_dim"], 0)
