"""FSDP2: torch's ``fully_shard`` applied per transformer block, then to the root.

Order (torchtitan's ``parallelize``): activation checkpointing on each block first, then
``fully_shard`` on each block, then on the root module, so one all-gather brings in one block's
parameters just before it runs and one reduce-scatter sends its gradients out after its backward.

Strategies (``FSDP2Config.sharding_strategy``):

- ``full`` (ZeRO-3): parameters, gradients and optimizer state sharded over every data-parallel
  rank; each block's parameters are freed after its forward and all-gathered again for backward
  (``reshard_after_forward=True``).
- ``shard_grad_op`` (ZeRO-2 like): the same shards, but a block keeps its gathered parameters from
  forward to backward (``reshard_after_forward=False``): one all-gather per step instead of two,
  for the memory of the unsharded parameters.
- ``hybrid`` (HSDP): a 2-D mesh ``("dp_replicate", "dp_shard")`` with ``dp_shard`` = the node
  size: parameters sharded within a node (fast links), replicated across nodes; gradients are
  reduce-scattered within the node and all-reduced across nodes.
- ``no_shard`` (DDP-like): ``fully_shard`` on a ``(world, 1)`` mesh: every rank keeps whole
  parameters and optimizer state; gradients are all-reduced. Same code path as the others, so
  checkpoints and mixed precision behave alike.

Backward prefetch: FSDP2's default implicit prefetching is on (the next block's all-gather is
issued while the current block computes, in forward and in backward); nothing to configure.

Unused parameters: an MoE expert that gets no tokens on some rank has no gradient there. FSDP2's
reduce-scatter needs the same tensors on every rank, so the wrapper turns on
``set_reduce_scatter_unused_params``: such a parameter contributes a zero gradient and the step
neither hangs nor mismatches. Consequence: a parameter no rank used in a step gets a zero
gradient (not ``None``), so AdamW still decays it, as a single process with zero-filled grads.

Example::
    config = FSDP2Config(sharding_strategy="full", mixed_precision=True, activation_checkpointing=True)
    model = wrap_model_fsdp2(model, config)   # under torchrun, after init_process_group
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["FSDP2Config", "SHARDING_STRATEGIES", "find_blocks", "wrap_model_fsdp2"]

SHARDING_STRATEGIES = ("full", "shard_grad_op", "hybrid", "no_shard")
MESH_DIM_NAMES = ("dp_replicate", "dp_shard")
# Attribute names of the block list in common decoder models, tried before any other ModuleList.
_BLOCK_LIST_NAMES = ("layers", "blocks", "h")


@dataclasses.dataclass(kw_only=True)
class FSDP2Config:
    """How :func:`wrap_model_fsdp2` shards a model; validated when built (bad values -> ValueError).

    Fields:
        sharding_strategy: ``full`` | ``shard_grad_op`` | ``hybrid`` | ``no_shard`` (module docstring).
        mixed_precision: cast parameters to ``param_dtype`` for forward/backward and reduce gradients
            in ``reduce_dtype``; the sharded master parameters and the optimizer stay in their own dtype.
        param_dtype, reduce_dtype: floating torch dtypes (default bf16 compute, fp32 reduction).
        activation_checkpointing: recompute each block's activations in backward (non-reentrant).
        cpu_offload: keep sharded parameters, gradients and optimizer step on the CPU
            (``CPUOffloadPolicy``; pinned memory when CUDA is available).
        reshard_after_forward: None = from the strategy (full, hybrid: True; shard_grad_op: False);
            a bool overrides it for every block; an int g reshards to groups of g ranks after forward
            (must divide the shard size). Not allowed with ``no_shard`` (nothing is sharded).
        node_size: ranks per node for ``hybrid``; None reads ``LOCAL_WORLD_SIZE`` (set by torchrun and by
            the lead's ``init_process_group`` under mpirun). Must divide the world size.

    Example:
        >>> FSDP2Config(sharding_strategy="hybrid", node_size=8, mixed_precision=False)
        >>> FSDP2Config(sharding_strategy="ful")  # ValueError: ... 'ful' ... did you mean 'full'?
    """

    sharding_strategy: str = "full"
    mixed_precision: bool = True
    param_dtype: torch.dtype = torch.bfloat16
    reduce_dtype: torch.dtype = torch.float32
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    reshard_after_forward: bool | int | None = None
    node_size: int | None = None

    def __post_init__(self) -> None:
        s = self.sharding_strategy
        if not isinstance(s, str) or s not in SHARDING_STRATEGIES:
            close = difflib.get_close_matches(str(s), SHARDING_STRATEGIES, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(f"FSDP2Config.sharding_strategy must be one of {', '.join(SHARDING_STRATEGIES)}, "
                             f"got {s!r}{hint}")
        for name in ("mixed_precision", "activation_checkpointing", "cpu_offload"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"FSDP2Config.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("param_dtype", "reduce_dtype"):
            value = getattr(self, name)
            if not isinstance(value, torch.dtype) or not value.is_floating_point:
                raise ValueError(f"FSDP2Config.{name} must be a floating torch.dtype, got {value!r}")
        r = self.reshard_after_forward
        if r is not None and (not isinstance(r, int) or (not isinstance(r, bool) and r < 1)):
            raise ValueError(f"FSDP2Config.reshard_after_forward must be None, a bool or an int >= 1, got {r!r}")
        if r is not None and s == "no_shard":
            raise ValueError(f"FSDP2Config.reshard_after_forward={r!r} has no meaning with "
                             "sharding_strategy='no_shard' "
                             "(parameters are not sharded): leave it None")
        n = self.node_size
        if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
            raise ValueError(f"FSDP2Config.node_size must be a positive int or None, got {n!r}")
        if s == "hybrid":
            self.resolved_node_size()  # raises when neither node_size nor LOCAL_WORLD_SIZE gives one

    def resolved_node_size(self) -> int:
        """Ranks per node for ``hybrid``: ``node_size``, else the ``LOCAL_WORLD_SIZE`` launcher variable."""
        if self.node_size is not None:
            return self.node_size
        raw = os.environ.get("LOCAL_WORLD_SIZE")
        if raw is None:
            raise ValueError("FSDP2Config: sharding_strategy='hybrid' needs a node size (ranks per node): set "
                             "node_size=..., or launch with torchrun, which sets LOCAL_WORLD_SIZE")
        try:
            value = int(raw)
        except ValueError:
            value = 0
        if value < 1:
            raise ValueError(f"FSDP2Config: LOCAL_WORLD_SIZE={raw!r} is not a positive int; set node_size=... instead")
        return value

    def block_reshard_after_forward(self) -> bool | int:
        """The ``reshard_after_forward`` each block gets."""
        if self.reshard_after_forward is not None:
            return self.reshard_after_forward
        return self.sharding_strategy in ("full", "hybrid")


def find_blocks(model: nn.Module, blocks: Iterable[nn.Module] | None = None) -> list[nn.Module]:
    """The modules :func:`wrap_model_fsdp2` shards one by one (each gets its own all-gather).

    ``blocks`` given: those (each must be a submodule of ``model``). Otherwise the elements of
    ``model.layers`` (or ``blocks``/``h``) when it is an ``nn.ModuleList`` or ``nn.ModuleDict``, plus those of
    ``model.mtp_heads`` (the MoE model's multi-token heads are transformer blocks too); failing
    that, the largest ``nn.ModuleList`` (by parameter count) not nested inside another one.

    Raises ValueError, naming the model's class, when there is nothing to wrap.

    Example:
        >>> [type(b).__name__ for b in find_blocks(MoETransformer(cfg))]
        ['TransformerBlock', 'MixtureOfDepths', 'MTPHead']
    """
    name = type(model).__name__
    if blocks is not None:
        found = list(blocks)
        owned = {id(m) for m in model.modules()}
        for b in found:
            if not isinstance(b, nn.Module):
                raise ValueError(f"wrap_model_fsdp2: blocks= must hold nn.Modules, got {type(b).__name__}")
            if id(b) not in owned or b is model:
                raise ValueError(f"wrap_model_fsdp2: a {type(b).__name__} in blocks= is not a submodule of {name}")
        if not found:
            raise ValueError(f"wrap_model_fsdp2: blocks= is empty: nothing to wrap in {name}")
        return found
    found = []
    for attr in _BLOCK_LIST_NAMES:
        candidate = getattr(model, attr, None)
        if isinstance(candidate, (nn.ModuleList, nn.ModuleDict)) and len(candidate):
            # a ModuleDict keeps layer names stable when pipeline stages delete layers (torchtitan)
            found = list(candidate.values() if isinstance(candidate, nn.ModuleDict) else candidate)
            break
    if not found:
        top = _outermost_module_lists(model)
        if top:
            found = list(max(top, key=lambda ml: sum(p.numel() for p in ml.parameters())))
    heads = getattr(model, "mtp_heads", None)
    if found and isinstance(heads, nn.ModuleList):
        found += list(heads)
    found = [b for b in found if any(True for _ in b.parameters())]
    if not found:
        raise ValueError(f"wrap_model_fsdp2: found no transformer blocks to wrap in {name}: it has no non-empty "
                         f"nn.ModuleList of blocks (looked for {', '.join(_BLOCK_LIST_NAMES)}, then any); "
                         "pass blocks=[...] naming the modules to shard one by one")
    return found


def _outermost_module_lists(model: nn.Module) -> list[nn.ModuleList]:
    out: list[nn.ModuleList] = []

    def visit(module: nn.Module) -> None:
        for child in module.children():
            if isinstance(child, nn.ModuleList):
                out.append(child)  # do not look inside: expert lists live within blocks
            else:
                visit(child)

    visit(model)
    return out


def wrap_model_fsdp2(model: nn.Module, config: FSDP2Config | None = None, mesh=None, *,
                     blocks: Iterable[nn.Module] | None = None) -> nn.Module:
    """Shard ``model`` with FSDP2 as ``config`` says; returns the same module, now an ``FSDPModule``.

    Args:
        model: any ``nn.Module`` with blocks (see :func:`find_blocks`); parameters on the CPU, the
            mesh's device, or ``meta`` (then call ``to_empty`` and re-initialise after wrapping).
        config: :class:`FSDP2Config`; None -> ``FSDP2Config()`` (full sharding, bf16 compute).
        mesh: None -> a mesh over the whole world built here (1-D, or 2-D for hybrid / no_shard);
            a 1-D ``DeviceMesh`` -> shard over it (hybrid / no_shard reshape it to 2-D, which needs it
            to span the world); a 2-D ``DeviceMesh`` named ``("dp_replicate", "dp_shard")`` -> used as
            is (HSDP: shard over dp_shard, replicate over dp_replicate).
        blocks: the modules to shard one by one; default :func:`find_blocks`.

    Parameters become ``DTensor`` shards (dim 0); after ``loss.backward()`` each ``.grad`` is the
    gradient averaged over the data-parallel ranks (in ``reduce_dtype``), sharded like its parameter,
    so any ``torch.optim`` optimizer built on ``model.parameters()`` after wrapping steps the shards.
    Shapes and dtypes of the forward are the model's (activations in ``param_dtype`` with mixed precision).

    Raises:
        ValueError: no blocks, a mesh whose shape does not fit the strategy, a node size that does not
            divide the world size.
        RuntimeError: no process group (launch with torchrun or mpirun and call init_process_group first).

    Example::
        model = wrap_model_fsdp2(MoETransformer(cfg), FSDP2Config(sharding_strategy="full"))
        loss = model(input_ids).logits.float().mean(); loss.backward(); optimizer.step()
    """
    from torch.distributed._composable import checkpoint as checkpoint_module
    from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    config = FSDP2Config() if config is None else config
    if not isinstance(config, FSDP2Config):
        raise TypeError(f"wrap_model_fsdp2: config must be an FSDP2Config, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap_model_fsdp2: model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, FSDPModule):
        raise ValueError(f"wrap_model_fsdp2: this {type(model).__name__} is already wrapped by FSDP2")
    found = find_blocks(model, blocks)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("wrap_model_fsdp2 needs a process group: launch with torchrun (or mpirun) and call "
                           "nexus.training.distributed init_process_group / init_parallel before wrapping")
    mesh = _resolve_mesh(config, mesh)

    # torchtitan's order: activation checkpointing before FSDP. The composable checkpoint keeps the
    # module's class and parameter names (checkpoint_wrapper would break the model's isinstance
    # checks on MixtureOfDepths and add '_checkpoint_wrapped_module.' to every checkpoint key).
    if config.activation_checkpointing:
        for block in found:
            checkpoint_module(block, use_reentrant=False)

    mp_policy = (MixedPrecisionPolicy(param_dtype=config.param_dtype, reduce_dtype=config.reduce_dtype)
                 if config.mixed_precision else MixedPrecisionPolicy())
    # pinned host memory needs CUDA; on a CPU-only build pinning raises
    offload_policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if config.cpu_offload else OffloadPolicy()
    common = dict(mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy)
    if config.sharding_strategy == "no_shard":
        block_reshard = False
    else:
        block_reshard = config.block_reshard_after_forward()
    # None: torch's heuristic keeps the root's parameters (embeddings, final norm, head) gathered from
    # forward to backward, where the head is needed first; an explicit setting applies to the root too
    root_reshard = config.reshard_after_forward
    for i, block in enumerate(found):
        reshard = block_reshard
        # the last block runs first in backward: freeing its parameters only to gather them again at once
        # wastes an all-gather (torchtitan does the same); an explicit setting is left as asked
        if i == len(found) - 1 and config.reshard_after_forward is None and reshard is True:
            reshard = False
        fully_shard(block, reshard_after_forward=reshard, **common)
    fully_shard(model, reshard_after_forward=root_reshard, **common)
    # experts without tokens on a rank have no grad there: send zeros so every rank joins the same collectives
    model.set_reduce_scatter_unused_params(True)
    return model


def _default_device_type() -> str:
    backend = dist.get_backend()
    return "cuda" if torch.cuda.is_available() and "nccl" in str(backend) else "cpu"


def _resolve_mesh(config: FSDP2Config, mesh):
    """The DeviceMesh to shard over: 1-D for full / shard_grad_op, 2-D (dp_replicate, dp_shard) otherwise."""
    from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

    strategy = config.sharding_strategy
    world = dist.get_world_size()
    if mesh is not None and not isinstance(mesh, DeviceMesh):
        raise TypeError(f"wrap_model_fsdp2: mesh must be a torch DeviceMesh or None, got {type(mesh).__name__}")
    if mesh is not None and mesh.ndim == 2:
        names = tuple(mesh.mesh_dim_names or ())
        if names != MESH_DIM_NAMES:
            raise ValueError(f"wrap_model_fsdp2: a 2-D mesh must have dims named {MESH_DIM_NAMES}, got {names or None}")
        replicate, shard = mesh.shape
        if strategy in ("full", "shard_grad_op") and replicate > 1:
            raise ValueError(f"wrap_model_fsdp2: sharding_strategy={strategy!r} shards over every rank, but the mesh "
                             f"replicates over dp_replicate={replicate}: use sharding_strategy='hybrid'")
        if strategy == "no_shard" and shard > 1:
            raise ValueError(f"wrap_model_fsdp2: sharding_strategy='no_shard' needs dp_shard=1, "
                             f"the mesh has dp_shard={shard}")
        if strategy == "hybrid" and config.node_size is not None and config.node_size != shard:
            raise ValueError(f"wrap_model_fsdp2: node_size={config.node_size} disagrees with the mesh's "
                             f"dp_shard={shard}")
        if strategy in ("full", "shard_grad_op"):
            return mesh["dp_shard"]
        return mesh
    if mesh is not None and mesh.ndim != 1:
        raise ValueError(f"wrap_model_fsdp2: mesh must be 1-D or 2-D {MESH_DIM_NAMES}, got {mesh.ndim}-D")
    size = world if mesh is None else mesh.size()
    if strategy in ("full", "shard_grad_op"):
        if mesh is not None:
            return mesh
        return init_device_mesh(_default_device_type(), (world,), mesh_dim_names=("dp_shard",))
    if strategy == "hybrid":
        node = config.resolved_node_size()
        if size % node:
            raise ValueError(f"wrap_model_fsdp2: hybrid node size {node} does not divide the {size} data-parallel "
                             f"ranks (world size {world}): set FSDP2Config.node_size to a divisor")
        shape = (size // node, node)
    else:  # no_shard
        shape = (size, 1)
    if mesh is None:
        return init_device_mesh(_default_device_type(), shape, mesh_dim_names=MESH_DIM_NAMES)
    if size != world:
        raise ValueError(f"wrap_model_fsdp2: sharding_strategy={strategy!r} on a 1-D mesh of {size} ranks reshapes it "
                         f"to 2-D, which needs it to span the world ({world} ranks): pass a 2-D mesh named "
                         f"{MESH_DIM_NAMES} instead")
    return DeviceMesh(mesh.device_type, mesh.mesh.reshape(shape), mesh_dim_names=MESH_DIM_NAMES)
