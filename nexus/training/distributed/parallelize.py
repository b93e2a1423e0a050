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


def apply_activation_checkpointing(model: nn.Module, config=None, *, blocks=None) -> nn.Module:
    """Checkpoint each block (``model.layers`` and MTP heads, or ``blocks``) per ``config`` (a
    ``SelectiveCheckpointConfig``; default: the whole block, recomputed in backward). Blocks keep their
    class, so the model's own type checks (mixture of depths) still see them."""
    from nexus.training.gradient_methods import SelectiveCheckpointConfig, apply_selective_checkpointing

    return apply_selective_checkpointing(model, config or SelectiveCheckpointConfig(policy="all"), blocks=blocks)


class PipelineStages(nn.Module):
    """This rank's pipeline stages seen as one module whose parameter names are the whole model's
    (``embed_tokens``, ``layers.<i>``, ``norm``, ``lm_head``, ``mtp_heads``): what the optimizer,
    ``train()``/``eval()`` and the sharded checkpoint see. It shares the stages' modules; the
    pipeline runner, not ``forward``, runs them."""

    def __init__(self, runner, counts: tuple[int, int]) -> None:
        super().__init__()
        self.runner = [runner]  # a list: not a submodule
        self._counts = counts  # the whole model's (total, active) parameters, counted before the split
        self.layers = nn.ModuleDict()
        for stage in runner.stage_modules:
            for name, child in stage.named_children():
                if name == "layers":
                    self.layers.update(child)
                elif child is not None:
                    self.add_module(name, child)

    def num_parameters(self, active: bool = False) -> int:
        """The whole model's parameter count (every stage), as ``MoETransformer.num_parameters``."""
        return self._counts[1] if active else self._counts[0]

    def forward(self, *args, **kwargs):
        raise RuntimeError("a pipeline's stages run through its PipelineRunner (Trainer does this), not forward()")


def parallelize_pipeline(model: nn.Module, ctx: ParallelContext, loss_fn, *,
                         checkpointing=None) -> tuple[object, PipelineStages]:
    """Split ``model`` into the pipeline stages of ``ctx.mesh["pp"]`` (``ctx.config.pp_schedule``,
    ``pp_microbatches``) and parallelize each local stage like a model; returns the runner and
    :class:`PipelineStages` over this rank's stages."""
    from nexus.training.distributed.pipeline_parallel import PipelineConfig, build_pipeline

    cfg = ctx.config
    if ctx.sizes["tp"] > 1:
        raise ValueError("distributed: tp > 1 together with pp > 1 is not supported yet; use one of them")
    if ctx.sizes["cp"] > 1:
        raise ValueError("distributed: cp > 1 together with pp > 1 is not supported yet; use one of them")
    pipeline = PipelineConfig(schedule=cfg.pp_schedule, n_microbatches=cfg.pp_microbatches)
    counts = (model.num_parameters(), model.num_parameters(active=True))
    runner = build_pipeline(model, ctx.mesh["pp"], pipeline, loss_fn,
                            parallelize_fn=lambda stage: parallelize(stage, ctx, blocks=stage.blocks(),
                                                                      checkpointing=checkpointing))
    return runner, PipelineStages(runner, counts)


def parallelize(model: nn.Module, ctx: ParallelContext, *, blocks=None, checkpointing=None) -> nn.Module:
    """``model`` (or one pipeline stage, with its ``blocks``) placed on ``ctx.mesh`` as ``ctx.config``
    says; returns the module to train. A pipeline (pp > 1) goes through :func:`parallelize_pipeline`,
    which calls this per stage. ``checkpointing``: the run file's ``memory:`` policy (a
    ``SelectiveCheckpointConfig``), in activation checkpointing's place in the order.
    """
    cfg = ctx.config
    sizes = ctx.sizes
    if sizes["tp"] > 1:
        from nexus.training.distributed.tensor_parallel import apply_tensor_parallel

        apply_tensor_parallel(model, ctx.mesh["tp"], sequence_parallel=cfg.sequence_parallel)
    replicas = None  # cp > 1: the mesh gradients are averaged over, data parallel and cp ranks together
    if sizes["cp"] > 1:
        from nexus.training.distributed.context_parallelism import apply_context_parallel, context_parallel_mesh

        replicas = context_parallel_mesh(ctx)
        apply_context_parallel(model, ctx.mesh["cp"])
    if cfg.activation_checkpointing or checkpointing is not None:
        apply_activation_checkpointing(model, checkpointing, blocks=blocks)
    # ZeRO++: the optimizer partitions and communicates
    if (ctx.dp_size == 1 and replicas is None) or cfg.strategy == "zero++":
        return model
    if cfg.strategy == "zero":
        from nexus.training.distributed.zero import wrap_zero

        return wrap_zero(model, cfg.zero_config(), ctx, blocks=blocks)
    if cfg.strategy == "ddp":
        from nexus.training.distributed.data_parallel import wrap_data_parallel

        if blocks is not None:
            raise ValueError("distributed: pipeline stages shard with fsdp2; strategy ddp with pp > 1 is not supported")
        return wrap_data_parallel(model, ctx.mesh["dp_replicate"] if replicas is None else replicas)
    from nexus.training.distributed.fsdp2 import FSDP2Config, wrap_model_fsdp2

    dims = tuple(d for d in ("dp_replicate", "dp_shard") if sizes[d] > 1)
    fsdp = FSDP2Config(sharding_strategy=cfg.sharding_strategy, mixed_precision=cfg.mixed_precision,
                       param_dtype=torch.bfloat16 if cfg.mixed_precision else torch.float32,
                       cpu_offload=cfg.cpu_offload, activation_checkpointing=False)  # applied above, in order
    return wrap_model_fsdp2(model, fsdp, mesh=ctx.mesh[dims] if replicas is None else replicas, blocks=blocks)
