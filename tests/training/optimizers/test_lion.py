"""Lion against the paper's update written out in float64, plus the optimizer machinery."""
import copy

import pytest
import torch

from nexus.training.optimizers import Lion
from nexus.training.optimizers.lion import lion_update

from ._helpers import sparse_grad_embedding, sum_of_squares_closure

SHAPES = [(), (7,), (4, 5), (3, 2, 5)]


def _paper_lion(theta, m, g, lr, beta1, beta2, wd):
    # Chen et al. 2023, Algorithm 2: update with the interpolation, then the momentum.
    c = beta1 * m + (1 - beta1) * g
    theta = theta - lr * (torch.sign(c) + wd * theta)
    m = beta2 * m + (1 - beta2) * g
    return theta, m


def _grads(shapes, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes] for _ in range(steps)]


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
@pytest.mark.parametrize("wd", [0.0, 0.5], ids=["no_decay", "decay"])
def test_matches_paper_over_steps(foreach, wd):
    gen = torch.Generator().manual_seed(1)
    init = [torch.randn(s, generator=gen, dtype=torch.float64) for s in SHAPES]
    params = [torch.nn.Parameter(t.clone()) for t in init]
    opt = Lion(params, lr=0.01, betas=(0.8, 0.95), weight_decay=wd, foreach=foreach)
    theta, m = [t.clone() for t in init], [torch.zeros_like(t) for t in init]
    for grads in _grads(SHAPES, 6):
        for p, g in zip(params, grads):
            p.grad = g.clone()
        opt.step()
        for i, g in enumerate(grads):
            theta[i], m[i] = _paper_lion(theta[i], m[i], g, 0.01, 0.8, 0.95, wd)
    for p, t, mi in zip(params, theta, m):
        torch.testing.assert_close(p.detach(), t, rtol=1e-13, atol=1e-15)
        torch.testing.assert_close(opt.state[p]["exp_avg"], mi, rtol=1e-13, atol=1e-15)


def test_every_coordinate_moves_by_lr():
    p = torch.nn.Parameter(torch.zeros(1000, dtype=torch.float64))
    opt = Lion([p], lr=0.3)
    p.grad = torch.randn(1000, dtype=torch.float64)
    opt.step()
    torch.testing.assert_close(p.detach().abs(), torch.full((1000,), 0.3, dtype=torch.float64))
    assert torch.equal(torch.sign(p.detach()), -torch.sign(p.grad))


def test_param_groups_use_their_own_lr_and_skip_missing_grads():
    a = torch.nn.Parameter(torch.zeros(3))
    b = torch.nn.Parameter(torch.zeros(3))
    frozen = torch.nn.Parameter(torch.ones(3))
    opt = Lion([{"params": [a], "lr": 0.1}, {"params": [b, frozen], "lr": 0.2}])
    a.grad, b.grad = torch.ones(3), -torch.ones(3)
    opt.step()
    torch.testing.assert_close(a.detach(), torch.full((3,), -0.1))
    torch.testing.assert_close(b.detach(), torch.full((3,), 0.2))
    assert torch.equal(frozen.detach(), torch.ones(3)) and frozen not in opt.state


def test_closure_is_called_and_its_loss_returned():
    w = torch.nn.Parameter(torch.tensor([2.0, -3.0]))
    opt = Lion([w], lr=0.5)

    loss = opt.step(sum_of_squares_closure(opt, w))
    assert loss.item() == pytest.approx(13.0)
    torch.testing.assert_close(w.detach(), torch.tensor([1.5, -2.5]))


@pytest.mark.parametrize("foreach", [False, True], ids=["per_tensor", "foreach"])
def test_state_dict_resume_is_bit_identical(foreach):
    gen = torch.Generator().manual_seed(2)
    shapes = [(5, 3), (4,)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    opt = Lion(params, lr=1e-2, weight_decay=0.1, foreach=foreach)
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(6)]
    for step_grads in grads[:3]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    saved_params = [p.detach().clone() for p in params]
    saved_state = copy.deepcopy(opt.state_dict())
    for step_grads in grads[3:]:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    resumed = [torch.nn.Parameter(t.clone()) for t in saved_params]
    opt2 = Lion(resumed, lr=1.0, foreach=foreach)
    opt2.load_state_dict(saved_state)
    assert opt2.param_groups[0]["lr"] == 1e-2
    for step_grads in grads[3:]:
        for p, g in zip(resumed, step_grads):
            p.grad = g.clone()
        opt2.step()
    for p, q in zip(params, resumed):
        assert torch.equal(p, q)


@pytest.mark.parametrize("kwargs, name", [
    (dict(lr=-1.0), "lr"),
    (dict(betas=(1.0, 0.99)), r"betas\[0\]"),
    (dict(betas=(0.9, -0.1)), r"betas\[1\]"),
    (dict(weight_decay=-1e-3), "weight_decay"),
    (dict(lr=float("nan")), "lr"),
], ids=["lr", "beta1", "beta2", "weight_decay", "nan_lr"])
def test_invalid_hyperparameters_name_the_culprit(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Lion([torch.nn.Parameter(torch.zeros(2))], **kwargs)


def test_sparse_gradients_rejected():
    emb = sparse_grad_embedding(3)
    opt = Lion(emb.parameters())
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_update_function_docstring_example():
    p, g, m = torch.zeros(3), torch.tensor([1.0, -2.0, 0.0]), torch.zeros(3)
    lion_update(p, g, m, lr=0.1, beta1=0.9, beta2=0.99, weight_decay=0.0)
    torch.testing.assert_close(p, torch.tensor([-0.1, 0.1, 0.0]))
    torch.testing.assert_close(m, 0.01 * g)


def test_bfloat16_params_follow_float64_direction():
    gen = torch.Generator().manual_seed(3)
    g = torch.randn(64, generator=gen)
    p = torch.nn.Parameter(torch.zeros(64, dtype=torch.bfloat16))
    opt = Lion([p], lr=2 ** -4, foreach=True)
    p.grad = g.to(torch.bfloat16)
    opt.step()
    assert torch.equal(p.detach().float(), -(2 ** -4) * torch.sign(g))
