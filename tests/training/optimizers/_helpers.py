"""Helpers shared by the optimizer tests (import with ``from ._helpers import ...``)."""
import torch
from torch import nn


def gen(seed: int):
    return torch.Generator().manual_seed(seed)


def sum_of_squares_closure(opt, *params):
    """A ``step`` closure: zero the grads, backpropagate sum_p (p**2).sum() and return that loss."""

    def closure():
        opt.zero_grad()
        loss = sum((p**2).sum() for p in params)
        loss.backward()
        return loss

    return closure


def sparse_grad_embedding(dim: int) -> nn.Embedding:
    """An ``nn.Embedding(10, dim, sparse=True)`` whose weight already holds a sparse gradient."""
    emb = nn.Embedding(10, dim, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    return emb


def ill_conditioned_regression(steps: int, make_optimizer) -> float:
    """min_W mean ||X W^T - Y||^2 with rotated, ill-conditioned inputs (condition number 100)."""
    g = gen(0)
    d, n = 32, 256
    Q = torch.linalg.qr(torch.randn(d, d, generator=g))[0]
    X = torch.randn(n, d, generator=g) * torch.logspace(0, -2, d) @ Q.T
    Y = X @ torch.randn(d, d, generator=g)
    W = nn.Parameter(torch.zeros(d, d))
    opt = make_optimizer([W])
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 - t / steps)
    for _ in range(steps):
        opt.zero_grad()
        ((X @ W.T - Y) ** 2).mean().backward()
        opt.step()
        schedule.step()
    return ((X @ W.T - Y) ** 2).mean().item()
