"""ZeRO stages 1, 2 and 3 (Rajbhandari et al., 2020) mapped onto torch's own machinery.

- Stage 1 (optimizer state partitioned): every rank keeps the whole model under DDP (gradients
  all-reduced); torch's ``ZeroRedundancyOptimizer`` gives each rank the optimizer state of a share of
  the parameters (whole tensors, balanced by size), steps them and broadcasts the updated values.
  Whole tensors per rank also suit Muon and SOAP, which need whole matrices.
- Stage 2 (gradients too): FSDP2 ``fully_shard`` with ``reshard_after_forward=False``: gradients are
  reduce-scattered into shards and the optimizer steps shards; a block keeps its gathered parameters
  from forward to backward (one all-gather per step).
- Stage 3 (parameters too): FSDP2 ``fully_shard`` with resharding after forward: parameters live in
  shards and are gathered per block for forward and again for backward.
- Offload (ZeRO-Offload / ZeRO-Infinity): stages 2 and 3 move the sharded fp32 parameters (FSDP2's
  master copy), their gradients and the optimizer step to the CPU with FSDP2's ``CPUOffloadPolicy``;
  ``offload_params`` is a stage 3 setting, as in DeepSpeed. Stage 1's ``offload_optimizer`` steps each
  rank's share on fp32 CPU copies (:func:`cpu_offloaded`): gradients go down, updated values come up.

Run file: ``distributed: {strategy: zero, zero_stage: 2, offload_optimizer: false}``; in Python
``apply_zero(model, optimizer, ZeROConfig(stage=3))`` under ``torchrun``, or the Trainer's ``with_zero``.

Example::
    model, optimizer = apply_zero(model, torch.optim.AdamW(model.parameters(), lr=1e-3), ZeROConfig(stage=2))
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import torch
from torch import nn

__all__ = ["ZeROConfig", "apply_zero", "cpu_offloaded", "partition_optimizer_state", "rebuild_optimizer", "shard_optimizer", "wrap_zero"]


@dataclasses.dataclass(kw_only=True)
class ZeROConfig:
    """Which ZeRO stage (1, 2 or 3) and what to move to the CPU; validated when built."""

    stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stage, bool) or self.stage not in (1, 2, 3):
            raise ValueError(f"ZeROConfig.stage must be 1, 2 or 3, got {self.stage!r}")
        for name in ("offload_optimizer", "offload_params"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ZeROConfig.{name} must be a bool, got {getattr(self, name)!r}")
        if self.offload_params and self.stage != 3:
            raise ValueError(f"ZeROConfig.offload_params needs stage 3 (parameters partitioned), got stage {self.stage}")

    @property
    def sharding_strategy(self) -> str | None:
        """The FSDP2 strategy of stages 2 and 3 (None: stage 1 runs under DDP)."""
        return {1: None, 2: "shard_grad_op", 3: "full"}[self.stage]

    @property
    def cpu_offload(self) -> bool:
        """FSDP2's CPU offload (stages 2 and 3)."""
        return self.stage > 1 and (self.offload_optimizer or self.offload_params)


def constructor_defaults(optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.defaults`` limited to what its class's constructor takes (torch's AdamW records
    ``decoupled_weight_decay`` there but does not accept it)."""
    import inspect

    params = inspect.signature(type(optimizer).__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return dict(optimizer.defaults)
    return {k: v for k, v in optimizer.defaults.items() if k in params}


def rebuild_optimizer(optimizer: torch.optim.Optimizer, old_names: dict[int, str], model: nn.Module,
                      cls: type | None = None, **extra) -> torch.optim.Optimizer:
    """A fresh ``type(optimizer)`` (or ``cls``) over ``model``'s current parameters, with the same param
    groups and hyperparameters. ``old_names`` maps ``id(param)`` of the parameters ``optimizer`` was built
    on to their names in ``model`` (wrappers such as ``fully_shard`` replace Parameter objects)."""
    if any(optimizer.state.values()):
        raise ValueError("the optimizer has already stepped; apply ZeRO before the first step")
    params = dict(model.named_parameters())
    groups = []
    for group in optimizer.param_groups:
        names = [old_names.get(id(p)) for p in group["params"]]
        missing = [n for n in names if n not in params]
        if missing:
            raise ValueError(f"the optimizer holds parameters that are not in the model ({len(missing)} of them)")
        groups.append({**{k: v for k, v in group.items() if k != "params"}, "params": [params[n] for n in names]})
    return (cls or type(optimizer))(groups, **{**constructor_defaults(optimizer), **extra})


def cpu_offloaded(cls: type) -> type:
    """A subclass of optimizer ``cls`` whose step runs on fp32 copies of its parameters in CPU memory,
    with its state there too (ZeRO-Offload for stage 1): the gradients are copied to the CPU, ``cls``
    steps the copies, and the new values are copied back into the parameters. State stays keyed by the
    parameters (what ``ZeroRedundancyOptimizer`` and checkpoints index), its tensors on the CPU. The
    copies are taken at the first step, so load weights before it."""

    class CPUOffloaded(cls):
        @torch.no_grad()
        def step(self, closure=None):
            if closure is not None:  # it would recompute the device gradients, not the copies stepped here
                raise ValueError(f"{type(self).__name__}.step: closures are not supported under CPU offload")
            if not hasattr(self, "_masters"):
                self._masters = {}
            cpu = torch.device("cpu")
            originals = [group["params"] for group in self.param_groups]
            for group in self.param_groups:
                swapped = []
                for p in group["params"]:
                    m = self._masters.get(p)
                    if m is None:
                        m = self._masters[p] = p.detach().to(cpu, torch.float32, copy=True)
                    m.grad = None if p.grad is None else p.grad.detach().to(cpu, torch.float32)
                    if p in self.state:  # state loaded onto the device (ZeroRedundancyOptimizer does) moves down
                        self.state[m] = {k: v.to(cpu) if torch.is_tensor(v) else v for k, v in self.state.pop(p).items()}
                    swapped.append(m)
                group["params"] = swapped
            try:
                loss = super().step()
            finally:
                for group, params in zip(self.param_groups, originals):
                    for p, m in zip(params, group["params"]):
                        if m in self.state:
                            self.state[p] = self.state.pop(m)
                        m.grad = None
                        p.copy_(m, non_blocking=True)
                    group["params"] = params
            return loss

    CPUOffloaded.__name__ = CPUOffloaded.__qualname__ = f"CPUOffloaded{cls.__name__}"
    return CPUOffloaded


def partition_optimizer_state(optimizer: torch.optim.Optimizer, process_group=None, *,
                              offload: bool = False) -> torch.optim.Optimizer:
    """Stage 1: ``optimizer``'s parameters and hyperparameters under torch's ``ZeroRedundancyOptimizer``
    (each rank holds the state of its share of whole tensors; ``offload``: stepped on the CPU by
    :func:`cpu_offloaded`). Returns ``optimizer`` unchanged when no process group is running."""
    import torch.distributed as dist
    from torch.distributed.optim import ZeroRedundancyOptimizer

    if not (dist.is_available() and dist.is_initialized()):
        return optimizer
    if any(optimizer.state.values()):
        raise ValueError("the optimizer has already stepped; apply ZeRO before the first step")
    groups = [dict(g) for g in optimizer.param_groups]
    cls = cpu_offloaded(type(optimizer)) if offload else type(optimizer)
    return ZeroRedundancyOptimizer(groups, optimizer_class=cls, process_group=process_group,
                                   **constructor_defaults(optimizer))


def apply_zero(model: nn.Module, optimizer: torch.optim.Optimizer | Callable, config: ZeROConfig,
               ctx=None) -> tuple[nn.Module, torch.optim.Optimizer]:
    """``(model, optimizer)`` under ZeRO ``config.stage`` over the data-parallel ranks of ``ctx``.

    ``optimizer``: an optimizer built on ``model``'s parameters (rebuilt over the wrapped parameters with
    the same groups and hyperparameters) or a factory ``params -> optimizer``. ``ctx``: a
    ``ParallelContext``; default: every rank of the running process group is a data-parallel rank (one
    process: the model and optimizer are returned as they are, a world of one).
    """
    from nexus.training.distributed.mesh import DistributedConfig, current_context, init_parallel

    if ctx is None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            ctx = init_parallel(DistributedConfig(strategy="zero", zero_stage=config.stage,
                                                  offload_optimizer=config.offload_optimizer,
                                                  offload_params=config.offload_params))
        else:
            ctx = current_context()
    build = optimizer if not isinstance(optimizer, torch.optim.Optimizer) else None
    names = {id(p): n for n, p in model.named_parameters()}
    if ctx.dp_size > 1:
        model = wrap_zero(model, config, ctx)
    if build is not None:
        optimizer = build(model.parameters())
    elif ctx.dp_size > 1 and config.stage > 1:
        optimizer = rebuild_optimizer(optimizer, names, model)
    if config.stage == 1 and ctx.dp_size > 1:
        optimizer = partition_optimizer_state(optimizer, ctx.dp_group, offload=config.offload_optimizer)
    return model, optimizer


def wrap_zero(model: nn.Module, config: ZeROConfig, ctx, blocks=None) -> nn.Module:
    """The data-parallel wrapper of a ZeRO stage on ``ctx``'s data-parallel mesh: DDP for stage 1,
    FSDP2 (``shard_grad_op`` / ``full``, CPU offload when asked) for stages 2 and 3."""
    if config.stage == 1:
        from nexus.training.distributed.data_parallel import wrap_data_parallel

        if blocks is not None:
            raise ValueError("distributed: ZeRO stage 1 runs under DDP, which pipeline stages do not support; "
                             "use zero_stage 2 or 3 with pp > 1")
        return wrap_data_parallel(model, ctx.mesh["dp_replicate"] if ctx.mesh is not None else None)
    from nexus.training.distributed.fsdp2 import FSDP2Config, wrap_model_fsdp2

    dims = tuple(d for d in ("dp_replicate", "dp_shard") if ctx.sizes[d] > 1)
    fsdp = FSDP2Config(sharding_strategy=config.sharding_strategy, mixed_precision=ctx.config.mixed_precision,
                       param_dtype=torch.bfloat16 if ctx.config.mixed_precision else torch.float32,
                       cpu_offload=config.cpu_offload, activation_checkpointing=False)
    return wrap_model_fsdp2(model, fsdp, mesh=ctx.mesh[dims], blocks=blocks)


# Optimizers whose step is a function of each tensor alone (ZeRO-1 hands each rank whole tensors) and,
# for ZeRO++, of each element alone (it steps flat shards). Sophia's Hessian refresh, Prodigy's global
# step-size estimate and schedule-free's eval/train swap talk to the whole optimizer and are refused.
_PER_TENSOR = ("AdamW", "Adam", "SGD", "Lion", "Muon", "SOAP")
_PER_ELEMENT = ("AdamW", "Adam", "SGD", "Lion")


def shard_optimizer(optimizer: torch.optim.Optimizer, ctx, module: nn.Module | None = None) -> torch.optim.Optimizer:
    """The optimizer of a run file's ``strategy: zero`` (stage 1) or ``zero++``, built from the one
    ``build_optimizer`` made over the unwrapped parameters; other strategies return it unchanged.
    ``module``: for ZeRO++, the model whose parameters are then partitioned too (ZeRO-3, with hpZ's
    node-local backward gather); None keeps whole weights on every rank (what activation checkpointing
    needs: its recomputation would run the gather hooks inside backward)."""
    cfg = ctx.config
    name = type(optimizer).__name__
    if ctx.dp_size == 1 or cfg.strategy not in ("zero", "zero++"):
        return optimizer
    if cfg.strategy == "zero" and cfg.zero_stage == 1:
        if name not in _PER_TENSOR:
            raise ValueError(f"distributed: ZeRO stage 1 partitions whole tensors across ranks; {name} needs every "
                             f"parameter in one optimizer. Use one of {', '.join(_PER_TENSOR)} or zero_stage 2/3")
        return partition_optimizer_state(optimizer, ctx.dp_group, offload=cfg.offload_optimizer)
    if cfg.strategy == "zero++":
        from nexus.training.distributed.zero_plusplus import ZeroPlusPlusOptimizer

        if name not in _PER_ELEMENT:
            raise ValueError(f"distributed: ZeRO++ steps flat shards of the parameters; {name} is not elementwise. "
                             f"Use one of {', '.join(_PER_ELEMENT)}")
        groups = [dict(g) for g in optimizer.param_groups]
        return ZeroPlusPlusOptimizer(groups, base_optimizer=type(optimizer), config=cfg.zero_plusplus_config(),
                                     module=module, process_group=ctx.dp_group, **constructor_defaults(optimizer))
    return optimizer
