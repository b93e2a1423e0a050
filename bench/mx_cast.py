"""Benchmark: MX quantisation (to_mx) and dequantisation (from_mx), kernel vs reference vs peers.

Rows: the Triton kernel (GPU only), the torch reference, ``torch.compile(reference)``, and
torchao's MX cast (``torchao.prototype.mx_formats.mx_tensor.to_mx``) when torchao is importable
(it is not a dependency; the row says "not installed" otherwise). The implementations of one op
and format are timed in alternation (``--pairs`` rounds); ``ratio`` is the median over rounds of
time / reference time, with its min and max and a verdict ("inconclusive: spread X%" when the rounds
disagree). GB/s counts bytes read plus bytes written (input, element codes, E8M0 scales); "% copy"
divides by the device-to-device copy bandwidth measured in the same run. On a CPU-only machine the
reference rows run at a small size.

    PYTHONPATH=. python bench/mx_cast.py [--m 8192 --k 8192] [--pairs 5] [--no-compile]
"""
from __future__ import annotations

import argparse

import torch

from bench._common import RATIO_NOTE, add_pair_arguments, bandwidth_rows, blocked_timer, print_table, setup, write_json
from nexus_kernels import forced, from_mx, to_mx
from nexus_kernels.mx import from_mx_reference, to_mx_reference

COLUMNS = ["impl", "op", "elem", "dtype", "shape", "ms", "GB/s", "% copy", "ratio", "min", "max", "verdict"]


def _torchao_to_mx():
    """torchao's MX cast as fn(x, elem, block_size), or the reason it cannot be used."""
    try:
        from torchao.prototype.mx_formats.mx_tensor import to_mx as ao_to_mx
    except ImportError:
        return None, "not installed"
    except Exception as exc:  # an installed torchao that fails to import is reported, not fatal
        return None, f"import error: {type(exc).__name__}"
    try:
        from torchao.prototype.mx_formats.constants import DTYPE_FP4
    except ImportError:
        DTYPE_FP4 = getattr(torch, "float4_e2m1fn_x2", None)
    dtypes = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2, "e2m1": DTYPE_FP4}
    return (lambda x, elem, block_size: ao_to_mx(x, dtypes[elem], block_size)), ""


def _nbytes(x: torch.Tensor, elem: str, block_size: int) -> int:
    k = x.shape[-1]
    rows = x.numel() // k
    elem_bytes = rows * ((k + 1) // 2 if elem == "e2m1" else k)
    return x.numel() * x.element_size() + elem_bytes + rows * (-(-k // block_size))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=None, help="rows (default 8192 on GPU, 256 on CPU)")
    parser.add_argument("--k", type=int, default=None, help="last dim (default 8192 on GPU, 1024 on CPU)")
    parser.add_argument("--block-size", type=int, default=32, choices=(32, 64))
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    add_pair_arguments(parser)
    args = parser.parse_args()
    env = setup(threads=args.threads)
    m = args.m or (8192 if env.on_gpu else 256)
    k = args.k or (8192 if env.on_gpu else 1024)
    bs = args.block_size
    print(f"x = [{m}, {k}], block {bs}; "
          + RATIO_NOTE.format(baseline="reference", pairs=args.pairs, spread=args.max_spread))
    measure = blocked_timer(env.device, env.min_run_time)
    ao_fn, ao_note = _torchao_to_mx()
    compile_ref = not args.no_compile
    to_ref_c = torch.compile(to_mx_reference, dynamic=False) if compile_ref else None
    from_ref_c = torch.compile(from_mx_reference, dynamic=False) if compile_ref else None

    rows, comparisons = [], []

    def run(group: dict, arms: dict, absent: dict, nbytes: int) -> None:
        bandwidth_rows(arms, group=group, absent=absent, nbytes=nbytes, measure=measure, pairs=args.pairs,
                       max_spread=args.max_spread, copy_bw=env.copy_bw, rows=rows, comparisons=comparisons)

    for dtype in (torch.bfloat16, torch.float32) if env.on_gpu else (torch.float32,):
        x = torch.randn(m, k, device=env.device, dtype=dtype)
        shape = {"dtype": str(dtype).replace("torch.", ""), "shape": f"{m}x{k}"}
        for elem in ("e4m3", "e5m2", "e2m1"):
            nb = _nbytes(x, elem, bs)
            for rounding in ("nearest", "stochastic") if env.on_gpu else ("nearest",):
                def reference(elem=elem, rounding=rounding):
                    with forced("reference"):
                        return to_mx(x, elem, bs, rounding, 1)

                arms, absent = {"reference": reference}, {}
                if env.on_gpu:
                    arms["kernel"] = lambda elem=elem, rounding=rounding: to_mx(x, elem, bs, rounding, 1)
                else:
                    absent["kernel"] = "needs a GPU"
                if to_ref_c is not None:
                    arms["compile(reference)"] = lambda elem=elem, rounding=rounding: to_ref_c(x, elem, bs, rounding, 1)
                if rounding == "nearest":
                    if ao_fn is not None:
                        arms["torchao"] = lambda elem=elem: ao_fn(x, elem, bs)
                    else:
                        absent["torchao"] = ao_note
                run({"op": f"to_mx/{rounding[:4]}", "elem": elem, **shape}, arms, absent, nb)

            elements, scales = to_mx(x, elem, bs) if env.on_gpu else to_mx_reference(x, elem, bs)
            arms = {"reference": lambda e=elements, s=scales, elem=elem: from_mx_reference(e, s, elem, bs, dtype, k)}
            absent = {}
            if env.on_gpu:
                arms["kernel"] = lambda e=elements, s=scales, elem=elem: from_mx(e, s, elem, bs, dtype, k)
            else:
                absent["kernel"] = "needs a GPU"
            if from_ref_c is not None:
                arms["compile(reference)"] = (
                    lambda e=elements, s=scales, elem=elem: from_ref_c(e, s, elem, bs, dtype, k))
            nb_out = _nbytes(torch.empty(m, k, dtype=dtype, device="meta"), elem, bs)
            run({"op": "from_mx", "elem": elem, **shape}, arms, absent, nb_out)
    print_table(rows, COLUMNS)
    write_json("mx_cast", rows, info=env.info, comparisons=comparisons,
               config={"m": m, "k": k, "block_size": bs, "compile": compile_ref, "pairs": args.pairs,
                       "max_spread": args.max_spread})


if __name__ == "__main__":
    main()
