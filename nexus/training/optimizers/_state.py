"""Optimizer state loading shared by the optimizers that keep fp32 state for 16-bit parameters."""
from __future__ import annotations

import torch


def load_state_keeping_dtypes(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict`` but each saved state tensor keeps its dtype.

    torch casts state to the parameter's dtype, which would drop fp32 moments of bf16 parameters
    to bf16 on resume. Call from the optimizer's own ``load_state_dict`` override.
    """
    torch.optim.Optimizer.load_state_dict(optimizer, state_dict)
    # state is keyed by the entries of the saved groups' "params": indices, or names under DCP's set_state_dict
    saved_keys = [key for group in state_dict["param_groups"] for key in group["params"]]
    params = dict(zip(saved_keys, (p for group in optimizer.param_groups for p in group["params"])))
    for key, saved in state_dict["state"].items():
        p = params[key]
        for key, value in saved.items():
            if torch.is_tensor(value) and key != "step":
                optimizer.state[p][key] = value.to(device=p.device, copy=True)
