"""Data parallel on torch.distributed: step time and bytes communicated for DDP, FSDP2, ZeRO and ZeRO++, and
per-rank memory.

1. Step time and bytes per optimizer step (forward, multi-token loss, backward, AdamW) of a small
   ``MoETransformer`` (fp32) at 2 and 4 Gloo ranks on 127.0.0.1: DDP (``wrap_data_parallel``),
   FSDP2 (``wrap_model_fsdp2``) with ``full`` (= ZeRO-3), ``shard_grad_op`` (= ZeRO-2), ``no_shard`` and, from
   4 ranks, ``hybrid`` (2 nodes x world/2); ZeRO-1 (DDP + torch's ``ZeroRedundancyOptimizer``); and
   ``ZeroPlusPlusOptimizer`` with ``module=`` (parameters partitioned) twice: unquantized without hpZ (plain
   ZeRO-3 on the same machinery) and ZeRO++ (int8 weights, int4 gradients, hpZ), with nodes of world/2
   ranks (of 1 rank at 2 ranks), whose cross-node bytes (counted by ``comm_stats``) are set side by side.
   All arms live in one process group and are timed in alternation
   with DDP (``--pairs`` rounds, each timing every arm once; ``ratio`` = time / DDP time of the same
   round, median with min and max). A timing is the slowest rank's seconds per step over ``--steps``
   steps, started together after a barrier.
   Bytes are counted where the collectives run (see ``CollectiveCounter``) over one more step per
   arm, per collective kind, per rank, and set beside what the model's shapes predict: ``expected``
   (the exact payload FSDP2's and DDP's rules give, dim-0 padding included: the table checks itself)
   and ``textbook`` wire bytes per rank for a ring (DDP 2(N-1)/N x P; FSDP2 full 3(N-1)/N x P:
   all-gather in forward and again in backward, reduce-scatter of the gradients).
2. Per-rank memory of parameters, gradients and AdamW state of the 5B model (``configs/training_dolma.yaml``)
   at 1, 2, 4, 8 ranks, from its parameter shapes on the meta device: FSDP2 full sharding divides
   all three by N, DDP does not; beside seed 002's "7B: 84 GB / N" table and its 12-bytes-per-parameter rule.
3. With two or more CUDA GPUs, part 1 again on NCCL; otherwise a line saying NCCL figures need GPUs.

    PYTHONPATH=. python bench/distributed.py                      # Gloo at 2 and 4 ranks, small model
    PYTHONPATH=. python bench/distributed.py --ranks 2 --size tiny --steps 1
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib
import math
import os
import pickle
import socket
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bench._common import RATIO_NOTE, add_pair_arguments, compare, positive_int_arg, print_table, setup, write_json
from nexus.models.moe import MoEConfig, MoETransformer
from nexus.training.losses import multi_token_prediction_loss

ROOT = Path(__file__).resolve().parents[1]
DOLMA_CONFIG = ROOT / "configs" / "training_dolma.yaml"

# Every feature of the model on (MoE, MoD, routing Mamba, a multi-token head), sized for a CPU.
SIZES: dict[str, dict[str, Any]] = {
    "tiny": dict(model=dict(vocab_size=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=32, n_experts=4,
                            moe_top_k=2, max_seq_len=32, n_pred_tokens=2, mod_layer_interval=2,
                            mamba_layer_interval=2, mamba_head_dim=16, mamba_d_state=8, mamba_chunk_size=16),
                 seq_len=16, batch=2),
    "small": dict(model=dict(vocab_size=1024, d_model=128, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=128, n_experts=4,
                             moe_top_k=2, max_seq_len=64, n_pred_tokens=2, mod_layer_interval=2,
                             mamba_layer_interval=4, mamba_head_dim=32, mamba_d_state=16, mamba_chunk_size=32),
                  seq_len=64, batch=2),
}

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all", "other")
MB = 1e6
GB = 1e9

# Memory rule of part 2: fp32 parameters (4 B), fp32 gradients (4 B), AdamW exp_avg + exp_avg_sq in fp32 (8 B).
# AdamW's per-tensor ``step`` scalar (one per parameter tensor, not per element) is left out.
BYTES_PER_PARAM = {"params": 4, "grads": 4, "adamw": 8}
SEED_RULE_BYTES = 12  # seed 002: 7B -> 84 GB on 1 GPU = 12 bytes per parameter
SEED_002_7B_GB = {1: 84.0, 2: 42.0, 4: 21.0, 8: 10.5}
SEVEN_B = 7_000_000_000


# ---- counting bytes ---------------------------------------------------------------------------

def _tensors(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


# c10d op name -> (kind, index of the argument whose bytes are the collective's payload): the whole
# buffer an all-reduce or broadcast works on, the gathered output of an all-gather, the input of a
# reduce-scatter or all-to-all.
_C10D_OPS = {
    "allreduce_": ("all_reduce", 0), "allreduce_coalesced_": ("all_reduce", 0),
    "_allgather_base_": ("all_gather", 0), "allgather_": ("all_gather", 0),
    "allgather_into_tensor_coalesced_": ("all_gather", 0), "allgather_coalesced_": ("all_gather", 0),
    "_reduce_scatter_base_": ("reduce_scatter", 1), "reduce_scatter_": ("reduce_scatter", 1),
    "reduce_scatter_tensor_coalesced_": ("reduce_scatter", 1),
    "broadcast_": ("broadcast", 0),
    "alltoall_base_": ("all_to_all", 1), "alltoall_": ("all_to_all", 1),
}
_NOT_DATA = {"barrier", "monitored_barrier_"}


def ring_wire_bytes(kind: str, payload: int, group_size: int) -> float:
    """Bytes one rank sends for a ``payload``-byte collective over ``group_size`` ranks with ring algorithms:
    all-reduce 2(n-1)/n (reduce-scatter then all-gather), the others (n-1)/n."""
    if group_size <= 1:
        return 0.0
    share = (group_size - 1) / group_size
    return payload * (2 * share if kind == "all_reduce" else share)


class CollectiveCounter(TorchDispatchMode):
    """Bytes per collective kind that this rank passes to torch.distributed while the mode is active.

    Why a dispatch mode over the ``c10d`` ops: DDP's gradient all-reduce is launched by its C++ reducer,
    so patching ``torch.distributed.all_reduce`` and friends in Python sees none of it (checked: zero
    bytes for DDP); FSDP2 on torch 2.13 calls ``dist.all_gather_single`` / ``dist.reduce_scatter_single``
    (and ``dist.all_reduce`` across HSDP replicas), which all reach the dispatcher as ``c10d`` ops, as
    does the reducer. ``torch.distributed.tensor.debug.CommDebugMode`` also sees these ops but counts
    calls, not bytes, and its module tracker raises IndexError on the MoE model's forward (torch 2.13).
    The mode adds Python work to every op, so counted steps are never timed steps.

    After a step: ``payload[kind]`` bytes (whole buffer per collective, see ``_C10D_OPS``), ``calls[kind]``
    and ``wire[kind]`` (ring bytes sent by this rank, from each op's process-group size).

    Example::
        with CollectiveCounter() as counter: train_step()
        counter.payload["all_reduce"]  # DDP: 4 bytes x trainable parameters (fp32 gradients)
    """

    def __init__(self) -> None:
        super().__init__()
        self.payload: Counter[str] = Counter()
        self.wire: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "c10d":
            name = func._opname
            if name not in _NOT_DATA:
                kind, index = _C10D_OPS.get(name, ("other", None))
                tensors = _tensors(args[index]) if index is not None else _tensors(list(args))
                nbytes = sum(t.numel() * t.element_size() for t in tensors)
                size = self._group_size(args)
                self.payload[kind] += nbytes
                self.wire[kind] += ring_wire_bytes(kind, nbytes, size)
                self.calls[kind] += 1
        return func(*args, **kwargs)

    @staticmethod
    def _group_size(args: Sequence[Any]) -> int:
        for a in args:
            if isinstance(a, torch.ScriptObject):
                try:
                    return dist.ProcessGroup.unbox(a).size()
                except (RuntimeError, TypeError):  # a script object that is not a process group (e.g. ReduceOp)
                    continue
        return dist.get_world_size()


# ---- what the shapes predict -------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Arm:
    """One data-parallel wrapping: ``ddp``, or ``fsdp2`` with a sharding strategy (hybrid: ``node_size`` ranks
    per node)."""

    name: str
    kind: str  # ddp | fsdp2 | zero1 | zeropp
    strategy: str | None = None
    node_size: int | None = None
    quantized: bool = False  # zeropp: int8 weights, int4 gradients and hpZ


def arms_for(world: int) -> list[Arm]:
    """DDP (the baseline), then FSDP2 full, shard_grad_op, no_shard, and hybrid (2 nodes) where the world is
    even and >= 4."""
    arms = [Arm("DDP", "ddp"), Arm("FSDP2 full", "fsdp2", "full"),
            Arm("FSDP2 shard_grad_op", "fsdp2", "shard_grad_op"), Arm("FSDP2 no_shard", "fsdp2", "no_shard")]
    if world >= 4 and world % 2 == 0:
        node = world // 2
        arms.append(Arm(f"FSDP2 hybrid 2x{node}", "fsdp2", "hybrid", node))
    node = world // 2 if world >= 4 and world % 2 == 0 else 1
    arms += [Arm("ZeRO-1", "zero1"), Arm("ZeRO-3 (ZeRO++ code, unquantized)", "zeropp", node_size=node),
             Arm(f"ZeRO++ int8/int4 hpZ (nodes of {node})", "zeropp", node_size=node, quantized=True)]
    return arms


def _padded_numel(p: torch.Tensor, shards: int) -> int:
    """Elements of ``p`` once FSDP2 has sharded dim 0 into ``shards`` equal chunks (the last padded)."""
    shape = tuple(p.shape) or (1,)
    return math.ceil(shape[0] / shards) * shards * math.prod(shape[1:])


def expected_bytes(arm: Arm, model: nn.Module, world: int) -> dict[str, int]:
    """Payload bytes per collective kind for one step of ``arm`` on ``model`` (unwrapped) over ``world`` ranks.

    DDP: one all-reduce of every trainable gradient (its buckets hold exactly those), plus a broadcast of
    the buffers before each forward. FSDP2 (each block of ``find_blocks`` and the root are one unit; the
    shard group has s ranks, the replicate group r = world / s): each unit's padded flat buffer is
    all-gathered in forward and again in backward when the unit resharded after forward (full and
    hybrid: every block but the last; never the root, torch's default), reduce-scattered once, and
    its 1/s shard all-reduced across replicas when r > 1; with s = 1 (no_shard) FSDP2 skips the
    all-gather and reduce-scatter.
    """
    from nexus.training.distributed.fsdp2 import FSDP2Config, find_blocks

    params = [p for p in model.parameters() if p.requires_grad]
    if arm.kind in ("ddp", "zero1"):
        buffers = sum(b.numel() * b.element_size() for b in model.buffers())
        grads = sum(p.numel() * p.element_size() for p in params)
        # ZeRO-1: each updated parameter is broadcast once from the rank that owns its optimizer state
        out = {"all_reduce": grads, "broadcast": buffers + (grads if arm.kind == "zero1" else 0)}
        return {k: v for k, v in out.items() if v}
    if arm.kind == "zeropp":
        return {}  # padded, quantized rows: its own comm_stats() gives the bytes
    shard = {"hybrid": arm.node_size, "no_shard": 1}.get(arm.strategy, world)
    replicate = world // shard
    config = FSDP2Config(sharding_strategy=arm.strategy, mixed_precision=False, node_size=arm.node_size)
    blocks = find_blocks(model)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    units = [(list(b.parameters()), config.block_reshard_after_forward() is True and i < len(blocks) - 1)
             for i, b in enumerate(blocks)]
    units.append(([p for p in model.parameters() if id(p) not in in_blocks], False))
    out = Counter()
    for unit_params, regathered in units:
        nbytes = sum(_padded_numel(p, shard) * p.element_size() for p in unit_params if p.requires_grad)
        if shard > 1:
            out["all_gather"] += nbytes * (2 if regathered else 1)
            out["reduce_scatter"] += nbytes
        if replicate > 1:
            out["all_reduce"] += nbytes // shard
    return dict(out)


def textbook_wire_bytes(arm: Arm, param_bytes: int, world: int) -> float:
    """Ring bytes sent per rank by the usual rule of thumb: DDP and no_shard 2(N-1)/N P; full 3(N-1)/N P;
    shard_grad_op 2(N-1)/N P; hybrid 3(s-1)/s P within a node plus 2(r-1)/r P/s across nodes."""
    def share(n: int) -> float:
        return (n - 1) / n

    if arm.kind == "zero1":  # DDP's all-reduce, then each updated parameter broadcast from its owner
        return 3 * share(world) * param_bytes
    if arm.kind == "ddp" or arm.strategy == "no_shard":
        return 2 * share(world) * param_bytes
    if arm.kind == "zeropp":
        return 3 * share(world) * param_bytes if not arm.quantized else float("nan")
    if arm.strategy == "full":
        return 3 * share(world) * param_bytes
    if arm.strategy == "shard_grad_op":
        return 2 * share(world) * param_bytes
    s, r = arm.node_size, world // arm.node_size
    return 3 * share(s) * param_bytes + 2 * share(r) * param_bytes / s


# ---- the ranks ----------------------------------------------------------------------------------

def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (bound to port 0, then released for the rendezvous to take)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, world: int, port: int, backend: str, threads: int, timeout: float,
                fn: Callable[..., Any], args: tuple, out_path: str) -> None:
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # Gloo's own sockets on loopback only
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    kwargs = {}
    if backend == "nccl":
        torch.cuda.set_device(rank)
        kwargs["device_id"] = torch.device("cuda", rank)
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout), **kwargs)
    result = fn(rank, world, *args)
    if rank == 0:
        Path(out_path).write_bytes(pickle.dumps(result))
    dist.barrier()  # no rank tears Gloo down while a peer still talks to it
    dist.destroy_process_group()


def spawn(fn: Callable[..., Any], world: int, args: tuple = (), *, backend: str = "gloo", threads: int = 1,
          timeout: float = 600.0) -> Any:
    """Run ``fn(rank, world, *args)`` in ``world`` processes (torch.multiprocessing, spawn) joined in one
    process group on 127.0.0.1; return rank 0's result. ``fn`` must be a module-level function.

    A rank that raises ends the run with its traceback (``ProcessRaisedException``); a run still going
    after ``timeout`` seconds is killed (TimeoutError).
    """
    import torch.multiprocessing as mp

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="nexus_bench_dist_") as tmp:
        out_path = os.path.join(tmp, "rank0.pkl")
        context = mp.start_processes(_rank_entry, args=(world, port, backend, threads, timeout, fn, args, out_path),
                                     nprocs=world, join=False, start_method="spawn")
        deadline = time.monotonic() + timeout
        while not context.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
            if time.monotonic() > deadline:
                for p in context.processes:
                    if p.is_alive():
                        p.kill()
                raise TimeoutError(f"{world} {backend} ranks still running after {timeout:.0f} s")
        return pickle.loads(Path(out_path).read_bytes())


def _build(arm: Arm, settings: dict, device: torch.device) -> tuple[nn.Module, nn.Module, torch.optim.Optimizer]:
    """(wrapped model, the same model unwrapped on the meta device, AdamW over the wrapped parameters)."""
    from nexus.training.distributed.data_parallel import wrap_data_parallel
    from nexus.training.distributed.fsdp2 import FSDP2Config, wrap_model_fsdp2

    torch.manual_seed(settings["seed"])  # the same initial weights in every arm and on every rank
    plain = MoETransformer(MoEConfig(**settings["model"])).to(device)
    with torch.device("meta"):  # shapes only, for expected_bytes
        reference = MoETransformer(MoEConfig(**settings["model"]))
    if arm.kind == "zero1":
        from nexus.training.distributed.zero import partition_optimizer_state

        model = wrap_data_parallel(plain)
        return model, reference, partition_optimizer_state(torch.optim.AdamW(model.parameters(), lr=1e-3))
    if arm.kind == "zeropp":
        from nexus.training.distributed.zero_plusplus import ZeroPlusPlusConfig, ZeroPlusPlusOptimizer

        q = arm.quantized
        config = ZeroPlusPlusConfig(quantize_weights=q, quantize_gradients=q, hierarchical_partition=q,
                                    node_size=arm.node_size)
        return plain, reference, ZeroPlusPlusOptimizer(plain.parameters(), base_optimizer=torch.optim.AdamW,
                                                       config=config, module=plain, lr=1e-3)
    if arm.kind == "ddp":
        model = wrap_data_parallel(plain)
    else:
        config = FSDP2Config(sharding_strategy=arm.strategy, mixed_precision=True, param_dtype=torch.float32,
                             reduce_dtype=torch.float32, node_size=arm.node_size)
        model = wrap_model_fsdp2(plain, config)
    return model, reference, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _bench_rank(rank: int, world: int, settings: dict) -> dict:
    """One rank of part 1: build every arm, time them in alternation with DDP, count one step of each.

    ``settings``: model (MoEConfig kwargs), seq_len, batch (per rank), seed, steps, warmup, pairs,
    max_spread. Returns (rank 0's is used) per-arm times, comparison cells, counted and expected bytes.
    """
    backend = dist.get_backend()
    device = torch.device("cuda", rank) if backend == "nccl" else torch.device("cpu")
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    n_pred = settings["model"]["n_pred_tokens"]
    gen = torch.Generator().manual_seed(1000 * settings["seed"] + rank)  # each rank its own slice of the batch
    window = torch.randint(0, settings["model"]["vocab_size"], (settings["batch"], settings["seq_len"] + n_pred),
                           generator=gen).to(device)

    def step_fn(model, opt):
        def step():
            out = model(window[:, :settings["seq_len"]])
            loss, _, _ = multi_token_prediction_loss(out.logits, out.mtp_logits, window)
            (loss + out.aux_loss).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    arms = arms_for(world)
    built = {arm.name: _build(arm, settings, device) for arm in arms}
    steps = {name: step_fn(model, opt) for name, (model, _, opt) in built.items()}

    def measure(fn) -> float:
        dist.barrier()
        sync()
        start = time.perf_counter()
        for _ in range(settings["steps"]):
            fn()
        sync()
        seconds = torch.tensor([(time.perf_counter() - start) / settings["steps"]], dtype=torch.float64, device=device)
        dist.all_reduce(seconds, op=dist.ReduceOp.MAX)  # a step lasts until its slowest rank is done
        return seconds.item()

    result = compare(steps, baseline=arms[0].name, measure=measure, pairs=settings["pairs"],
                     warmup=settings["warmup"], max_spread=settings["max_spread"])

    counted = {}
    for arm in arms:
        if arm.name in result.errors:
            continue
        dist.barrier()
        with CollectiveCounter() as counter:
            steps[arm.name]()
        mine = {"payload": dict(counter.payload), "wire": dict(counter.wire), "calls": dict(counter.calls)}
        reference, opt = built[arm.name][1], built[arm.name][2]
        if arm.kind == "zeropp":  # bytes sent in that step, as the optimizer counted them at its calls
            stats = opt.comm_stats()
            mine["sent"], mine["cross_node"] = stats["bytes"], stats["cross_node_bytes"]
        every = [None] * world
        dist.all_gather_object(every, mine)
        param_bytes = sum(p.numel() * p.element_size() for p in reference.parameters() if p.requires_grad)
        counted[arm.name] = {**mine, "same_on_all_ranks": all(e == mine for e in every),
                             "expected": expected_bytes(arm, reference, world), "param_bytes": param_bytes,
                             "params": sum(p.numel() for p in reference.parameters()),
                             "textbook_wire": textbook_wire_bytes(arm, param_bytes, world)}
    return {"arms": [dataclasses.asdict(a) for a in arms], "times": result.times, "errors": result.errors,
            "cells": {a.name: result.cells(a.name) for a in arms}, "comparisons": result.to_json(f"{backend} x{world}"),
            "counted": counted}


def comm_rows(backend: str, world: int, outcome: dict) -> list[dict[str, Any]]:
    """Table rows (one per arm) from rank 0's ``_bench_rank`` result; raw bytes kept under ``bytes_*`` keys."""
    rows = []
    for arm in outcome["arms"]:
        name = arm["name"]
        row: dict[str, Any] = {"table": "comm", "backend": backend, "ranks": world, "impl": name}
        if name in outcome["errors"]:
            rows.append({**row, **outcome["cells"][name]})
            continue
        c = outcome["counted"][name]
        counted, expected = sum(c["payload"].values()), sum(c["expected"].values())
        if "sent" in c:
            row.update({"sent MB/rank": c["sent"] / MB, "cross-node MB/rank": c["cross_node"] / MB})
        wire = sum(c["wire"].values())
        row.update({"ms": 1e3 * statistics.median(outcome["times"][name]), **outcome["cells"][name]})
        row.update({f"{k} MB": c["payload"].get(k, 0) / MB for k in KINDS})
        row.update({"counted MB": counted / MB, "expected MB": expected / MB,
                    "counted/expected": counted / expected if expected else float("nan"),
                    "expected": bool(expected),
                    "wire MB/rank": wire / MB, "textbook MB/rank": c["textbook_wire"] / MB,
                    "wire/textbook": wire / c["textbook_wire"] if c["textbook_wire"] else float("nan"),
                    "same on all ranks": c["same_on_all_ranks"], "params": c["params"],
                    "bytes_counted": c["payload"], "bytes_expected": c["expected"], "bytes_wire": c["wire"],
                    "bytes_textbook_wire": c["textbook_wire"], "calls": c["calls"]})
        rows.append(row)
    return rows


# ---- memory of the 5B model ----------------------------------------------------------------------

def load_model_section(path: Path = DOLMA_CONFIG) -> dict[str, Any]:
    """The ``model:`` section of a run file, as MoEConfig keyword arguments."""
    import yaml

    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise ValueError(f"{path} has no 'model:' section")
    return data["model"]


def memory_rows(model_config: dict[str, Any], ranks: Sequence[int] = (1, 2, 4, 8)) -> list[dict[str, Any]]:
    """Per-rank bytes of parameters, gradients and AdamW state (``BYTES_PER_PARAM``) of the model built
    on the meta device, under FSDP2 full sharding (divided by N; plus the dim-0 padding FSDP2 adds) and
    DDP (whole), beside seed 002's 7B table and its 12-bytes-per-parameter rule; pure arithmetic."""
    with torch.device("meta"):
        model = MoETransformer(MoEConfig(**model_config))
    shapes = [p for p in model.parameters()]
    n_params = sum(p.numel() for p in shapes)
    per_param = sum(BYTES_PER_PARAM.values())
    rows = []
    for n in ranks:
        row: dict[str, Any] = {"table": "memory", "ranks": n, "params": n_params,
                               "seed 002 7B GB": SEED_002_7B_GB.get(n, ""),
                               "7B @12B/param GB": SEVEN_B * SEED_RULE_BYTES / n / GB,
                               f"{n_params / 1e9:.2f}B @12B/param GB": n_params * SEED_RULE_BYTES / n / GB}
        for part, nbytes in BYTES_PER_PARAM.items():
            row[f"FSDP {part} GB"] = n_params * nbytes / n / GB
            row[f"bytes_fsdp_{part}"] = -(-n_params * nbytes // n)
        row["bytes_fsdp_total"] = -(-n_params * per_param // n)
        padded = sum(math.ceil((tuple(p.shape) or (1,))[0] / n) * math.prod(p.shape[1:]) for p in shapes)
        row["bytes_fsdp_padded_total"] = padded * per_param
        row["bytes_ddp_total"] = n_params * per_param
        row[f"FSDP total GB ({per_param}B/param)"] = row["bytes_fsdp_total"] / GB
        row["FSDP padded GB"] = row["bytes_fsdp_padded_total"] / GB
        row["DDP GB"] = row["bytes_ddp_total"] / GB
        rows.append(row)
    return rows


# ---- main ---------------------------------------------------------------------------------------

def _ranks_arg(text: str) -> list[int]:
    try:
        ranks = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--ranks must be comma-separated ints such as 2,4 (got {text!r})")
    if not ranks or any(r < 2 for r in ranks):
        raise argparse.ArgumentTypeError(f"--ranks needs world sizes >= 2 (got {text!r})")
    return ranks


def run_backend(backend: str, ranks: Sequence[int], settings: dict, *, threads: int,
                timeout: float) -> tuple[list, list]:
    """Part 1 on ``backend`` at each world size: (rows, comparisons)."""
    # by module path, so the ranks unpickle them the same way under `python bench/distributed.py` and `nexus bench`
    module = importlib.import_module("bench.distributed")
    rows, comparisons = [], []
    for world in ranks:
        print(f"{backend}: {world} ranks ...", flush=True)
        outcome = module.spawn(module._bench_rank, world, (settings,), backend=backend, threads=threads,
                               timeout=timeout)
        rows += comm_rows(backend, world, outcome)
        comparisons += outcome["comparisons"]
    return rows, comparisons


TIME_COLUMNS = ["backend", "ranks", "impl", "ms", "ratio", "min", "max", "verdict"]


def _bytes_columns(rows: list[dict]) -> list[str]:
    kinds = [f"{k} MB" for k in KINDS if any(r.get(f"{k} MB") for r in rows)]
    return (["backend", "ranks", "impl", *kinds, "counted MB", "expected MB", "counted/expected", "wire MB/rank",
             "textbook MB/rank", "wire/textbook", "sent MB/rank", "cross-node MB/rank", "same on all ranks"])


def zero_plusplus_cut(rows: list[dict]) -> list[dict[str, Any]]:
    """Per backend and world size: ZeRO++'s bytes over plain ZeRO-3's (both counted by ``comm_stats``), all
    bytes and those crossing nodes; the seeds promise a 4x cut (a ratio <= 0.25)."""
    out = []
    for (backend, world) in sorted({(r["backend"], r["ranks"]) for r in rows}):
        mine = {r["impl"].split(" ")[0]: r for r in rows if (r["backend"], r["ranks"]) == (backend, world)
                and "sent MB/rank" in r}
        if {"ZeRO-3", "ZeRO++"} <= set(mine):
            plain, pp = mine["ZeRO-3"], mine["ZeRO++"]
            out.append({"table": "zero++", "backend": backend, "ranks": world,
                        "ZeRO-3 MB/rank": plain["sent MB/rank"], "ZeRO++ MB/rank": pp["sent MB/rank"],
                        "bytes ratio": pp["sent MB/rank"] / plain["sent MB/rank"],
                        "ZeRO-3 cross-node MB": plain["cross-node MB/rank"],
                        "ZeRO++ cross-node MB": pp["cross-node MB/rank"],
                        "cross-node ratio": pp["cross-node MB/rank"] / plain["cross-node MB/rank"]})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=_ranks_arg, default=[2, 4], help="world sizes, comma-separated (default 2,4)")
    parser.add_argument("--size", choices=sorted(SIZES), default="small", help="model preset (default small)")
    parser.add_argument("--steps", type=positive_int_arg("--steps"), default=2, help="optimizer steps per timing (default 2)")
    parser.add_argument("--warmup", type=positive_int_arg("--warmup"), default=1, help="untimed steps per arm first (default 1)")
    parser.add_argument("--timeout", type=float, default=900.0,
                        help="seconds per world size before the ranks are killed")
    parser.add_argument("--memory-config", default=str(DOLMA_CONFIG), help="run file whose model: section part 2 sizes")
    add_pair_arguments(parser)
    args = parser.parse_args()

    env = setup("cpu", measure_bandwidth=False, no_gpu_note=None)
    threads = args.threads or 1  # several ranks share the CPU: one thread each unless told otherwise
    preset = SIZES[args.size]
    settings = {"model": preset["model"], "seq_len": preset["seq_len"], "batch": preset["batch"], "seed": 0,
                "steps": args.steps, "warmup": args.warmup, "pairs": args.pairs, "max_spread": args.max_spread}
    n_params = MoETransformer(MoEConfig(**preset["model"])).num_parameters()
    print(f"model {args.size}: {n_params / 1e6:.3f}M parameters (fp32), batch {preset['batch']} x {preset['seq_len']} "
          f"tokens per rank, AdamW; {threads} torch thread(s) per rank")
    print(RATIO_NOTE.format(baseline="DDP", pairs=args.pairs, spread=args.max_spread))
    cores = os.cpu_count() or 1
    if max(args.ranks) * threads > cores:
        print(f"note: {max(args.ranks)} ranks x {threads} thread(s) on {cores} CPU cores: ranks take turns on the "
              "cores, so step times include waiting for a core; the bytes do not depend on it")

    rows, comparisons = run_backend("gloo", args.ranks, settings, threads=threads, timeout=args.timeout)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    nccl_ranks = [r for r in args.ranks if r <= gpus]
    if nccl_ranks:
        nccl_rows, nccl_comparisons = run_backend("nccl", nccl_ranks, settings, threads=threads, timeout=args.timeout)
        rows += nccl_rows
        comparisons += nccl_comparisons
    nccl_note = (f"NCCL at {nccl_ranks} ranks" if nccl_ranks else
                 f"NCCL figures need GPUs: {gpus} CUDA device(s) here, at least 2 needed (one per rank)")

    print("\nStep time (one optimizer step: forward, loss, backward, AdamW; slowest rank):")
    print_table(rows, TIME_COLUMNS)
    print("\nBytes per optimizer step and rank (MB = 1e6 bytes): payload = whole buffer of each collective "
          "(all-gather: output, reduce-scatter: input); expected = what the shapes and FSDP2/DDP's rules predict; "
          "wire = ring bytes sent by one rank; textbook = DDP 2(N-1)/N P, full 3(N-1)/N P, shard_grad_op 2(N-1)/N P, "
          "hybrid 3(s-1)/s P + 2(r-1)/r P/s, ZeRO-1 3(N-1)/N P; sent and cross-node: ZeroPlusPlusOptimizer.comm_stats():")
    print_table(rows, _bytes_columns(rows))
    cut = zero_plusplus_cut(rows)
    print("\nZeRO++ (int8 weights, int4 gradients, hpZ) over plain ZeRO-3 on the same code, bytes sent per rank and "
          "step (seeds: 4x less, ratio <= 0.25):")
    print_table(cut, [c for c in cut[0] if c != "table"] if cut else ["backend"])
    print(nccl_note)

    model_config = load_model_section(Path(args.memory_config))
    memory = memory_rows(model_config)
    n5 = memory[0]["params"]
    print(f"\nPer-rank memory, {n5 / 1e9:.2f}B parameters ({args.memory_config}, meta device): "
          f"FSDP2 full = (params {BYTES_PER_PARAM['params']} + grads {BYTES_PER_PARAM['grads']} + AdamW "
          f"{BYTES_PER_PARAM['adamw']}) bytes / N; DDP keeps all on every rank; GB = 1e9 bytes. "
          f"Seed 002's 7B table is {SEED_RULE_BYTES} bytes per parameter / N:")
    print_table(memory, [c for c in memory[0] if not c.startswith("bytes_") and c not in ("table", "params")])

    write_json("distributed", rows + cut + memory, info=env.info, comparisons=comparisons,
               config={**settings, "size": args.size, "ranks": args.ranks, "threads_per_rank": threads,
                       "nccl_ranks": nccl_ranks, "nccl_note": nccl_note, "memory_config": args.memory_config,
                       "memory_params": n5, "bytes_per_param": BYTES_PER_PARAM, "seed_rule_bytes": SEED_RULE_BYTES})


if __name__ == "__main__":
    main()
