"""Data parallel (DDP): every rank holds the whole model, runs its own slice of the batch, and the
gradients are averaged by all-reduce during backward (torch's ``DistributedDataParallel``).

Experts that get no tokens (MoE and RoM experts, tokens skipped by MoD). DDP's reducer all-reduces
gradients in buckets and launches a bucket only once every parameter in it has a gradient; a
parameter with no gradient on one rank leaves that rank's bucket unlaunched while its peers wait in
the all-reduce, and DDP then fails ("Expected to have finished reduction in the prior iteration").
The ways out, and the one taken:

- ``find_unused_parameters=True`` works for any model, but DDP then walks the whole autograd graph
  after every forward to mark unused parameters: a CPU cost per step that grows with the graph.
- ``static_graph=True`` does not apply: it records which parameters were used in the first step and
  assumes the same set every step, while routing changes it from step to step.
- Taken: the model keeps every expert in the graph. :func:`nexus.models.moe.run_experts` calls an
  expert even when it has no tokens (on its 0 rows), so its parameters get an exact zero gradient:
  no graph walk, no hang, and the averaged gradient is the same (a zero adds nothing). MoD always
  routes at least one token per sequence through its block, so MoD parameters are always used.
  ``find_unused_parameters`` stays available for other models that do leave parameters unused.

Reaching the inner model: DDP keeps it at ``.module``. The wrapper returned here,
:class:`DataParallelModel`, also forwards any attribute DDP itself lacks to the inner model, so
``wrapped.num_parameters(active=True)``, ``wrapped.config`` and ``wrapped.layers`` read the model's
own. ``state_dict()`` keys carry DDP's ``module.`` prefix; save and load checkpoints through
:func:`unwrap_model` (``unwrap_model(wrapped).state_dict()``) so they stay loadable without DDP.
Gradient accumulation: run the micro-batches before the last one under ``wrapped.no_sync()``.

With tensor parallel (DTensor parameters) DDP is refused: torch's DDP + TP path swaps the DTensor
parameters out of ``named_parameters()`` after the first forward. Data x tensor parallel goes
through FSDP2's ``fully_shard`` on the data-parallel mesh (tests/distributed/test_tensor_parallel.py).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

__all__ = ["DataParallelModel", "unwrap_model", "wrap_data_parallel"]


class DataParallelModel(DistributedDataParallel):
    """``DistributedDataParallel`` whose unknown attributes are looked up on the wrapped model.

    DDP's own attributes (``module``, ``process_group``, ``no_sync``, ...) win; anything else
    (``config``, ``layers``, ``num_parameters``, ...) comes from ``self.module``.
    Shapes and dtypes: those of the wrapped model's forward.

    Example:
        >>> wrapped = wrap_data_parallel(MoETransformer(cfg))
        >>> wrapped.num_parameters(active=True) == wrapped.module.num_parameters(active=True)
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules of DDP itself
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("module")
            if inner is None:  # still inside DDP.__init__, or the name is "module" itself
                raise
            return getattr(inner, name)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The model inside any DDP and ``torch.compile`` wrappers (the object itself if unwrapped).

    Example:
        >>> unwrap_model(wrap_data_parallel(model)) is model
        True
    """
    while True:
        if isinstance(model, DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):  # torch.compile's OptimizedModule
            model = model._orig_mod
        else:
            return model


def _model_device(model: nn.Module) -> torch.device:
    devices = {t.device for t in list(model.parameters()) + list(model.buffers())}
    if not devices:
        raise ValueError("wrap_data_parallel: the model has no parameters to synchronise")
    if len(devices) > 1:
        raise ValueError(f"wrap_data_parallel: the model's parameters are on several devices "
                         f"{sorted(map(str, devices))}; DDP needs them on one device per rank")
    device = devices.pop()
    if device.type == "meta":
        raise ValueError("wrap_data_parallel: the model's parameters are on the meta device; materialise them "
                         "(to_empty + init_weights) before DDP, which broadcasts rank 0's values")
    return device


def wrap_data_parallel(model: nn.Module, mesh: DeviceMesh | None = None, *,
                       process_group: dist.ProcessGroup | None = None,
                       device_ids: list[int] | None = None,
                       find_unused_parameters: bool = False,
                       static_graph: bool = False,
                       gradient_as_bucket_view: bool = True,
                       bucket_cap_mb: float | None = None,
                       forward_sync_buffers: bool = True) -> DataParallelModel:
    """Wrap ``model`` in DDP over the data-parallel ranks (rank 0's parameters are broadcast to all).

    Args:
        model: an ``nn.Module`` whose parameters all sit on this rank's device (CPU with Gloo, or
            ``cuda:LOCAL_RANK`` with NCCL), plain tensors: a tensor-parallel model (DTensor
            parameters) is refused, see Raises.
        mesh: a 1-D DeviceMesh of the data-parallel ranks (e.g. ``mesh["dp_replicate"]`` of a larger
            mesh). Mutually exclusive with ``process_group``; with neither, the default (world) group.
        process_group: the data-parallel process group.
        device_ids: DDP's ``device_ids``; by default ``[index]`` of the model's CUDA device, None on CPU.
        find_unused_parameters: DDP's graph walk for parameters without gradients; not needed for
            the MoE model (see the module docstring), needed for models that skip parameters.
        static_graph: DDP's static-graph mode (valid when the same parameters are used every step,
            as they are for the MoE model now).
        gradient_as_bucket_view: gradients alias DDP's all-reduce buckets (saves one copy of the
            gradients); keep it unless code replaces ``p.grad`` tensors by hand.
        bucket_cap_mb: all-reduce bucket size (DDP's default, 25 MB, when None).
        forward_sync_buffers: DDP's buffer broadcast from rank 0 before each forward (buffers are
            synchronised once when wrapping either way).

    Returns:
        A :class:`DataParallelModel` (a ``DistributedDataParallel``): forward takes and returns what
        ``model`` does (MoETransformer: input_ids [B_local, T] int64 -> MoEOutput); after
        ``backward`` every parameter's ``.grad`` is the mean over the data-parallel ranks. The inner
        model is ``.module`` (or :func:`unwrap_model`); other attributes fall through to it.

    Raises:
        RuntimeError: no process group is initialised. ValueError: both ``mesh`` and
        ``process_group``, a mesh that is not 1-D, parameters on several devices or on meta, CPU
        parameters with an NCCL group, DTensor parameters (tensor parallel or FSDP2 applied): torch's
        DDP handles those only through a workaround that drops them from ``named_parameters()``
        after the first forward (so state_dict, clipping and checkpoints lose them); combine
        tensor parallel with FSDP2's ``fully_shard`` on the data-parallel mesh instead, as
        torchtitan does.

    Example:
        >>> model = wrap_data_parallel(MoETransformer(cfg).to(device))  # after init_process_group
        >>> out = model(input_ids[rank::world_size]); loss(out).backward()  # gradients all-reduced
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"wrap_data_parallel expects an nn.Module, got {type(model).__name__}")
    if isinstance(model, DistributedDataParallel):
        raise ValueError("wrap_data_parallel: the model is already wrapped in DistributedDataParallel")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("wrap_data_parallel needs an initialised process group (torch.distributed."
                           "init_process_group, done by the launcher setup) before wrapping")
    if mesh is not None and process_group is not None:
        raise ValueError("wrap_data_parallel: give mesh or process_group, not both")
    if mesh is not None:
        if not isinstance(mesh, DeviceMesh):
            raise TypeError(f"wrap_data_parallel: mesh must be a DeviceMesh, got {type(mesh).__name__}")
        if mesh.ndim != 1:
            raise ValueError(f"wrap_data_parallel: mesh must be 1-D (the data-parallel ranks), got {mesh.ndim} "
                             f"dimensions {mesh.mesh_dim_names}; pass its data-parallel slice, "
                             "e.g. mesh['dp_replicate']")
    dtensors = [name for name, p in model.named_parameters() if isinstance(p, DTensor)]
    if dtensors:
        raise ValueError(f"wrap_data_parallel: {len(dtensors)} parameters are DTensors (e.g. {dtensors[0]}): DDP "
                         "cannot hold tensor-parallel or FSDP2-sharded parameters; for data x tensor parallel use "
                         "FSDP2 (fully_shard) on the data-parallel mesh")
    device = _model_device(model)
    group = mesh.get_group() if mesh is not None else process_group
    backend = dist.get_backend(group)
    if device.type == "cpu" and backend == dist.Backend.NCCL:
        raise ValueError("wrap_data_parallel: the model is on the CPU but the process group's backend is NCCL; "
                         "move the model to cuda:LOCAL_RANK or use a Gloo group")
    if device_ids is None and device.type == "cuda":
        # one device per process: DDP replicates nothing locally, it only needs to know which one
        device_ids = [device.index if device.index is not None else torch.cuda.current_device()]
    return DataParallelModel(
        model,
        device_ids=device_ids,
        process_group=process_group,
        device_mesh=mesh,
        find_unused_parameters=find_unused_parameters,
        static_graph=static_graph,
        gradient_as_bucket_view=gradient_as_bucket_view,
        forward_sync_buffers=forward_sync_buffers,
        **({} if bucket_cap_mb is None else {"bucket_cap_mb": bucket_cap_mb}),
    )
