"""Optimizer step time on the parameter shapes of a GPT (125M on CUDA, scaled down on CPU).

Times ``optimizer.step()`` alone (gradients fixed, no forward/backward) for every optimizer in
``nexus.training.optimizers`` (per-tensor and foreach paths), ``torch.optim.AdamW`` (foreach and
fused) and public implementations when installed (``lion-pytorch``, ``schedulefree``,
``prodigyopt``, ``heavyball``; none is a dependency). Each optimizer is timed in alternation with
the baseline, fused AdamW (foreach AdamW where fused is unavailable), for ``--pairs`` rounds:
``ratio`` is the median over rounds of its step time / the baseline's, with min, max and a verdict
("inconclusive: spread X%" when the rounds disagree). Also: median ms, optimizer-state MB and the
bytes-moved bandwidth of the step.

    PYTHONPATH=. python bench/optimizers.py            # CUDA: GPT-2 125M shapes; CPU: scaled down
    PYTHONPATH=. python bench/optimizers.py --full     # 125M shapes on CPU too (slow)
    PYTHONPATH=. python bench/optimizers.py --pairs 9 --only Lion
"""
from __future__ import annotations

import argparse
import importlib
import math
import statistics
from typing import Callable

import torch

from bench._common import RATIO_NOTE, add_pair_arguments, blocked_timer, compare, gbps, print_table, setup, write_json
import nexus.training.optimizers as nexus_optimizers

GPT_125M = dict(vocab=50257, d_model=768, n_layers=12, context=1024)
CPU_SCALED = dict(vocab=8192, d_model=256, n_layers=4, context=256)


def gpt_shapes(vocab: int, d_model: int, n_layers: int, context: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every parameter of a GPT-2 style model (tied embedding/head)."""
    shapes = [("wte", (vocab, d_model)), ("wpe", (context, d_model))]
    for i in range(n_layers):
        shapes += [(f"h{i}.ln1.w", (d_model,)), (f"h{i}.ln1.b", (d_model,)),
                   (f"h{i}.attn.qkv.w", (3 * d_model, d_model)), (f"h{i}.attn.qkv.b", (3 * d_model,)),
                   (f"h{i}.attn.proj.w", (d_model, d_model)), (f"h{i}.attn.proj.b", (d_model,)),
                   (f"h{i}.ln2.w", (d_model,)), (f"h{i}.ln2.b", (d_model,)),
                   (f"h{i}.mlp.fc.w", (4 * d_model, d_model)), (f"h{i}.mlp.fc.b", (4 * d_model,)),
                   (f"h{i}.mlp.proj.w", (d_model, 4 * d_model)), (f"h{i}.mlp.proj.b", (d_model,))]
    return shapes + [("ln_f.w", (d_model,)), ("ln_f.b", (d_model,))]


def make_params(shapes, device, dtype, seed=0) -> list[tuple[str, torch.nn.Parameter]]:
    gen = torch.Generator(device="cpu").manual_seed(seed)
    named = []
    for name, shape in shapes:
        p = torch.nn.Parameter((torch.randn(shape, generator=gen) * 0.02).to(device=device, dtype=dtype))
        p.grad = (torch.randn(shape, generator=gen) * 1e-3).to(device=device, dtype=dtype)
        named.append((name, p))
    return named


def _matrix_groups(named):
    # Muon/SOAP practice: hidden matrices get the new rule, embeddings and vectors get AdamW.
    hidden = [p for n, p in named if p.dim() == 2 and not n.startswith(("wte", "wpe"))]
    rest = [p for n, p in named if not (p.dim() == 2 and not n.startswith(("wte", "wpe")))]
    return hidden, rest


def candidates(device: torch.device) -> dict[str, Callable | str]:
    """name -> builder(named_params) -> optimizer, or a string saying why it is absent."""
    fused_ok = device.type == "cuda" or torch.__version__ >= "2.4"
    out: dict[str, Callable | str] = {
        "torch.AdamW(foreach)": lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-3, foreach=True),
        "torch.AdamW(fused)": (lambda named: torch.optim.AdamW([p for _, p in named], lr=1e-3, fused=True))
        if fused_ok else "fused AdamW needs torch >= 2.4 on CPU",
    }
    for foreach in (False, True):
        tag = "foreach" if foreach else "per-tensor"
        out[f"nexus.Lion({tag})"] = lambda named, f=foreach: nexus_optimizers.Lion(
            [p for _, p in named], lr=1e-4, weight_decay=0.1, foreach=f)
        out[f"nexus.Sophia({tag})"] = lambda named, f=foreach: _fed_sophia(named, f)
        out[f"nexus.Prodigy({tag})"] = lambda named, f=foreach: nexus_optimizers.Prodigy(
            [p for _, p in named], weight_decay=0.01, foreach=f)
        out[f"nexus.ScheduleFreeAdamW({tag})"] = lambda named, f=foreach: nexus_optimizers.ScheduleFreeAdamW(
            [p for _, p in named], foreach=f)
    if hasattr(nexus_optimizers, "Muon"):
        def muon(named):
            hidden, rest = _matrix_groups(named)
            return nexus_optimizers.Muon([{"params": hidden}, {"params": rest, "use_muon": False, "lr": 3e-4}])
        out["nexus.Muon(+AdamW for rest)"] = muon
    else:
        out["nexus.Muon"] = "not importable from nexus.training.optimizers"
    if hasattr(nexus_optimizers, "SOAP"):
        out["nexus.SOAP"] = lambda named: nexus_optimizers.SOAP([p for _, p in named], lr=3e-3)
    else:
        out["nexus.SOAP"] = "not importable from nexus.training.optimizers"
    out.update(_public_peers())
    if device.type != "cuda" and not isinstance(out.get("lion-pytorch Lion(triton)"), str):
        out["lion-pytorch Lion(triton)"] = "needs CUDA"
    return out


def _fed_sophia(named, foreach):
    params = [p for _, p in named]
    opt = nexus_optimizers.Sophia(params, lr=1e-4, estimator="hutchinson", foreach=foreach)
    # One cheap exact Hessian (2 everywhere) so step() can run; its cost is not timed.
    opt.update_hessian(closure=lambda: sum((p * p).sum() for p in params))
    return opt


def _public_peers() -> dict[str, Callable | str]:
    peers: dict[str, Callable | str] = {}
    specs = [
        ("lion-pytorch Lion", "lion_pytorch", lambda m, ps: m.Lion(ps, lr=1e-4, weight_decay=0.1)),
        ("lion-pytorch Lion(triton)", "lion_pytorch",
         lambda m, ps: m.Lion(ps, lr=1e-4, weight_decay=0.1, use_triton=True)),
        ("schedulefree AdamWScheduleFree", "schedulefree", lambda m, ps: _sf_train(m.AdamWScheduleFree(ps))),
        ("prodigyopt Prodigy", "prodigyopt", lambda m, ps: m.Prodigy(ps, lr=1.0, weight_decay=0.01)),
        ("heavyball ForeachSOAP", "heavyball", lambda m, ps: m.ForeachSOAP(ps, lr=3e-3)),
    ]
    for name, module_name, build in specs:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            peers[name] = "not installed"
            continue
        peers[name] = lambda named, m=module, b=build: b(m, [p for _, p in named])
    return peers


def _sf_train(opt):
    opt.train()  # the reference starts in eval mode
    return opt


def state_bytes(opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    parser.add_argument("--full", action="store_true", help="GPT-2 125M shapes even on CPU")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--min-run-time", type=float, default=0.1, help="seconds of timed runs per timing")
    parser.add_argument("--only", default=None, help="substring filter on row names")
    add_pair_arguments(parser)
    args = parser.parse_args()

    env = setup(args.device, min_run_time=args.min_run_time, no_gpu_note=None, threads=args.threads)
    device = env.device
    dtype = getattr(torch, args.dtype)
    config = GPT_125M if (device.type == "cuda" or args.full) else CPU_SCALED
    shapes = gpt_shapes(**config)
    n_params = sum(math.prod(s) for _, s in shapes)
    scaled = config is CPU_SCALED
    print(f"device {device}, dtype {args.dtype}, {len(shapes)} tensors, {n_params / 1e6:.1f}M parameters"
          + (" (CPU: GPT shapes scaled down from 125M: d_model 256, 4 layers, vocab 8192; "
             "use --full for 125M; GPU figures need a GPU)" if scaled else " (GPT-2 125M shapes)"))

    builders = candidates(device)
    baseline = "torch.AdamW(fused)" if callable(builders["torch.AdamW(fused)"]) else "torch.AdamW(foreach)"
    print(RATIO_NOTE.format(baseline=baseline, pairs=args.pairs, spread=args.max_spread))
    measure = blocked_timer(device, args.min_run_time)
    param_bytes = n_params * torch.finfo(dtype).bits // 8

    def row(name, opt, seconds, cells):
        sbytes = state_bytes(opt)
        # Read grad, read+write params and every state tensor: the floor a fused kernel can reach.
        moved = 3 * param_bytes + 2 * sbytes
        return {"optimizer": name, "ms": round(seconds * 1e3, 3), "state MB": round(sbytes / 2 ** 20, 1),
                "GB/s": round(gbps(moved, seconds), 2), **cells}

    # The baseline lives through the whole run; each candidate alternates with it, one candidate at a time.
    base_opt = builders[baseline](make_params(shapes, device, dtype))
    base_opt.step()  # creates the state outside the timing
    base_times: list[float] = []
    rows, comparisons = [], []
    for name, build in builders.items():
        if name == baseline or (args.only and args.only not in name):
            continue
        if isinstance(build, str):
            rows.append({"optimizer": name, "verdict": build})
            print(f"{name}: {build}")
            continue
        named = make_params(shapes, device, dtype)
        try:
            opt = build(named)
            opt.step()  # creates the state outside the timing
        except Exception as exc:  # a peer's failure is a row, not the end of the run
            rows.append({"optimizer": name, "verdict": f"failed: {type(exc).__name__}: {exc}"[:120]})
            print(f"{name}: failed: {exc}")
            continue
        result = compare({baseline: base_opt.step, name: opt.step}, baseline=baseline, pairs=args.pairs,
                         measure=measure, warmup=0, max_spread=args.max_spread)
        comparisons += result.to_json(name)
        if name in result.errors:
            rows.append({"optimizer": name, **result.cells(name)})
            print(f"{name}: {result.errors[name]}")
        else:
            base_times += result.times[baseline]
            rows.append(row(name, opt, result.median_s(name), result.cells(name)))
            print(f"{name}: {result.median_s(name) * 1e3:.3f} ms; {result.comparisons[name].describe()}")
        del opt, named
    if base_times:
        rows.insert(0, row(baseline, base_opt, statistics.median(base_times),
                           {"ratio": 1.0, "min": "", "max": "", "verdict": "baseline"}))
    print()
    print_table(rows, ["optimizer", "ms", "ratio", "min", "max", "verdict", "state MB", "GB/s"])
    info = env.info
    print(f"\nmeasured copy bandwidth: {info.get('copy_GBps', float('nan')):.1f} GB/s (the ceiling for GB/s above)")
    write_json("optimizers", rows, info=info, comparisons=comparisons,
               config={"shapes": "cpu_scaled" if scaled else "gpt2_125m", **config, "n_params": n_params,
                       "dtype": args.dtype, "min_run_time": args.min_run_time, "baseline": baseline,
                       "pairs": args.pairs, "max_spread": args.max_spread})


if __name__ == "__main__":
    main()
