"""Run configuration: YAML files mapped onto keyword-only dataclasses.

A run file has up to eight sections, each mapped onto one dataclass::

    model:      MoEConfig            (nexus.models.moe)
    data:       DataConfig
    training:   TrainingArguments    (nexus.training.trainer)
    optimizer:  OptimizerConfig
    qat:        QATConfig            (nexus.training.qat; only when present: quantization-aware training)
    distributed: DistributedConfig   (nexus.training.distributed; only when present: the device mesh)
    memory:     MemoryConfig         (nexus.training.gradient_methods; activation checkpointing, offloading)
    hpo:        HPOConfig            (nexus.training.hpo; only when present: what `nexus hpo` searches)

An unknown or misspelt key, a value of the wrong type, or an impossible value stops loading with a
``ConfigError`` that names the file and the key.
"""
from __future__ import annotations

import contextlib
import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A configuration file or section is invalid; the message names the file and the key."""


@dataclasses.dataclass(kw_only=True)
class DataConfig:
    """Where the tokens come from. With no ``train_files`` the embedded stdlib corpus is built."""

    data_dir: str = "data/tiny"
    vocab_size: int = 4096
    max_corpus_bytes: int | None = 8_000_000
    tokenizer_path: str | None = None
    train_files: list[str] | None = None
    val_files: list[str] | None = None
    num_workers: int = 0

    def __post_init__(self):
        if self.vocab_size < 256 + 4:
            raise ValueError(f"vocab_size must be at least 260 for a byte-level BPE, got {self.vocab_size}")
        if self.max_corpus_bytes is not None and self.max_corpus_bytes <= 0:
            raise ValueError(f"max_corpus_bytes must be positive, got {self.max_corpus_bytes}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if (self.train_files is None) != (self.val_files is None):
            raise ValueError("train_files and val_files must be given together")


OPTIMIZER_TYPES = ("adamw", "muon", "soap", "lion", "sophia", "prodigy", "schedule_free")


@dataclasses.dataclass(kw_only=True)
class OptimizerConfig:
    """Which optimizer and its settings.

    ``lr`` defaults to the training section's ``max_lr`` (1.0 for prodigy, whose lr scales the step
    size it estimates). ``schedule_free`` runs without an LR schedule and warms up internally over
    ``training.warmup_steps``.
    """

    type: str = "adamw"
    lr: float | None = None
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    momentum: float = 0.95  # muon
    precondition_frequency: int = 10  # soap
    max_precond_dim: int = 1024  # soap
    rho: float = 0.04  # sophia
    hessian_update_period: int = 10  # sophia
    d0: float = 1e-6  # prodigy

    def __post_init__(self):
        if self.type not in OPTIMIZER_TYPES:
            raise ValueError(f"type must be one of {', '.join(OPTIMIZER_TYPES)}, got {self.type!r}")
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}")
        if not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints are accepted for floats."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1:
            return _coerce(value, options[0], where)
        for arg in options:
            try:
                return _coerce(value, arg, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp in (int, float) and isinstance(value, str):
        # PyYAML (YAML 1.1) reads 3e-4 and 1e11 as strings; 3.0e-4 and 100_000 as numbers
        with contextlib.suppress(ValueError):  # not a number: the checks below name the key
            value = float(value.replace("_", ""))
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, float) and value.is_integer():  # 1e11 and 1.0e+11 mean a whole number
            return int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        return build_dataclass(tp, value, where)
    return value


def build_dataclass(cls: type, values: dict | None, where: str) -> Any:
    """Build ``cls`` from a mapping, rejecting unknown keys and wrong types; ``where`` prefixes errors."""
    values = {} if values is None else values
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    hints = typing.get_type_hints(cls)
    synonyms = cls.init_synonyms() if hasattr(cls, "init_synonyms") else {}  # e.g. training: log_interval
    fields.update(dict.fromkeys(synonyms))
    hints.update(synonyms)
    unknown = sorted(set(values) - set(fields))
    if unknown:
        close = {k: _closest(k, fields) for k in unknown}
        hint = "; ".join(f"{k!r}" + (f" (did you mean {c!r}?)" if c else "") for k, c in close.items())
        raise ConfigError(f"{where}: unknown key {hint}; known keys: {', '.join(sorted(fields))}")
    kwargs = {k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()}
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"{where}: {exc}") from exc


def _closest(key: str, fields: dict) -> str | None:
    import difflib

    match = difflib.get_close_matches(key, list(fields), n=1, cutoff=0.75)
    return match[0] if match else None


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    """One training run: the sections of a YAML run file."""

    model: Any
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    training: Any = None
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    qat: Any = None  # a QATConfig when the file has a `qat:` section: quantization-aware training
    distributed: Any = None  # a DistributedConfig when the file has a `distributed:` section
    memory: Any = None  # a MemoryConfig when the file has a `memory:` section
    hpo: Any = None  # an HPOConfig when the file has an `hpo:` section (`nexus hpo`)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _sections() -> dict[str, type]:
    from nexus.models.moe import MoEConfig
    from nexus.training.distributed.mesh import DistributedConfig
    from nexus.training.gradient_methods import MemoryConfig
    from nexus.training.hpo import HPOConfig
    from nexus.training.qat import QATConfig
    from nexus.training.trainer import TrainingArguments

    return {"model": MoEConfig, "data": DataConfig, "training": TrainingArguments, "optimizer": OptimizerConfig,
            "qat": QATConfig, "distributed": DistributedConfig, "memory": MemoryConfig, "hpo": HPOConfig}


def config_from_dict(raw: dict, source: str = "<dict>") -> RunConfig:
    """Map a parsed run file onto ``RunConfig``; ``source`` names the file in errors."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    sections = _sections()
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f"{source}: unknown section {', '.join(map(repr, unknown))}; known: {', '.join(sections)}")
    if "model" not in raw:
        raise ConfigError(f"{source}: the 'model' section is missing")
    optional = {"qat", "distributed", "memory", "hpo"}  # present only when the file has the section
    built = {name: build_dataclass(cls, raw.get(name), f"{source}: {name}")
             for name, cls in sections.items() if name not in optional or raw.get(name) is not None}
    cfg = RunConfig(**built)
    if cfg.hpo is not None:
        try:
            cfg.hpo.check_keys(sections)
        except ValueError as exc:
            raise ConfigError(f"{source}: hpo: {exc}") from exc
    if cfg.qat is not None and cfg.training.precision in ("fp8", "mxfp8", "fp4"):
        raise ConfigError(f"{source}: qat and training.precision={cfg.training.precision} both replace Linear layers;"
                          " choose one")
    if cfg.memory is not None and cfg.memory.checkpointing != "none" and cfg.distributed is not None \
            and cfg.distributed.activation_checkpointing:
        raise ConfigError(f"{source}: memory.checkpointing and distributed.activation_checkpointing both checkpoint "
                          "the blocks; choose one")
    decay = cfg.training.weight_decay  # seed 003's training.weight_decay is the optimizer's: one value
    if decay is not None:
        if "weight_decay" in (raw.get("optimizer") or {}) and cfg.optimizer.weight_decay != decay:
            raise ConfigError(f"{source}: training.weight_decay ({decay}) and optimizer.weight_decay "
                              f"({cfg.optimizer.weight_decay}) disagree: set one")
        cfg.optimizer.weight_decay = decay
    if cfg.data.vocab_size != cfg.model.vocab_size:
        raise ConfigError(
            f"{source}: data.vocab_size ({cfg.data.vocab_size}) differs from model.vocab_size ({cfg.model.vocab_size})"
        )
    if cfg.training.seq_len > cfg.model.max_seq_len:
        raise ConfigError(
            f"{source}: training.seq_len ({cfg.training.seq_len}) exceeds model.max_seq_len ({cfg.model.max_seq_len})"
        )
    return cfg


def load_config(path: str | Path) -> RunConfig:
    """Read a YAML run file. Example: ``cfg = load_config("configs/tiny.yaml"); cfg.model.d_model``."""
    path = Path(path)
    if path.is_dir():
        yamls = sorted(p.name for p in path.glob("*.y*ml"))
        hint = f"; it holds {', '.join(yamls[:5])}{', ...' if len(yamls) > 5 else ''}" if yamls else ""
        raise ConfigError(f"{path} is a directory, not a config file: pass a YAML run file{hint}")
    if not path.exists():
        raise ConfigError(f"{path}: config file does not exist")
    if not path.is_file():
        raise ConfigError(f"{path} is not a regular file: pass a YAML run file")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config file: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    return config_from_dict(raw, str(path))
