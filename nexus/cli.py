"""Command line: ``nexus train``, ``nexus prepare``, ``nexus bench``, ``nexus hpo``."""
from __future__ import annotations

import argparse
import runpy
import signal
import sys
from pathlib import Path


def _train(ns: argparse.Namespace) -> int:
    from nexus.config import load_config

    cfg = load_config(ns.config)  # a bad file is named before the training stack is imported
    from nexus.training.run import build_trainer

    if ns.use_wandb:
        cfg.training.use_wandb = True
    trainer = build_trainer(cfg, device=ns.device, max_steps=ns.max_steps, source=ns.config)
    trainer.resume_command = f"nexus train --config {ns.config}"
    say = print if trainer.is_main else (lambda *a, **k: None)  # rank 0 alone speaks
    n_total = trainer.unwrapped_model.num_parameters()
    n_active = trainer.unwrapped_model.num_parameters(active=True)
    ranks = f"; {trainer.parallel.world_size} ranks {trainer.parallel.sizes}" if trainer.parallel.distributed else ""
    say(f"model: {n_total / 1e6:.2f}M parameters, {n_active / 1e6:.2f}M active per token; device {trainer.device}{ranks}")
    result = trainer.train(resume_from=ns.resume)
    if result.stop_reason == "signal":  # the trainer has said where to resume from
        for sig in (signal.SIGINT, signal.SIGTERM):  # the work is saved: a late second Ctrl-C changes nothing
            signal.signal(sig, signal.SIG_IGN)
        code = 128 + result.signal  # what a shell reports for a process the signal killed: 143, 130
    else:
        if result.stop_reason != "finished":
            say(f"stopped at step {result.step} ({result.stop_reason}); {result.tokens_seen:,} tokens; "
                f"last checkpoint {result.last_checkpoint}")
        code = 3 if result.stop_reason == "nonfinite_loss" else 0
    if trainer.parallel.distributed:
        _leave_process_group(code)
    return code


def _leave_process_group(code: int) -> None:
    """Leave together (a rank that tears Gloo down early aborts its peers) and exit at once: torch's
    static destructors at interpreter shutdown can find Gloo threads still joinable and abort the
    process ("terminate called without an active exception", 2 runs in 5 under mpirun here)."""
    import os

    import torch.distributed as dist

    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _prepare(ns: argparse.Namespace) -> int:
    from nexus.config import load_config
    from nexus.training.run import prepare_run_data

    prepare_run_data(load_config(ns.config))
    return 0


def _hpo(ns: argparse.Namespace) -> int:
    from nexus.training.hpo import search_run_file

    result = search_run_file(ns.config, n_trials=ns.n_trials, n_workers=ns.n_workers)
    print(f"best value {result.best_value:.6g} after {result.n_trials} trials "
          f"({result.n_pruned} pruned): {result.best_params}")
    print(f"study, best_params.json and plots in {result.output_dir}")
    return 0


def _bench(ns: argparse.Namespace) -> int:
    bench_dir = Path(ns.bench_dir)
    scripts = sorted(p for p in bench_dir.glob("*.py") if not p.name.startswith("_"))
    if ns.names:
        scripts = [p for p in scripts if p.stem in ns.names]
        missing = set(ns.names) - {p.stem for p in scripts}
        if missing:
            raise SystemExit(f"no benchmark named {sorted(missing)} in {bench_dir}")
    if not scripts:
        raise SystemExit(f"no benchmarks found in {bench_dir} (run from the repository root)")
    sys.path.insert(0, str(bench_dir.parent.resolve()))
    argv = sys.argv
    try:
        for script in scripts:
            print(f"== {script.stem} ==", flush=True)
            sys.argv = [str(script)]  # each script parses its own (default) arguments
            runpy.run_path(str(script), run_name="__main__")
    finally:
        sys.argv = argv
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nexus", description="Train transformers with Nexus.")
    sub = parser.add_subparsers(dest="command", required=True)

    train = sub.add_parser("train", help="train the model of a config file")
    train.add_argument("--config", required=True, help="YAML run file, e.g. configs/tiny.yaml")
    train.add_argument("--resume", default=None, help="checkpoint file (or directory: the newest in it)")
    train.add_argument("--device", choices=["cpu", "cuda"], default=None)
    train.add_argument("--max-steps", "--max_steps", dest="max_steps", type=int, default=None)
    train.add_argument("--use-wandb", "--use_wandb", dest="use_wandb", action="store_true")
    train.set_defaults(run=_train)

    prepare = sub.add_parser("prepare", help="build the corpus, train the tokenizer, write token files")
    prepare.add_argument("--config", required=True)
    prepare.set_defaults(run=_prepare)

    hpo = sub.add_parser("hpo", help="hyperparameter search over the hpo: section of a config file")
    hpo.add_argument("--config", required=True, help="YAML run file with an hpo: section, e.g. configs/hpo_tiny.yaml")
    hpo.add_argument("--n-trials", "--n_trials", dest="n_trials", type=int, default=None)
    hpo.add_argument("--n-workers", "--n_workers", dest="n_workers", type=int, default=None)
    hpo.set_defaults(run=_hpo)

    bench = sub.add_parser("bench", help="run the benchmarks in bench/")
    bench.add_argument("names", nargs="*", help="benchmark names (file stems); all when empty")
    bench.add_argument("--bench-dir", default="bench")
    bench.set_defaults(run=_bench)

    ns = parser.parse_args(argv)
    from nexus.config import ConfigError
    from nexus.training.checkpoint import CheckpointError

    try:
        return ns.run(ns)
    except (ConfigError, CheckpointError, ValueError, OSError, ImportError) as exc:  # ImportError: a missing extra
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        print("interrupted: stopped at once, nothing saved since the last checkpoint", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
