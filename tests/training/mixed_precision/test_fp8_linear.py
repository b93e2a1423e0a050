"""FP8Linear, fp8_linear and convert_to_fp8: numerics against an fp32 oracle, delayed scaling, conversion.

Tolerance from the format: rounding to m mantissa bits has relative error <= 2**-(m+1) per element,
so a product of two rounded operands errs by <= 2**-m and a sum of such products, whose errors are
independent, has a relative RMS error well below 2**-m. We assert rel RMS error < 2**-m
(E4M3: 1/8, E5M2: 1/4); a wrong scale, transpose or format gives errors of order 1.
"""
import pytest
import torch
from torch import nn

from nexus.training.mixed_precision import FP8Format, FP8Linear, convert_to_fp8, fp8_linear, quantize_fp8
from nexus.training.mixed_precision.fp8 import _fp8_matmul, _scaled_mm_runs

MANTISSA = {torch.float8_e4m3fn: 3, torch.float8_e5m2: 2}


def rel_rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def qdq(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Oracle: just-in-time per-tensor scaled cast via torch's own float8 conversion."""
    fmax = torch.finfo(dtype).max
    scale = fmax / x.abs().amax()
    return (x * scale).clamp(-fmax, fmax).to(dtype).float() / scale


def pair(in_f: int, out_f: int, fmt: FP8Format, seed: int = 0, **kw):
    torch.manual_seed(seed)
    ref = nn.Linear(in_f, out_f)
    layer = FP8Linear(in_f, out_f, fp8_format=fmt, **kw)
    layer.load_state_dict(ref.state_dict(), strict=False)
    return layer, ref


@pytest.mark.parametrize("fmt", list(FP8Format), ids=lambda f: f.name)
def test_forward_equals_quantize_dequantize_oracle(fmt):
    layer, ref = pair(48, 32, fmt)
    x = torch.randn(5, 7, 48)
    y = layer(x)
    want = qdq(x, fmt.forward_dtype) @ qdq(ref.weight.detach(), fmt.forward_dtype).t() + ref.bias.detach()
    assert y.shape == (5, 7, 32) and y.dtype == torch.float32
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", list(FP8Format), ids=lambda f: f.name)
def test_forward_backward_close_to_fp32(fmt):
    layer, ref = pair(64, 48, fmt, seed=1)
    x = torch.randn(32, 64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = layer(x), ref(xr)
    g = torch.randn_like(yr)
    y.backward(g)
    yr.backward(g)
    fwd_tol = 2.0 ** -MANTISSA[fmt.forward_dtype]
    bwd_tol = 2.0 ** -min(MANTISSA[fmt.forward_dtype], MANTISSA[fmt.backward_dtype])
    assert rel_rms(y, yr) < fwd_tol
    assert rel_rms(x.grad, xr.grad) < bwd_tol
    assert rel_rms(layer.weight.grad, ref.weight.grad) < bwd_tol
    torch.testing.assert_close(layer.bias.grad, ref.bias.grad)
    assert rel_rms(y, yr) > 0  # the GEMM really ran in fp8


def test_backward_equals_quantized_gradient_oracle():
    layer, ref = pair(32, 16, FP8Format.HYBRID, seed=2)
    x = torch.randn(8, 32, requires_grad=True)
    g = torch.randn(8, 16)
    layer(x).backward(g)
    gq = qdq(g, torch.float8_e5m2)
    xq, wq = qdq(x.detach(), torch.float8_e4m3fn), qdq(ref.weight.detach(), torch.float8_e4m3fn)
    torch.testing.assert_close(x.grad, gq @ wq, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.weight.grad, gq.t() @ xq, atol=1e-5, rtol=1e-5)


def test_cpu_uses_scaled_mm_and_matches_emulation():
    a = torch.randn(20, 48)
    b = torch.randn(48, 24)
    sa, sb = torch.tensor(448.0) / a.abs().amax(), torch.tensor(57344.0) / b.abs().amax()
    aq, bq = quantize_fp8(a, sa, torch.float8_e4m3fn), quantize_fp8(b, sb, torch.float8_e5m2)
    assert _scaled_mm_runs(aq, bq)
    got = _fp8_matmul(aq, sa, bq, sb, torch.float32)
    torch.testing.assert_close(got, (aq.float() / sa) @ (bq.float() / sb), atol=1e-5, rtol=1e-5)


def test_quantize_saturates_and_keeps_nan():
    q = quantize_fp8(torch.tensor([1e6, -1e6, float("nan"), 1.0]), torch.tensor(1.0), torch.float8_e4m3fn)
    assert q[:2].float().tolist() == [448.0, -448.0]
    assert torch.isnan(q[2].float()) and q[3].float().item() == 1.0


def test_delayed_scaling_history_rolls_and_drives_the_next_scale():
    layer, ref = pair(16, 16, FP8Format.E4M3, amax_history_len=3)
    x1 = torch.randn(4, 16)
    layer(x1).sum().backward()
    a1 = x1.abs().amax()
    torch.testing.assert_close(layer.amax_history_input, torch.stack([a1, torch.tensor(0.0), torch.tensor(0.0)]))
    assert layer.amax_history_grad_output[0].item() == 1.0  # d(sum)/dy is all ones
    torch.testing.assert_close(layer.amax_history_weight[0], ref.weight.abs().amax().detach())

    # Step 2: a 10x larger input is cast with the scale of step 1's amax, so it saturates at 448/scale = a1.
    x2 = 10 * x1
    y2 = layer(x2)
    s1 = 448.0 / a1
    x2q = (x2 * s1).clamp(-448, 448).to(torch.float8_e4m3fn).float() / s1
    wq = qdq(ref.weight.detach(), torch.float8_e4m3fn)
    torch.testing.assert_close(y2, x2q @ wq.t() + ref.bias.detach(), atol=1e-5, rtol=1e-5)
    assert x2q.abs().max().item() == pytest.approx(a1.item(), rel=1e-6)
    torch.testing.assert_close(layer.amax_history_input[:2], torch.stack([10 * a1, a1]))

    for k in range(3):  # older entries fall off the end of a length-3 history
        layer(torch.full((2, 16), float(k + 1)))
    assert layer.amax_history_input.tolist() == [3.0, 2.0, 1.0]


def test_most_recent_algo_and_eval_mode():
    layer, _ = pair(16, 16, FP8Format.E4M3, amax_compute_algo="most_recent")
    layer(torch.full((2, 16), 100.0))
    layer(torch.full((2, 16), 1.0))
    # "most_recent" uses amax 1.0 of the last step, so an input of 2.0 saturates to 1.0 (max uses 100).
    x = torch.full((2, 16), 2.0)
    with torch.no_grad():
        w = layer.weight.detach()
        wq = qdq(w, torch.float8_e4m3fn)
        layer.eval()
        hist = layer.amax_history_input.clone()
        y = layer(x)
    torch.testing.assert_close(y, torch.ones(2, 16) @ wq.t() + layer.bias.detach(), atol=1e-5, rtol=1e-5)
    assert torch.equal(layer.amax_history_input, hist)  # eval does not record


def test_bf16_input_and_empty_batch():
    layer, ref = pair(32, 16, FP8Format.HYBRID)
    y = layer(torch.randn(3, 32, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16 and y.shape == (3, 16)
    x = torch.zeros(0, 32, requires_grad=True)
    out = layer(x)
    out.sum().backward()
    assert out.shape == (0, 16) and x.grad.shape == (0, 32)


def test_functional_without_history_matches_module_first_step():
    layer, _ = pair(32, 16, FP8Format.E5M2)
    x = torch.randn(6, 32)
    y_fn = fp8_linear(x, layer.weight, layer.bias, fp8_format=FP8Format.E5M2)
    torch.testing.assert_close(y_fn, layer(x))
    with pytest.raises(ValueError, match="features"):
        fp8_linear(torch.randn(2, 8), layer.weight)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"amax_history_len": 0}, "amax_history_len"), ({"amax_compute_algo": "mean"}, "amax_compute_algo"),
     ({"margin": -1}, "margin"), ({"fp8_format": "e4m3"}, "fp8_format")],
)
def test_invalid_settings_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        FP8Linear(16, 16, **kwargs)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(32, 64)
        self.odd = nn.Linear(64, 40)  # 40 is not a multiple of 16: kept
        self.fc2 = nn.Linear(40, 64)  # in_features 40: kept
        self.blocks = nn.ModuleList([nn.Linear(64, 64) for _ in range(2)])
        self.lm_head = nn.Linear(64, 32)

    def forward(self, x):
        h = torch.relu(self.fc2(torch.relu(self.odd(torch.relu(self.fc1(x))))))
        for b in self.blocks:
            h = torch.relu(b(h))
        return self.lm_head(h)


def test_convert_to_fp8_swaps_eligible_layers_and_keeps_weights():
    torch.manual_seed(0)
    model = Net()
    x = torch.randn(16, 32)
    want = model(x).detach()
    params = {n: p for n, p in model.named_parameters()}
    out = convert_to_fp8(model, fp8_format=FP8Format.HYBRID, filter_fn=lambda name, lin: name != "blocks.1")
    assert out is model
    kinds = {n: type(m).__name__ for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert kinds == {"fc1": "FP8Linear", "odd": "Linear", "fc2": "Linear", "blocks.0": "FP8Linear",
                     "blocks.1": "Linear", "lm_head": "Linear"}
    assert all(p is params[n] for n, p in model.named_parameters())  # same Parameter objects
    assert model.fc1.fp8_format is FP8Format.HYBRID
    got = model(x)
    assert 0 < rel_rms(got, want) < 2.0**-3
    got.sum().backward()
    assert model.fc1.weight.grad is not None and model.fc1.amax_history_grad_output[0] > 0


def test_convert_to_fp8_custom_skip_converts_head():
    model = Net()
    convert_to_fp8(model, skip=())
    assert isinstance(model.lm_head, FP8Linear)
