"""Muon and get_muon_optimizer: update equations in float64, orthogonality, routing, state, errors."""
import io

import pytest
import torch
import torch.distributed as dist
from torch import nn

from nexus_kernels import forced, polar_express_coeffs
from nexus.training.optimizers import Muon, get_muon_optimizer
from nexus.training.optimizers.muon import update_scale

from tests.distributed.harness import run_distributed

from ._helpers import gen, ill_conditioned_regression, sparse_grad_embedding, sum_of_squares_closure


def newton_schulz_oracle(M: torch.Tensor, steps: int, abc=(3.4445, -4.7750, 2.0315)) -> torch.Tensor:
    """The quintic iteration on one matrix, written out independently, float64."""
    a, b, c = abc
    X = M.double()
    tall = X.shape[0] > X.shape[1]
    if tall:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if tall else X


def expected_muon_direction(U: torch.Tensor, steps: int) -> torch.Tensor:
    if U.dim() == 3:
        return torch.stack([expected_muon_direction(u, steps) for u in U])
    M = U.reshape(U.shape[0], -1)
    rows, cols = M.shape
    return (newton_schulz_oracle(M, steps) * max(1.0, rows / cols) ** 0.5).reshape(U.shape)


SHAPES = {"wide_6x10": (6, 10), "tall_12x5": (12, 5), "stack_3x4x6": (3, 4, 6), "conv_4x2x3x3": (4, 2, 3, 3)}


@pytest.mark.parametrize("nesterov", [True, False], ids=["nesterov", "plain"])
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_steps_match_update_equations_float64(shape, nesterov):
    lr, mu, wd, steps = 0.05, 0.9, 0.1, 3
    W = nn.Parameter(torch.randn(*shape, dtype=torch.float64, generator=gen(0)))
    W_ref = W.detach().clone()
    buf = torch.zeros_like(W_ref)
    opt = Muon([W], lr=lr, momentum=mu, nesterov=nesterov, weight_decay=wd, ns_steps=steps)
    with forced("reference"):
        for t in range(4):
            G = torch.randn(*shape, dtype=torch.float64, generator=gen(t + 1))
            W.grad = G.clone()
            opt.step()
            buf = mu * buf + (1 - mu) * G
            U = (1 - mu) * G + mu * buf if nesterov else buf
            W_ref = W_ref * (1 - lr * wd) - lr * expected_muon_direction(U, steps)
            torch.testing.assert_close(W.detach(), W_ref, atol=1e-12, rtol=1e-12)


def test_gradients_are_not_modified():
    W = nn.Parameter(torch.randn(6, 9, generator=gen(30)))
    b = nn.Parameter(torch.randn(9, generator=gen(31)))
    W.grad, b.grad = torch.randn(6, 9, generator=gen(32)), torch.randn(9, generator=gen(33))
    grads = (W.grad.clone(), b.grad.clone())
    with forced("reference"):
        Muon([{"params": [W]}, {"params": [b], "use_muon": False}], nesterov=True).step()
    assert torch.equal(W.grad, grads[0]) and torch.equal(b.grad, grads[1])


def test_interpreted_kernels_end_to_end_match_reference():
    W1 = nn.Parameter(torch.randn(20, 36, generator=gen(2)))
    W2 = nn.Parameter(W1.detach().clone())
    o1, o2 = Muon([W1], lr=0.02, weight_decay=0.01), Muon([W2], lr=0.02, weight_decay=0.01)
    for t in range(2):
        G = torch.randn(20, 36, generator=gen(10 + t))
        W1.grad, W2.grad = G.clone(), G.clone()
        o1.step()  # CPU tensor with TRITON_INTERPRET=1: the Triton kernels, interpreted
        with forced("reference"):
            o2.step()
    torch.testing.assert_close(W1.detach(), W2.detach(), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("shape", [(16, 40), (40, 16), (3, 12, 20), (8, 4, 3, 3)],
                         ids=["wide", "tall", "stack", "conv"])
def test_every_matrix_update_is_orthogonalized(shape):
    lr = 0.1
    W = nn.Parameter(torch.randn(*shape, generator=gen(3)))
    before = W.detach().clone()
    W.grad = torch.randn(*shape, generator=gen(4)) * torch.logspace(0, -1, shape[-1])  # condition ~10x a Gaussian
    with forced("reference"):
        Muon([W], lr=lr, momentum=0.0, nesterov=False).step()
    step = (before - W.detach()) / (lr * update_scale(shape))
    matrices = step if step.dim() == 3 else step.reshape(1, shape[0], -1)
    sv = torch.linalg.svdvals(matrices.double())
    assert sv.min() > 0.6 and sv.max() < 1.2


def test_polar_express_schedule_is_accepted_and_tighter():
    W = nn.Parameter(torch.zeros(16, 32))
    W.grad = torch.randn(16, 32, generator=gen(5))
    with forced("reference"):
        Muon([W], lr=1.0, momentum=0.0, nesterov=False, coeffs=polar_express_coeffs(5)).step()
    sv = torch.linalg.svdvals(-W.detach().double())
    assert (sv - 1).abs().max() < 0.15
    with pytest.raises(ValueError, match="ns_steps|disagrees"):
        Muon([W], coeffs=polar_express_coeffs(8))  # ns_steps=5 vs an 8-step schedule


def test_one_dimensional_params_are_rejected_not_skipped():
    with pytest.raises(ValueError, match=r"orthogonalizes matrices.*shape \(5,\)"):
        Muon([nn.Parameter(torch.zeros(5))])
    opt = Muon([nn.Parameter(torch.zeros(3, 3))])
    with pytest.raises(ValueError, match=r"shape \(\)"):
        opt.add_param_group({"params": [nn.Parameter(torch.tensor(1.0))]})
    opt.add_param_group({"params": [nn.Parameter(torch.zeros(5))], "use_muon": False})  # AdamW: fine


@pytest.mark.parametrize("kwargs,name", [
    ({"lr": -1.0}, "lr"), ({"momentum": 1.0}, "momentum"), ({"weight_decay": -0.1}, "weight_decay"),
    ({"ns_steps": 0}, "ns_steps"), ({"betas": (0.9, 1.0)}, "betas"), ({"eps": -1.0}, "eps"),
    ({"coeffs": (1.0, 2.0)}, "coeffs")], ids=lambda v: str(v))
def test_bad_hyperparameters_raise_naming_them(kwargs, name):
    with pytest.raises(ValueError, match=name):
        Muon([nn.Parameter(torch.zeros(3, 3))], **kwargs)
    with pytest.raises(ValueError, match=name):
        Muon([{"params": [nn.Parameter(torch.zeros(3, 3))], **kwargs}])


def test_adamw_groups_match_torch_adamw():
    shapes = [(7,), (5, 3)]
    ps = [nn.Parameter(torch.randn(*s, dtype=torch.float64, generator=gen(i))) for i, s in enumerate(shapes)]
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    ours = Muon([{"params": ps, "use_muon": False}], lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    ref = torch.optim.AdamW(qs, lr=0.01, betas=(0.8, 0.9), eps=1e-6, weight_decay=0.1)
    for t in range(5):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape, dtype=torch.float64, generator=gen(100 + t))
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(ps, qs):
        torch.testing.assert_close(p, q, atol=1e-12, rtol=1e-12)


def test_sparse_gradients_are_rejected():
    emb = sparse_grad_embedding(4)
    opt = Muon([{"params": emb.parameters(), "use_muon": False}])
    with pytest.raises(RuntimeError, match="sparse"):
        opt.step()


def test_closure_loss_is_returned_and_grads_enabled():
    W = nn.Parameter(torch.randn(4, 6, generator=gen(6)))
    opt = Muon([W], lr=0.1)
    before = W.detach().clone()
    with forced("reference"):
        loss = opt.step(sum_of_squares_closure(opt, W))
    assert loss.requires_grad  # the closure ran with autograd on, inside a no_grad step
    assert loss.item() == pytest.approx((before**2).sum().item())
    assert not torch.equal(W.detach(), before)


class TinyLM(nn.Module):
    def __init__(self, tie: bool = False):
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.block = nn.Sequential(nn.Linear(8, 12), nn.GELU(), nn.Linear(12, 8))
        self.norm = nn.LayerNorm(8)
        self.lm_head = nn.Linear(8, 11, bias=False)
        if tie:
            self.lm_head.weight = self.embed.weight

    def forward(self, x):
        return self.lm_head(self.norm(self.block(self.embed(x))))


def groups_by_name(opt):
    return {g["name"]: g for g in opt.param_groups}


def test_get_muon_optimizer_routes_parameters():
    model = TinyLM()
    opt = get_muon_optimizer(model, lr=1e-3, momentum=0.95, weight_decay=0.01)
    assert isinstance(opt, Muon)
    groups = groups_by_name(opt)
    ids = {name: {id(p) for p in g["params"]} for name, g in groups.items()}
    assert ids["muon"] == {id(model.block[0].weight), id(model.block[2].weight)}
    assert ids["adamw_decay"] == {id(model.lm_head.weight)}
    assert ids["adamw_no_decay"] == {id(model.embed.weight), id(model.norm.weight), id(model.norm.bias),
                                     id(model.block[0].bias), id(model.block[2].bias)}
    assert groups["muon"]["use_muon"] and not groups["adamw_decay"]["use_muon"]
    assert groups["muon"]["weight_decay"] == 0.01 and groups["adamw_decay"]["weight_decay"] == 0.01
    assert groups["adamw_no_decay"]["weight_decay"] == 0.0
    assert groups["adamw_decay"]["lr"] == 1e-3 and groups["adamw_decay"]["betas"] == (0.9, 0.95)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    opt2 = get_muon_optimizer(model, lr=0.02, adamw_lr=3e-4, adamw_betas=(0.8, 0.99))
    assert groups_by_name(opt2)["muon"]["lr"] == 0.02
    assert groups_by_name(opt2)["adamw_no_decay"]["lr"] == 3e-4
    assert groups_by_name(opt2)["adamw_no_decay"]["betas"] == (0.8, 0.99)


def test_get_muon_optimizer_tied_head_raw_embedding_and_names():
    tied = TinyLM(tie=True)
    groups = groups_by_name(get_muon_optimizer(tied))
    assert "adamw_decay" not in groups  # the tied head is the embedding: AdamW, no decay
    assert id(tied.embed.weight) in {id(p) for p in groups["adamw_no_decay"]["params"]}

    class RawEmbedding(nn.Module):
        def __init__(self):
            super().__init__()
            self.wte = nn.Parameter(torch.randn(11, 8))
            self.mlp = nn.Linear(8, 8)
            self.output = nn.Linear(8, 11)

    model = RawEmbedding()
    groups = groups_by_name(get_muon_optimizer(model))
    assert {id(p) for p in groups["muon"]["params"]} == {id(model.mlp.weight)}
    assert {id(p) for p in groups["adamw_decay"]["params"]} == {id(model.output.weight)}
    assert id(model.wte) in {id(p) for p in groups["adamw_no_decay"]["params"]}


def test_get_muon_optimizer_trains_a_model_one_step():
    model = TinyLM()
    opt = get_muon_optimizer(model, lr=1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with forced("reference"):
        loss = nn.functional.cross_entropy(model(torch.arange(6)), torch.arange(6) % 11)
        loss.backward()
        opt.step()
    assert all(not torch.equal(before[n], p) for n, p in model.named_parameters())


def run_steps(model, opt, steps, seed):
    for t in range(steps):
        x = torch.randint(0, 11, (6,), generator=gen(seed + t))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), (x + 1) % 11).backward()
        opt.step()


def test_state_dict_round_trip_resumes_bit_identically():
    torch.manual_seed(0)
    model = TinyLM()
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    with forced("reference"):
        opt = get_muon_optimizer(model, lr=1e-2)
        run_steps(model, opt, 3, seed=0)
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buffer)
        run_steps(model, opt, 3, seed=3)

        resumed = TinyLM()
        resumed.load_state_dict(snapshot)
        opt2 = get_muon_optimizer(resumed, lr=1e-2)
        buffer.seek(0)
        saved = torch.load(buffer)
        resumed.load_state_dict(saved["model"])
        opt2.load_state_dict(saved["opt"])
        run_steps(resumed, opt2, 3, seed=3)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_bfloat16_params_keep_float32_state_across_load():
    W = nn.Parameter(torch.randn(8, 12, generator=gen(7)).bfloat16())
    opt = Muon([W], lr=0.02)
    W.grad = torch.randn(8, 12, generator=gen(8)).bfloat16()
    with forced("reference"):
        opt.step()
    assert opt.state[W]["momentum_buffer"].dtype == torch.float32
    opt2 = Muon([W], lr=0.02)
    opt2.load_state_dict(opt.state_dict())
    assert opt2.state[W]["momentum_buffer"].dtype == torch.float32
    assert torch.equal(opt2.state[W]["momentum_buffer"], opt.state[W]["momentum_buffer"])


@pytest.mark.slow
def test_muon_beats_tuned_adamw_on_ill_conditioned_problem():
    with forced("reference"):
        adamw = min(ill_conditioned_regression(100, lambda p, lr=lr: torch.optim.AdamW(p, lr=lr, weight_decay=0))
                    for lr in (0.1, 0.3, 1.0, 3.0))  # its best on this problem is ~1.0
        muon = ill_conditioned_regression(100, lambda p: Muon(p, lr=1.0, momentum=0.9))
    assert muon < adamw / 10, (muon, adamw)


DIST_SHAPES = [(6, 10), (12, 5), (3, 4, 6), (4, 2, 3, 3), (8, 8)]


def distributed_run(distribute_work: bool) -> list[torch.Tensor]:
    params = [nn.Parameter(torch.randn(*s, dtype=torch.float64, generator=gen(40 + i)))
              for i, s in enumerate(DIST_SHAPES)]
    bias = nn.Parameter(torch.zeros(5, dtype=torch.float64))
    opt = Muon([{"params": params}, {"params": [bias], "use_muon": False}], lr=0.05, weight_decay=0.1,
               distribute_work=distribute_work)
    with forced("reference"):
        for t in range(3):
            for i, p in enumerate(params):
                p.grad = torch.randn(p.shape, dtype=torch.float64, generator=gen(100 * t + i))
            bias.grad = torch.randn(5, dtype=torch.float64, generator=gen(999 + t))
            opt.step()
    return [p.detach() for p in params] + [bias.detach()]


def _distributed_rank(rank, world_size):
    # every rank sees the same parameters and gradients, as after a data-parallel all-reduce
    return distributed_run(distribute_work=True)


def test_distribute_work_without_process_group_is_single_process():
    assert not dist.is_initialized()
    for a, b in zip(distributed_run(True), distributed_run(False)):
        assert torch.equal(a, b)


@pytest.mark.slow
@pytest.mark.distributed
def test_distribute_work_over_two_gloo_ranks_matches_single_process():
    results = run_distributed(_distributed_rank, world_size=2)
    expected = distributed_run(distribute_work=False)
    for rank in (0, 1):
        assert len(results[rank]) == len(expected)
        for got, want in zip(results[rank], expected):
            assert got.dtype == torch.float64
            assert torch.equal(got, want), rank
