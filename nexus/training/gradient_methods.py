"""Memory savers for the backward pass: selective activation checkpointing and activation offloading.

Selective checkpointing (Korthikanti et al. 2023) is built on torch's non-reentrant
``torch.utils.checkpoint.checkpoint`` and its selective-checkpoint contexts
(``create_selective_checkpoint_contexts``): inside a checkpointed block every aten op gets a
per-op decision, save its output for backward (``MUST_SAVE``) or recompute it in backward
(``PREFER_RECOMPUTE``). Policies (:class:`CheckpointPolicy`):

============  ==========================================================================================
NONE          nothing is recomputed (plain autograd)
ALL           every block recomputed in full in backward (classic activation checkpointing)
HEAVY_OPS     every block checkpointed, but the outputs of matmuls, attention kernels, convolutions and
              collectives (:func:`heavy_ops`) are saved; only the cheap pointwise ops are recomputed
ALTERNATE     blocks 0, 2, 4, ... recomputed in full, blocks 1, 3, ... not checkpointed
AUTO          per block, one of full / heavy-ops / none, chosen from measured activation bytes so that
              the blocks' saved activations fit ``memory_budget`` (see :class:`SelectiveCheckpointConfig`)
CUSTOM        every block checkpointed with the op-level ``custom_fn(ctx, op, *args, **kwargs)``
============  ==========================================================================================

The recomputation restores the RNG state of the forward (``preserve_rng_state``), so dropout masks
match, and torch's determinism check compares the shapes of recomputed tensors with the forward's;
MoE/RoM routing and mixture-of-depths selection are functions of their inputs, so they are recomputed
identically (a different routing would change those shapes and raise).

Activation offloading (:class:`ActivationOffloader`) moves large saved tensors to pinned host memory
on a side CUDA stream and brings them back ahead of their use in backward.

Example::
    config = SelectiveCheckpointConfig(policy="heavy_ops")
    model = apply_selective_checkpointing(model, config)        # wraps model.layers (and mtp_heads)
    offloader = ActivationOffloader(offload_threshold_mb=10.0)
    with offloader.offload_context():
        loss = model(x).logits.float().square().mean()
        loss.backward()
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import math
import threading
import types
import warnings
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.utils.checkpoint as torch_checkpoint
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = [
    "ActivationMemory", "ActivationOffloader", "CheckpointPolicy", "MemoryConfig", "OffloadConfig", "OffloadStats",
    "SelectiveCheckpoint", "SelectiveCheckpointConfig", "apply_memory_config", "apply_selective_checkpointing",
    "build_offloader", "heavy_ops", "heavy_ops_policy", "measure_activation_memory",
    "remove_selective_checkpointing",
]

MIB = 1 << 20


class CheckpointPolicy(enum.Enum):
    """Which blocks are checkpointed and which ops inside them are saved (see the module docstring).

    ``CheckpointPolicy.parse("heavy_ops")`` (any case, or the enum itself) gives ``HEAVY_OPS``.
    """

    NONE = "none"
    ALL = "all"
    AUTO = "auto"
    CUSTOM = "custom"
    ALTERNATE = "alternate"
    HEAVY_OPS = "heavy_ops"

    @classmethod
    def parse(cls, value: CheckpointPolicy | str, *, field: str = "policy") -> CheckpointPolicy:
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            key = value.strip().lower()
            for member in cls:
                if member.value == key:
                    return member
        names = ", ".join(m.value for m in cls)
        raise ValueError(f"{field} must be a CheckpointPolicy or one of {names}; got {value!r}")


# ---- the per-op policy of HEAVY_OPS --------------------------------------------------------------

_HEAVY_OP_NAMES = (
    # matmuls (nn.Linear, matmul and einsum reach the dispatcher as these)
    ("aten", "mm"), ("aten", "addmm"), ("aten", "bmm"), ("aten", "baddbmm"), ("aten", "linear"),
    ("aten", "_scaled_mm"), ("aten", "_grouped_mm"), ("aten", "_int_mm"), ("aten", "convolution"),
    # fused attention kernels (scaled_dot_product_attention picks one of these)
    ("aten", "_scaled_dot_product_flash_attention"), ("aten", "_scaled_dot_product_efficient_attention"),
    ("aten", "_scaled_dot_product_cudnn_attention"), ("aten", "_scaled_dot_product_flash_attention_for_cpu"),
    ("aten", "_flash_attention_forward"), ("aten", "_efficient_attention_forward"),
    # collectives of tensor/expert parallelism: recomputing them would repeat the communication
    ("_c10d_functional", "reduce_scatter_tensor"), ("_c10d_functional", "all_reduce"),
    ("_c10d_functional", "all_to_all_single"), ("_c10d_functional", "all_gather_into_tensor"),
)


@functools.cache
def heavy_ops() -> frozenset:
    """The ``OpOverload``s whose outputs HEAVY_OPS saves: every overload of matmul, convolution, fused
    attention and functional-collective ops that this torch build has (the rest are recomputed)."""
    found = set()
    for namespace, name in _HEAVY_OP_NAMES:
        packet = getattr(getattr(torch.ops, namespace), name, None)
        if packet is None:
            continue
        for overload in packet.overloads():
            found.add(getattr(packet, overload))
    return frozenset(found)


def heavy_ops_policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> torch_checkpoint.CheckpointPolicy:
    """Selective-checkpoint policy of HEAVY_OPS: save the outputs of :func:`heavy_ops`, recompute the rest.

    Has the signature torch's ``create_selective_checkpoint_contexts`` expects, so it is also a
    starting point for a CUSTOM ``custom_fn``.
    """
    if op in heavy_ops():
        return torch_checkpoint.CheckpointPolicy.MUST_SAVE
    return torch_checkpoint.CheckpointPolicy.PREFER_RECOMPUTE


# ---- configuration -------------------------------------------------------------------------------

def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclasses.dataclass(kw_only=True)
class SelectiveCheckpointConfig:
    """How :class:`SelectiveCheckpoint` and :func:`apply_selective_checkpointing` checkpoint blocks.

    policy: a :class:`CheckpointPolicy` or its name (``"heavy_ops"``, any case).
    custom_fn: CUSTOM only, and required there: an op-level policy ``custom_fn(ctx, op, *args, **kwargs)``
        returning ``torch.utils.checkpoint.CheckpointPolicy`` (or a bool, True = save), called once per
        aten op of the forward of every checkpointed block (``op`` is an ``OpOverload``, e.g.
        ``torch.ops.aten.mm.default``). It is not a per-block predicate: to leave a block out, do not
        pass it (``apply_selective_checkpointing(..., blocks=[...])``).
    memory_budget: AUTO only, and required there: how many bytes of saved activations the checkpointed
        blocks may hold together. A number in (0, 1] is a fraction of what they hold without
        checkpointing; a number > 1 is bytes.
    preserve_rng_state: restore the forward's RNG state before recomputing (dropout masks match).

    Example:
        >>> SelectiveCheckpointConfig(policy="auto", memory_budget=0.5).policy
        <CheckpointPolicy.AUTO: 'auto'>
    """

    policy: CheckpointPolicy | str = CheckpointPolicy.HEAVY_OPS
    custom_fn: Callable[..., Any] | None = None
    memory_budget: float | None = None
    preserve_rng_state: bool = True

    def __post_init__(self) -> None:
        self.policy = CheckpointPolicy.parse(self.policy)
        if self.custom_fn is not None and not callable(self.custom_fn):
            raise ValueError(f"custom_fn must be callable, got {type(self.custom_fn).__name__}")
        if self.policy is CheckpointPolicy.CUSTOM and self.custom_fn is None:
            raise ValueError("custom_fn is required with policy CUSTOM: a function (ctx, op, *args, **kwargs) -> "
                             "torch.utils.checkpoint.CheckpointPolicy")
        if self.policy is not CheckpointPolicy.CUSTOM and self.custom_fn is not None:
            raise ValueError(f"custom_fn is only used with policy CUSTOM, not {self.policy.name}")
        if self.memory_budget is not None:
            if not _is_number(self.memory_budget) or not (0 < self.memory_budget < math.inf):
                raise ValueError("memory_budget must be a finite number > 0 (a fraction in (0, 1] or bytes > 1), "
                                 f"got {self.memory_budget!r}")
            if self.policy is not CheckpointPolicy.AUTO:
                raise ValueError(f"memory_budget is only used with policy AUTO, not {self.policy.name}")
        elif self.policy is CheckpointPolicy.AUTO:
            raise ValueError("memory_budget is required with policy AUTO: a fraction in (0, 1] of the "
                             "uncheckpointed activation bytes, or bytes (> 1)")
        if not isinstance(self.preserve_rng_state, bool):
            raise ValueError(f"preserve_rng_state must be a bool, got {self.preserve_rng_state!r}")


# ---- measuring activation memory -----------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ActivationMemory:
    """What a forward left behind for backward (all in bytes of distinct storages).

    saved_tensors, saved_bytes: tensors that autograd saved through ``saved_tensors_hooks`` at the
        caller's level (parameters and their views excluded). A checkpointed region hides its own saved
        tensors behind its hooks, so this drops to (almost) nothing there even when a selective policy
        keeps op outputs in its cache: read ``live_bytes`` for the memory.
    live_bytes: storages created during the forward and still alive when it returned, other than the
        outputs' own: autograd's saved tensors, selective-checkpoint caches, checkpoint inputs.
    output_bytes: storages created during the forward that the outputs hold.
    """

    saved_tensors: int
    saved_bytes: int
    live_bytes: int
    output_bytes: int


def _tensors_in(value: Any, seen: set[int] | None = None) -> Iterator[torch.Tensor]:
    """Every tensor in nested tuples, lists, dicts and dataclasses (e.g. a model output)."""
    seen = set() if seen is None else seen
    if id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors_in(v, seen)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors_in(v, seen)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            yield from _tensors_in(getattr(value, f.name), seen)


def _storage_key(t: torch.Tensor) -> tuple[StorageWeakRef, int] | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without a storage of their own
        return None
    return StorageWeakRef(storage), storage.nbytes()


class _StorageTracker(TorchDispatchMode):
    """Records (weakly) the storage of every tensor an op returns that none of its inputs owned."""

    def __init__(self) -> None:
        super().__init__()
        self.created: dict[int, tuple[StorageWeakRef, int]] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = set()
        for t in _tensors_in((args, kwargs or {})):
            key = _storage_key(t)
            if key is not None:
                inputs.add(key[0].cdata)
        for t in _tensors_in(out):
            key = _storage_key(t)
            if key is not None and key[0].cdata not in inputs:
                self.created.setdefault(key[0].cdata, key)
        return out

    def live(self) -> dict[int, int]:
        return {cdata: n for cdata, (ref, n) in self.created.items() if not ref.expired()}


class _Kept:
    """A saved tensor that stays where it is. Held as a detached alias: returning the tensor itself from a
    pack hook makes an output saved by its own node a reference cycle through the C++ graph, which is
    never freed. Its version is checked on unpack, as autograd does without hooks (and skips with them)."""

    __slots__ = ("tensor", "version")

    def __init__(self, t: torch.Tensor) -> None:
        self.tensor, self.version = t.detach(), t._version

    def get(self) -> torch.Tensor:
        if self.tensor._version != self.version:
            raise RuntimeError(
                "one of the variables needed for gradient computation has been modified by an inplace "
                f"operation: a saved {list(self.tensor.shape)} {self.tensor.dtype} tensor is at version "
                f"{self.tensor._version}; expected version {self.version} instead")
        return self.tensor


def _is_parameter_data(t: torch.Tensor) -> bool:
    base = t._base if t._base is not None else t
    return isinstance(base, nn.Parameter)


def measure_activation_memory(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, ActivationMemory]:
    """Run ``fn(*args, **kwargs)`` (a forward, with grad enabled) and measure what it keeps for backward.

    Returns ``(output, ActivationMemory)``; the output keeps the graph alive, so backward still works.
    On a CPU this is the measure of activation memory (``torch.cuda.max_memory_allocated`` needs a GPU).

    Example:
        >>> out, mem = measure_activation_memory(model, tokens)
        >>> mem.live_bytes  # bytes held for backward besides the outputs
    """
    saved: dict[int, int] = {}
    count = 0

    def pack(t: torch.Tensor) -> _Kept:
        nonlocal count
        if not _is_parameter_data(t):
            key = _storage_key(t)
            if key is not None:
                count += 1
                saved[key[0].cdata] = key[1]
        return _Kept(t)

    tracker = _StorageTracker()
    with torch.autograd.graph.saved_tensors_hooks(pack, _Kept.get), tracker:
        out = fn(*args, **kwargs)
    live = tracker.live()
    outputs = set()
    for t in _tensors_in(out):
        key = _storage_key(t)
        if key is not None:
            outputs.add(key[0].cdata)
    return out, ActivationMemory(
        saved_tensors=count,
        saved_bytes=sum(saved.values()),
        live_bytes=sum(n for c, n in live.items() if c not in outputs),
        output_bytes=sum(n for c, n in live.items() if c in outputs),
    )


# ---- checkpointing one call ----------------------------------------------------------------------

_FULL, _SELECTIVE, _NO = "full", "selective", "none"  # what one block does in one forward


def _run(fn: Callable[..., Any], args: tuple, kwargs: dict, level: str, op_policy: Callable[..., Any] | None,
         preserve_rng_state: bool) -> Any:
    if level == _NO or not torch.is_grad_enabled():
        return fn(*args, **kwargs)
    if level == _SELECTIVE:
        context_fn = functools.partial(torch_checkpoint.create_selective_checkpoint_contexts, op_policy)
        return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False, context_fn=context_fn,
                                           preserve_rng_state=preserve_rng_state, **kwargs)
    # no context_fn at all for full recompute: torch.compile cannot trace an explicit no-op one
    return torch_checkpoint.checkpoint(fn, *args, use_reentrant=False, preserve_rng_state=preserve_rng_state,
                                       **kwargs)


@dataclasses.dataclass
class _BlockSizes:
    """Bytes one block keeps for backward at each level (measured on a probe forward)."""

    full: int
    selective: int
    none: int


class _AutoPlanner:
    """Chooses full / selective (heavy ops) / none per block so the blocks' saved bytes fit the budget.

    Greedy, cheapest memory first: every block starts fully checkpointed; blocks are then moved to
    heavy-ops checkpointing (which removes most of the recompute) in increasing order of the bytes it
    adds while the total fits, then to no checkpointing in increasing order of the bytes that adds.
    A block whose heavy-ops level holds as much as no checkpointing skips straight to none.
    """

    def __init__(self, budget: float, expected: int | None) -> None:
        self.budget = budget
        self.expected = expected  # number of blocks, when known; else planned once a block repeats
        self.sizes: dict[int, _BlockSizes] = {}
        self.plan: dict[int, str] | None = None

    def budget_bytes(self) -> float:
        if self.budget <= 1:
            return self.budget * sum(s.none for s in self.sizes.values())
        return self.budget

    def record(self, index: int, sizes: _BlockSizes) -> None:
        self.sizes[index] = sizes
        if self.plan is not None or (self.expected is not None and len(self.sizes) >= self.expected):
            self.replan()

    def replan(self) -> None:
        budget = self.budget_bytes()
        level = {i: _FULL for i in self.sizes}
        held = {i: s.full for i, s in self.sizes.items()}
        total = sum(held.values())
        for target in (_SELECTIVE, _NO):
            steps = []
            for i, s in self.sizes.items():
                if target == _SELECTIVE and (level[i] != _FULL or s.selective >= s.none):
                    continue
                if target == _NO and level[i] == _NO:
                    continue
                steps.append((getattr(s, target) - held[i], i))
            for extra, i in sorted(steps):
                if total + extra <= budget:
                    total += extra
                    level[i], held[i] = target, held[i] + extra
        self.plan = level


@contextlib.contextmanager
def _unchanged_state(module: Any, device: torch.device | None) -> Iterator[None]:
    """Probe forwards leave no trace: RNG streams and buffers (e.g. BatchNorm statistics) restored."""
    buffers = [(b, b.detach().clone()) for b in module.buffers()] if isinstance(module, nn.Module) else []
    devices = [device] if device is not None and device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type="cuda"):
        yield
    with torch.no_grad():
        for b, value in buffers:
            b.copy_(value)


def _measure_levels(fn: Callable[..., Any], args: tuple, kwargs: dict, module: Any,
                    preserve_rng_state: bool) -> _BlockSizes:
    first = next((t for t in _tensors_in((args, kwargs)) if isinstance(t, torch.Tensor)), None)
    device = first.device if first is not None else None
    sizes = {}
    for level in (_FULL, _SELECTIVE, _NO):
        with _unchanged_state(module, device):
            out, mem = measure_activation_memory(_run, fn, args, kwargs, level, heavy_ops_policy, preserve_rng_state)
        del out
        sizes[level] = mem.live_bytes
    return _BlockSizes(full=sizes[_FULL], selective=sizes[_SELECTIVE], none=sizes[_NO])


class SelectiveCheckpoint:
    """Runs a layer under the configured checkpointing: ``checkpoint(layer, *inputs, **kwargs)``.

    ``layer`` is any callable (usually an ``nn.Module`` block); its inputs and outputs may be any mix of
    tensors and Python values (non-reentrant checkpointing). Per policy:

    - NONE: ``layer(*inputs)``; ALL: fully recomputed in backward; HEAVY_OPS / CUSTOM: selectively
      (the op policy decides what is saved);
    - ALTERNATE: layers are numbered by their first call (0, 1, 2, ...); even ones are fully
      recomputed, odd ones not checkpointed;
    - AUTO: each layer's activation bytes at each level are measured by three probe forwards on its
      first call (RNG and buffers restored, so the step is unchanged); layers run fully checkpointed
      until every layer has been seen (the first repeat of a layer, i.e. the next step, when called
      directly; the number of blocks, through :func:`apply_selective_checkpointing`), then per the plan
      (``self.plan``: layer number -> ``"full"``, ``"selective"`` or ``"none"``).

    With grad disabled (evaluation) every policy simply calls the layer. ``torch.compile`` traces
    NONE, ALL, HEAVY_OPS, ALTERNATE and CUSTOM (checkpoint is a higher-order op to it); AUTO's probes
    run a Python dispatch mode, so compile an AUTO model after its first (measuring) step.

    Example:
        >>> checkpoint = SelectiveCheckpoint(SelectiveCheckpointConfig(policy=CheckpointPolicy.HEAVY_OPS))
        >>> output = checkpoint(attention_layer, query, key, value)
    """

    def __init__(self, config: SelectiveCheckpointConfig | None = None, *, _expected_layers: int | None = None
                 ) -> None:
        config = SelectiveCheckpointConfig() if config is None else config
        if not isinstance(config, SelectiveCheckpointConfig):
            raise TypeError(f"SelectiveCheckpoint takes a SelectiveCheckpointConfig, got {type(config).__name__}")
        self.config = config
        self._op_policy = config.custom_fn if config.policy is CheckpointPolicy.CUSTOM else heavy_ops_policy
        self._planner = (_AutoPlanner(config.memory_budget, _expected_layers)
                         if config.policy is CheckpointPolicy.AUTO else None)
        self._numbers: dict[tuple[int, int], tuple[Callable[[], Any], int]] = {}
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        # copies (deepcopy of a wrapped model) get a fresh lock and layer numbering: ids do not carry over
        state = dict(self.__dict__)
        state["_lock"], state["_numbers"] = None, {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    @property
    def plan(self) -> dict[int, str]:
        """AUTO's current choice per layer number (empty until every layer has been measured)."""
        if self._planner is None:
            raise ValueError(f"plan exists for policy AUTO only, this one is {self.config.policy.name}")
        return dict(self._planner.plan or {})

    @property
    def measured(self) -> dict[int, _BlockSizes]:
        """AUTO's probe measurements per layer number: bytes kept at full / selective / none."""
        if self._planner is None:
            raise ValueError(f"measurements exist for policy AUTO only, this one is {self.config.policy.name}")
        return dict(self._planner.sizes)

    def _number(self, layer: Callable[..., Any]) -> int:
        obj, func = (layer.__self__, layer.__func__) if isinstance(layer, types.MethodType) else (layer, None)
        key = (id(obj), id(func))
        with self._lock:
            entry = self._numbers.get(key)
            if entry is not None and entry[0]() is obj:
                return entry[1]
            try:
                ref = weakref.ref(obj)
            except TypeError:  # not weak-referenceable: keep it alive so its id is not reused
                ref = (lambda o: lambda: o)(obj)
            number = len(self._numbers)
            self._numbers[key] = (ref, number)
            return number

    def _level(self, number: int, fn: Callable[..., Any], args: tuple, kwargs: dict, module: Any) -> str:
        policy = self.config.policy
        if policy is CheckpointPolicy.NONE:
            return _NO
        if policy is CheckpointPolicy.ALL:
            return _FULL
        if policy in (CheckpointPolicy.HEAVY_OPS, CheckpointPolicy.CUSTOM):
            return _SELECTIVE
        if policy is CheckpointPolicy.ALTERNATE:
            return _FULL if number % 2 == 0 else _NO
        planner = self._planner
        if number not in planner.sizes:
            planner.record(number, _measure_levels(fn, args, kwargs, module, self.config.preserve_rng_state))
        elif planner.plan is None and planner.expected is None:
            planner.replan()  # a layer called again: every layer has been seen once
        return planner.plan.get(number, _FULL) if planner.plan is not None else _FULL

    def run_numbered(self, number: int, fn: Callable[..., Any], args: tuple, kwargs: dict, module: Any = None) -> Any:
        """Run ``fn(*args, **kwargs)`` as layer ``number`` (what the wrapped blocks call)."""
        level = self._level(number, fn, args, kwargs, module) if torch.is_grad_enabled() else _NO
        return _run(fn, args, kwargs, level, self._op_policy, self.config.preserve_rng_state)

    def __call__(self, layer: Callable[..., Any], *inputs: Any, **kwargs: Any) -> Any:
        if not callable(layer):
            raise TypeError(f"SelectiveCheckpoint: layer must be callable, got {type(layer).__name__}")
        return self.run_numbered(self._number(layer), layer, inputs, kwargs, layer)


# ---- whole models --------------------------------------------------------------------------------

_STATE = "_nexus_selective_checkpoint"


@dataclasses.dataclass
class _BlockState:
    runner: SelectiveCheckpoint
    number: int
    inner: Callable[..., Any] | None  # an instance-level forward that was there before, if any


def _checkpointed_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    state: _BlockState = self.__dict__[_STATE]
    fn = state.inner if state.inner is not None else functools.partial(type(self).forward, self)
    return state.runner.run_numbered(state.number, fn, args, kwargs, self)


def _composable_apis(module: nn.Module) -> dict | None:
    """torch.distributed's composable APIs applied to ``module`` (its own ``checkpoint`` among them)."""
    try:
        from torch.distributed._composable.contract import _get_registry
    except ImportError:  # a torch build without torch.distributed
        return None
    return _get_registry(module)


def _default_blocks(model: nn.Module) -> list[nn.Module]:
    for name in ("layers", "blocks", "h"):
        found = getattr(model, name, None)
        if isinstance(found, (nn.ModuleList, nn.ModuleDict)) and len(found):
            blocks = list(found.values() if isinstance(found, nn.ModuleDict) else found)
            heads = getattr(model, "mtp_heads", None)  # the MoE model's extra heads are blocks too
            if isinstance(heads, nn.ModuleList):
                blocks += list(heads)
            return blocks
    raise ValueError(f"apply_selective_checkpointing wraps model.layers (or .blocks / .h), a ModuleList or "
                     f"ModuleDict of blocks, and {type(model).__name__} has none: pass blocks=[...]")


def apply_selective_checkpointing(model: nn.Module, config: SelectiveCheckpointConfig, *,
                                  blocks: Iterable[nn.Module] | None = None) -> nn.Module:
    """Checkpoint each block of ``model`` per ``config``, in place; returns ``model``.

    Blocks: ``blocks`` when given (submodules of ``model``), else the elements of ``model.layers``
    (or ``.blocks`` / ``.h``; a ModuleList or ModuleDict) plus ``model.mtp_heads`` when it exists, in
    that order (ALTERNATE and AUTO number them so). Each block keeps its class, parameter names and
    hooks (so ``isinstance`` checks, state dicts and FSDP2's ``fully_shard``, applied after, are
    unaffected): only its instance ``forward`` is replaced by one that runs the class's forward under
    ``torch.utils.checkpoint`` (:func:`remove_selective_checkpointing` undoes it). NONE leaves the
    model as it is. Apply it before ``torch.compile`` and FSDP2, after tensor parallelism.

    Example:
        >>> config = SelectiveCheckpointConfig(policy="heavy_ops")
        >>> model = apply_selective_checkpointing(model, config)
    """
    if not isinstance(config, SelectiveCheckpointConfig):
        raise TypeError(f"apply_selective_checkpointing: config must be a SelectiveCheckpointConfig, "
                        f"got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"apply_selective_checkpointing: model must be an nn.Module, got {type(model).__name__}")
    if blocks is None:
        found = _default_blocks(model)
    else:
        found = list(blocks)
        owned = {id(m) for m in model.modules()}
        for b in found:
            if not isinstance(b, nn.Module) or id(b) not in owned or b is model:
                raise ValueError(f"apply_selective_checkpointing: blocks= must hold submodules of "
                                 f"{type(model).__name__}, got a {type(b).__name__} that is not one")
        if not found:
            raise ValueError("apply_selective_checkpointing: blocks= is empty")
    if config.policy is CheckpointPolicy.NONE:
        return model
    for b in found:
        if _STATE in b.__dict__:
            raise ValueError(f"apply_selective_checkpointing: a {type(b).__name__} block is already checkpointed "
                             "(call remove_selective_checkpointing first)")
        if "CheckpointWrapper" in type(b).__name__ or "checkpoint" in (_composable_apis(b) or {}):
            raise ValueError(f"apply_selective_checkpointing: a {type(b).__name__} block is already wrapped by "
                             "another activation checkpoint")
    runner = SelectiveCheckpoint(config, _expected_layers=len(found))
    for number, block in enumerate(found):
        inner = block.__dict__.get("forward")
        block.__dict__[_STATE] = _BlockState(runner, number, inner)
        block.forward = types.MethodType(_checkpointed_forward, block)
    return model


def remove_selective_checkpointing(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_selective_checkpointing` on every block of ``model`` (in place); returns it."""
    for module in model.modules():
        state = module.__dict__.pop(_STATE, None)
        if state is not None:
            del module.forward
            if state.inner is not None:
                module.forward = state.inner
    return model


def selective_checkpoint_runner(model: nn.Module) -> SelectiveCheckpoint | None:
    """The :class:`SelectiveCheckpoint` shared by ``model``'s wrapped blocks (e.g. to read AUTO's ``plan``)."""
    for module in model.modules():
        state = module.__dict__.get(_STATE)
        if state is not None:
            return state.runner
    return None


# ---- activation offloading -----------------------------------------------------------------------

_cpu_only_notice_given = False


@dataclasses.dataclass
class OffloadStats:
    """Counts of the last ``offload_context``: tensors (and bytes) offloaded, kept on the device, and
    brought back by prefetch (ahead of their use) vs on demand."""

    offloaded_tensors: int = 0
    offloaded_bytes: int = 0
    kept_tensors: int = 0
    shared: int = 0  # saves of a tensor already offloaded in this context (one host copy serves both)
    prefetched: int = 0
    fetched_on_demand: int = 0


class _Offloaded:
    """One saved tensor in host memory: the copy, and the device copy when prefetched."""

    __slots__ = ("host", "device", "copied", "order", "index", "pending", "prefetched", "prefetch_ready",
                 "__weakref__")

    def __init__(self, host: torch.Tensor, device: torch.device, copied: Any, order: list, index: int) -> None:
        self.host, self.device, self.copied = host, device, copied
        self.order, self.index = order, index  # its context's offloaded tensors, and its place among them
        self.pending = 1  # saves not yet unpacked: a prefetched copy serves them all
        self.prefetched: torch.Tensor | None = None
        self.prefetch_ready: Any = None


class ActivationOffloader:
    """Moves tensors that autograd saves for backward to host memory, and back when backward needs them.

    Inside :meth:`offload_context`, every saved CUDA tensor of at least ``offload_threshold_mb`` MiB
    (parameters and their views excepted: they stay on the device anyway) is copied on a side CUDA
    stream into host memory (pinned when ``pin_memory``, so the copy is asynchronous) and its device
    memory freed. In backward, when a tensor is unpacked, the next ``prefetch_depth`` offloaded tensors
    in reverse forward order (the order backward uses them) are copied back on the side stream
    (``prefetch``), so the copy overlaps the backward compute. Gradients are unchanged: the values
    round-trip exactly. Tensors saved inside a checkpointed block are not offloaded (the checkpoint
    holds none of them). Statistics of the last context: ``stats``. The forward must run inside the
    context; its backward may run inside or after it. Under ``torch.compile`` the compiled graph's saved
    tensors go through the same hooks, but its backward unpacks them all at once, so prefetch gains little.

    On a machine without CUDA the context does nothing and says so once per process;
    ``force_cpu_roundtrip=True`` (for tests) offloads CPU tensors too, into separate host copies, through
    the same pack / prefetch / unpack path.

    Example:
        >>> offloader = ActivationOffloader(enabled=True, offload_threshold_mb=10.0)
        >>> with offloader.offload_context():
        ...     output = model(input)
        ...     loss = output.logits.float().square().mean()
        ...     loss.backward()
    """

    def __init__(self, enabled: bool = True, offload_threshold_mb: float = 10.0, pin_memory: bool = True,
                 prefetch: bool = True, *, prefetch_depth: int = 2, force_cpu_roundtrip: bool = False) -> None:
        for name, value in (("enabled", enabled), ("pin_memory", pin_memory), ("prefetch", prefetch),
                            ("force_cpu_roundtrip", force_cpu_roundtrip)):
            if not isinstance(value, bool):
                raise ValueError(f"ActivationOffloader: {name} must be a bool, got {value!r}")
        if not _is_number(offload_threshold_mb) or not (0 <= offload_threshold_mb < math.inf):
            raise ValueError(f"ActivationOffloader: offload_threshold_mb must be a finite number >= 0, "
                             f"got {offload_threshold_mb!r}")
        if isinstance(prefetch_depth, bool) or not isinstance(prefetch_depth, int) or prefetch_depth < 1:
            raise ValueError(f"ActivationOffloader: prefetch_depth must be an int >= 1, got {prefetch_depth!r}")
        self.enabled = enabled
        self.offload_threshold_mb = float(offload_threshold_mb)
        self.pin_memory = pin_memory
        self.prefetch = prefetch
        self.prefetch_depth = prefetch_depth
        self.force_cpu_roundtrip = force_cpu_roundtrip
        self.stats = OffloadStats()
        self._lock = threading.Lock()
        self._order: list[weakref.ref] = []  # offloaded tensors of the current context, in forward order
        self._by_view: dict[tuple, tuple[StorageWeakRef, weakref.ref]] = {}  # one host copy per saved view
        self._streams: dict[torch.device, Any] = {}

    @property
    def threshold_bytes(self) -> int:
        return int(self.offload_threshold_mb * MIB)

    @property
    def active(self) -> bool:
        """Whether ``offload_context`` moves anything on this machine."""
        return self.enabled and (self.force_cpu_roundtrip or torch.cuda.is_available())

    @contextlib.contextmanager
    def offload_context(self) -> Iterator[ActivationOffloader]:
        """Offload saved tensors of the forward (and backward) run inside it; yields the offloader."""
        global _cpu_only_notice_given
        if not self.active:
            if self.enabled and not _cpu_only_notice_given:
                _cpu_only_notice_given = True
                warnings.warn("ActivationOffloader: no CUDA device, so activation offloading does nothing here "
                              "(activations already live in host memory)", RuntimeWarning, stacklevel=3)
            yield self
            return
        self.stats = OffloadStats()
        self._order, self._by_view = [], {}  # a new list: a later backward of this context keeps its own
        try:
            with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
                yield self
        finally:
            self._by_view = {}

    # pack / unpack ------------------------------------------------------------------------------

    def _eligible(self, t: torch.Tensor) -> bool:
        if t.device.type != "cuda" and not (self.force_cpu_roundtrip and t.device.type == "cpu"):
            return False
        if type(t) not in (torch.Tensor, nn.Parameter) or _is_parameter_data(t) or t.is_sparse:
            return False
        return t.numel() * t.element_size() >= self.threshold_bytes

    def _stream(self, device: torch.device):
        if device not in self._streams:
            self._streams[device] = torch.cuda.Stream(device)
        return self._streams[device]

    def _pack(self, t: torch.Tensor) -> Any:
        if not self._eligible(t):
            self.stats.kept_tensors += 1
            return _Kept(t)
        # the same view saved again (the input of q, k and v projections): share its host copy; the weak
        # storage reference pins the storage's address, so a live entry cannot be a different tensor
        ref = StorageWeakRef(t.untyped_storage())
        view = (ref.cdata, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype, t._version)
        with self._lock:
            entry = self._by_view.get(view)
            item = entry[1]() if entry is not None and not entry[0].expired() else None
            if item is not None:
                self.stats.shared += 1
                item.pending += 1
                return item
        pin = self.pin_memory and t.device.type == "cuda"
        copied = None
        if t.device.type == "cuda":
            stream = self._stream(t.device)
            stream.wait_stream(torch.cuda.current_stream(t.device))  # t is fully computed first
            with torch.cuda.stream(stream):
                host = torch.empty_like(t, device="cpu", pin_memory=pin)
                host.copy_(t, non_blocking=pin)
                copied = torch.cuda.Event()
                copied.record(stream)
            t.record_stream(stream)  # its memory is not reused until the copy is done
        else:
            host = torch.empty_like(t, device="cpu")
            host.copy_(t)
        with self._lock:
            item = _Offloaded(host, t.device, copied, self._order, len(self._order))
            self._order.append(weakref.ref(item))
            self._by_view[view] = (ref, weakref.ref(item))
            self.stats.offloaded_tensors += 1
            self.stats.offloaded_bytes += t.numel() * t.element_size()
        return item

    def _to_device(self, item: _Offloaded) -> tuple[torch.Tensor, Any]:
        """Start copying ``item`` back to its device; returns the tensor and an event marking the copy."""
        if item.device.type != "cuda":
            out = torch.empty_like(item.host)
            out.copy_(item.host)
            return out, None
        stream = self._stream(item.device)
        with torch.cuda.stream(stream):
            stream.wait_event(item.copied)
            out = torch.empty_like(item.host, device=item.device)
            out.copy_(item.host, non_blocking=item.host.is_pinned())
            ready = torch.cuda.Event()
            ready.record(stream)
        return out, ready

    def _unpack(self, packed: Any) -> torch.Tensor:
        if isinstance(packed, _Kept):
            return packed.get()
        with self._lock:
            packed.pending -= 1
            if packed.prefetched is not None:
                out, ready = packed.prefetched, packed.prefetch_ready
                if packed.pending <= 0:
                    packed.prefetched = packed.prefetch_ready = None
                self.stats.prefetched += 1
            else:
                out, ready = self._to_device(packed)
                self.stats.fetched_on_demand += 1
            if self.prefetch:
                self._prefetch_before(packed)
        if ready is not None:
            current = torch.cuda.current_stream(packed.device)
            current.wait_event(ready)
            out.record_stream(current)  # allocated on the side stream, used and freed on this one
        return out

    def _prefetch_before(self, current: _Offloaded) -> None:
        """Start bringing back the ``prefetch_depth`` offloaded tensors packed just before ``current``."""
        started = 0
        for j in range(current.index - 1, -1, -1):
            if started >= self.prefetch_depth:
                break
            item = current.order[j]()
            if item is None or item.pending <= 0:  # already used by backward
                continue
            if item.prefetched is None:
                item.prefetched, item.prefetch_ready = self._to_device(item)
            started += 1


# ---- the run file's `memory:` section ------------------------------------------------------------

@dataclasses.dataclass(kw_only=True)
class OffloadConfig:
    """``memory.offload`` of a run file: :class:`ActivationOffloader`'s settings."""

    enabled: bool = True
    threshold_mb: float = 10.0
    pin_memory: bool = True
    prefetch: bool = True

    def __post_init__(self) -> None:
        for name in ("enabled", "pin_memory", "prefetch"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"offload.{name} must be true or false, got {getattr(self, name)!r}")
        if not _is_number(self.threshold_mb) or not (0 <= self.threshold_mb < math.inf):
            raise ValueError(f"offload.threshold_mb must be a finite number >= 0, got {self.threshold_mb!r}")


@dataclasses.dataclass(kw_only=True)
class MemoryConfig:
    """The ``memory:`` section of a run file, e.g. ``memory: {checkpointing: heavy_ops, offload: {threshold_mb: 10}}``.

    checkpointing: a :class:`CheckpointPolicy` name other than ``custom`` (which needs a function);
        stored as the lower-case name. memory_budget: for ``auto`` (see :class:`SelectiveCheckpointConfig`).
    offload: activation offloading settings, or None (no offloading).
    """

    checkpointing: str = "none"
    memory_budget: float | None = None
    offload: OffloadConfig | None = None

    def __post_init__(self) -> None:
        policy = CheckpointPolicy.parse(self.checkpointing, field="memory.checkpointing")
        if policy is CheckpointPolicy.CUSTOM:
            raise ValueError("memory.checkpointing: custom needs a Python function; use "
                             "apply_selective_checkpointing with SelectiveCheckpointConfig(custom_fn=...) instead")
        self.checkpointing = policy.value
        if isinstance(self.offload, dict):
            self.offload = OffloadConfig(**self.offload)
        if self.offload is not None and not isinstance(self.offload, OffloadConfig):
            raise ValueError(f"memory.offload must be a mapping of offload settings, got {self.offload!r}")
        self.checkpoint_config()  # validates memory_budget against the policy

    @property
    def policy(self) -> CheckpointPolicy:
        return CheckpointPolicy.parse(self.checkpointing)

    def checkpoint_config(self) -> SelectiveCheckpointConfig:
        try:
            return SelectiveCheckpointConfig(policy=self.policy, memory_budget=self.memory_budget)
        except ValueError as exc:
            raise ValueError(f"memory: {exc}") from exc


def apply_memory_config(model: nn.Module, config: MemoryConfig) -> nn.Module:
    """Apply the ``memory:`` section's checkpointing to ``model.layers`` (and ``mtp_heads``); returns ``model``.

    Call it where activation checkpointing goes among the model transforms (after tensor
    parallelism, before ``torch.compile`` and FSDP2). Offloading is per step: :func:`build_offloader`.
    """
    if not isinstance(config, MemoryConfig):
        raise TypeError(f"apply_memory_config: config must be a MemoryConfig, got {type(config).__name__}")
    return apply_selective_checkpointing(model, config.checkpoint_config())


def build_offloader(config: MemoryConfig) -> ActivationOffloader:
    """The offloader of a ``memory:`` section (disabled when it has no ``offload``): wrap each
    micro-batch's forward and backward in ``with offloader.offload_context():``."""
    if not isinstance(config, MemoryConfig):
        raise TypeError(f"build_offloader: config must be a MemoryConfig, got {type(config).__name__}")
    off = config.offload
    if off is None:
        return ActivationOffloader(enabled=False)
    return ActivationOffloader(enabled=off.enabled, offload_threshold_mb=off.threshold_mb,
                               pin_memory=off.pin_memory, prefetch=off.prefetch)
