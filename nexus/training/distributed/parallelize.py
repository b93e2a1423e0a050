"""Apply the parallelisms of a ``distributed:`` section to a model, in one place and a fixed order.

The order is torchtitan's: (low-precision layers or QAT, applied by the caller before this), tensor
parallel, context parallel, activation checkpointing, compile, then the data-parallel wrapper (FSDP2
``fully_shard`` per block and root, or DDP). Each step is a function of the model and the mesh.

Example::
    ctx = init_parallel(DistributedConfig(dp_shard=-1, tp=2))
    model = parallelize(MoETransformer(cfg), ctx)
"""
from __future__ import annotations

import torch
from torch import nn

from nexus.training.distributed.mesh import ParallelContext


def apply_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Recompute each block of ``model.layers`` in backward (torch's non-reentrant checkpoint wrapper)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList) or len(layers) == 0:
        raise ValueError(f"activation checkpointing wraps model.layers, and {type(model).__name__} has none")
    for i, block in enumerate(layers):
        layers[i] = checkpoint_wrapper(block, preserve_rng_state=True)
    return model


def parallelize(model: nn.Module, ctx: ParallelContext) -> nn.Module:
    """``model`` placed on ``ctx.mesh`` as ``ctx.config`` says; returns the module to train.

    One process (``ctx.mesh`` None) gets only activation checkpointing, when asked for.
    """
    cfg = ctx.config
    sizes = ctx.sizes
    if sizes["pp"] > 1:
        raise ValueError("distributed.pp > 1 runs through build_pipeline (nexus.training.distributed.pipeline_parallel)")
    if sizes["cp"] > 1:
        raise ValueError("distributed.cp > 1: context parallelism is not part of this release; set cp: 1")
    if sizes["tp"] > 1:
        from nexus.training.distributed.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, ctx.mesh["tp"], sequence_parallel=cfg.sequence_parallel)
    if cfg.activation_checkpointing:
        apply_activation_checkpointing(model)
    if ctx.dp_size == 1:
        return model
    if cfg.strategy == "ddp":
        from nexus.training.distributed.data_parallel import wrap_data_parallel

        return wrap_data_parallel(model, ctx.mesh["dp_replicate"])
    from nexus.training.distributed.fsdp2 import FSDP2Config, wrap_model_fsdp2

    dims = tuple(d for d in ("dp_replicate", "dp_shard") if sizes[d] > 1)
    fsdp = FSDP2Config(sharding_strategy=cfg.sharding_strategy, mixed_precision=cfg.mixed_precision,
                       param_dtype=torch.bfloat16 if cfg.mixed_precision else torch.float32,
                       cpu_offload=cfg.cpu_offload, activation_checkpointing=False)  # applied above, in order
    return wrap_model_fsdp2(model, fsdp, mesh=ctx.mesh[dims])
