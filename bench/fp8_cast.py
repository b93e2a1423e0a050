"""Benchmark: float -> E4M3/E5M2/E2M1 casts (RNE and stochastic), kernel vs reference vs peers.

Rows: the Triton kernel (GPU only), the torch reference, ``torch.compile(reference)``, and torch's
own ``x.to(torch.float8_e4m3fn / float8_e5m2)`` as the public peer. The implementations of one
format and rounding are timed in alternation (``--pairs`` rounds); ``ratio`` is the median over
rounds of time / reference time, with its min and max and a verdict ("inconclusive: spread X%" when
the rounds disagree). GB/s counts bytes read plus bytes written; "% copy" divides by the
device-to-device copy bandwidth measured in the same run. On a CPU-only machine the reference rows
run at small sizes and the kernel row says it needs a GPU.

    PYTHONPATH=. python bench/fp8_cast.py [--n 16777216] [--pairs 5] [--no-compile | --compile-all]
"""
from __future__ import annotations

import argparse

import torch

from bench._common import RATIO_NOTE, add_pair_arguments, blocked_timer, compare, gbps, print_table, setup, write_json
from nexus_kernels import cast_to_fp_bits, forced
from nexus_kernels.cast import cast_to_fp_bits_reference

TORCH_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
COLUMNS = ["impl", "fmt", "rounding", "dtype", "n", "ms", "GB/s", "% copy", "ratio", "min", "max", "verdict"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="elements (default 64M on GPU, 1M on CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--compile-all", action="store_true",
                        help="on CPU also compile the stochastic reference (minutes of compile time)")
    add_pair_arguments(parser)
    args = parser.parse_args()
    env = setup(threads=args.threads)
    n = args.n or ((1 << 26) if env.on_gpu else (1 << 20))
    print(f"n = {n}; " + RATIO_NOTE.format(baseline="reference", pairs=args.pairs, spread=args.max_spread))
    measure = blocked_timer(env.device, env.min_run_time)

    compiled = None if args.no_compile else torch.compile(cast_to_fp_bits_reference, dynamic=False)
    rows, comparisons = [], []
    # CPU: float32 only (bf16 arithmetic is slow there and the GPU figures are what matter).
    for dtype in (torch.float32, torch.bfloat16) if env.on_gpu else (torch.float32,):
        x = torch.randn(n, device=env.device, dtype=dtype)
        nbytes = x.numel() * (x.element_size() + 1)  # read the input, write one byte per code
        for fmt in ("e4m3", "e5m2", "e2m1"):
            for rounding in ("nearest", "stochastic"):
                base = {"fmt": fmt, "rounding": rounding, "dtype": str(dtype).replace("torch.", ""), "n": n}

                def reference(fmt=fmt, rounding=rounding):
                    with forced("reference"):
                        return cast_to_fp_bits(x, fmt, rounding, seed=1)

                arms = {"reference": reference}
                if env.on_gpu:
                    arms["kernel"] = lambda fmt=fmt, rounding=rounding: cast_to_fp_bits(x, fmt, rounding, seed=1)
                else:
                    rows.append({"impl": "kernel", **base, "verdict": "needs a GPU"})
                if compiled is not None and (env.on_gpu or rounding == "nearest" or args.compile_all):
                    arms["compile(reference)"] = lambda fmt=fmt, rounding=rounding: compiled(x, fmt, rounding, 1, True)
                if fmt in TORCH_DTYPES and rounding == "nearest":
                    arms["torch .to(float8)"] = lambda fmt=fmt: x.to(TORCH_DTYPES[fmt])
                result = compare(arms, baseline="reference", pairs=args.pairs, measure=measure,
                                 max_spread=args.max_spread)
                comparisons += result.to_json(f"{fmt}/{rounding}/{base['dtype']}")
                for impl in arms:
                    row = {"impl": impl, **base}
                    if impl in result.times:
                        seconds = result.median_s(impl)
                        bw = gbps(nbytes, seconds)
                        row.update({"ms": seconds * 1e3, "GB/s": bw, "% copy": 100 * bw / env.copy_bw})
                    rows.append({**row, **result.cells(impl)})
    print_table(rows, COLUMNS)
    write_json("fp8_cast", rows, info=env.info, comparisons=comparisons,
               config={"n": n, "compile": compiled is not None, "pairs": args.pairs, "max_spread": args.max_spread})


if __name__ == "__main__":
    main()
