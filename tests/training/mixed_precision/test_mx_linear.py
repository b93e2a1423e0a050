"""MXFP8Linear and FP4Linear: numerics against an independent MX oracle, fp32 closeness, stochastic
gradient rounding, packed weight storage, conversion.

The oracle re-derives OCP MX v1.0 from the spec: per block of the reduction dim, scale
2**(floor(log2(amax)) - emax(elem)), elements rounded to nearest even (torch's float8 casts for
E4M3/E5M2, the E2M1 grid {0, .5, 1, 1.5, 2, 3, 4, 6} with ties to the even code), saturating.
Closeness to fp32 ``nn.Linear``: relative RMS error < 2**-m for m mantissa bits of the coarser
format involved (E4M3 1/8, E5M2 1/4, E2M1 1/2), since each rounded operand errs by <= 2**-(m+1).
"""
import math

import pytest
import torch
from torch import nn

from nexus_kernels._backend import forced
from nexus.training.mixed_precision import (
    FP4Config,
    FP4Linear,
    MXFP8Config,
    MXFP8Linear,
    MXSpec,
    apply_precision,
    mx_quantize_dequantize,
)
from nexus.training.mixed_precision.mxfp8 import convert_to_mxfp8

EMAX = {"e4m3": 8, "e5m2": 15, "e2m1": 2}
MANTISSA = {"e4m3": 3, "e5m2": 2, "e2m1": 1}
E2M1_GRID = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def round_elem(v: torch.Tensor, elem: str) -> torch.Tensor:
    if elem == "e4m3":
        return v.clamp(-448, 448).to(torch.float8_e4m3fn).float()
    if elem == "e5m2":
        return v.clamp(-57344, 57344).to(torch.float8_e5m2).float()
    a = v.abs().clamp(max=6.0)
    d = (a[..., None] - E2M1_GRID).abs()
    best = d.min(-1, keepdim=True).values
    # Among equally near grid points prefer the even code (last mantissa bit 0).
    odd_penalty = (torch.arange(8) % 2).float() * 1e-3
    idx = torch.where(d == best, odd_penalty, torch.full_like(d, 10.0)).argmin(-1)
    return E2M1_GRID[idx] * v.sign()


def oracle_mx(x: torch.Tensor, elem: str, block: int | None, dim: int = -1) -> torch.Tensor:
    x = x.detach().float().movedim(dim, -1)
    k = x.shape[-1]
    if block is None:  # one float32 scale per tensor
        s = x.abs().amax() / {"e4m3": 448.0, "e5m2": 57344.0, "e2m1": 6.0}[elem]
        return (round_elem(x / s, elem) * s).movedim(-1, dim)
    pad = (-k) % block
    xb = nn.functional.pad(x, (0, pad)).reshape(*x.shape[:-1], -1, block)
    amax = xb.abs().amax(-1, keepdim=True)
    e = torch.where(amax > 0, torch.floor(torch.log2(amax)) - EMAX[elem], torch.full_like(amax, -127.0))
    scale = torch.exp2(e.clamp(-127, 127))
    q = (round_elem(xb / scale, elem) * scale).reshape(*x.shape[:-1], -1)[..., :k]
    return q.movedim(-1, dim)


def rel_rms(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


LAYERS = {
    "mxfp8-b32": (lambda i, o: MXFP8Linear(i, o, config=MXFP8Config(block_size=32, e4m3_forward=True)),
                  "e4m3", "e5m2", 32),
    "mxfp8-b64-e5m2fwd": (lambda i, o: MXFP8Linear(i, o, config=MXFP8Config(block_size=64, e4m3_forward=False)),
                          "e5m2", "e5m2", 64),
    "fp4-b32": (lambda i, o: FP4Linear(i, o, config=FP4Config(use_microscaling=True, block_size=32,
                                                              stochastic_rounding=False)), "e2m1", "e2m1", 32),
    "fp4-tensor": (lambda i, o: FP4Linear(i, o, config=FP4Config(use_microscaling=False, stochastic_rounding=False)),
                   "e2m1", "e2m1", None),
}


def pair(name, in_f, out_f, seed=0):
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f)
    layer = LAYERS[name][0](in_f, out_f)
    layer.load_state_dict(ref.state_dict())
    return layer, ref


@pytest.mark.parametrize("name", list(LAYERS))
def test_forward_and_backward_equal_mx_oracle(name):
    _, fwd, bwd, block = LAYERS[name]
    layer, ref = pair(name, 80, 40)  # K = 80 does not divide the block
    x = torch.randn(2, 9, 80, requires_grad=True)
    g = torch.randn(2, 9, 40)
    with forced("reference"):
        y = layer(x)
        y.backward(g)
    w, b = ref.weight.detach(), ref.bias.detach()
    x2, g2 = x.detach().reshape(18, 80), g.reshape(18, 40)
    want = oracle_mx(x2, fwd, block) @ oracle_mx(w, fwd, block).t() + b
    torch.testing.assert_close(y.reshape(18, 40), want, atol=1e-5, rtol=1e-5)
    want_dx = oracle_mx(g2, bwd, block) @ oracle_mx(w, fwd, block, dim=0)
    torch.testing.assert_close(x.grad.reshape(18, 80), want_dx, atol=1e-5, rtol=1e-5)
    want_dw = oracle_mx(g2, bwd, block, dim=0).t() @ oracle_mx(x2, fwd, block, dim=0)
    torch.testing.assert_close(layer.weight.grad, want_dw, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.bias.grad, g2.sum(0))


@pytest.mark.parametrize("name", list(LAYERS))
def test_close_to_fp32_linear(name):
    _, fwd, bwd, _ = LAYERS[name]
    layer, ref = pair(name, 128, 64, seed=3)
    x = torch.randn(32, 128, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    with forced("reference"):
        y = layer(x)
        g = torch.randn_like(y)
        y.backward(g)
    yr = ref(xr)
    yr.backward(g)
    tol_f = 2.0 ** -MANTISSA[fwd]
    tol_b = 2.0 ** -min(MANTISSA[fwd], MANTISSA[bwd])
    assert 0 < rel_rms(y, yr) < tol_f
    assert rel_rms(x.grad, xr.grad) < tol_b
    assert rel_rms(layer.weight.grad, ref.weight.grad) < tol_b


def test_interpreted_kernel_path_matches_reference():
    layer, _ = pair("mxfp8-b32", 40, 24)
    other, _ = pair("fp4-b32", 40, 24)
    x = torch.randn(3, 40, requires_grad=True)
    for lay in (layer, other):
        x.grad = None
        y = lay(x)  # CPU tensor under TRITON_INTERPRET=1: the Triton MX kernels via the interpreter
        y.sum().backward()
        dx = x.grad.clone()
        with forced("reference"):
            x.grad = None
            y_ref = lay(x)
            y_ref.sum().backward()
        assert torch.equal(y, y_ref) and torch.equal(dx, x.grad)
    g = torch.randn(4, 70)  # the stochastic, pre-scaled gradient cast: same seed, same bits on both paths
    sr = mx_quantize_dequantize(g, "e2m1", 32, rounding="stochastic", seed=3)
    with forced("reference"):
        assert torch.equal(sr, mx_quantize_dequantize(g, "e2m1", 32, rounding="stochastic", seed=3))


def test_bf16_activations():
    layer, _ = pair("mxfp8-b32", 64, 32)
    x = torch.randn(4, 64, dtype=torch.bfloat16, requires_grad=True)
    with forced("reference"):
        y = layer(x)
        y.float().sum().backward()
    assert y.dtype == torch.bfloat16 and x.grad.dtype == torch.bfloat16
    assert layer.weight.grad.dtype == torch.float32


def grad_draws(config: FP4Config, draws: int):
    torch.manual_seed(0)
    layer = FP4Linear(64, 32, config=config)
    x = torch.randn(16, 64, requires_grad=True)
    g = torch.randn(16, 32)
    outs = []
    with forced("reference"):
        for _ in range(draws):
            x.grad = None
            layer(x).backward(g)
            outs.append(x.grad.clone())
    exact = g @ oracle_mx(layer.weight.detach(), "e2m1", 32, dim=0)  # E[dx] when dy rounds unbiasedly
    return torch.stack(outs), exact


def test_fp4_stochastic_gradient_rounding_is_unbiased_and_seeded(one_thread):
    sr, exact = grad_draws(FP4Config(stochastic_rounding=True), 200)
    single, mean = rel_rms(sr[0], exact), rel_rms(sr.mean(0), exact)
    assert mean < single / 8  # errors average out like 1/sqrt(draws) (measured: 0.171 -> 0.013)
    assert not torch.equal(sr[0], sr[1])
    again, _ = grad_draws(FP4Config(stochastic_rounding=True), 2)
    assert torch.equal(again, sr[:2])  # reproducible under torch.manual_seed
    rne, _ = grad_draws(FP4Config(stochastic_rounding=False), 3)
    assert torch.equal(rne[0], rne[2])  # nearest rounding: no randomness
    assert rel_rms(rne.mean(0), exact) > 2 * mean  # and its bias does not average away


def test_mxfp8_stochastic_option_rounds_gradients_randomly():
    torch.manual_seed(0)
    layer = MXFP8Linear(64, 32, config=MXFP8Config(stochastic_rounding=True))
    x = torch.randn(8, 64, requires_grad=True)
    grads = []
    with forced("reference"):
        for _ in range(2):
            x.grad = None
            layer(x).backward(torch.full((8, 32), 0.3))
            grads.append(x.grad.clone())
    assert not torch.equal(grads[0], grads[1])


def state_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values())


PACKED = {  # seed example shapes; saving vs float32 weight + bias: MXFP8 74.1%, FP4 86.6%
    "mxfp8": (lambda: MXFP8Linear(768, 3072, config=MXFP8Config(block_size=32)), 768 * 3072, 0.74),
    "fp4": (lambda: FP4Linear(768, 3072, config=FP4Config(use_microscaling=True, block_size=32)), 768 * 3072 // 2, 0.86),
}


@pytest.mark.parametrize("name", list(PACKED))
def test_packed_state_dict_bytes(name):
    make, element_bytes, min_saving = PACKED[name]
    torch.manual_seed(0)
    layer = make()
    full = state_bytes(layer)
    assert full == (768 * 3072 + 3072) * 4
    x = torch.randn(2, 768)
    with forced("reference"):
        y = layer(x)
        layer.pack_weights()
        y_packed = layer(x)
    sd = layer.state_dict()
    assert set(sd) == {"weight_elements", "weight_scales", "bias"} and "weight" not in dict(layer.named_parameters())
    assert sd["weight_elements"].numel() == element_bytes and sd["weight_elements"].dtype == torch.uint8
    assert sd["weight_scales"].numel() == 3072 * 768 // 32 and sd["weight_scales"].dtype == torch.uint8
    packed = state_bytes(layer)
    assert packed == element_bytes + 3072 * 24 + 3072 * 4
    assert 1 - packed / full >= min_saving
    torch.testing.assert_close(y_packed, y, atol=0, rtol=0)  # the weight was already on the MX grid


@pytest.mark.parametrize("name", list(LAYERS))
def test_pack_load_unpack_round_trip(name):
    layer, _ = pair(name, 33, 16)  # odd K: FP4 codes pad to a whole byte
    x = torch.randn(5, 33, requires_grad=True)
    with forced("reference"):
        y = layer(x).detach()
        deq = layer.dequantized_weight()
        layer.pack_weights()
        assert layer.packed
        y_packed = layer(x)
        y_packed.sum().backward()  # the input still gets gradients from a frozen packed layer
        assert x.grad is not None and x.grad.abs().sum() > 0
        fresh = LAYERS[name][0](33, 16).pack_weights()
        fresh.load_state_dict(layer.state_dict())
        torch.testing.assert_close(fresh(x), y, atol=0, rtol=0)
        fresh.unpack_weights()
        assert isinstance(fresh.weight, nn.Parameter) and fresh.weight.requires_grad
        torch.testing.assert_close(fresh.weight.detach(), deq, atol=0, rtol=0)
        torch.testing.assert_close(fresh(x), y, atol=0, rtol=0)
    torch.testing.assert_close(y_packed, y, atol=0, rtol=0)


@pytest.mark.parametrize("elem", ["e2m1", "e5m2"])
def test_stochastic_mx_rounding_is_unbiased_even_near_the_block_max(elem):
    # 7.9 * 2**e sits in the band above max_normal that the OCP scale rule would saturate.
    x = torch.tensor([[7.9, 7.0, 6.5, 0.3, -5.1, 1.2, 0.01, 3.3] * 4]) * (1.0 if elem == "e2m1" else 2.0**13)
    with forced("reference"):
        draws = torch.stack([mx_quantize_dequantize(x, elem, 32, rounding="stochastic", seed=s) for s in range(400)])
        again = mx_quantize_dequantize(x, elem, 32, rounding="stochastic", seed=7)
    assert torch.equal(again, draws[7])
    sem = draws.std(0) / 20 + 1e-6 * x.abs()  # standard error of the mean of 400 draws
    assert ((draws.mean(0) - x).abs() <= 4 * sem).all()
    assert (draws[0] != x).any()


def test_mx_quantize_dequantize_matches_oracle_on_edge_values():
    x = torch.tensor([[0.0, -0.0, 1e-30, 448.0, 500.0, -3.0, 2.5, 6.0] * 4, [0.0] * 32])
    with forced("reference"):
        for elem in ("e4m3", "e5m2", "e2m1"):
            torch.testing.assert_close(mx_quantize_dequantize(x, elem, 32), oracle_mx(x, elem, 32), atol=0, rtol=0)
    assert mx_quantize_dequantize(torch.zeros(0, 4), "e4m3").shape == (0, 4)


@pytest.mark.parametrize(
    "cls, kwargs, field",
    [(MXFP8Config, {"block_size": 16}, "block_size"), (MXFP8Config, {"e4m3_forward": "yes"}, "e4m3_forward"),
     (FP4Config, {"block_size": 48}, "block_size"), (FP4Config, {"stochastic_rounding": None}, "stochastic_rounding"),
     (FP4Config, {"use_microscaling": 1}, "use_microscaling")],
)
def test_config_validation(cls, kwargs, field):
    with pytest.raises(ValueError, match=field):
        cls(**kwargs)
    with pytest.raises(ValueError, match="config"):
        MXFP8Linear(8, 8, config=FP4Config())


@pytest.mark.parametrize("kwargs, field", [({"forward_elem": "int8"}, "forward_elem"), ({"block_size": 16}, "block_size"),
                                           ({"gradient_rounding": "up"}, "gradient_rounding")])
def test_spec_validation(kwargs, field):
    args = {"forward_elem": "e4m3", "backward_elem": "e5m2", "block_size": 32, **kwargs}
    with pytest.raises(ValueError, match=field):
        MXSpec(**args)


def test_convert_keeps_head_and_parameters():
    model = nn.Sequential()
    model.add_module("fc", nn.Linear(16, 16))
    model.add_module("output", nn.Linear(16, 4))
    w = model.fc.weight
    convert_to_mxfp8(model, MXFP8Config(block_size=64))
    assert isinstance(model.fc, MXFP8Linear) and model.fc.weight is w and model.fc.config.block_size == 64
    assert type(model.output) is nn.Linear
    assert math.isclose(apply_precision(nn.Sequential(nn.Linear(4, 4)), "fp4")[0].spec.block_size, 32)
