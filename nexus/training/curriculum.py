"""Curriculum learning: easy samples first, harder ones as the model improves.

The ordering lives in the data pipeline: each curriculum owns a ``CurriculumSampler`` (``curriculum.sampler``;
``curriculum.loader(dataset, batch_size)`` builds the DataLoader) whose pool of sample ids it changes. The
progression is driven by the Trainer's metrics: a curriculum is a ``TrainerCallback`` reading ``metric``
(``val_loss`` from evaluations, or a training metric such as ``lm_loss`` from the logs). Resume keeps the
position exactly: the sampler's pools and position are in the checkpoint's data state, the curriculum's own
counters in its callback state.

- ``LengthCurriculum``: stage k draws the samples of length <= ``max_lengths[k]`` (short to long).
- ``DifficultyCurriculum``: stage k draws the samples of difficulty <= ``thresholds[k]``.
- ``SelfPacedCurriculum`` (Kumar et al. 2010; linear weights, Jiang et al. 2014): samples weighted by their
  current loss against a threshold ``lam`` that grows by ``growth`` after every re-scoring.

Example::
    curriculum = LengthCurriculum(lengths, max_lengths=[64, 128, 256], metric="val_loss", patience=2)
    trainer = Trainer(model=model, train_loader=curriculum.loader(dataset, batch_size=8), callbacks=[curriculum])
"""
from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader

from nexus.data.sampler import CurriculumSampler
from nexus.training.trainer import Trainer, TrainerCallback

__all__ = ["LengthCurriculum", "DifficultyCurriculum", "SelfPacedCurriculum"]


def _on_schedule(trainer: Trainer, interval: str) -> bool:
    """Whether this log / evaluation is a scheduled one: the extra one that ends a ``train()`` call between
    intervals is ignored, so a run resumed from any step makes the decisions the uninterrupted run made."""
    every = getattr(getattr(trainer, "args", None), interval, None)
    return every is None or trainer.step % every == 0


class _Curriculum(TrainerCallback):
    sampler: CurriculumSampler

    def loader(self, dataset: Any, batch_size: int, **kwargs: Any) -> DataLoader:
        """A DataLoader over ``dataset`` drawing through this curriculum's sampler."""
        if len(dataset) != self.sampler.n:
            raise ValueError(f"the dataset has {len(dataset)} samples, the curriculum was built for {self.sampler.n}")
        if self.sampler.world_size > 1 and batch_size != self.sampler.batch_size:
            raise ValueError(f"batch_size {batch_size} differs from the curriculum's per-rank batch_size "
                             f"{self.sampler.batch_size} (each rank takes that many of every global batch)")
        return DataLoader(dataset, batch_size=batch_size, sampler=self.sampler, **kwargs)


class _StagedCurriculum(_Curriculum):
    """Stages of growing pools ``scores <= bounds[k]``; a last stage of every sample is added when needed.

    Advancing from stage k (at most one stage per report, never before ``min_steps_per_stage`` steps in it):
    ``advance_below`` (a value, or one per stage): once ``metric <= advance_below[k]``; ``patience``: once the
    metric has not improved by more than ``min_delta`` for ``patience`` reports; ``steps_per_stage``: after that
    many steps whatever the metric. At least one must be given.
    """

    def __init__(self, scores, bounds: Sequence[float], *, metric: str, advance_below, patience, min_delta: float,
                 steps_per_stage: int | None, min_steps_per_stage: int, seed: int, rank: int, world_size: int,
                 batch_size: int, what: str):
        scores = torch.as_tensor(scores, dtype=torch.float64).reshape(-1)
        if scores.numel() == 0:
            raise ValueError(f"{what} is empty: one value per sample is needed")
        bounds = [float(b) for b in bounds]
        if not bounds or any(b2 <= b1 for b1, b2 in zip(bounds, bounds[1:])):
            raise ValueError(f"the stage bounds must be a non-empty increasing list, got {bounds}")
        if advance_below is None and patience is None and steps_per_stage is None:
            raise ValueError("give advance_below, patience or steps_per_stage: how the curriculum advances")
        if patience is not None and patience < 1:
            raise ValueError(f"patience must be positive, got {patience}")
        if steps_per_stage is not None and steps_per_stage < 1:
            raise ValueError(f"steps_per_stage must be positive, got {steps_per_stage}")
        if min_steps_per_stage < 0:
            raise ValueError(f"min_steps_per_stage must be >= 0, got {min_steps_per_stage}")
        order = torch.argsort(scores, stable=True)  # easiest first
        self.pools = [order[: int((scores <= b).sum())] for b in bounds]
        if len(self.pools[0]) == 0:
            raise ValueError(f"no sample has {what} <= {bounds[0]} (the first stage bound); the smallest is "
                             f"{float(scores.min())}")
        if len(self.pools[-1]) < len(scores):
            self.pools.append(order)
        self.bounds = bounds
        n_stages = len(self.pools)
        if isinstance(advance_below, (int, float)):
            advance_below = [float(advance_below)] * (n_stages - 1)
        if advance_below is not None and len(advance_below) < n_stages - 1:
            raise ValueError(f"advance_below needs a value per stage transition ({n_stages - 1}), got "
                             f"{len(advance_below)}")
        self.metric, self.advance_below, self.patience, self.min_delta = metric, advance_below, patience, min_delta
        self.steps_per_stage, self.min_steps_per_stage = steps_per_stage, min_steps_per_stage
        self.stage, self.stage_start_step, self.best, self.bad_reports = 0, 0, math.inf, 0
        self.sampler = CurriculumSampler(len(scores), indices=self.pools[0], seed=seed, rank=rank,
                                         world_size=world_size, batch_size=batch_size)

    @property
    def num_stages(self) -> int:
        return len(self.pools)

    def observe(self, step: int, value: float | None) -> bool:
        """Take one report of the metric (``None``: a step without a value); returns True when it advanced."""
        if self.stage == self.num_stages - 1:
            return False
        in_stage = step - self.stage_start_step
        due = self.steps_per_stage is not None and in_stage >= self.steps_per_stage
        if value is not None:
            if value < self.best - self.min_delta:
                self.best, self.bad_reports = value, 0
            else:
                self.bad_reports += 1
            due = due or (self.advance_below is not None and value <= self.advance_below[self.stage])
            due = due or (self.patience is not None and self.bad_reports >= self.patience)
        if not due or in_stage < self.min_steps_per_stage:
            return False
        self.stage += 1
        self.stage_start_step, self.best, self.bad_reports = step, math.inf, 0
        self.sampler.set_pool(self.pools[self.stage])
        return True

    def on_log(self, trainer: Trainer, metrics: dict) -> None:
        if not _on_schedule(trainer, "log_interval"):
            return
        if self.metric in metrics:
            self.observe(trainer.step, float(metrics[self.metric]))
        elif self.steps_per_stage is not None:
            self.observe(trainer.step, None)

    def on_evaluate(self, trainer: Trainer, metrics: dict) -> None:
        if self.metric in metrics and _on_schedule(trainer, "eval_interval"):  # steps alone count at the logs
            self.observe(trainer.step, float(metrics[self.metric]))

    def state_dict(self) -> dict:
        return {"stage": self.stage, "stage_start_step": self.stage_start_step, "best": self.best,
                "bad_reports": self.bad_reports}

    def load_state_dict(self, state: dict) -> None:
        if not 0 <= state["stage"] < self.num_stages:
            raise ValueError(f"the saved curriculum is at stage {state['stage']}; this one has {self.num_stages}")
        self.stage, self.stage_start_step = state["stage"], state["stage_start_step"]
        self.best, self.bad_reports = state["best"], state["bad_reports"]


class LengthCurriculum(_StagedCurriculum):
    """Short to long: stage k draws (shuffled) the samples with ``lengths <= max_lengths[k]``; a last stage of
    every sample follows if the bounds leave some out. ``max_lengths`` defaults to the ``num_stages``
    quantiles of ``lengths``. ``lengths``: one number per dataset sample (tokens, characters, ...).

    Example::
        curriculum = LengthCurriculum(lengths, max_lengths=[32, 64, 128], metric="val_loss", patience=2)
        loader = curriculum.loader(dataset, batch_size=8)
    """

    def __init__(self, lengths, max_lengths: Sequence[float] | None = None, *, num_stages: int = 4,
                 metric: str = "val_loss", advance_below=None, patience: int | None = None,
                 min_delta: float = 0.0, steps_per_stage: int | None = None, min_steps_per_stage: int = 0,
                 seed: int = 0, rank: int = 0, world_size: int = 1, batch_size: int = 1):
        lengths = torch.as_tensor(lengths, dtype=torch.float64).reshape(-1)
        if max_lengths is None:
            if num_stages < 1 or lengths.numel() == 0:
                raise ValueError(f"need num_stages >= 1 and lengths, got num_stages={num_stages}, "
                                 f"{lengths.numel()} lengths")
            q = torch.quantile(lengths, torch.arange(1, num_stages + 1, dtype=torch.float64) / num_stages)
            max_lengths = sorted(set(q.tolist()))
        super().__init__(lengths, max_lengths, metric=metric, advance_below=advance_below, patience=patience,
                         min_delta=min_delta, steps_per_stage=steps_per_stage, min_steps_per_stage=min_steps_per_stage,
                         seed=seed, rank=rank, world_size=world_size, batch_size=batch_size, what="lengths")


class DifficultyCurriculum(_StagedCurriculum):
    """Easy to hard: stage k draws (shuffled) the samples with ``difficulties <= thresholds[k]``; a last stage of
    every sample follows if the thresholds leave some out. ``difficulties``: one number per sample (a
    reference model's loss, a label's rarity, a hand score, ...).

    Example::
        curriculum = DifficultyCurriculum(scores, thresholds=[0.3, 0.6], metric="val_loss", advance_below=[3.0, 2.5])
    """

    def __init__(self, difficulties, thresholds: Sequence[float], *, metric: str = "val_loss", advance_below=None,
                 patience: int | None = None, min_delta: float = 0.0, steps_per_stage: int | None = None,
                 min_steps_per_stage: int = 0, seed: int = 0, rank: int = 0, world_size: int = 1,
                 batch_size: int = 1):
        super().__init__(difficulties, thresholds, metric=metric, advance_below=advance_below, patience=patience,
                         min_delta=min_delta, steps_per_stage=steps_per_stage, min_steps_per_stage=min_steps_per_stage,
                         seed=seed, rank=rank, world_size=world_size, batch_size=batch_size, what="difficulties")


def self_paced_weights(losses: torch.Tensor, lam: float, mode: str) -> torch.Tensor:
    """Self-paced weights: ``hard`` v = 1[loss <= lam] (Kumar et al. 2010); ``linear`` v = max(0, 1 - loss / lam)
    (Jiang et al. 2014). ``losses`` [n] -> weights [n], float64."""
    losses = losses.to(torch.float64)
    if mode == "hard":
        return (losses <= lam).to(torch.float64)
    return (1.0 - losses / lam).clamp(min=0.0)


class SelfPacedCurriculum(_Curriculum):
    """Self-paced learning: at the start and every ``update_every`` scheduled evaluations the model scores every sample;
    samples are then drawn in proportion to their self-paced weight at threshold ``lam`` (``hard`` or
    ``linear``, see ``self_paced_weights``), and ``lam`` grows by ``growth`` (the pace: more and harder samples
    each round). ``lam`` is raised for a round if needed so that at least ``min_fraction`` of the samples,
    the easiest, keep a weight of at least 1/2.

    ``sample_losses(trainer, batch)`` -> per-sample losses [B] for batches of ``score_batch_size`` (default: the
    Trainer's loss of each sample, one at a time); scoring runs without gradients, in eval mode, over ``dataset`` in order.

    Example::
        curriculum = SelfPacedCurriculum(dataset, lam=3.0, growth=1.2, mode="linear")
        trainer = Trainer(model=model, train_loader=curriculum.loader(dataset, batch_size=8), callbacks=[curriculum])
    """

    def __init__(self, dataset: Any, *, lam: float, growth: float = 1.1, mode: str = "hard",
                 min_fraction: float = 0.1, update_every: int = 1, score_batch_size: int = 32,
                 sample_losses: Callable[[Trainer, Any], torch.Tensor] | None = None,
                 seed: int = 0, rank: int = 0, world_size: int = 1, batch_size: int = 1):
        if not lam > 0:
            raise ValueError(f"lam must be positive, got {lam}")
        if not growth >= 1:
            raise ValueError(f"growth must be >= 1, got {growth}")
        if mode not in ("hard", "linear"):
            raise ValueError(f"mode must be hard or linear, got {mode!r}")
        if not 0 < min_fraction <= 1:
            raise ValueError(f"min_fraction must be in (0, 1], got {min_fraction}")
        if update_every < 1 or score_batch_size < 1:
            raise ValueError(f"update_every and score_batch_size must be positive, got {update_every}, "
                             f"{score_batch_size}")
        self.dataset = dataset
        self.lam, self.growth, self.mode, self.min_fraction = float(lam), float(growth), mode, min_fraction
        self.update_every, self.score_batch_size = update_every, score_batch_size
        self.sample_losses = sample_losses
        self.rounds = 0
        self.weights: torch.Tensor | None = None  # the newest round's weight per sample, float64 [n]
        self.sampler = CurriculumSampler(len(dataset), seed=seed, rank=rank, world_size=world_size,
                                         batch_size=batch_size)

    def update(self, losses: torch.Tensor) -> torch.Tensor:
        """One round from per-sample ``losses`` [n]: new weights and pool, then ``lam *= growth``; returns the weights."""
        losses = torch.as_tensor(losses, dtype=torch.float64).reshape(-1)
        if losses.numel() != self.sampler.n or not bool(torch.isfinite(losses).all()):
            raise ValueError(f"need {self.sampler.n} finite losses, got {losses.numel()} "
                             f"({int((~torch.isfinite(losses)).sum())} not finite)")
        keep = max(1, math.ceil(self.min_fraction * losses.numel()))
        kth = float(torch.kthvalue(losses, keep).values)
        lam = max(self.lam, kth if self.mode == "hard" else 2.0 * kth)
        weights = self_paced_weights(losses, lam, self.mode)
        if not weights.sum() > 0:  # every loss is 0 and mode is linear at lam = 0: all equally easy
            weights = torch.ones_like(weights)
        pool = torch.nonzero(weights > 0).reshape(-1)
        self.sampler.set_pool(pool, weights[pool] if self.mode == "linear" else None)
        self.weights = weights
        self.lam *= self.growth
        self.rounds += 1
        return weights

    @torch.no_grad()
    def score(self, trainer: Trainer) -> torch.Tensor:
        """The model's loss on every sample of ``dataset``, in order (float64 [n])."""
        model = trainer.model
        was_training = model.training
        model.eval()
        losses = []
        try:
            with torch.random.fork_rng(devices=[]):  # scoring must not move the training RNG streams
                if self.sample_losses is None:  # the Trainer's loss, one sample per batch
                    for batch in DataLoader(self.dataset, batch_size=1, shuffle=False):
                        losses.append(trainer.batch_loss(batch).detach().double().reshape(1).cpu())
                else:
                    for batch in DataLoader(self.dataset, batch_size=self.score_batch_size, shuffle=False):
                        losses.append(torch.as_tensor(self.sample_losses(trainer, batch)).reshape(-1).double().cpu())
        finally:
            model.train(was_training)
        return torch.cat(losses)

    def on_train_begin(self, trainer: Trainer) -> None:
        if self.rounds == 0:
            self.update(self.score(trainer))

    def on_evaluate(self, trainer: Trainer, metrics: dict) -> None:
        every = trainer.args.eval_interval * self.update_every
        if trainer.step % every == 0:  # scheduled evaluations only (see _on_schedule)
            self.update(self.score(trainer))

    def state_dict(self) -> dict:
        return {"lam": self.lam, "rounds": self.rounds, "weights": self.weights}

    def load_state_dict(self, state: dict) -> None:
        self.lam, self.rounds, self.weights = state["lam"], state["rounds"], state["weights"]
