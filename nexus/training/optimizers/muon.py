"""Muon: MomentUm Orthogonalized by Newton-Schulz (Jordan et al., 2024).

For each hidden weight matrix W with gradient G::

    M <- mu M + (1 - mu) G                              # momentum buffer
    U  = (1 - mu) G + mu M   if nesterov else M          # Nesterov look-ahead
    O  = orthogonalize(U)                                # ~ polar factor: singular values ~ 1
    W <- W (1 - lr wd) - lr max(1, rows/cols)^0.5 O      # decoupled weight decay

Scale choice: ``max(1, rows/cols) ** 0.5`` (KellerJordan/Muon). O has unit singular values, so
its per-entry RMS is ``sqrt(1/cols)`` for a wide matrix and ``sqrt(1/rows)`` for a tall one;
the factor restores ``sqrt(1/cols)`` for tall matrices, so every layer's update has the same
RMS per input unit and one lr serves all shapes.

Sharded parameters (DTensors from FSDP2) are orthogonalized whole, each matrix on one owner rank
(``Muon``'s docstring): plain ``Muon(...)`` and ``get_muon_optimizer(model)`` work on a wrapped model.

Orthogonalization is only defined for matrices: a 2D parameter is one matrix, a 3D one a stack
of matrices (e.g. MoE experts ``(E, d_in, d_out)``, one batched launch), a 4D convolution weight
``(out, in, kh, kw)`` is flattened to ``(out, in*kh*kw)``. A 1D or 0D parameter in a Muon group
is an error, never silently given another rule: put it in a group with ``use_muon=False``
(AdamW, same optimizer object), which ``get_muon_optimizer`` does for you.
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from nexus_kernels.newton_schulz import DEFAULT_COEFFS, orthogonalize
from nexus_kernels.newton_schulz import _schedule as _ns_schedule
from nexus.training.optimizers._checks import (
    check_group_betas, check_group_int, check_group_lr, check_group_non_negative, closure_loss, reject_sparse,
)
from nexus.training.optimizers._sharded import ShardedParams, is_dtensor, local
from nexus.training.optimizers._state import load_state_keeping_dtypes

__all__ = ["Muon", "adamw_update", "get_muon_optimizer", "muon_direction", "muon_momentum", "muon_update",
           "update_scale"]


def _as_matrices(t: Tensor) -> Tensor:
    """2D: as is; 3D: a stack of matrices; 4D+ (conv): flattened to (shape[0], rest)."""
    return t if t.dim() in (2, 3) else t.reshape(t.shape[0], -1)


def update_scale(shape: Sequence[int]) -> float:
    """``max(1, rows/cols) ** 0.5`` for the matrix Muon orthogonalizes for a parameter of ``shape``.

    Example::

        update_scale((3072, 768))   # 2.0: tall matrices get sqrt(rows/cols)
    """
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"Muon updates matrices; shape {shape} has fewer than 2 dims")
    rows, cols = (shape[-2], shape[-1]) if len(shape) in (2, 3) else (shape[0], math.prod(shape[1:]))
    return max(1.0, rows / max(cols, 1)) ** 0.5


def muon_momentum(grad: Tensor, momentum_buffer: Tensor, *, momentum: float = 0.95,
                  nesterov: bool = True) -> Tensor:
    """``M <- mu M + (1 - mu) G`` in place; returns ``(1 - mu) G + mu M`` (Nesterov) or ``M``.

    Example::

        U = muon_momentum(G, M, momentum=0.95)   # the matrix that gets orthogonalized
    """
    g = grad.to(momentum_buffer.dtype)
    momentum_buffer.lerp_(g, 1.0 - momentum)
    # out of place: the caller's gradient is left as it was
    return torch.lerp(g, momentum_buffer, momentum) if nesterov else momentum_buffer


def muon_direction(update: Tensor, *, ns_steps: int = 5, coeffs=DEFAULT_COEFFS) -> Tensor:
    """``orthogonalize(update) * max(1, rows/cols) ** 0.5``, same shape and dtype as ``update``.

    On CUDA the Newton-Schulz iteration runs in bfloat16 (fp32 accumulation), elsewhere in
    ``update``'s dtype.

    Example::

        O = muon_direction(torch.randn(64, 128))   # singular values ~ 1 (about [0.68, 1.13])
    """
    matrices = _as_matrices(update)
    if matrices.is_cuda:  # bf16 matmuls at full tensor-core rate; NS tolerates the rounding
        matrices = matrices.bfloat16()
    out = orthogonalize(matrices, steps=ns_steps, coeffs=coeffs)
    return (out.to(update.dtype) * update_scale(update.shape)).reshape(update.shape)


def muon_update(grad: Tensor, momentum_buffer: Tensor, *, momentum: float = 0.95, nesterov: bool = True,
                ns_steps: int = 5, coeffs=DEFAULT_COEFFS) -> Tensor:
    """Momentum, Nesterov, orthogonalize, scale: the Muon direction for one parameter.

    Args:
        grad: gradient, 2D, 3D (stack) or 4D (conv) tensor (left unmodified).
        momentum_buffer: same shape, updated in place (``M <- mu M + (1 - mu) G``).
        momentum, nesterov, ns_steps, coeffs: as in ``Muon``.

    Returns:
        The update (without lr), same shape as ``grad``, in ``momentum_buffer``'s dtype.

    Example::

        G, M = torch.randn(64, 128), torch.zeros(64, 128)
        O = muon_update(G, M)       # O's singular values ~ 1 (in about [0.68, 1.13])
    """
    update = muon_momentum(grad, momentum_buffer, momentum=momentum, nesterov=nesterov)
    return muon_direction(update, ns_steps=ns_steps, coeffs=coeffs)


def adamw_update(grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: int, *, betas=(0.9, 0.95),
                 eps: float = 1e-8) -> Tensor:
    """Bias-corrected Adam direction ``m_hat / (sqrt(v_hat) + eps)``; moments updated in place.

    Example::

        g, m, v = torch.randn(10), torch.zeros(10), torch.zeros(10)
        d = adamw_update(g, m, v, step=1)   # == sign(g) up to eps on the first step
    """
    beta1, beta2 = betas
    g = grad.to(exp_avg.dtype)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    denom = (exp_avg_sq / (1.0 - beta2**step)).sqrt_().add_(eps)
    return (exp_avg / (1.0 - beta1**step)) / denom


def _state_dtype(p: Tensor) -> torch.dtype:
    """Optimizer state in float32 for 16-bit parameters (float64 stays float64)."""
    return p.dtype if p.dtype in (torch.float32, torch.float64) else torch.float32


def _orthogonalize_cost(shape: tuple[int, ...]) -> float:
    """Newton-Schulz FLOPs up to a constant: rows * cols * min(rows, cols) per matrix."""
    if len(shape) == 3:
        return shape[0] * shape[1] * shape[2] * min(shape[1], shape[2])
    rows, cols = shape[0], math.prod(shape[1:])
    return rows * cols * min(rows, cols)


class Muon(torch.optim.Optimizer):
    """Muon for hidden matrices, with AdamW for the groups marked ``use_muon=False``.

    Args:
        params: parameters or param groups. A group's ``use_muon`` (default True) picks the rule;
            ``use_muon=True`` groups must hold only parameters with 2 or more dims.
        lr: learning rate (Muon groups: the spectral step size; 0.02 is KellerJordan's default).
        momentum: Muon momentum mu in [0, 1).
        nesterov: use the Nesterov look-ahead ``(1 - mu) G + mu M``.
        weight_decay: decoupled, ``W <- W (1 - lr wd)``, applied before the update.
        ns_steps: Newton-Schulz iterations (must equal ``len(coeffs)`` for a schedule).
        coeffs: one (a, b, c) triple or a per-step schedule (``polar_express_coeffs``).
        betas, eps: AdamW settings for ``use_muon=False`` groups.
        distribute_work: with data parallelism (every rank holds the same full parameters and
            averaged gradients), rank r orthogonalizes parameters r, r + world, ... of each Muon
            group and broadcasts the results, so the Newton-Schulz cost is split across ranks.
            Used only while ``torch.distributed`` is initialized; a single process ignores it.
            Sharded (DTensor, e.g. FSDP2) parameters need no flag: see below.

    Sharded parameters (FSDP2's ``fully_shard``, HSDP): detected as DTensors. Momentum is elementwise,
    so each rank updates its own block of it (the buffer is a DTensor like the parameter, so DCP
    saves and reshards it). The orthogonalization needs the whole matrix: each matrix has one owner
    rank among its mesh's ranks (largest first, to the least-loaded rank), which gathers the whole
    momentum (one all-to-all per mesh), orthogonalizes it and sends every rank its block of the
    update (one more all-to-all): each matrix is orthogonalized exactly once, the work spread over
    the ranks. A 3D stack sharded on its stack dimension (whole matrices per rank) is orthogonalized
    where it lies. Layouts beyond Shard/Replicate (FSDP2 over tensor parallelism makes strided
    shards) take a heavier path: all-gather, owner computes, broadcast. AdamW groups are
    elementwise and work on the local blocks. The result equals the single-process step on the
    same full gradients, bit for bit.

    Example::

        opt = Muon([{"params": [w1, w2]}, {"params": [bias], "use_muon": False, "lr": 3e-4}], lr=0.02)
        loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, params: Iterable, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 weight_decay: float = 0.0, ns_steps: int = 5, coeffs=DEFAULT_COEFFS,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, distribute_work: bool = False):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay,
                        ns_steps=ns_steps, coeffs=coeffs, betas=tuple(betas), eps=eps, use_muon=True,
                        distribute_work=distribute_work)
        _validate(defaults, where="Muon")
        super().__init__(params, defaults)

    @property
    def _sharded(self) -> ShardedParams:
        # made on first use (not pickled with the optimizer: it holds process groups)
        return self.__dict__.setdefault("_sharded_params", ShardedParams())

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        _validate(group, where=f"param group {len(self.param_groups) - 1}")
        if group["use_muon"]:
            for i, p in enumerate(group["params"]):
                if p.dim() < 2:
                    raise ValueError(
                        f"Muon orthogonalizes matrices, but param group {len(self.param_groups) - 1} "
                        f"(use_muon=True) holds parameter {i} of shape {tuple(p.shape)}: put 1D/0D "
                        "parameters (biases, norms) in a group with use_muon=False, or build the "
                        "optimizer with get_muon_optimizer(model)")

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One step for every parameter with a gradient; returns ``closure()``'s loss if given."""
        loss = closure_loss(closure)
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                reject_sparse("Muon", p.grad, hint="use dense gradients, e.g. nn.Embedding(sparse=False)")
                if is_dtensor(p) != is_dtensor(p.grad):
                    raise ValueError(f"Muon: parameter of shape {tuple(p.shape)} and its gradient must both be "
                                     "DTensors or both plain tensors")
            updates = self._muon_updates(params, group) if group["use_muon"] else self._adamw_updates(params, group)
            for p, update in zip(params, updates):
                weights = local(p)  # a DTensor's own block: the updates below are of that block
                if group["weight_decay"] != 0.0:
                    weights.mul_(1.0 - group["lr"] * group["weight_decay"])
                weights.add_(update.to(p.dtype), alpha=-group["lr"])
        return loss

    def _muon_updates(self, params: list[Tensor], group: dict) -> list[Tensor]:
        """This rank's block of each parameter's update: plain params as ``distribute_work`` says,
        sharded (DTensor) ones orthogonalized whole, each on one owner rank (``_sharded_updates``)."""
        moments = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:  # a DTensor like p for a sharded p (DCP saves it sharded)
                state["momentum_buffer"] = torch.zeros_like(p, dtype=_state_dtype(p))
            # momentum is elementwise: each rank updates its own block
            moments.append(muon_momentum(local(p.grad), local(state["momentum_buffer"]),
                                         momentum=group["momentum"], nesterov=group["nesterov"]))
        updates: list[Tensor | None] = [None] * len(params)
        plain = [i for i, p in enumerate(params) if not is_dtensor(p)]
        for i, update in zip(plain, self._plain_updates([moments[i] for i in plain], group)):
            updates[i] = update
        sharded = [i for i, p in enumerate(params) if is_dtensor(p)]
        if sharded:
            for i, update in self._sharded_updates([params[i] for i in sharded], [moments[i] for i in sharded],
                                                   group).items():
                updates[sharded[i]] = update
        return updates

    def _plain_updates(self, moments: list[Tensor], group: dict) -> list[Tensor]:
        world, rank = 1, 0
        if group["distribute_work"] and dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
        updates, pending = [], []
        for i, U in enumerate(moments):
            owner = i % world
            if owner == rank:
                update = muon_direction(U, ns_steps=group["ns_steps"], coeffs=group["coeffs"])
            else:
                update = torch.empty_like(U)
            if world > 1:
                pending.append(dist.broadcast(update, src=owner, async_op=True))
            updates.append(update)
        for work in pending:
            work.wait()
        return updates

    def _sharded_updates(self, params: list[Tensor], moments: list[Tensor], group: dict) -> dict[int, Tensor]:
        """``{i: this rank's block of params[i]'s update}`` for DTensor params with local momenta ``moments``.

        A stack of matrices split by whole matrices (3D, sharded on dim 0 only, not replicated: MoE
        experts) is orthogonalized where it lies, each rank its own matrices. Every other matrix is
        gathered whole on one owner rank, orthogonalized there and scattered back (see ``_sharded``).
        """
        sharded = self._sharded

        def split_by_whole_matrices(p: Tensor) -> bool:
            layout = sharded.layout(p)
            return p.dim() == 3 and layout is not None and layout.shards_only_dim0()

        settings = dict(ns_steps=group["ns_steps"], coeffs=group["coeffs"])
        updates, whole = {}, []
        for i, (p, U) in enumerate(zip(params, moments)):
            if split_by_whole_matrices(p):
                updates[i] = muon_direction(U, **settings)
            else:
                whole.append(i)
        if not whole:
            return updates
        # owners over every gathered matrix of the group, so that they stay put when a gradient is missing
        candidates = [p for p in group["params"] if is_dtensor(p) and not split_by_whole_matrices(p)]
        owners = sharded.owners(candidates, _orthogonalize_cost)
        gathered = [params[i] for i in whole]
        for job, indices in sharded.buckets(gathered, owners, _state_dtype):
            full = job.gather([moments[whole[j]] for j in indices])
            directions = {k: muon_direction(U, **settings) for k, U in full.items()}
            for k, block in job.scatter(directions).items():
                updates[whole[indices[k]]] = block
        return updates

    def _adamw_updates(self, params: list[Tensor], group: dict) -> list[Tensor]:
        """Elementwise AdamW; a sharded parameter's moments are DTensors like it, updated block by block."""
        updates = []
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, dtype=_state_dtype(p))
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=_state_dtype(p))
            state["step"] += 1
            updates.append(adamw_update(local(p.grad), local(state["exp_avg"]), local(state["exp_avg_sq"]),
                                        state["step"], betas=group["betas"], eps=group["eps"]))
        return updates

    def load_state_dict(self, state_dict: dict) -> None:
        """As torch's, but state keeps its saved dtype (torch casts it to the parameter's)."""
        load_state_keeping_dtypes(self, state_dict)


def _validate(group: dict, where: str) -> None:
    check_group_lr(where, group["lr"])
    momentum = group["momentum"]
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"{where}: momentum must be in [0, 1), got {momentum!r}")
    check_group_non_negative(where, "weight_decay", group["weight_decay"])
    check_group_non_negative(where, "eps", group["eps"])
    check_group_betas(where, group["betas"])
    if not isinstance(group["distribute_work"], bool):
        raise ValueError(f"{where}: distribute_work must be a bool, got {group['distribute_work']!r}")
    steps = group["ns_steps"]
    check_group_int(where, "ns_steps", steps, 1)
    try:
        _ns_schedule(steps, group["coeffs"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: coeffs: {err}") from None


# Module types whose parameters are embeddings or normalisation scales (AdamW, no weight decay).
_EMBEDDING_TYPES = (nn.Embedding, nn.EmbeddingBag)
_NORM_TYPES = tuple(t for t in (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, getattr(nn, "RMSNorm", None),
                                nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)
                    if t is not None)
HEAD_NAMES = ("lm_head", "output", "head")
EMBEDDING_NAME_HINTS = ("embed", "wte", "wpe")


def _looks_like_embedding(qualified_name: str) -> bool:
    """A raw ``nn.Parameter`` table (no ``nn.Embedding`` module) recognised by its name."""
    parts = qualified_name.lower().split(".")
    return any(hint in part for part in parts for hint in EMBEDDING_NAME_HINTS)


def get_muon_optimizer(model: nn.Module, lr: float = 1e-3, momentum: float = 0.95, weight_decay: float = 0.01,
                       adamw_lr: float | None = None, adamw_betas: tuple[float, float] = (0.9, 0.95),
                       distribute_work: bool = False) -> Muon:
    """One ``Muon`` with three groups: hidden matrices (Muon), the output head, and the rest (AdamW).

    Routing (only parameters with ``requires_grad``):
      - ``"muon"`` (Muon, ``weight_decay``): parameters with 2+ dims of any module that is not
        an embedding, a head or a norm.
      - ``"adamw_decay"`` (AdamW, ``weight_decay``): the output head's matrices: the module whose
        own name (last dotted part) is ``lm_head``, ``output`` or ``head``.
      - ``"adamw_no_decay"`` (AdamW, no decay): ``nn.Embedding``/``nn.EmbeddingBag`` weights and
        parameters whose dotted name contains ``embed``, ``wte`` or ``wpe``, including a head
        tied to them (``lm_head.weight = embed.weight``: tied tensors are found under every
        name), norm layers' parameters (``*Norm`` modules), biases and every other parameter
        with fewer than 2 dims.

    ``adamw_lr`` defaults to ``lr``; ``distribute_work`` as in ``Muon``.

    Example::

        optimizer = get_muon_optimizer(model, lr=1e-3, momentum=0.95, weight_decay=0.01)
        [g["name"] for g in optimizer.param_groups]   # ['muon', 'adamw_decay', 'adamw_no_decay']
    """
    adamw_lr = lr if adamw_lr is None else adamw_lr
    owners: dict[int, list[tuple[str, nn.Module]]] = {}  # every (qualified name, module) holding the tensor
    for module_name, module in model.named_modules(remove_duplicate=False):
        for param_name, p in module.named_parameters(prefix=module_name, recurse=False, remove_duplicate=False):
            owners.setdefault(id(p), []).append((param_name, module))
    groups: dict[str, list[Tensor]] = {"muon": [], "adamw_decay": [], "adamw_no_decay": []}
    seen: set[int] = set()
    for p in model.parameters():
        if id(p) in seen or not p.requires_grad:
            continue
        seen.add(id(p))
        held_by = owners[id(p)]
        module_names = [name.rsplit(".", 1)[0] if "." in name else "" for name, _ in held_by]
        embedding = any(isinstance(m, _EMBEDDING_TYPES) for _, m in held_by) or any(
            _looks_like_embedding(name) for name, _ in held_by)
        head = any(mod.rsplit(".", 1)[-1] in HEAD_NAMES for mod in module_names)
        norm = any(isinstance(m, _NORM_TYPES) for _, m in held_by)
        if embedding or norm or p.dim() < 2:  # a head tied to an embedding is an embedding
            groups["adamw_no_decay"].append(p)
        elif head:
            groups["adamw_decay"].append(p)
        else:
            groups["muon"].append(p)
    param_groups = []
    if groups["muon"]:
        param_groups.append(dict(params=groups["muon"], name="muon", use_muon=True, lr=lr,
                                 weight_decay=weight_decay))
    if groups["adamw_decay"]:
        param_groups.append(dict(params=groups["adamw_decay"], name="adamw_decay", use_muon=False, lr=adamw_lr,
                                 betas=tuple(adamw_betas), weight_decay=weight_decay))
    if groups["adamw_no_decay"]:
        param_groups.append(dict(params=groups["adamw_no_decay"], name="adamw_no_decay", use_muon=False,
                                 lr=adamw_lr, betas=tuple(adamw_betas), weight_decay=0.0))
    if not param_groups:
        raise ValueError("get_muon_optimizer: the model has no parameters with requires_grad=True")
    return Muon(param_groups, lr=lr, momentum=momentum, weight_decay=weight_decay, betas=adamw_betas,
                distribute_work=distribute_work)
