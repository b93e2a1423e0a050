"""Ahead-of-time compile of every ``@triton.jit`` kernel in ``nexus_kernels`` for a CUDA target, no GPU needed.

Run in a process WITHOUT ``TRITON_INTERPRET`` (with it set, ``@triton.jit`` builds interpreter
functions that cannot be compiled)::

    env -u TRITON_INTERPRET python -m tests.kernels._compile_driver cast ns_bf16_first@80 --jobs 2

Each family lists the specializations its launcher really makes (argument dtypes, the constexprs
built by the launcher's own helpers, num_warps / num_stages, autotune configs); the driver compiles
each distinct one once and prints one JSON line per specialization: label, ok, error, the asm
kinds produced, the cubin size, the shared memory, and whether the PTX has tensor-core MMA.
The kernels live in the private modules ``nexus_kernels._<family>_kernels``, imported here directly
(the public modules import them only when a kernel launches).
"""
from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
import traceback

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from nexus_kernels import _attention_kernels as attn_k
from nexus_kernels import _cast_kernels as cast_k
from nexus_kernels import _comm_quant_kernels as cq_k
from nexus_kernels import _mx_kernels as mx_k
from nexus_kernels import _newton_schulz_kernels as ns_k
from nexus_kernels import _soap_kernels as soap_k
from nexus_kernels import cast, comm_quant, mx, soap
from nexus_kernels.formats import E2M1, get_format

_TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
       torch.uint8: "u8"}
_DTN = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float64: "f64"}


class Spec:
    """One specialization: kernel, {arg: type} for runtime args, {arg: value} for constexprs
    (including ints Triton specializes to constexpr, i.e. unit strides), pointer args known to be
    16-byte aligned, and compile options."""

    def __init__(self, label, kernel, types, consts, aligned=(), num_warps=4, num_stages=3, expect_mma=False):
        self.label, self.kernel, self.types, self.consts = label, kernel, types, consts
        self.aligned, self.num_warps, self.num_stages, self.expect_mma = aligned, num_warps, num_stages, expect_mma

    def key(self):
        return (self.kernel.__name__, tuple(sorted(self.types.items())),
                tuple(sorted((k, repr(v)) for k, v in self.consts.items())), self.num_warps, self.num_stages)


def _jit(fn):
    """The JITFunction under a possible ``triton.autotune`` wrapper."""
    return fn.fn if isinstance(fn, triton.runtime.Autotuner) else fn


def _ptr(dtype):
    return "*" + _TY[dtype]


# ----------------------------------------------------------------------------------------------
# cast.py: _cast_launch / _decode_launch on a GPU (block = cast._block_for("cuda"), num_warps=4)
# ----------------------------------------------------------------------------------------------
def _cast_specs():
    specs = []
    block = cast._block_for("cuda")
    for dtype in cast.INPUT_DTYPES:
        for name in ("e4m3", "e5m2", "e2m1"):
            fmt = cast._check_element_format(name)
            for saturate in (True, False):
                try:
                    cast._check_rounding("nearest", saturate, fmt)
                except ValueError:
                    continue  # E2M1 has no saturate=False
                if not saturate and dtype != torch.float32:
                    continue  # saturate only changes the OVERFLOW_CODE constant: one input dtype is enough
                for rounding in cast.ROUNDINGS:
                    stochastic = rounding == "stochastic"
                    for out_codes in (True, False):
                        out_dtype = torch.uint8 if out_codes else dtype
                        dec = cast.decode_constexprs(fmt)
                        consts = dict(**cast.round_constexprs(fmt, saturate), EXP_BITS=fmt.exp_bits, BIAS=fmt.bias,
                                      HAS_INF=fmt.has_inf, DEC_NAN_CODE=dec["NAN_CODE"], STOCHASTIC=stochastic,
                                      OUT_CODES=out_codes, OUT_BF16=out_dtype == torch.bfloat16, BLOCK=block)
                        label = (f"_cast_kernel x={_DTN[dtype]} fmt={name} {rounding} saturate={saturate} "
                                 f"out={'codes' if out_codes else _DTN[dtype]}")
                        # the launcher passes the int64 seed tensor, or x as a never-read stand-in
                        seed = "*i64" if stochastic else _ptr(dtype)
                        specs.append(Spec(label, cast_k._cast_kernel,
                                          {"x_ptr": _ptr(dtype), "out_ptr": _ptr(out_dtype), "n": "i32",
                                           "seed_ptr": seed},
                                          consts, aligned=("x_ptr", "out_ptr"), num_warps=4))
    return specs


def _decode_specs():
    specs = []
    block = cast._block_for("cuda")
    for name in ("e4m3", "e5m2", "e2m1", "e8m0"):
        fmt = get_format(name)
        for dtype in cast.OUTPUT_DTYPES:
            consts = dict(**cast.decode_constexprs(fmt), OUT_BF16=dtype == torch.bfloat16, BLOCK=block)
            specs.append(Spec(f"_decode_kernel fmt={name} out={_DTN[dtype]}", cast_k._decode_kernel,
                              {"code_ptr": "*u8", "out_ptr": _ptr(dtype), "n": "i32"}, consts,
                              aligned=("code_ptr", "out_ptr"), num_warps=4))
    return specs


# ----------------------------------------------------------------------------------------------
# mx.py: _to_mx_launch / _from_mx_launch (blocks = mx._blocks_per_program("cuda", block_size))
# ----------------------------------------------------------------------------------------------
def _to_mx_specs():
    specs = []
    for dtype in cast.INPUT_DTYPES:
        for name in mx.ELEMENT_FORMATS:
            for block_size in mx.BLOCK_SIZES:
                fmt = mx._check_mx_args(name, block_size)
                for rounding in ("nearest", "stochastic"):
                    consts = dict(**cast.round_constexprs(fmt, saturate=True), STOCHASTIC=rounding == "stochastic",
                                  PACKED=fmt is E2M1, BLOCK_SIZE=block_size,
                                  BLOCKS=mx._blocks_per_program("cuda", block_size))
                    types = {"x_ptr": _ptr(dtype), "elem_ptr": "*u8", "scale_ptr": "*u8", "n_blocks": "i32",
                             "K": "i32", "NB": "i32", "seed_ptr": "*i64" if rounding == "stochastic" else _ptr(dtype)}
                    specs.append(Spec(f"_to_mx_kernel x={_DTN[dtype]} elem={name} block={block_size} {rounding}",
                                      mx_k._to_mx_kernel, types, consts,
                                      aligned=("x_ptr", "elem_ptr", "scale_ptr"), num_warps=4))
    return specs


def _from_mx_specs():
    specs = []
    for name in mx.ELEMENT_FORMATS:
        for block_size in mx.BLOCK_SIZES:
            fmt = mx._check_mx_args(name, block_size)
            for dtype in cast.OUTPUT_DTYPES:
                consts = dict(**cast.decode_constexprs(fmt), PACKED=fmt is E2M1, OUT_BF16=dtype == torch.bfloat16,
                              BLOCK_SIZE=block_size, BLOCKS=mx._blocks_per_program("cuda", block_size))
                types = {"elem_ptr": "*u8", "scale_ptr": "*u8", "out_ptr": _ptr(dtype), "n_blocks": "i32",
                         "K": "i32", "NB": "i32"}
                specs.append(Spec(f"_from_mx_kernel elem={name} block={block_size} out={_DTN[dtype]}",
                                  mx_k._from_mx_kernel, types, consts,
                                  aligned=("elem_ptr", "scale_ptr", "out_ptr"), num_warps=4))
    return specs


# ----------------------------------------------------------------------------------------------
# comm_quant.py: _pack_launch / _unpack_launch (blocks = comm_quant._blocks_per_program("cuda", bs))
# ----------------------------------------------------------------------------------------------
def _comm_pack_specs():
    specs = []
    for dtype in cast.INPUT_DTYPES:
        for name in comm_quant.COMM_FORMATS:
            for block_size in comm_quant.BLOCK_SIZES:
                spec = comm_quant._check_format(name, block_size)
                for stochastic in (False, True):
                    # every block size once (fp32, nearest); other dtypes and SR at the default block only
                    if (dtype != torch.float32 or stochastic) and block_size != 128:
                        continue
                    if dtype != torch.float32 and stochastic:
                        continue
                    consts = dict(**comm_quant._format_constexprs(spec),
                                  **cast.round_constexprs(get_format("e4m3"), saturate=True), STOCHASTIC=stochastic,
                                  BLOCK_SIZE=block_size, BLOCKS=comm_quant._blocks_per_program("cuda", block_size))
                    types = {"x_ptr": _ptr(dtype), "out_ptr": "*u8", "n_blocks": "i32", "N": "i32", "NB": "i32",
                             "ROW_BYTES": "i32", "seed_ptr": "*i64" if stochastic else _ptr(dtype)}
                    specs.append(Spec(f"_quantize_pack_kernel x={_DTN[dtype]} fmt={name} block={block_size} "
                                      f"{'stochastic' if stochastic else 'nearest'}", cq_k._quantize_pack_kernel,
                                      types, consts, aligned=("x_ptr", "out_ptr"), num_warps=4))
    return specs


def _comm_unpack_specs():
    specs = []
    dec = cast.decode_constexprs(get_format("e4m3"))
    for name in comm_quant.COMM_FORMATS:
        for block_size in comm_quant.BLOCK_SIZES:
            spec = comm_quant._check_format(name, block_size)
            for dtype in cast.OUTPUT_DTYPES:
                if dtype != torch.float32 and block_size != 128:
                    continue  # every block size once (fp32 out); other output dtypes at the default block
                consts = dict(IS_INT=spec.is_int, BITS=spec.bits, EXP_BITS=dec["EXP_BITS"], MAN_BITS=dec["MAN_BITS"],
                              BIAS=dec["BIAS"], NAN_CODE=dec["NAN_CODE"], OUT_BF16=dtype == torch.bfloat16,
                              BLOCK_SIZE=block_size, BLOCKS=comm_quant._blocks_per_program("cuda", block_size))
                types = {"buf_ptr": "*u8", "out_ptr": _ptr(dtype), "n_blocks": "i32", "N": "i32", "NB": "i32",
                         "ROW_BYTES": "i32"}
                specs.append(Spec(f"_unpack_dequantize_kernel fmt={name} block={block_size} out={_DTN[dtype]}",
                                  cq_k._unpack_dequantize_kernel, types, consts, aligned=("buf_ptr", "out_ptr"),
                                  num_warps=4))
    return specs


# ----------------------------------------------------------------------------------------------
# newton_schulz.py: _orthogonalize_kernels on CUDA. Work dtype: bf16 for 16-bit inputs (the GPU
# path), else the input's (fp32, fp64); ACC fp64 for fp64 else fp32; UPCAST=False; every
# autotune config. All tensors are contiguous (batch, rows, cols): the last stride is 1, which
# Triton specializes to a constexpr.
# ----------------------------------------------------------------------------------------------
def _ns_work_dtypes():
    out = []
    for g_dtype in (torch.bfloat16, torch.float16, torch.float32, torch.float64):
        work = g_dtype if g_dtype in (torch.float32, torch.float64) else torch.bfloat16
        if work not in out:
            out.append(work)
    return out


def _acc(dtype):
    return ns_k.acc_type(dtype)


def _configs(tuned, work):
    """Every autotune config for the bf16 GPU path; for fp32/fp64 the first one and, if its tile is
    smaller, the largest tile (to keep the compile time down)."""
    configs = tuned.configs
    if work == torch.bfloat16:
        return list(configs)

    def tile(c):
        return c.kwargs["BLOCK_M"] * c.kwargs.get("BLOCK_N", c.kwargs["BLOCK_M"]) * c.kwargs["BLOCK_K"]

    largest = max(configs, key=tile)
    return [configs[0]] + ([largest] if tile(largest) > tile(configs[0]) else [])


def _syrk_specs():
    specs = []
    for work in _ns_work_dtypes():
        for has_c in (False, True):  # X X^T, then A A^T + beta A
            for cfg in _configs(ns_k._syrk_tuned, work):
                types = {"x_ptr": _ptr(work), "c_ptr": _ptr(work), "out_ptr": _ptr(work), "M": "i32", "K": "i32",
                         "sxb": "i32", "sxm": "i32", "scb": "i32", "scm": "i32", "sob": "i32", "som": "i32",
                         "alpha": "fp32", "beta": "fp32"}
                consts = dict(sxk=1, scn=1, son=1, HAS_C=has_c, UPCAST=False, ACC=_acc(work), **cfg.kwargs)
                specs.append(Spec(f"_syrk_kernel work={_DTN[work]} HAS_C={has_c} {cfg}",
                                  ns_k._syrk_kernel, types, consts, aligned=("x_ptr", "c_ptr", "out_ptr"),
                                  num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                                  expect_mma=work == torch.bfloat16))
    return specs


def _ns_update_specs():
    specs = []
    for work in _ns_work_dtypes():
        for cfg in _configs(ns_k._ns_update_tuned, work):
            types = {"b_ptr": _ptr(work), "x_ptr": _ptr(work), "out_ptr": _ptr(work), "M": "i32", "K": "i32",
                     "sbb": "i32", "sbm": "i32", "sxb": "i32", "sxm": "i32", "sob": "i32", "som": "i32",
                     "a_coef": "fp32"}
            consts = dict(sbn=1, sxk=1, sok=1, UPCAST=False, ACC=_acc(work), **cfg.kwargs)
            specs.append(Spec(f"_ns_update_kernel work={_DTN[work]} {cfg}", ns_k._ns_update_kernel, types,
                              consts, aligned=("b_ptr", "x_ptr", "out_ptr"), num_warps=cfg.num_warps,
                              num_stages=cfg.num_stages, expect_mma=work == torch.bfloat16))
    return specs


# ----------------------------------------------------------------------------------------------
# soap.py: _update_launch (BLOCK_M=64, BLOCK_K=32, 4 warps, 3 stages) and _matmul (64/64/32)
# ----------------------------------------------------------------------------------------------
_SOAP_CUDA = dict(num_warps=4, num_stages=3)


def _soap_precond_specs():
    specs = []
    for g_dtype in soap._FLOATS:
        for stat in (torch.float32, torch.float64):
            types = {"g_ptr": _ptr(g_dtype), "l_ptr": _ptr(stat), "r_ptr": _ptr(stat), "m": "i32", "n": "i32",
                     "sgm": "i32", "slm": "i32", "srm": "i32", "n_left": "i32", "beta": "fp32"}
            consts = dict(sgn=1, sln=1, srn=1, BLOCK_M=64, BLOCK_K=32, ACC_L=soap_k.acc_type(stat),
                          ACC_R=soap_k.acc_type(stat))
            specs.append(Spec(f"_precond_ema_kernel G={_DTN[g_dtype]} L,R={_DTN[stat]}", soap_k._precond_ema_kernel,
                              types, consts, aligned=("g_ptr", "l_ptr", "r_ptr"), **_SOAP_CUDA))
    return specs


def _soap_matmul_specs():
    specs = []
    for dtype in soap._FLOATS:  # G, QL, QR of one dtype; acc fp64 iff any is fp64
        acc = soap._acc_dtype(torch.empty(0, dtype=dtype))
        for back in (False, True):
            # first: QL^T G (QL.mT: unit stride on the m side) or QL G; second: out QR or out QR^T
            calls = [("QL G", dtype, dtype, "sak" if back else "sam", "sbn"),
                     ("out QR", acc, dtype, "sak", "sbn" if not back else "sbk")]
            for what, a_dtype, b_dtype, a_unit, b_unit in calls:
                strides = {"sam", "sak", "sbk", "sbn", "scm"}
                types = {"a_ptr": _ptr(a_dtype), "b_ptr": _ptr(b_dtype), "c_ptr": _ptr(acc), "M": "i32", "N": "i32",
                         "K": "i32", **{s: "i32" for s in sorted(strides - {a_unit, b_unit})}}
                consts = {a_unit: 1, b_unit: 1, "scn": 1, "BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 32,
                          "ACC": soap_k.acc_type(acc)}
                specs.append(Spec(f"_matmul_kernel {what} back={back} A={_DTN[a_dtype]} B={_DTN[b_dtype]} "
                                  f"unit strides {a_unit},{b_unit}", soap_k._matmul_kernel, types, consts,
                                  aligned=("a_ptr", "b_ptr", "c_ptr"), **_SOAP_CUDA))
    return specs


# ----------------------------------------------------------------------------------------------
# attention.py: _attention_kernels.forward / backward on CUDA (attn_k.gpu_config per head block);
# contiguous q, k, v, dout (unit last strides). bf16 at head dims 64 and 128, causal or not; fp16
# at 128, a padded head dim 96 and fp32 (small tiles, no tensor cores) causal only
# ----------------------------------------------------------------------------------------------
_ATTN_STRIDES = ("sqb", "sqh", "sqm", "skb", "skh", "skn", "svb", "svh", "svn")
_ATTN_CASES = [(torch.bfloat16, d, causal) for d in (64, 128) for causal in (False, True)] + [
    (torch.float16, 128, True), (torch.bfloat16, 96, True), (torch.float32, 64, True)]


def _attn_specs(kind):
    specs = []
    kernel = {"fwd": attn_k._attn_fwd_kernel, "dkdv": attn_k._attn_bwd_dkdv_kernel,
              "dq": attn_k._attn_bwd_dq_kernel}[kind]
    for dtype, d, causal in _ATTN_CASES:
        block_d = attn_k.head_block(d)
        cfg = attn_k.gpu_config(kind, block_d, dtype)
        types = {"q_ptr": _ptr(dtype), "k_ptr": _ptr(dtype), "v_ptr": _ptr(dtype), "lse_ptr": "*fp32",
                 "Sq": "i32", "n_keys": "i32", "diag": "i32", "qk_scale": "fp32", "GROUPS": "i32",
                 **{s: "i32" for s in _ATTN_STRIDES}}
        consts = dict(sqd=1, skd=1, svd=1, CAUSAL=causal, HEAD_DIM=d, BLOCK_D=block_d, UPCAST=False,
                      BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"])
        if kind == "fwd":
            types.update(o_ptr=_ptr(dtype), sob="i32", soh="i32", som="i32", HQ="i32")
            consts["sod"] = 1
            aligned = ("q_ptr", "k_ptr", "v_ptr", "o_ptr", "lse_ptr")
        else:  # the launcher casts dout to q's dtype; dq, dk, dv, lse, delta are contiguous float32
            types.update(do_ptr=_ptr(dtype), delta_ptr="*fp32", sdb="i32", sdh="i32", sdm="i32", sm_scale="fp32")
            consts["sdd"] = 1
            if kind == "dkdv":
                types.update(dk_ptr="*fp32", dv_ptr="*fp32", Sk="i32", HKV="i32")
            else:
                types.update(dq_ptr="*fp32", HQ="i32")
            aligned = ("q_ptr", "k_ptr", "v_ptr", "do_ptr", "lse_ptr", "delta_ptr")
        specs.append(Spec(f"{kernel.__name__} {_DTN[dtype]} D={d} causal={causal} {cfg}", kernel, types, consts,
                          aligned=aligned, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
                          expect_mma=dtype != torch.float32))
    return specs


def _ns_bf16_first_specs():
    """A100 check: the bf16 GPU path of both Newton-Schulz kernels with their first autotune config."""
    return [s for s in _syrk_specs() + _ns_update_specs()
            if s.expect_mma and ("BLOCK_M: 128, BLOCK_K: 64, num_warps: 8" in s.label
                                 or "BLOCK_N: 128, BLOCK_K: 64, GROUP_M: 8, num_warps: 8" in s.label)]


FAMILIES = {
    "cast": _cast_specs,
    "decode": _decode_specs,
    "to_mx": _to_mx_specs,
    "from_mx": _from_mx_specs,
    "comm_pack": _comm_pack_specs,
    "comm_unpack": _comm_unpack_specs,
    "ns_syrk": _syrk_specs,
    "ns_update": _ns_update_specs,
    "soap_precond_ema": _soap_precond_specs,
    "soap_matmul": _soap_matmul_specs,
    "ns_bf16_first": _ns_bf16_first_specs,
    "attn_fwd": lambda: _attn_specs("fwd"),
    "attn_dkdv": lambda: _attn_specs("dkdv"),
    "attn_dq": lambda: _attn_specs("dq"),
}
# every @triton.jit kernel (entry points, not device helpers) and the family that compiles it
KERNELS = {
    "_cast_kernel": "cast", "_decode_kernel": "decode", "_to_mx_kernel": "to_mx", "_from_mx_kernel": "from_mx",
    "_quantize_pack_kernel": "comm_pack", "_unpack_dequantize_kernel": "comm_unpack",
    "_syrk_kernel": "ns_syrk", "_ns_update_kernel": "ns_update", "_precond_ema_kernel": "soap_precond_ema",
    "_matmul_kernel": "soap_matmul", "_attn_fwd_kernel": "attn_fwd", "_attn_bwd_dkdv_kernel": "attn_dkdv",
    "_attn_bwd_dq_kernel": "attn_dq",
}


def specs_for(family):
    seen, out = set(), []
    for spec in FAMILIES[family]():
        if spec.key() not in seen:
            seen.add(spec.key())
            out.append(spec)
    return out


def compile_spec(spec: Spec, arch: int) -> dict:
    fn = _jit(spec.kernel)
    params = list(inspect.signature(fn.fn).parameters)
    missing = set(params) - set(spec.types) - set(spec.consts)
    extra = (set(spec.types) | set(spec.consts)) - set(params)
    assert not missing and not extra, f"{spec.label}: missing args {missing}, unknown args {extra}"
    sig = {p: (spec.types[p] if p in spec.types else "constexpr") for p in params}
    attrs = {(params.index(p),): [["tt.divisibility", 16]] for p in spec.aligned}
    src = ASTSource(fn=fn, signature=sig, constexprs={p: v for p, v in spec.consts.items()}, attrs=attrs)
    t0 = time.perf_counter()
    res = {"label": spec.label, "arch": arch, "expect_mma": spec.expect_mma}
    try:
        out = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                             options={"num_warps": spec.num_warps, "num_stages": spec.num_stages})
    except Exception as e:  # noqa: BLE001 - reported, the test fails on it
        res.update(ok=False, error=f"{type(e).__name__}: {e}\n{traceback.format_exc()[-3000:]}")
        return res
    ptx = out.asm.get("ptx", "")
    res.update(ok=True, error=None, asm=sorted(out.asm), cubin_bytes=len(out.asm.get("cubin", b"")),
               ptx_chars=len(ptx), shared=out.metadata.shared, seconds=round(time.perf_counter() - t0, 2),
               wgmma="wgmma." in ptx, mma_sync="mma.sync" in ptx)
    return res


def _work(job):
    family, index, arch = job
    return {"family": family, **compile_spec(specs_for(family)[index], arch)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("families", nargs="+", help="FAMILY or FAMILY@ARCH (compute capability, default 90); "
                    f"families: {', '.join(FAMILIES)}")
    ap.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    args = ap.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        ap.error("needs TRITON_INTERPRET unset: with it the kernels are interpreter functions")
    jobs = []
    for item in args.families:
        family, _, arch = item.partition("@")
        if family not in FAMILIES:
            ap.error(f"unknown family {family!r}")
        jobs += [(family, i, int(arch or 90)) for i in range(len(specs_for(family)))]
    # longest (matmul) jobs first so the pool ends together
    jobs.sort(key=lambda j: not j[0].startswith(("ns_", "soap_", "attn_")))
    if args.jobs > 1:
        import multiprocessing
        with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
            for res in pool.imap_unordered(_work, jobs):
                print(json.dumps(res), flush=True)
    else:
        for job in jobs:
            print(json.dumps(_work(job)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
