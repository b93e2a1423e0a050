"""The `distributed:` section of a run file: launcher environment, process group and device mesh.

``torchrun`` sets ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT``;
OpenMPI's ``mpirun`` sets ``OMPI_COMM_WORLD_RANK``/``_SIZE``/``_LOCAL_RANK``/``_LOCAL_SIZE`` and nothing to
rendezvous with, so ``MASTER_ADDR``/``MASTER_PORT`` come from the environment (``mpirun -x``) or, when
every rank is on this machine, default to 127.0.0.1:29500. The process group is torch's: NCCL on GPUs,
Gloo on CPUs.

The mesh has the dims that are larger than one, in torchtitan's order
``("pp", "dp_replicate", "dp_shard", "cp", "tp")``; their product must equal the world size.

Example::
    cfg = DistributedConfig(dp_shard=-1, tp=2)          # -1: what is left of the world
    ctx = init_parallel(cfg)                            # under `torchrun --nproc-per-node 4`
    ctx.mesh["tp"], ctx.dp_rank, ctx.dp_size            # dp_shard = 2
"""
from __future__ import annotations

import dataclasses
import datetime
import os

import torch
import torch.distributed as dist

MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
STRATEGIES = ("ddp", "fsdp2", "zero", "zero++")
PP_SCHEDULES = ("1f1b", "gpipe", "interleaved_1f1b")


@dataclasses.dataclass(kw_only=True)
class DistributedConfig:
    """How the world is split. ``dp_shard=-1`` takes whatever the other dims leave of the world.

    strategy: how the data-parallel dims hold the model: ``fsdp2`` (sharded; ``sharding_strategy``
    full | shard_grad_op | hybrid | no_shard), ``ddp`` (replicated), ``zero`` (ZeRO ``zero_stage`` 1 | 2 | 3,
    with ``offload_optimizer`` / ``offload_params``: see ``zero.py``) or ``zero++`` (an unwrapped model on
    every rank and ``ZeroPlusPlusOptimizer``; ``zero_plusplus`` holds its ``ZeroPlusPlusConfig`` fields).
    ``pp_schedule``: 1f1b | gpipe | interleaved_1f1b with ``pp_microbatches`` (default: 2 x pp).
    """

    strategy: str = "fsdp2"
    dp_replicate: int = 1
    dp_shard: int = -1
    tp: int = 1
    pp: int = 1
    cp: int = 1
    sharding_strategy: str = "full"
    mixed_precision: bool = False  # fsdp2: bf16 parameters with fp32 gradient reduction
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    sequence_parallel: bool = True
    pp_schedule: str = "1f1b"
    pp_microbatches: int | None = None
    backend: str | None = None  # gloo | nccl; default: nccl on CUDA, gloo otherwise
    timeout_s: float = 1800.0
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    zero_plusplus: dict | None = None  # ZeroPlusPlusConfig fields, e.g. {quantize_gradients: true}

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise ValueError(f"distributed.strategy must be one of {', '.join(STRATEGIES)}, got {self.strategy!r}")
        for name in ("dp_replicate", "tp", "pp", "cp"):
            if getattr(self, name) < 1:
                raise ValueError(f"distributed.{name} must be >= 1, got {getattr(self, name)}")
        if self.dp_shard == 0 or self.dp_shard < -1:
            raise ValueError(f"distributed.dp_shard must be >= 1 or -1 (the rest of the world), got {self.dp_shard}")
        if self.pp_schedule not in PP_SCHEDULES:
            raise ValueError(f"distributed.pp_schedule must be one of {', '.join(PP_SCHEDULES)}, got {self.pp_schedule!r}")
        if self.pp_microbatches is not None and self.pp_microbatches < 1:
            raise ValueError(f"distributed.pp_microbatches must be >= 1, got {self.pp_microbatches}")
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"distributed.backend must be gloo or nccl, got {self.backend!r}")
        if self.replicated and self.dp_shard not in (1, -1):
            raise ValueError(f"distributed.strategy {self.strategy} replicates the model: use dp_replicate, not dp_shard")
        if self.strategy == "zero":
            self.zero_config()  # validates stage and offload
        if self.strategy == "zero++":
            for name in ("tp", "pp", "cp"):
                if getattr(self, name) > 1:
                    raise ValueError(f"distributed.strategy zero++ runs data parallel only; {name} must be 1")
            self.zero_plusplus_config()
        elif self.zero_plusplus is not None:
            raise ValueError("distributed.zero_plusplus is set but strategy is not zero++")

    @property
    def replicated(self) -> bool:
        """Every data-parallel rank holds the whole model: ddp, ZeRO stage 1 and ZeRO++."""
        return self.strategy in ("ddp", "zero++") or (self.strategy == "zero" and self.zero_stage == 1)

    def zero_config(self):
        """The ``ZeROConfig`` of ``strategy: zero``."""
        from nexus.training.distributed.zero import ZeROConfig

        return ZeROConfig(stage=self.zero_stage, offload_optimizer=self.offload_optimizer,
                          offload_params=self.offload_params)

    def zero_plusplus_config(self):
        """The ``ZeroPlusPlusConfig`` of ``strategy: zero++`` (its defaults, updated by ``zero_plusplus``)."""
        from nexus.training.distributed.zero_plusplus import ZeroPlusPlusConfig

        try:
            return ZeroPlusPlusConfig(**(self.zero_plusplus or {}))
        except TypeError as exc:
            raise ValueError(f"distributed.zero_plusplus: {exc}") from None

    def sizes(self, world_size: int) -> dict[str, int]:
        """Each mesh dim's size for ``world_size`` ranks; raises when they do not multiply to it."""
        sizes = {"pp": self.pp, "dp_replicate": self.dp_replicate, "dp_shard": self.dp_shard, "cp": self.cp, "tp": self.tp}
        if self.dp_shard == -1:
            sizes["dp_shard"] = max(world_size // (self.pp * self.dp_replicate * self.cp * self.tp), 1)
        if self.replicated:  # every data-parallel rank is a replica
            sizes["dp_replicate"], sizes["dp_shard"] = sizes["dp_replicate"] * sizes["dp_shard"], 1
        product = 1
        for size in sizes.values():
            product *= size
        if product != world_size:
            shown = " x ".join(f"{d} {sizes[d]}" for d in MESH_DIMS)
            raise ValueError(f"distributed: {shown} = {product} ranks, but the world has {world_size}")
        return sizes


@dataclasses.dataclass(frozen=True)
class LaunchEnv:
    """This process's place in the world, as the launcher said."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launcher: str  # torchrun | mpirun | none


def launch_env() -> LaunchEnv:
    """Read torchrun's or OpenMPI's rank variables; a plain ``python`` run is rank 0 of 1."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        world = int(env["WORLD_SIZE"])
        return LaunchEnv(int(env["RANK"]), world, int(env.get("LOCAL_RANK", 0)),
                         int(env.get("LOCAL_WORLD_SIZE", world)), "torchrun")
    if "OMPI_COMM_WORLD_RANK" in env:
        world = int(env["OMPI_COMM_WORLD_SIZE"])
        return LaunchEnv(int(env["OMPI_COMM_WORLD_RANK"]), world, int(env.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)),
                         int(env.get("OMPI_COMM_WORLD_LOCAL_SIZE", world)), "mpirun")
    return LaunchEnv(0, 1, 0, 1, "none")


def join_process_group(backend: str | None = None, timeout_s: float = 1800.0) -> LaunchEnv:
    """Join the launcher's process group (once); returns where this process stands. No-op for one process."""
    env = launch_env()
    if dist.is_initialized() or env.world_size == 1:
        return env
    if env.launcher == "mpirun":
        if "MASTER_ADDR" not in os.environ:
            if env.local_world_size != env.world_size:
                raise ValueError("mpirun across machines: export MASTER_ADDR (rank 0's address) and MASTER_PORT "
                                 "to every rank, e.g. mpirun -x MASTER_ADDR=node0 -x MASTER_PORT=29500")
            os.environ["MASTER_ADDR"] = "127.0.0.1"  # every rank is on this machine
        os.environ.setdefault("MASTER_PORT", "29500")
        os.environ.update(RANK=str(env.rank), WORLD_SIZE=str(env.world_size), LOCAL_RANK=str(env.local_rank),
                          LOCAL_WORLD_SIZE=str(env.local_world_size))
    use_cuda = torch.cuda.is_available() and backend != "gloo"
    if use_cuda:
        torch.cuda.set_device(env.local_rank % torch.cuda.device_count())
    dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"), rank=env.rank,
                            world_size=env.world_size, timeout=datetime.timedelta(seconds=timeout_s))
    return env


@dataclasses.dataclass
class ParallelContext:
    """The mesh and this rank's coordinates; ``dp_*`` span both data-parallel dims (replicate x shard).

    ``dp_group`` None means the default group (or one process). Rank 0 alone prints, logs and writes
    the files that are not sharded (``is_main``).
    """

    config: DistributedConfig
    sizes: dict[str, int]
    mesh: object | None = None  # a DeviceMesh over the dims of size > 1; None for one process
    rank: int = 0
    world_size: int = 1
    local_world_size: int = 1
    dp_rank: int = 0
    dp_size: int = 1
    dp_group: object | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def single_process() -> ParallelContext:
    config = DistributedConfig(strategy="ddp")
    return ParallelContext(config=config, sizes=config.sizes(1))


def _dp_coordinates(mesh) -> tuple[int, int, object | None]:
    dims = tuple(d for d in ("dp_replicate", "dp_shard") if d in (mesh.mesh_dim_names or ()))
    if not dims:
        return 0, 1, None
    sub = mesh[dims[0]] if len(dims) == 1 else mesh[dims]._flatten("dp")
    return sub.get_local_rank(), sub.size(), sub.get_group()


def build_mesh(config: DistributedConfig, world_size: int, device_type: str):
    """``(sizes, mesh)``: a DeviceMesh over the dims of size > 1 (None when the world is one process)."""
    sizes = config.sizes(world_size)
    if world_size == 1:
        return sizes, None
    from torch.distributed.device_mesh import init_device_mesh

    dims = [d for d in MESH_DIMS if sizes[d] > 1]
    return sizes, init_device_mesh(device_type, tuple(sizes[d] for d in dims), mesh_dim_names=tuple(dims))


def init_parallel(config: DistributedConfig | None = None, device_type: str | None = None) -> ParallelContext:
    """Join the launcher's process group and build the mesh of ``config`` (all data parallel when None)."""
    config = config or DistributedConfig()
    env = join_process_group(config.backend, config.timeout_s)
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() and config.backend != "gloo" else "cpu"
    sizes, mesh = build_mesh(config, env.world_size, device_type)
    ctx = ParallelContext(config=config, sizes=sizes, mesh=mesh, rank=env.rank, world_size=env.world_size,
                          local_world_size=env.local_world_size)
    if mesh is not None:
        ctx.dp_rank, ctx.dp_size, ctx.dp_group = _dp_coordinates(mesh)
    return ctx


def current_context() -> ParallelContext:
    """For a process group started elsewhere (a user's own launch code): every rank data parallel."""
    if not (dist.is_available() and dist.is_initialized()):
        return single_process()
    world, rank = dist.get_world_size(), dist.get_rank()
    config = DistributedConfig(strategy="ddp")
    return ParallelContext(config=config, sizes=config.sizes(world), rank=rank, world_size=world,
                           local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world)), dp_rank=rank,
                           dp_size=world)
