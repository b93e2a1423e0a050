"""The training loop: accumulation, autocast, clipping, evaluation, checkpoints, logging; seed 003's
arguments and builders (``with_data_parallel``, ``with_model_parallel``, ``with_zero``, ``with_qat``,
``with_mpi``, ``with_rlhf``) on the run file's machinery.

Example::
    args = TrainingArguments(num_epochs=3, train_batch_size=32, learning_rate=1e-4, eval_steps=500)
    trainer = Trainer(model, train_dataset, val_dataset, optimizer, args, loss_fn=F.cross_entropy)
    trainer.train()

    trainer = Trainer(model=model, optimizer=optimizer, lr_scheduler=scheduler,   # seed 004's keywords
                      train_loader=train_loader, val_loader=val_loader,
                      gradient_accumulation_steps=8, checkpoint_dir="./checkpoints")
    trainer.train(max_steps=100000)
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import itertools
import json
import math
import signal
import sys
import time
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from nexus.data.sampler import ResumableShuffleSampler
from nexus.training import checkpoint as ckpt
from nexus.training.losses import multi_token_prediction_loss
from nexus.training.mixed_precision import GradScaler, MixedPrecisionConfig
from nexus.training.mixed_precision.config import PRECISIONS
from nexus.training.preemption import StopSignals


# Seed 004's names (and fp16/bf16) as synonyms of the stored fields: accepted by __init__ and run files,
# read and set as properties; setting a name and its synonym to different values is an error.
SYNONYMS = {"max_lr": "learning_rate", "batch_size": "train_batch_size", "log_interval": "logging_steps",
            "eval_interval": "eval_steps", "save_interval": "save_steps"}
_DEFAULTS = {"learning_rate": 1e-3, "train_batch_size": 8, "logging_steps": 10, "eval_steps": 100, "save_steps": 500}
BACKENDS = ("nccl", "gloo", "mpi")
FP16_OPT_LEVELS = ("O1", "O2")


@dataclasses.dataclass(kw_only=True)
class TrainingArguments:
    """Everything the loop needs besides the model, data and optimizer. Validated when built.

    Seed 003's names, with seed 004's as synonyms (either spelling, in Python and in run files):
    ``learning_rate`` (``max_lr``: the schedule's peak), ``train_batch_size`` (``batch_size``: the global
    batch of one micro-step, split over data-parallel ranks), ``logging_steps`` (``log_interval``: log
    every N optimizer steps), ``eval_steps`` (``eval_interval``: evaluate every N steps), ``save_steps``
    (``save_interval``: checkpoint every N steps). ``fp16=True`` / ``bf16=True`` set ``precision``.
    ``eval_batches`` bounds the validation batches of one evaluation (None: the whole loader).
    Length: ``max_steps``, else ``total_tokens``, else ``num_epochs`` passes over a finite loader.

    Example::
        args = TrainingArguments(num_epochs=3, train_batch_size=32, eval_batch_size=64, learning_rate=1e-4,
                                 warmup_steps=1000, gradient_accumulation_steps=4, max_grad_norm=1.0,
                                 logging_steps=100, eval_steps=500, save_steps=1000)
    """

    output_dir: str = "runs/default"
    checkpoint_dir: str | None = None  # defaults to output_dir
    seq_len: int = 128
    train_batch_size: int | None = None  # default 8
    eval_batch_size: int | None = None  # a validation dataset's batch (default: train_batch_size)
    gradient_accumulation_steps: int = 1
    num_epochs: int | None = None  # passes over a finite train loader; max_steps / total_tokens win
    max_steps: int | None = None
    total_tokens: int | None = None  # sets max_steps when max_steps is not given
    learning_rate: float | None = None  # default 1e-3; the peak of the schedule
    min_lr: float | None = None  # default learning_rate / 10
    weight_decay: float | None = None  # the Trainer's own AdamW (default 0.1); a run file's optimizer section
    warmup_steps: int = 0
    lr_schedule: str = "cosine"  # cosine | wsd | sgdr | constant
    decay_steps: int | None = None  # wsd: length of the final decay (default: the last 20% of steps)
    wsd_decay: str = "linear"  # wsd: linear | cosine | 1-sqrt
    restart_steps: int = 1000  # sgdr: first cycle length T_0
    restart_mult: int = 1  # sgdr: cycle length multiplier T_mult
    max_grad_norm: float | None = 1.0
    precision: str = "fp32"
    fp16_opt_level: str | None = None  # O1 | O2 (apex's names); both are torch AMP here, see mixed_precision()
    fp16_loss_scale: float | None = None  # fp16: a static loss scale (e.g. 128.0); dynamic scaling when unset
    mtp_loss_weight: float = 1.0
    logging_steps: int | None = None  # default 10
    eval_steps: int | None = None  # default 100
    eval_batches: int | None = 20  # validation batches per evaluation; None: all
    save_steps: int | None = None  # default 500
    keep_last: int = 3
    save_best: bool = True
    metric_for_best: str = "val_loss"
    early_stopping_patience: int | None = None
    seed: int = 0
    device: str = "auto"
    local_rank: int | None = None  # checked against the launcher's LOCAL_RANK; picks cuda:local_rank
    world_size: int | None = None  # checked against the launcher's world size
    backend: str | None = None  # nccl | gloo | mpi for the builders' process group (default: nccl on GPUs, gloo)
    gradient_sync_steps: int | None = None  # DDP: all-reduce every N micro-batches (default: once per step)
    use_wandb: bool = False
    wandb_project: str = "nexus"
    wandb_mode: str = "offline"
    tensorboard: bool = True
    # trackers (nexus.training.tracking): tensorboard, wandb, mlflow, neptune, clearml; "none" for none.
    # use_wandb=True adds wandb and tensorboard=False drops tensorboard (the older switches)
    report_to: list[str] | str = dataclasses.field(default_factory=lambda: ["tensorboard"])
    mlflow_tracking_uri: str | None = None  # default: $MLFLOW_TRACKING_URI, else sqlite:///<output_dir>/mlflow.db
    progress_bar: bool = True
    system_metrics: bool = True  # CPU/RAM (psutil) and GPU utilisation/memory in the logged metrics
    peak_flops: float | None = None  # device peak FLOP/s for model FLOPs utilisation

    def __post_init__(self):
        for name, default in _DEFAULTS.items():
            if getattr(self, name) is None:
                setattr(self, name, default)
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.min_lr is None:
            self.min_lr = self.learning_rate / 10
        positive = ("seq_len", "train_batch_size", "gradient_accumulation_steps", "logging_steps", "eval_steps",
                    "save_steps", "keep_last")
        for name in positive:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        for name in ("max_steps", "total_tokens", "early_stopping_patience", "num_epochs", "eval_batch_size",
                     "eval_batches", "gradient_sync_steps", "world_size"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value <= 0):
                raise ValueError(f"{name} must be a positive integer or None, got {value!r}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        steps = self.resolve_max_steps()
        if steps is not None and self.warmup_steps > steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) exceeds max_steps ({steps})")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate (max_lr) must be positive, got {self.learning_rate}")
        if not 0 <= self.min_lr <= self.learning_rate:
            raise ValueError(f"need 0 <= min_lr <= learning_rate, got min_lr={self.min_lr}, "
                             f"learning_rate={self.learning_rate}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if self.max_grad_norm is not None and self.max_grad_norm <= 0:
            raise ValueError(f"max_grad_norm must be positive or null, got {self.max_grad_norm}")
        if self.lr_schedule not in ("cosine", "wsd", "sgdr", "constant"):
            raise ValueError(f"lr_schedule must be cosine, wsd, sgdr or constant, got {self.lr_schedule!r}")
        if self.wsd_decay not in ("linear", "cosine", "1-sqrt"):
            raise ValueError(f"wsd_decay must be linear, cosine or 1-sqrt, got {self.wsd_decay!r}")
        for name in ("decay_steps", "restart_steps", "restart_mult"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name} must be positive, got {value}")
        if self.fp16_loss_scale is not None and (self.precision != "fp16" or not self.fp16_loss_scale > 0):
            raise ValueError(f"fp16_loss_scale ({self.fp16_loss_scale}) needs fp16 (precision fp16) and a positive value")
        if self.fp16_opt_level is not None:
            if self.fp16_opt_level not in FP16_OPT_LEVELS:
                raise ValueError(f"fp16_opt_level must be one of {', '.join(FP16_OPT_LEVELS)} (torch AMP), got "
                                 f"{self.fp16_opt_level!r}; O0 is fp16=False, O3 (pure fp16 weights) is not supported")
            if self.precision != "fp16":
                raise ValueError(f"fp16_opt_level={self.fp16_opt_level!r} needs fp16=True (precision fp16), "
                                 f"got precision {self.precision!r}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        if self.backend is not None and self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.local_rank is not None and (isinstance(self.local_rank, bool) or self.local_rank < -1):
            raise ValueError(f"local_rank must be >= 0 (or -1: not distributed), got {self.local_rank!r}")
        if self.gradient_sync_steps is not None and self.gradient_sync_steps > self.gradient_accumulation_steps:
            raise ValueError(f"gradient_sync_steps ({self.gradient_sync_steps}) exceeds gradient_accumulation_steps "
                             f"({self.gradient_accumulation_steps}): gradients are synchronised at least once per step")
        if self.wandb_mode not in ("offline", "online", "disabled"):
            raise ValueError(f"wandb_mode must be offline, online or disabled, got {self.wandb_mode!r}")
        from nexus.training.tracking import resolve_report_to

        resolve_report_to(self.report_to)  # an unknown tracker name fails here, naming it
        if self.metric_for_best not in ("val_loss", "val_perplexity"):
            raise ValueError(f"metric_for_best must be val_loss or val_perplexity, got {self.metric_for_best!r}")

    def replace(self, **changes: Any) -> TrainingArguments:
        """A copy with ``changes``, which may use the synonyms (``max_lr``, ``log_interval``, ``fp16`` ...)."""
        return dataclasses.replace(self, **_merge_synonyms(changes, self.precision))

    @classmethod
    def init_synonyms(cls) -> dict[str, Any]:
        """The names ``__init__`` takes besides the fields, with their types (for run files)."""
        hints = typing.get_type_hints(cls)
        return {**{synonym: hints[name] for synonym, name in SYNONYMS.items()}, "fp16": bool, "bf16": bool}

    @classmethod
    def field_names(cls) -> set[str]:
        """Every name ``__init__`` takes: the stored fields and their synonyms."""
        return {f.name for f in dataclasses.fields(cls)} | set(cls.init_synonyms())

    def resolve_report_to(self) -> list[str]:
        """The trackers of the run: ``report_to`` with ``use_wandb`` (adds wandb) and ``tensorboard=False``
        (drops tensorboard) applied."""
        from nexus.training.tracking import resolve_report_to

        names = resolve_report_to(self.report_to)
        if self.use_wandb and "wandb" not in names:
            names.append("wandb")
        return [n for n in names if n != "tensorboard" or self.tensorboard]

    @property
    def tokens_per_step(self) -> int:
        return self.train_batch_size * self.gradient_accumulation_steps * self.seq_len

    def resolve_max_steps(self, batches_per_epoch: int | None = None) -> int | None:
        """``max_steps``, else from ``total_tokens``, else ``num_epochs`` x ``batches_per_epoch`` micro-batches
        (a finite loader's length) / ``gradient_accumulation_steps``; None when none applies."""
        if self.max_steps is not None:
            return self.max_steps
        if self.total_tokens is not None:
            return max(self.total_tokens // self.tokens_per_step, 1)
        if self.num_epochs is not None and batches_per_epoch:
            return max(self.num_epochs * batches_per_epoch // self.gradient_accumulation_steps, 1)
        return None

    def mixed_precision(self) -> MixedPrecisionConfig:
        """Autocast dtype and loss scaling for ``precision`` (fp8/mxfp8/fp4 layers compute in their own formats).

        fp16 is torch AMP: fp32 master weights, fp16 autocast, loss scaling (static with ``fp16_loss_scale``,
        dynamic otherwise); apex's ``fp16_opt_level`` O1 and O2 both name this recipe.
        """
        static = self.fp16_loss_scale is not None
        return MixedPrecisionConfig(
            dtype=self.precision if self.precision in ("bf16", "fp16") else "fp32",
            loss_scaling="static" if static else "auto",
            init_scale=self.fp16_loss_scale if static else 2.0**16,
        )

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            if torch.cuda.is_available():
                return torch.device("cuda", self.local_rank) if self.local_rank not in (None, -1) else torch.device("cuda")
            return torch.device("cpu")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device {self.device!r} was asked for but CUDA is not available")
        return torch.device(self.device)


def _synonym_property(name: str) -> property:
    return property(lambda self: getattr(self, name), lambda self, value: setattr(self, name, value),
                    doc=f"Synonym of ``{name}``.")


for _synonym, _name in SYNONYMS.items():
    setattr(TrainingArguments, _synonym, _synonym_property(_name))
TrainingArguments.fp16 = property(lambda self: self.precision == "fp16", doc="precision == 'fp16'")
TrainingArguments.bf16 = property(lambda self: self.precision == "bf16", doc="precision == 'bf16'")


def _merge_synonyms(kwargs: dict, default_precision: str = "fp32") -> dict:
    """``kwargs`` with each synonym moved onto its field; a name and its synonym that disagree raise."""
    kwargs = dict(kwargs)
    for synonym, name in SYNONYMS.items():
        if synonym not in kwargs:
            continue
        other = kwargs.pop(synonym)
        value = kwargs.get(name)
        if value is not None and other is not None and value != other:
            hint = (" (eval_steps is seed 003's 'evaluate every N steps'; the number of validation batches is "
                    "eval_batches)") if name == "eval_steps" else ""
            raise ValueError(f"{name}={value!r} and its synonym {synonym}={other!r} disagree: set one{hint}")
        kwargs[name] = value if value is not None else other
    fp16, bf16 = kwargs.pop("fp16", None), kwargs.pop("bf16", None)
    if fp16 and bf16:
        raise ValueError("fp16=True and bf16=True: choose one")
    for flag, on in (("fp16", fp16), ("bf16", bf16)):
        precision = kwargs.get("precision")
        if on:
            if precision not in (None, flag):
                raise ValueError(f"{flag}=True and precision={precision!r} disagree: set one")
            kwargs["precision"] = flag
        elif on is False and (precision or default_precision) == flag:
            if precision == flag:
                raise ValueError(f"{flag}=False and precision={precision!r} disagree: set one")
            kwargs["precision"] = "fp32"
    return kwargs


_dataclass_init = TrainingArguments.__init__


@functools.wraps(_dataclass_init)
def _init_with_synonyms(self, **kwargs):
    _dataclass_init(self, **_merge_synonyms(kwargs))


TrainingArguments.__init__ = _init_with_synonyms


@dataclasses.dataclass(kw_only=True)
class ModelParallelConfig:
    """Seed 003's model parallelism: ``tensor_parallel_size`` x ``pipeline_parallel_size`` ranks hold one copy
    of the model (Megatron column/row splits, layers in pipeline stages); the rest of the world is data
    parallel (``data_parallel_strategy`` fsdp2 | ddp). The run file's ``distributed: {tp, pp, ...}``.
    Example: ``ModelParallelConfig(tensor_parallel_size=4, pipeline_parallel_size=2)``"""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    sequence_parallel: bool = True
    pipeline_schedule: str = "1f1b"  # 1f1b | gpipe | interleaved_1f1b
    pipeline_microbatches: int | None = None  # default: 2 x pipeline_parallel_size
    data_parallel_strategy: str = "fsdp2"

    def __post_init__(self):
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "pipeline_microbatches"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"ModelParallelConfig.{name} must be a positive integer, got {value!r}")
        if self.data_parallel_strategy not in ("fsdp2", "ddp"):
            raise ValueError(f"ModelParallelConfig.data_parallel_strategy must be fsdp2 or ddp, got "
                             f"{self.data_parallel_strategy!r}")
        self.distributed_config()  # validates the schedule

    def distributed_config(self):
        """The ``DistributedConfig`` (run file ``distributed:`` section) this asks for."""
        from nexus.training.distributed.mesh import DistributedConfig

        try:
            return DistributedConfig(strategy=self.data_parallel_strategy, tp=self.tensor_parallel_size,
                                     pp=self.pipeline_parallel_size, sequence_parallel=self.sequence_parallel,
                                     pp_schedule=self.pipeline_schedule, pp_microbatches=self.pipeline_microbatches)
        except ValueError as exc:
            raise ValueError(f"ModelParallelConfig: {exc}") from None


class MPIBackend(enum.Enum):
    """Which MPI launched the ranks (it names the rank variables); seed 003's spellings are aliases."""

    OPENMPI = "openmpi"
    MPICH = "mpich"
    INTEL_MPI = "intel_mpi"
    OpenMPI = "openmpi"
    IntelMPI = "intel_mpi"

    @classmethod
    def _missing_(cls, value):
        return cls.__members__.get(value) if isinstance(value, str) else None


@dataclasses.dataclass(kw_only=True)
class MPIConfig:
    """An MPI launch (``mpirun -np N``): ``rank`` / ``world_size`` default to the launcher's variables;
    ``init_method`` ``tcp://host:port`` is where rank 0 meets the others (default: ``MASTER_ADDR`` /
    ``MASTER_PORT``, or 127.0.0.1:29500 when every rank is on this machine). The collectives are
    torch.distributed's (Gloo / NCCL).
    Example: ``MPIConfig(backend=MPIBackend.MPICH, init_method="tcp://node0:23456", world_size=8, rank=0)``"""

    backend: MPIBackend = MPIBackend.OPENMPI
    init_method: str | None = None
    world_size: int | None = None
    rank: int | None = None

    def __post_init__(self):
        try:
            self.backend = MPIBackend(self.backend)
        except ValueError:
            raise ValueError(f"MPIConfig.backend must be one of {[b.value for b in MPIBackend]}, "
                             f"got {self.backend!r}") from None
        if self.world_size is not None and (isinstance(self.world_size, bool) or self.world_size < 1):
            raise ValueError(f"MPIConfig.world_size must be >= 1, got {self.world_size!r}")
        if self.rank is not None and not 0 <= self.rank < (self.world_size or self.rank + 1):
            raise ValueError(f"MPIConfig.rank must be in [0, world_size), got rank={self.rank}, "
                             f"world_size={self.world_size}")
        if self.init_method is not None:
            self.address()

    def address(self) -> tuple[str, int]:
        """(host, port) of the rendezvous."""
        import os

        if self.init_method is None:
            return os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", 29500))
        scheme, _, rest = self.init_method.partition("://")
        host, _, port = rest.rpartition(":")
        if scheme != "tcp" or not host or not port.isdigit():
            raise ValueError(f"MPIConfig.init_method must be tcp://host:port, got {self.init_method!r}")
        return host, int(port)

    def launcher_env(self) -> tuple[int, int, int] | None:
        """(rank, world size, local rank) from the MPI launcher's variables; None outside an MPI launch."""
        import os

        env = os.environ
        names = {MPIBackend.OPENMPI: ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK")}
        rank_var, size_var, local_var = names.get(self.backend, ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"))
        if rank_var not in env or size_var not in env:
            return None
        return int(env[rank_var]), int(env[size_var]), int(env.get(local_var, 0))

    def resolve(self, launched: tuple[int, int, int] | None) -> tuple[int, int, int]:
        """(rank, world size, local rank): the config's values, which must agree with the launch's."""
        if launched is not None:
            for name, mine, theirs in (("rank", self.rank, launched[0]), ("world_size", self.world_size, launched[1])):
                if mine is not None and mine != theirs:
                    raise ValueError(f"MPIConfig.{name}={mine} but the launch says {theirs}")
            return launched
        world = self.world_size or 1
        if world > 1 and self.rank is None:
            raise ValueError(f"MPIConfig.world_size={world} outside an MPI launch: give rank too (or run under mpirun)")
        return self.rank or 0, world, 0


def _ddp_config():
    from nexus.training.distributed.mesh import DistributedConfig

    return DistributedConfig(strategy="ddp")


class TrainerCallback:
    """Hooks called by ``Trainer``; override the ones you need. Set ``trainer.should_stop`` to stop."""

    def on_train_begin(self, trainer: Trainer) -> None: ...
    def on_log(self, trainer: Trainer, metrics: dict) -> None: ...
    def on_evaluate(self, trainer: Trainer, metrics: dict) -> None: ...
    def on_save(self, trainer: Trainer, path: Path) -> None: ...
    def on_train_end(self, trainer: Trainer) -> None: ...
    def on_task_end(self, trainer: Trainer) -> None: ...  # at trainer.start_task, before the loaders change

    def extra_loss(self, trainer: Trainer, window: torch.Tensor, out: Any) -> torch.Tensor | None:
        """A term added to each micro-batch's loss (a continual-learning regulariser); ``window`` is the batch
        and ``out`` the model's output on ``trainer.model_inputs(window)``. A callback with
        ``state_dict``/``load_state_dict`` is checkpointed."""
        return None


@dataclasses.dataclass
class TrainResult:
    step: int
    tokens_seen: int
    stop_reason: str  # "max_steps" | "early_stopping" | "nonfinite_loss" | "callback" | "signal" | "finished"
    last_checkpoint: Path | None
    best_metric: float | None
    metrics: dict
    signal: int | None = None  # the signal number when stop_reason == "signal"


class NonFiniteLossError(RuntimeError):
    """Raised inside the loop when the loss or the gradient norm is NaN or inf."""


def clip_grad_norm(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for parameters that mix plain tensors and DTensors on
    different meshes (tensor parallel beside replicated modules, FSDP2): the norm of each group,
    then the total. Returns the total norm as a plain 0-dim tensor."""
    from torch.distributed.tensor import DTensor

    groups: dict[object, list[torch.Tensor]] = {}
    for p in params:
        groups.setdefault(p.grad.device_mesh if isinstance(p.grad, DTensor) else None, []).append(p.grad)
    if len(groups) == 1 and None in groups:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    from torch.distributed.tensor import Replicate

    norms = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads)
        norms.append(norm.full_tensor() if isinstance(norm, DTensor) else norm)
    total = torch.linalg.vector_norm(torch.stack(norms))
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)  # as torch's clip_grad_norm_
    for mesh, grads in groups.items():
        scale = coef if mesh is None else DTensor.from_local(coef, mesh, [Replicate()] * mesh.ndim)
        torch._foreach_mul_(grads, scale)
    return total


def _is_wrapped(model: torch.nn.Module) -> bool:
    """Already placed by a parallelism (DDP, or FSDP2 / tensor parallel DTensor parameters)."""
    from torch.distributed.tensor import DTensor

    return isinstance(model, torch.nn.parallel.DistributedDataParallel) or any(
        isinstance(p, DTensor) for p in model.parameters())


class Trainer:
    """Train a model: seed 003's ``Trainer(model, train_dataset, val_dataset, optimizer, args)`` or seed
    004's keywords (``train_loader=``, ``val_loader=``, ``lr_scheduler=``, ``config=`` ...).

    Two kinds of model:

    - token windows (the MoE language model, ``nexus train``): batches are ``[B, seq_len + n_pred_tokens]``
      token ids, the model returns ``logits``, ``mtp_logits`` and ``aux_loss`` and the loss is the
      multi-token prediction loss. Chosen for a model with ``config.n_pred_tokens`` or a pipeline, or with
      ``token_windows=True``.
    - any other ``nn.Module``: batches are tensors, tuples or dicts (moved to the device). The model is called
      as ``model(**batch)``, ``model(*batch)`` or ``model(batch)`` and returns a 0-dim loss, a dict / tuple
      holding ``loss`` first (HF style), or, with ``loss_fn=``, outputs (or ``logits``) given to
      ``loss_fn(outputs, labels)``; then the labels are the tuple's last item, ``batch["labels"]``, or the
      tensor batch itself, and the model gets the rest.

    Datasets become loaders of ``args.train_batch_size`` (shuffled, resumable) and ``args.eval_batch_size``;
    loaders and other iterables of batches are used as they are. ``Trainer(model, data, optimizer, args)``
    (seed 003's builder examples) reads an optimizer in the third place as the optimizer.
    ``args`` holds the settings; keyword arguments named like ``TrainingArguments`` fields (or their
    synonyms) override it. ``lr_scheduler``: "auto" (default) builds ``args.lr_schedule`` with
    ``warmup_steps`` over the run when training starts; None keeps the optimizer's lr.
    ``compute_metrics(EvalPrediction) -> dict`` adds task metrics to each evaluation
    (``nexus.training.metrics``). ``config`` is saved in checkpoints for reference.

    Example::
        trainer = Trainer(model, train_dataset, val_dataset, optimizer, args, loss_fn=F.cross_entropy)
        trainer.train()
        trainer.save_checkpoint("checkpoint-1000.pt")
    """

    def __init__(
        self,
        model: torch.nn.Module,
        train_dataset: Any = None,
        val_dataset: Any = None,
        optimizer: torch.optim.Optimizer | None = None,
        args: TrainingArguments | None = None,
        *,
        lr_scheduler: Any = "auto",
        train_loader: Any = None,
        val_loader: Any = None,
        config: Any = None,
        callbacks: list[TrainerCallback] | None = None,
        parallel: Any = None,
        pipeline: Any = None,
        offloader: Any = None,
        loss_fn: Any = None,
        compute_metrics: Any = None,
        token_windows: bool | None = None,
        **overrides: Any,
    ):
        names = TrainingArguments.field_names()
        unknown = sorted(set(overrides) - names)
        if unknown:
            raise TypeError(f"Trainer got unknown argument(s) {unknown}; TrainingArguments fields are {sorted(names)}")
        if isinstance(train_dataset, torch.optim.Optimizer) and optimizer is None and val_dataset is None:
            train_dataset, optimizer = None, train_dataset  # the older Trainer(model, optimizer, train_loader=...)
        if isinstance(val_dataset, torch.optim.Optimizer) and (optimizer is None or isinstance(optimizer, TrainingArguments)):
            if args is not None:
                raise TypeError("Trainer(model, data, optimizer, args, <extra>): too many positional arguments")
            val_dataset, optimizer, args = None, val_dataset, optimizer  # Trainer(model, data, optimizer, args)
        if args is not None and not isinstance(args, TrainingArguments):
            raise TypeError(f"args must be a TrainingArguments, got {type(args).__name__}")
        args = args or TrainingArguments()
        self.args = args.replace(**overrides) if overrides else args
        for name, dataset, loader in (("train", train_dataset, train_loader), ("val", val_dataset, val_loader)):
            if dataset is not None and loader is not None:
                raise ValueError(f"give {name}_dataset or {name}_loader, not both")
        if train_dataset is None and train_loader is None:
            raise ValueError("train_dataset (or train_loader) is required")
        if loss_fn is not None and not callable(loss_fn):
            raise TypeError(f"loss_fn must be callable (outputs, labels) -> loss, got {type(loss_fn).__name__}")
        if compute_metrics is not None and not callable(compute_metrics):
            raise TypeError(f"compute_metrics must be callable (EvalPrediction) -> dict, got {type(compute_metrics).__name__}")
        from nexus.training.distributed.mesh import current_context

        # where this rank stands: one process, or a mesh built by nexus.training.distributed.init_parallel
        self.parallel = parallel or current_context()
        self.is_main = self.parallel.is_main
        self.device = self.args.resolve_device()
        # a pipeline (nexus.training.distributed.parallelize_pipeline) runs model = PipelineStages(runner)
        self.pipeline = pipeline
        self.offloader = offloader  # an ActivationOffloader (nexus.training.gradient_methods) or None
        self.loss_fn = loss_fn
        self.compute_metrics = compute_metrics
        if token_windows is None:
            inner = getattr(model, "module", model)
            token_windows = pipeline is not None or (
                loss_fn is None and hasattr(getattr(inner, "config", None), "n_pred_tokens"))
        self.token_windows = bool(token_windows)
        if not self.token_windows and self.args.metric_for_best == "val_perplexity":
            raise ValueError("metric_for_best='val_perplexity' is a token-window model's; this model reports val_loss")
        if self.token_windows and (loss_fn is not None or compute_metrics is not None):
            raise ValueError("loss_fn and compute_metrics apply to models with labels; a token-window model "
                             "(multi-token prediction loss) takes neither: pass token_windows=False")
        # context parallelism (distributed.cp > 1): each window's sequence split over the cp ranks
        self.context_parallel = None
        if self.parallel.sizes.get("cp", 1) > 1:
            from nexus.training.distributed.context_parallelism import SequenceSplit

            self.context_parallel = SequenceSplit(self.parallel.mesh["cp"].get_group(), self.args.seq_len)
        wrapped = _is_wrapped(model) or pipeline is not None
        if self.args.precision in ("fp8", "mxfp8", "fp4") and not wrapped:  # a wrapped model was converted first
            from nexus.training.mixed_precision import apply_precision

            model = apply_precision(model, self.args.precision)  # swapped layers keep the same Parameters
        self.model = model if wrapped else model.to(self.device)
        from torch.distributed.tensor import DTensor

        # sharded parameters (FSDP2, tensor parallel) are saved by every rank through torch.distributed.checkpoint
        self.sharded = pipeline is not None or any(isinstance(p, DTensor) for p in self.model.parameters())
        if pipeline is not None and (self.args.precision == "fp16" or hasattr(optimizer, "update_hessian")):
            raise ValueError("a pipeline-parallel run supports neither fp16 loss scaling nor Sophia's Hessian updates")
        if not self.token_windows and hasattr(optimizer, "update_hessian"):
            raise ValueError("Sophia's Hessian estimate reads a token-window model's logits; use it with token_windows")
        decay = self.args.weight_decay if self.args.weight_decay is not None else 0.1
        self.optimizer = optimizer or torch.optim.AdamW(model.parameters(), lr=self.args.learning_rate,
                                                        weight_decay=decay)
        # "auto": the run file's schedule, built when train() knows the run's length
        self._auto_schedule = isinstance(lr_scheduler, str) and lr_scheduler == "auto"
        if isinstance(lr_scheduler, str) and not self._auto_schedule:
            raise ValueError(f"lr_scheduler must be a scheduler, None or 'auto', got {lr_scheduler!r}")
        if self._auto_schedule and "ScheduleFree" in type(self.optimizer).__name__:
            self._auto_schedule = False  # schedule-free optimizers warm up and average on their own
        self.lr_scheduler = None if self._auto_schedule else lr_scheduler
        self._pending_scheduler_state = None
        self._datasets = (train_dataset, val_dataset)
        self.train_loader = train_loader
        self.val_loader = val_loader
        self._build_loaders()
        self.config = config
        self.callbacks = list(callbacks or [])
        self.rlhf = None  # nexus.training.rlhf.RLHFTraining once with_rlhf is called: it runs each step
        self.output_dir = Path(self.args.output_dir)
        self.checkpoint_dir = Path(self.args.checkpoint_dir or self.args.output_dir)
        self.step = 0
        self.tokens_seen = 0
        self.micro_batches_seen = 0
        self.best_metric: float | None = None
        self.evals_without_improvement = 0
        self.should_stop = False
        self.last_checkpoint: Path | None = None
        self.resume_command: str | None = None  # e.g. "nexus train --config X": named in the stop message
        self.precision = self.args.mixed_precision()
        scaling = self.precision.resolved_loss_scaling != "none"
        self.scaler = GradScaler(self.precision, device=self.device.type) if scaling else None
        self._data_iter = None
        self._stops = StopSignals()
        self._flops_per_token = self._estimate_flops_per_token() if self.token_windows else None

    def _build_loaders(self) -> None:
        """Loaders for the datasets given (this rank's share of each global batch); loaders given stay."""
        from torch.utils.data import DataLoader, Dataset, IterableDataset

        from nexus.data.sampler import ShardedSequentialSampler

        train, val = self._datasets
        rank, size = self.parallel.dp_rank, self.parallel.dp_size
        self._epoch_batches = None  # micro-batches per pass over a map-style train dataset (its stream is endless)
        for name, batch, dataset in (("train_batch_size", self.args.train_batch_size, train),
                                     ("eval_batch_size", self.args.eval_batch_size or self.args.train_batch_size, val)):
            if isinstance(dataset, Dataset) and batch % size:  # loaders given are used as they are
                raise ValueError(f"{name} {batch} is not divisible by the {size} data-parallel ranks")
        local = self.args.train_batch_size // size
        local_eval = (self.args.eval_batch_size or self.args.train_batch_size) // size
        if isinstance(train, Dataset) and not isinstance(train, DataLoader):
            if isinstance(train, IterableDataset):
                self.train_loader = DataLoader(train, batch_size=local)
            else:
                sampler = ResumableShuffleSampler(len(train), seed=self.args.seed, rank=rank, world_size=size,
                                                  batch_size=local)
                self._epoch_batches = max(len(train) // self.args.train_batch_size, 1)
                # a private generator keeps DataLoader's per-iterator seed draw off the global RNG stream
                self.train_loader = DataLoader(train, batch_size=local, sampler=sampler,
                                               generator=torch.Generator().manual_seed(self.args.seed))
        elif train is not None:
            self.train_loader = train
        if isinstance(val, Dataset) and not isinstance(val, DataLoader):
            if isinstance(val, IterableDataset) or size == 1:
                self.val_loader = DataLoader(val, batch_size=local_eval)
            else:  # every rank the same number of batches (the tail that does not split evenly is left out)
                self.val_loader = DataLoader(val, batch_size=local_eval, sampler=ShardedSequentialSampler(
                    len(val), rank=rank, world_size=size, batch_size=local_eval))
        elif val is not None:
            self.val_loader = val

    # ---- seed 003's builders: each the run file's machinery (run.place_model), returning the trainer ---------
    def with_data_parallel(self, config: Any = None) -> Trainer:
        """Data parallel over the launcher's ranks (``torchrun`` / ``mpirun``): the model replicated under DDP
        (or ``config``, a ``DistributedConfig``, e.g. ``strategy="fsdp2"``), each rank a share of every global
        batch of ``train_batch_size`` (datasets are split; loaders given are used as they are), gradients
        averaged. Under one process this is a world of one: training is unchanged. Call before ``train()``.
        Example: ``trainer = Trainer(model, data, optimizer, args).with_data_parallel()``"""
        from nexus.training.distributed.mesh import DistributedConfig

        return self._apply_parallel(config or DistributedConfig(strategy="ddp"), "with_data_parallel")

    def with_model_parallel(self, config: ModelParallelConfig) -> Trainer:
        """Tensor parallel over ``config.tensor_parallel_size`` ranks and pipeline parallel over
        ``pipeline_parallel_size`` (the plans of ``MoETransformer``); the ranks left over are data parallel
        (FSDP2). Under one process (a world of one) the model stays whole and this says so.
        Example: ``trainer.with_model_parallel(ModelParallelConfig(tensor_parallel_size=2))``"""
        if not isinstance(config, ModelParallelConfig):
            raise TypeError(f"with_model_parallel takes a ModelParallelConfig, got {type(config).__name__}")
        return self._apply_parallel(config.distributed_config(), "with_model_parallel")

    def with_zero(self, config: Any) -> Trainer:
        """ZeRO stage 1, 2 or 3 (``nexus.training.distributed.zero.ZeROConfig``) over the data-parallel ranks:
        the run file's ``strategy: zero``. Under one process (a world of one) nothing is partitioned.
        Example: ``trainer.with_zero(ZeROConfig(stage=3, offload_optimizer=True, offload_params=False))``"""
        from nexus.training.distributed.mesh import DistributedConfig
        from nexus.training.distributed.zero import ZeROConfig

        if not isinstance(config, ZeROConfig):
            raise TypeError(f"with_zero takes a ZeROConfig, got {type(config).__name__}")
        return self._apply_parallel(DistributedConfig(strategy="zero", zero_stage=config.stage,
                                                      offload_optimizer=config.offload_optimizer,
                                                      offload_params=config.offload_params), "with_zero")

    def with_qat(self, config: Any = None) -> Trainer:
        """Quantization-aware training: every ``nn.Linear`` becomes a fake-quantized ``QATLinear`` (the run
        file's ``qat:`` section, ``nexus.training.qat.prepare_qat``). Call before the parallel builders.
        Example: ``trainer.with_qat(QATConfig(observer_type=ObserverType.MinMaxObserver))``"""
        from nexus.training.qat import QATConfig, prepare_qat

        if config is not None and not isinstance(config, QATConfig):
            raise TypeError(f"with_qat takes a QATConfig, got {type(config).__name__}")
        if _is_wrapped(self.model) or self.pipeline is not None:
            raise RuntimeError("with_qat: call it before the parallel builders (layers are swapped before they are "
                               "sharded, in parallelize's order)")
        if self.args.precision in ("fp8", "mxfp8", "fp4"):
            raise ValueError(f"with_qat and precision={self.args.precision} both replace Linear layers; choose one")
        self.model = prepare_qat(self.model, config or QATConfig())  # same Parameters: the optimizer stays valid
        return self

    def with_mpi(self, config: MPIConfig) -> Trainer:
        """Data parallel over the ranks of an MPI launch (``mpirun -np N``): rank and world size from
        ``config`` or the launcher's variables (OpenMPI's ``OMPI_COMM_WORLD_*``, MPICH / Intel MPI's
        ``PMI_*``), the rendezvous at ``config.init_method`` (``tcp://host:port``), then torch.distributed
        (Gloo on CPUs, NCCL on GPUs) as :meth:`with_data_parallel`. A world of one under one process."""
        if not isinstance(config, MPIConfig):
            raise TypeError(f"with_mpi takes an MPIConfig, got {type(config).__name__}")
        import os

        import torch.distributed as dist

        launched = config.launcher_env()
        if dist.is_available() and dist.is_initialized():  # already joined: the config must agree
            launched = (dist.get_rank(), dist.get_world_size(), launched[2] if launched else 0)
        rank, world, local = config.resolve(launched)
        if world > 1 and not (dist.is_available() and dist.is_initialized()):
            host, port = config.address()
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(local), MASTER_ADDR=host,
                              MASTER_PORT=str(port))
        return self._apply_parallel(_ddp_config(), "with_mpi")

    def with_rlhf(self, config: Any, *, reward: Any = None, reference: Any = None, critic: Any = None) -> Trainer:
        """Train with an RLHF method (``nexus.training.rlhf.RLHFConfig``: ``method`` "ppo", "dpo" or "reward")
        instead of the next-token loss, on this loop, optimizer, schedule, logging and checkpoints
        (:class:`nexus.training.rlhf.RLHFTraining` says which batches each method takes and what is saved).
        PPO's reward is ``config.reward_model_path`` or ``reward``, a callable (sequences, mask) -> [B] scores.
        Example: ``trainer.with_rlhf(RLHFConfig(reward_model_path="rm.pt", kl_coef=0.1, gamma=0.99, lam=0.95))``"""
        from nexus.training.rlhf import RLHFTraining

        if self.rlhf is not None:
            raise RuntimeError("with_rlhf was already called on this trainer")
        self.rlhf = RLHFTraining(self, config, reward=reward, reference=reference, critic=critic)
        self.callbacks.append(self.rlhf)  # a callback with a state_dict: its state goes into the checkpoints
        return self

    def _check_launch(self) -> None:
        """``args.world_size`` / ``args.local_rank``, when set, must match what the launcher started."""
        from nexus.training.distributed.mesh import launch_env

        env = launch_env()
        if self.args.world_size is not None and self.args.world_size != env.world_size:
            raise ValueError(f"world_size={self.args.world_size} but {env.world_size} process(es) were launched "
                             f"({env.launcher}); launch with torchrun --nproc-per-node / mpirun -np, or unset it")
        if self.args.local_rank not in (None, -1) and self.args.local_rank != env.local_rank:
            raise ValueError(f"local_rank={self.args.local_rank} but the launcher gave this process local rank "
                             f"{env.local_rank}; unset it (the launcher's LOCAL_RANK is used)")

    def _apply_parallel(self, config: Any, what: str) -> Trainer:
        """Join the process group, build the mesh of ``config`` and place the model as ``nexus train`` does
        (``run.place_model``); rebuild the optimizer over the placed parameters and split the datasets."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        from nexus.training.distributed.mesh import init_parallel, launch_env
        from nexus.training.run import place_model

        if self.step > 0 or any(self.optimizer.state.values()):
            raise RuntimeError(f"{what}: call it before training (the optimizer has already stepped)")
        if _is_wrapped(self.model) or self.pipeline is not None:
            raise RuntimeError(f"{what}: the model is already placed ({type(self.model).__name__}); "
                               "use one parallel builder (data, model, ZeRO or MPI)")
        self._check_launch()
        if self.args.backend == "mpi" and not dist.is_mpi_available():
            raise ValueError("backend='mpi': this torch has no MPI backend (torch.distributed.is_mpi_available() is "
                             "False); under mpirun use backend gloo (CPU) or nccl (GPU) with with_mpi(MPIConfig(...))")
        if self.args.backend in ("gloo", "nccl") and config.backend is None:
            config = dataclasses.replace(config, backend=self.args.backend)
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else launch_env().world_size
        if world == 1 and max(config.tp, config.pp, config.cp, config.dp_replicate, config.dp_shard) > 1:
            self._say(f"{what}: tp {config.tp} x pp {config.pp} need that many ranks; this is a world of one "
                      "process: the model stays whole")
            config = dataclasses.replace(config, tp=1, pp=1, cp=1, dp_replicate=1, dp_shard=-1)
        ctx = init_parallel(config, device_type=self.device.type)
        inner = self.unwrapped_model
        if (ctx.sizes["tp"] > 1 or ctx.sizes["pp"] > 1) and not hasattr(getattr(inner, "config", None), "n_pred_tokens"):
            raise ValueError(f"{what}: tensor and pipeline parallel plans exist for nexus.models.moe.MoETransformer; "
                             f"{type(inner).__name__} can be data parallel (with_data_parallel, with_zero)")
        names = {id(p): n for n, p in inner.named_parameters()}
        pipeline, model = place_model(inner, ctx, self.args, self.device)
        from nexus.training.distributed.data_parallel import unwrap_model

        placed = unwrap_model(model)
        optimizer = self.optimizer
        placed_params = dict(placed.named_parameters())
        if {id(p) for p in placed_params.values()} != set(names):  # sharding replaced Parameters, or a stage holds some
            # the same groups and hyperparameters over the placed Parameters (a pipeline rank: its stages' only)
            groups = [{**{k: v for k, v in g.items() if k != "params"},
                       "params": [placed_params[names[id(p)]] for p in g["params"] if names[id(p)] in placed_params]}
                      for g in optimizer.param_groups]
            from nexus.training.distributed.zero import constructor_defaults

            optimizer = type(optimizer)([g for g in groups if g["params"]], **constructor_defaults(optimizer))
        if ctx.distributed:
            from nexus.training.distributed.zero import shard_optimizer

            optimizer = shard_optimizer(optimizer, ctx)
        if optimizer is not self.optimizer and self.lr_scheduler is not None:
            raise ValueError(f"{what}: the optimizer is rebuilt over the placed parameters, so a scheduler built on "
                             "the old one would not drive it: leave lr_scheduler='auto' (the default) or None")
        self.parallel, self.is_main = ctx, ctx.is_main
        self.model, self.pipeline, self.optimizer = model, pipeline, optimizer
        self.sharded = pipeline is not None or any(isinstance(p, DTensor) for p in self.model.parameters())
        if pipeline is not None:
            self.token_windows = True
        self._build_loaders()
        self._data_iter = None
        if ctx.dp_size > 1 and not isinstance(self._datasets[0], torch.utils.data.Dataset):
            self._say(f"{what}: the train loader was given as a loader, so each of the {ctx.dp_size} data-parallel "
                      "ranks reads it whole; give the dataset to have each rank read its share")
        return self

    @property
    def unwrapped_model(self) -> torch.nn.Module:
        """The model inside a DistributedDataParallel wrapper (the model itself otherwise)."""
        return self.model.module if isinstance(self.model, torch.nn.parallel.DistributedDataParallel) else self.model

    # ---- data position -------------------------------------------------------------------------
    def _data_state(self) -> dict:
        """Where the data stream stands: counted here, since loaders prefetch ahead of use."""
        state = {"micro_batches": self.micro_batches_seen}
        sampler = getattr(self.train_loader, "sampler", None)
        dataset = getattr(self.train_loader, "dataset", None)
        if isinstance(sampler, ResumableShuffleSampler):
            batch_size = (getattr(self.train_loader, "batch_size", None) or 1) * sampler.world_size
            state["sampler"] = sampler.state_dict(consumed=self.micro_batches_seen * batch_size)  # the global stream
        elif hasattr(dataset, "state_dict"):
            state["dataset"] = dataset.state_dict()
        return state

    def _restore_data(self, state: dict) -> None:
        if "sampler" in state:
            self.train_loader.sampler.load_state_dict(state["sampler"])
        elif "dataset" in state:
            self.train_loader.dataset.load_state_dict(state["dataset"])
        else:  # a plain loader: replay its order up to where the run stopped (exact when not shuffled)
            self._data_iter = self._new_data_iter()
            for _ in range(state["micro_batches"]):
                self._next_batch()
            self.micro_batches_seen = state["micro_batches"]
            return
        self._data_iter = None

    def _new_data_iter(self):
        # A DataLoader iterator draws its base seed from the global RNG unless given a generator;
        # keep that draw off the training stream so that a resumed run sees the same dropout.
        with torch.random.fork_rng(devices=[]):
            return iter(self.train_loader)

    def _next_batch(self) -> torch.Tensor:
        if self._data_iter is None:
            self._data_iter = self._new_data_iter()
        try:
            batch = next(self._data_iter)
        except StopIteration:
            self._data_iter = self._new_data_iter()
            batch = next(self._data_iter)
        self.micro_batches_seen += 1
        return batch

    # ---- loss and steps ------------------------------------------------------------------------
    def _autocast(self):
        return self.precision.autocast(self.device.type)

    def _forward(self, window: torch.Tensor) -> Any:
        """The model on ``window[:, :seq_len]``, or on this rank's slice of it under context parallelism."""
        if self.context_parallel is None:
            return self.model(window[:, : self.args.seq_len])
        ids, positions = self.context_parallel.inputs(window)
        return self.model(ids, positions=positions)

    def compute_loss(self, window: torch.Tensor, out: Any = None) -> tuple[torch.Tensor, dict]:
        """Loss of one micro-batch ``window`` [B, seq_len + n_pred_tokens]; returns (loss, parts).

        ``out`` is the model's output on ``window[:, :seq_len]`` when the caller already ran it.
        """
        if out is None:
            out = self._forward(window)
        if self.context_parallel is not None:  # this rank's tokens; the mean over cp ranks is the global mean
            total, lm, extra = self.context_parallel.loss(out.logits, out.mtp_logits, window,
                                                          mtp_weight=self.args.mtp_loss_weight)
        else:
            total, lm, extra = multi_token_prediction_loss(
                out.logits, out.mtp_logits, window, mtp_weight=self.args.mtp_loss_weight
            )
        aux = getattr(out, "aux_loss", None)
        if aux is not None:
            total = total + aux
        parts = {"lm_loss": lm.detach(), "aux_loss": aux.detach() if aux is not None else lm.new_zeros(())}
        for k, e in enumerate(extra, start=1):
            parts[f"mtp_loss_{k}"] = e.detach()
        return total, parts

    def _train_step(self) -> dict:
        """One optimizer step. Values stay on the device; one host read per step, for the NaN stop
        (two on Sophia's Hessian steps). Returns floats for loss, lm_loss, grad_norm, lr and
        tokens, and device tensors for the other parts (read when logged)."""
        if self.rlhf is not None:
            return self.rlhf.train_step(self)
        self.model.train()
        accum = self.args.gradient_accumulation_steps
        sums: dict[str, Any] = {}
        tokens = 0
        for micro in range(accum):
            window = batch = self._to_device(self._next_batch())
            if self.pipeline is not None:  # forward and backward over the pipeline's microbatches, loss / accum
                loss = self.pipeline.step(window[:, : self.args.seq_len], window)
                for k, v in {"loss": loss * accum, **self.pipeline.last_metrics}.items():
                    sums[k] = sums.get(k, 0.0) + v.detach() / accum
                tokens += window.shape[0] * self.args.seq_len * self.parallel.dp_size
                continue
            # DDP all-reduces gradients in the last micro-batch's backward only (or every gradient_sync_steps)
            sync = self.model.no_sync() if self._skip_sync(micro) else contextlib.nullcontext()
            offload = self.offloader.offload_context() if self.offloader is not None else contextlib.nullcontext()
            with sync, offload:
                with self._autocast():
                    if self.token_windows:
                        out = self._forward(window)
                        loss, parts = self.compute_loss(window, out)
                    else:
                        loss, parts, out, _ = self._generic_loss(batch)
                    loss = self._add_extra_losses(loss, parts, batch, out)
                if micro == 0 and getattr(self.optimizer, "hessian_due", False):
                    # Sophia's Gauss-Newton-Bartlett estimate reuses this forward's logits (graph still alive);
                    # a non-finite loss must not reach its Hessian state
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(f"loss is {loss.item()} at step {self.step + 1}")
                    self.optimizer.update_hessian(logits=out.logits)
                scaled = loss / accum
                (self.scaler.scale(scaled) if self.scaler else scaled).backward()
            model_metrics = (getattr(out, "metrics", None) or {}) if self.token_windows else {}
            for k, v in {"loss": loss.detach(), **parts, **model_metrics}.items():
                sums[k] = sums.get(k, 0.0) + v / accum
            tokens += self._batch_items(batch) * self.parallel.dp_size  # the global batch
        max_norm = self.args.max_grad_norm if self.args.max_grad_norm is not None else float("inf")
        if self.scaler:
            found_inf = self.scaler.found_inf(self.optimizer)  # unscales the gradients first
        if self.pipeline is not None:  # the norm over every stage, on every pipeline rank
            grad_norm = self.pipeline.clip_grad_norm_(max_norm)
        elif hasattr(self.optimizer, "clip_grad_norm_"):  # ZeRO++: the norm of the averaged, partitioned gradient
            grad_norm = self.optimizer.clip_grad_norm_(max_norm)
        elif params := [p for p in self.model.parameters() if p.grad is not None]:
            grad_norm = clip_grad_norm(params, max_norm)
        else:
            grad_norm = torch.zeros((), device=self.device)
        loss, lm_loss, grad_norm, overflow, stops = self._agree(sums["loss"], sums.get("lm_loss", sums["loss"]),
                                                                grad_norm, found_inf if self.scaler else None)
        self._stop_now = stops > 0
        if not math.isfinite(loss):
            raise NonFiniteLossError(f"loss is {loss} at step {self.step + 1}")
        if not math.isfinite(grad_norm) and self.scaler is None:
            raise NonFiniteLossError(f"gradient norm is {grad_norm} at step {self.step + 1}")
        skipped = overflow > 0  # the scaler skips steps whose gradients overflowed
        if self.scaler:
            self.scaler.step(self.optimizer, found_inf=skipped)
            self.scaler.update()
            sums["skipped"] = float(skipped)
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.lr_scheduler is not None and not skipped:
            self.lr_scheduler.step()
        self.step += 1
        self.tokens_seen += tokens
        sums.update(loss=loss, grad_norm=grad_norm, lr=self.optimizer.param_groups[0]["lr"], tokens=tokens)
        if self.token_windows:
            sums["lm_loss"] = lm_loss
        return sums

    # ---- any model: batches, outputs and losses --------------------------------------------------
    def _to_device(self, batch: Any) -> Any:
        """``batch`` (a tensor, or tuples / lists / dicts of them) on the training device."""
        if isinstance(batch, torch.Tensor):
            return batch.to(self.device, non_blocking=True)
        if isinstance(batch, Mapping):
            return {k: self._to_device(v) for k, v in batch.items()}
        if isinstance(batch, (tuple, list)):
            return type(batch)(self._to_device(v) for v in batch) if type(batch) in (tuple, list) else \
                type(batch)(*(self._to_device(v) for v in batch))  # a namedtuple
        return batch

    def _skip_sync(self, micro: int) -> bool:
        """DDP: keep this micro-batch's gradients local (``no_sync``)? All-reduces run every
        ``gradient_sync_steps`` micro-batches (default: once per step) and always on the last one."""
        if not isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            return False
        accum = self.args.gradient_accumulation_steps
        every = self.args.gradient_sync_steps or accum
        return micro < accum - 1 and (micro + 1) % every != 0

    def _batch_items(self, batch: Any) -> int:
        """Tokens of a token window (rows x seq_len); rows (examples) of any other batch."""
        if self.token_windows:
            return batch.shape[0] * self.args.seq_len
        first = batch
        while not isinstance(first, torch.Tensor):
            if isinstance(first, Mapping) and first:
                first = next(iter(first.values()))
            elif isinstance(first, (tuple, list)) and first:
                first = first[0]
            else:
                return 1
        return first.shape[0] if first.dim() else 1

    def _split_batch(self, batch: Any) -> tuple[tuple, dict, Any]:
        """``(args, kwargs, labels)``: what the model is called with, and the labels ``loss_fn`` compares to."""
        if isinstance(batch, Mapping):
            if self.loss_fn is None:
                return (), dict(batch), batch.get("labels")
            if "labels" not in batch:
                raise ValueError(f"loss_fn needs the labels: the batch is a dict without 'labels' (keys {sorted(batch)})")
            return (), {k: v for k, v in batch.items() if k != "labels"}, batch["labels"]
        if isinstance(batch, (tuple, list)):
            if self.loss_fn is None:
                return tuple(batch), {}, batch[-1] if len(batch) > 1 else None
            if len(batch) < 2:
                raise ValueError("loss_fn needs the labels: a tuple batch is (inputs..., labels)")
            return tuple(batch[:-1]), {}, batch[-1]
        return (batch,), {}, batch if self.loss_fn is not None else None

    def _generic_loss(self, batch: Any) -> tuple[torch.Tensor, dict, Any, tuple]:
        """``(loss, parts, output, (predictions, labels))`` of one batch of a model that is not token windows."""
        call_args, call_kwargs, labels = self._split_batch(batch)
        out = self.model(*call_args, **call_kwargs)
        logits = out.get("logits") if isinstance(out, Mapping) else getattr(out, "logits", None)
        if self.loss_fn is not None:
            if logits is None:
                logits = out[0] if isinstance(out, (tuple, list)) else out
            loss = self.loss_fn(logits, labels)
        elif isinstance(out, torch.Tensor) and out.dim() == 0:
            loss = out
        elif isinstance(out, Mapping) and out.get("loss") is not None:
            loss = out["loss"]
        elif getattr(out, "loss", None) is not None and isinstance(out.loss, torch.Tensor):
            loss = out.loss
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor) and out[0].dim() == 0:
            loss = out[0]
            if logits is None and len(out) > 1 and isinstance(out[1], torch.Tensor):
                logits = out[1]
        else:
            raise TypeError(f"the model returned {type(out).__name__}"
                            f"{' of shape ' + str(tuple(out.shape)) if isinstance(out, torch.Tensor) else ''}: "
                            "return a 0-dim loss, a dict or tuple holding the loss (first), or give Trainer "
                            "loss_fn=(outputs, labels) -> loss")
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise TypeError(f"the loss must be a 0-dim tensor, got {type(loss).__name__}"
                            f"{' of shape ' + str(tuple(loss.shape)) if isinstance(loss, torch.Tensor) else ''}")
        return loss, {}, out, (logits, labels)

    def _add_extra_losses(self, loss: torch.Tensor, parts: dict, window: torch.Tensor, out: Any) -> torch.Tensor:
        extras = [e for e in (cb.extra_loss(self, window, out) for cb in self.callbacks) if e is not None]
        if extras:
            extra = torch.stack([e.reshape(()).to(loss.dtype) for e in extras]).sum()
            parts["extra_loss"] = extra.detach()
            loss = loss + extra
        return loss

    def start_task(self, train_loader: Any, val_loader: Any = None) -> None:
        """A continual-learning task boundary: callbacks' ``on_task_end`` run on the finished task (EWC computes its
        Fisher there), then training goes on with the next task's loaders; the step count continues."""
        for cb in self.callbacks:
            cb.on_task_end(self)
        self.train_loader, self.val_loader = train_loader, val_loader
        self._data_iter, self.micro_batches_seen = None, 0  # the data position counts within the task
        self.best_metric, self.evals_without_improvement = None, 0

    def batch_loss(self, batch: Any) -> torch.Tensor:
        """One batch's loss as the loop computes it, without callbacks' extra losses (EWC's Fisher, curricula's
        per-sample scores); the batch is moved to the device."""
        batch = self._to_device(batch)
        with self._autocast():
            return self.compute_loss(batch)[0] if self.token_windows else self._generic_loss(batch)[0]

    def model_inputs(self, batch: Any) -> tuple[tuple, dict]:
        """``(args, kwargs)`` the loop calls the model with on ``batch`` (LwF calls its frozen copy alike)."""
        if self.token_windows:
            return (batch[:, : self.args.seq_len],), {}
        args, kwargs, _ = self._split_batch(batch)
        return args, kwargs

    def _callback_states(self) -> dict:
        return {f"{i}:{type(cb).__name__}": cb.state_dict() for i, cb in enumerate(self.callbacks)
                if callable(getattr(cb, "state_dict", None))}

    def _agree(self, loss, lm_loss, grad_norm, found_inf):
        """The step's one host read: losses averaged over the ranks, gradient norm, overflow and stop
        requests summed, so that every rank takes the same decision (skip, NaN stop, signal stop)."""
        from torch.distributed.tensor import DTensor

        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        stop = float(self._stops.requested is not None)
        # on the loss's device: with FSDP2's CPU offload the gradients (and their norm) live on the CPU
        grad_norm = grad_norm.to(loss.device)
        values = torch.stack([loss.float(), lm_loss.float(), grad_norm.float(),
                              found_inf.float().to(loss.device) if found_inf is not None else grad_norm.new_zeros(()),
                              grad_norm.new_tensor(stop, dtype=torch.float32)])
        world = self.parallel.world_size
        if world > 1:
            # every rank of a data-parallel group holds the same norm; tensor/pipeline peers the same loss
            values[:3] /= world
            torch.distributed.all_reduce(values)
        return values.tolist()

    @torch.no_grad()
    def evaluate(self) -> dict:
        """Mean loss over up to ``eval_batches`` validation batches: ``val_loss`` (the next-token loss and
        ``val_perplexity`` for token windows, the model's loss otherwise) and ``val_<name>`` for each task
        metric of ``compute_metrics``, computed on the predictions of every data-parallel rank."""
        if self.val_loader is None:
            return {}
        if self.rlhf is not None:
            return self.rlhf.evaluate(self)
        was_training = self.model.training
        self.model.eval()
        swap = getattr(self.optimizer, "eval", None)  # schedule-free optimizers evaluate at their x iterate
        if callable(swap):
            swap()
        total, count = torch.zeros((), device=self.device), 0
        predictions, labels = [], []
        devices = [self.device] if self.device.type == "cuda" else []
        try:
            # Evaluating must not move the training RNG streams (the val loader draws a seed), or resuming would diverge.
            with torch.random.fork_rng(devices=devices):
                # islice: no batch past eval_batches is even loaded
                for window in itertools.islice(self.val_loader, self.args.eval_batches):
                    window = self._to_device(window)
                    if not self.token_windows:
                        with self._autocast():
                            loss, _, _, (logits, label) = self._generic_loss(window)
                        rows = self._batch_items(window)
                        total += loss.float() * rows
                        count += rows
                        if self.compute_metrics is not None:
                            if logits is None or label is None:
                                raise ValueError("compute_metrics needs the model's logits and the batch's labels")
                            predictions.append(logits.detach().float().cpu())
                            labels.append(label.detach().cpu())
                        continue
                    if self.pipeline is not None:
                        _, parts = self.pipeline.evaluate(window[:, : self.args.seq_len], window)
                    else:
                        with self._autocast():
                            _, parts = self.compute_loss(window)
                    total += parts["lm_loss"].float() * window.shape[0]
                    count += window.shape[0]
        finally:
            if callable(swap):
                self.optimizer.train()
            self.model.train(was_training)
        both = torch.stack([total, total.new_tensor(float(count))])
        if self.parallel.dp_size > 1:  # each data-parallel rank evaluated its share of every batch
            torch.distributed.all_reduce(both, group=self.parallel.dp_group)
        if self.context_parallel is not None:  # cp ranks hold shares of each window's loss
            torch.distributed.all_reduce(both, group=self.context_parallel.group)
        total, count = both.tolist()  # one host read per evaluation
        if count == 0:
            raise ValueError("the validation loader yielded no batches")
        loss = total / count
        if not self.token_windows:
            result = {"val_loss": loss}
            if self.compute_metrics is not None:
                from nexus.training.metrics import gather_predictions

                task = self.compute_metrics(gather_predictions(predictions, labels, self.parallel.dp_group))
                result.update({f"val_{k}": float(v) for k, v in task.items()})
            return result
        return {"val_loss": loss, "val_perplexity": math.exp(min(loss, 50.0))}

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_dict(self, *, weights: bool = True) -> dict:
        """Everything a resume needs; ``weights=False`` leaves out the model and optimizer state
        (a sharded run writes them through torch.distributed.checkpoint)."""
        state = {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "model_signature": ckpt.model_signature(self.unwrapped_model),
            "optimizer_type": type(self.optimizer).__name__,
            "scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "rng": ckpt.rng_state(),
            "data": self._data_state(),
            "best_metric": self.best_metric,
            "evals_without_improvement": self.evals_without_improvement,
            "callbacks": self._callback_states(),  # curriculum position, EWC Fisher and anchors, ...
            "args": ckpt.plain_data(self.args),
            "config": ckpt.plain_data(self.config),  # for reference; enums as their values
        }
        if weights:
            optimizer = {}
            if hasattr(self.optimizer, "consolidate_state_dict"):  # ZeRO-1: every rank sends its share to rank 0
                self.optimizer.consolidate_state_dict(to=0)
            if self.is_main or not hasattr(self.optimizer, "consolidate_state_dict"):
                optimizer = self.optimizer.state_dict()
            if hasattr(self.optimizer, "gathered_parameters"):  # ZeRO++: exact fp32 masters, not qwZ's copy
                with self.optimizer.gathered_parameters():
                    model = {k: v.clone() for k, v in self.unwrapped_model.state_dict().items()}
            else:
                model = self.unwrapped_model.state_dict()
            state.update(model=model, optimizer=optimizer)
        return state

    def _write_checkpoint(self, path: Path, write) -> None:
        """Run ``write()``; a signal waits for it, and a failed write names the path and keeps the last good file."""
        try:
            with self._stops.critical():
                write()
        except OSError as exc:
            kept = f"the last good checkpoint {self.last_checkpoint} is kept" if self.last_checkpoint else "no earlier checkpoint"
            raise ckpt.CheckpointError(f"could not write checkpoint {path}: {exc}; {kept}") from exc

    def _save_sharded(self, path: Path) -> None:
        """Every rank writes its shards (a collective); rank 0 the rest of the state."""
        from nexus.training.distributed.checkpointing import save_sharded

        extra = ckpt.plain_data(self.state_dict(weights=False))
        self._write_checkpoint(path, lambda: save_sharded(path, self.model, self.optimizer, extra))

    def save_checkpoint(self, path: str | Path | None = None) -> Path:
        """Write everything a resume needs: to ``path`` when given (a file; a ``.dcp`` directory for a sharded
        run), left out of the keep-last pruning; else ``checkpoint_step_<step>`` in ``checkpoint_dir``.
        Example: ``trainer.save_checkpoint("checkpoint-1000.pt"); trainer.load_checkpoint("checkpoint-1000.pt")``
        """
        explicit = path is not None
        if explicit:
            path = Path(path)
            if self.sharded and path.suffix != ".dcp":
                raise ValueError(f"save_checkpoint({str(path)!r}): this run's parameters are sharded and every rank "
                                 "writes its shards into a directory: give a path ending in .dcp")
            if not self.sharded and path.suffix == ".dcp":
                raise ValueError(f"save_checkpoint({str(path)!r}): .dcp names a sharded checkpoint directory; this "
                                 "run writes one file (e.g. .pt)")
            if self.is_main:
                path.parent.mkdir(parents=True, exist_ok=True)
        if self.sharded:
            path = path or self.checkpoint_dir / f"checkpoint_step_{self.step}.dcp"
            self._save_sharded(path)
            if not explicit:
                self._on_main(lambda: ckpt.prune_checkpoints(self.checkpoint_dir, self.args.keep_last))
            self.last_checkpoint = path
            for cb in self.callbacks:
                cb.on_save(self, path)
            return path
        path = path or self.checkpoint_dir / f"checkpoint_step_{self.step}.pt"
        state = self.state_dict()

        def write():
            self._write_checkpoint(path, lambda: ckpt.save_checkpoint(state, path))
            if not explicit:
                ckpt.prune_checkpoints(self.checkpoint_dir, self.args.keep_last)

        self._on_main(write)
        self.last_checkpoint = path
        for cb in self.callbacks:
            cb.on_save(self, path)
        return path

    def _save_best(self, path: Path | None) -> None:
        if self.sharded:
            self._save_sharded(self.checkpoint_dir / "checkpoint_best.dcp")
            return
        best = self.checkpoint_dir / "checkpoint_best.pt"
        if path is not None:
            self._on_main(lambda: self._write_checkpoint(best, lambda: ckpt.copy_checkpoint(path, best)))
        else:
            state = self.state_dict()
            self._on_main(lambda: self._write_checkpoint(best, lambda: ckpt.save_checkpoint(state, best)))

    def _on_main(self, write) -> None:
        """Rank 0 writes what is not sharded; the others wait, so no rank reads a file before it exists."""
        try:
            if self.is_main:
                write()
        finally:
            self._barrier()

    def _barrier(self) -> None:
        if self.parallel.distributed:
            torch.distributed.barrier()

    def _say(self, line: str) -> None:
        if self.is_main:
            print(line, flush=True)

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything ``save_checkpoint`` wrote (a file, a ``.dcp`` directory, or a checkpoint directory:
        its latest); the model must have the same parameters. Training then continues exactly."""
        path = Path(path)
        if path.is_dir() and path.suffix != ".dcp":
            path = ckpt.latest_checkpoint(path)
        if path.suffix == ".dcp":
            state = self._load_sharded(path)
        elif self.sharded:
            raise ckpt.CheckpointError(f"checkpoint {path} is a single file from an unsharded run; this run's parameters "
                                       "are sharded: resume it with the strategy that wrote it (ddp or one process)")
        else:
            # On CPU first: RNG states must stay CPU tensors; load_state_dict moves the rest to the params' devices.
            state = ckpt.load_checkpoint(path, map_location="cpu")
        saved_type, run_type = state.get("optimizer_type"), type(self.optimizer).__name__
        if saved_type is not None and saved_type != run_type:
            raise ckpt.CheckpointError(f"checkpoint {path} holds the state of a {saved_type} optimizer, "
                                       f"but this run uses {run_type}")
        try:
            ckpt.check_signature(state["model_signature"], self.unwrapped_model, path)
            if "model" in state:  # a sharded checkpoint's weights are already in place
                # ZeRO++ with module=: parameters are freed between blocks; load into the gathered ones
                gathered = getattr(self.optimizer, "gathered_parameters", contextlib.nullcontext)
                with gathered():
                    self.unwrapped_model.load_state_dict(state["model"])
                self.optimizer.load_state_dict(state["optimizer"])
            if self.lr_scheduler is not None and state["scheduler"] is not None:
                self.lr_scheduler.load_state_dict(state["scheduler"])
            elif self._auto_schedule and state["scheduler"] is not None:  # built by train(), then given this state
                self._pending_scheduler_state = state["scheduler"]
            if self.scaler and state["scaler"]:
                self.scaler.load_state_dict(state["scaler"])
            self.step = state["step"]
            self.tokens_seen = state["tokens_seen"]
            self.micro_batches_seen = state["data"]["micro_batches"]
            self.best_metric = state["best_metric"]
            self.evals_without_improvement = state["evals_without_improvement"]
            saved = state.get("callbacks", {})
            for key, cb in ((f"{i}:{type(cb).__name__}", cb) for i, cb in enumerate(self.callbacks)):
                if key in saved:
                    cb.load_state_dict(saved[key])
            ckpt.set_rng_state(state["rng"])
        except (KeyError, ValueError, RuntimeError, TypeError) as exc:
            raise ckpt.CheckpointError(f"checkpoint {path} does not fit this run: {exc!r}") from exc
        self._restore_data(state["data"])

    def _load_sharded(self, path: Path) -> dict:
        from nexus.training.distributed.checkpointing import load_sharded

        try:
            return load_sharded(path, self.model, self.optimizer)
        except (FileNotFoundError, ValueError) as exc:
            raise ckpt.CheckpointError(str(exc)) from exc

    # ---- logging -------------------------------------------------------------------------------
    def _estimate_flops_per_token(self) -> float | None:
        count = getattr(self.unwrapped_model, "num_parameters", None)
        if count is None:
            return None
        # 6 N per token for forward + backward over the active parameters (Kaplan et al. 2020)
        return 6.0 * count(active=True)

    def _open_loggers(self) -> None:
        self._jsonl = self._trackers = None
        if not self.is_main:
            return
        from nexus.training.tracking import check_available, open_trackers

        names = self.args.resolve_report_to()
        check_available(names)  # first, so a missing extra fails before any file is opened
        self.output_dir.mkdir(parents=True, exist_ok=True)
        self._jsonl = open(self.output_dir / "metrics.jsonl", "a")
        config = ckpt.plain_data(self.config) if self.config is not None else {}
        config = {**config, "training": ckpt.plain_data(self.args)} if isinstance(config, dict) else {
            "config": config, "training": ckpt.plain_data(self.args)}
        self._trackers = open_trackers(names, self.output_dir, config, project=self.args.wandb_project,
                                       wandb_mode=self.args.wandb_mode,
                                       mlflow_tracking_uri=self.args.mlflow_tracking_uri)

    def _close_loggers(self) -> None:
        """Close the trackers, then draw the loss and learning-rate curves (``training_curves.png``)."""
        if self._jsonl is not None:
            self._jsonl.close()
        if self._trackers is not None:
            self._trackers.close()
            from nexus.training.tracking import plot_training_curves

            try:
                plot_training_curves(self.output_dir / "metrics.jsonl")
            except ImportError as exc:  # matplotlib comes with the [track] extra; the run itself is done
                print(f"note: no training_curves.png: {exc}", file=sys.stderr)

    def log(self, metrics: dict) -> None:
        if self._jsonl is None:  # not rank 0
            return
        record = {"step": self.step, "tokens": self.tokens_seen, **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._trackers is not None:
            self._trackers.log(metrics, self.step)

    # ---- the loop ------------------------------------------------------------------------------
    def _improved(self, metrics: dict) -> bool:
        value = metrics[self.args.metric_for_best]
        if self.best_metric is None or value < self.best_metric:
            self.best_metric = value
            self.evals_without_improvement = 0
            return True
        self.evals_without_improvement += 1
        return False

    def _prepare_checkpoint_dir(self, say) -> None:
        """Clear what a killed save left behind; set aside checkpoints ahead of this run's step."""
        stale = ckpt.remove_stale_temporaries(self.checkpoint_dir)
        if stale:
            say(f"removed {len(stale)} temporary file(s) left by an interrupted save: {', '.join(p.name for p in stale)}")
        moved = ckpt.set_aside_later_checkpoints(self.checkpoint_dir, self.step)
        if moved is not None:
            say(f"checkpoints after step {self.step} belong to another run of {self.checkpoint_dir}: moved to {moved}")

    def _stop_message(self, signum: int) -> str:
        where = self.last_checkpoint
        how = (f"{self.resume_command} --resume {where}" if self.resume_command
               else f"trainer.train(resume_from={str(where)!r})")
        return f"stopped by {signal.Signals(signum).name} at step {self.step}; resume with: {how}"

    def _log_metrics(self, metrics: dict) -> dict:
        """``metrics`` with device tensors read back, in one host read."""
        keys = [k for k, v in metrics.items() if isinstance(v, torch.Tensor)]
        if not keys:
            return dict(metrics)
        values = torch.stack([metrics[k].detach().float().reshape(()) for k in keys]).tolist()
        return {**metrics, **dict(zip(keys, values))}

    def train(self, max_steps: int | None = None, resume_from: str | Path | None = None) -> TrainResult:
        """Run until ``max_steps`` (argument, ``args.max_steps``, ``args.total_tokens`` or ``args.num_epochs``
        passes over a finite train loader), early stopping, NaN, or SIGTERM / Ctrl-C (which finish the step,
        save a checkpoint and return)."""
        from nexus.training.progress import TrainingProgress

        if resume_from is not None:
            self.load_checkpoint(resume_from)
            self._say(f"resumed from step {self.step} (tokens {self.tokens_seen:,}) of {resume_from}")
        planned = self.args.resolve_max_steps(self._batches_per_epoch())
        max_steps = max_steps or planned
        if max_steps is None:
            raise ValueError("give max_steps (to train() or TrainingArguments), total_tokens, or num_epochs with a "
                             "train loader that has a length")
        self._ensure_scheduler(planned or max_steps)  # the schedule spans the planned run
        if self.step >= max_steps:
            self._say(f"the run is finished: it is at step {self.step} of {max_steps}; nothing to train")
            return TrainResult(step=self.step, tokens_seen=self.tokens_seen, stop_reason="finished",
                               last_checkpoint=Path(resume_from) if resume_from else self.last_checkpoint,
                               best_metric=self.best_metric, metrics={})
        if self.is_main:
            self._prepare_checkpoint_dir(self._say)
        self._barrier()
        self._stops = StopSignals()
        self._stop_now = False
        self._open_loggers()
        stop_reason = "max_steps"
        metrics: dict = {}
        progress = TrainingProgress(total=max_steps, start=self.step, enabled=self.args.progress_bar and self.is_main,
                                    silent=not self.is_main)
        window_time, window_tokens = 0.0, 0  # tokens/s over training steps only, not eval or checkpoints
        saved_step = None
        try:
            with self._stops as stops, progress:
                for cb in self.callbacks:
                    cb.on_train_begin(self)
                if self.step == 0 and self.val_loader is not None:  # the baseline the run improves on
                    start = self.evaluate()
                    self.log(start)
                    progress.print_metrics(0, max_steps, start)
                while self.step < max_steps and not self.should_stop and not self._stop_now:
                    good_micro_batches, good_rng = self.micro_batches_seen, ckpt.rng_state()
                    step_start = time.perf_counter()
                    try:
                        metrics = self._train_step()
                    except NonFiniteLossError as exc:
                        # the checkpoint must be exactly the state after the last good step
                        self.optimizer.zero_grad(set_to_none=True)
                        self.micro_batches_seen = good_micro_batches
                        ckpt.set_rng_state(good_rng)
                        path = self.save_checkpoint()
                        progress.print(f"[red]stopping: {exc}; the last good state is saved in {path}[/red]")
                        self.log({"nonfinite_at_step": self.step + 1})
                        stop_reason = "nonfinite_loss"
                        break
                    window_time += time.perf_counter() - step_start
                    window_tokens += metrics.pop("tokens")
                    rate = window_tokens / max(window_time, 1e-9)  # examples per second for a model with labels
                    metrics["tokens_per_s" if self.token_windows else "samples_per_s"] = rate
                    if self._flops_per_token and self.args.peak_flops:
                        metrics["mfu"] = rate * self._flops_per_token / self.args.peak_flops
                    progress.update(self.step, loss=metrics.get("lm_loss", metrics["loss"]), tokens_per_s=rate)
                    if self.step % self.args.logging_steps == 0 or self.step == max_steps:
                        metrics = self._log_metrics(metrics)
                        epoch = self._epoch()
                        if epoch is not None:
                            metrics["epoch"] = epoch
                        system = self._system_metrics()
                        self.log({**metrics, **system})
                        progress.print_metrics(self.step, max_steps, metrics)
                        for cb in self.callbacks:
                            cb.on_log(self, metrics)
                        window_time, window_tokens = 0.0, 0
                    improved = False
                    if self.val_loader is not None and (
                        self.step % self.args.eval_steps == 0 or self.step == max_steps
                    ):
                        evaluation = self.evaluate()
                        metrics.update(evaluation)
                        self.log(evaluation)
                        progress.print_metrics(self.step, max_steps, evaluation)
                        improved = self._improved(evaluation)
                        for cb in self.callbacks:
                            cb.on_evaluate(self, evaluation)
                        patience = self.args.early_stopping_patience
                        if patience is not None and self.evals_without_improvement >= patience:
                            stop_reason = "early_stopping"
                            self.should_stop = True
                    path = None
                    if (self.step % self.args.save_steps == 0 or self.step == max_steps or self.should_stop
                            or stops.requested is not None):
                        path = self.save_checkpoint()
                        saved_step = self.step
                    if improved and self.args.save_best:
                        self._save_best(path)
                    if not self.parallel.distributed:  # ranks stop on the step they agreed on in _agree
                        self._stop_now = stops.requested is not None
                if self._stop_now:
                    if saved_step != self.step:  # the signal came before the first step of this call
                        self.save_checkpoint()
                    stop_reason = "signal"
                    stops.requested = stops.requested or signal.SIGTERM  # a peer's signal: as a scheduler's
                    progress.print(self._stop_message(stops.requested), markup=False)
                elif self.should_stop and stop_reason == "max_steps":
                    stop_reason = "callback"
        finally:
            self._finish(failed=sys.exc_info()[1] is not None)
        return TrainResult(
            step=self.step,
            tokens_seen=self.tokens_seen,
            stop_reason=stop_reason,
            last_checkpoint=self.last_checkpoint,
            best_metric=self.best_metric,
            metrics=self._log_metrics(metrics),
            signal=self._stops.requested,
        )

    def _batches_per_epoch(self) -> int | None:
        """Micro-batches in one pass over the train data; None for a loader without a length."""
        if self._epoch_batches is not None:
            return self._epoch_batches
        try:
            return len(self.train_loader)
        except TypeError:
            return None

    def _epoch(self) -> float | None:
        """Passes over the train loader so far (fractional), for logging; None without a length."""
        n = self._batches_per_epoch()
        return self.micro_batches_seen / n if n else None

    def _system_metrics(self) -> dict:
        if not self.args.system_metrics or not self.is_main:
            return {}
        from nexus.training.metrics import system_metrics

        return system_metrics(self.device)

    def _ensure_scheduler(self, max_steps: int) -> None:
        """Build the "auto" schedule over ``max_steps`` (once), then apply a state a checkpoint brought."""
        if not self._auto_schedule or self.lr_scheduler is not None:
            return
        from nexus.training.run import build_scheduler

        lrs = [group["lr"] for group in self.optimizer.param_groups]
        if self._pending_scheduler_state is not None:  # the peaks the schedule was built on, not the current lrs
            for group in self.optimizer.param_groups:
                group["lr"] = group.get("initial_lr", group["lr"])
        args = self.args
        if args.warmup_steps > max_steps:
            raise ValueError(f"warmup_steps ({args.warmup_steps}) exceeds the run's {max_steps} steps")
        self.lr_scheduler = build_scheduler(self.optimizer, args, max_steps)
        if self._pending_scheduler_state is not None:
            self.lr_scheduler.load_state_dict(self._pending_scheduler_state)
            for group, group_lr in zip(self.optimizer.param_groups, lrs):  # as the checkpoint left them
                group["lr"] = group_lr
            self._pending_scheduler_state = None

    def _finish(self, failed: bool) -> None:
        """End-of-run callbacks and closing the loggers; while an error is already on its way out, a failure
        here is reported in one line instead of replacing it."""
        steps = [lambda cb=cb: cb.on_train_end(self) for cb in self.callbacks] + [self._close_loggers]
        first = None
        for run in steps:
            try:
                run()
            except Exception as exc:
                if failed:
                    print(f"warning: while stopping after an error, {type(exc).__name__}: {exc}", file=sys.stderr)
                elif first is None:
                    first = exc
        if first is not None:
            raise first
