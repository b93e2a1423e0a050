"""Activation memory and step time per selective-checkpointing policy, on the tiny MoE model.

Run from the repository root: ``PYTHONPATH=. python bench/memory.py [--config configs/tiny.yaml]
[--batch 8] [--seq 128] [--budget 0.5] [--pairs 5] [--threads 1]``.

Arms: no checkpointing (the baseline), ALL, HEAVY_OPS, ALTERNATE, AUTO (``--budget``, a fraction of the
uncheckpointed activation bytes) and, on a GPU, no checkpointing with activation offloading
(``--offload-threshold-mb``). Each arm is its own copy of one model (the config's ``model:`` section,
same initial weights) with its blocks (``model.layers`` and the MTP heads) wrapped by
``apply_selective_checkpointing``. One timed call = forward, multi-token loss plus router losses,
backward (no optimizer step: it does not depend on the policy). Reported per arm:

- ``act MiB``: bytes the forward keeps for backward besides the logits (``measure_activation_memory``:
  autograd's saved tensors, selective-checkpoint caches, checkpoint inputs), and ``saved`` = the share
  of the baseline's that the arm does not keep; on a GPU also ``peak MiB``, the step's
  ``torch.cuda.max_memory_allocated`` above what was allocated before it (weights);
- ``ratio``: step time / baseline step time in the same round, median over ``--pairs`` rounds with min,
  max and a verdict ("inconclusive: spread X%" when the rounds disagree).

Seed 001 claims for selective checkpointing "50-90% activations" saved at "+30% recompute"; the claim
columns repeat it beside each checkpointing row.
"""
from __future__ import annotations

import argparse
import contextlib
import copy

import torch

from bench._common import RATIO_NOTE, add_pair_arguments, blocked_timer, compare, print_table, setup, write_json
from nexus.config import load_config
from nexus.models.moe import MoETransformer
from nexus.training.gradient_methods import (ActivationOffloader, SelectiveCheckpointConfig,
                                             apply_selective_checkpointing, measure_activation_memory,
                                             selective_checkpoint_runner)
from nexus.training.losses import multi_token_prediction_loss

BASELINE = "none"
SEED_MEMORY_CLAIM, SEED_TIME_CLAIM = "50-90% saved", "+30%"


def step_fn(model: torch.nn.Module, window: torch.Tensor, seq: int, offloader: ActivationOffloader | None = None):
    """One forward and backward of ``model`` on ``window`` [batch, seq + n_pred_tokens] (int64 ids)."""
    def step() -> None:
        for p in model.parameters():
            p.grad = None
        with offloader.offload_context() if offloader is not None else contextlib.nullcontext():
            out = model(window[:, :seq])
            loss = multi_token_prediction_loss(out.logits, out.mtp_logits, window)[0] + out.aux_loss
            loss.backward()
    return step


def activation_bytes(model: torch.nn.Module, window: torch.Tensor, seq: int) -> int:
    """Bytes kept for backward besides the outputs (one measured forward, then its backward)."""
    for p in model.parameters():
        p.grad = None
    out, mem = measure_activation_memory(model, window[:, :seq])
    loss = multi_token_prediction_loss(out.logits, out.mtp_logits, window)[0] + out.aux_loss
    loss.backward()
    return mem.live_bytes


def peak_bytes(step, device: torch.device) -> int | None:
    """``max_memory_allocated`` during ``step()`` above what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml", help="run file whose model: section is used")
    parser.add_argument("--batch", type=int, default=None, help="rows per step (default: training.batch_size)")
    parser.add_argument("--seq", type=int, default=None, help="tokens per row (default: training.seq_len)")
    parser.add_argument("--budget", type=float, default=0.5, help="AUTO's memory_budget (fraction or bytes)")
    parser.add_argument("--offload-threshold-mb", type=float, default=1.0,
                        help="offloading arm (GPU only): tensors of at least this many MiB move to host memory")
    add_pair_arguments(parser)
    ns = parser.parse_args()

    cfg = load_config(ns.config)
    batch = ns.batch or cfg.training.batch_size
    seq = ns.seq or cfg.training.seq_len
    if batch < 1 or seq < 1 or seq > cfg.model.max_seq_len:
        parser.error(f"--batch must be >= 1 and --seq in [1, {cfg.model.max_seq_len}], got {batch} and {seq}")
    env = setup(measure_bandwidth=False, threads=ns.threads,
                no_gpu_note="No CUDA GPU: activation bytes are measured by saved-tensor accounting; peak "
                            "memory and the offloading arm need a GPU.")
    device = env.device

    torch.manual_seed(0)
    base = MoETransformer(cfg.model).to(device)
    gen = torch.Generator().manual_seed(1)
    window = torch.randint(0, cfg.model.vocab_size, (batch, seq + cfg.model.n_pred_tokens), generator=gen).to(device)

    policies = {"none": None, "all": dict(policy="all"), "heavy_ops": dict(policy="heavy_ops"),
                "alternate": dict(policy="alternate"), f"auto({ns.budget:g})": dict(policy="auto",
                                                                                    memory_budget=ns.budget)}
    models, steps = {}, {}
    for name, kwargs in policies.items():
        model = copy.deepcopy(base)
        if kwargs is not None:
            apply_selective_checkpointing(model, SelectiveCheckpointConfig(**kwargs))
        models[name] = model
        steps[name] = step_fn(model, window, seq)
    if env.on_gpu:
        offloader = ActivationOffloader(offload_threshold_mb=ns.offload_threshold_mb)
        models["offload"] = copy.deepcopy(base)
        steps["offload"] = step_fn(models["offload"], window, seq, offloader)

    print(f"config {ns.config}: {batch} x {seq} tokens per step, {sum(p.numel() for p in base.parameters()):,} "
          f"parameters, {len(base.layers)} layers + {len(base.mtp_heads)} MTP heads")
    print(RATIO_NOTE.format(baseline=BASELINE, pairs=ns.pairs, spread=ns.max_spread))
    # warm-up 2: AUTO measures its blocks in the first step and follows its plan from the second
    result = compare(steps, baseline=BASELINE, pairs=ns.pairs, warmup=2,
                     measure=blocked_timer(device, env.min_run_time), max_spread=ns.max_spread)

    act = {name: activation_bytes(model, window, seq) for name, model in models.items() if name != "offload"}
    peaks = {name: peak_bytes(steps[name], device) for name in steps}
    rows = []
    for name in steps:
        row = {"policy": name}
        if name in act:
            row["act MiB"] = act[name] / 2**20
            row["saved"] = f"{1 - act[name] / act[BASELINE]:.0%}"
        if peaks[name] is not None:
            row["peak MiB"] = peaks[name] / 2**20
        if name in result.times:
            row["ms/step"] = result.median_s(name) * 1e3
        row.update(result.cells(name))
        if name not in (BASELINE, "offload"):
            row["seed: memory"], row["seed: time"] = SEED_MEMORY_CLAIM, SEED_TIME_CLAIM
        rows.append(row)
    auto_name = next(n for n in policies if n.startswith("auto"))
    plan = selective_checkpoint_runner(models[auto_name]).plan
    columns = ["policy", "act MiB", "saved"] + (["peak MiB"] if env.on_gpu else []) + [
        "ms/step", "ratio", "min", "max", "verdict", "seed: memory", "seed: time"]
    print_table(rows, columns)
    print(f"{auto_name} plan per block (layers, then MTP heads): {[plan[i] for i in sorted(plan)]}")
    if not env.on_gpu:
        print("CPU run: the recompute share of step time differs on a GPU, where matmuls are relatively cheaper; "
              "peak memory and offloading need a GPU.")
    write_json("memory", rows, info=env.info, comparisons=result.to_json(f"{batch}x{seq}"),
               config={"config": ns.config, "batch": batch, "seq": seq, "budget": ns.budget,
                       "offload_threshold_mb": ns.offload_threshold_mb, "pairs": ns.pairs,
                       "max_spread": ns.max_spread, "auto_plan": [plan[i] for i in sorted(plan)],
                       "activation_bytes": act, "peak_bytes": peaks,
                       "step": "forward + multi-token loss + router losses + backward, no optimizer"})


if __name__ == "__main__":
    main()
