"""QAT: observers and fake quantization against torch.ao.quantization, prepare_qat / convert to int8."""
import pytest
import torch
import torch.ao.quantization as tq
from torch import nn

from nexus.training.qat import (
    FakeQuantize,
    MinMaxObserver,
    MovingAverageMinMaxObserver,
    ObserverType,
    QATConfig,
    QATLinear,
    QuantizationScheme,
    QuantizedLinear,
    calculate_qparams,
    convert,
    fake_quantize,
    prepare_qat,
    quant_range,
)

SCHEMES = {
    (False, False): torch.per_tensor_affine,
    (False, True): torch.per_tensor_symmetric,
    (True, False): torch.per_channel_affine,
    (True, True): torch.per_channel_symmetric,
}


def oracle_observer(moving: bool, per_channel: bool, symmetric: bool, bits: int = 8):
    qmin, qmax = quant_range(bits)
    kw = dict(dtype=torch.qint8, qscheme=SCHEMES[(per_channel, symmetric)], quant_min=qmin, quant_max=qmax)
    if per_channel:
        cls = tq.MovingAveragePerChannelMinMaxObserver if moving else tq.PerChannelMinMaxObserver
        return cls(ch_axis=0, **({"averaging_constant": 0.1} if moving else {}), **kw)
    cls = tq.MovingAverageMinMaxObserver if moving else tq.MinMaxObserver
    return cls(**({"averaging_constant": 0.1} if moving else {}), **kw)


def case_id(v):
    return {True: "y", False: "n"}.get(v, str(v))


@pytest.mark.parametrize("moving", [False, True], ids=["minmax", "moving"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("bits", [8, 4])
def test_observer_qparams_match_torch_ao(moving, per_channel, symmetric, bits):
    torch.manual_seed(0)
    ours = (MovingAverageMinMaxObserver(averaging_constant=0.1, bits=bits, symmetric=symmetric,
                                        per_channel=per_channel)
            if moving else MinMaxObserver(bits=bits, symmetric=symmetric, per_channel=per_channel))
    ref = oracle_observer(moving, per_channel, symmetric, bits)
    for k in range(4):
        x = torch.randn(6, 10) * (k + 1) + 0.5 * k  # shifting, growing ranges
        ours(x)
        ref(x)
    torch.testing.assert_close(ours.min_val, ref.min_val)
    torch.testing.assert_close(ours.max_val, ref.max_val)
    scale, zp = ours.calculate_qparams()
    ref_scale, ref_zp = ref.calculate_qparams()
    torch.testing.assert_close(scale, ref_scale.float().reshape(scale.shape))
    assert torch.equal(zp.long(), ref_zp.long().reshape(zp.shape))


def test_qparams_edge_cases():
    s, z = calculate_qparams(torch.tensor(0.0), torch.tensor(0.0), qmin=-128, qmax=127, symmetric=False)
    assert s.item() == torch.finfo(torch.float32).eps and z.item() == -128
    s, z = calculate_qparams(torch.tensor(1.0), torch.tensor(3.0), qmin=-128, qmax=127, symmetric=False)
    assert s.item() == pytest.approx(3 / 255) and z.item() == -128  # range always includes 0
    s, z = calculate_qparams(torch.tensor(-2.0), torch.tensor(1.0), qmin=-8, qmax=7, symmetric=True)
    assert s.item() == pytest.approx(2 / 7.5) and z.item() == 0
    with pytest.raises(ValueError, match="bits"):
        quant_range(9)


@pytest.mark.parametrize("per_channel", [False, True], ids=["tensor", "channel"])
def test_fake_quantize_and_its_gradient_match_torch_ao(per_channel):
    torch.manual_seed(1)
    x = (torch.randn(8, 12) * 3).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    if per_channel:
        scale, zp = torch.rand(8) * 0.05 + 0.01, torch.randint(-20, 20, (8,), dtype=torch.int32)
        y = fake_quantize(x, scale, zp, -128, 127, axis=0)
        yr = torch.fake_quantize_per_channel_affine(xr, scale, zp, 0, -128, 127)
    else:
        scale, zp = torch.tensor(0.02), torch.tensor(5, dtype=torch.int32)
        y = fake_quantize(x, scale, zp, -128, 127)
        yr = torch.fake_quantize_per_tensor_affine(xr, scale, zp, -128, 127)
    assert torch.equal(y, yr)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    assert torch.equal(x.grad, xr.grad)
    clipped = x.grad == 0
    assert clipped.any() and (~clipped).any()  # both branches of the clipped STE exercised


def test_fake_quantize_module_observes_only_in_training():
    fq = FakeQuantize(MinMaxObserver(symmetric=True))
    x = torch.randn(4, 8)
    y = fq(x)
    s, _ = fq.qparams()
    assert torch.equal(y, torch.round(x / s).clamp(-128, 127) * s)
    fq.eval()
    fq(100 * x)
    assert torch.equal(fq.qparams()[0], s)  # eval does not move the range
    calib = FakeQuantize(MinMaxObserver(), fake_quant_enabled=False)
    assert torch.equal(calib(x), x) and calib.observer.initialized


def test_observer_state_dict_round_trip():
    obs = MovingAverageMinMaxObserver(per_channel=True)
    obs(torch.randn(5, 3))
    fresh = MovingAverageMinMaxObserver(per_channel=True)
    fresh.load_state_dict(obs.state_dict())
    assert torch.equal(fresh.min_val, obs.min_val) and fresh.min_val.shape == (5,)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 24)
        self.head = nn.Linear(24, 4)

    def forward(self, x):
        return self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


CONFIGS = {
    "minmax-channel": QATConfig(observer_type=ObserverType.MIN_MAX, quantization_scheme=QuantizationScheme.PER_CHANNEL,
                                fake_quantize=True),
    "moving-tensor-asymw": QATConfig(observer_type="moving_average_min_max", quantization_scheme="per_tensor",
                                     weight_symmetric=False, averaging_constant=0.2),
    "4bit-symact": QATConfig(weight_bits=4, activation_bits=6, activation_symmetric=True),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prepare_train_convert_matches_fake_quant(name):
    torch.manual_seed(0)
    model = Net()
    params = dict(model.named_parameters())
    prepare_qat(model, CONFIGS[name])
    assert all(isinstance(m, QATLinear) for m in (model.fc1, model.fc2, model.head))
    assert all(p is params[n] for n, p in model.named_parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    x, t = torch.randn(64, 16), torch.randn(64, 4)
    for _ in range(5):
        loss = nn.functional.mse_loss(model(x), t)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.fc1.weight.grad.abs().sum() > 0  # straight-through gradients reach the weights
    model.eval()
    xe = torch.randn(3, 5, 16)
    want = model(xe).detach()
    convert(model)
    assert all(isinstance(m, QuantizedLinear) for m in (model.fc1, model.fc2, model.head))
    assert model.fc1.weight_int8.dtype == torch.int8
    got = model(xe)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_quantized_linear_codes_and_int8_input():
    torch.manual_seed(0)
    layer = QATLinear(16, 8, config=QATConfig(quantization_scheme=QuantizationScheme.PER_CHANNEL))
    layer(torch.randn(32, 16))
    q = QuantizedLinear.from_qat(layer)
    s, _ = layer.weight_fake_quant.qparams()
    assert s.shape == (8,) and q.weight_scale.shape == (8,)
    torch.testing.assert_close(q.weight_int8.float() * s[:, None], layer.weight_fake_quant(layer.weight).detach())
    qx = q.quantize_input(torch.randn(4, 16))
    assert qx.dtype == torch.int8
    empty = q(torch.zeros(0, 16))
    assert empty.shape == (0, 8)


@pytest.mark.slow
def test_qat_trains_close_to_float(one_thread):
    torch.manual_seed(0)
    teacher = Net()
    x = torch.randn(256, 16)
    with torch.no_grad():
        y = teacher(x)

    def train(qat: bool) -> float:
        torch.manual_seed(1)
        model = Net()
        if qat:
            prepare_qat(model, QATConfig())
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(80):
            loss = nn.functional.mse_loss(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        if qat:
            convert(model)
        with torch.no_grad():
            return nn.functional.mse_loss(model(x), y).item()

    float_loss, int8_loss = train(False), train(True)
    assert int8_loss < 0.05 * y.var().item()  # it learned
    assert int8_loss < float_loss * 1.5 + 1e-4


def test_skip_and_validation():
    model = prepare_qat(Net(), QATConfig(skip=("head",)))
    assert type(model.head) is nn.Linear and isinstance(model.fc1, QATLinear)
    for kwargs, field in [({"weight_bits": 9}, "weight_bits"), ({"observer_type": "histogram"}, "observer_type"),
                          ({"quantization_scheme": "per_row"}, "quantization_scheme"),
                          ({"averaging_constant": 0.0}, "averaging_constant"), ({"fake_quantize": 1}, "fake_quantize")]:
        with pytest.raises(ValueError, match=field):
            QATConfig(**kwargs)
    with pytest.raises(TypeError):
        QATConfig(ObserverType.MIN_MAX)
