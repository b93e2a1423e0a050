"""Trainer overhead: tokens/s of ``Trainer`` vs a bare hand-written loop, same model, data and optimizer.

Both loops run forward, the multi-token loss, backward, clipping, AdamW and the schedule; the Trainer
adds its bookkeeping (metrics, JSONL/TensorBoard logging, progress bar, final checkpoint). The bare
loop runs half its steps before and half after the Trainer, to cancel drift in machine load.

    PYTHONPATH=. python bench/trainer.py [--config configs/tiny.yaml] [--steps 60]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch

from bench._common import device_info, print_table, write_json
from nexus.config import load_config
from nexus.training.losses import multi_token_prediction_loss
from nexus.training.run import build_trainer


def bare_loop(model, optimizer, scheduler, loader, *, steps, seq_len, max_norm, device):
    """The loop a user would write by hand; returns seconds per step."""
    it = iter(loader)
    start = time.perf_counter()
    for _ in range(steps):
        window = next(it).to(device)
        out = model(window[:, :seq_len])
        loss, _, _ = multi_token_prediction_loss(out.logits, out.mtp_logits, window)
        loss = loss + out.aux_loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        loss.item()  # the user reads the loss too
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=60)
    ns = parser.parse_args()

    cfg = load_config(ns.config)
    t = cfg.training
    t.output_dir = tempfile.mkdtemp(prefix="nexus-bench-")
    t.eval_interval = t.save_interval = 10**9  # time the step loop, not evaluation or checkpoint writes
    warmup = 3
    t.warmup_steps = min(t.warmup_steps, warmup)
    trainer = build_trainer(cfg, max_steps=warmup + ns.steps)
    trainer.val_loader = None  # the end-of-run evaluation is not part of the step loop
    bare = build_trainer(cfg, max_steps=warmup + ns.steps)  # same seed: same initial weights and data order
    device = trainer.device
    run_bare = lambda steps: bare_loop(bare.model, bare.optimizer, bare.lr_scheduler, bare.train_loader,  # noqa: E731
                                       steps=steps, seq_len=t.seq_len, max_norm=t.max_grad_norm, device=device)

    run_bare(warmup)
    bare_s = [run_bare(ns.steps // 2)]
    trainer.train(max_steps=warmup)
    start = time.perf_counter()
    trainer.train(max_steps=warmup + ns.steps)  # includes the final checkpoint write
    trainer_s = (time.perf_counter() - start) / ns.steps
    bare_s.append(run_bare(ns.steps // 2))  # bare runs before and after cancel drift in machine load

    tokens = t.tokens_per_step
    bare_med = statistics.mean(bare_s)
    overhead = trainer_s / bare_med - 1
    rows = [
        {"impl": "bare loop", "ms/step": bare_med * 1e3, "spread ms": abs(bare_s[1] - bare_s[0]) * 1e3,
         "tokens/s": tokens / bare_med, "overhead": ""},
        {"impl": "Trainer", "ms/step": trainer_s * 1e3, "spread ms": float("nan"), "tokens/s": tokens / trainer_s,
         "overhead": f"{overhead:+.1%}"},
    ]
    print(f"config {ns.config}: {tokens} tokens/step, {ns.steps} steps each on {device}")
    print_table(rows)
    if device.type != "cuda":
        print("CPU run: GPU tokens/s and MFU need a GPU (configs/small.yaml with peak_flops set).")
    write_json("trainer", rows, info=device_info(device, measure_bandwidth=False),
               config={"config": ns.config, "steps": ns.steps, "overhead": overhead})


if __name__ == "__main__":
    main()
