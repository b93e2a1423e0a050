"""Sharded checkpoints through ``torch.distributed.checkpoint`` (DCP), and a safetensors export.

A checkpoint is a directory: DCP's ``.metadata`` and one ``__<rank>_*.distcp`` file per rank
(each rank writes its own shards of the model and of the optimizer state), ``extra.pt`` (rank 0's
``extra`` dict: step, scheduler, RNG, ...) and ``nexus_checkpoint.json`` (what wrote it). State
goes through ``get_state_dict`` / ``set_state_dict``, so keys are the plain module names (FSDP2,
DDP and activation-checkpoint wrappers stripped) and DCP reshards on load: a checkpoint written by
2 ranks loads at 4 ranks, at 1, or unwrapped, optimizer state included.

Atomic: every rank writes under ``.<name>.saving`` next to the final directory; after a barrier
rank 0 adds ``extra.pt`` and the manifest and renames the directory into place. A save killed
midway leaves only the temporary directory (removed by the next save to that path), never a half
checkpoint under the final name. Saving over an existing checkpoint renames the old one to
``.<name>.replaced`` until the new one is in place, then deletes it; a directory that is not a Nexus
checkpoint is never overwritten. Every rank must see the same filesystem (as DCP requires).

Example::
    save_sharded("ckpt/step-100", model, optimizer, {"step": 100})
    extra = load_sharded("ckpt/step-100", model, optimizer)     # any world size; extra["step"] == 100
"""
from __future__ import annotations

import datetime
import io
import json
import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["export_safetensors", "load_sharded", "save_sharded"]

MANIFEST = "nexus_checkpoint.json"
EXTRA_FILE = "extra.pt"
FORMAT = "nexus-dcp-1"
_SHOWN = 3  # mismatching keys named in an error before "and N more"


def _checkpoint_exception() -> type:
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException


# DCP's CheckpointException derives from BaseException, not Exception
_FAILURES = (Exception, _checkpoint_exception())


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _together(what: str, fn: Callable[[], Any] | None) -> Any:
    """Run ``fn`` (on the ranks that pass one) and raise on every rank if it failed on any.

    A rank that raised alone would leave its peers waiting in the next collective until the timeout.
    """
    result, error = None, None
    if fn is not None:
        try:
            result = fn()
        except _FAILURES as exc:  # re-raised below, on every rank
            error = exc
    if _distributed():
        reports: list = [None] * dist.get_world_size()
        dist.all_gather_object(reports, None if error is None else (_rank(), type(error), str(error)))
        failed = [r for r in reports if r is not None]
        if failed and error is None:
            rank, cls, message = failed[0]
            # the same exception type on every rank, so callers can catch it alike
            try:
                peer_error = cls(f"{message} (raised on rank {rank})") if issubclass(cls, Exception) else None
            except Exception:
                peer_error = None
            raise peer_error or RuntimeError(f"{what} failed on rank {rank}: {cls.__name__}: {message}")
    if error is not None:
        raise error
    return result


def _dcp(fn: Callable, state: dict, path: Path) -> None:
    """``dcp.save`` / ``dcp.load``; in one process without a group, without DCP's warning that it is."""
    if _distributed():
        fn(state, checkpoint_id=path)
        return
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        fn(state, checkpoint_id=path, no_dist=True)


def _state(model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_state_dict

    if optimizer is None:
        return {"model": get_model_state_dict(model)}
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def _is_checkpoint(path: Path) -> bool:
    return (path / MANIFEST).is_file() and (path / ".metadata").is_file()


def _describe(exc: BaseException) -> str:
    """One line per failing rank; DCP's CheckpointException text is every rank's whole traceback."""
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        # values are (exception, traceback frames) pairs
        errors = {r: e[0] if isinstance(e, tuple) and e else e for r, e in failures.items()}
        return "; ".join(f"rank {r}: {type(e).__name__}: {e}" for r, e in sorted(errors.items()))
    return f"{type(exc).__name__}: {exc}"


def _model_class_name(model: nn.Module) -> str:
    """The user's class, not FSDP2's generated ``FSDP<Class>`` nor a DDP wrapper."""
    from torch.distributed.fsdp import FSDPModule

    model = getattr(model, "module", model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    for cls in type(model).__mro__:
        if not issubclass(cls, FSDPModule):
            return cls.__name__
    return type(model).__name__


def _plain_data_bytes(extra: dict) -> bytes:
    """``extra`` as torch.save bytes, refused unless ``torch.load(weights_only=True)`` reads it back."""
    buf = io.BytesIO()
    try:
        torch.save(extra, buf)
        torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    except Exception as exc:
        raise TypeError("save_sharded: extra must be plain data (dicts, lists, tuples, str, numbers, bool, None, "
                        f"tensors) so that it loads with weights_only=True; it does not: {exc}") from None
    return buf.getvalue()


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def save_sharded(path_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 extra: dict | None = None) -> Path:
    """Write a sharded checkpoint of ``model`` (and ``optimizer``) to the directory ``path_dir``; collective.

    Args:
        path_dir: the checkpoint directory; created (with parents); an existing Nexus checkpoint there is
            replaced once the new one is complete; anything else there is refused.
        model: FSDP2-wrapped, DDP-wrapped or plain ``nn.Module`` (a plain one needs no process group).
        optimizer: its state (sharded like the parameters under FSDP2) is saved too; None: model only.
        extra: rank 0's dict of plain data (step, scheduler state, RNG tensors, ...); returned by
            :func:`load_sharded`.

    Returns the final path. Raises (on every rank) TypeError for an ``extra`` that is not plain data,
    FileExistsError when ``path_dir`` holds something other than a checkpoint, RuntimeError naming the
    path when writing failed (the final path then holds what it held before).

    Example::
        save_sharded(out / "step-100", model, optimizer, {"step": 100, "scheduler": sched.state_dict()})
    """
    import torch.distributed.checkpoint as dcp

    final = Path(path_dir)
    if extra is not None and not isinstance(extra, dict):
        raise TypeError(f"save_sharded: extra must be a dict or None, got {type(extra).__name__}")
    extra_bytes = _together("save_sharded: checking extra", lambda: _plain_data_bytes(extra or {}))
    tmp = final.parent / f".{final.name}.saving"
    old = final.parent / f".{final.name}.replaced"

    def prepare() -> None:
        if final.exists() and not _is_checkpoint(final):
            raise FileExistsError(f"save_sharded: {final} exists and is not a Nexus sharded checkpoint "
                                  f"(no {MANIFEST} and .metadata): refusing to replace it")
        final.parent.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a save that was killed: never a finished checkpoint
            shutil.rmtree(tmp)
        tmp.mkdir()

    _together("save_sharded: preparing " + str(final), prepare if _rank() == 0 else None)
    state = _state(model, optimizer)
    try:
        _together(f"save_sharded: writing {final}", lambda: _dcp(dcp.save, state, tmp))
    except _FAILURES as exc:
        if _rank() == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise RuntimeError(f"save_sharded: writing the checkpoint {final} failed ({_describe(exc)}); "
                           f"{final} holds what it held before") from exc

    def finish() -> None:
        _fsync_write(tmp / EXTRA_FILE, extra_bytes)
        manifest = {"format": FORMAT, "world_size": dist.get_world_size() if _distributed() else 1,
                    "model_class": _model_class_name(model), "has_optimizer": optimizer is not None,
                    "extra_keys": sorted(map(str, (extra or {}).keys())),
                    "saved_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        _fsync_write(tmp / MANIFEST, json.dumps(manifest, indent=1).encode())
        # at every moment a complete checkpoint is under `final` or `old` (a directory cannot be replaced
        # in one rename); an `old` without `final` is the last good one of an interrupted replace
        if final.exists():
            if old.exists():
                shutil.rmtree(old)
            os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)

    try:
        _together(f"save_sharded: finishing {final}", finish if _rank() == 0 else None)
    except Exception as exc:
        raise RuntimeError(f"save_sharded: finishing the checkpoint {final} failed ({type(exc).__name__}: {exc}); "
                           f"a previous checkpoint there, if any, is at {final} or {old}") from exc
    return final


def _shape_text(size) -> str:
    return "[" + ", ".join(str(int(s)) for s in size) + "]"


def _check_compatible(path: Path, state: dict) -> None:
    """Raise ValueError naming ``path`` and the first keys whose presence or shape differs."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    saved = FileSystemReader(str(path)).read_metadata().state_dict_metadata
    expected: dict[str, torch.Size] = {f"model.{k}": v.shape for k, v in state["model"].items()
                                       if isinstance(v, torch.Tensor)}
    for fqn, entries in state.get("optim", {}).get("state", {}).items():
        for name, v in entries.items():
            if isinstance(v, torch.Tensor):
                expected[f"optim.state.{fqn}.{name}"] = v.shape
    if "optim" in state and not any(k.startswith("optim.") for k in saved):
        raise ValueError(f"load_sharded: the checkpoint {path} holds no optimizer state (saved with optimizer=None): "
                         "load it with optimizer=None")
    problems = []
    for key, shape in expected.items():
        meta = saved.get(key)
        if meta is None:
            problems.append(f"key {key!r} is missing from the checkpoint")
        elif not isinstance(meta, TensorStorageMetadata):
            problems.append(f"key {key!r} is not a tensor in the checkpoint")
        elif tuple(meta.size) != tuple(shape):
            problems.append(f"key {key!r} has shape {_shape_text(meta.size)} in the checkpoint but "
                            f"{_shape_text(shape)} in the model")
    for key in saved:
        if key.startswith("model.") and key not in expected:
            problems.append(f"key {key!r} is in the checkpoint but not in the model")
    if problems:
        more = f" (and {len(problems) - _SHOWN} more)" if len(problems) > _SHOWN else ""
        raise ValueError(f"load_sharded: the checkpoint {path} does not fit this model: "
                         + "; ".join(problems[:_SHOWN]) + more)


def load_sharded(path_dir: str | os.PathLike, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a checkpoint written by :func:`save_sharded` into ``model`` (and ``optimizer``), in place; collective.

    Any world size and wrapping: DCP reads each rank's shards of the saved tensors, whatever the
    sharding that wrote them. Build the model (wrapped as it will train) and the optimizer first.
    optimizer=None loads the model only (a checkpoint with optimizer state is fine).

    Returns the ``extra`` dict that was saved. Raises FileNotFoundError (naming the path) when there
    is no checkpoint there, ValueError naming the path and the mismatching keys when the checkpoint is
    from another model or has no state for ``optimizer``; the model is untouched then.

    Example::
        extra = load_sharded("ckpt/step-100", model, optimizer); start = extra["step"]
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_state_dict

    path = Path(path_dir)

    def check_exists() -> None:
        if not _is_checkpoint(path):
            replaced = path.parent / f".{path.name}.replaced"
            hint = (f"; a save interrupted while replacing it left the previous checkpoint at {replaced}"
                    if _is_checkpoint(replaced) else "")
            what = ("does not exist" if not path.exists()
                    else f"is not a Nexus sharded checkpoint (no {MANIFEST} and .metadata)")
            raise FileNotFoundError(f"load_sharded: {path} {what}{hint}")

    _together(f"load_sharded: checking {path}", check_exists)
    state = _state(model, optimizer)
    _together(f"load_sharded: checking {path}", lambda: _check_compatible(path, state))
    _dcp(dcp.load, state, path)
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    extra = path / EXTRA_FILE
    return torch.load(extra, weights_only=True) if extra.is_file() else {}


def export_safetensors(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the full, unsharded model state dict to one safetensors file for inference; collective.

    Shards are gathered to rank 0 (on the CPU, one tensor at a time), which alone writes ``path``
    (atomically: a temporary file renamed into place). Keys are the plain module names, dtypes as
    stored (the fp32 master weights under FSDP2 mixed precision); tied weights are stored under each
    name, so ``model.load_state_dict(safetensors.torch.load_file(path))`` works on an unwrapped model.

    Example::
        export_safetensors(model, "out/model.safetensors")
        plain = MoETransformer(cfg); plain.load_state_dict(safetensors.torch.load_file("out/model.safetensors"))
    """
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    target = Path(path)
    # full_state_dict + cpu_offload: rank 0 gets CPU tensors, the other ranks an empty dict
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def write() -> None:
        tensors, seen = {}, set()
        for key, value in state.items():
            t = value.detach().cpu().contiguous()
            ptr = (t.untyped_storage().data_ptr(), t.storage_offset())
            tensors[key] = t.clone() if ptr in seen else t  # safetensors refuses tensors sharing memory
            seen.add(ptr)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.parent / f".{target.name}.writing"
        save_file(tensors, str(tmp), metadata={"format": "pt", "model_class": _model_class_name(model)})
        os.replace(tmp, target)

    _together(f"export_safetensors: writing {target}", write if _rank() == 0 else None)
    return target
