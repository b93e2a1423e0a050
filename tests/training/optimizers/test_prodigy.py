"""Prodigy against the paper's Algorithm 4 (Adam form) in float64, D growth on a simple problem,
sharded D estimation over two Gloo ranks, and the optimizer machinery."""
import copy
import math

import pytest
import torch
import torch.distributed as dist

from nexus.training.optimizers import Prodigy
from nexus.training.optimizers.prodigy import prodigy_next_d

from distributed.harness import run_distributed

from ._helpers import sparse_grad_embedding, sum_of_squares_closure

SHAPES = [(), (5,), (3, 4), (2, 2, 3)]


class PaperProdigy:
    """Mishchenko & Defazio 2023, Algorithm 4, with the options the class exposes."""

    def __init__(self, x0, lr, betas, beta3, d0, d_coef, wd, growth, eps, decouple, bias_correction):
        self.x = [t.clone() for t in x0]
        self.x0 = [t.clone() for t in x0]
        self.m = [torch.zeros_like(t) for t in x0]
        self.v = [torch.zeros_like(t) for t in x0]
        self.s = [torch.zeros_like(t) for t in x0]
        self.r, self.d, self.d_max, self.k = 0.0, d0, d0, 0
        self.lr, (self.b1, self.b2), self.d_coef, self.wd = lr, betas, d_coef, wd
        self.b3 = math.sqrt(self.b2) if beta3 is None else beta3
        self.growth, self.eps, self.decouple, self.bias_correction = growth, eps, decouple, bias_correction

    def step(self, grads):
        self.k += 1
        lam = self.lr
        if self.bias_correction:
            lam *= math.sqrt(1 - self.b2 ** self.k) / (1 - self.b1 ** self.k)
        d, b1, b2, b3 = self.d, self.b1, self.b2, self.b3
        if not self.decouple:
            grads = [g + self.wd * x for g, x in zip(grads, self.x)]
        inner = sum(float(torch.sum(g * (x0 - x))) for g, x0, x in zip(grads, self.x0, self.x))
        self.r = b3 * self.r + (1 - b3) * lam * d ** 2 * inner
        self.s = [b3 * s + (1 - b3) * lam * d ** 2 * g for s, g in zip(self.s, grads)]
        d_hat = self.d_coef * self.r / sum(float(s.abs().sum()) for s in self.s)
        self.m = [b1 * m + (1 - b1) * d * g for m, g in zip(self.m, grads)]
        self.v = [b2 * v + (1 - b2) * d ** 2 * g ** 2 for v, g in zip(self.v, grads)]
        if self.decouple:
            self.x = [x - self.wd * lam * d * x for x in self.x]
        self.x = [x - lam * d * m / (v.sqrt() + d * self.eps) for x, m, v in zip(self.x, self.m, self.v)]
        self.d_max = max(self.d_max, d_hat)
        self.d = min(self.d_max, d * self.growth)


def _quadratic_grads(xs, targets, gen):
    # Noisy gradient of sum 0.5 * ||x - target||^2: pulls x away from x0, so d grows.
    return [x - t + 0.1 * torch.randn(x.shape, generator=gen, dtype=torch.float64)
            for x, t in zip(xs, targets)]


CONFIGS = {
    "defaults": dict(),
    "decoupled_decay_bias_growth": dict(weight_decay=0.1, use_bias_correction=True, growth_rate=1.5,
                                        d_coef=2.0, betas=(0.8, 0.99)),
    "coupled_decay_beta3": dict(weight_decay=0.05, decouple=False, beta3=0.9, d0=1e-3),
}


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_matches_paper_over_steps(config, foreach):
    kwargs = CONFIGS[config]
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    targets = [torch.randn(s, generator=gen, dtype=torch.float64) * 3 for s in SHAPES]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = Prodigy(params, foreach=foreach, **kwargs)
    full = dict(lr=1.0, betas=(0.9, 0.999), beta3=None, d0=1e-6, d_coef=1.0, weight_decay=0.0,
                growth_rate=math.inf, eps=1e-8, decouple=True, use_bias_correction=False) | kwargs
    paper = PaperProdigy(init, full["lr"], full["betas"], full["beta3"], full["d0"], full["d_coef"],
                         full["weight_decay"], full["growth_rate"], full["eps"], full["decouple"],
                         full["use_bias_correction"])
    for _ in range(12):
        grads = _quadratic_grads(paper.x, targets, gen)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        paper.step(grads)
        assert opt.param_groups[0]["d"] == pytest.approx(paper.d, rel=1e-10)
    assert paper.d > 10 * full["d0"]  # the estimate moved, so the comparison covered growth
    for p, x in zip(params, paper.x):
        torch.testing.assert_close(p.detach(), x, rtol=1e-10, atol=1e-14)


def test_d_grows_from_d0_towards_the_distance_to_the_solution():
    torch.manual_seed(1)
    target = torch.randn(50, dtype=torch.float64) * 2
    x = torch.nn.Parameter(torch.zeros(50, dtype=torch.float64))
    opt = Prodigy([x], d0=1e-6)
    ds = []
    for _ in range(300):
        opt.zero_grad()
        loss = 0.5 * ((x - target) ** 2).sum()
        loss.backward()
        opt.step()
        ds.append(opt.param_groups[0]["d"])
    assert all(b >= a for a, b in zip(ds, ds[1:]))  # d never decreases
    distance = target.norm().item()
    # d_hat is a lower bound on D in the l1/l_inf geometry Adam uses; it should reach its scale.
    assert 1e-3 * distance < ds[-1] < 10 * distance
    assert ds[-1] > 1e3 * 1e-6
    assert (x.detach() - target).norm() < 0.05 * distance


def test_growth_rate_bounds_each_step():
    torch.manual_seed(2)
    target = torch.randn(20, dtype=torch.float64) * 5
    x = torch.nn.Parameter(torch.zeros(20, dtype=torch.float64))
    opt = Prodigy([x], growth_rate=1.02)
    previous = opt.param_groups[0]["d"]
    grew = False
    for _ in range(100):
        opt.zero_grad()
        (0.5 * ((x - target) ** 2).sum()).backward()
        opt.step()
        d = opt.param_groups[0]["d"]
        assert previous <= d <= previous * 1.02 * (1 + 1e-12)
        grew |= d > previous
        previous = d
    assert grew


def test_next_d_function():
    assert prodigy_next_d(1e-6, 1e-6, 3e-6, 1.0, d_coef=1.0, growth_rate=math.inf) == (3e-6, 3e-6, 3e-6)
    assert prodigy_next_d(1.0, 1.0, -5.0, 1.0, d_coef=1.0, growth_rate=math.inf) == (1.0, 1.0, -5.0)
    assert prodigy_next_d(1.0, 1.0, 10.0, 1.0, d_coef=0.5, growth_rate=2.0) == (2.0, 5.0, 5.0)
    assert prodigy_next_d(1.0, 1.0, 10.0, 0.0, d_coef=1.0, growth_rate=2.0) == (1.0, 1.0, 1.0)


def test_d_is_shared_by_every_group_and_lr_zero_group_is_frozen():
    torch.manual_seed(3)
    a = torch.nn.Parameter(torch.zeros(4, dtype=torch.float64))
    frozen = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    opt = Prodigy([{"params": [a]}, {"params": [frozen], "lr": 0.0}])
    for _ in range(5):
        a.grad = a.detach() - 3.0
        frozen.grad = torch.ones(4, dtype=torch.float64)
        opt.step()
    assert opt.param_groups[0]["d"] == opt.param_groups[1]["d"] > 1e-6
    assert opt.param_groups[0]["k"] == opt.param_groups[1]["k"] == 5
    assert torch.equal(frozen.detach(), torch.ones(4, dtype=torch.float64))


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_state_dict_resume_is_bit_identical(foreach):
    gen = torch.Generator().manual_seed(4)
    shapes = [(4, 3), (6,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    targets = [torch.randn(s, generator=gen) * 3 for s in shapes]
    noise = [[torch.randn(s, generator=gen) * 0.1 for s in shapes] for _ in range(8)]

    def run(opt, ps, steps):
        for step_noise in steps:
            for p, t, n in zip(ps, targets, step_noise):
                p.grad = p.detach() - t + n
            opt.step()

    opt = Prodigy(params, weight_decay=0.01, use_bias_correction=True, foreach=foreach)
    run(opt, params, noise[:4])
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    run(opt, params, noise[4:])
    resumed = [torch.nn.Parameter(t.clone()) for t in saved_params]
    opt2 = Prodigy(resumed, foreach=foreach)
    opt2.load_state_dict(saved_state)
    run(opt2, resumed, noise[4:])
    assert opt.param_groups[0]["d"] == opt2.param_groups[0]["d"]
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


def test_closure_loss_is_returned():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Prodigy([w])

    assert opt.step(sum_of_squares_closure(opt, w)).item() == pytest.approx(5.0)
    assert not torch.equal(w.detach(), torch.tensor([1.0, -2.0]))


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"),
    (dict(betas=(1.0, 0.99)), r"betas\[0\]"),
    (dict(betas=(0.9, -0.5)), r"betas\[1\]"),
    (dict(beta3=1.0), "beta3"),
    (dict(d0=0.0), "d0"),
    (dict(d_coef=-1.0), "d_coef"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(growth_rate=0.5), "growth_rate"),
    (dict(eps=-1.0), "eps"),
], ids=["lr", "beta1", "beta2", "beta3", "d0", "d_coef", "weight_decay", "growth_rate", "eps"])
def test_invalid_hyperparameters_name_the_culprit(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Prodigy([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_sparse_gradients_rejected():
    emb = sparse_grad_embedding(3)
    with pytest.raises(RuntimeError, match="sparse"):
        Prodigy(emb.parameters()).step()


def _sharded_rank(rank, world):
    gen = torch.Generator().manual_seed(5)
    full = torch.randn(8, 3, generator=gen, dtype=torch.float64)
    target = torch.randn(8, 3, generator=gen, dtype=torch.float64) * 3
    shard = torch.nn.Parameter(full.chunk(world)[rank].clone())
    opt = Prodigy([shard], sharded_params=True)
    for _ in range(6):
        shard.grad = shard.detach() - target.chunk(world)[rank]
        opt.step()
    gathered = [torch.empty_like(shard) for _ in range(world)]
    dist.all_gather(gathered, shard.detach())
    return torch.cat(gathered), opt.param_groups[0]["d"]


@pytest.mark.slow
@pytest.mark.distributed
def test_sharded_d_estimate_matches_single_process():
    (sharded, sharded_d), rank1 = run_distributed(_sharded_rank, world_size=2)
    assert rank1[1] == sharded_d  # one d for the whole model, on every rank
    assert torch.equal(rank1[0], sharded)
    gen = torch.Generator().manual_seed(5)
    full = torch.nn.Parameter(torch.randn(8, 3, generator=gen, dtype=torch.float64))
    target = torch.randn(8, 3, generator=gen, dtype=torch.float64) * 3
    opt = Prodigy([full])
    for _ in range(6):
        full.grad = full.detach() - target
        opt.step()
    assert sharded_d == pytest.approx(opt.param_groups[0]["d"], rel=1e-12)
    assert sharded_d > 1e-6
    torch.testing.assert_close(sharded, full.detach(), rtol=1e-12, atol=1e-14)
