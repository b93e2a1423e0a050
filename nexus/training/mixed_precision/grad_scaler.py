"""Loss scaling for FP16 / BF16 / AMP training: ``torch.amp.GradScaler`` configured from a
:class:`MixedPrecisionConfig`, plus static loss scaling and a count of skipped steps."""
from __future__ import annotations

import torch
from torch.amp.grad_scaler import OptState

from nexus.training.mixed_precision.config import MixedPrecisionConfig

__all__ = ["GradScaler"]


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


class GradScaler(torch.amp.GradScaler):
    """``torch.amp.GradScaler`` whose settings come from a :class:`MixedPrecisionConfig`.

    Dynamic scaling (fp16 default) multiplies the scale by ``backoff_factor`` on overflow and by
    ``growth_factor`` after ``growth_interval`` clean steps; static scaling keeps ``init_scale``
    fixed; both skip the optimizer step when a gradient is inf/NaN (``skipped_steps`` counts them).
    With no loss scaling (fp32, bf16) every call passes through unchanged.
    Example: ``scaler = GradScaler(MixedPrecisionConfig(dtype="fp16"), device="cpu")``
             ``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()``
    """

    def __init__(self, config: MixedPrecisionConfig | None = None, *, device: str | None = None) -> None:
        config = config if config is not None else MixedPrecisionConfig()
        mode = config.resolved_loss_scaling
        self.config = config
        self.static = mode == "static"
        self.skipped_steps = 0
        super().__init__(
            device=device or _default_device(),
            init_scale=config.init_scale,
            growth_factor=config.growth_factor,
            backoff_factor=config.backoff_factor,
            growth_interval=config.growth_interval,
            enabled=mode != "none",
        )

    def found_inf(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """On the device, without a host read: > 0 when a gradient of ``optimizer`` is inf/NaN (unscales first)."""
        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.READY:
            self.unscale_(optimizer)
        return torch.stack([v.to(self._scale.device) for v in state["found_inf_per_device"].values()]).sum()

    def step(self, optimizer: torch.optim.Optimizer, *args, found_inf: bool | None = None, **kwargs):
        """Unscale (if not yet done) and step ``optimizer`` unless a gradient overflowed.

        ``found_inf``: whether a gradient overflowed, when the caller has already read
        :meth:`found_inf` on the host (with its other per-step values), which saves torch's own read.
        """
        if not self.is_enabled():
            return optimizer.step(*args, **kwargs)
        if getattr(optimizer, "_step_supports_amp_scaling", False) or "closure" in kwargs:
            result = super().step(optimizer, *args, **kwargs)  # torch's path for fused optimizers
            overflowed = bool(self.found_inf(optimizer)) if found_inf is None else found_inf
        else:
            overflowed = bool(self.found_inf(optimizer)) if found_inf is None else found_inf
            result = None if overflowed else optimizer.step(*args, **kwargs)
            self._per_optimizer_states[id(optimizer)]["stage"] = OptState.STEPPED
        self.skipped_steps += int(overflowed)
        return result

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        """Adjust the scale after a step; a static scaler always returns to ``init_scale``."""
        if self.static and new_scale is None:
            new_scale = float(self.config.init_scale)
        super().update(new_scale)

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.is_enabled():
            state["skipped_steps"] = self.skipped_steps
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        self.skipped_steps = int(state_dict.pop("skipped_steps", 0))
        super().load_state_dict(state_dict)
