"""The whole reference path, run where ``import triton`` fails (see ``test_no_triton.py``).

``python -m tests.kernels._no_triton_workload OUT.pt`` checks that Triton really is missing and that
forcing a kernel path says so, then runs ``workload()`` and saves its tensors to OUT.pt; the test
runs ``workload()`` again in its own process under ``forced("reference")`` and compares.
"""
from __future__ import annotations

import os
import sys

import torch
from torch import nn


def workload() -> dict[str, torch.Tensor]:
    """Casts, MX, Newton-Schulz, SOAP, comm quantization, FP8/MXFP8/FP4 layers, Muon/SOAP steps (all seeded)."""
    import nexus_kernels as nk
    from nexus.training.mixed_precision import (FP4Config, FP8Format, MXFP8Config, convert_to_fp4, convert_to_fp8,
                                                convert_to_mxfp8)
    from nexus.training.optimizers import SOAP, Muon

    out: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 70, generator=g) * 4
    x[0, :4] = torch.tensor([float("nan"), -0.0, float("inf"), 1e6])
    for fmt in ("e4m3", "e5m2", "e2m1"):
        out[f"bits_{fmt}"] = nk.cast_to_fp_bits(x, fmt)
        out[f"bits_sr_{fmt}"] = nk.cast_to_fp_bits(x, fmt, rounding="stochastic", seed=2**63 + 5)
        out[f"fp_sr_tensor_seed_{fmt}"] = nk.cast_to_fp(x.bfloat16(), fmt, rounding="stochastic",
                                                        seed=torch.tensor(17))
        out[f"fp_{fmt}"] = nk.cast_to_fp(x, fmt)
        out[f"decode_{fmt}"] = nk.decode_fp_bits(torch.arange(256).to(torch.uint8), fmt)
        for rounding in ("nearest", "stochastic"):
            elements, scales = nk.to_mx(x, fmt, 32, rounding=rounding, seed=3)
            out[f"mx_{fmt}_{rounding}_elements"] = elements
            out[f"mx_{fmt}_{rounding}_scales"] = scales
            out[f"mx_{fmt}_{rounding}_values"] = nk.from_mx(elements, scales, fmt, 32, size=70)
    G = torch.randn(2, 24, 40, generator=g)
    out["orthogonalize"] = nk.orthogonalize(G, steps=3)
    L, R, G2 = torch.eye(24), torch.eye(40), torch.randn(24, 40, generator=g)
    nk.update_preconditioners(L, R, G2, 0.9)
    QL, QR = torch.linalg.eigh(L)[1], torch.linalg.eigh(R)[1]
    out["soap_L"], out["soap_R"] = L, R
    out["soap_project"] = nk.project(G2, QL, QR)
    out["soap_project_back"] = nk.project_back(out["soap_project"], QL, None)
    for fmt in nk.COMM_FORMATS:
        out[f"comm_{fmt}_packed"] = nk.quantize_pack(x, fmt, 32, stochastic=fmt == "int4", seed=9)
        out[f"comm_{fmt}_values"] = nk.unpack_dequantize(out[f"comm_{fmt}_packed"], 70, fmt, 32)

    layers = {
        "fp8": lambda m: convert_to_fp8(m, FP8Format.HYBRID),
        "mxfp8": lambda m: convert_to_mxfp8(m, MXFP8Config(stochastic_rounding=True)),
        "fp4": lambda m: convert_to_fp4(m, FP4Config()),
    }
    for name, convert in layers.items():
        torch.manual_seed(1)
        model = convert(nn.Sequential(nn.Linear(64, 32), nn.GELU(), nn.Linear(32, 48)))
        inp = torch.randn(5, 64, requires_grad=True)
        y = model(inp)
        y.square().mean().backward()
        out[f"{name}_out"] = y.detach()
        out[f"{name}_dinput"] = inp.grad
        for pname, p in model.named_parameters():
            out[f"{name}_grad_{pname}"] = p.grad

    for name, make in (("muon", lambda ps: Muon(ps, lr=0.02)), ("soap", lambda ps: SOAP(ps, lr=1e-2))):
        torch.manual_seed(2)
        w = nn.Parameter(torch.randn(32, 48))
        opt = make([w])
        for _ in range(3):
            w.grad = torch.randn(32, 48)
            opt.step()
        out[f"{name}_weight"] = w.detach()
    return out


def main(path: str) -> int:
    try:
        import triton
    except ImportError:  # what a machine without Triton does
        triton = None
    if triton is not None:
        raise SystemExit("triton imported: this run must not see it")
    import nexus  # noqa: F401
    import nexus.cli  # noqa: F401  (the trainer, models and data behind `nexus train`)
    import nexus.training.mixed_precision  # noqa: F401
    import nexus.training.optimizers  # noqa: F401
    import nexus_kernels
    from nexus_kernels import _backend

    assert "triton" not in sys.modules, "something imported triton"
    assert not _backend.triton_available()
    assert os.environ.get("TRITON_INTERPRET") == "1", "the test sets TRITON_INTERPRET=1: even so, no interpreter"
    x = torch.randn(40)
    assert _backend.select(x) == "reference"
    for name in ("triton", "interpret"):
        try:
            with nexus_kernels.forced(name):
                nexus_kernels.cast_to_fp(x, "e4m3")
        except nexus_kernels.BackendError as e:
            assert "(forced())" in str(e) and "Triton is not installed" in str(e), e
        else:
            raise AssertionError(f"forced({name!r}) ran without Triton")
    os.environ["NEXUS_BACKEND"] = "triton"
    try:
        nexus_kernels.to_mx(x, "e4m3")
    except nexus_kernels.BackendError as e:
        assert "(NEXUS_BACKEND=triton)" in str(e) and "Triton is not installed" in str(e), e
    else:
        raise AssertionError("NEXUS_BACKEND=triton ran without Triton")
    del os.environ["NEXUS_BACKEND"]
    torch.save(workload(), path)
    assert "triton" not in sys.modules, "the workload imported triton"
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
