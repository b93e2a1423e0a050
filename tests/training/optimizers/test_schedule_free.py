"""Schedule-Free AdamW against the paper's y/z/x sequences in float64, train/eval switching,
and the optimizer machinery."""
import copy

import pytest
import torch

from nexus.training.optimizers import ScheduleFreeAdamW

from ._helpers import sparse_grad_embedding, sum_of_squares_closure

SHAPES = [(), (5,), (3, 4), (2, 3, 2)]


class PaperScheduleFree:
    """Defazio et al. 2024, Algorithm 1 (AdamW form), keeping x, z and y explicitly."""

    def __init__(self, x0, lr, betas, warmup, wd, eps, r, power):
        self.x = [t.clone() for t in x0]
        self.z = [t.clone() for t in x0]
        self.v = [torch.zeros_like(t) for t in x0]
        self.lr, (self.b1, self.b2), self.warmup, self.wd = lr, betas, warmup, wd
        self.eps, self.r, self.power = eps, r, power
        self.t, self.lr_max, self.weight_sum = 0, 0.0, 0.0

    @property
    def y(self):
        return [(1 - self.b1) * z + self.b1 * x for z, x in zip(self.z, self.x)]

    def step(self, grads):
        self.t += 1
        t = self.t
        gamma = self.lr * min(1.0, t / self.warmup) if self.warmup else self.lr
        ys = self.y
        self.v = [self.b2 * v + (1 - self.b2) * g ** 2 for v, g in zip(self.v, grads)]
        us = [g / ((v / (1 - self.b2 ** t)).sqrt() + self.eps) + self.wd * y
              for g, v, y in zip(grads, self.v, ys)]
        self.z = [z - gamma * u for z, u in zip(self.z, us)]
        self.lr_max = max(self.lr_max, gamma)
        weight = t ** self.r * self.lr_max ** self.power
        self.weight_sum += weight
        c = weight / self.weight_sum
        self.x = [(1 - c) * x + c * z for x, z in zip(self.x, self.z)]


CONFIGS = {
    "defaults": dict(),
    "warmup_decay_r": dict(lr=0.01, warmup_steps=4, weight_decay=0.1, betas=(0.8, 0.95), r=1.0),
    "power0_eps": dict(lr=0.05, weight_lr_power=0.0, eps=1e-3),
}


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("config", list(CONFIGS), ids=list(CONFIGS))
def test_matches_paper_sequences(config, foreach):
    kwargs = CONFIGS[config]
    full = dict(lr=0.0025, betas=(0.9, 0.999), warmup_steps=0, weight_decay=0.0, eps=1e-8, r=0.0,
                weight_lr_power=2.0) | kwargs
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    targets = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = ScheduleFreeAdamW(params, foreach=foreach, **kwargs)
    paper = PaperScheduleFree(init, full["lr"], full["betas"], full["warmup_steps"],
                              full["weight_decay"], full["eps"], full["r"], full["weight_lr_power"])
    for step in range(10):
        grads = [y - t + 0.1 * torch.randn(y.shape, generator=gen, dtype=torch.float64)
                 for y, t in zip(paper.y, targets)]
        for p, y, g in zip(params, paper.y, grads):
            torch.testing.assert_close(p.detach(), y, rtol=1e-12, atol=1e-14)
            p.grad = g.clone()
        opt.step()
        paper.step(grads)
        if step % 3 == 2:
            # Evaluate at x mid-run, then return to y and keep training.
            opt.eval()
            for p, x in zip(params, paper.x):
                torch.testing.assert_close(p.detach(), x, rtol=1e-12, atol=1e-14)
            opt.train()
    for p, y, z in zip(params, paper.y, paper.z):
        torch.testing.assert_close(p.detach(), y, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[p]["z"], z, rtol=1e-12, atol=1e-14)
    assert opt.param_groups[0]["k"] == 10


def test_step_in_eval_mode_is_a_clear_error():
    p = torch.nn.Parameter(torch.ones(3))
    opt = ScheduleFreeAdamW([p])
    p.grad = torch.ones(3)
    opt.step()
    opt.eval()
    before = p.detach().clone()
    with pytest.raises(RuntimeError, match=r"optimizer\.train\(\)"):
        opt.step()
    assert torch.equal(p.detach(), before)


def test_train_and_eval_are_idempotent_and_inverse():
    gen = torch.Generator().manual_seed(1)
    p = torch.nn.Parameter(torch.randn(6, generator=gen, dtype=torch.float64))
    opt = ScheduleFreeAdamW([p], lr=0.1)
    opt.eval()
    opt.train()  # before any step there is no z: nothing moves
    for _ in range(3):
        p.grad = torch.randn(6, generator=gen, dtype=torch.float64)
        opt.step()
    y = p.detach().clone()
    opt.eval()
    x = p.detach().clone()
    opt.eval()
    assert torch.equal(p.detach(), x)
    assert not torch.allclose(x, y)
    opt.train()
    opt.train()
    torch.testing.assert_close(p.detach(), y, rtol=1e-14, atol=1e-15)


def test_x_converges_on_a_quadratic_without_a_schedule():
    torch.manual_seed(2)
    target = torch.randn(30)
    p = torch.nn.Parameter(torch.zeros(30))
    opt = ScheduleFreeAdamW([p], lr=0.05, warmup_steps=10)
    for _ in range(400):
        opt.zero_grad()
        (0.5 * ((p - target) ** 2).sum()).backward()
        p.grad += 0.3 * torch.randn(30)  # noise: x (the average) beats the raw iterates
        opt.step()
    opt.eval()
    assert (p.detach() - target).norm() < 0.1 * target.norm()


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_state_dict_resume_is_bit_identical(foreach):
    gen = torch.Generator().manual_seed(3)
    shapes = [(4, 3), (6,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(8)]

    def run(opt, ps, steps):
        for step_grads in steps:
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            opt.step()

    opt = ScheduleFreeAdamW(params, lr=0.01, warmup_steps=5, weight_decay=0.01, foreach=foreach)
    run(opt, params, grads[:4])
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    run(opt, params, grads[4:])
    resumed = [torch.nn.Parameter(t.clone()) for t in saved_params]
    opt2 = ScheduleFreeAdamW(resumed, foreach=foreach)
    opt2.load_state_dict(saved_state)
    run(opt2, resumed, grads[4:])
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)
    opt.eval()
    opt2.eval()
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


def test_param_groups_and_missing_grads():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(3))
    frozen = torch.nn.Parameter(torch.ones(3))
    opt = ScheduleFreeAdamW([{"params": [a], "lr": 0.1}, {"params": [b, frozen], "lr": 0.2}])
    a.grad, b.grad = torch.ones(3), torch.ones(3)
    opt.step()
    # First step: z = -lr * g / (|g| + eps), x = z (c = 1), y = (1 - b1) z + b1 x = z.
    torch.testing.assert_close(a.detach(), torch.full((3,), -0.1))
    torch.testing.assert_close(b.detach(), torch.full((3,), -0.2))
    assert torch.equal(frozen.detach(), torch.ones(3)) and frozen not in opt.state


def test_closure_loss_is_returned():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = ScheduleFreeAdamW([w], lr=0.1)

    assert opt.step(sum_of_squares_closure(opt, w)).item() == pytest.approx(5.0)
    torch.testing.assert_close(w.detach(), torch.tensor([0.9, -1.9]))


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"),
    (dict(betas=(0.0, 0.99)), r"betas\[0\]"),
    (dict(betas=(0.9, 1.0)), r"betas\[1\]"),
    (dict(warmup_steps=-1), "warmup_steps"),
    (dict(warmup_steps=1.5), "warmup_steps"),
    (dict(weight_decay=-1.0), "weight_decay"),
    (dict(eps=-1.0), "eps"),
    (dict(r=-1.0), "r="),
    (dict(weight_lr_power=-2.0), "weight_lr_power"),
], ids=["lr", "beta1", "beta2", "warmup", "warmup_float", "weight_decay", "eps", "r", "power"])
def test_invalid_hyperparameters_name_the_culprit(kwargs, name):
    with pytest.raises(ValueError, match=name):
        ScheduleFreeAdamW([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_sparse_gradients_rejected():
    emb = sparse_grad_embedding(3)
    with pytest.raises(RuntimeError, match="sparse"):
        ScheduleFreeAdamW(emb.parameters()).step()
