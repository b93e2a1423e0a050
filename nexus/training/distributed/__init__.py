"""Distributed training on torch.distributed: FSDP2, DDP, tensor, pipeline and context parallel, device
mesh, sharded checkpoints. Names load on first use (pipelining's import alone takes seconds).

Example::
    from nexus.training.distributed import FSDP2Config, wrap_model_fsdp2
    model = wrap_model_fsdp2(model, FSDP2Config(sharding_strategy="full", mixed_precision=True))
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "DistributedConfig": "mesh", "ParallelContext": "mesh", "init_parallel": "mesh", "join_process_group": "mesh",
    "launch_env": "mesh", "build_mesh": "mesh",
    "FSDP2Config": "fsdp2", "wrap_model_fsdp2": "fsdp2",
    "wrap_data_parallel": "data_parallel", "unwrap_model": "data_parallel",
    "apply_tensor_parallel": "tensor_parallel",
    "PipelineConfig": "pipeline_parallel", "build_pipeline": "pipeline_parallel", "PipelineRunner": "pipeline_parallel",
    "parallelize": "parallelize", "parallelize_pipeline": "parallelize",
    "apply_activation_checkpointing": "parallelize",
    "ZeROConfig": "zero", "apply_zero": "zero",
    "ZeroPlusPlusConfig": "zero_plusplus", "ZeroPlusPlusOptimizer": "zero_plusplus",
    "save_sharded": "checkpointing", "load_sharded": "checkpointing", "export_safetensors": "checkpointing",
    "init_context_parallel_group": "context_parallelism", "ContextParallelAttention": "context_parallelism",
    "ring_attention": "context_parallelism", "shard_sequence": "context_parallelism",
    "gather_sequence": "context_parallelism", "shard_batch": "context_parallelism",
    "apply_context_parallel": "context_parallelism",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
