"""Benchmark: float -> E4M3/E5M2/E2M1 casts (RNE and stochastic), kernel vs reference vs peers.

Rows: the Triton kernel (GPU only), the torch reference, ``torch.compile(reference)``, and torch's
own ``x.to(torch.float8_e4m3fn / float8_e5m2)`` as the public peer. GB/s counts bytes read plus
bytes written; "% copy" divides by the device-to-device copy bandwidth measured in the same run.
On a CPU-only machine the reference rows run at small sizes and the kernel row says it needs a GPU.

    PYTHONPATH=. python bench/fp8_cast.py [--n 16777216] [--no-compile | --compile-all]
"""
from __future__ import annotations

import argparse

import torch

from bench._common import default_device, device_info, gbps, print_table, time_fn, write_json
from nexus_kernels import cast_to_fp_bits, forced
from nexus_kernels.cast import cast_to_fp_bits_reference

TORCH_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}


def _row(impl, fmt, rounding, x, fn, copy_bw, device, min_run_time):
    nbytes = x.numel() * (x.element_size() + 1)  # read the input, write one byte per code
    row = {"impl": impl, "fmt": fmt, "rounding": rounding, "dtype": str(x.dtype).replace("torch.", ""), "n": x.numel()}
    try:
        t = time_fn(fn, device=device, min_run_time=min_run_time)
    except Exception as exc:  # a peer that fails here is reported, not fatal
        first_line = (str(exc).strip().splitlines() or [""])[0]
        row.update({"ms": float("nan"), "note": f"error: {type(exc).__name__}: {first_line[:60]}"})
        return row
    bw = gbps(nbytes, t.median_s)
    row.update({"ms": t.median_s * 1e3, "+-%": t.spread_pct, "GB/s": bw, "% copy": 100 * bw / copy_bw, "note": ""})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=None, help="elements (default 64M on GPU, 1M on CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--compile-all", action="store_true",
                        help="on CPU also compile the stochastic reference (minutes of compile time)")
    args = parser.parse_args()
    device = default_device()
    on_gpu = device.type == "cuda"
    n = args.n or ((1 << 26) if on_gpu else (1 << 20))
    min_run_time = 0.5 if on_gpu else 0.2
    info = device_info(device)
    copy_bw = info["copy_GBps"]
    print(f"device: {info['device_name']} ({device}); copy bandwidth {copy_bw:.1f} GB/s; n = {n}")
    if not on_gpu:
        print("No GPU: the Triton kernel rows need a GPU; reference paths run at a small size.")

    compiled = None if args.no_compile else torch.compile(cast_to_fp_bits_reference, dynamic=False)
    rows = []
    # CPU: float32 only (bf16 arithmetic is slow there and the GPU figures are what matter).
    for dtype in (torch.float32, torch.bfloat16) if on_gpu else (torch.float32,):
        x = torch.randn(n, device=device, dtype=dtype)
        for fmt in ("e4m3", "e5m2", "e2m1"):
            for rounding in ("nearest", "stochastic"):
                if on_gpu:
                    rows.append(_row("kernel", fmt, rounding, x, lambda: cast_to_fp_bits(x, fmt, rounding, seed=1),
                                     copy_bw, device, min_run_time))
                else:
                    rows.append({"impl": "kernel", "fmt": fmt, "rounding": rounding, "note": "needs a GPU"})
                with forced("reference"):
                    rows.append(_row("reference", fmt, rounding, x,
                                     lambda: cast_to_fp_bits(x, fmt, rounding, seed=1), copy_bw, device,
                                     min_run_time))
                if compiled is not None and (on_gpu or rounding == "nearest" or args.compile_all):
                    rows.append(_row("compile(reference)", fmt, rounding, x,
                                     lambda: compiled(x, fmt, rounding, 1, True), copy_bw, device, min_run_time))
                if fmt in TORCH_DTYPES and rounding == "nearest":
                    rows.append(_row("torch .to(float8)", fmt, rounding, x, lambda: x.to(TORCH_DTYPES[fmt]),
                                     copy_bw, device, min_run_time))
    print_table(rows, ["impl", "fmt", "rounding", "dtype", "n", "ms", "+-%", "GB/s", "% copy", "note"])
    write_json("fp8_cast", rows, info=info, config={"n": n, "compile": compiled is not None})


if __name__ == "__main__":
    main()
