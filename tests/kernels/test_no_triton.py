"""Triton is optional: where ``import triton`` fails, nexus and nexus_kernels import and the reference
path runs end to end (casts, MX, Newton-Schulz, SOAP, FP8/MXFP8/FP4 layers, Muon and SOAP steps).

A subprocess gets a directory first on PYTHONPATH holding a ``triton`` package whose import raises
ImportError, runs ``_no_triton_workload`` and saves its tensors; this process runs the same workload
under ``forced("reference")`` and the two must agree bit for bit.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from nexus_kernels import forced
from tests.kernels._no_triton_workload import workload

ROOT = Path(__file__).resolve().parents[2]


def _blocked_env(tmp_path: Path) -> dict[str, str]:
    blocker = tmp_path / "blocker" / "triton"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("triton is blocked for this test")\n')
    env = {k: v for k, v in os.environ.items() if k != "NEXUS_BACKEND"}
    env["PYTHONPATH"] = os.pathsep.join([str(blocker.parent), str(ROOT)])
    env["TRITON_INTERPRET"] = "1"  # even asking for the interpreter must end on the reference path
    return env


def test_blocker_really_blocks_triton(tmp_path):
    proc = subprocess.run([sys.executable, "-c", "import triton"], env=_blocked_env(tmp_path), cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "triton is blocked for this test" in proc.stderr


def test_reference_path_runs_without_triton_and_matches(tmp_path):
    path = tmp_path / "out.pt"
    proc = subprocess.run([sys.executable, "-m", "tests.kernels._no_triton_workload", str(path)],
                          env=_blocked_env(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"without Triton:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    got = torch.load(path)
    with forced("reference"):
        expected = workload()
    assert got.keys() == expected.keys()
    for name, want in expected.items():
        have = got[name]
        assert have.dtype == want.dtype and have.shape == want.shape, name
        assert torch.equal(have.nan_to_num(0.0, 1e38, -1e38), want.nan_to_num(0.0, 1e38, -1e38)), name
        assert torch.equal(have.isnan(), want.isnan()), name
