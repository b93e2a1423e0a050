"""Sophia against the paper's clipped update in float64; GNB and Hutchinson estimators checked
against closed-form Hessian diagonals; the optimizer machinery."""
import copy

import pytest
import torch
import torch.nn.functional as F

from nexus.training.optimizers import Sophia
from nexus.training.optimizers.sophia import gnb_hessian_estimate, hutchinson_hessian_estimate

from ._helpers import sum_of_squares_closure

SHAPES = [(), (6,), (3, 4), (2, 3, 2)]


def _paper_sophia_step(theta, m, h, g, lr, beta1, rho, wd, eps):
    # Liu et al. 2023, Algorithm 3 lines 6-12 (h already refreshed when due).
    m = beta1 * m + (1 - beta1) * g
    theta = theta - lr * wd * theta
    ratio = m / torch.maximum(rho * h, torch.full_like(h, eps))
    theta = theta - lr * torch.clamp(ratio, -1.0, 1.0)
    return theta, m


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_matches_paper_with_exact_hutchinson_hessian(foreach):
    # For L = sum(a * p^2) / 2 the Hessian is diag(a): Hutchinson's u * (H u) equals a exactly.
    gen = torch.Generator().manual_seed(0)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    lr, (beta1, beta2), rho, wd, k = 0.05, (0.9, 0.8), 0.5, 0.1, 3
    opt = Sophia(params, lr=lr, betas=(beta1, beta2), rho=rho, weight_decay=wd, update_period=k,
                 estimator="hutchinson", foreach=foreach)
    theta = [t.clone() for t in init]
    m = [torch.zeros_like(t) for t in init]
    h = [torch.zeros_like(t) for t in init]
    refreshed = []
    for t in range(1, 9):
        # Curvatures span clipped (tiny a) and unclipped (large a) coordinates.
        curv = [torch.rand(s, generator=gen, dtype=torch.float64) * 10.0 ** (t % 3 - 1) for s in SHAPES]
        if opt.hessian_due:
            refreshed.append(t)
            opt.update_hessian(closure=lambda: sum((a * p ** 2).sum() / 2 for a, p in zip(curv, params)))
            h = [beta2 * hi + (1 - beta2) * a for hi, a in zip(h, curv)]
        grads = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            theta[i], m[i] = _paper_sophia_step(theta[i], m[i], h[i], g, lr, beta1, rho, wd, 1e-12)
    assert refreshed == [1, 4, 7]
    for p, t, hi in zip(params, theta, h):
        torch.testing.assert_close(p.detach(), t, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(opt.state[p]["hessian"], hi, rtol=1e-12, atol=1e-14)


def test_clipping_bounds_every_coordinate_by_lr():
    p = torch.nn.Parameter(torch.zeros(500, dtype=torch.float64))
    opt = Sophia([p], lr=0.1, rho=0.04, weight_decay=0.0, estimator="hutchinson")
    opt.update_hessian(closure=lambda: (p ** 2).sum() * 0.0)  # h stays 0: every ratio clips
    p.grad = torch.randn(500, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach(), -0.1 * torch.sign(p.grad))


def test_gnb_expectation_is_gauss_newton_diagonal():
    # R independent copies of one linear softmax model, one row each: the loss is the mean over
    # rows, so copy r's true Hessian diagonal is p_c (1 - p_c) x_j^2 / R (Bartlett identity).
    gen = torch.Generator().manual_seed(4)
    copies = 4000
    x = torch.tensor([0.7, -1.3], dtype=torch.float64)
    base = torch.tensor([[0.2, -0.4], [1.0, 0.3], [-0.5, 0.6]], dtype=torch.float64)
    weight = base.repeat(copies, 1, 1).requires_grad_()
    logits = torch.einsum("j,rcj->rc", x, weight)
    (h_hat,) = gnb_hessian_estimate(logits, [weight], retain_graph=False, generator=gen)
    probs = torch.softmax(x @ base.T, dim=0)
    expected = (probs * (1 - probs))[:, None] * x[None, :] ** 2
    # Each copy is expected * chi2_1 / R (std sqrt(2)); 4000 copies: relative std 2.2%, 5 sigma.
    torch.testing.assert_close(h_hat.mean(0) * copies, expected, rtol=0.12, atol=0.0)


def test_gnb_is_batch_times_squared_gradient_of_sampled_loss():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    weight = torch.randn(5, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    unused = torch.zeros(3, dtype=torch.float64, requires_grad=True)
    logits = x @ weight.T
    state = gen.get_state()
    h_w, h_unused = gnb_hessian_estimate(logits, [weight, unused], generator=gen)
    gen.set_state(state)
    labels = torch.multinomial(torch.softmax(logits.detach(), -1), 1, generator=gen).squeeze(-1)
    # Closed-form gradient of the mean cross-entropy of a linear softmax model.
    onehot = F.one_hot(labels, 5).double()
    grad = (torch.softmax(logits.detach(), -1) - onehot).T @ x / 6
    torch.testing.assert_close(h_w, 6 * grad ** 2, rtol=1e-12, atol=1e-15)
    assert torch.equal(h_unused, torch.zeros(3, dtype=torch.float64))


def test_hutchinson_expectation_is_hessian_diagonal():
    # R independent copies of one quadratic (block-diagonal Hessian): R draws in one call.
    gen = torch.Generator().manual_seed(6)
    a = torch.randn(4, 4, generator=gen, dtype=torch.float64)
    hessian = a @ a.T + torch.eye(4, dtype=torch.float64)
    copies = 4000
    w = torch.randn(copies, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    (h_hat,) = hutchinson_hessian_estimate(0.5 * torch.einsum("ri,ij,rj->", w, hessian, w), [w],
                                           generator=gen)
    # u_i^2 = 1, so each draw is H_ii plus a zero-mean off-diagonal term of this std.
    off_std = ((hessian ** 2).sum(1) - hessian.diag() ** 2).sqrt()
    err = (h_hat.mean(0) - hessian.diag()).abs()
    assert torch.all(err < 5 * off_std / copies ** 0.5), (err, off_std)
    assert set(torch.unique(h_hat[:, 0] - hessian[0, 0]).abs().round(decimals=9).tolist()) <= {
        round(abs(v), 9) for v in _signed_sums(hessian[0, 1:])}


def _signed_sums(row):
    # Every value of sum_j u_0 u_j H_0j over sign patterns: what one draw's error can be.
    n = row.numel()
    return [sum(((-1) ** ((mask >> j) & 1)) * row[j].item() for j in range(n)) for mask in range(2 ** n)]


def test_gnb_update_hessian_feeds_ema_and_keeps_graph_for_backward():
    torch.manual_seed(7)
    model = torch.nn.Linear(4, 6).double()
    opt = Sophia(model.parameters(), lr=1e-3, betas=(0.9, 0.95), estimator="gnb")
    x = torch.randn(10, 4, dtype=torch.float64)
    y = torch.randint(0, 6, (10,))
    logits = model(x)
    gen = torch.Generator().manual_seed(8)
    expected = gnb_hessian_estimate(logits, list(model.parameters()),
                                    generator=torch.Generator().manual_seed(8))
    opt.update_hessian(logits=logits, generator=gen)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(opt.state[p]["hessian"], 0.05 * e, rtol=1e-12, atol=1e-15)
        assert p.grad is None  # the estimate never touches .grad
    F.cross_entropy(logits, y).backward()  # graph retained by default
    before = [p.detach().clone() for p in model.parameters()]
    opt.step()
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    assert not opt.hessian_due


def test_step_without_hessian_is_a_clear_error():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = Sophia([p])
    p.grad = torch.ones(3)
    with pytest.raises(RuntimeError, match="update_hessian"):
        opt.step()
    assert torch.equal(p.detach(), torch.zeros(3))


def test_update_hessian_requires_the_estimator_input():
    p = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match="logits"):
        Sophia([p], estimator="gnb").update_hessian(closure=lambda: (p ** 2).sum())
    with pytest.raises(ValueError, match="closure"):
        Sophia([p], estimator="hutchinson").update_hessian(logits=torch.zeros(2, 3))


def test_hessian_due_every_update_period_steps():
    p = torch.nn.Parameter(torch.ones(2))
    opt = Sophia([p], update_period=2, estimator="hutchinson")
    due = []
    for _ in range(6):
        due.append(opt.hessian_due)
        if due[-1]:
            opt.update_hessian(closure=lambda: (p ** 2).sum())
        p.grad = torch.ones(2)
        opt.step()
    assert due == [True, False, True, False, True, False]


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_state_dict_resume_is_bit_identical(foreach):
    gen = torch.Generator().manual_seed(9)
    shapes = [(4, 3), (5,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    curv = [torch.rand(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(8)]

    def run(opt, ps, steps):
        for step_grads in steps:
            if opt.hessian_due:
                opt.update_hessian(closure=lambda: sum((a * p ** 2).sum() for a, p in zip(curv, ps)))
            for p, g in zip(ps, step_grads):
                p.grad = g.clone()
            opt.step()

    opt = Sophia(params, lr=1e-2, update_period=3, estimator="hutchinson", foreach=foreach)
    run(opt, params, grads[:4])
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    run(opt, params, grads[4:])
    resumed = [torch.nn.Parameter(t.clone()) for t in saved_params]
    opt2 = Sophia(resumed, estimator="hutchinson", foreach=foreach)
    opt2.load_state_dict(saved_state)
    run(opt2, resumed, grads[4:])
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


def test_closure_loss_is_returned():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = Sophia([w], lr=0.1, weight_decay=0.0, estimator="hutchinson")
    opt.update_hessian(closure=lambda: (w ** 2).sum())

    assert opt.step(sum_of_squares_closure(opt, w)).item() == pytest.approx(5.0)
    assert not torch.equal(w.detach(), torch.tensor([1.0, -2.0]))


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"),
    (dict(betas=(1.0, 0.99)), r"betas\[0\]"),
    (dict(betas=(0.9, 1.5)), r"betas\[1\]"),
    (dict(rho=0.0), "rho"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(update_period=0), "update_period"),
    (dict(update_period=2.5), "update_period"),
    (dict(estimator="newton"), "estimator"),
    (dict(eps=0.0), "eps"),
], ids=["lr", "beta1", "beta2", "rho", "weight_decay", "period0", "period_float", "estimator", "eps"])
def test_invalid_hyperparameters_name_the_culprit(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Sophia([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_sparse_gradients_rejected():
    emb = torch.nn.Embedding(10, 3, sparse=True)
    opt = Sophia(emb.parameters(), estimator="hutchinson")
    opt.update_hessian(closure=lambda: (emb.weight ** 2).sum())
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()
