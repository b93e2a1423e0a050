"""Learning-rate schedules: closed-form functions of the step, then ``LRScheduler`` classes.

- :class:`CosineScheduleWithWarmup`: linear 0 -> max_lr, cosine to min_lr at max_steps, then min_lr.
- :class:`WSDScheduler`: warmup, stable, decay (linear, cosine or 1-sqrt), then min_lr; the decay
  can also start on demand (:meth:`WSDScheduler.start_decay`) when the run length is unknown
  (Hu et al. 2024, MiniCPM; Hägele et al. 2024 for 1-sqrt).
- :class:`CosineAnnealingWarmRestarts`: SGDR (Loshchilov & Hutter 2017) with an optional warmup.
- :class:`ConstantScheduleWithWarmup`: linear warmup to each group's lr, then constant.
- :func:`build_scheduler`: one of the above by name, for configs.

Every class sets each group's ``lr`` from ``last_epoch`` alone (no chaining), so it works with
any optimizer and resumes exactly from its ``state_dict``. Step ``t`` is the number of
``scheduler.step()`` calls so far: the lr used by the (t+1)-th ``optimizer.step()``.
"""
from __future__ import annotations

import inspect
import math
from typing import Any, Sequence

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

__all__ = ["cosine_with_warmup_lr", "wsd_lr", "sgdr_lr", "constant_with_warmup_lr",
           "CosineScheduleWithWarmup", "WSDScheduler", "CosineAnnealingWarmRestarts",
           "ConstantScheduleWithWarmup", "build_scheduler", "SCHEDULERS"]

WSD_DECAYS = ("linear", "cosine", "1-sqrt")


def cosine_with_warmup_lr(step: int, warmup_steps: int, max_steps: int, max_lr: float,
                          min_lr: float) -> float:
    """lr at ``step``: ``max_lr * step / warmup_steps`` while warming up, then a half cosine
    from ``max_lr`` to ``min_lr`` reached at ``max_steps``, then ``min_lr``.

    Example::
        cosine_with_warmup_lr(1000, 2000, 100000, 1e-3, 1e-4)   # 5e-4, half-way up the warmup
        cosine_with_warmup_lr(51000, 2000, 100000, 1e-3, 1e-4)  # 5.5e-4, half-way down the cosine
    """
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step >= max_steps:
        return min_lr
    progress = (step - warmup_steps) / (max_steps - warmup_steps)
    return min_lr + 0.5 * (max_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def wsd_lr(step: int, warmup_steps: int, decay_start: int | None, decay_steps: int, peak_lr: float,
           min_lr: float, decay: str) -> float:
    """lr at ``step`` of warmup-stable-decay; ``decay_start=None`` means stable for ever.

    The decay runs from ``peak_lr`` at ``decay_start`` to ``min_lr`` at ``decay_start +
    decay_steps`` with progress p in [0, 1]: linear ``1 - p``, cosine ``(1 + cos(pi p)) / 2`` or
    ``1 - sqrt(p)``, scaled into [min_lr, peak_lr].

    Example::
        wsd_lr(50, 10, 100, 20, 1e-3, 0.0, "linear")   # 1e-3 (stable)
        wsd_lr(105, 10, 100, 20, 1e-3, 0.0, "1-sqrt")  # 5e-4 (a quarter of the decay)
    """
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    if decay_start is None or step <= decay_start:
        return peak_lr
    progress = min(1.0, (step - decay_start) / decay_steps)
    if decay == "linear":
        frac = 1.0 - progress
    elif decay == "cosine":
        frac = 0.5 * (1.0 + math.cos(math.pi * progress))
    elif decay == "1-sqrt":
        frac = 1.0 - math.sqrt(progress)
    else:
        raise ValueError(f"wsd_lr: invalid decay={decay!r}, expected one of {WSD_DECAYS}")
    return min_lr + (peak_lr - min_lr) * frac


def sgdr_lr(step: int, base_lr: float, T_0: int, T_mult: int, eta_min: float, warmup_steps: int = 0) -> float:
    """lr at ``step`` of SGDR: ``eta_min + (base_lr - eta_min) * (1 + cos(pi T_cur / T_i)) / 2``,
    with cycles of length T_0, T_0 T_mult, T_0 T_mult^2, ... after a linear warmup 0 -> base_lr.

    Example::
        sgdr_lr(5, 0.1, T_0=10, T_mult=1, eta_min=0.0)   # 0.05, half-way through the first cycle
        sgdr_lr(10, 0.1, T_0=10, T_mult=2, eta_min=0.0)  # 0.1, a restart
    """
    if step < warmup_steps:
        return base_lr * step / warmup_steps
    t_cur, t_i = step - warmup_steps, T_0
    if T_mult == 1:
        t_cur %= T_0
    else:
        while t_cur >= t_i:
            t_cur -= t_i
            t_i *= T_mult
    return eta_min + 0.5 * (base_lr - eta_min) * (1.0 + math.cos(math.pi * t_cur / t_i))


def constant_with_warmup_lr(step: int, base_lr: float, warmup_steps: int) -> float:
    """``base_lr * step / warmup_steps`` while warming up, then ``base_lr``.

    Example::
        constant_with_warmup_lr(5, 1e-3, 10)   # 5e-4
    """
    return base_lr * step / warmup_steps if step < warmup_steps else base_lr


def _check_steps(owner: str, name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: invalid {name}={value!r}, expected an int >= {minimum}")


def _per_group(owner: str, name: str, value: float | Sequence[float], optimizer: Optimizer) -> list[float]:
    # One value for every group, or one per group (like torch's OneCycleLR max_lr).
    n = len(optimizer.param_groups)
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise ValueError(f"{owner}: {name} has {len(values)} values for {n} param groups")
    for v in values:
        if not (isinstance(v, (int, float)) and v >= 0.0):
            raise ValueError(f"{owner}: invalid {name}={value!r}, expected a number >= 0 (or one per group)")
    return [float(v) for v in values]


class CosineScheduleWithWarmup(LRScheduler):
    """Linear warmup from 0 to ``max_lr``, cosine decay to ``min_lr`` at ``max_steps``, then flat.

    Args:
        optimizer: any ``torch.optim.Optimizer``; every group's ``lr`` is set each step.
        warmup_steps: int >= 0. max_steps: int >= warmup_steps (end of the cosine).
        max_lr, min_lr: floats (or one per param group), 0 <= min_lr <= max_lr.

    Example::
        scheduler = CosineScheduleWithWarmup(optimizer, warmup_steps=2000, max_steps=100000,
                                             max_lr=1e-3, min_lr=1e-4)
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, max_steps: int,
                 max_lr: float | Sequence[float], min_lr: float | Sequence[float] = 0.0,
                 last_epoch: int = -1) -> None:
        owner = type(self).__name__
        _check_steps(owner, "warmup_steps", warmup_steps, 0)
        _check_steps(owner, "max_steps", max_steps, max(warmup_steps, 1))
        self.max_lrs = _per_group(owner, "max_lr", max_lr, optimizer)
        self.min_lrs = _per_group(owner, "min_lr", min_lr, optimizer)
        if any(lo > hi for lo, hi in zip(self.min_lrs, self.max_lrs)):
            raise ValueError(f"{owner}: invalid min_lr={min_lr!r}, expected min_lr <= max_lr={max_lr!r}")
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [cosine_with_warmup_lr(self.last_epoch, self.warmup_steps, self.max_steps, hi, lo)
                for hi, lo in zip(self.max_lrs, self.min_lrs)]

    _get_closed_form_lr = get_lr


class WSDScheduler(LRScheduler):
    """Warmup-Stable-Decay: linear warmup to ``peak_lr``, flat, then a decay to ``min_lr``.

    Args:
        optimizer: any ``torch.optim.Optimizer``.
        warmup_steps: int >= 0.
        stable_steps: int >= 0, or ``None`` to stay at ``peak_lr`` until :meth:`start_decay`.
        decay_steps: int >= 1, length of the decay.
        peak_lr, min_lr: floats (or one per param group), 0 <= min_lr <= peak_lr.
        decay: ``"linear"``, ``"cosine"`` or ``"1-sqrt"``.

    Example::
        scheduler = WSDScheduler(optimizer, warmup_steps=1000, stable_steps=50000,
                                 decay_steps=10000, peak_lr=1e-3)
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int, stable_steps: int | None,
                 decay_steps: int, peak_lr: float | Sequence[float],
                 min_lr: float | Sequence[float] = 0.0, decay: str = "linear",
                 last_epoch: int = -1) -> None:
        owner = type(self).__name__
        _check_steps(owner, "warmup_steps", warmup_steps, 0)
        if stable_steps is not None:
            _check_steps(owner, "stable_steps", stable_steps, 0)
        _check_steps(owner, "decay_steps", decay_steps, 1)
        if decay not in WSD_DECAYS:
            raise ValueError(f"{owner}: invalid decay={decay!r}, expected one of {WSD_DECAYS}")
        self.peak_lrs = _per_group(owner, "peak_lr", peak_lr, optimizer)
        self.min_lrs = _per_group(owner, "min_lr", min_lr, optimizer)
        if any(lo > hi for lo, hi in zip(self.min_lrs, self.peak_lrs)):
            raise ValueError(f"{owner}: invalid min_lr={min_lr!r}, expected min_lr <= peak_lr={peak_lr!r}")
        self.warmup_steps, self.decay_steps, self.decay = warmup_steps, decay_steps, decay
        self.decay_start = None if stable_steps is None else warmup_steps + stable_steps
        super().__init__(optimizer, last_epoch)

    def start_decay(self) -> None:
        """Begin the decay now: the current lr is the last at peak, ``decay_steps`` steps to go.

        Raises ``RuntimeError`` during warmup or once the decay has begun.

        Example::
            if time_is_nearly_up: scheduler.start_decay()
        """
        if self.last_epoch < self.warmup_steps:
            raise RuntimeError(f"WSDScheduler.start_decay() at step {self.last_epoch}, during the "
                               f"{self.warmup_steps}-step warmup")
        if self.decay_start is not None and self.last_epoch >= self.decay_start:
            raise RuntimeError(f"WSDScheduler.start_decay(): the decay already began at step "
                               f"{self.decay_start}")
        self.decay_start = self.last_epoch

    def get_lr(self) -> list[float]:
        return [wsd_lr(self.last_epoch, self.warmup_steps, self.decay_start, self.decay_steps, hi, lo,
                       self.decay) for hi, lo in zip(self.peak_lrs, self.min_lrs)]

    _get_closed_form_lr = get_lr


class CosineAnnealingWarmRestarts(LRScheduler):
    """SGDR: cosine from each group's initial lr to ``eta_min`` over cycles T_0, T_0 T_mult, ...

    With ``warmup_steps=0`` this equals ``torch.optim.lr_scheduler.CosineAnnealingWarmRestarts``;
    otherwise a linear warmup from 0 comes first and the cycles start after it.

    Args:
        optimizer: any ``torch.optim.Optimizer`` (its group lrs are the cycle peaks).
        T_0: int >= 1, first cycle length. T_mult: int >= 1, cycle growth factor.
        eta_min: float >= 0 (or one per group), the floor. warmup_steps: int >= 0.

    Example::
        scheduler = CosineAnnealingWarmRestarts(optimizer, T_0=1000, T_mult=2, eta_min=1e-5,
                                                warmup_steps=100)
    """

    def __init__(self, optimizer: Optimizer, T_0: int, T_mult: int = 1, eta_min: float | Sequence[float] = 0.0,
                 warmup_steps: int = 0, last_epoch: int = -1) -> None:
        owner = type(self).__name__
        _check_steps(owner, "T_0", T_0, 1)
        _check_steps(owner, "T_mult", T_mult, 1)
        _check_steps(owner, "warmup_steps", warmup_steps, 0)
        self.eta_mins = _per_group(owner, "eta_min", eta_min, optimizer)
        self.T_0, self.T_mult, self.warmup_steps = T_0, T_mult, warmup_steps
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [sgdr_lr(self.last_epoch, base, self.T_0, self.T_mult, floor, self.warmup_steps)
                for base, floor in zip(self.base_lrs, self.eta_mins)]

    _get_closed_form_lr = get_lr


class ConstantScheduleWithWarmup(LRScheduler):
    """Linear warmup from 0 to each group's initial lr over ``warmup_steps``, then constant.

    Example::
        scheduler = ConstantScheduleWithWarmup(optimizer, warmup_steps=100)
        optimizer.step(); scheduler.step()
    """

    def __init__(self, optimizer: Optimizer, warmup_steps: int = 0, last_epoch: int = -1) -> None:
        _check_steps(type(self).__name__, "warmup_steps", warmup_steps, 0)
        self.warmup_steps = warmup_steps
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [constant_with_warmup_lr(self.last_epoch, base, self.warmup_steps) for base in self.base_lrs]

    _get_closed_form_lr = get_lr


SCHEDULERS: dict[str, type[LRScheduler]] = {
    "cosine": CosineScheduleWithWarmup,
    "wsd": WSDScheduler,
    "sgdr": CosineAnnealingWarmRestarts,
    "constant": ConstantScheduleWithWarmup,
}


def build_scheduler(optimizer: Optimizer, name: str, **kwargs: Any) -> LRScheduler:
    """The scheduler called ``name`` (``"cosine"``, ``"wsd"``, ``"sgdr"``, ``"constant"``).

    Raises ``ValueError`` naming an unknown ``name``, unknown keyword arguments, or missing
    required ones.

    Example::
        scheduler = build_scheduler(optimizer, "wsd", warmup_steps=100, stable_steps=None,
                                    decay_steps=200, peak_lr=3e-4)
    """
    if name not in SCHEDULERS:
        raise ValueError(f"build_scheduler: unknown scheduler name={name!r}, expected one of {sorted(SCHEDULERS)}")
    cls = SCHEDULERS[name]
    params = dict(inspect.signature(cls.__init__).parameters)
    params.pop("self")
    params.pop("optimizer")
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise ValueError(f"build_scheduler: unknown arguments {unknown} for {name!r} "
                         f"({cls.__name__}); accepted: {sorted(params)}")
    missing = sorted(k for k, p in params.items() if p.default is inspect.Parameter.empty and k not in kwargs)
    if missing:
        raise ValueError(f"build_scheduler: missing arguments {missing} for {name!r} ({cls.__name__})")
    return cls(optimizer, **kwargs)
