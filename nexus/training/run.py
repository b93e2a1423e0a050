"""Assemble a training run (data, model, optimizer, schedule, trainer) from a ``RunConfig``."""
from __future__ import annotations

import dataclasses

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


def build_dataloaders(cfg: RunConfig) -> tuple[DataLoader, DataLoader]:
    """Prepare (idempotently) the token files and wrap them in resumable loaders."""
    from nexus.data import DolmaMemoryMappedDataset
    from nexus.data.sampler import ResumableShuffleSampler

    d, t = cfg.data, cfg.training
    prepared = prepare_run_data(cfg)
    n_pred = cfg.model.n_pred_tokens
    train = DolmaMemoryMappedDataset(prepared.train_tokens_path, t.seq_len, n_pred_tokens=n_pred)
    val = DolmaMemoryMappedDataset(prepared.val_tokens_path, t.seq_len, n_pred_tokens=n_pred)
    sampler = ResumableShuffleSampler(len(train), seed=t.seed)
    # A private generator keeps DataLoader's per-iterator seed draw off the global RNG stream.
    train_loader = DataLoader(train, batch_size=t.batch_size, sampler=sampler, num_workers=d.num_workers,
                              generator=torch.Generator().manual_seed(t.seed))
    val_loader = DataLoader(val, batch_size=t.batch_size, shuffle=False)
    return train_loader, val_loader


def build_trainer(cfg: RunConfig, *, device: str | None = None, max_steps: int | None = None) -> Trainer:
    """Everything ``nexus train`` runs, from a loaded config."""
    from nexus.models.moe import MoETransformer

    args = cfg.training
    overrides = {k: v for k, v in {"device": device, "max_steps": max_steps}.items() if v is not None}
    if overrides:
        args = dataclasses.replace(args, **overrides)
    torch.manual_seed(args.seed)
    train_loader, val_loader = build_dataloaders(cfg)
    model = MoETransformer(cfg.model)  # the Trainer swaps in fp8/mxfp8/fp4 layers per args.precision
    if cfg.qat is not None:
        from nexus.training.qat import prepare_qat

        model = prepare_qat(model, cfg.qat)
    steps = args.resolve_max_steps()
    if steps is None:
        raise ValueError("training.max_steps or training.total_tokens must be set")
    optimizer = build_optimizer(model, cfg.optimizer, args.max_lr, warmup_steps=args.warmup_steps)
    # schedule-free replaces the LR schedule (its iterate averaging is the decay)
    scheduler = None if cfg.optimizer.type == "schedule_free" else build_scheduler(optimizer, args, steps)
    return Trainer(model=model, optimizer=optimizer, lr_scheduler=scheduler, train_loader=train_loader,
                   val_loader=val_loader, config=cfg, args=args)
