"""Meta-learning: an initialisation that adapts to a new task in a few gradient steps.

- ``MAML`` (Finn et al. 2017): the meta-loss is the query loss after ``inner_steps`` SGD steps on the support
  set, differentiated through those steps (second order, ``create_graph``) or not (first-order MAML).
- ``Reptile`` (Nichol et al. 2018): adapt a copy on each task, move the weights toward the adapted ones.

A task is ``(support_x, support_y, query_x, query_y)``; the loss is ``loss_fn(model(x), y)`` (default MSE).
The inner loop runs on ``torch.func.functional_call``, so the module itself is never modified by adaptation.

Example::
    maml = MAML(model, inner_lr=0.01, inner_steps=1)
    meta_opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    meta_opt.zero_grad(); maml.meta_loss(tasks).backward(); meta_opt.step()
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch.func import functional_call

__all__ = ["MAML", "Reptile"]

Task = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _check_tasks(tasks: Sequence[Task]) -> None:
    if len(tasks) == 0:
        raise ValueError("tasks is empty: give at least one (support_x, support_y, query_x, query_y)")
    for i, task in enumerate(tasks):
        if len(task) != 4:
            raise ValueError(f"task {i} has {len(task)} parts; a task is (support_x, support_y, query_x, query_y)")


class _Adapter:
    """The inner loop shared by MAML and Reptile: SGD on the support loss through ``functional_call``."""

    def __init__(self, model: torch.nn.Module, inner_lr: float, inner_steps: int, loss_fn: LossFn | None,
                 vectorize: bool):
        if not inner_lr > 0:
            raise ValueError(f"inner_lr must be positive, got {inner_lr}")
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be >= 1, got {inner_steps}")
        self.model = model
        self.inner_lr = float(inner_lr)
        self.inner_steps = int(inner_steps)
        self.loss_fn = loss_fn or F.mse_loss
        self.vectorize = vectorize

    def params(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.model.named_parameters() if p.requires_grad}

    def forward_with(self, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """The model's output on ``x`` with ``params`` in place of its trainable parameters."""
        return functional_call(self.model, params, (x,), strict=False)

    def adapt(self, support_x: torch.Tensor, support_y: torch.Tensor, *, steps: int | None = None,
              lr: float | None = None, first_order: bool = True, params: dict | None = None
              ) -> dict[str, torch.Tensor]:
        """Parameters after ``steps`` (default ``inner_steps``) SGD steps on the support loss, each gradient taken
        with ``torch.func.grad`` (so tasks can be batched under ``torch.func.vmap``).

        ``first_order=False`` keeps each step's gradient differentiable (second-order MAML); otherwise the
        gradients are constants, so the result depends on the starting parameters with an identity Jacobian.
        """
        params = dict(self.params() if params is None else params)
        lr = self.inner_lr if lr is None else lr
        for _ in range(self.inner_steps if steps is None else steps):
            grads = torch.func.grad(self._loss)(params, support_x, support_y)
            params = {n: p - lr * (grads[n].detach() if first_order else grads[n]) for n, p in params.items()}
        return params

    def _loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(self.forward_with(params, x), y)

    def _batched(self, tasks: Sequence[Task]) -> tuple[torch.Tensor, ...] | None:
        """The tasks stacked along a new dim 0 when ``vectorize`` is on and their shapes match, else None."""
        if not self.vectorize or len({tuple(t.shape for t in task) for task in tasks}) != 1:
            return None
        return tuple(torch.stack([task[i] for task in tasks]) for i in range(4))


class MAML(_Adapter):
    """Model-Agnostic Meta-Learning. ``meta_loss(tasks)`` is the mean over tasks of the query loss after
    adaptation on the support set, differentiable with respect to the model's parameters: backward it and
    step any optimizer over ``model.parameters()``.

    Second order (default) differentiates through the inner gradient steps (the Hessian-vector products of
    the support loss); ``first_order=True`` treats the inner gradients as constants, so the meta-gradient is the
    query loss's gradient at the adapted parameters (FOMAML). ``vectorize=True`` runs tasks of equal shapes
    together under ``torch.func.vmap`` (the model must support vmap: no in-place buffer updates, no dropout).

    Example::
        maml = MAML(model, inner_lr=0.01, inner_steps=1, first_order=False)
        loss = maml.meta_loss([(xs, ys, xq, yq) for ...]); loss.backward()
    """

    def __init__(self, model: torch.nn.Module, inner_lr: float, inner_steps: int = 1, first_order: bool = False,
                 *, loss_fn: LossFn | None = None, vectorize: bool = False):
        super().__init__(model, inner_lr, inner_steps, loss_fn, vectorize)
        self.first_order = first_order

    def task_loss(self, support_x: torch.Tensor, support_y: torch.Tensor, query_x: torch.Tensor,
                  query_y: torch.Tensor, params: dict | None = None) -> torch.Tensor:
        """One task's query loss after adaptation (0-dim)."""
        params = self.params() if params is None else params
        adapted = self.adapt(support_x, support_y, first_order=self.first_order, params=params)
        return self._loss(adapted, query_x, query_y)

    def meta_loss(self, tasks: Sequence[Task]) -> torch.Tensor:
        """Mean query loss after adaptation; a 0-dim tensor in the model's dtype with a graph to its parameters."""
        _check_tasks(tasks)
        batched = self._batched(tasks)
        if batched is not None:
            params = self.params()
            losses = torch.func.vmap(self.task_loss, in_dims=(0, 0, 0, 0, None))(*batched, params)
            return losses.mean()
        return torch.stack([self.task_loss(*task) for task in tasks]).mean()


class Reptile(_Adapter):
    """Reptile: ``meta_step(tasks)`` adapts a copy of the weights on each task's support set (``inner_steps`` SGD
    steps at ``inner_lr``) and moves the model toward them: ``theta <- theta + meta_lr * mean_t(theta_t - theta)``.
    Returns the mean query loss after adaptation (a float, for monitoring). ``vectorize`` as in ``MAML``.

    Example::
        reptile = Reptile(model, inner_lr=0.02, inner_steps=5, meta_lr=0.1)
        for tasks in task_batches:
            reptile.meta_step(tasks)
    """

    def __init__(self, model: torch.nn.Module, inner_lr: float, inner_steps: int, meta_lr: float,
                 *, loss_fn: LossFn | None = None, vectorize: bool = False):
        super().__init__(model, inner_lr, inner_steps, loss_fn, vectorize)
        if not meta_lr > 0:
            raise ValueError(f"meta_lr must be positive, got {meta_lr}")
        self.meta_lr = float(meta_lr)

    def _adapted(self, start: dict, support_x, support_y, query_x, query_y):
        adapted = self.adapt(support_x, support_y, params=start)
        return adapted, self._loss(adapted, query_x, query_y)

    def meta_step(self, tasks: Sequence[Task]) -> float:
        _check_tasks(tasks)
        params = self.params()
        start = {n: p.detach() for n, p in params.items()}
        with torch.no_grad():  # torch.func.grad inside still differentiates; nothing else needs a graph
            batched = self._batched(tasks)
            if batched is not None:
                adapted, losses = torch.func.vmap(self._adapted, in_dims=(None, 0, 0, 0, 0))(start, *batched)
                delta = {n: (adapted[n] - start[n]).mean(0) for n in start}
            else:
                delta = {n: torch.zeros_like(p) for n, p in start.items()}
                losses = []
                for task in tasks:
                    adapted, loss = self._adapted(start, *task)
                    losses.append(loss)
                    for n in delta:
                        delta[n] += (adapted[n] - start[n]) / len(tasks)
                losses = torch.stack(losses)
            for n, p in params.items():
                p.add_(delta[n], alpha=self.meta_lr)
        return losses.mean().item()
