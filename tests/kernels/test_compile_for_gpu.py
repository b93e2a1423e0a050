"""Every ``@triton.jit`` kernel in ``nexus_kernels`` compiles ahead of time for Hopper (sm_90) with
the dtypes and constexprs its launcher uses on a GPU, and the bf16 Newton-Schulz path for A100
(sm_80) too. No GPU is needed: Triton lowers to PTX and runs ptxas for the target.

conftest.py sets TRITON_INTERPRET=1 before anything imports nexus_kernels, and interpreted kernels
cannot be compiled, so the compilation runs once per session in a subprocess without it
(``_compile_driver.py``, two processes, a fresh Triton cache so nothing comes from an old build);
the tests below check its results family by family.
"""
from __future__ import annotations

import importlib
import inspect
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.kernels import _compile_driver as driver_src

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
SM90 = ["cast", "decode", "to_mx", "from_mx", "comm_pack", "comm_unpack", "ns_syrk", "ns_update", "soap_precond_ema", "soap_matmul",
        "attn_fwd", "attn_dkdv", "attn_dq"]
SM80 = ["ns_bf16_first"]
# shared memory per block an sm_90 kernel may use (227 KiB)
H100_SHARED = 232448


@pytest.fixture(scope="module")
def compiled(tmp_path_factory):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silence 3.9's warning; the default it keeps
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels._compile_driver", *SM90, *(f"{f}@80" for f in SM80), "--jobs", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, f"compile driver failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    by = {}
    for r in results:
        by.setdefault((r["family"], r["arch"]), []).append(r)
    return by


def _check_compiled(results, family):
    assert results, f"no specializations compiled for {family}"
    failed = [f"{r['label']}:\n{r['error']}" for r in results if not r["ok"]]
    assert not failed, f"{len(failed)} of {len(results)} {family} specializations failed to compile:\n" + \
        "\n\n".join(failed)
    for r in results:
        assert {"ttir", "ttgir", "llir", "ptx", "cubin"} <= set(r["asm"]), r
        assert r["cubin_bytes"] > 0 and r["ptx_chars"] > 0, r


def test_every_jit_kernel_has_a_family():
    """A new @triton.jit kernel in nexus_kernels must be added to the compile driver."""
    from triton.runtime import Autotuner
    from triton.runtime.jit import KernelInterface  # JITFunction, or InterpretedFunction under the interpreter

    import nexus_kernels

    # every module of the package (kernels live in private ``_<family>_kernels`` modules)
    modules = [importlib.import_module(f"nexus_kernels.{m.name}") for m in pkgutil.iter_modules(nexus_kernels.__path__)]
    found = set()
    for mod in modules:
        for name, obj in vars(mod).items():
            if (isinstance(obj, KernelInterface) and not isinstance(obj, Autotuner)
                    and "tl.program_id" in inspect.getsource(obj.fn)):
                found.add(name)
    assert found == set(driver_src.KERNELS), found ^ set(driver_src.KERNELS)
    assert set(driver_src.KERNELS.values()) == set(SM90)


@pytest.mark.parametrize("family", SM90)
def test_compiles_for_sm90(compiled, family):
    results = compiled.get((family, 90), [])
    _check_compiled(results, family)
    if family in ("ns_syrk", "ns_update"):
        # the bf16 GPU path: tl.dot must lower to Hopper's warpgroup tensor-core MMA
        bf16 = [r for r in results if r["expect_mma"]]
        assert len(bf16) == 10 if family == "ns_syrk" else len(bf16) == 5
        no_mma = [r["label"] for r in bf16 if not (r["wgmma"] or r["mma_sync"])]
        assert not no_mma, f"bf16 tl.dot did not lower to tensor-core MMA: {no_mma}"
        assert all(r["wgmma"] for r in bf16), [r["label"] for r in bf16 if not r["wgmma"]]
        # autotune skips configs that do not fit in shared memory; every bf16 config fits (fp32/fp64
        # configs with large tiles do not, and only a subset of them is compiled here)
        big = [(r["label"], r["shared"]) for r in bf16 if r["shared"] > H100_SHARED]
        assert not big, big
    else:
        if family.startswith("attn_"):  # 16-bit attention matmuls run on Hopper's warpgroup MMA
            assert all(r["wgmma"] for r in results if r["expect_mma"]), [r["label"] for r in results]
        # fixed launch configurations: every specialization must fit in shared memory
        big = [(r["label"], r["shared"]) for r in results if r["shared"] > H100_SHARED]
        assert not big, big


@pytest.mark.parametrize("family", SM80)
def test_compiles_for_sm80(compiled, family):
    results = compiled.get((family, 80), [])
    _check_compiled(results, family)
    assert len(results) == 3  # syrk without and with C, update
    assert all(r["mma_sync"] for r in results), [r["label"] for r in results if not r["mma_sync"]]
