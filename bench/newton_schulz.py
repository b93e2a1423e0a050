"""Benchmark: Newton-Schulz ``orthogonalize`` (Triton) vs plain torch, in effective TFLOP/s.

Run from the repository root: ``PYTHONPATH=. python bench/newton_schulz.py [--sizes 1024 2048] [--pairs 5]``.

Effective FLOPs per iteration for X (M, K), M <= K: X X^T (2 M^2 K) + A A (2 M^3) + B X
(2 M^2 K), i.e. 6 n^3 for a square n, counted as full matmuls even though the kernel computes
only half of each symmetric product. Rows:
  - ``triton``: ``nexus_kernels.orthogonalize`` on bf16 input (bf16 operands, fp32 accumulation);
  - ``torch_bf16``: the same quintic in plain torch bf16 matmuls (KellerJordan/Muon's
    ``zeropower_via_newtonschulz5``), eager and under ``torch.compile``;
  - ``reference``: ``orthogonalize_reference`` (float32 inside), eager and compiled.
The implementations of one shape are timed in alternation (``--pairs`` rounds); ``ratio`` is the
median over rounds of time / baseline time (``torch_bf16`` on a GPU, ``reference`` on CPU) with its
min and max and a verdict ("inconclusive: spread X%" when the rounds disagree).
The device's dense bf16 matmul rate, measured in the same run, is printed as the limit.
On a CPU-only machine it runs the reference paths at small sizes in float32; GPU figures need a GPU.
"""
from __future__ import annotations

import argparse

import torch

from bench._common import (RATIO_NOTE, add_pair_arguments, blocked_timer, compare, print_table, setup, time_fn,
                           write_json)
from nexus_kernels import forced, orthogonalize, orthogonalize_reference
from nexus_kernels.newton_schulz import DEFAULT_COEFFS


def torch_bf16_quintic(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """The public peer: the quintic iteration with bf16 torch matmuls (as in KellerJordan/Muon)."""
    a, b, c = DEFAULT_COEFFS
    X = G.bfloat16()
    if G.size(-2) > G.size(-1):
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * A @ A
        X = a * X + B @ X
    if G.size(-2) > G.size(-1):
        X = X.mT
    return X


def ns_flops(shape: tuple[int, ...], steps: int) -> float:
    *batch, rows, cols = shape
    m, k = min(rows, cols), max(rows, cols)
    count = 1
    for b in batch:
        count *= b
    return count * steps * (4.0 * m * m * k + 2.0 * m**3)


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Measured dense matmul FLOP/s at size n (the limit the table is read against)."""
    x = torch.randn(n, n, device=device, dtype=dtype)
    y = torch.randn(n, n, device=device, dtype=dtype)
    t = time_fn(lambda: x @ y, device=device)
    return 2.0 * n**3 / t.median_s


def try_compile(fn):
    try:
        compiled = torch.compile(fn)
        return compiled
    except Exception as err:  # a missing compiler toolchain should not stop the table
        print(f"torch.compile unavailable: {err}")
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=None)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--no-compile", action="store_true")
    add_pair_arguments(parser)
    args = parser.parse_args()

    env = setup(measure_bandwidth=False, threads=args.threads,
                no_gpu_note="No CUDA GPU: timing the torch reference at small sizes on CPU; "
                            "Triton and bf16 figures need a GPU.")
    device, on_gpu = env.device, env.on_gpu
    sizes = args.sizes or ([1024, 2048, 4096, 8192] if on_gpu else [128, 256, 512])
    dtype = torch.bfloat16 if on_gpu else torch.float32
    peak = matmul_peak(device, dtype, 8192 if on_gpu else 512)
    print(f"measured {dtype} matmul peak: {peak / 1e12:.3f} TFLOP/s")

    impls = {}
    if on_gpu:
        impls["torch_bf16"] = lambda G: torch_bf16_quintic(G, args.steps)  # the public peer: the baseline
        impls["triton"] = lambda G: orthogonalize(G, steps=args.steps)

    def reference(G):
        with forced("reference"):
            return orthogonalize_reference(G, steps=args.steps)

    impls["reference"] = reference
    if not args.no_compile:
        for name, fn in list(impls.items()):
            if name == "triton":
                continue
            compiled = try_compile(fn)
            if compiled is not None:
                impls[name + "+compile"] = compiled
    baseline = "torch_bf16" if on_gpu else "reference"
    print(RATIO_NOTE.format(baseline=baseline, pairs=args.pairs, spread=args.max_spread))
    measure = blocked_timer(device, env.min_run_time)

    shapes = [(n, n) for n in sizes] + ([(1024, 4096), (8, 1024, 4096)] if on_gpu else [(128, 512)])
    rows, comparisons = [], []
    for shape in shapes:
        G = torch.randn(*shape, device=device, dtype=dtype)
        flops = ns_flops(shape, args.steps)
        label = "x".join(map(str, shape))
        result = compare({name: (lambda fn=fn: fn(G)) for name, fn in impls.items()}, baseline=baseline,
                         pairs=args.pairs, measure=measure, max_spread=args.max_spread)
        comparisons += result.to_json(label)
        for name in impls:
            row = {"shape": label, "impl": name}
            if name in result.times:
                tflops = flops / result.median_s(name) / 1e12
                row.update({"ms": result.median_s(name) * 1e3, "TFLOP/s": tflops,
                            "%peak": 100.0 * tflops * 1e12 / peak})
            rows.append({**row, **result.cells(name)})
    print_table(rows, ["shape", "impl", "ms", "TFLOP/s", "%peak", "ratio", "min", "max", "verdict"])
    info = dict(env.info)
    info["matmul_peak_TFLOPs"] = peak / 1e12
    info["peak_dtype"] = str(dtype)
    write_json("newton_schulz", rows, info=info, comparisons=comparisons,
               config={"steps": args.steps, "dtype": str(dtype), "flops": "4 M^2 K + 2 M^3 per iteration",
                       "baseline": baseline, "pairs": args.pairs, "max_spread": args.max_spread})

if __name__ == "__main__":
    main()
