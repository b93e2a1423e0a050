"""Prodigy against prodigyopt's update equations (the default) and the paper's Algorithm 4 (Adam
form) in float64, D growth on a simple problem, sharded D estimation over two Gloo ranks, and the
optimizer machinery."""
import copy
import math

import pytest
import torch
import torch.distributed as dist

from nexus.training.optimizers import Prodigy
from nexus.training.optimizers.prodigy import prodigy_next_d

from tests.distributed.harness import run_distributed

from ._helpers import sparse_grad_embedding, sum_of_squares_closure

SHAPES = [(), (5,), (3, 4), (2, 2, 3)]


class ProdigyoptEquations:
    """``prodigyopt.Prodigy.step`` (v1.1.2, the reference code users switch from), written out here:
    r and s scaled by d/d0 with no (1 - beta3), dlr = d * lr * bias correction, the first move off
    d0 not bounded by growth_rate, eps times the *updated* d, and no step while ||s||_1 is 0."""

    def __init__(self, x0, lr, betas, beta3, d0, d_coef, wd, growth, eps, decouple, bias_correction,
                 safeguard_warmup):
        self.x = [t.clone() for t in x0]
        self.x0 = [t.clone() for t in x0]
        self.m = [torch.zeros_like(t) for t in x0]
        self.v = [torch.zeros_like(t) for t in x0]
        self.s = [torch.zeros_like(t) for t in x0]
        self.r, self.d0, self.d, self.d_max, self.k = 0.0, d0, d0, d0, 0
        self.lr, (self.b1, self.b2), self.d_coef, self.wd = lr, betas, d_coef, wd
        self.b3 = math.sqrt(self.b2) if beta3 is None else beta3
        self.growth, self.eps, self.decouple = growth, eps, decouple
        self.bias_correction, self.safeguard_warmup = bias_correction, safeguard_warmup

    def step(self, grads):
        b1, b2, b3, d, d0 = self.b1, self.b2, self.b3, self.d, self.d0
        bc = math.sqrt(1 - b2 ** (self.k + 1)) / (1 - b1 ** (self.k + 1)) if self.bias_correction else 1.0
        dlr = d * self.lr * bc
        if not self.decouple:
            grads = [g + self.wd * x for g, x in zip(grads, self.x)]
        r = b3 * self.r + sum((d / d0) * dlr * float(torch.sum(g * (x0 - x)))
                              for g, x0, x in zip(grads, self.x0, self.x))
        s_scale = (d / d0) * (d if self.safeguard_warmup else dlr)
        self.s = [b3 * s + s_scale * g for s, g in zip(self.s, grads)]
        self.m = [b1 * m + (1 - b1) * d * g for m, g in zip(self.m, grads)]
        self.v = [b2 * v + (1 - b2) * d * d * g * g for v, g in zip(self.v, grads)]
        denom = sum(float(s.abs().sum()) for s in self.s)
        if denom == 0.0:
            return
        d_hat = self.d_coef * r / denom
        if d == d0:
            d = max(d, d_hat)
        self.d_max = max(self.d_max, d_hat)
        self.d = min(self.d_max, d * self.growth)
        if self.decouple:
            self.x = [x - self.wd * dlr * x for x in self.x]
        self.x = [x - dlr * m / (v.sqrt() + self.d * self.eps) for x, m, v in zip(self.x, self.m, self.v)]
        self.r, self.k = r, self.k + 1


class PaperProdigy:
    """Mishchenko & Defazio 2023, Algorithm 4, with the options the class exposes."""

    def __init__(self, x0, lr, betas, beta3, d0, d_coef, wd, growth, eps, decouple, bias_correction,
                 safeguard_warmup):
        assert not safeguard_warmup  # not part of Algorithm 4
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


def _quadratic_grads(xs, targets, gen, scale=1.0):
    # Noisy gradient of sum 0.5 * ||x - target||^2: pulls x away from x0, so d grows.
    return [x - t + 0.1 * scale * torch.randn(x.shape, generator=gen, dtype=torch.float64)
            for x, t in zip(xs, targets)]


DEFAULTS = dict(lr=1.0, betas=(0.9, 0.999), beta3=None, d0=1e-6, d_coef=1.0, weight_decay=0.0,
                growth_rate=math.inf, eps=1e-8, decouple=True, use_bias_correction=False,
                safeguard_warmup=False)
CONFIGS = {
    "defaults": dict(),
    "decoupled_decay_bias_growth": dict(weight_decay=0.1, use_bias_correction=True, growth_rate=1.5,
                                        d_coef=2.0, betas=(0.8, 0.99)),
    "coupled_decay_beta3": dict(weight_decay=0.05, decouple=False, beta3=0.9, d0=1e-3),
}
PRODIGYOPT_CONFIGS = CONFIGS | {
    "safeguard_warmup_eps_1e-4": dict(safeguard_warmup=True, eps=1e-4, lr=0.5),
}
# x0, targets and noise times this scale: gradients ~1e-3, where eps * d matters most.
SMALL = 1e-3
# The d_hat that first moves d divides by ||x0 - x|| after one step of size ~d0: x0 - x keeps
# ~10 digits in float64, so two exact implementations agree to ~1e-11, not to 1e-16.
RTOL = 1e-10


def _run_against(oracle_cls, config, foreach, steps, zero_grad_steps=0, scale=1.0, **extra):
    """Prodigy(**config, **extra) and the oracle on the same gradients; returns both, and the
    largest relative difference in d seen over the steps."""
    kwargs = config | extra
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) * scale for s in SHAPES]
    targets = [torch.randn(s, generator=gen, dtype=torch.float64) * 3 * scale for s in SHAPES]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = Prodigy(params, foreach=foreach, **kwargs)
    full = DEFAULTS | config
    oracle = oracle_cls(init, full["lr"], full["betas"], full["beta3"], full["d0"], full["d_coef"],
                        full["weight_decay"], full["growth_rate"], full["eps"], full["decouple"],
                        full["use_bias_correction"], full["safeguard_warmup"])
    worst_d = 0.0
    for step in range(steps):
        grads = _quadratic_grads(oracle.x, targets, gen, scale)
        if step < zero_grad_steps:
            grads = [torch.zeros_like(g) for g in grads]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        oracle.step(grads)
        worst_d = max(worst_d, abs(opt.param_groups[0]["d"] / oracle.d - 1))
    return opt, params, oracle, worst_d


# coupled_decay_beta3 starts at d0 = 1e-3, already the distance at gradients ~1e-3: d would not move.
PRODIGYOPT_CASES = [(c, 1.0) for c in PRODIGYOPT_CONFIGS] + [(c, SMALL) for c in PRODIGYOPT_CONFIGS
                                                            if c != "coupled_decay_beta3"]


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("config, scale", PRODIGYOPT_CASES,
                         ids=[f"{c}-gradients_{s:g}" for c, s in PRODIGYOPT_CASES])
def test_default_matches_prodigyopt_equations_over_40_steps(config, scale, foreach):
    kwargs = PRODIGYOPT_CONFIGS[config]
    opt, params, ref, worst_d = _run_against(ProdigyoptEquations, kwargs, foreach, steps=40, scale=scale)
    assert worst_d < RTOL
    assert ref.d > 100 * (DEFAULTS | kwargs)["d0"]  # the estimate moved, so the comparison covered growth
    assert opt.param_groups[0]["k"] == ref.k == 40
    for p, x in zip(params, ref.x):
        torch.testing.assert_close(p.detach(), x, rtol=RTOL, atol=RTOL * scale)


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_default_skips_steps_without_gradient_signal_like_prodigyopt(foreach):
    # Two all-zero gradients first: prodigyopt neither moves (not even weight decay) nor counts them.
    config = dict(weight_decay=0.1, use_bias_correction=True)
    opt, params, ref, worst_d = _run_against(ProdigyoptEquations, config, foreach, steps=12, zero_grad_steps=2)
    assert worst_d < RTOL
    assert opt.param_groups[0]["k"] == ref.k == 10
    for p, x in zip(params, ref.x):
        torch.testing.assert_close(p.detach(), x, rtol=RTOL, atol=RTOL)


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_paper_variant_matches_algorithm_4(config, foreach):
    opt, params, paper, worst_d = _run_against(PaperProdigy, CONFIGS[config], foreach, steps=40, variant="paper")
    assert worst_d < RTOL
    assert paper.d > 100 * (DEFAULTS | CONFIGS[config])["d0"]
    for p, x in zip(params, paper.x):
        torch.testing.assert_close(p.detach(), x, rtol=RTOL, atol=RTOL)


def test_the_paper_variant_drifts_from_prodigyopt_by_1e_3_with_defaults():
    # What the default fixes: Algorithm 4's d_k * eps is not prodigyopt's d_{k+1} * eps, and with
    # small gradients the two are 1e7 times further apart than the tolerance above.
    _, params, ref, _ = _run_against(ProdigyoptEquations, {}, False, steps=40, scale=SMALL, variant="paper")
    gap = max(((p.detach() - x).abs().max() / x.abs().max()).item() for p, x in zip(params, ref.x))
    assert gap > 1e-3


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


@pytest.mark.parametrize("variant", ["prodigyopt", "paper"])
def test_growth_rate_bounds_each_step(variant):
    torch.manual_seed(2)
    target = torch.randn(20, dtype=torch.float64) * 5
    x = torch.nn.Parameter(torch.zeros(20, dtype=torch.float64))
    opt = Prodigy([x], growth_rate=1.02, variant=variant)
    ds = [opt.param_groups[0]["d"]]
    for _ in range(100):
        opt.zero_grad()
        (0.5 * ((x - target) ** 2).sum()).backward()
        opt.step()
        ds.append(opt.param_groups[0]["d"])
    # prodigyopt: the first move off d0 goes straight to d_hat; the paper bounds it too.
    first = 1 if variant == "paper" else ds.index(next(d for d in ds if d != ds[0])) + 1
    if variant == "prodigyopt":
        assert ds[first - 1] > 1.02 * ds[0]
    for previous, d in zip(ds[first - 1:], ds[first:]):
        assert previous <= d <= previous * 1.02 * (1 + 1e-12)
    assert ds[-1] > ds[first]  # it kept growing, under the bound


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
    (dict(variant="adam"), "variant='adam'"),
], ids=["lr", "beta1", "beta2", "beta3", "d0", "d_coef", "weight_decay", "growth_rate", "eps", "variant"])
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
