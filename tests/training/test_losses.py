"""Losses against their formulas, written here independently in numpy float64 with explicit loops.

InfoNCE (CLIP, symmetric cross-entropy over in-batch pairs), SigLIP (Zhai et al. 2023: sum of
-log sigmoid(z_ij (t x_i.y_j + b)) over all B x B pairs, divided by B), VICReg (Bardes et al. 2022:
invariance + variance + covariance terms as in the official code), multi-token prediction. Known
values (orthonormal and collapsed features), gradients by ``torch.autograd.gradcheck`` in float64,
the seed's SigLIP example as written, and every input check.

Tolerances: float64 against float64 formulas, 1e-12 (a different summation order only); float32
against float64 formulas, 1e-5 relative; bfloat16 inputs promote to float32, so the loss of bf16
features equals the float32 loss of the same (bf16-rounded) values to 1e-6.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nexus.training.losses import (
    InfoNCELoss,
    MultiTokenPredictionLoss,
    SigmoidContrastiveLoss,
    VICRegLoss,
    VICRegTerms,
    info_nce_loss,
    multi_token_prediction_loss,
    sigmoid_contrastive_loss,
    vicreg_loss,
    vicreg_terms,
)

F64 = dict(atol=1e-12, rtol=1e-12)


# ---- the formulas, independently ---------------------------------------------------------------


def _unit_rows(a: np.ndarray) -> np.ndarray:
    return np.stack([row / math.sqrt(sum(v * v for v in row)) for row in a])


def info_nce_formula(q: np.ndarray, k: np.ndarray, temperature: float, symmetric: bool) -> float:
    q, k = _unit_rows(q), _unit_rows(k)
    n = len(q)
    logits = [[float(q[i] @ k[j]) / temperature for j in range(n)] for i in range(n)]

    def ce(rows):  # mean over i of -log softmax(rows[i])[i]
        return sum(np.logaddexp.reduce(rows[i]) - rows[i][i] for i in range(n)) / n

    rows = ce(logits)
    if not symmetric:
        return rows
    cols = ce([[logits[i][j] for i in range(n)] for j in range(n)])
    return (rows + cols) / 2


def siglip_formula(x: np.ndarray, y: np.ndarray, t: float, b: float) -> float:
    """-1/|B| sum_i sum_j log sigmoid(z_ij (t x_i . y_j + b)), features L2-normalised."""
    x, y = _unit_rows(x), _unit_rows(y)
    n = len(x)
    total = 0.0
    for i in range(n):
        for j in range(n):
            z = 1.0 if i == j else -1.0
            total += np.logaddexp(0.0, -z * (t * float(x[i] @ y[j]) + b))  # -log sigmoid(z u)
    return total / n


def siglip_torch_reference(x: torch.Tensor, y: torch.Tensor, logit_scale: torch.Tensor,
                           logit_bias: torch.Tensor) -> torch.Tensor:
    """SigLIP in plain differentiable torch ops (no custom backward), for gradient references."""
    x = x / x.norm(dim=1, keepdim=True)
    y = y / y.norm(dim=1, keepdim=True)
    logits = logit_scale.exp() * x @ y.T + logit_bias
    z = 2 * torch.eye(len(x), dtype=logits.dtype) - 1
    return -torch.nn.functional.logsigmoid(z * logits).sum() / len(x)


def vicreg_formula(x: np.ndarray, y: np.ndarray, sim: float, std: float, cov: float,
                   eps: float = 1e-4) -> tuple[float, float, float, float]:
    n, d = x.shape
    inv = float(((x - y) ** 2).mean())
    var = 0.0
    covariance = 0.0
    for z in (x, y):
        var += sum(max(0.0, 1 - math.sqrt(np.var(z[:, j], ddof=1) + eps)) for j in range(d)) / d / 2
        c = np.cov(z, rowvar=False, ddof=1).reshape(d, d)
        covariance += sum(c[i, j] ** 2 for i in range(d) for j in range(d) if i != j) / d
    return sim * inv + std * var + cov * covariance, inv, var, covariance


def _pair(n: int, d: int, seed: int, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randn(n, d, generator=g, dtype=dtype)


SHAPES = [pytest.param(1, 3, id="B1xD3"), pytest.param(5, 7, id="B5xD7"), pytest.param(16, 4, id="B16xD4")]


# ---- InfoNCE -----------------------------------------------------------------------------------


@pytest.mark.parametrize("symmetric", [True, False], ids=["symmetric", "one-way"])
@pytest.mark.parametrize("temperature", [0.07, 1.0], ids=["T0.07", "T1"])
@pytest.mark.parametrize("n,d", SHAPES)
def test_info_nce_matches_formula(n, d, temperature, symmetric):
    q, k = _pair(n, d, seed=n * 10 + d)
    loss = InfoNCELoss(temperature=temperature, symmetric=symmetric)(q, k)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    expected = info_nce_formula(q.numpy(), k.numpy(), temperature, symmetric)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), **F64)


def test_info_nce_float32_matches_formula():
    q, k = _pair(9, 6, seed=3)
    loss = info_nce_loss(q.float(), k.float(), temperature=0.1)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(info_nce_formula(q.numpy(), k.numpy(), 0.1, True), rel=1e-5)


def test_info_nce_known_values():
    n, temperature = 6, 0.07
    eye = torch.eye(n, 8, dtype=torch.float64)  # orthonormal rows: logits 1/T on the diagonal, 0 elsewhere
    expected = math.log(1 + (n - 1) * math.exp(-1 / temperature))
    assert info_nce_loss(eye, eye, temperature=temperature).item() == pytest.approx(expected, rel=1e-12)
    # the matched pairing is the minimum: any other pairing of the same rows costs more
    assert info_nce_loss(eye, eye[torch.randperm(n)], temperature=temperature) > expected + 1
    # collapsed features: every logit equal, the loss is log(B) whatever the temperature
    same = torch.ones(n, 8, dtype=torch.float64)
    assert info_nce_loss(same, same, temperature=temperature).item() == pytest.approx(math.log(n), rel=1e-12)


def test_info_nce_normalises_features():
    q, k = _pair(7, 5, seed=4)
    scales = torch.rand(7, 1, dtype=torch.float64) * 10 + 0.1
    torch.testing.assert_close(info_nce_loss(q * scales, k), info_nce_loss(q, k), **F64)


# ---- SigLIP ------------------------------------------------------------------------------------


def test_siglip_defaults_follow_the_paper():
    loss_fn = SigmoidContrastiveLoss()
    assert isinstance(loss_fn.logit_scale, torch.nn.Parameter) and isinstance(loss_fn.logit_bias, torch.nn.Parameter)
    assert loss_fn.logit_scale.item() == pytest.approx(math.log(10.0))  # t' = log 10
    assert loss_fn.logit_bias.item() == -10.0
    assert loss_fn.temperature == pytest.approx(0.1)
    assert sorted(n for n, _ in loss_fn.named_parameters()) == ["logit_bias", "logit_scale"]
    fixed = SigmoidContrastiveLoss(temperature=0.5, bias=2.0, learnable=False)
    assert list(fixed.parameters()) == [] and sorted(fixed.state_dict()) == ["logit_bias", "logit_scale"]
    assert fixed.temperature == pytest.approx(0.5) and fixed.logit_bias.item() == 2.0


@pytest.mark.parametrize("temperature,bias", [(0.1, -10.0), (0.5, 0.7)], ids=["t10-b-10", "t2-b0.7"])
@pytest.mark.parametrize("n,d", SHAPES)
def test_siglip_matches_formula(n, d, temperature, bias):
    x, y = _pair(n, d, seed=n + d)
    loss_fn = SigmoidContrastiveLoss(temperature=temperature, bias=bias, dtype=torch.float64)
    loss = loss_fn(x, y)
    assert loss.dtype == torch.float64 and loss.dim() == 0
    expected = siglip_formula(x.numpy(), y.numpy(), 1 / temperature, bias)
    torch.testing.assert_close(loss, torch.tensor(expected, dtype=torch.float64), **F64)


def test_siglip_float32_matches_formula_and_reference_gradients():
    x, y = _pair(12, 8, seed=5)
    xf, yf = x.float().requires_grad_(), y.float().requires_grad_()
    loss_fn = SigmoidContrastiveLoss(temperature=0.2, bias=-2.0)
    loss = loss_fn(xf, yf)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(siglip_formula(x.numpy(), y.numpy(), 5.0, -2.0), rel=1e-5)
    loss.backward()
    x64, y64 = x.clone().requires_grad_(), y.clone().requires_grad_()
    s64 = torch.tensor(math.log(5.0), dtype=torch.float64, requires_grad=True)
    b64 = torch.tensor(-2.0, dtype=torch.float64, requires_grad=True)
    siglip_torch_reference(x64, y64, s64, b64).backward()
    for got, want in ((xf.grad, x64.grad), (yf.grad, y64.grad), (loss_fn.logit_scale.grad, s64.grad),
                      (loss_fn.logit_bias.grad, b64.grad)):
        torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)


def test_siglip_known_value():
    """Orthonormal, matched features: B positives at logit t + b, B(B - 1) negatives at logit b."""
    n, t, b = 5, 10.0, -10.0
    eye = torch.eye(n, 7, dtype=torch.float64)
    softplus = lambda v: math.log1p(math.exp(v))  # noqa: E731
    expected = (n * softplus(-(t + b)) + n * (n - 1) * softplus(b)) / n  # -log sigmoid(u) = softplus(-u)
    loss = sigmoid_contrastive_loss(eye, eye, math.log(t), b)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    assert sigmoid_contrastive_loss(eye, eye[torch.randperm(n)], math.log(t), b) > loss


def test_siglip_normalises_features():
    x, y = _pair(6, 4, seed=6)
    scales = torch.rand(6, 1, dtype=torch.float64) * 10 + 0.1
    torch.testing.assert_close(sigmoid_contrastive_loss(x, y * scales, 1.0, -1.0),
                               sigmoid_contrastive_loss(x, y, 1.0, -1.0), **F64)


def test_siglip_bfloat16_features_compute_in_float32():
    x, y = _pair(8, 16, seed=7, dtype=torch.float32)
    xb, yb = x.bfloat16().requires_grad_(), y.bfloat16().requires_grad_()
    loss = SigmoidContrastiveLoss()(xb, yb)
    assert loss.dtype == torch.float32
    expected = SigmoidContrastiveLoss()(xb.detach().float(), yb.detach().float())
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert xb.grad.dtype == torch.bfloat16 and yb.grad.dtype == torch.bfloat16


def test_siglip_under_autocast_keeps_float32_logits():
    x, y = _pair(8, 16, seed=16, dtype=torch.float32)
    loss_fn = SigmoidContrastiveLoss(temperature=0.5, bias=-1.0)
    plain = loss_fn(x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss_fn(x, y)
    assert autocast.dtype == torch.float32 and autocast.item() == plain.item()


@pytest.mark.parametrize("reduction", ["global", "per_rank"])
@pytest.mark.parametrize("n,d", [pytest.param(1, 2, id="B1xD2"), pytest.param(4, 3, id="B4xD3")])
def test_siglip_gradcheck(n, d, reduction):
    x, y = _pair(n, d, seed=8)
    x.requires_grad_(), y.requires_grad_()
    scale = torch.tensor(math.log(3.0), dtype=torch.float64, requires_grad=True)
    bias = torch.tensor(-1.5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda *a: sigmoid_contrastive_loss(*a, reduction=reduction), (x, y, scale, bias))


def test_siglip_one_process_gradients_match_autograd_of_formula():
    x, y = _pair(7, 5, seed=9)
    loss_fn = SigmoidContrastiveLoss(temperature=0.3, bias=-4.0, dtype=torch.float64)
    xa, ya = x.clone().requires_grad_(), y.clone().requires_grad_()
    loss_fn(xa, ya).backward()
    xr, yr = x.clone().requires_grad_(), y.clone().requires_grad_()
    s = torch.tensor(math.log(1 / 0.3), dtype=torch.float64, requires_grad=True)
    b = torch.tensor(-4.0, dtype=torch.float64, requires_grad=True)
    siglip_torch_reference(xr, yr, s, b).backward()
    for got, want in ((xa.grad, xr.grad), (ya.grad, yr.grad), (loss_fn.logit_scale.grad, s.grad),
                      (loss_fn.logit_bias.grad, b.grad)):
        torch.testing.assert_close(got, want, **F64)


def test_siglip_learnable_parameters_train():
    """A few SGD steps on the temperature and bias alone lower the loss (the parameters receive gradients)."""
    x, y = _pair(16, 8, seed=10, dtype=torch.float32)
    loss_fn = SigmoidContrastiveLoss()
    opt = torch.optim.SGD(loss_fn.parameters(), lr=0.5)
    first = None
    for _ in range(5):
        opt.zero_grad()
        loss = loss_fn(x, y)
        first = loss.item() if first is None else first
        loss.backward()
        opt.step()
    assert loss_fn(x, y).item() < first


def test_siglip_seed_example_runs_as_written():
    # seed 000, "SigLIP Loss (Already Implemented)", with real feature tensors filled in
    image_features, text_features = torch.randn(8, 32), torch.randn(8, 32)

    from nexus.training.losses import SigmoidContrastiveLoss

    loss_fn = SigmoidContrastiveLoss(temperature=0.1)
    loss = loss_fn(image_features, text_features)

    assert loss.dim() == 0 and torch.isfinite(loss)
    assert loss.item() == pytest.approx(
        siglip_formula(image_features.double().numpy(), text_features.double().numpy(), 10.0, -10.0), rel=1e-5)
    loss.backward()
    assert loss_fn.logit_scale.grad is not None and loss_fn.logit_bias.grad is not None


# ---- VICReg ------------------------------------------------------------------------------------


@pytest.mark.parametrize("coeffs", [(25.0, 25.0, 1.0), (1.0, 0.5, 3.0)], ids=["paper", "other"])
@pytest.mark.parametrize("n,d", [pytest.param(2, 1, id="N2xD1"), pytest.param(9, 5, id="N9xD5"),
                                 pytest.param(32, 4, id="N32xD4")])
def test_vicreg_matches_formula(n, d, coeffs):
    x, y = _pair(n, d, seed=11 + n)
    x = x * 0.6  # some dimensions below std 1, so the variance hinge is active
    total, inv, var, cov = vicreg_formula(x.numpy(), y.numpy(), *coeffs)
    loss_fn = VICRegLoss(*coeffs)
    torch.testing.assert_close(loss_fn(x, y), torch.tensor(total, dtype=torch.float64), **F64)
    terms = loss_fn.terms(x, y)
    assert isinstance(terms, VICRegTerms)
    for got, want in zip(terms, (inv, var, cov)):
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), **F64)


def test_vicreg_known_values():
    # decorrelated dimensions with std sqrt(4/3) > 1 and x == y: every term is zero
    x = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    assert vicreg_loss(x, x).item() == 0.0
    # collapse: std = sqrt(eps) = 0.01 in every dimension, variance term 2 * (1 - 0.01) / 2
    same = torch.ones(6, 3, dtype=torch.float64)
    assert vicreg_terms(same, same) == pytest.approx((0.0, 0.99, 0.0), abs=1e-12)
    assert VICRegLoss()(same, same).item() == pytest.approx(25 * 0.99, rel=1e-12)


def test_vicreg_gradcheck():
    x, y = _pair(5, 3, seed=12)
    x, y = (x * 0.5).requires_grad_(), y.requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: vicreg_loss(a, b, sim_coeff=2.0, std_coeff=3.0, cov_coeff=0.5),
                                    (x, y))


def test_info_nce_gradcheck():
    x, y = _pair(4, 3, seed=13)
    assert torch.autograd.gradcheck(lambda a, b: info_nce_loss(a, b, temperature=0.5),
                                    (x.requires_grad_(), y.requires_grad_()))


def test_vicreg_float32_and_bfloat16():
    x, y = _pair(10, 6, seed=14)
    expected = vicreg_formula(x.numpy(), y.numpy(), 25, 25, 1)[0]
    assert vicreg_loss(x.float(), y.float()).item() == pytest.approx(expected, rel=1e-5)
    xb, yb = x.bfloat16(), y.bfloat16()
    loss = vicreg_loss(xb, yb)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(vicreg_loss(xb.float(), yb.float()).item(), rel=1e-6)


# ---- multi-token prediction --------------------------------------------------------------------


def test_multi_token_prediction_module_matches_formula():
    g = torch.Generator().manual_seed(15)
    B, T, V, n_pred = 2, 5, 11, 2
    logits = torch.randn(B, T, V, generator=g)
    mtp = [torch.randn(B, T, V, generator=g) for _ in range(n_pred)]
    tokens = torch.randint(0, V, (B, T + 1 + n_pred), generator=g)

    def head_loss(lg, offset):  # mean over (b, t) of -log softmax(lg[b, t])[tokens[b, t + offset]]
        a = lg.double().numpy()
        return sum(np.logaddexp.reduce(a[b, t]) - a[b, t, tokens[b, t + offset]]
                   for b in range(B) for t in range(T)) / (B * T)

    total, lm, extra = MultiTokenPredictionLoss(mtp_weight=0.3)(logits, mtp, tokens)
    want_lm = head_loss(logits, 1)
    want_extra = [head_loss(lg, 1 + k) for k, lg in enumerate(mtp, start=1)]
    assert lm.item() == pytest.approx(want_lm, rel=1e-5)
    assert [e.item() for e in extra] == pytest.approx(want_extra, rel=1e-5)
    assert total.item() == pytest.approx(want_lm + 0.3 * sum(want_extra) / n_pred, rel=1e-5)
    same = multi_token_prediction_loss(logits, mtp, tokens, mtp_weight=0.3)
    assert same[0].item() == total.item()
    no_heads = MultiTokenPredictionLoss()(logits, [], tokens)
    assert no_heads[0].item() == no_heads[1].item() == lm.item() and no_heads[2] == []


# ---- input checks ------------------------------------------------------------------------------

ONE_PROCESS_LOSSES = {
    "info_nce": InfoNCELoss(),
    "siglip": SigmoidContrastiveLoss(),
    "vicreg": VICRegLoss(),
}


@pytest.mark.parametrize("name", list(ONE_PROCESS_LOSSES))
@pytest.mark.parametrize("a,b,error,match", [
    pytest.param(torch.randn(4, 8), torch.randn(5, 8), ValueError, "batch sizes differ", id="batch-mismatch"),
    pytest.param(torch.randn(4, 8), torch.randn(4, 6), ValueError, "feature dimensions differ", id="dim-mismatch"),
    pytest.param(torch.randn(4, 8, 2), torch.randn(4, 8, 2), ValueError, "must be 2-D", id="3-D"),
    pytest.param(torch.randn(8), torch.randn(8), ValueError, "must be 2-D", id="1-D"),
    pytest.param(torch.ones(4, 8, dtype=torch.int64), torch.randn(4, 8), TypeError, "floating-point",
                 id="integer-input"),
    pytest.param(torch.randn(4, 8), torch.randn(4, 8, dtype=torch.float64), TypeError, "dtypes differ",
                 id="dtype-mismatch"),
    pytest.param(torch.randn(0, 8), torch.randn(0, 8), ValueError, "at least", id="empty-batch"),
    pytest.param([[1.0]], torch.randn(1, 1), TypeError, "torch.Tensor", id="not-a-tensor"),
])
def test_bad_inputs_raise_clear_errors(name, a, b, error, match):
    with pytest.raises(error, match=match):
        ONE_PROCESS_LOSSES[name](a, b)


def test_bad_settings_raise_clear_errors():
    with pytest.raises(ValueError, match="temperature"):
        InfoNCELoss(temperature=0.0)
    with pytest.raises(ValueError, match="temperature"):
        SigmoidContrastiveLoss(temperature=-1.0)
    with pytest.raises(ValueError, match="bias"):
        SigmoidContrastiveLoss(bias=float("nan"))
    with pytest.raises(ValueError, match="reduction"):
        SigmoidContrastiveLoss(reduction="mean")
    with pytest.raises(ValueError, match="std_coeff"):
        VICRegLoss(std_coeff=-1)
    with pytest.raises(ValueError, match="at least 2"):
        VICRegLoss()(torch.randn(1, 4), torch.randn(1, 4))  # the variance needs two samples
    with pytest.raises(ValueError, match="logit_scale"):
        sigmoid_contrastive_loss(torch.randn(2, 3), torch.randn(2, 3), torch.zeros(2), 0.0)
    with pytest.raises(RuntimeError, match="not initialized"):
        sigmoid_contrastive_loss(torch.randn(2, 3), torch.randn(2, 3), 0.0, 0.0, group=object())
    logits = torch.randn(2, 4, 9)
    with pytest.raises(ValueError, match="integer"):
        multi_token_prediction_loss(logits, [], torch.randn(2, 6))
    with pytest.raises(ValueError, match=r"mtp_logits\[0\]"):
        multi_token_prediction_loss(logits, [torch.randn(2, 4, 8)], torch.zeros(2, 6, dtype=torch.int64))
    with pytest.raises(ValueError, match="positions"):
        multi_token_prediction_loss(logits, [logits], torch.zeros(2, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch"):
        multi_token_prediction_loss(logits, [], torch.zeros(3, 6, dtype=torch.int64))
