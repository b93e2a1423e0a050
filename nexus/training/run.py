"""Assemble a training run (data, model, optimizer, schedule, trainer) from a ``RunConfig``."""
from __future__ import annotations

import contextlib
import dataclasses
import io
from typing import Any

import torch
from torch.utils.data import DataLoader

from nexus.config import OptimizerConfig, RunConfig
from nexus.training.trainer import Trainer, TrainingArguments


def _decay_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices only: norms, biases and embeddings are left undecayed."""
    decay, no_decay = [], []
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, torch.nn.Embedding)}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.ndim >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig, lr: float, *,
                    warmup_steps: int = 0) -> torch.optim.Optimizer:
    """The optimizer named by ``cfg.type`` with ``cfg.lr`` or, if unset, ``lr``.

    ``warmup_steps`` is used by ``schedule_free`` only, which warms up inside the optimizer.
    """
    from nexus.training import optimizers as opt

    if cfg.lr is not None:
        lr = cfg.lr
    elif cfg.type == "prodigy":
        lr = 1.0  # Prodigy's lr multiplies the step size it estimates; 1.0 is the paper's setting
    if cfg.type == "muon":
        return opt.get_muon_optimizer(model, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                      adamw_betas=cfg.betas)
    groups = _decay_groups(model, cfg.weight_decay)
    if cfg.type == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps)
    if cfg.type == "soap":
        return opt.SOAP(groups, lr=lr, betas=cfg.betas, eps=cfg.eps,
                        precondition_frequency=cfg.precondition_frequency, max_precond_dim=cfg.max_precond_dim)
    if cfg.type == "lion":
        return opt.Lion(groups, lr=lr, betas=cfg.betas)
    if cfg.type == "sophia":
        return opt.Sophia(groups, lr=lr, betas=cfg.betas, rho=cfg.rho, update_period=cfg.hessian_update_period)
    if cfg.type == "prodigy":
        return opt.Prodigy(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, d0=cfg.d0)
    if cfg.type == "schedule_free":
        return opt.ScheduleFreeAdamW(groups, lr=lr, betas=cfg.betas, eps=cfg.eps, warmup_steps=warmup_steps)
    raise ValueError(f"unknown optimizer type {cfg.type!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, args: TrainingArguments, max_steps: int):
    """The schedule named by ``args.lr_schedule`` over ``max_steps``, with ``args.warmup_steps`` of warmup.

    Each param group peaks at its own lr (set by ``build_optimizer``) and decays to the same fraction
    ``min_lr / max_lr`` of it, so optimizers whose groups differ (Muon's AdamW groups) keep their ratio.
    """
    from nexus.training.schedulers import build_scheduler as build

    peaks = [group["lr"] for group in optimizer.param_groups]
    floors = [peak * args.min_lr / args.max_lr for peak in peaks]
    if args.lr_schedule == "cosine":
        return build(optimizer, "cosine", warmup_steps=args.warmup_steps, max_steps=max_steps,
                     max_lr=peaks, min_lr=floors)
    if args.lr_schedule == "wsd":
        decay = args.decay_steps or max(max_steps // 5, 1)
        return build(optimizer, "wsd", warmup_steps=args.warmup_steps,
                     stable_steps=max(max_steps - args.warmup_steps - decay, 0), decay_steps=decay,
                     peak_lr=peaks, min_lr=floors, decay=args.wsd_decay)
    if args.lr_schedule == "constant":
        return build(optimizer, "constant", warmup_steps=args.warmup_steps)
    return build(optimizer, "sgdr", T_0=args.restart_steps, T_mult=args.restart_mult, eta_min=floors,
                 warmup_steps=args.warmup_steps)


def prepare_run_data(cfg: RunConfig):
    """``prepare_data`` with the run's data section (idempotent): what ``nexus prepare`` runs."""
    from nexus.data import prepare_data

    d = cfg.data
    return prepare_data(
        data_dir=d.data_dir, vocab_size=d.vocab_size, max_corpus_bytes=d.max_corpus_bytes,
        tokenizer_path=d.tokenizer_path, train_files=d.train_files, val_files=d.val_files, seed=cfg.training.seed,
    )


def build_dataloaders(cfg: RunConfig, parallel=None) -> tuple[DataLoader, DataLoader]:
    """Prepare (idempotently) the token files and wrap them in resumable loaders.

    ``training.batch_size`` is the global batch of one micro-step: each of the ``parallel.dp_size``
    data-parallel ranks loads its own ``batch_size / dp_size`` windows of it, so a run sees the same
    windows per step at any world size. Rank 0 prepares the data while the others wait.
    """
    from nexus.data import DolmaMemoryMappedDataset
    from nexus.data.sampler import ResumableShuffleSampler, ShardedSequentialSampler

    d, t = cfg.data, cfg.training
    rank, size = (parallel.dp_rank, parallel.dp_size) if parallel is not None else (0, 1)
    if t.batch_size % size:
        raise ValueError(f"training.batch_size {t.batch_size} is not divisible by the {size} data-parallel ranks")
    local = t.batch_size // size
    if parallel is not None and parallel.distributed and not parallel.is_main:
        torch.distributed.barrier()  # rank 0 prepares first; the others then find the files up to date
        with contextlib.redirect_stdout(io.StringIO()):  # and rank 0 alone reports
            prepared = prepare_run_data(cfg)
    else:
        prepared = prepare_run_data(cfg)
        if parallel is not None and parallel.distributed:
            torch.distributed.barrier()
    n_pred = cfg.model.n_pred_tokens
    train = DolmaMemoryMappedDataset(prepared.train_tokens_path, t.seq_len, n_pred_tokens=n_pred)
    val = DolmaMemoryMappedDataset(prepared.val_tokens_path, t.seq_len, n_pred_tokens=n_pred)
    sampler = ResumableShuffleSampler(len(train), seed=t.seed, rank=rank, world_size=size, batch_size=local)
    # A private generator keeps DataLoader's per-iterator seed draw off the global RNG stream.
    train_loader = DataLoader(train, batch_size=local, sampler=sampler, num_workers=d.num_workers,
                              generator=torch.Generator().manual_seed(t.seed))
    val_sampler = ShardedSequentialSampler(len(val), rank=rank, world_size=size, batch_size=local)
    if len(val_sampler) == 0:
        raise ValueError(f"the validation split {prepared.val_tokens_path} has {len(val)} windows, fewer than one "
                         f"global batch of {t.batch_size}")
    val_loader = DataLoader(val, batch_size=local, sampler=val_sampler)
    return train_loader, val_loader


def _fit_warmup(args: TrainingArguments, max_steps: int | None, source: str) -> TrainingArguments:
    """A ``max_steps`` override shorter than the warmup keeps the warmup's fraction of the run, and says so."""
    if max_steps is None:
        return args
    configured = args.resolve_max_steps()
    shortened = args.warmup_steps
    if args.warmup_steps > max_steps:
        fraction = args.warmup_steps / configured if configured else 0.1
        shortened = min(max(int(fraction * max_steps), 1 if args.warmup_steps else 0), max_steps)
        print(f"max_steps {max_steps} is shorter than training.warmup_steps {args.warmup_steps} in {source}: "
              f"warmup shortened to {shortened} steps", flush=True)
    return dataclasses.replace(args, max_steps=max_steps, warmup_steps=shortened)


def device_memory(device: torch.device) -> int:
    """Bytes of memory on ``device``: the GPU's, or the machine's physical memory for the CPU."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _check_memory(cfg: RunConfig, device: torch.device) -> None:
    """Count the model's parameters on the meta device (no memory) and refuse a run that cannot fit."""
    from nexus.models.moe import MoETransformer

    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        n = MoETransformer(cfg.model).num_parameters()
    needed = n * 16  # fp32 weights and gradients plus two optimizer moments per parameter
    available = device_memory(device)
    if needed > available:
        raise ValueError(f"the model has {n / 1e9:.2f}B parameters and needs about {needed / 2**30:.0f} GiB for "
                         f"weights, gradients and optimizer state; {device} has {available / 2**30:.0f} GiB")


def build_trainer(cfg: RunConfig, *, device: str | None = None, max_steps: int | None = None,
                  source: str = "the run file") -> Trainer:
    """Everything ``nexus train`` runs, from a loaded config.

    What can fail cheaply is checked first, each in one line naming the cause: the device, the
    tracker extra, whether the model fits (counted on the meta device), the data files; only then
    is the model built.
    """
    from nexus.models.moe import MoETransformer
    from nexus.training.distributed.mesh import init_parallel, launch_env, single_process

    args = _fit_warmup(cfg.training, max_steps, source)
    if device is not None:
        args = dataclasses.replace(args, device=device)
    resolved = args.resolve_device()
    if args.use_wandb:
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise ValueError("use_wandb needs Weights & Biases: pip install 'nexus-train[track]'") from None
    steps = args.resolve_max_steps()
    if steps is None:
        raise ValueError("training.max_steps or training.total_tokens must be set")
    _check_memory(cfg, resolved)
    # under torchrun / mpirun (or with a `distributed:` section) join the process group and build the mesh
    if cfg.distributed is not None or launch_env().world_size > 1:
        parallel = init_parallel(cfg.distributed, device_type=resolved.type)
    else:
        parallel = single_process()
    torch.manual_seed(args.seed)  # every rank builds the same initial model
    train_loader, val_loader = build_dataloaders(dataclasses.replace(cfg, training=args), parallel)
    model = MoETransformer(cfg.model)
    if cfg.qat is not None:
        from nexus.training.qat import prepare_qat

        model = prepare_qat(model, cfg.qat)
    pipeline, checkpointing, offloader = None, None, None
    if cfg.memory is not None:  # activation checkpointing goes in parallelize's order; offloading per micro-batch
        from nexus.training.gradient_methods import build_offloader

        offloader = build_offloader(cfg.memory)
        if cfg.memory.checkpointing != "none":
            checkpointing = cfg.memory.checkpoint_config()
    pipeline, model = place_model(model, parallel, args, resolved, checkpointing=checkpointing)
    optimizer = build_optimizer(model, cfg.optimizer, args.max_lr, warmup_steps=args.warmup_steps)
    if parallel.distributed:  # ZeRO-1 and ZeRO++ partition the optimizer's state themselves
        from nexus.training.distributed.zero import shard_optimizer

        recomputed = checkpointing is not None or parallel.config.activation_checkpointing
        optimizer = shard_optimizer(optimizer, parallel, module=None if recomputed else model)
    # schedule-free replaces the LR schedule (its iterate averaging is the decay)
    scheduler = None if cfg.optimizer.type == "schedule_free" else build_scheduler(optimizer, args, steps)
    return Trainer(model=model, optimizer=optimizer, lr_scheduler=scheduler, train_loader=train_loader,
                   val_loader=val_loader, config=cfg, args=args, parallel=parallel, pipeline=pipeline,
                   offloader=offloader)


def place_model(model: torch.nn.Module, parallel, args: TrainingArguments, device: torch.device, *,
                checkpointing=None) -> tuple[Any, torch.nn.Module]:
    """``(pipeline or None, model)``: the model transforms of a run on ``parallel`` (a ``ParallelContext``), in
    parallelize's order: low-precision layers, then tensor / pipeline / data parallel (``parallelize``), with
    activation checkpointing (``checkpointing``) in its place. One process: checkpointing only (the Trainer
    swaps low-precision layers). ``nexus train`` and the Trainer's ``with_*`` builders both come here."""
    if parallel.distributed:  # layers are swapped before they are sharded; one process: the Trainer swaps them
        from nexus.training.distributed.parallelize import parallelize, parallelize_pipeline
        from nexus.training.mixed_precision import apply_precision

        model = apply_precision(model.to(device), args.precision)
        if args.precision in ("fp8", "mxfp8", "fp4"):  # scales agree across the ranks that hold the same layers
            from nexus.training.mixed_precision.fp8 import set_amax_reduction

            group, replicas = parallel.dp_group, parallel.dp_size
            if parallel.sizes["cp"] > 1:  # cp ranks hold the same layers and see other tokens of each window
                from nexus.training.distributed.context_parallelism import context_parallel_mesh

                mesh = context_parallel_mesh(parallel)
                group, replicas = mesh.get_group(), mesh.size()
            set_amax_reduction(model, group, enabled=replicas > 1)
        if parallel.sizes["pp"] > 1:
            return parallelize_pipeline(model, parallel, _pipeline_loss(args), checkpointing=checkpointing)
        return None, parallelize(model, parallel, checkpointing=checkpointing)
    if checkpointing is not None:
        from nexus.training.gradient_methods import apply_selective_checkpointing

        model = apply_selective_checkpointing(model, checkpointing)
    return None, model


def _pipeline_loss(args: TrainingArguments):
    """The Trainer's loss per pipeline microbatch, divided by the accumulation steps (the runner backpropagates it)."""
    from nexus.training.distributed.pipeline_parallel import mtp_loss_fn

    loss_fn = mtp_loss_fn(args.mtp_loss_weight)

    def scaled(out, window):
        loss, parts = loss_fn(out, window)
        return loss / args.gradient_accumulation_steps, parts

    return scaled
