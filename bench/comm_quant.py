"""Benchmark: blockwise quantize+pack and unpack+dequantize for collectives (ZeRO++), kernel vs reference vs peers.

Rows per op and format: the Triton kernel (GPU only), the torch reference, ``torch.compile(reference)``,
and public peers doing the same blockwise arithmetic without the packing:
- "torch per-channel": int8 only: ``torch.quantize_per_channel`` on the [blocks, block_size] view with
  per-block scales amax / 127 (``dequantize()`` for unpack); torch has no int4 or fp8 equivalent;
- "torch fp8 cast": fp8 only: amax / 448 scales and ``.to(torch.float8_e4m3fn)`` (``.float() * scale`` back);
- "torchao": ``torchao.quantization.quant_primitives`` blockwise ``choose_qparams_affine`` +
  ``quantize_affine`` (int8 / int4 ranges; unpack ``dequantize_affine``) when torchao is importable (it is
  not a dependency; the row says "not installed" otherwise). DeepSpeed's ZeRO++ quantizer needs DeepSpeed
  and CUDA and is not a row.
Arms of one op and format are timed in alternation (``--pairs`` rounds); ``ratio`` is the median over rounds
of time / reference time, with min, max and a verdict. GB/s counts bytes read plus bytes written (input and
packed buffer for pack; packed buffer and output for unpack); "% copy" divides by the device-to-device copy
bandwidth measured in the same run (goal on an H100: 80%). On a CPU-only machine the reference rows run at
small sizes and the kernel rows say they need a GPU.

    PYTHONPATH=. python bench/comm_quant.py [--sizes 1M 16M 256M] [--rows 8] [--block-size 128] [--no-compile]
"""
from __future__ import annotations

import argparse

import torch

from bench._common import RATIO_NOTE, add_pair_arguments, bandwidth_rows, blocked_timer, print_table, setup, write_json
from nexus_kernels import forced
from nexus_kernels.comm_quant import (
    COMM_FORMATS,
    packed_nbytes,
    quantize_pack,
    quantize_pack_reference,
    unpack_dequantize,
    unpack_dequantize_reference,
)

COLUMNS = ["impl", "op", "fmt", "dtype", "elements", "ms", "GB/s", "% copy", "ratio", "min", "max", "verdict"]
QMAX = {"int8": 127.0, "int4": 7.0, "fp8": 448.0}


def _size(text: str) -> int:
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:].upper(), 1)
    value = int(text[:-1] if mult > 1 else text) * mult
    if value <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text}")
    return value


def _blocks(x: torch.Tensor, bs: int) -> torch.Tensor:
    return x.reshape(-1, bs)  # the bench sizes are multiples of the block size


def _torch_peers(fmt: str, bs: int):
    """{name: (pack(x), unpack(packed))} of plain-torch blockwise quantization for ``fmt``."""
    if fmt == "int8":
        def pack(x):
            b = _blocks(x.float(), bs)
            scale = (b.abs().amax(1) / QMAX[fmt]).double().clamp(min=1e-30)
            zero = torch.zeros(b.shape[0], dtype=torch.int64, device=x.device)
            return torch.quantize_per_channel(b, scale, zero, 0, torch.qint8)

        return {"torch per-channel": (pack, lambda q: q.dequantize())}
    if fmt == "fp8":
        def pack(x):
            b = _blocks(x.float(), bs)
            scale = b.abs().amax(1, keepdim=True) / QMAX[fmt]
            return (b / scale).clamp(-448, 448).to(torch.float8_e4m3fn), scale

        return {"torch fp8 cast": (pack, lambda p: p[0].float() * p[1])}
    return {}


def _torchao_peer(fmt: str, bs: int):
    """torchao's blockwise affine quantization as (pack, unpack), or (None, why)."""
    if fmt == "fp8":
        return None, "no fp8 affine path"
    try:
        from torchao.quantization.quant_primitives import (
            MappingType,
            choose_qparams_affine,
            dequantize_affine,
            quantize_affine,
        )
    except ImportError:
        return None, "not installed"
    except Exception as exc:  # an installed torchao that fails to import is reported, not fatal
        return None, f"import error: {type(exc).__name__}"
    qmax = int(QMAX[fmt])

    def pack(x):
        b = _blocks(x, bs)
        scale, zero = choose_qparams_affine(b, MappingType.SYMMETRIC, (1, bs), torch.int8, -qmax, qmax)
        return quantize_affine(b, (1, bs), scale, zero, torch.int8, -qmax, qmax), scale, zero

    def unpack(p):
        return dequantize_affine(p[0], (1, bs), p[1], p[2], torch.int8, -qmax, qmax)

    return (pack, unpack), ""


def _unpack_arm(pack, unpack, x):
    """An arm timing ``unpack`` of ``pack(x)``; the packing runs once, on the untimed warm-up call."""
    packed = []

    def arm():
        if not packed:
            packed.append(pack(x))
        return unpack(packed[0])

    return arm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=_size, nargs="+", default=None,
                        help="elements per tensor, e.g. 1M 16M 256M (default: those on GPU, 64K 1M on CPU)")
    parser.add_argument("--rows", type=int, default=8, help="rows of x (e.g. one per rank of an all-to-all)")
    parser.add_argument("--block-size", type=int, default=128, choices=(32, 64, 128, 256))
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    add_pair_arguments(parser)
    args = parser.parse_args()
    env = setup(threads=args.threads)
    sizes = args.sizes or ([1 << 20, 16 << 20, 256 << 20] if env.on_gpu else [1 << 16, 1 << 20])
    bs, rows = args.block_size, args.rows
    print(f"x = [{rows}, elements / {rows}], block {bs}; "
          + RATIO_NOTE.format(baseline="reference", pairs=args.pairs, spread=args.max_spread))
    measure = blocked_timer(env.device, env.min_run_time)
    compile_ref = not args.no_compile
    pack_c = torch.compile(quantize_pack_reference, dynamic=False) if compile_ref else None
    unpack_c = torch.compile(unpack_dequantize_reference, dynamic=False) if compile_ref else None

    rows_out, comparisons = [], []

    def run(group: dict, arms: dict, absent: dict, nbytes: int) -> None:
        bandwidth_rows(arms, group=group, absent=absent, nbytes=nbytes, measure=measure, pairs=args.pairs,
                       max_spread=args.max_spread, copy_bw=env.copy_bw, rows=rows_out, comparisons=comparisons)

    for dtype in (torch.bfloat16, torch.float32) if env.on_gpu else (torch.float32,):
        for size in sizes:
            n = -(-size // rows // bs) * bs  # whole blocks per row
            x = torch.randn(rows, n, device=env.device, dtype=dtype)
            group = {"dtype": str(dtype).replace("torch.", ""), "elements": rows * n}
            for fmt in COMM_FORMATS:
                packed = rows * packed_nbytes(n, fmt, bs)
                flat = x.reshape(-1)
                peers = _torch_peers(fmt, bs)
                ao, ao_note = _torchao_peer(fmt, bs)

                def reference(fmt=fmt):
                    with forced("reference"):
                        return quantize_pack(x, fmt, bs)

                arms, absent = {"reference": reference}, {}
                if env.on_gpu:
                    arms["kernel"] = lambda fmt=fmt: quantize_pack(x, fmt, bs)
                else:
                    absent["kernel"] = "needs a GPU"
                if pack_c is not None:
                    arms["compile(reference)"] = lambda fmt=fmt: pack_c(x, fmt, bs)
                for name, (pack, _) in peers.items():
                    arms[name] = lambda pack=pack: pack(flat)
                if ao is not None:
                    arms["torchao"] = lambda pack=ao[0]: pack(flat)
                elif fmt != "fp8":
                    absent["torchao"] = ao_note
                run({"op": "pack", "fmt": fmt, **group}, arms, absent, x.numel() * x.element_size() + packed)

                buf = quantize_pack(x, fmt, bs) if env.on_gpu else quantize_pack_reference(x, fmt, bs)
                arms = {"reference": lambda buf=buf, fmt=fmt: unpack_dequantize_reference(buf, n, fmt, bs, dtype)}
                absent = {}
                if env.on_gpu:
                    arms["kernel"] = lambda buf=buf, fmt=fmt: unpack_dequantize(buf, n, fmt, bs, dtype)
                else:
                    absent["kernel"] = "needs a GPU"
                if unpack_c is not None:
                    arms["compile(reference)"] = lambda buf=buf, fmt=fmt: unpack_c(buf, n, fmt, bs, dtype)
                for name, (pack, unpack) in peers.items():
                    arms[name] = _unpack_arm(pack, unpack, flat)
                if ao is not None:
                    arms["torchao"] = _unpack_arm(*ao, flat)
                elif fmt != "fp8":
                    absent["torchao"] = ao_note
                run({"op": "unpack", "fmt": fmt, **group}, arms, absent, packed + x.numel() * x.element_size())
    print_table(rows_out, COLUMNS)
    write_json("comm_quant", rows_out, info=env.info, comparisons=comparisons,
               config={"sizes": sizes, "rows": rows, "block_size": bs, "compile": compile_ref, "pairs": args.pairs,
                       "max_spread": args.max_spread})


if __name__ == "__main__":
    main()
