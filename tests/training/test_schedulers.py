"""LR schedules value by value against closed forms written here, torch's SGDR as an oracle,
state_dict resume, use with nexus optimizers, and the config factory."""
import copy
import math

import pytest
import torch

from nexus.training.optimizers import Lion, Prodigy
from nexus.training.schedulers import (
    ConstantScheduleWithWarmup, CosineAnnealingWarmRestarts, CosineScheduleWithWarmup, WSDScheduler,
    build_scheduler, cosine_with_warmup_lr)


def _sgd(lrs=(0.1,)):
    return torch.optim.SGD([{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr} for lr in lrs])


def _run(scheduler, steps):
    # lrs[t] is the lr after t scheduler steps, i.e. the lr used by optimizer step t + 1.
    lrs = [scheduler.get_last_lr()]
    for _ in range(steps):
        scheduler.optimizer.step()
        scheduler.step()
        lrs.append(scheduler.get_last_lr())
    return lrs


def test_cosine_with_warmup_seed_shape():
    # Seed 004: steps 0-2000 linear 0 -> 1e-3; cosine to 1e-4 at 100000; then constant 1e-4.
    values = {0: 0.0, 1000: 5e-4, 2000: 1e-3, 51000: 5.5e-4, 100000: 1e-4, 150000: 1e-4}
    for step, expected in values.items():
        assert cosine_with_warmup_lr(step, 2000, 100000, 1e-3, 1e-4) == pytest.approx(expected, rel=1e-12, abs=1e-18)


def test_cosine_with_warmup_every_step():
    opt = _sgd((1.0, 2.0))
    scheduler = CosineScheduleWithWarmup(opt, warmup_steps=4, max_steps=14, max_lr=[1e-2, 2e-2], min_lr=1e-3)
    lrs = _run(scheduler, 20)
    for t, (lr_a, lr_b) in enumerate(lrs):
        for got, hi in ((lr_a, 1e-2), (lr_b, 2e-2)):
            if t < 4:
                expected = hi * t / 4
            elif t <= 14:
                expected = 1e-3 + (hi - 1e-3) * (1 + math.cos(math.pi * (t - 4) / 10)) / 2
            else:
                expected = 1e-3
            assert got == pytest.approx(expected, rel=1e-12, abs=1e-15), t
    assert opt.param_groups[1]["lr"] == pytest.approx(1e-3)


@pytest.mark.parametrize("decay", ["linear", "cosine", "1-sqrt"])
def test_wsd_every_step(decay):
    shape = {"linear": lambda p: 1 - p, "cosine": lambda p: (1 + math.cos(math.pi * p)) / 2,
             "1-sqrt": lambda p: 1 - math.sqrt(p)}[decay]
    scheduler = WSDScheduler(_sgd(), warmup_steps=3, stable_steps=5, decay_steps=6, peak_lr=1e-3,
                             min_lr=1e-4, decay=decay)
    lrs = [lr for (lr,) in _run(scheduler, 20)]
    for t, got in enumerate(lrs):
        if t < 3:
            expected = 1e-3 * t / 3
        elif t <= 8:
            expected = 1e-3
        elif t <= 14:
            expected = 1e-4 + 9e-4 * shape((t - 8) / 6)
        else:
            expected = 1e-4
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-16), t
    assert lrs[14] == pytest.approx(1e-4) and lrs[8] == 1e-3


def test_wsd_seed_example_and_start_decay_on_demand():
    model = torch.nn.Linear(3, 2)
    optimizer = Lion(model.parameters(), lr=1e-4, weight_decay=1.0)
    scheduler = WSDScheduler(optimizer, warmup_steps=2, stable_steps=None, decay_steps=4, peak_lr=1e-3)
    lrs = [lr for (lr,) in _run(scheduler, 30)]
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3]) and set(lrs[2:]) == {1e-3}
    scheduler.start_decay()  # at step 30
    with pytest.raises(RuntimeError, match="already began"):
        scheduler.start_decay()
    lrs = [lr for (lr,) in _run(scheduler, 6)]
    assert lrs == pytest.approx([1e-3, 7.5e-4, 5e-4, 2.5e-4, 0.0, 0.0, 0.0], abs=1e-15)
    assert optimizer.param_groups[0]["lr"] == 0.0


def test_wsd_start_decay_early_and_not_during_warmup():
    scheduler = WSDScheduler(_sgd(), warmup_steps=3, stable_steps=100, decay_steps=2, peak_lr=1.0)
    with pytest.raises(RuntimeError, match="warmup"):
        scheduler.start_decay()
    _run(scheduler, 10)
    scheduler.start_decay()  # earlier than the planned step 103
    assert [lr for (lr,) in _run(scheduler, 3)][1:] == pytest.approx([0.5, 0.0, 0.0])


@pytest.mark.parametrize("T_0, T_mult, eta_min", [(5, 1, 0.0), (3, 2, 1e-3), (2, 3, 0.01)],
                         ids=["T_mult1", "T_mult2", "T_mult3"])
def test_sgdr_matches_torch(T_0, T_mult, eta_min):
    ours = CosineAnnealingWarmRestarts(_sgd((0.1, 0.3)), T_0=T_0, T_mult=T_mult, eta_min=eta_min)
    oracle = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
        _sgd((0.1, 0.3)), T_0=T_0, T_mult=T_mult, eta_min=eta_min)
    for got, expected in zip(_run(ours, 60), _run(oracle, 60)):
        assert got == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_sgdr_with_warmup():
    scheduler = CosineAnnealingWarmRestarts(_sgd((0.2,)), T_0=4, T_mult=2, eta_min=0.0, warmup_steps=2)
    lrs = [lr for (lr,) in _run(scheduler, 14)]
    cycle = lambda t_cur, t_i: 0.1 * (1 + math.cos(math.pi * t_cur / t_i))  # noqa: E731
    expected = [0.0, 0.1] + [cycle(t, 4) for t in range(4)] + [cycle(t, 8) for t in range(8)] + [0.2]
    assert lrs == pytest.approx(expected, abs=1e-15)


def test_constant_with_warmup_keeps_each_group_lr():
    scheduler = ConstantScheduleWithWarmup(_sgd((0.1, 0.4)), warmup_steps=4)
    lrs = _run(scheduler, 6)
    assert [a for a, _ in lrs] == pytest.approx([0.0, 0.025, 0.05, 0.075, 0.1, 0.1, 0.1])
    assert [b for _, b in lrs] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4, 0.4])


@pytest.mark.parametrize("make", [
    lambda opt: CosineScheduleWithWarmup(opt, 3, 12, 1e-2, 1e-4),
    lambda opt: WSDScheduler(opt, 2, None, 5, 1e-2, 1e-3, "cosine"),
    lambda opt: CosineAnnealingWarmRestarts(opt, T_0=3, T_mult=2, eta_min=1e-4, warmup_steps=2),
    lambda opt: ConstantScheduleWithWarmup(opt, 4),
], ids=["cosine", "wsd", "sgdr", "constant"])
def test_state_dict_resume_continues_the_same_sequence(make):
    opt = _sgd((0.05,))
    scheduler = make(opt)
    _run(scheduler, 6)
    if isinstance(scheduler, WSDScheduler):
        scheduler.start_decay()
    saved_sched, saved_opt = copy.deepcopy(scheduler.state_dict()), copy.deepcopy(opt.state_dict())
    expected = _run(scheduler, 10)
    opt2 = _sgd((0.05,))
    opt2.load_state_dict(saved_opt)
    resumed = make(opt2)
    resumed.load_state_dict(saved_sched)
    assert resumed.last_epoch == 6
    got = [resumed.get_last_lr()] + _run(resumed, 10)[1:]
    assert got == expected


def test_drives_prodigy_lr_multiplier():
    w = torch.nn.Parameter(torch.ones(3))
    opt = Prodigy([w])
    scheduler = build_scheduler(opt, "cosine", warmup_steps=2, max_steps=4, max_lr=1.0, min_lr=0.1)
    seen = []
    for _ in range(5):
        seen.append(opt.param_groups[0]["lr"])
        w.grad = torch.ones(3)
        opt.step()
        scheduler.step()
    assert seen == pytest.approx([0.0, 0.5, 1.0, 0.55, 0.1])


def test_build_scheduler_maps_names():
    opt = _sgd()
    assert isinstance(build_scheduler(opt, "cosine", warmup_steps=1, max_steps=5, max_lr=1.0),
                      CosineScheduleWithWarmup)
    assert isinstance(build_scheduler(_sgd(), "wsd", warmup_steps=1, stable_steps=2, decay_steps=3,
                                      peak_lr=1.0, decay="1-sqrt"), WSDScheduler)
    assert isinstance(build_scheduler(_sgd(), "sgdr", T_0=3), CosineAnnealingWarmRestarts)
    assert isinstance(build_scheduler(_sgd(), "constant"), ConstantScheduleWithWarmup)


def test_build_scheduler_errors_name_the_problem():
    with pytest.raises(ValueError, match="'linear_decay'"):
        build_scheduler(_sgd(), "linear_decay")
    with pytest.raises(ValueError, match=r"\['max_lrs', 'warmup'\]"):
        build_scheduler(_sgd(), "cosine", warmup=3, max_steps=5, max_lrs=1.0)
    with pytest.raises(ValueError, match=r"missing arguments \['max_lr', 'max_steps'\]"):
        build_scheduler(_sgd(), "cosine", warmup_steps=3)


@pytest.mark.parametrize("make, name", [
    (lambda o: CosineScheduleWithWarmup(o, -1, 10, 1e-3), "warmup_steps"),
    (lambda o: CosineScheduleWithWarmup(o, 5, 4, 1e-3), "max_steps"),
    (lambda o: CosineScheduleWithWarmup(o, 1, 4, -1e-3), "max_lr"),
    (lambda o: CosineScheduleWithWarmup(o, 1, 4, 1e-3, 1e-2), "min_lr"),
    (lambda o: CosineScheduleWithWarmup(o, 1, 4, [1e-3, 1e-3]), "max_lr has 2 values"),
    (lambda o: WSDScheduler(o, 1, -2, 4, 1e-3), "stable_steps"),
    (lambda o: WSDScheduler(o, 1, 2, 0, 1e-3), "decay_steps"),
    (lambda o: WSDScheduler(o, 1, 2, 4, 1e-3, decay="exp"), "decay="),
    (lambda o: WSDScheduler(o, 1, 2, 4, 1e-3, min_lr=1.0), "min_lr"),
    (lambda o: CosineAnnealingWarmRestarts(o, T_0=0), "T_0"),
    (lambda o: CosineAnnealingWarmRestarts(o, T_0=2, T_mult=1.5), "T_mult"),
    (lambda o: CosineAnnealingWarmRestarts(o, T_0=2, eta_min=-1.0), "eta_min"),
    (lambda o: ConstantScheduleWithWarmup(o, warmup_steps=2.0), "warmup_steps"),
], ids=["cos_warmup", "cos_max_steps", "cos_max_lr", "cos_min_lr", "cos_groups", "wsd_stable",
        "wsd_decay_steps", "wsd_decay", "wsd_min_lr", "sgdr_T0", "sgdr_Tmult", "sgdr_eta_min", "const"])
def test_invalid_arguments_name_the_culprit(make, name):
    with pytest.raises(ValueError, match=name):
        make(_sgd())


def test_seed_training_loop_runs_as_written():
    # Seed 001's quick start and seed 004's scheduler call, with a real model and batches.
    torch.manual_seed(10)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    dataloader = [torch.randn(16, 4) for _ in range(6)]
    optimizer = Lion(model.parameters(), lr=1e-4, weight_decay=1.0)
    scheduler = WSDScheduler(
        optimizer,
        warmup_steps=2,
        stable_steps=2,
        decay_steps=2,
        peak_lr=1e-3,
    )
    before = [p.detach().clone() for p in model.parameters()]
    for step, batch in enumerate(dataloader):
        loss = model(batch).pow(2).mean()
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    assert optimizer.param_groups[0]["lr"] == 0.0
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))
    cosine = CosineScheduleWithWarmup(
        optimizer=optimizer,
        warmup_steps=2000,
        max_steps=100000,
        max_lr=1e-3,
        min_lr=1e-4,
    )
    assert cosine.get_last_lr() == [0.0]
