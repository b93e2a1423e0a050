"""SOAP kernels: fused preconditioner EMA and projections, interpreter vs reference vs float64 oracle."""
import pytest
import torch

from nexus_kernels import forced, select
from nexus_kernels import soap as sk
from nexus_kernels.soap import (project, project_back, project_back_reference, project_reference,
                                update_preconditioners, update_preconditioners_reference)


def gen(seed: int):
    return torch.Generator().manual_seed(seed)


def spd(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    A = torch.randn(n, n, generator=gen(seed), dtype=torch.float64)
    return (A @ A.T / n).to(dtype)


def orthogonal(n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    return torch.linalg.qr(torch.randn(n, n, generator=gen(seed), dtype=torch.float64))[0].to(dtype)


def ema_oracle(S: torch.Tensor, Z: torch.Tensor, beta: float) -> torch.Tensor:
    """beta S + (1 - beta) Z Z^T in float64."""
    Z = Z.double()
    return beta * S.double() + (1 - beta) * Z @ Z.T


SIDES = {"both": (True, True), "left_only": (True, False), "right_only": (False, True)}


@pytest.mark.parametrize("side", SIDES.values(), ids=SIDES.keys())
@pytest.mark.parametrize("m,n", [(40, 70), (70, 24)], ids=["wide_40x70", "tall_70x24"])
def test_update_preconditioners_kernel_vs_reference_vs_oracle(m, n, side):
    G = torch.randn(m, n, generator=gen(m * n))
    L0, R0 = spd(m, 1), spd(n, 2)
    L = L0.clone() if side[0] else None
    R = R0.clone() if side[1] else None
    Lr = L0.clone() if side[0] else None
    Rr = R0.clone() if side[1] else None
    assert select(G) == "interpret"
    update_preconditioners(L, R, G, 0.9)
    update_preconditioners_reference(Lr, Rr, G, 0.9)
    for got, ref, S0, Z in ((L, Lr, L0, G), (R, Rr, R0, G.T)):
        if got is None:
            continue
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got.double(), ema_oracle(S0, Z, 0.9), atol=1e-5, rtol=1e-5)


def test_update_many_tiles_mirrored(monkeypatch):
    # 16-wide tiles: L has 4x4 tiles, R 3x3: both sides, several mirrored blocks, in one launch
    monkeypatch.setattr(sk, "_INTERPRET_MAX_BLOCK", 16)
    G = torch.randn(50, 37, generator=gen(3))
    L, R = spd(50, 4), spd(37, 5)
    L0, R0 = L.clone(), R.clone()
    update_preconditioners(L, R, G, 0.5)
    torch.testing.assert_close(L.double(), ema_oracle(L0, G, 0.5), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(R.double(), ema_oracle(R0, G.T, 0.5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("beta", [0.0, 1.0], ids=["beta0_replaces", "beta1_keeps"])
def test_update_beta_edges(beta):
    G = torch.randn(20, 30, generator=gen(6))
    L, R = spd(20, 7), spd(30, 8)
    L0, R0 = L.clone(), R.clone()
    update_preconditioners(L, R, G, beta)
    torch.testing.assert_close(L.double(), ema_oracle(L0, G, beta), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(R.double(), ema_oracle(R0, G.T, beta), atol=1e-5, rtol=1e-5)
    if beta == 1.0:
        assert torch.equal(L, L0) and torch.equal(R, R0)


def test_update_float64_statistics_and_bf16_gradient():
    G = torch.randn(24, 40, generator=gen(9), dtype=torch.float64)
    L, R = spd(24, 10, torch.float64), spd(40, 11, torch.float64)
    L0, R0 = L.clone(), R.clone()
    update_preconditioners(L, R, G, 0.95)
    torch.testing.assert_close(L, ema_oracle(L0, G, 0.95), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(R, ema_oracle(R0, G.T, 0.95), atol=1e-12, rtol=1e-12)
    # bf16 gradients are upcast to the statistics' dtype before the product
    Gb = torch.randn(24, 40, generator=gen(12)).bfloat16()
    L = torch.zeros(24, 24)
    update_preconditioners(L, None, Gb, 0.0)
    torch.testing.assert_close(L.double(), ema_oracle(torch.zeros(24, 24), Gb.float(), 0.0), atol=1e-5, rtol=1e-5)


def test_update_edge_inputs():
    L = spd(8, 13)
    L0 = L.clone()
    update_preconditioners(L, None, torch.zeros(8, 0), 0.5)  # empty gradient: only the decay
    torch.testing.assert_close(L, 0.5 * L0)
    update_preconditioners(None, None, torch.randn(8, 3), 0.5)  # nothing to update is fine
    L = torch.zeros(8, 8)
    update_preconditioners(L, None, torch.zeros(8, 5), 0.3)
    assert torch.equal(L, torch.zeros(8, 8))


CASES = {"both": (True, True), "left": (True, False), "right": (False, True)}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_project_and_back_kernel_vs_reference_vs_oracle(case):
    m, n = 36, 52
    G = torch.randn(m, n, generator=gen(14))
    QL = orthogonal(m, 15) if case[0] else None
    QR = orthogonal(n, 16) if case[1] else None
    P = project(G, QL, QR)
    B = project_back(G, QL, QR)
    torch.testing.assert_close(P, project_reference(G, QL, QR), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(B, project_back_reference(G, QL, QR), atol=1e-5, rtol=1e-5)
    eye_m, eye_n = torch.eye(m, dtype=torch.float64), torch.eye(n, dtype=torch.float64)
    ql = QL.double() if QL is not None else eye_m
    qr = QR.double() if QR is not None else eye_n
    torch.testing.assert_close(P.double(), ql.T @ G.double() @ qr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(B.double(), ql @ G.double() @ qr.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(project_back(P, QL, QR), G, atol=1e-5, rtol=1e-5)


def test_project_many_tiles_and_float64(monkeypatch):
    monkeypatch.setattr(sk, "_INTERPRET_MAX_BLOCK", 16)
    G = torch.randn(45, 33, generator=gen(17), dtype=torch.float64)
    QL, QR = orthogonal(45, 18, torch.float64), orthogonal(33, 19, torch.float64)
    P = project(G, QL, QR)
    assert P.dtype == torch.float64
    torch.testing.assert_close(P, QL.T @ G @ QR, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(project_back(P, QL, QR), G, atol=1e-12, rtol=1e-12)


def test_project_identity_both_sides_and_forced_reference():
    G = torch.randn(6, 7, generator=gen(20))
    out = project(G, None, None)
    assert torch.equal(out, G) and out.data_ptr() != G.data_ptr()
    QL = orthogonal(6, 21)
    with forced("reference"):
        assert select(G) == "reference"
        torch.testing.assert_close(project(G, QL, None).double(), QL.double().T @ G.double(), atol=1e-5, rtol=1e-5)


def test_errors_name_the_problem():
    G = torch.randn(5, 7)
    with pytest.raises(ValueError, match=r"L must have shape \(5, 5\)"):
        update_preconditioners(torch.zeros(7, 7), None, G, 0.9)
    with pytest.raises(TypeError, match="R holds running statistics.*bfloat16"):
        update_preconditioners(None, torch.zeros(7, 7, dtype=torch.bfloat16), G, 0.9)
    with pytest.raises(ValueError, match="beta"):
        update_preconditioners(torch.zeros(5, 5), None, G, 1.5)
    with pytest.raises(ValueError, match="G must be 2D"):
        update_preconditioners(None, None, torch.randn(2, 5, 7), 0.9)
    with pytest.raises(ValueError, match=r"QR must have shape \(7, 7\)"):
        project(G, None, torch.eye(5))
    with pytest.raises(TypeError, match="QL must be a float"):
        project_back(G, torch.eye(5, dtype=torch.int32), None)
