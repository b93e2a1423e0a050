"""FloatFormat constants against the OCP OFP8 / MX v1.0 tables and torch's own float8 dtypes."""
import dataclasses

import pytest
import torch

from nexus_kernels.formats import E2M1, E4M3, E5M2, E8M0, FloatFormat, get_format


@pytest.mark.parametrize(
    "fmt, exp_bits, man_bits, bias, max_normal, min_subnormal, emax",
    [
        (E4M3, 4, 3, 7, 448.0, 2.0**-9, 8),
        (E5M2, 5, 2, 15, 57344.0, 2.0**-16, 15),
        (E2M1, 2, 1, 1, 6.0, 0.5, 2),
        (E8M0, 8, 0, 127, 2.0**127, 2.0**-127, 127),
    ],
    ids=["e4m3", "e5m2", "e2m1", "e8m0"],
)
def test_constants_match_ocp_tables(fmt, exp_bits, man_bits, bias, max_normal, min_subnormal, emax):
    assert (fmt.exp_bits, fmt.man_bits, fmt.bias) == (exp_bits, man_bits, bias)
    assert fmt.max_normal == max_normal
    assert fmt.min_subnormal == min_subnormal
    assert fmt.emax == emax


@pytest.mark.parametrize("fmt, dtype", [(E4M3, torch.float8_e4m3fn), (E5M2, torch.float8_e5m2)], ids=["e4m3", "e5m2"])
def test_fp8_constants_match_torch_finfo(fmt, dtype):
    info = torch.finfo(dtype)
    assert fmt.max_normal == info.max
    assert fmt.min_normal == info.tiny
    assert fmt.min_subnormal == info.smallest_normal * 2.0 ** -fmt.man_bits
    # max_code is the code of +max normal, nan_code decodes to NaN in torch's own dtype.
    codes = torch.tensor([fmt.max_code, fmt.nan_code], dtype=torch.uint8).view(dtype).float()
    assert codes[0].item() == info.max
    assert torch.isnan(codes[1])
    if fmt.has_inf:
        assert torch.tensor([fmt.inf_code], dtype=torch.uint8).view(dtype).float().item() == float("inf")


def test_e2m1_value_set_and_bits():
    assert E2M1.bits == 4 and E4M3.bits == 8 and E8M0.bits == 8
    assert E2M1.sign_bit == 0x8 and E4M3.sign_bit == 0x80 and E8M0.sign_bit == 0
    assert not E2M1.has_inf and E2M1.nan_code is None and E2M1.max_code == 0x7


def test_e8m0_matches_torch_e8m0fnu():
    code = torch.tensor([0, E8M0.max_code, E8M0.nan_code], dtype=torch.uint8)
    values = code.view(torch.float8_e8m0fnu).float()
    assert values[0].item() == E8M0.min_subnormal
    assert values[1].item() == E8M0.max_normal
    assert torch.isnan(values[2])


@pytest.mark.parametrize("name", ["e4m3", "E4M3", "e5m2", "e2m1", "e8m0"])
def test_get_format_by_name(name):
    fmt = get_format(name)
    assert fmt.name == name.lower()
    assert get_format(fmt) is fmt


@pytest.mark.parametrize("bad", ["e3m4", "fp8", "", "e4m3fnuz"])
def test_get_format_unknown_name(bad):
    with pytest.raises(ValueError, match="unknown float format"):
        get_format(bad)


def test_get_format_wrong_type():
    with pytest.raises(TypeError, match="int"):
        get_format(8)


def test_formats_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        E4M3.bias = 8


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("exp_bits", 0, "exp_bits"),
        ("man_bits", 9, "man_bits"),
        ("max_normal", 500.0, "max_normal"),
        ("min_normal", 0.5, "min_normal"),
        ("min_subnormal", 1.0, "min_subnormal"),
        ("name", "E4M3", "name"),
    ],
)
def test_invalid_format_names_the_field(field, value, message):
    kwargs = dataclasses.asdict(E4M3)
    kwargs[field] = value
    with pytest.raises(ValueError, match=message):
        FloatFormat(**kwargs)
