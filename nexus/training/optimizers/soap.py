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

Sharded (DTensor) matrices are preconditioned whole, each on one owner rank (``SOAP``'s docstring).

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
from nexus.training.optimizers._sharded import ShardedParams, is_dtensor, local
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


def _matrix_dims(shape) -> tuple[int, int]:
    return shape[0], math.prod(shape[1:])


def _preconditioned(shape, max_precond_dim: int) -> bool:
    """A matrix (2+ dims) with at least one side small enough for a preconditioner."""
    if len(shape) < 2:
        return False
    m, n = _matrix_dims(shape)
    return m <= max_precond_dim or n <= max_precond_dim


def _soap_cost(shape) -> float:
    """Work per step up to a constant: the (m, n) projections, and the eigen-refreshes' m^3 + n^3."""
    m, n = _matrix_dims(shape)
    return m * n * (m + n) + m**3 + n**3


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
    for the preconditioned sides, ``step``. Unpreconditioned parameters: ``exp_avg``,
    ``exp_avg_sq`` shaped like the parameter, ``step``.

    Sharded parameters (DTensors, e.g. FSDP2's ``fully_shard``): detected, no flag. The rotation,
    L, R and the eigenbases are functions of the whole matrix, so each sharded matrix has one owner
    rank among its mesh's ranks (largest work first, to the least-loaded rank): every step the
    owner gathers the whole gradient (one all-to-all per mesh), runs the step above and sends each
    rank its block of the direction (one more all-to-all); every rank applies its block and decays
    it (layouts beyond Shard/Replicate, e.g. FSDP2 over tensor parallelism: an all-gather and a
    broadcast instead). The owner alone keeps that matrix's state, as whole plain tensors; the other ranks keep only
    ``step``. Why owner-held rather than replicated on every rank: the state is 2mn + 2m^2 + 2n^2
    floats per matrix (several times the parameter) and the eigen-refreshes cost O(m^3 + n^3), so
    replicating both would multiply SOAP's memory and its most expensive work by the world size;
    with owners the ranks split both. Checkpoints: ``torch.distributed.checkpoint`` saves each
    entry from the rank that holds it (whole tensors, so they load onto whichever rank owns the
    matrix at another world size); a rank's own ``state_dict()`` resumes at the same world size.
    Unpreconditioned parameters are elementwise Adam on each rank's block, moments as DTensors.

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

    @property
    def _sharded(self) -> ShardedParams:
        # made on first use (not pickled with the optimizer: it holds process groups)
        return self.__dict__.setdefault("_sharded_params", ShardedParams())

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        _validate(self.param_groups[-1], f"param group {len(self.param_groups) - 1}")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One step for every parameter with a gradient; returns ``closure()``'s loss if given."""
        loss = closure_loss(closure)
        for group in self.param_groups:
            sharded = []
            for p in group["params"]:
                if p.grad is None:
                    continue
                reject_sparse("SOAP", p.grad)
                if is_dtensor(p) != is_dtensor(p.grad):
                    raise ValueError(f"SOAP: parameter of shape {tuple(p.shape)} and its gradient must both be "
                                     "DTensors or both plain tensors")
                if not _preconditioned(p.shape, group["max_precond_dim"]):
                    self._adam_step(p, group)
                elif is_dtensor(p):
                    sharded.append(p)
                else:
                    direction = self._matrix_direction(self.state[p], _as_matrix(p.grad.to(_state_dtype(p))), group)
                    if direction is not None:
                        self._apply(p, direction, group)
            if sharded:
                self._sharded_step(sharded, group)
        return loss

    def _adam_step(self, p: Tensor, group: dict) -> None:
        """Plain Adam (no preconditioner: 1D, or both sides above max_precond_dim), elementwise, so a
        sharded parameter's rank updates its own block; moments shaped like p (DTensors for a DTensor)."""
        state = self.state[p]
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, dtype=_state_dtype(p))
            state["exp_avg_sq"] = torch.zeros_like(p, dtype=_state_dtype(p))
        state["step"] += 1
        grad = local(p.grad).to(_state_dtype(p)).reshape(1, -1)
        # reshape: states saved as (1, n) or (m, n) by earlier versions load as they are
        direction = soap_direction(grad, local(state["exp_avg"]).view(1, -1), local(state["exp_avg_sq"]).view(1, -1),
                                   None, None, betas=group["betas"], eps=group["eps"])
        self._apply(p, direction, group)

    def _matrix_direction(self, state: dict, g: Tensor, group: dict) -> Tensor | None:
        """SOAP on one whole ``(m, n)`` gradient ``g`` (state dtype): moments, statistics, bases in
        ``state``; returns the ``(m, n)`` direction, or None on the first step (it only builds the bases)."""
        beta1, beta2 = group["betas"]
        shampoo_beta = beta2 if group["shampoo_beta"] is None else group["shampoo_beta"]
        m, n = g.shape
        if "step" not in state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros(m, n, device=g.device, dtype=g.dtype)
            state["exp_avg_sq"] = torch.zeros(m, n, device=g.device, dtype=g.dtype)
            if m <= group["max_precond_dim"]:
                state["L"] = torch.zeros(m, m, device=g.device, dtype=g.dtype)
            if n <= group["max_precond_dim"]:
                state["R"] = torch.zeros(n, n, device=g.device, dtype=g.dtype)
            # first step: statistics and eigenbases only (the authors' code does the same)
            update_preconditioners(state.get("L"), state.get("R"), g, shampoo_beta)
            for side in ("L", "R"):
                if side in state:
                    state["Q" + side] = initial_basis(state[side])
            return None
        if "exp_avg" not in state:
            raise RuntimeError(
                f"SOAP: the state of a {m}x{n} matrix has a step count but no statistics on the rank that "
                "updates it: a sharded matrix's statistics live whole on its owner rank; load optimizer state "
                "with torch.distributed.checkpoint (get_state_dict/set_state_dict), which gives each rank "
                "the entries it owns")
        state["step"] += 1
        direction = soap_direction(g, state["exp_avg"], state["exp_avg_sq"], state.get("QL"), state.get("QR"),
                                   betas=(beta1, beta2), eps=group["eps"])
        update_preconditioners(state.get("L"), state.get("R"), g, shampoo_beta)
        if state["step"] % group["precondition_frequency"] == 0:
            self._refresh(state)
        return direction

    def _apply(self, p: Tensor, direction: Tensor, group: dict) -> None:
        """``W <- W - lr_t direction``, then decoupled decay, on this rank's block of ``p``."""
        beta1, beta2 = group["betas"]
        t = self.state[p]["step"]
        step_size = group["lr"]
        if group["correct_bias"]:
            step_size = step_size * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
        weights = local(p)
        weights.add_(direction.reshape(weights.shape).to(p.dtype), alpha=-step_size)
        if group["weight_decay"] != 0.0:
            weights.mul_(1.0 - group["lr"] * group["weight_decay"])

    def _sharded_step(self, params: list[Tensor], group: dict) -> None:
        """SOAP on DTensor matrices: each matrix's whole gradient is gathered on its owner rank, which
        keeps that matrix's whole state (moments, L, R, QL, QR) and computes its direction; every rank
        gets its block of the direction back and applies it (see the class docstring)."""
        sharded = self._sharded
        owners = sharded.owners([p for p in group["params"] if is_dtensor(p)
                                 and _preconditioned(p.shape, group["max_precond_dim"])], _soap_cost)
        for job, indices in sharded.buckets(params, owners, _state_dtype):
            whole = job.gather([local(params[i].grad).to(job.dtype) for i in indices])
            directions = {}
            for k in job.owned:
                direction = self._matrix_direction(self.state[params[indices[k]]], _as_matrix(whole[k]), group)
                if direction is not None:
                    directions[k] = direction.reshape(job.shapes[k])
            updating = []
            for k, i in enumerate(indices):
                state = self.state[params[i]]
                if k not in job.owned:  # the step count is kept on every rank: it sets lr_t and the first step
                    state["step"] = state["step"] + 1 if "step" in state else 0
                if state["step"] > 0:
                    updating.append(k)
            for k, block in job.scatter(directions, updating).items():
                self._apply(params[indices[k]], block, group)

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
