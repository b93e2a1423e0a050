"""Training losses."""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def multi_token_prediction_loss(
    logits: torch.Tensor,
    mtp_logits: Sequence[torch.Tensor],
    tokens: torch.Tensor,
    *,
    mtp_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Next-token loss plus the extra heads' losses.

    ``logits`` [B, T, V] predict ``tokens[:, t+1]``; ``mtp_logits[k-1]`` [B, T, V] predicts
    ``tokens[:, t+1+k]``; ``tokens`` [B, T + n_pred] is the packed window (int64).
    Returns ``(total, next_token_loss, extra_head_losses)`` with
    ``total = next_token_loss + mtp_weight * mean(extra_head_losses)``.

    Example::
        total, lm, extra = multi_token_prediction_loss(out.logits, out.mtp_logits, window)
    """
    T = logits.shape[1]
    need = T + 1 + len(mtp_logits)
    if tokens.shape[1] < need:
        raise ValueError(
            f"tokens has {tokens.shape[1]} positions but {len(mtp_logits) + 1} heads over T={T} need {need}"
        )

    def ce(lg: torch.Tensor, offset: int) -> torch.Tensor:
        target = tokens[:, offset : offset + T]
        return F.cross_entropy(lg.float().reshape(-1, lg.shape[-1]), target.reshape(-1))

    lm = ce(logits, 1)
    extra = [ce(lg, 1 + k) for k, lg in enumerate(mtp_logits, start=1)]
    total = lm + mtp_weight * torch.stack(extra).mean() if extra else lm
    return total, lm, extra
