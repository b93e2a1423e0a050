"""Every kernel launcher is a ``torch.library`` custom op (namespace ``nexus``) with a fake implementation:
``torch.library.opcheck`` (schema, fake tensors, autograd registration, AOT dispatch with dynamic
shapes) on CPU tensors, on the reference and on the interpreted-kernel path.

The public functions stay the API; they check arguments, turn seeds into int64 tensors and call
these ops, which pick the path per call.
"""
from __future__ import annotations

import pytest
import torch

import nexus_kernels  # noqa: F401  (registers the ops)
from nexus_kernels import forced, select, to_mx
from nexus_kernels.newton_schulz import DEFAULT_COEFFS

OPS = torch.ops.nexus


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _x(shape, dtype=torch.float32, seed=0):
    # opcheck compares outputs with NaN != NaN: edge values without NaN (NaN is tested elsewhere)
    x = torch.randn(*shape, generator=_gen(seed)) * 8
    x.view(-1)[:3] = torch.tensor([float("inf"), -0.0, 1e6])
    return x.to(dtype)


# every code but the NaN codes of E4M3 (0x7F), E5M2 (0x7D-0x7F) and E8M0 (0xFF), both signs
CODES = torch.cat([torch.arange(0, 125), torch.arange(128, 253)]).to(torch.uint8)


def _cases():
    """(id, op, args) for every op, with odd shapes that do not divide the block sizes."""
    seed = torch.tensor(2**63 + 12345 - 2**64, dtype=torch.int64)  # a seed >= 2**63, as int64 bits
    x = _x((3, 37))
    cases = []
    for fmt in ("e4m3", "e5m2", "e2m1"):
        cases += [
            (f"cast_to_fp_bits-{fmt}-nearest", OPS.cast_to_fp_bits, (x, fmt, "nearest", None, True)),
            (f"cast_to_fp_bits-{fmt}-stochastic", OPS.cast_to_fp_bits, (x, fmt, "stochastic", seed, True)),
            (f"cast_to_fp-{fmt}-bf16-stochastic", OPS.cast_to_fp,
             (_x((5, 9), torch.bfloat16), fmt, "stochastic", seed, True)),
            (f"decode_fp_bits-{fmt}", OPS.decode_fp_bits, (CODES, fmt, torch.float32)),
        ]
        for rounding in ("nearest", "stochastic"):
            cases.append((f"to_mx-{fmt}-{rounding}", OPS.to_mx,
                          (_x((2, 3, 70)), fmt, 32, rounding, seed if rounding == "stochastic" else None)))
        elements, scales = to_mx(torch.randn(2, 71, generator=_gen(6)) * 8, fmt, 64)  # inf would decode to NaN
        cases.append((f"from_mx-{fmt}", OPS.from_mx, (elements, scales, fmt, 64, torch.bfloat16, 71)))
    cases += [
        ("cast_to_fp-e5m2-no-saturate", OPS.cast_to_fp, (x, "e5m2", "nearest", None, False)),
        ("decode_fp_bits-e8m0-f64", OPS.decode_fp_bits, (CODES, "e8m0", torch.float64)),
        ("orthogonalize-2d-tall", OPS.orthogonalize, (torch.randn(40, 24, generator=_gen(1)), list(DEFAULT_COEFFS) * 2,
                                                      1e-7)),
        ("orthogonalize-3d", OPS.orthogonalize, (torch.randn(2, 24, 40, generator=_gen(2)), list(DEFAULT_COEFFS),
                                                 1e-7)),
    ]
    G = torch.randn(20, 36, generator=_gen(3))
    QL = torch.linalg.qr(torch.randn(20, 20, generator=_gen(4)))[0]
    QR = torch.linalg.qr(torch.randn(36, 36, generator=_gen(5)))[0].double()
    cases += [
        ("soap_update_preconditioners-both", OPS.soap_update_preconditioners,
         (torch.eye(20), torch.eye(36, dtype=torch.float64), G, 0.9)),
        ("soap_update_preconditioners-left", OPS.soap_update_preconditioners, (torch.eye(20), None, G, 0.5)),
        ("soap_project-both", OPS.soap_project, (G, QL, QR)),
        ("soap_project-right", OPS.soap_project, (G, None, QR)),
        ("soap_project_back-left", OPS.soap_project_back, (G, QL, None)),
    ]
    return cases


CASES = _cases()


@pytest.mark.parametrize("path", ["reference", "interpret"])
@pytest.mark.parametrize("op, args", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_opcheck(op, args, path):
    assert select(torch.zeros(1)) == "interpret"  # conftest: the kernels run in Triton's interpreter
    with forced(path):
        torch.library.opcheck(op, args)


def test_every_launcher_is_an_op():
    names = {"cast_to_fp_bits", "cast_to_fp", "decode_fp_bits", "to_mx", "from_mx", "orthogonalize",
             "soap_update_preconditioners", "soap_project", "soap_project_back"}
    for name in names:
        assert isinstance(getattr(OPS, name), torch._ops.OpOverloadPacket), name
    assert {c[0].split("-")[0] for c in CASES} == names  # each op has opcheck cases above


def test_fake_shapes_follow_symbolic_sizes():
    """The fake implementations give the real output shapes, also for odd K and packed E2M1."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    x = _x((3, 65))
    real = OPS.to_mx(x, "e2m1", 32, "nearest", None)
    with FakeTensorMode() as mode:
        fake = OPS.to_mx(mode.from_tensor(x), "e2m1", 32, "nearest", None)
    assert [tuple(t.shape) for t in fake] == [tuple(t.shape) for t in real] == [(3, 33), (3, 3)]
    assert [t.dtype for t in fake] == [torch.uint8, torch.uint8]


def test_public_functions_detach_and_do_not_track_gradients():
    x = torch.randn(4, 40, requires_grad=True)
    assert not nexus_kernels.cast_to_fp(x, "e4m3").requires_grad
    assert not nexus_kernels.orthogonalize(x).requires_grad
    assert not nexus_kernels.project(x, None, torch.eye(40)).requires_grad


def test_seed_tensor_matches_int_seed_and_rejects_bad_seeds():
    x = torch.randn(500)
    for seed in (0, 7, 2**63 - 1, 2**63, 2**64 - 1):
        as_int = nexus_kernels.cast_to_fp_bits(x, "e5m2", "stochastic", seed=seed)
        wrapped = seed - 2**64 if seed >= 2**63 else seed
        as_tensor = nexus_kernels.cast_to_fp_bits(x, "e5m2", "stochastic", seed=torch.tensor([wrapped]))
        assert torch.equal(as_int, as_tensor), seed
        mx_int = to_mx(x[None], "e2m1", 32, "stochastic", seed=seed)
        mx_tensor = to_mx(x[None], "e2m1", 32, "stochastic", seed=torch.tensor(wrapped, dtype=torch.int64))
        assert all(torch.equal(a, b) for a, b in zip(mx_int, mx_tensor)), seed
    with pytest.raises(TypeError, match="integer dtype"):
        nexus_kernels.cast_to_fp(x, "e4m3", "stochastic", seed=torch.tensor(1.0))
    with pytest.raises(ValueError, match="one value"):
        nexus_kernels.cast_to_fp(x, "e4m3", "stochastic", seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="seed must be in"):
        to_mx(x, "e4m3", rounding="stochastic", seed=2**64)


def test_custom_format_objects_are_refused_by_name():
    from dataclasses import replace

    from nexus_kernels.formats import E4M3

    odd = replace(E4M3, nan_code=None)  # same name, another format
    with pytest.raises(ValueError, match="not one of the library's formats"):
        nexus_kernels.cast_to_fp(torch.randn(4), odd)


@pytest.mark.parametrize("path", ["reference", "interpret"])
def test_stochastic_op_without_seed_is_an_error_not_a_hidden_draw(path):
    x = torch.randn(8, 32)
    with forced(path):
        with pytest.raises(ValueError, match="needs a seed tensor"):
            OPS.cast_to_fp(x, "e4m3", "stochastic", None, True)
        with pytest.raises(ValueError, match="needs a seed tensor"):
            OPS.to_mx(x, "e4m3", 32, "stochastic", None)
