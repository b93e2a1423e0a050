"""GradScaler and MixedPrecisionConfig: skip-on-overflow, dynamic and static scale updates, validation."""
import pytest
import torch
from torch import nn

from nexus.training.mixed_precision import GradScaler, MixedPrecisionConfig


def make():
    torch.manual_seed(0)
    model = nn.Linear(4, 1)
    return model, torch.optim.SGD(model.parameters(), lr=0.1)


def step(scaler, model, opt, poison: bool):
    opt.zero_grad()
    loss = model(torch.ones(2, 4)).sum()
    scaler.scale(loss).backward()
    if poison:
        model.weight.grad[0, 0] = float("inf")
    scaler.step(opt)
    scaler.update()


def test_dynamic_fp16_skips_overflow_then_backs_off_and_grows():
    model, opt = make()
    cfg = MixedPrecisionConfig(dtype="fp16", init_scale=1024.0, growth_interval=2)
    scaler = GradScaler(cfg, device="cpu")
    assert scaler.is_enabled() and scaler.get_scale() == 1024.0
    before = model.weight.detach().clone()
    step(scaler, model, opt, poison=True)
    assert torch.equal(model.weight, before)  # step skipped
    assert scaler.get_scale() == 512.0 and scaler.skipped_steps == 1
    step(scaler, model, opt, poison=False)
    assert not torch.equal(model.weight, before)
    # The update used unscaled gradients: weight moved by lr * dL/dW = 0.1 * 2 per entry.
    torch.testing.assert_close(model.weight[0, 1:], before[0, 1:] - 0.2)
    step(scaler, model, opt, poison=False)
    assert scaler.get_scale() == 1024.0 and scaler.skipped_steps == 1  # grew after 2 clean steps


def test_static_scale_stays_fixed_and_still_skips():
    model, opt = make()
    scaler = GradScaler(MixedPrecisionConfig(dtype="fp16", loss_scaling="static", init_scale=128.0), device="cpu")
    for poison in (True, False, False, False):
        before = model.weight.detach().clone()
        step(scaler, model, opt, poison)
        assert scaler.get_scale() == 128.0
        assert torch.equal(model.weight, before) == poison
    assert scaler.skipped_steps == 1


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_no_scaling_for_fp32_and_bf16(dtype):
    scaler = GradScaler(MixedPrecisionConfig(dtype=dtype), device="cpu")
    assert not scaler.is_enabled()
    loss = torch.tensor(3.0)
    assert scaler.scale(loss) is loss


def test_state_dict_round_trip_keeps_scale_and_skips():
    model, opt = make()
    scaler = GradScaler(MixedPrecisionConfig(dtype="fp16", init_scale=64.0), device="cpu")
    step(scaler, model, opt, poison=True)
    other = GradScaler(MixedPrecisionConfig(dtype="fp16"), device="cpu")
    other.load_state_dict(scaler.state_dict())
    assert other.get_scale() == 32.0 and other.skipped_steps == 1


def test_is_a_torch_grad_scaler():
    assert isinstance(GradScaler(device="cpu"), torch.amp.GradScaler)


def test_config_resolves_loss_scaling_and_autocasts():
    assert MixedPrecisionConfig(dtype="fp16").resolved_loss_scaling == "dynamic"
    assert MixedPrecisionConfig(dtype="bf16").resolved_loss_scaling == "none"
    assert MixedPrecisionConfig(dtype="bf16", loss_scaling="dynamic").resolved_loss_scaling == "dynamic"
    cfg = MixedPrecisionConfig(dtype="bf16")
    assert cfg.torch_dtype is torch.bfloat16
    with cfg.autocast("cpu"):
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    with MixedPrecisionConfig().autocast("cpu"):
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


@pytest.mark.parametrize(
    "kwargs, field",
    [({"dtype": "fp8"}, "dtype"), ({"loss_scaling": "always"}, "loss_scaling"), ({"init_scale": 0.0}, "init_scale"),
     ({"growth_factor": 1.0}, "growth_factor"), ({"backoff_factor": 1.0}, "backoff_factor"),
     ({"growth_interval": 0}, "growth_interval")],
)
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MixedPrecisionConfig(**kwargs)


def test_config_is_keyword_only():
    with pytest.raises(TypeError):
        MixedPrecisionConfig("fp16")
