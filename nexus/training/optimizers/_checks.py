"""Argument checks and ``step()`` preliminaries shared by the optimizers in this package.

Two message styles, each with one source here:
- constructor arguments (Lion, Prodigy, ScheduleFreeAdamW, Sophia):
  ``"<Owner>: invalid <name>=<value>, expected <rule>"``;
- param-group entries, checked again for every added group (Muon, SOAP):
  ``"<where>: <name> must be <rule>, got <value>"``.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor


def check_lr(owner: str, lr: float) -> None:
    if not lr >= 0.0:
        raise ValueError(f"{owner}: invalid lr={lr!r}, expected lr >= 0")


def check_beta_count(owner: str, betas) -> None:
    if len(betas) != 2:
        raise ValueError(f"{owner}: invalid betas={betas!r}, expected two values")


def check_betas(owner: str, betas) -> None:
    """Two betas, each in [0, 1)."""
    check_beta_count(owner, betas)
    for i, beta in enumerate(betas):
        if not 0.0 <= beta < 1.0:
            raise ValueError(f"{owner}: invalid betas[{i}]={beta!r}, expected 0 <= beta < 1")


def check_non_negative(owner: str, name: str, value: float) -> None:
    if not value >= 0.0:
        raise ValueError(f"{owner}: invalid {name}={value!r}, expected >= 0")


def check_int(owner: str, name: str, value, minimum: int) -> None:
    """An int (bool refused) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{owner}: invalid {name}={value!r}, expected an int >= {minimum}")


def check_group_lr(where: str, lr) -> None:
    if not (isinstance(lr, (int, float)) and lr >= 0.0):
        raise ValueError(f"{where}: lr must be a number >= 0, got {lr!r}")


def check_group_betas(where: str, betas) -> None:
    pair = tuple(betas)
    if len(pair) != 2 or not all(0.0 <= b < 1.0 for b in pair):
        raise ValueError(f"{where}: betas must be two numbers in [0, 1), got {betas!r}")


def check_group_non_negative(where: str, name: str, value: float) -> None:
    if not value >= 0.0:
        raise ValueError(f"{where}: {name} must be >= 0, got {value!r}")


def check_group_int(where: str, name: str, value, minimum: int) -> None:
    """An int (bool refused) >= ``minimum`` (1: "a positive int")."""
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        rule = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise ValueError(f"{where}: {name} must be {rule}, got {value!r}")


def closure_loss(closure: Callable[[], float] | None) -> float | None:
    """``closure()`` with autograd on (``step()`` runs under ``no_grad``), or None without one."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


def reject_sparse(owner: str, grad: Tensor, hint: str | None = None) -> None:
    if grad.is_sparse:
        suffix = f" ({hint})" if hint else ""
        raise RuntimeError(f"{owner} does not support sparse gradients{suffix}")


def reject_low_precision_params(owner: str, param_groups: list[dict]) -> None:
    """Refuse 16-bit parameters for optimizers whose statistics live in the parameter's dtype.

    Their small EMA updates (``v * 0.999``) and ~1e-6 first steps round away in bf16/fp16, so the
    optimizer would silently stop adapting; fp32 master weights under autocast avoid it.
    """
    for group in param_groups:
        for p in group["params"]:
            if p.dtype in (torch.bfloat16, torch.float16):
                raise ValueError(
                    f"{owner}: parameter of shape {tuple(p.shape)} is {p.dtype}; {owner} keeps its statistics in "
                    "the parameter dtype, where they round away: keep fp32 parameters (train under autocast)")
