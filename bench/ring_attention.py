"""Ring attention throughput at P ranks over one rank (``nexus.training.distributed.ring_attention``).

Run from the repository root: ``PYTHONPATH=. python bench/ring_attention.py [--seq 1024] [--heads 8]
[--kv-heads 2] [--head-dim 64] [--ranks 1,2,4] [--pairs 5] [--threads 1]``.

One global causal sequence of ``--seq`` tokens is split over P ranks (P Gloo processes on 127.0.0.1
on a CPU; NCCL, one GPU per rank, when there are P GPUs). One timed call is the forward and backward
of attention alone (no projections): the ring with its K/V (and dK/dV) messages, against the same
block computations with no communication at all ("compute only": every block a rank would receive
replaced by its own, same shapes and masks). A call's time is the slowest rank's; ``compare``
alternates the arms in rounds (``bench/_common.py``). Arms per P:

- ``zigzag``: the causal load-balanced layout (rank i holds chunks i and 2P-1-i), the baseline;
- ``contiguous``: rank i holds the i-th contiguous slice: the last rank has P times the first's work;
- ``zigzag compute``: zigzag's block computations without messages.

Columns: ``ms`` (median per fwd+bwd), ``TFLOP/s`` over all ranks (causal attention: forward
2 B H S^2 D, backward 2.5x that), ``speedup`` = one rank's time / P ranks' time, ``efficiency`` =
speedup / P (ideal 1), ``overlap`` = compute-only / ring time (1: messages fully hidden).

On a CPU the ranks share a few cores, so speedup stops at the core count and the reference attention
path runs: the GPU figures (ring-flash-attention reports 90% of ideal with zigzag on 8 GPUs) need GPUs.
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time

import torch
import torch.distributed as dist

from bench._common import RATIO_NOTE, add_pair_arguments, compare, print_table, setup, write_json
from bench.distributed import spawn
from nexus.training.distributed.context_parallelism import (SequenceLayout, _chunk_spans, _pair_mask,
                                                           ring_attention, shard_sequence)
from nexus_kernels.attention import block_attention_backward, block_attention_forward

BASELINE = "zigzag"
CPU_NOTE = ("No GPU: the ranks are processes sharing this machine's CPU cores (Gloo, reference attention); "
            "speedup past the core count is not expected. GPU figures need one GPU per rank.")


def attention_flops(b: int, h: int, s: int, d: int) -> float:
    """Forward plus backward FLOPs of causal attention over s tokens (half the S x S matrix)."""
    forward = 2 * 2 * b * h * s * s * d / 2
    return 3.5 * forward


def compute_only(q, k, v, dout, rank: int, size: int, zigzag: bool) -> None:
    """The block computations of the ring (forward, then backward) with this rank's own K/V standing in for
    every received block: the ring's work without its messages."""
    q_spans = _chunk_spans(rank, size, q.shape[2], zigzag)
    seq_len = size * q.shape[2]
    pairs = []
    for step in range(size):
        k_spans = _chunk_spans((rank - step) % size, size, k.shape[2], zigzag)
        pairs += [(qs, ks, m) for qs in q_spans for ks in k_spans
                  if (m := _pair_mask(qs, ks, True, seq_len)) is not None]
    results = []
    for (qg, qo, qn), (kg, ko, kn), (causal, limit) in pairs:
        results.append(block_attention_forward(q[:, :, qo:qo + qn], k[:, :, ko:ko + kn], v[:, :, ko:ko + kn],
                                               causal=causal, q_offset=qg, k_offset=kg, seq_len=limit))
    for ((qg, qo, qn), (kg, ko, kn), (causal, limit)), (out, lse) in zip(pairs, results):
        block_attention_backward(dout[:, :, qo:qo + qn], q[:, :, qo:qo + qn], k[:, :, ko:ko + kn],
                                 v[:, :, ko:ko + kn], out, lse.float(), causal=causal, q_offset=qg, k_offset=kg,
                                 seq_len=limit)


def _bench_rank(rank: int, world: int, settings: dict) -> dict:
    device = torch.device("cuda", rank) if settings["backend"] == "nccl" else torch.device("cpu")
    b, h, hkv, s, d = settings["batch"], settings["heads"], settings["kv_heads"], settings["seq"], settings["head_dim"]
    dtype = getattr(torch, settings["dtype"])
    g = torch.Generator().manual_seed(0)
    full = [torch.randn(b, n, s, d, generator=g).to(device, dtype) for n in (h, hkv, hkv, h)]
    assert SequenceLayout(seq_len=s, cp_size=world, rank=rank).padded_len == s, "--seq must divide by 2 x P"
    group = dist.group.WORLD

    def ring(zigzag: bool):
        q, k, v, dout = (shard_sequence(t, group, dim=2, zigzag=zigzag) for t in full)
        q, k, v = (t.requires_grad_() for t in (q, k, v))

        def call():
            ring_attention(q, k, v, group, True, zigzag=zigzag).backward(dout)
        return call

    q, k, v, dout = (shard_sequence(t, group, dim=2) for t in full)
    arms = {"zigzag": ring(True), "contiguous": ring(False),
            "zigzag compute": lambda: compute_only(q, k, v, dout, rank, world, True)}

    def measure(fn) -> float:
        """Seconds per call of the slowest rank (median of ``repeats`` barrier-aligned calls)."""
        times = []
        for _ in range(settings["repeats"]):
            dist.barrier()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            times.append(elapsed.item())
        return statistics.median(times)

    result = compare(arms, baseline=BASELINE, measure=measure, pairs=settings["pairs"],
                     max_spread=settings["max_spread"])
    return {"median_s": {n: result.median_s(n) for n in result.times}, "errors": result.errors,
            "comparisons": result.to_json(f"P={world}")}


def _ranks_arg(text: str) -> list[int]:
    ranks = sorted({int(x) for x in text.split(",") if x.strip()})
    if not ranks or ranks[0] < 1:
        raise argparse.ArgumentTypeError(f"--ranks must be a comma-separated list of ints >= 1, got {text!r}")
    return ranks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=None, help="global sequence (default 1024 on CPU, 32768 on GPUs)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--ranks", type=_ranks_arg, default=[1, 2, 4])
    parser.add_argument("--repeats", type=int, default=3, help="barrier-aligned calls per timing (median)")
    add_pair_arguments(parser)
    args = parser.parse_args()
    env = setup(threads=args.threads, no_gpu_note=CPU_NOTE, measure_bandwidth=False)
    gpus = torch.cuda.device_count()
    seq = args.seq or (32768 if env.on_gpu else 1024)
    rows, comparisons, one_rank = [], [], None
    for world in args.ranks:
        backend = "nccl" if gpus >= world and env.on_gpu else "gloo"
        settings = dict(backend=backend, batch=args.batch, heads=args.heads, kv_heads=args.kv_heads, seq=seq,
                        head_dim=args.head_dim, dtype="bfloat16" if backend == "nccl" else "float32",
                        repeats=args.repeats, pairs=args.pairs, max_spread=args.max_spread)
        # the ranks unpickle the rank function by its module's name (as __main__ under `nexus bench` it is not found)
        module = importlib.import_module("bench.ring_attention")
        outcome = spawn(module._bench_rank, world, (settings,), backend=backend, threads=args.threads or 1)
        flops = attention_flops(args.batch, args.heads, seq, args.head_dim)
        times = outcome["median_s"]
        if one_rank is None and world == 1:
            one_rank = times[BASELINE]
        for name, seconds in times.items():
            row = {"P": world, "backend": backend, "arm": name, "ms": 1e3 * seconds, "TFLOP/s": flops / seconds / 1e12}
            if one_rank is not None and name != "zigzag compute":
                row["speedup"] = one_rank / seconds
                row["efficiency"] = one_rank / seconds / world
            if name == BASELINE:
                row["overlap"] = times["zigzag compute"] / seconds
            comparison = next((c for c in outcome["comparisons"] if c.get("arm") == name), None)
            if comparison is not None:
                row["ratio vs zigzag"] = comparison.get("median")
                row["verdict"] = comparison.get("verdict")
            rows.append(row)
        for name, error in outcome["errors"].items():
            rows.append({"P": world, "backend": backend, "arm": name, "ms": float("nan"), "verdict": error})
        comparisons += outcome["comparisons"]
    print(f"causal attention, B={args.batch} H={args.heads} Hkv={args.kv_heads} S={seq} D={args.head_dim}; "
          f"forward + backward")
    print_table(rows)
    print(RATIO_NOTE.format(baseline=BASELINE, pairs=args.pairs, spread=args.max_spread))
    write_json("ring_attention", rows, info=env.info, comparisons=comparisons,
               config={"seq": seq, "batch": args.batch, "heads": args.heads, "kv_heads": args.kv_heads,
                       "head_dim": args.head_dim, "ranks": args.ranks, "pairs": args.pairs})


if __name__ == "__main__":
    main()
