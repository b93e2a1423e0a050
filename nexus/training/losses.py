"""Training losses: multi-token prediction (the trainer's), InfoNCE, SigLIP, VICReg.

Functional API first (pure functions of tensors), then the ``nn.Module`` wrappers that only store
settings (and SigLIP's learnable temperature and bias).

- :func:`multi_token_prediction_loss` / :class:`MultiTokenPredictionLoss`: next-token cross-entropy
  plus the extra heads' losses of a multi-token prediction model.
- :func:`info_nce_loss` / :class:`InfoNCELoss`: the softmax contrastive loss of CLIP (Radford et
  al. 2021; van den Oord et al. 2018), over the in-batch pairs.
- :func:`sigmoid_contrastive_loss` / :class:`SigmoidContrastiveLoss`: SigLIP (Zhai et al. 2023),
  a sigmoid loss per image-text pair, no global softmax. Under ``torch.distributed`` it runs the
  paper's chunked implementation: text features travel round a ring of ranks so each rank only
  ever holds ``b x b`` logits, whatever the world size, and the loss and gradients equal those of
  one process on the global batch.
- :func:`vicreg_loss` / :class:`VICRegLoss`: variance-invariance-covariance regularisation
  (Bardes et al. 2022).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

__all__ = [
    "InfoNCELoss",
    "MultiTokenPredictionLoss",
    "SigmoidContrastiveLoss",
    "VICRegLoss",
    "VICRegTerms",
    "info_nce_loss",
    "multi_token_prediction_loss",
    "sigmoid_contrastive_loss",
    "vicreg_loss",
    "vicreg_terms",
]

SIGLIP_REDUCTIONS = ("global", "per_rank")
_FEATURE_TAG, _GRAD_TAG = 0, 1  # P2P tags: a ring step has a feature chunk and a gradient chunk in flight


# ---- input checks ----------------------------------------------------------------------------


def _check_features(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor, *, min_batch: int = 1) -> None:
    """Two paired feature batches: floating tensors [B, D] of the same shape, dtype and device."""
    for name, t in ((name_a, a), (name_b, b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor (features), got dtype {t.dtype}")
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D [batch, dim], got {t.dim()}-D shape {tuple(t.shape)}")
        if t.shape[0] < min_batch:
            raise ValueError(f"{name} needs a batch of at least {min_batch}, got {t.shape[0]} rows")
        if t.shape[1] < 1:
            raise ValueError(f"{name} has feature dimension 0 (shape {tuple(t.shape)})")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"batch sizes differ: {name_a} has {a.shape[0]} rows, {name_b} has {b.shape[0]}; "
                         f"row i of each must be a positive pair")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"feature dimensions differ: {name_a} is {tuple(a.shape)}, {name_b} is {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"dtypes differ: {name_a} is {a.dtype}, {name_b} is {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"devices differ: {name_a} is on {a.device}, {name_b} on {b.device}")


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


def _check_coeff(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # Half-precision features are promoted: similarities, logits and sums run in float32 at least.
    return torch.promote_types(dtype, torch.float32)


# ---- multi-token prediction ------------------------------------------------------------------


def multi_token_prediction_loss(
    logits: torch.Tensor,
    mtp_logits: Sequence[torch.Tensor],
    tokens: torch.Tensor,
    *,
    mtp_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Next-token loss plus the extra heads' losses.

    ``logits`` [B, T, V] predict ``tokens[:, t+1]``; ``mtp_logits[k-1]`` [B, T, V] predicts
    ``tokens[:, t+1+k]``; ``tokens`` [B, T + n_pred] is the packed window (int64).
    Returns ``(total, next_token_loss, extra_head_losses)`` with
    ``total = next_token_loss + mtp_weight * mean(extra_head_losses)``, float32 scalars.

    Example::
        total, lm, extra = multi_token_prediction_loss(out.logits, out.mtp_logits, window)
    """
    if not logits.is_floating_point() or logits.dim() != 3:
        raise ValueError(f"logits must be a floating tensor [B, T, V], got dtype {logits.dtype} "
                         f"shape {tuple(logits.shape)}")
    for k, lg in enumerate(mtp_logits, start=1):
        if lg.shape != logits.shape:
            raise ValueError(f"mtp_logits[{k - 1}] has shape {tuple(lg.shape)}, logits {tuple(logits.shape)}: "
                             f"every head predicts over the same [B, T, V]")
    if tokens.dim() != 2 or tokens.is_floating_point() or tokens.is_complex() or tokens.dtype == torch.bool:
        raise ValueError(f"tokens must be an integer tensor [B, T + n_pred], got dtype {tokens.dtype} "
                         f"shape {tuple(tokens.shape)}")
    if tokens.shape[0] != logits.shape[0]:
        raise ValueError(f"tokens has batch {tokens.shape[0]}, logits {logits.shape[0]}")
    T = logits.shape[1]
    need = T + 1 + len(mtp_logits)
    if tokens.shape[1] < need:
        raise ValueError(
            f"tokens has {tokens.shape[1]} positions but {len(mtp_logits) + 1} heads over T={T} need {need}"
        )

    def ce(lg: torch.Tensor, offset: int) -> torch.Tensor:
        target = tokens[:, offset : offset + T]
        return F.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), target.reshape(-1))

    lm = ce(logits, 1)
    extra = [ce(lg, 1 + k) for k, lg in enumerate(mtp_logits, start=1)]
    total = lm + mtp_weight * torch.stack(extra).mean() if extra else lm
    return total, lm, extra


class MultiTokenPredictionLoss(nn.Module):
    """Module form of :func:`multi_token_prediction_loss` (the trainer's loss), storing ``mtp_weight``.

    forward(logits [B, T, V] float, mtp_logits: sequence of [B, T, V], tokens [B, T + n_pred] int64)
    -> ``(total, next_token_loss, extra_head_losses)``.

    Example::
        loss_fn = MultiTokenPredictionLoss(mtp_weight=0.3)
        total, lm, extra = loss_fn(out.logits, out.mtp_logits, window)
    """

    def __init__(self, mtp_weight: float = 1.0) -> None:
        super().__init__()
        self.mtp_weight = _check_coeff("mtp_weight", mtp_weight)

    def forward(self, logits: torch.Tensor, mtp_logits: Sequence[torch.Tensor], tokens: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        return multi_token_prediction_loss(logits, mtp_logits, tokens, mtp_weight=self.mtp_weight)

    def extra_repr(self) -> str:
        return f"mtp_weight={self.mtp_weight}"


# ---- InfoNCE -----------------------------------------------------------------------------------


def info_nce_loss(query: torch.Tensor, key: torch.Tensor, *, temperature: float = 0.07,
                  symmetric: bool = True) -> torch.Tensor:
    """InfoNCE over in-batch pairs: row i of ``query`` and row i of ``key`` are the positive pair.

    Both inputs are L2-normalised along the feature dim first (as CLIP does), then
    ``logits = q @ k.T / temperature`` [B, B] and the loss is the cross-entropy of each row
    against its diagonal entry, averaged over rows; ``symmetric`` averages that with the same
    loss over columns (key -> query), as CLIP's loss.

    Shapes: query [B, D], key [B, D], floating, same dtype. Returns a 0-dim tensor in the
    inputs' dtype promoted to at least float32.

    Example::
        loss = info_nce_loss(torch.randn(8, 32), torch.randn(8, 32), temperature=0.07)
    """
    _check_features("query", query, "key", key)
    temperature = _check_positive("temperature", temperature)
    acc = _accumulation_dtype(query.dtype)
    q = F.normalize(query.to(acc), dim=-1)
    k = F.normalize(key.to(acc), dim=-1)
    logits = q @ k.T / temperature
    labels = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        loss = (loss + F.cross_entropy(logits.T, labels)) / 2
    return loss


class InfoNCELoss(nn.Module):
    """InfoNCE / CLIP contrastive loss; see :func:`info_nce_loss` (features L2-normalised inside).

    forward(query [B, D], key [B, D]) -> 0-dim loss. On several ranks it uses the local batch only.

    Example::
        loss_fn = InfoNCELoss(temperature=0.07)
        loss = loss_fn(image_features, text_features)
    """

    def __init__(self, temperature: float = 0.07, symmetric: bool = True) -> None:
        super().__init__()
        self.temperature = _check_positive("temperature", temperature)
        self.symmetric = bool(symmetric)

    def forward(self, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
        return info_nce_loss(query, key, temperature=self.temperature, symmetric=self.symmetric)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, symmetric={self.symmetric}"


# ---- SigLIP ------------------------------------------------------------------------------------


def _siglip_chunk_sum(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                      positive: bool) -> torch.Tensor:
    """sum_ij -log sigmoid(z_ij (scale x_i.y_j + bias)), z = +1 on the diagonal when ``positive``
    (the rank's own texts), -1 elsewhere. x [b, d], y [c, d] -> 0-dim; allocates O(b c)."""
    signed = (x @ y.T).mul_(scale).add_(bias).neg_()
    if positive:
        signed.diagonal().neg_()  # in place on the view: no second b x c temporary
    # -log sigmoid(v) = max(-v, 0) + log1p(exp(-|v|)), stable, with one b x c temporary
    # (F.logsigmoid would keep a second buffer for its backward)
    tail = signed.abs().neg_().exp_().log1p_().sum()
    return signed.neg_().clamp_min_(0).sum() + tail


def _siglip_chunk_grads(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                        positive: bool, coeff: torch.Tensor, dx: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of ``coeff * _siglip_chunk_sum``: adds d x into ``dx`` [b, d] in place and returns
    (d y [c, d], d scale, d bias)."""
    sim = x @ y.T
    # d/du [-log sigmoid(z u)] = -z sigmoid(-z u) = sigmoid(u) - [z = +1]
    g = sim.mul(scale).add_(bias).sigmoid_()
    if positive:
        g.diagonal().sub_(1)
    g.mul_(coeff)
    d_scale = torch.dot(g.reshape(-1), sim.reshape(-1))
    d_bias = g.sum()
    del sim
    g.mul_(scale)  # du/dx = scale * y, du/dy = scale * x
    dx.addmm_(g, y)
    return g.T @ x, d_scale, d_bias


def _wait(works: list) -> None:
    for w in works:
        w.wait()


def _ring_ops(send: torch.Tensor | None, recv: torch.Tensor | None, group, right: int, left: int,
              tag: int) -> list:
    ops = []
    if send is not None:
        ops.append(dist.P2POp(dist.isend, send, group=group, group_peer=right, tag=tag))
    if recv is not None:
        ops.append(dist.P2POp(dist.irecv, recv, group=group, group_peer=left, tag=tag))
    return dist.batch_isend_irecv(ops) if ops else []


class _RingSigmoidLoss(torch.autograd.Function):
    """Chunked SigLIP over a ring of ranks (Zhai et al. 2023, section 3.3 "efficient chunked").

    Rank r holds normalised image features x_r [b_r, d] and text features y_r [b_r, d]. At step k
    (k = 0..P-1) it holds the texts of rank (r - k) mod P, adds that chunk's pair losses, and passes
    the chunk to rank r + 1 while receiving the next from rank r - 1 (overlapping the matmul).
    Only step 0 holds positives (the diagonal). Backward recomputes the same chunks in the same
    order; the gradient for each text chunk travels with it and arrives home after P hops.
    """

    @staticmethod
    def forward(ctx, x, y, scale, bias, group, sizes, per_rank):
        with torch.autocast(x.device.type, enabled=False):  # keep the float32 matmuls under autocast
            return _RingSigmoidLoss._forward(ctx, x, y, scale, bias, group, sizes, per_rank)

    @staticmethod
    def _forward(ctx, x, y, scale, bias, group, sizes, per_rank):
        world = len(sizes)
        rank = dist.get_rank(group) if world > 1 else 0
        right, left = (rank + 1) % world, (rank - 1) % world
        total = x.new_zeros(())
        y_cur = y
        for k in range(world):
            works, y_next = [], None
            if k < world - 1:
                y_next = y.new_empty((sizes[(rank - k - 1) % world], y.shape[1]))
                works = _ring_ops(y_cur, y_next, group, right, left, _FEATURE_TAG)
            total = total + _siglip_chunk_sum(x, y_cur, scale, bias, positive=k == 0)
            _wait(works)
            y_cur = y_next
        global_batch = sum(sizes)
        ctx.save_for_backward(x, y, scale, bias)
        ctx.group, ctx.sizes, ctx.per_rank = group, sizes, per_rank
        if per_rank:
            # world * (own rows' share of the global loss): the ranks' mean is the global loss
            return total * (world / global_batch)
        loss = total / global_batch
        if world > 1:
            dist.all_reduce(loss, group=group)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        with torch.autocast(grad_out.device.type, enabled=False):
            return _RingSigmoidLoss._backward(ctx, grad_out)

    @staticmethod
    def _backward(ctx, grad_out):
        x, y, scale, bias = ctx.saved_tensors
        group, sizes, per_rank = ctx.group, ctx.sizes, ctx.per_rank
        world = len(sizes)
        rank = dist.get_rank(group) if world > 1 else 0
        right, left = (rank + 1) % world, (rank - 1) % world
        coeff = grad_out * ((world if per_rank else 1) / sum(sizes))
        dx = torch.zeros_like(x)
        d_scale, d_bias = scale.new_zeros(()), bias.new_zeros(())
        y_cur, acc_in, acc_works = y, None, []
        for k in range(world):
            works, y_next = [], None
            if k < world - 1:
                y_next = y.new_empty((sizes[(rank - k - 1) % world], y.shape[1]))
                works = _ring_ops(y_cur, y_next, group, right, left, _FEATURE_TAG)
            gy, gs, gb = _siglip_chunk_grads(x, y_cur, scale, bias, k == 0, coeff, dx)
            d_scale, d_bias = d_scale + gs, d_bias + gb
            _wait(acc_works)  # the gradient accumulated so far for this text chunk, from rank r - 1
            acc_out = gy if k == 0 else acc_in.add_(gy)
            del gy  # drop every reference that outlives its step: memory must not grow with the world
            if world > 1:
                # after the last step the chunk of rank r + 1 is complete: this hop brings it home
                acc_in = acc_out.new_empty((sizes[(rank - k - 1) % world], y.shape[1]))
                acc_works = _ring_ops(acc_out, acc_in, group, right, left, _GRAD_TAG)
            else:
                acc_in = acc_out
            _wait(works)
            y_cur = y_next
        _wait(acc_works)
        dy = acc_in
        if world > 1 and not per_rank and (ctx.needs_input_grad[2] or ctx.needs_input_grad[3]):
            # one scalar loss shared by all ranks: its temperature and bias gradients sum every rank's rows
            both = torch.stack([d_scale, d_bias])
            dist.all_reduce(both, group=group)
            d_scale, d_bias = both[0], both[1]
        return (dx, dy, d_scale if ctx.needs_input_grad[2] else None,
                d_bias if ctx.needs_input_grad[3] else None, None, None, None)


def _resolve_group(group):
    """(group, world size) for SigLIP: the given group, else the default group when initialised."""
    initialized = dist.is_available() and dist.is_initialized()
    if group is not None and not initialized:
        raise RuntimeError("sigmoid_contrastive_loss: a process group was given but torch.distributed "
                           "is not initialized")
    if not initialized:
        return None, 1
    if group is None:
        group = dist.group.WORLD
    if dist.get_rank(group) < 0:
        raise RuntimeError("sigmoid_contrastive_loss: this rank is not a member of the given process group")
    return group, dist.get_world_size(group)


_DTYPE_CODES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _gather_local_sizes(x: torch.Tensor, group, world: int) -> list[int]:
    """Every rank's local batch size; raises on every rank alike if feature dims or dtypes differ."""
    dtype_code = list(_DTYPE_CODES).index(x.dtype) if x.dtype in _DTYPE_CODES else -1
    mine = torch.tensor([x.shape[0], x.shape[1], dtype_code], dtype=torch.int64, device=x.device)
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    rows = torch.stack(every).tolist()
    if len({r[1] for r in rows}) > 1 or len({r[2] for r in rows}) > 1:
        raise ValueError(f"sigmoid_contrastive_loss: ranks disagree on feature dim / dtype: "
                         f"(batch, dim, dtype code) per rank = {rows}")
    return [r[0] for r in rows]


def sigmoid_contrastive_loss(image_features: torch.Tensor, text_features: torch.Tensor,
                             logit_scale: torch.Tensor | float, logit_bias: torch.Tensor | float, *,
                             group=None, reduction: str = "global") -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss (Zhai et al. 2023, Algorithm 1).

    Features are L2-normalised along the last dim inside, as in the paper. With
    ``t = exp(logit_scale)`` (inverse temperature) and ``b = logit_bias``::

        loss = -1/|B| * sum_{i, j in B} log sigmoid(z_ij * (t * x_i . y_j + b)),  z_ij = 1 if i == j else -1

    summed over all |B| x |B| image-text pairs of the (global) batch, divided by |B|.

    Distributed: when ``group`` is given, or torch.distributed is initialised (default group), each
    rank passes its local rows and the text features go round the ring of ranks by P2P, so a rank
    holds one ``b_r x b_s`` block of logits at a time (memory flat in the world size). Every rank of
    the group must call this, and backward, together. Local batch sizes may differ between ranks
    (each call all-gathers every rank's batch size, dim and dtype: three int64s and a host sync).
    ``reduction``:

    - ``"global"``: every rank returns the global-batch loss above; backward gives exactly its
      gradients w.r.t. the local features, ``logit_scale`` and ``logit_bias`` (the latter summed
      over ranks), as one process on the global batch would. Treats the loss as one scalar shared
      by the ranks, so backpropagate it on every rank with the same upstream gradient. Under DDP /
      FSDP, whose averaging would divide the encoders' gradients by the world size, use ``per_rank``.
    - ``"per_rank"`` (for DDP / FSDP, which average gradients over ranks): rank r returns
      ``world * (its own image rows' share of the global loss)``, whose mean over ranks is the
      global loss (``1/b * sum`` over its rows with equal local batches, open_clip's convention);
      gradients are those of the sum of the ranks' losses, so after averaging over ranks every
      parameter's gradient is exactly the global-batch gradient.

    Shapes: image_features [b, D], text_features [b, D], floating, same dtype; logit_scale and
    logit_bias 0-dim tensors (learnable) or floats. Returns a 0-dim tensor in the features' dtype
    promoted to at least float32.

    Example::
        loss = sigmoid_contrastive_loss(torch.randn(8, 32), torch.randn(8, 32), math.log(10.0), -10.0)
    """
    _check_features("image_features", image_features, "text_features", text_features)
    if reduction not in SIGLIP_REDUCTIONS:
        raise ValueError(f"reduction must be one of {SIGLIP_REDUCTIONS}, got {reduction!r}")
    acc = _accumulation_dtype(image_features.dtype)
    device = image_features.device
    scalars = []
    for name, value in (("logit_scale", logit_scale), ("logit_bias", logit_bias)):
        if isinstance(value, torch.Tensor):
            if value.numel() != 1 or not value.is_floating_point():
                raise ValueError(f"{name} must be a floating scalar tensor, got dtype {value.dtype} "
                                 f"shape {tuple(value.shape)}")
            value = value.reshape(()).to(device=device, dtype=acc)
        elif isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"{name} must be a finite number or a scalar tensor, got {value!r}")
        else:
            value = torch.tensor(float(value), device=device, dtype=acc)
        scalars.append(value)
    scale, bias = scalars[0].exp(), scalars[1]
    group, world = _resolve_group(group)
    sizes = _gather_local_sizes(image_features, group, world) if world > 1 else [image_features.shape[0]]
    x = F.normalize(image_features.to(acc), dim=-1)
    y = F.normalize(text_features.to(acc), dim=-1)
    return _RingSigmoidLoss.apply(x, y, scale, bias, group, sizes, reduction == "per_rank")


class SigmoidContrastiveLoss(nn.Module):
    """SigLIP loss (Zhai et al. 2023) with learnable temperature and bias; see :func:`sigmoid_contrastive_loss`.

    ``logit_scale = log(1 / temperature)`` (the paper's t', initialised at log 10) and ``logit_bias``
    (initialised at -10) are ``nn.Parameter`` 0-dim tensors (``dtype``, default float32) when
    ``learnable``, buffers otherwise. Features are L2-normalised inside. Under torch.distributed (or with ``group``) the
    loss runs chunked round the ring of ranks and equals the global-batch loss; ``reduction``
    chooses ``"global"`` (every rank returns the global loss and gradients) or ``"per_rank"``
    (for DDP / FSDP gradient averaging).

    forward(image_features [b, D], text_features [b, D]) -> 0-dim loss.

    Example::
        loss_fn = SigmoidContrastiveLoss(temperature=0.1)
        loss = loss_fn(image_features, text_features)
    """

    def __init__(self, temperature: float = 0.1, bias: float = -10.0, learnable: bool = True, *,
                 reduction: str = "global", group=None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        temperature = _check_positive("temperature", temperature)
        if isinstance(bias, bool) or not isinstance(bias, (int, float)) or not math.isfinite(bias):
            raise ValueError(f"bias must be a finite number, got {bias!r}")
        if reduction not in SIGLIP_REDUCTIONS:
            raise ValueError(f"reduction must be one of {SIGLIP_REDUCTIONS}, got {reduction!r}")
        if dtype is not None and not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating dtype, got {dtype}")
        scale = torch.tensor(math.log(1.0 / temperature), device=device, dtype=dtype)
        bias_t = torch.tensor(float(bias), device=device, dtype=dtype)
        if learnable:
            self.logit_scale = nn.Parameter(scale)
            self.logit_bias = nn.Parameter(bias_t)
        else:
            self.register_buffer("logit_scale", scale)
            self.register_buffer("logit_bias", bias_t)
        self.learnable = bool(learnable)
        self.reduction = reduction
        self.group = group

    @property
    def temperature(self) -> float:
        """Current temperature ``exp(-logit_scale)``."""
        return math.exp(-self.logit_scale.detach().item())

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        return sigmoid_contrastive_loss(image_features, text_features, self.logit_scale, self.logit_bias,
                                        group=self.group, reduction=self.reduction)

    def extra_repr(self) -> str:
        return (f"temperature={self.temperature:.4g}, bias={self.logit_bias.detach().item():.4g}, "
                f"learnable={self.learnable}, reduction={self.reduction!r}")


# ---- VICReg ------------------------------------------------------------------------------------


class VICRegTerms(NamedTuple):
    """The three un-weighted VICReg terms, 0-dim tensors."""

    invariance: torch.Tensor
    variance: torch.Tensor
    covariance: torch.Tensor


def _off_diagonal_square_sum(m: torch.Tensor) -> torch.Tensor:
    n = m.shape[0]
    return m.flatten()[:-1].view(n - 1, n + 1)[:, 1:].pow(2).sum()


def vicreg_terms(x: torch.Tensor, y: torch.Tensor, *, eps: float = 1e-4) -> VICRegTerms:
    """VICReg's terms (Bardes et al. 2022, eqs. 1-5), on the raw embeddings (no normalisation):

    - invariance: mean squared error ``mean((x - y)^2)`` over all n x d entries;
    - variance: ``mean_j relu(1 - sqrt(Var(x_j) + eps)) / 2`` plus the same for y (unbiased variance
      over the batch, gamma = 1);
    - covariance: ``sum_{i != j} C(x)_ij^2 / d`` plus the same for y, ``C(x) = xc.T @ xc / (n - 1)``.

    Shapes: x [n, d], y [n, d] floating, n >= 2. Returns :class:`VICRegTerms` in the inputs' dtype
    promoted to at least float32.

    Example::
        inv, var, cov = vicreg_terms(torch.randn(16, 8), torch.randn(16, 8))
    """
    _check_features("x", x, "y", y, min_batch=2)
    eps = _check_positive("eps", eps)
    acc = _accumulation_dtype(x.dtype)
    x, y = x.to(acc), y.to(acc)
    n, d = x.shape
    invariance = F.mse_loss(x, y)
    variance = x.new_zeros(())
    covariance = x.new_zeros(())
    for z in (x, y):
        zc = z - z.mean(dim=0)
        std = torch.sqrt(zc.pow(2).sum(dim=0) / (n - 1) + eps)
        variance = variance + F.relu(1 - std).mean() / 2
        cov = zc.T @ zc / (n - 1)
        covariance = covariance + (_off_diagonal_square_sum(cov) / d if d > 1 else cov.new_zeros(()))
    return VICRegTerms(invariance, variance, covariance)


def vicreg_loss(x: torch.Tensor, y: torch.Tensor, *, sim_coeff: float = 25.0, std_coeff: float = 25.0,
                cov_coeff: float = 1.0, eps: float = 1e-4) -> torch.Tensor:
    """``sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance``; see :func:`vicreg_terms`.

    Shapes: x [n, d], y [n, d] floating, n >= 2 -> 0-dim tensor.

    Example::
        loss = vicreg_loss(torch.randn(16, 8), torch.randn(16, 8))
    """
    sim_coeff = _check_coeff("sim_coeff", sim_coeff)
    std_coeff = _check_coeff("std_coeff", std_coeff)
    cov_coeff = _check_coeff("cov_coeff", cov_coeff)
    t = vicreg_terms(x, y, eps=eps)
    return sim_coeff * t.invariance + std_coeff * t.variance + cov_coeff * t.covariance


class VICRegLoss(nn.Module):
    """VICReg loss (Bardes et al. 2022) on raw embeddings (not normalised); see :func:`vicreg_loss`.

    forward(x [n, d], y [n, d]) -> 0-dim loss; ``terms(x, y)`` gives the three un-weighted terms.

    Example::
        loss_fn = VICRegLoss(sim_coeff=25, std_coeff=25, cov_coeff=1)
        loss = loss_fn(z_a, z_b)
    """

    def __init__(self, sim_coeff: float = 25.0, std_coeff: float = 25.0, cov_coeff: float = 1.0,
                 eps: float = 1e-4) -> None:
        super().__init__()
        self.sim_coeff = _check_coeff("sim_coeff", sim_coeff)
        self.std_coeff = _check_coeff("std_coeff", std_coeff)
        self.cov_coeff = _check_coeff("cov_coeff", cov_coeff)
        self.eps = _check_positive("eps", eps)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return vicreg_loss(x, y, sim_coeff=self.sim_coeff, std_coeff=self.std_coeff, cov_coeff=self.cov_coeff,
                           eps=self.eps)

    def terms(self, x: torch.Tensor, y: torch.Tensor) -> VICRegTerms:
        return vicreg_terms(x, y, eps=self.eps)

    def extra_repr(self) -> str:
        return f"sim_coeff={self.sim_coeff}, std_coeff={self.std_coeff}, cov_coeff={self.cov_coeff}"
