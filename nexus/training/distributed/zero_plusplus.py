"""ZeRO++ (Wang et al., 2023, "ZeRO++: Extremely Efficient Collective Communication for Giant Model
Training") on torch.distributed, as an optimizer wrapped around an elementwise base optimizer.

What each rank holds. Every param group is flattened into one padded buffer laid out as ``W`` rows
(``W`` ranks): each parameter is padded with zeros and cut into ``W`` equal slices, and row ``r`` is the
concatenation of slice ``r`` of every parameter (the groups' columns side by side). With quantization
on, a slice is a whole number of quantization blocks (``ceil(numel / W)`` rounded up to
``block_size``), so every block, and its one scale, belongs to one parameter: a LayerNorm weight near
1 never sets the scale of a neighbouring matrix's 0.02-sized entries (the price: up to
``block_size - 1`` padding entries per parameter and rank, sent as zeros; small parameters may sit
on the first ranks only). Rank ``r`` owns row ``r``: the fp32 master copy of those entries and the
base optimizer's state for them (the base optimizer runs on the row, one flat tensor per param
group, so it must be elementwise: AdamW, Adam, SGD, Lion, ...). Parameters with
``requires_grad=False`` are left alone, as a torch optimizer leaves them.

One step (``optimizer.step()`` after ``loss.backward()``):

1. Gradients (each rank's own ``p.grad``, from its own micro-batch) laid out as the same ``W`` rows.
   - Unquantized: one reduce-scatter (row ``r`` summed onto rank ``r``), divided by ``W``.
   - qgZ: each row (the chunk destined for one peer) is quantized on its own (int4 by default, one
     packed row per destination), ONE all-to-all moves them, each rank dequantizes what it got and
     averages in fp32. The quantization error enters once (ZeRO++'s point: a ring reduce-scatter
     would re-quantize at every hop). A rank's own row never travels and stays exact.
   - Error feedback: each rank keeps what quantization lost on its rows (the residual) and adds it
     to the next step's gradient before quantizing, so errors do not accumulate over steps:
     sum_t sent_t = sum_t grad_t + r_0 - r_T.
2. The base optimizer steps its shard (hyperparameters copied from ``param_groups`` first, so LR
   schedulers that set ``group["lr"]`` work).
3. Weights out. Without ``module``: each rank's updated row is all-gathered (qwZ: quantized, int8 by
   default) and every rank writes the dequantized full weights into the model's parameters (the
   fp32 master stays exact on its owner). With ``module`` (ZeRO-3): parameters stay freed until a
   block's forward needs them.

ZeRO-3 / hpZ (``module=model``). The blocks are FSDP2's units: each transformer block of
``fsdp2.find_blocks`` (``layers``, MTP heads) with all its parameters, and the root with the rest
(embeddings, final norm, head; a tied weight once); a model without a block list gets one block per
submodule that owns parameters directly. A forward pre-hook gathers the block's parameters (the world-wide qwZ all-gather of the owners'
master slices), a forward hook frees them again (``p.data`` becomes an empty tensor) and wraps the
block's outputs in an identity autograd function whose backward re-gathers them before the block's
backward runs; each parameter's post-accumulate-grad hook frees the block once all its gradients
are in (any block still gathered is freed when the backward pass ends). Saved activations refer to
the parameter objects, whose storage is swapped back in place, so autograd sees full weights.
Re-gathers dequantize the same bytes, so forward and backward use identical weights.
hpZ: when the forward gather arrives, each rank keeps the packed rows of a secondary partition over
its node (rows ``r`` with ``r % L == local_rank``, ``L`` ranks per node); the backward re-gather is an
all-gather of those rows inside the node only, never across nodes. Without ``module``, hpZ has no
backward gather to save and changes nothing.

Bytes (``comm_stats()``): counted where each collective is called, as the bytes this rank sends if
every peer's share goes straight to it (what a ring all-gather / reduce-scatter also sends per rank);
``cross_node`` counts the shares that go to ranks of other nodes. Per step with ``P`` fp32 parameters
on ``W`` ranks in nodes of ``L``, plain ZeRO-3 sends ``3 (W-1) 4P/W`` bytes per rank (forward gather,
backward gather, reduce-scatter), ``3 (W-L) 4P/W`` of them across nodes; ZeRO++ (int8, int4, hpZ)
sends ``(W-L) P/W (1 + 4/128) + (W-L) P/(2W) (1 + 8/128)`` across nodes: about 1/8 of ZeRO-3's.

What the Trainer must do differently:

- Clip with ``optimizer.clip_grad_norm_(max_norm)``: the norm of the averaged gradient over all
  shards. ``torch.nn.utils.clip_grad_norm_`` on the model would see only this rank's local gradient.
- No DDP/FSDP wrapper: the optimizer averages the gradients itself (an unwrapped model on every rank).
- Checkpoints: ``optimizer.state_dict()`` is whole and identical on every rank (save it from rank 0);
  ``load_state_dict`` re-slices it for any world size. With ``module=`` the model's parameters are
  freed between blocks: read weights inside ``with optimizer.gathered_parameters():`` (exact fp32
  masters, e.g. for ``model.state_dict()`` or evaluation).

Limits:

- Memory: each rank still holds its whole local ``p.grad`` until ``step()`` (the one all-to-all /
  reduce-scatter runs there, not bucketed during backward) and, with error feedback, a residual as
  large as the parameters; ``state_dict()`` gathers every rank's residual (``W`` x the parameters).
- ``module=``: every gradient path from a block's parameters must leave the block through the
  tensors its forward returns (inside tuples, lists, dicts, dataclasses or namespaces); a block that
  stashes a tensor on itself for its parent to read would be backpropagated without its weights.
  Tied parameters (one tensor in two modules) are refused. Not yet tried with activation
  checkpointing or ``torch.compile``.
- A parameter with no gradient on a rank counts as a zero gradient there (as DDP with an expert
  that got no tokens), so AdamW keeps moving it by its momentum when no rank produced a gradient.
- qgZ is one world-wide all-to-all (not the paper's intra-node then inter-node pair): quantization
  error enters once, and the bytes that cross nodes are the same.

Example::

    config = ZeroPlusPlusConfig(quantize_weights=True, quantize_gradients=True, hierarchical_partition=True)
    optimizer = ZeroPlusPlusOptimizer(model.parameters(), base_optimizer=torch.optim.AdamW, config=config, lr=1e-4)
    loss = model(x).loss; loss.backward(); optimizer.clip_grad_norm_(1.0); optimizer.step(); optimizer.zero_grad()
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import types
from typing import Any, Callable, Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from nexus.training.distributed.mesh import launch_env

__all__ = ["ZeroPlusPlusConfig", "ZeroPlusPlusOptimizer"]

COMM_FORMATS = ("int8", "int4", "fp8")
BLOCK_SIZES = (64, 128)
COLLECTIVE_KINDS = ("all_gather", "all_gather_intra_node", "all_to_all", "reduce_scatter", "all_reduce")

# Base optimizers whose update of an entry depends on that entry (and scalars) only.
_ELEMENTWISE = {
    "torch.optim.sgd.SGD", "torch.optim.adam.Adam", "torch.optim.adamw.AdamW", "torch.optim.adamax.Adamax",
    "torch.optim.nadam.NAdam", "torch.optim.radam.RAdam", "torch.optim.adagrad.Adagrad",
    "torch.optim.rmsprop.RMSprop", "torch.optim.rprop.Rprop", "torch.optim.asgd.ASGD",
    "nexus.training.optimizers.lion.Lion",
}
# Base optimizers that need whole matrices or sums over whole tensors.
_NOT_ELEMENTWISE = {
    "Muon": "orthogonalizes whole matrices", "SOAP": "preconditions whole matrices",
    "Shampoo": "preconditions whole matrices", "Adafactor": "factors the second moment over matrix rows and columns",
    "LBFGS": "keeps a history of whole flat gradients and runs line searches on them",
    "Prodigy": "estimates its step size from sums over every parameter",
    "ScheduleFreeAdamW": "swaps the model's weights between train and eval points itself",
    "SparseAdam": "needs sparse gradients",
}


@dataclasses.dataclass(kw_only=True)
class ZeroPlusPlusConfig:
    """What ZeRO++ quantizes and how the world is split into nodes.

    quantize_weights: qwZ, all-gather weights as ``weight_format`` blocks (int8 | int4 | fp8).
    quantize_gradients: qgZ, average gradients with one all-to-all of ``gradient_format`` blocks.
    hierarchical_partition: hpZ, keep a secondary copy of the weights inside each node so the
        backward re-gather never crosses nodes (needs ``module=`` on the optimizer to matter).
    block_size: elements per quantization block (one fp32 scale each): 64 or 128.
    error_feedback: carry each rank's gradient quantization residual into the next step (qgZ only).
    node_size: ranks per node; default the launcher's local world size (torchrun's ``LOCAL_WORLD_SIZE``,
        OpenMPI's ``OMPI_COMM_WORLD_LOCAL_SIZE``), else the whole group. Nodes are consecutive ranks.
    """

    quantize_weights: bool = True
    quantize_gradients: bool = True
    hierarchical_partition: bool = True
    weight_format: str = "int8"
    gradient_format: str = "int4"
    block_size: int = 128
    error_feedback: bool = True
    node_size: int | None = None

    def __post_init__(self):
        for name in ("quantize_weights", "quantize_gradients", "hierarchical_partition", "error_feedback"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"ZeroPlusPlusConfig.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("weight_format", "gradient_format"):
            if getattr(self, name) not in COMM_FORMATS:
                raise ValueError(f"ZeroPlusPlusConfig.{name} must be one of {', '.join(COMM_FORMATS)}, "
                                 f"got {getattr(self, name)!r}")
        if isinstance(self.block_size, bool) or self.block_size not in BLOCK_SIZES:
            raise ValueError(f"ZeroPlusPlusConfig.block_size must be 64 or 128, got {self.block_size!r}")
        if self.node_size is not None and (isinstance(self.node_size, bool) or not isinstance(self.node_size, int)
                                           or self.node_size < 1):
            raise ValueError(f"ZeroPlusPlusConfig.node_size must be an int >= 1 or None, got {self.node_size!r}")


@dataclasses.dataclass(eq=False)  # hashed by identity
class _Slot:
    """One managed parameter: its place in the row layout."""

    param: nn.Parameter
    index: int  # position over all groups, as in a torch optimizer state_dict
    group: int
    numel: int
    cols: int  # entries per rank: ceil(numel / W)
    offset: int  # first column in the row layout (over all groups)
    shape: torch.Size  # the whole parameter's (its .data is empty while freed)


@dataclasses.dataclass(eq=False)
class _Block:
    """A module's own managed parameters, gathered and freed together (ZeRO-3)."""

    name: str
    slots: list[_Slot]
    columns: torch.Tensor  # int64 [U]: the block's columns in the row layout
    gathered: bool = False
    pending: set = dataclasses.field(default_factory=set)  # ids of params whose grads are still due
    secondary: torch.Tensor | None = None  # hpZ: this rank's rows of the block, as received


class _RegatherBeforeBackward(torch.autograd.Function):
    """Identity on a block's outputs; its backward re-gathers the block's parameters first."""

    @staticmethod
    def forward(ctx, owner, block, *tensors):
        ctx.owner, ctx.block = owner, block
        # detach, not view_as: autograd refuses in-place ops (ReLU(inplace=True), h += x) on a custom
        # Function's views; a detached alias is a fresh output of this Function
        return tuple(t.detach() for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        ctx.owner._gather_for_backward(ctx.block)
        return (None, None, *grads)


def _map_grad_tensors(obj: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``obj`` with every tensor that requires grad replaced by ``fn(tensor)``, in a fixed order
    (tensors, tuples, lists, dicts, dataclasses, SimpleNamespace; other objects are left alone)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj) if obj.requires_grad else obj
    if isinstance(obj, (tuple, list)):
        items = [_map_grad_tensors(x, fn) for x in obj]
        if isinstance(obj, tuple) and hasattr(obj, "_fields"):  # namedtuple
            return type(obj)(*items)
        return type(obj)(items)
    if isinstance(obj, dict):
        new = copy.copy(obj)
        for key, value in obj.items():
            new[key] = _map_grad_tensors(value, fn)
        return new
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        new = copy.copy(obj)
        for field in dataclasses.fields(obj):
            object.__setattr__(new, field.name, _map_grad_tensors(getattr(obj, field.name), fn))
        return new
    if isinstance(obj, types.SimpleNamespace):
        return types.SimpleNamespace(**{k: _map_grad_tensors(v, fn) for k, v in vars(obj).items()})
    return obj


def _class_path(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _check_base_optimizer(base_optimizer: Any) -> None:
    if not (isinstance(base_optimizer, type) and issubclass(base_optimizer, torch.optim.Optimizer)):
        raise TypeError(f"ZeroPlusPlusOptimizer: base_optimizer must be a torch.optim.Optimizer class "
                        f"(e.g. torch.optim.AdamW), got {base_optimizer!r}")
    for cls in base_optimizer.__mro__:
        if cls.__name__ in _NOT_ELEMENTWISE:
            raise ValueError(f"ZeroPlusPlusOptimizer: base_optimizer {base_optimizer.__name__} "
                             f"{_NOT_ELEMENTWISE[cls.__name__]}; ZeRO++ gives each rank a flat slice of the "
                             "parameters, so the base optimizer must be elementwise (AdamW, Adam, SGD, Lion, ...)")
    if not any(_class_path(cls) in _ELEMENTWISE for cls in base_optimizer.__mro__) and \
            not getattr(base_optimizer, "elementwise_update", False):
        raise ValueError(f"ZeroPlusPlusOptimizer: base_optimizer {_class_path(base_optimizer)} is not known to be "
                         "elementwise; ZeRO++ runs it on flat slices of the parameters. Known: "
                         f"{', '.join(sorted(p.rsplit('.', 1)[1] for p in _ELEMENTWISE))}; set the class attribute "
                         "elementwise_update = True on an optimizer whose update of each entry depends on that "
                         "entry alone")


def _normalise_groups(params: Iterable) -> list[dict]:
    if isinstance(params, torch.Tensor):
        raise TypeError("ZeroPlusPlusOptimizer: params must be an iterable of tensors or dicts, got a single Tensor")
    params = list(params)
    if not params:
        raise ValueError("ZeroPlusPlusOptimizer: got an empty parameter list")
    groups = [dict(g) for g in params] if isinstance(params[0], dict) else [{"params": params}]
    seen = set()
    for i, group in enumerate(groups):
        ps = group["params"]
        group["params"] = [ps] if isinstance(ps, torch.Tensor) else list(ps)
        for p in group["params"]:
            if not isinstance(p, torch.Tensor):
                raise TypeError(f"ZeroPlusPlusOptimizer: param group {i} holds a {type(p).__name__}, not a tensor")
            if id(p) in seen:
                raise ValueError(f"ZeroPlusPlusOptimizer: a parameter of shape {tuple(p.shape)} appears twice")
            if not p.is_floating_point():
                raise ValueError(f"ZeroPlusPlusOptimizer: parameters must be floating point, got {p.dtype}")
            seen.add(id(p))
        # frozen parameters: a torch optimizer never touches them (no grad); here they are left whole, unmanaged
        group["params"] = [p for p in group["params"] if p.requires_grad]
    if not any(g["params"] for g in groups):
        raise ValueError("ZeroPlusPlusOptimizer: no parameter requires grad")
    return groups


class ZeroPlusPlusOptimizer(torch.optim.Optimizer):
    """ZeRO++: partitioned fp32 master weights and optimizer state, quantized collectives (see module doc).

    Args:
        params: the model's parameters or param-group dicts (per-group hyperparameters such as
            ``weight_decay=0`` for norms keep working); the model is an ordinary module, the same on
            every rank (rank 0's values are broadcast once here).
        base_optimizer: an elementwise ``torch.optim.Optimizer`` class run on each rank's flat shard.
        config: :class:`ZeroPlusPlusConfig` (default: everything on).
        module: the model, for ZeRO-3: parameters freed outside their block's forward/backward and
            gathered on demand (hpZ applies to the backward re-gather). Without it the weights stay
            whole on every rank.
        process_group: the data-parallel group (default: the world when torch.distributed is
            initialised; without it this is the base optimizer on one process, nothing quantized).
        **base_kwargs: the base optimizer's hyperparameters (``lr=1e-4``, ``weight_decay=...``).

    Shapes and dtypes: parameters of any shape and float dtype; gradients read from ``p.grad``
    (same shape), averaged in fp32; masters fp32 [shard]; model weights written in their own dtype.

    Example::
        opt = ZeroPlusPlusOptimizer(model.parameters(), base_optimizer=torch.optim.AdamW,
                                    config=ZeroPlusPlusConfig(), lr=1e-4)
        model(x).loss.backward(); opt.step(); opt.zero_grad()
    """

    def __init__(self, params: Iterable, base_optimizer: type = torch.optim.AdamW,
                 config: ZeroPlusPlusConfig | None = None, *, module: nn.Module | None = None,
                 process_group: dist.ProcessGroup | None = None, **base_kwargs: Any) -> None:
        _check_base_optimizer(base_optimizer)
        config = ZeroPlusPlusConfig() if config is None else config
        if not isinstance(config, ZeroPlusPlusConfig):
            raise TypeError(f"ZeroPlusPlusOptimizer: config must be a ZeroPlusPlusConfig, got {type(config).__name__}")
        if module is not None and not isinstance(module, nn.Module):
            raise TypeError(f"ZeroPlusPlusOptimizer: module must be an nn.Module, got {type(module).__name__}")
        self.config = config
        groups = _normalise_groups(params)
        devices = {p.device for g in groups for p in g["params"]}
        if len(devices) != 1:
            raise ValueError(f"ZeroPlusPlusOptimizer: parameters must be on one device, "
                             f"got {sorted(map(str, devices))}")
        self._device = devices.pop()

        # the group and the nodes
        if process_group is not None and not (dist.is_available() and dist.is_initialized()):
            raise ValueError("ZeroPlusPlusOptimizer: process_group given but torch.distributed is not initialised")
        self._group = process_group if process_group is not None else (
            dist.group.WORLD if dist.is_available() and dist.is_initialized() else None)
        self._world = dist.get_world_size(self._group) if self._group is not None else 1
        self._rank = dist.get_rank(self._group) if self._group is not None else 0
        self._ranks = dist.get_process_group_ranks(self._group) if self._group is not None else [0]
        self._node_size = self._resolve_node_size()
        self._node_group = None
        if self._world > 1 and 1 < self._node_size:
            node = self._rank // self._node_size
            node_ranks = self._ranks[node * self._node_size:(node + 1) * self._node_size]
            # only this node's members take part in creating its group
            self._node_group = dist.new_group(node_ranks, use_local_synchronization=True) \
                if self._node_size < self._world else self._group

        # the row layout
        self._slots: list[_Slot] = []
        offset = 0
        self._group_columns: list[tuple[int, int]] = []
        # quantized: each parameter's slice fills whole blocks, so no block (one scale) mixes two parameters
        quantized = self._world > 1 and (config.quantize_weights or config.quantize_gradients)
        align = config.block_size if quantized else 1
        for gi, group in enumerate(groups):
            start = offset
            for p in group["params"]:
                cols = -(-p.numel() // self._world)
                cols = -(-cols // align) * align
                self._slots.append(_Slot(p, len(self._slots), gi, p.numel(), cols, offset, p.shape))
                offset += cols
            self._group_columns.append((start, offset))
        self._columns = offset
        self._slot_of = {id(s.param): s for s in self._slots}

        # masters: rank 0's weights, this rank's row, fp32; the base optimizer runs on one view per group
        with torch.no_grad():
            full = [s.param.detach().reshape(-1).to(torch.float32) for s in self._slots]
            if self._world > 1:
                flat = torch.cat(full) if full else torch.zeros(0, device=self._device)
                dist.broadcast(flat, self._ranks[0], group=self._group)
                full = list(flat.split([s.numel for s in self._slots]))
            self._master = self._to_rows(full)[self._rank].clone()
        views = [self._master[a:b] for a, b in self._group_columns]
        hyper = [{k: v for k, v in g.items() if k != "params"} for g in groups]
        self._base = base_optimizer([{"params": [v], **h} for v, h in zip(views, hyper)], **base_kwargs)

        self._initialized = False
        # the groups as the base optimizer completed them (its defaults filled in), over the model's parameters
        full_groups = [{**{k: v for k, v in b.items() if k != "params"}, "params": list(g["params"])}
                       for g, b in zip(groups, self._base.param_groups)]
        super().__init__(full_groups, dict(self._base.defaults))
        self._initialized = True

        self._residual: torch.Tensor | None = None  # [W, columns] fp32, qgZ error feedback
        self._pending_residual: torch.Tensor | None = None  # this step's, until step() commits it
        self._reduced: torch.Tensor | None = None  # [columns] fp32, averaged gradient of this rank's row
        self._calls: list[dict] = []
        self._last_step_calls: list[dict] = []
        self._totals: dict[str, int] = {}
        self._steps = 0
        self._blocks: list[_Block] = []
        self._hold = False  # gathered_parameters(): keep blocks gathered
        self._backward_cleanup_queued = False
        self._hooks: list = []
        self._block_of: dict[int, _Block] = {}
        with torch.no_grad():
            if module is not None and self._world > 1:
                self._shard_module(module)
            else:
                self._publish()
        self._calls = []

    # ------------------------------------------------------------------------------------------
    # set-up
    def _resolve_node_size(self) -> int:
        size = self.config.node_size
        source = "config.node_size"
        if size is None:
            env = launch_env()  # torchrun's LOCAL_WORLD_SIZE or OpenMPI's OMPI_COMM_WORLD_LOCAL_SIZE
            size, source = ((env.local_world_size, "the launcher's local world size") if env.launcher != "none"
                            else (self._world, "the group size"))
            if env.launcher != "none" and self._world > 1:
                # the launcher counts the world's ranks per node; this group may hold only some of them
                # (data parallel beside tensor parallel): count its own members per node, by global rank
                nodes = [g // env.local_world_size for g in self._ranks]
                per_node = nodes.count(nodes[self._rank])
                if any(nodes.count(n) != per_node for n in nodes) or any(
                        nodes[i] != nodes[i - i % per_node] for i in range(len(nodes))):
                    raise ValueError(f"ZeroPlusPlusOptimizer: the group's ranks {self._ranks} do not split into "
                                     f"consecutive, equal runs per node of {env.local_world_size} ranks; set "
                                     "ZeroPlusPlusConfig.node_size (group members per node)")
                size, source = per_node, "the group's members per node"
        if self._world == 1:
            return 1
        if self._world % size:
            raise ValueError(f"ZeroPlusPlusOptimizer: {size} ranks per node ({source}) does not divide the "
                             f"group's {self._world} ranks; set ZeroPlusPlusConfig.node_size to the ranks per node")
        return size

    @staticmethod
    def _units(module: nn.Module) -> list[tuple[str, nn.Module, list[torch.Tensor]]]:
        """(name, submodule, parameters) gathered together: each transformer block FSDP2 would shard
        (``fsdp2.find_blocks``: ``layers``, MTP heads, ...) with everything inside it, and the root with
        the rest (embeddings, final norm, head; tied weights once), as FSDP2 units are; a model without
        a block list gets one unit per submodule holding parameters directly."""
        from nexus.training.distributed.fsdp2 import find_blocks

        try:
            blocks = find_blocks(module)
        except ValueError:
            return [(name, sub, list(sub.parameters(recurse=False))) for name, sub in module.named_modules()]
        names = {id(m): n for n, m in module.named_modules()}
        units, taken = [], set()
        for b in blocks:
            params = list(b.parameters())
            units.append((names[id(b)], b, params))
            taken |= {id(p) for p in params}
        units.append(("", module, [p for p in module.parameters() if id(p) not in taken]))
        return units

    def _shard_module(self, module: nn.Module) -> None:
        owners: dict[int, str] = {}
        for name, sub, params in self._units(module):
            mine = [s for p in params if (s := self._slot_of.get(id(p))) is not None]
            for s in mine:
                if id(s.param) in owners:
                    raise ValueError(f"ZeroPlusPlusOptimizer(module=...): a parameter of {name} is also one of "
                                     f"{owners[id(s.param)]}; tied parameters cannot be freed per block")
                owners[id(s.param)] = name or "<root>"
            if not mine:
                continue
            columns = torch.cat([torch.arange(s.offset, s.offset + s.cols, device=self._device) for s in mine])
            block = _Block(name or "<root>", mine, columns)
            self._blocks.append(block)
            self._hooks.append(sub.register_forward_pre_hook(lambda m, a, b=block: self._gather_for_forward(b)))
            self._hooks.append(sub.register_forward_hook(lambda m, a, out, b=block: self._after_forward(b, out)))
        missing = [tuple(s.shape) for s in self._slots if id(s.param) not in owners]
        if missing:
            raise ValueError(f"ZeroPlusPlusOptimizer(module=...): {len(missing)} optimized parameters (shapes "
                             f"{missing[:3]}) are not in the module; pass the module that holds them")
        self._block_of = {id(s.param): b for b in self._blocks for s in b.slots}
        for s in self._slots:
            if s.param.requires_grad:
                self._hooks.append(s.param.register_post_accumulate_grad_hook(self._on_grad_accumulated))
        for block in self._blocks:
            self._free(block)

    # ------------------------------------------------------------------------------------------
    # layout
    def _to_rows(self, tensors: list[torch.Tensor], slots: list[_Slot] | None = None) -> torch.Tensor:
        """Per-parameter tensors (any shape, ``numel`` each) -> fp32 [W, columns] rows."""
        slots = self._slots if slots is None else slots
        parts = []
        for s, t in zip(slots, tensors):
            flat = t.reshape(-1).to(torch.float32)
            pad = s.cols * self._world - s.numel
            if pad:
                flat = torch.cat([flat, flat.new_zeros(pad)])
            parts.append(flat.view(self._world, s.cols))
        if not parts:
            return torch.zeros(self._world, 0, device=self._device)
        return torch.cat(parts, dim=1)

    def _from_rows(self, rows: torch.Tensor, slot: _Slot, start: int) -> torch.Tensor:
        """The whole parameter ``slot`` from rows [W, *] whose columns start..start+cols are its slices."""
        return rows[:, start:start + slot.cols].reshape(-1)[:slot.numel].view(slot.shape)

    # ------------------------------------------------------------------------------------------
    # collectives, counted where called
    def _record(self, kind: str, phase: str, ranks: list[int], sent: dict[int, int]) -> None:
        """One collective of the current step; ``sent``: bytes to each peer (group rank)."""
        node = self._rank // self._node_size
        call = {"kind": kind, "phase": phase, "ranks": tuple(ranks), "bytes": sum(sent.values()),
                "cross_node_bytes": sum(b for r, b in sent.items() if r // self._node_size != node)}
        self._calls.append(call)
        self._totals[kind] = self._totals.get(kind, 0) + call["bytes"]

    def _all_gather(self, send: torch.Tensor, phase: str, intra_node: bool = False) -> torch.Tensor:
        """send [n] -> [g, n] from the group's (or the node's) ranks, in rank order."""
        if intra_node:
            node = self._rank // self._node_size
            members = list(range(node * self._node_size, (node + 1) * self._node_size))
            group, kind = self._node_group, "all_gather_intra_node"
        else:
            members, group, kind = list(range(self._world)), self._group, "all_gather"
        send = send.contiguous()
        out = send.new_empty(len(members) * send.numel())
        self._record(kind, phase, [self._ranks[r] for r in members],
                     {r: send.nbytes for r in members if r != self._rank})
        dist.all_gather_single(out, send, group=group)
        return out.view(len(members), *send.shape)

    def _quantize(self, x: torch.Tensor, fmt: str) -> torch.Tensor:
        from nexus_kernels.comm_quant import quantize_pack
        return quantize_pack(x, fmt, self.config.block_size)

    def _dequantize(self, buf: torch.Tensor, n: int, fmt: str) -> torch.Tensor:
        from nexus_kernels.comm_quant import unpack_dequantize
        return unpack_dequantize(buf, n, fmt, self.config.block_size, torch.float32)

    # ------------------------------------------------------------------------------------------
    # weights out
    def _gather_rows(self, send: torch.Tensor, phase: str) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's fp32 row piece [n] -> (what arrived: packed or fp32 [W, *], dequantized [W, n])."""
        if self._world == 1:
            return send[None], send[None]
        if self.config.quantize_weights:
            recv = self._all_gather(self._quantize(send, self.config.weight_format), phase)
            return recv, self._dequantize(recv, send.numel(), self.config.weight_format)
        recv = self._all_gather(send, phase)
        return recv, recv

    def _publish(self) -> None:
        """Whole weights into the model's parameters from every rank's master row (no module)."""
        _, rows = self._gather_rows(self._master, "weights")
        for s in self._slots:
            s.param.detach().copy_(self._from_rows(rows, s, s.offset))

    def _write_block(self, block: _Block, rows: torch.Tensor) -> None:
        start = 0
        for s in block.slots:
            s.param.data = self._from_rows(rows, s, start).to(s.param.dtype).clone()
            start += s.cols
        block.gathered = True

    def _gather_for_forward(self, block: _Block) -> None:
        if block.gathered:
            return
        keep = self.config.hierarchical_partition and torch.is_grad_enabled()  # a backward will follow
        with torch.no_grad():
            recv, rows = self._gather_rows(self._master[block.columns], "forward")
            if keep:
                block.secondary = recv[self._rank % self._node_size::self._node_size].clone()
            self._write_block(block, rows)

    def _gather_for_backward(self, block: _Block) -> None:
        if not self._backward_cleanup_queued:
            self._backward_cleanup_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)
        if block.gathered:
            return
        with torch.no_grad():
            if block.secondary is None:  # no hpZ: the world-wide gather again (same bytes, same values)
                _, rows = self._gather_rows(self._master[block.columns], "backward")
            else:
                n = block.columns.numel()
                if self._node_size > 1:
                    got = self._all_gather(block.secondary.reshape(-1), "backward", intra_node=True)
                    # got[j, k] is row k * L + j
                    recv = got.view(self._node_size, *block.secondary.shape).transpose(0, 1)
                    recv = recv.reshape(self._world, *block.secondary.shape[1:])
                else:
                    recv = block.secondary
                rows = self._dequantize(recv, n, self.config.weight_format) if self.config.quantize_weights else recv
            self._write_block(block, rows)
            block.pending = {id(s.param) for s in block.slots if s.param.requires_grad}

    def _after_forward(self, block: _Block, output: Any) -> Any:
        if torch.is_grad_enabled() and any(s.param.requires_grad for s in block.slots):
            found: list[torch.Tensor] = []
            _map_grad_tensors(output, found.append)
            if not found:
                raise ValueError(f"ZeroPlusPlusOptimizer(module=...): block {block.name} returned no tensor that "
                                 "requires grad (looked into tensors, tuples, lists, dicts, dataclasses and "
                                 "namespaces); its parameters could not be re-gathered for backward")
            wrapped = iter(_RegatherBeforeBackward.apply(self, block, *found))
            output = _map_grad_tensors(output, lambda t: next(wrapped))
        self._free(block)
        return output

    def _free(self, block: _Block) -> None:
        if self._hold:
            return
        for s in block.slots:
            s.param.data = torch.empty(0, dtype=s.param.dtype, device=s.param.device)
        block.gathered = False
        block.pending = set()

    def _on_grad_accumulated(self, param: torch.Tensor) -> None:
        block = self._block_of.get(id(param))
        if block is not None and id(param) in block.pending:
            block.pending.discard(id(param))
            if not block.pending:
                self._free(block)

    def _after_backward(self) -> None:
        self._backward_cleanup_queued = False
        for block in self._blocks:
            if block.gathered:
                self._free(block)

    # ------------------------------------------------------------------------------------------
    # gradients in
    def _grad_rows(self) -> torch.Tensor:
        grads = []
        for s in self._slots:
            g = s.param.grad
            if g is not None and g.is_sparse:
                raise ValueError("ZeroPlusPlusOptimizer: sparse gradients are not supported")
            grads.append(torch.zeros(s.numel, device=self._device) if g is None else g)
        return self._to_rows(grads)

    def _reduce_gradients(self) -> torch.Tensor:
        """Averaged gradient of this rank's row, fp32 [columns] (computed once per step)."""
        if self._reduced is not None:
            return self._reduced
        with torch.no_grad():
            rows = self._grad_rows()
            if self._world == 1:
                reduced = rows[0]
            elif self.config.quantize_gradients:
                fmt, ef = self.config.gradient_format, self.config.error_feedback
                if ef and self._residual is not None:
                    rows = rows + self._residual
                packed = self._quantize(rows, fmt)  # one self-contained row per destination
                if ef:
                    # committed by step(): a step the loss scaler skips (inf/NaN gradients) must not leave
                    # NaN in the residual, and a non-finite block keeps its previous residual
                    residual = rows - self._dequantize(packed, self._columns, fmt)
                    residual[self._rank] = 0.0  # the own row is not quantized
                    old = self._residual if self._residual is not None else torch.zeros_like(residual)
                    self._pending_residual = torch.where(torch.isfinite(residual), residual, old)
                recv = torch.empty_like(packed)
                self._record("all_to_all", "gradients", self._ranks,
                             {r: packed[r].nbytes for r in range(self._world) if r != self._rank})
                dist.all_to_all_single(recv, packed, group=self._group)
                got = self._dequantize(recv, self._columns, fmt)
                got[self._rank] = rows[self._rank]
                reduced = got.sum(0) / self._world
            else:
                reduced = torch.empty(self._columns, device=self._device)
                self._record("reduce_scatter", "gradients", self._ranks,
                             {r: rows[r].nbytes for r in range(self._world) if r != self._rank})
                dist.reduce_scatter_single(reduced, rows.reshape(-1), group=self._group)
                reduced /= self._world
        self._reduced = reduced
        return reduced

    # ------------------------------------------------------------------------------------------
    # public
    def add_param_group(self, param_group: dict) -> None:
        if getattr(self, "_initialized", False):
            raise NotImplementedError("ZeroPlusPlusOptimizer: param groups are fixed at construction (the flat "
                                      "layout is partitioned then); build a new optimizer instead")
        super().add_param_group(param_group)

    def _sync_hyperparameters(self) -> None:
        for group, base in zip(self.param_groups, self._base.param_groups):
            for key, value in group.items():
                if key != "params":
                    base[key] = value

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """Average the gradients (qgZ or reduce-scatter), step the base optimizer on this rank's row,
        send the weights out (qwZ all-gather, or nothing until the next forward with ``module``)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self._sync_hyperparameters()
        reduced = self._reduce_gradients()
        views = [self._master[a:b] for a, b in self._group_columns]
        for view, base_group, (a, b) in zip(views, self._base.param_groups, self._group_columns):
            base_group["params"][0].grad = reduced[a:b]
        self._base.step()
        for base_group in self._base.param_groups:
            base_group["params"][0].grad = None
        self._reduced = None
        if self._pending_residual is not None:
            self._residual, self._pending_residual = self._pending_residual, None
        if self._blocks:
            for block in self._blocks:  # the weights changed: every copy is stale
                block.secondary = None
                self._free(block)
        else:
            self._publish()
        self._steps += 1
        self._last_step_calls, self._calls = self._calls, []
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._reduced = None
        self._pending_residual = None  # a skipped step's quantization error is not carried

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the averaged gradient (all ranks' shards together) to ``max_norm``; returns its norm.

        Call after ``backward`` and before ``step``, instead of ``torch.nn.utils.clip_grad_norm_``
        (which would see this rank's local gradient only). Averages the gradients now (step reuses
        them). norm_type: 2.0 or inf. Returns a 0-d fp32 tensor, the same on every rank.
        """
        if norm_type not in (2.0, math.inf):
            raise ValueError(f"clip_grad_norm_: norm_type must be 2.0 or inf, got {norm_type!r}")
        if not max_norm > 0:
            raise ValueError(f"clip_grad_norm_: max_norm must be > 0, got {max_norm!r}")
        reduced = self._reduce_gradients()
        if norm_type == math.inf:
            local = reduced.abs().max() if reduced.numel() else reduced.new_zeros(())
            op = dist.ReduceOp.MAX
        else:
            local = reduced.double().pow(2).sum()
            op = dist.ReduceOp.SUM
        if self._world > 1:
            local = local.reshape(1)
            self._record("all_reduce", "clip", self._ranks,
                         {r: 2 * local.nbytes // self._world for r in range(self._world) if r != self._rank})
            dist.all_reduce(local, op=op, group=self._group)
            local = local[0]
        total = (local if norm_type == math.inf else local.sqrt()).to(torch.float32)
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        reduced.mul_(coef)
        return total

    def comm_stats(self) -> dict:
        """Bytes this rank sent in the last step, by collective kind, counted at the calls.

        A step's window runs from the end of the previous ``step()`` to the end of this one (so with
        ``module=`` it holds the forward and backward gathers). Returns ``{kind: bytes}`` for kinds
        all_gather, all_gather_intra_node, all_to_all, reduce_scatter, all_reduce; ``"bytes"`` (their
        sum); ``"cross_node"``: ``{kind: bytes}`` to ranks on other nodes and ``"cross_node_bytes"``;
        ``"total"``: ``{kind: bytes}`` over every step so far; ``"calls"``: each collective of the step
        as ``{kind, phase, ranks (global), bytes, cross_node_bytes}``; ``"steps"``.
        """
        stats: dict[str, Any] = {kind: 0 for kind in COLLECTIVE_KINDS}
        cross = {kind: 0 for kind in COLLECTIVE_KINDS}
        for call in self._last_step_calls:
            stats[call["kind"]] += call["bytes"]
            cross[call["kind"]] += call["cross_node_bytes"]
        stats["bytes"] = sum(stats[k] for k in COLLECTIVE_KINDS)
        stats["cross_node"] = cross
        stats["cross_node_bytes"] = sum(cross.values())
        stats["total"] = {kind: self._totals.get(kind, 0) for kind in COLLECTIVE_KINDS}
        stats["calls"] = [dict(c) for c in self._last_step_calls]
        stats["steps"] = self._steps
        return stats

    @contextlib.contextmanager
    def gathered_parameters(self) -> Iterator[None]:
        """Every parameter holds the exact fp32 master (in the parameter's dtype) inside the block: with
        ``module=`` gathered then freed after; without it, qwZ's dequantized working copy is set aside
        and put back after (what checkpoints and exports should read). Collective: every rank must
        enter it."""
        if not self._blocks:
            if self._world == 1 or not self.config.quantize_weights:
                yield
                return
            with torch.no_grad():
                working = [s.param.detach().clone() for s in self._slots]
                rows = self._gather_exact(self._master)
                for s in self._slots:
                    s.param.detach().copy_(self._from_rows(rows, s, s.offset))
            try:
                yield
            finally:
                with torch.no_grad():
                    for s, w in zip(self._slots, working):
                        s.param.detach().copy_(w)
            return
        with torch.no_grad():
            rows = self._gather_exact(self._master)
            for block in self._blocks:
                self._write_block(block, rows[:, block.columns])
        self._hold = True
        try:
            yield
        finally:
            self._hold = False
            for block in self._blocks:
                self._free(block)

    # ------------------------------------------------------------------------------------------
    # checkpoints
    def _gather_exact(self, row: torch.Tensor) -> torch.Tensor:
        """[n] per rank -> [W, n], unquantized, not counted in the step's bytes."""
        if self._world == 1:
            return row[None]
        row = row.contiguous()
        out = row.new_empty(self._world * row.numel())
        dist.all_gather_single(out, row, group=self._group)
        return out.view(self._world, *row.shape)

    @torch.no_grad()
    def state_dict(self) -> dict:
        """The whole state, identical on every rank (collective: every rank must call it).

        Format: a torch optimizer state dict over the model's parameters (``state`` keyed by the
        parameter's index over all groups, tensors shaped like the parameter; ``param_groups`` with
        every hyperparameter), plus ``"zero_plusplus"``: ``master`` (index -> fp32 tensor shaped like
        the parameter), ``residual`` (error feedback: one {index -> tensor} per rank, or None) and
        ``world_size``.
        """
        self._sync_hyperparameters()
        base = self._base.state_dict()
        state: dict[int, dict] = {}
        for gi, (a, b) in enumerate(self._group_columns):
            slots = [s for s in self._slots if s.group == gi]
            for key, value in base["state"].get(gi, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == b - a:
                    rows = self._gather_exact(value.to(torch.float32) if value.is_floating_point() else value)
                    for s in slots:
                        state.setdefault(s.index, {})[key] = \
                            self._from_rows(rows, s, s.offset - a).to(value.dtype).clone()
                else:
                    for s in slots:
                        state.setdefault(s.index, {})[key] = value.clone() if isinstance(value, torch.Tensor) else value
        masters_rows = self._gather_exact(self._master)
        master = {s.index: self._from_rows(masters_rows, s, s.offset).clone() for s in self._slots}
        residual = None
        if self._residual is not None:
            every = self._gather_exact(self._residual.reshape(-1)).view(self._world, self._world, self._columns)
            residual = [{s.index: self._from_rows(every[k], s, s.offset).clone() for s in self._slots}
                        for k in range(self._world)]
        groups = []
        for group in self.param_groups:
            groups.append({**{k: v for k, v in group.items() if k != "params"},
                           "params": [self._slot_of[id(p)].index for p in group["params"]]})
        return {"state": state, "param_groups": groups,
                "zero_plusplus": {"master": master, "residual": residual, "world_size": self._world}}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state from :meth:`state_dict` (any world size) or a torch optimizer over the same
        parameters (masters then come from the model's current weights). Error-feedback residuals load
        when the world size matches and restart from zero otherwise. Collective with qwZ publishing."""
        groups = state_dict["param_groups"]
        if len(groups) != len(self.param_groups) or any(
                len(g["params"]) != len(mine["params"]) for g, mine in zip(groups, self.param_groups)):
            raise ValueError(f"ZeroPlusPlusOptimizer.load_state_dict: the state has groups of "
                             f"{[len(g['params']) for g in groups]} parameters, this optimizer "
                             f"{[len(g['params']) for g in self.param_groups]}")
        index_of = {}  # the state's index -> this optimizer's slot
        for g, mine in zip(groups, self.param_groups):
            for idx, p in zip(g["params"], mine["params"]):
                index_of[idx] = self._slot_of[id(p)]
        extra = state_dict.get("zero_plusplus") or {}
        masters = extra.get("master")
        for idx, s in index_of.items():
            if masters is not None and tuple(masters[idx].shape) != tuple(s.shape):
                raise ValueError(f"ZeroPlusPlusOptimizer.load_state_dict: parameter {idx} has shape "
                                 f"{tuple(masters[idx].shape)} in the state, {tuple(s.shape)} here")
        for g, mine in zip(groups, self.param_groups):
            mine.update({k: v for k, v in g.items() if k != "params"})
        self._sync_hyperparameters()
        slot_state = {index_of[i]: v for i, v in state_dict["state"].items()}
        base_state = {}
        for gi, (a, b) in enumerate(self._group_columns):
            slots = [s for s in self._slots if s.group == gi]
            present = [s for s in slots if slot_state.get(s)]
            if not present:
                continue
            entry = {}
            for key, value in slot_state[present[0]].items():
                if isinstance(value, torch.Tensor) and tuple(value.shape) == tuple(present[0].shape) \
                        and (value.dim() > 0 or key != "step"):
                    parts = [slot_state[s][key] if s in present else torch.zeros(s.shape) for s in slots]
                    rows = self._to_rows([p.to(self._device) for p in parts], slots)
                    entry[key] = rows[self._rank].to(value.dtype).clone()
                else:
                    entry[key] = value.clone() if isinstance(value, torch.Tensor) else value
            base_state[gi] = entry
        base_groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [i]}
                       for i, g in enumerate(self._base.param_groups)]
        self._base.load_state_dict({"state": base_state, "param_groups": base_groups})
        if masters is not None:
            by_slot = {s: masters[i] for i, s in index_of.items()}
            full = [by_slot[s].to(self._device) for s in self._slots]
        else:
            if self._blocks:
                raise ValueError("ZeroPlusPlusOptimizer.load_state_dict: a state without masters needs whole "
                                 "weights in the model; with module= load a ZeroPlusPlusOptimizer state")
            full = [s.param.detach() for s in self._slots]
        self._master.copy_(self._to_rows(full)[self._rank])
        residual = extra.get("residual")
        self._residual = self._pending_residual = None
        if residual is not None and len(residual) == self._world and self.config.quantize_gradients \
                and self.config.error_feedback:
            mine = residual[self._rank]
            by_slot = {s: mine[i] for i, s in index_of.items()}
            self._residual = self._to_rows([by_slot[s].to(self._device) for s in self._slots])
        self._reduced = None
        if self._blocks:
            for block in self._blocks:
                block.secondary = None
                self._free(block)
        else:
            self._publish()
        self._calls = []
