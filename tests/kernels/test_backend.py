"""Dispatch: triton / interpret / reference per call, NEXUS_BACKEND and forced() overrides, clear errors."""
import pytest
import torch

from nexus_kernels import _backend
from nexus_kernels._backend import BackendError, forced, select


def test_cpu_tensor_runs_interpreter_when_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select(torch.zeros(2)) == "interpret"


def test_cpu_tensor_runs_reference_when_not_interpreting(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert select(torch.zeros(2)) == "reference"


def test_env_forces_reference(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("NEXUS_BACKEND", "reference")
    assert select(torch.zeros(2)) == "reference"


def test_forcing_triton_where_it_cannot_run_is_an_error_not_a_fallback(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setenv("NEXUS_BACKEND", "triton")
    with pytest.raises(BackendError, match=r"'triton' was forced \(NEXUS_BACKEND=triton\) but cannot run here.*cpu"):
        select(torch.zeros(2))


def test_forcing_triton_on_cpu_while_interpreting_runs_the_kernel_source(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setenv("NEXUS_BACKEND", "triton")
    assert select(torch.zeros(2)) == "interpret"


def test_missing_triton_is_named(monkeypatch):
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert select(torch.zeros(2)) == "reference"
    with forced("interpret"), pytest.raises(BackendError, match="Triton is not installed"):
        select(torch.zeros(2))


def test_unknown_backend_names(monkeypatch):
    monkeypatch.setenv("NEXUS_BACKEND", "cuda")
    with pytest.raises(BackendError, match="NEXUS_BACKEND='cuda'"):
        select(torch.zeros(2))
    with pytest.raises(BackendError, match="'fast'"):
        forced("fast").__enter__()


def test_forced_is_scoped_and_restored(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with forced("reference"):
        assert select(torch.zeros(2)) == "reference"
        with forced("interpret"):
            assert select(torch.zeros(2)) == "interpret"
        assert select(torch.zeros(2)) == "reference"
    assert select(torch.zeros(2)) == "interpret"


def test_mixed_devices_are_rejected():
    meta = torch.empty(2, device="meta")
    with pytest.raises(BackendError, match="different devices"):
        select(torch.zeros(2), meta)


def test_public_kernel_follows_dispatch(monkeypatch):
    """The same call takes the kernel or the reference path as dispatch says (spied on the reference)."""
    import nexus_kernels.cast as cast

    calls = []
    real = cast.cast_to_fp_bits_reference
    monkeypatch.setattr(cast, "cast_to_fp_bits_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(64)
    with forced("reference"):
        ref = cast.cast_to_fp_bits(x, "e4m3")
    assert calls == [1]
    with forced("interpret"):
        ker = cast.cast_to_fp_bits(x, "e4m3")
    assert calls == [1]
    assert torch.equal(ref, ker)
