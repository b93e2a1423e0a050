"""Optimizers whose statistics live in the parameter dtype refuse bf16/fp16 parameters by name."""
import pytest
import torch

from nexus.training.optimizers import Prodigy, ScheduleFreeAdamW, Sophia


@pytest.mark.parametrize("cls", [Prodigy, ScheduleFreeAdamW, Sophia])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_sixteen_bit_parameters_are_refused(cls, dtype):
    with pytest.raises(ValueError, match=rf"{cls.__name__}.*\(3, 2\).*{str(dtype).split('.')[-1]}.*fp32"):
        cls([torch.nn.Parameter(torch.zeros(3, 2, dtype=dtype))])


@pytest.mark.parametrize("cls", [Prodigy, ScheduleFreeAdamW, Sophia])
def test_fp32_parameters_are_accepted(cls):
    cls([torch.nn.Parameter(torch.zeros(3, 2))])


def test_bf16_rounds_away_the_ema_step_these_optimizers_rely_on():
    """Why the refusal: the second-moment decay v * 0.999 is a no-op in bf16."""
    v = torch.tensor([1.0], dtype=torch.bfloat16)
    assert torch.equal(v * 0.999, v)
    assert not torch.equal(v.float() * 0.999, v.float())
