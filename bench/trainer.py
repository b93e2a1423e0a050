"""Trainer overhead: seconds per step of ``Trainer`` vs a bare hand-written loop, same model, data and optimizer.

Both run forward, the multi-token loss, backward, clipping, the optimizer and the schedule; the Trainer
adds its bookkeeping (metrics, JSONL logging, progress bar). The two alternate in chunks of ``--steps``
steps: one ``Trainer.train`` call runs ``(pairs + 1) * steps`` steps with ``log_interval = steps``, and a
callback at each log times the Trainer's chunk, then runs and times as many bare-loop steps. Each pair
(Trainer chunk, bare chunk) thus sees the same machine load; the first pair is warm-up. Reported: the
median over pairs of Trainer time / bare time, with min, max and a verdict ("inconclusive: spread X%"
when the pairs disagree). Evaluation and periodic checkpoints are off; the final checkpoint write,
which comes after the last pair, is timed on its own.

    PYTHONPATH=. python bench/trainer.py [--config configs/tiny.yaml] [--steps 5] [--pairs 5] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Callable

import torch

from bench._common import Alternation, Comparison, RATIO_NOTE, add_pair_arguments, print_table, setup, write_json
from nexus.config import load_config
from nexus.training.losses import multi_token_prediction_loss
from nexus.training.run import build_trainer
from nexus.training.trainer import TrainerCallback

TRAINER, BARE = "Trainer", "bare loop"


class BareLoop:
    """The loop a user would write by hand over a model, optimizer, schedule and loader of windows
    ``[batch, seq_len + n_pred_tokens]`` (int64 token ids); ``loop(steps)`` returns seconds per step."""

    def __init__(self, model, optimizer, scheduler, loader, *, seq_len: int, max_norm: float | None,
                 device: torch.device):
        self.model, self.optimizer, self.scheduler, self.loader = model, optimizer, scheduler, loader
        self.seq_len, self.device = seq_len, device
        self.max_norm = max_norm if max_norm is not None else float("inf")
        self._it = iter(loader)  # kept across chunks, as a user's epoch loop would be

    def _window(self) -> torch.Tensor:
        try:
            return next(self._it)
        except StopIteration:
            self._it = iter(self.loader)
            return next(self._it)

    def __call__(self, steps: int) -> float:
        self.model.train()
        start = time.perf_counter()
        for _ in range(steps):
            window = self._window().to(self.device)
            out = self.model(window[:, : self.seq_len])
            loss, _, _ = multi_token_prediction_loss(out.logits, out.mtp_logits, window)
            if getattr(out, "aux_loss", None) is not None:
                loss = loss + out.aux_loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scheduler is not None:
                self.scheduler.step()
            loss.item()  # the user reads the loss too
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - start) / steps


class AlternateWithBareLoop(TrainerCallback):
    """At each log (every ``steps`` Trainer steps): record the Trainer chunk's seconds per step, then run
    and record ``run_bare(steps)`` (seconds per step). The first log is the warm-up pair, not recorded.

    ``clock`` gives seconds (``time.perf_counter``; a fake in tests). ``tail_s`` after the run: seconds
    from the last pair to ``on_train_end`` (the final checkpoint write).
    """

    def __init__(self, run_bare: Callable[[int], float], *, steps: int, pairs: int,
                 clock: Callable[[], float] = time.perf_counter):
        if steps < 1:
            raise ValueError(f"steps per chunk must be at least 1, got {steps}")
        self.run_bare, self.steps, self.clock = run_bare, steps, clock
        self.alternation = Alternation([TRAINER, BARE], pairs)
        self.warmed_up = False
        self.tail_s: float | None = None
        self._chunk_start: float | None = None

    def on_log(self, trainer, metrics: dict) -> None:
        now = self.clock()
        if not self.warmed_up:
            self.run_bare(self.steps)  # warm-up pair: first calls, allocator, data workers
            self.warmed_up = True
        elif not self.alternation.done:
            if trainer.step % self.steps != 0:
                raise RuntimeError(f"log at step {trainer.step} is not on a chunk boundary of {self.steps} steps")
            self.alternation.record(TRAINER, (now - self._chunk_start) / self.steps)
            self.alternation.record(BARE, self.run_bare(self.steps))
        self._chunk_start = self.clock()

    def on_train_end(self, trainer) -> None:
        if self._chunk_start is not None:
            self.tail_s = self.clock() - self._chunk_start

    def comparison(self, max_spread: float) -> Comparison:
        if not self.alternation.done:
            raise RuntimeError(f"the run stopped after {self.alternation.rounds_done} of {self.alternation.pairs} "
                               "pairs (early stop or non-finite loss?)")
        times = self.alternation.times
        return Comparison(BARE, TRAINER, times[BARE], times[TRAINER], max_spread=max_spread)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.yaml")
    parser.add_argument("--steps", type=int, default=5, help="steps per chunk: each pair runs this many of each")
    add_pair_arguments(parser)
    ns = parser.parse_args()
    if ns.steps < 1:
        parser.error(f"--steps must be at least 1, got {ns.steps}")

    cfg = load_config(ns.config)
    t = cfg.training
    t.output_dir = tempfile.mkdtemp(prefix="nexus-bench-")
    t.checkpoint_dir = None
    t.eval_interval = t.save_interval = 10**9  # time the step loop, not evaluation or checkpoint writes
    t.log_interval = ns.steps  # a log, hence a callback, at each chunk boundary
    t.early_stopping_patience = None
    t.warmup_steps = min(t.warmup_steps, ns.steps)
    total = (ns.pairs + 1) * ns.steps
    trainer = build_trainer(cfg, max_steps=total)
    trainer.val_loader = None  # the end-of-run evaluation is not part of the step loop
    bare = build_trainer(cfg, max_steps=total)  # same seed: same initial weights and data order
    env = setup(trainer.device, measure_bandwidth=False, no_gpu_note=None, threads=ns.threads)
    print(RATIO_NOTE.format(baseline=BARE, pairs=ns.pairs, spread=ns.max_spread))
    bare_loop = BareLoop(bare.model, bare.optimizer, bare.lr_scheduler, bare.train_loader,
                         seq_len=t.seq_len, max_norm=t.max_grad_norm, device=env.device)
    alternate = AlternateWithBareLoop(bare_loop, steps=ns.steps, pairs=ns.pairs)
    trainer.callbacks.append(alternate)
    trainer.train(max_steps=total)
    c = alternate.comparison(ns.max_spread)

    tokens = t.tokens_per_step
    bare_s, trainer_s = statistics.median(c.baseline_s), statistics.median(c.arm_s)
    rows = [
        {"impl": BARE, "ms/step": bare_s * 1e3, "tokens/s": tokens / bare_s,
         "ratio": 1.0, "min": "", "max": "", "verdict": "baseline"},
        {"impl": TRAINER, "ms/step": trainer_s * 1e3, "tokens/s": tokens / trainer_s,
         "ratio": c.ratio_median, "min": c.ratio_min, "max": c.ratio_max, "verdict": c.verdict},
    ]
    print(f"config {ns.config}: {tokens} tokens/step, {ns.pairs} pairs of {ns.steps} steps each on {env.device}")
    print_table(rows)
    print(f"Trainer overhead: median {c.ratio_median - 1:+.1%} [min {c.ratio_min - 1:+.1%}, "
          f"max {c.ratio_max - 1:+.1%}] over {c.pairs} pairs, spread {c.spread:.0%}: {c.verdict}")
    print(f"final checkpoint write: {alternate.tail_s:.3f} s (once per run, not per step)")
    if env.device.type != "cuda":
        print("CPU run: GPU tokens/s and MFU need a GPU (configs/small.yaml with peak_flops set).")
        if not c.conclusive and env.info["torch_threads"] > 1:
            print(f"{env.info['torch_threads']} CPU threads on a loaded machine wait for each other: "
                  "--threads 1 gives steadier pairs")
    write_json("trainer", rows, info=env.info, comparisons=[{"group": ns.config, **c.to_json()}],
               config={"config": ns.config, "steps_per_chunk": ns.steps, "pairs": ns.pairs,
                       "max_spread": ns.max_spread, "overhead_median": c.ratio_median - 1,
                       "overhead_min": c.ratio_min - 1, "overhead_max": c.ratio_max - 1,
                       "final_checkpoint_s": alternate.tail_s})


if __name__ == "__main__":
    main()
