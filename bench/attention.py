"""Benchmark: blockwise attention (``nexus_kernels.attention``) forward and backward, in TFLOP/s,
against torch SDPA (flash backend on a GPU) and the torch reference.

Run from the repository root: ``PYTHONPATH=. python bench/attention.py [--seqs 1024 4096] [--head-dim 128]
[--heads 16] [--tokens 16384] [--causal both|yes|no] [--pairs 5]`` or ``nexus bench attention``.

Each sequence length S runs B = max(1, tokens / S) sequences of H heads of dim D (MHA: SDPA's flash
backend takes equal head counts). FLOPs: forward 4 B H S^2 D (two matmuls), backward 2.5x forward
(five matmuls), halved when causal (FlashAttention-2's convention). Arms, timed in alternation
(``bench/_common.py``):

- ``sdpa_flash``: ``F.scaled_dot_product_attention`` restricted to the flash backend (the baseline on a
  GPU; goal: the kernel at >= 80% of its TFLOP/s, i.e. ratio <= 1.25); backward is ``autograd.grad``
  through it;
- ``nexus``: ``block_attention_forward`` / ``block_attention_backward`` (the Triton kernels);
- ``reference`` (and ``reference+compile``): ``block_attention_*_reference``, which build S x S
  scores (run at S <= ``--reference-max-seq`` only).

On a CPU-only machine it runs ``sdpa`` (torch's CPU attention, the baseline) and the reference in
float32 at small sizes; the kernel rows (bf16, Triton) need a GPU.
"""
from __future__ import annotations

import argparse
import contextlib

import torch
import torch.nn.functional as F

from bench._common import RATIO_NOTE, add_pair_arguments, blocked_timer, compare, print_table, setup, time_fn, \
    write_json
from nexus_kernels import forced
from nexus_kernels.attention import (block_attention_backward, block_attention_backward_reference,
                                     block_attention_forward, block_attention_forward_reference)


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool, backward: bool) -> float:
    flops = 4.0 * batch * heads * seq * seq * head_dim * (2.5 if backward else 1.0)
    return flops / 2 if causal else flops


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int) -> float:
    """Measured dense matmul FLOP/s at size n (the limit the table is read against)."""
    x = torch.randn(n, n, device=device, dtype=dtype)
    y = torch.randn(n, n, device=device, dtype=dtype)
    return 2.0 * n**3 / time_fn(lambda: x @ y, device=device).median_s


def sdpa_context(on_gpu: bool):
    if not on_gpu:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel(SDPBackend.FLASH_ATTENTION)


def try_compile(fn):
    try:
        return torch.compile(fn)
    except Exception as err:  # a missing compiler toolchain should not stop the table
        print(f"torch.compile unavailable: {err}")
        return None


def arms_for(q, k, v, dout, causal: bool, on_gpu: bool, with_reference: bool, compile_reference: bool):
    """{direction: {arm: zero-argument callable}} for one shape."""
    def sdpa_fwd():
        with sdpa_context(on_gpu):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    qg, kg, vg = (t.detach().clone().requires_grad_() for t in (q, k, v))
    with sdpa_context(on_gpu):
        out_g = F.scaled_dot_product_attention(qg, kg, vg, is_causal=causal)

    def sdpa_bwd():
        with sdpa_context(on_gpu):
            return torch.autograd.grad(out_g, (qg, kg, vg), dout, retain_graph=True)

    baseline = "sdpa_flash" if on_gpu else "sdpa"
    fwd, bwd = {baseline: sdpa_fwd}, {baseline: sdpa_bwd}
    if on_gpu:
        out, lse = block_attention_forward(q, k, v, causal=causal)
        fwd["nexus"] = lambda: block_attention_forward(q, k, v, causal=causal)
        bwd["nexus"] = lambda: block_attention_backward(dout, q, k, v, out, lse, causal=causal)
    if with_reference:
        with forced("reference"):
            ref_out, ref_lse = block_attention_forward(q, k, v, causal=causal)

        def ref_fwd():
            return block_attention_forward_reference(q, k, v, causal=causal)

        def ref_bwd():
            return block_attention_backward_reference(dout, q, k, v, ref_out, ref_lse, causal=causal)

        fwd["reference"], bwd["reference"] = ref_fwd, ref_bwd
        if compile_reference:
            for arms, fn in ((fwd, ref_fwd), (bwd, ref_bwd)):
                compiled = try_compile(fn)
                if compiled is not None:
                    arms["reference+compile"] = compiled
    return baseline, {"forward": fwd, "backward": bwd}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, nargs="*", default=None)
    parser.add_argument("--head-dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=None, help="default: 16 on a GPU, 4 on CPU")
    parser.add_argument("--tokens", type=int, default=None, help="B x S per shape; default 16384 on a GPU, S on CPU")
    parser.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    parser.add_argument("--reference-max-seq", type=int, default=4096)
    parser.add_argument("--compile", action="store_true", help="also time the reference under torch.compile")
    add_pair_arguments(parser)
    args = parser.parse_args()

    env = setup(measure_bandwidth=False, threads=args.threads,
                no_gpu_note="No CUDA GPU: timing torch's CPU attention and the reference in float32 at small "
                            "sizes; the Triton kernel rows (bf16, vs SDPA-flash) need a GPU.")
    device, on_gpu = env.device, env.on_gpu
    seqs = args.seqs or ([1024, 2048, 4096, 8192, 16384, 32768] if on_gpu else [128, 256, 512])
    heads = args.heads or (16 if on_gpu else 4)
    dtype = torch.bfloat16 if on_gpu else torch.float32
    peak = matmul_peak(device, dtype, 8192 if on_gpu else 512)
    print(f"measured {dtype} matmul peak: {peak / 1e12:.3f} TFLOP/s")
    causals = {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]

    rows, comparisons, baseline = [], [], None
    measure = blocked_timer(device, env.min_run_time)
    for seq in seqs:
        batch = max(1, (args.tokens or (16384 if on_gpu else seq)) // seq)
        g = torch.Generator(device=device).manual_seed(seq)
        q, k, v, dout = (torch.randn(batch, heads, seq, args.head_dim, device=device, dtype=dtype, generator=g)
                         for _ in range(4))
        for causal in causals:
            baseline, directions = arms_for(q, k, v, dout, causal, on_gpu, seq <= args.reference_max_seq,
                                            args.compile)
            for direction, arms in directions.items():
                label = f"{direction} S={seq} causal={causal}"
                result = compare(arms, baseline=baseline, pairs=args.pairs, measure=measure,
                                 max_spread=args.max_spread)
                comparisons += result.to_json(label)
                flops = attention_flops(batch, heads, seq, args.head_dim, causal, direction == "backward")
                for name in arms:
                    row = {"pass": direction, "seq": seq, "batch": batch, "causal": causal, "impl": name}
                    if name in result.times:
                        tflops = flops / result.median_s(name) / 1e12
                        row.update({"ms": result.median_s(name) * 1e3, "TFLOP/s": tflops,
                                    "%peak": 100.0 * tflops * 1e12 / peak})
                    rows.append({**row, **result.cells(name)})
    print(RATIO_NOTE.format(baseline=baseline, pairs=args.pairs, spread=args.max_spread))
    print_table(rows, ["pass", "seq", "batch", "causal", "impl", "ms", "TFLOP/s", "%peak", "ratio", "min", "max",
                       "verdict"])
    if on_gpu:
        print("goal: nexus TFLOP/s >= 80% of sdpa_flash's (ratio <= 1.25), forward and backward")
    info = dict(env.info)
    info["matmul_peak_TFLOPs"] = peak / 1e12
    info["peak_dtype"] = str(dtype)
    write_json("attention", rows, info=info, comparisons=comparisons,
               config={"seqs": seqs, "heads": heads, "head_dim": args.head_dim, "dtype": str(dtype),
                       "flops": "fwd 4 B H S^2 D, bwd 2.5x, causal /2", "baseline": baseline,
                       "pairs": args.pairs, "max_spread": args.max_spread})


if __name__ == "__main__":
    main()
