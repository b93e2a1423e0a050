"""orthogonalize: Triton kernel (interpreter) vs torch reference vs an SVD oracle.

The oracle: Newton-Schulz maps each singular value s of G / ||G||_F through the scalar quintic
p(s) = a s + b s^3 + c s^5 and keeps the singular vectors, so after the steps the result must be
U diag(p(...p(s))) V^T, computed here in float64 from torch.linalg.svd.
"""
import pytest
import torch

from nexus_kernels import forced, select
from nexus_kernels import newton_schulz as ns
from nexus_kernels.newton_schulz import (DEFAULT_COEFFS, POLAR_EXPRESS_COEFFS, orthogonalize,
                                         orthogonalize_reference, polar_express_coeffs)


def svd_oracle(G: torch.Tensor, schedule, eps: float = 1e-7) -> torch.Tensor:
    G = G.double()
    U, S, Vh = torch.linalg.svd(G, full_matrices=False)
    s = S / (torch.linalg.matrix_norm(G)[..., None] + eps)
    for a, b, c in schedule:
        s = a * s + b * s**3 + c * s**5
    return U @ torch.diag_embed(s) @ Vh


def gen(seed: int):
    return torch.Generator().manual_seed(seed)


SHAPES = {"wide_48x96": (48, 96), "tall_96x48": (96, 48), "batched_3x40x72": (3, 40, 72),
          "square_odd_33": (33, 33)}


@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_kernel_matches_reference_and_svd_oracle(shape):
    # two steps keep the interpreter quick; the five-step run is below
    G = torch.randn(*shape, generator=gen(sum(shape)))
    assert select(G) == "interpret"
    X = orthogonalize(G, steps=2)
    assert X.shape == G.shape and X.dtype == G.dtype
    torch.testing.assert_close(X, orthogonalize_reference(G, steps=2), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(X.double(), svd_oracle(G, [DEFAULT_COEFFS] * 2), atol=2e-5, rtol=1e-4)


def test_kernel_five_steps_singular_values_in_band():
    G = torch.randn(48, 80, generator=gen(0))
    X = orthogonalize(G)
    torch.testing.assert_close(X, orthogonalize_reference(G), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(X.double(), svd_oracle(G, [DEFAULT_COEFFS] * 5), atol=2e-5, rtol=1e-4)
    # the default quintic leaves every singular value in about [0.68, 1.13]
    sv = torch.linalg.svdvals(X.double())
    assert sv.min() > 0.6 and sv.max() < 1.2


@pytest.mark.parametrize("shape", [*SHAPES.values(), (64, 256), (3, 128, 40)],
                         ids=[*SHAPES.keys(), "wide_64x256", "batched_tall_3x128x40"])
def test_reference_singular_value_band(shape):
    G = torch.randn(*shape, generator=gen(sum(shape) + 1))
    sv = torch.linalg.svdvals(orthogonalize_reference(G).double())
    assert sv.min() > 0.6 and sv.max() < 1.2


def test_multi_tile_grid_and_mirrored_blocks(monkeypatch):
    # 16-wide tiles: 50 rows -> 4 row tiles, 10 lower-triangle programs, 6 mirrored stores
    monkeypatch.setattr(ns, "_INTERPRET_MAX_BLOCK", 16)
    G = torch.randn(2, 50, 37, generator=gen(1))
    X = orthogonalize(G, steps=2)
    torch.testing.assert_close(X, orthogonalize_reference(G, steps=2), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(X.double(), svd_oracle(G, [DEFAULT_COEFFS] * 2), atol=2e-5, rtol=1e-4)


def test_symmetric_kernel_blocks_directly(monkeypatch):
    monkeypatch.setattr(ns, "_INTERPRET_MAX_BLOCK", 16)
    X = torch.randn(2, 70, 24, generator=gen(2))
    C = torch.randn(2, 70, 70, generator=gen(3))
    C = C + C.mT
    out = torch.empty(2, 70, 70)
    ns._syrk(X, out, -0.5, C, 2.0, interpret=True)
    expect = -0.5 * X.double() @ X.double().mT + 2.0 * C.double()
    torch.testing.assert_close(out.double(), expect, atol=1e-4, rtol=1e-5)


def test_polar_express_schedule_converges_tighter():
    G = torch.randn(40, 64, generator=gen(4))
    X = orthogonalize(G, coeffs=POLAR_EXPRESS_COEFFS)
    schedule = polar_express_coeffs(5)
    torch.testing.assert_close(X, orthogonalize_reference(G, coeffs=schedule), atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(X.double(), svd_oracle(G, schedule), atol=2e-5, rtol=1e-4)
    sv_pe = torch.linalg.svdvals(X.double())
    sv_default = torch.linalg.svdvals(orthogonalize_reference(G).double())
    assert (sv_pe - 1).abs().max() < (sv_default - 1).abs().max()


def test_polar_express_coeffs_values():
    coeffs = polar_express_coeffs(9, safety=1.01)
    a, b, c = 8.28721201814563, -23.595886519098837, 17.300387312530933
    assert coeffs[0] == pytest.approx((a / 1.01, b / 1.01**3, c / 1.01**5))
    # the fixed point is unscaled and repeats past the table
    assert coeffs[7] == coeffs[8] == (1.875, -1.25, 0.375)
    assert polar_express_coeffs(8, safety=1.0)[7] == (1.875, -1.25, 0.375)
    # Polar Express with 8 steps reaches the polar factor: every singular value ~ 1
    sv = torch.linalg.svdvals(orthogonalize_reference(torch.randn(32, 64, generator=gen(5)),
                                                      coeffs=polar_express_coeffs(8)).double())
    assert (sv - 1).abs().max() < 2e-3


def test_float64_kernel_path_is_exact_to_float64():
    G = torch.randn(24, 40, dtype=torch.float64, generator=gen(6))
    X = orthogonalize(G, steps=3)
    assert X.dtype == torch.float64
    torch.testing.assert_close(X, svd_oracle(G, [DEFAULT_COEFFS] * 3), atol=1e-12, rtol=1e-10)


def test_bfloat16_in_bfloat16_out():
    G = torch.randn(32, 48, generator=gen(7)).bfloat16()
    X = orthogonalize(G, steps=3)
    assert X.dtype == torch.bfloat16
    torch.testing.assert_close(X.float(), orthogonalize_reference(G.float(), steps=3), atol=1e-2, rtol=1e-2)


def test_reference_backend_is_forced():
    G = torch.randn(20, 30, generator=gen(8))
    with forced("reference"):
        assert select(G) == "reference"
        X = orthogonalize(G)
    torch.testing.assert_close(X.double(), svd_oracle(G, [DEFAULT_COEFFS] * 5), atol=2e-5, rtol=1e-4)


def test_edge_values_zero_empty_rank_one():
    assert torch.equal(orthogonalize(torch.zeros(16, 24), steps=2), torch.zeros(16, 24))
    empty = orthogonalize(torch.zeros(0, 5))
    assert empty.shape == (0, 5)
    # rank one u v^T: one singular value, mapped like any other; the rest stay zero
    u, v = torch.randn(20, 1, generator=gen(9)), torch.randn(1, 30, generator=gen(10))
    X = orthogonalize(u @ v, steps=5)
    torch.testing.assert_close(X.double(), svd_oracle(u @ v, [DEFAULT_COEFFS] * 5), atol=2e-5, rtol=1e-4)
    assert torch.linalg.matrix_rank(X.double(), atol=1e-3) == 1
    # scale invariance: the Frobenius normalisation removes any positive factor
    G = torch.randn(12, 20, generator=gen(11))
    torch.testing.assert_close(orthogonalize_reference(1e6 * G), orthogonalize_reference(G), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("steps", [1, 3, 7])
def test_reference_matches_oracle_over_steps(steps):
    G = torch.randn(30, 50, generator=gen(steps))
    torch.testing.assert_close(orthogonalize_reference(G, steps=steps).double(),
                               svd_oracle(G, [DEFAULT_COEFFS] * steps), atol=2e-5, rtol=1e-4)


def test_input_errors_name_the_problem():
    with pytest.raises(ValueError, match="2D .* or 3D"):
        orthogonalize(torch.randn(10))
    with pytest.raises(TypeError, match="int64"):
        orthogonalize(torch.ones(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="steps=5 disagrees with the 3-step"):
        orthogonalize(torch.randn(4, 4), steps=5, coeffs=polar_express_coeffs(3))
    with pytest.raises(ValueError, match="must have 3 values"):
        orthogonalize(torch.randn(4, 4), coeffs=[(1.0, 2.0)])
    with pytest.raises(ValueError, match="positive int"):
        orthogonalize(torch.randn(4, 4), steps=0)
    with pytest.raises(ValueError, match="empty schedule"):
        orthogonalize(torch.randn(4, 4), coeffs=[])
    with pytest.raises(ValueError, match="eps"):
        orthogonalize(torch.randn(4, 4), eps=-1.0)
