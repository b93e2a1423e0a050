"""Benchmark: MX quantisation (to_mx) and dequantisation (from_mx), kernel vs reference vs peers.

Rows: the Triton kernel (GPU only), the torch reference, ``torch.compile(reference)``, and
torchao's MX cast (``torchao.prototype.mx_formats.mx_tensor.to_mx``) when torchao is importable
(it is not a dependency; the row says "not installed" otherwise). GB/s counts bytes read plus
bytes written (input, element codes, E8M0 scales); "% copy" divides by the device-to-device copy
bandwidth measured in the same run. On a CPU-only machine the reference rows run at a small size.

    PYTHONPATH=. python bench/mx_cast.py [--m 8192 --k 8192] [--no-compile]
"""
from __future__ import annotations

import argparse

import torch

from bench._common import default_device, device_info, gbps, print_table, time_fn, write_json
from nexus_kernels import forced, from_mx, to_mx
from nexus_kernels.mx import from_mx_reference, to_mx_reference


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


def _row(impl, op, elem, x, nbytes, fn, copy_bw, device, min_run_time, note=""):
    row = {"impl": impl, "op": op, "elem": elem, "dtype": str(x.dtype).replace("torch.", ""),
           "shape": "x".join(map(str, x.shape))}
    if fn is None:
        row.update({"note": note})
        return row
    try:
        t = time_fn(fn, device=device, min_run_time=min_run_time)
    except Exception as exc:  # a peer that fails here is reported, not fatal
        first_line = (str(exc).strip().splitlines() or [""])[0]
        row.update({"note": f"error: {type(exc).__name__}: {first_line[:60]}"})
        return row
    bw = gbps(nbytes, t.median_s)
    row.update({"ms": t.median_s * 1e3, "+-%": t.spread_pct, "GB/s": bw, "% copy": 100 * bw / copy_bw, "note": note})
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=None, help="rows (default 8192 on GPU, 256 on CPU)")
    parser.add_argument("--k", type=int, default=None, help="last dim (default 8192 on GPU, 1024 on CPU)")
    parser.add_argument("--block-size", type=int, default=32, choices=(32, 64))
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    args = parser.parse_args()
    device = default_device()
    on_gpu = device.type == "cuda"
    m = args.m or (8192 if on_gpu else 256)
    k = args.k or (8192 if on_gpu else 1024)
    bs = args.block_size
    min_run_time = 0.5 if on_gpu else 0.2
    info = device_info(device)
    copy_bw = info["copy_GBps"]
    print(f"device: {info['device_name']} ({device}); copy bandwidth {copy_bw:.1f} GB/s; x = [{m}, {k}], block {bs}")
    if not on_gpu:
        print("No GPU: the Triton kernel rows need a GPU; reference paths run at a small size.")
    ao_fn, ao_note = _torchao_to_mx()
    compile_ref = not args.no_compile
    to_ref_c = torch.compile(to_mx_reference, dynamic=False) if compile_ref else None
    from_ref_c = torch.compile(from_mx_reference, dynamic=False) if compile_ref else None

    rows = []
    dtypes = (torch.bfloat16, torch.float32) if on_gpu else (torch.float32,)
    for dtype in dtypes:
        x = torch.randn(m, k, device=device, dtype=dtype)
        for elem in ("e4m3", "e5m2", "e2m1"):
            nb = _nbytes(x, elem, bs)
            rounding_modes = ("nearest", "stochastic") if on_gpu else ("nearest",)
            for rounding in rounding_modes:
                op = f"to_mx/{rounding[:4]}"
                kernel_fn = (lambda: to_mx(x, elem, bs, rounding, 1)) if on_gpu else None
                rows.append(_row("kernel", op, elem, x, nb, kernel_fn, copy_bw, device, min_run_time,
                                 "" if on_gpu else "needs a GPU"))

                def reference(rounding=rounding):
                    with forced("reference"):
                        return to_mx(x, elem, bs, rounding, 1)
                rows.append(_row("reference", op, elem, x, nb, reference, copy_bw, device, min_run_time))
                if to_ref_c is not None:
                    rows.append(_row("compile(reference)", op, elem, x, nb,
                                     lambda: to_ref_c(x, elem, bs, rounding, 1), copy_bw, device, min_run_time))
            rows.append(_row("torchao", "to_mx/near", elem, x, nb,
                             (lambda: ao_fn(x, elem, bs)) if ao_fn is not None else None, copy_bw, device,
                             min_run_time, ao_note))
            elements, scales = to_mx(x, elem, bs) if on_gpu else to_mx_reference(x, elem, bs)
            nb_out = _nbytes(torch.empty(m, k, dtype=dtype, device="meta"), elem, bs)
            rows.append(_row("kernel", "from_mx", elem, x, nb_out,
                             (lambda: from_mx(elements, scales, elem, bs, dtype, k)) if on_gpu else None,
                             copy_bw, device, min_run_time, "" if on_gpu else "needs a GPU"))
            rows.append(_row("reference", "from_mx", elem, x, nb_out,
                             lambda: from_mx_reference(elements, scales, elem, bs, dtype, k), copy_bw, device,
                             min_run_time))
            if from_ref_c is not None:
                rows.append(_row("compile(reference)", "from_mx", elem, x, nb_out,
                                 lambda: from_ref_c(elements, scales, elem, bs, dtype, k), copy_bw, device,
                                 min_run_time))
    print_table(rows, ["impl", "op", "elem", "dtype", "shape", "ms", "+-%", "GB/s", "% copy", "note"])
    write_json("mx_cast", rows, info=info, config={"m": m, "k": k, "block_size": bs, "compile": compile_ref})


if __name__ == "__main__":
    main()
