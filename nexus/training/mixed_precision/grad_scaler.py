"""Loss scaling for FP16 / BF16 / AMP training: ``torch.amp.GradScaler`` configured from a
:class:`MixedPrecisionConfig`, plus static loss scaling and a count of skipped steps."""
from __future__ import annotations

import torch

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

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        """Unscale (if not yet done) and step ``optimizer`` unless a gradient overflowed."""
        result = super().step(optimizer, *args, **kwargs)
        if self.is_enabled():
            found = self._found_inf_per_device(optimizer)
            if sum(v.item() for v in found.values()):
                self.skipped_steps += 1
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
