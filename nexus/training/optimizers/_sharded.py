"""Whole-matrix work for optimizers on sharded (DTensor) parameters: owners, gather, scatter back.

FSDP2 (``fully_shard``) keeps each parameter as a DTensor: one block of rows (``Shard(0)``) per rank
of its mesh's shard dimension, and the same block on every rank of a replicated dimension (HSDP's
``Replicate()``). Muon's orthogonalization and SOAP's preconditioners are functions of the whole
matrix, so a step on a local block would be wrong maths. Here each matrix gets one owner rank that
sees the whole matrix, computes, and sends every rank its block of the result:

1. Owners (:func:`assign_owners`): the matrices of one mesh, largest cost first, each to the
   least-loaded rank of the mesh (LPT scheduling), so every matrix is computed exactly once across
   the ranks and the work is spread. It depends only on shapes and order, so every rank computes
   the same assignment without communicating.
2. Gather (:meth:`WholeMatrices.gather`): one ``all_to_all_single`` per bucket (mesh, dtype):
   every rank sends each owner its blocks of the owner's matrices. Only the ranks in the owner's
   replica (same coordinates on the replicated mesh dimensions) send; their blocks tile the matrix
   exactly once.
3. Scatter (:meth:`WholeMatrices.scatter`): one ``all_to_all_single``: each owner sends every rank,
   replicas included, its block of each result.

Moonlight and Dion use the same all-to-all pattern. Traffic per matrix: its size into the owner and
its size times the number of replicas out of it, spread over all ranks (a broadcast-then-slice
would send every rank the whole matrix). Memory: a rank holds its owned whole matrices at once
(about 1/world of all matrices) plus send and receive buffers of that size, for two collectives
per bucket and step.

The block map covers ``Shard(d)`` and ``Replicate()`` placements (FSDP2, HSDP, tensor parallelism
alone). Other layouts, such as the strided shards FSDP2 makes of tensor-parallel weights, take a
general but heavier path (:class:`GatheredEverywhere`): every rank all-gathers the whole tensor
(``full_tensor``), the owner computes, broadcasts the result, and each rank keeps its block
(DTensor's own split, no communication). ``Partial`` placements are refused.
"""
from __future__ import annotations

import dataclasses
import heapq
import math
from typing import Sequence

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["GatheredEverywhere", "Layout", "ShardedParams", "WholeMatrices", "assign_owners", "is_dtensor",
           "local"]


def _dtensor_class():
    if not dist.is_available():
        return None
    from torch.distributed.tensor import DTensor

    return DTensor


def is_dtensor(t) -> bool:
    """Whether ``t`` is a DTensor (a parameter sharded by FSDP2 or placed by tensor parallelism)."""
    cls = _dtensor_class()
    return cls is not None and isinstance(t, cls)


def local(t: Tensor) -> Tensor:
    """This rank's block of a DTensor (shares its storage: in-place ops update the DTensor), else ``t``."""
    return t.to_local() if is_dtensor(t) else t


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """Owner rank of each job: largest cost first, to the least-loaded rank (ties: lowest rank).

    Example::

        assign_owners([4.0, 1.0, 1.0, 1.0], world=2)   # [0, 1, 1, 1]
    """
    if world < 1:
        raise ValueError(f"world must be >= 1, got {world}")
    loads = [(0.0, r) for r in range(world)]  # a heap of (load, rank)
    owners = [0] * len(costs)
    for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
        load, rank = heapq.heappop(loads)
        owners[k] = rank
        heapq.heappush(loads, (load + float(costs[k]), rank))
    return owners


@dataclasses.dataclass(frozen=True)
class MeshGroup:
    """The process group spanning a device mesh, and the mesh coordinate of each of its ranks."""

    group: object
    rank: int  # this process's rank in ``group``
    coords: tuple[tuple[int, ...], ...]  # mesh coordinate of each group rank
    mesh_shape: tuple[int, ...]
    device: torch.device  # where the mesh's collectives run

    @property
    def size(self) -> int:
        return len(self.coords)


class ShardedParams:
    """Per-optimizer cache and planner for DTensor parameters: mesh groups, layouts, owners, buckets."""

    def __init__(self) -> None:
        self._groups: dict = {}
        self._layouts: dict[int, tuple] = {}  # id(p) -> ((shape, placements, mesh), Layout or None)

    def mesh_group(self, mesh) -> MeshGroup:
        found = self._groups.get(mesh)
        if found is None:
            found = self._groups[mesh] = _mesh_group(mesh)
        return found

    def layout(self, p: Tensor) -> Layout | None:
        """p's :class:`Layout`, or None where the block map does not cover its placements."""
        key = (tuple(p.shape), tuple(p.placements), p.device_mesh)
        if id(p) not in self._layouts or self._layouts[id(p)][0] != key:
            layout = Layout(p, self.mesh_group(p.device_mesh)) if _mapped(p.placements) else None
            self._layouts[id(p)] = (key, layout if layout is not None and layout.matches else None)
        return self._layouts[id(p)][1]

    def owners(self, params: Sequence[Tensor], cost) -> dict[int, int]:
        """``{id(p): owner group rank}``: LPT over each mesh's ranks by ``cost(shape)``. Pass every matrix of
        the param group (with or without a gradient) so that owners stay put from step to step."""
        by_mesh: dict = {}
        for p in params:
            by_mesh.setdefault(p.device_mesh, []).append(p)
        owners = {}
        for mesh, on_mesh in by_mesh.items():
            ranks = assign_owners([cost(tuple(p.shape)) for p in on_mesh], self.mesh_group(mesh).size)
            owners.update((id(p), r) for p, r in zip(on_mesh, ranks))
        return owners

    def buckets(self, params: Sequence[Tensor], owners: dict[int, int],
                dtype_of) -> list[tuple[WholeMatrices | GatheredEverywhere, list[int]]]:
        """Split ``params`` (DTensors with gradients) by mesh, ``dtype_of(p)`` (the dtype of the blocks
        exchanged for p) and path into jobs (:class:`WholeMatrices`, or :class:`GatheredEverywhere` for
        placements the block map does not cover); each comes with its indices into ``params``."""
        by_key: dict = {}
        for i, p in enumerate(params):
            by_key.setdefault((p.device_mesh, dtype_of(p), self.layout(p) is None), []).append(i)
        jobs = []
        for (mesh, dtype, everywhere), indices in by_key.items():
            job_owners = [owners[id(params[i])] for i in indices]
            device = params[indices[0]].to_local().device
            if everywhere:
                job = GatheredEverywhere([params[i] for i in indices], self.mesh_group(mesh), job_owners, dtype,
                                         device)
            else:
                job = WholeMatrices([self.layout(params[i]) for i in indices], job_owners, dtype, device)
            jobs.append((job, indices))
        return jobs


def _mesh_group(mesh) -> MeshGroup:
    ranks_on_mesh = mesh.mesh.flatten().tolist()
    if mesh.ndim == 1:
        group = mesh.get_group()
    elif sorted(ranks_on_mesh) == list(range(dist.get_world_size())):
        group = dist.group.WORLD
    elif mesh.mesh_dim_names:
        group = mesh._flatten().get_group()  # n-D sub-mesh (e.g. HSDP beside pipeline stages)
    else:
        raise ValueError(f"a parameter lives on the {mesh.ndim}-D device mesh {mesh} without dim names that "
                         "covers only part of the world: name its dims (init_device_mesh(..., mesh_dim_names=...)) "
                         "so that it can be flattened into one process group")
    global_ranks = dist.get_process_group_ranks(group)
    where = {g: tuple(int(i) for i in torch.nonzero(mesh.mesh == g)[0].tolist()) for g in ranks_on_mesh}
    coords = tuple(where[g] for g in global_ranks)
    device = torch.device(mesh.device_type)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    return MeshGroup(group=group, rank=dist.get_rank(group), coords=coords, mesh_shape=tuple(mesh.mesh.shape),
                     device=device)


def _mapped(placements) -> bool:
    """Whether the block map covers ``placements`` (only Shard(d) and Replicate()); Partial is refused."""
    from torch.distributed.tensor import Partial, Replicate, Shard

    for placement in placements:
        if isinstance(placement, Partial):
            raise ValueError(f"a parameter with placements {tuple(placements)} holds partial sums: reduce it "
                             "(redistribute to Shard or Replicate) before the optimizer step")
    return all(type(pl) is Shard or isinstance(pl, Replicate) for pl in placements)


def _block(shape: tuple[int, ...], placements, coord: tuple[int, ...],
           mesh_shape: tuple[int, ...]) -> tuple[slice, ...]:
    """The index of the block the rank at mesh ``coord`` holds: DTensor's ``Shard`` chunking (ceil-sized
    chunks in mesh-dim order, trailing ranks possibly empty), nothing for ``Replicate``."""
    from torch.distributed.tensor import Replicate, Shard

    start, size = [0] * len(shape), list(shape)
    for mesh_dim, placement in enumerate(placements):
        if type(placement) is Shard:
            d = placement.dim % len(shape)
            chunk = -(-size[d] // mesh_shape[mesh_dim])
            lo = min(coord[mesh_dim] * chunk, size[d])
            hi = min(lo + chunk, size[d])
            start[d] += lo
            size[d] = hi - lo
        elif not isinstance(placement, Replicate):
            raise ValueError(f"the block map covers Shard(d) and Replicate() placements, not {placement} "
                             f"(mesh dim {mesh_dim} of a parameter of shape {shape})")
    return tuple(slice(s, s + z) for s, z in zip(start, size))


class Layout:
    """Where the blocks of one sharded parameter live: per group rank, its block and its replica.

    Args:
        param: a DTensor parameter; mesh_group: its mesh's :class:`MeshGroup`.
    """

    def __init__(self, param: Tensor, mesh_group: MeshGroup) -> None:
        from torch.distributed.tensor import Replicate

        self.shape = tuple(param.shape)
        self.placements = tuple(param.placements)
        self.mesh_group = mesh_group
        self.blocks = [_block(self.shape, self.placements, c, mesh_group.mesh_shape) for c in mesh_group.coords]
        replicated = [d for d, pl in enumerate(self.placements) if isinstance(pl, Replicate)]
        # ranks with the same coordinates on the replicated dims hold disjoint blocks that tile the whole
        self.replica = [tuple(c[d] for d in replicated) for c in mesh_group.coords]
        self.replicated = any(mesh_group.mesh_shape[d] > 1 for d in replicated)
        # False if the local block is not the one DTensor's Shard chunking gives (then the general path)
        self.matches = tuple(param.to_local().shape) == self.block_shape(mesh_group.rank)

    def block_shape(self, group_rank: int) -> tuple[int, ...]:
        return tuple(s.stop - s.start for s in self.blocks[group_rank])

    def block_numel(self, group_rank: int) -> int:
        return math.prod(self.block_shape(group_rank))

    def shards_only_dim0(self) -> bool:
        """Whether every Shard placement splits dim 0 and nothing is replicated over more than one rank
        (a stack of matrices split by whole matrices: each rank can work on its own)."""
        from torch.distributed.tensor import Shard

        return not self.replicated and all(pl.dim % len(self.shape) == 0 for pl in self.placements
                                           if type(pl) is Shard)


class WholeMatrices:
    """One step's gather-compute-scatter for the sharded matrices of one bucket (one mesh, one dtype).

    Args:
        layouts: the :class:`Layout` of each matrix, all on the same mesh.
        owners: the owner group rank of each matrix (:func:`assign_owners`), the same on every rank.
        dtype, device: of the blocks and results (the buffers of a rank with nothing to send).

    Example::

        job = WholeMatrices(layouts, owners, torch.float32, torch.device("cpu"))
        whole = job.gather([local(b) for b in buffers])           # {k: whole tensor} for owned k
        mine = job.scatter({k: f(w) for k, w in whole.items()})   # {k: this rank's block of f}
    """

    def __init__(self, layouts: Sequence[Layout], owners: Sequence[int], dtype: torch.dtype,
                 device: torch.device) -> None:
        if not layouts or len(layouts) != len(owners):
            raise ValueError(f"need one owner per layout and at least one layout, got {len(layouts)} layouts "
                             f"and {len(owners)} owners")
        self.layouts = list(layouts)
        self.shapes = [layout.shape for layout in self.layouts]  # whole shapes, as GatheredEverywhere's
        self.owners = list(owners)
        self.mesh_group = layouts[0].mesh_group
        self.dtype, self.device = dtype, device
        self.owned = [k for k, o in enumerate(self.owners) if o == self.mesh_group.rank]

    def _sends(self, k: int, group_rank: int) -> bool:
        layout = self.layouts[k]
        return layout.replica[group_rank] == layout.replica[self.owners[k]]

    def _exchange(self, send: list[list[Tensor]], recv_numels: list[int]) -> Tensor:
        """One all_to_all_single: ``send[r]`` (concatenated) to group rank r; returns what arrived, by source."""
        mg = self.mesh_group
        parts = [t.reshape(-1) for per_rank in send for t in per_rank]
        flat = torch.cat(parts) if parts else torch.empty(0, dtype=self.dtype, device=self.device)
        flat = flat.to(mg.device)  # e.g. CPU-offloaded shards on a CUDA (NCCL) mesh
        out = flat.new_empty(sum(recv_numels))
        dist.all_to_all_single(out, flat, output_split_sizes=recv_numels,
                               input_split_sizes=[sum(t.numel() for t in per_rank) for per_rank in send],
                               group=mg.group)
        return out.to(self.device)

    def gather(self, blocks: Sequence[Tensor]) -> dict[int, Tensor]:
        """``blocks[k]``: this rank's block of matrix k (``dtype``). Returns ``{k: whole}`` for the
        matrices this rank owns, each of the parameter's full shape. Collective over the mesh."""
        mg, me = self.mesh_group, self.mesh_group.rank
        if len(blocks) != len(self.layouts):
            raise ValueError(f"{len(blocks)} blocks for {len(self.layouts)} matrices")
        send: list[list[Tensor]] = [[] for _ in range(mg.size)]
        for k, block in enumerate(blocks):
            if tuple(block.shape) != self.layouts[k].block_shape(me) or block.dtype != self.dtype:
                raise ValueError(f"block {k} is {block.dtype} {tuple(block.shape)}, expected {self.dtype} "
                                 f"{self.layouts[k].block_shape(me)}")
            if self._sends(k, me):
                send[self.owners[k]].append(block)
        # what arrives from each source: its blocks of my matrices, in matrix order (as it sends them)
        pieces = [[(k, self.layouts[k].block_numel(src)) for k in self.owned if self._sends(k, src)]
                  for src in range(mg.size)]
        out = self._exchange(send, [sum(n for _, n in p) for p in pieces])
        whole = {k: torch.empty(self.layouts[k].shape, dtype=self.dtype, device=self.device) for k in self.owned}
        offset = 0
        for src, per_src in enumerate(pieces):
            for k, n in per_src:
                layout = self.layouts[k]
                whole[k][layout.blocks[src]] = out[offset:offset + n].view(layout.block_shape(src))
                offset += n
        return whole

    def scatter(self, results: dict[int, Tensor], which: Sequence[int] | None = None) -> dict[int, Tensor]:
        """``results[k]``: the whole result (``dtype``, the parameter's shape) of each owned matrix k in
        ``which`` (default: all; the same list on every rank). Returns ``{k: this rank's block}`` for
        every k in ``which``. Collective over the mesh."""
        which = sorted(range(len(self.layouts)) if which is None else set(which))
        mg, me = self.mesh_group, self.mesh_group.rank
        mine = [k for k in which if self.owners[k] == me]
        missing = [k for k in mine if k not in results]
        if missing:
            raise ValueError(f"no result for owned matrices {missing}")
        for k in mine:
            if tuple(results[k].shape) != self.layouts[k].shape:
                raise ValueError(f"result {k} has shape {tuple(results[k].shape)}, expected {self.layouts[k].shape}")
        send = [[results[k].to(self.dtype)[self.layouts[k].blocks[dest]] for k in mine] for dest in range(mg.size)]
        pieces = [[(k, self.layouts[k].block_numel(me)) for k in which if self.owners[k] == src]
                  for src in range(mg.size)]
        out = self._exchange(send, [sum(n for _, n in p) for p in pieces])
        blocks, offset = {}, 0
        for per_src in pieces:
            for k, n in per_src:
                blocks[k] = out[offset:offset + n].view(self.layouts[k].block_shape(me))
                offset += n
        return blocks


class GatheredEverywhere:
    """The general path (any DTensor layout, e.g. FSDP2's strided shards of tensor-parallel weights),
    with :class:`WholeMatrices`'s interface: every rank all-gathers each whole tensor, only its owner
    computes, the owner broadcasts the result and every rank keeps its own block. Traffic: each rank
    receives every tensor twice (vs about once in total for the all-to-all path).

    Args:
        params: the DTensor parameters, all on one mesh; mesh_group: that mesh's :class:`MeshGroup`;
        owners: the owner group rank of each; dtype, device: of the blocks and results.
    """

    def __init__(self, params: Sequence[Tensor], mesh_group: MeshGroup, owners: Sequence[int], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.specs = [(p.device_mesh, tuple(p.placements), p.shape, p.stride()) for p in params]
        self.mesh_group = mesh_group
        self.owners = list(owners)
        self.dtype, self.device = dtype, device
        self.owned = [k for k, o in enumerate(self.owners) if o == mesh_group.rank]
        self.shapes = [tuple(p.shape) for p in params]

    def gather(self, blocks: Sequence[Tensor]) -> dict[int, Tensor]:
        """As :meth:`WholeMatrices.gather` (every rank gathers every tensor; the non-owned are dropped)."""
        from torch.distributed.tensor import DTensor

        whole = {}
        for k, (block, (mesh, placements, shape, stride)) in enumerate(zip(blocks, self.specs)):
            full = DTensor.from_local(block.to(self.dtype), mesh, placements, shape=shape, stride=stride).full_tensor()
            if k in self.owned:
                whole[k] = full
        return whole

    def scatter(self, results: dict[int, Tensor], which: Sequence[int] | None = None) -> dict[int, Tensor]:
        """As :meth:`WholeMatrices.scatter`: one broadcast per result, then each rank's own split."""
        from torch.distributed.tensor import distribute_tensor

        which = sorted(range(len(self.specs)) if which is None else set(which))
        blocks = {}
        for k in which:
            mesh, placements, shape, _ = self.specs[k]
            if self.owners[k] == self.mesh_group.rank:
                full = results[k].to(self.dtype).contiguous()
                if tuple(full.shape) != self.shapes[k]:
                    raise ValueError(f"result {k} has shape {tuple(full.shape)}, expected {self.shapes[k]}")
            else:
                full = torch.empty(self.shapes[k], dtype=self.dtype, device=self.device)
            moved = full.to(self.mesh_group.device)
            dist.broadcast(moved, group=self.mesh_group.group, group_src=self.owners[k])
            # src_data_rank=None: every rank holds the whole result, so it only takes its block
            blocks[k] = distribute_tensor(moved, mesh, placements, src_data_rank=None).to_local().to(self.device)
        return blocks
